"""The Trainer closes what it opened on every path (a failure in a step's extras, the non-finite
stop), its objectives and callbacks plug in from outside phi4.train, and it handles loss spikes.
One rank, in one fresh process (the CPU backend is process-wide), runs every Trainer of this module."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from multirank import run_ranks

from helpers import trainer_cfg

SPIKE = ["train.steps=16", "optim.lr=1e-2", "optim.decay_style=constant", "train.spike_sigmas=4",
         "train.spike_window=3", "fault.corrupt_sample=53"]  # in step 14's batch (4 samples a step)


STOPPED = "stopped_" + "x" * 72  # see _closing, run 2


def _wait_for_forked_writers(timeout: float = 60) -> None:
    """Until no background save's writer (a process this one forked; Megatron-Core's results queue
    is served by a spawned SyncManager) is left."""
    import multiprocessing
    import time

    deadline = time.monotonic() + timeout
    while any(p.name.startswith("ForkProcess") for p in multiprocessing.active_children()) \
            and time.monotonic() < deadline:
        time.sleep(0.2)


def _cfg(run_dir, cache, *overrides):
    return trainer_cfg(run_dir, cache, *overrides)


def _closing(run_dir, cache) -> dict:
    import os

    import torch

    from phi4.checkpoint.pointers import latest_checkpoint
    from phi4.checkpoint.weights import checkpoint_common_state
    from phi4.train.callbacks import Callback
    from phi4.train.lm import LanguageModeling
    from phi4.train.objective import register
    from phi4.train.stop import TrainingStopped
    from phi4.train.trainer import Trainer

    @register("lm_never_finite")
    class NeverFinite(LanguageModeling):
        """Language modelling whose every update is reported non-finite (and skipped)."""

        def update(self, model_chunks, optimizer, micro_batches, gate=None):
            result = super().update(model_chunks, optimizer, micro_batches, gate)
            return dataclasses.replace(result, update_successful=False, grad_norm=math.nan)

    class Watch(Callback):
        def __init__(self, fail_at=None):
            self.fail_at, self.steps, self.closed = fail_at, [], False

        def setup(self, parts):  # the process group's own timeout, NCCL's watchdog's, on GPUs
            self.group_timeout = torch.distributed.group.WORLD._get_backend(torch.device("cpu")).options._timeout

        def after_step(self, step):
            self.steps.append(step)
            if step == self.fail_at:
                raise RuntimeError(f"callback failed at step {step}")

        def close(self):
            self.closed = True

    seen = {}
    # 1. a callback fails after step 2, with step 1's background save still being written (its writer
    # is slowed): the save is abandoned, and no later save of this process may take its writer's
    # report (its files' byte offsets) for its own
    watch = Watch(fail_at=2)
    cfg = _cfg(run_dir / "failed", cache, "train.steps=4", "checkpoint.every=1", "checkpoint.async_save=true")
    os.environ["PHI4_FAULT"] = "slow_async_write:4"
    try:
        with Trainer(cfg, [watch]) as trainer:
            trainer.train()
    except RuntimeError as err:
        seen["failed"] = str(err)
    finally:
        del os.environ["PHI4_FAULT"]
    seen["failed_latest"] = latest_checkpoint(run_dir / "failed")
    t = trainer.settings.train
    seen["group_timeout_s"] = watch.group_timeout.total_seconds()
    seen["longest_allowance_s"] = 60 * max(t.hang_timeout_minutes, t.hang_startup_minutes, t.hang_save_minutes)
    _wait_for_forked_writers()  # had the abandoned writer lived on, its report is in before the next save
    seen["failed_closed"] = watch.closed and trainer.metrics.tb.all_writers is None  # the event files closed
    seen["failed_group"] = torch.distributed.is_initialized()
    seen["failed_config_kept"] = (run_dir / "failed" / "config.yaml").exists()
    # 2. the non-finite stop, with step 1's background save pending: every rank stops together,
    # so the save is finished and published before the process group goes. The run directory's
    # name is longer than run 1's by more than torch.save's 64-byte record alignment, so that the
    # config saved in the checkpoint moves every later offset: run 1's report cannot fit its files.
    watch = Watch()
    cfg = _cfg(run_dir / STOPPED, cache, "train.steps=5", "train.objective=lm_never_finite",
               "train.max_nonfinite_in_a_row=2", "checkpoint.every=1", "checkpoint.async_save=true")
    try:
        with Trainer(cfg, [watch]) as trainer:
            trainer.train()
    except TrainingStopped as err:
        seen["stopped"] = str(err)
    seen["stopped_closed"] = watch.closed
    seen["stopped_group"] = torch.distributed.is_initialized()
    latest = latest_checkpoint(run_dir / STOPPED)
    seen["stopped_latest"] = latest.name if latest else None
    seen["stopped_saved_step"] = checkpoint_common_state(latest)["train_state"]["step"]  # its items read back
    seen["stopped_state"] = trainer.state.state_dict()
    # 3. out of wall time at the last step: the run ends with its final checkpoint (exit 0), not a
    # resumable stop; and a run whose `final` pointer is missing (stopped between its last pointers)
    # gets it from a rerun that has nothing to do
    last = run_dir / "last_step"
    with Trainer(_cfg(last, cache, "train.steps=1", "train.max_wall_minutes=1e-9"), []) as trainer:
        seen["last_step_code"] = trainer.train()
    seen["last_step_final"] = (last / "checkpoints" / "final").read_text().strip()
    (last / "checkpoints" / "final").unlink()
    with Trainer(_cfg(last, cache, "train.steps=1"), []) as trainer:
        seen["rerun_code"] = trainer.train()
    seen["rerun_final"] = (last / "checkpoints" / "final").read_text().strip()
    return seen


def _losses(run_dir) -> dict:
    """step -> loss, the last record of each step (a rewound run logs steps again)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r and "spike" not in r}


def _spikes(run_dir, cache) -> dict:
    from phi4.checkpoint.weights import weights_fingerprint
    from phi4.train.callbacks import Callback
    from phi4.train.trainer import Trainer

    class Weights(Callback):
        def __init__(self):
            self.after, self.chunks = {}, None

        def setup(self, parts):
            self.chunks = parts.model_chunks

        def after_step(self, step):
            self.after[step] = weights_fingerprint(self.chunks)

    def run(name, *overrides, callbacks=()):
        with Trainer(_cfg(run_dir / name, cache, "train.tensorboard=false", *SPIKE, *overrides),
                     list(callbacks)) as trainer:
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


def _profiled(run_dir, cache) -> dict:
    from phi4.train.trainer import Trainer

    cfg = _cfg(run_dir, cache, "train.steps=4", "train.tensorboard=false", "checkpoint.every=0", "profile.kind=torch",
               "profile.first_step=2", "profile.last_step=3")
    with Trainer(cfg, []) as trainer:
        code = trainer.train()
    traces = sorted((run_dir / "profile").iterdir())
    names = {event.get("name") for event in json.loads(traces[0].read_text())["traceEvents"]} if traces else set()
    return dict(code=code, traces=[t.name for t in traces], names=sorted(n for n in names if isinstance(n, str)))


def _wandb_history(run_dir) -> dict:
    """{W&B run id: [(step, loss), ...]} from the offline runs' transaction logs (run-<id>.wandb: W&B's
    log of 32 KiB blocks of records, each a protobuf Record), read without a server."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    def records(path):
        data = path.read_bytes()
        assert data[:4] == b":W&B"
        pos, block, pieces = 7, 32768, b""
        while pos + 7 <= len(data):
            left = block - pos % block
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
            if left < 7 or (length == 0 and kind == 0):  # the block's padding
                pos += left
                continue
            pieces += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a full record, or a record's last piece
                yield pieces
                pieces = b""

    history = {}
    for path in sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb")):
        run_id = None
        for raw in records(path):
            record = pb.Record()
            record.ParseFromString(raw)
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run_id = record.run.run_id
            elif kind == "history":
                items = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in record.history.item}
                if "loss" in items:
                    history.setdefault(run_id, []).append((items["_step"], items["loss"]))
    return history


def _tracked(run_dir, cache) -> dict:
    """W&B (offline) and MLflow (a local file store) beside metrics.jsonl, through a stop at step 2
    and the resume to step 4."""
    import os

    import mlflow

    from phi4.checkpoint.weights import checkpoint_common_state
    from phi4.train.trainer import Trainer

    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # MLflow 3 keeps the file store for those who ask
    store = f"file://{run_dir.parent / 'mlruns'}"
    overrides = ["train.steps=4", "train.tensorboard=false", "checkpoint.every=0", "tracking.wandb=true",
                 "tracking.wandb_mode=offline", "tracking.mlflow=true", f"tracking.mlflow_tracking_uri={store}",
                 "tracking.run_name=tracked"]
    seen = {}
    with Trainer(_cfg(run_dir, cache, *overrides, "train.exit_interval=2"), []) as trainer:
        seen["first_code"] = trainer.train()
    seen["saved_ids"] = checkpoint_common_state(run_dir / "checkpoints" / "step_0000002")["tracking"]
    with Trainer(_cfg(run_dir, cache, *overrides), []) as trainer:
        seen["second_code"] = trainer.train()
    seen["final_ids"] = checkpoint_common_state(run_dir)["tracking"]
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    seen["jsonl"] = [(r["step"], r["loss"]) for r in records if "loss" in r]
    mlflow.set_tracking_uri(store)
    run_id = seen["final_ids"]["mlflow"]
    client = mlflow.tracking.MlflowClient()
    seen["mlflow_loss"] = [(m.step, m.value) for m in client.get_metric_history(run_id, "loss")]
    run = mlflow.get_run(run_id)
    seen["mlflow_runs"] = len(client.search_runs([run.info.experiment_id]))
    seen["mlflow_status"], seen["mlflow_name"] = run.info.status, run.info.run_name
    seen["mlflow_params"] = {k: run.data.params.get(k) for k in ("train.steps", "optim.lr", "model.num_layers")}
    seen["wandb"] = _wandb_history(run_dir)
    return seen


def _by_source(run_dir, cache) -> dict:
    """Two sources (data=synthetic_midtrain: long documents and recall problems): validation per source."""
    from phi4.train.callbacks import ValidationLoss
    from phi4.train.trainer import Trainer

    cfg = _cfg(run_dir, cache, "data=synthetic_midtrain", "data.synthetic.problems=600", "train.steps=2",
               "train.valid_every=2", "train.valid_samples=4", "train.tensorboard=false", "checkpoint.every=0")
    with Trainer(cfg, [ValidationLoss()]) as trainer:
        trainer.train()
        sizes = {name: len(d) for name, d in trainer.valid_by_source.items()}
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return dict(sizes=sizes, valid=[r for r in records if "val_loss" in r])


def _all(run_dir, cache) -> dict:
    return dict(closing=_closing(run_dir / "closing", cache), spikes=_spikes(run_dir / "spikes", cache),
                profiled=_profiled(run_dir / "profiled", cache), tracked=_tracked(run_dir / "tracked", cache), by_source=_by_source(run_dir / "by_source", cache))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    return dict(run_ranks(_all, 1, root, root / "cache", timeout=600)[0], root=root)


def test_the_trainer_closes_on_every_path(runs):
    seen, tmp_path = runs["closing"], runs["root"] / "closing"
    assert seen["failed"] == "callback failed at step 2"
    assert seen["failed_closed"] and not seen["failed_group"]
    assert seen["failed_config_kept"]  # a step had run: the run directory stays for its resume
    assert seen["failed_latest"] is None  # the abandoned save is named by nothing
    # the backstop behind the hang watchdog: 2 minutes past its longest allowance (30 minutes), not 30 hours
    assert seen["longest_allowance_s"] == 1800 and seen["group_timeout_s"] == 1800 + 120
    assert seen["stopped"].startswith("2 steps in a row had a non-finite loss or gradient norm")
    named = seen["stopped"].split("the last checkpoint is ")[1]
    assert named.startswith(str(tmp_path / STOPPED / "checkpoints/step_0000001"))
    assert seen["stopped_closed"] and not seen["stopped_group"]
    assert seen["stopped_latest"] == "step_0000001" and seen["stopped_saved_step"] == 1
    assert seen["last_step_code"] == 0 and seen["last_step_final"] == "step_0000001"
    assert seen["rerun_code"] == 0 and seen["rerun_final"] == "step_0000001"
    assert seen["stopped_state"] == dict(step=2, consumed_samples=8, skipped_steps=2, initialized_from=None,
                                        recent_losses=[], skipped_windows=[])


def test_a_spike_is_skipped_or_rewound_and_a_resumed_run_chooses_alike(runs):
    """Loss spikes (phi4.train.spikes): a batch of garbage labels (fault.corrupt_sample) at step 14 of
    a run whose loss has come down (about 11.5 to 5.5, at a constant learning rate of 1e-2). With
    train.spike_action=skip its update is not applied (the weights after step 14 are those after step
    13); with rewind the run goes back to the step-12 checkpoint and past the batch; and a run stopped
    at step 12 and resumed makes the same choice, step for step."""
    seen = runs["spikes"]
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


def test_profile_kind_torch_traces_the_window_of_a_training_run(runs):
    """profile.kind=torch over steps 2-3 of 4: one trace in run_dir/profile/, holding those two
    steps (forward, backward and the optimizer's operators) and no other."""
    seen = runs["profiled"]
    assert seen["code"] == 0 and seen["traces"] == ["rank00000_steps2-3.pt.trace.json"]
    names = set(seen["names"])
    assert {"phi4 step 2", "phi4 step 3"} <= names and not {"phi4 step 1", "phi4 step 4"} & names
    assert {"aten::mm", "autograd::engine::evaluate_function: MmBackward0"} & names


def test_wandb_and_mlflow_get_what_metrics_jsonl_gets_and_a_resume_continues_their_runs(runs):
    """tracking.wandb (offline) and tracking.mlflow (a local file store): a run stopped at step 2
    (exit 75) and resumed to step 4 is one W&B run and one MLflow run, holding every training
    loss metrics.jsonl holds; their ids are in each checkpoint."""
    seen = runs["tracked"]
    assert seen["first_code"] == 75 and seen["second_code"] == 0
    assert seen["saved_ids"] == seen["final_ids"] and all(seen["final_ids"].values())
    assert [step for step, _ in seen["jsonl"]] == [1, 2, 3, 4]
    assert seen["mlflow_loss"] == seen["jsonl"]  # one run, both segments
    assert seen["mlflow_runs"] == 1 and seen["mlflow_status"] == "FINISHED" and seen["mlflow_name"] == "tracked"
    assert seen["mlflow_params"] == {"train.steps": "4", "optim.lr": "0.003", "model.num_layers": "2"}
    assert list(seen["wandb"]) == [seen["final_ids"]["wandb"]]  # one W&B run id across the resume
    logged = seen["wandb"][seen["final_ids"]["wandb"]]
    assert [step for step, _ in logged] == [1, 2, 3, 4]
    assert [loss for _, loss in logged] == pytest.approx([loss for _, loss in seen["jsonl"]], rel=1e-6)


def test_validation_loss_is_reported_per_source_beside_the_blend(runs):
    seen = runs["by_source"]
    assert set(seen["sizes"]) == {"long_documents", "recall"} and all(seen["sizes"].values())
    (record,) = seen["valid"]
    assert record["step"] == 2
    losses = [record["val_loss"], record["val_loss/long_documents"], record["val_loss/recall"]]
    assert all(math.isfinite(x) and x > 0 for x in losses)
    assert record["val_loss/long_documents"] != record["val_loss/recall"]  # each source's own samples
