"""Start the process group and Megatron-Core's parallel state, and seed every generator.

The device (phi4.runtime.device) picks the backend: nccl on a GPU, gloo with the CPU backend
where CUDA is absent. The layout (`tp`, `pp`, `vp`, `cp` of a TopologyConfig) is checked against
the model by the caller, before any process group exists (phi4.model.validate.check_run).
"""

from __future__ import annotations

import logging
import random
import socket
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


def host_name() -> str:
    """This machine's short host name: what SLURM calls the node."""
    return socket.gethostname().split(".")[0]


def _spans(ranks: list[int]) -> str:
    """[0, 1, 2, 5] -> "0-2,5"."""
    runs: list[list[int]] = []
    for r in sorted(ranks):
        if runs and r == runs[-1][1] + 1:
            runs[-1][1] = r
        else:
            runs.append([r, r])
    return ",".join(f"{a}" if a == b else f"{a}-{b}" for a, b in runs)


def describe_placement(hosts: list[str]) -> str:
    """Rank i ran on hosts[i] -> "n1: ranks 0-1 | n2: ranks 2-3", hosts in the order of their first rank."""
    by_host: dict[str, list[int]] = {}
    for rank, host in enumerate(hosts):
        by_host.setdefault(host, []).append(rank)
    return " | ".join(f"{host}: ranks {_spans(ranks)}" for host, ranks in by_host.items())


def placement() -> str:
    """Where every rank runs (a collective: every rank calls it), for the run's log; warns when a
    tensor-parallel group spans hosts, so that its all-reduces in every layer cross the network."""
    hosts = [""] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(hosts, host_name())
    group = torch.distributed.get_process_group_ranks(parallel_state.get_tensor_model_parallel_group())
    spanned = sorted({hosts[r] for r in group})
    if len(spanned) > 1 and parallel_state.get_tensor_model_parallel_rank() == 0:
        log.warning(f"tensor-parallel ranks {_spans(group)} span hosts {', '.join(spanned)}: their all-reduces "
                    f"cross the network (keep topology.tp within the tasks of one node)")
    return describe_placement(hosts)


def shutdown() -> None:
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
