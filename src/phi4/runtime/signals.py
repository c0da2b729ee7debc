"""Stop requests by signal, recorded from the moment a process starts.

SLURM's warning before a time limit (SIGUSR1, `--signal`) or a preemption (SIGTERM) may arrive
while a job is still importing torch or building its model; Python's default action for
SIGUSR1 would kill the process without a checkpoint. The entry points call `install()` before
anything slow, and the loops ask `received()` between steps (or problems).
"""

from __future__ import annotations

import signal
from typing import Optional

_received: Optional[str] = None


def _record(signum, frame) -> None:
    global _received
    _received = signal.Signals(signum).name


def install() -> None:
    """Record SIGTERM/SIGUSR1 in this process, unless it is a multiprocessing child: a spawned
    worker re-imports the entry module, and one that ignored SIGTERM would hang its pool's
    terminate() (the tokenizer pool of the corpus generation did)."""
    import multiprocessing

    if multiprocessing.current_process().name != "MainProcess":
        return
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _record)


def received() -> Optional[str]:
    """The name of the stop signal received so far, if any."""
    return _received
