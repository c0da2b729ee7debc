"""Who this process is: rank, world size, local rank and rendezvous, from torchrun or SLURM.

torchrun exports RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT. Under `srun` each task has
SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, and the rendezvous is the first host of
SLURM_JOB_NODELIST (e.g. "gpu-[003-005,010],io1" -> "gpu-003") on a port derived from the job id,
so every task of a job agrees on it without talking first.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping, Optional

from phi4.errors import ConfigError

DEFAULT_PORT = 29500


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # "torchrun", "slurm" or "single"


def first_host(nodelist: str) -> str:
    """The first host of a SLURM hostlist expression, as `scontrol show hostnames` would list it."""
    nodelist = nodelist.strip()
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not match or not match.group(1):
        raise ConfigError(f"SLURM_JOB_NODELIST={nodelist!r} is not a SLURM hostlist")
    prefix, ranges = match.group(1), match.group(3)
    if ranges is None:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _int(env: Mapping[str, str], name: str) -> int:
    value = env[name]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"environment variable {name}={value!r} is not an integer") from None


def read_launch_env(env: Optional[Mapping[str, str]] = None) -> LaunchEnv:
    """torchrun's variables win over SLURM's (torchrun inside an allocation); neither is one process."""
    env = os.environ if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(
            rank=_int(env, "RANK"),
            world_size=_int(env, "WORLD_SIZE"),
            local_rank=_int(env, "LOCAL_RANK") if "LOCAL_RANK" in env else 0,
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int(env, "MASTER_PORT") if "MASTER_PORT" in env else DEFAULT_PORT,
            launcher="torchrun",
        )
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        if "MASTER_PORT" in env:
            port = _int(env, "MASTER_PORT")
        else:  # one port per job, so jobs sharing a node do not collide
            port = 20000 + _int(env, "SLURM_JOB_ID") % 20000 if "SLURM_JOB_ID" in env else DEFAULT_PORT
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST") or "127.0.0.1"
        return LaunchEnv(
            rank=_int(env, "SLURM_PROCID"),
            world_size=_int(env, "SLURM_NTASKS"),
            local_rank=_int(env, "SLURM_LOCALID") if "SLURM_LOCALID" in env else 0,
            master_addr=env.get("MASTER_ADDR") or first_host(nodelist),
            master_port=port,
            launcher="slurm",
        )
    # Alone, the process is its own rendezvous: any free port, so two such runs never collide.
    port = _int(env, "MASTER_PORT") if "MASTER_PORT" in env else free_port()
    return LaunchEnv(0, 1, 0, "127.0.0.1", port, "single")


def free_port() -> int:
    """A TCP port on this host that nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
