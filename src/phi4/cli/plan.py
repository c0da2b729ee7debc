"""phi4-plan: does a layout fit, how long is a step, how many days is the stage.

    phi4-plan [--json] [--search] [OVERRIDE ...]

Takes phi4-train's Hydra config (conf/plan.yaml composes train.yaml with the hardware group), so
the same overrides apply: `topology=...`, `topology.tp=4`, `stage=...`, `precision=fp8`,
`train.micro_batch_size=2`, `hardware=h200`, `plan.gpus=512`, `plan.mfu=0.25`.
Exit status: 0, or 2 for a configuration error (one message naming the setting).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.errors import HydraException
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

import phi4.settings
from phi4 import conf_dir
from phi4.errors import ConfigError
from phi4.logs import config_error_line
from phi4.plan.estimate import estimate
from phi4.plan.failures import plan_saves
from phi4.plan.search import check_layout, search
from phi4.plan.spec import from_config
from phi4.runtime.hardware import HardwareConfig

CONF_DIR = Path(conf_dir())
USAGE = "usage: phi4-plan [--json] [--search] [OVERRIDE ...]   (e.g. topology.tp=4 hardware=h200 plan.mfu=0.25)"


def compose(overrides: list[str]) -> dict:
    """The composed config as a plain dict; Hydra's own errors become ConfigError."""
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = hydra_compose("plan", overrides=overrides)
        phi4.settings.check_ranges(cfg, ("plan", "train"))  # what the plan reads of the run: its batch, steps
        return OmegaConf.to_container(cfg, resolve=False)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"invalid override: {config_error_line(error)}") from error


def _gb(value: float) -> str:
    return f"{value:6.1f} GB"


def format_plan(plan: dict) -> str:
    lay, mem, comm = plan["layout"], plan["memory"], plan["comm"]
    lines = [
        f"layout   tp={lay['tp']} pp={lay['pp']} vp={lay['vp']} cp={lay['cp']} dp={lay['dp']} sp={lay['sp']} "
        f"recompute={lay['recompute']}{' pp_layout=' + lay['pp_layout'] if lay.get('pp_layout') else ''}  on "
        f"{lay['gpus']} x {lay['hardware']}",
        f"batch    {lay['global_batch_size']} x {lay['seq_length']} tokens per step; micro-batch {lay['micro_batch_size']}, "
        f"{lay['micro_batches']} micro-batches per replica; {lay['dtype']}{' + FP8' if lay['fp8'] else ''}",
        "",
        f"memory per GPU (pipeline rank {mem['pp_rank']}, the fullest of {len(mem['per_pp_rank_gb'])})",
        f"  weights            {_gb(mem['weights_gb'])}",
        f"  gradients ({mem.get('grads_dtype', 'fp32')}){' ' * (7 - len(mem.get('grads_dtype', 'fp32')))}{_gb(mem['grads_gb'])}",
        f"  optimizer shard    {_gb(mem['optimizer_gb'])}",
    ]
    if lay["fp8"]:
        lines.append(f"  FP8 weight copies  {_gb(mem['fp8_gb'])}")
    lines += [
        f"  activations        {_gb(mem['activations_gb'])}   ({mem['in_flight_micro_batches']} micro-batch(es) x stages in "
        f"flight: {mem['activations_stored_gb']:.1f} GB, working set {mem['activations_transient_gb']:.1f} GB)",
        f"  total              {_gb(plan['memory_gb_per_gpu'])}   {mem['needed_gb']:.1f} GB with the {mem['margin']:.0%} "
        f"margin on the activations, of {mem['capacity_gb']:.1f} GB usable: {'fits' if mem['fits'] else 'DOES NOT FIT'}",
        "",
        "per step",
        f"  model FLOPs        {plan['flops']['model_tflop_per_step']:,.0f} TFLOP ({plan['flops']['gflop_per_token']:.1f} GFLOP "
        f"a token, attention included); with recomputation {plan['flops']['hardware_tflop_per_step']:,.0f}",
        f"  compute            {plan['compute_s']:.3f} s on the slowest stage: per micro-batch "
        + ", ".join(f"{k.replace('_', ' ')} {v * 1e3:.1f} ms" for k, v in plan['compute_per_micro_batch_s'].items() if v),
        f"  optimizer step     {plan['optimizer_s']:.3f} s",
        f"  pipeline bubble    {plan['bubble_fraction']:.1%}",
    ]
    for name, label in (("tp", "tensor parallel"), ("cp", "context parallel"), ("pp", "pipeline sends"), ("dp", "data parallel")):
        c = comm[name]
        if c["gb_per_step"]:
            overlap = " (under the GEMMs: TE's TP overlap)" if c.get("overlapped") else ""
            lines.append(f"  {label:18s} {c['gb_per_step']:8.2f} GB over {c['link']:6s} {c['seconds']:.3f} s, "
                         f"exposed {c['exposed_s']:.3f} s{overlap}")
    lines += [
        f"  step time          {plan['estimated_step_time_s']:.3f} s estimated -> MFU {plan['estimated_mfu']:.1%} "
        f"(of the bf16 dense peak)",
    ]
    if plan["mfu_given"]:
        lines.append(f"  at the given MFU   {plan['mfu_given']:.1%}: step {plan['step_time_s']:.3f} s")
    lines.append(f"  throughput         {plan['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, "
                 f"{plan['model_tflops_per_gpu']:.0f} model TFLOP/s per GPU")
    if plan["days"] is not None:
        lines.append(f"stage    {plan['steps']:,.0f} steps, {plan['tokens'] / 1e9:,.0f}B tokens: {plan['days']:.1f} days")
    lines += _format_saves(plan.get("saves"))
    return "\n".join(lines)


def _format_saves(saves: Optional[dict]) -> list[str]:
    if saves is None:
        return ["saves    no failure rate (the cluster file's node_mtbf_hours): no save interval"]
    lost = saves["lost"]
    return [
        "",
        f"saves    a save stops training {saves['save_s']:.1f} s ({saves['save_source']})",
        f"  failures           {saves['nodes']} nodes, {saves['node_mtbf_hours']:,.0f} h between failures each: "
        f"the job fails every {saves['job_mtbf_hours']:.1f} h",
        f"  interval           every {saves['interval_s'] / 60:.1f} min (Young/Daly): checkpoint.every="
        f"{saves['checkpoint_every']} at this step time",
        f"  time lost          {lost['total']:.1%}: saves {lost['saves']:.1%}, work redone after failures "
        f"{lost['rework']:.1%}, restarts {lost['restarts']:.1%} ({saves['restart_s'] / 60:.0f} min each)",
    ]


def _row(layout: dict, full: bool = True) -> str:
    stages = layout.get("pp_layout")
    return (f"tp={layout['tp']:<2} pp={layout['pp']:<2} vp={str(layout['vp']):<4} cp={layout['cp']:<2} "
            f"dp={str(layout['dp']):<5} mbs={layout['micro_batch_size']} recompute={layout['recompute']:<9}"
            + (f" pp_layout={stages}" if stages and full else ""))


def format_search(result: dict, top: int, show_rejected: bool) -> str:
    valid, rejected = result["valid"], result["rejected"]
    lines = [f"{len(valid)} layouts fit, {len(rejected)} rejected; fastest first:", ""]
    lines.append(f"{'#':>3}  {'layout':<62} {'memory':>8} {'step':>8} {'MFU':>6} {'days':>6}")
    for i, plan in enumerate(valid[:top], 1):
        days = f"{plan['estimated_step_time_s'] * plan['steps'] / 86400:6.1f}" if plan["steps"] else "     -"
        stages = plan["layout"].get("pp_layout")
        lines.append(f"{i:>3}  {_row(plan['layout'], full=False):<62} {plan['memory_gb_per_gpu']:6.1f}GB "
                     f"{plan['estimated_step_time_s']:7.3f}s {plan['estimated_mfu']:6.1%} {days}"
                     + (f"  pp_layout={stages}" if stages else ""))
    lines.append("")
    if show_rejected:
        lines.append("rejected:")
        lines += [f"  {_row(r['layout'])}  {r['reason']}" for r in rejected]
    else:
        kinds: dict[str, list] = {}
        for r in rejected:
            kinds.setdefault(r["kind"], []).append(r)
        lines.append("rejected, by reason, with one example each (plan.show_rejected=true lists every layout):")
        for kind, rows in sorted(kinds.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  {len(rows):6d}  {kind}: e.g. {_row(rows[0]['layout']).strip()}: {rows[0]['reason']}")
    return "\n".join(lines)


def run(argv: list[str]) -> int:
    flags = [a for a in argv if a.startswith("--")]
    overrides = [a for a in argv if not a.startswith("--")]
    unknown = sorted(set(flags) - {"--json", "--search", "--help"})
    if "--help" in flags:
        print(__doc__.strip())
        return 0
    if unknown:
        raise ConfigError(f"unknown option(s) {', '.join(unknown)}; {USAGE}")
    cfg = compose(overrides)
    options = cfg["plan"]
    hardware = HardwareConfig.from_dict(cfg["hardware"])
    spec = from_config(cfg, options["gpus"])
    margin = float(options["memory_margin"])
    if "--search" in flags:
        def progress(i):
            print(f"phi4-plan: {i} layouts checked", file=sys.stderr, flush=True)

        result = search(spec, hardware, options["micro_batch_sizes"], options["recompute"], margin, progress)
        if "--json" in flags:
            print(json.dumps(result))
        else:
            print(format_search(result, int(options["top"]), bool(options["show_rejected"])))
        return 0
    check_layout(spec)
    plan = estimate(spec, hardware, options["mfu"], margin)
    per_node = spec.topology.gpus_per_node or int((cfg.get("cluster") or {}).get("gpus_per_node") or 1)
    plan["saves"] = plan_saves(cfg.get("cluster") or {}, -(-spec.world_size // per_node), spec.model.num_parameters(),
                               plan["step_time_s"], options["save_seconds"], options["save_from"])
    print(json.dumps(plan) if "--json" in flags else format_plan(plan))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    try:
        return run(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as error:
        print(f"phi4-plan: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
