"""Benchmark phi4-data decontaminate: documents/s and MB/s per worker process, streaming a
generated corpus against a generated evaluation set with a known share of planted copies.

    python bench/decontaminate.py [--docs 20000] [--words 400] [--eval-items 5000] [--workers 1 2]

The text is words of 2-10 random letters drawn from a 50,000-word vocabulary with Zipf's law
(about the length and repetition of English words); 1% of the documents carry a 20-word window
of an evaluation item, and the benchmark checks that exactly those are removed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _corpus(directory: Path, docs: int, words: int, eval_items: int, seed: int = 0) -> set[int]:
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 10)))
             for _ in range(50_000)]
    cumulative, total = [], 0.0
    for rank in range(len(vocab)):
        total += 1 / (rank + 1)
        cumulative.append(total)

    def text(n: int) -> list[str]:
        return rng.choices(vocab, cum_weights=cumulative, k=n)

    items = [text(40) for _ in range(eval_items)]
    with (directory / "eval.jsonl").open("w") as f:
        for i, item in enumerate(items):
            f.write(json.dumps({"id": i, "question": " ".join(item)}) + "\n")
    planted = set(rng.sample(range(docs), docs // 100))
    with (directory / "train.jsonl").open("w") as f:
        for d in range(docs):
            body = text(rng.randint(words // 2, 3 * words // 2))
            if d in planted:
                item = rng.choice(items)
                start = rng.randrange(len(item) - 20)
                at = rng.randrange(len(body))
                body[at:at] = item[start : start + 20]
            f.write(json.dumps({"text": " ".join(body), "doc": d}) + "\n")
    return planted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=20_000)
    parser.add_argument("--words", type=int, default=400, help="mean words per document")
    parser.add_argument("--eval-items", type=int, default=5000)
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    from phi4.data.decontaminate import EvalNgrams, decontaminate

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        started = time.perf_counter()
        planted = _corpus(root, args.docs, args.words, args.eval_items)
        size = (root / "train.jsonl").stat().st_size / 1e6
        print(f"corpus: {args.docs} documents, {size:.1f} MB; eval: {args.eval_items} items of 40 words; "
              f"{len(planted)} planted copies (made in {time.perf_counter() - started:.1f} s)")
        started = time.perf_counter()
        ngrams = EvalNgrams.build([root / "eval.jsonl"], 13)
        print(f"eval 13-grams: {len(ngrams.hashes)} ({ngrams.hashes.nbytes / 1e6:.1f} MB as hashes), "
              f"indexed in {time.perf_counter() - started:.2f} s")
        print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores")
        for workers in args.workers:
            report = decontaminate([root / "train.jsonl"], [root / "eval.jsonl"], root / f"out{workers}",
                                   removed_path=root / f"removed{workers}.jsonl", workers=workers, progress=False)
            removed = {json.loads(l)["doc"] for l in (root / f"removed{workers}.jsonl").read_text().splitlines()}
            assert removed == planted, (len(removed), len(planted))
            print(f"workers {workers}: {report.throughput()} (all {len(planted)} planted copies removed, nothing else)")


if __name__ == "__main__":
    main()
