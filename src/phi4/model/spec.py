"""The Phi-4 layer and block specs: the model's structure declared as Megatron-Core ModuleSpecs,
built from a Megatron-Core `BackendSpecProvider` (megatron/core/models/backends.py).

Two backends compute the same function:
- `local`: `Phi4LocalSpecProvider`, Megatron-Core's `LocalSpecProvider` (its column/row-parallel
  linears and DotProductAttention) with this project's RMSNorm (sequence-parallel aware) as its
  norm. Runs anywhere, the CPU included.
- `te`: Megatron-Core's `TESpecProvider`: Transformer Engine, with each RMSNorm fused into the
  linear that follows it (`fuse_layernorm_and_linear`), TE attention (context parallel), and FP8.
  Imported only when asked for.

The layer is assembled from the provider as Megatron-Core's own gpt_layer_specs.py does. The local
spec keeps its norms as separate modules but names them, in checkpoints, as the TE spec's fused
norm weights, so a checkpoint written by either backend loads in the other.
"""

from __future__ import annotations

from functools import partial

from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.torch_norm import LayerNormBuilder
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules

from phi4.errors import ConfigError
from phi4.model.norm import RMSNorm

BACKENDS = ("local", "te")

# Local norm module -> where the TE spec keeps the same weight (fused into the next linear).
LOCAL_TO_TE_NORM_KEYS = {
    "input_layernorm.": "self_attention.linear_qkv.layer_norm_",
    "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_",
}


class Phi4LocalSpecProvider(LocalSpecProvider):
    """Megatron-Core's local backend with this project's RMSNorm.

    Only the norm differs: LocalSpecProvider.layer_norm returns apex's FusedLayerNorm or
    Megatron-Core's WrappedTorchNorm (which refuses sequence parallelism, and rebinds a module
    global of backends.py when asked for an RMSNorm). Phi-4's norms are all RMSNorms without a
    residual fusion and it has no q/k norm, so every request gets phi4.model.norm.RMSNorm (its eps
    comes from the TransformerConfig's layernorm_epsilon). The linears (ColumnParallelLinear,
    RowParallelLinear) and attention (DotProductAttention) are LocalSpecProvider's own.
    """

    def layer_norm(self, rms_norm: bool = False, for_qk: bool = False, has_residual: bool = False) -> LayerNormBuilder:
        return RMSNorm


def _te_provider() -> BackendSpecProvider:
    try:  # Transformer Engine is optional (the te backend, GPUs only): imported when asked for
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider  # lazy: the te backend only
    except ImportError as err:
        raise ConfigError(
            f"model.transformer_impl=te needs Transformer Engine, which cannot be imported here ({err}); "
            "install the 'gpu' extra on a CUDA machine, or use model.transformer_impl=local"
        ) from err
    return TESpecProvider()


def spec_provider(backend: str) -> BackendSpecProvider:
    """The Megatron-Core BackendSpecProvider of model.transformer_impl."""
    if backend == "local":
        return Phi4LocalSpecProvider()
    if backend == "te":
        return _te_provider()
    raise ConfigError(f"model.transformer_impl={backend!r}; valid: {', '.join(BACKENDS)}")


def _layer_spec(provider: BackendSpecProvider) -> ModuleSpec:
    # A backend that fuses the norm into the following linear (TE) builds the norms as part of
    # linear_qkv / linear_fc1 and leaves input_layernorm / pre_mlp_layernorm as identities.
    fused = provider.fuse_layernorm_and_linear()
    if fused:
        norm = IdentityOp
        norm_linear = provider.column_parallel_layer_norm_linear()
        assert norm_linear is not None, f"{type(provider).__name__} fuses norms but names no norm+linear module"
        keys_map = {}
    else:
        norm = provider.layer_norm(rms_norm=True)
        norm_linear = provider.column_parallel_linear()
        keys_map = dict(LOCAL_TO_TE_NORM_KEYS)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=norm,
            self_attention=ModuleSpec(
                module=SelfAttention,
                params={"attn_mask_type": AttnMaskType.causal},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=norm_linear,
                    core_attention=provider.core_attention(),
                    linear_proj=provider.row_parallel_linear(),
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=norm,
            # As Megatron-Core's get_mlp_module_spec_for_backend builds a dense MLP (activation from
            # the TransformerConfig, not the provider's TE activation op).
            mlp=partial(MLP.as_mlp_submodule, submodules=MLPSubmodules(
                linear_fc1=norm_linear, linear_fc2=provider.row_parallel_linear())),
            mlp_bda=get_bias_dropout_add,
            sharded_state_dict_keys_map=keys_map,
        ),
    )


def phi4_layer_spec(backend: str) -> ModuleSpec:
    """One Phi-4 decoder layer: pre-norm GQA self-attention with RoPE, pre-norm SwiGLU MLP,
    no biases (biases and activation come from the TransformerConfig)."""
    return _layer_spec(spec_provider(backend))


def phi4_block_spec(config, backend: str, vp_stage=None) -> TransformerBlockSubmodules:
    """The layers this pipeline stage (and virtual stage) builds, and the final norm."""
    provider = spec_provider(backend)
    layer = _layer_spec(provider)
    num_layers = get_num_layers_to_build(config, vp_stage=vp_stage)
    return TransformerBlockSubmodules(layer_specs=[layer] * num_layers, layer_norm=provider.layer_norm(rms_norm=True))
