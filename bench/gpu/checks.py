"""The GPU kit's checks, in order of value, each under its own time budget (run by bench/gpu/run.sh).

A check runs only when what it needs is there (CUDA; the project's packages; Transformer
Engine) and its budget fits before the call's deadline; otherwise it waits for the next call.
Each finished check (passed or failed) is recorded in STATE/results.jsonl and not run again.
After every check the results, a summary table, the logs (one tar.gz) and the profile are
copied to OUT, so that a call stopped at its limit still returns what it measured (the device
tool returns at most 8 files).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PY = sys.executable

# The embedded default on CUDA: the tiny model, bf16 (fp32 is the CPU's reference precision).
TRAIN = [PY, "launch/train.py", "precision=bf16", "checkpoint.every=0", "train.log_every=10"]
# FP8 settings per recipe; delayed scaling cannot keep the first/last layers in bf16.
FP8 = {
    "tensorwise": ["precision=fp8"],
    "delayed": ["precision=fp8", "precision.fp8.recipe=delayed", "precision.fp8.first_last_layers_bf16=false"],
    "blockwise": ["precision=fp8", "precision.fp8.recipe=blockwise"],
    "mxfp8": ["precision=fp8", "precision.fp8.recipe=mxfp8"],
}
THROUGHPUT = [PY, "bench/gpu/throughput.py", "--json"]


@dataclass
class Check:
    name: str
    needs: tuple            # of "cuda", "te"
    budget: int             # seconds
    command: list
    parse: str = "none"     # how to read figures: train (metrics.jsonl), throughput (--json line), pytest, refusal
    figures: dict = field(default_factory=dict)


def checks(state: Path) -> list[Check]:
    runs = state / "runs"

    def train(name, backend, extra):
        return Check(name, ("cuda", "te") if backend == "te" else ("cuda",), 100 if backend == "te" else 75,
                     [*TRAIN, f"model.transformer_impl={backend}", f"run_dir={runs / name}", *extra], "train")

    def throughput(name, backend, extra):
        return Check(name, ("cuda", "te") if backend == "te" else ("cuda",), 100 if backend == "te" else 75,
                     [*THROUGHPUT, f"--backend={backend}", *extra], "throughput")

    return [
        Check("env", (), 20, ["bash", "-c", "nvidia-smi; " + PY + " -c 'import torch, sys; print(sys.version); "
                              "print(torch.__version__, torch.version.cuda, torch.cuda.is_available() and "
                              "torch.cuda.get_device_name(), torch.cuda.is_available() and torch.cuda.get_device_capability())'; "
                              + PY + " -m pip list 2>/dev/null | grep -iE 'torch|transformer|megatron|hydra|numpy|pydantic'"]),
        # No Transformer Engine needed: these run while its parts are still travelling.
        train("local_train_bf16", "local", []),
        throughput("throughput_local_bf16", "local", []),
        # Transformer Engine: the bf16 run first, the reference every FP8 loss gap is measured
        # against; then the main path (the default FP8 recipe, whose run also decodes with the KV
        # cache on the te spec in its evaluation), the planner's figures, and the gpu tests.
        Check("te_import", ("cuda", "te"), 45, [PY, "-c", "import transformer_engine.pytorch as te, torch; "
              "l = te.Linear(256, 256, params_dtype=torch.bfloat16).cuda(); x = torch.randn(32, 256, device='cuda', dtype=torch.bfloat16); "
              "print('te.Linear on cuda:', tuple(l(x).shape)); import transformer_engine; print(transformer_engine.__version__)"]),
        train("te_train_bf16", "te", []),
        train("te_train_tensorwise", "te", FP8["tensorwise"]),
        throughput("throughput_te_bf16", "te", []),
        throughput("throughput_te_tensorwise", "te", ["--fp8=tensorwise"]),
        Check("pytest_gpu", ("cuda", "te"), 300, [PY, "-m", "pytest", "-m", "gpu", "-q", "-rA", "tests"], "pytest"),
        train("te_train_delayed", "te", FP8["delayed"]),
        train("te_train_blockwise", "te", FP8["blockwise"]),
        Check("te_mxfp8_refused", ("cuda", "te"), 45,
              [*TRAIN, "model.transformer_impl=te", f"run_dir={runs / 'mxfp8'}", *FP8["mxfp8"]], "refusal"),
        throughput("throughput_te_delayed", "te", ["--fp8=delayed"]),
        throughput("throughput_te_blockwise", "te", ["--fp8=blockwise"]),
        Check("profile_te_tensorwise", ("cuda", "te"), 90,
              [*THROUGHPUT, "--backend=te", "--fp8=tensorwise", f"--profile={state / 'profile.txt'}"], "throughput"),
    ]


def have(need: str) -> bool:
    if need == "cuda":
        import torch

        return torch.cuda.is_available()
    if need == "te":
        return bool(os.environ.get("PHI4_TE_SITE"))
    raise ValueError(need)


def read_figures(check: Check, log: str) -> dict:
    """The figures a check's output holds."""
    if check.parse == "train":
        run_dir = Path(next(a.split("=", 1)[1] for a in check.command if a.startswith("run_dir=")))
        metrics = run_dir / "metrics.jsonl"
        if not metrics.is_file():
            return {}
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        losses = [(r["step"], r["loss"]) for r in records if "loss" in r and "step" in r]
        out = dict(losses=losses)
        rates = [r["tokens_per_s"] for r in records if "tokens_per_s" in r]
        if rates:
            out["tokens_per_s"] = rates[-1]
        out.update({k: v for r in records for k, v in r.items() if k.startswith("eval/") or k == "val_loss"})
        return out
    if check.parse == "throughput":
        lines = [line for line in log.splitlines() if line.startswith("{")]
        return json.loads(lines[-1]) if lines else {}
    if check.parse == "pytest":
        tail = [line for line in log.splitlines() if " passed" in line or " failed" in line or " error" in line]
        return dict(summary=tail[-1] if tail else "")
    if check.parse == "refusal":
        errors = [line for line in log.splitlines() if "mxfp8" in line and ("Blackwell" in line or "compute capability" in line)]
        return dict(message=errors[-1] if errors else "")
    return {}


def loss_gap(reference: list, losses: list):
    """The largest relative difference from the bf16 run's loss at the same logged step."""
    ref = dict((step, loss) for step, loss in reference)
    gaps = [abs(loss - ref[step]) / ref[step] for step, loss in losses if step in ref]
    return round(max(gaps), 4) if gaps else None


def passed(check: Check, rc: int, figures: dict) -> bool:
    if check.parse == "refusal":  # the run must stop at start, with its one line
        return rc != 0 and bool(figures.get("message"))
    if rc != 0:
        return False
    if check.parse == "train":
        losses = [loss for _, loss in figures.get("losses", [])]
        return len(losses) >= 2 and losses[-1] < losses[0]
    return True


def summary(results: list[dict]) -> str:
    lines = [f"{'check':28} {'status':8} {'s':>5}  figures"]
    for r in results:
        f = r.get("figures", {})
        if "losses" in f and f["losses"]:
            brief = f"loss {f['losses'][0][1]:.3f} -> {f['losses'][-1][1]:.3f} over {f['losses'][-1][0]} steps"
            if f.get("gap_vs_bf16") is not None:
                brief += f", at most {f['gap_vs_bf16']:.1%} from bf16"
        elif "tokens_per_s" in f and "mfu" in f:
            brief = (f"{f['tokens_per_s']:,.0f} tok/s, {f['model_tflops']:.0f} TFLOP/s, MFU {f['mfu']:.1%}, "
                     f"peak {f.get('peak_memory_gb', 0):.1f} GB; plan {f.get('plan_tokens_per_s', 0):,.0f} tok/s")
        else:
            brief = "; ".join(f"{k}={v}" for k, v in f.items())[:120]
        lines.append(f"{r['name']:28} {r['status']:8} {r['seconds']:5.0f}  {brief}")
    return "\n".join(lines)


def sync(state: Path, out: Path, results: list[dict]) -> None:
    """What comes back: results.jsonl, summary.txt, logs.tar.gz, profile.txt (at most 8 files)."""
    out.mkdir(parents=True, exist_ok=True)
    reference = next((r for r in results if r["name"] == "te_train_bf16"), None)
    for r in results:  # how far each FP8 run's losses are from the bf16 run's, step by step
        if reference and r["name"].startswith("te_train_") and r is not reference and r["figures"].get("losses"):
            r["figures"]["gap_vs_bf16"] = loss_gap(reference["figures"].get("losses", []), r["figures"]["losses"])
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in results))
    (out / "summary.txt").write_text(summary(results) + "\n")
    with tarfile.open(out / "logs.tar.gz.partial", "w:gz") as tar:
        tar.add(state / "logs", arcname="logs")
    os.replace(out / "logs.tar.gz.partial", out / "logs.tar.gz")
    if (state / "profile.txt").is_file():
        (out / "profile.txt").write_text((state / "profile.txt").read_text())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--state", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--deadline", type=float, required=True, help="epoch seconds by which to be done")
    parser.add_argument("--only", default="", help="comma-separated check names")
    parser.add_argument("--list", action="store_true", help="print the checks and exit")
    args = parser.parse_args(argv)
    todo = checks(args.state)
    if args.list:
        for c in todo:
            print(f"{c.name:28} needs {','.join(c.needs) or '-':8} budget {c.budget:4d} s")
        return 0
    only = {n for n in args.only.split(",") if n}
    unknown = only - {c.name for c in todo}
    if unknown:
        print(f"checks.py: unknown check(s) {sorted(unknown)}; valid: {', '.join(c.name for c in todo)}", file=sys.stderr)
        return 2
    results_file = args.state / "results.jsonl"
    results = [json.loads(l) for l in results_file.read_text().splitlines()] if results_file.is_file() else []
    done = {r["name"] for r in results}
    logs = args.state / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PHI4_CACHE=str(args.state / "cache"))  # one synthetic corpus for every run
    if env.get("PHI4_TE_SITE"):
        env["PYTHONPATH"] = env["PHI4_TE_SITE"] + os.pathsep + env.get("PYTHONPATH", "")
    if have("te"):  # once Transformer Engine is there, its checks go first; the rest wait for spare time
        todo.sort(key=lambda c: "te" not in c.needs and c.name != "env")
    for check in todo:
        if check.name in done or (only and check.name not in only):
            continue
        missing = [n for n in check.needs if not have(n)]
        left = args.deadline - time.time()
        if missing or check.budget > left:
            why = f"needs {', '.join(missing)}" if missing else f"budget {check.budget} s > {left:.0f} s left"
            print(f"[checks] {check.name}: later ({why})", flush=True)
            continue
        print(f"[checks] {check.name}: running (budget {check.budget} s)", flush=True)
        started = time.time()
        log_path = logs / f"{check.name}.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(check.command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=check.budget)
            except subprocess.TimeoutExpired:  # the whole process group: data workers too
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
        text = log_path.read_text(errors="replace")
        figures = read_figures(check, text)
        status = "timeout" if rc is None else ("ok" if passed(check, rc, figures) else "failed")
        result = dict(name=check.name, status=status, rc=rc, seconds=round(time.time() - started, 1),
                      figures=figures, date=time.strftime("%Y-%m-%d %H:%M:%S"))
        if status != "ok":
            result["tail"] = text[-1500:]
        results.append(result)
        with open(results_file, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(f"[checks] {check.name}: {status} in {result['seconds']:.0f} s", flush=True)
        sync(args.state, args.out, results)
    sync(args.state, args.out, results)
    print(summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
