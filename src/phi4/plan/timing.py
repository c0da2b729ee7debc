"""Seconds of one micro-batch on one device, kernel by kernel: the linears' GEMMs by shape, fused
attention, the memory-bound kernels between them, the output layer and loss, and what TE's
tensor-parallel overlap costs the GEMMs it hides under. The rates are the hardware file's
(conf/hardware/*.yaml), where each assumption names its source.

- A GEMM of m x n x k runs at peak (bf16 or FP8) x `gemm_efficiency_*` (a large GEMM's achieved
  fraction, clocks under the power limit included), times its wave utilisation (output tiles of
  128 x 128 over the SMs: a GEMM of few tiles leaves SMs idle in its last wave), times
  k / (k + `gemm_k_overhead`) (each tile's prologue and epilogue, worth that much more K). It
  takes at least its operands' and output's bytes over the HBM rate (a roofline).
- A layer's linears are Megatron-Core's four (QKV, output projection, FC1 of gate and up, FC2),
  each three GEMMs: fprop (m = tokens), dgrad (m = tokens) and wgrad (k = tokens). FP8 layers run
  all three in FP8 (TE's recipes); the output layer is bf16 everywhere (Megatron-Core's own
  ColumnParallelLinear, outside TE's autocast).
- Fused attention (cuDNN, as TE picks it on Hopper) runs at `attention_*_tflops` reached as the
  sequence grows: rate x s / (s + `attention_seq_half`), with the FLOPs counted as its benchmarks
  count them: causal halved, the backward 2.5 x the forward (it recomputes the scores).
- The memory-bound kernels (norms, RoPE, SwiGLU, residual adds, FP8 casts and transposes, the
  loss's passes over the logits, the optimizer step) move the bytes listed in
  `layer_elementwise_bytes` at `hbm_gb_s`.
- TE's userbuffer overlap (topology.tp_comm_overlap) runs each tensor-parallel all-gather and
  reduce-scatter under a GEMM. Its default configuration (transformer_engine/pytorch/module/base.py,
  get_default_config) splits the all-gathers' GEMMs (qkv and fc1 fprop, proj and fc2 dgrad) into
  TP ring steps of tokens / TP rows each, on copy engines, and gives 16 SMs to the reduce-scatters
  of proj and fc2 fprop (4 chunks) and the bulk overlaps of qkv and fc1 dgrad and wgrad, which run
  on the other SMs (set_sm_margin). What outlasts its GEMM stays exposed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from phi4.plan import memory
from phi4.plan.spec import PlanSpec
from phi4.runtime.hardware import HardwareConfig

TILE = (128, 128)        # cuBLAS's Hopper output tile (m x n) for the wave count
UB_COMM_SMS = 16         # TE's default userbuffer config: SMs of the pipeline and bulk methods
UB_PIPELINE_SPLITS = 4   # its default num_splits for the pipelined reduce-scatters
UB_RING = ("qkv_fprop", "fc1_fprop", "proj_dgrad", "fc2_dgrad")      # ring-exchange all-gathers
UB_SM_SHARED = ("proj_fprop", "fc2_fprop", "qkv_dgrad", "qkv_wgrad", "fc1_dgrad", "fc1_wgrad")
ATTENTION_BACKWARD_FLOPS = 2.5  # x the forward's, as FlashAttention's and cuDNN's benchmarks count
OPTIMIZER_BYTES = 30     # per element of the shard: fp32 master, Adam's two moments (each read and
#                          written), the gradient read, the new bf16 weight written


@dataclass(frozen=True)
class Gemm:
    name: str   # TE's userbuffer names: qkv_fprop, proj_dgrad, fc1_wgrad, ...
    m: int
    n: int
    k: int
    fp8: bool

    @property
    def flops(self) -> float:
        return 2.0 * self.m * self.n * self.k


def gemm_efficiency(g: Gemm, hw: HardwareConfig) -> float:
    """A large GEMM's achieved fraction of peak in its precision: FP8 fprop accumulates fast, TE's
    dgrad and wgrad in split (promoted) fp32 (_2X_ACC_DGRAD/WGRAD)."""
    if not g.fp8:
        return hw.gemm_efficiency_bf16
    return hw.gemm_efficiency_fp8 if g.name.endswith("fprop") else hw.gemm_efficiency_fp8_split


def waves(g: Gemm, sms: int) -> int:
    """How many rounds of 128 x 128 output tiles the GEMM's SMs run."""
    return math.ceil(math.ceil(g.m / TILE[0]) * math.ceil(g.n / TILE[1]) / sms)


def gemm_seconds(g: Gemm, hw: HardwareConfig, sms: Optional[int] = None) -> float:
    """One GEMM on `sms` SMs (all of them by default): its FLOPs at the achieved rate on the tiles
    its waves could hold, or its bytes over HBM, whichever is longer."""
    sms = hw.sm_count if sms is None else sms
    per_sm = (hw.peak_tflops_fp8 if g.fp8 else hw.peak_tflops_bf16) * 1e12 / hw.sm_count * hw.sustained_clock
    capacity = waves(g, sms) * sms * TILE[0] * TILE[1]  # output elements its waves could compute
    k_use = g.k / (g.k + hw.gemm_k_overhead)
    compute = 2.0 * capacity * g.k / (per_sm * sms * gemm_efficiency(g, hw) * k_use)
    operand = 1 if g.fp8 else 2
    traffic = ((g.m + g.n) * g.k * operand + g.m * g.n * 2) / (hw.hbm_gb_s * 1e9)
    return max(compute, traffic)


def tokens(spec: PlanSpec) -> int:
    """Rows of this device's micro-batch inside the tensor-parallel region (the sequence split
    over CP, whole over TP after sequence parallelism's all-gather)."""
    return spec.micro_batch_size * spec.seq_length // spec.topology.cp


def layer_gemms(spec: PlanSpec, fp8: bool) -> list[Gemm]:
    """The twelve GEMMs of one decoder layer on one tensor-parallel rank."""
    m, tp = spec.model, spec.topology.tp
    T, h, f = tokens(spec), m.hidden_size, m.ffn_hidden_size
    qkv = (h + 2 * m.num_query_groups * m.head_dim) // tp
    linears = {"qkv": (h, qkv), "proj": (h // tp, h), "fc1": (h, 2 * f // tp), "fc2": (f // tp, h)}
    out = []
    for name, (k_in, n_out) in linears.items():
        out += [Gemm(f"{name}_fprop", T, n_out, k_in, fp8), Gemm(f"{name}_dgrad", T, k_in, n_out, fp8),
                Gemm(f"{name}_wgrad", n_out, k_in, T, fp8)]
    return out


def ub_pieces(g: Gemm, hw: HardwareConfig, tp: int) -> tuple[Gemm, int, int]:
    """(the piece, how many, on how many SMs): a GEMM as TE's userbuffer overlap runs it, in TP
    ring steps on every SM, in 4 pipelined chunks or whole on the SMs its communication leaves."""
    if g.name in UB_RING:
        return Gemm(g.name, g.m // tp, g.n, g.k, g.fp8), tp, hw.sm_count
    if g.name in ("proj_fprop", "fc2_fprop"):
        return Gemm(g.name, g.m // UB_PIPELINE_SPLITS, g.n, g.k, g.fp8), UB_PIPELINE_SPLITS, hw.sm_count - UB_COMM_SMS
    if g.name in UB_SM_SHARED:
        return g, 1, hw.sm_count - UB_COMM_SMS
    return g, 1, hw.sm_count


def _ub_gemm_seconds(g: Gemm, hw: HardwareConfig, tp: int) -> float:
    piece, count, sms = ub_pieces(g, hw, tp)
    return count * gemm_seconds(piece, hw, sms)


def attention_seconds(spec: PlanSpec, hw: HardwareConfig) -> dict:
    """Fused causal attention of one layer and micro-batch on one device: forward and backward.
    Under CP each rank does 1/CP of the causal work (the load-balanced split) in kernels over
    sequence / CP tokens."""
    m, t = spec.model, spec.topology
    s_kernel = spec.seq_length // t.cp
    heads = m.num_attention_heads // t.tp
    fwd = 2.0 * spec.micro_batch_size * spec.seq_length ** 2 * heads * m.head_dim / t.cp  # 4bs^2hd / 2
    ramp = s_kernel / (s_kernel + hw.attention_seq_half) * hw.sustained_clock
    forward = fwd / (hw.attention_fwd_tflops * 1e12 * ramp)
    backward = ATTENTION_BACKWARD_FLOPS * fwd / (hw.attention_bwd_tflops * 1e12 * ramp)
    return dict(forward=forward, backward=backward, flops=3 * fwd)


def layer_elementwise_bytes(spec: PlanSpec, fp8: bool) -> dict:
    """HBM bytes of one decoder layer's memory-bound kernels, per micro-batch on one device.
    T tokens on this rank (Td outside the TP region under SP), e the activations' bytes, q the
    bytes of a linear's input as TE keeps it (1 in FP8, where TE also writes its transpose for
    the wgrad GEMM; else e).

    Forward: each RMSNorm (TE's fused norm-linear) reads x and writes its output (and the FP8
    transpose); RoPE reads and writes q and k; v is made contiguous for the attention kernel; proj's
    and FC2's inputs are cast to FP8 (and transposed); SwiGLU reads gate and up and writes the
    product; each residual add reads two and writes one.
    Backward: each kernel again with its gradient (the norms read x and the gradient and write
    theirs; SwiGLU reads its gradient and both inputs and writes two; RoPE on dq and dk; dq, dk and
    dv concatenated), every linear's output gradient cast to FP8 and transposed, and the residual
    stream's gradients added at both branch points.
    """
    m, t = spec.model, spec.topology
    e = memory.dtype_bytes(spec)
    T = tokens(spec)
    d = t.tp if t.sp else 1
    Td = T / d
    h, f, tp = m.hidden_size, m.ffn_hidden_size / t.tp, t.tp
    hq, kv = h / tp, m.num_query_groups * m.head_dim / tp
    q_in = 2 if fp8 else e  # an FP8 input and its transpose, or the bf16 input itself
    cast = lambda n: T * n * (e + 2) if fp8 else 0.0  # read in e, write FP8 and its transpose
    norm = Td * h * (e + q_in)
    forward = dict(
        norms=2 * norm,
        rope=2 * T * (hq + kv) * e,
        v_copy=2 * T * kv * e,
        casts=cast(hq) + cast(f),
        swiglu=3 * T * f * e,
        residual=2 * 3 * Td * h * e,
    )
    backward = dict(
        norms=2 * 3 * Td * h * e,
        rope=2 * T * (hq + kv) * e,
        qkv_concat=2 * T * (hq + 2 * kv) * e,
        casts=cast(h) * 2 + cast(hq + 2 * kv) + cast(2 * f),  # output gradients of proj, fc2, qkv, fc1
        swiglu=5 * T * f * e,
        residual=2 * 3 * Td * h * e,
    )
    if t.cp > 1:  # the ring's per-step correction of the partial outputs (fp32) and their statistics
        forward["cp_merge"] = (t.cp - 1) * 3 * T * hq * 4
        backward["cp_merge"] = (t.cp - 1) * 3 * T * (hq + 2 * kv) * 4
    return dict(forward=sum(forward.values()), backward=sum(backward.values()))


def output_layer_seconds(spec: PlanSpec, hw: HardwareConfig) -> float:
    """The last stage's output layer (three bf16 GEMMs) and the loss: Megatron-Core's cross entropy
    passes over an fp32 copy of the logits a few times (20 bytes a logit); Transformer Engine's reads
    the bf16 logits and writes their gradient over them, once forward and once backward (8)."""
    m, tp = spec.model, spec.topology.tp
    T, h, vocab = tokens(spec), m.hidden_size, m.padded_vocab_size(tp) // tp
    gemms = [Gemm("out_fprop", T, vocab, h, False), Gemm("out_dgrad", T, h, vocab, False),
             Gemm("out_wgrad", vocab, h, T, False)]
    per_logit = 8 if memory.loss_kernel(spec, gloo=hw.collectives == "gloo") == "te" else 20
    loss = T * vocab * per_logit / (hw.hbm_gb_s * 1e9)
    return sum(gemm_seconds(g, hw) for g in gemms) + loss


def embedding_seconds(spec: PlanSpec, hw: HardwareConfig) -> float:
    """The first stage's embedding: the lookup, and its backward's dense weight gradient (zeroed,
    scattered into and added to the gradient buffer)."""
    m, tp = spec.model, spec.topology.tp
    T, h, vocab = tokens(spec), m.hidden_size, m.padded_vocab_size(tp) // tp
    e = memory.dtype_bytes(spec)
    return (2 * T * h * e + 3 * vocab * h * memory.grad_bytes(spec)) / (hw.hbm_gb_s * 1e9)


def optimizer_seconds(spec: PlanSpec, hw: HardwareConfig, local_params: int) -> float:
    """Adam on this rank's 1/DP shard of its weights, once a step; and the gradient norm's pass."""
    shard = local_params / (spec.dp * spec.topology.cp)
    return shard * (OPTIMIZER_BYTES + memory.grad_bytes(spec)) / (hw.hbm_gb_s * 1e9)


def layer_seconds(spec: PlanSpec, hw: HardwareConfig, fp8: bool, ub_overlap: bool, recompute: Optional[str] = None) -> dict:
    """One decoder layer, one micro-batch, one device: seconds of its GEMMs, attention and
    memory-bound kernels with `recompute` (topology.recompute by default: full runs the forward
    again, selective core attention's forward), its FLOPs, and each GEMM's seconds."""
    recompute = recompute or spec.topology.recompute
    gemms = layer_gemms(spec, fp8)
    run = (lambda g: _ub_gemm_seconds(g, hw, spec.topology.tp)) if ub_overlap else (lambda g: gemm_seconds(g, hw))
    seconds = {g.name: run(g) for g in gemms}
    forward_gemm = sum(v for name, v in seconds.items() if name.endswith("fprop"))
    attn = attention_seconds(spec, hw)
    mem = layer_elementwise_bytes(spec, fp8)
    bw = hw.hbm_gb_s * 1e9
    full = recompute == "full"
    return dict(gemm=sum(seconds.values()) + (forward_gemm if full else 0.0),
                attention=attn["forward"] + attn["backward"] + (attn["forward"] if recompute != "none" else 0.0),
                elementwise=(mem["forward"] * (2 if full else 1) + mem["backward"]) / bw,
                flops=_layer_flops(gemms, attn, recompute), gemms=seconds)


def _layer_flops(gemms: list[Gemm], attn: dict, recompute: str) -> float:
    """What the layer's kernels compute, recomputation included (the forward again under full; core
    attention's forward again under selective)."""
    forward = sum(g.flops for g in gemms if g.name.endswith("fprop")) + attn["flops"] / 3
    extra = forward if recompute == "full" else attn["flops"] / 3 if recompute == "selective" else 0.0
    return sum(g.flops for g in gemms) + attn["flops"] + extra
