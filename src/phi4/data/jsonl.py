"""JSON Lines input: each non-blank line parsed, with the `file:line` a message about it names."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Union


class BadLine(ValueError):
    """A line that is not valid JSON."""


def jsonl_records(path: str | Path) -> Iterator[tuple[str, Union[object, BadLine]]]:
    """(where, record) for every non-blank line; a line that does not parse gives a BadLine in
    place of its record, so the caller decides whether to skip it or stop."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                yield where, BadLine(f"not valid JSON ({err.msg} at column {err.colno})")
