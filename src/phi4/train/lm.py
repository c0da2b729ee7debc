"""Language modelling, the next-token objective of pre-training, mid-training and SFT.

The loss is the mean over every unmasked token of the global batch: each micro-batch returns its
summed loss and token count (`calculate_per_token_loss`), Megatron-Core divides the gradients by
the token total across data-parallel ranks, and the reported loss is reduced the same way, so it
does not depend on how the batch is split. Packed rows bring their attention mask (local backend)
or THD sequence boundaries (te).
"""

from __future__ import annotations

from functools import partial
from typing import Optional

import torch
from megatron.core import parallel_state

from phi4.model.pipeline_schedule import run_schedule
from phi4.train.objective import Objective, register
from phi4.train.update import Gate, StepResult, forward_backward_update


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(per_token_loss.reshape(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.cat([loss.detach().view(1), num_tokens.float().view(1)])
    return loss, num_tokens, {"lm loss": report}


def lm_forward_step(data_iterator, model):
    """Next-token loss of one micro-batch."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
                   packed_seq_params=batch.get("packed_seq_params"))
    return output, partial(_loss_func, batch["loss_mask"])


def mean_token_loss(reports: list[dict]) -> Optional[float]:
    """Summed loss / token count over the micro-batches and the data-parallel ranks (on the last
    pipeline stage; None elsewhere)."""
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.stack([r["lm loss"] for r in reports]).sum(0)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return (total[0] / total[1]).item()


@torch.no_grad()
def evaluate_loss(chunks: list, micro_batches: list[dict]) -> Optional[float]:
    """The mean per-token loss of the micro-batches without a backward pass (validation)."""
    return mean_token_loss(run_schedule(lm_forward_step, chunks, micro_batches, forward_only=True))


def lm_update(model_chunks: list, optimizer, micro_batches: list[dict], gate: Optional[Gate] = None) -> StepResult:
    """One optimizer update on the next-token loss."""
    return forward_backward_update(model_chunks, optimizer, micro_batches, lm_forward_step,
                                   lambda r: {"loss": mean_token_loss(r)}, gate)


@register("lm")
class LanguageModeling(Objective):
    formats = ("gpt", "packed_chat")

    def update(self, model_chunks: list, optimizer, micro_batches: list[dict],
               gate: Optional[Gate] = None) -> StepResult:
        return lm_update(model_chunks, optimizer, micro_batches, gate)

    def evaluate(self, model_chunks: list, micro_batches: list[dict]) -> Optional[dict]:
        loss = evaluate_loss(model_chunks, micro_batches)
        return None if loss is None else {"loss": loss}
