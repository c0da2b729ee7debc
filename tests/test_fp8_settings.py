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

MODEL = dataclasses.replace(tiny_model(num_layers=8), backend="te")
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
