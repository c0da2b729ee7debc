"""The private SLURM cluster (tests/slurm_cluster.py) runs real sbatch jobs: output, exit codes and
afterok chains. A job that reaches its time-limit warning and requeues itself is part of the
stage chain's test (tests/test_stage_chain.py): slurmctld sends `--signal` warnings from a check
it makes every 30 s, so such a job costs half a minute wherever it runs.
"""

import contextlib
import os
import signal
import threading

import pytest
from slurm_cluster import SlurmClusterError

ONE_CPU = ("--ntasks=1", "--cpus-per-task=1")


def test_job_completes_with_its_output(slurm_cluster):
    job_id = slurm_cluster.submit(
        '#!/bin/bash\necho "hello from $SLURM_JOB_ID on $SLURMD_NODENAME in $SLURM_JOB_PARTITION"\n', *ONE_CPU)
    assert slurm_cluster.wait([job_id], timeout=30) == {job_id: "COMPLETED"}
    job = slurm_cluster.job(job_id)
    assert (job.exit_code, job.exit_signal, job.restarts) == (0, 0, 0)
    assert slurm_cluster.output(job_id) == (
        f"hello from {job_id} on {slurm_cluster.node} in {slurm_cluster.partition}\n")


def test_failing_job_ends_failed_with_its_exit_code(slurm_cluster):
    job_id = slurm_cluster.submit("#!/bin/bash\necho about to fail\nexit 3\n", *ONE_CPU)
    assert slurm_cluster.wait(job_id, timeout=30) == {job_id: "FAILED"}
    job = slurm_cluster.job(job_id)
    assert (job.exit_code, job.exit_signal) == (3, 0)
    assert slurm_cluster.output(job_id) == "about to fail\n"


def test_afterok_chain_runs_in_order(slurm_cluster, tmp_path):
    log = tmp_path / "order.txt"
    ids = []
    for name in "ABC":
        dependency = [f"--dependency=afterok:{ids[-1]}"] if ids else []
        ids.append(slurm_cluster.submit(
            f"#!/bin/bash\necho {name} start >> {log}\nsleep 0.3\necho {name} end >> {log}\n",
            *ONE_CPU, *dependency))
    assert slurm_cluster.wait(ids, timeout=30) == dict.fromkeys(ids, "COMPLETED")
    assert log.read_text().split("\n") == [
        "A start", "A end", "B start", "B end", "C start", "C end", ""]


def test_afterok_on_a_failed_job_cancels_the_dependent(slurm_cluster):
    failed = slurm_cluster.submit("#!/bin/bash\nexit 1\n", *ONE_CPU)
    dependent = slurm_cluster.submit("#!/bin/bash\necho must not run\n", *ONE_CPU, f"--dependency=afterok:{failed}")
    assert slurm_cluster.wait([failed, dependent], timeout=30) == {failed: "FAILED", dependent: "CANCELLED"}
    assert slurm_cluster.output(dependent) == ""


def test_the_stage_script_requeues_a_run_that_hung(slurm_cluster):
    """slurm/stage.sbatch requeues a stage whose tasks exit 76 (phi4's hang watchdog), and the
    requeued job runs again (here it then succeeds, as a resumed run would)."""
    from helpers import ROOT

    task = 'echo "restart ${SLURM_RESTART_COUNT:-0}"; exit $(( ${SLURM_RESTART_COUNT:-0} == 0 ? 76 : 0 ))'
    job_id = slurm_cluster.submit([ROOT / "slurm" / "stage.sbatch", "bash", "-c", task], *ONE_CPU, cwd=ROOT)
    assert slurm_cluster.wait(job_id, timeout=90) == {job_id: "COMPLETED"}
    assert slurm_cluster.job(job_id).restarts == 1
    out = slurm_cluster.output(job_id)
    assert "restart 0" in out and "a rank hung" in out and "restart 1" in out and out.rstrip().endswith("exit 0")


def test_the_stage_script_stops_requeueing_failures_after_phi4_max_restarts(slurm_cluster):
    """A failure (here a hang's 76) past PHI4_MAX_RESTARTS restarts ends the job with its code."""
    from helpers import ROOT

    task = 'echo "restart ${SLURM_RESTART_COUNT:-0}"; exit 76'
    job_id = slurm_cluster.submit([ROOT / "slurm" / "stage.sbatch", "bash", "-c", task], *ONE_CPU,
                                  "--export=ALL,PHI4_MAX_RESTARTS=0", cwd=ROOT)
    assert slurm_cluster.wait(job_id, timeout=60) == {job_id: "FAILED"}
    job = slurm_cluster.job(job_id)
    assert (job.restarts, job.exit_code) == (0, 76)
    out = slurm_cluster.output(job_id)
    assert "not requeueing: the job has restarted 0 times (PHI4_MAX_RESTARTS)" in out and out.rstrip().endswith("exit 76")


@contextlib.contextmanager
def _controller_stopped(cluster, for_seconds: float | None = None):
    """slurmctld frozen (SIGSTOP), so clients connect and wait for an answer, as on a loaded host;
    thawed after `for_seconds` from a timer, or when the block ends."""
    pid = cluster._procs["slurmctld"].pid
    os.kill(pid, signal.SIGSTOP)
    timer = threading.Timer(for_seconds, os.kill, (pid, signal.SIGCONT)) if for_seconds else None
    try:
        if timer:
            timer.start()
        yield
    finally:
        if timer:
            timer.cancel()
        os.kill(pid, signal.SIGCONT)


def test_a_query_is_tried_again_when_the_controller_does_not_answer_for_a_moment(slurm_cluster):
    """The CI failure this answers: `scontrol show job` failed once, mid-chain, with nothing on
    stderr, and the chain's whole module errored. The first try here gets no answer in 2 s; the
    controller answers again at 4 s, before the second try's 2 s are up (or the third's)."""
    with _controller_stopped(slurm_cluster, for_seconds=4):
        r = slurm_cluster.query(["scontrol", "show", "job", "-o"], attempts=3, timeout=2)
    assert r.returncode == 0


def test_a_query_that_keeps_failing_names_every_attempt(slurm_cluster):
    with _controller_stopped(slurm_cluster), pytest.raises(SlurmClusterError) as caught:
        slurm_cluster.query(["scontrol", "show", "job", "-o"], attempts=2, timeout=1)
    message = str(caught.value)
    assert message.startswith("scontrol show job -o failed 2 times:\n")
    assert "attempt 1: no answer in 1 s\nattempt 2: no answer in 1 s\n" in message
    assert "slurmctld.log" in message
