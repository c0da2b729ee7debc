"""The checkpointer's `states` dict (phi4.checkpoint.run): every part saved under its own key and
restored by `load(directory)`, a part that is neither Stateful nor sharded refused by its key, room
for parts beyond the run's four, and a checkpoint written before the states dict (the TrainState's
values flat beside the run's description: tests/data/run_before_states, written by its write.py at
a1fe7c9) still loading, its weights, optimizer, scheduler and TrainState restored.
One rank, in one fresh process (the CPU backend is process-wide)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from multirank import run_ranks

DATA = Path(__file__).parent / "data" / "run_before_states"
# The model, optimizer settings and schedule write.py used (its inputs, repeated here).
MODEL = dict(vocab_size=128, hidden_size=32, ffn_hidden_size=112, num_layers=2, num_attention_heads=4,
             num_query_groups=2, max_position_embeddings=64)
OPTIM = dict(lr=1e-2, min_lr=1e-3, warmup_steps=1, decay_style="cosine")
STEPS = 8
LAYOUT = dict(tp=1, pp=1, vp=None, cp=1, dp=1)
# The TrainState write.py saved (its input).
WRITTEN = dict(step=3, consumed_samples=12, skipped_steps=1, initialized_from=None, recent_losses=[5.5, 5.25],
               skipped_windows=[[4, 8]])


class RunId:
    """A part beyond the run's four, as a metrics sink's run id will be."""

    def __init__(self, value=""):
        self.value = value

    def state_dict(self):
        return {"id": self.value}

    def load_state_dict(self, saved):
        self.value = saved["id"]


def _states(tmp: Path) -> dict:
    import torch

    from helpers import FP32, TopologyConfig, optim_settings, tiny_model
    from phi4.checkpoint.pointers import latest_checkpoint
    from phi4.checkpoint.run import RunCheckpointer, run_states
    from phi4.checkpoint.weights import checkpoint_common_state, weights_fingerprint
    from phi4.model.build import build_phi4_model, transformer_config
    from phi4.model.parallel import init_model_parallel
    from phi4.model.pipeline_schedule import micro_batches_from_tokens
    from phi4.train.lm import lm_update
    from phi4.train.optimizer import build_optimizer, build_scheduler, wrap_ddp
    from phi4.train.trainer import TrainState

    model, topology = tiny_model(**MODEL), TopologyConfig()
    init_model_parallel(model, topology, FP32, seed=7)  # another seed than write.py's: the load must bring its weights
    config = transformer_config(model, topology, FP32)

    def run_parts():
        ddp = wrap_ddp(build_phi4_model(model, topology, FP32, config=config), config)
        optim = optim_settings(**OPTIM)
        optimizer = build_optimizer(ddp, config, optim)
        return ddp, optimizer, build_scheduler(optimizer, optim, STEPS), TrainState()

    seen = {}
    # a checkpoint of the old kind, into a run of today's
    old_run = tmp / "old"
    shutil.copytree(DATA, old_run)
    ddp, optimizer, scheduler, state = run_parts()
    seen["fresh_fingerprint"] = weights_fingerprint(ddp)
    newer_part = RunId("its own")  # a part the old checkpoint has no state for
    checkpointer = RunCheckpointer(old_run, 1, False, {**run_states(ddp, optimizer, scheduler, state),
                                                       "run_id": newer_part}, layout=LAYOUT)
    old = latest_checkpoint(old_run)
    common = checkpointer.load(old)
    seen["old_common_keys"] = sorted(common)
    seen["old_saved_fingerprint"] = common["weights_fingerprint"]
    seen["old_loaded_fingerprint"] = weights_fingerprint(ddp)
    seen["old_state"] = state.state_dict()
    seen["old_newer_part"] = newer_part.value
    seen["old_read_back"] = checkpoint_common_state(old)["train_state"]
    seen["old_scheduler_steps"] = scheduler.num_steps
    seen["old_lr"] = optimizer.param_groups[0]["lr"]
    adam = [s for s in optimizer.optimizer.state.values()]
    seen["old_adam_steps"] = sorted({float(s["step"]) for s in adam})
    seen["old_adam_moments"] = all(s["exp_avg"].abs().sum() > 0 for s in adam)
    rows = torch.randint(0, model.vocab_size, (4, 17), generator=torch.Generator().manual_seed(2))
    seen["old_next_update"] = lm_update(ddp, optimizer, micro_batches_from_tokens(rows, 2)).update_successful

    # today's save: each part under its key, one more part, read back into fresh parts
    new_run = tmp / "new"
    ddp, optimizer, scheduler, state = run_parts()
    state.step, state.consumed_samples, state.recent_losses = 5, 20, [4.0, 3.5]
    for _ in range(2):
        lm_update(ddp, optimizer, micro_batches_from_tokens(rows, 2))
        scheduler.step(increment=1)
    states = {**run_states(ddp, optimizer, scheduler, state), "run_id": RunId("run-42")}
    saved_fingerprint = weights_fingerprint(ddp)
    directory = RunCheckpointer(new_run, 1, False, states, lambda: {"layout": LAYOUT}, LAYOUT).save(5)
    seen["new_common"] = {k: v for k, v in checkpoint_common_state(directory).items() if k in ("train_state", "run_id")}
    seen["new_flat_step"] = "step" in checkpoint_common_state(directory)
    ddp, optimizer, scheduler, state = run_parts()
    run_id = RunId()
    RunCheckpointer(new_run, 1, False, {**run_states(ddp, optimizer, scheduler, state), "run_id": run_id},
                    layout=LAYOUT).load(directory)
    seen["new_loaded"] = (state.state_dict(), run_id.value, scheduler.num_steps,
                          weights_fingerprint(ddp) == saved_fingerprint)
    try:
        RunCheckpointer(new_run, 1, False, {**run_states(ddp, optimizer, scheduler, state), "sink": object()})
    except TypeError as err:
        seen["refused"] = str(err)
    return seen


@pytest.fixture(scope="module")
def seen(tmp_path):
    return run_ranks(_states, 1, tmp_path, timeout=300)[0]


@pytest.fixture(scope="module")
def tmp_path(tmp_path_factory):
    return tmp_path_factory.mktemp("states")


def test_a_checkpoint_written_before_the_states_dict_loads(seen):
    assert "train_state" in seen["old_common_keys"] and "step" not in seen["old_common_keys"]
    assert seen["old_state"] == WRITTEN and seen["old_read_back"] == WRITTEN
    assert seen["old_newer_part"] == "its own"  # a part newer than the checkpoint keeps its state
    # its weights: the fingerprint saved with them, not the fresh model's
    assert seen["old_loaded_fingerprint"] == pytest.approx(seen["old_saved_fingerprint"], rel=1e-12)
    assert seen["old_loaded_fingerprint"] != pytest.approx(seen["fresh_fingerprint"], rel=1e-3)
    # its scheduler (3 steps of 8: warm-up of 1, then cosine from 1e-2 towards 1e-3) and Adam's state
    assert seen["old_scheduler_steps"] == 3
    assert 1e-3 < seen["old_lr"] < 1e-2
    assert seen["old_adam_steps"] == [3.0] and seen["old_adam_moments"]
    assert seen["old_next_update"]


def test_each_part_is_saved_under_its_key_and_restored(seen):
    assert seen["new_common"] == {"train_state": dict(step=5, consumed_samples=20, skipped_steps=0,
                                                      initialized_from=None, recent_losses=[4.0, 3.5],
                                                      skipped_windows=[]),
                                  "run_id": {"id": "run-42"}}
    assert not seen["new_flat_step"]
    state, run_id, scheduler_steps, same_weights = seen["new_loaded"]
    assert state["step"] == 5 and state["recent_losses"] == [4.0, 3.5] and run_id == "run-42"
    assert scheduler_steps == 2 and same_weights


def test_a_part_without_state_is_refused_by_its_key(seen):
    assert seen["refused"].startswith("states['sink']: object has neither state_dict/load_state_dict")
