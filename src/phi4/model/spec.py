"""The Phi-4 layer and block specs: the model's structure declared as Megatron-Core ModuleSpecs.

Two backends compute the same function:
- `local`: Megatron-Core's own column/row-parallel linears and attention, and this project's
  RMSNorm (sequence-parallel aware). Runs anywhere, the CPU included.
- `te`: Transformer Engine, with each RMSNorm fused into the linear that follows it, TE attention
  (context parallel), and FP8. Imported only when asked for.

The local spec keeps its norms as separate modules but names them, in checkpoints, as the TE
spec's fused norm weights, so a checkpoint written by either backend loads in the other.
"""

from __future__ import annotations

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from phi4.errors import ConfigError
from phi4.model.norm import RMSNorm

# Local norm module -> where the TE spec keeps the same weight (fused into the next linear).
LOCAL_TO_TE_NORM_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


def _local_modules():
    return dict(
        input_norm=RMSNorm,
        qkv=ColumnParallelLinear,
        attention=DotProductAttention,
        proj=RowParallelLinear,
        fc1=ColumnParallelLinear,
        fc2=RowParallelLinear,
        final_norm=RMSNorm,
        keys_map=dict(LOCAL_TO_TE_NORM_KEYS),
    )


def _te_modules():
    try:  # Transformer Engine is optional (the te backend, GPUs only): imported when asked for
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import (  # lazy: optional Transformer Engine
            TEDotProductAttention,
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )
    except ImportError as err:
        raise ConfigError(
            f"model.backend=te needs Transformer Engine, which cannot be imported here ({err}); "
            "install the 'gpu' extra on a CUDA machine, or use model.backend=local"
        ) from err
    return dict(
        input_norm=IdentityOp,  # fused into linear_qkv
        qkv=TELayerNormColumnParallelLinear,
        attention=TEDotProductAttention,
        proj=TERowParallelLinear,
        fc1=TELayerNormColumnParallelLinear,  # pre-MLP norm fused in
        fc2=TERowParallelLinear,
        final_norm=TENorm,
        keys_map={},
    )


def _modules(backend: str):
    if backend == "local":
        return _local_modules()
    if backend == "te":
        return _te_modules()
    raise ConfigError(f"model.backend={backend!r}; valid: local, te")


def phi4_layer_spec(backend: str) -> ModuleSpec:
    """One Phi-4 decoder layer: pre-norm GQA self-attention with RoPE, pre-norm SwiGLU MLP,
    no biases (biases and activation come from the TransformerConfig)."""
    m = _modules(backend)
    pre_mlp_norm = IdentityOp if backend == "te" else RMSNorm
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=m["input_norm"],
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=m["qkv"],
                    core_attention=m["attention"],
                    linear_proj=m["proj"],
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=pre_mlp_norm,
            mlp=partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(linear_fc1=m["fc1"], linear_fc2=m["fc2"])),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=m["keys_map"],
        ),
    )


def phi4_block_spec(config, backend: str, vp_stage=None) -> TransformerBlockSubmodules:
    """The layers this pipeline stage (and virtual stage) builds, and the final norm."""
    layer = phi4_layer_spec(backend)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=_modules(backend)["final_norm"])
