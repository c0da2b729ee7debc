"""The model configs hold the values of docs/model.md, "Architecture", and map onto Megatron-Core's
TransformerConfig."""

import dataclasses

import pytest
import torch
from phi4.settings import load_group

from helpers import ROOT, tiny_model
from phi4.errors import ConfigError
from phi4.model.config import ModelConfig, PrecisionConfig, TopologyConfig


def load_model(name: str) -> ModelConfig:
    return ModelConfig.from_dict(load_group("model", ROOT / f"conf/model/{name}.yaml"))


def load_precision(name: str) -> PrecisionConfig:
    return PrecisionConfig.from_dict(load_group("precision", ROOT / f"conf/precision/{name}.yaml"))


def test_phi4_14b_is_the_model_card():
    # Values from docs/model.md, "Architecture" (microsoft/phi-4 config.json).
    m = load_model("phi4_14b")
    assert (m.hidden_size, m.ffn_hidden_size, m.num_layers) == (5120, 17920, 40)
    assert (m.num_attention_heads, m.num_query_groups, m.head_dim) == (40, 10, 128)
    assert m.vocab_size == 100352 == 784 * 128
    assert (m.norm_eps, m.init_std, m.dropout, m.tie_word_embeddings) == (1e-5, 0.02, 0.0, False)
    assert m.rope_base == 10000 and m.max_position_embeddings == 4096  # pre-training values
    assert m.num_parameters() == 14_659_507_200


def test_padded_vocab_per_tensor_parallel_size():
    m = load_model("phi4_14b")
    assert m.padded_vocab_size(1) == m.padded_vocab_size(2) == 100352
    assert m.padded_vocab_size(5) == 100480  # 157 x 640
    assert m.padded_vocab_size(10) % (128 * 10) == 0 and m.padded_vocab_size(10) >= 100352


def test_tiny_keeps_phi4_shape_rules():
    m = tiny_model()
    big = load_model("phi4_14b")
    assert m.num_attention_heads // m.num_query_groups == big.num_attention_heads // big.num_query_groups == 4
    assert m.ffn_hidden_size / m.hidden_size == big.ffn_hidden_size / big.hidden_size == 3.5
    assert m.vocab_size == big.vocab_size and not m.tie_word_embeddings
    assert m.num_layers % 4 == 0 and m.num_query_groups % 2 == 0  # PP=2 x VP=2, TP=2


def test_unknown_setting_is_named():
    with pytest.raises(ConfigError, match=r"model: unknown setting\(s\) hidden_sise; valid: .*hidden_size"):
        tiny_model(hidden_sise=64)
    with pytest.raises(ConfigError, match=r"topology: unknown setting\(s\) tensor_parallel"):
        TopologyConfig.from_dict({"tensor_parallel": 2})


def test_transformer_config_mapping():
    from phi4.model.build import transformer_config

    m = load_model("phi4_14b")
    local = dataclasses.replace(m, transformer_impl="local")
    c = transformer_config(local, TopologyConfig(tp=2, pp=4, vp=5, sp=True), load_precision("bf16"))
    assert c.normalization == "RMSNorm" and c.layernorm_epsilon == 1e-5
    assert c.gated_linear_unit and c.activation_func is torch.nn.functional.silu
    assert not c.add_bias_linear and not c.add_qkv_bias
    assert (c.num_attention_heads, c.num_query_groups, c.kv_channels) == (40, 10, 128)
    assert c.hidden_dropout == c.attention_dropout == 0.0 and c.init_method_std == 0.02
    assert (c.tensor_model_parallel_size, c.pipeline_model_parallel_size) == (2, 4)
    assert c.virtual_pipeline_model_parallel_size == 5 and c.sequence_parallel
    assert c.bf16 and c.params_dtype == torch.bfloat16 and c.fp8 is None


def test_fp8_mapping():
    """FP8 settings reach TransformerConfig (building the config needs no GPU)."""
    from phi4.model.build import transformer_config

    te_model = dataclasses.replace(tiny_model(), transformer_impl="te")
    c = transformer_config(te_model, TopologyConfig(), load_precision("fp8"))
    # Megatron-Bridge's Hopper default: current (tensorwise) scaling, first and last layer in bf16.
    assert c.bf16 and c.fp8 == "hybrid" and c.fp8_recipe == "tensorwise" and c.fp8_margin == 0
    assert c.first_last_layers_bf16 and (c.num_layers_at_start_in_bf16, c.num_layers_at_end_in_bf16) == (1, 1)

    delayed = PrecisionConfig.from_dict(dict(dtype="bf16", fp8=dict(recipe="delayed", first_last_layers_bf16=False)))
    c = transformer_config(te_model, TopologyConfig(), delayed)
    assert (c.fp8_amax_history_len, c.fp8_amax_compute_algo) == (1024, "max") and not c.first_last_layers_bf16

    fp8 = dict(format="e4m3", recipe="blockwise", margin=1, first_last_layers_bf16=True, num_layers_at_end_in_bf16=2)
    c = transformer_config(te_model, TopologyConfig(), PrecisionConfig.from_dict(dict(dtype="bf16", fp8=fp8)))
    assert (c.fp8, c.fp8_recipe, c.fp8_margin) == ("e4m3", "blockwise", 1)
    assert c.first_last_layers_bf16 and (c.num_layers_at_start_in_bf16, c.num_layers_at_end_in_bf16) == (1, 2)
