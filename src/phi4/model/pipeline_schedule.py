"""Running the model over Megatron-Core's pipeline schedules: a forward step function over a list
of micro-batches (training or forward-only), and full-vocabulary logits of token batches. Shared
by training, evaluation and post-training, so it lives with the model.

A micro-batch is a dict of [micro_batch, seq] tensors (`tokens`, `position_ids`, and for a loss
`labels` and `loss_mask`); the data layer makes them on the CPU, and here they move to the device
and, under context parallelism, are cut to this rank's share (phi4.model.context_parallel).
"""

from __future__ import annotations

from typing import Optional

import torch
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from phi4.model.build import unwrap, without_fp8
from phi4.model.context_parallel import on_this_cp_rank
from phi4.model.tp_overlap import without_tp_comm_overlap
from phi4.runtime import device


def run_schedule(step_func, chunks: list, micro_batches: list[dict], forward_only: bool, **extra) -> list:
    """Megatron-Core's schedule for this layout (none, 1F1B or interleaved) over the micro-batches,
    moved to the device and cut to this context-parallel rank's share. Every virtual stage reads the
    same micro-batch sequence: the first uses the tokens, the last the labels."""
    on_device = device.current()
    micro_batches = [on_this_cp_rank(on_device.move(batch)) for batch in micro_batches]
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


def _gather(logits, non_loss_data=True):
    return gather_from_tensor_model_parallel_region(logits).detach()


def _logits_step(data_iterator, model):
    batch = next(data_iterator)
    return model(batch["tokens"], batch["position_ids"], None), _gather


@torch.no_grad()
def forward_logits(chunks: list, micro_batches: list[dict]) -> Optional[torch.Tensor]:
    """Full-vocabulary logits [batch, seq, padded_vocab] of the given micro-batches, on the last
    pipeline stage (None elsewhere), gathered across tensor-parallel ranks. Not under context
    parallelism, where each rank holds logits of its own chunks only (generation and verification
    run with topology.cp=1)."""
    if parallel_state.get_context_parallel_world_size() > 1:
        raise ValueError("full-sequence logits need topology.cp=1 (each context-parallel rank holds its own chunks)")
    outputs = run_schedule(_logits_step, chunks, micro_batches, forward_only=True, collect_non_loss_data=True)
    if not parallel_state.is_pipeline_last_stage(ignore_virtual=True):
        return None
    return torch.cat(list(outputs), dim=0)


def logits_of_tokens(chunks: list, tokens: torch.Tensor) -> Optional[torch.Tensor]:
    """`forward_logits` of one [batch, seq] batch of token ids at positions 0..seq-1, in the
    model's dtype with FP8 off (any token count: scoring, verification, PTS)."""
    positions = torch.arange(tokens.shape[1], device=tokens.device).unsqueeze(0).expand(tokens.shape[0], -1)
    with without_fp8(unwrap(chunks[0]).config), without_tp_comm_overlap(chunks):
        return forward_logits(chunks, [dict(tokens=tokens, position_ids=positions)])


def micro_batches_from_tokens(tokens: torch.Tensor, micro_batch_size: int) -> list[dict]:
    """Split [n, seq+1] token rows into next-token micro-batches (loss on every position)."""
    inputs, labels = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()
    seq = inputs.shape[1]
    positions = torch.arange(seq, device=tokens.device).unsqueeze(0)
    batches = []
    for start in range(0, inputs.shape[0], micro_batch_size):
        rows = slice(start, start + micro_batch_size)
        n = inputs[rows].shape[0]
        batches.append(dict(tokens=inputs[rows], labels=labels[rows], loss_mask=torch.ones(n, seq, device=tokens.device),
                            position_ids=positions.expand(n, -1)))
    return batches


def data_parallel_slice(rows: torch.Tensor) -> torch.Tensor:
    """This data-parallel rank's contiguous share of a global batch."""
    dp = parallel_state.get_data_parallel_world_size()
    rank = parallel_state.get_data_parallel_rank()
    if rows.shape[0] % dp:
        raise ValueError(f"global batch of {rows.shape[0]} rows does not split over {dp} data-parallel ranks")
    per = rows.shape[0] // dp
    return rows[rank * per : (rank + 1) * per]
