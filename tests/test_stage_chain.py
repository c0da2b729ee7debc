"""The Phi-4 stage chain on a real single-node SLURM cluster: slurm/pipeline.sh submits pretrain ->
midtrain -> sft -> pts -> dpo (the tiny model, conf/cluster/local_cpu.yaml), every job completes,
each stage starts from the previous stage's final checkpoint (checked by the weights'
fingerprint, not assumed from the command line), the SFT job reaches its time limit's warning,
requeues itself and finishes from its checkpoint, and a Hydra multirun reaches the same cluster
through the submitit launcher.

One chain serves every check (it costs about four minutes on two cores); the checks are separate
tests over it so that each failure names what broke.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
PYTHON = Path(sys.executable)


def _common(run_dir: Path) -> dict:
    from phi4.checkpoint.weights import checkpoint_common_state

    return checkpoint_common_state(run_dir)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def chain(slurm_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("chain")
    settings = yaml.safe_load((ROOT / "conf/cluster/local_cpu.yaml").read_text())
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
    sweep = _submit_sweep(env, root)
    _lift_limit_once_warned(slurm_cluster, jobs["sft"], runs / "logs" / f"sft-{jobs['sft']}.out")
    states = slurm_cluster.wait(list(jobs.values()), timeout=900, poll=1.0)
    logs = {stage: (runs / "logs").glob(f"{stage}-*.out") for stage in jobs}
    logs = {stage: "\n".join(p.read_text() for p in paths) for stage, paths in logs.items()}
    sweep_out, sweep_err = sweep.communicate(timeout=300)
    return dict(runs=runs, jobs=jobs, states=states, logs=logs, cluster=slurm_cluster,
                sweep=(sweep.returncode, sweep_out + sweep_err, root / "sweep"))


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
    """`-m optim.lr=...,...` through hydra/launcher=slurm: two one-process jobs on the cluster."""
    sweep = root / "sweep"
    return subprocess.Popen(
        [str(PYTHON), str(ROOT / "launch/train.py"), "-m", "hydra/launcher=slurm", "cluster=local_cpu",
         "optim.lr=1e-3,2e-3", "train.steps=3", "train.log_every=1", "train.eval_every=0", "eval.every=0", "checkpoint.every=0",
         "optim.warmup_steps=0", "train.tensorboard=false", f"hydra.sweep.dir={sweep}",
         "run_dir=${hydra:sweep.dir}/${hydra:job.num}"],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_every_job_completes(chain):
    assert chain["states"] == dict.fromkeys(chain["jobs"].values(), "COMPLETED"), \
        {s: chain["logs"][s][-3000:] for s in chain["jobs"]}
    assert (chain["runs"] / "dpo" / "checkpoints" / "final").exists()


@pytest.mark.parametrize("stage,previous", [("midtrain", "pretrain"), ("sft", "midtrain"), ("dpo", "sft")])
def test_each_stage_starts_from_the_previous_final_checkpoint(chain, stage, previous):
    runs = chain["runs"]
    before = _common(runs / previous)  # the previous stage's final checkpoint
    start = _common(runs / stage)["initialized_from"]
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


def test_hydra_multirun_through_submitit_runs_on_the_cluster(chain):
    code, output, sweep = chain["sweep"]
    assert code == 0, output[-3000:]
    for num, lr in ((0, 1e-3), (1, 2e-3)):
        config = yaml.safe_load((sweep / str(num) / "config.yaml").read_text())
        assert config["optim"]["lr"] == lr
        assert [m["step"] for m in _metrics(sweep / str(num)) if "loss" in m] == [1, 2, 3]
    tasks = {p.name for p in (sweep / ".submitit").iterdir() if re.fullmatch(r"\d+_\d+", p.name)}  # <array>_<task>
    swept = [j for j in chain["cluster"].jobs() if f"{j.fields.get('ArrayJobId')}_{j.fields.get('ArrayTaskId')}" in tasks]
    assert len(tasks) == 2 and len(swept) == 2, (tasks, [j.fields for j in chain["cluster"].jobs()][-2:])
    assert all(j.state == "COMPLETED" for j in swept), [(j.job_id, j.state) for j in swept]
