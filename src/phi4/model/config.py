"""The settings of a run that shape the model: architecture, parallel layout, precision.

Each is a frozen dataclass read from the matching Hydra group (conf/model, conf/topology,
conf/precision); `from_dict` rejects unknown keys by name, so a typo in an override is an error,
not a silently ignored setting.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Optional

from phi4.errors import settings_from_dict


@dataclass(frozen=True)
class ModelConfig:
    """A Phi-4-shaped decoder (conf/model/*.yaml)."""

    hidden_size: int
    ffn_hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int
    vocab_size: int
    make_vocab_size_divisible_by: int = 128
    max_position_embeddings: int = 4096
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    dropout: float = 0.0
    tie_word_embeddings: bool = False
    transformer_impl: str = "local"  # the layer spec: local (Megatron-Core's own modules) or te (Transformer Engine)
    name: str = ""

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
        """The model from its settings; a checkpoint saved before `transformer_impl` was named so
        calls it `backend`."""
        values = dict(values)
        backend = values.pop("backend", None)
        if backend is not None and "transformer_impl" not in values:
            values["transformer_impl"] = backend
        return settings_from_dict(cls, "model", values)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def padded_vocab_size(self, tp: int) -> int:
        """The embedding rows: vocab_size rounded up so that each TP rank holds whole multiples
        of make_vocab_size_divisible_by (Megatron-LM's rule). Phi-4's 100352 needs no padding at
        TP=1 or 2."""
        multiple = self.make_vocab_size_divisible_by * tp
        return int(math.ceil(self.vocab_size / multiple) * multiple)

    def num_parameters(self) -> int:
        """Parameters of the unpadded model (Phi-4 14B: 14,659,507,200)."""
        h, f, kv = self.hidden_size, self.ffn_hidden_size, self.num_query_groups * self.head_dim
        per_layer = h * (h + 2 * kv) + h * h + 3 * h * f + 2 * h
        embeddings = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_layers * per_layer + embeddings + h


@dataclass(frozen=True)
class TopologyConfig:
    """How the model is split over processes (conf/topology/*.yaml); DP is what is left."""

    tp: int = 1
    pp: int = 1
    vp: Optional[int] = None
    cp: int = 1
    sp: bool = False
    nodes: Optional[int] = None  # the cluster this layout is for (documentation and a world-size check)
    gpus_per_node: Optional[int] = None
    # Activation recomputation: none; selective (core attention recomputed in the backward
    # pass); full (every layer keeps only its input and recomputes the rest).
    recompute: str = "none"
    # With recompute=full: only the first N layers of each pipeline stage (Megatron-Core's block
    # method, recompute_num_layers=N), the rest keep their activations; null: every layer.
    recompute_layers: Optional[int] = None
    # TE's TP communication overlap (phi4.model.tp_overlap): null = where it can run, true, false.
    tp_comm_overlap: Optional[bool] = None
    # Uneven pipeline stages (Megatron-Core's pipeline_model_parallel_layout, phi4.model.pipeline_layout):
    # e.g. "Et*9|t*10|t*10|t*11,L"; null = model.num_layers split evenly over pp x vp stages.
    pp_layout: Optional[str] = None

    @property
    def world_size(self) -> Optional[int]:
        return self.nodes * self.gpus_per_node if self.nodes and self.gpus_per_node else None

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "TopologyConfig":
        return settings_from_dict(cls, "topology", values)

    @property
    def model_parallel_size(self) -> int:
        return self.tp * self.pp * self.cp

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // self.model_parallel_size


@dataclass(frozen=True)
class FP8Config:
    """Transformer Engine FP8 (conf/precision/fp8.yaml)."""

    format: str = "hybrid"
    recipe: str = "tensorwise"
    amax_history_len: int = 1024
    amax_compute_algo: str = "max"
    margin: int = 0
    first_last_layers_bf16: bool = True
    num_layers_at_start_in_bf16: int = 1
    num_layers_at_end_in_bf16: int = 1
    param_gather: bool = True  # the FP8 layers' weights kept, and all-gathered, in FP8 (--fp8-param-gather)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "FP8Config":
        return settings_from_dict(cls, "precision.fp8", values)


@dataclass(frozen=True)
class PrecisionConfig:
    """Parameter/activation dtype, and FP8 on top of bf16 (conf/precision/*.yaml)."""

    dtype: str = "fp32"
    fp8: Optional[FP8Config] = field(default=None)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "PrecisionConfig":
        values = dict(values)
        if values.get("fp8") is not None and not isinstance(values["fp8"], FP8Config):
            values["fp8"] = FP8Config.from_dict(values["fp8"])
        return settings_from_dict(cls, "precision", values)


def cross_entropy_impl(backend: str, on_cpu: bool) -> str:
    """The loss kernel phi4-train uses (phi4.model.build.fusion_settings; phi4-plan counts its
    memory and bytes): te, Transformer Engine's, on the bf16 logits in place; native,
    Megatron-Core's fused one, on an fp32 copy; unfused on the CPU."""
    if on_cpu:
        return "unfused"
    return "te" if backend == "te" else "native"
