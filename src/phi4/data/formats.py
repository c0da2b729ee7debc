"""The configured data, whatever its format, as (train, validation) datasets and micro-batches.

`data.format` names a registered format (phi4.data.registry):
- `gpt`: indexed documents (`phi4-data preprocess`), cut into sequences by Megatron-Core's
  GPTDataset and blended by BlendedMegatronDatasetBuilder (pre- and mid-training; phi4.data.blend),
- `packed_chat`: packed conversations with a loss mask (`phi4-data chat`; SFT; phi4.data.chat),
- `preference`: JSONL preference pairs (PTS pairs, full-response and judge-scored pairs; DPO;
  phi4.data.preference).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig

from phi4.data import blend, chat, preference  # noqa: F401  each registers its format
from phi4.data.corpus import ensure_corpus
from phi4.data.registry import FORMATS, DataFormat
from phi4.errors import ConfigError
from phi4.settings import Data, Source


def data_format(data: DictConfig) -> DataFormat:
    """The configured format, its settings checked (on the composed group, before it is typed)."""
    name = data.get("format", "gpt")
    if name not in FORMATS:
        raise ConfigError(f"data.format={name!r}; valid: {', '.join(FORMATS)}")
    FORMATS[name].check(data)
    return FORMATS[name]


def prepare_sources(data: Data, fmt: DataFormat, seq_length: int, rank: int, vocab_size: int,
                    sequence_multiple: int = 1, needed_by: str = "") -> list[Source]:
    """The configured sources, checked by their format; rank 0 first generates the bundled synthetic
    ones that are missing and checks them before the others, which then read its cached results
    instead of scanning every file again. Packed sources must have room to pad each sequence to
    `sequence_multiple` (what `needed_by`, the layout, asks)."""
    sources = fmt.resolve(list(data.sources))
    if rank == 0:
        for s in data.sources:
            if s.generate:
                if not isinstance(s.path, str):
                    raise ConfigError(f"data.sources.{s.name}: a generated corpus is one prefix, not {list(s.path)}")
                ensure_corpus(Path(s.path), seq_length=seq_length, **s.generate)
        fmt.check_files(data, sources, vocab_size)
        fmt.check_packing(sources, sequence_multiple, needed_by)
    if torch.distributed.is_initialized():  # phi4-data index runs it in one process, without a group
        torch.distributed.barrier()
    if rank != 0:
        fmt.check_files(data, sources, vocab_size)
        fmt.check_packing(sources, sequence_multiple, needed_by)
    return sources


def build_train_valid(data: Data, fmt: DataFormat, sources: list[Source], seq_length: int, train_samples: int,
                      valid_samples: int, seed: int):
    """(train, validation) datasets of the configured format."""
    return fmt.datasets(data, sources, seq_length, train_samples, valid_samples, seed)


@dataclass(frozen=True)
class RunDatasets:
    train: object
    valid: object
    valid_by_source: dict  # train.valid_per_source with several sources: each one's validation split
    cache: Optional[Path]  # where the blend's Megatron-Core indices are kept (the gpt format), or None
    made: int  # files the build added there (and to each source's own): 0 when every index was there
    seconds: float

    @property
    def indices(self) -> str:
        """What became of the index cache, for the run's log ("" for a format without one)."""
        if self.cache is None:
            return ""
        if not self.made:
            return f"dataset indices: read from {self.cache} (built ahead: phi4-data index, or an earlier run)"
        return (f"dataset indices: built into {self.cache} ({self.made} files) in {self.seconds:.1f} s; `phi4-data "
                f"index` with the run's overrides builds them ahead, so that no rank waits on rank 0")


def _files_in(folders: list[Path]) -> int:
    return sum(sum(1 for p in folder.iterdir() if p.is_file()) for folder in folders if folder.is_dir())


def run_datasets(data: Data, fmt: DataFormat, sources: list[Source], train, total_steps: int, seed: int) -> RunDatasets:
    """A run's datasets, as phi4-train builds them and `phi4-data index` builds them ahead: the
    training samples of every step, `train.valid_samples` (at least 1) for validation, and each
    source's own split where validation is per source. `made` counts the index files the build
    wrote in this run's own index directories (0: Megatron-Core found every index there)."""
    if torch.distributed.is_initialized():  # every rank looks at the cache before rank 0 writes to it
        torch.distributed.barrier()
    folders = fmt.index_dirs(data, sources)
    before, start = _files_in(folders), time.monotonic()
    valid_samples = max(train.valid_samples, 1)
    train_ds, valid_ds = build_train_valid(data, fmt, sources, train.seq_length,
                                           total_steps * train.global_batch_size, valid_samples, seed)
    per_source = train.valid_per_source and train.valid_every and len(sources) > 1
    by_source = fmt.valid_by_source(data, sources, train.seq_length, valid_samples, seed) if per_source else {}
    return RunDatasets(train_ds, valid_ds, by_source, folders[0] if folders else None, _files_in(folders) - before,
                       time.monotonic() - start)


@dataclass(frozen=True)
class Collate:
    """Dataset samples -> micro-batches of [micro_batch, seq] tensors, as the format makes them.
    Packed rows also get what keeps attention inside each conversation: a block-causal mask for
    the `local` backend, or (`thd`, the `te` backend) cu_seqlens for Transformer Engine."""

    format: DataFormat
    micro_batch_size: int
    packed_attention: str = "mask"  # mask | thd
    sequence_multiple: int = 1  # thd under context parallelism: each sequence padded to a multiple of it

    def __call__(self, samples: list[dict]) -> list[dict]:
        return self.format.collate(samples, self.micro_batch_size, self.packed_attention, self.sequence_multiple)
