"""Tokenization throughput and index build time at scale, on this machine.

1. `phi4-data preprocess` per worker: the same synthetic corpus as JSONL, JSONL.zst and Parquet,
   with 1 and 2 tokenizer processes (tokens/s, and per worker).
2. The array job on the two-node test SLURM cluster (tests/slurm_cluster.py, nodes in network
   namespaces; needs root, SLURM and iproute2): `phi4-data preprocess --tasks 4 --submit`, from
   submission to the manifest job's end.
3. Megatron-Core's dataset indices (`phi4-data index`'s work) for a blend of three sources, one
   of them in many shards: cold (built) and warm (read from the cache).

    .venv/bin/python bench/preprocess.py [--mb 20] [--shards 64] [--no-cluster]
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
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
PHI4_DATA = Path(sys.executable).parent / "phi4-data"
sys.path.insert(0, str(ROOT / "tests"))  # the test cluster and the index helpers


def corpus(directory: Path, megabytes: float) -> dict:
    """One JSONL of synthetic documents of about `megabytes`, and the same as .zst and Parquet."""
    import pyarrow
    import pyarrow.parquet
    import zstandard

    from phi4.data.synth import write_synthetic_jsonl

    jsonl = directory / "docs.jsonl"
    parts, size, seed = [], 0, 0
    while size < megabytes * 1e6:
        part = directory / f"part{seed}.jsonl"
        write_synthetic_jsonl(part, 20000, seed=seed)
        parts.append(part)
        size += part.stat().st_size
        seed += 1
    with jsonl.open("wb") as out:
        for part in parts:
            out.write(part.read_bytes())
            part.unlink()
    raw = jsonl.read_bytes()
    (directory / "docs.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(raw))
    texts = [json.loads(line)["text"] for line in raw.splitlines()]
    pyarrow.parquet.write_table(pyarrow.table({"text": texts}), directory / "docs.parquet", row_group_size=10000)
    return {"JSONL": jsonl, "JSONL.zst": directory / "docs.jsonl.zst", "Parquet": directory / "docs.parquet"}


def per_worker(files: dict, out: Path) -> None:
    from phi4.data.preprocess import preprocess

    print("| input | bytes on disk | workers | seconds | tokens/s | per worker |")
    print("|---|---|---|---|---|---|")
    for name, path in files.items():
        for workers in (1, 2):
            start = time.perf_counter()
            report = preprocess([path], out / f"{name}-{workers}", workers=workers, progress=False)
            seconds = time.perf_counter() - start
            rate = report.tokens / seconds
            print(f"| {name} | {path.stat().st_size / 1e6:.1f} MB | {workers} | {seconds:.1f} | {rate / 1e6:.2f}M "
                  f"| {rate / workers / 1e6:.2f}M |", flush=True)


def on_the_test_cluster(jsonl: Path, work: Path, tasks: int = 4) -> None:
    import netns
    import yaml
    from slurm_cluster import SlurmCluster, missing_reason

    reason = missing_reason() or netns.missing_reason()
    if reason:
        print(f"(the two-node cluster cannot start here: {reason})")
        return
    inputs = []
    lines = jsonl.read_bytes().splitlines(keepends=True)
    for i in range(2 * tasks):  # 8 files, two a task
        path = work / "in" / f"part{i}.jsonl"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"".join(lines[i::2 * tasks]))
        inputs.append(path)
    listed = work / "inputs.txt"
    listed.write_text("".join(f"{p}\n" for p in inputs))
    settings = yaml.safe_load((ROOT / "conf/cluster/local_cpu.yaml").read_text())
    settings["python"] = sys.executable
    (work / "cluster.yaml").write_text(yaml.safe_dump(settings))
    netns.remove_stale()
    cluster = SlurmCluster(work / "slurm", nodes=2).start()
    try:
        start = time.perf_counter()
        out = subprocess.run([str(PHI4_DATA), "preprocess", "--input-list", str(listed), "--output-prefix",
                              str(work / "out" / "web"), "--tasks", str(tasks), "--submit", "--cluster",
                              str(work / "cluster.yaml")], env={**cluster.env, "OMP_NUM_THREADS": "1"},
                             capture_output=True, text=True, check=True)
        manifest_job = out.stdout.split("manifest job ")[1].split()[0]
        state = cluster.wait([manifest_job], timeout=1800, poll=0.5)
        seconds = time.perf_counter() - start
    finally:
        cluster.stop()
    manifest = json.loads((work / "out" / "web.manifest.json").read_text())
    print(f"\narray of {tasks} tasks (1 tokenizer process each) on 2 nodes x {cluster.cpus} CPUs, "
          f"{sum(p.stat().st_size for p in inputs) / 1e6:.1f} MB of JSONL: {state[manifest_job]}, "
          f"{manifest['tokens']} tokens in {seconds:.1f} s from submission to the manifest "
          f"({manifest['tokens'] / seconds / 1e6:.2f}M tokens/s)")


def index_build(work: Path, shards: int) -> None:
    import numpy
    from helpers import write_indexed

    from phi4.data.formats import FORMATS, run_datasets
    from phi4.settings import Source

    rng = numpy.random.default_rng(0)
    def documents(count):
        return [rng.integers(0, 100000, int(n)).tolist() for n in rng.integers(20, 300, count)]

    for i in range(shards):
        write_indexed(work / "web" / f"shard_{i:05d}", documents(5000))
    write_indexed(work / "code", documents(50000))
    write_indexed(work / "math", documents(50000))
    sources = [Source(name="web", path=str(work / "web" / "shard_*"), weight=0.6),
               Source(name="code", path=str(work / "code"), weight=0.25),
               Source(name="math", path=str(work / "math"), weight=0.15)]
    data = SimpleNamespace(cache_dir=str(work / "cache"), split="998,2,0")
    train = SimpleNamespace(valid_samples=256, seq_length=4096, global_batch_size=1024, valid_per_source=True,
                            valid_every=100)
    fmt = FORMATS["gpt"]
    print(f"\nindices for a blend of 3 sources ({shards} + 1 + 1 shards, {shards * 5000 + 100000} documents), "
          f"1000 steps x 1024 samples of 4096 tokens:")
    for which in ("cold", "warm"):
        start = time.perf_counter()
        fmt.check_files(data, sources, 100352)
        built = run_datasets(data, fmt, sources, train, 1000, seed=1234)
        print(f"  {which}: {time.perf_counter() - start:.2f} s ({built.made} files written)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=20, help="corpus size (MB of JSONL)")
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--no-cluster", action="store_true")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="phi4-bench-") as tmp:
        work = Path(tmp)
        (work / "corpus").mkdir()
        files = corpus(work / "corpus", args.mb)
        per_worker(files, work / "out")
        if not args.no_cluster:
            (work / "array").mkdir()
            on_the_test_cluster(files["JSONL"], work / "array")
        (work / "index").mkdir()
        index_build(work / "index", args.shards)


if __name__ == "__main__":
    main()
