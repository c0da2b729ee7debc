"""Pivotal Token Search's `PolicyModel` over a Megatron-Core model: rollouts from the shared decoder
(phi4.eval.generate, with its KV cache), log-probabilities from a plain forward. The sampled
distribution is the same as sampling with a full forward at every token (tests/test_pts_model.py
compares the two).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from phi4.eval.generate import Decoder
from phi4.eval.sampling import token_logprobs
from phi4.model.pipeline_schedule import logits_of_tokens


@dataclass
class MegatronPolicy:
    """A PTS `PolicyModel` over model chunks (pipeline size 1; tensor parallel allowed)."""

    chunks: list
    vocab_size: int
    eos_id: int
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    generator: torch.Generator | None = None
    device: str = "cpu"
    decoder: object = field(init=False, repr=False)

    def __post_init__(self):
        self.decoder = Decoder(self.chunks, self.vocab_size, [self.eos_id], self.device)

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, seq, vocab] logits of a full forward (no cache)."""
        return logits_of_tokens(self.chunks, tokens.to(self.device))[..., : self.vocab_size].float()

    def sample(self, prefix_ids: list[int], n: int) -> list[list[int]]:
        return self.decoder.generate([list(prefix_ids)] * n, self.max_new_tokens, self.temperature, self.top_p,
                                     self.generator)

    @torch.no_grad()
    def token_logprobs(self, prefix_ids: list[int], tokens: list[int]) -> list[float]:
        return token_logprobs(self.logits, prefix_ids, tokens, self.device)
