"""The Trainer: a run's named parts, built from its typed settings, and the loop over them.

    with Trainer(cfg, callbacks) as trainer:
        code = trainer.train()

Everything is checked before any process group exists (settings, topology, data format,
objective, callbacks, the checkpoints it reads): the result is the run's `RunSpec`, which the
plug-ins check against. Then the parts are built, each from its own settings group: model chunks
and DDP (model, topology, precision), optimizer and scheduler (optim), batches and collate (data,
through its format), the objective (train.objective), metrics, the checkpointer and its `states`
(checkpoint), and the stop policy (train); callbacks get the built parts as `RunParts`. A run
resumes from `run_dir/checkpoints/latest` when there is one (every part of the states dict), else
starts from `checkpoint.load` (weights of a previous stage) or from scratch. `close()` runs on every
path: pending saves, metrics, callbacks, the process group, and a start that failed before its first
step leaves the run directory as it found it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import (
    init_num_microbatches_calculator,
    unset_num_microbatches_calculator,
)
from megatron.core.optimizer import MegatronOptimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler
from megatron.core.transformer import TransformerConfig
from omegaconf import DictConfig, OmegaConf

from phi4.checkpoint.pointers import latest_checkpoint, resolve_checkpoint
from phi4.checkpoint.run import RunCheckpointer, run_states
from phi4.checkpoint.weights import MODEL_CONFIG_KEY, load_model_weights, weights_fingerprint
from phi4.data.blend import GlobalBatches
from phi4.data.formats import Collate, data_format, prepare_sources, run_datasets
from phi4.data.registry import DataFormat
from phi4.errors import ConfigError
from phi4.model.build import build_phi4_model, model_summary, transformer_config
from phi4.model.flops import flops_per_token
from phi4.model.parallel import check_on_device
from phi4.model.tp_overlap import destroy_userbuffers, initialize_userbuffers
from phi4.model.validate import check_run, check_sequence_length, thd_sequence_multiple
from phi4.runtime import device
from phi4.runtime.distributed import init_distributed, placement, shutdown
from phi4.runtime.launch_env import LaunchEnv, read_launch_env
from phi4.runtime.run_dir import RunDirectory
from phi4.runtime.watchdog import Watchdog, nccl_flight_recorder
from phi4.settings import RunSettings
from phi4.train import (
    lm,  # noqa: F401  registers the default objective, language modelling
    spikes,
)
from phi4.train.callbacks import Callback
from phi4.train.spikes import Rewound
from phi4.train.checks import check_numbers, check_resume, check_start_points, check_training, total_steps
from phi4.train.faults import Faults
from phi4.train.metrics import MetricsWriter, StepLog
from phi4.train.objective import Objective, objective_for
from phi4.train.parts import RunParts, RunSpec
from phi4.train.optimizer import build_optimizer, build_scheduler, schedule, wrap_ddp
from phi4.train.profiling import StepProfiler, check_profile
from phi4.train.tracking import TrackerRuns, check_tracking, default_run_name
from phi4.train.stop import EXIT_RESUMABLE, StopPolicy, TrainingStopped
from phi4.train.stragglers import StepTimes
from phi4.train.update import StepResult

log = logging.getLogger("phi4.train")


@dataclass
class TrainState:
    """What the run itself has done: the `train_state` part of every checkpoint."""

    step: int = 0
    consumed_samples: int = 0
    skipped_steps: int = 0
    initialized_from: Optional[dict] = None  # the checkpoint a stage started from, and its weights' fingerprint
    recent_losses: list = dataclasses.field(default_factory=list)  # the spike window (phi4.train.spikes)
    skipped_windows: list = dataclasses.field(default_factory=list)  # [first, end) samples skipped for spikes

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, saved: dict) -> None:
        self.step, self.consumed_samples = saved["step"], saved["consumed_samples"]
        self.skipped_steps, self.initialized_from = saved["skipped_steps"], saved.get("initialized_from")
        self.recent_losses = list(saved.get("recent_losses") or [])
        self.skipped_windows = [list(w) for w in saved.get("skipped_windows") or []]


class Trainer:
    """A run's parts, by name. Before any process group (`_check`): `cfg`, `settings`, `launch`,
    `spec`, `objective`, `callbacks`, `resume_from`. Built (`_build`): the rest below."""

    cfg: DictConfig  # the composed Hydra config (saved in each checkpoint; plug-ins read their groups from it)
    settings: RunSettings  # every group the run reads, typed
    launch: LaunchEnv
    spec: RunSpec  # what plug-ins check against
    objective: Objective
    callbacks: list[Callback]
    resume_from: Optional[Path]  # run_dir/checkpoints/latest, when there is one
    schedule_changes: list[str]  # what optim.override_scheduler changes on resume
    thd_multiple: int  # packed rows on te under context parallelism are padded to this

    run_files: RunDirectory
    watchdog: Watchdog
    hang_allowances_s: dict[str, float]  # seconds: "start", "step", "save"; empty without a watchdog
    faults: Faults
    device: device.Device
    stop: StopPolicy
    transformer_config: TransformerConfig
    model_chunks: list  # DDP-wrapped, one per virtual pipeline stage
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    step_times: StepTimes
    is_logger: bool
    metrics: MetricsWriter
    state: TrainState
    checkpointer: RunCheckpointer  # owns the states dict: model, optimizer, scheduler, train_state
    layout: dict[str, Optional[int]]  # tp, pp, vp, cp, dp
    spike_guard: Optional[spikes.SpikeGuard]
    profiler: StepProfiler  # profile.*: a window of steps traced, the memory history on OOM
    trackers: TrackerRuns  # tracking.*: W&B and MLflow runs (their ids a part of the states dict)
    valid_dataset: object
    valid_by_source: dict  # train.valid_per_source with several sources: each one's validation split
    collate: Collate
    dp_rank: int
    batches: GlobalBatches
    parts: RunParts  # what callbacks were given

    def __init__(self, cfg: DictConfig, callbacks: Sequence[Callback] = ()):
        self.cfg, self.callbacks = cfg, list(callbacks)
        self._check()
        self._closing = ExitStack()
        try:
            self._build()
        except BaseException as err:
            self.close(type(err), err, err.__traceback__)
            raise

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, kind, err, tb) -> bool:
        self.close(kind, err, tb)
        return False

    @property
    def total_steps(self) -> int:
        return self.spec.total_steps

    @property
    def run_dir(self) -> Path:
        return self.settings.run_dir

    def close(self, kind=None, err=None, tb=None) -> None:
        """Pending saves, metrics, callbacks, the process group, the run directory (LIFO)."""
        if getattr(self, "watchdog", None) is not None:  # finishing a background save may take a while
            self.watchdog.arm("closing", self.hang_allowances_s.get("save"))
        self._closing.__exit__(kind, err, tb)

    def _check(self) -> None:
        """Everything that can be refused before a process group exists, in the order a user fixes it."""
        cfg = self.cfg
        check_numbers(cfg)
        fmt: DataFormat = data_format(cfg.data)  # its own checks, on the group before it is typed
        self.settings = run = RunSettings.from_config(cfg)
        self.launch = read_launch_env()
        if run.topology.world_size and run.topology.world_size != self.launch.world_size:
            raise ConfigError(f"topology.nodes x topology.gpus_per_node = {run.topology.world_size}, but "
                              f"{self.launch.world_size} processes were started")
        check_run(run.model, run.topology, run.precision, self.launch.world_size)
        check_sequence_length(run.train.seq_length, run.topology)
        self.thd_multiple = thd_sequence_multiple(run.topology) if run.model.transformer_impl == "te" else 1
        dp_size = run.topology.data_parallel_size(self.launch.world_size)
        steps = total_steps(run.train)
        check_training(run.train, run.optim, run.data.split, run.run_dir, dp_size, steps, run.model)
        check_profile(run.profile, device.kind())
        check_tracking(run.tracking)
        self.spec = RunSpec(cfg, run, steps, dp_size, fmt)
        self.objective = objective_for(self.spec)
        for callback in self.callbacks:
            callback.check(self.spec)
        self.resume_from = latest_checkpoint(run.run_dir)
        self.schedule_changes = check_resume(run.run_dir, run.model, run.train, run.checkpoint, self.resume_from,
                                             run.optim, steps) if self.resume_from is not None else []
        load = run.checkpoint.load
        check_start_points(([("checkpoint.load", load)] if load and self.resume_from is None else [])
                           + self.objective.start_points())

    def _build(self) -> None:
        cfg, run, t = self.cfg, self.settings, self.settings.train
        # what the start writes (config.yaml, tensorboard/) is removed again if it fails before a step
        self.run_files = self._closing.enter_context(RunDirectory(run.run_dir, self.launch.rank))
        self.watchdog = self._start_watchdog()
        self.faults = Faults(run.fault, self.launch.rank, run.model.vocab_size)
        self.device = device.select(self.launch.local_rank)
        check_on_device(run.model, run.topology, run.precision, self.device)
        # the process group's own timeout (NCCL's watchdog) is the backstop behind ours: 2 minutes
        # past the longest allowance, so that ours writes the stacks first
        init_distributed(run.topology, seed=run.seed, launch=self.launch,
                         timeout_s=max(600.0, max(self.hang_allowances_s.values(), default=0) + 120))
        self._closing.callback(shutdown)
        where = placement()
        self.stop = StopPolicy(t)
        rank = torch.distributed.get_rank()
        self.run_files.write("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        self.profiler = StepProfiler(run.profile, rank, run.run_dir, self.device.is_cuda)
        self._closing.callback(self.profiler.close)
        topology = run.topology
        sources = prepare_sources(run.data, self.spec.data_format, t.seq_length, rank, run.model.vocab_size,
                                  self.thd_multiple, f"topology.cp={topology.cp} (tp={topology.tp}, "
                                  f"sp={str(topology.sp).lower()})")

        self.transformer_config = transformer_config(run.model, topology, run.precision)
        if self.transformer_config.tp_comm_overlap:  # before the model: TE's linears bind to the userbuffers
            rows = t.micro_batch_size * self.objective.rows_per_sample
            initialize_userbuffers(t.seq_length * rows // topology.cp, run.model.hidden_size, topology.tp,
                                   run.precision.fp8)
            self._closing.callback(destroy_userbuffers)
        chunks = build_phi4_model(run.model, topology, run.precision, config=self.transformer_config)
        self.model_chunks = wrap_ddp(chunks, self.transformer_config, t.overlap_grad_reduce, t.overlap_param_gather,
                                     t.grad_reduce_in_fp32)
        self.optimizer = build_optimizer(self.model_chunks, self.transformer_config, run.optim)
        self.step_times = StepTimes(t.straggler_factor, t.straggler_windows)
        self.step_times.watch(self.transformer_config)
        self.scheduler = build_scheduler(self.optimizer, run.optim, self.total_steps)
        init_num_microbatches_calculator(rank, None, t.global_batch_size, t.micro_batch_size, self.spec.dp_size)
        self._closing.callback(unset_num_microbatches_calculator)  # another run may follow in this process
        self.objective.build(self.spec, self.transformer_config)

        self.is_logger = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0 \
            and parallel_state.get_data_parallel_rank() == 0
        self.trackers = TrackerRuns(run.tracking, run.run_dir, default_run_name(cfg.stage.name, run.run_dir))
        self.metrics = MetricsWriter(run.run_dir, self.is_logger, t.tensorboard, self.trackers)
        self._closing.callback(self.metrics.close)
        self.state = TrainState()
        self.layout = dict(tp=topology.tp, pp=topology.pp, vp=topology.vp, cp=topology.cp, dp=self.spec.dp_size)
        self.checkpointer = RunCheckpointer(
            run.run_dir, run.checkpoint.keep, run.checkpoint.async_save,
            {**run_states(self.model_chunks, self.optimizer, self.scheduler, self.state), "tracking": self.trackers},
            self._description, self.layout)
        self._closing.push(self._end_saves)
        self._restore()
        # after the restore: a resumed run continues its tracker runs (their ids came with the checkpoint)
        self.trackers.start(self.is_logger, OmegaConf.to_container(cfg, resolve=True), self.log_info)
        self._closing.push(self._end_trackers)
        self.spike_guard = spikes.SpikeGuard(t.spike_sigmas, t.spike_window, self.state) \
            if t.spike_sigmas is not None else None
        self.log_info(model_summary(run.model, topology, chunks,
                                    f"dp={self.spec.dp_size} | {self.total_steps} steps | run dir "
                                    f"{run.run_dir.resolve()}"))
        self.log_info(f"placement: {where}")
        if self.transformer_config.tp_comm_overlap:
            self.log_info("TP communication overlap: on (TE userbuffers; topology.tp_comm_overlap=false turns it off)")

        datasets = run_datasets(run.data, self.spec.data_format, sources, t, self.total_steps, run.seed)
        train_ds, self.valid_dataset, self.valid_by_source = datasets.train, datasets.valid, datasets.valid_by_source
        if datasets.indices:
            self.log_info(datasets.indices)
        self.collate = Collate(self.spec.data_format, t.micro_batch_size,
                               "thd" if run.model.transformer_impl == "te" else "mask", self.thd_multiple)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.batches = GlobalBatches(train_ds, t.global_batch_size, self.dp_rank, self.spec.dp_size,
                                     self.state.consumed_samples)
        self.parts = RunParts(self.spec, self.model_chunks, self.objective, self.collate, self.valid_dataset,
                              self.valid_by_source, self.dp_rank, self.metrics, self.is_logger)
        for callback in self.callbacks:
            callback.setup(self.parts)
            self._closing.callback(callback.close)

    def _start_watchdog(self) -> Watchdog:
        """Armed for the start-up now, then for each step (train.hang_*_minutes); off when
        train.hang_timeout_minutes is null."""
        t = self.settings.train
        on = t.hang_timeout_minutes is not None
        self.hang_allowances_s = dict(step=60 * t.hang_timeout_minutes, start=60 * t.hang_startup_minutes,
                                      save=60 * t.hang_save_minutes) if on else {}
        dog = Watchdog(self.run_dir / "hangs", self.launch.rank)
        self._closing.callback(dog.close)
        dog.arm("start-up", self.hang_allowances_s.get("start"))
        if on:
            nccl_flight_recorder(self.run_dir / "hangs")
        return dog

    def _description(self) -> dict:
        """The plain values saved beside the parts' states (read by checks and tools, restored by
        nothing): the layout, the resolved config, the weights' fingerprint, the schedule, the model."""
        description = dict(layout=self.layout, config_yaml=OmegaConf.to_yaml(self.cfg, resolve=True),
                           weights_fingerprint=weights_fingerprint(self.model_chunks),
                           schedule=schedule(self.settings.optim, self.total_steps))
        description[MODEL_CONFIG_KEY] = dataclasses.asdict(self.settings.model)
        return description

    def _restore(self) -> None:
        load = self.settings.checkpoint.load
        if self.resume_from is not None:
            saved = self.checkpointer.load(self.resume_from)
            self.log_info(f"resumed from {self.resume_from} at step {self.state.step} ({self.state.consumed_samples} "
                          f"samples consumed; saved at {saved['layout']})")
            for change in self.schedule_changes:
                self.log_info(f"optim.override_scheduler=true: the schedule changes from step {self.state.step}: {change}")
        elif load:
            load_model_weights(self.model_chunks, load)
            # What was loaded, as the checkpoint chain's evidence: the stage before saved the same
            # fingerprint with its final weights.
            self.state.initialized_from = dict(path=str(resolve_checkpoint(load).resolve()),
                                               weights_fingerprint=weights_fingerprint(self.model_chunks))
            self.log_info(f"initialized from {load} (weights only)")

    def log_info(self, line: str) -> None:
        if self.is_logger:
            log.info(line)

    def _end_trackers(self, kind, err, tb) -> bool:
        """The tracker runs end as finished, or as failed when the run failed (a resumable stop is
        a return, not a failure)."""
        self.trackers.close(failed=kind is not None)
        return False

    def _end_saves(self, kind, err, tb) -> bool:
        """A background save still running is finished, unless the run failed on one rank alone:
        then the other ranks may never reach the save's barrier, so the save is abandoned and the
        unpublished checkpoint is simply not one (`latest` still names the one before).
        TrainingStopped stops every rank."""
        if kind is None or issubclass(kind, TrainingStopped):
            self.checkpointer.wait()
        else:
            self.checkpointer.abandon()
        return False

    def train(self) -> int:
        """Step until `train.steps`, or a stop (EXIT_RESUMABLE); returns the exit code."""
        t, state, steps = self.settings.train, self.state, self.total_steps
        if state.step >= steps:
            named = self.checkpointer.name_final(self.resume_from)  # a run stopped between its last pointers
            self.log_info(f"nothing to do: {self.resume_from} is at step {state.step} of {steps}"
                          f"{'; checkpoints/final now names it' if named else ''}")
            return 0
        tokens, flops = self.objective.throughput(t.global_batch_size * t.seq_length,
                                                  flops_per_token(self.settings.model, t.seq_length))
        step_log = StepLog(self.metrics, steps, tokens, flops, self.launch.world_size,
                           self.device.peak_tflops(t.peak_tflops))
        with self.profiler.snapshot_on_oom():  # profile.memory_snapshot_on_oom: the history first
            while state.step < steps:
                result = self.step()
                if isinstance(result, Rewound):  # back at a checkpoint's step (train.spike_action=rewind)
                    continue
                step_log.window_steps += 1
                if state.step % t.log_every == 0 or state.step == steps:
                    step_log.write(state.step, result, self.optimizer.param_groups[0]["lr"], state.skipped_steps,
                                   self.objective.describe, self.step_times.report(state.step), state.consumed_samples)
                with self.watchdog.allow(f"the callbacks after step {state.step}", self.hang_allowances_s.get("save")):
                    for callback in self.callbacks:
                        callback.after_step(state.step)
                every = self.settings.checkpoint.every
                if every and state.step % every == 0 and state.step < steps:
                    self.save()
                reason = self.stop.reason(state.step, steps)
                if reason:
                    directory = self.save(wait=True)
                    self.log_info(f"stopping at step {state.step} ({reason}); saved {directory}; exit {EXIT_RESUMABLE} "
                                  "to resume")
                    return EXIT_RESUMABLE
            directory = self.save(final=True, wait=True)
            self.log_info(f"done: {steps} steps, final checkpoint {directory}; run dir {self.run_dir.resolve()}")
            return 0

    def step(self) -> Union[StepResult, Rewound]:
        """One global batch: the objective's update, the schedule, the non-finite count; or, when a
        spike sends the run back to its last checkpoint (train.spike_action=rewind), the Rewound."""
        self.step_times.step_started()
        self.profiler.step_started(self.state.step + 1)
        self.faults.inside_step(self.state.step + 1)
        first = self.batches.consumed
        micro_batches = self.collate(self.batches.next())
        self.faults.corrupt(first, self.batches.consumed, micro_batches)
        result = self.objective.update(self.model_chunks, self.optimizer, micro_batches, self.spike_guard)
        self.step_times.step_ended()
        self.profiler.step_ended(self.state.step + 1)
        self.state.step += 1
        self.watchdog.arm(f"step {self.state.step + 1}", self.hang_allowances_s.get("step"))
        self.state.consumed_samples = self.batches.consumed
        self.run_files.keep()  # a step has run: from here on a failure leaves the run for its resume
        if result.update_successful:
            self.scheduler.step(increment=1)
        else:
            self.state.skipped_steps += 1
        self.stop.after_update(self.state.step, result, self.checkpointer.newest, self.is_logger)
        outcome: Union[StepResult, Rewound] = result
        if result.spike:
            rewound = spikes.respond(self.settings.train.spike_action, result.spike, self.state, first,
                                     self.batches.consumed, self.checkpointer, self.log_info)
            if rewound is not None:
                self.batches.consumed = rewound.resume_at
                outcome = rewound
        self.checkpointer.poll()
        return outcome

    def save(self, final: bool = False, wait: bool = False) -> Path:
        """A checkpoint of the run at this step (collective): every part of the states dict."""
        if self.settings.train.overlap_param_gather:
            # Each data-parallel rank has updated only its own shard of the weights; the others
            # arrive with the next forward's all-gather. Gather them now, or the checkpoint (and its
            # fingerprint) holds partly last step's weights: Megatron-LM's training.py calls
            # force_param_sync(model) in save_checkpoint_and_time for the same reason.
            for chunk in self.model_chunks:
                chunk.start_param_sync(force_sync=True)
        started = time.perf_counter()
        with self.watchdog.allow(f"the save at step {self.state.step}", self.hang_allowances_s.get("save")):
            directory = self.checkpointer.save(self.state.step, final)
            if wait:
                self.checkpointer.wait()
        seconds = time.perf_counter() - started  # what the save stopped training for: phi4-plan's save interval
        background = self.settings.checkpoint.async_save and not wait
        self.metrics.write(dict(step=self.state.step, checkpoint_save_s=seconds),
                           f"step {self.state.step:>6}/{self.total_steps} | saved {directory.name}: training stopped "
                           f"{seconds:.2f} s{' (written on in the background)' if background else ''}")
        return directory
