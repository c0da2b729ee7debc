"""Hugging Face Phi3ForCausalLM weights <-> Megatron-Core Phi-4 parameters.

Two layouts differ in more than names (docs/model.md, "Weight layout"):
- HF `qkv_proj` is [all Q heads; all K heads; all V heads]. Megatron-Core's `linear_qkv` is
  interleaved per query group: for each group g, [the group's Q heads; K_g; V_g]. Tensor
  parallelism then gives each rank whole groups.
- HF `gate_up_proj` is [gate; up]; Megatron-Core's `linear_fc1` is [gate; up] *per TP rank*:
  rank r holds [gate shard r; up shard r].
Everything else is a rename, a split along one dimension (vocabulary rows, or the input dim of
`o_proj`/`down_proj`), and zero rows that pad the vocabulary.

The functions on full tensors (`hf_qkv_to_mcore` and friends) are shared with the checkpoint
converter; `load_hf_weights` copies a HF state dict into the chunks of this rank.
"""

from __future__ import annotations

import re
from typing import Callable, Mapping, Optional

import torch
from megatron.core import parallel_state

from phi4.errors import ConfigError
from phi4.model.build import unwrap
from phi4.model.config import ModelConfig


def hf_qkv_to_mcore(qkv: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """[Q; K; V] -> per query group [q heads of g; k_g; v_g] (full, unsharded)."""
    d, heads, groups = model.head_dim, model.num_attention_heads, model.num_query_groups
    q, k, v = torch.split(qkv, [heads * d, groups * d, groups * d], dim=0)
    q = q.reshape(groups, heads // groups * d, -1)
    k = k.reshape(groups, d, -1)
    v = v.reshape(groups, d, -1)
    return torch.cat([q, k, v], dim=1).reshape(qkv.shape)


def mcore_qkv_to_hf(qkv: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    """Inverse of `hf_qkv_to_mcore`."""
    d, heads, groups = model.head_dim, model.num_attention_heads, model.num_query_groups
    per_group = qkv.reshape(groups, (heads // groups + 2) * d, -1)
    q, k, v = torch.split(per_group, [heads // groups * d, d, d], dim=1)
    return torch.cat([q.reshape(heads * d, -1), k.reshape(groups * d, -1), v.reshape(groups * d, -1)])


def pad_vocab(weight: torch.Tensor, padded_rows: int) -> torch.Tensor:
    """Zero rows appended up to the padded vocabulary (never a target, never an input id)."""
    if weight.shape[0] == padded_rows:
        return weight
    return torch.cat([weight, weight.new_zeros(padded_rows - weight.shape[0], *weight.shape[1:])])


def shard(full: torch.Tensor, dim: int, rank: int, size: int) -> torch.Tensor:
    return torch.chunk(full, size, dim=dim)[rank]


def shard_fc1(gate_up: torch.Tensor, rank: int, size: int) -> torch.Tensor:
    """HF [gate; up] -> this rank's [gate shard; up shard]."""
    gate, up = torch.chunk(gate_up, 2, dim=0)
    return torch.cat([shard(gate, 0, rank, size), shard(up, 0, rank, size)])


_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")

# Megatron-Core parameter (within a layer) -> (HF parameter within layer i, how to get this shard).
# The two norm names of each pair are the local spec's and the TE spec's (fused into the linear).
_LAYER_PARAMS: dict[str, tuple[str, str]] = {
    "input_layernorm.weight": ("input_layernorm.weight", "replicate"),
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight", "replicate"),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight", "replicate"),
    "mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm.weight", "replicate"),
    "self_attention.linear_qkv.weight": ("self_attn.qkv_proj.weight", "qkv"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight", "columns"),
    "mlp.linear_fc1.weight": ("mlp.gate_up_proj.weight", "fc1"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight", "columns"),
}
_TOP_PARAMS: dict[str, tuple[str, str]] = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight", "vocab"),
    "output_layer.weight": ("lm_head.weight", "vocab"),
    "decoder.final_layernorm.weight": ("model.norm.weight", "replicate"),
}


def hf_name_for(mcore_name: str, global_layer: Callable[[int], int]) -> tuple[str, str]:
    """The HF tensor a Megatron-Core parameter comes from, and the sharding rule to apply."""
    if mcore_name in _TOP_PARAMS:
        return _TOP_PARAMS[mcore_name]
    match = _LAYER.match(mcore_name)
    if match and match.group(2) in _LAYER_PARAMS:
        hf_suffix, rule = _LAYER_PARAMS[match.group(2)]
        return f"model.layers.{global_layer(int(match.group(1)))}.{hf_suffix}", rule
    raise ConfigError(f"no Hugging Face counterpart for Megatron-Core parameter {mcore_name!r}")


def hf_to_mcore_shard(full: torch.Tensor, rule: str, model: ModelConfig, tp_rank: int, tp_size: int) -> torch.Tensor:
    if rule == "replicate":
        return full
    if rule == "qkv":
        return shard(hf_qkv_to_mcore(full, model), 0, tp_rank, tp_size)
    if rule == "columns":
        return shard(full, 1, tp_rank, tp_size)
    if rule == "fc1":
        return shard_fc1(full, tp_rank, tp_size)
    if rule == "vocab":
        return shard(pad_vocab(full, model.padded_vocab_size(tp_size)), 0, tp_rank, tp_size)
    raise ValueError(rule)


@torch.no_grad()
def load_hf_weights(chunks: list, hf_state: Mapping[str, torch.Tensor], model: ModelConfig) -> int:
    """Copy HF Phi3ForCausalLM weights into this rank's model chunks (any TP/PP/VP layout).

    Returns the number of parameters copied. A shape that does not match is a ConfigError naming
    both tensors."""
    tp_rank = parallel_state.get_tensor_model_parallel_rank()
    tp_size = parallel_state.get_tensor_model_parallel_world_size()
    copied = 0
    for chunk in chunks:
        gpt = unwrap(chunk)
        layers = gpt.decoder.layers
        for name, param in gpt.named_parameters():
            hf_name, rule = hf_name_for(name, lambda i: layers[i].layer_number - 1)
            if hf_name not in hf_state:
                raise ConfigError(f"Hugging Face weights lack {hf_name!r} (needed for {name})")
            value = hf_to_mcore_shard(hf_state[hf_name], rule, model, tp_rank, tp_size)
            if value.shape != param.shape:
                raise ConfigError(
                    f"{hf_name} {tuple(hf_state[hf_name].shape)} gives a shard of shape {tuple(value.shape)} "
                    f"for {name}, which is {tuple(param.shape)} at tp={tp_size}: the model config does not "
                    "match these weights"
                )
            param.copy_(value)
            copied += param.numel()
    return copied


# --- Whole (unsharded) tensors, as a Megatron-Core distributed checkpoint stores them -------------
# A checkpoint holds each parameter once, under the TE spec's names, with the layers stacked on a
# leading axis: e.g. "decoder.layers.self_attention.linear_qkv.weight" is [num_layers, qkv, hidden].
# Its fc1 is HF's [gate; up] unchanged (Megatron-Core re-slices it per TP rank on load); its qkv is
# regrouped per query group; its vocabulary rows are padded as at TP=1.


def hf_to_mcore_full(full: torch.Tensor, rule: str, model: ModelConfig) -> torch.Tensor:
    if rule == "qkv":
        return hf_qkv_to_mcore(full, model)
    if rule == "vocab":
        return pad_vocab(full, model.padded_vocab_size(1))
    return full


def mcore_full_to_hf(full: torch.Tensor, rule: str, model: ModelConfig) -> torch.Tensor:
    if rule == "qkv":
        return mcore_qkv_to_hf(full, model)
    if rule == "vocab":
        return full[: model.vocab_size]
    return full


def hf_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of a HF Phi3ForCausalLM checkpoint of this config, in HF order."""
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    layer = {
        "input_layernorm.weight": (h,),
        "self_attn.qkv_proj.weight": ((model.num_attention_heads + 2 * model.num_query_groups) * d, h),
        "self_attn.o_proj.weight": (h, model.num_attention_heads * d),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_up_proj.weight": (2 * f, h),
        "mlp.down_proj.weight": (h, f),
    }
    shapes = {"model.embed_tokens.weight": (model.vocab_size, h)}
    for i in range(model.num_layers):
        shapes.update({f"model.layers.{i}.{k}": v for k, v in layer.items()})
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (model.vocab_size, h)
    return shapes


# Checkpoint keys of the layer stack: the TE spec's names (what both specs save under).
_CHECKPOINT_LAYER_KEYS = [
    "self_attention.linear_qkv.layer_norm_weight",
    "self_attention.linear_qkv.weight",
    "self_attention.linear_proj.weight",
    "mlp.linear_fc1.layer_norm_weight",
    "mlp.linear_fc1.weight",
    "mlp.linear_fc2.weight",
]


def checkpoint_layout(model: ModelConfig) -> list[tuple[str, str, str, tuple[int, ...], Optional[int]]]:
    """(checkpoint key, HF name, rule, checkpoint shape of the piece, layer or None) for every
    piece of a Megatron-Core checkpoint of this model, one layer at a time."""
    hf = hf_shapes(model)
    entries = []
    for key, (hf_name, rule) in _TOP_PARAMS.items():
        if key.startswith("output_layer"):
            continue  # after the layers, as in the model
        entries.append((key, hf_name, rule, _mcore_shape(hf[hf_name], rule, model), None))
    for i in range(model.num_layers):
        for name in _CHECKPOINT_LAYER_KEYS:
            hf_suffix, rule = _LAYER_PARAMS[name]
            hf_name = f"model.layers.{i}.{hf_suffix}"
            entries.append((f"decoder.layers.{name}", hf_name, rule, _mcore_shape(hf[hf_name], rule, model), i))
    for key in ("decoder.final_layernorm.weight", "output_layer.weight"):
        hf_name, rule = _TOP_PARAMS[key]
        entries.append((key, hf_name, rule, _mcore_shape(hf[hf_name], rule, model), None))
    return entries


def _mcore_shape(hf_shape: tuple[int, ...], rule: str, model: ModelConfig) -> tuple[int, ...]:
    if rule == "vocab":
        return (model.padded_vocab_size(1), *hf_shape[1:])
    return tuple(hf_shape)
