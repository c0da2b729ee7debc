"""The configured data, whatever its format, as (train, validation) datasets and micro-batches.

`data.format` says what the sources are:
- `gpt`: indexed documents (`phi4-data preprocess`), cut into sequences by Megatron-Core's
  GPTDataset and blended by BlendedMegatronDatasetBuilder (pre- and mid-training),
- `packed_chat`: packed conversations with a loss mask (`phi4-data chat`; SFT),
- `preference`: JSONL preference pairs (PTS pairs, full-response and judge-scored pairs; DPO).
Sources of the last two are blended by weight here, in a fixed order; each source is split into
train/validation/test by `data.split` the way Megatron-Core splits documents.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy
import torch
from omegaconf import DictConfig, OmegaConf

from phi4.data.blend import Source, build_datasets
from phi4.errors import ConfigError

FORMATS = ("gpt", "packed_chat", "preference")


def data_format(data: DictConfig) -> str:
    fmt = data.get("format", "gpt")
    if fmt not in FORMATS:
        raise ConfigError(f"data.format={fmt!r}; valid: {', '.join(FORMATS)}")
    return fmt


def prepare_sources(data: DictConfig, seq_length: int, rank: int, vocab_size: int) -> list[Source]:
    """The configured sources, checked (`check_data`); rank 0 first generates the bundled synthetic
    ones that are missing and checks them before the others, which then read its cached results
    instead of scanning every file again."""
    from phi4.data.corpus import ensure_corpus

    sources = [Source(s.name, str(s.path), float(s.weight)) for s in data.sources]
    if rank == 0:
        for s in data.sources:
            if s.get("generate"):
                spec = OmegaConf.to_container(s.generate, resolve=True)
                ensure_corpus(Path(s.path), seq_length=seq_length, **spec)
        check_data(data, sources, vocab_size)
    torch.distributed.barrier()
    if rank != 0:
        check_data(data, sources, vocab_size)
    return sources


def check_data(data: DictConfig, sources: list[Source], vocab_size: int) -> None:
    """Every source whole and within the vocabulary, before the model is built (each rank checks
    what it will read)."""
    from phi4.data.blend import check_sources
    from phi4.data.check import check_tokens, read_index

    fmt = data_format(data)
    if fmt == "preference":  # JSONL, checked line by line as it is read
        return
    check_sources(sources)
    for s in sources:
        lengths = check_tokens(s.path, vocab_size, f"data.sources.{s.name}")
        if fmt == "packed_chat":
            from phi4.data.chat import MASK_SUFFIX

            _, mask_lengths = read_index(s.path + MASK_SUFFIX)
            if not numpy.array_equal(lengths, mask_lengths):
                raise ConfigError(f"data.sources.{s.name}: {s.path}{MASK_SUFFIX}.idx does not match {s.path}.idx "
                                  "row for row: re-make both with `phi4-data chat`")


def _split_range(n: int, split: str, which: int) -> range:
    from megatron.core.datasets.blended_megatron_dataset_config import parse_and_normalize_split

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


def _blend(sources: list[Source], make, split: str, samples: int, which: int):
    parts, weights = [], []
    for s in sources:
        full = make(s, None)
        rows = _split_range(len(full), split, which)
        if len(rows):
            parts.append(make(s, rows))
            weights.append(s.weight)
    if not parts:
        return None
    if which:  # validation and test sets are fixed sets of distinct samples, never repeats
        samples = min(samples, sum(len(p) for p in parts))
    return WeightedBlend(parts, weights, max(samples, 1))


def build_train_valid(data: DictConfig, sources: list[Source], seq_length: int, train_samples: int,
                      valid_samples: int, seed: int):
    """(train, validation) datasets of the configured format."""
    fmt = data_format(data)
    if fmt == "gpt":
        from phi4.data.check import sources_fingerprint

        # keyed by the files themselves: a re-made dataset never meets a stale index cache
        cache = Path(data.cache_dir) / "index_cache" / sources_fingerprint([s.path for s in sources])
        return build_datasets(sources, seq_length, train_samples, valid_samples, seed, data.split, str(cache))
    if fmt == "packed_chat":
        from phi4.data.chat import PackedChatDataset

        def make(s, rows):
            return PackedChatDataset(s.path, seq_length, rows)
    else:
        from phi4.data.preference import PreferenceDataset

        def make(s, rows):
            return PreferenceDataset(s.path, seq_length, rows)
    train = _blend(sources, make, data.split, train_samples, 0)
    if train is None:
        raise ConfigError(f"data.split={data.split!r} leaves no training samples in {[s.path for s in sources]}")
    return train, _blend(sources, make, data.split, valid_samples, 1)


@dataclass(frozen=True)
class Collate:
    """Dataset samples -> micro-batches of [micro_batch, seq] tensors. Packed rows (samples with
    `segments`) also get what keeps attention inside each conversation: a block-causal mask for
    the `local` backend, or (`thd`, the `te` backend) the micro-batch flattened into one packed
    row with `cu_seqlens` for Transformer Engine's attention."""

    micro_batch_size: int
    packed_attention: str = "mask"  # mask | thd

    def __call__(self, samples: list[dict]) -> list[dict]:
        return [_to_device(batch) for batch in self._collate(samples)]

    def _collate(self, samples: list[dict]) -> list[dict]:
        if "chosen" in samples[0]:
            from phi4.data.preference import collate_pairs

            return collate_pairs(samples, self.micro_batch_size)
        keys = ("tokens", "labels", "loss_mask", "position_ids")
        batches = []
        for start in range(0, len(samples), self.micro_batch_size):
            group = samples[start : start + self.micro_batch_size]
            batch = {k: torch.stack([torch.as_tensor(s[k]) for s in group]) for k in keys}
            if "segments" in group[0]:
                batch.update(self._packed(batch, [s["segments"] for s in group]))
            batches.append(batch)
        return batches

    def _packed(self, batch: dict, segments: list[list[int]]) -> dict:
        if self.packed_attention == "mask":
            from phi4.data.chat import block_causal_mask

            return {"attention_mask": block_causal_mask(segments, batch["tokens"].shape[1])}
        from megatron.core.packed_seq_params import PackedSeqParams

        lengths = torch.tensor([n for row in segments for n in row], dtype=torch.int32)
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0, dtype=torch.int32)])
        flat = {k: batch[k].reshape(1, -1) for k in ("tokens", "labels", "loss_mask", "position_ids")}
        params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                                 max_seqlen_q=int(lengths.max()), max_seqlen_kv=int(lengths.max()))
        return {**flat, "packed_seq_params": params}


def _to_device(batch: dict) -> dict:
    """The micro-batch on the GPU where there is one (the model's device); as it is on the CPU."""
    if not torch.cuda.is_available():
        return batch
    moved = {k: v.cuda(non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    params = moved.get("packed_seq_params")
    if params is not None:
        for name in ("cu_seqlens_q", "cu_seqlens_kv"):
            setattr(params, name, getattr(params, name).cuda(non_blocking=True))
    return moved
