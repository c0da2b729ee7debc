"""Data formats as a registry: each format (`data.format`) checks its settings and files, builds
its (train, validation) datasets and collates samples into micro-batches. The formats register in
their own modules: `gpt` in phi4.data.blend, `packed_chat` in phi4.data.chat, `preference` in
phi4.data.preference; phi4.data.formats imports them all and is what the trainer uses.

A new format: subclass DataFormat in its module, decorate it with `@register("name")`, import the
module in phi4.data.formats, and name the format in the objectives that read it (`formats`).
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split
from omegaconf import DictConfig

from phi4.errors import ConfigError
from phi4.settings import Data

FORMATS: dict[str, "DataFormat"] = {}
ROW_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def register(name: str):
    """Class decorator: an instance of the class serves `data.format=<name>`."""

    def add(cls):
        cls.name = name
        FORMATS[name] = cls()
        return cls

    return add


class DataFormat:
    name = ""
    megatron_indices = False  # whether it builds Megatron-Core dataset indices (what phi4-data index builds ahead)

    def check(self, data: DictConfig) -> None:
        """Its settings, before any process group."""

    def check_files(self, data: Data, sources: list, vocab_size: int) -> None:
        """Every source whole and within the vocabulary, before the model is built."""

    def resolve(self, sources: list) -> list:
        """The sources with what their paths name made explicit, once, before anything reads them."""
        return sources

    def index_dirs(self, data: Data, sources: list) -> list:
        """The directories where these sources' Megatron-Core dataset indices are kept (none: it
        builds none)."""
        return []

    def check_packing(self, sources: list, multiple: int, needed_by: str) -> None:
        """Packed formats: room in every row to pad each sequence to `multiple` (context parallelism)."""

    def datasets(self, data: Data, sources: list, seq_length: int, train_samples: int, valid_samples: int,
                 seed: int) -> tuple:
        raise NotImplementedError

    def valid_by_source(self, data: Data, sources: list, seq_length: int, valid_samples: int,
                        seed: int) -> dict:
        """{source name: that source's validation split alone} (a source without one is left out):
        each source as a blend of one, split as in the blend."""
        valid = {}
        for source in sources:
            _, dataset = self.datasets(data, [source], seq_length, 1, valid_samples, seed)
            if dataset is not None and len(dataset):
                valid[source.name] = dataset
        return valid

    def collate(self, samples: list[dict], micro_batch_size: int, packed_attention: str,
                sequence_multiple: int = 1) -> list[dict]:
        """Micro-batches of [micro_batch, seq] tensors (on the CPU; the step moves them). Packed
        formats pad each sequence to `sequence_multiple` (context parallelism; 1: none)."""
        return stack_rows(samples, micro_batch_size)


def stack_rows(samples: list[dict], micro_batch_size: int) -> list[dict]:
    return [{k: torch.stack([torch.as_tensor(s[k]) for s in samples[i : i + micro_batch_size]]) for k in ROW_KEYS}
            for i in range(0, len(samples), micro_batch_size)]


def _split_range(n: int, split: str, which: int) -> range:
    shares = parse_and_normalize_split(split)
    bounds = [0]
    for share in shares:
        bounds.append(bounds[-1] + int(round(share * n)))
    bounds[-1] = n
    return range(bounds[which], min(bounds[which + 1], n))


class WeightedBlend:
    """Samples drawn from several datasets in proportion to their weights, in a fixed order
    (each next sample comes from the source furthest behind its share); indices wrap around."""

    def __init__(self, datasets: list, weights: list[float], size: int):
        total = sum(weights)
        self.datasets, self.size, self.order = datasets, size, []
        drawn = [0] * len(datasets)
        for i in range(size):
            k = max(range(len(datasets)), key=lambda j: weights[j] / total * (i + 1) - drawn[j])
            self.order.append((k, drawn[k] % len(datasets[k])))
            drawn[k] += 1

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        k, j = self.order[i % self.size]
        return self.datasets[k][j]


def _blend(sources: list, make: Callable, split: str, samples: int, which: int) -> Optional[WeightedBlend]:
    parts, weights = [], []
    for s in sources:
        rows = _split_range(len(make(s, None)), split, which)
        if len(rows):
            parts.append(make(s, rows))
            weights.append(s.weight)
    if not parts:
        return None
    if which:  # validation and test sets are fixed sets of distinct samples, never repeats
        samples = min(samples, sum(len(p) for p in parts))
    return WeightedBlend(parts, weights, max(samples, 1))


def blend_by_weight(sources: list, make: Callable, split: str, train_samples: int, valid_samples: int) -> tuple:
    """(train, validation) blends of per-source datasets `make(source, rows)`, each source split
    into train/validation/test by `split` the way Megatron-Core splits documents."""
    train = _blend(sources, make, split, train_samples, 0)
    if train is None:
        raise ConfigError(f"data.split={split!r} leaves no training samples in {[s.path for s in sources]}")
    return train, _blend(sources, make, split, valid_samples, 1)
