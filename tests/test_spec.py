"""The Phi-4 layer and block specs are built from Megatron-Core's BackendSpecProvider: the local
backend is Megatron-Core's LocalSpecProvider with phi4's RMSNorm, the te backend Megatron-Core's
TESpecProvider with the norms fused into the linears. The expected classes are taken from
Megatron-Core and phi4.model.norm, never from the code under test."""

from __future__ import annotations

import importlib.util
import sys
import types
from functools import partial

import pytest
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.models.backends import BackendSpecProvider, LocalSpecProvider
from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP
from megatron.core.transformer.transformer_layer import TransformerLayer

from helpers import FP32, TopologyConfig, tiny_model
from multirank import run_ranks
from phi4.errors import ConfigError
from phi4.model import spec
from phi4.model.norm import RMSNorm

NORM_KEYS = {"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
             "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"}


def positions(layer) -> dict:
    """Module (or builder) at each position of a layer spec."""
    sub = layer.submodules
    attention = sub.self_attention.submodules
    mlp = sub.mlp
    assert isinstance(mlp, partial) and mlp.func == MLP.as_mlp_submodule and not mlp.args
    assert set(mlp.keywords) == {"submodules"}
    return dict(
        layer=layer.module,
        input_layernorm=sub.input_layernorm,
        self_attention=sub.self_attention.module,
        attn_mask_type=sub.self_attention.params,
        linear_qkv=attention.linear_qkv,
        core_attention=attention.core_attention,
        linear_proj=attention.linear_proj,
        q_layernorm=attention.q_layernorm,
        k_layernorm=attention.k_layernorm,
        self_attn_bda=sub.self_attn_bda,
        pre_mlp_layernorm=sub.pre_mlp_layernorm,
        linear_fc1=mlp.keywords["submodules"].linear_fc1,
        linear_fc2=mlp.keywords["submodules"].linear_fc2,
        activation_func=mlp.keywords["submodules"].activation_func,
        mlp_bda=sub.mlp_bda,
        keys_map=sub.sharded_state_dict_keys_map,
    )


COMMON = dict(layer=TransformerLayer, self_attention=SelfAttention, attn_mask_type={"attn_mask_type": AttnMaskType.causal},
              q_layernorm=IdentityOp, k_layernorm=IdentityOp, self_attn_bda=get_bias_dropout_add,
              activation_func=None, mlp_bda=get_bias_dropout_add)


def test_local_layer_spec_names_megatron_core_local_modules_and_phi4_rmsnorm():
    assert positions(spec.phi4_layer_spec("local")) == dict(
        COMMON,
        input_layernorm=RMSNorm,
        linear_qkv=ColumnParallelLinear,
        core_attention=DotProductAttention,
        linear_proj=RowParallelLinear,
        pre_mlp_layernorm=RMSNorm,
        linear_fc1=ColumnParallelLinear,
        linear_fc2=RowParallelLinear,
        keys_map=NORM_KEYS,
    )
    assert spec.LOCAL_TO_TE_NORM_KEYS == NORM_KEYS


def test_local_provider_is_megatron_cores_local_provider_with_phi4_rmsnorm():
    provider = spec.spec_provider("local")
    # BackendSpecProvider is a Protocol (not runtime-checkable); LocalSpecProvider derives from it.
    assert isinstance(provider, LocalSpecProvider) and BackendSpecProvider in type(provider).__mro__
    assert not provider.fuse_layernorm_and_linear() and provider.column_parallel_layer_norm_linear() is None
    for kwargs in ({}, dict(rms_norm=True), dict(rms_norm=True, has_residual=True)):
        assert provider.layer_norm(**kwargs) is RMSNorm
    # Everything but the norm is LocalSpecProvider's own.
    base = LocalSpecProvider()
    for method in ("column_parallel_linear", "row_parallel_linear", "core_attention", "activation_func"):
        assert getattr(provider, method)() == getattr(base, method)()


@pytest.mark.parametrize("backend", ["transformer_engine", "LOCAL", ""])
def test_unknown_backend_is_refused(backend):
    for build in (lambda: spec.phi4_layer_spec(backend), lambda: spec.phi4_block_spec(None, backend)):
        with pytest.raises(ConfigError, match=rf"^model\.transformer_impl={backend!r}; valid: local, te$"):
            build()


def _assert_te_spec(te):
    """The te layer as TESpecProvider gives it: norms fused into linear_qkv / linear_fc1."""
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider

    provider = spec.spec_provider("te")
    assert type(provider) is TESpecProvider
    assert positions(spec.phi4_layer_spec("te")) == dict(
        COMMON,
        input_layernorm=IdentityOp,
        linear_qkv=te.TELayerNormColumnParallelLinear,
        core_attention=te.TEDotProductAttention,
        linear_proj=te.TERowParallelLinear,
        pre_mlp_layernorm=IdentityOp,
        linear_fc1=te.TELayerNormColumnParallelLinear,
        linear_fc2=te.TERowParallelLinear,
        keys_map={},
    )
    assert provider.layer_norm(rms_norm=True) is te.TENorm


def test_te_spec_wiring_without_transformer_engine(monkeypatch):
    """Where TE is absent, Megatron-Core's TE names are placeholders; with an empty stand-in
    `transformer_engine` module the te spec is still built from TESpecProvider and must hold those
    very placeholders at each position (the check on real TE classes is the gpu test below)."""
    if importlib.util.find_spec("transformer_engine") is not None:
        pytest.skip("Transformer Engine is installed: test_te_spec_names_transformer_engine_modules")
    import megatron.core.extensions.transformer_engine as te

    monkeypatch.setitem(sys.modules, "transformer_engine", types.ModuleType("transformer_engine"))
    _assert_te_spec(te)


@pytest.mark.gpu
def test_te_spec_names_transformer_engine_modules():
    import megatron.core.extensions.transformer_engine as te

    assert te.HAVE_TE
    _assert_te_spec(te)


def _built_local_model():
    from phi4.model.build import build_phi4_model, transformer_config
    from phi4.model.parallel import init_model_parallel
    from phi4.model.spec import phi4_block_spec

    model = tiny_model(num_layers=2)
    topology = TopologyConfig()
    init_model_parallel(model, topology, FP32)
    config = transformer_config(model, topology, FP32)
    block = phi4_block_spec(config, "local")
    (chunk,) = build_phi4_model(model, topology, FP32)
    return dict(
        num_layer_specs=len(block.layer_specs), final_norm=block.layer_norm.__qualname__,
        modules={name: f"{type(m).__module__}.{type(m).__qualname__}" for name, m in chunk.named_modules()},
        parameters=[name for name, _ in chunk.named_parameters()],
    )


def test_built_local_model_has_the_expected_modules_and_parameters():
    built = run_ranks(_built_local_model, 1, timeout=300)[0]
    assert built["num_layer_specs"] == 2 and built["final_norm"] == "RMSNorm"
    name = lambda cls: f"{cls.__module__}.{cls.__qualname__}"  # noqa: E731
    modules = built["modules"]
    for i in range(2):
        layer = f"decoder.layers.{i}"
        assert modules[layer] == name(TransformerLayer)
        expected = {
            "input_layernorm": RMSNorm, "self_attention": SelfAttention,
            "self_attention.linear_qkv": ColumnParallelLinear, "self_attention.core_attention": DotProductAttention,
            "self_attention.linear_proj": RowParallelLinear, "pre_mlp_layernorm": RMSNorm, "mlp": MLP,
            "mlp.linear_fc1": ColumnParallelLinear, "mlp.linear_fc2": RowParallelLinear,
        }
        for position, cls in expected.items():
            assert modules[f"{layer}.{position}"] == name(cls), position
    assert modules["decoder.final_layernorm"] == name(RMSNorm)
    layer_params = ["input_layernorm.weight", "self_attention.linear_proj.weight", "self_attention.linear_qkv.weight",
                    "pre_mlp_layernorm.weight", "mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
    decoder = [f"decoder.layers.{i}.{p}" for i in range(2) for p in layer_params] + ["decoder.final_layernorm.weight"]
    assert [p for p in built["parameters"] if p.startswith("decoder.")] == decoder
