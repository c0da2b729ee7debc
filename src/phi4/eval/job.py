"""The job behind `phi4-eval`: one checkpoint evaluated in the layout the settings choose (any
TP/PP, cp=1), resumable from run_dir/parts/, stopped between batches by SIGTERM/SIGUSR1 with exit 75."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from megatron.core import parallel_state
from omegaconf import DictConfig, OmegaConf

from phi4.checkpoint.pointers import resolve_checkpoint
from phi4.checkpoint.weights import MODEL_CONFIG_KEY, TRAIN_STATE_KEY, checkpoint_common_state, load_model_weights
from phi4.eval.evaluator import Evaluator, check_eval, publish
from phi4.eval.generate import decoding_topology
from phi4.eval.run import EvalStopped
from phi4.model.build import build_phi4_model
from phi4.model.config import ModelConfig, PrecisionConfig, TopologyConfig
from phi4.model.parallel import init_model_parallel
from phi4.runtime import signals
from phi4.runtime.distributed import shutdown
from phi4.runtime.run_dir import RunDirectory
from phi4.settings import Eval, check_ranges, typed
from phi4.train.metrics import MetricsWriter

log = logging.getLogger("phi4.eval")


def evaluate_checkpoint(cfg: DictConfig) -> int:
    """Evaluate (or resume evaluating) `checkpoint`; returns the process exit code (75: stopped by a signal)."""
    check_ranges(cfg, ("eval",))
    ev: Eval = typed(cfg, "eval")
    checkpoint = resolve_checkpoint(cfg.checkpoint, "checkpoint")
    common = checkpoint_common_state(checkpoint)
    model = ModelConfig.from_dict(common[MODEL_CONFIG_KEY])
    # without sequence parallelism: the KV cache needs whole one-token steps (same weights)
    topology = decoding_topology(typed(cfg, "topology"))
    precision = typed(cfg, "precision")
    check_eval(ev, topology.cp, cfg.seed)
    init_model_parallel(model, topology, precision, seed=cfg.seed)
    try:
        return _evaluate(cfg, ev, checkpoint, common, model, topology, precision)
    finally:
        shutdown()


def _evaluate(cfg: DictConfig, ev: Eval, checkpoint: Path, common: dict, model: ModelConfig, topology: TopologyConfig,
              precision: PrecisionConfig) -> int:
    run_dir = Path(cfg.run_dir)
    with RunDirectory(run_dir, torch.distributed.get_rank()) as run_files:  # a failed start leaves run_dir as it was
        run_files.write("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        torch.distributed.barrier()
        chunks = build_phi4_model(model, topology, precision)
        load_model_weights(chunks, checkpoint)
        evaluator = Evaluator(ev, chunks, model.max_position_embeddings, model.vocab_size, run_dir, cfg.seed)
    is_logger = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0 \
        and parallel_state.get_data_parallel_rank() == 0
    step = common.get(TRAIN_STATE_KEY, {}).get("step")  # none in a converted checkpoint
    if is_logger:
        log.info(f"{evaluator.describe()}; checkpoint {checkpoint} (step {step})")

    def should_stop() -> bool:  # the ranks of a model-parallel group answer the same batches: they stop together
        flag = torch.tensor([1.0 if signals.received() else 0.0], device=evaluator.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX,
                                     group=parallel_state.get_model_parallel_group())
        return bool(flag.item())

    try:
        report = evaluator.run(run_dir / "parts", str(checkpoint.resolve()), should_stop)
    except EvalStopped as stopped:
        log.info(f"rank {torch.distributed.get_rank()}: {stopped} ({signals.received()}); exit 75 to resume")
        return 75
    if is_logger:
        metrics = MetricsWriter(run_dir, True, cfg.tensorboard)
        publish(report, step, metrics, run_dir / "generations.jsonl", f"{checkpoint} | ")
        metrics.close()
    return 0
