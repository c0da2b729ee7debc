"""The Phi-4 stage chain on a real two-node SLURM cluster (n1 and n2, each a slurmd in a network
namespace of its own: tests/netns.py): slurm/pipeline.sh submits pretrain -> midtrain -> sft -> pts
-> dpo (the tiny model, conf/cluster/local_cpu.yaml), every job completes, each stage starts from the
previous stage's final checkpoint (checked by the weights' fingerprint, not assumed from the command
line), and a Hydra multirun reaches the same cluster through the submitit launcher.

Pre-training runs on both nodes, 2 tasks each, TP=2 inside a node and DP=2 across: every rank runs
where SLURM put it and the losses equal a one-node run's of the same layout. Mid-stage the test kills
n2's tasks, as a node failure would: the job ends on both nodes at once, is requeued and resumes from
the last complete checkpoint. The SFT job reaches its time limit's warning, requeues itself and
finishes from its checkpoint. A job of the sweep gets the launcher's warning mid-run (submitit's
USR2), saves, is requeued by submitit and resumes; each job of the sweep has its own run directory.

One chain serves every check (it costs about ten minutes on two cores); the checks are separate
tests over it so that each failure names what broke.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PYTHON = Path(sys.executable)
# Pre-training on two nodes: 12 steps, a checkpoint every 4, n2's tasks killed once step 6 is logged.
PRETRAIN = dict(steps=12, every=4, kill_after=6, victim="n2")
PRETRAIN_LAYOUT = ["topology.tp=2", f"train.steps={PRETRAIN['steps']}", "train.log_every=1",
                   f"checkpoint.every={PRETRAIN['every']}"]
# Each sweep job: 4 steps, each at least 2 s (the warning sent after step 1 lands before the last one).
SWEEP_STEPS = 4


def _common(run_dir: Path) -> dict:
    from phi4.checkpoint.weights import checkpoint_common_state

    return checkpoint_common_state(run_dir)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _with(overrides: list[str], replacing: list[str]) -> list[str]:
    """`overrides` with each key of `replacing` set to its new value (Hydra refuses a key twice)."""
    keys = {o.split("=", 1)[0] for o in replacing}
    return [o for o in overrides if o.split("=", 1)[0] not in keys] + replacing


@pytest.fixture(scope="module")
def chain(two_node_cluster, tmp_path_factory):
    slurm_cluster = two_node_cluster
    root = tmp_path_factory.mktemp("chain")
    settings = yaml.safe_load((ROOT / "conf/cluster/local_cpu.yaml").read_text())
    pretrain = settings["stages"]["pretrain"]
    pretrain.update(nodes=2, tasks_per_node=2, overrides=_with(pretrain["overrides"], PRETRAIN_LAYOUT))
    # The SFT stage gets a two-minute limit and its warning 75 s before it: slurmctld checks
    # limits every 30 s, so the warning comes 15-45 s into the job, mid-stage.
    settings["stages"]["sft"].update(time_limit="00:02:00", signal_seconds=75)
    cluster_file = root / "cluster.yaml"
    cluster_file.write_text(yaml.safe_dump(settings))
    runs = root / "runs"
    env = {**slurm_cluster.env, "PHI4_PYTHON": str(PYTHON)}
    out = subprocess.run([str(ROOT / "slurm/pipeline.sh"), "--cluster", str(cluster_file), "--runs", str(runs)],
                         env=env, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    jobs = dict(re.findall(r"^(\w+): job (\d+) ->", out.stdout, re.M))
    assert list(jobs) == ["pretrain", "midtrain", "sft", "pts", "dpo"], out.stdout
    pretrain_log = runs / "logs" / f"pretrain-{jobs['pretrain']}.out"
    kill = _kill_a_node_mid_stage(slurm_cluster, jobs["pretrain"], pretrain_log, runs / "pretrain")
    one_node = _one_node_pretrain(pretrain["overrides"], root / "one_node")  # alongside the chain's later stages
    sweep = _submit_sweep(env, root)
    warned: dict = {}  # a daemon thread: a fixture that fails early leaves nothing to wait for at exit
    threading.Thread(target=lambda: warned.update(job=_warn_a_sweep_job_mid_run(slurm_cluster, root / "sweep", sweep)),
                     daemon=True).start()
    _lift_limit_once_warned(slurm_cluster, jobs["sft"], runs / "logs" / f"sft-{jobs['sft']}.out")
    states = slurm_cluster.wait(list(jobs.values()), timeout=900, poll=1.0)
    logs = {stage: (runs / "logs").glob(f"{stage}-*.out") for stage in jobs}
    logs = {stage: "\n".join(p.read_text() for p in paths) for stage, paths in logs.items()}
    sweep_out, sweep_err = sweep.communicate(timeout=300)
    one_node_out = one_node.communicate(timeout=300)[0]
    return dict(runs=runs, jobs=jobs, states=states, logs=logs, cluster=slurm_cluster, kill=kill,
                one_node=(one_node.returncode, one_node_out, root / "one_node"),
                sweep=(sweep.returncode, sweep_out + sweep_err, root / "sweep"), sweep_warned=warned.get("job"))


def _is_task(pid: int) -> bool:
    """A training process (a task srun started, or a process it forked), not the batch script or
    srun, whose command lines name the same command."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return Path(argv[0].decode()).name.startswith("python") and b"phi4.cli.train" in argv


def _task_pids(cluster, node: str) -> list[int]:
    return [pid for pid in cluster.network.pids(node) if _is_task(pid)]


def _kill_a_node_mid_stage(cluster, job_id: str, log: Path, run_dir: Path, timeout: float = 300) -> dict:
    """Once pre-training has logged step PRETRAIN["kill_after"], SIGKILL its processes on
    PRETRAIN["victim"], as a node failure ends them; then wait for the batch script to requeue the
    job. Returns what the checks need: the checkpoint `latest` named at the kill, and the processes of
    both nodes, which must all be gone once the batch script has its srun's exit."""
    deadline = time.monotonic() + timeout
    step = re.compile(rf"step +{PRETRAIN['kill_after']}/{PRETRAIN['steps']} \| loss")
    while not (log.exists() and step.search(log.read_text())):
        assert not cluster.job(job_id).finished, f"pretraining ended before step {PRETRAIN['kill_after']}"
        assert time.monotonic() < deadline, f"no step {PRETRAIN['kill_after']} in {timeout:.0f} s"
        time.sleep(0.05)
    tasks = {node: _task_pids(cluster, node) for node in cluster.nodes}
    for pid in tasks[PRETRAIN["victim"]]:
        os.kill(pid, signal.SIGKILL)
    killed = time.monotonic()
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()  # nothing can complete after the kill
    while "requeueing job" not in log.read_text():
        assert time.monotonic() < killed + 120, log.read_text()[-3000:]
        time.sleep(0.1)
    alive = [pid for pids in tasks.values() for pid in pids if _is_task(pid)]
    return dict(tasks=tasks, latest=latest, alive=alive)


def _one_node_pretrain(overrides: list[str], run_dir: Path) -> subprocess.Popen:
    """The pre-training stage's run on one node (4 processes under torchrun), for its losses."""
    cmd = [str(PYTHON.parent / "torchrun"), "--nproc-per-node", "4", "--master-port", str(_free_port()),
           "launch/train.py", *overrides, f"run_dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _free_port() -> int:
    from phi4.runtime.launch_env import free_port

    return free_port()


def _lift_limit_once_warned(cluster, job_id: str, log: Path, timeout: float = 600) -> None:
    """Once the SFT job has saved on its warning signal, give it ten minutes: under its two-minute
    limit every run would be warned 15-45 s in (the harness's change; the job's behaviour is its
    own). Done while the job still runs: updating a requeued, pending job delays its restart."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if log.exists() and "stopping at step" in log.read_text():
            cluster.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10:00"], check=True)
            return
        if cluster.job(job_id).finished:
            return
        time.sleep(0.5)


def _submit_sweep(env: dict, root: Path) -> subprocess.Popen:
    """`-m optim.lr=...,...` through hydra/launcher=slurm: two one-process jobs on the cluster, with
    run_dir left to its default. Rank 0 sleeps 2 s in every step (fault.delay_*), no CPU spent, so
    that a warning sent after step 1 arrives mid-run."""
    sweep = root / "sweep"
    return subprocess.Popen(
        [str(PYTHON), str(ROOT / "launch/train.py"), "-m", "hydra/launcher=slurm", "cluster=local_cpu",
         "optim.lr=1e-3,2e-3", f"train.steps={SWEEP_STEPS}", "train.log_every=1", "train.valid_every=0", "eval.every=0",
         "checkpoint.every=0", "optim.warmup_steps=0", "train.tensorboard=false", "fault.delay_rank=0",
         "fault.delay_seconds=2", f"hydra.sweep.dir={sweep}"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _warn_a_sweep_job_mid_run(cluster, sweep: Path, submitter: subprocess.Popen) -> str | None:
    """Once the sweep's job 0 has logged step 1, send it the launcher's warning: USR2 to the job's
    tasks, as SLURM sends it at submitit's `--signal=USR2@signal_delay_s` (and as submitit's own
    `SlurmJob._interrupt(timeout=True)` sends it), now rather than near a time limit, so that no
    clock decides where in the run it lands. Returns the job's id (<array>_<task>), or None if the
    sweep ended first."""
    while submitter.poll() is None:
        for log in sweep.glob(".submitit/*_0/*_0_0_log.err"):
            if re.search(rf"step +1/{SWEEP_STEPS} \| loss", log.read_text()):
                cluster.run(["scancel", "--signal=USR2", log.parent.name], check=True)
                return log.parent.name
        time.sleep(0.1)
    return None


def test_every_job_completes(chain):
    assert chain["states"] == dict.fromkeys(chain["jobs"].values(), "COMPLETED"), \
        {s: chain["logs"][s][-3000:] for s in chain["jobs"]}
    assert (chain["runs"] / "dpo" / "checkpoints" / "final").exists()


def _segments(steps: list[int]) -> list[list[int]]:
    """The runs one after another in a metrics.jsonl: a new one starts where the step goes back."""
    runs: list[list[int]] = []
    for i, step in enumerate(steps):
        if not runs or step <= steps[i - 1]:
            runs.append([])
        runs[-1].append(step)
    return runs


def test_pretraining_ranks_run_where_slurm_put_them(chain):
    """2 nodes x 2 tasks: ranks 0-1 on the job's first node, 2-3 on its second (srun's block
    distribution), as each rank's own host name says in the run's log; TP=2 stays inside a node."""
    job = chain["cluster"].job(chain["jobs"]["pretrain"])
    nodes = chain["cluster"].run(["scontrol", "show", "hostnames", job.fields["NodeList"]], check=True).stdout.split()
    assert len(nodes) == 2, job.fields
    log = chain["logs"]["pretrain"]
    placements = re.findall(r"placement: (.*)", log)
    assert len(placements) == 2, log[-3000:]  # the first run and the requeued one
    assert set(placements) == {f"{nodes[0]}: ranks 0-1 | {nodes[1]}: ranks 2-3"}, placements
    assert "tp=2" in log and "dp=2" in log and "span hosts" not in log


def test_pretraining_on_two_nodes_has_the_one_node_losses(chain):
    code, output, one_node = chain["one_node"]
    assert code == 0, output[-3000:]
    reference = {m["step"]: m["loss"] for m in _metrics(one_node) if "loss" in m}
    assert sorted(reference) == list(range(1, PRETRAIN["steps"] + 1))
    for m in _metrics(chain["runs"] / "pretrain"):  # both runs of the requeued job
        if "loss" in m:
            assert m["loss"] == pytest.approx(reference[m["step"]], rel=1e-6, abs=0), m["step"]


def test_a_killed_node_ends_the_job_everywhere_and_it_resumes_from_the_last_checkpoint(chain):
    kill, log = chain["kill"], chain["logs"]["pretrain"]
    assert kill["tasks"]["n1"] and kill["tasks"]["n2"], kill
    # on every node: srun ended the other tasks itself, so when the script requeues, no rank is left waiting
    assert kill["alive"] == [], kill
    assert "a task was killed" in log and chain["cluster"].job(chain["jobs"]["pretrain"]).restarts == 1
    saved = int(kill["latest"].removeprefix("step_"))
    assert saved >= PRETRAIN["every"] and saved % PRETRAIN["every"] == 0, kill
    assert re.search(rf"resumed from \S+/pretrain/checkpoints/{kill['latest']} at step {saved}\b", log), log[-3000:]
    first, resumed = _segments([m["step"] for m in _metrics(chain["runs"] / "pretrain") if "loss" in m])
    assert first[0] == 1 and first[-1] >= PRETRAIN["kill_after"], first
    assert resumed == list(range(saved + 1, PRETRAIN["steps"] + 1)), resumed  # no step after the checkpoint twice


@pytest.mark.parametrize("stage,previous", [("midtrain", "pretrain"), ("sft", "midtrain"), ("dpo", "sft")])
def test_each_stage_starts_from_the_previous_final_checkpoint(chain, stage, previous):
    runs = chain["runs"]
    before = _common(runs / previous)  # the previous stage's final checkpoint
    start = _common(runs / stage)["train_state"]["initialized_from"]
    final = (runs / previous / "checkpoints" / (runs / previous / "checkpoints/final").read_text().strip())
    assert Path(start["path"]) == final.resolve()
    assert start["weights_fingerprint"] == pytest.approx(before["weights_fingerprint"], rel=1e-9)


def test_pts_reads_the_sft_checkpoint_and_its_pairs_step_by_p_gap(chain):
    runs = chain["runs"]
    config = yaml.safe_load((runs / "pts" / "config.yaml").read_text())
    assert Path(config["pts"]["checkpoint"]) == runs / "sft"
    assert "from " + str((runs / "sft" / "checkpoints" / "final").parent) in chain["logs"]["pts"]
    pairs = [json.loads(line) for line in (runs / "pts" / "pairs.jsonl").read_text().splitlines()]
    assert len(pairs) >= 8, chain["logs"]["pts"][-2000:]
    p_gap = config["pts"]["p_gap"]
    for pair in pairs:
        assert abs(pair["p_step"]) >= p_gap
        assert 0 <= pair["p_rejected"] < pair["p_prefix"] < pair["p_chosen"] <= 1  # one raises p, one lowers it
        assert pair["chosen_ids"] != pair["rejected_ids"]
    searched = [json.loads(line) for part in (runs / "pts" / "parts").glob("*.jsonl") for line in part.read_text().splitlines()]
    assert len(searched) == 32 and all(0.2 <= r["p_query"] <= 0.8 for r in searched if r["kept"])
    assert {pair["problem_id"] for pair in pairs} <= {r["problem_id"] for r in searched if r["kept"]}


def test_midtrain_extends_the_context(chain):
    run = chain["runs"] / "midtrain"
    common = _common(run)
    config = yaml.safe_load(common["config_yaml"])
    assert common["phi4_model"]["rope_base"] == 250000 and config["model"]["rope_base"] == 250000
    assert config["train"]["seq_length"] == 4 * 64  # 4x the tiny pre-training length
    assert yaml.safe_load(_common(chain["runs"] / "pretrain")["config_yaml"])["model"]["rope_base"] == 10000
    losses = [m["loss"] for m in _metrics(run) if "loss" in m]
    assert losses[-1] < losses[0], losses


def test_sft_requeued_at_its_time_limit_resumes_without_repeating_steps(chain):
    job = chain["cluster"].job(chain["jobs"]["sft"])
    assert job.restarts >= 1, chain["logs"]["sft"][-3000:]
    log = chain["logs"]["sft"]
    assert "requeueing job" in log and re.search(r"resumed from .*step_\d+ at step \d+", log)
    steps = [m["step"] for m in _metrics(chain["runs"] / "sft") if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 100, steps


def test_dpo_improves_held_out_reward_accuracy(chain):
    metrics = _metrics(chain["runs"] / "dpo")
    losses = [m["loss"] for m in metrics if "loss" in m]
    assert losses[-1] < losses[0], losses
    held_out = [m for m in metrics if "val_reward_accuracy" in m]
    assert held_out and held_out[-1]["val_reward_accuracy"] > 0.5, held_out


def test_hydra_multirun_through_submitit_runs_each_job_in_its_own_directory(chain):
    """No run_dir given: each job's is its own, hydra.sweep.dir/<job number>."""
    code, output, sweep = chain["sweep"]
    assert code == 0, output[-3000:]
    for num, lr in ((0, 1e-3), (1, 2e-3)):
        config = yaml.safe_load((sweep / str(num) / "config.yaml").read_text())
        assert config["optim"]["lr"] == lr and Path(config["run_dir"]) == sweep / str(num)
    assert [m["step"] for m in _metrics(sweep / "1") if "loss" in m] == list(range(1, SWEEP_STEPS + 1))
    tasks = {p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)}  # <array>_<task>
    swept = [j for j in chain["cluster"].jobs() if f"{j.fields.get('ArrayJobId')}_{j.fields.get('ArrayTaskId')}" in tasks]
    assert len(tasks) == 2 and len(swept) == 2, (tasks, [j.fields for j in chain["cluster"].jobs()][-2:])
    # the sweep ends on the jobs' results, written just before their processes exit
    states = chain["cluster"].wait([j.job_id for j in swept], timeout=60)
    assert set(states.values()) == {"COMPLETED"}, states


def test_a_sweep_job_warned_by_the_launcher_saves_is_requeued_and_resumes(chain):
    """submitit's warning (USR2) is phi4's stop request: a checkpoint, then submitit's own requeue
    of the same call, which resumes from it without repeating a step."""
    code, output, sweep = chain["sweep"]
    assert code == 0, output[-3000:]
    warning_s = yaml.safe_load((ROOT / "conf/cluster/local_cpu.yaml").read_text())["signal_seconds"]
    scripts = [p.read_text() for p in sweep.glob(".submitit/**/*.sh")]
    assert scripts and all(f"#SBATCH --signal=USR2@{warning_s}\n" in s for s in scripts), scripts
    job_id = chain["sweep_warned"]
    assert job_id, "no USR2 sent to the sweep's job 0 (it ended before logging step 1, or scancel failed)"
    log = (sweep / ".submitit" / job_id / f"{job_id}_0_log.err").read_text()  # both runs: --open-mode=append
    stopped = re.search(r"stopping at step (\d+) \(SIGUSR2\); saved \S+", log)
    assert stopped, log[-3000:]
    saved = int(stopped[1])
    assert saved < SWEEP_STEPS and re.search(rf"resumed from \S+/step_0*{saved} at step {saved}\b", log), log[-3000:]
    # the second run goes on from the saved step: each step once (metrics.jsonl appends across runs)
    assert [m["step"] for m in _metrics(sweep / "0") if "loss" in m] == list(range(1, SWEEP_STEPS + 1))
    array, task = job_id.split("_")
    job = next(j for j in chain["cluster"].jobs()
               if (j.fields.get("ArrayJobId"), j.fields.get("ArrayTaskId")) == (array, task))
    assert job.restarts == 1 and chain["cluster"].wait(job.job_id, timeout=60) == {job.job_id: "COMPLETED"}, job.fields
