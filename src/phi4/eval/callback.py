"""Generative evaluation during training, as a Trainer callback: the `eval` settings checked before
any process group, an Evaluator over the run's chunks, and every `eval.every` steps (and at the
last) the scores in the metrics and each generation with its verdict in
`run_dir/generations/step_NNNNNNN.jsonl`."""

from __future__ import annotations

from phi4.eval.evaluator import Evaluator, check_eval, publish
from phi4.settings import Eval
from phi4.train.callbacks import Callback


class GenerativeEvaluation(Callback):
    def __init__(self, ev: Eval, seed: int):
        self.ev, self.seed, self.every = ev, seed, ev.every
        self.evaluator = None

    def check(self, trainer) -> None:
        check_eval(self.ev, trainer.topology.cp, self.seed)

    def setup(self, trainer) -> None:
        self.evaluator = Evaluator(self.ev, trainer.ddp, trainer.model.max_position_embeddings,
                                   trainer.model.vocab_size, trainer.run_dir, self.seed)
        trainer.log_info(f"{self.evaluator.describe()}; every {self.every} steps")

    def after_step(self, trainer, step: int) -> None:
        if step % self.every and step != trainer.steps:
            return
        report = self.evaluator.run()
        if trainer.is_logger:
            publish(report, step, trainer.metrics, trainer.run_dir / "generations" / f"step_{step:07d}.jsonl",
                    f"step {step:>6}/{trainer.steps} | ")
