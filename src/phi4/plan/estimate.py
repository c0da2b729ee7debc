"""A plan: memory per device, and per step the FLOPs, pipeline bubble, communication, time and MFU.

Time model (per step, on the slowest pipeline rank), each rate from the hardware file:
- compute: every kernel of a micro-batch on one device, by shape (phi4.plan.timing): the linears'
  GEMMs (FP8 where the layer is), fused attention, the memory-bound kernels between them, the
  embedding on the first stage and the output layer and loss on the last, recomputation included;
- tensor parallel: per layer and micro-batch, under sequence parallelism, four all-gathers or
  reduce-scatters forward and six backward (the backward all-gathers the norms' outputs again for
  the wgrad GEMMs) of (TP-1)/TP x tokens x hidden bytes each, four more for a fully recomputed
  forward; without SP two all-reduces each way. With TE's TP communication overlap
  (topology.tp_comm_overlap, on by default with TP > 1, SP and te on GPUs) each runs under its
  GEMM and only what outlasts that GEMM is exposed; without it the backward's wgrad-side ones still
  overlap (TE and Megatron-Core issue them asynchronously), the rest are exposed;
- context parallel: the ring passes each layer's K and V (CP-1 times forward, twice that backward),
  hidden behind the layer's attention where that is longer;
- pipeline: (micro-batches + (PP-1)/VP) x the per-micro-batch stage time (the interleaved 1F1B
  bubble); the activation sends of every micro-batch and virtual stage, forward and backward,
  exposed under 1F1B, and under the interleaved schedule (overlap_p2p_comm, as Megatron-LM runs
  it) only those of the warm-up and flush;
- data parallel: the distributed optimizer's reduce-scatter of gradients (fp32, or the weights' dtype
  without train.grad_reduce_in_fp32) and all-gather of
  weights (FP8 weights at one byte), hidden behind the backward/forward when overlapped except for
  one bucket;
- the optimizer step: Adam over the rank's shard, memory-bound.
Links: NVLink inside a node, InfiniBand across nodes, by Megatron-Core's rank order (TP, CP, DP,
PP from fastest-varying): a group stays inside a node when its span fits in one.
"""

from __future__ import annotations

from typing import Optional

from phi4.model.flops import flops_per_token
from phi4.model.tp_overlap import tp_comm_overlap_on
from phi4.plan import memory, timing
from phi4.plan.spec import PlanSpec
from phi4.runtime.hardware import HardwareConfig

# (the GEMM a collective runs under with TE's overlap, whether it overlaps without it too)
_TP_FORWARD = [("qkv_fprop", False), ("proj_fprop", False), ("fc1_fprop", False), ("fc2_fprop", False)]
_TP_BACKWARD = [("fc2_dgrad", False), ("fc1_dgrad", True), ("fc1_wgrad", True), ("proj_dgrad", False),
                ("qkv_dgrad", True), ("qkv_wgrad", True)]


def _link(hw: HardwareConfig, span: int) -> tuple[str, float]:
    """The link a group whose ranks span `span` consecutive devices uses."""
    return ("nvlink", hw.nvlink_gb_s * 1e9) if span <= hw.gpus_per_node else ("ib", hw.ib_gb_s * 1e9)


def _tp_overlapped(spec: PlanSpec, hw: HardwareConfig) -> bool:
    return tp_comm_overlap_on(spec.topology, spec.model.transformer_impl, on_cuda=hw.collectives != "gloo")


def _layer_tp(spec: PlanSpec, hw: HardwareConfig, gemms: dict, recompute: str) -> dict:
    """One layer's tensor-parallel traffic per micro-batch on one device, and what of it is exposed."""
    t = spec.topology
    if t.tp == 1:
        return dict(bytes=0.0, seconds=0.0, exposed=0.0)
    link, bw = _link(hw, t.tp)
    one = (t.tp - 1) / t.tp * timing.tokens(spec) * spec.model.hidden_size * memory.dtype_bytes(spec)
    if not t.sp:  # all-reduces: after proj and fc2 forward; of qkv's and fc1's dgrad, under their wgrads
        pairs = [("proj_fprop", False), ("fc2_fprop", False), ("qkv_wgrad", True), ("fc1_wgrad", True)]
        pairs += pairs[:2] if recompute == "full" else []
        one *= 2
        ub = False
    else:
        pairs = _TP_FORWARD + _TP_BACKWARD + (_TP_FORWARD if recompute == "full" else [])
        ub = _tp_overlapped(spec, hw)
    seconds = one / bw
    exposed = sum(max(0.0, seconds - gemms[name]) if (ub or hidden) else seconds for name, hidden in pairs)
    return dict(bytes=one * len(pairs), seconds=seconds * len(pairs), exposed=exposed)


def _rank_compute(spec: PlanSpec, hw: HardwareConfig, pp_rank: int) -> dict:
    """Seconds and FLOPs of one micro-batch on one device of this pipeline rank, and its exposed
    tensor- and context-parallel communication."""
    t = spec.topology
    layers, in_fp8 = memory.fp8_layers(spec, pp_rank)
    ub = _tp_overlapped(spec, hw)  # TP > 1 with SP (check_topology refuses it otherwise)
    flops = 0.0
    parts = dict(gemm=0.0, attention=0.0, elementwise=0.0, embedding=0.0, output_and_loss=0.0)
    tp = dict(bytes=0.0, seconds=0.0, exposed=0.0)
    # the share of this rank's layers that recompute (topology.recompute_layers: some of them)
    share = memory.recomputed_layers(spec, pp_rank) / layers if t.recompute == "full" and layers else None
    for fp8, count in ((True, in_fp8), (False, layers - in_fp8)):
        if not count:
            continue
        kinds = [(t.recompute, count)] if share is None else [("full", count * share), ("none", count * (1 - share))]
        for recompute, n in kinds:
            layer = timing.layer_seconds(spec, hw, fp8, ub, recompute)
            flops += n * layer["flops"]
            for key in ("gemm", "attention", "elementwise"):
                parts[key] += n * layer[key]
            for key, value in _layer_tp(spec, hw, layer["gemms"], recompute).items():
                tp[key] += n * value
    if pp_rank == 0:
        parts["embedding"] = timing.embedding_seconds(spec, hw)
    if pp_rank == t.pp - 1:
        parts["output_and_loss"] = timing.output_layer_seconds(spec, hw)
        m = spec.model
        flops += 6.0 * timing.tokens(spec) * m.padded_vocab_size(t.tp) // t.tp * m.hidden_size
    seconds = sum(parts.values())
    tp.update(link=_link(hw, t.tp)[0] if t.tp > 1 else "-", overlapped=ub)
    cp = _cp_comm(spec, hw, parts["attention"])
    return dict(flops=flops, seconds=seconds, parts=parts, tp=tp, cp=cp,
                stage=seconds + tp["exposed"] + cp["exposed"])


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
    virtual stage; exposed all under 1F1B, only the warm-up's and flush's when interleaved."""
    t = spec.topology
    if t.pp == 1:
        return dict(bytes=0.0, seconds=0.0, exposed=0.0, link="-")
    e = memory.dtype_bytes(spec)
    d = t.tp if t.sp else 1
    tokens = spec.micro_batch_size * spec.seq_length // t.cp
    one = tokens * spec.model.hidden_size * e / d
    sends = 2 * spec.num_micro_batches * (t.vp or 1)
    link, bw = _link(hw, spec.world_size)
    seconds = sends * one / bw
    exposed = 2 * (t.pp - 1) * one / bw if t.vp and hw.collectives != "gloo" else seconds
    return dict(bytes=sends * one, seconds=seconds, exposed=exposed, link=link)


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
    # The weights, gradients, optimizer state and FP8 copies are exact (buffers allocated once);
    # the margin covers the activations, an estimate, and the allocator's fragmentation of them.
    needed = [r.total + memory_margin * r.activations.total for r in ranks]
    worst = max(range(t.pp), key=lambda r: needed[r])
    mem = ranks[worst]
    capacity = hw.usable_bytes

    # Time.
    computes = [_rank_compute(spec, hw, r) for r in range(t.pp)]
    slowest = max(range(t.pp), key=lambda r: computes[r]["stage"])
    c = computes[slowest]
    tp, cp = c["tp"], c["cp"]
    pp = _pp_comm(spec, hw)
    dp = _dp_comm(spec, hw, c["seconds"] * m)
    local = max(memory.static_memory(spec, r).params_local for r in range(t.pp))
    optimizer_s = timing.optimizer_seconds(spec, hw, local)
    pipeline = (m + (t.pp - 1) / vp) * c["stage"]
    bubble = (t.pp - 1) / (vp * m)
    estimated_step = pipeline + pp["exposed"] + dp["exposed"] + optimizer_s

    model_flops = spec.tokens_per_step * flops_per_token(spec.model, spec.seq_length)
    peak = hw.peak_tflops_bf16 * 1e12
    estimated_mfu = model_flops / (spec.world_size * peak * estimated_step)
    step = model_flops / (spec.world_size * peak * mfu) if mfu else estimated_step
    steps = spec.total_steps
    gb = 1e9
    return dict(
        layout=dict(tp=t.tp, pp=t.pp, vp=t.vp, cp=t.cp, dp=spec.dp, sp=t.sp, recompute=t.recompute, pp_layout=t.pp_layout,
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
            capacity_gb=capacity / gb, needed_gb=needed[worst] / gb, margin=memory_margin,
            fits=needed[worst] <= capacity,
            per_pp_rank_gb=[r.total / gb for r in ranks],
        ),
        flops=dict(model_tflop_per_step=model_flops / 1e12,
                   gflop_per_token=flops_per_token(spec.model, spec.seq_length) / 1e9,
                   hardware_tflop_per_step=sum(r["flops"] for r in computes) * m * t.tp * t.cp * spec.dp / 1e12),
        comm=dict(
            tp=dict(gb_per_step=tp["bytes"] * m / gb, seconds=tp["seconds"] * m, exposed_s=tp["exposed"] * m,
                    link=tp["link"], overlapped=tp["overlapped"]),
            cp=dict(gb_per_step=cp["bytes"] * m / gb, seconds=cp["seconds"] * m, exposed_s=cp["exposed"] * m, link=cp["link"]),
            pp=dict(gb_per_step=pp["bytes"] / gb, seconds=pp["seconds"], exposed_s=pp["exposed"], link=pp["link"]),
            dp=dict(gb_per_step=dp["bytes"] / gb, seconds=dp["seconds"], exposed_s=dp["exposed"], link=dp["link"]),
        ),
        compute_s=c["seconds"] * m,
        compute_per_micro_batch_s=c["parts"],
        optimizer_s=optimizer_s,
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
        assumptions=dict(gemm_efficiency_bf16=hw.gemm_efficiency_bf16, gemm_efficiency_fp8=hw.gemm_efficiency_fp8,
                         hbm_gb_s=hw.hbm_gb_s, memory_margin=memory_margin, mfu_against="bf16 dense peak"),
    )

