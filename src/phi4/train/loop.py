"""The training loop: settings -> model, optimizer, data -> steps, metrics, checkpoints.

A run lives in `run_dir`: it resumes from `run_dir/checkpoints/latest` when there is one, else
starts from `checkpoint.load` (weights of a previous stage) or from scratch. SIGTERM or SIGUSR1
(SLURM's warning before a time limit), or the wall-clock budget, saves a checkpoint and exits
with EXIT_RESUMABLE so the job can be requeued.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from phi4.errors import ConfigError
from phi4.model.config import ModelConfig, PrecisionConfig, TopologyConfig
from phi4.settings import check_ranges

log = logging.getLogger("phi4.train")

EXIT_RESUMABLE = 75  # stopped early with a checkpoint saved (signal, time budget): requeue to continue


class TrainingStopped(RuntimeError):
    """Too many non-finite steps in a row."""


def settings(cfg: DictConfig) -> tuple[ModelConfig, TopologyConfig, PrecisionConfig]:
    def plain(node):
        return OmegaConf.to_container(node, resolve=True)

    return (ModelConfig.from_dict(plain(cfg.model)), TopologyConfig.from_dict(plain(cfg.topology)),
            PrecisionConfig.from_dict(plain(cfg.precision)))


def total_steps(cfg: DictConfig) -> int:
    t = cfg.train
    if t.steps is not None:
        return int(t.steps)
    if t.token_budget is None:
        raise ConfigError("set train.steps, or train.token_budget to derive it")
    return math.ceil(float(t.token_budget) / (t.global_batch_size * t.seq_length))


def check_training(cfg: DictConfig, dp: int, steps: int, model: ModelConfig) -> None:
    """The loop's own settings, checked before any process group exists."""
    t, o = cfg.train, cfg.optim
    if not 0 <= o.warmup_steps < steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be at least 0 and less than train.steps={steps}")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{t.micro_batch_size} x {dp} data-parallel ranks = {t.micro_batch_size * dp}"
        )
    if o.decay_style not in ("linear", "cosine", "constant"):
        raise ConfigError(f"optim.decay_style={o.decay_style!r}; valid: linear, cosine, constant")
    if t.seq_length > model.max_position_embeddings:
        raise ConfigError(f"train.seq_length={t.seq_length} exceeds model.max_position_embeddings="
                          f"{model.max_position_embeddings}")
    check_split(str(cfg.data.get("split", "98,2,0")))
    run_dir = Path(cfg.run_dir)
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


def check_resume(cfg: DictConfig, model: ModelConfig, checkpoint: Path) -> None:
    """A run directory is resumed only with the model it was trained with, and with the batch
    shape it was trained with unless checkpoint.allow_new_batch_shape says so; checked before
    anything is written."""
    from phi4.train.checkpoint import MODEL_CONFIG_KEY, checkpoint_common_state

    common = checkpoint_common_state(checkpoint)
    saved = dict(common.get(MODEL_CONFIG_KEY) or {})
    now = dataclasses.asdict(model)
    differ = [f"model.{k} {saved[k]!r} -> {now.get(k)!r}" for k in sorted(saved)
              if k not in ("backend", "name") and saved[k] != now.get(k)]
    if differ:
        raise ConfigError(f"{cfg.run_dir} holds a run of another model ({'; '.join(differ)}), resumed from {checkpoint}; "
                          "valid: the same model settings, or another run_dir (checkpoint.load= starts from its weights)")
    train = (OmegaConf.create(common["config_yaml"]).get("train") or {}) if common.get("config_yaml") else {}
    changed = [f"train.{k} {train[k]} -> {cfg.train[k]}" for k in _BATCH_SHAPE if k in train and train[k] != cfg.train[k]]
    if changed and not cfg.checkpoint.get("allow_new_batch_shape", False):
        raise ConfigError(f"{cfg.run_dir} was trained with another batch shape ({'; '.join(changed)}); the data "
                          "order would change: set checkpoint.allow_new_batch_shape=true to resume with it anyway, "
                          "or keep the run's settings")


def check_numbers(cfg: DictConfig) -> None:
    """The loop's groups: each number within the range declared beside its field (phi4.settings),
    no key that is not a setting; and the seed. A typo is one line."""
    check_ranges(cfg, ("train", "optim", "checkpoint", "data", "dpo", "eval"))
    seed = cfg.get("seed")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed={seed!r}; valid: a whole number at least 0")


class StopRequest:
    """SIGTERM / SIGUSR1 set a flag (phi4.runtime.signals); the loop acts on it between steps, on
    every rank together."""

    def __init__(self):
        from phi4.runtime import signals

        signals.install()  # already done by the entry points; here for callers of train()
        self._signals = signals

    @property
    def signal(self):
        return self._signals.received()

    def agreed(self, local_reason: bool = False) -> bool:
        """True on every rank if any rank got a signal or has its own reason to stop (each rank
        keeps its own clock): stopping means a collective save, so all ranks must agree."""
        flag = torch.tensor([1.0 if self.signal or local_reason else 0.0])
        if torch.cuda.is_available():
            flag = flag.cuda()
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())


OBJECTIVES = {"lm": ("gpt", "packed_chat"), "dpo": ("preference",)}  # and the data formats each reads


def check_objective(cfg: DictConfig) -> str:
    from phi4.data.formats import data_format

    objective = cfg.train.get("objective", "lm")
    if objective not in OBJECTIVES:
        raise ConfigError(f"train.objective={objective!r}; valid: {', '.join(OBJECTIVES)}")
    fmt = data_format(cfg.data)
    if fmt == "preference" and OmegaConf.is_missing(cfg.data, "pairs"):
        raise ConfigError("data.pairs is not set: give the preference JSONL (PTS writes one: "
                          "<pts run_dir>/pairs.jsonl)")
    if fmt not in OBJECTIVES[objective]:
        raise ConfigError(f"train.objective={objective} reads data.format {' or '.join(OBJECTIVES[objective])}, "
                          f"not {fmt}")
    if objective == "dpo" and cfg.get("dpo") is None:
        raise ConfigError("train.objective=dpo needs the dpo settings (beta, reference): use stage=dpo")
    if objective == "dpo" and not (cfg.dpo.reference or cfg.checkpoint.load):
        raise ConfigError("train.objective=dpo needs a reference model: set dpo.reference or checkpoint.load "
                          "(the SFT checkpoint)")
    return objective


def build_objective(cfg: DictConfig, objective: str, model, topology, precision, config):
    """What a step optimizes: next-token loss, or DPO against a frozen reference model built in
    the policy's layout from `dpo.reference` (default: the checkpoint the policy starts from)."""
    from phi4.train.step import LanguageModeling

    if objective == "lm":
        return LanguageModeling()
    from phi4.model.build import build_phi4_model
    from phi4.posttrain.dpo import DirectPreference
    from phi4.train.checkpoint import load_model_weights

    reference = build_phi4_model(model, topology, precision, config=config)
    load_model_weights(reference, cfg.dpo.reference or cfg.checkpoint.load)
    return DirectPreference(reference, float(cfg.dpo.beta))


def check_start_points(cfg: DictConfig, resume, objective: str) -> None:
    """The checkpoints this run will read weights from exist and are whole, checked before any
    process group: checkpoint.load when not resuming, and DPO's reference (dpo.reference, else
    checkpoint.load) always."""
    from phi4.train.checkpoint import resolve_checkpoint

    used = []
    if cfg.checkpoint.load and resume is None:
        used.append(("checkpoint.load", cfg.checkpoint.load))
    if objective == "dpo":
        used.append(("dpo.reference", cfg.dpo.reference) if cfg.dpo.reference
                    else ("checkpoint.load", cfg.checkpoint.load))
    for setting, path in dict(used).items():
        resolve_checkpoint(path, setting)


def generative_eval_every(cfg: DictConfig, cp: int) -> int:
    """eval.every, its settings checked (0: no generative evaluation)."""
    ev = cfg.get("eval")
    if ev is None or not ev.every:
        return 0
    from phi4.eval.evaluator import check_eval

    check_eval(ev, cp, cfg.seed)
    return int(ev.every)


def train(cfg: DictConfig) -> int:
    """Run (or resume) the configured training; returns the process exit code."""
    from megatron.core import parallel_state
    from megatron.core.num_microbatches_calculator import get_num_microbatches, init_num_microbatches_calculator
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from phi4.data.blend import GlobalBatches, evaluation_samples
    from phi4.data.formats import Collate, build_train_valid, prepare_sources
    from phi4.model.build import build_phi4_model, model_summary, transformer_config
    from phi4.model.validate import check_run
    from phi4.runtime.distributed import init_distributed, shutdown
    from phi4.runtime.launch_env import read_launch_env
    from phi4.runtime.run_dir import RunDirectory
    from phi4.train.checkpoint import (MODEL_CONFIG_KEY, RunCheckpointer, latest_checkpoint, load_model_weights,
                                       resolve_checkpoint, weights_fingerprint)
    from phi4.model.flops import flops_per_token
    from phi4.train.metrics import MetricsWriter, StepLog, device_peak_tflops
    from phi4.train.step import OptimSettings, build_optimizer, wrap_ddp

    check_numbers(cfg)
    model, topology, precision = settings(cfg)
    launch = read_launch_env()
    if topology.world_size and topology.world_size != launch.world_size:
        raise ConfigError(f"topology.nodes x topology.gpus_per_node = {topology.world_size}, but "
                          f"{launch.world_size} processes were started")
    check_run(model, topology, precision, launch.world_size)
    dp = topology.data_parallel_size(launch.world_size)
    steps = total_steps(cfg)
    check_training(cfg, dp, steps, model)
    objective_name = check_objective(cfg)
    generative_every = generative_eval_every(cfg, topology.cp)
    t = cfg.train
    run_dir = Path(cfg.run_dir)
    resume = latest_checkpoint(run_dir)
    if resume is not None:
        check_resume(cfg, model, resume)
    check_start_points(cfg, resume, objective_name)

    # what the start writes (config.yaml, tensorboard/) is removed again if the run fails before a step
    with RunDirectory(run_dir, launch.rank) as run_files:
        init_distributed(model, topology, precision, seed=cfg.seed, launch=launch)
        stop = StopRequest()
        started = time.monotonic()
        rank = torch.distributed.get_rank()
        run_files.write("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        sources = prepare_sources(cfg.data, t.seq_length, rank, model.vocab_size)

        config = transformer_config(model, topology, precision)
        chunks = build_phi4_model(model, topology, precision, config=config)
        ddp = wrap_ddp(chunks, config, t.overlap_grad_reduce, t.overlap_param_gather)
        o = cfg.optim
        optimizer = build_optimizer(ddp, config, OptimSettings(
            lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.adam_beta1,
            adam_beta2=o.adam_beta2, adam_eps=o.adam_eps, clip_grad=o.clip_grad))
        scheduler = OptimizerParamScheduler(
            optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
            lr_decay_steps=steps, lr_decay_style=o.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
            wd_incr_steps=steps, wd_incr_style="constant")
        init_num_microbatches_calculator(rank, None, t.global_batch_size, t.micro_batch_size, dp)
        objective = build_objective(cfg, objective_name, model, topology, precision, config)

        is_logger = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0 \
            and parallel_state.get_data_parallel_rank() == 0
        metrics = MetricsWriter(run_dir, is_logger, t.tensorboard)
        checkpointer = RunCheckpointer(run_dir, cfg.checkpoint.keep, cfg.checkpoint.async_save)
        layout = dict(tp=topology.tp, pp=topology.pp, vp=topology.vp, cp=topology.cp, dp=dp)

        step, consumed, skipped, initialized_from = 0, 0, 0, None
        if resume is not None:
            state = checkpointer.load(resume, ddp, optimizer, scheduler, layout)
            step, consumed, skipped = state["step"], state["consumed_samples"], state["skipped_steps"]
            initialized_from = state.get("initialized_from")
            if is_logger:
                log.info(f"resumed from {resume} at step {step} ({consumed} samples consumed; "
                         f"saved at {state['layout']})")
        elif cfg.checkpoint.load:
            load_model_weights(ddp, cfg.checkpoint.load)
            # What was loaded, as the checkpoint chain's evidence: the stage before saved the same
            # fingerprint with its final weights.
            initialized_from = dict(path=str(resolve_checkpoint(cfg.checkpoint.load).resolve()),
                                    weights_fingerprint=weights_fingerprint(ddp))
            if is_logger:
                log.info(f"initialized from {cfg.checkpoint.load} (weights only)")
        if is_logger:
            log.info(model_summary(model, topology, chunks, f"dp={dp} | {steps} steps | run dir {run_dir.resolve()}"))

        train_ds, valid_ds = build_train_valid(cfg.data, sources, t.seq_length, steps * t.global_batch_size,
                                               max(t.eval_samples, 1), cfg.seed)
        collate = Collate(t.micro_batch_size, "thd" if model.backend == "te" else "mask")
        dp_rank = parallel_state.get_data_parallel_rank()
        batches = GlobalBatches(train_ds, t.global_batch_size, dp_rank, dp, consumed)
        valid = evaluation_samples(valid_ds, t.eval_samples, dp_rank, dp) if t.eval_every else None
        evaluator = None
        if generative_every:
            from phi4.eval.evaluator import Evaluator, publish

            evaluator = Evaluator(cfg.eval, ddp, model.max_position_embeddings, model.vocab_size, run_dir, cfg.seed)
            if is_logger:
                log.info(f"{evaluator.describe()}; every {generative_every} steps")

        def save(at_step: int, final: bool = False):
            extra = dict(step=at_step, consumed_samples=batches.consumed, skipped_steps=skipped, layout=layout,
                         config_yaml=OmegaConf.to_yaml(cfg, resolve=True), initialized_from=initialized_from,
                         weights_fingerprint=weights_fingerprint(ddp))
            extra[MODEL_CONFIG_KEY] = dataclasses.asdict(model)
            return checkpointer.save(at_step, ddp, optimizer, scheduler, extra, final)

        if step >= steps:
            if is_logger:
                log.info(f"nothing to do: {resume} is at step {step} of {steps}")
            metrics.close()
            shutdown()
            return 0
        flops_token = flops_per_token(model, t.seq_length)
        tokens_per_step = t.global_batch_size * t.seq_length
        if objective_name == "dpo":  # a pair is two rows, and the reference's forward adds a third of a step's FLOPs
            tokens_per_step, flops_token = 2 * tokens_per_step, flops_token * 4 / 3
        step_log = StepLog(metrics, steps, tokens_per_step, flops_token, launch.world_size,
                           device_peak_tflops(t.peak_tflops))
        in_a_row, exit_code = 0, 0
        while step < steps:
            micro = collate(batches.next())
            assert len(micro) == get_num_microbatches()
            result = objective.train_step(ddp, optimizer, micro)
            step += 1
            run_files.keep()  # a step has run: from here on a failure leaves the run for its resume
            step_log.window_steps += 1
            if result["update_successful"]:
                scheduler.step(increment=1)
                in_a_row = 0
            else:
                skipped += 1
                in_a_row += 1
                if is_logger:
                    log.warning(f"step {step}: non-finite gradient norm ({result['grad_norm']}); update skipped")
                if in_a_row >= t.max_nonfinite_in_a_row:
                    raise TrainingStopped(
                        f"{in_a_row} steps in a row had a non-finite loss or gradient norm "
                        f"(train.max_nonfinite_in_a_row="
                        f"{t.max_nonfinite_in_a_row}); stopping at step {step}. Lower optim.lr or check the data; "
                        f"the last checkpoint is {latest_checkpoint(run_dir)}")
            checkpointer.poll()

            if step % t.log_every == 0 or step == steps:
                step_log.write(step, result, optimizer.param_groups[0]["lr"], skipped, objective.describe)
            if valid and t.eval_every and (step % t.eval_every == 0 or step == steps):
                val = objective.evaluate(ddp, collate(valid))
                if is_logger:
                    extra = objective.describe(val)
                    extra = f" | {extra}" if extra else ""
                    metrics.write(dict(step=step, **{f"val_{k}": v for k, v in val.items()}),
                                  f"step {step:>6}/{steps} | validation loss {val['loss']:.4f}{extra}")
            if evaluator and (step % generative_every == 0 or step == steps):
                report = evaluator.run()
                if is_logger:
                    publish(report, step, metrics, run_dir / "generations" / f"step_{step:07d}.jsonl",
                            f"step {step:>6}/{steps} | ")
            if cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and step < steps:
                save(step)
            out_of_time = t.max_wall_minutes is not None and time.monotonic() - started > 60 * t.max_wall_minutes
            interval = bool(t.exit_interval) and step % t.exit_interval == 0 and step < steps
            if stop.agreed(out_of_time) or interval:
                reason = stop.signal or (f"train.max_wall_minutes={t.max_wall_minutes}" if out_of_time
                                         else f"train.exit_interval={t.exit_interval}")
                directory = save(step)
                checkpointer.wait()
                if is_logger:
                    log.info(f"stopping at step {step} ({reason}); saved {directory}; exit {EXIT_RESUMABLE} to resume")
                exit_code = EXIT_RESUMABLE
                break
        else:
            directory = save(step, final=True)
            checkpointer.wait()
            if is_logger:
                log.info(f"done: {steps} steps, final checkpoint {directory}; run dir {run_dir.resolve()}")
        metrics.close()
        shutdown()
        return exit_code
