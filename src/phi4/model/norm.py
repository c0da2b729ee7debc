"""RMSNorm for the local (non-Transformer-Engine) spec, with sequence-parallel support.

Megatron-Core's torch fallback norm refuses sequence parallelism. Under sequence parallelism each
TP rank normalises its own slice of the sequence, so the weight's gradient is a partial sum:
marking the weight `sequence_parallel` makes Megatron-Core's `finalize_model_grads` all-reduce it
across the tensor-parallel group. The arithmetic follows Hugging Face's Phi3RMSNorm (fp32
statistics, result cast back to the input dtype before the weight is applied).
"""

from __future__ import annotations

import torch


class RMSNorm(torch.nn.Module):
    def __init__(self, config, hidden_size: int, eps: float = 1e-5):
        super().__init__()
        self.config = config
        self.eps = eps
        device = "cpu" if config.use_cpu_initialization else torch.cuda.current_device()
        self.weight = torch.nn.Parameter(torch.ones(hidden_size, dtype=config.params_dtype, device=device))
        self.weight.sequence_parallel = config.sequence_parallel

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        dtype = hidden.dtype
        x = hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)
