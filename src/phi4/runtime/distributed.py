"""Start the process group and Megatron-Core's parallel state, and seed every generator.

nccl where CUDA exists, gloo (with the CPU backend) where it does not. The layout is checked
against the model before any process group exists.
"""

from __future__ import annotations

import logging
import random
from datetime import timedelta
from typing import Optional

import torch

from phi4.model.config import ModelConfig, PrecisionConfig, TopologyConfig
from phi4.model.validate import check_device, check_run
from phi4.runtime.launch_env import LaunchEnv, read_launch_env

log = logging.getLogger(__name__)


def init_distributed(
    model: ModelConfig,
    topology: TopologyConfig,
    precision: PrecisionConfig,
    seed: int = 1234,
    launch: Optional[LaunchEnv] = None,
    timeout_s: float = 600.0,
) -> LaunchEnv:
    """Validate, start torch.distributed (if not started), build Megatron-Core's parallel groups
    for `topology`, and seed. Returns who this process is."""
    launch = launch or read_launch_env()
    check_run(model, topology, precision, launch.world_size)

    if not torch.cuda.is_available():
        from phi4.runtime import cpu

        cpu.activate()
        backend = "gloo"
    else:
        check_device(precision, torch.cuda.get_device_capability(launch.local_rank),
                     torch.cuda.get_device_name(launch.local_rank))
        torch.cuda.set_device(launch.local_rank)
        backend = "nccl"

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


def set_parallel_layout(topology: TopologyConfig) -> None:
    """(Re)build Megatron-Core's tensor/pipeline/virtual/context/data parallel groups."""
    from megatron.core import parallel_state

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
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    offset = 100 * parallel_state.get_pipeline_model_parallel_rank()
    random.seed(seed + offset)
    try:
        import numpy

        numpy.random.seed(seed + offset)
    except ImportError:
        pass
    torch.manual_seed(seed + offset)
    model_parallel_cuda_manual_seed(seed + offset)


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
