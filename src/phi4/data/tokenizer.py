"""The Phi-4 tokenizer: cl100k_base BPE plus Phi-4's special tokens (docs/model.md, "Tokenizer"), offline.

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


# At most this many characters per call of the BPE library (each character is at least a token's
# worth of input, so a piece stays far below its 200,000-token limit).
PIECE_CHARS = 100_000


def _pieces(text: str, piece_chars: int):
    """(start, end) spans of at most `piece_chars` characters, each cut before a single space that
    sits between two non-space characters: there cl100k's pre-tokenizer always starts a new
    pre-token (" word", " 12", " ." or a lone " "), and the BPE never merges across pre-tokens.
    A stretch with no such space (a very long word) is cut where it must be."""
    start = 0
    while len(text) - start > piece_chars:
        end = start + piece_chars
        cut = text.rfind(" ", start + piece_chars // 2, end)
        while cut > start and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", start + piece_chars // 2, cut)
        cut = cut if cut > start else end
        yield start, cut
        start = cut
    yield start, len(text)


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
        import bpe_openai  # lazy: 1.2 s of CPU to import, and a training run from indexed data never encodes

        self._bpe = bpe_openai.get_encoding("cl100k_base")
        self.specials = special_tokens()
        self._special_by_id = {i: t for t, i in self.specials.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in self.specials) + ")")

    def encode(self, text: str, allow_special: bool = True) -> list[int]:
        """Token ids of `text`, of any length; special-token strings map to their ids unless
        allow_special is False, in which case they are encoded as ordinary text."""
        if not allow_special:
            return self._encode_ordinary(text)
        ids: list[int] = []
        for piece in self._split.split(text):
            if piece in self.specials:
                ids.append(self.specials[piece])
            elif piece:
                ids.extend(self._encode_ordinary(piece))
        return ids

    def _encode_ordinary(self, text: str, piece_chars: int = PIECE_CHARS) -> list[int]:
        """The BPE library refuses inputs of over 200,000 tokens (and a million characters): a
        long text is encoded in pieces cut where cl100k's pre-tokenization cuts anyway, so the
        ids equal one call's wherever one call could encode it."""
        if len(text) <= piece_chars:
            return self._bpe.encode_ordinary(text)
        ids: list[int] = []
        for start, end in _pieces(text, piece_chars):
            ids.extend(self._bpe.encode_ordinary(text[start:end]))
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
