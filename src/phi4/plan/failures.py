"""How often to save: the checkpoint interval that loses the least time to failures and saves
(Young 1974, Daly 2006), and the fraction of time the run then loses.

A job over N nodes, each failing on average every `node_mtbf_hours`, fails every M = MTBF / N.
Saving every T seconds of training, with a save stopping training for d seconds and a restart
(requeue, start-up, loading) costing R, loses per unit of time about

    d / (T + d)              the saves
    ((T + d) / 2 + R) / M    per failure: on average half an interval of work redone, and the restart

and Daly's interval T = sqrt(2 d M) - d (for d < M / 2; else T = M) makes the sum least.

The save time d comes, in order, from `plan.save_seconds`, from a run's measurements (the median
`checkpoint_save_s` that phi4-train writes to run_dir/metrics.jsonl at every save;
`plan.save_from=RUN_DIR`), or from an estimate: the checkpoint's bytes (bf16 weights, fp32 main
weights and Adam's two moments: 14 bytes a parameter) at the cluster file's `storage_write_gbps`.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path
from typing import Optional

from phi4.errors import ConfigError

CHECKPOINT_BYTES_PER_PARAMETER = 2 + 4 + 4 + 4  # bf16 weights; fp32 main weights, Adam's m and v


def measured_save_seconds(run_dir: Path) -> tuple[float, int]:
    """(median seconds, how many saves) from a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"plan.save_from={run_dir}: no metrics.jsonl there (a phi4-train run directory)")
    saves = [r["checkpoint_save_s"] for r in map(json.loads, path.read_text().splitlines()) if "checkpoint_save_s" in r]
    if not saves:
        raise ConfigError(f"plan.save_from={run_dir}: {path} records no save (checkpoint_save_s); run phi4-train with "
                          "checkpoint.every > 0 first, or give plan.save_seconds")
    return statistics.median(saves), len(saves)


def daly_interval(save_s: float, job_mtbf_s: float) -> float:
    """Seconds of training between the starts of two saves that lose the least time."""
    if save_s >= job_mtbf_s / 2:
        return job_mtbf_s
    return math.sqrt(2 * save_s * job_mtbf_s) - save_s


def lost_fraction(interval_s: float, save_s: float, restart_s: float, job_mtbf_s: float) -> dict:
    saves = save_s / (interval_s + save_s)
    rework = (interval_s + save_s) / 2 / job_mtbf_s
    restarts = restart_s / job_mtbf_s
    return dict(saves=saves, rework=rework, restarts=restarts, total=saves + rework + restarts)


def plan_saves(cluster: dict, nodes: int, parameters: float, step_s: float, save_seconds: Optional[float] = None,
               save_from: Optional[str] = None) -> Optional[dict]:
    """The checkpoint interval for `nodes` nodes and the time lost, or None where the cluster file
    gives no `node_mtbf_hours`."""
    mtbf_hours = cluster.get("node_mtbf_hours")
    if not mtbf_hours:
        return None
    if save_seconds is not None:
        save_s, source = float(save_seconds), "plan.save_seconds"
    elif save_from:
        save_s, count = measured_save_seconds(Path(save_from))
        source = f"the median of {count} save(s) measured in {save_from}"
    else:
        gbps = float(cluster.get("storage_write_gbps") or 0)
        if gbps <= 0:
            raise ConfigError("the cluster file gives no storage_write_gbps: give plan.save_seconds, or "
                              "plan.save_from=RUN_DIR (a phi4-train run that saved)")
        gigabytes = parameters * CHECKPOINT_BYTES_PER_PARAMETER / 1e9
        save_s = gigabytes / gbps
        source = f"estimated: {gigabytes:,.0f} GB at the cluster file's storage_write_gbps={gbps:g}"
    job_mtbf_s = float(mtbf_hours) * 3600 / nodes
    restart_s = 60 * float(cluster.get("restart_minutes") or 0)
    interval_s = daly_interval(save_s, job_mtbf_s)
    every = max(1, round(interval_s / step_s))
    return dict(nodes=nodes, node_mtbf_hours=float(mtbf_hours), job_mtbf_hours=job_mtbf_s / 3600,
                save_s=save_s, save_source=source, restart_s=restart_s, interval_s=interval_s,
                checkpoint_every=every, lost=lost_fraction(every * step_s, save_s, restart_s, job_mtbf_s))
