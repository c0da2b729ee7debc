"""Who a process is, read from torchrun's environment or SLURM's."""

import pytest

from phi4.errors import ConfigError
from phi4.runtime.distributed import describe_placement
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


@pytest.mark.parametrize("hosts, line", [
    (["n1", "n1", "n2", "n2"], "n1: ranks 0-1 | n2: ranks 2-3"),
    (["b", "a", "b", "b", "a", "c"], "b: ranks 0,2-3 | a: ranks 1,4 | c: ranks 5"),
    (["solo"], "solo: ranks 0"),
])
def test_the_placement_line_names_each_hosts_ranks(hosts, line):
    assert describe_placement(hosts) == line


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


def _stop_handler_installed(_) -> bool:
    """Whether install() (as an entry module calls it at import) takes SIGTERM in this process."""
    import signal

    from phi4.runtime import signals

    signals.install()
    return signal.getsignal(signal.SIGTERM) is signals._record


def test_spawned_workers_keep_the_default_sigterm():
    """The entry modules record stop signals from their first line; a spawned worker re-imports
    its parent's main module, and one that ignored SIGTERM would hang its pool's terminate()."""
    import multiprocessing
    import signal

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    try:
        assert _stop_handler_installed(None)
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            assert pool.map(_stop_handler_installed, [0]) == [False]
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
