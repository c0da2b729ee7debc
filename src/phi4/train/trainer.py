"""The Trainer: a run's named parts, built from its typed settings, and the loop over them.

    with Trainer(cfg, callbacks) as trainer:
        code = trainer.train()

Everything is checked before any process group exists (settings, topology, data format,
objective, callbacks, the checkpoints it reads). Then the parts are built, each from its own
settings group: model chunks and DDP (model, topology, precision), optimizer and scheduler
(optim), batches and collate (data, through its format), the objective (train.objective), metrics,
the checkpointer (checkpoint) and the stop policy (train). A run resumes from
`run_dir/checkpoints/latest` when there is one (its TrainState and each part's state), else
starts from `checkpoint.load` (weights of a previous stage) or from scratch. `close()` runs on
every path: pending saves, metrics, callbacks, the process group, and a start that failed before
its first step leaves the run directory as it found it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import torch
from megatron.core import parallel_state
from megatron.core.num_microbatches_calculator import (
    init_num_microbatches_calculator,
    unset_num_microbatches_calculator,
)
from omegaconf import DictConfig, OmegaConf

from phi4.checkpoint.pointers import latest_checkpoint, resolve_checkpoint
from phi4.checkpoint.run import RunCheckpointer
from phi4.checkpoint.weights import MODEL_CONFIG_KEY, load_model_weights, weights_fingerprint
from phi4.data.blend import GlobalBatches
from phi4.data.formats import Collate, build_train_valid, data_format, prepare_sources
from phi4.errors import ConfigError
from phi4.model.build import build_phi4_model, model_summary, transformer_config
from phi4.model.config import ModelConfig, PrecisionConfig, TopologyConfig
from phi4.model.flops import flops_per_token
from phi4.model.parallel import check_on_device
from phi4.model.tp_overlap import destroy_userbuffers, initialize_userbuffers
from phi4.model.validate import check_run, check_sequence_length, thd_sequence_multiple
from phi4.runtime import device
from phi4.runtime.distributed import init_distributed, placement, shutdown
from phi4.runtime.launch_env import read_launch_env
from phi4.runtime.run_dir import RunDirectory
from phi4.runtime.watchdog import Watchdog, nccl_flight_recorder
from phi4.settings import Fault, data_settings
from phi4.train import (
    lm,  # noqa: F401  registers the default objective, language modelling
    spikes,
)
from phi4.train.callbacks import Callback
from phi4.train.checks import check_numbers, check_resume, check_start_points, check_training, total_steps
from phi4.train.faults import Faults
from phi4.train.metrics import MetricsWriter, StepLog
from phi4.train.objective import objective_for
from phi4.train.optimizer import build_optimizer, build_scheduler, schedule, wrap_ddp
from phi4.train.stop import EXIT_RESUMABLE, StopPolicy, TrainingStopped
from phi4.train.stragglers import StepTimes

log = logging.getLogger("phi4.train")


def model_settings(cfg: DictConfig) -> tuple[ModelConfig, TopologyConfig, PrecisionConfig]:
    def plain(node):
        return OmegaConf.to_container(node, resolve=True)

    return (ModelConfig.from_dict(plain(cfg.model)), TopologyConfig.from_dict(plain(cfg.topology)),
            PrecisionConfig.from_dict(plain(cfg.precision)))


@dataclass
class TrainState:
    """What the run itself has done: saved in every checkpoint beside the parts' own states."""

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
    """The parts of a run, by name: settings (`settings` = train, `optim`, `checkpointing`, `data`, `model`,
    `topology`, `precision`), `device`, `chunks`/`ddp`, `optimizer`, `scheduler`, `objective`,
    `data_format`/`batches`/`collate`/`valid_dataset`, `metrics`, `checkpointer`, `stop`,
    `callbacks`, and the run's `state`."""

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

    def close(self, kind=None, err=None, tb=None) -> None:
        """Pending saves, metrics, callbacks, the process group, the run directory (LIFO)."""
        if getattr(self, "watchdog", None) is not None:  # finishing a background save may take a while
            self.watchdog.arm("closing", self.hang_allowances.get("save"))
        self._closing.__exit__(kind, err, tb)

    def _check(self) -> None:
        """Everything that can be refused before a process group exists, in the order a user fixes it."""
        cfg = self.cfg
        check_numbers(cfg)
        self.settings = OmegaConf.to_object(cfg.train)
        self.optim, self.checkpointing = OmegaConf.to_object(cfg.optim), OmegaConf.to_object(cfg.checkpoint)
        self.fault = OmegaConf.to_object(cfg.fault) if cfg.get("fault") is not None else Fault()
        self.model, self.topology, self.precision = model_settings(cfg)
        self.launch = read_launch_env()
        if self.topology.world_size and self.topology.world_size != self.launch.world_size:
            raise ConfigError(f"topology.nodes x topology.gpus_per_node = {self.topology.world_size}, but "
                              f"{self.launch.world_size} processes were started")
        check_run(self.model, self.topology, self.precision, self.launch.world_size)
        check_sequence_length(self.settings.seq_length, self.topology)
        # packed rows on te under context parallelism: each conversation padded to this, then cut in 2 x cp
        self.thd_multiple = thd_sequence_multiple(self.topology) if self.model.backend == "te" else 1
        self.dp = self.topology.data_parallel_size(self.launch.world_size)
        self.steps = total_steps(self.settings)
        self.run_dir = Path(cfg.run_dir)
        self.data_format = data_format(cfg.data)
        self.data = data_settings(cfg.data)
        check_training(self.settings, self.optim, self.data.split, self.run_dir, self.dp, self.steps, self.model)
        self.objective = objective_for(self)
        for callback in self.callbacks:
            callback.check(self)
        self.resume = latest_checkpoint(self.run_dir)
        self.schedule_changes = check_resume(self.run_dir, self.model, self.settings, self.checkpointing, self.resume,
                                             self.optim, self.steps) if self.resume is not None else []
        load = self.checkpointing.load
        check_start_points(([("checkpoint.load", load)] if load and self.resume is None else [])
                           + self.objective.start_points())

    def _build(self) -> None:
        cfg, t = self.cfg, self.settings
        # what the start writes (config.yaml, tensorboard/) is removed again if it fails before a step
        self.run_files = self._closing.enter_context(RunDirectory(self.run_dir, self.launch.rank))
        self.watchdog = self._start_watchdog()
        self.faults = Faults(self.fault, self.launch.rank, self.model.vocab_size)
        self.device = device.select(self.launch.local_rank)
        check_on_device(self.model, self.topology, self.precision, self.device)
        # the process group's own timeout (NCCL's watchdog) is the backstop behind ours: 2 minutes
        # past the longest allowance (seconds already), so that ours writes the stacks first
        init_distributed(self.topology, seed=cfg.seed, launch=self.launch,
                         timeout_s=max(600.0, max(self.hang_allowances.values(), default=0) + 120))
        self._closing.callback(shutdown)
        where = placement()
        self.stop = StopPolicy(t)
        rank = torch.distributed.get_rank()
        self.run_files.write("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        sources = prepare_sources(self.data, self.data_format, t.seq_length, rank, self.model.vocab_size,
                                  self.thd_multiple, f"topology.cp={self.topology.cp} (tp={self.topology.tp}, "
                                  f"sp={str(self.topology.sp).lower()})")

        self.config = transformer_config(self.model, self.topology, self.precision)
        if self.config.tp_comm_overlap:  # before the model: TE's linears bind to the userbuffers
            rows = t.micro_batch_size * self.objective.rows_per_sample
            initialize_userbuffers(t.seq_length * rows // self.topology.cp, self.model.hidden_size, self.topology.tp,
                                   self.precision.fp8)
            self._closing.callback(destroy_userbuffers)
        self.chunks = build_phi4_model(self.model, self.topology, self.precision, config=self.config)
        self.ddp = wrap_ddp(self.chunks, self.config, t.overlap_grad_reduce, t.overlap_param_gather,
                            t.grad_reduce_in_fp32)
        self.optimizer = build_optimizer(self.ddp, self.config, self.optim)
        self.step_times = StepTimes(t.straggler_factor, t.straggler_windows)
        self.step_times.watch(self.config)
        self.scheduler = build_scheduler(self.optimizer, self.optim, self.steps)
        init_num_microbatches_calculator(rank, None, t.global_batch_size, t.micro_batch_size, self.dp)
        self._closing.callback(unset_num_microbatches_calculator)  # another run may follow in this process
        self.objective.build(self)

        self.is_logger = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0 \
            and parallel_state.get_data_parallel_rank() == 0
        self.metrics = MetricsWriter(self.run_dir, self.is_logger, t.tensorboard)
        self._closing.callback(self.metrics.close)
        self.checkpointer = RunCheckpointer(self.run_dir, self.checkpointing.keep, self.checkpointing.async_save)
        self._closing.push(self._end_saves)
        self.layout = dict(tp=self.topology.tp, pp=self.topology.pp, vp=self.topology.vp, cp=self.topology.cp,
                           dp=self.dp)
        self.state = TrainState()
        self._restore()
        if t.spike_sigmas is not None:
            self.objective.gate = spikes.SpikeGuard(t.spike_sigmas, t.spike_window, self.state)
        self.log_info(model_summary(self.model, self.topology, self.chunks,
                                f"dp={self.dp} | {self.steps} steps | run dir {self.run_dir.resolve()}"))
        self.log_info(f"placement: {where}")
        if self.config.tp_comm_overlap:
            self.log_info("TP communication overlap: on (TE userbuffers; topology.tp_comm_overlap=false turns it off)")

        train_ds, self.valid_dataset = build_train_valid(self.data, self.data_format, sources, t.seq_length,
                                                         self.steps * t.global_batch_size, max(t.eval_samples, 1),
                                                         cfg.seed)
        self.collate = Collate(self.data_format, t.micro_batch_size, "thd" if self.model.backend == "te" else "mask",
                               self.thd_multiple)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.batches = GlobalBatches(train_ds, t.global_batch_size, self.dp_rank, self.dp, self.state.consumed_samples)
        for callback in self.callbacks:
            callback.setup(self)
            self._closing.callback(callback.close)

    def _start_watchdog(self) -> Watchdog:
        """Armed for the start-up now, then for each step (train.hang_*_minutes); off when
        train.hang_timeout_minutes is null."""
        t = self.settings
        on = t.hang_timeout_minutes is not None
        self.hang_allowances = dict(step=60 * t.hang_timeout_minutes, start=60 * t.hang_startup_minutes,
                                    save=60 * t.hang_save_minutes) if on else {}
        dog = Watchdog(self.run_dir / "hangs", self.launch.rank)
        self._closing.callback(dog.close)
        dog.arm("start-up", self.hang_allowances.get("start"))
        if on:
            nccl_flight_recorder(self.run_dir / "hangs")
        return dog

    def _restore(self) -> None:
        if self.resume is not None:
            saved = self.checkpointer.load(self.resume, self.ddp, self.optimizer, self.scheduler, self.layout)
            self.state.load_state_dict(saved)
            self.log_info(f"resumed from {self.resume} at step {self.state.step} ({self.state.consumed_samples} samples "
                      f"consumed; saved at {saved['layout']})")
            for change in self.schedule_changes:
                self.log_info(f"optim.override_scheduler=true: the schedule changes from step {self.state.step}: {change}")
        elif self.checkpointing.load:
            load_model_weights(self.ddp, self.checkpointing.load)
            # What was loaded, as the checkpoint chain's evidence: the stage before saved the same
            # fingerprint with its final weights.
            self.state.initialized_from = dict(path=str(resolve_checkpoint(self.checkpointing.load).resolve()),
                                               weights_fingerprint=weights_fingerprint(self.ddp))
            self.log_info(f"initialized from {self.checkpointing.load} (weights only)")

    def log_info(self, line: str) -> None:
        if self.is_logger:
            log.info(line)

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
        t, state, steps = self.settings, self.state, self.steps
        if state.step >= steps:
            named = self.checkpointer.name_final(self.resume)  # a run stopped between its last pointers
            self.log_info(f"nothing to do: {self.resume} is at step {state.step} of {steps}"
                          f"{'; checkpoints/final now names it' if named else ''}")
            return 0
        tokens, flops = self.objective.throughput(t.global_batch_size * t.seq_length,
                                                  flops_per_token(self.model, t.seq_length))
        step_log = StepLog(self.metrics, steps, tokens, flops, self.launch.world_size,
                           self.device.peak_tflops(t.peak_tflops))
        while state.step < steps:
            result = self.step()
            if result.get("rewound"):  # back at a checkpoint's step (train.spike_action=rewind)
                continue
            step_log.window_steps += 1
            if state.step % t.log_every == 0 or state.step == steps:
                step_log.write(state.step, result, self.optimizer.param_groups[0]["lr"], state.skipped_steps,
                               self.objective.describe, self.step_times.report(state.step))
            with self.watchdog.allow(f"the callbacks after step {state.step}", self.hang_allowances.get("save")):
                for callback in self.callbacks:
                    callback.after_step(self, state.step)
            if self.checkpointing.every and state.step % self.checkpointing.every == 0 and state.step < steps:
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

    def step(self) -> dict:
        """One global batch: the objective's step, the schedule, the non-finite count."""
        self.step_times.step_started()
        self.faults.inside_step(self.state.step + 1)
        first = self.batches.consumed
        micro_batches = self.collate(self.batches.next())
        self.faults.corrupt(first, self.batches.consumed, micro_batches)
        result = self.objective.train_step(self.ddp, self.optimizer, micro_batches)
        self.step_times.step_ended()
        self.state.step += 1
        self.watchdog.arm(f"step {self.state.step + 1}", self.hang_allowances.get("step"))
        self.state.consumed_samples = self.batches.consumed
        self.run_files.keep()  # a step has run: from here on a failure leaves the run for its resume
        if result["update_successful"]:
            self.scheduler.step(increment=1)
        else:
            self.state.skipped_steps += 1
        self.stop.after_update(self.state.step, result, self.checkpointer.newest, self.is_logger)
        if result.get("spike"):
            result["rewound"] = spikes.respond(self, result, first)
        self.checkpointer.poll()
        return result

    def save(self, final: bool = False, wait: bool = False) -> Path:
        """A checkpoint of the run at this step (collective): the parts' states and the TrainState."""
        if self.settings.overlap_param_gather:
            # Each data-parallel rank has updated only its own shard of the weights; the others
            # arrive with the next forward's all-gather. Gather them now, or the checkpoint (and its
            # fingerprint) holds partly last step's weights: Megatron-LM's training.py calls
            # force_param_sync(model) in save_checkpoint_and_time for the same reason.
            for chunk in self.ddp:
                chunk.start_param_sync(force_sync=True)
        extra = dict(self.state.state_dict(), layout=self.layout, config_yaml=OmegaConf.to_yaml(self.cfg, resolve=True),
                     weights_fingerprint=weights_fingerprint(self.ddp), schedule=schedule(self.optim, self.steps))
        extra[MODEL_CONFIG_KEY] = dataclasses.asdict(self.model)
        started = time.perf_counter()
        with self.watchdog.allow(f"the save at step {self.state.step}", self.hang_allowances.get("save")):
            directory = self.checkpointer.save(self.state.step, self.ddp, self.optimizer, self.scheduler, extra, final)
            if wait:
                self.checkpointer.wait()
        seconds = time.perf_counter() - started  # what the save stopped training for: phi4-plan's save interval
        background = self.checkpointing.async_save and not wait
        self.metrics.write(dict(step=self.state.step, checkpoint_save_s=seconds),
                           f"step {self.state.step:>6}/{self.steps} | saved {directory.name}: training stopped "
                           f"{seconds:.2f} s{' (written on in the background)' if background else ''}")
        return directory
