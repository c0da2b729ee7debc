"""Which decoder layers each pipeline stage holds: the even split, or `topology.pp_layout`,
Megatron-Core's `pipeline_model_parallel_layout` (TransformerConfig), which places the layers
unevenly and the embedding and the loss as members of the first and last stages.

The layout is a string of one run per stage, stages separated by `|`: `E` the embedding, `t` a
decoder layer, `L` the loss (the final norm, output layer and loss), `x*n` n of x, `(...)*n` a
group repeated, commas ignored. Stages go in Megatron-Core's order, virtual stage by virtual stage:
stage i is pipeline rank i % pp, virtual stage i // pp. `"Et*9|t*10|t*10|t*11,L"` puts 40 layers
on 4 ranks, one layer fewer on the first (which embeds) and one more on the third than the even
split; `"E|t*20|t*20|L"` gives the embedding and the loss stages of their own. Parsed with
Megatron-Core's grammar (PipelineParallelLayerLayout.parse_str_to_list; tests/test_parallel_parity.py
checks the two agree); checked here, by name, before Megatron-Core's assertions would see it.
"""

from __future__ import annotations

import re
from functools import lru_cache
from typing import Optional

from phi4.errors import ConfigError
from phi4.model.config import ModelConfig, TopologyConfig
from phi4.model.flops import layer_linear_params

_VALID = ("one run of E (embedding), t (decoder layer) and L (loss) per stage, stages separated by |, "
          "x*n for n of x, e.g. \"Et*9|t*10|t*10|t*11,L\"")


def parse(model: ModelConfig, topology: TopologyConfig) -> tuple[tuple[str, ...], ...]:
    """The stages of topology.pp_layout as runs of E, t and L, checked against the model and the
    layout: pp x vp stages, the embedding first, the loss last, model.num_layers decoder layers."""
    return _parse(topology.pp_layout, topology.pp, topology.vp, model.num_layers)


_REPEATS = (re.compile(r"\(([^)]+)\)\*(\d+)"), re.compile(r"(.)\*(\d+)"))  # (...)*n first, then x*n


def unroll(text: str) -> list[str]:
    """The stages of a layout string, each a run of E, t, L (and Megatron-Core's m): its grammar,
    Megatron-Core's PipelineParallelLayerLayout.parse_str_to_list, without importing Megatron-Core
    (phi4-plan runs without it)."""
    text = text.replace(",", "").replace(" ", "")
    for pattern in _REPEATS:
        text = pattern.sub(lambda match: match.group(1) * int(match.group(2)), text)
    return text.split("|")


@lru_cache(maxsize=4096)
def _parse(text: str, pp: int, vp: Optional[int], num_layers: int) -> tuple[tuple[str, ...], ...]:
    name = f"topology.pp_layout={text!r}"
    if pp < 2:
        raise ConfigError(f"{name} needs topology.pp >= 2 (got topology.pp={pp}); valid: null with pp=1")
    stages = unroll(text)
    unknown = sorted({c for stage in stages for c in stage if c not in "EtL"})
    if unknown:  # m: Phi-4 has no multi-token prediction layers
        raise ConfigError(f"{name}: unknown layer character(s) {' '.join(unknown)}; valid: {_VALID}")
    want = pp * (vp or 1)
    if len(stages) != want:
        raise ConfigError(f"{name} has {len(stages)} stages; topology.pp={pp} x topology.vp={vp} needs {want}, separated by |")
    flat = "".join(stages)
    if flat.count("E") != 1 or not flat.startswith("E"):
        raise ConfigError(f"{name}: the embedding E must come once, first in the first stage; valid: {_VALID}")
    if flat.count("L") != 1 or not flat.endswith("L"):
        raise ConfigError(f"{name}: the loss L must come once, last in the last stage; valid: {_VALID}")
    layers = flat.count("t")
    if layers != num_layers:
        raise ConfigError(f"{name} places {layers} decoder layers; model.num_layers={num_layers}")
    return tuple(tuple(stage) for stage in stages)


@lru_cache(maxsize=4096)
def stage_layers(model: ModelConfig, topology: TopologyConfig) -> tuple[tuple[range, ...], ...]:
    """[pp rank][virtual stage] -> the global numbers (0-based) of the decoder layers it holds."""
    vp = topology.vp or 1
    if topology.pp_layout:
        counts = [stage.count("t") for stage in parse(model, topology)]
    else:
        counts = [model.num_layers // (topology.pp * vp)] * (topology.pp * vp)
    out = [[range(0)] * vp for _ in range(topology.pp)]
    start = 0
    for i, count in enumerate(counts):
        out[i % topology.pp][i // topology.pp] = range(start, start + count)
        start += count
    return tuple(tuple(rank) for rank in out)


def lighter_last(model: ModelConfig, pp: int, vp: int) -> Optional[str]:
    """A layout whose last stage, which also runs the output layer and the loss, holds k fewer
    layers than the even split (k below; at least 1; Phi-4 at PP 2: 1). Those k layers go to the
    earliest stages of the other ranks, and where the layers do not divide evenly the extra ones to
    the earliest stages; the last stage may be left with the loss alone. None where it has no layer
    to give or there are too few other stages to take them."""
    stages = pp * vp
    counts = [model.num_layers // stages + (1 if i < model.num_layers % stages else 0) for i in range(stages)]
    # the last rank runs w = the output layer's weights in layers' more than the others; moving k
    # layers off it to the others evens them at k = w x (pp - 1) / pp
    w = model.vocab_size * model.hidden_size / layer_linear_params(model)
    k = min(max(1, round(w * (pp - 1) / pp)), counts[-1])
    targets = [i for i in range(stages - 1) if i % pp != pp - 1][:k]
    if not k or len(targets) < k:
        return None
    counts[-1] -= k
    for i in targets:
        counts[i] += 1
    return _format(counts)


def _format(counts: list[int]) -> str:
    """The layout string of these decoder layers per stage, the embedding first, the loss last."""
    parts = [("E" if i == 0 else "") + (f"t*{c}" if c else "") + (",L" if i == len(counts) - 1 else "")
             for i, c in enumerate(counts)]
    return "|".join(parts)
