"""Every layout of a model on N devices, checked and ranked by estimated step time.

Candidates: TP over the node's divisors and the model's valid sizes, PP up to 16 and every divisor
of the layer count, VP none or 2-5, CP 1-8 (powers of two), the micro-batch sizes and recompute
settings of `plan.*`; sequence parallelism whenever TP > 1 (it only saves memory). A candidate is
rejected, with its reason, when the model or the batch does not divide (phi4-train's own checks),
or when it needs more than the device's usable memory (its activations with the margin).
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

from phi4.errors import ConfigError
from phi4.model.pipeline_layout import lighter_last
from phi4.model.validate import check_run, check_sequence_length, valid_tp_sizes
from phi4.plan.estimate import estimate
from phi4.plan.spec import PlanSpec
from phi4.runtime.hardware import HardwareConfig


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_batch(spec: PlanSpec) -> None:
    """What the trainer and Megatron-Core need of the batch and sequence for this layout."""
    t = spec.topology
    if spec.world_size % t.model_parallel_size:
        raise ConfigError(
            f"{spec.world_size} devices do not divide into tp x pp x cp = {t.model_parallel_size}")
    per_step = spec.micro_batch_size * spec.dp
    if spec.global_batch_size % per_step:
        raise ConfigError(
            f"train.global_batch_size={spec.global_batch_size} is not a multiple of "
            f"train.micro_batch_size={spec.micro_batch_size} x dp={spec.dp} = {per_step}")
    check_sequence_length(spec.seq_length, t)


def check_layout(spec: PlanSpec) -> None:
    check_run(spec.model, spec.topology, spec.precision, spec.world_size)
    check_batch(spec)


def candidates(spec: PlanSpec, hw: HardwareConfig, micro_batch_sizes: Iterable[int],
               recomputes: Iterable[str]) -> Iterable[PlanSpec]:
    m = spec.model
    tps = sorted(set(_divisors(hw.gpus_per_node)) | set(valid_tp_sizes(m)))
    pps = sorted(set(range(1, 17)) | set(_divisors(m.num_layers)))
    cps = [1, 2, 4, 8]
    for tp in tps:
        for pp in pps:
            for vp in [None, 2, 3, 4, 5] if pp > 1 else [None]:
                for layout in _layouts(m, pp, vp):
                    for cp in cps:
                        for mbs in micro_batch_sizes:
                            for recompute in recomputes:
                                topology = dataclasses.replace(spec.topology, tp=tp, pp=pp, vp=vp, cp=cp, sp=tp > 1,
                                                               recompute=recompute, pp_layout=layout)
                                yield dataclasses.replace(spec, topology=topology, micro_batch_size=mbs)


def _layouts(model, pp: int, vp: Optional[int]) -> list[Optional[str]]:
    """The even split (None), and with PP a last stage lighter by the output layer's share
    (phi4.model.pipeline_layout.lighter_last), where there is one."""
    uneven = lighter_last(model, pp, vp or 1) if pp > 1 else None
    return [None] + ([uneven] if uneven else [])


_KINDS = (("topology.tp=", "tensor parallel size does not divide the model"),
          ("model.num_layers=", "layers do not split into pp x vp stages"),
          ("topology.pp_layout=", "the pipeline layout does not fit the model or pp x vp"),
          ("processes do not divide", "tp x pp x cp does not divide the device count"),
          ("devices do not divide", "tp x pp x cp does not divide the device count"),
          ("topology.cp=", "context parallel needs the te backend"),
          ("global_batch_size", "global batch does not split into micro-batches x dp"),
          ("seq_length", "sequence does not split over cp (and tp with sequence parallelism)"))


def _kind(reason: str) -> str:
    return next((kind for marker, kind in _KINDS if marker in reason), "other")


def describe(spec: PlanSpec) -> dict:
    t = spec.topology
    return dict(tp=t.tp, pp=t.pp, vp=t.vp, cp=t.cp, dp=spec.dp if spec.world_size % t.model_parallel_size == 0 else None,
                sp=t.sp, micro_batch_size=spec.micro_batch_size, recompute=t.recompute, pp_layout=t.pp_layout)


def search(spec: PlanSpec, hw: HardwareConfig, micro_batch_sizes=(1, 2, 4),
           recomputes=("none", "selective", "full"), memory_margin: float = 0.1,
           progress: Optional[callable] = None) -> dict:
    """{"valid": [plans, fastest first], "rejected": [{layout, reason}]}."""
    valid, rejected = [], []
    for i, candidate in enumerate(candidates(spec, hw, micro_batch_sizes, recomputes)):
        if progress and i % 2000 == 0:
            progress(i)
        layout = describe(candidate)
        if candidate.world_size % candidate.topology.model_parallel_size == 0 and candidate.dp == 0:
            rejected.append(dict(layout=layout, kind="devices", reason="tp x pp x cp exceeds the device count"))
            continue
        try:
            check_layout(candidate)
        except ConfigError as error:
            rejected.append(dict(layout=layout, kind=_kind(str(error)), reason=str(error)))
            continue
        plan = estimate(candidate, hw, memory_margin=memory_margin)
        if not plan["memory"]["fits"]:
            mem = plan["memory"]
            rejected.append(dict(layout=layout, kind="memory", reason=(
                f"needs {mem['needed_gb']:.1f} GB on pipeline rank {mem['pp_rank']} ({plan['memory_gb_per_gpu']:.1f} "
                f"GB, its activations with the {memory_margin:.0%} margin) > {mem['capacity_gb']:.1f} GB usable "
                f"({hw.name}: {hw.memory_gb} GB less {hw.reserved_gb} reserved)")))
            continue
        valid.append(plan)
    # Fastest first; among equally fast layouts, the fewest model-parallel ways, then the least memory.
    valid.sort(key=lambda p: (round(p["estimated_step_time_s"], 6),
                              p["layout"]["tp"] * p["layout"]["pp"] * p["layout"]["cp"], p["memory_gb_per_gpu"]))
    return dict(valid=valid, rejected=rejected)
