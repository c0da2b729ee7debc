"""A plan: memory per device, and per step the FLOPs, pipeline bubble, communication, time and MFU.

Time model (per step, on the slowest pipeline rank):
- compute: the rank's FLOPs per micro-batch (forward, backward, recomputation) over TP x CP
  devices, at the assumed achieved fraction of peak (FP8 rate for the linears when FP8 is on);
- tensor parallel: per layer and micro-batch, 8 units of (TP-1)/TP x tokens x hidden bytes (two
  all-reduces forward and two backward, or their all-gather/reduce-scatter halves under sequence
  parallelism, whose extra backward all-gather overlaps the gradient GEMM); 4 more for a fully
  recomputed forward. With TE's TP communication overlap (topology.tp_comm_overlap, on by default
  with TP > 1, SP and te on GPUs) it runs under the layers' linear GEMMs and only what outlasts them
  is exposed; without it, all of it;
- context parallel: the ring passes each layer's K and V (CP-1 times forward, twice that backward),
  hidden behind the layer's attention compute where that is longer;
- pipeline: (micro-batches + (PP-1)/VP) x the per-micro-batch stage time (the interleaved 1F1B
  bubble), plus the activation sends of every micro-batch and virtual stage, forward and backward;
- data parallel: the distributed optimizer's reduce-scatter of gradients (fp32, or the weights' dtype
  without train.grad_reduce_in_fp32) and all-gather of
  weights (FP8 weights at one byte), hidden behind the backward/forward when overlapped except for
  one bucket.
Links: NVLink inside a node, InfiniBand across nodes, by Megatron-Core's rank order (TP, CP, DP,
PP from fastest-varying): a group stays inside a node when its span fits in one.
"""

from __future__ import annotations

from typing import Optional

from phi4.model.flops import flops_per_token, forward_flops_per_token
from phi4.model.tp_overlap import tp_comm_overlap_on
from phi4.plan import memory
from phi4.plan.spec import PlanSpec
from phi4.runtime.hardware import HardwareConfig

_TP_UNITS = 8
_TP_UNITS_RECOMPUTE = 4


def _link(hw: HardwareConfig, span: int) -> tuple[str, float]:
    """The link a group whose ranks span `span` consecutive devices uses."""
    return ("nvlink", hw.nvlink_gb_s * 1e9) if span <= hw.gpus_per_node else ("ib", hw.ib_gb_s * 1e9)


def gemm_efficiency(spec: PlanSpec, hw: HardwareConfig) -> float:
    """The assumed fraction of peak: `matmul_efficiency` for large GEMMs, lower when the GEMMs
    have few rows (the micro-batch's tokens on one device: sequence / CP x micro-batch size),
    reaching half at `gemm_ramp_rows`."""
    rows = spec.seq_length // spec.topology.cp * spec.micro_batch_size
    return hw.matmul_efficiency * rows / (rows + hw.gemm_ramp_rows)


def _rank_compute(spec: PlanSpec, hw: HardwareConfig, pp_rank: int) -> dict:
    """FLOPs and seconds of one micro-batch on one device of this pipeline rank."""
    m, t = spec.model, spec.topology
    tokens = spec.micro_batch_size * spec.seq_length
    fwd = forward_flops_per_token(m, spec.seq_length)
    layer_share = 1.0 / t.pp
    linear = fwd["linear"] * layer_share * tokens
    attention = fwd["attention"] * layer_share * tokens
    output = fwd["output"] * tokens if pp_rank == t.pp - 1 else 0.0
    extra_linear = linear if t.recompute == "full" else 0.0
    extra_attention = attention if t.recompute in ("full", "selective") else 0.0
    split = t.tp * t.cp
    linear_flops = (3 * linear + extra_linear) / split
    other_flops = (3 * attention + extra_attention + 3 * output) / split
    layers, in_fp8 = memory.fp8_layers(spec, pp_rank)  # the linears of FP8 layers run at the FP8 rate
    fp8_linear = linear_flops * in_fp8 / layers if layers else 0.0
    eff = gemm_efficiency(spec, hw)
    linear_seconds = fp8_linear / (hw.peak_tflops_fp8 * 1e12 * eff) + (linear_flops - fp8_linear) / (
        hw.peak_tflops_bf16 * 1e12 * eff)
    seconds = linear_seconds + other_flops / (hw.peak_tflops_bf16 * 1e12 * eff)
    attention_seconds = (3 * attention + extra_attention) / split / (hw.peak_tflops_bf16 * 1e12 * eff)
    return dict(flops=linear_flops + other_flops, seconds=seconds, attention_seconds=attention_seconds,
                linear_seconds=linear_seconds)


def _tp_comm(spec: PlanSpec, hw: HardwareConfig, linear_seconds: float) -> dict:
    """Per micro-batch on one device; with TE's overlap, hidden under the linear GEMMs."""
    t = spec.topology
    if t.tp == 1:
        return dict(bytes=0.0, seconds=0.0, exposed=0.0, link="-", overlapped=False)
    e = memory.dtype_bytes(spec)
    tokens = spec.micro_batch_size * spec.seq_length // t.cp
    layers = spec.model.num_layers // t.pp
    units = _TP_UNITS + (_TP_UNITS_RECOMPUTE if t.recompute == "full" else 0)
    volume = layers * units * (t.tp - 1) / t.tp * tokens * spec.model.hidden_size * e
    link, bw = _link(hw, t.tp)
    seconds = volume / bw
    overlapped = tp_comm_overlap_on(t, spec.model.backend, on_cuda=hw.collectives != "gloo")
    exposed = max(0.0, seconds - linear_seconds) if overlapped else seconds
    return dict(bytes=volume, seconds=seconds, exposed=exposed, link=link, overlapped=overlapped)


def _cp_comm(spec: PlanSpec, hw: HardwareConfig, attention_seconds: float) -> dict:
    """Per micro-batch on one device: K and V around the ring, hidden behind attention."""
    t, m = spec.topology, spec.model
    if t.cp == 1:
        return dict(bytes=0.0, seconds=0.0, exposed=0.0, link="-")
    e = memory.dtype_bytes(spec)
    tokens = spec.micro_batch_size * spec.seq_length // t.cp
    kv = tokens * 2 * m.num_query_groups * m.head_dim // t.tp * e
    layers = m.num_layers // t.pp
    volume = layers * 3 * (t.cp - 1) * kv
    link, bw = _link(hw, t.tp * t.cp)
    seconds = volume / bw
    return dict(bytes=volume, seconds=seconds, exposed=max(0.0, seconds - attention_seconds), link=link)


def _pp_comm(spec: PlanSpec, hw: HardwareConfig) -> dict:
    """Per step on one device: each micro-batch's activations forward and gradients back, per
    virtual stage."""
    t = spec.topology
    if t.pp == 1:
        return dict(bytes=0.0, seconds=0.0, link="-")
    e = memory.dtype_bytes(spec)
    d = t.tp if t.sp else 1
    tokens = spec.micro_batch_size * spec.seq_length // t.cp
    volume = 2 * spec.num_micro_batches * (t.vp or 1) * tokens * spec.model.hidden_size * e / d
    link, bw = _link(hw, spec.world_size)
    return dict(bytes=volume, seconds=volume / bw, link=link)


def _dp_comm(spec: PlanSpec, hw: HardwareConfig, compute_s: float) -> dict:
    """Per step on one device (the pipeline rank with the most weights)."""
    t = spec.topology
    group = spec.dp * t.cp
    if group == 1:
        return dict(bytes=0.0, seconds=0.0, exposed=0.0, link="-")
    e = memory.dtype_bytes(spec)
    local = max(memory.static_memory(spec, r).params_local for r in range(t.pp))
    in_fp8 = max(memory.fp8_weight_numel(spec, r) for r in range(t.pp))  # all-gathered at one byte
    share = (group - 1) / group
    grads, weights = share * local * memory.grad_bytes(spec), share * (local * e - in_fp8 * (e - 1))
    link, bw = _link(hw, group * t.tp)
    bucket = min(1.0, max(40_000_000, 1_000_000 * group) / local)  # a bucket's share of the weights
    # Overlapped, the reduce-scatter runs behind the backward pass (2/3 of the compute) and the
    # all-gather behind the forward (1/3); one bucket, and whatever outlasts that, stays exposed.
    rs, ag = grads / bw, weights / bw
    exposed_rs = max(bucket * rs, rs - 2 / 3 * compute_s) if spec.overlap_grad_reduce else rs
    exposed_ag = max(bucket * ag, ag - 1 / 3 * compute_s) if spec.overlap_param_gather else ag
    return dict(bytes=grads + weights, seconds=rs + ag, exposed=exposed_rs + exposed_ag, link=link)


def estimate(spec: PlanSpec, hw: HardwareConfig, mfu: Optional[float] = None, memory_margin: float = 0.1) -> dict:
    """The whole plan as a plain dict (what `phi4-plan --json` prints)."""
    t = spec.topology
    m = spec.num_micro_batches
    vp = t.vp or 1

    # Memory: every pipeline rank; the plan reports the fullest.
    ranks = [memory.rank_memory(spec, r, gloo=hw.collectives == "gloo") for r in range(t.pp)]
    worst = max(range(t.pp), key=lambda r: ranks[r].total)
    mem = ranks[worst]
    capacity = hw.usable_bytes * (1 - memory_margin)

    # Time.
    computes = [_rank_compute(spec, hw, r) for r in range(t.pp)]
    stage = []
    for r, c in enumerate(computes):
        cp = _cp_comm(spec, hw, c["attention_seconds"])
        stage.append(c["seconds"] + _tp_comm(spec, hw, c["linear_seconds"])["exposed"] + cp["exposed"])
    slowest = max(range(t.pp), key=lambda r: stage[r])
    tp = _tp_comm(spec, hw, computes[slowest]["linear_seconds"])
    cp = _cp_comm(spec, hw, computes[slowest]["attention_seconds"])
    pp = _pp_comm(spec, hw)
    dp = _dp_comm(spec, hw, computes[slowest]["seconds"] * m)
    pipeline = (m + (t.pp - 1) / vp) * stage[slowest]
    bubble = (t.pp - 1) / (vp * m)
    estimated_step = pipeline + pp["seconds"] + dp["exposed"]

    model_flops = spec.tokens_per_step * flops_per_token(spec.model, spec.seq_length)
    peak = hw.peak_tflops_bf16 * 1e12
    estimated_mfu = model_flops / (spec.world_size * peak * estimated_step)
    step = model_flops / (spec.world_size * peak * mfu) if mfu else estimated_step
    steps = spec.total_steps
    gb = 1e9
    return dict(
        layout=dict(tp=t.tp, pp=t.pp, vp=t.vp, cp=t.cp, dp=spec.dp, sp=t.sp, recompute=t.recompute,
                    micro_batch_size=spec.micro_batch_size, global_batch_size=spec.global_batch_size,
                    micro_batches=m, seq_length=spec.seq_length, gpus=spec.world_size,
                    dtype=spec.precision.dtype, fp8=spec.precision.fp8 is not None, hardware=hw.name),
        memory_gb_per_gpu=mem.total / gb,
        memory=dict(
            pp_rank=worst, weights_gb=mem.static.params / gb, grads_gb=mem.static.grads / gb,
            grads_dtype="fp32" if memory.grad_bytes(spec) == 4 else spec.precision.dtype,
            optimizer_gb=mem.static.optimizer / gb, fp8_gb=mem.fp8 / gb,
            activations_gb=mem.activations.total / gb, activations_stored_gb=mem.activations.stored / gb,
            activations_transient_gb=mem.activations.transient / gb, in_flight_micro_batches=memory.in_flight(spec, worst),
            capacity_gb=capacity / gb, fits=mem.total <= capacity,
            per_pp_rank_gb=[r.total / gb for r in ranks],
        ),
        flops=dict(model_tflop_per_step=model_flops / 1e12,
                   gflop_per_token=flops_per_token(spec.model, spec.seq_length) / 1e9,
                   hardware_tflop_per_step=sum(c["flops"] for c in computes) * m * t.tp * t.cp * spec.dp / 1e12),
        comm=dict(
            tp=dict(gb_per_step=tp["bytes"] * m / gb, seconds=tp["seconds"] * m, exposed_s=tp["exposed"] * m,
                    link=tp["link"], overlapped=tp["overlapped"]),
            cp=dict(gb_per_step=cp["bytes"] * m / gb, seconds=cp["seconds"] * m, exposed_s=cp["exposed"] * m, link=cp["link"]),
            pp=dict(gb_per_step=pp["bytes"] / gb, seconds=pp["seconds"], exposed_s=pp["seconds"], link=pp["link"]),
            dp=dict(gb_per_step=dp["bytes"] / gb, seconds=dp["seconds"], exposed_s=dp["exposed"], link=dp["link"]),
        ),
        compute_s=computes[slowest]["seconds"] * m,
        bubble_fraction=bubble,
        estimated_step_time_s=estimated_step,
        estimated_mfu=estimated_mfu,
        step_time_s=step,
        mfu=model_flops / (spec.world_size * peak * step),
        mfu_given=mfu,
        tokens_per_s_per_gpu=spec.tokens_per_step / step / spec.world_size,
        model_tflops_per_gpu=model_flops / step / spec.world_size / 1e12,
        steps=steps,
        tokens=steps * spec.tokens_per_step if steps else None,
        days=steps * step / 86400 if steps else None,
        assumptions=dict(matmul_efficiency=hw.matmul_efficiency, gemm_efficiency=gemm_efficiency(spec, hw),
                         memory_margin=memory_margin,
                         mfu_against="bf16 dense peak"),
    )

