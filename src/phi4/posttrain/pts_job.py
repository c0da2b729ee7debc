"""The job behind `phi4-pts`: Pivotal Token Search from a checkpoint on every rank, each
data-parallel rank over its share of the problems, resumable from run_dir/parts/, stopped between
problems by SIGTERM/SIGUSR1 with exit 75; rank 0 merges the parts into `pts.output`."""

from __future__ import annotations

import logging
import zlib
from pathlib import Path

import torch
from megatron.core import parallel_state
from omegaconf import DictConfig, OmegaConf

from phi4.checkpoint.pointers import resolve_checkpoint
from phi4.checkpoint.weights import MODEL_CONFIG_KEY, checkpoint_common_state, load_model_weights
from phi4.data.chat import message_ids
from phi4.data.jsonl import checked_records
from phi4.data.synth import write_synthetic_jsonl
from phi4.data.tokenizer import get_tokenizer
from phi4.errors import ConfigError
from phi4.eval.generate import decoding_topology
from phi4.model.build import build_phi4_model
from phi4.model.config import ModelConfig, PrecisionConfig, TopologyConfig
from phi4.model.parallel import init_model_parallel
from phi4.posttrain.generate import MegatronPolicy
from phi4.posttrain.pts import PTSSettings, load_checker
from phi4.posttrain.pts_run import merge_parts, run_pts
from phi4.runtime import device, signals
from phi4.runtime.distributed import shutdown
from phi4.runtime.run_dir import RunDirectory
from phi4.settings import Pts, check_ranges, typed

log = logging.getLogger("phi4.pts")


class Stopped(Exception):
    """A signal asked to stop between problems."""


def _problems(p: Pts, run_dir: Path, rank: int) -> list[dict]:
    path = Path(p.problems) if p.problems else run_dir / "problems.jsonl"
    if not p.problems and rank == 0 and not path.exists():
        g = p.generate
        write_synthetic_jsonl(path, int(g["problems"]), int(g["seed"]), list(g["kinds"]))
    torch.distributed.barrier()
    if not path.is_file():
        raise ConfigError(f"pts.problems={path} not found (a JSONL of problems with 'id', 'question', 'answer')")
    problems = []
    for where, problem in checked_records(path):
        if not isinstance(problem, dict) or not isinstance(problem.get("question"), str):
            raise ConfigError(f"{where}: a problem is an object with 'id' and 'question' (and what its checker reads)")
        problems.append(problem)
    return problems


def search(cfg: DictConfig) -> int:
    """Run (or resume) the search; returns the process exit code (75: stopped by a signal)."""
    check_ranges(cfg, ("pts",))
    p: Pts = typed(cfg, "pts")
    checkpoint = resolve_checkpoint(p.checkpoint, "pts.checkpoint")
    model = ModelConfig.from_dict(checkpoint_common_state(checkpoint)[MODEL_CONFIG_KEY])
    # without sequence parallelism: the KV cache needs whole one-token steps (same weights)
    topology = decoding_topology(typed(cfg, "topology"))
    precision = typed(cfg, "precision")
    if topology.pp != 1 or topology.cp != 1:
        raise ConfigError(f"phi4-pts samples with whole models per tensor-parallel group: topology.pp={topology.pp} "
                          f"and topology.cp={topology.cp} must be 1 (use topology.tp to split a large model)")
    settings = PTSSettings(samples=p.samples, p_gap=p.p_gap, p_min=p.p_min, p_max=p.p_max,
                           max_new_tokens=p.max_new_tokens, temperature=p.temperature, top_p=p.top_p, seed=cfg.seed)
    checker = load_checker(p.checker, "pts.checker")
    init_model_parallel(model, topology, precision, seed=cfg.seed)
    try:
        return _search(cfg, p, settings, checker, checkpoint, model, topology, precision)
    finally:
        shutdown()


def _search(cfg: DictConfig, p: Pts, settings: PTSSettings, checker, checkpoint: Path, model: ModelConfig,
            topology: TopologyConfig, precision: PrecisionConfig) -> int:
    rank = torch.distributed.get_rank()
    run_dir = Path(cfg.run_dir)
    with RunDirectory(run_dir, rank) as run_files:  # a failed start leaves run_dir as it was
        run_files.write("config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        problems = _problems(p, run_dir, rank)
        chunks = build_phi4_model(model, topology, precision)
        load_model_weights(chunks, checkpoint)
    for chunk in chunks:
        chunk.eval()
    tok = get_tokenizer()
    on = device.current().type
    policy = MegatronPolicy(chunks, model.vocab_size, tok.eos_id, settings.max_new_tokens, settings.temperature,
                            settings.top_p, torch.Generator(device=on), on)
    dp_rank, dp = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    writer = parallel_state.get_tensor_model_parallel_rank() == 0
    parts = run_dir / ("parts" if writer else f"parts-tp{parallel_state.get_tensor_model_parallel_rank()}")

    def query_ids(problem: dict) -> list[int]:
        # Reseed per problem: a resumed search draws what an uninterrupted one would have, and
        # the ranks of a tensor-parallel group draw alike.
        policy.generator.manual_seed(cfg.seed * 1_000_003 + zlib.crc32(str(problem["id"]).encode()))
        header, body = message_ids("user", problem["question"])
        return header + body + message_ids("assistant", "")[0]

    def progress(state) -> None:
        if rank == 0:
            log.info(f"pts: {state.done}/{state.total} problems on rank 0 | kept {state.kept_rate:.0%} | "
                     f"{state.pairs} pairs")
        flag = torch.tensor([1.0 if signals.received() else 0.0], device=policy.device)
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX,
                                     group=parallel_state.get_tensor_model_parallel_group())
        if flag.item() and state.done < state.total:
            raise Stopped()

    if rank == 0:
        log.info(f"pts: {len(problems)} problems from {checkpoint} over {dp} data-parallel rank(s); "
                 f"{settings.samples} samples per estimate, p_gap {settings.p_gap}")
    try:
        run_pts(problems, policy, checker, query_ids, tok.decode, settings, parts, dp_rank, dp, progress, tok.eos_id)
    except Stopped:
        log.info(f"rank {rank}: stopping ({signals.received()}) between problems; exit 75 to resume")
        return 75
    torch.distributed.barrier()
    if rank == 0:
        pairs = merge_parts(run_dir / "parts", Path(p.output))
        log.info(f"pts: done; {pairs} pairs in {p.output}")
    return 0
