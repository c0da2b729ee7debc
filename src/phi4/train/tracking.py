"""Experiment trackers beside metrics.jsonl and TensorBoard: Weights & Biases and MLflow, each off
by default (`tracking.wandb`, `tracking.mlflow`), fed every record metrics.jsonl gets, from the rank
that logs, with the run's resolved config.

A tracker's run id is part of the checkpoint (the `tracking` part of the checkpointer's states
dict): a requeued or resumed job continues the same tracker run instead of starting another. The
logging rank is not rank 0 (it is the last pipeline stage's first rank) while rank 0 writes the
checkpoint's plain values, so the ids are broadcast to every rank once the trackers have started.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import time
from pathlib import Path
from typing import Optional

import torch

from phi4.errors import ConfigError
from phi4.settings import Tracking

log = logging.getLogger("phi4.train")

WANDB_MODES = ("online", "offline", "disabled")
# MLflow's limits on a parameter (mlflow.utils.validation): keys up to 250 characters, values 6000.
_MLFLOW_VALUE_CHARS = 6000


def check_tracking(tracking: Tracking) -> None:
    """Before any process group: each tracker asked for is installed; W&B's mode is one it knows."""
    for on, package in ((tracking.wandb, "wandb"), (tracking.mlflow, "mlflow")):
        if on and importlib.util.find_spec(package) is None:
            raise ConfigError(f"tracking.{package}=true needs the {package} package, which is not installed; "
                              f"pip install 'phi4-megatron[tracking]', or tracking.{package}=false")
    if tracking.wandb_mode is not None and tracking.wandb_mode not in WANDB_MODES:
        raise ConfigError(f"tracking.wandb_mode={tracking.wandb_mode!r}; valid: {', '.join(WANDB_MODES)}, or null")


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow's flat parameters: `train.steps` -> "100"."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(flat_params(value, f"{name}."))
        else:
            out[name] = str(value)[:_MLFLOW_VALUE_CHARS]
    return out


def _numbers(record: dict) -> dict[str, float]:
    return {k: float(v) for k, v in record.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class TrackerRuns:
    """The trackers of a run, and their run ids (a Stateful part of the checkpoint)."""

    def __init__(self, tracking: Tracking, run_dir: Path, default_name: str):
        self.tracking, self.run_dir = tracking, Path(run_dir)
        self.name = tracking.run_name or default_name
        self.ids: dict[str, Optional[str]] = {"wandb": None, "mlflow": None}
        self._wandb = None
        self._mlflow = None

    @property
    def on(self) -> bool:
        return self.tracking.wandb or self.tracking.mlflow

    def state_dict(self) -> dict:
        return dict(self.ids)

    def load_state_dict(self, saved: dict) -> None:
        self.ids = {**self.ids, **saved}

    def start(self, is_logger: bool, config: dict, log_info) -> None:
        """Collective. The logging rank starts (or, with a saved id, resumes) each tracker run;
        every rank then holds the ids."""
        if not self.on:
            return
        if is_logger:
            if self.tracking.wandb:
                self._start_wandb(config, log_info)
            if self.tracking.mlflow:
                self._start_mlflow(config, log_info)
        ids = [self.ids if is_logger else None]
        gathered = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(gathered, ids[0])
        self.ids = next(i for i in gathered if i is not None)

    def _start_wandb(self, config: dict, log_info) -> None:
        import wandb  # lazy: optional (tracking.wandb)

        t, resumed = self.tracking, self.ids["wandb"]
        self._wandb = wandb.init(project=t.wandb_project, entity=t.wandb_entity, name=self.name, config=config,
                                 dir=str(self.run_dir), mode=t.wandb_mode, id=resumed,
                                 resume="allow" if resumed else None)
        self.ids["wandb"] = self._wandb.id
        log_info(f"tracking: W&B run {self._wandb.id} ({'resumed' if resumed else 'new'}, project {t.wandb_project}, "
                 f"mode {self._wandb.settings.mode})")

    def _start_mlflow(self, config: dict, log_info) -> None:
        import mlflow  # lazy: optional (tracking.mlflow)

        t, resumed = self.tracking, self.ids["mlflow"]
        if t.mlflow_tracking_uri:
            mlflow.set_tracking_uri(t.mlflow_tracking_uri)
        self._mlflow = mlflow.tracking.MlflowClient()
        if resumed is None:
            experiment = mlflow.set_experiment(t.mlflow_experiment)
            run = self._mlflow.create_run(experiment.experiment_id, run_name=self.name)
            params = flat_params(config)
            names = sorted(params)
            for i in range(0, len(names), 100):  # MLflow's batch limit: 100 parameters
                self._mlflow.log_batch(run.info.run_id, params=[mlflow.entities.Param(k, params[k])
                                                                for k in names[i:i + 100]])
            self.ids["mlflow"] = run.info.run_id
        else:
            self._mlflow.update_run(resumed, status="RUNNING")
        log_info(f"tracking: MLflow run {self.ids['mlflow']} ({'resumed' if resumed else 'new'}, experiment "
                 f"{t.mlflow_experiment}, {mlflow.get_tracking_uri()})")

    def log(self, record: dict) -> None:
        """One metrics.jsonl record (the logging rank's)."""
        values, step = _numbers(record), record.get("step")
        if not values:
            return
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        if self._mlflow is not None:
            import mlflow  # lazy: optional (tracking.mlflow)

            now_ms = int(1000 * time.time())
            metrics = [mlflow.entities.Metric(k, v, now_ms, int(step or 0)) for k, v in values.items()]
            self._mlflow.log_batch(self.ids["mlflow"], metrics=metrics)

    def close(self, failed: bool = False) -> None:
        if self._wandb is not None:
            self._wandb.finish(exit_code=1 if failed else 0)
            self._wandb = None
        if self._mlflow is not None:
            self._mlflow.set_terminated(self.ids["mlflow"], status="FAILED" if failed else "FINISHED")
            self._mlflow = None


def default_run_name(stage: str, run_dir: Path) -> str:
    """<stage>-<run directory's name>: what the trackers call a run unless tracking.run_name says."""
    return f"{stage}-{Path(run_dir).resolve().name}"
