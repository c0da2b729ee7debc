"""From the run's settings to Megatron-Core: the TransformerConfig and the model chunks.

`transformer_config` is the one place where Phi-4's architecture (docs/model.md, "Architecture")
meets Megatron-Core's names; `build_phi4_model` returns the GPTModel chunks this pipeline rank owns
(one per virtual stage), with untied embeddings, RoPE and the padded vocabulary.
"""

from __future__ import annotations

import contextlib
import importlib.util
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.enums import ModelType
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer import TransformerConfig

from phi4.model.config import ModelConfig, PrecisionConfig, TopologyConfig, cross_entropy_impl
from phi4.model.spec import phi4_block_spec
from phi4.model.tp_overlap import tp_comm_overlap_on
from phi4.runtime import device

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _fp8_settings(precision: PrecisionConfig) -> dict:
    fp8 = precision.fp8
    if fp8 is None:
        return {}
    settings = dict(
        fp8=fp8.format,
        fp8_recipe=fp8.recipe,
        fp8_margin=fp8.margin,
        first_last_layers_bf16=fp8.first_last_layers_bf16,
        num_layers_at_start_in_bf16=fp8.num_layers_at_start_in_bf16,
        num_layers_at_end_in_bf16=fp8.num_layers_at_end_in_bf16,
        # Weights in FP8 (TE's fp8_model_init around the FP8 layers; Megatron-LM's --fp8-param-gather
        # sets config.fp8_param and ddp_config.fp8_param_gather; Megatron-Bridge's FP8 recipes set it)
        fp8_param=fp8.param_gather,
    )
    if fp8.recipe == "delayed":  # amax history belongs to delayed scaling only
        settings.update(fp8_amax_history_len=fp8.amax_history_len, fp8_amax_compute_algo=fp8.amax_compute_algo)
    return settings


def wgrad_fusion_available() -> bool:
    """Megatron-Core's output layer (its own ColumnParallelLinear, whatever the spec) fuses the
    weight-gradient accumulation only through apex's fused_weight_gradient_mlp_cuda; without it,
    gradient_accumulation_fusion=True is a RuntimeError when the model is built
    (tensor_parallel/layers.py), even where Transformer Engine fuses its own linears."""
    return importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None


def fusion_settings(backend: str, on_cpu: bool) -> dict:
    """Megatron-Core's fused kernels: all off on the CPU, where they do not exist; on a GPU the
    ones Megatron-Bridge's Llama providers turn on (llama_provider.py, gpt_provider.py), where this
    machine can run them:
    - bias_activation_fusion: the fused SwiGLU (bias_swiglu_impl), which keeps only FC1's output
      for the backward (phi4.plan.memory counts one activation less);
    - bias_dropout_fusion: the fused dropout-add (no bias here);
    - cross_entropy_loss_fusion: a fused vocab-parallel cross entropy; on the te backend Transformer
      Engine's (cross_entropy_fusion_impl="te", as Megatron-Bridge's performance recipes set it:
      perf_recipes/_common.py, _benchmark_common), which works on the bf16 logits in place where
      Megatron-Core's native one makes an fp32 copy of them (local backend: native);
    - apply_rope_fusion: TE's fused RoPE (te backend: it needs Transformer Engine);
    - gradient_accumulation_fusion: where apex's extension exists (wgrad_fusion_available).
    Left off: masked_softmax_fusion (the local spec's fused softmax is a Megatron extension build;
    TE fuses its own attention) and persist_layer_norm (apex's LayerNorm; the norm here is RMSNorm)."""
    if on_cpu:
        return dict(bias_activation_fusion=False, bias_dropout_fusion=False, masked_softmax_fusion=False,
                    apply_rope_fusion=False, persist_layer_norm=False, gradient_accumulation_fusion=False,
                    cross_entropy_loss_fusion=False)
    return dict(bias_activation_fusion=True, bias_dropout_fusion=True, masked_softmax_fusion=False,
                apply_rope_fusion=backend == "te", persist_layer_norm=False,
                gradient_accumulation_fusion=wgrad_fusion_available(), cross_entropy_loss_fusion=True,
                cross_entropy_fusion_impl=cross_entropy_impl(backend, on_cpu))


def _recompute_settings(topology: TopologyConfig) -> dict:
    if topology.recompute == "selective":  # Megatron-Core's default selective set: core attention
        return dict(recompute_granularity="selective", recompute_modules=["core_attn"])
    if topology.recompute == "full" and topology.recompute_layers:
        # the first N layers of each stage keep only their input (Megatron-Bridge's H100 FP8 Llama3-8B
        # recipe: recompute_method=block, recompute_num_layers=5)
        return dict(recompute_granularity="full", recompute_method="block", recompute_num_layers=topology.recompute_layers)
    if topology.recompute == "full":  # every layer: keep its input, recompute the layer in the backward
        return dict(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    return {}


def transformer_config(model: ModelConfig, topology: TopologyConfig, precision: PrecisionConfig):
    """Megatron-Core's TransformerConfig for Phi-4: RMSNorm, SwiGLU, no biases, GQA, dropout as
    configured (0 for Phi-4), init std 0.02, loss summed per token (averaged by the loop).
    The settings were checked once before (phi4.model.validate.check_run: the Trainer, or
    init_model_parallel); this only translates them."""
    dtype = _DTYPES[precision.dtype]
    on_cpu = device.kind() == "cpu"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=model.dropout,
        attention_dropout=model.dropout,
        init_method_std=model.init_std,
        attention_softmax_in_fp32=True,
        tensor_model_parallel_size=topology.tp,
        pipeline_model_parallel_size=topology.pp,
        virtual_pipeline_model_parallel_size=topology.vp,
        pipeline_model_parallel_layout=topology.pp_layout,  # None: the even split
        context_parallel_size=topology.cp,
        sequence_parallel=topology.sp,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=precision.dtype == "bf16",
        calculate_per_token_loss=True,
        use_cpu_initialization=on_cpu,
        # Fused kernels where the GPU runs them (Megatron-Bridge's choices); none on the CPU.
        **fusion_settings(model.transformer_impl, on_cpu),
        # Pipeline sends as Megatron-LM makes them (arguments.py: overlap_p2p_comm with the
        # interleaved schedule, batch_p2p_comm = not overlap_p2p_comm): the interleaved schedule's
        # sends overlap its compute (phi4-plan counts only the warm-up's and flush's as exposed).
        # On the CPU neither: batched isend/irecv mixes up micro-batches of the interleaved
        # schedule over gloo, as measured on this project's CPU runs.
        overlap_p2p_comm=not on_cpu and topology.vp is not None,
        batch_p2p_comm=not on_cpu and topology.vp is None,
        # Free each pipeline stage's output once sent (Megatron-LM's default).
        deallocate_pipeline_outputs=True,
        # TE's userbuffer overlap of the sequence-parallel all-gather/reduce-scatter with the GEMMs
        tp_comm_overlap=tp_comm_overlap_on(topology, model.transformer_impl, on_cuda=not on_cpu),
        **_recompute_settings(topology),
        **_fp8_settings(precision),
    )


def build_phi4_model(
    model: ModelConfig,
    topology: TopologyConfig,
    precision: PrecisionConfig,
    config=None,
) -> list[torch.nn.Module]:
    """The GPTModel chunks of this pipeline rank: one, or `topology.vp` with virtual stages.

    Needs Megatron-Core's parallel state (phi4.runtime.distributed.init_distributed) first.
    """
    config = config or transformer_config(model, topology, precision)
    vocab = model.padded_vocab_size(topology.tp)
    stages = topology.vp or 1
    chunks = []
    for vp_stage in range(stages):
        vp = vp_stage if topology.vp else None
        chunk = GPTModel(
            config=config,
            transformer_layer_spec=phi4_block_spec(config, model.transformer_impl, vp_stage=vp),
            vocab_size=vocab,
            max_sequence_length=model.max_position_embeddings,
            pre_process=parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp),
            post_process=parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp),
            share_embeddings_and_output_weights=model.tie_word_embeddings,
            position_embedding_type="rope",
            rotary_percent=1.0,
            rotary_base=int(model.rope_base),
            vp_stage=vp,
        )
        chunk.model_type = getattr(chunk, "model_type", None) or _encoder_or_decoder()
        if chunk.post_process:
            mask_padded_vocab(chunk.output_layer, model.vocab_size, vocab)
        on = device.current()
        if on.is_cuda:
            chunk.cuda(on.index)
        chunks.append(chunk)
    return chunks


def mask_padded_vocab(output_layer: torch.nn.Module, vocab_size: int, padded_vocab: int) -> None:
    """Make the padded vocabulary rows' logits -inf, so that they take no part in any softmax:
    not the loss's, not DPO's log-probabilities, not sampling's. The padding exists only so that
    each tensor-parallel rank holds whole blocks of rows; a converted checkpoint's padded rows are
    zero, whose logit 0 would otherwise take probability mass from the real tokens (and the loss
    would depend on the layout). Works on this rank's shard of the vocabulary or on the gathered
    full width, whichever the output layer returns."""
    if padded_vocab == vocab_size:
        return

    local = padded_vocab // parallel_state.get_tensor_model_parallel_world_size()
    start = parallel_state.get_tensor_model_parallel_rank() * local

    def hook(_module, _inputs, output):
        logits, bias = output
        width = logits.shape[-1]
        first = 0 if width == padded_vocab else start  # gathered, or this rank's shard
        if first + width <= vocab_size:
            return None
        ids = torch.arange(first, first + width, device=logits.device)
        return logits.masked_fill(ids >= vocab_size, float("-inf")), bias

    output_layer.register_forward_hook(hook)


@contextlib.contextmanager
def without_fp8(config):
    """FP8 off for the forwards inside (inference: decoding, scoring, verification), whose token
    counts Transformer Engine's FP8 GEMMs do not take (multiples of 16). Megatron-Core enters TE's
    FP8 autocast per forward when `config.fp8` is set; the config is shared by the model's modules,
    so clearing it turns FP8 off for them."""
    saved = getattr(config, "fp8", None)
    config.fp8 = None
    try:
        yield
    finally:
        config.fp8 = saved


def _encoder_or_decoder():
    return ModelType.encoder_or_decoder


def unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP/Float16 wrappers."""
    while hasattr(chunk, "module"):
        chunk = chunk.module
    return chunk


def model_summary(model: ModelConfig, topology: TopologyConfig, chunks: list, extra: Optional[str] = None) -> str:
    local = sum(p.numel() for c in chunks for p in c.parameters())
    line = (
        f"{model.name or 'model'}: {model.num_parameters():,} parameters "
        f"({local:,} on this rank; tp={topology.tp} pp={topology.pp} vp={topology.vp})"
    )
    return f"{line} {extra}" if extra else line
