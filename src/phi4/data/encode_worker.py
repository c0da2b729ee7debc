"""What preprocess's tokenizer workers run: one JSONL line or text -> token ids (or why not). A module of
its own and light on imports: each worker is a spawned interpreter that imports it, and needs only
the tokenizer, not torch or Megatron-Core (whose import cost each worker seconds)."""

from __future__ import annotations

import json
from typing import Optional

from phi4.data.tokenizer import get_tokenizer

_TEXT_KEY = "text"


def _init_worker(text_key: str) -> None:
    global _TEXT_KEY
    _TEXT_KEY = text_key


def _encode(item: tuple) -> tuple[str, str, int, Optional[list[int]], Optional[str]]:
    """(source, where, payload, nbytes, error) -> (source, where, nbytes, ids or None, error): a
    payload of bytes is a JSON line, a str the document's text (phi4.data.inputs.Item)."""
    source, where, payload, nbytes, error = item
    if error is not None:
        return source, where, nbytes, None, error
    try:
        if isinstance(payload, str):
            return source, where, nbytes, _ids(payload), None
        try:
            line = payload.decode("utf-8")
        except UnicodeDecodeError as err:
            return source, where, nbytes, None, f"not valid UTF-8 (byte {err.start} of the line)"
        return (source, where, nbytes) + _encode_line(line)
    except Exception as err:  # nothing a worker raises may reach the pool: it could hang it
        return source, where, nbytes, None, f"could not be tokenized ({type(err).__name__}: {err})"


def _ids(text: str) -> list[int]:
    tok = get_tokenizer()
    # Special-token strings in raw text stay text: a document cannot forge an end-of-document.
    return tok.encode(text, allow_special=False) + [tok.eod_id]


def _encode_line(line: str) -> tuple[Optional[list[int]], Optional[str]]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return None, f"not valid JSON ({err.msg} at column {err.colno})"
    if not isinstance(record, dict):
        return None, f"a JSON {type(record).__name__}, not an object"
    text = record.get(_TEXT_KEY)
    if not isinstance(text, str):
        return None, f"no string under the key {_TEXT_KEY!r} (keys: {', '.join(sorted(record))[:80]})"
    return _ids(text), None
