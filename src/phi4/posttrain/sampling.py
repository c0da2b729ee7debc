"""Batched sampling and token log-probabilities over any next-token logits function: what a
`PolicyModel` for Pivotal Token Search (pts.py) is made of, for a Megatron-Core model or a test's toy."""

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
def sample_tokens(
    logits_fn: LogitsFn,
    prefix_ids: list[int],
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_id: int | None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> list[list[int]]:
    """`n` completions of `prefix_ids`, sampled together: each stops after it emits `eos_id` (kept
    as its last token) or after `max_new_tokens`. Temperature 0 is greedy decoding.

    The logits are recomputed over the whole sequence at each step (no KV cache): correctness
    first. Rows that have finished leave the batch, so the rows fed to `logits_fn` always have the
    same length and need no padding. Tensors live on `device`, else on the generator's device."""
    if not prefix_ids:
        raise ValueError("sample_tokens needs a non-empty prefix: an empty one has no next-token logits")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    rows = torch.tensor([list(prefix_ids)] * n, dtype=torch.long, device=device)
    active = torch.arange(n, device=device)  # the original index of each row still sampling
    completions: list[list[int]] = [[] for _ in range(n)]
    for _ in range(max_new_tokens):
        if active.numel() == 0:
            break
        logits = logits_fn(rows)[:, -1, :].float()
        if temperature == 0:
            chosen = logits.argmax(dim=-1)
        else:
            probs = top_p_filter(logits / temperature, top_p).softmax(dim=-1)
            chosen = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        for row, token in zip(active.tolist(), chosen.tolist()):
            completions[row].append(token)
        going_on = chosen != eos_id if eos_id is not None else torch.ones_like(chosen, dtype=torch.bool)
        rows = torch.cat([rows, chosen[:, None]], dim=1)[going_on]
        active = active[going_on]
    return completions


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
