"""Who a process is, read from torchrun's environment or SLURM's."""

import pytest

from phi4.errors import ConfigError
from phi4.runtime.launch_env import first_host, read_launch_env


@pytest.mark.parametrize(
    "nodelist, host",
    [
        ("node17", "node17"),
        ("gpu-[003-005,010]", "gpu-003"),
        ("gpu-[010,003-005]", "gpu-010"),
        ("dgx[0042-0050],io[1-2]", "dgx0042"),
        ("a100n3,a100n7", "a100n3"),
    ],
)
def test_first_host_of_a_slurm_nodelist(nodelist, host):
    assert first_host(nodelist) == host


def test_torchrun_environment():
    env = dict(RANK="5", WORLD_SIZE="16", LOCAL_RANK="5", MASTER_ADDR="10.0.0.1", MASTER_PORT="29400",
               SLURM_PROCID="0", SLURM_NTASKS="2")
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (5, 16, 5)
    assert (launch.master_addr, launch.master_port, launch.launcher) == ("10.0.0.1", 29400, "torchrun")


def test_slurm_environment():
    env = dict(SLURM_PROCID="9", SLURM_NTASKS="16", SLURM_LOCALID="1", SLURM_JOB_ID="123456",
               SLURM_JOB_NODELIST="gpu-[003-010]")
    launch = read_launch_env(env)
    assert (launch.rank, launch.world_size, launch.local_rank) == (9, 16, 1)
    assert launch.master_addr == "gpu-003" and launch.launcher == "slurm"
    assert launch.master_port == 20000 + 123456 % 20000
    # Every task of the job agrees on the rendezvous.
    other = read_launch_env({**env, "SLURM_PROCID": "0", "SLURM_LOCALID": "0"})
    assert (other.master_addr, other.master_port) == (launch.master_addr, launch.master_port)


def test_single_process_without_launcher():
    launch = read_launch_env({})
    assert (launch.rank, launch.world_size, launch.launcher) == (0, 1, "single")


def test_bad_variable_is_named():
    with pytest.raises(ConfigError, match=r"SLURM_NTASKS='many' is not an integer"):
        read_launch_env(dict(SLURM_PROCID="0", SLURM_NTASKS="many"))
