"""`phi4-train`, the embedded default: trains the tiny model on the synthetic corpus, alone and
under torchrun, and refuses a layout that cannot work before doing anything."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT
from multirank import free_port

BIN = Path(sys.executable).parent
FAST = ["train.seq_length=64", "data.synthetic_problems=300", "train.log_every=4"]


def _run(cmd, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env, **kw)


def _metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_default_run_loss_falls(tmp_path):
    out = _run([str(BIN / "phi4-train"), f"run_dir={tmp_path}", "train.steps=16", *FAST])
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    records = _metrics(tmp_path)
    assert [r["step"] for r in records] == [4, 8, 12, 16]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s"} <= set(records[0])
    assert records[-1]["loss"] < records[0]["loss"] - 1.0, records
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["train"]["steps"] == 16 and saved["model"]["hidden_size"] == 128
    assert "step    16/16 | loss" in out.stdout + out.stderr


def test_torchrun_tensor_parallel(tmp_path):
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()),
           "launch/train.py", f"run_dir={tmp_path}", "topology.tp=2", "topology.sp=true", "train.steps=6", "train.log_every=6",
           "train.seq_length=64", "data.synthetic_problems=300"]
    out = _run(cmd)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    (record,) = _metrics(tmp_path)
    assert record["step"] == 6 and record["loss"] < 11.5
    assert "tp=2" in out.stdout + out.stderr


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["topology.tp=3"], "topology.tp=3 does not divide the model evenly (model.num_query_groups=2, "
                            "model.num_attention_heads=8, model.ffn_hidden_size=448); valid topology.tp: 1, 2"),
        (["train.steps=4"], "optim.warmup_steps=5 must be at least 0 and less than train.steps=4"),
        (["train.global_batch_size=6"], "train.global_batch_size=6 is not a multiple of train.micro_batch_size=4"),
    ],
)
def test_bad_settings_stop_before_any_work(tmp_path, overrides, message):
    out = _run([str(BIN / "phi4-train"), f"run_dir={tmp_path}", *overrides])
    assert out.returncode == 2
    text = out.stdout + out.stderr
    assert message in text
    assert "Traceback" not in text
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.yaml").exists()
