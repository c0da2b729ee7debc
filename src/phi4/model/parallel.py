"""The model's parallel start: its layout checked against the model and the device, then the
process group and Megatron-Core's parallel state (phi4.runtime.distributed). What a tool that
builds the model calls first (phi4-eval, phi4-pts, phi4-convert --verify, the tests)."""

from __future__ import annotations

from typing import Optional

from phi4.model.config import ModelConfig, PrecisionConfig, TopologyConfig
from phi4.model.tp_overlap import tp_comm_overlap_on
from phi4.model.validate import check_device, check_run
from phi4.runtime import device
from phi4.runtime.distributed import init_distributed
from phi4.runtime.launch_env import LaunchEnv, read_launch_env


def check_on_device(model: ModelConfig, topology: TopologyConfig, precision: PrecisionConfig,
                    on: device.Device) -> None:
    """What this device cannot run, refused before anything is built: FP8 recipes the GPU lacks,
    and topology.tp_comm_overlap=true off a GPU."""
    if on.is_cuda:
        check_device(precision, on.capability, on.name)
    tp_comm_overlap_on(topology, model.transformer_impl, on.is_cuda)


def init_model_parallel(model: ModelConfig, topology: TopologyConfig, precision: PrecisionConfig, seed: int = 1234,
                        launch: Optional[LaunchEnv] = None, timeout_s: float = 600.0) -> LaunchEnv:
    """Check the layout, choose the device, start the process group and the parallel groups, seed."""
    launch = launch or read_launch_env()
    check_run(model, topology, precision, launch.world_size)
    check_on_device(model, topology, precision, device.select(launch.local_rank))
    return init_distributed(topology, seed=seed, launch=launch, timeout_s=timeout_s)
