"""Per-step extras the entry point hands to the Trainer: each is checked before any process group,
set up once the parts exist, called after every step, and closed with the run. Validation loss is
here; generative evaluation is phi4.eval.callback's."""

from __future__ import annotations

from phi4.data.blend import evaluation_samples


class Callback:
    def check(self, trainer) -> None:
        """Its settings, with the trainer's typed settings at hand, before any process group."""

    def setup(self, trainer) -> None:
        """The trainer's parts exist (model chunks, datasets, metrics)."""

    def after_step(self, trainer, step: int) -> None:
        """After the step's update and its training line, before any save."""

    def close(self) -> None:
        """The run ends, on every path."""


class ValidationLoss(Callback):
    """The objective's loss (and figures) on a fixed set of validation samples, every
    `train.eval_every` steps and at the last step."""

    def __init__(self):
        self.every, self.valid = 0, None

    def setup(self, trainer) -> None:
        self.every = trainer.settings.eval_every
        if self.every:
            self.valid = evaluation_samples(trainer.valid_dataset, trainer.settings.eval_samples, trainer.dp_rank,
                                            trainer.dp)

    def after_step(self, trainer, step: int) -> None:
        if not self.valid or not (step % self.every == 0 or step == trainer.steps):
            return
        val = trainer.objective.evaluate(trainer.ddp, trainer.collate(self.valid))
        if trainer.is_logger:
            extra = trainer.objective.describe(val)
            extra = f" | {extra}" if extra else ""
            trainer.metrics.write(dict(step=step, **{f"val_{k}": v for k, v in val.items()}),
                                  f"step {step:>6}/{trainer.steps} | validation loss {val['loss']:.4f}{extra}")
