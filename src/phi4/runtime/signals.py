"""Stop requests by signal, recorded from the moment a process starts.

SLURM's warning before a time limit (SIGUSR1, `--signal`) or a preemption (SIGTERM) may arrive
while a job is still importing torch or building its model; Python's default action for
SIGUSR1 would kill the process without a checkpoint. The entry points call `install()` before
anything slow, and the loops ask `received()` between steps (or problems).

`install()` also makes every process that multiprocessing starts from this one end with it,
kill -9 included: the checkpoint writer's Manager (~450 MB; forked on the CPU, spawned on GPUs,
where the spawned interpreter re-imports the entry module and so calls `install()` itself) and
its forked writer would otherwise live on as orphans.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import multiprocessing.util
import signal
from typing import Optional

_received: Optional[str] = None


def _record(signum, frame) -> None:
    global _received
    _received = signal.Signals(signum).name


def _die_with_parent(_=None) -> None:
    """Linux's PR_SET_PDEATHSIG: SIGKILL this process when the one that started it ends
    (elsewhere nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def end_children_with_this_process() -> None:
    """Every process multiprocessing forks from here ends with this one (spawned children: see
    `install()`)."""
    multiprocessing.util.register_after_fork(_die_with_parent, _die_with_parent)


def install() -> None:
    """Record SIGTERM/SIGUSR1 in this process, unless it is a multiprocessing child: a spawned
    worker re-imports the entry module, and one that ignored SIGTERM would hang its pool's
    terminate() (the tokenizer pool of the corpus generation did). Children end with their parent."""
    end_children_with_this_process()
    if multiprocessing.current_process().name != "MainProcess":
        # A spawned child re-importing the entry module (multiprocessing runs no after-fork hooks
        # in spawned processes): it ends with the process that spawned it.
        _die_with_parent()
        return
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, _record)


def received() -> Optional[str]:
    """The name of the stop signal received so far, if any."""
    return _received
