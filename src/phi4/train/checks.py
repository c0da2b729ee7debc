"""The training run's own settings, checked before any process group exists: the step count, the
batch against the data-parallel size, the run directory, a resumed run's model and batch shape,
and the checkpoints it starts from. Each refusal is one line naming the setting."""

from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from phi4.checkpoint.pointers import resolve_checkpoint
from phi4.checkpoint.weights import MODEL_CONFIG_KEY, TRAIN_STATE_KEY, checkpoint_common_state
from phi4.errors import ConfigError
from phi4.model.config import ModelConfig
from phi4.settings import Checkpoint, Optim, Train, check_ranges
from phi4.train.optimizer import DECAY_STYLES, WSD_DECAY_STYLES, schedule
from phi4.train.spikes import ACTIONS


def check_numbers(cfg: DictConfig) -> None:
    """The loop's groups: each number within the range declared beside its field (phi4.settings),
    no key that is not a setting; and the seed. A typo is one line."""
    check_ranges(cfg, ("train", "optim", "checkpoint", "data", "fault", "profile", "tracking", "dpo",
                       "eval"))
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r}; valid: a whole number at least 0")


def total_steps(train: Train) -> int:
    if train.steps is not None:
        return int(train.steps)
    if train.token_budget is None:
        raise ConfigError("set train.steps, or train.token_budget to derive it")
    return math.ceil(float(train.token_budget) / (train.global_batch_size * train.seq_length))


def check_training(train: Train, optim: Optim, split: str, run_dir: Path, dp: int, steps: int,
                   model: ModelConfig) -> None:
    if train.spike_action not in ACTIONS:
        raise ConfigError(f"train.spike_action={train.spike_action!r}; valid: {', '.join(ACTIONS)}")
    if not 0 <= optim.warmup_steps < steps:
        raise ConfigError(f"optim.warmup_steps={optim.warmup_steps} must be at least 0 and less than train.steps={steps}")
    if train.global_batch_size % (train.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={train.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{train.micro_batch_size} x {dp} data-parallel ranks = {train.micro_batch_size * dp}"
        )
    if optim.decay_style not in DECAY_STYLES:
        raise ConfigError(f"optim.decay_style={optim.decay_style!r}; valid: {', '.join(DECAY_STYLES)}")
    if optim.decay_style == "wsd" and optim.wsd_decay_style not in WSD_DECAY_STYLES:
        raise ConfigError(f"optim.wsd_decay_style={optim.wsd_decay_style!r}; valid: {', '.join(WSD_DECAY_STYLES)}")
    if train.seq_length > model.max_position_embeddings:
        raise ConfigError(f"train.seq_length={train.seq_length} exceeds model.max_position_embeddings="
                          f"{model.max_position_embeddings}")
    check_split(split)
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"run_dir={run_dir} is a file; valid: a directory (made if missing)")
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"run_dir={run_dir}: {existing} is not writable; valid: a directory this user can write")


def check_split(split: str) -> None:
    """data.split: train, validation and test shares (Megatron-Core pads missing ones with 0)."""
    parts = split.split(",")
    try:
        shares = [float(x) for x in parts]
    except ValueError:
        shares = []
    if not 1 <= len(shares) <= 3 or any(not math.isfinite(x) or x < 0 for x in shares) or not sum(shares) > 0:
        raise ConfigError(f"data.split={split!r}; valid: train, validation and test shares (up to three "
                          "non-negative numbers, not all 0), e.g. '98,2,0'")


# Settings a resumed run may change without asking (the checkpoint loads into any layout and
# either backend); the data order depends on the shape of the batch, so that needs asking.
_BATCH_SHAPE = ("seq_length", "global_batch_size")


def check_resume(run_dir: Path, model: ModelConfig, train: Train, checkpointing: Checkpoint, checkpoint: Path,
                 optim: Optim, steps: int) -> list[str]:
    """A run directory is resumed only with the model it was trained with, with the batch shape it
    was trained with unless checkpoint.allow_new_batch_shape says so, and with the learning-rate
    schedule it was trained with unless optim.override_scheduler says so; checked before anything
    is written. Returns the schedule's changes that the override applies (`old -> new` each)."""
    common = checkpoint_common_state(checkpoint)
    saved = dict(common.get(MODEL_CONFIG_KEY) or {})
    now = dataclasses.asdict(model)
    differ = [f"model.{k} {saved[k]!r} -> {now.get(k)!r}" for k in sorted(saved)
              if k not in ("backend", "transformer_impl", "name") and saved[k] != now.get(k)]
    if differ:
        raise ConfigError(f"{run_dir} holds a run of another model ({'; '.join(differ)}), resumed from {checkpoint}; "
                          "valid: the same model settings, or another run_dir (checkpoint.load= starts from its weights)")
    before = (OmegaConf.create(common["config_yaml"]).get("train") or {}) if common.get("config_yaml") else {}
    changed = [f"train.{k} {before[k]} -> {getattr(train, k)}" for k in _BATCH_SHAPE
               if k in before and before[k] != getattr(train, k)]
    if changed and not checkpointing.allow_new_batch_shape:
        raise ConfigError(f"{run_dir} was trained with another batch shape ({'; '.join(changed)}); the data "
                          "order would change: set checkpoint.allow_new_batch_shape=true to resume with it anyway, "
                          "or keep the run's settings")
    saved_schedule, now_schedule = _saved_schedule(common), schedule(optim, steps)
    moved = [f"{k} {saved_schedule[k]} -> {now_schedule[k]}" for k in now_schedule
             if k in saved_schedule and saved_schedule[k] != now_schedule[k]]
    if moved and not optim.override_scheduler:
        step = common.get(TRAIN_STATE_KEY, {}).get("step")
        raise ConfigError(f"{run_dir} was trained on another learning-rate schedule ({'; '.join(moved)}), resumed from "
                          f"{checkpoint.name} at step {step}: set optim.override_scheduler=true to go on with the new "
                          "schedule from that step, or keep the run's settings")
    return moved if optim.override_scheduler else []


def _saved_schedule(common: dict) -> dict:
    """The schedule a checkpoint was trained on: as recorded (phi4.train.optimizer.schedule), or for
    a checkpoint saved before that record, from the scheduler's own state."""
    if common.get("schedule"):
        return common["schedule"]
    state = common.get("scheduler") or {}
    style = {v: k for k, v in DECAY_STYLES.items()}.get(state.get("lr_decay_style"), state.get("lr_decay_style"))
    names = {"optim.lr": state.get("max_lr"), "optim.min_lr": state.get("min_lr"),
             "optim.warmup_steps": state.get("lr_warmup_steps"), "optim.decay_style": style,
             "decay steps (train.steps or train.token_budget)": state.get("lr_decay_steps"),
             "optim.weight_decay": state.get("start_wd")}
    return {k: v for k, v in names.items() if v is not None}


def check_start_points(used: list[tuple[str, str]]) -> None:
    """The checkpoints this run will read weights from exist and are whole, each refusal naming
    its setting (checkpoint.load=, dpo.reference=)."""
    for setting, path in dict(used).items():
        resolve_checkpoint(path, setting)
