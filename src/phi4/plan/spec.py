"""What the planner plans: one training job's model, layout, precision and batch, on N devices.

Built from the same Hydra config as phi4-train (`from_config`), or directly in tests and by the
layout search (`dataclasses.replace` of one field at a time).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional

from phi4.errors import ConfigError
from phi4.model.config import ModelConfig, PrecisionConfig, TopologyConfig


@dataclass(frozen=True)
class PlanSpec:
    model: ModelConfig
    topology: TopologyConfig
    precision: PrecisionConfig
    world_size: int
    seq_length: int
    micro_batch_size: int
    global_batch_size: int
    overlap_grad_reduce: bool = False
    overlap_param_gather: bool = False
    grad_reduce_in_fp32: bool = True  # train.grad_reduce_in_fp32: gradient buffers in fp32, else in the weights' dtype
    cross_entropy: Optional[str] = None  # the loss kernel: te, native, unfused; None: phi4-train's (cross_entropy_impl)
    token_budget: Optional[float] = None  # tokens of the stage (days are reported when known)
    steps: Optional[int] = None

    @property
    def dp(self) -> int:
        return self.world_size // self.topology.model_parallel_size

    @property
    def num_micro_batches(self) -> int:
        """Micro-batches each data-parallel replica runs per step."""
        return self.global_batch_size // (self.micro_batch_size * self.dp)

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_size * self.seq_length

    @property
    def total_steps(self) -> Optional[float]:
        if self.steps:
            return float(self.steps)
        if self.token_budget:
            return self.token_budget / self.tokens_per_step
        return None


def world_size_of(topology: TopologyConfig, override: Optional[int]) -> int:
    if override is not None:  # its type and range: phi4.settings.Plan
        return override
    if topology.world_size:
        return topology.world_size
    raise ConfigError(
        "the device count is unknown: set plan.gpus=N, or topology.nodes and topology.gpus_per_node"
    )


def from_config(cfg: Mapping[str, Any], gpus: Optional[int] = None) -> PlanSpec:
    """A PlanSpec from a composed phi4-train config (a plain dict)."""
    topology = TopologyConfig.from_dict(cfg["topology"])
    train = cfg["train"]
    return PlanSpec(
        model=ModelConfig.from_dict(cfg["model"]),
        topology=topology,
        precision=PrecisionConfig.from_dict(cfg["precision"]),
        world_size=world_size_of(topology, gpus),
        seq_length=int(train["seq_length"]),
        micro_batch_size=int(train["micro_batch_size"]),
        global_batch_size=int(train["global_batch_size"]),
        overlap_grad_reduce=bool(train.get("overlap_grad_reduce", False)),
        overlap_param_gather=bool(train.get("overlap_param_gather", False)),
        grad_reduce_in_fp32=bool(train.get("grad_reduce_in_fp32", True)),
        token_budget=train.get("token_budget"),
        steps=train.get("steps"),
    )
