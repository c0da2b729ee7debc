"""Start the process group and Megatron-Core's parallel state, and seed every generator.

The device (phi4.runtime.device) picks the backend: nccl on a GPU, gloo with the CPU backend
where CUDA is absent. The layout (`tp`, `pp`, `vp`, `cp` of a TopologyConfig) is checked against
the model by the caller, before any process group exists (phi4.model.validate.check_run).
"""

from __future__ import annotations

import logging
import random
from datetime import timedelta
from typing import Optional

import numpy
import torch
from megatron.core import parallel_state
from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

from phi4.runtime import device
from phi4.runtime.launch_env import LaunchEnv, read_launch_env

log = logging.getLogger(__name__)


def init_distributed(topology, seed: int = 1234, launch: Optional[LaunchEnv] = None,
                     timeout_s: float = 600.0) -> LaunchEnv:
    """Choose the device, start torch.distributed (if not started) with its backend, build
    Megatron-Core's parallel groups for `topology`, and seed. Returns who this process is."""
    launch = launch or read_launch_env()
    backend = device.select(launch.local_rank).backend
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(
            backend=backend,
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    set_parallel_layout(topology)
    seed_all(seed)
    return launch


def set_parallel_layout(topology) -> None:
    """(Re)build Megatron-Core's tensor/pipeline/virtual/context/data parallel groups."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=topology.tp,
        pipeline_model_parallel_size=topology.pp,
        virtual_pipeline_model_parallel_size=topology.vp,
        context_parallel_size=topology.cp,
    )


def seed_all(seed: int) -> None:
    """Python, NumPy and torch generators, and Megatron-Core's model-parallel RNG tracker
    (same across data-parallel replicas, distinct per tensor-parallel rank)."""
    offset = 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed + offset)
    numpy.random.seed(seed + offset)
    torch.manual_seed(seed + offset)
    model_parallel_cuda_manual_seed(seed + offset)


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
