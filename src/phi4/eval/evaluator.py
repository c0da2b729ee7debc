"""Generative evaluation of Megatron-Core model chunks in their training layout: phi4-eval on a
checkpoint, and `eval.every` steps during training. Settings are the `eval` group (conf/eval/).

Each data-parallel rank decodes its share of the problems with the shared decoder (the ranks of a
tensor- or pipeline-parallel group decode together), every rank then holds all the verdicts, and
the logging rank writes the scores (console, metrics.jsonl, TensorBoard) and every generation with
its verdict (JSONL).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from pathlib import Path
from typing import Optional

import torch
from megatron.core import parallel_state

from phi4.data.jsonl import append_records, part_path, read_part
from phi4.data.synth import WORD_PROBLEMS, write_synthetic_jsonl
from phi4.data.tokenizer import get_tokenizer
from phi4.errors import ConfigError
from phi4.eval.generate import Decoder
from phi4.eval.run import EvalReport, EvalSettings, evaluate, write_generations
from phi4.eval.tasks import check_template, load_items
from phi4.runtime import device
from phi4.settings import Eval

log = logging.getLogger("phi4.eval")


def eval_settings(ev: Eval, seed: int) -> EvalSettings:
    return EvalSettings(samples=ev.samples, pass_at=tuple(ev.pass_at), temperature=ev.temperature, top_p=ev.top_p,
                        max_new_tokens=ev.max_new_tokens, batch_size=ev.batch_size, stop=tuple(ev.stop), seed=seed)


def check_eval(ev: Eval, cp: int, seed: int = 0) -> EvalSettings:
    """What the ranges (phi4.settings.check_ranges) cannot say, checked before any process group
    or model exists: the layout, the problems, the template, and how the settings combine."""
    if cp != 1:
        raise ConfigError(f"generative evaluation needs topology.cp=1 (the decoder does not split sequences over "
                          f"context-parallel ranks), not {cp}: set eval.every=0 here and run phi4-eval on the "
                          "checkpoint with topology.cp=1")
    if not ev.tasks and not ev.synthetic:
        raise ConfigError("eval.tasks is empty and eval.synthetic is null: give JSONL files of problems, or "
                          "eval.synthetic={problems: N, seed: S} for the held-out synthetic split")
    missing = [str(path) for path in ev.tasks if not Path(path).is_file()]
    if missing:
        raise ConfigError(f"eval.tasks: not found: {', '.join(missing)} (JSONL files of problems with 'prompt' "
                          "and 'answer')")
    check_template(ev.template)
    return eval_settings(ev, seed)


def task_files(ev: Eval, run_dir: Path, rank: int) -> list[Path]:
    """The configured files, and the held-out synthetic split (written by rank 0 if missing)."""
    paths = [Path(p) for p in ev.tasks]
    if ev.synthetic:
        s = ev.synthetic
        kinds = list(s.get("kinds") or WORD_PROBLEMS)
        path = run_dir / f"heldout_{int(s['problems'])}_{int(s['seed'])}.jsonl"
        if rank == 0 and not path.exists():
            write_synthetic_jsonl(path, int(s["problems"]), int(s["seed"]), kinds, split="test")
        torch.distributed.barrier()
        paths.append(path)
    return paths


def _gather_data_parallel(rows: list) -> list:
    group = parallel_state.get_data_parallel_group()
    parts: list = [None] * torch.distributed.get_world_size(group)
    torch.distributed.all_gather_object(parts, rows, group=group)
    return [r for part in parts for r in part]


class Evaluator:
    """Built once per run over the run's chunks; `run()` evaluates them as they are now."""

    def __init__(self, ev: Eval, chunks: list, max_positions: int, vocab_size: int, run_dir: Path, seed: int):
        """`ev` checked by `check_eval` first (the entry points do, before any process group)."""
        self.settings = eval_settings(ev, seed)
        self.chunks = chunks
        paths = task_files(ev, Path(run_dir), torch.distributed.get_rank())
        self.items = load_items(paths, ev.template, ev.checker, max_positions, self.settings.max_new_tokens)
        self.tok = get_tokenizer()
        self.stop_ids = {self.tok.eos_id, self.tok.eod_id}
        self.device = device.current().type
        self.decoder = Decoder(chunks, vocab_size, self.stop_ids, self.device)
        self.dp_rank = parallel_state.get_data_parallel_rank()
        self.dp = parallel_state.get_data_parallel_world_size()

    def describe(self) -> str:
        tasks = sorted({i.task for i in self.items})
        s = self.settings
        mode = "greedy" if s.temperature == 0 else f"{s.samples} samples at temperature {s.temperature}"
        return (f"eval: {len(self.items)} problems ({', '.join(tasks)}), {mode}, up to {s.max_new_tokens} new tokens, "
                f"{'KV cache' if self.decoder.kv_cache else 'full forward per token'}, {self.dp} data-parallel rank(s)")

    def _complete(self, prompts: list[list[int]], seed: int) -> list[list[int]]:
        s = self.settings
        generator = torch.Generator(device=self.device).manual_seed(seed) if s.temperature > 0 else None
        return self.decoder.generate(prompts, s.max_new_tokens, s.temperature, s.top_p, generator)

    def fingerprint(self, checkpoint: str) -> dict:
        """What a resumed evaluation must share with the run it continues."""
        problems = hashlib.sha256()
        for item in self.items:
            problems.update(json.dumps([item.task, item.id, item.prompt_ids, item.record], sort_keys=True).encode())
        return dict(checkpoint=checkpoint, settings=dataclasses.asdict(self.settings), problems=problems.hexdigest())

    def _resume(self, parts: Path, fingerprint: dict):
        """(earlier generations of this data-parallel rank, its part file open for appending on the
        first rank of each model-parallel group, else None): that rank writes, every rank reads."""
        saved = parts / "eval.json"
        if torch.distributed.get_rank() == 0 and not saved.exists():
            parts.mkdir(parents=True, exist_ok=True)
            saved.write_text(json.dumps(fingerprint, indent=1) + "\n")
        torch.distributed.barrier()
        if json.loads(saved.read_text()) != json.loads(json.dumps(fingerprint)):
            raise ConfigError(f"{parts} holds an evaluation of another checkpoint, other settings or other problems "
                              f"(see {saved}): use another run_dir, or delete {parts} to start again")
        part = part_path(parts, self.dp_rank, self.dp)
        writer = torch.distributed.get_rank(group=parallel_state.get_model_parallel_group()) == 0
        if writer:
            read_part(part, repair=True)  # a line cut short by a kill goes
        torch.distributed.barrier()
        done = read_part(part, repair=False)
        return done, part.open("a") if writer else None

    def run(self, parts: Optional[Path] = None, checkpoint: str = "", should_stop=None) -> EvalReport:
        """Evaluate the chunks as they are now. With `parts` (phi4-eval), every answered batch is
        appended to this rank's part file there, and a rerun skips what it holds."""
        done, part = self._resume(parts, self.fingerprint(checkpoint)) if parts is not None else ((), None)
        record = None if part is None else lambda records: append_records(part, records)
        modes = [chunk.training for chunk in self.chunks]
        for chunk in self.chunks:
            chunk.eval()
        try:
            return evaluate(self.items, self._complete, self.tok.decode, self.stop_ids, self.settings, self.dp_rank,
                            self.dp, _gather_data_parallel if self.dp > 1 else None, done=done, record=record,
                            should_stop=should_stop)
        finally:
            for chunk, mode in zip(self.chunks, modes):
                chunk.train(mode)
            if part is not None:
                part.close()


def publish(report: EvalReport, step: Optional[int], metrics, generations_path: Path, header: str = "") -> None:
    """Scores to the metrics writer (console, metrics.jsonl, TensorBoard) and the generations to
    JSONL; call on the logging rank."""
    record = {"step": step if step is not None else 0}
    for score in report.scores:
        record.update(score.record())
    lines = " | ".join(score.line() for score in report.scores)
    metrics.write(record, f"{header}eval {lines}")
    write_generations(generations_path, report.generations, {"step": step} if step is not None else None)
    log.info(f"eval: generations with their verdicts in {generations_path}")

