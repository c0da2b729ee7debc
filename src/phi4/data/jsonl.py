"""JSON Lines: input with the `file:line` a message about it names, and the append-only part files
that resumable jobs (PTS, phi4-eval) write a line at a time."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Iterable, Iterator, Union

from phi4.errors import ConfigError


class BadLine(ValueError):
    """A line that is not valid JSON."""


def jsonl_records(path: str | Path) -> Iterator[tuple[str, Union[object, BadLine]]]:
    """(where, record) for every non-blank line; a line that is not valid UTF-8 or does not parse
    gives a BadLine in place of its record, so the caller decides whether to skip it or stop."""
    with open(path, "rb") as f:
        for line_no, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            where = f"{path}:{line_no}"
            try:
                yield where, json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError as err:
                yield where, BadLine(f"not valid UTF-8 (byte {err.start} of the line)")
            except json.JSONDecodeError as err:
                yield where, BadLine(f"not valid JSON ({err.msg} at column {err.colno})")


def checked_records(path: str | Path, prefix: str = "") -> Iterator[tuple[str, object]]:
    """(where, record) for every non-blank line; the first line that is not valid JSON stops with
    one ConfigError naming `prefix`, the file and the line."""
    for where, record in jsonl_records(path):
        if isinstance(record, BadLine):
            raise ConfigError(f"{prefix}{where}: {record}")
        yield where, record


def part_path(directory: Path, rank: int, world_size: int) -> Path:
    """One rank's part file in `directory`."""
    return Path(directory) / f"part-{rank:05d}-of-{world_size:05d}.jsonl"


def read_part(part: Path, repair: bool) -> list:
    """The records of an append-only part file. A last line cut short by a crash is dropped and,
    with `repair`, truncated away so that appending goes on from a whole line; any other bad line
    is an error."""
    part = Path(part)
    if not part.exists():
        return []
    data = part.read_bytes()
    lines = data.split(b"\n")  # the last item is b"" when the file ends with a whole line
    records, good_bytes = [], 0
    for number, line in enumerate(lines[:-1], start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as e:
            if number < len(lines) - 1 or lines[-1] or not repair:
                raise ConfigError(f"{part} line {number} is not valid JSON ({e}): a corrupt part file") from e
            break
        good_bytes += len(line) + 1
    if good_bytes < len(data):
        if not repair:
            raise ConfigError(f"{part} ends in a partial line: its rank did not finish writing it")
        with part.open("r+b") as f:
            f.truncate(good_bytes)
    return records


def append_records(f: IO[str], records: Iterable) -> None:
    """One JSON line per record, on disk (flushed and fsync'ed) before this returns."""
    for record in records:
        f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())
