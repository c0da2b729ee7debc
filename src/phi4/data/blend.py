"""Training and validation data: weighted blends of indexed datasets through Megatron-Core.

`build_datasets` hands the configured sources and weights to Megatron-Core's
BlendedMegatronDatasetBuilder, which builds one GPTDataset per source and split (sample, shuffle
and document indices cached under `cache_dir`) and a BlendedDataset that draws each source in
proportion to its weight. `GlobalBatches` walks the training samples in order from a count of
consumed samples, so a resumed run continues with exactly the batch it would have seen next.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

from megatron.core.datasets.blended_megatron_dataset_builder import BlendedMegatronDatasetBuilder
from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
from megatron.core.tokenizers import MegatronTokenizerBase

from phi4.data.check import check_tokens, sources_fingerprint
from phi4.data.registry import DataFormat, register
from phi4.data.shards import ShardedDocuments, is_sharded, shard_prefixes
from phi4.data.tokenizer import Phi4Tokenizer, get_tokenizer
from phi4.errors import ConfigError
from phi4.settings import Source  # name, path (an indexed dataset prefix, a glob or a list of them), weight


def _megatron_tokenizer():
    """The Phi-4 tokenizer as the object Megatron-Core's datasets ask about (eod, pad, vocab size)."""
    class Phi4MegatronTokenizer(MegatronTokenizerBase):
        def __init__(self):
            super().__init__(path="phi4", config={})
            # Part of each dataset's cache key: a different tokenizer must not reuse the cache.
            self.unique_identifiers = {"class": "Phi4Tokenizer", "ranks": "cl100k_base", "specials": "phi-4"}

        def tokenize(self, text):  # the BPE is loaded only here: the datasets ask for ids alone
            return get_tokenizer().encode(text)

        def detokenize(self, ids):
            return get_tokenizer().decode(ids)

        def vocab(self):
            return None

        @property
        def vocab_size(self):
            return Phi4Tokenizer.vocab_size

        def apply_chat_template(self, *args, **kwargs):
            raise NotImplementedError

        @property
        def eod(self):
            return Phi4Tokenizer.eod_id

        @property
        def pad(self):
            return Phi4Tokenizer.pad_id

    return Phi4MegatronTokenizer()


def source_prefixes(source: Source) -> list[str]:
    """The indexed-dataset prefixes of a source: its one prefix, or its shards in order."""
    return shard_prefixes(source.path, f"data.sources.{source.name}.path")


def check_sources(sources: list[Source], shards: bool = True) -> None:
    """Every source's files exist and its weight is positive; `shards=False` (the packed formats):
    each source is one prefix."""
    if not sources:
        raise ConfigError("data.sources is empty; give at least one {name, path, weight}")
    for s in sources:
        if not shards and is_sharded(s.path):
            raise ConfigError(f"data.sources.{s.name}.path={s.path}: this data.format takes one prefix a source; "
                              "a list or glob of shards is for data.format=gpt")
        for prefix in source_prefixes(s):
            missing = [suffix for suffix in (".bin", ".idx") if not Path(f"{prefix}{suffix}").is_file()]
            if missing:
                raise ConfigError(
                    f"data.sources.{s.name}: {prefix}{' and '.join(missing)} not found; "
                    "make it with `phi4-data preprocess --output-prefix PATH`"
                )
        if not s.weight > 0:
            raise ConfigError(f"data.sources.{s.name}.weight={s.weight}: weights must be positive")


@dataclass
class ShardedGPTDatasetConfig(GPTDatasetConfig):
    """GPTDatasetConfig with the shards of each sharded source, by the name the blend gives it."""

    shards: dict = field(default_factory=dict)


class ShardedGPTDataset(GPTDataset):
    """Megatron-Core's GPTDataset; a source of several shards is read as their concatenation."""

    @staticmethod
    def build_low_level_dataset(dataset_path: str, config: GPTDatasetConfig):
        prefixes = config.shards.get(dataset_path)
        if prefixes is None:
            return GPTDataset.build_low_level_dataset(dataset_path, config)
        return ShardedDocuments(prefixes, dataset_path, mmap=config.mmap_bin_files)


def build_datasets(sources: list[Source], seq_length: int, train_samples: int, valid_samples: int, seed: int,
                   split: str, cache_dir: str):
    """(train, validation) datasets of `seq_length`-token samples blended by weight."""
    check_sources(sources)
    paths, shards = [], {}
    for s in sources:
        prefixes = source_prefixes(s)
        if len(prefixes) == 1 and not is_sharded(s.path):
            paths.append(prefixes[0])
        else:  # a name for the blend's bookkeeping (and Megatron-Core's cache key), not a file
            paths.append(f"{s.name}: {len(prefixes)} shards, {prefixes[0]} ... {prefixes[-1]}")
            shards[paths[-1]] = prefixes
    config = ShardedGPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(paths, [float(s.weight) for s in sources]),
        split=split,
        path_to_cache=cache_dir,
        tokenizer=_megatron_tokenizer(),
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal attention needs no mask tensor
        shards=shards,
    )
    train, valid, _ = BlendedMegatronDatasetBuilder(
        ShardedGPTDataset, [train_samples, valid_samples, 0], lambda: True, config
    ).build()
    return train, valid


class GlobalBatches:
    """Global batch after global batch of sample indices, from `consumed` on; each data-parallel
    rank takes its contiguous share."""

    def __init__(self, dataset, global_batch_size: int, dp_rank: int, dp_size: int, consumed: int = 0):
        if global_batch_size % dp_size:
            raise ConfigError(f"train.global_batch_size={global_batch_size} does not split over {dp_size} data-parallel ranks")
        self.dataset, self.gbs, self.dp_rank, self.dp_size = dataset, global_batch_size, dp_rank, dp_size
        self.consumed = consumed

    def next(self) -> list[dict]:
        per_rank = self.gbs // self.dp_size
        start = self.consumed + self.dp_rank * per_rank
        samples = [self.dataset[(start + i) % len(self.dataset)] for i in range(per_rank)]
        self.consumed += self.gbs
        return samples


def evaluation_samples(dataset, count: int, dp_rank: int, dp_size: int) -> Optional[list[dict]]:
    """The first `count` validation samples (a fixed set, so validation losses compare), this rank's share."""
    if dataset is None or len(dataset) == 0:
        return None
    count = min(count, len(dataset)) // dp_size * dp_size
    per = count // dp_size
    return [dataset[dp_rank * per + i] for i in range(per)] if per else None


@register("gpt")
class GptFormat(DataFormat):
    """Indexed documents (`phi4-data preprocess`), cut into sequences by Megatron-Core's GPTDataset
    and blended by BlendedMegatronDatasetBuilder: pre- and mid-training."""

    def check_files(self, data, sources: list[Source], vocab_size: int) -> None:
        check_sources(sources)
        for s in sources:
            for prefix in source_prefixes(s):
                check_tokens(prefix, vocab_size, f"data.sources.{s.name}")

    megatron_indices = True

    def resolve(self, sources: list[Source]) -> list[Source]:
        """A glob or manifest becomes its list of shard prefixes: matched once, not at every read."""
        return [replace(s, path=source_prefixes(s)) if is_sharded(s.path) else s for s in sources]

    @staticmethod
    def _index_dir(data, sources: list[Source]) -> Path:
        # keyed by the files themselves: a re-made dataset never meets a stale index cache
        return Path(data.cache_dir) / "index_cache" / sources_fingerprint([p for s in sources for p in source_prefixes(s)])

    def index_dirs(self, data, sources: list[Source]) -> list[Path]:
        """The blend's, then each source's alone (per-source validation builds those)."""
        alone = [self._index_dir(data, [s]) for s in sources] if len(sources) > 1 else []
        return list(dict.fromkeys([self._index_dir(data, sources), *alone]))

    def datasets(self, data, sources: list[Source], seq_length: int, train_samples: int, valid_samples: int,
                 seed: int) -> tuple:
        return build_datasets(sources, seq_length, train_samples, valid_samples, seed, data.split,
                              str(self._index_dir(data, sources)))
