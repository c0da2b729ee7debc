"""Shared test material: the tiny model's config, seeded HF-layout weights, token batches."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import OmegaConf

from phi4.model.config import ModelConfig, PrecisionConfig, TopologyConfig

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(**overrides) -> ModelConfig:
    values = OmegaConf.to_container(OmegaConf.load(ROOT / "conf/model/phi4_tiny.yaml"))
    values.update(overrides)
    return ModelConfig.from_dict(values)


def hf_shapes(model: ModelConfig) -> dict[str, tuple[int, ...]]:
    h, f, d = model.hidden_size, model.ffn_hidden_size, model.head_dim
    qkv = (model.num_attention_heads + 2 * model.num_query_groups) * d
    shapes = {
        "model.embed_tokens.weight": (model.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (model.vocab_size, h),
    }
    for i in range(model.num_layers):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.qkv_proj.weight": (qkv, h),
                p + "self_attn.o_proj.weight": (h, model.num_attention_heads * d),
                p + "mlp.gate_up_proj.weight": (2 * f, h),
                p + "mlp.down_proj.weight": (h, f),
            }
        )
    return shapes


def random_hf_weights(model: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF Phi3ForCausalLM-layout weights, scaled so the logits are of order 1 (small random
    weights give logits near 0, where a wrong mapping can hide)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in hf_shapes(model).items():
        if name.endswith("norm.weight"):
            weights[name] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif "embed_tokens" in name:
            weights[name] = torch.randn(shape, generator=g)
        else:
            weights[name] = torch.randn(shape, generator=g) / shape[1] ** 0.5
    return weights


def token_rows(model: ModelConfig, rows: int, seq: int, seed: int = 1) -> torch.Tensor:
    """[rows, seq + 1] token ids: inputs and their next-token labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.vocab_size, (rows, seq + 1), generator=g)


FP32 = PrecisionConfig(dtype="fp32")
__all__ = ["FP32", "ModelConfig", "TopologyConfig", "tiny_model", "random_hf_weights", "token_rows"]
