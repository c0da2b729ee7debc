"""phi4-plan's checkpoint interval (phi4.plan.failures): Daly's interval is where the time lost is
least, and phi4-plan prints it for the cluster file's layout with the fraction of time lost to
saves, redone work and restarts at 1920 GPUs. The save time measured by phi4-train is read in
tests/test_train.py (test_default_run)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from helpers import ROOT
from phi4.cli.plan import main as plan_main
from phi4.plan.failures import daly_interval


def _waste(interval_s: float, save_s: float, restart_s: float, mtbf_s: float) -> float:
    """The test's own first-order model: the share of each interval+save spent saving, and per
    failure (one every mtbf_s) half an interval+save redone plus the restart."""
    return save_s / (interval_s + save_s) + ((interval_s + save_s) / 2 + restart_s) / mtbf_s


@pytest.mark.parametrize("save_s, mtbf_s", [(30, 90_000), (300, 3_600), (2, 1e6), (600, 10_000)])
def test_dalys_interval_loses_the_least(save_s, mtbf_s):
    grid = [mtbf_s * 10 ** (k / 2000 - 4) for k in range(8001)]  # 1e-4 M .. 1e0 M, log-spaced
    best = min(grid, key=lambda t: _waste(t, save_s, 600, mtbf_s))
    assert daly_interval(save_s, mtbf_s) == pytest.approx(best, rel=2e-3)


def test_a_save_longer_than_half_the_mtbf_saves_once_per_mtbf():
    assert daly_interval(6_000, 10_000) == 10_000


def _plan(capsys, *args) -> dict:
    assert plan_main(["--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_phi4_plan_gives_the_interval_and_the_time_lost_at_1920_gpus(capsys):
    cluster = yaml.safe_load((ROOT / "conf/cluster/h100.yaml").read_text())
    plan = _plan(capsys, "plan.save_seconds=30")
    saves = plan["saves"]
    nodes = 1920 // 8
    mtbf_s = cluster["node_mtbf_hours"] * 3600 / nodes
    assert saves["nodes"] == nodes and saves["job_mtbf_hours"] == pytest.approx(mtbf_s / 3600)
    assert saves["interval_s"] == pytest.approx(math.sqrt(2 * 30 * mtbf_s) - 30)
    every = saves["checkpoint_every"]
    assert abs(every * plan["step_time_s"] - saves["interval_s"]) <= plan["step_time_s"] / 2
    restart_s = cluster["restart_minutes"] * 60
    assert saves["lost"]["total"] == pytest.approx(_waste(every * plan["step_time_s"], 30, restart_s, mtbf_s))

    plan_main(["plan.save_seconds=30"])  # the text report of the same plan
    out = capsys.readouterr().out
    assert f"checkpoint.every={every}" in out and f"time lost          {saves['lost']['total']:.1%}" in out

    # no measured save: estimated from the checkpoint's bytes (14 a parameter) at the file system's bandwidth
    estimated = _plan(capsys)["saves"]
    assert estimated["save_s"] == pytest.approx(14_659_507_200 * 14 / 1e9 / cluster["storage_write_gbps"])
    assert estimated["save_source"].startswith("estimated")


def test_a_cluster_without_a_failure_rate_gives_no_interval(capsys):
    assert _plan(capsys, "cluster=local_cpu")["saves"] is None

