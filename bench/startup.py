"""What a phi4 process costs to start and to run a few steps on the CPU, in CPU-seconds (user + sys,
from the children's rusage) and page faults: Megatron-Core imported with and without phi4's import
hook (torch.compile a no-op where CUDA is absent), and a 10-step tiny run with one and two threads.

    .venv/bin/python bench/startup.py [--repeat 2]

Each figure is the median over --repeat runs, one process at a time; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable


def measure(argv: list[str], env: dict) -> tuple[float, float, float, int]:
    """(wall s, user s, sys s, minor page faults) of one child process run to its end."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    subprocess.run(argv, env=env, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return (wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime,
            after.ru_minflt - before.ru_minflt)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    base = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    with tempfile.TemporaryDirectory() as tmp:
        train = [PYTHON, "-m", "phi4.cli.train", "train.steps=10", "optim.warmup_steps=0", "train.valid_every=0",
                 "eval.every=0", "checkpoint.every=0", "train.tensorboard=false"]
        cases = {
            "import megatron.core (no phi4 first: torch.compile as shipped)": (
                [PYTHON, "-c", "import megatron.core"], base),
            "import phi4, then megatron.core (torch.compile a no-op)": (
                [PYTHON, "-c", "import phi4, megatron.core"], base),
            "import phi4.train.trainer": ([PYTHON, "-c", "import phi4.train.trainer"], base),
            "phi4-train, tiny, 10 steps, 1 thread": (train, base),
            "phi4-train, tiny, 10 steps, 2 threads": (train, {**base, "OMP_NUM_THREADS": "2"}),
        }
        print(f"{'case':<66} {'wall s':>7} {'user s':>7} {'sys s':>6} {'faults':>9}")
        for n, (name, (argv, env)) in enumerate(cases.items()):
            runs = []
            for r in range(args.repeat):
                extra = [f"run_dir={tmp}/run{n}_{r}"] if argv is train else []
                runs.append(measure(argv + extra, env))
            wall, user, sys_, faults = (statistics.median(column) for column in zip(*runs))
            print(f"{name:<66} {wall:7.1f} {user:7.1f} {sys_:6.1f} {faults:9.0f}", flush=True)


if __name__ == "__main__":
    main()
