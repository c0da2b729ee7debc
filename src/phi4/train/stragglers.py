"""Which rank is slow: each rank times its own work in every step (from the step's start to the
gradient reduction, where the data-parallel ranks wait for each other), and every
`train.log_every` steps the ranks gather their window's mean. The log line and
metrics.jsonl carry the slowest and the fastest rank's time and the slowest rank's host; a rank
slower than the median by `train.straggler_factor` in `train.straggler_windows` windows in a row
is named in a warning (again each window it stays slow).

In synchronous training every rank's whole step takes as long as the slowest one's, so the whole
step's time cannot tell them apart; the time to the gradient reduction can: the fast ranks then
wait in it. With pipeline parallelism it includes the pipeline's own waits.

With `train.overlap_grad_reduce` the reduce-scatters of the buckets that finished early are
already queued by then, on the communication stream, waiting for the slowest peer: synchronizing
the device there would time that wait too, and a fast rank would time as slow as the straggler.
So on a GPU both ends are CUDA events on the compute stream (phi4.runtime.device.Device.mark), as
Megatron-Core's StragglerDetector times its work with events (megatron/core/utils.py 0.19.2,
`StragglerDetector.start_method`/`stop_method`/`elapsed`): the time between them is the compute stream's
own, idle gaps where it waited for this rank's CPU included, the other streams' waits not.
"""

from __future__ import annotations

import logging
import statistics
from typing import Optional

import torch

from phi4.runtime import device
from phi4.runtime.distributed import host_name

log = logging.getLogger("phi4.train")


class StepTimes:
    def __init__(self, factor: Optional[float], windows: int):
        self.factor, self.windows = factor, windows
        self.host = host_name()
        self.window: list[float] = []
        self.slow_windows: dict[int, int] = {}  # rank -> windows in a row slower than factor x median
        self._start = self._reduced = None  # Device.mark()s

    def step_started(self) -> None:
        self._start, self._reduced = device.current().mark(), None

    def gradients_ready(self) -> None:
        """Called where the gradient reduction starts (Megatron-Core's finalize_model_grads)."""
        self._reduced = device.current().mark()

    def watch(self, config) -> None:
        """Have the schedules' gradient reduction (`config.finalize_model_grads_func`) end each
        rank's own time first: there the ranks wait for each other."""
        reduce_gradients = config.finalize_model_grads_func

        def timed_reduction(*args, **kwargs):
            self.gradients_ready()
            return reduce_gradients(*args, **kwargs)

        config.finalize_model_grads_func = timed_reduction

    def step_ended(self) -> None:
        """After the optimizer's update (the events are long reached: no stall)."""
        here = device.current()
        self.window.append(here.seconds_between(self._start, self._reduced or here.mark()))

    def report(self, step: int) -> dict:
        """Collective (every rank, at the same steps): the window's figures for the step's record,
        and the warning for each straggler (on the first rank)."""
        mine = sum(self.window) / max(1, len(self.window))
        self.window = []
        everyone: list = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(everyone, (mine, self.host))
        times = [t for t, _ in everyone]
        slowest, fastest = max(range(len(times)), key=times.__getitem__), min(range(len(times)), key=times.__getitem__)
        median = statistics.median(times)
        for rank, seconds in enumerate(times):
            slow = self.factor is not None and seconds > self.factor * median
            self.slow_windows[rank] = self.slow_windows.get(rank, 0) + 1 if slow else 0
            if slow and self.slow_windows[rank] >= self.windows and torch.distributed.get_rank() == 0:
                log.warning(f"step {step}: rank {rank} on {everyone[rank][1]} is a straggler: {seconds:.3f} s to its "
                            f"gradients against the median {median:.3f} s (more than train.straggler_factor="
                            f"{self.factor}x) in {self.slow_windows[rank]} windows in a row")
        return dict(rank_time_min_s=times[fastest], rank_time_max_s=times[slowest], slowest_rank=slowest,
                    slowest_host=everyone[slowest][1])
