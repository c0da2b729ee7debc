"""Checks that a model, a parallel layout and a precision can work together.

Run before any process group exists, so that a wrong topology costs a second, not a queue wait
and a hang. Each failure is one ConfigError naming the setting, its value and the valid values.
"""

from __future__ import annotations

from typing import Optional

from phi4.errors import ConfigError
from phi4.model.config import ModelConfig, PrecisionConfig, TopologyConfig
from phi4.model.pipeline_layout import parse as parse_layout, stage_layers

BACKENDS = ("local", "te")
DTYPES = ("fp32", "bf16")
FP8_FORMATS = ("hybrid", "e4m3")
FP8_RECIPES = ("delayed", "tensorwise", "blockwise", "mxfp8")
FP8_AMAX_ALGOS = ("max", "most_recent")
# The compute capability each FP8 recipe's kernels need: FP8 tensor cores arrive with Ada/Hopper
# (8.9/9.0); MXFP8's block scales are Blackwell's (10.0).
FP8_MIN_CAPABILITY = {"delayed": (8, 9), "tensorwise": (8, 9), "blockwise": (9, 0), "mxfp8": (10, 0)}
RECOMPUTE = ("none", "selective", "full")


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _listing(values) -> str:
    return ", ".join(str(v) for v in values)


def valid_tp_sizes(model: ModelConfig) -> list[int]:
    """TP splits query groups, heads and the FFN evenly (the vocabulary is padded instead)."""
    return [
        d
        for d in _divisors(model.num_query_groups)
        if model.num_attention_heads % d == 0 and model.ffn_hidden_size % d == 0
    ]


def check_model(model: ModelConfig) -> None:
    if model.transformer_impl not in BACKENDS:
        raise ConfigError(f"model.transformer_impl={model.transformer_impl!r} is not a layer implementation; "
                          f"valid: {_listing(BACKENDS)}")
    if model.hidden_size % model.num_attention_heads:
        raise ConfigError(
            f"model.num_attention_heads={model.num_attention_heads} does not divide "
            f"model.hidden_size={model.hidden_size}; valid: {_listing(_divisors(model.hidden_size))}"
        )
    if model.num_attention_heads % model.num_query_groups:
        raise ConfigError(
            f"model.num_query_groups={model.num_query_groups} does not divide "
            f"model.num_attention_heads={model.num_attention_heads}; "
            f"valid: {_listing(_divisors(model.num_attention_heads))}"
        )
    if model.tie_word_embeddings:
        raise ConfigError("model.tie_word_embeddings=true: Phi-4 unties input and output embeddings; valid: false")


def check_topology(model: ModelConfig, topology: TopologyConfig, world_size: Optional[int] = None) -> None:
    for name in ("tp", "pp", "cp"):
        if getattr(topology, name) < 1:
            raise ConfigError(f"topology.{name}={getattr(topology, name)} must be a positive integer")
    tp_sizes = valid_tp_sizes(model)
    if topology.tp not in tp_sizes:
        raise ConfigError(
            f"topology.tp={topology.tp} does not divide the model evenly "
            f"(model.num_query_groups={model.num_query_groups}, "
            f"model.num_attention_heads={model.num_attention_heads}, "
            f"model.ffn_hidden_size={model.ffn_hidden_size}); valid topology.tp: {_listing(tp_sizes)}"
        )
    if topology.vp is not None:
        if topology.vp < 2:
            raise ConfigError(f"topology.vp={topology.vp}: virtual stages per pipeline rank; valid: null or >= 2")
        if topology.pp < 2:
            raise ConfigError(f"topology.vp={topology.vp} needs topology.pp >= 2 (got topology.pp={topology.pp})")
    stages = topology.pp * (topology.vp or 1)
    if topology.pp_layout:
        parse_layout(model, topology)  # uneven stages, checked by name
    elif model.num_layers % stages:
        valid = [p for p in _divisors(model.num_layers) if model.num_layers % (p * (topology.vp or 1)) == 0]
        raise ConfigError(
            f"model.num_layers={model.num_layers} does not split into topology.pp={topology.pp} x "
            f"topology.vp={topology.vp} = {stages} equal pipeline stages; "
            f"valid topology.pp with this vp: {_listing(valid) or 'none (change topology.vp)'}, or uneven "
            f"stages in topology.pp_layout"
        )
    if topology.cp > 1 and model.transformer_impl != "te":
        raise ConfigError(
            f"topology.cp={topology.cp} needs model.transformer_impl=te (context-parallel attention exists only "
            f"in Transformer Engine); with model.transformer_impl={model.transformer_impl} valid topology.cp: 1"
        )
    if topology.recompute not in RECOMPUTE:
        raise ConfigError(f"topology.recompute={topology.recompute!r}; valid: {_listing(RECOMPUTE)}")
    if topology.recompute_layers is not None:
        most = max(len(r) for rank in stage_layers(model, topology) for r in rank)
        if topology.recompute != "full":
            raise ConfigError(
                f"topology.recompute_layers={topology.recompute_layers} needs topology.recompute=full (got "
                f"{topology.recompute}); valid: null")
        if not 1 <= topology.recompute_layers <= most:
            raise ConfigError(
                f"topology.recompute_layers={topology.recompute_layers}: the first N layers of each pipeline stage; "
                f"valid: 1 to {most} (a stage's layers), or null for every layer")
    if topology.tp_comm_overlap and (topology.tp < 2 or not topology.sp or model.transformer_impl != "te"):
        raise ConfigError(
            f"topology.tp_comm_overlap=true needs topology.tp > 1, topology.sp=true and model.transformer_impl=te (got "
            f"tp={topology.tp}, sp={str(topology.sp).lower()}, transformer_impl={model.transformer_impl}); valid: "
            "topology.tp_comm_overlap=null (on where it can run) or false"
        )
    if topology.sp and topology.tp < 2:
        raise ConfigError(
            f"topology.sp=true needs topology.tp > 1 (got topology.tp={topology.tp}); "
            f"valid: topology.sp=false, or topology.tp in {_listing([t for t in tp_sizes if t > 1])}"
        )
    if world_size is not None and world_size % topology.model_parallel_size:
        raise ConfigError(
            f"{world_size} processes do not divide into topology.tp={topology.tp} x topology.pp={topology.pp} "
            f"x topology.cp={topology.cp} = {topology.model_parallel_size}; the process count must be a "
            f"multiple of {topology.model_parallel_size}"
        )


def sequence_multiple(topology: TopologyConfig) -> int:
    """What a sequence's length must be a multiple of in this layout: 2 x cp chunks, each split over
    tp with sequence parallelism (Megatron-Core's models/multimodal/context_parallel.py get_padding:
    tp x cp x 2 with SP and CP, cp x 2 with CP, tp with SP)."""
    return (2 * topology.cp if topology.cp > 1 else 1) * (topology.tp if topology.sp else 1)


def thd_sequence_multiple(topology: TopologyConfig) -> int:
    """What each packed conversation is padded to: the layout's sequence multiple under context
    parallelism (phi4.model.context_parallel cuts each one into 2 x cp chunks), else 1 (no padding)."""
    return sequence_multiple(topology) if topology.cp > 1 else 1


def check_sequence_length(seq_length: int, topology: TopologyConfig) -> None:
    """A sequence must cut into context parallelism's 2 x cp chunks, each split over tp with
    sequence parallelism."""
    multiple = sequence_multiple(topology)
    if seq_length % multiple:
        parts = ([f"2 x topology.cp={topology.cp}"] if topology.cp > 1 else []) + \
            ([f"topology.tp={topology.tp} (topology.sp=true)"] if topology.sp else [])
        near = sorted({max(multiple, seq_length // multiple * multiple), (seq_length // multiple + 1) * multiple})
        raise ConfigError(
            f"train.seq_length={seq_length} is not a multiple of {' x '.join(parts)} = {multiple}: "
            f"{'context parallelism cuts each sequence into 2 x cp chunks' if topology.cp > 1 else 'sequence parallelism splits each sequence'}"
            f"{', each split over tp' if topology.cp > 1 and topology.sp else ''}; valid: a multiple of {multiple}, "
            f"e.g. {' or '.join(map(str, near))}"
        )


def check_precision(model: ModelConfig, precision: PrecisionConfig, topology: Optional[TopologyConfig] = None) -> None:
    """Everything Megatron-Core's TransformerConfig would refuse about FP8, refused first, by name."""
    if precision.dtype not in DTYPES:
        raise ConfigError(f"precision.dtype={precision.dtype!r}; valid: {_listing(DTYPES)}")
    fp8 = precision.fp8
    if fp8 is None:
        return
    if model.transformer_impl != "te":
        raise ConfigError(
            f"precision.fp8 needs model.transformer_impl=te (FP8 runs in Transformer Engine); "
            f"got model.transformer_impl={model.transformer_impl}; valid: model.transformer_impl=te, or precision.fp8=null"
        )
    if precision.dtype != "bf16":
        raise ConfigError(f"precision.fp8 runs on top of bf16; got precision.dtype={precision.dtype}; valid: bf16")
    if fp8.format not in FP8_FORMATS:
        raise ConfigError(f"precision.fp8.format={fp8.format!r}; valid: {_listing(FP8_FORMATS)}")
    if fp8.recipe not in FP8_RECIPES:
        raise ConfigError(f"precision.fp8.recipe={fp8.recipe!r}; valid: {_listing(FP8_RECIPES)}")
    if fp8.recipe == "delayed":
        if fp8.amax_compute_algo not in FP8_AMAX_ALGOS:
            raise ConfigError(f"precision.fp8.amax_compute_algo={fp8.amax_compute_algo!r}; valid: {_listing(FP8_AMAX_ALGOS)}")
        if fp8.amax_history_len < 1:
            raise ConfigError(f"precision.fp8.amax_history_len={fp8.amax_history_len}; valid: 1 or more steps")
    if not fp8.first_last_layers_bf16:
        return
    if fp8.recipe == "delayed":  # TransformerConfig: "Delayed scaling does not support first / last layer in BF16"
        raise ConfigError(
            "precision.fp8.first_last_layers_bf16=true cannot be combined with precision.fp8.recipe=delayed "
            "(Megatron-Core refuses it); valid: a current-scaling recipe (tensorwise, blockwise, mxfp8), "
            "or first_last_layers_bf16=false"
        )
    pp = topology.pp if topology else 1
    per_stage = model.num_layers // pp
    for name in ("num_layers_at_start_in_bf16", "num_layers_at_end_in_bf16"):
        value = getattr(fp8, name)
        if not 0 <= value <= per_stage:  # Megatron-Core counts them against one pipeline stage's layers
            raise ConfigError(
                f"precision.fp8.{name}={value}; valid: 0 to {per_stage} (the layers of one pipeline stage: "
                f"model.num_layers={model.num_layers} / topology.pp={pp})"
            )
    kept = fp8.num_layers_at_start_in_bf16 + fp8.num_layers_at_end_in_bf16
    if kept >= model.num_layers:
        raise ConfigError(
            f"precision.fp8 keeps {kept} of model.num_layers={model.num_layers} layers in bf16, "
            f"leaving none in FP8; valid: num_layers_at_start_in_bf16 + num_layers_at_end_in_bf16 "
            f"< {model.num_layers}"
        )


def check_device(precision: PrecisionConfig, capability: tuple[int, int], device_name: str) -> None:
    """FP8 recipes this GPU cannot run, refused before anything is built."""
    fp8 = precision.fp8
    if fp8 is None:
        return
    need = FP8_MIN_CAPABILITY[fp8.recipe]
    if tuple(capability) < need:
        runnable = [r for r, c in FP8_MIN_CAPABILITY.items() if tuple(capability) >= c]
        raise ConfigError(
            f"precision.fp8.recipe={fp8.recipe} needs a GPU of compute capability {need[0]}.{need[1]} or newer"
            f"{' (Blackwell)' if fp8.recipe == 'mxfp8' else ''}; this {device_name} is "
            f"{capability[0]}.{capability[1]}; valid here: "
            f"{('precision.fp8.recipe=' + '|'.join(runnable)) if runnable else 'precision.fp8=null (no FP8 on this GPU)'}"
        )


def check_run(
    model: ModelConfig,
    topology: TopologyConfig,
    precision: PrecisionConfig,
    world_size: Optional[int] = None,
) -> None:
    """Every check above, in the order a user would fix them."""
    check_model(model)
    check_topology(model, topology, world_size)
    check_precision(model, precision, topology)
