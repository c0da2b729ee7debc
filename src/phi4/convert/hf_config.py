"""Hugging Face `config.json` (Phi3ForCausalLM) <-> this project's ModelConfig.

Reading checks that the checkpoint is a model this stack computes exactly: Phi3ForCausalLM,
full attention, no RoPE scaling, RoPE over the whole head, untied embeddings. Writing gives the
exact fields microsoft/phi-4 ships (docs/model.md, "Architecture"), with the sizes of the converted model.
"""

from __future__ import annotations

import json
from pathlib import Path

from phi4.data.tokenizer import Phi4Tokenizer
from phi4.errors import ConfigError
from phi4.model.config import ModelConfig

ARCHITECTURE = "Phi3ForCausalLM"


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta", params.get("rope_theta", 10000.0)))


def model_config_from_hf(config_path: Path) -> ModelConfig:
    """The ModelConfig a HF config.json describes; a model this stack cannot compute exactly is
    a ConfigError naming the field."""
    if not config_path.exists():
        raise ConfigError(f"{config_path} does not exist: a Hugging Face checkpoint directory holds config.json")
    try:
        cfg = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{config_path}: not valid JSON ({err}); a Hugging Face config.json is one JSON object") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{config_path}: a JSON {type(cfg).__name__}; a Hugging Face config.json is one JSON object")
    needed = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    arch = cfg.get("architectures") or []
    if arch != [ARCHITECTURE] or cfg.get("model_type") != "phi3":
        raise ConfigError(
            f"{config_path}: architectures={arch} model_type={cfg.get('model_type')!r}; "
            f"valid: [{ARCHITECTURE}] with model_type 'phi3'"
        )
    rope_type = (cfg.get("rope_parameters") or {}).get("rope_type", "default")
    checks = {
        "rope_scaling": (cfg.get("rope_scaling"), (None,)),
        "rope_parameters.rope_type": (rope_type, ("default",)),
        "sliding_window": (cfg.get("sliding_window"), (None,)),
        "tie_word_embeddings": (cfg.get("tie_word_embeddings", False), (False,)),
        "attention_bias": (cfg.get("attention_bias", False), (False,)),
        "hidden_act": (cfg.get("hidden_act", "silu"), ("silu",)),
        "partial_rotary_factor": (
            cfg.get("partial_rotary_factor", (cfg.get("rope_parameters") or {}).get("partial_rotary_factor", 1.0)),
            (1.0,),
        ),
    }
    for field, (value, valid) in checks.items():
        if value not in valid:
            raise ConfigError(f"{config_path}: {field}={value!r} is not supported; valid: {valid[0]!r}")
    missing = [k for k in needed if not isinstance(cfg.get(k), int) or isinstance(cfg.get(k), bool)]
    if missing:
        raise ConfigError(f"{config_path}: no whole number under {', '.join(missing)}; valid: Phi3ForCausalLM's "
                          "config.json fields")
    heads = cfg["num_attention_heads"]
    return ModelConfig(
        hidden_size=cfg["hidden_size"],
        ffn_hidden_size=cfg["intermediate_size"],
        num_layers=cfg["num_hidden_layers"],
        num_attention_heads=heads,
        num_query_groups=cfg.get("num_key_value_heads") or heads,
        vocab_size=cfg["vocab_size"],
        max_position_embeddings=cfg.get("max_position_embeddings", 4096),
        rope_base=_rope_theta(cfg),
        norm_eps=cfg.get("rms_norm_eps", 1e-5),
        init_std=cfg.get("initializer_range", 0.02),
        dropout=float(cfg.get("attention_dropout", 0.0)),
        tie_word_embeddings=False,
        transformer_impl="local",
        name=cfg.get("_name_or_path", "") or "hf",
    )


def check_same_model(expected: ModelConfig, found: ModelConfig, source: str) -> None:
    """The architecture fields must agree (names, backends and context length may differ)."""
    fields = ["hidden_size", "ffn_hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "vocab_size"]
    wrong = [f"{f}: {getattr(found, f)} in {source}, {getattr(expected, f)} in the model config" for f in fields
             if getattr(found, f) != getattr(expected, f)]
    if wrong:
        raise ConfigError(f"{source} does not match the model config: " + "; ".join(wrong))


def _token_id(token_id: int, model: ModelConfig):
    """A special token's id, or None for a (test-sized) vocabulary too small to hold it."""
    return token_id if token_id < model.vocab_size else None


def hf_config(model: ModelConfig, dtype_name: str) -> dict:
    """config.json for Phi3ForCausalLM with microsoft/phi-4's fields."""
    tok = Phi4Tokenizer
    return {
        "architectures": [ARCHITECTURE],
        "attention_bias": False,
        "attention_dropout": model.dropout,
        "bos_token_id": _token_id(tok.bos_id, model),
        "embd_pdrop": model.dropout,
        "eos_token_id": _token_id(tok.eos_id, model),
        "hidden_act": "silu",
        "hidden_size": model.hidden_size,
        "initializer_range": model.init_std,
        "intermediate_size": model.ffn_hidden_size,
        "max_position_embeddings": model.max_position_embeddings,
        "model_type": "phi3",
        "num_attention_heads": model.num_attention_heads,
        "num_hidden_layers": model.num_layers,
        "num_key_value_heads": model.num_query_groups,
        "original_max_position_embeddings": model.max_position_embeddings,
        "pad_token_id": _token_id(tok.pad_id, model),
        "resid_pdrop": model.dropout,
        "rms_norm_eps": model.norm_eps,
        "rope_scaling": None,
        "rope_theta": model.rope_base,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "torch_dtype": dtype_name,
        "use_cache": True,
        "vocab_size": model.vocab_size,
    }


def generation_config(model: ModelConfig) -> dict:
    tok = Phi4Tokenizer
    return {
        "bos_token_id": _token_id(tok.bos_id, model),
        "eos_token_id": _token_id(tok.eos_id, model),
        "pad_token_id": _token_id(tok.pad_id, model),
    }
