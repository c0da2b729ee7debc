"""Model-agnostic evaluation: each data-parallel rank answers its share of the problems through a
`Complete` function, the checkers judge every sample, and the verdicts of all ranks become one
score per task. A model enters only through `Complete` (the Megatron-Core decoder in
phi4.eval.evaluator, a stand-in in the tests)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from phi4.errors import ConfigError
from phi4.eval.score import TaskScore, score_task
from phi4.eval.tasks import EvalItem

log = logging.getLogger("phi4.eval")

# (prompt token ids, one row per sample; a seed for this batch) -> the new token ids of each row
Complete = Callable[[list[list[int]], int], list[list[int]]]
Gather = Callable[[list], list]  # every rank's list, concatenated, on every rank


@dataclass(frozen=True)
class EvalSettings:
    """The `eval.*` settings the evaluation itself reads."""

    samples: int = 1  # completions per problem; more than 1 needs temperature > 0 (pass@k)
    pass_at: tuple[int, ...] = (1,)
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    max_new_tokens: int = 256
    batch_size: int = 16  # problems per decoding batch on each rank (x samples rows)
    stop: tuple[str, ...] = ()  # a response is cut before the first of these strings
    seed: int = 0

    def __post_init__(self):
        """How the settings combine (each one's range is the eval schema's: phi4.settings.Eval)."""
        if self.samples > 1 and self.temperature == 0:
            raise ConfigError(f"eval.samples={self.samples} with eval.temperature=0: greedy decoding answers the same "
                              "each time; set eval.temperature > 0 for pass@k, or eval.samples=1")
        if not self.pass_at or any(not 1 <= k <= self.samples for k in self.pass_at):
            raise ConfigError(f"eval.pass_at={list(self.pass_at)}: each k must be between 1 and "
                              f"eval.samples={self.samples}")


@dataclass
class EvalReport:
    scores: list[TaskScore]  # in the order the tasks first appear
    generations: list[dict]  # every sample with its verdict, in problem order


def _cut(response: str, stop: tuple[str, ...]) -> str:
    ends = [i for i in (response.find(s) for s in stop) if i >= 0]
    return response[: min(ends)] if ends else response


class EvalStopped(Exception):
    """A stop was asked for between batches; what was answered is in the part file."""


def _judge(item: EvalItem, index: int, sample: int, ids: list[int], decode: Callable[[list[int]], str],
           stop_ids: set[int], stop: tuple[str, ...]) -> dict:
    stopped = bool(ids) and ids[-1] in stop_ids
    response = _cut(decode(ids[:-1] if stopped else ids), stop)
    record = dict(index=index, task=item.task, id=item.id, sample=sample, prompt=item.prompt,
                  answer=item.record.get("answer"), response=response, tokens=len(ids), stopped=stopped)
    try:
        record["correct"] = bool(item.checker(item.record, response))
    except Exception as err:  # a pluggable checker's failure costs one verdict, not the run
        record.update(correct=False, checker_error=f"{type(err).__name__}: {err}")
    return record


def evaluate(items: list[EvalItem], complete: Complete, decode: Callable[[list[int]], str], stop_ids: set[int],
             settings: EvalSettings, dp_rank: int = 0, dp: int = 1, gather: Optional[Gather] = None,
             progress: bool = True, done: Sequence[dict] = (), record: Optional[Callable[[list[dict]], None]] = None,
             should_stop: Optional[Callable[[], bool]] = None) -> EvalReport:
    """Answer, judge and score every problem; this rank answers items dp_rank, dp_rank + dp, ...

    Resuming: `done` holds generations of an earlier run (its part file); problems with all their
    samples there are not asked again. `record` receives each batch's generations as soon as they
    are judged (to append to the part file), and `should_stop`, asked after each batch, ends the
    run with EvalStopped."""
    n = settings.samples
    mine = list(range(dp_rank, len(items), dp))
    earlier: dict[int, dict[int, dict]] = {}
    for g in done:
        earlier.setdefault(g["index"], {})[g["sample"]] = g
    finished = [i for i in mine if len(earlier.get(i, {})) == n]
    generations = [earlier[i][s] for i in finished for s in range(n)]
    todo = [i for i in mine if i not in set(finished)]
    for batch, start in enumerate(range(0, len(todo), settings.batch_size)):
        chosen = todo[start : start + settings.batch_size]
        prompts = [items[i].prompt_ids for i in chosen for _ in range(n)]
        completions = complete(prompts, settings.seed * 1_000_003 + dp_rank * 10_007 + len(finished) + start)
        new = [_judge(items[chosen[row // n]], chosen[row // n], row % n, ids, decode, stop_ids, settings.stop)
               for row, ids in enumerate(completions)]
        generations += new
        if record is not None:
            record(new)
        answered = len(finished) + min(start + settings.batch_size, len(todo))
        if progress and dp_rank == 0:
            resumed = f" ({len(finished)} from an earlier run)" if finished else ""
            log.info(f"eval: {answered}/{len(mine)} problems on rank 0{resumed}")
        if should_stop is not None and should_stop() and answered < len(mine):
            raise EvalStopped(f"stopped after {answered} of {len(mine)} problems")
    if gather is not None:
        generations = gather(generations)
    generations.sort(key=lambda g: (g["index"], g["sample"]))
    verdicts: dict[str, list[list[bool]]] = {}
    for g in generations:
        task = verdicts.setdefault(g["task"], [])
        if g["sample"] == 0:
            task.append([])
        task[-1].append(g["correct"])
    scores = [score_task(task, v, settings.pass_at) for task, v in verdicts.items()]
    return EvalReport(scores, generations)


def write_generations(path: Path, generations: list[dict], extra: Optional[dict] = None) -> None:
    """The samples as JSONL, written whole or not at all (a rerun replaces the file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    with partial.open("w") as f:
        for g in generations:
            f.write(json.dumps({**(extra or {}), **{k: v for k, v in g.items() if k != "index"}}) + "\n")
        f.flush()
        os.fsync(f.fileno())
    partial.replace(path)
