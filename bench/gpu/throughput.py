"""Training throughput at Phi-4's width through phi4's own training step, beside phi4-plan's
prediction for the same shape: the planner's calibration.

The model is Phi-4's layer (hidden 5120, FFN 17920, 40 heads in 10 groups, vocabulary 100352) at
sequence 4096, with as many layers as fit one GPU with the distributed optimizer (`--layers auto`:
the planner's memory model picks the most that fit, and a run out of memory retries with fewer).
It runs `phi4.train.lm.lm_update` (Megatron-Core's schedule, DDP, the distributed optimizer)
on random tokens and prints tokens/s, model TFLOP/s per GPU (phi4's FLOP count:
phi4.model.flops), MFU against the bf16 dense peak, peak memory, and phi4-plan's figures for the
same shape and hardware. `--shape tiny` runs the same code path on the CPU in seconds.

    python bench/gpu/throughput.py [--backend te|local] [--fp8 RECIPE] [--layers auto|N]
        [--shape phi4|tiny] [--hardware h200] [--steps 6] [--profile FILE] [--json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "src"))

SHAPES = {  # (model file, sequence, micro-batch size, micro-batches per step)
    "phi4": ("phi4_14b", 4096, 1, 4),
    "tiny": ("phi4_tiny", 64, 2, 2),
}


def load_yaml(group: str, name: str) -> dict:
    from phi4.settings import load_group

    return load_group(group, ROOT / "conf" / group / f"{name}.yaml")


def settings(args):
    from phi4.model.config import ModelConfig, PrecisionConfig, TopologyConfig
    from phi4.runtime.hardware import HardwareConfig

    model_name, seq, mbs, micro_batches = SHAPES[args.shape]
    values = load_yaml("model", model_name)
    model = ModelConfig.from_dict({**values, "transformer_impl": args.backend})
    if args.fp8:
        fp8 = {**load_yaml("precision", "fp8")["fp8"], "recipe": args.fp8}
        if args.fp8 == "delayed":  # Megatron-Core refuses delayed scaling with bf16 first/last layers
            fp8["first_last_layers_bf16"] = False
        precision = PrecisionConfig.from_dict(dict(dtype="bf16", fp8=fp8))
    else:
        precision = PrecisionConfig(dtype=args.dtype)
    hardware = HardwareConfig.from_dict(load_yaml("hardware", args.hardware))
    return model, TopologyConfig(), precision, hardware, seq, mbs, micro_batches


def plan_for(model, topology, precision, hardware, seq, mbs, micro_batches) -> dict:
    from phi4.plan.estimate import estimate
    from phi4.plan.spec import PlanSpec

    spec = PlanSpec(model, topology, precision, 1, seq, mbs, mbs * micro_batches)
    return estimate(spec, hardware)


def layers_that_fit(model, topology, precision, hardware, seq, mbs, micro_batches) -> int:
    """The most layers the planner's memory model says fit one device (at least 2)."""
    best = 2
    for layers in range(2, model.num_layers + 1):
        shaped = dataclasses.replace(model, num_layers=layers)
        if not plan_for(shaped, topology, precision, hardware, seq, mbs, micro_batches)["memory"]["fits"]:
            break
        best = layers
    return best


def measure(model, topology, precision, hardware, seq, mbs, micro_batches, steps: int, warmup: int,
            profile: str | None) -> dict:
    import torch

    from phi4.model.build import build_phi4_model, transformer_config
    from phi4.model.flops import flops_per_token
    from phi4.model.parallel import init_model_parallel
    from phi4 import conf_dir
    from phi4.settings import Optim, load_group
    from phi4.train.lm import lm_update
    from phi4.train.optimizer import build_optimizer, wrap_ddp

    init_model_parallel(model, topology, precision, seed=1)
    cuda = torch.cuda.is_available()
    device = "cuda" if cuda else "cpu"
    config = transformer_config(model, topology, precision)
    chunks = build_phi4_model(model, topology, precision, config=config)
    ddp = wrap_ddp(chunks, config)
    optimizer = build_optimizer(ddp, config, Optim(**{**load_group("optim", Path(conf_dir()) / "optim" / "adam.yaml"), "lr": 1e-4}))
    generator = torch.Generator(device="cpu").manual_seed(0)
    batches = []
    for _ in range(micro_batches):
        tokens = torch.randint(0, model.vocab_size, (mbs, seq + 1), generator=generator)
        batches.append(dict(tokens=tokens[:, :-1].contiguous().to(device), labels=tokens[:, 1:].contiguous().to(device),
                            loss_mask=torch.ones(mbs, seq, device=device),
                            position_ids=torch.arange(seq, device=device).unsqueeze(0).expand(mbs, -1)))

    def sync():
        if cuda:
            torch.cuda.synchronize()

    losses = []
    for _ in range(warmup):
        losses.append(lm_update(ddp, optimizer, batches).loss)
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    for _ in range(steps):
        losses.append(lm_update(ddp, optimizer, batches).loss)
    sync()
    seconds = (time.perf_counter() - started) / steps
    if profile:
        write_profile(profile, lambda: lm_update(ddp, optimizer, batches), cuda)
    tokens_per_step = mbs * micro_batches * seq
    tokens_per_s = tokens_per_step / seconds
    tflops = flops_per_token(model, seq) * tokens_per_s / 1e12
    if cuda:
        peak_gb = torch.cuda.max_memory_allocated() / 1e9
    else:
        import resource

        peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9
    return dict(step_s=seconds, tokens_per_s=tokens_per_s, model_tflops=tflops, mfu=tflops / hardware.peak_tflops_bf16,
                peak_memory_gb=peak_gb, losses=[round(l, 4) for l in losses if l is not None],
                device=torch.cuda.get_device_name() if cuda else "cpu")


def write_profile(path: str, step, cuda: bool) -> None:
    """One step under torch.profiler: the top kernels (or CPU ops) by time."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    key = "cuda_time_total" if cuda else "cpu_time_total"
    try:
        table = prof.key_averages().table(sort_by=key, row_limit=30)
    except (AttributeError, KeyError):  # newer torch names device time differently
        table = prof.key_averages().table(sort_by="self_" + ("device" if cuda else "cpu") + "_time_total", row_limit=30)
    Path(path).write_text(table + "\n")


def run_one(args) -> dict:
    model, topology, precision, hardware, seq, mbs, micro_batches = settings(args)
    layers = int(args.layers) if args.layers != "auto" else layers_that_fit(
        model, topology, precision, hardware, seq, mbs, micro_batches)
    model = dataclasses.replace(model, num_layers=layers)
    plan = plan_for(model, topology, precision, hardware, seq, mbs, micro_batches)
    result = dict(shape=args.shape, backend=model.transformer_impl, fp8=args.fp8 or None, dtype=precision.dtype,
                  layers=layers, seq=seq, micro_batch_size=mbs, micro_batches=micro_batches, hardware=hardware.name)
    import torch

    try:
        result.update(measure(model, topology, precision, hardware, seq, mbs, micro_batches, args.steps, args.warmup,
                              args.profile))
    except torch.OutOfMemoryError as err:  # the caller retries with fewer layers
        result.update(oom=True, error=str(err).splitlines()[0][:300])
        return result
    result.update(plan_tokens_per_s=plan["tokens_per_s_per_gpu"], plan_model_tflops=plan["model_tflops_per_gpu"],
                  plan_mfu=plan["mfu"], plan_memory_gb=plan["memory_gb_per_gpu"], plan_step_s=plan["step_time_s"],
                  measured_over_plan=result["tokens_per_s"] / plan["tokens_per_s_per_gpu"])
    return result


def describe(r: dict) -> str:
    if r.get("oom"):
        return f"{r['layers']} layers: out of memory ({r['error']})"
    what = f"{r['backend']} {r['fp8'] or r['dtype']}"
    return (f"{r['shape']} width, {r['layers']} layers, seq {r['seq']}, {r['micro_batches']} x {r['micro_batch_size']}, "
            f"{what} on {r['device']}: {r['step_s']:.3f} s/step, {r['tokens_per_s']:,.0f} tokens/s, "
            f"{r['model_tflops']:.3g} model TFLOP/s, MFU {r['mfu']:.1%} of {r['hardware']} bf16 peak, "
            f"peak memory {r['peak_memory_gb']:.1f} GB | plan: {r['plan_tokens_per_s']:,.0f} tokens/s, "
            f"{r['plan_model_tflops']:.3g} TFLOP/s, MFU {r['plan_mfu']:.1%}, {r['plan_memory_gb']:.1f} GB; "
            f"measured/plan {r['measured_over_plan']:.2f}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=("te", "local"), default="te")
    parser.add_argument("--fp8", choices=("tensorwise", "delayed", "blockwise", "mxfp8"), default=None)
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16", help="without --fp8")
    parser.add_argument("--layers", default="auto", help="auto: as many as the planner says fit one device")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="phi4")
    parser.add_argument("--hardware", default="h200", help="conf/hardware/NAME.yaml: the plan's device and peak")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--profile", default=None, help="write one step's top kernels here")
    parser.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    parser.add_argument("--no-retry", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.layers != "auto" and not (args.layers.isdigit() and int(args.layers) >= 1):
        parser.error(f"--layers={args.layers}; valid: auto or a positive number")
    if args.layers == "auto" and not args.no_retry:
        # Each try in its own process: after an out-of-memory error, a fresh CUDA context.
        model, topology, precision, hardware, seq, mbs, micro_batches = settings(args)
        layers = layers_that_fit(model, topology, precision, hardware, seq, mbs, micro_batches)
        while layers >= 1:
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--layers", str(layers),
                   "--no-retry"]
            done = subprocess.run(cmd, env={**os.environ, "PYTHONUNBUFFERED": "1"})
            if done.returncode != 3:
                return done.returncode
            layers = layers * 3 // 4
            print(f"out of memory: retrying with {layers} layers", flush=True)
        return 3
    result = run_one(args)
    print(describe(result), flush=True)
    if args.json:
        print(json.dumps(result), flush=True)
    return 3 if result.get("oom") else 0


if __name__ == "__main__":
    sys.exit(main())
