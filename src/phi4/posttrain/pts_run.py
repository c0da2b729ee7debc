"""Pivotal Token Search over many problems: each rank's share, one resumable part file per rank
(a line per finished problem, fsync'ed), and the merge into the flat pairs file DPO reads."""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

from phi4.data.jsonl import append_records, part_path, read_part
from phi4.errors import ConfigError
from phi4.posttrain.pts import Checker, Decode, PolicyModel, PTSSettings, search_problem


@dataclass(frozen=True)
class PTSProgress:
    done: int
    total: int
    kept: int
    pairs: int

    @property
    def kept_rate(self) -> float:
        return self.kept / self.done if self.done else 0.0


def _finished_marker(part: Path) -> Path:
    """Written once a rank has done all its problems: a part file alone may be a crashed rank's."""
    return part.with_suffix(".done")


def run_pts(problems: Sequence[dict], model: PolicyModel, checker: Checker, query_ids_fn: Callable[[dict], list[int]],
            decode: Decode, settings: PTSSettings, output_dir: Path, rank: int, world_size: int,
            progress: Callable[[PTSProgress], None] | None = None, eos_id: int | None = None) -> PTSProgress:
    """Search this rank's problems (problems[rank::world_size]) and append one JSON line per
    problem to its part file, flushed and fsync'ed, so that a rerun after a crash or a time limit
    skips the problems already written. Returns (and reports to `progress`) done/total, kept, pairs."""
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank} must be in [0, world_size={world_size})")
    ids = [problem.get("id") for problem in problems]
    if not all(isinstance(i, (str, int)) for i in ids) or len(set(ids)) != len(ids):
        raise ConfigError("PTS problems need distinct 'id's, each a string or an integer: "
                          "a resumed run tells the done ones apart by the id it wrote")
    mine, share = list(problems)[rank::world_size], set(ids[rank::world_size])
    part = part_path(output_dir, rank, world_size)
    part.parent.mkdir(parents=True, exist_ok=True)
    records = read_part(part, repair=True)
    for record in records:  # a part file resumed under other settings or problems would mix two searches
        if record.get("settings") != asdict(settings):
            raise ConfigError(f"{part} was written with settings {record.get('settings')}, not {asdict(settings)}: "
                              "resume with the same pts settings or use another output directory")
        if record["problem_id"] not in share:
            raise ConfigError(f"{part} holds problem {record['problem_id']!r}, which is not in this rank's share: "
                              "it was written for other problems or another world size")
    done_ids = {record["problem_id"] for record in records}
    state = PTSProgress(len(records), len(mine), sum(r["kept"] for r in records), sum(len(r["pairs"]) for r in records))
    remaining = [problem for problem in mine if problem["id"] not in done_ids]
    if remaining:
        _finished_marker(part).unlink(missing_ok=True)
    if progress:
        progress(state)
    with part.open("a") as f:
        for problem in remaining:
            result = search_problem(model, checker, problem, query_ids_fn(problem), decode, settings, eos_id)
            result["settings"] = asdict(settings)
            append_records(f, [result])
            state = PTSProgress(state.done + 1, state.total, state.kept + result["kept"],
                                state.pairs + len(result["pairs"]))
            if progress:
                progress(state)
    _finished_marker(part).write_text(json.dumps({"problems": len(mine)}) + "\n")
    return state


def merge_parts(output_dir: Path, out_path: Path) -> int:
    """Every rank's pairs, one JSON object a line, rank by rank, written whole or not at all.
    Refuses while a rank's part is missing or unfinished. Returns the number of pairs."""
    output_dir, out_path = Path(output_dir), Path(out_path)
    parts = {}
    for path in output_dir.glob("part-*-of-*.jsonl"):
        if match := re.fullmatch(r"part-(\d{5})-of-(\d{5})\.jsonl", path.name):
            parts[int(match[1]), int(match[2])] = path
    world_sizes = sorted({world_size for _, world_size in parts})
    if not world_sizes:
        raise ConfigError(f"{output_dir} holds no PTS part files: run PTS on every rank first")
    if len(world_sizes) > 1:
        raise ConfigError(f"{output_dir} holds the parts of runs with world sizes {world_sizes}: keep one run's parts")
    world_size = world_sizes[0]
    missing = [rank for rank in range(world_size) if (rank, world_size) not in parts]
    if missing:
        raise ConfigError(f"{output_dir}: the part files of ranks {missing} of {world_size} are missing "
                          f"(e.g. {part_path(output_dir, missing[0], world_size).name}); run those ranks first")
    unfinished = [rank for rank in range(world_size) if not _finished_marker(parts[rank, world_size]).exists()]
    if unfinished:
        raise ConfigError(f"{output_dir}: ranks {unfinished} of {world_size} have not finished; rerun them to resume")
    partial = out_path.with_name(f".{out_path.name}.partial")
    count = 0
    with partial.open("w") as f:
        for rank in range(world_size):
            for record in read_part(parts[rank, world_size], repair=False):
                for pair in record["pairs"]:
                    f.write(json.dumps(pair) + "\n")
                    count += 1
        f.flush()
        os.fsync(f.fileno())
    partial.replace(out_path)
    return count
