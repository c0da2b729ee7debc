"""Bytes per device: weights, gradients, optimizer state, activations.

The static part is exact. It follows the buffers Megatron-Core 0.19 allocates for a model chunk
under `DistributedDataParallel` with the distributed optimizer (what phi4-train builds):
- each chunk's parameters, in reverse registration order, go into one contiguous buffer per
  dtype; every parameter starts on a 64-element boundary; a bucket ends padded to a multiple of
  lcm(data-parallel size x context-parallel size, 128). Buckets are cut at
  max(40M, 1M x DP) elements when gradients are reduced with overlap, on the first pipeline rank's
  first virtual stage only (Megatron-Core's rule); otherwise a chunk is one bucket.
- weights: the buffer in the parameter dtype; gradients: the buffer in fp32 (`grad_reduce_in_fp32`).
- optimizer: each data-parallel rank owns 1/DP of every bucket, and keeps, for the parameters'
  elements inside its range, Adam's two moments in fp32 plus an fp32 master copy when the weights
  are bf16 (8 or 12 bytes an element).

Activations are an estimate: what each layer keeps for its backward pass (counted from the
tensors Megatron-Core's layers save, per backend and recompute setting), times the micro-batches
the pipeline schedule holds at once, plus the largest transient (the logits and loss on the last
stage; the dense embedding gradient on the first; a layer's backward elsewhere).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from phi4.model.config import cross_entropy_impl
from phi4.model.pipeline_layout import stage_layers
from phi4.plan.spec import PlanSpec

_PARAM_ALIGN = 64
_BUCKET_ALIGN = 128
_DTYPE_BYTES = {"fp32": 4, "bf16": 2}


def dtype_bytes(spec: PlanSpec) -> int:
    return _DTYPE_BYTES[spec.precision.dtype]


def _round_up(value: int, multiple: int) -> int:
    return int(math.ceil(value / multiple) * multiple)


# ---------------------------------------------------------------------------------------------
# Parameters, gradients, optimizer state (exact)


def chunk_layers(spec: PlanSpec, pp_rank: int, vp_stage: int) -> range:
    """The decoder layers of one model chunk: chunk c = vp_stage x PP + pp_rank holds the c-th
    run of L / (PP x VP) layers (Megatron-Core's interleaved assignment), or the c-th stage of
    topology.pp_layout."""
    return stage_layers(spec.model, spec.topology)[pp_rank][vp_stage]


def chunk_param_numels(spec: PlanSpec, pp_rank: int, vp_stage: int) -> list[int]:
    """Element counts of a chunk's parameters on one tensor-parallel rank, in registration order:
    embedding (first stage), per layer the attention norm, output projection, QKV, MLP norm, FC1,
    FC2 (Megatron-Core registers linear_proj before linear_qkv), then the final norm and the
    output layer (last stage)."""
    m, t = spec.model, spec.topology
    h, tp = m.hidden_size, t.tp
    kv = m.num_query_groups * m.head_dim
    vocab = m.padded_vocab_size(tp)
    stages = t.vp or 1
    first = pp_rank == 0 and vp_stage == 0
    last = pp_rank == t.pp - 1 and vp_stage == stages - 1
    numels = []
    if first:
        numels.append(vocab // tp * h)
    for _ in chunk_layers(spec, pp_rank, vp_stage):
        numels += [h, h * h // tp, (h + 2 * kv) // tp * h, h, 2 * m.ffn_hidden_size // tp * h, m.ffn_hidden_size // tp * h]
    if last:
        numels += [h, vocab // tp * h]
    return numels


@dataclass(frozen=True)
class BufferLayout:
    param_ranges: list[tuple[int, int]]  # [start, end) of each parameter in the buffer
    buckets: list[tuple[int, int]]       # [start, end) of each bucket, padded

    @property
    def numel(self) -> int:
        return self.buckets[-1][1] if self.buckets else 0


def buffer_layout(numels: list[int], bucket_size: Optional[int], dp_world: int) -> BufferLayout:
    """Megatron-Core's distributed-optimizer buffer layout (see the module docstring)."""
    bucket_align = math.lcm(dp_world, _BUCKET_ALIGN)
    ranges, buckets = [], []
    start = bucket_start = 0
    open_bucket = False
    end = 0
    for numel in reversed(numels):
        start = _round_up(start, _PARAM_ALIGN)
        end = start + numel
        ranges.append((start, end))
        open_bucket = True
        if bucket_size is not None and end - bucket_start >= bucket_size:
            bucket_end = _round_up(end, bucket_align)
            buckets.append((bucket_start, bucket_end))
            bucket_start = start = bucket_end
            open_bucket = False
        else:
            start = end
    if open_bucket:
        buckets.append((bucket_start, _round_up(end, bucket_align)))
    return BufferLayout(ranges, buckets)


def chunk_buffer(spec: PlanSpec, pp_rank: int, vp_stage: int) -> BufferLayout:
    dp_world = spec.dp * spec.topology.cp
    bucket_size = None
    if spec.overlap_grad_reduce and pp_rank == 0 and vp_stage == 0:
        bucket_size = max(40_000_000, 1_000_000 * dp_world)
    return buffer_layout(chunk_param_numels(spec, pp_rank, vp_stage), bucket_size, dp_world)


def _shard_numel(layout: BufferLayout, dp_rank: int, dp_world: int) -> int:
    """Parameter elements inside this data-parallel rank's 1/DP of every bucket."""
    total = 0
    for b_start, b_end in layout.buckets:
        size = (b_end - b_start) // dp_world
        lo, hi = b_start + dp_rank * size, b_start + (dp_rank + 1) * size
        for p_start, p_end in layout.param_ranges:
            total += max(0, min(hi, p_end) - max(lo, p_start))
    return total


@dataclass(frozen=True)
class StaticMemory:
    params: int      # bytes of the weight buffers
    grads: int       # bytes of the gradient buffers (fp32, or the weights' dtype: train.grad_reduce_in_fp32)
    optimizer: int   # bytes of Adam's moments and the fp32 master weights of this rank's shard
    params_local: int  # parameters (elements) this rank holds, unpadded


def grad_bytes(spec: PlanSpec) -> int:
    """Bytes of a gradient element: fp32 with train.grad_reduce_in_fp32, else the weights' dtype."""
    return 4 if spec.grad_reduce_in_fp32 else dtype_bytes(spec)


def static_memory(spec: PlanSpec, pp_rank: int = 0, dp_rank: int = 0) -> StaticMemory:
    """Exact bytes of one rank's weights, gradients and optimizer state (all chunks). With FP8
    weights (precision.fp8.param_gather) the FP8 layers' linear weights take one byte each (their
    own buffer's padding aside)."""
    e = dtype_bytes(spec)
    dp_world = spec.dp * spec.topology.cp
    per_element_state = 8 if e == 4 else 12  # exp_avg + exp_avg_sq (+ fp32 master copy)
    params = grads = optimizer = local = 0
    for vp_stage in range(spec.topology.vp or 1):
        layout = chunk_buffer(spec, pp_rank, vp_stage)
        params += layout.numel * e
        grads += layout.numel * grad_bytes(spec)
        optimizer += _shard_numel(layout, dp_rank, dp_world) * per_element_state
        local += sum(chunk_param_numels(spec, pp_rank, vp_stage))
    params -= fp8_weight_numel(spec, pp_rank) * (e - 1)
    return StaticMemory(params, grads, optimizer, local)


def fp8_layers(spec: PlanSpec, pp_rank: int = 0) -> tuple[int, int]:
    """(decoder layers on this pipeline rank, how many of them run their matmuls in FP8): with
    first_last_layers_bf16, the model's first and last layers stay bf16, wherever they live
    (Megatron-Core's is_first_last_bf16_layer counts global layer numbers)."""
    t, fp8 = spec.topology, spec.precision.fp8
    layers = [n for v in range(t.vp or 1) for n in chunk_layers(spec, pp_rank, v)]
    if fp8 is None:
        return len(layers), 0
    if not fp8.first_last_layers_bf16:
        return len(layers), len(layers)
    end = spec.model.num_layers - fp8.num_layers_at_end_in_bf16
    return len(layers), sum(fp8.num_layers_at_start_in_bf16 <= n < end for n in layers)


def _fp8_linear_weights(spec: PlanSpec) -> int:
    """Elements of one layer's linear weights on one tensor-parallel rank."""
    m = spec.model
    h, kv, f = m.hidden_size, m.num_query_groups * m.head_dim, m.ffn_hidden_size
    return (h * (h + 2 * kv) + h * h + 3 * h * f) // spec.topology.tp


def fp8_weight_numel(spec: PlanSpec, pp_rank: int = 0) -> int:
    """Weight elements this rank keeps in FP8 itself (precision.fp8.param_gather): the linear
    weights of its FP8 layers; 0 without FP8 weights."""
    fp8 = spec.precision.fp8
    if fp8 is None or not fp8.param_gather:
        return 0
    return fp8_layers(spec, pp_rank)[1] * _fp8_linear_weights(spec)


def fp8_extra_bytes(spec: PlanSpec, pp_rank: int = 0) -> int:
    """Transformer Engine's FP8 copies of the linear weights beside the weights themselves (the
    weight and its transpose, one byte each; only the transpose where the weights are FP8
    already, precision.fp8.param_gather) and the scaling state (amax history of the delayed
    recipe: inputs, weights and gradients of each linear, fp32)."""
    fp8 = spec.precision.fp8
    if fp8 is None:
        return 0
    _, layers = fp8_layers(spec, pp_rank)
    copies = 1 if fp8.param_gather else 2
    history = fp8.amax_history_len if fp8.recipe == "delayed" else 1
    return layers * (copies * _fp8_linear_weights(spec) + 4 * 3 * 4 * history)


# ---------------------------------------------------------------------------------------------
# Activations (estimate)


def layer_activation_bytes(spec: PlanSpec, recompute: Optional[str] = None, fused: bool = False) -> float:
    """Bytes one decoder layer keeps for its backward pass, per micro-batch, on one rank.

    Counted from the tensors saved by Megatron-Core's layers (measured on the CPU for `local`;
    Transformer Engine's for `te`). Symbols: T tokens of the micro-batch on this rank (the
    sequence split over CP), e the activation dtype's bytes, d = TP under sequence parallelism
    (else 1) for the tensors outside the tensor-parallel region. `fused`: Megatron-Core's fused
    SwiGLU (on GPUs: phi4.model.build.fusion_settings), which keeps FC1's output only and
    recomputes silu(gate) in the backward.
    """
    m, t = spec.model, spec.topology
    recompute = recompute or t.recompute
    e = dtype_bytes(spec)
    s = spec.seq_length // t.cp
    b = spec.micro_batch_size
    T = s * b
    h, f, tp = m.hidden_size, m.ffn_hidden_size, t.tp
    kv = m.num_query_groups * m.head_dim
    d = tp if t.sp else 1
    heads = m.num_attention_heads // tp
    grouped = m.num_attention_heads > m.num_query_groups

    if recompute == "full":  # the checkpoint keeps the layer's input only
        return T * h * e / d

    rope = 4 * s * m.head_dim * e  # cos and sin of q and k, [s, 1, 1, head_dim]
    if m.transformer_impl == "local":
        # RMSNorm (ours): fp32 input (or its fp32 copy), 1/rms, the normalised x in dtype.
        norm = T * (4 * h + 4 + e * h) / d
        qkv_in = T * e * h / d
        fc1_in = T * e * h / d
        proj_in = T * e * h / tp
        if recompute == "selective":  # core attention's inputs: q, k, and the QKV output (v's base)
            attention = T * e * (2 * h + 3 * kv) / tp + s * s
        else:  # q, k and v repeated to every head (GQA), the fp32 softmax (and its cast), the mask
            kv_saved = h if grouped else kv
            probs = b * heads * s * s * (4 + (e if e != 4 else 0))
            attention = T * e * (h + 2 * kv_saved) / tp + probs + s * s
    else:
        fp8 = spec.precision.fp8 is not None
        linear_in = 1 if fp8 else e  # TE keeps an FP8 linear's input in FP8
        # TE's fused LayerNorm-linear: its input, the normalised output, 1/rms (fp32).
        norm = T * (e * h + linear_in * h + 4) / d
        qkv_in = fc1_in = 0.0
        # fused attention: q, k, v (not repeated), the output, softmax statistics (fp32).
        attention = T * e * (h + 2 * kv) / tp + b * heads * s * 4
        proj_in = T * e * h / tp + (T * h / tp if fp8 else 0)
    # MLP, Megatron-Core's unfused SwiGLU (as measured on the CPU): FC1's output (gate and up),
    # silu(gate), the product; the fused one (bias_swiglu_impl's autograd function) saves FC1's
    # output alone. Then FC2's input as FC2 keeps it (TE in FP8: one byte).
    mlp = T * e * (2 if fused else 4) * f / tp + T * (1 if (m.transformer_impl == "te" and spec.precision.fp8) else e) * f / tp
    return 2 * norm + qkv_in + rope + attention + proj_in + fc1_in + mlp


def loss_kernel(spec: PlanSpec, gloo: bool = False) -> str:
    """The cross-entropy kernel the plan counts: the spec's, else phi4-train's for its backend."""
    return spec.cross_entropy or cross_entropy_impl(spec.model.transformer_impl, on_cpu=gloo)


def recomputed_layers(spec: PlanSpec, pp_rank: int) -> int:
    """Layers of this pipeline rank (all its chunks) that recompute their forward in the backward:
    every one under recompute=full, the first topology.recompute_layers of each chunk with it set
    (Megatron-Core's block method), none otherwise."""
    t = spec.topology
    if t.recompute != "full":
        return 0
    sizes = [len(chunk_layers(spec, pp_rank, v)) for v in range(t.vp or 1)]
    return sum(min(n, t.recompute_layers) if t.recompute_layers else n for n in sizes)


def in_flight(spec: PlanSpec, pp_rank: int) -> int:
    """Micro-batches (times virtual stages) whose activations this pipeline rank holds at its
    peak: 1F1B warms up PP - rank - 1 micro-batches; the interleaved schedule
    2 (PP - rank - 1) + (VP - 1) PP model chunks; then one more starts before the first backward."""
    t = spec.topology
    m = spec.num_micro_batches
    if t.pp == 1:
        return 1
    if not t.vp:
        return min(m, t.pp - pp_rank)
    return min(m * t.vp, 2 * (t.pp - pp_rank - 1) + (t.vp - 1) * t.pp + 1)


@dataclass(frozen=True)
class ActivationMemory:
    stored: float     # layer activations of the micro-batches in flight
    transient: float  # the largest working set on top of them
    total: float


def activation_memory(spec: PlanSpec, pp_rank: int = 0, gloo: bool = False) -> ActivationMemory:
    """`gloo`: collectives over gloo (the CPU), whose gradient reduce-scatter works on a copy of
    each bucket; NCCL's works in place. Off the CPU the fused kernels are on (the fused SwiGLU)."""
    m, t = spec.model, spec.topology
    e = dtype_bytes(spec)
    tp = t.tp
    d = tp if t.sp else 1
    T = spec.seq_length // t.cp * spec.micro_batch_size
    h, f = m.hidden_size, m.ffn_hidden_size
    vocab = m.padded_vocab_size(tp) // tp
    chunks = t.vp or 1
    # this rank's layers per chunk (uneven stages: their mean over its chunks), and how many of them
    # recompute (topology.recompute_layers: the first N of each chunk)
    layers_per_chunk = sum(len(chunk_layers(spec, pp_rank, v)) for v in range(chunks)) / chunks
    recomputed = recomputed_layers(spec, pp_rank) / chunks
    flight = in_flight(spec, pp_rank)

    fused = not gloo
    kept = "none" if t.recompute == "full" else t.recompute
    per_chunk = (recomputed * layer_activation_bytes(spec, recompute="full", fused=fused)
                 + (layers_per_chunk - recomputed) * layer_activation_bytes(spec, recompute=kept, fused=fused))
    if pp_rank > 0 or chunks > 1:
        per_chunk += T * h * e / d  # the received input of a non-first stage, kept for backward
    stored = flight * per_chunk

    # The peak is the largest of these moments, each stored activations plus a working set:
    # a layer's backward, with every in-flight micro-batch stored: the MLP's (gradients of its
    # activations and FC1's weight gradient, computed whole, then added into the fp32 gradient
    # buffer), or the local backend's core attention's (the softmax's gradient, as large as its
    # probabilities; under selective recomputation the recomputed probabilities too);
    mlp_backward = T * e * (3 * f / tp + 2 * h / d) + 2 * f // tp * h * e
    attention_backward = 0.0
    if m.transformer_impl == "local":
        heads, s = m.num_attention_heads // tp, spec.seq_length // t.cp
        probs = spec.micro_batch_size * heads * s * s * (4 + (e if e != 4 else 0))
        attention_backward = probs * (2 if t.recompute == "selective" else 1)
    layer = max(mlp_backward, attention_backward)
    if t.recompute == "full":  # plus the recomputed layer's own activations
        recomputing = layer + layer_activation_bytes(spec, recompute="none", fused=fused)
        # recompute_layers: the recomputed layers are a chunk's first, which its backward reaches
        # after it has freed the micro-batch's other layers
        freed = (layers_per_chunk - recomputed) * layer_activation_bytes(spec, recompute=kept, fused=fused)
        layer = max(layer, recomputing - freed) if freed else recomputing
    peak = stored + layer
    if pp_rank == 0:
        # the embedding's dense weight gradient, after the rest of its micro-batch was freed;
        peak = max(peak, stored - per_chunk + vocab * h * e + T * h * e)
    if pp_rank == t.pp - 1:
        # the loss: the logits in dtype and in fp32 (the softmax is computed in place), then in
        # the backward the fp32 gradient and its cast back, then the output layer's weight gradient;
        # Transformer Engine's kernel keeps no fp32 copy (its gradient replaces the logits).
        logits = T * vocab
        cast = e if e != 4 else 0
        held = logits * e if loss_kernel(spec, gloo) == "te" else logits * (4 + cast)
        peak = max(peak, stored + held, stored + logits * e + vocab * h * e)
    if gloo:  # the gradient sync after the last backward: one bucket's copy
        largest = max(b_end - b_start for vp_stage in range(chunks)
                      for b_start, b_end in chunk_buffer(spec, pp_rank, vp_stage).buckets)
        peak = max(peak, largest * grad_bytes(spec))
    return ActivationMemory(stored, peak - stored, peak)


@dataclass(frozen=True)
class RankMemory:
    static: StaticMemory
    fp8: int
    activations: ActivationMemory

    @property
    def total(self) -> float:
        return self.static.params + self.static.grads + self.static.optimizer + self.fp8 + self.activations.total


def rank_memory(spec: PlanSpec, pp_rank: int, dp_rank: int = 0, gloo: bool = False) -> RankMemory:
    return RankMemory(static_memory(spec, pp_rank, dp_rank), fp8_extra_bytes(spec, pp_rank),
                      activation_memory(spec, pp_rank, gloo))
