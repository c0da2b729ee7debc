"""The Phi-4 tokenizer gives the ids of docs/model.md, "Tokenizer", offline."""

import pytest

from phi4.data.tokenizer import VOCAB_SIZE, get_tokenizer, render_chat, special_tokens


def test_known_encodings():
    tok = get_tokenizer()
    assert tok.encode("hello world") == [15339, 1917]
    assert tok.encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]


@pytest.mark.parametrize(
    "token, id_",
    [
        ("<|dummy_0|>", 100256), ("<|endoftext|>", 100257), ("<|fim_prefix|>", 100258),
        ("<|fim_middle|>", 100259), ("<|fim_suffix|>", 100260), ("<|dummy_1|>", 100261),
        ("<|dummy_3|>", 100263), ("<|im_start|>", 100264), ("<|im_end|>", 100265),
        ("<|im_sep|>", 100266), ("<|endofprompt|>", 100276), ("<|dummy_85|>", 100349),
    ],
)
def test_special_token_ids(token, id_):
    assert special_tokens()[token] == id_
    assert get_tokenizer().encode(token) == [id_]


def test_specials_fill_the_padded_vocabulary():
    ids = sorted(special_tokens().values())
    assert ids == list(range(100256, VOCAB_SIZE)) and VOCAB_SIZE == 100352
    tok = get_tokenizer()
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (100257, 100265, 100349)


def test_chat_format_round_trip():
    text = render_chat([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}])
    assert text == "<|im_start|>user<|im_sep|>2+2?<|im_end|><|im_start|>assistant<|im_sep|>4<|im_end|>"
    tok = get_tokenizer()
    ids = tok.encode(text)
    assert ids[:1] == [100264] and ids[-1] == 100265 and 100266 in ids
    assert tok.decode(ids) == text
    # Special-token strings inside user text stay ordinary text when asked.
    assert 100264 not in tok.encode("<|im_start|>", allow_special=False)
