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
    assert command[:3] == ["python", "-m", "phi4.train.main"]
    assert f"checkpoint.load={tmp_path / 'pretrain'}" in command and f"run_dir={tmp_path / 'midtrain'}" in command
    assert "topology=h100_1920_midtrain" in command and "stage=midtrain" in command
    assert env["PHI4_SETUP"].startswith("source ")
    assert jobs["pts"][1][:3] == ["python", "-m", "phi4.posttrain.pts_cli"]
    assert f"pts.checkpoint={tmp_path / 'sft'}" in jobs["pts"][1]
    assert f"data.pairs={tmp_path / 'pts' / 'pairs.jsonl'}" in jobs["dpo"][1]
    assert not any(o.startswith("--dependency") for o in jobs["pretrain"][0])


def test_a_stage_may_size_itself(tmp_path):
    cluster = load_cluster("local_cpu")
    cluster["stages"]["sft"].update(time_limit="00:02:00", signal_seconds=75)
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
