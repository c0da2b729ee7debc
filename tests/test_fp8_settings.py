"""Every FP8 setting phi4 accepts is accepted by Megatron-Core too: each shipped precision file and
each format x recipe x first/last-layers-bf16 combination (with the te backend, over pipeline
layouts) either builds Megatron-Core's TransformerConfig or is refused first by phi4's validation
with one line naming the setting. No GPU is needed for the config; where Transformer Engine is
importable (a build as in bench/gpu, run by hand: outside the suite's set-up), the te spec and
Megatron-Core's TE recipe object are built for each accepted combination too."""

import dataclasses
import importlib.util
import itertools

import pytest
from phi4.settings import load_group

from helpers import ROOT, tiny_model
from multirank import run_ranks
from phi4.errors import ConfigError
from phi4.model.config import PrecisionConfig, TopologyConfig
from phi4.model.validate import check_run

MODEL = dataclasses.replace(tiny_model(num_layers=8), transformer_impl="te")
LAYOUTS = [TopologyConfig(), TopologyConfig(pp=2), TopologyConfig(pp=4, vp=2)]
FP8_GRID = [
    dict(format=fmt, recipe=recipe, first_last_layers_bf16=keep, num_layers_at_start_in_bf16=start,
         num_layers_at_end_in_bf16=end)
    for fmt, recipe, keep, (start, end) in itertools.product(
        ("hybrid", "e4m3"), ("delayed", "tensorwise", "blockwise", "mxfp8"), (False, True), ((1, 1), (2, 1), (0, 3)))
]


def shipped_precisions() -> dict:
    return {p.stem: load_group("precision", p) for p in sorted((ROOT / "conf/precision").glob("*.yaml"))}


def outcome(precision: PrecisionConfig, topology: TopologyConfig):
    """'accepted' with the TransformerConfig, or phi4's refusal (check_run, what every start runs
    before it builds the config); anything Megatron-Core raises fails."""
    from phi4.model.build import transformer_config

    try:
        check_run(MODEL, topology, precision)
    except ConfigError as err:
        return "refused", str(err)
    return "accepted", transformer_config(MODEL, topology, precision)


def cases():
    for name, values in shipped_precisions().items():
        for topology in LAYOUTS:
            yield f"{name}.yaml", PrecisionConfig.from_dict(values), topology
    for fp8 in FP8_GRID:
        for topology in LAYOUTS:
            yield str(fp8), PrecisionConfig.from_dict(dict(dtype="bf16", fp8=fp8)), topology


def test_every_fp8_setting_is_accepted_by_megatron_core_or_refused_by_phi4():
    seen = {"accepted": 0, "refused": 0}
    for label, precision, topology in cases():
        kind, result = outcome(precision, topology)  # a ValueError/AssertionError from Megatron-Core fails here
        seen[kind] += 1
        if kind == "refused":
            assert "\n" not in result and "precision.fp8" in result, (label, topology, result)
        else:
            fp8 = precision.fp8
            assert result.fp8 == (fp8.format if fp8 else None), label
            if fp8:
                assert result.fp8_recipe == fp8.recipe and result.first_last_layers_bf16 == fp8.first_last_layers_bf16
    assert seen["accepted"] > 0 and seen["refused"] > 0, seen


def test_shipped_precision_files_are_all_accepted():
    for name, values in shipped_precisions().items():
        kind, result = outcome(PrecisionConfig.from_dict(values), TopologyConfig())
        assert kind == "accepted", (name, result)


def test_delayed_scaling_with_bf16_first_last_layers_is_refused_by_phi4():
    """Megatron-Core refuses this pair ("Delayed scaling does not support first / last layer in
    BF16") only when the job runs; phi4 refuses it before, naming both settings."""
    from megatron.core.transformer import TransformerConfig

    with pytest.raises(ValueError, match="Delayed scaling does not support first / last layer"):
        TransformerConfig(num_layers=8, hidden_size=128, num_attention_heads=8, bf16=True, fp8="hybrid",
                          fp8_recipe="delayed", first_last_layers_bf16=True)
    precision = PrecisionConfig.from_dict(dict(dtype="bf16", fp8=dict(recipe="delayed", first_last_layers_bf16=True)))
    kind, message = outcome(precision, TopologyConfig())
    assert kind == "refused"
    assert "precision.fp8.first_last_layers_bf16=true" in message and "precision.fp8.recipe=delayed" in message
    assert "tensorwise" in message


def test_bf16_layer_counts_are_checked_per_pipeline_stage():
    fp8 = dict(recipe="tensorwise", first_last_layers_bf16=True, num_layers_at_start_in_bf16=3)
    precision = PrecisionConfig.from_dict(dict(dtype="bf16", fp8=fp8))
    assert outcome(precision, TopologyConfig(pp=2))[0] == "accepted"  # 4 layers per stage
    kind, message = outcome(precision, TopologyConfig(pp=4, vp=2))  # 2 layers per stage
    assert kind == "refused"
    assert "precision.fp8.num_layers_at_start_in_bf16=3; valid: 0 to 2" in message and "topology.pp=4" in message


def test_fp8_recipes_a_gpu_cannot_run_are_refused_with_what_it_can():
    from phi4.model.validate import check_device

    def fp8(recipe):
        return PrecisionConfig.from_dict(dict(dtype="bf16", fp8=dict(recipe=recipe, first_last_layers_bf16=False)))

    for recipe in ("delayed", "tensorwise", "blockwise"):
        check_device(fp8(recipe), (9, 0), "NVIDIA H200")
    with pytest.raises(ConfigError) as err:
        check_device(fp8("mxfp8"), (9, 0), "NVIDIA H200")
    message = str(err.value)
    assert "precision.fp8.recipe=mxfp8" in message and "Blackwell" in message and "9.0" in message
    assert "valid here: precision.fp8.recipe=delayed|tensorwise|blockwise" in message
    with pytest.raises(ConfigError, match=r"this NVIDIA A100 is 8\.0; valid here: precision.fp8=null"):
        check_device(fp8("tensorwise"), (8, 0), "NVIDIA A100")
    check_device(fp8("mxfp8"), (10, 0), "NVIDIA B200")
    check_device(PrecisionConfig(dtype="bf16"), (7, 0), "Tesla V100")


def _te_spec_and_recipes(combos):
    """In one gloo rank with Megatron-Core's parallel state: the te spec and the TE recipe object
    of each accepted combination."""
    from megatron.core.fp8_utils import get_fp8_recipe

    from phi4.model.build import transformer_config
    from phi4.model.spec import phi4_block_spec
    from phi4.model.parallel import init_model_parallel

    init_model_parallel(MODEL, TopologyConfig(), PrecisionConfig(dtype="bf16"))
    built = []
    for values in combos:
        precision = PrecisionConfig.from_dict(values)
        config = transformer_config(MODEL, TopologyConfig(), precision)
        spec = phi4_block_spec(config, "te")
        recipe = get_fp8_recipe(config) if precision.fp8 else None
        attention = spec.layer_specs[0].submodules.self_attention.submodules
        built.append(([m.__name__ for m in (attention.linear_qkv, attention.core_attention, spec.layer_norm)],
                      type(recipe).__name__))
    return built


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is None,
                    reason="needs Transformer Engine importable (bench/gpu builds it; outside make test)")
def test_te_spec_and_recipe_objects_build_for_every_accepted_setting():
    combos = [dict(dtype="bf16", fp8=fp8) for fp8 in FP8_GRID
              if outcome(PrecisionConfig.from_dict(dict(dtype="bf16", fp8=fp8)), TopologyConfig())[0] == "accepted"]
    built = run_ranks(_te_spec_and_recipes, 1, combos, timeout=300)[0]
    expected = {"delayed": "DelayedScaling", "tensorwise": "Float8CurrentScaling", "blockwise": "Float8BlockScaling",
                "mxfp8": "MXFP8BlockScaling"}
    assert {values["fp8"]["recipe"] for values in combos} == set(expected)
    for values, (modules, recipe) in zip(combos, built):
        assert modules == ["TELayerNormColumnParallelLinear", "TEDotProductAttention", "TENorm"], modules
        assert expected[values["fp8"]["recipe"]] in recipe, (values, recipe)


def test_decoding_turns_fp8_off_and_back_on():
    """A cached decoding step has one token per prompt, which Transformer Engine's FP8 GEMMs do
    not take: the Decoder runs with the shared config's fp8 cleared, and restores it after,
    also when decoding fails."""
    from phi4.model.build import without_fp8

    kind, config = outcome(PrecisionConfig.from_dict(dict(dtype="bf16", fp8=dict(recipe="tensorwise"))), TopologyConfig())
    assert kind == "accepted" and config.fp8 == "hybrid"
    with pytest.raises(RuntimeError, match="inside"):
        with without_fp8(config):
            assert config.fp8 is None
            raise RuntimeError("inside")
    assert config.fp8 == "hybrid"


def test_fused_kernels_are_on_for_gpus_and_off_on_the_cpu():
    """Megatron-Bridge's fusions on a GPU (where each can run), none on the CPU; Megatron-Core's
    TransformerConfig accepts the GPU set with Phi-4's SwiGLU (the te set also needs TE's fused RoPE,
    checked where TE is importable: the te spec's GPU tests)."""
    import torch.nn.functional as F
    from megatron.core.transformer import TransformerConfig

    from phi4.model.build import fusion_settings, transformer_config
    from phi4.plan import memory
    from phi4.plan.spec import PlanSpec

    cpu = fusion_settings("te", on_cpu=True)
    assert not any(v for v in cpu.values())
    assert not any(getattr(transformer_config(tiny_model(), TopologyConfig(), PrecisionConfig(dtype="fp32")), k)
                   for k in cpu)  # this machine has no GPU
    te, local = fusion_settings("te", on_cpu=False), fusion_settings("local", on_cpu=False)
    assert te["bias_activation_fusion"] and te["cross_entropy_loss_fusion"] and te["apply_rope_fusion"]
    assert not local["apply_rope_fusion"]  # TE's kernel
    apex = importlib.util.find_spec("fused_weight_gradient_mlp_cuda") is not None
    assert te["gradient_accumulation_fusion"] == apex == local["gradient_accumulation_fusion"]
    TransformerConfig(num_layers=2, hidden_size=64, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=224,
                      gated_linear_unit=True, activation_func=F.silu, add_bias_linear=False, hidden_dropout=0.0,
                      attention_dropout=0.0, normalization="RMSNorm", **local)
    # the fused SwiGLU (bias_swiglu_impl's autograd function) saves FC1's output alone, two
    # [tokens, ffn / tp] tensors fewer per layer than the unfused one as measured on the CPU: what
    # the planner counts on GPUs
    spec = PlanSpec(tiny_model(), TopologyConfig(tp=2, sp=True), PrecisionConfig(dtype="bf16"), 2, 256, 2, 4)
    saved = memory.layer_activation_bytes(spec) - memory.layer_activation_bytes(spec, fused=True)
    assert saved == 2 * (256 * 2 * 2 * spec.model.ffn_hidden_size / 2)


def test_fp8_weights_are_the_default_and_the_planner_counts_them():
    """precision=fp8 keeps the FP8 layers' weights in FP8 (Megatron-Core's fp8_param, which phi4
    passes on to DDP's fp8_param_gather), as Bridge's FP8 recipes do; off, TE keeps an FP8 copy and
    its transpose beside the bf16 weights. The planner: one byte a weight for the FP8 layers' linear
    weights, one copy (the transpose) instead of two."""
    from phi4.plan import memory
    from phi4.plan.spec import PlanSpec

    shipped = PrecisionConfig.from_dict(shipped_precisions()["fp8"])
    assert shipped.fp8.param_gather
    kind, config = outcome(shipped, TopologyConfig())
    assert kind == "accepted" and config.fp8_param
    off = dataclasses.replace(shipped, fp8=dataclasses.replace(shipped.fp8, param_gather=False))
    assert not outcome(off, TopologyConfig())[1].fp8_param
    on_spec, off_spec = (PlanSpec(MODEL, TopologyConfig(tp=2, sp=True), p, 2, 256, 2, 4) for p in (shipped, off))
    layers, in_fp8 = memory.fp8_layers(on_spec)
    assert (layers, in_fp8) == (8, 6)  # first and last in bf16
    m = MODEL
    per_layer = (m.hidden_size * (m.hidden_size + 2 * m.num_query_groups * m.head_dim) + m.hidden_size ** 2
                 + 3 * m.hidden_size * m.ffn_hidden_size) // 2
    assert memory.fp8_weight_numel(on_spec) == in_fp8 * per_layer and memory.fp8_weight_numel(off_spec) == 0
    assert memory.static_memory(off_spec).params - memory.static_memory(on_spec).params == in_fp8 * per_layer
    assert memory.fp8_extra_bytes(off_spec) - memory.fp8_extra_bytes(on_spec) == in_fp8 * per_layer
