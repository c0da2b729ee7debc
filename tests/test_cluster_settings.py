"""conf/cluster/*.yaml -> each stage's sbatch options and command (phi4.runtime.cluster), without SLURM."""

from pathlib import Path

import pytest

from phi4.errors import ConfigError
from phi4.runtime.cluster import STAGES, load_cluster, stage_job


def test_h100_stages_chain_and_size_their_jobs(tmp_path):
    cluster = load_cluster("h100")
    jobs = {stage: stage_job(cluster, stage, tmp_path, after="41" if stage != "pretrain" else None) for stage in STAGES}
    options, command, env = jobs["midtrain"]
    assert {"--nodes=240", "--ntasks-per-node=8", "--gpus-per-node=8", "--signal=USR1@300", "--requeue",
            "--dependency=afterok:41", "--partition=gpu"} <= set(options)
    assert command[:3] == ["python", "-m", "phi4.cli.train"]
    assert f"checkpoint.load={tmp_path / 'pretrain'}" in command and f"run_dir={tmp_path / 'midtrain'}" in command
    assert "topology=h100_1920_midtrain" in command and "stage=midtrain" in command
    assert env["PHI4_SETUP"].startswith("source ")
    # NCCL's watchdog and flight recorder, from the cluster file's env, for every task
    assert (env["TORCH_NCCL_DUMP_ON_TIMEOUT"], env["TORCH_FR_BUFFER_SIZE"]) == ("1", "2000")
    assert jobs["pts"][1][:3] == ["python", "-m", "phi4.cli.pts"]
    assert f"pts.checkpoint={tmp_path / 'sft'}" in jobs["pts"][1]
    assert f"data.pairs={tmp_path / 'pts' / 'pairs.jsonl'}" in jobs["dpo"][1]
    assert not any(o.startswith("--dependency") for o in jobs["pretrain"][0])


def test_a_stage_may_size_itself(tmp_path):
    cluster = load_cluster("local_cpu")
    cluster["stages"]["sft"].update(time_limit="00:02:00", signal_seconds=75, cpus_per_task=2)
    options, _, _ = stage_job(cluster, "sft", tmp_path)
    assert {"--ntasks-per-node=1", "--cpus-per-task=2", "--time=00:02:00", "--signal=USR1@75"} <= set(options)
    assert not any(o.startswith(("--gpus-per-node", "--partition")) for o in options)
    options, _, _ = stage_job(cluster, "pretrain", tmp_path)
    assert {"--ntasks-per-node=2", "--cpus-per-task=1", "--time=00:10:00"} <= set(options)


def test_bad_cluster_settings_name_what_is_wrong(tmp_path):
    with pytest.raises(ConfigError, match=r"'nope' not found .*h100, local_cpu"):
        load_cluster("nope")
    cluster = load_cluster("local_cpu")
    del cluster["stages"]["pts"]
    with pytest.raises(ConfigError, match="no stages.pts entry"):
        stage_job(cluster, "pts", Path(tmp_path))


def test_the_whole_chain_is_checked_before_anything_is_submitted(tmp_path):
    from phi4.runtime.cluster import check_chain

    cluster = load_cluster("local_cpu")
    check_chain(cluster, list(STAGES), tmp_path)
    for stages, message in (
        (["pretrain", "midtrian"], r"--stages: unknown stage\(s\) midtrian; valid: pretrain, midtrain, sft, pts, dpo"),
        (["sft", "midtrain"], r"--stages sft midtrain: stages run in the chain's order without gaps; starting at sft: sft pts"),
        (["midtrain", "pts"], r"without gaps; starting at midtrain: midtrain sft"),
        ([], r"--stages is empty"),
        (["sft", "pts", "dpo"], rf"--stages starts at sft, which reads {tmp_path / 'midtrain'}: not found"),
    ):
        with pytest.raises(ConfigError, match=message):
            check_chain(cluster, stages, tmp_path)
    check_chain(cluster, ["sft", "pts", "dpo"], tmp_path, after="17")  # the job it waits for makes it
    (tmp_path / "sft").mkdir()
    with pytest.raises(ConfigError, match=rf"starts at dpo, which reads {tmp_path / 'pts'}: not found"):
        check_chain(cluster, ["dpo"], tmp_path)


def test_pipeline_refuses_a_bad_chain_before_submitting_any_stage(tmp_path):
    """A wrong name late in --stages used to be found after the earlier stages were queued."""
    import subprocess

    from helpers import ROOT

    def pipeline(*args):
        return subprocess.run([str(ROOT / "slurm/pipeline.sh"), "--cluster", "local_cpu", "--runs", str(tmp_path),
                               *args], capture_output=True, text=True, timeout=120)

    out = pipeline("--stages", "pretrain midtrain sfft", "--dry-run")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.strip() == "pipeline: error: --stages: unknown stage(s) sfft; valid: pretrain, midtrain, sft, pts, dpo"
    out = pipeline("--dry-run", "--cluster")
    assert out.returncode == 2 and out.stderr.strip() == "pipeline: error: --cluster needs a value (see --help)"
    out = pipeline("--stages", "pretrain midtrain", "--dry-run")
    assert out.returncode == 0 and [l.split()[1] for l in out.stdout.splitlines()] == ["--job-name=phi4-pretrain", "--job-name=phi4-midtrain"], out.stderr


def test_a_sweep_on_a_cluster_file_without_a_launcher_setting_is_one_line(tmp_path):
    """hydra/launcher=slurm reads cluster.sweep.max_requeues (submitit's max_num_timeout): a cluster
    file without it is refused in one line naming it, before any job is submitted."""
    import subprocess
    import sys

    from helpers import ROOT

    out = subprocess.run([sys.executable, str(ROOT / "launch/train.py"), "-m", "hydra/launcher=slurm",
                          "cluster=local_cpu", "~cluster.sweep.max_requeues", "optim.lr=1e-3,2e-3",
                          f"hydra.sweep.dir={tmp_path}"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2, out.stderr[-3000:]
    assert out.stderr.strip().splitlines()[-1:] == [
        "error: Interpolation key 'cluster.sweep.max_requeues' not found; set it, e.g. in the cluster file"], out.stderr
    assert not (tmp_path / ".submitit").exists()
