"""Model FLOPs of Phi-4-shaped decoders: what MFU counts (the useful work, no recomputation).

Per token and layer, the forward pass does 2 FLOPs per weight of its linears (QKV, output
projection, SwiGLU's three matrices) and, for causal attention over a sequence of s, 2 x s x h
(scores and weighted sum, each 2 x s x h at full length, halved by the causal mask). The output
layer adds 2 x vocab x h; the embedding lookup is free. Training is 3 x the forward pass.
"""

from __future__ import annotations

from phi4.model.config import ModelConfig


def layer_linear_params(model: ModelConfig) -> int:
    h, f = model.hidden_size, model.ffn_hidden_size
    kv = model.num_query_groups * model.head_dim
    return h * (h + 2 * kv) + h * h + 3 * h * f


def forward_flops_per_token(model: ModelConfig, seq_length: int) -> dict:
    """Forward FLOPs of one token: the layers' linears, their attention, the output layer."""
    L, h = model.num_layers, model.hidden_size
    return dict(
        linear=2.0 * L * layer_linear_params(model),
        attention=2.0 * L * seq_length * h,
        output=2.0 * model.vocab_size * h,
    )


def flops_per_token(model: ModelConfig, seq_length: int) -> float:
    """Training FLOPs per token (forward + backward = 3 x forward)."""
    return 3.0 * sum(forward_flops_per_token(model, seq_length).values())
