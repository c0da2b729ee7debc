"""A per-rank watchdog for hangs: a thread that expects progress within an allowance and, when
none comes, writes every thread's Python stack to `<directory>/<host>-rank<N>.txt` and ends the
process with EXIT_HUNG, which the sbatch script requeues (the run resumes from its last checkpoint).

A rank stuck in a collective never returns to Python, so nothing else can notice: not the
stop policy, and not NCCL's own watchdog before its process-group timeout (10 minutes by
default, which the other 1919 ranks wait out). Every rank runs its own watchdog armed at the same
points of the loop (after each step), so when one rank hangs, the others, waiting for it in the
next collective, time out too and each writes where it waits; the stuck rank's file names the
function it is stuck in. After writing, a rank waits `grace_s` before it exits, so that the
launcher (srun --kill-on-bad-exit, torchrun) does not kill the other ranks before they have
written theirs.

    dog = Watchdog(run_dir / "hangs", rank)
    dog.arm("start-up", 1800)            # seconds; None: not watched
    with dog.allow("save at step 100", 1200):
        save()                           # a longer allowance, then the previous one again, afresh
    dog.close()

The check runs in a Python thread: a rank whose main thread holds the GIL in C code is not seen
(a collective, a CUDA synchronize or a sleep release it); NCCL's own watchdog is the backstop.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

log = logging.getLogger("phi4.watchdog")

EXIT_HUNG = 76  # no progress within the allowance: stacks written; requeue to resume from the last checkpoint
GRACE_S = 5.0


class Watchdog:
    def __init__(self, directory: Path, rank: int, grace_s: float = GRACE_S, exit_code: int = EXIT_HUNG):
        self.directory, self.rank, self.grace_s, self.exit_code = Path(directory), rank, grace_s, exit_code
        self.host = socket.gethostname().split(".")[0]
        self._lock = threading.Lock()
        self._phase, self._allowance, self._deadline = "", None, None
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="phi4-watchdog", daemon=True)
        self._thread.start()

    @property
    def path(self) -> Path:
        return self.directory / f"{self.host}-rank{self.rank}.txt"

    def arm(self, phase: str, seconds: Optional[float]) -> None:
        """Expect the next call to arm (or allow) within `seconds`, counted from now; None: unwatched."""
        with self._lock:
            self._phase, self._allowance = phase, seconds
            self._deadline = None if seconds is None else time.monotonic() + seconds

    @contextmanager
    def allow(self, phase: str, seconds: Optional[float]):
        """A longer allowance for one piece of work (a save, an evaluation); afterwards the
        previous phase and allowance again, counted from then."""
        with self._lock:
            before = self._phase, self._allowance
        self.arm(phase, seconds)
        try:
            yield
        finally:
            self.arm(*before)

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=5)

    def _watch(self) -> None:
        while not self._closed.wait(self._poll_s()):
            with self._lock:
                phase, allowance, deadline = self._phase, self._allowance, self._deadline
            if deadline is not None and time.monotonic() > deadline:
                self._hung(phase, allowance)

    def _poll_s(self) -> float:
        allowance = self._allowance
        return 1.0 if allowance is None else min(1.0, max(0.05, allowance / 20))

    def _hung(self, phase: str, allowance: float) -> None:
        line = (f"rank {self.rank} on {self.host}: no progress in {phase} for {allowance:.1f} s; "
                f"every thread's stack is in {self.path}; exit {self.exit_code} to resume from the last checkpoint")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with self.path.open("w") as out:
                out.write(f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {line}\n\n")
                out.flush()
                faulthandler.dump_traceback(out, all_threads=True)
        except OSError as err:
            line += f" (could not write it: {err})"
            faulthandler.dump_traceback(all_threads=True)  # to stderr instead
        log.error(line)
        for handler in logging.getLogger().handlers:
            handler.flush()
        time.sleep(self.grace_s)  # the other ranks write theirs before a launcher kills them
        os._exit(self.exit_code)


def nccl_flight_recorder(directory: Path) -> None:
    """Where NCCL's flight recorder writes its trace when NCCL's own watchdog times out, unless
    the environment says: `<directory>/<host>-nccl-rank<N>`. The recorder is on when the launch
    sets TORCH_FR_BUFFER_SIZE (the cluster file's `env`); nothing to do on the CPU."""
    if int(os.environ.get("TORCH_FR_BUFFER_SIZE", "0") or 0) > 0:
        Path(directory).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        os.environ.setdefault("TORCH_FR_DUMP_TEMP_FILE", str(Path(directory) / f"{host}-nccl-rank"))
