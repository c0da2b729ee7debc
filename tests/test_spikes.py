"""Loss spikes (phi4.train.spikes): a batch of garbage labels (fault.corrupt_sample) at step 14 of
a run whose loss has come down (about 11.5 to 5.5, at a constant learning rate of 1e-2). With
train.spike_action=skip its update is not applied (the weights after step 14 are those after step
13); with rewind the run goes back to the step-12 checkpoint and past the batch; and a run stopped
at step 12 and resumed makes the same choice, step for step. One rank, in a fresh process; the
Trainer is run in it four times."""

from __future__ import annotations

import json

from multirank import run_ranks

from helpers import trainer_cfg

SPIKE = ["train.steps=16", "optim.lr=1e-2", "optim.decay_style=constant", "train.spike_sigmas=4",
         "train.spike_window=3", "fault.corrupt_sample=53"]  # in step 14's batch (4 samples a step)


def _cfg(run_dir, cache, *overrides):
    return trainer_cfg(run_dir, cache, "train.tensorboard=false", *SPIKE, *overrides)


def _losses(run_dir) -> dict:
    """step -> loss, the last record of each step (a rewound run logs steps again)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "spike" not in r}


def _runs(run_dir, cache) -> dict:
    from phi4.checkpoint.weights import weights_fingerprint
    from phi4.train.callbacks import Callback
    from phi4.train.trainer import Trainer

    class Weights(Callback):
        def __init__(self):
            self.after = {}

        def after_step(self, trainer, step):
            self.after[step] = weights_fingerprint(trainer.ddp)

    def run(name, *overrides, callbacks=()):
        with Trainer(_cfg(run_dir / name, cache, *overrides), list(callbacks)) as trainer:
            code = trainer.train()
        return code, trainer.state.state_dict()

    seen = {}
    weights = Weights()
    seen["skip"] = run("skip", "train.spike_action=skip", "checkpoint.every=0", callbacks=[weights])
    seen["skip_weights"] = (weights.after[13], weights.after[14], weights.after[15])
    seen["skip_record"] = [json.loads(line) for line in (run_dir / "skip" / "metrics.jsonl").read_text().splitlines()
                           if json.loads(line).get("spike")]
    seen["rewind"] = run("rewind", "train.spike_action=rewind", "checkpoint.every=12")
    seen["stopped"] = run("resumed", "train.spike_action=rewind", "checkpoint.every=12", "train.exit_interval=12")
    seen["resumed"] = run("resumed", "train.spike_action=rewind", "checkpoint.every=12")
    for name in ("skip", "rewind", "resumed"):
        seen[f"{name}_losses"] = _losses(run_dir / name)
    return seen


def test_a_spike_is_skipped_or_rewound_and_a_resumed_run_chooses_alike(tmp_path):
    seen = run_ranks(_runs, 1, tmp_path, tmp_path / "cache", timeout=600)[0]
    # skip: step 14's batch (samples 52-55) is not applied; the run goes on to step 16
    code, state = seen["skip"]
    assert code == 0 and state["step"] == 16 and state["skipped_steps"] == 1
    assert state["skipped_windows"] == [[52, 56]]
    before, at, after = seen["skip_weights"]
    assert at == before != after
    (record,) = seen["skip_record"]
    assert record["step"] == 14 and "standard deviations above the last 3 steps' mean" in record["spike"]
    # rewind: back to the step-12 checkpoint, samples 48-55 skipped, steps 13-16 on samples 56-71
    code, state = seen["rewind"]
    assert code == 0 and state["step"] == 16 and state["consumed_samples"] == 56 + 4 * 4
    assert state["skipped_windows"] == [[48, 56]] and state["skipped_steps"] == 0
    # stopped at step 12 and resumed: the window of recent losses came back with the checkpoint,
    # so the resumed run meets the spike at step 14, goes back alike, and every loss is the same
    assert seen["stopped"][0] == 75 and seen["stopped"][1]["step"] == 12
    code, state = seen["resumed"]
    assert code == 0 and state["skipped_windows"] == [[48, 56]]
    assert seen["resumed_losses"] == seen["rewind_losses"]
