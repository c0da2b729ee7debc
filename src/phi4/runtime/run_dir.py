"""A run directory that a failed start leaves as it found it.

phi4-train, phi4-eval and phi4-pts write `config.yaml` and `tensorboard/` into their run directory
when they start, before any work that is worth keeping. A run that fails before its work begins
(a bad data file found after the process group exists, a checkpoint that does not load, an
out-of-memory in the first step) removes what it added: the directory itself if it made it,
else only the entries that were not there before (top level and `tensorboard/`), and a file it
replaced (a resumed run's `config.yaml`) gets its old contents back. Once the work
has begun (`keep()`), everything stays: it is what a resume continues from. Rank 0 alone makes
and removes; other ranks only read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

WATCHED = ("", "tensorboard")  # where a start writes: the top level and the event-file folder


class RunDirectory:
    def __init__(self, path, rank: int):
        self.path, self.rank = Path(path), rank
        self.made = not self.path.exists()
        self.before = set() if self.made else self._entries()
        self.kept = False
        self.replaced: dict[Path, bytes] = {}

    def write(self, name: str, text: str) -> None:
        """Rank 0 makes the directory and writes `name` in it, keeping what it replaces."""
        if self.rank != 0:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        target = self.path / name
        if target.is_file() and target not in self.replaced:
            self.replaced[target] = target.read_bytes()
        target.write_text(text)

    def _entries(self) -> set[Path]:
        found = set()
        for sub in WATCHED:
            folder = self.path / sub
            if folder.is_dir():
                found.update(folder.iterdir())
        return found

    def keep(self) -> None:
        """The work has begun: a later failure leaves everything for the resume."""
        self.kept = True

    def undo(self) -> None:
        if self.kept or self.rank != 0 or not self.path.is_dir():
            return
        if self.made:
            shutil.rmtree(self.path, ignore_errors=True)
            return
        # deepest first, so that a new tensorboard/ goes after its new event files
        for entry in sorted(self._entries() - self.before, key=lambda p: len(p.parts), reverse=True):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
        for target, old in self.replaced.items():
            target.write_bytes(old)

    def __enter__(self) -> "RunDirectory":
        return self

    def __exit__(self, kind, err, tb) -> bool:
        if kind is not None:
            self.undo()
        return False
