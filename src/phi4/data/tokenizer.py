"""The Phi-4 tokenizer: cl100k_base BPE plus Phi-4's special tokens (PHI4.md), offline.

The BPE ranks come from the `bpe-openai` wheel (nothing is downloaded). Phi-4 fills every id
from 100256 to 100351 with a special token: the chat markers, cl100k's own specials, and
`<|dummy_N|>` for the rest, numbered in id order (so the pad token `<|dummy_85|>` is 100349).
"""

from __future__ import annotations

import functools
import re

VOCAB_SIZE = 100352  # 100256 BPE ranks + 96 special ids, = 784 x 128
FIRST_SPECIAL = 100256

NAMED_SPECIALS = {
    "<|endoftext|>": 100257,
    "<|fim_prefix|>": 100258,
    "<|fim_middle|>": 100259,
    "<|fim_suffix|>": 100260,
    "<|im_start|>": 100264,
    "<|im_end|>": 100265,
    "<|im_sep|>": 100266,
    "<|endofprompt|>": 100276,
}


def special_tokens() -> dict[str, int]:
    """Every Phi-4 special token and its id."""
    named_ids = set(NAMED_SPECIALS.values())
    dummies = [i for i in range(FIRST_SPECIAL, VOCAB_SIZE) if i not in named_ids]
    tokens = {f"<|dummy_{n}|>": i for n, i in enumerate(dummies)}
    tokens.update(NAMED_SPECIALS)
    return dict(sorted(tokens.items(), key=lambda kv: kv[1]))


class Phi4Tokenizer:
    bos_id = NAMED_SPECIALS["<|endoftext|>"]
    eos_id = NAMED_SPECIALS["<|im_end|>"]
    eod_id = NAMED_SPECIALS["<|endoftext|>"]  # separates documents in pre-training data
    pad_id = 100349  # <|dummy_85|>
    vocab_size = VOCAB_SIZE

    def __init__(self):
        import bpe_openai

        self._bpe = bpe_openai.get_encoding("cl100k_base")
        self.specials = special_tokens()
        self._special_by_id = {i: t for t, i in self.specials.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self.specials) + ")")

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings map to their ids unless allow_special is
        False, in which case they are encoded as ordinary text."""
        if not allow_special:
            return self._bpe.encode_ordinary(text)
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in self.specials:
                ids.append(self.specials[piece])
            elif piece:
                ids.extend(self._bpe.encode_ordinary(piece))
        return ids

    def decode(self, ids) -> str:
        out, run = [], []
        for i in ids:
            i = int(i)
            if i in self._special_by_id:
                if run:
                    out.append(self._bpe.decode(run))
                    run = []
                out.append(self._special_by_id[i])
            else:
                run.append(i)
        if run:
            out.append(self._bpe.decode(run))
        return "".join(out)

    def token_bytes(self, i: int) -> bytes:
        """The bytes of one ordinary token (rank), for exporting the vocabulary."""
        return self._bpe.decode_single_token_bytes(i)


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> Phi4Tokenizer:
    return Phi4Tokenizer()


def render_chat(messages: list[dict]) -> str:
    """Phi-4's chat format ([R] sec. 4): no newlines between parts."""
    return "".join(f"<|im_start|>{m['role']}<|im_sep|>{m['content']}<|im_end|>" for m in messages)
