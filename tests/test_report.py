"""phi4-report: the pictures and summary of one run, of a chain of stages, and of a run still
being written, from metrics.jsonl records made here (the inputs), and its refusals."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

PNG = b"\x89PNG\r\n\x1a\n"


def _run(run_dir: Path, records: list[dict], tail: str = "") -> Path:
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + tail)
    return run_dir


def _training(steps, loss0, skipped_at=None, spike_at=None, sources=()):
    records, skipped = [], 0
    for step in steps:
        skipped += step in (skipped_at, spike_at)
        record = dict(step=step, loss=loss0 - 0.1 * step, lr=1e-3, grad_norm=1.0 + step, tokens_per_s=1000.0 + step,
                      mfu=0.3, skipped_steps=skipped)
        if step == spike_at:
            record["spike"] = "the loss 9.0 is 5.0 standard deviations above ..."
        records.append(record)
    records.append(dict(step=steps[-1], val_loss=loss0 - 0.05 * steps[-1],
                        **{f"val_loss/{s}": loss0 + i for i, s in enumerate(sources)}))
    records.append(dict(step=steps[-1], checkpoint_save_s=1.5))
    records.append({"step": steps[-1], "eval/sums/accuracy": 0.5, "eval/sums/ci95_low": 0.3,
                    "eval/sums/ci95_high": 0.7, "eval/sums/problems": 20})
    return records


def test_one_run_gets_its_pictures_and_a_summary_of_its_records(tmp_path):
    from phi4.cli.report import main

    run = _run(tmp_path / "pretrain", _training([1, 2, 3, 4], 5.0, skipped_at=2, spike_at=3, sources=("web", "code")))
    assert main([str(run)]) == 0
    out = run / "report"
    for name in ("loss", "lr", "grad_norm", "throughput", "eval"):
        assert (out / f"{name}.png").read_bytes()[:8] == PNG
    text = (out / "README.md").read_text()
    assert "| pretrain | 4 | 4.6000 | 4.8000 | 1,002 | 30.0% | 2 | 1 | 1 (1.50 s median) |" in text
    assert "| pretrain | web | 5.0000 |" in text and "| pretrain | code | 6.0000 |" in text
    assert "| pretrain | sums | 50.0% | 30.0% - 70.0% |" in text
    assert all(f"![{name}]({name}.png)" in text for name in ("loss", "lr", "grad_norm", "throughput", "eval"))


def test_a_chain_lays_its_stages_end_to_end_and_a_running_run_is_read_as_far_as_written(tmp_path):
    from phi4.cli.report import read_chain, report

    first = _run(tmp_path / "pretrain", _training([5, 10], 9.0))
    second = _run(tmp_path / "midtrain", _training([2, 4, 6], 7.0), tail='{"step": 7, "loss": 6.')  # being written
    stages = read_chain([first, second])
    assert [(s.name, s.offset, s.last_step) for s in stages] == [("pretrain", 0, 10), ("midtrain", 10, 6)]
    assert stages[1].series("loss") == ([12, 14, 16], [pytest.approx(6.8), pytest.approx(6.6), pytest.approx(6.4)])
    summary = report([first, second], tmp_path / "chain").read_text()
    assert "| pretrain | 10 |" in summary and "| midtrain | 6 |" in summary


def test_a_directory_without_metrics_is_refused_in_one_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "phi4.cli.report", str(tmp_path / "nothing")], capture_output=True,
                         text=True)
    assert out.returncode == 2
    assert out.stderr == f"phi4-report: error: {tmp_path / 'nothing'}: no metrics.jsonl (not a phi4-train run " \
                         "directory, or no step logged yet)\n"
    assert not (tmp_path / "nothing").exists()  # nothing written
