"""Benchmark the training input pipeline and the tiny model's training speed on this machine.

- data loader: samples drawn through the blended GPTDataset and collated into micro-batches
  (the Trainer's path), in tokens/s, single process;
- training: `phi4-train` on its embedded default (the tiny model, the synthetic corpus), steps/s
  and tokens/s over the last logging window, with 1 process and with 2 (TP=2 and DP=2).

    python bench/train.py [--samples 20000] [--steps 40]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def bench_loader(cache: Path, samples: int, seq: int, micro_batch: int) -> float:
    from phi4.data.blend import GlobalBatches, Source, build_datasets
    from phi4.data.formats import Collate
    from phi4.data.registry import FORMATS
    from phi4.data.corpus import ensure_corpus

    prefix = ensure_corpus(cache / "synthetic" / "bench", "arithmetic", 10000, 0)
    train, _ = build_datasets([Source("synthetic", str(prefix), 1.0)], seq, samples, 10, 0, "98,2,0", str(cache / "idx"))
    batches = GlobalBatches(train, 64, 0, 1)
    started = time.perf_counter()
    for _ in range(samples // 64):
        Collate(FORMATS["gpt"], micro_batch)(batches.next())
    return (samples // 64) * 64 * seq / (time.perf_counter() - started)


def bench_training(cache: Path, steps: int, procs: int, extra: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        overrides = [f"run_dir={run_dir}", f"train.steps={steps}", "train.log_every=10", "train.valid_every=0",
                     "checkpoint.every=0", f"data.cache_dir={cache}", *extra]
        if procs == 1:
            cmd = [str(Path(sys.executable).parent / "phi4-train"), *overrides]
        else:
            cmd = [str(Path(sys.executable).parent / "torchrun"), f"--nproc-per-node={procs}", "launch/train.py", *overrides]
        subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True, env={**os.environ, "OMP_NUM_THREADS": str(max(1, os.cpu_count() // procs))})
        records = [json.loads(l) for l in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if '"loss"' in l]
    last = records[-1]
    from omegaconf import OmegaConf

    stage = OmegaConf.load(ROOT / "conf/stage/tiny.yaml")
    tokens_per_step = stage.train.global_batch_size * stage.train.seq_length
    return dict(tokens_per_s=last["tokens_per_s"], steps_per_s=last["tokens_per_s"] / tokens_per_step)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", type=int, default=20000)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    from convert import machine  # bench/convert.py

    print(f"machine: {machine()}")
    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp)
        for seq in (64, 2048):
            rate = bench_loader(cache, args.samples if seq == 64 else args.samples // 8, seq, 4)
            print(f"data loader, sequence {seq}: {rate:,.0f} tokens/s")
        for label, procs, extra in (("1 process", 1, []), ("TP=2", 2, ["topology.tp=2"]), ("DP=2", 2, [])):
            r = bench_training(cache, args.steps, procs, extra)
            print(f"tiny model, embedded default, {label}: {r['steps_per_s']:.2f} steps/s, {r['tokens_per_s']:,.0f} tokens/s")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main()
