"""The device a plan is for (conf/hardware/*.yaml): memory, peak rates, node size and links."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from phi4.errors import ConfigError, settings_from_dict


@dataclass(frozen=True)
class HardwareConfig:
    name: str
    memory_gb: float          # device memory as the driver reports it (1 GB = 1e9 bytes)
    reserved_gb: float        # not available to tensors: CUDA context, NCCL, fragmentation
    peak_tflops_bf16: float   # dense peak
    peak_tflops_fp8: float
    matmul_efficiency: float  # assumed achieved fraction of peak on the model's large matmuls
    gemm_ramp_rows: int       # GEMM rows (tokens) at which that fraction halves
    gpus_per_node: int
    nvlink_gb_s: float        # achieved collective bus bandwidth inside a node
    ib_gb_s: float            # achieved bus bandwidth per device across nodes
    collectives: str = "nccl"  # nccl, or gloo (CPU: its reduce-scatter copies each gradient bucket)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "HardwareConfig":
        hardware = settings_from_dict(cls, "hardware", values)
        for name in ("memory_gb", "peak_tflops_bf16", "peak_tflops_fp8", "nvlink_gb_s", "ib_gb_s"):
            if not getattr(hardware, name) > 0:
                raise ConfigError(f"hardware.{name}={getattr(hardware, name)} must be positive")
        if not 0 < hardware.matmul_efficiency <= 1:
            raise ConfigError(f"hardware.matmul_efficiency={hardware.matmul_efficiency}; valid: (0, 1]")
        if hardware.collectives not in ("nccl", "gloo"):
            raise ConfigError(f"hardware.collectives={hardware.collectives!r}; valid: nccl, gloo")
        if hardware.gpus_per_node < 1:
            raise ConfigError(f"hardware.gpus_per_node={hardware.gpus_per_node} must be at least 1")
        return hardware

    @property
    def usable_bytes(self) -> float:
        return (self.memory_gb - self.reserved_gb) * 1e9
