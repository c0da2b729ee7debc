"""One optimizer update over Megatron-Core's pipeline schedules: forward and backward of a forward
step function over the micro-batches, then the optimizer's update, skipped when the gradient norm
is not finite. The objectives (phi4.train.lm, phi4.posttrain.dpo) supply the forward step and the
reduction of its reports; what an update did is a `StepResult`."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Optional

from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

from phi4.model.pipeline_schedule import run_schedule

# Asked with the step's loss before the update; returns why the update must not be applied, or None.
Gate = Callable[[Optional[float]], Optional[str]]


@dataclass
class StepResult:
    """What one global batch's update did.

    `loss` is None off the last pipeline stage; `grad_norm` is NaN when a gate vetoed the update
    and None when fp16 loss scaling found inf/nan; `figures` holds the objective's own reductions
    (DPO's rewards and accuracy), by name; `spike` says why the gate vetoed the update."""

    loss: Optional[float]
    grad_norm: Optional[float]
    update_successful: bool
    figures: dict[str, float] = field(default_factory=dict)
    spike: Optional[str] = None


def forward_backward_update(model_chunks: list, optimizer, micro_batches: list[dict], forward_step,
                            reduce: Callable[[list[dict]], Optional[dict]], gate: Optional[Gate] = None) -> StepResult:
    """Forward and backward over the micro-batches, then one optimizer update.

    `reduce` turns the micro-batches' reports into figures (at least `loss`; None off the last
    pipeline stage). The update is skipped when the gradient norm is not finite, or when `gate`
    (phi4.train.spikes), asked with the loss first, vetoes it."""
    for chunk in model_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = run_schedule(forward_step, model_chunks, micro_batches, forward_only=False)
    figures = dict(reduce(reports) or {})
    loss = figures.pop("loss", None)
    veto = gate(loss) if gate is not None else None
    if veto:
        return StepResult(loss, math.nan, False, figures, spike=veto)
    update_successful, grad_norm = _optimizer_step(optimizer)
    return StepResult(loss, grad_norm, update_successful, figures)


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
