"""What a training step optimizes, as a plug-in: an objective names the data formats it reads,
checks its own settings before any process group, builds what it needs beside the model (DPO: a
frozen reference), and runs the step, the evaluation and its console figures.

Objectives register by name (`@register("lm")`) in their own modules: language modelling in
phi4.train.lm, DPO in phi4.posttrain.dpo (imported by the phi4-train entry point). The Trainer
looks up `train.objective` here and imports none of them by name.
"""

from __future__ import annotations

from typing import Mapping, Optional

from omegaconf import DictConfig

from phi4.errors import ConfigError
from phi4.train.parts import RunSpec
from phi4.train.update import Gate, StepResult

OBJECTIVES: dict[str, type["Objective"]] = {}


def register(name: str):
    """Class decorator: the objective `train.objective=<name>` selects."""

    def add(cls: type["Objective"]) -> type["Objective"]:
        cls.name = name
        OBJECTIVES[name] = cls
        return cls

    return add


class Objective:
    """The interface, with the defaults of a plain next-token objective."""

    name = ""
    formats: tuple[str, ...] = ()  # data.format values it reads
    rows_per_sample = 1  # rows a sample becomes in a micro-batch (DPO: chosen and rejected)

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg  # the composed config: an objective reads its own group from it

    def check(self, spec: RunSpec) -> None:
        """Its settings, before any process group exists (the run's typed settings at hand)."""

    def start_points(self) -> list[tuple[str, str]]:
        """(setting, path) of each checkpoint it reads weights from, checked before any process group."""
        return []

    def build(self, spec: RunSpec, transformer_config) -> None:
        """Called once the policy model exists, with its Megatron-Core TransformerConfig (what it
        builds beside the model, DPO's reference, takes the same layout)."""

    def update(self, model_chunks: list, optimizer, micro_batches: list[dict],
               gate: Optional[Gate] = None) -> StepResult:
        """Forward, backward and the optimizer's update over one global batch's micro-batches;
        `gate` (phi4.train.spikes), asked with the loss first, may veto the update."""
        raise NotImplementedError

    def evaluate(self, model_chunks: list, micro_batches: list[dict]) -> Optional[dict]:
        """{"loss": ..., its own figures} without a backward pass (None off the last pipeline stage)."""
        raise NotImplementedError

    def describe(self, figures: Mapping[str, float]) -> str:
        """Its own figures for the console line ('' for none)."""
        return ""

    def throughput(self, tokens_per_step: int, flops_per_token: float) -> tuple[int, float]:
        """(tokens a step processes, model FLOPs per token) for tokens/s and MFU."""
        return tokens_per_step, flops_per_token


def objective_for(spec: RunSpec) -> Objective:
    """The configured objective (`train.objective`), checked: a registered name, reading the run's
    data format, its own settings valid."""
    name = spec.settings.train.objective
    if name not in OBJECTIVES:
        raise ConfigError(f"train.objective={name!r}; valid: {', '.join(OBJECTIVES)}")
    objective = OBJECTIVES[name](spec.cfg)
    if spec.data_format.name not in objective.formats:
        raise ConfigError(f"train.objective={name} reads data.format {' or '.join(objective.formats)}, "
                          f"not {spec.data_format.name}")
    objective.check(spec)
    return objective
