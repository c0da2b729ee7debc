"""Tokenizing a corpus across nodes: `phi4-data preprocess` as a SLURM array job, one task per
group of input files and one shard per task, then `phi4-data manifest`, which checks the shards
and writes the source's manifest (a training source's `path` may name it).

    phi4-data preprocess --input-list web.txt --output-prefix /data/web/shard --tasks 64 --submit [--cluster h100]

submits `--array=0-63` (each task: `--task $SLURM_ARRAY_TASK_ID`, its tokenizers one per CPU SLURM
gave it) and, after it (afterok), the manifest job. The input list is split into `--tasks`
contiguous groups of about equal bytes (in the list's order, none empty), so the shards read in
order hold the documents a one-process run of the whole list would write, in the same order.

Task `i` writes `<prefix>_<i:05d>.bin/.idx` (renamed into place when whole) and then
`<prefix>_<i:05d>.done.json`: its inputs (size and modification time each), text key, documents
and tokens. A task whose shard is done for the same inputs skips it, so a rerun of the array after
a failure only redoes what did not finish. The manifest (`<prefix>.manifest.json`) lists the
shards relative to its own directory, with their documents and tokens.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

from phi4.data.check import check_tokens
from phi4.data.inputs import disk_bytes
from phi4.errors import ConfigError

VOCAB_SIZE = 100352  # the Phi-4 tokenizer's ids (phi4.data.tokenizer.Phi4Tokenizer.vocab_size)
MANIFEST_FORMAT = "phi4-shards/1"


def shard_name(prefix: Path, task: int) -> Path:
    return Path(f"{prefix}_{task:05d}")


def _done_path(shard: Path) -> Path:
    return Path(f"{shard}.done.json")


def read_input_list(path: Path) -> list[Path]:
    """One input a line (blank lines and `#` comments skipped); relative paths are relative to
    the list's directory."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as err:
        raise ConfigError(f"--input-list {path}: cannot be read ({err.strerror})") from None
    base = Path(path).resolve().parent
    inputs = [base / line.strip() if not Path(line.strip()).is_absolute() else Path(line.strip())
              for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not inputs:
        raise ConfigError(f"--input-list {path}: lists no input")
    return inputs


def task_groups(sizes: list[int], tasks: int) -> list[range]:
    """`tasks` contiguous, non-empty groups of the inputs (by index), each about an equal share of
    the bytes: input i goes to the group its first byte falls in, held back or pushed on only as
    far as it takes for every group to get at least one input."""
    count = len(sizes)
    if tasks < 1:
        raise ConfigError(f"--tasks={tasks}: give at least 1")
    if tasks > count:
        raise ConfigError(f"--tasks={tasks} is more than the {count} input files; give at most {count}")
    total, start, group, bounds = max(sum(sizes), 1), 0, 0, [0]
    for i, size in enumerate(sizes):
        wanted = start * tasks // total
        lowest, highest = max(group, tasks - (count - i)), min(group + 1, i, tasks - 1)
        chosen = min(max(wanted, lowest), highest)
        if chosen > group:
            bounds.append(i)
            group = chosen
        start += size
    bounds.append(count)
    return [range(a, b) for a, b in zip(bounds, bounds[1:])]


def _stamps(inputs: list[Path]) -> list[dict]:
    out = []
    for path in inputs:
        stat = Path(path).stat()
        out.append(dict(path=str(Path(path).resolve()), bytes=disk_bytes(Path(path)), mtime_ns=stat.st_mtime_ns))
    return out


def _is_done(shard: Path, stamps: list[dict], text_key: str) -> Optional[dict]:
    """The shard's record when it is whole and was made from exactly these inputs, else None."""
    try:
        done = json.loads(_done_path(shard).read_text())
        whole = all(Path(f"{shard}{s}").stat().st_size == done["files"][s] for s in (".bin", ".idx"))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return done if whole and done.get("inputs") == stamps and done.get("text_key") == text_key else None


def run_task(inputs: list[Path], prefix: Path, task: int, tasks: int, text_key: str, workers: int,
             progress: bool) -> tuple[Path, dict, bool]:
    """Preprocess task `task`'s group of `inputs` into its shard; (shard, its record, skipped)."""
    if not 0 <= task < tasks:
        raise ConfigError(f"--task={task}: valid 0-{tasks - 1} (--tasks={tasks})")
    missing = [str(p) for p in inputs if not Path(p).exists()]
    if missing:
        raise ConfigError(f"phi4-data preprocess: input file(s) not found: {', '.join(missing[:5])}"
                          + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    group = [inputs[i] for i in task_groups([disk_bytes(Path(p)) for p in inputs], tasks)[task]]
    shard, stamps = shard_name(prefix, task), _stamps(group)
    done = _is_done(shard, stamps, text_key)
    if done is not None:
        return shard, done, True
    _done_path(shard).unlink(missing_ok=True)  # a shard being re-made is not done until it is whole again
    from phi4.data.preprocess import preprocess  # lazy: torch and Megatron-Core (6 s), only to tokenize

    report = preprocess(group, shard, text_key, workers, progress)
    done = dict(task=task, tasks=tasks, text_key=text_key, inputs=stamps, documents=report.documents,
                tokens=report.tokens, bad_lines=len(report.bad_lines),
                files={s: Path(f"{shard}{s}").stat().st_size for s in (".bin", ".idx")})
    partial = _done_path(shard).with_name(f".{_done_path(shard).name}.{os.getpid()}")
    partial.write_text(json.dumps(done, indent=1) + "\n")
    os.replace(partial, _done_path(shard))
    return shard, done, False


def write_manifest(prefix: Path, vocab_size: int = VOCAB_SIZE) -> tuple[Path, dict]:
    """Check every shard of `prefix` (all tasks done, for one task count, each input once, each
    shard whole and within the vocabulary) and write `<prefix>.manifest.json`."""
    prefix = Path(prefix)
    records = {}
    for path in sorted(prefix.parent.glob(f"{prefix.name}_*.done.json")):
        try:
            records[path] = json.loads(path.read_text())
            int(records[path]["task"]), int(records[path]["tasks"])
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path}: not a shard record ({type(err).__name__}: {err}); rerun its task") from None
    if not records:
        raise ConfigError(f"no shard of {prefix} is done (no {prefix}_NNNNN.done.json); run "
                          f"`phi4-data preprocess ... --output-prefix {prefix} --tasks N` first")
    counts = sorted({r["tasks"] for r in records.values()})
    if len(counts) > 1:
        raise ConfigError(f"the shards of {prefix} come from runs of {' and '.join(map(str, counts))} tasks; "
                          f"remove the stale ones and rerun")
    tasks = counts[0]
    by_task = {r["task"]: (path, r) for path, r in records.items()}
    missing = [t for t in range(tasks) if t not in by_task]
    if missing:
        listed = ",".join(map(str, missing))
        raise ConfigError(f"{len(missing)} of the {tasks} shards of {prefix} are not done (tasks {listed}); rerun them "
                          f"(sbatch --array={listed} ..., or phi4-data preprocess ... --task N): done shards are skipped")
    seen: dict[str, int] = {}
    shards = []
    for task in range(tasks):
        shard, record = shard_name(prefix, task), by_task[task][1]
        for stamp in record["inputs"]:
            if stamp["path"] in seen:
                raise ConfigError(f"{stamp['path']} is in shard {seen[stamp['path']]} and shard {task} of {prefix}")
            seen[stamp["path"]] = task
        if _is_done(shard, record["inputs"], record["text_key"]) is None:
            raise ConfigError(f"{shard}: its .bin/.idx are not the ones {_done_path(shard).name} records, or an input "
                              f"changed since; rerun task {task}")
        check_tokens(str(shard), vocab_size, f"shard {task}")
        shards.append(dict(prefix=os.path.relpath(shard, prefix.parent), task=task, documents=record["documents"],
                           tokens=record["tokens"], inputs=[s["path"] for s in record["inputs"]]))
    manifest = dict(format=MANIFEST_FORMAT, shards=shards, documents=sum(s["documents"] for s in shards),
                    tokens=sum(s["tokens"] for s in shards))
    path = Path(f"{prefix}.manifest.json")
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(partial, path)
    return path, manifest


def manifest_prefixes(path: Path, setting: str) -> list[str]:
    """The shard prefixes a manifest lists, as paths (relative ones from the manifest's directory)."""
    try:
        manifest = json.loads(Path(path).read_text())
        assert manifest.get("format") == MANIFEST_FORMAT, f"format {manifest.get('format')!r}"
        return [str(Path(path).parent / s["prefix"]) for s in manifest["shards"]]
    except (OSError, ValueError, KeyError, TypeError, AssertionError) as err:
        raise ConfigError(f"{setting}: {path} is not a shard manifest ({type(err).__name__}: {err}); "
                          f"write it with `phi4-data manifest --output-prefix PREFIX`") from None


def submit(inputs: Optional[list[Path]], inputs_list: Optional[Path], prefix: Path, tasks: int, text_key: str,
           cluster_name: str, dry_run: bool = False, python: Optional[str] = None) -> tuple[str, str]:
    """sbatch the array of `tasks` preprocess tasks and, after it, the manifest job; (array id,
    manifest job id). The cluster file's `preprocess` entry sizes a task (cpus_per_task,
    time_limit, mem, and partition, account, qos where they differ from the stages': a value left
    null is the cluster's). `inputs` (not a list file) are written to `<prefix>.inputs.txt` for the
    tasks, once everything else is checked."""
    from phi4.runtime.cluster import ROOT, load_cluster  # lazy: OmegaConf and the cluster files, only for --submit

    cluster = load_cluster(cluster_name)
    listed = read_input_list(inputs_list) if inputs_list is not None else [Path(p).resolve() for p in inputs]
    task_groups([0] * len(listed), tasks)  # as many inputs as tasks at least
    written = None
    if inputs_list is None:
        inputs_list = written = Path(f"{prefix}.inputs.txt")
    job = {**cluster, **{k: v for k, v in (cluster.get("preprocess") or {}).items() if v is not None}}
    prefix = Path(prefix).resolve()
    logs = prefix.parent / "logs"
    options = [f"--time={job.get('time_limit') or '04:00:00'}", "--nodes=1", "--ntasks=1",
               f"--cpus-per-task={int(job.get('cpus_per_task') or 1)}", f"--chdir={ROOT}"]
    for key, option in (("partition", "--partition"), ("account", "--account"), ("qos", "--qos"), ("mem", "--mem")):
        if job.get(key) is not None:
            options.append(f"{option}={job[key]}")
    python = python or cluster.get("python") or sys.executable
    setup = "".join(f"{step}; " for step in cluster.get("setup") or [])
    data = [python, "-m", "phi4.cli.data"]
    task = shlex.join([*data, "preprocess", "--input-list", str(Path(inputs_list).resolve()), "--output-prefix",
                       str(prefix), "--tasks", str(tasks), "--text-key", text_key, "--no-progress"])
    array = ["sbatch", "--parsable", f"--job-name=phi4-preprocess-{prefix.name}", f"--array=0-{tasks - 1}",
             f"--output={logs / f'{prefix.name}-%A_%a.out'}", *options,
             f"--wrap={setup}exec {task} --task $SLURM_ARRAY_TASK_ID --workers $SLURM_CPUS_PER_TASK"]
    manifest = shlex.join([*data, "manifest", "--output-prefix", str(prefix)])
    after = ["sbatch", "--parsable", f"--job-name=phi4-manifest-{prefix.name}", f"--output={logs / f'{prefix.name}-manifest-%j.out'}",
             *[o for o in options if not o.startswith("--cpus-per-task")], "--kill-on-invalid-dep=yes"]
    if dry_run:
        if written:
            print(f"# the tasks would read {written}: {len(listed)} inputs")
        print(shlex.join(array))
        print(shlex.join([*after, "--dependency=afterok:<array>", f"--wrap={setup}exec {manifest}"]))
        return "<array>", "<manifest>"
    made = [d for d in (logs, *logs.parents) if not d.exists()]
    logs.mkdir(parents=True, exist_ok=True)
    if written:
        written.write_text("".join(f"{p}\n" for p in listed))
    try:
        array_id = _sbatch(array)
    except ConfigError:  # nothing queued: nothing left behind
        if written:
            written.unlink(missing_ok=True)
        for directory in made:  # the ones this made, innermost first
            directory.rmdir()
        raise
    manifest_id = _sbatch([*after, f"--dependency=afterok:{array_id}", f"--wrap={setup}exec {manifest}"])
    return array_id, manifest_id


def _sbatch(command: list[str]) -> str:
    try:
        out = subprocess.run(command, capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise ConfigError("--submit: sbatch is not on PATH (run it on a SLURM login node)") from None
    if out.returncode != 0:
        said = out.stderr.strip().splitlines() or [""]
        raise ConfigError(f"--submit: sbatch failed ({out.returncode}): {said[-1]}")  # its last line is the reason
    return out.stdout.strip().split(";")[0]
