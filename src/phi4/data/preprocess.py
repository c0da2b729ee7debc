"""Documents -> Megatron-Core indexed dataset (`.bin`/`.idx`), tokenized in worker processes.

Input: JSONL (plain, .gz or .zst), one document a line, `{"text": "..."}` (the key is
configurable); Parquet, Arrow or a Hugging Face dataset directory, the text in a column of that
name (phi4.data.inputs). Each document is tokenized
with the Phi-4 tokenizer and ended with `<|endoftext|>`. A line that is not valid JSON, is not
an object, or lacks a string under the key, is not valid UTF-8, or that the tokenizer fails on is counted and
reported by file and line number (`file:row N` for columnar input; the first few on the console, all of them in
`<prefix>.bad_lines.txt`), never dropped silently; blank lines are counted. A document of any
length is tokenized. The `.bin`/`.idx` pair is written under temporary names and renamed only
when complete; SIGINT or SIGTERM removes them and says how far it got.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy
import torch
from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder
from tqdm import tqdm

from phi4.data.encode_worker import _encode, _init_worker
from phi4.data.inputs import check_input, disk_bytes, items
from phi4.errors import ConfigError


@dataclass
class PreprocessReport:
    documents: int = 0
    tokens: int = 0
    bad_lines: list[str] = field(default_factory=list)
    blank_lines: int = 0
    bytes_read: int = 0


class Interrupted(ConfigError):
    """SIGINT/SIGTERM during preprocess: nothing was written; the message says how far it got."""

    exit_code = 130  # a shell's code for a command ended by a signal


def _documents(paths: Iterable[Path], text_key: str, report: "PreprocessReport", bar) -> Iterator[tuple]:
    """The inputs' items for the workers, as plain tuples; blank JSONL lines are counted here."""
    for path in paths:
        for item in items(path, text_key):
            if item.payload is None and item.error is None:  # a blank line: counted, not tokenized
                report.blank_lines += 1
                report.bytes_read += item.nbytes
                bar.update(item.nbytes)
            else:
                yield tuple(item)


def preprocess(inputs: list[Path], output_prefix: Path, text_key: str = "text", workers: int = 0,
               progress: bool = True) -> PreprocessReport:
    """Tokenize `inputs` into `<output_prefix>.bin` and `.idx`. `workers=0` uses every core."""
    missing = [str(p) for p in inputs if not Path(p).exists()]
    if missing:
        raise ConfigError(f"phi4-data preprocess: input file(s) not found: {', '.join(missing)}")
    for path in inputs:  # every input's format and text column, before any work
        check_input(Path(path), text_key)
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    partial = output_prefix.parent / f".{output_prefix.name}.partial-{os.getpid()}"
    workers = workers or os.cpu_count() or 1
    total_bytes = sum(disk_bytes(Path(p)) for p in inputs)
    report = PreprocessReport()
    builder = IndexedDatasetBuilder(f"{partial}.bin", dtype=numpy.int32)
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", file=sys.stderr,
               disable=not progress, mininterval=1.0)
    try:
        # spawn, not fork: the caller may already run process-group threads (phi4-train does)
        with _sigterm_as_interrupt(), multiprocessing.get_context("spawn").Pool(workers, _init_worker, (text_key,)) as pool:
            for source, where, nbytes, ids, error in pool.imap(_encode, _documents(inputs, text_key, report, bar), chunksize=64):
                if ids is None:
                    report.bad_lines.append(f"{source}:{where}: {error}")
                else:
                    builder.add_item(torch.tensor(ids, dtype=torch.int32))
                    builder.end_document()
                    report.documents += 1
                    report.tokens += len(ids)
                report.bytes_read += nbytes
                bar.update(nbytes)
        builder.finalize(f"{partial}.idx")
        bar.update(total_bytes - bar.n)
    except BaseException as err:
        for suffix in (".bin", ".idx"):
            Path(f"{partial}{suffix}").unlink(missing_ok=True)
        if isinstance(err, KeyboardInterrupt):
            raise Interrupted(f"phi4-data preprocess: stopped by {err.args[0] if err.args else 'SIGINT'} after "
                              f"{report.documents} documents ({report.bytes_read / max(total_bytes, 1):.0%} of the input); "
                              f"nothing was written to {output_prefix}") from None
        raise
    finally:
        bar.close()
    if report.documents == 0:
        for suffix in (".bin", ".idx"):
            Path(f"{partial}{suffix}").unlink(missing_ok=True)
        raise ConfigError(f"phi4-data preprocess: no valid documents in {', '.join(map(str, inputs))} "
                          f"({len(report.bad_lines)} bad lines, e.g. {report.bad_lines[:1]})")
    bad_path = Path(f"{output_prefix}.bad_lines.txt")
    if report.bad_lines:
        bad_path.write_text("\n".join(report.bad_lines) + "\n")
    else:
        bad_path.unlink(missing_ok=True)
    for suffix in (".bin", ".idx"):
        os.replace(f"{partial}{suffix}", f"{output_prefix}{suffix}")
    return report


@contextlib.contextmanager
def _sigterm_as_interrupt():
    """SIGTERM stops preprocess the way Ctrl-C does, so that its clean-up runs (main thread only:
    elsewhere Python cannot install a handler)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise KeyboardInterrupt("SIGTERM")

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
