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
    `train.valid_every` steps and at the last step: the blend's (`val_loss`, `val_<figure>`), and
    with several sources each source's alone (`val_loss/<source>`, `val_<figure>/<source>`), so a
    regression in one source is not averaged away."""

    def __init__(self):
        self.every, self.valid, self.by_source, self.parts = 0, None, {}, None

    def setup(self, parts: RunParts) -> None:
        self.parts, train = parts, parts.spec.settings.train
        self.every = train.valid_every
        if self.every:
            def samples(dataset):
                return evaluation_samples(dataset, train.valid_samples, parts.dp_rank, parts.spec.dp_size)

            self.valid: Optional[list] = samples(parts.valid_dataset)
            self.by_source = {name: rows for name, rows in
                              ((name, samples(d)) for name, d in parts.valid_by_source.items()) if rows}

    def after_step(self, step: int) -> None:
        parts = self.parts
        steps = parts.spec.total_steps
        if not self.valid or not (step % self.every == 0 or step == steps):
            return
        val = parts.objective.evaluate(parts.model_chunks, parts.collate(self.valid))
        per_source = {name: parts.objective.evaluate(parts.model_chunks, parts.collate(rows))
                      for name, rows in self.by_source.items()}
        if parts.is_logger:
            extra = parts.objective.describe(val)
            extra = f" | {extra}" if extra else ""
            record = dict(step=step, **{f"val_{k}": v for k, v in val.items()})
            for name, figures in per_source.items():
                record.update({f"val_{k}/{name}": v for k, v in figures.items()})
            sources = " | by source: " + ", ".join(f"{name} {figures['loss']:.4f}"
                                                   for name, figures in per_source.items()) if per_source else ""
            parts.metrics.write(record, f"step {step:>6}/{steps} | validation loss {val['loss']:.4f}{extra}{sources}")
