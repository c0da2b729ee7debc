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
    sm_count: int             # streaming multiprocessors (a GEMM's waves; SMs TE's TP overlap takes)
    gemm_efficiency_bf16: float  # achieved fraction of the bf16 peak on a large GEMM
    gemm_efficiency_fp8: float   # the same in FP8 with fast accumulation (TE's fprop GEMMs)
    gemm_efficiency_fp8_split: float  # FP8 with split accumulation (TE's dgrad and wgrad GEMMs)
    gemm_k_overhead: int      # a tile's prologue and epilogue, in K: a GEMM runs at k / (k + this)
    attention_fwd_tflops: float  # fused causal attention's forward on a long sequence
    attention_bwd_tflops: float  # and its backward (FLOPs counted as 2.5 x the forward's)
    attention_seq_half: int   # the sequence at which attention runs at half those rates
    hbm_gb_s: float           # device memory bandwidth the memory-bound kernels achieve
    sustained_clock: float    # the fraction of the benchmarks' clock held through training steps
    gpus_per_node: int
    nvlink_gb_s: float        # achieved collective bus bandwidth inside a node
    ib_gb_s: float            # achieved bus bandwidth per device across nodes
    collectives: str = "nccl"  # nccl, or gloo (CPU: its reduce-scatter copies each gradient bucket)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "HardwareConfig":
        hardware = settings_from_dict(cls, "hardware", values)
        for name in ("memory_gb", "peak_tflops_bf16", "peak_tflops_fp8", "nvlink_gb_s", "ib_gb_s", "sm_count",
                     "attention_fwd_tflops", "attention_bwd_tflops", "hbm_gb_s"):
            if not getattr(hardware, name) > 0:
                raise ConfigError(f"hardware.{name}={getattr(hardware, name)} must be positive")
        for name in ("gemm_efficiency_bf16", "gemm_efficiency_fp8", "gemm_efficiency_fp8_split", "sustained_clock"):
            if not 0 < getattr(hardware, name) <= 1:
                raise ConfigError(f"hardware.{name}={getattr(hardware, name)}; valid: (0, 1]")
        for name in ("gemm_k_overhead", "attention_seq_half"):
            if getattr(hardware, name) < 0:
                raise ConfigError(f"hardware.{name}={getattr(hardware, name)}; valid: 0 or more")
        if hardware.collectives not in ("nccl", "gloo"):
            raise ConfigError(f"hardware.collectives={hardware.collectives!r}; valid: nccl, gloo")
        if hardware.gpus_per_node < 1:
            raise ConfigError(f"hardware.gpus_per_node={hardware.gpus_per_node} must be at least 1")
        return hardware

    @property
    def usable_bytes(self) -> float:
        return (self.memory_gb - self.reserved_gb) * 1e9
