"""What a training step reports: throughput, model FLOP/s and MFU, memory; and where it goes
(console, `<run_dir>/metrics.jsonl`, TensorBoard, and the experiment trackers: phi4.train.tracking)."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

from phi4.runtime import device
from phi4.train.update import StepResult

log = logging.getLogger("phi4.train")


class MetricsWriter:
    """Console line, JSONL and TensorBoard for the logging rank (the last pipeline stage's first)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, trackers=None):
        self.enabled, self.trackers = enabled, trackers  # trackers: phi4.train.tracking.TrackerRuns, or None
        self.path = Path(run_dir) / "metrics.jsonl"
        self.tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(Path(run_dir) / "tensorboard"))

    def write(self, record: dict, console: str) -> None:
        if not self.enabled:
            return
        log.info(console)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        if self.tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self.tb.add_scalar(key, value, record["step"])
            self.tb.flush()
        if self.trackers is not None:
            self.trackers.log(record)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _ranks_line(ranks: Optional[dict]) -> str:
    if not ranks:
        return ""
    return (f" | ranks {ranks['rank_time_min_s']:.3f}-{ranks['rank_time_max_s']:.3f} s to gradients, slowest "
            f"{ranks['slowest_rank']} on {ranks['slowest_host']}")


def duration(seconds: float) -> str:
    """h:mm:ss (days as `Nd h:mm:ss`)."""
    whole = max(0, round(seconds))
    days, rest = divmod(whole, 86400)
    hours, rest = divmod(rest, 3600)
    text = f"{hours}:{rest // 60:02d}:{rest % 60:02d}"
    return f"{days}d {text}" if days else text


class StepLog:
    """The training line every `log_every` steps: loss, lr, gradient norm, consumed samples, the
    time per step of the steps since the last line and the ETA to the stage's end at that pace,
    their throughput (tokens/s, model TFLOP/s per GPU, MFU against `peak`), memory.

    The window's time is everything between two lines (steps, validation, evaluation, saves), as
    Megatron-LM's "elapsed time per iteration": what the remaining steps will also take."""

    def __init__(self, metrics: MetricsWriter, steps: int, tokens_per_step: int, flops_per_token: float,
                 world_size: int, peak: Optional[float], memory_gb: Optional[Callable[[], float]] = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.metrics, self.steps, self.tokens_per_step = metrics, steps, tokens_per_step
        self.flops_per_token, self.world_size, self.peak = flops_per_token, world_size, peak
        self.memory_gb = memory_gb or (lambda: device.current().memory_gb())
        self.clock = clock
        self.window_start, self.window_steps = clock(), 0

    def write(self, step: int, result: StepResult, lr: float, skipped: int,
              describe: Callable[[Mapping[str, float]], str], ranks: Optional[dict] = None,
              consumed_samples: Optional[int] = None) -> None:
        """Close the window at `step` (every rank: it restarts the clock); the logging rank writes,
        with the objective's own figures (`describe`) in the line."""
        seconds = self.clock() - self.window_start
        per_step = seconds / max(self.window_steps, 1)
        eta_s = (self.steps - step) * per_step
        tokens_per_s = self.window_steps * self.tokens_per_step / seconds
        tflops = tokens_per_s * self.flops_per_token / self.world_size / 1e12
        if self.metrics.enabled:  # the loss lives on the last pipeline stage
            scores = dict(result.figures, **({"spike": result.spike} if result.spike else {}))
            record = dict(step=step, loss=result.loss, lr=lr, grad_norm=result.grad_norm,
                          consumed_samples=consumed_samples, ms_per_step=1000 * per_step, eta_s=eta_s,
                          tokens_per_s=tokens_per_s, tflops_per_gpu=tflops,
                          mfu=tflops / self.peak if self.peak else None, memory_gb=self.memory_gb(),
                          skipped_steps=skipped, **scores, **(ranks or {}))
            mfu = f"{100 * record['mfu']:.1f}%" if self.peak else "n/a"
            described = describe(result.figures)
            self.metrics.write(record, f"step {step:>6}/{self.steps} | loss {result.loss:.4f} | lr {lr:.2e} | "
                                       f"grad norm {result.grad_norm:.3f} | {described + ' | ' if described else ''}"
                                       f"{'' if consumed_samples is None else f'{consumed_samples:,} samples | '}"
                                       f"{1000 * per_step:,.0f} ms/step | ETA {duration(eta_s)} | "
                                       f"{tokens_per_s:,.0f} tokens/s | {tflops:.2f} TFLOP/s/GPU | MFU {mfu} | "
                                       f"mem {record['memory_gb']:.1f} GB{_ranks_line(ranks)}")
        self.window_start, self.window_steps = self.clock(), 0
