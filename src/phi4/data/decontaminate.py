"""Benchmark decontamination: training documents that share an n-gram of normalized words with any
evaluation item are dropped (or written to a separate file), as the Phi-4 report does with 13-grams.

Words are normalized before they are compared: Unicode NFKC, case-folded, split into runs of
letters and digits (`\\w+`), so re-cased, re-spaced or re-punctuated copies still match. Each
n-gram is a 64-bit polynomial hash over 64-bit word hashes (BLAKE2b), computed for a whole
document with a few numpy operations; an evaluation set becomes one sorted array of such hashes,
so memory is set by the evaluation sets and each worker process streams the training data
through a binary search. Distinct n-grams collide with probability about 2^-64 per pair.

An evaluation item shorter than n words cannot share an n-gram with anything; such items are
counted in the report rather than silently ignored. Every output is written under a temporary
name and renamed only when the whole input has been read.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import re
import sys
import time
import unicodedata
from collections import Counter, deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy
from tqdm import tqdm

from phi4.data.jsonl import checked_records
from phi4.data.tokenizer import get_tokenizer
from phi4.errors import ConfigError

EVAL_KEYS = ("prompt", "question", "problem", "text", "solution", "answer", "messages")
_WORD = re.compile(r"\w+")
_MULTIPLIER = numpy.uint64(0x100000001B3)  # odd: multiplication is a bijection modulo 2^64
_word_cache: dict[str, int] = {}


def normalized_words(text: str) -> list[str]:
    return _WORD.findall(unicodedata.normalize("NFKC", text).casefold())


def _word_hash(word: str) -> int:
    value = _word_cache.get(word)
    if value is None:
        if len(_word_cache) > 2_000_000:  # bound a worker's memory on a corpus with a huge vocabulary
            _word_cache.clear()
        value = _word_cache[word] = int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little")
    return value


def ngram_hashes(words: list[str], n: int) -> numpy.ndarray:
    """The hash of every run of n consecutive words (none when there are fewer than n)."""
    if len(words) < n:
        return numpy.empty(0, dtype=numpy.uint64)
    w = numpy.fromiter(map(_word_hash, words), dtype=numpy.uint64, count=len(words))
    count = len(words) - n + 1
    h = numpy.zeros(count, dtype=numpy.uint64)
    with numpy.errstate(over="ignore"):
        for j in range(n):
            h = h * _MULTIPLIER + w[j : j + count]
    return h


def _texts(value) -> Iterator[str]:
    """The strings in an evaluation record's field (a chat's messages give their contents)."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
        yield str(value)
    elif isinstance(value, list):
        for v in value:
            yield from _texts(v.get("content") if isinstance(v, dict) else v)


@dataclass
class EvalSetReport:
    path: str
    items: int = 0
    too_short: int = 0  # items with no field of n words or more: they cannot be checked
    ngrams: int = 0
    found_in_training: int = 0  # items sharing an n-gram with at least one training document


@dataclass
class EvalNgrams:
    n: int
    hashes: numpy.ndarray  # sorted, unique
    owners: dict  # hash -> indices of the items it came from (for the report)
    sets: list[EvalSetReport]
    item_set: list[int]  # item index -> its evaluation set

    @classmethod
    def build(cls, paths: list[Path], n: int, keys: Iterable[str] = EVAL_KEYS) -> "EvalNgrams":
        keys = tuple(keys)
        owners: dict[int, list[int]] = {}
        sets, item_set = [], []
        for set_index, path in enumerate(map(Path, paths)):
            if not path.is_file():
                raise ConfigError(f"--eval {path}: not found (a JSONL of evaluation items)")
            report = EvalSetReport(str(path))
            set_hashes: set[int] = set()
            for where, record in checked_records(path, "--eval "):
                if not isinstance(record, dict):
                    raise ConfigError(f"--eval {where}: an evaluation item is a JSON object")
                item = len(item_set)
                item_set.append(set_index)
                report.items += 1
                found = set()
                for key in keys:
                    for text in _texts(record.get(key)):
                        found.update(ngram_hashes(normalized_words(text), n).tolist())
                if not found:
                    report.too_short += 1
                set_hashes |= found
                for h in found:
                    owners.setdefault(h, []).append(item)
            report.ngrams = len(set_hashes)
            sets.append(report)
        if not owners:
            raise ConfigError(f"--eval: no item of {', '.join(map(str, paths))} has {n} words in a field "
                              f"({', '.join(keys)}); lower --ngram or name the fields with --eval-keys")
        hashes = numpy.array(sorted(owners), dtype=numpy.uint64)
        return cls(n, hashes, owners, sets, item_set)


# --- the workers: each gets the evaluation hashes once, then batches of lines ---------------------
_HASHES: numpy.ndarray = numpy.empty(0, dtype=numpy.uint64)
_N = 13
_TEXT_KEY = "text"


def _init_worker(hashes: numpy.ndarray, n: int, text_key: str) -> None:
    global _HASHES, _N, _TEXT_KEY
    _HASHES, _N, _TEXT_KEY = hashes, n, text_key


def matches(text: str, hashes: numpy.ndarray, n: int) -> numpy.ndarray:
    """The evaluation n-gram hashes that occur in `text` (unique)."""
    h = ngram_hashes(normalized_words(text), n)
    if not len(h):
        return h
    at = numpy.minimum(numpy.searchsorted(hashes, h), len(hashes) - 1)
    return numpy.unique(h[hashes[at] == h])


def _check_lines(lines: list[bytes]) -> list[tuple]:
    """Per line: ("keep",), ("remove", tokens, matched hashes) or ("bad", reason)."""
    out = []
    for line in lines:
        try:
            record = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as err:  # every JSONL reader's policy: a bad line, never replaced bytes
            out.append(("bad", f"not valid UTF-8 (byte {err.start} of the line)"))
            continue
        except json.JSONDecodeError as err:
            out.append(("bad", f"not valid JSON ({err.msg} at column {err.colno})"))
            continue
        text = record.get(_TEXT_KEY) if isinstance(record, dict) else None
        if not isinstance(text, str):
            out.append(("bad", f"no string under the key {_TEXT_KEY!r}"))
            continue
        found = matches(text, _HASHES, _N)
        if len(found):
            out.append(("remove", len(get_tokenizer().encode(text, allow_special=False)), found.tolist()))
        else:
            out.append(("keep",))
    return out


# --- the driver ------------------------------------------------------------------------------------
@dataclass
class SourceReport:
    path: str
    output: str
    documents: int = 0
    removed_documents: int = 0
    removed_tokens: int = 0
    bytes: int = 0
    bad_lines: list[str] = field(default_factory=list)


@dataclass
class DecontaminationReport:
    ngram: int
    workers: int
    seconds: float
    sources: list[SourceReport]
    eval_sets: list[EvalSetReport]

    @property
    def documents(self) -> int:
        return sum(s.documents for s in self.sources)

    def throughput(self) -> str:
        mb = sum(s.bytes for s in self.sources) / 1e6
        per = max(self.seconds, 1e-9) * self.workers
        return (f"{self.documents} documents, {mb:.1f} MB in {self.seconds:.1f} s on {self.workers} worker(s): "
                f"{self.documents / per:,.0f} documents/s and {mb / per:.2f} MB/s per worker")


def _batches(path: Path, lines_per_batch: int) -> Iterator[list[bytes]]:
    with open(path, "rb") as f:
        batch = []
        for line in f:
            batch.append(line)
            if len(batch) == lines_per_batch:
                yield batch
                batch = []
        if batch:
            yield batch


def _outputs(inputs: list[Path], output_dir: Path) -> list[Path]:
    outputs = [output_dir / p.name for p in inputs]
    shared = sorted(name for name, count in Counter(p.name for p in inputs).items() if count > 1)
    if shared:
        raise ConfigError(f"--input: two inputs share a file name, and each is written to --output-dir under its own "
                          f"name: {', '.join(shared)}")
    clash = [str(p) for p, out in zip(inputs, outputs) if out.resolve() == p.resolve()]
    if clash:
        raise ConfigError(f"--output-dir {output_dir} would overwrite the input {clash[0]}: choose another directory")
    return outputs


def decontaminate(inputs: list[Path], eval_paths: list[Path], output_dir: Path, n: int = 13, text_key: str = "text",
                  eval_keys: Iterable[str] = EVAL_KEYS, removed_path: Optional[Path] = None, workers: int = 0,
                  progress: bool = True, lines_per_batch: int = 256) -> DecontaminationReport:
    """Copy each input JSONL to `output_dir` without the documents that share an n-gram with the
    evaluation sets; those go to `removed_path` when given."""
    if n < 1:
        raise ConfigError(f"--ngram {n} must be at least 1")
    inputs = [Path(p) for p in inputs]
    missing = [str(p) for p in inputs if not p.is_file()]
    if missing:
        raise ConfigError(f"--input: not found: {', '.join(missing)}")
    output_dir = Path(output_dir)
    outputs = _outputs(inputs, output_dir)
    if removed_path is not None and Path(removed_path).resolve() in {p.resolve() for p in inputs + outputs}:
        raise ConfigError(f"--removed {removed_path} is also an input or an output")
    ngrams = EvalNgrams.build(list(map(Path, eval_paths)), n, eval_keys)
    workers = workers or os.cpu_count() or 1
    output_dir.mkdir(parents=True, exist_ok=True)
    partials = [out.with_name(f".{out.name}.partial-{os.getpid()}") for out in outputs]
    removed_partial = None
    if removed_path is not None:
        removed_path = Path(removed_path)
        removed_path.parent.mkdir(parents=True, exist_ok=True)
        removed_partial = removed_path.with_name(f".{removed_path.name}.partial-{os.getpid()}")
    sources = [SourceReport(str(p), str(out)) for p, out in zip(inputs, outputs)]
    items_found: set[int] = set()
    total_bytes = sum(p.stat().st_size for p in inputs)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="decontaminating", file=sys.stderr,
               disable=not progress, mininterval=1.0)
    started = time.perf_counter()
    removed_file = open(removed_partial, "wb") if removed_partial else None
    try:
        with multiprocessing.get_context("spawn").Pool(workers, _init_worker, (ngrams.hashes, n, text_key)) as pool:
            for source, path, partial in zip(sources, inputs, partials):
                with open(partial, "wb") as kept:
                    line_no = 0
                    pending: deque = deque()  # at most 2 batches per worker in flight: memory stays bounded

                    def drain_one():
                        nonlocal line_no
                        lines, result = pending.popleft()
                        nbytes = sum(len(line) for line in lines)
                        source.bytes += nbytes
                        for line, verdict in zip(lines, result.get()):
                            line_no += 1
                            if not line.strip():
                                continue
                            if verdict[0] == "bad":
                                source.bad_lines.append(f"{path}:{line_no}: {verdict[1]}")
                                continue
                            source.documents += 1
                            if verdict[0] == "keep":
                                kept.write(line if line.endswith(b"\n") else line + b"\n")
                                continue
                            source.removed_documents += 1
                            source.removed_tokens += verdict[1]
                            for h in verdict[2]:
                                items_found.update(ngrams.owners.get(h, ()))
                            if removed_file:
                                removed_file.write(line if line.endswith(b"\n") else line + b"\n")
                        bar.update(nbytes)

                    for batch in _batches(path, lines_per_batch):
                        pending.append((batch, pool.apply_async(_check_lines, (batch,))))
                        if len(pending) >= 2 * workers:
                            drain_one()
                    while pending:
                        drain_one()
        if removed_file:
            removed_file.close()
        for partial, out in zip(partials, outputs):
            os.replace(partial, out)
        if removed_partial:
            os.replace(removed_partial, removed_path)
    except BaseException:
        if removed_file and not removed_file.closed:
            removed_file.close()
        for partial in partials + ([removed_partial] if removed_partial else []):
            partial.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
    for item in items_found:
        ngrams.sets[ngrams.item_set[item]].found_in_training += 1
    report = DecontaminationReport(n, workers, time.perf_counter() - started, sources, ngrams.sets)
    summary = asdict(report)
    for s in summary["sources"]:
        s["bad_lines"] = len(s["bad_lines"])
    (output_dir / "decontamination.json").write_text(json.dumps(summary, indent=2) + "\n")
    return report
