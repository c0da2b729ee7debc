"""Loading model weights from a Megatron-Core distributed checkpoint into this rank's chunks.

Weights only: any layout (TP/PP/VP) reads the slices it owns; optimizer state in the checkpoint
is ignored, and so is FP8 scaling state (`_extra_state`), which a converted checkpoint does not
have and a fresh stage recomputes.
"""

from __future__ import annotations

from pathlib import Path

from phi4.errors import ConfigError


def model_sharded_state_dict(chunks: list, with_extra_state: bool = False) -> dict:
    """{"model0": ..., "model1": ...}: one entry per virtual stage, Megatron-LM's convention."""
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from phi4.model.build import unwrap

    state = {}
    for i, chunk in enumerate(chunks):
        sharded = unwrap(chunk).sharded_state_dict()
        if not with_extra_state:
            sharded = {k: v for k, v in sharded.items()
                       if not (isinstance(v, ShardedObject) and k.endswith("_extra_state"))}
        state[f"model{i}"] = sharded
    return state


def load_model_weights(chunks: list, directory: str | Path) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.core import CheckpointingException

    from phi4.model.build import unwrap

    directory = Path(directory)
    if not (directory / ".metadata").exists():
        raise ConfigError(f"{directory} is not a Megatron-Core torch_dist checkpoint (no .metadata)")
    try:
        loaded = dist_checkpointing.load(model_sharded_state_dict(chunks), str(directory))
    except (CheckpointingException, KeyError) as err:
        raise ConfigError(f"{directory} does not match the model: {err}") from None
    for i, chunk in enumerate(chunks):
        result = unwrap(chunk).load_state_dict(loaded[f"model{i}"], strict=False)
        missing = [k for k in result.missing_keys if not k.endswith("_extra_state")]
        if missing or result.unexpected_keys:
            raise ConfigError(f"{directory}: missing {missing}, unexpected {result.unexpected_keys}")


def save_model_checkpoint(chunks: list, directory: str | Path, common: dict, optimizer=None) -> None:
    """A torch_dist checkpoint of the model (and the optimizer's state, if given), with `common`
    (plain values: the model config, the step) beside it. Collective: every rank calls it."""
    from megatron.core import dist_checkpointing

    state = model_sharded_state_dict(chunks, with_extra_state=True)
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(state, metadata={"distrib_optim_sharding_type": "fully_reshardable"})
    state.update(common)
    Path(directory).mkdir(parents=True, exist_ok=True)
    dist_checkpointing.save(state, str(directory))
