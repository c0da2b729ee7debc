"""What a training step reports: throughput, model FLOP/s and MFU, memory; and where it goes
(console, `<run_dir>/metrics.jsonl`, TensorBoard)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import torch


log = logging.getLogger("phi4.train")

# Dense BF16 peak TFLOP/s by device name (FP8 doubles it).
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}


def device_peak_tflops(configured: Optional[float]) -> Optional[float]:
    if configured:
        return float(configured)
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def memory_gb() -> float:
    """Peak GPU memory allocated, or the process's resident memory on the CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 1e9
    import psutil

    return psutil.Process().memory_info().rss / 1e9


class MetricsWriter:
    """Console line, JSONL and TensorBoard for the logging rank (the last pipeline stage's first)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
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

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
