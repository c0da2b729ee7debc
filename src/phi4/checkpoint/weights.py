"""The model's weights in a checkpoint: its sharded state dict (one entry per virtual stage),
weights-only loading into any layout, the plain values saved beside them, and a fingerprint that
says two layouts hold the same weights."""

from __future__ import annotations

from pathlib import Path

import torch
from megatron.core import dist_checkpointing, parallel_state
from megatron.core.dist_checkpointing.core import CheckpointingException
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.dist_checkpointing.serialization import (
    get_default_load_sharded_strategy,
    get_default_save_sharded_strategy,
)
from megatron.core.dist_checkpointing.strategies.fully_parallel import (
    FullyParallelLoadStrategyWrapper,
    FullyParallelSaveStrategyWrapper,
)
from megatron.core.tensor_parallel import param_is_not_tensor_parallel_duplicate

from phi4.checkpoint.pointers import resolve_checkpoint
from phi4.errors import ConfigError
from phi4.model.build import unwrap
from phi4.runtime import device

MODEL_CONFIG_KEY = "phi4_model"  # the model config in a checkpoint's common state (phi4-convert reads it)


def model_sharded_state_dict(chunks: list, with_extra_state: bool = False) -> dict:
    """{"model0": ..., "model1": ...}: one entry per virtual stage, Megatron-LM's convention."""
    state = {}
    for i, chunk in enumerate(chunks):
        sharded = unwrap(chunk).sharded_state_dict()
        if not with_extra_state:
            sharded = {k: v for k, v in sharded.items()
                       if not (isinstance(v, ShardedObject) and k.endswith("_extra_state"))}
        state[f"model{i}"] = sharded
    return state


def save_strategy():
    """torch_dist, with the writing of what data-parallel ranks hold alike (the weights) spread over
    them instead of left to DP rank 0: Megatron-LM's checkpointing.py wraps its save strategy in
    FullyParallelSaveStrategyWrapper over the data-parallel group with CP (--ckpt-fully-parallel-save,
    on by default; Megatron-Bridge's fully_parallel_save the same)."""
    return FullyParallelSaveStrategyWrapper(get_default_save_sharded_strategy("torch_dist"),
                                            parallel_state.get_data_parallel_group(with_context_parallel=True))


def load_strategy(directory: Path):
    """The load counterpart: each data-parallel rank reads a share of the replicated tensors and
    the ranks exchange them (Megatron-LM's --ckpt-fully-parallel-load)."""
    return FullyParallelLoadStrategyWrapper(get_default_load_sharded_strategy(str(directory)),
                                            parallel_state.get_data_parallel_group(with_context_parallel=True))


def load_sharded(state: dict, directory: Path) -> dict:
    """Megatron-Core's load of `state` from `directory`, spread over the data-parallel ranks
    (collective); a mismatch is one line naming it."""
    try:
        return dist_checkpointing.load(state, str(directory), sharded_strategy=load_strategy(directory))
    except (CheckpointingException, KeyError) as err:
        raise ConfigError(f"{directory} does not match this model or layout: {err}") from None


def assign_model(chunks: list, loaded: dict, directory: Path) -> None:
    for i, chunk in enumerate(chunks):
        result = unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ConfigError(f"{directory}: missing {missing}, unexpected {result.unexpected_keys}")


# What a run checkpoint's plain values hold, by key: each plain part's state (`train_state`, the
# scheduler, ...) under its own key, beside the run's description (layout, config_yaml,
# weights_fingerprint, schedule, MODEL_CONFIG_KEY).
TRAIN_STATE_KEY = "train_state"
# Checkpoints written before the parts had keys of their own kept the TrainState's values flat
# among the description's: these.
_FLAT_TRAIN_STATE = ("step", "consumed_samples", "skipped_steps", "initialized_from", "recent_losses",
                     "skipped_windows")


def with_keyed_train_state(common: dict) -> dict:
    """A checkpoint's plain values with the TrainState under TRAIN_STATE_KEY, for checkpoints of
    either kind (an older one's flat values moved there)."""
    if TRAIN_STATE_KEY in common or "step" not in common:
        return common
    flat = {k: common[k] for k in _FLAT_TRAIN_STATE if k in common}
    return {**{k: v for k, v in common.items() if k not in flat}, TRAIN_STATE_KEY: flat}


def checkpoint_common_state(directory: str | Path) -> dict:
    """The plain values saved with a checkpoint (the parts' plain states by key, the config, the
    model config, the weights' fingerprint...), the TrainState under TRAIN_STATE_KEY."""
    return with_keyed_train_state(dist_checkpointing.load_common_state_dict(str(resolve_checkpoint(directory))))


def load_model_weights(chunks: list, directory: str | Path) -> None:
    """Weights only, into any layout; optimizer and FP8 scaling state in the checkpoint are ignored.
    `directory` may be a run directory (its final checkpoint)."""
    directory = resolve_checkpoint(directory)
    assign_model(chunks, load_sharded(model_sharded_state_dict(chunks), directory), directory)


def weights_fingerprint(chunks: list) -> list[float]:
    """[sum, sum of squares] of every weight of the model, each counted once across tensor- and
    pipeline-parallel ranks (fp64): the same on every rank, and equal for equal weights in any
    layout up to rounding. Collective over the model-parallel group."""
    total = torch.zeros(2, dtype=torch.float64)  # on the CPU: fp64 sums, moved once for the all-reduce
    for chunk in chunks:
        for param in unwrap(chunk).parameters():
            if param_is_not_tensor_parallel_duplicate(param):
                p = param.detach().double()
                total += torch.stack([p.sum(), (p * p).sum()]).cpu()
    total = device.current().put(total)
    torch.distributed.all_reduce(total, group=parallel_state.get_model_parallel_group())
    return total.tolist()
