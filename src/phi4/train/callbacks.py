"""Per-step extras the entry point hands to the Trainer: each is checked before any process group
(against the run's `RunSpec`), set up once the parts exist (with the `RunParts` it keeps), called
after every step, and closed with the run. Validation loss is here; generative evaluation is
phi4.eval.callback's."""

from __future__ import annotations

from typing import Optional

from phi4.data.blend import evaluation_samples
from phi4.train.parts import RunParts, RunSpec


class Callback:
    def check(self, spec: RunSpec) -> None:
        """Its settings, with the run's typed settings at hand, before any process group."""

    def setup(self, parts: RunParts) -> None:
        """The run's parts exist (model chunks, datasets, metrics): keep what it needs."""

    def after_step(self, step: int) -> None:
        """After the step's update and its training line, before any save."""

    def close(self) -> None:
        """The run ends, on every path."""


class ValidationLoss(Callback):
    """The objective's loss (and figures) on a fixed set of validation samples, every
    `train.valid_every` steps and at the last step."""

    def __init__(self):
        self.every, self.valid, self.parts = 0, None, None

    def setup(self, parts: RunParts) -> None:
        self.parts, train = parts, parts.spec.settings.train
        self.every = train.valid_every
        if self.every:
            self.valid: Optional[list] = evaluation_samples(parts.valid_dataset, train.valid_samples, parts.dp_rank,
                                                            parts.spec.dp_size)

    def after_step(self, step: int) -> None:
        parts = self.parts
        steps = parts.spec.total_steps
        if not self.valid or not (step % self.every == 0 or step == steps):
            return
        val = parts.objective.evaluate(parts.model_chunks, parts.collate(self.valid))
        if parts.is_logger:
            extra = parts.objective.describe(val)
            extra = f" | {extra}" if extra else ""
            parts.metrics.write(dict(step=step, **{f"val_{k}": v for k, v in val.items()}),
                                f"step {step:>6}/{steps} | validation loss {val['loss']:.4f}{extra}")
