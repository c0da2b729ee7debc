"""The pure pieces of a training run, each alone in this process (no process group, no model):
the spike gate, the walk over global batches, the validation samples, the step log's record and
line, the typed settings and their deprecated names. The multi-process tests (test_trainer,
test_train) keep what needs ranks: agreement across them, checkpoints, resumes."""

from __future__ import annotations

import dataclasses
import json
import logging
import math

import pytest

from helpers import trainer_cfg


class _State:
    """What SpikeGuard reads of a TrainState: its window of recent losses."""

    def __init__(self):
        self.recent_losses = []


def _guard(sigmas=3.0, window=4):
    from phi4.train.spikes import SpikeGuard

    state = _State()
    return SpikeGuard(sigmas, window, state, agree=float), state


def test_spike_guard_vetoes_only_beyond_its_sigmas_once_the_window_is_full():
    guard, state = _guard()
    for loss in (5.0, 5.2, 4.8, 5.0):  # filling the window: never a spike, however high
        assert guard(loss) is None
    assert state.recent_losses == [5.0, 5.2, 4.8, 5.0]
    mean, spread = 5.0, math.sqrt(0.02)  # population standard deviation of the window
    assert guard(mean + 2.9 * spread) is None  # within 3 sigmas: joins the window, the oldest leaves
    assert state.recent_losses == [5.2, 4.8, 5.0, pytest.approx(mean + 2.9 * spread)]
    window = list(state.recent_losses)
    high = 100.0
    why = guard(high)
    assert why.startswith("the loss 100.0000 is ") and "standard deviations above the last 4 steps' mean" in why
    assert "train.spike_sigmas=3" in why
    assert state.recent_losses == window  # a spike does not join the window


def test_spike_guard_vetoes_a_non_finite_loss_even_before_the_window_fills():
    guard, state = _guard()
    assert guard(math.nan) == "the loss is nan"
    assert guard(math.inf) == "the loss is inf"
    assert state.recent_losses == []


def test_spike_guard_follows_a_window_replaced_by_a_checkpoint_load():
    guard, state = _guard(window=2)
    guard(1.0), guard(1.1)
    state.recent_losses = [10.0, 10.2]  # TrainState.load_state_dict replaces the list
    assert guard(10.1) is None and state.recent_losses == [10.2, 10.1]


class _Samples:
    """A dataset whose sample i is i."""

    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return i


def test_global_batches_share_each_batch_over_the_data_parallel_ranks_and_resume_where_they_stopped():
    from phi4.data.blend import GlobalBatches

    ranks = [GlobalBatches(_Samples(10), 4, r, 2) for r in range(2)]
    first = [b.next() for b in ranks]
    assert first == [[0, 1], [2, 3]]  # contiguous shares of samples 0-3
    second = [b.next() for b in ranks]
    assert second == [[4, 5], [6, 7]]
    third = [b.next() for b in ranks]
    assert third == [[8, 9], [0, 1]]  # past the end: around again
    assert all(b.consumed == 12 for b in ranks)
    resumed = GlobalBatches(_Samples(10), 4, 1, 2, consumed=4)  # a resumed run at 4 consumed samples
    assert resumed.next() == second[1]


def test_global_batches_refuse_a_batch_that_does_not_split():
    from phi4.data.blend import GlobalBatches
    from phi4.errors import ConfigError

    with pytest.raises(ConfigError, match="train.global_batch_size=6 does not split over 4 data-parallel ranks"):
        GlobalBatches(_Samples(10), 6, 0, 4)


def test_evaluation_samples_are_the_first_ones_split_evenly_over_the_ranks():
    from phi4.data.blend import evaluation_samples

    assert [evaluation_samples(_Samples(100), 7, r, 2) for r in range(2)] == [[0, 1, 2], [3, 4, 5]]
    assert evaluation_samples(_Samples(3), 8, 0, 2) == [0]  # at most what there is, whole per rank
    assert evaluation_samples(_Samples(1), 8, 0, 2) is None  # not one per rank
    assert evaluation_samples(None, 8, 0, 1) is None and evaluation_samples(_Samples(0), 8, 0, 1) is None


class _Clock:
    """A clock the test moves: the step log's times are the test's inputs, not this machine's speed."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_the_step_log_writes_one_record_and_one_line_per_window(tmp_path, caplog):
    from phi4.train.metrics import MetricsWriter, StepLog
    from phi4.train.update import StepResult

    clock = _Clock()
    metrics = MetricsWriter(tmp_path, enabled=True, tensorboard=False)
    log = StepLog(metrics, steps=10, tokens_per_step=1000, flops_per_token=6e9, world_size=2, peak=100.0,
                  memory_gb=lambda: 1.5, clock=clock)
    clock.now += 2.0  # the window's 4 steps took 2 s
    log.window_steps = 4
    result = StepResult(loss=2.5, grad_norm=0.75, update_successful=True, figures={"reward_accuracy": 0.6})
    with caplog.at_level(logging.INFO, logger="phi4.train"):
        log.write(4, result, lr=3e-4, skipped=1, describe=lambda f: f"acc {f['reward_accuracy']:.1f}",
                  ranks={"rank_time_min_s": 0.1, "rank_time_max_s": 0.2, "slowest_rank": 1, "slowest_host": "n2"},
                  consumed_samples=16)
    (record,) = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 4 and record["loss"] == 2.5 and record["lr"] == 3e-4 and record["grad_norm"] == 0.75
    assert record["tokens_per_s"] == 2000  # 4 x 1000 tokens in 2 s
    assert record["tflops_per_gpu"] == pytest.approx(6.0)  # 2000 tokens/s x 6 GFLOP / 2 GPUs
    assert record["mfu"] == pytest.approx(record["tflops_per_gpu"] / 100.0)
    assert record["memory_gb"] == 1.5 and record["skipped_steps"] == 1 and record["reward_accuracy"] == 0.6
    assert record["slowest_host"] == "n2" and "spike" not in record
    # 500 ms a step over the window; 6 steps left to the stage's end: 3 s
    assert record["consumed_samples"] == 16 and record["ms_per_step"] == 500 and record["eta_s"] == 3
    (line,) = [r.getMessage() for r in caplog.records]
    assert line == ("step      4/10 | loss 2.5000 | lr 3.00e-04 | grad norm 0.750 | acc 0.6 | 16 samples | "
                    "500 ms/step | ETA 0:00:03 | 2,000 tokens/s | 6.00 TFLOP/s/GPU | MFU 6.0% | mem 1.5 GB | "
                    "ranks 0.100-0.200 s to gradients, slowest 1 on n2")
    assert log.window_steps == 0  # the next window starts
    clock.now += 9.0
    log.window_steps = 1
    vetoed = StepResult(loss=9.0, grad_norm=math.nan, update_successful=False, spike="the loss is 9")
    log.write(5, vetoed, lr=3e-4, skipped=2, describe=lambda f: "")
    second = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[1])
    assert second["spike"] == "the loss is 9" and second["eta_s"] == 45  # 5 steps left at 9 s


@pytest.mark.parametrize("seconds_per_step, steps_left, eta", [
    (59.6, 1, "0:01:00"), (3 * 3600 + 62, 1, "3:01:02"), (2 * 86400 + 5, 1, "2d 0:00:05"), (1.0, 0, "0:00:00")])
def test_the_eta_reads_as_hours_minutes_seconds_and_days(tmp_path, caplog, seconds_per_step, steps_left, eta):
    """The console line's ETA for given times (the test's clock), as a person reads it."""
    from phi4.train.metrics import MetricsWriter, StepLog
    from phi4.train.update import StepResult

    clock = _Clock()
    log = StepLog(MetricsWriter(tmp_path, enabled=True, tensorboard=False), steps=10, tokens_per_step=1,
                  flops_per_token=1.0, world_size=1, peak=None, memory_gb=lambda: 0.0, clock=clock)
    clock.now += seconds_per_step
    log.window_steps = 1
    with caplog.at_level(logging.INFO, logger="phi4.train"):
        log.write(10 - steps_left, StepResult(1.0, 1.0, True), lr=1e-3, skipped=0, describe=lambda f: "")
    assert f" | ETA {eta} | " in caplog.records[0].getMessage()


def test_settings_are_typed_one_way_and_a_deprecated_name_still_works_warning_once(tmp_path, caplog):
    from phi4 import errors
    from phi4.model.config import ModelConfig, TopologyConfig
    from phi4.settings import Checkpoint, Data, RunSettings, Source, Train, typed

    cfg = trainer_cfg(tmp_path / "run", tmp_path / "cache", "train.eval_every=7", "train.eval_samples=3")
    errors._WARNED.clear()
    with caplog.at_level(logging.WARNING, logger="phi4"):
        run = RunSettings.from_config(cfg)
        again = typed(cfg, "train")
    assert isinstance(run.train, Train) and isinstance(run.checkpoint, Checkpoint) and isinstance(run.data, Data)
    assert isinstance(run.model, ModelConfig) and isinstance(run.topology, TopologyConfig)
    assert all(isinstance(s, Source) for s in run.data.sources) and run.data.pairs is None  # `???` -> None
    assert (run.train.valid_every, run.train.valid_samples) == (7, 3) and run.train.eval_every is None
    assert (again.valid_every, again.valid_samples) == (7, 3)
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [
        "train.eval_every is deprecated and will be removed in the next release: use train.valid_every "
        "(this run: train.valid_every=7)",
        "train.eval_samples is deprecated and will be removed in the next release: use train.valid_samples "
        "(this run: train.valid_samples=3)"]
    assert run.run_dir == tmp_path / "run" and run.seed == cfg.seed


def test_a_deprecated_name_keeps_its_range_check(tmp_path):
    from phi4.errors import ConfigError
    from phi4.settings import check_ranges

    cfg = trainer_cfg(tmp_path / "run", tmp_path / "cache", "train.eval_every=-1")
    with pytest.raises(ConfigError, match=r"^train.eval_every=-1; valid: a whole number at least 0 "
                                          r"\(deprecated: train.valid_every\)$"):
        check_ranges(cfg, ("train",))


def test_number_bounds_say_which_end_is_included():
    from phi4.settings import Optim, Plan, number

    fields = {f.name: f.metadata for f in dataclasses.fields(Optim)}
    assert fields["lr"]["above"] == 0 and fields["lr"]["at_least"] is None  # 0 itself is refused
    assert fields["adam_beta1"]["at_least"] == 0 and fields["adam_beta1"]["below"] == 1  # 1 itself is refused
    plan = {f.name: f.metadata for f in dataclasses.fields(Plan)}
    assert plan["mfu"]["above"] == 0 and plan["mfu"]["at_most"] == 1  # 1 itself is allowed
    with pytest.raises(TypeError, match="exactly one lower bound"):
        number(at_least=0, above=0)


def test_model_backend_is_now_transformer_impl_and_old_checkpoints_say_backend(tmp_path, caplog):
    from phi4 import errors
    from phi4.model.config import ModelConfig
    from phi4.settings import typed

    errors._WARNED.clear()
    cfg = trainer_cfg(tmp_path / "run", tmp_path / "cache", "model.backend=te")
    with caplog.at_level(logging.WARNING, logger="phi4"):
        model = typed(cfg, "model")
    assert model.transformer_impl == "te" and not hasattr(model, "backend")
    assert [r.getMessage() for r in caplog.records] == [
        "model.backend is deprecated and will be removed in the next release: use model.transformer_impl "
        "(this run: model.transformer_impl='te')"]
    assert typed(trainer_cfg(tmp_path / "run", tmp_path / "cache"), "model").transformer_impl == "local"
    saved = dataclasses.asdict(model)  # a checkpoint's model config from before the rename
    saved["backend"] = saved.pop("transformer_impl")
    assert ModelConfig.from_dict(saved) == model


def _profile(**values):
    from phi4.settings import Profile

    return Profile(**{"kind": "torch", "first_step": 2, "last_step": 3, **values})


def _names(trace_file) -> set:
    return {event.get("name") for event in json.loads(trace_file.read_text())["traceEvents"]}


def test_the_profiler_traces_its_window_of_steps_on_its_ranks(tmp_path):
    import torch

    from phi4.train.profiling import StepProfiler

    lines = []
    here = StepProfiler(_profile(), rank=0, run_dir=tmp_path, on_cuda=False, log_info=lines.append)
    elsewhere = StepProfiler(_profile(), rank=1, run_dir=tmp_path, on_cuda=False)
    for step in range(1, 6):
        for profiler in (here, elsewhere):
            profiler.step_started(step)
        torch.mm(torch.ones(8, 8), torch.ones(8, 8))
        for profiler in (here, elsewhere):
            profiler.step_ended(step)
    (trace,) = (tmp_path / "profile").iterdir()  # rank 1 is not in profile.ranks=[0]
    assert trace.name == "rank00000_steps2-3.pt.trace.json"
    names = _names(trace)
    assert {"phi4 step 2", "phi4 step 3", "aten::mm"} <= names and not {"phi4 step 1", "phi4 step 4"} & names
    assert lines == ["profile: recording from step 2 to step 3 (torch)", f"profile: steps 2-3 traced to {trace}"]


def test_a_run_stopped_or_resumed_inside_the_window_writes_what_it_recorded(tmp_path):
    import torch

    from phi4.train.profiling import StepProfiler

    profiler = StepProfiler(_profile(first_step=2, last_step=6, ranks=[]), rank=3, run_dir=tmp_path, on_cuda=False,
                            log_info=lambda line: None)
    for step in (4, 5):  # resumed at step 3: recording starts with step 4
        profiler.step_started(step)
        torch.mm(torch.ones(4, 4), torch.ones(4, 4))
        profiler.step_ended(step)
    profiler.close()  # stopped after step 5
    (trace,) = (tmp_path / "profile").iterdir()
    assert trace.name == "rank00003_steps4-stop.pt.trace.json"
    assert {"phi4 step 4", "phi4 step 5"} <= _names(trace)


@pytest.mark.parametrize("values, device, message", [
    (dict(kind="perf"), "cpu", "profile.kind='perf'; valid: none, torch, nsys"),
    (dict(first_step=5, last_step=4), "cpu", "profile.last_step=4 is before profile.first_step=5"),
    (dict(kind="nsys"), "cpu", "profile.kind=nsys needs CUDA (a CUDA profiler capture range); valid here: torch or none"),
    (dict(kind="none", memory_snapshot_on_oom=True), "cpu", "profile.memory_snapshot_on_oom=true needs CUDA"),
])
def test_profile_settings_that_cannot_work_are_refused_by_name(values, device, message):
    from phi4.errors import ConfigError
    from phi4.train.profiling import check_profile

    with pytest.raises(ConfigError) as err:
        check_profile(_profile(**values), device)
    assert str(err.value).startswith(message) and "\n" not in str(err.value)
    check_profile(_profile(kind="nsys", memory_snapshot_on_oom=True), "cuda")  # fine on a GPU


def test_tracking_settings_and_mlflow_parameters():
    from phi4.errors import ConfigError
    from phi4.settings import Tracking
    from phi4.train.tracking import check_tracking, flat_params

    with pytest.raises(ConfigError, match=r"^tracking.wandb_mode='cloud'; valid: online, offline, disabled, or null$"):
        check_tracking(Tracking(wandb=True, wandb_mode="cloud"))
    check_tracking(Tracking(wandb=True, mlflow=True, wandb_mode="offline"))  # both installed by the test extra
    assert flat_params({"train": {"steps": 4, "lr": None}, "seed": 1, "data": {"sources": [{"name": "a"}]}}) == \
        {"train.steps": "4", "train.lr": "None", "seed": "1", "data.sources": "[{'name': 'a'}]"}
