"""Where a run's checkpoints are and which is whole: `checkpoints/step_NNNNNNN/` directories, and
the `latest` and `final` files naming them. A pointer is replaced atomically, and only after every
rank has finished writing, so a crash during a save leaves the previous checkpoint as latest."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from phi4.checkpoint.safe_load import check_checkpoint
from phi4.errors import ConfigError

LATEST = "latest"
FINAL = "final"  # names the checkpoint a finished run ended with: what the next stage starts from


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step_{step:07d}"


def require_checkpoint(directory: Path) -> None:
    """A complete torch_dist checkpoint whose files name nothing that could run code."""
    if not (directory / ".metadata").exists():
        raise ConfigError(f"{directory} is not a Megatron-Core torch_dist checkpoint (no .metadata)")
    check_checkpoint(directory)


def resolve_checkpoint(path: str | Path, setting: str = "") -> Path:
    """A checkpoint directory, or a run directory: then its final checkpoint (a stage starts
    from the previous stage's run directory, whose final checkpoint exists only once it ends).
    With `setting`, a refusal names it first (`checkpoint.load=PATH: ...`)."""
    if setting:
        try:
            return resolve_checkpoint(path)
        except ConfigError as err:
            raise ConfigError(f"{setting}={path}: {err}") from err
    path = Path(path)
    pointer = path / "checkpoints" / FINAL
    if (path / "checkpoints").is_dir():
        if not pointer.exists():
            latest = path / "checkpoints" / LATEST
            at = f"its latest checkpoint is {latest.read_text().strip()}" if latest.exists() else "it has no checkpoint"
            raise ConfigError(f"{path} is a run that has not finished (no checkpoints/{FINAL}); {at}")
        path = pointer.parent / pointer.read_text().strip()
    require_checkpoint(path)
    return path


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    pointer = Path(run_dir) / "checkpoints" / LATEST
    if not pointer.exists():
        return None
    target = pointer.parent / pointer.read_text().strip()
    if not (target / ".metadata").exists():
        raise ConfigError(f"{pointer} names {target.name}, which is not a complete checkpoint")
    return target


def _point(root: Path, name: str, directory: Path) -> None:
    tmp = root / f".{name}.tmp-{os.getpid()}"
    tmp.write_text(directory.name + "\n")
    os.replace(tmp, root / name)


def publish(run_dir: Path, directory: Path, keep: int, final: bool = False) -> None:
    """Point `latest` (and for the run's last step `final`) at `directory` (atomically), then
    delete all but the newest `keep` (at least 1), never one that `latest` or `final` names."""
    root = Path(run_dir) / "checkpoints"
    _point(root, LATEST, directory)
    if final:
        _point(root, FINAL, directory)
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    complete = [p for p in steps if p.name <= directory.name]
    named = {(root / name).read_text().strip() for name in (LATEST, FINAL) if (root / name).exists()}
    for old in complete[: max(len(complete) - max(keep, 1), 0)]:
        if old.name not in named:  # what `latest` or `final` names is never removed
            shutil.rmtree(old, ignore_errors=True)
