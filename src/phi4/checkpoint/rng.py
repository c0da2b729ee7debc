"""Each rank's random number generators in a checkpoint: Python's, NumPy's, torch's, the device's
and Megatron-Core's model-parallel tracker, so that a resumed run draws what it would have drawn."""

from __future__ import annotations

import random

import numpy
import torch
from megatron.core import parallel_state
from megatron.core.dist_checkpointing.mapping import ShardedObject
from megatron.core.tensor_parallel import get_cuda_rng_tracker

from phi4.runtime import device


def rng_state() -> dict:
    state = {"python": random.getstate(), "torch": torch.get_rng_state(),
             "tracker": get_cuda_rng_tracker().get_states(), "numpy": numpy.random.get_state()}
    on_device = device.current().rng_state()
    if on_device is not None:
        state["cuda"] = on_device
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    get_cuda_rng_tracker().set_states(state["tracker"])
    if "numpy" in state:
        numpy.random.set_state(state["numpy"])
    device.current().set_rng_state(state.get("cuda"))


def rng_sharded_object(data) -> ShardedObject:
    """Each (pipeline, tensor) rank's RNG states; data-parallel replicas hold the same."""
    return ShardedObject(
        "rng_state",
        data,
        (parallel_state.get_pipeline_model_parallel_world_size(), parallel_state.get_tensor_model_parallel_world_size()),
        (parallel_state.get_pipeline_model_parallel_rank(), parallel_state.get_tensor_model_parallel_rank()),
        replica_id=parallel_state.get_data_parallel_rank(with_context_parallel=True),
    )
