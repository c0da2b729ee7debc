"""The device this process computes on, chosen once: a CUDA GPU (nccl) where CUDA exists, else
the CPU with Megatron-Core's CPU backend (gloo; phi4.runtime.cpu). Everything that places a
tensor or asks what the device is comes here, never to `torch.cuda.is_available()` itself."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import psutil
import torch

from phi4.runtime import cpu

log = logging.getLogger(__name__)

# Dense BF16 peak TFLOP/s by device name (FP8 doubles it), for MFU.
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


@dataclass(frozen=True)
class Device:
    type: str                        # cuda | cpu
    index: int = 0
    name: str = "cpu"
    capability: tuple[int, int] = (0, 0)

    @property
    def is_cuda(self) -> bool:
        return self.type == "cuda"

    @property
    def backend(self) -> str:
        """torch.distributed's backend for this device."""
        return "nccl" if self.is_cuda else "gloo"

    def describe(self) -> str:
        if self.is_cuda:
            return f"cuda:{self.index} ({self.name}, sm_{self.capability[0]}{self.capability[1]}; nccl)"
        return "cpu (no CUDA: Megatron-Core's CPU backend over gloo)"

    def put(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.cuda(self.index, non_blocking=True) if self.is_cuda else tensor

    def move(self, batch: dict) -> dict:
        """A micro-batch's tensors (and its packed-sequence boundaries) on this device."""
        if not self.is_cuda:
            return batch
        moved = {k: self.put(v) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        params = moved.get("packed_seq_params")
        if params is not None:  # cu_seqlens_q/kv and their _padded forms
            for name, value in vars(params).items():
                if isinstance(value, torch.Tensor):
                    setattr(params, name, self.put(value))
        return moved

    def peak_tflops(self, configured: Optional[float] = None) -> Optional[float]:
        """`configured`, else the dense BF16 peak of a known GPU; None on the CPU (no MFU)."""
        if configured:
            return float(configured)
        return next((v for k, v in PEAK_TFLOPS.items() if k in self.name), None) if self.is_cuda else None

    def mark(self):
        """A point in this rank's own work, for timing: on a GPU an event recorded on the current
        (compute) stream, so that the time to it leaves out communication queued on other streams;
        on the CPU, where work runs as it is issued, the clock."""
        if not self.is_cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    @staticmethod
    def seconds_between(start, end) -> float:
        """The time from one `mark` to a later one (on a GPU, once the stream has reached `end`)."""
        if isinstance(start, float):
            return end - start
        end.synchronize()
        return start.elapsed_time(end) / 1000.0

    def synchronize(self) -> None:
        """Wait for the work queued on the device (nothing to wait for on the CPU)."""
        if self.is_cuda:
            torch.cuda.synchronize(self.index)

    def memory_gb(self) -> float:
        """Peak GPU memory allocated, or the process's resident memory on the CPU."""
        if self.is_cuda:
            return torch.cuda.max_memory_allocated(self.index) / 1e9
        return psutil.Process().memory_info().rss / 1e9

    def rng_state(self) -> Optional[torch.Tensor]:
        return torch.cuda.get_rng_state(self.index) if self.is_cuda else None

    def set_rng_state(self, state: Optional[torch.Tensor]) -> None:
        if self.is_cuda and state is not None:
            torch.cuda.set_rng_state(state, self.index)


_SELECTED: Optional[Device] = None


def select(local_rank: int = 0) -> Device:
    """Choose this process's device, once: the GPU of `local_rank`, or the CPU (switching the CPU
    backend on). Later calls return the same device."""
    global _SELECTED
    if _SELECTED is None:
        if torch.cuda.is_available():
            torch.cuda.set_device(local_rank)
            _SELECTED = Device("cuda", local_rank, torch.cuda.get_device_name(local_rank),
                               tuple(torch.cuda.get_device_capability(local_rank)))
        else:
            cpu.activate()
            _SELECTED = Device("cpu")
        log.info(f"device: {_SELECTED.describe()}")
    return _SELECTED


def kind() -> str:
    """"cuda" or "cpu": the selected device's type, or the one `select` would choose (no side effect)."""
    if _SELECTED is not None:
        return _SELECTED.type
    return "cuda" if torch.cuda.is_available() else "cpu"


def current() -> Device:
    """The device chosen by `select` (choosing the first GPU, or the CPU, if none was)."""
    return _SELECTED or select()
