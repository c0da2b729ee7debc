"""Faults injected on purpose (the `fault` settings group, all off by default), so that the tests
can show what a run does about them: a rank that hangs inside a step (the hang watchdog), a rank
slower than the others in every step (the straggler report), a batch of garbage (loss spikes)."""

from __future__ import annotations

import logging
import time

import torch

from phi4.settings import Fault

log = logging.getLogger("phi4.train")


def hang_inside_step(seconds: float) -> None:
    """Where an injected hang waits: the stuck rank's stack dump names this function."""
    time.sleep(seconds)


class Faults:
    def __init__(self, fault: Fault, rank: int, vocab_size: int):
        self.fault, self.rank, self.vocab_size = fault, rank, vocab_size

    def corrupt(self, first_sample: int, end_sample: int, micro_batches: list[dict]) -> None:
        """Garbage for the global batch [first_sample, end_sample) if it holds fault.corrupt_sample:
        every label the vocabulary's last id, which no text holds (a shard of padding, say)."""
        at = self.fault.corrupt_sample
        if at is None or not first_sample <= at < end_sample:
            return
        log.warning(f"fault.corrupt_sample={at}: every label of samples {first_sample}-{end_sample - 1} is "
                    f"{self.vocab_size - 1}")
        for batch in micro_batches:
            if "labels" in batch:
                batch["labels"] = torch.full_like(batch["labels"], self.vocab_size - 1)

    def inside_step(self, step: int) -> None:
        f = self.fault
        if f.delay_rank == self.rank and f.delay_seconds:
            time.sleep(f.delay_seconds)
        if f.hang_step == step and f.hang_rank == self.rank:
            log.warning(f"fault.hang_step={step}: rank {self.rank} sleeps {f.hang_seconds} s inside the step")
            hang_inside_step(f.hang_seconds)
