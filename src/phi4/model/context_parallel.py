"""Context parallelism's share of each micro-batch: every CP rank feeds only its part of the sequence.

With `topology.cp > 1` Transformer Engine's ring attention treats each rank's tokens as two of the
sequence's `2 x cp` equal chunks, rank r holding chunks r and 2cp-1-r (the load-balanced split of a
causal sequence: early chunks attend to little, late ones to much), and GPTModel scales RoPE by cp.
So the batch must be cut the same way before the forward, as Megatron-LM's pretrain_gpt.py get_batch
does (`get_batch_on_this_cp_rank`):

- a plain [batch, seq] micro-batch: Megatron-Core's own `get_batch_on_this_cp_rank` on its
  sequence tensors;
- a packed THD micro-batch (SFT on the te backend): each conversation, padded to a multiple of
  2 x cp (phi4.data.chat), is cut into its own 2 x cp chunks, the partition Transformer Engine's
  `thd_get_partitioned_indices` computes (`thd_partition_index`, in torch so that it runs on the CPU
  too; tests/test_context_parallel.py checks it against both). The cu_seqlens stay those of the
  whole sequence, as TE expects.

The loss is then each rank's sum over its own tokens; phi4.train.lm reduces the sums and token
counts over the data- and context-parallel group, which gives the unsplit batch's mean.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state
from megatron.core.utils import get_batch_on_this_cp_rank

SEQUENCE_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def thd_partition_index(cu_seqlens_padded: torch.Tensor, total: int, cp: int, rank: int) -> torch.Tensor:
    """The positions of a packed [1, total] row that CP rank `rank` of `cp` holds: of each sequence
    [cu[i], cu[i+1]) (its length a multiple of 2 x cp), the chunks `rank` and `2cp - 1 - rank` of
    2 x cp, in that order, sequence after sequence."""
    cu = cu_seqlens_padded.to(torch.int64).reshape(-1)
    if int(cu[-1]) != total:
        raise ValueError(f"cu_seqlens_padded ends at {int(cu[-1])}, but the packed row has {total} tokens")
    lengths = cu[1:] - cu[:-1]
    if bool((lengths % (2 * cp)).any()):
        raise ValueError(f"packed sequence lengths {lengths.tolist()} are not all multiples of 2 x cp = {2 * cp}")
    chunk = lengths // (2 * cp)
    starts = torch.stack([cu[:-1] + rank * chunk, cu[:-1] + (2 * cp - 1 - rank) * chunk], dim=1).reshape(-1)
    runs = chunk.repeat_interleave(2)
    run_of = torch.repeat_interleave(torch.arange(len(runs), device=cu.device), runs)
    offset_in_run = torch.arange(len(run_of), device=cu.device) - (torch.cumsum(runs, 0) - runs)[run_of]
    return starts[run_of] + offset_in_run


def on_this_cp_rank(batch: dict) -> dict:
    """This context-parallel rank's share of a micro-batch (the batch itself when cp is 1)."""
    cp = parallel_state.get_context_parallel_world_size()
    if cp == 1:
        return batch
    params = batch.get("packed_seq_params")
    if params is None:
        sequence = {k: batch[k] for k in (*SEQUENCE_KEYS, "attention_mask") if batch.get(k) is not None}
        return {**batch, **get_batch_on_this_cp_rank(sequence, is_hybrid_cp=False,
                                                     cp_group=parallel_state.get_context_parallel_group())}
    if params.cu_seqlens_q_padded is None:
        raise ValueError("a packed (THD) micro-batch under context parallelism needs cu_seqlens_q_padded: "
                         "collate it with the layout's sequence multiple (phi4.data.chat.thd_packed)")
    index = thd_partition_index(params.cu_seqlens_q_padded, batch["tokens"].shape[1], cp,
                                parallel_state.get_context_parallel_rank())
    return {**batch, **{k: batch[k].index_select(1, index) for k in SEQUENCE_KEYS if batch.get(k) is not None}}
