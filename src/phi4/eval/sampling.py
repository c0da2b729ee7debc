"""Nucleus filtering and token log-probabilities over any next-token logits function: what the
decoder (phi4.eval.generate) and PTS's `PolicyModel` (pts.py) are made of."""

from __future__ import annotations

from typing import Callable

import torch

# tokens [batch, seq] -> logits [batch, seq, vocab]
LogitsFn = Callable[[torch.Tensor], torch.Tensor]


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering over the last dimension: keep the smallest set of most probable tokens
    whose probabilities add up to at least `top_p` (always at least the most probable one), and
    set the others to -inf."""
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if top_p == 1:
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    # A token is needed while the more probable ones before it have not yet reached top_p; the
    # first token has nothing before it, so it is always kept.
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_p
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


@torch.no_grad()
def token_logprobs(
    logits_fn: LogitsFn, prefix_ids: list[int], tokens: list[int], device: torch.device | str | None = None
) -> list[float]:
    """log p(tokens[i] | prefix + tokens[:i]) for each i, from one forward pass at temperature 1."""
    if not tokens:
        return []
    if not prefix_ids:
        raise ValueError("token_logprobs needs a non-empty prefix: the first token has no logits before it")
    sequence = torch.tensor([list(prefix_ids) + list(tokens)], dtype=torch.long, device=device)
    # The logits at position j predict token j + 1: those from the prefix's last token onwards.
    logits = logits_fn(sequence)[0, len(prefix_ids) - 1 : -1].float()
    targets = torch.tensor(tokens, dtype=torch.long, device=logits.device)[:, None]
    return logits.log_softmax(dim=-1).gather(-1, targets).squeeze(-1).tolist()
