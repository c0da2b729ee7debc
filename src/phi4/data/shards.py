"""A training source made of many indexed-dataset shards (`data.sources[].path` a list or a glob of
prefixes), read as the one dataset their documents make in order.

Megatron-LM takes a sharded corpus as a blend of its shards, each shard's weight its share of the
tokens; then each shard is cut into sequences and shuffled apart from the others, and the samples
depend on how the corpus was split into files. Here the shards are concatenated instead: sequence
`i` of the source is sequence `i - start[k]` of shard `k`, so Megatron-Core's GPTDataset cuts and
shuffles the whole source as it would one prefix holding the same documents, and the source's
weight falls on its shards by their tokens. The samples are those of the single prefix, whatever
the sharding (tests/test_shards.py).

The concatenated sequence lengths are made only when Megatron-Core builds the source's indices (not
on a cache hit), and cost what it spends on one prefix: it copies the lengths into memory too.
"""

from __future__ import annotations

import glob
import re
from functools import cached_property
from pathlib import Path
from typing import Any, Optional

import numpy

from phi4.data.array import manifest_prefixes
from phi4.errors import ConfigError

GLOB_CHARS = re.compile(r"[*?\[]")


def _natural(text: str) -> list:
    """shard_2 before shard_10: digits compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def shard_prefixes(path: Any, setting: str) -> list[str]:
    """The prefixes `path` names, in order: a prefix, a glob of prefixes (matched against their
    `.idx` files, in natural order), a shard manifest (`<prefix>.manifest.json`, phi4-data
    manifest), or a list of them. Each prefix once."""
    items = list(path) if isinstance(path, (list, tuple)) else [path]
    if not items:
        raise ConfigError(f"{setting}: an empty list; give a prefix, a glob of prefixes or a list of them")
    prefixes: list[str] = []
    for item in items:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{setting}: {item!r} is not a path prefix; give a prefix (data/web), a glob "
                              f"(data/web/shard_*) or a list of them")
        if item.endswith(".manifest.json"):  # phi4-data manifest's list of an array's shards
            prefixes.extend(manifest_prefixes(Path(item), setting))
        elif GLOB_CHARS.search(item):
            found = sorted((m[: -len(".idx")] for m in glob.glob(f"{item}.idx")), key=_natural)
            if not found:
                raise ConfigError(f"{setting}: {item} matches no indexed dataset ({item}.idx); "
                                  f"make the shards with `phi4-data preprocess --output-prefix PATH`")
            prefixes.extend(found)
        else:
            prefixes.append(item)
    seen: dict[str, str] = {}
    for prefix in prefixes:
        key = str(Path(prefix).resolve())
        if key in seen:
            raise ConfigError(f"{setting}: {prefix} is named twice (a shard's documents would be read twice)")
        seen[key] = prefix
    return prefixes


def is_sharded(path: Any) -> bool:
    return not isinstance(path, str) or bool(GLOB_CHARS.search(path)) or path.endswith(".manifest.json")


class ShardedDocuments:
    """Megatron-Core IndexedDatasets, one per shard, as the one low-level dataset GPTDataset reads:
    `sequence_lengths`, `document_indices`, `get(idx, offset, length)` and `len()` over their
    sequences in order."""

    def __init__(self, prefixes: list[str], name: str, mmap: bool = True):
        from megatron.core.datasets.indexed_dataset import IndexedDataset  # lazy: torch-free callers list shards

        self.path_prefix = name
        self.shards = [IndexedDataset(prefix, multimodal=False, mmap=mmap) for prefix in prefixes]
        counts = [len(shard) for shard in self.shards]
        self.starts = numpy.concatenate([[0], numpy.cumsum(counts)]).astype(numpy.int64)

    def __len__(self) -> int:
        return int(self.starts[-1])

    def locate(self, idx: int) -> tuple[int, int]:
        """(shard, sequence within it) of sequence `idx`."""
        if not 0 <= idx < len(self):
            raise IndexError(f"sequence {idx} of {len(self)} in {self.path_prefix}")
        k = int(numpy.searchsorted(self.starts, idx, side="right")) - 1
        return k, int(idx - self.starts[k])

    def get(self, idx: int, offset: int = 0, length: Optional[int] = None) -> numpy.ndarray:
        k, i = self.locate(int(idx))
        return self.shards[k].get(i, offset=offset, length=length)

    def __getitem__(self, idx: int) -> numpy.ndarray:
        return self.get(idx)

    @cached_property
    def sequence_lengths(self) -> numpy.ndarray:
        return numpy.concatenate([shard.sequence_lengths for shard in self.shards]).astype(numpy.int32, copy=False)

    @cached_property
    def document_indices(self) -> numpy.ndarray:
        parts = [self.shards[0].document_indices[:1].astype(numpy.int64)]
        for start, shard in zip(self.starts, self.shards):
            parts.append(shard.document_indices[1:].astype(numpy.int64) + start)
        return numpy.concatenate(parts)
