"""Benchmark phi4-convert at the real Phi-4 shapes: throughput and peak resident memory.

Writes a synthetic Hugging Face checkpoint of microsoft/phi-4's shapes (40 layers, hidden 5120,
FFN 17920, vocabulary 100352; random bf16, 29.3 GB) in 5 GB shards, converts it to a Megatron-Core
torch_dist checkpoint and back, each direction as its own `phi4-convert` process, and prints the
bytes, seconds, GB/s and peak resident set size (ru_maxrss of that process) of each. Needs about
2 x 29.3 GB of free disk under --workdir (the source is deleted after the first direction unless
--keep). `--layers N` runs a shorter model for a quick look.

    python bench/convert.py [--workdir DIR] [--layers 40] [--keep]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from phi4.convert.hf_config import hf_config  # noqa: E402
from phi4.convert.safetensors_io import ShardedSafetensorsWriter  # noqa: E402
from phi4.model.config import ModelConfig  # noqa: E402
from phi4.model.hf_weights import hf_shapes  # noqa: E402


def phi4_model(layers: int) -> ModelConfig:
    from phi4.settings import load_group

    values = load_group("model", ROOT / "conf/model/phi4_14b.yaml")
    return dataclasses.replace(ModelConfig.from_dict(values), num_layers=layers)


def write_synthetic_hf(directory: Path, model: ModelConfig) -> int:
    directory.mkdir(parents=True)
    plan = [(name, shape, torch.bfloat16) for name, shape in hf_shapes(model).items()]
    writer = ShardedSafetensorsWriter(directory, plan, max_shard_bytes=5 * 1000**3)
    g = torch.Generator().manual_seed(0)
    for i, (name, shape, dtype) in enumerate(plan):
        writer.write(name, torch.empty(shape, dtype=dtype).normal_(0, 0.02, generator=g))
        if i % 24 == 0:
            print(f"  synthetic checkpoint: {i + 1}/{len(plan)} tensors", file=sys.stderr, flush=True)
    writer.finish()
    (directory / "config.json").write_text(json.dumps(hf_config(model, "bfloat16"), indent=2))
    return writer.total_bytes


def timed_child(args: list[str]) -> tuple[float, float]:
    """(seconds, peak RSS in GB) of one child process."""
    started = time.perf_counter()
    proc = subprocess.Popen(args, env={**os.environ, "OMP_NUM_THREADS": str(os.cpu_count())})
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(args)} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return seconds, usage.ru_maxrss * 1024 / 1e9  # ru_maxrss is in KiB on Linux


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--layers", type=int, default=40)
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints")
    args = parser.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="phi4-bench-convert-"))
    work.mkdir(parents=True, exist_ok=True)
    model = phi4_model(args.layers)
    convert = [str(Path(sys.executable).parent / "phi4-convert")]
    src, mcore, back = work / "hf", work / "mcore", work / "hf_back"
    for d in (src, mcore, back):
        shutil.rmtree(d, ignore_errors=True)
    try:
        print(f"machine: {machine()}")
        print(f"model: {model.num_parameters():,} parameters ({args.layers} layers), bf16")
        t0 = time.perf_counter()
        size = write_synthetic_hf(src, model)
        print(f"synthetic HF checkpoint: {size / 1e9:.1f} GB in {time.perf_counter() - t0:.0f}s")
        rows = []
        for label, cmd in (
            ("hf -> mcore", [*convert, "hf-to-mcore", "--hf", str(src), "--out", str(mcore), "--no-progress"]),
            ("mcore -> hf", [*convert, "mcore-to-hf", "--ckpt", str(mcore), "--out", str(back), "--no-progress"]),
        ):
            seconds, peak = timed_child(cmd)
            rows.append((label, size, seconds, peak))
            print(f"{label}: {size / 1e9:.1f} GB in {seconds:.0f}s = {size / 1e9 / seconds:.2f} GB/s, "
                  f"peak RSS {peak:.2f} GB", flush=True)
            if label == "hf -> mcore" and not args.keep:
                shutil.rmtree(src)  # disk: at most two copies at a time
        print("\n| direction | GB | seconds | GB/s | peak RSS (GB) |\n|---|---|---|---|---|")
        for label, nbytes, seconds, peak in rows:
            print(f"| {label} | {nbytes / 1e9:.1f} | {seconds:.0f} | {nbytes / 1e9 / seconds:.2f} | {peak:.2f} |")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
