"""What a training step optimizes, as a plug-in: an objective names the data formats it reads,
checks its own settings before any process group, builds what it needs beside the model (DPO: a
frozen reference), and runs the step, the evaluation and its console figures.

Objectives register by name (`@register("lm")`) in their own modules: language modelling in
phi4.train.lm, DPO in phi4.posttrain.dpo (imported by the phi4-train entry point). The Trainer
looks up `train.objective` here and imports none of them by name.
"""

from __future__ import annotations

from typing import Optional

from omegaconf import DictConfig

from phi4.errors import ConfigError

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
    gate = None  # set by the Trainer: asked with the loss before each update, may veto it (phi4.train.spikes)
    rows_per_sample = 1  # rows a sample becomes in a micro-batch (DPO: chosen and rejected)

    def __init__(self, cfg: DictConfig):
        self.cfg = cfg

    def check(self, trainer) -> None:
        """Its settings, before any process group exists (the trainer's typed settings are read)."""

    def start_points(self) -> list[tuple[str, str]]:
        """(setting, path) of each checkpoint it reads weights from, checked before any process group."""
        return []

    def build(self, trainer) -> None:
        """Called once the policy model exists (its config, layout and chunks are the trainer's)."""

    def train_step(self, ddp_chunks: list, optimizer, micro_batches: list[dict]) -> dict:
        raise NotImplementedError

    def evaluate(self, chunks: list, micro_batches: list[dict]) -> Optional[dict]:
        raise NotImplementedError

    def describe(self, result: dict) -> str:
        """Its own figures for the console line ('' for none)."""
        return ""

    def throughput(self, tokens_per_step: int, flops_per_token: float) -> tuple[int, float]:
        """(tokens a step processes, model FLOPs per token) for tokens/s and MFU."""
        return tokens_per_step, flops_per_token


def objective_for(trainer) -> Objective:
    """The configured objective (`train.objective`), checked: a registered name, reading the run's
    data format, its own settings valid."""
    name = trainer.settings.objective
    if name not in OBJECTIVES:
        raise ConfigError(f"train.objective={name!r}; valid: {', '.join(OBJECTIVES)}")
    objective = OBJECTIVES[name](trainer.cfg)
    if trainer.data_format.name not in objective.formats:
        raise ConfigError(f"train.objective={name} reads data.format {' or '.join(objective.formats)}, "
                          f"not {trainer.data_format.name}")
    objective.check(trainer)
    return objective
