"""What the Trainer hands its plug-ins (objectives, callbacks), as two small typed views instead of
the Trainer itself:

- `RunSpec`: the run as checked before any process group exists: its typed settings, its
  directory, step count and data-parallel size, the data format. Objectives and callbacks check
  their own settings against it.
- `RunParts`: what exists once the parts are built: the model chunks, the objective, the
  validation samples' source and collate, the metrics, and whether this rank logs. Callbacks keep
  it from `setup` on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from phi4.data.formats import Collate
from phi4.data.registry import DataFormat
from phi4.settings import RunSettings
from phi4.train.metrics import MetricsWriter

if TYPE_CHECKING:  # the objective module imports this one
    from phi4.train.objective import Objective

log = logging.getLogger("phi4.train")


@dataclass(frozen=True)
class RunSpec:
    """A run's settings and sizes, known before any process group."""

    cfg: DictConfig  # the composed config, for plug-ins' own groups (dpo, eval)
    settings: RunSettings
    total_steps: int
    dp_size: int  # data-parallel ranks
    data_format: DataFormat

    @property
    def run_dir(self) -> Path:
        return self.settings.run_dir


@dataclass(frozen=True)
class RunParts:
    """The built parts a callback may use, from `setup` to the end of the run."""

    spec: RunSpec
    model_chunks: list  # DDP-wrapped, one per virtual pipeline stage
    objective: "Objective"
    collate: Collate
    valid_dataset: Any  # None without a validation split
    valid_by_source: dict  # {source name: its validation split alone}: empty for one source, or off
    dp_rank: int
    metrics: MetricsWriter
    is_logger: bool  # this rank writes the console line and metrics (the last stage's first rank)

    def log_info(self, line: str) -> None:
        if self.is_logger:
            log.info(line)
