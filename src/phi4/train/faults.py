"""Faults injected on purpose (the `fault` settings group, all off by default), so that the tests
can show what a run does about them: a rank that hangs inside a step (the hang watchdog), a rank
slower than the others in every step (the straggler report)."""

from __future__ import annotations

import logging
import time

from phi4.settings import Fault

log = logging.getLogger("phi4.train")


def hang_inside_step(seconds: float) -> None:
    """Where an injected hang waits: the stuck rank's stack dump names this function."""
    time.sleep(seconds)


class Faults:
    def __init__(self, fault: Fault, rank: int):
        self.fault, self.rank = fault, rank

    def inside_step(self, step: int) -> None:
        f = self.fault
        if f.delay_rank == self.rank and f.delay_seconds:
            time.sleep(f.delay_seconds)
        if f.hang_step == step and f.hang_rank == self.rank:
            log.warning(f"fault.hang_step={step}: rank {self.rank} sleeps {f.hang_seconds} s inside the step")
            hang_inside_step(f.hang_seconds)
