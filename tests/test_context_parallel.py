"""Context parallelism's share of each micro-batch (phi4.model.context_parallel), on 4 gloo ranks.

Plain rows go through Megatron-Core's own `get_batch_on_this_cp_rank`; packed (THD) rows are first
padded per conversation to the layout's multiple (phi4.data.chat) and then cut per conversation.
Both are checked against the definition of the load-balanced split (rank r holds chunks r and
2cp-1-r of 2 x cp), the THD cut against Megatron-Core's split applied to each conversation alone,
and a token-local loss and the token count summed over the CP ranks against the unsplit batch's
(float64: equal to 1e-9). On a GPU the THD cut is also compared with Transformer Engine's own
`thd_get_partitioned_indices`.
"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from helpers import TopologyConfig
from multirank import run_ranks
from phi4.errors import ConfigError

SEQ = 64
ALIGN = 8  # room for the largest multiple below: 2 x cp=2 x tp=2
LAYOUTS = [dict(cp=2), dict(cp=4), dict(cp=2, tp=2, sp=True)]


def _conversations() -> list:
    chats = []
    for k in range(1, 15):
        chats.append([{"role": "user", "content": f"Count to {k}."},
                      {"role": "assistant", "content": " ".join(str(i) for i in range(1, k + 1))}])
    return chats


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from phi4.data.chat import pack_chat

    root = tmp_path_factory.mktemp("cp")
    path = root / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in _conversations()))
    report = pack_chat([path], root / "aligned", SEQ, align=ALIGN)
    plain = pack_chat([path], root / "plain", SEQ)
    return root, report, plain


def token_loss(batch: dict) -> tuple[float, float]:
    """(sum of a per-token function of token, label and position over the loss mask, token count):
    any misalignment of the four tensors changes it."""
    value = torch.sin(batch["tokens"].double() * 0.37 + batch["labels"].double() * 0.11
                      + batch["position_ids"].double() * 0.05)
    mask = batch["loss_mask"].double()
    return float((value * mask).sum()), float(mask.sum())


def expected_positions(length: int, cp: int, rank: int) -> list[int]:
    """The definition: of 2 x cp equal chunks, rank r holds chunk r, then chunk 2cp-1-r."""
    chunk = length // (2 * cp)
    return [*range(rank * chunk, (rank + 1) * chunk), *range((2 * cp - 1 - rank) * chunk, (2 * cp - rank) * chunk)]


def _cp_shares(samples: list) -> list:
    from megatron.core import parallel_state
    from megatron.core.utils import get_batch_on_this_cp_rank

    from phi4.data.formats import Collate
    from phi4.data.registry import FORMATS
    from phi4.model.context_parallel import on_this_cp_rank
    from phi4.model.validate import thd_sequence_multiple
    from phi4.runtime.distributed import init_distributed, set_parallel_layout

    init_distributed(TopologyConfig(cp=2))
    fmt = FORMATS["packed_chat"]
    checked = []
    for values in LAYOUTS:
        topology = TopologyConfig(**values)
        set_parallel_layout(topology)
        cp, rank = parallel_state.get_context_parallel_world_size(), parallel_state.get_context_parallel_rank()
        group = parallel_state.get_context_parallel_group()

        def summed(batch):
            total = torch.tensor(token_loss(batch), dtype=torch.float64)
            torch.distributed.all_reduce(total, group=group)
            return total.tolist()

        # Plain [batch, seq] rows (pre-training): Megatron-Core's split, by the definition.
        g = torch.Generator().manual_seed(3)
        rows = dict(tokens=torch.randint(0, 1000, (2, SEQ), generator=g), labels=torch.randint(0, 1000, (2, SEQ), generator=g),
                    loss_mask=(torch.rand(2, SEQ, generator=g) > 0.3).float(),
                    position_ids=torch.arange(SEQ).expand(2, -1).clone())
        share = on_this_cp_rank(dict(rows))
        assert share["tokens"].shape == (2, SEQ // cp)
        assert share["position_ids"][0].tolist() == expected_positions(SEQ, cp, rank)
        whole = token_loss(rows)
        assert abs(summed(share)[0] - whole[0]) < 1e-9 and summed(share)[1] == whole[1]

        # Packed rows (SFT on te): padded per conversation, then cut per conversation.
        multiple = thd_sequence_multiple(topology)
        unsplit = Collate(fmt, 2, "thd")(samples)  # cp=1's THD micro-batches: no padding
        padded = Collate(fmt, 2, "thd", multiple)(samples)
        pairs = [samples[i : i + 2] for i in range(0, len(samples), 2)]
        for pair, reference, batch in zip(pairs, unsplit, padded):
            params = batch["packed_seq_params"]
            actual = (params.cu_seqlens_q[1:] - params.cu_seqlens_q[:-1]).tolist()
            room = (params.cu_seqlens_q_padded[1:] - params.cu_seqlens_q_padded[:-1]).tolist()
            assert all(n % multiple == 0 for n in room) and int(params.cu_seqlens_q_padded[-1]) == 2 * SEQ
            # each conversation keeps its length and gets the room of the next multiple; the row's
            # trailing padding takes what is left
            expected_actual, expected_room = [], []
            for s in pair:
                convs = s["segments"][: s["conversations"]]
                rest = SEQ - sum(-(-n // multiple) * multiple for n in convs)
                expected_actual += convs + [rest] * (rest > 0)
                expected_room += [-(-n // multiple) * multiple for n in convs] + [rest] * (rest > 0)
            assert (actual, room) == (expected_actual, expected_room)
            share = on_this_cp_rank(batch)
            assert share["tokens"].shape == (1, 2 * SEQ // cp)
            # Megatron-Core's split of each (padded) conversation alone, laid end to end.
            pieces, start = [], 0
            for n in room:
                alone = {k: batch[k][:, start : start + n].clone() for k in ("tokens", "labels", "loss_mask", "position_ids")}
                pieces.append(get_batch_on_this_cp_rank(alone, is_hybrid_cp=False, cp_group=group))
                start += n
            for k in ("tokens", "labels", "loss_mask", "position_ids"):
                assert torch.equal(share[k], torch.cat([p[k] for p in pieces], dim=1)), k
            # The loss and its token count over the CP ranks are the unpadded, unsplit batch's.
            whole = token_loss(reference)
            total = summed(share)
            assert abs(total[0] - whole[0]) < 1e-9 and total[1] == whole[1] > 0
        checked.append((values, multiple, len(padded)))
    return checked


def test_each_context_parallel_rank_gets_its_share_and_the_loss_is_the_unsplit_one(packed):
    from phi4.data.chat import PackedChatDataset

    root, report, _ = packed
    data = PackedChatDataset(root / "aligned", SEQ)
    samples = [data[i] for i in range(4)]
    assert any(s["conversations"] >= 2 for s in samples)
    results = run_ranks(_cp_shares, 4, samples)
    assert [r[1] for r in results[0]] == [4, 8, 8]  # 2 x cp, 2 x cp, 2 x cp x tp (sp)


def test_aligned_packing_leaves_room_for_every_conversation(packed):
    from phi4.data.chat import PackedChatDataset, aligned

    root, report, plain = packed
    assert report.align == ALIGN and json.loads((root / "aligned.json").read_text())["align"] == ALIGN
    assert report.conversations == plain.conversations and report.packs >= plain.packs
    data = PackedChatDataset(root / "aligned", SEQ)
    for i in range(len(data)):
        row = data[i]
        conversations = row["segments"][: row["conversations"]]
        assert sum(aligned(n, ALIGN) for n in conversations) <= SEQ


def test_packed_data_without_room_is_refused_naming_the_source_and_the_repack(packed):
    from phi4.data.registry import FORMATS

    root, _, _ = packed
    source = SimpleNamespace(name="sft", path=str(root / "plain"))
    with pytest.raises(ConfigError, match=r"data.sources.sft: .*plain was packed with --align 1, but topology.cp=4 .* "
                                          r"multiple of 16; repack it with `phi4-data chat .*--align 16`"):
        FORMATS["packed_chat"].check_packing([source], 16, "topology.cp=4 (tp=2, sp=true)")
    FORMATS["packed_chat"].check_packing([SimpleNamespace(name="sft", path=str(root / "aligned"))], 8, "cp=2")


def test_a_sequence_that_does_not_cut_into_the_layouts_chunks_is_refused():
    from phi4.model.validate import check_sequence_length

    midtrain = TopologyConfig(tp=2, cp=4, sp=True)
    check_sequence_length(16384, midtrain)
    with pytest.raises(ConfigError, match=r"train.seq_length=16380 is not a multiple of 2 x topology.cp=4 x "
                                          r"topology.tp=2 \(topology.sp=true\) = 16.*e.g. 16368 or 16384"):
        check_sequence_length(16380, midtrain)
    with pytest.raises(ConfigError, match=r"seq_length=4098 is not a multiple of 2 x topology.cp=2 = 4"):
        check_sequence_length(4098, TopologyConfig(cp=2))


def test_thd_partition_refuses_lengths_it_cannot_cut():
    from phi4.model.context_parallel import thd_partition_index

    with pytest.raises(ValueError, match="not all multiples of 2 x cp = 4"):
        thd_partition_index(torch.tensor([0, 6, 12]), 12, 2, 0)
    with pytest.raises(ValueError, match="ends at 12, but the packed row has 16"):
        thd_partition_index(torch.tensor([0, 4, 12]), 16, 2, 0)


@pytest.mark.gpu
def test_thd_partition_is_transformer_engines():
    import transformer_engine_torch as tex

    from phi4.model.context_parallel import thd_partition_index

    g = torch.Generator().manual_seed(0)
    for cp in (2, 4):
        lengths = torch.randint(1, 9, (12,), generator=g) * 2 * cp
        cu = torch.cat([torch.zeros(1, dtype=torch.int32), lengths.cumsum(0).to(torch.int32)]).cuda()
        for rank in range(cp):
            ours = thd_partition_index(cu, int(cu[-1]), cp, rank)
            theirs = tex.thd_get_partitioned_indices(cu, int(cu[-1]), cp, rank)
            assert torch.equal(ours.cpu(), theirs.long().cpu()), (cp, rank)
