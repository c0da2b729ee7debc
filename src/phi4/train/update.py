"""One optimizer step over Megatron-Core's pipeline schedules: forward and backward of a forward
step function over the micro-batches, then the optimizer's update, skipped when the gradient norm
is not finite. The objectives (phi4.train.lm, phi4.posttrain.dpo) supply the forward step and the
reduction of its reports."""

from __future__ import annotations

import math
from typing import Callable, Optional

from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

from phi4.model.schedule import run_schedule


def train_step(ddp_chunks: list, optimizer, micro_batches: list[dict], forward_step,
               reduce: Callable[[list[dict]], Optional[dict]],
               gate: Optional[Callable[[Optional[float]], Optional[str]]] = None) -> dict:
    """Forward and backward over the micro-batches, then one optimizer step.

    Returns `reduce`'s figures (at least `loss`; None off the last pipeline stage), `grad_norm`,
    and `update_successful` (False when the gradient norm was not finite: no update). `gate`
    (phi4.train.spikes), asked with the loss before the update, may veto it: then `spike` says why.
    """
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = run_schedule(forward_step, ddp_chunks, micro_batches, forward_only=False)
    figures = {"loss": None, **(reduce(reports) or {})}
    veto = gate(figures["loss"]) if gate is not None else None
    if veto:
        return {**figures, "grad_norm": math.nan, "update_successful": False, "spike": veto}
    update_successful, grad_norm = _optimizer_step(optimizer)
    return {**figures, "grad_norm": grad_norm, "update_successful": update_successful}


def _optimizer_step(optimizer) -> tuple[bool, Optional[float]]:
    """Megatron-Core's optimizer step (prepare, norm, clip, update), split so that a non-finite
    gradient norm skips the update: its own skip threshold compares `norm > threshold`, which a
    NaN never satisfies. The norm is all-reduced, so every rank skips together; it is computed
    once and the clipping reuses it."""
    if optimizer.prepare_grads():  # found inf/nan (fp16 loss scaling)
        return False, None
    grad_norm = optimizer.get_grad_norm()
    if not math.isfinite(grad_norm):
        return False, grad_norm
    if optimizer.config.clip_grad > 0:
        clip_grad_by_total_norm_fp32(optimizer.get_parameters(), optimizer.config.clip_grad, grad_norm)
    return bool(optimizer.step_with_ready_grads()), grad_norm
