"""What preprocess's tokenizer workers run: one JSONL line -> token ids (or why not). A module of
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


def _encode(item: tuple[str, int, bytes]) -> tuple[str, int, int, Optional[list[int]], Optional[str]]:
    source, line_no, raw = item
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        return source, line_no, len(raw), None, f"not valid UTF-8 (byte {err.start} of the line)"
    try:
        return (source, line_no, len(raw)) + _encode_line(line)
    except Exception as err:  # nothing a worker raises may reach the pool: it could hang it
        return source, line_no, len(raw), None, f"could not be tokenized ({type(err).__name__}: {err})"


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
    tok = get_tokenizer()
    # Special-token strings in raw text stay text: a document cannot forge an end-of-document.
    return tok.encode(text, allow_special=False) + [tok.eod_id], None
