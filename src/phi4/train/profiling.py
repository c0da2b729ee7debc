"""A window of steps profiled, as Megatron-LM's --profile does (training.py: the torch profiler
over --profile-step-start..end on --profile-ranks, or a CUDA profiler capture range for nsys):

- `profile.kind=torch`: torch.profiler records steps `profile.first_step`..`profile.last_step`
  (each inside a `phi4 step N` range) on the ranks `profile.ranks`, and writes
  `run_dir/profile/rank<R>_steps<first>-<last>.pt.trace.json` (chrome://tracing, Perfetto, and
  TensorBoard's profile plugin read it).
- `profile.kind=nsys` (CUDA): the same steps as the capture range of `nsys profile
  --capture-range=cudaProfilerApi` (torch.cuda.profiler.start/stop), each step an NVTX range;
  with `profile.record_shapes` every operator too (torch.autograd.profiler.emit_nvtx).
- `profile.memory_snapshot_on_oom` (CUDA): the caching allocator records its history from the
  start, and an out-of-memory error dumps it to `run_dir/profile/rank<R>_oom_memory.pickle`
  (https://pytorch.org/memory_viz reads it), as torchtitan's memory profiler does.

A run stopped inside the window writes what it recorded; a resumed run inside the window starts
recording at its first step.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Optional

import torch

from phi4.errors import ConfigError
from phi4.settings import Profile

log = logging.getLogger("phi4.train")

KINDS = ("none", "torch", "nsys")
# Allocation events the allocator keeps for the out-of-memory snapshot (torch's own default).
MEMORY_HISTORY_ENTRIES = 100_000


def check_profile(profile: Profile, device_kind: str) -> None:
    """The profile settings, before any process group; `device_kind`: "cuda" or "cpu"."""
    if profile.kind not in KINDS:
        raise ConfigError(f"profile.kind={profile.kind!r}; valid: {', '.join(KINDS)}")
    if profile.last_step < profile.first_step:
        raise ConfigError(f"profile.last_step={profile.last_step} is before profile.first_step={profile.first_step}; "
                          "valid: last_step >= first_step (both steps are profiled)")
    if device_kind != "cuda":
        if profile.kind == "nsys":
            raise ConfigError("profile.kind=nsys needs CUDA (a CUDA profiler capture range); valid here: torch or none")
        if profile.memory_snapshot_on_oom:
            raise ConfigError("profile.memory_snapshot_on_oom=true needs CUDA (the caching allocator's history); "
                              "valid here: false")


class StepProfiler:
    """Started and stopped by the Trainer around each step: `step_started(n)` / `step_ended(n)`
    with the step's 1-based number, `close()` on every path."""

    def __init__(self, profile: Profile, rank: int, run_dir: Path, on_cuda: bool,
                 log_info: Callable[[str], None] = log.info):
        self.profile, self.on_cuda, self.log_info = profile, on_cuda, log_info
        self.here = profile.kind != "none" and (not profile.ranks or rank in profile.ranks)
        self.folder = Path(run_dir) / "profile"
        self.name = f"rank{rank:05d}"
        self._torch: Optional[torch.profiler.profile] = None
        self._nsys = False
        self._nvtx_shapes = None
        self._range = None
        self._first: Optional[int] = None
        if profile.memory_snapshot_on_oom and on_cuda:
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_HISTORY_ENTRIES)

    @property
    def recording(self) -> bool:
        return self._torch is not None or self._nsys

    def step_started(self, step: int) -> None:
        p = self.profile
        if not self.here or not p.first_step <= step <= p.last_step:
            return
        if not self.recording:
            self._start(step)
        if self._torch is not None:
            self._range = torch.profiler.record_function(f"phi4 step {step}")
            self._range.__enter__()
        else:
            torch.cuda.nvtx.range_push(f"phi4 step {step}")

    def step_ended(self, step: int) -> None:
        if not self.recording:
            return
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        elif self._nsys:
            torch.cuda.nvtx.range_pop()
        if step >= self.profile.last_step:
            self._stop(step)

    def close(self) -> None:
        """A run that ends inside the window (a stop, a failure) writes what it recorded."""
        if self._range is not None:
            self._range.__exit__(None, None, None)
            self._range = None
        if self.recording:
            self._stop(None)

    def _start(self, step: int) -> None:
        self._first = step
        if self.profile.kind == "torch":
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.on_cuda:
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self._torch = torch.profiler.profile(activities=activities, record_shapes=self.profile.record_shapes,
                                                 with_stack=self.profile.with_stack)
            self._torch.__enter__()
        else:  # nsys: Megatron-LM's cudaProfilerStart, and emit_nvtx for operators' ranges with shapes
            torch.cuda.profiler.start()
            self._nsys = True
            if self.profile.record_shapes:
                self._nvtx_shapes = torch.autograd.profiler.emit_nvtx(record_shapes=True)
                self._nvtx_shapes.__enter__()
        self.log_info(f"profile: recording from step {step} to step {self.profile.last_step} ({self.profile.kind})")

    def _stop(self, step: Optional[int]) -> None:
        last = step if step is not None else "stop"
        if self._torch is not None:
            prof, self._torch = self._torch, None
            prof.__exit__(None, None, None)
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{self.name}_steps{self._first}-{last}.pt.trace.json"
            prof.export_chrome_trace(str(path))
            self.log_info(f"profile: steps {self._first}-{last} traced to {path}")
        else:
            if self._nvtx_shapes is not None:
                self._nvtx_shapes.__exit__(None, None, None)
                self._nvtx_shapes = None
            torch.cuda.profiler.stop()
            self._nsys = False
            self.log_info(f"profile: the CUDA profiler capture range ends after step {last}")

    @contextmanager
    def snapshot_on_oom(self):
        """Around the training loop: an out-of-memory error dumps the allocator's history first."""
        try:
            yield
        except torch.OutOfMemoryError:
            if self.profile.memory_snapshot_on_oom and self.on_cuda:
                self.folder.mkdir(parents=True, exist_ok=True)
                path = self.folder / f"{self.name}_oom_memory.pickle"
                torch.cuda.memory._dump_snapshot(str(path))
                log.error(f"out of memory: the allocator's history is in {path} (https://pytorch.org/memory_viz)")
            raise
