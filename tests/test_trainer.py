"""The Trainer closes what it opened on every path (a failure in a step's extras, the non-finite
stop), and its objectives and callbacks plug in from outside phi4.train. One rank, in a fresh
process (the CPU backend is process-wide)."""

from __future__ import annotations

import math

from multirank import run_ranks

from helpers import trainer_cfg


def _cfg(run_dir, cache, *overrides):
    return trainer_cfg(run_dir, cache, *overrides)


def _closing(run_dir, cache) -> dict:
    import torch

    from phi4.checkpoint.pointers import latest_checkpoint
    from phi4.train.callbacks import Callback
    from phi4.train.lm import LanguageModeling
    from phi4.train.objective import register
    from phi4.train.stop import TrainingStopped
    from phi4.train.trainer import Trainer

    @register("lm_never_finite")
    class NeverFinite(LanguageModeling):
        """Language modelling whose every update is reported non-finite (and skipped)."""

        def train_step(self, ddp_chunks, optimizer, micro_batches):
            return {**super().train_step(ddp_chunks, optimizer, micro_batches), "update_successful": False,
                    "grad_norm": math.nan}

    class Watch(Callback):
        def __init__(self, fail_at=None):
            self.fail_at, self.steps, self.closed = fail_at, [], False

        def after_step(self, trainer, step):
            self.steps.append(step)
            if step == self.fail_at:
                raise RuntimeError(f"callback failed at step {step}")

        def close(self):
            self.closed = True

    seen = {}
    # 1. a callback fails after step 2, with step 2's background save still pending
    watch = Watch(fail_at=2)
    cfg = _cfg(run_dir / "failed", cache, "train.steps=4", "checkpoint.every=1", "checkpoint.async_save=true")
    try:
        with Trainer(cfg, [watch]) as trainer:
            trainer.train()
    except RuntimeError as err:
        seen["failed"] = str(err)
    seen["failed_closed"] = watch.closed and trainer.metrics.tb.all_writers is None  # the event files closed
    seen["failed_group"] = torch.distributed.is_initialized()
    seen["failed_config_kept"] = (run_dir / "failed" / "config.yaml").exists()
    # 2. the non-finite stop, with step 1's background save pending: every rank stops together,
    # so the save is finished and published before the process group goes
    watch = Watch()
    cfg = _cfg(run_dir / "stopped", cache, "train.steps=5", "train.objective=lm_never_finite",
               "train.max_nonfinite_in_a_row=2", "checkpoint.every=1", "checkpoint.async_save=true")
    try:
        with Trainer(cfg, [watch]) as trainer:
            trainer.train()
    except TrainingStopped as err:
        seen["stopped"] = str(err)
    seen["stopped_closed"] = watch.closed
    seen["stopped_group"] = torch.distributed.is_initialized()
    latest = latest_checkpoint(run_dir / "stopped")
    seen["stopped_latest"] = latest.name if latest else None
    seen["stopped_state"] = trainer.state.state_dict()
    return seen


def test_the_trainer_closes_on_every_path(tmp_path):
    seen = run_ranks(_closing, 1, tmp_path, tmp_path / "cache", timeout=300)[0]
    assert seen["failed"] == "callback failed at step 2"
    assert seen["failed_closed"] and not seen["failed_group"]
    assert seen["failed_config_kept"]  # a step had run: the run directory stays for its resume
    assert seen["stopped"].startswith("2 steps in a row had a non-finite loss or gradient norm")
    assert seen["stopped"].split("the last checkpoint is ")[1].startswith(str(tmp_path / "stopped/checkpoints/step_0000001"))
    assert seen["stopped_closed"] and not seen["stopped_group"]
    assert seen["stopped_latest"] == "step_0000001"
    assert seen["stopped_state"] == dict(step=2, consumed_samples=8, skipped_steps=2, initialized_from=None,
                                        recent_losses=[], skipped_windows=[])
