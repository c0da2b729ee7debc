"""When a run stops early: a stop signal (SIGTERM, or SIGUSR1, SLURM's warning before a time
limit), the wall-clock budget or the exit interval ends it with a checkpoint and EXIT_RESUMABLE;
too many non-finite steps in a row end it with TrainingStopped."""

from __future__ import annotations

import logging
import time
from typing import Optional

import torch

from phi4.runtime import device, signals
from phi4.settings import Train
from phi4.train.update import StepResult

log = logging.getLogger("phi4.train")

EXIT_RESUMABLE = 75  # stopped early with a checkpoint saved (signal, time budget): requeue to continue


class TrainingStopped(RuntimeError):
    """Too many non-finite steps in a row."""


class StopPolicy:
    """Acts between steps, on every rank together: stopping means a collective save."""

    def __init__(self, train: Train):
        signals.install()  # already done by the entry points; here for other callers
        self.train, self.started, self.in_a_row = train, time.monotonic(), 0

    def after_update(self, step: int, result: StepResult, latest_checkpoint, is_logger: bool) -> None:
        """Count non-finite steps in a row (every rank sees the same, the norm being all-reduced);
        too many raise TrainingStopped."""
        if result.spike:
            return  # the spike policy's (phi4.train.spikes), not a non-finite gradient
        if result.update_successful:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        if is_logger:
            log.warning(f"step {step}: non-finite gradient norm ({result.grad_norm}); update skipped")
        limit = self.train.max_nonfinite_in_a_row
        if self.in_a_row >= limit:
            raise TrainingStopped(
                f"{self.in_a_row} steps in a row had a non-finite loss or gradient norm (train.max_nonfinite_in_a_row="
                f"{limit}); stopping at step {step}. Lower optim.lr or check the data; the last checkpoint is "
                f"{latest_checkpoint()}")

    def reason(self, step: int, steps: int) -> Optional[str]:
        """Why to stop after `step`, agreed by every rank (each keeps its own clock), or None. Never
        after the last step: the run ends there with its final checkpoint, which the next stage
        starts from, not with a resumable stop whose resume would have nothing to do."""
        if step >= steps:
            return None
        t = self.train
        out_of_time = t.max_wall_minutes is not None and time.monotonic() - self.started > 60 * t.max_wall_minutes
        interval = bool(t.exit_interval) and step % t.exit_interval == 0 and step < steps
        if not (self._agreed(out_of_time) or interval):
            return None
        return signals.received() or (f"train.max_wall_minutes={t.max_wall_minutes}" if out_of_time
                                      else f"train.exit_interval={t.exit_interval}")

    @staticmethod
    def _agreed(local_reason: bool) -> bool:
        """True on every rank if any rank got a signal or has its own reason to stop."""
        flag = device.current().put(torch.tensor([1.0 if signals.received() or local_reason else 0.0]))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())
