"""Sampling from a Megatron-Core GPTModel with its KV cache (Pivotal Token Search's rollouts).

The prompt is run once into Megatron-Core's static inference context (its KV cache); each new
token then costs one single-position step instead of a forward over the whole sequence, which
is what makes PTS's many rollouts affordable. `token_logprobs` (a few per problem) runs the
plain forward. The sampled distribution is the same as `phi4.posttrain.sampling.sample_tokens`
over full forwards (tests/test_pts_model.py compares the two).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from phi4.posttrain.sampling import token_logprobs, top_p_filter


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

    def _net(self):
        from phi4.model.build import unwrap

        return unwrap(self.chunks[0])

    def _vocab(self, logits: torch.Tensor) -> torch.Tensor:
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        if logits.shape[-1] < self.vocab_size:  # a tensor-parallel shard of the vocabulary
            logits = gather_from_tensor_model_parallel_region(logits)
        return logits[..., : self.vocab_size].float()

    def logits(self, tokens: torch.Tensor) -> torch.Tensor:
        """[batch, seq, vocab] logits of a full forward (no cache)."""
        from phi4.train.step import logits_of_tokens

        return logits_of_tokens(self.chunks, tokens.to(self.device))[..., : self.vocab_size].float()

    @torch.no_grad()
    def sample(self, prefix_ids: list[int], n: int) -> list[list[int]]:
        from megatron.core.inference.contexts import StaticInferenceContext

        net = self._net()
        length = len(prefix_ids)
        context = StaticInferenceContext(n, length + self.max_new_tokens)
        rows = torch.tensor([list(prefix_ids)] * n, dtype=torch.long, device=self.device)
        positions = torch.arange(length, device=self.device).expand(n, -1)
        logits = self._vocab(net(rows, positions, None, inference_context=context))[:, -1]
        completions: list[list[int]] = [[] for _ in range(n)]
        running = torch.ones(n, dtype=torch.bool, device=self.device)
        for step in range(self.max_new_tokens):
            if self.temperature == 0:
                chosen = logits.argmax(dim=-1)
            else:
                probs = top_p_filter(logits / self.temperature, self.top_p).softmax(dim=-1)
                chosen = torch.multinomial(probs, 1, generator=self.generator).squeeze(-1)
            for row in running.nonzero().flatten().tolist():
                completions[row].append(int(chosen[row]))
            running &= chosen != self.eos_id
            if not running.any() or step == self.max_new_tokens - 1:
                break
            context.sequence_len_offset += length if step == 0 else 1
            position = torch.full((n, 1), length + step, device=self.device)
            logits = self._vocab(net(chosen[:, None], position, None, inference_context=context))[:, -1]
        return completions

    @torch.no_grad()
    def token_logprobs(self, prefix_ids: list[int], tokens: list[int]) -> list[float]:
        return token_logprobs(self.logits, prefix_ids, tokens, self.device)
