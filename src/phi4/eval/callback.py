"""Generative evaluation during training, as a Trainer callback: the `eval` settings checked before
any process group, an Evaluator over the run's chunks, and every `eval.every` steps (and at the
last) the scores in the metrics and each generation with its verdict in
`run_dir/generations/step_NNNNNNN.jsonl`."""

from __future__ import annotations

from phi4.eval.evaluator import Evaluator, check_eval, publish
from phi4.settings import Eval
from phi4.train.callbacks import Callback
from phi4.train.parts import RunParts, RunSpec


class GenerativeEvaluation(Callback):
    def __init__(self, ev: Eval, seed: int):
        self.ev, self.seed, self.every = ev, seed, ev.every
        self.evaluator, self.parts = None, None

    def check(self, spec: RunSpec) -> None:
        check_eval(self.ev, spec.settings.topology.cp, self.seed)

    def setup(self, parts: RunParts) -> None:
        self.parts, model = parts, parts.spec.settings.model
        self.evaluator = Evaluator(self.ev, parts.model_chunks, model.max_position_embeddings, model.vocab_size,
                                   parts.spec.run_dir, self.seed)
        parts.log_info(f"{self.evaluator.describe()}; every {self.every} steps")

    def after_step(self, step: int) -> None:
        steps = self.parts.spec.total_steps
        if step % self.every and step != steps:
            return
        report = self.evaluator.run()
        if self.parts.is_logger:
            publish(report, step, self.parts.metrics, self.parts.spec.run_dir / "generations" / f"step_{step:07d}.jsonl",
                    f"step {step:>6}/{steps} | ")
