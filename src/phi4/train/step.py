"""One optimizer step, and a forward pass for logits, over Megatron-Core's pipeline schedules.

A micro-batch is a dict of [micro_batch, seq] tensors: `tokens`, `labels`, `loss_mask`,
`position_ids`. The loss is the mean over every unmasked token of the global batch: each
micro-batch returns its summed loss and token count (`calculate_per_token_loss`), Megatron-Core
divides the gradients by the token total across data-parallel ranks, and the reported loss is
reduced the same way, so it does not depend on how the batch is split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch


@dataclass(frozen=True)
class OptimSettings:
    lr: float = 3e-4
    min_lr: float = 0.0
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


def wrap_ddp(chunks: list, config, overlap_grad_reduce: bool = False, overlap_param_gather: bool = False) -> list:
    """Megatron-Core DDP over each model chunk, sharing one grad buffer layout for the
    distributed optimizer; only the first virtual stage buckets (Megatron-LM's rule)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=True,
    )
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def build_optimizer(ddp_chunks: list, config, settings: OptimSettings):
    """Adam with the distributed optimizer, and the hooks the schedules call back into."""
    from megatron.core.distributed import finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=settings.lr,
        min_lr=settings.min_lr,
        weight_decay=settings.weight_decay,
        adam_beta1=settings.adam_beta1,
        adam_beta2=settings.adam_beta2,
        adam_eps=settings.adam_eps,
        clip_grad=settings.clip_grad,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=True,
    )
    optimizer = get_megatron_optimizer(opt_config, ddp_chunks)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    def one_or_list(funcs):
        return funcs[0] if len(funcs) == 1 else funcs

    config.no_sync_func = one_or_list([chunk.no_sync for chunk in ddp_chunks])
    ddp_config = ddp_chunks[0].ddp_config
    if ddp_config.overlap_grad_reduce:  # the schedules start each chunk's reduce as its grads finish
        config.grad_sync_func = one_or_list([chunk.start_grad_sync for chunk in ddp_chunks])
    if ddp_config.overlap_param_gather:  # the next step's forward waits on each bucket's all-gather
        config.param_sync_func = one_or_list([chunk.start_param_sync for chunk in ddp_chunks])
    return optimizer


def _loss_func(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(per_token_loss.reshape(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.cat([loss.detach().view(1), num_tokens.float().view(1)])
    return loss, num_tokens, {"lm loss": report}


def lm_forward_step(data_iterator, model):
    """Next-token loss of one micro-batch; packed rows bring their attention mask (local
    backend) or THD sequence boundaries (te)."""
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], batch.get("attention_mask"), labels=batch["labels"],
                   packed_seq_params=batch.get("packed_seq_params"))
    return output, partial(_loss_func, batch["loss_mask"])


def run_schedule(step_func, chunks: list, micro_batches: list[dict], forward_only: bool, **extra) -> list:
    """Megatron-Core's schedule for this layout (none, 1F1B or interleaved) over the micro-batches.
    Every virtual stage reads the same micro-batch sequence: the first uses the tokens, the last
    the labels."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    iterators = [iter(micro_batches) for _ in chunks]
    first = micro_batches[0]["tokens"]
    return get_forward_backward_func()(
        forward_step_func=step_func,
        data_iterator=iterators if len(chunks) > 1 else iterators[0],
        model=chunks if len(chunks) > 1 else chunks[0],
        num_microbatches=len(micro_batches),
        seq_length=first.shape[1],
        micro_batch_size=first.shape[0],
        forward_only=forward_only,
        **extra,
    )


def train_step(ddp_chunks: list, optimizer, micro_batches: list[dict], forward_step=lm_forward_step,
               reduce=None) -> dict:
    """Forward and backward over the micro-batches, then one optimizer step.

    Returns `loss` (mean per token over the global batch; None off the last pipeline stage),
    `grad_norm`, `update_successful` (False when the gradient norm was not finite: no update).
    With another `forward_step`, `reduce` turns its reports into a dict with at least `loss`.
    """
    for chunk in ddp_chunks:
        chunk.zero_grad_buffer()
    optimizer.zero_grad()
    reports = run_schedule(forward_step, ddp_chunks, micro_batches, forward_only=False)
    update_successful, grad_norm = _optimizer_step(optimizer)
    result = reduce(reports) if reduce else {"loss": _mean_token_loss(reports)}
    return {"loss": None, **(result or {}), "grad_norm": grad_norm, "update_successful": update_successful}


def _optimizer_step(optimizer) -> tuple[bool, Optional[float]]:
    """Megatron-Core's optimizer step (prepare, norm, clip, update), split so that a non-finite
    gradient norm skips the update: its own skip threshold compares `norm > threshold`, which a
    NaN never satisfies. The norm is all-reduced, so every rank skips together; it is computed
    once and the clipping reuses it."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():  # found inf/nan (fp16 loss scaling)
        return False, None
    grad_norm = optimizer.get_grad_norm()
    if not math.isfinite(grad_norm):
        return False, grad_norm
    if optimizer.config.clip_grad > 0:
        clip_grad_by_total_norm_fp32(optimizer.get_parameters(), optimizer.config.clip_grad, grad_norm)
    return bool(optimizer.step_with_ready_grads()), grad_norm


def _mean_token_loss(reports: list[dict]) -> Optional[float]:
    """Summed loss / token count over the micro-batches and the data-parallel ranks."""
    from megatron.core import parallel_state

    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    total = torch.stack([r["lm loss"] for r in reports]).sum(0)
    torch.distributed.all_reduce(total, group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    return (total[0] / total[1]).item()


@torch.no_grad()
def evaluate_loss(chunks: list, micro_batches: list[dict]) -> Optional[float]:
    """The mean per-token loss of the micro-batches without a backward pass (validation)."""
    return _mean_token_loss(run_schedule(lm_forward_step, chunks, micro_batches, forward_only=True))


class LanguageModeling:
    """The next-token objective (pre-training, mid-training, SFT) for the training loop."""

    @staticmethod
    def train_step(ddp_chunks: list, optimizer, micro_batches: list[dict]) -> dict:
        return train_step(ddp_chunks, optimizer, micro_batches)

    @staticmethod
    def evaluate(chunks: list, micro_batches: list[dict]):
        loss = evaluate_loss(chunks, micro_batches)
        return None if loss is None else {"loss": loss}

    @staticmethod
    def describe(result: dict) -> str:
        return ""


def _logits_step(data_iterator, model):
    batch = next(data_iterator)
    output = model(batch["tokens"], batch["position_ids"], None)

    def gather(logits, non_loss_data=True):
        from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

        return gather_from_tensor_model_parallel_region(logits).detach()

    return output, gather


@torch.no_grad()
def forward_logits(chunks: list, micro_batches: list[dict]) -> Optional[torch.Tensor]:
    """Full-vocabulary logits [batch, seq, padded_vocab] of the given micro-batches, on the last
    pipeline stage (None elsewhere), gathered across tensor-parallel ranks."""
    from megatron.core import parallel_state

    outputs = run_schedule(_logits_step, chunks, micro_batches, forward_only=True, collect_non_loss_data=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat(list(outputs), dim=0)


def logits_of_tokens(chunks: list, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """`forward_logits` of one [batch, seq] batch of token ids at positions 0..seq-1."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand(tokens.shape[0], -1)
    return forward_logits(chunks, [dict(tokens=tokens, position_ids=positions)])


def micro_batches_from_tokens(tokens: torch.Tensor, micro_batch_size: int) -> list[dict]:
    """Split [n, seq+1] token rows into next-token micro-batches (loss on every position)."""
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    seq = inputs.shape[1]
    positions = torch.arange(seq).unsqueeze(0)
    batches = []
    for start in range(0, inputs.shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        n = inputs[rows].shape[0]
        batches.append(
            dict(
                tokens=inputs[rows],
                labels=labels[rows],
                loss_mask=torch.ones(n, seq),
                position_ids=positions.expand(n, -1),
            )
        )
    return batches


def data_parallel_slice(rows: torch.Tensor) -> torch.Tensor:
    """This data-parallel rank's contiguous share of a global batch."""
    from megatron.core import parallel_state

    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    if rows.shape[0] % dp:
        raise ValueError(f"global batch of {rows.shape[0]} rows does not split over {dp} data-parallel ranks")
    per = rows.shape[0] // dp
    return rows[rank * per : (rank + 1) * per]


