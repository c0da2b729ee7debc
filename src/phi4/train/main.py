"""`phi4-train`: the training entry point (Hydra config -> model -> loop).

Run under torchrun or srun for several processes, or alone for one. With no arguments it trains
the tiny model on the bundled synthetic corpus: the embedded default.
"""

from __future__ import annotations

import json
import logging
import sys
import time
import warnings
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from phi4.errors import ConfigError
from phi4.model.config import ModelConfig, PrecisionConfig, TopologyConfig

CONF_DIR = str(Path(__file__).resolve().parents[3] / "conf")
log = logging.getLogger("phi4.train")


def synthetic_token_rows(cfg: DictConfig, seq_length: int) -> torch.Tensor:
    """The synthetic corpus, tokenized, documents joined by end-of-text, cut into rows of
    seq_length + 1 tokens (inputs and their next-token labels)."""
    from phi4.data.synth import generate
    from phi4.data.tokenizer import get_tokenizer

    tok = get_tokenizer()
    stream: list[int] = []
    for problem in generate(cfg.synthetic_problems, cfg.synthetic_seed):
        stream.extend(tok.encode(problem.text(), allow_special=False))
        stream.append(tok.eod_id)
    rows = len(stream) // (seq_length + 1)
    return torch.tensor(stream[: rows * (seq_length + 1)]).view(rows, seq_length + 1)


def check_training(cfg: DictConfig, dp: int) -> None:
    """The loop's own settings, checked before any process group exists."""
    t, o = cfg.train, cfg.optim
    if t.steps < 1:
        raise ConfigError(f"train.steps={t.steps} must be at least 1")
    if not 0 <= o.warmup_steps < t.steps:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be at least 0 and less than train.steps={t.steps}")
    if t.global_batch_size % (t.micro_batch_size * dp):
        raise ConfigError(
            f"train.global_batch_size={t.global_batch_size} is not a multiple of train.micro_batch_size="
            f"{t.micro_batch_size} x {dp} data-parallel ranks = {t.micro_batch_size * dp}"
        )
    if o.decay_style not in ("linear", "cosine", "constant"):
        raise ConfigError(f"optim.decay_style={o.decay_style!r}; valid: linear, cosine, constant")


def run(cfg: DictConfig) -> list[dict]:
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from phi4.model.build import build_phi4_model, model_summary, transformer_config
    from phi4.model.validate import check_run
    from phi4.runtime.distributed import init_distributed, shutdown
    from phi4.runtime.launch_env import read_launch_env
    from phi4.train.step import (
        OptimSettings,
        build_optimizer,
        data_parallel_slice,
        micro_batches_from_tokens,
        train_step,
        wrap_ddp,
    )

    model = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True))
    topology = TopologyConfig.from_dict(OmegaConf.to_container(cfg.topology, resolve=True))
    precision = PrecisionConfig.from_dict(OmegaConf.to_container(cfg.precision, resolve=True))
    launch = read_launch_env()
    check_run(model, topology, precision, launch.world_size)
    check_training(cfg, topology.data_parallel_size(launch.world_size) or 1)
    launch = init_distributed(model, topology, precision, seed=cfg.seed, launch=launch)
    is_logger = launch.rank == launch.world_size - 1  # the last pipeline stage holds the loss
    run_dir = Path(cfg.run_dir)
    if launch.rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))

    config = transformer_config(model, topology, precision)
    chunks = build_phi4_model(model, topology, precision, config=config)
    ddp = wrap_ddp(chunks, config)
    o = cfg.optim
    optimizer = build_optimizer(
        ddp, config, OptimSettings(lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay,
                                   adam_beta1=o.adam_beta1, adam_beta2=o.adam_beta2, clip_grad=o.clip_grad)
    )
    steps = cfg.train.steps
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=o.warmup_steps,
        lr_decay_steps=steps, lr_decay_style=o.decay_style, start_wd=o.weight_decay, end_wd=o.weight_decay,
        wd_incr_steps=steps, wd_incr_style="constant",
    )
    if is_logger:
        log.info(model_summary(model, topology, chunks))

    rows = synthetic_token_rows(cfg.data, cfg.train.seq_length)
    gbs, mbs = cfg.train.global_batch_size, cfg.train.micro_batch_size
    metrics_path = run_dir / "metrics.jsonl"
    history = []
    started = time.perf_counter()
    for step in range(1, steps + 1):
        picks = torch.arange((step - 1) * gbs, step * gbs) % rows.shape[0]
        batches = micro_batches_from_tokens(data_parallel_slice(rows[picks]), mbs)
        result = train_step(ddp, optimizer, batches)
        scheduler.step(increment=1)
        if step % cfg.train.log_every == 0 or step == steps:
            elapsed = time.perf_counter() - started
            record = dict(
                step=step,
                loss=result["loss"],
                lr=optimizer.param_groups[0]["lr"],
                grad_norm=float(result["grad_norm"]) if result["grad_norm"] is not None else None,
                tokens_per_s=step * gbs * cfg.train.seq_length / elapsed,
            )
            history.append(record)
            if is_logger:
                log.info(
                    f"step {step:>5}/{steps} | loss {record['loss']:.4f} | lr {record['lr']:.2e} | "
                    f"grad norm {record['grad_norm']:.3f} | {record['tokens_per_s']:.0f} tokens/s"
                )
                with metrics_path.open("a") as f:
                    f.write(json.dumps(record) + "\n")
    shutdown()
    return history


def _quiet_dependencies() -> None:
    """Megatron-Core's deprecation notices and torch's are not actionable for a user of this stack."""
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(megatron|torch|phi4\.runtime\.cpu)")
    for noisy in ("megatron", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    _quiet_dependencies()
    try:
        run(cfg)
    except ConfigError as err:  # one clear line, not a traceback, for a setting that cannot work
        log.error(f"error: {err}")
        sys.exit(2)


if __name__ == "__main__":  # dist_checkpointing's spawned writer re-imports the entry module
    main()
