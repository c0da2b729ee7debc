"""The training job behind `phi4-train`: the callbacks the settings ask for, handed to the Trainer
with the objectives registered (language modelling by phi4.train, DPO by phi4.posttrain.dpo)."""

from __future__ import annotations

from typing import Optional

from omegaconf import DictConfig

from phi4.eval.callback import GenerativeEvaluation
from phi4.posttrain import dpo  # noqa: F401  registers train.objective=dpo
from phi4.runtime import signals
from phi4.settings import Eval, typed
from phi4.train.callbacks import Callback, ValidationLoss
from phi4.train.stop import EXIT_RESUMABLE
from phi4.train.stop import TrainingStopped  # noqa: F401  the entry point's exit code 3
from phi4.train.trainer import Trainer


def callbacks(cfg: DictConfig) -> list[Callback]:
    """Validation loss (train.valid_every), and generative evaluation when eval.every asks for it."""
    chosen: list[Callback] = [ValidationLoss()]
    ev: Optional[Eval] = typed(cfg, "eval") if cfg.get("eval") is not None else None
    if ev is not None and ev.every:
        chosen.append(GenerativeEvaluation(ev, cfg.seed))
    return chosen


def train(cfg: DictConfig) -> int:
    """Run (or resume) the configured training; returns the process exit code. A resumable stop in
    a job of the submitit launcher is requeued by submitit, once the checkpoint is complete."""
    with Trainer(cfg, callbacks(cfg)) as trainer:
        code = trainer.train()
    if code == EXIT_RESUMABLE:
        signals.requeue_by_launcher()
    return code
