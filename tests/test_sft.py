"""SFT data: the loss falls on exactly the assistant tokens, and packed conversations do not see
each other (a packed row computes the same logits as each conversation alone, fp32, 1e-5)."""

from __future__ import annotations

import json

import pytest
import torch

from helpers import FP32, TopologyConfig, tiny_model
from multirank import run_ranks
from phi4.errors import ConfigError

CHATS = [
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2 + 3?"},
     {"role": "assistant", "content": "2 + 3 = 5.\nAnswer: 5"}, {"role": "user", "content": "And 4 + 4?"},
     {"role": "assistant", "content": "Answer: 8"}],
    [{"role": "user", "content": "Say <|im_end|> please"}, {"role": "assistant", "content": "No."}],
    [{"role": "user", "content": "Name a prime."}, {"role": "assistant", "content": "Seven is prime."}],
]


def assistant_spans(messages):
    """Independent of phi4.data.chat: token spans of each assistant reply (content and
    <|im_end|>), found by tokenizing the rendered prefix before and after it."""
    from phi4.data.tokenizer import get_tokenizer, render_chat

    tok = get_tokenizer()
    spans = []
    for i, m in enumerate(messages):
        if m["role"] == "assistant":
            start = len(tok.encode(render_chat(messages[:i]) + "<|im_start|>assistant<|im_sep|>"))
            spans.append((start, len(tok.encode(render_chat(messages[: i + 1])))))
    return tok.encode(render_chat(messages)), spans


def test_loss_mask_is_exactly_the_assistant_replies():
    from phi4.data.chat import tokenize_conversation

    ids, mask = tokenize_conversation(CHATS[0])
    reference, spans = assistant_spans(CHATS[0])
    assert ids == reference
    expected = [0] * len(ids)
    for start, end in spans:
        expected[start:end] = [1] * (end - start)
    assert mask == expected and sum(mask) > 0
    # A special-token string inside content stays text: it cannot end the turn.
    ids, _ = tokenize_conversation(CHATS[1])
    assert ids.count(100265) == 2  # one <|im_end|> per message, none from the content


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    from phi4.data.chat import pack_chat

    root = tmp_path_factory.mktemp("sft")
    path = root / "chats.jsonl"
    lines = [json.dumps({"messages": m}) for m in CHATS]
    lines += ["not json", json.dumps({"messages": [{"role": "user", "content": "hi"}]}),
              json.dumps({"messages": [{"role": "user", "content": "long " * 300}, {"role": "assistant", "content": "x"}]})]
    path.write_text("\n".join(lines) + "\n")
    report = pack_chat([path], root / "sft", seq_length=64)
    return root, report


def test_packing_rows_labels_and_reports(packed):
    from phi4.data.chat import PackedChatDataset

    root, report = packed
    assert report.conversations == 3 and len(report.bad_lines) == 3
    assert [line.split(": ", 1)[0].rsplit(":", 1)[1] for line in report.bad_lines] == ["4", "5", "6"]
    assert "longer than a row" in report.bad_lines[2]
    data = PackedChatDataset(root / "sft", 64)
    rows = [data[i] for i in range(len(data))]
    # Conversations in order, none split, next fit into rows of 65: each row's segments are its
    # conversations, then its padding, less the one token the inputs drop.
    from phi4.data.tokenizer import get_tokenizer

    convs = [assistant_spans(m) for m in CHATS]
    lengths = [len(ids) for ids, _ in convs]
    content, tok = CHATS[1][0]["content"], get_tokenizer()  # its special-token string stays text
    lengths[1] += len(tok.encode(content, allow_special=False)) - len(tok.encode(content))
    packs = [[]]
    for n in lengths:
        if packs[-1] and sum(packs[-1]) + n > 65:
            packs.append([])
        packs[-1].append(n)
    expected = [[*p, 65 - sum(p)] for p in packs]
    for segs in expected:
        if segs[-1] == 0:
            segs.pop()
        segs[-1] -= 1
    assert len(packs) >= 2 and max(map(len, packs)) >= 2  # the case packs and also opens a new row
    assert [r["segments"] for r in rows] == [[n for n in segs if n] for segs in expected]
    # Every label that carries loss is an assistant token, and every assistant token is one.
    learnt = [int(t) for r in rows for t, m in zip(r["labels"], r["loss_mask"]) if m]
    expected = [ids[j] for ids, spans in convs for s, e in spans for j in range(s, e)]
    assert learnt == expected
    for r in rows:  # positions restart at each conversation
        starts = torch.tensor([0] + r["segments"][:-1]).cumsum(0)
        assert all(int(r["position_ids"][s]) == 0 for s in starts)
    with pytest.raises(ConfigError, match="packed for seq_length 64"):
        PackedChatDataset(root / "sft", 128)


def _packed_vs_alone(row: dict, segments: list[int]) -> dict:
    from phi4.data.chat import block_causal_mask
    from phi4.model.build import build_phi4_model, unwrap
    from phi4.model.parallel import init_model_parallel

    model = tiny_model(vocab_size=100352, num_layers=2)
    topology = TopologyConfig()
    init_model_parallel(model, topology, FP32)
    net = unwrap(build_phi4_model(model, topology, FP32)[0]).eval()
    tokens, positions = row["tokens"][None], row["position_ids"][None]
    with torch.no_grad():
        packed = net(tokens, positions, block_causal_mask([segments], tokens.shape[1]))
        unmasked = net(tokens, positions, None)  # plain causal: conversations see each other
        alone, start = [], 0
        for n in segments:
            piece = slice(start, start + n)
            alone.append(net(tokens[:, piece], torch.arange(n)[None], None))
            start += n
    return dict(packed=packed[0], unmasked=unmasked[0], alone=torch.cat(alone, dim=1)[0])


def test_packed_conversations_do_not_attend_to_each_other(packed):
    from phi4.data.chat import PackedChatDataset

    root, _ = packed
    row = next(r for r in PackedChatDataset(root / "sft", 64) if len(r["segments"]) >= 3)  # 2 chats + padding
    out = run_ranks(_packed_vs_alone, 1, row, row["segments"])[0]
    assert (out["packed"] - out["alone"]).abs().max() < 1e-5
    second = slice(row["segments"][0], row["segments"][0] + row["segments"][1])
    assert (out["unmasked"][second] - out["alone"][second]).abs().max() > 1e-3  # the mask matters


def _thd_vs_alone(row: dict, segments: list[int]) -> dict:
    import dataclasses

    from phi4.data.formats import Collate
    from phi4.data.registry import FORMATS
    from phi4.runtime import device
    from phi4.model.build import build_phi4_model, unwrap
    from phi4.model.parallel import init_model_parallel

    model = dataclasses.replace(tiny_model(vocab_size=100352, num_layers=2), transformer_impl="te")
    topology = TopologyConfig()
    init_model_parallel(model, topology, FP32)
    net = unwrap(build_phi4_model(model, topology, FP32)[0]).eval()
    batch = device.current().move(Collate(FORMATS["packed_chat"], 1, "thd")([row])[0])
    with torch.no_grad():
        packed = net(batch["tokens"].cuda(), batch["position_ids"].cuda(), None,
                     packed_seq_params=batch["packed_seq_params"])
        alone, start = [], 0
        for n in segments:
            piece = row["tokens"][start:start + n][None].cuda()
            alone.append(net(piece, torch.arange(n)[None].cuda(), None))
            start += n
    return dict(packed=packed[0].cpu(), alone=torch.cat(alone, dim=1)[0].cpu())


@pytest.mark.gpu
def test_thd_packing_on_transformer_engine(packed):
    """The te backend keeps packed conversations apart through THD cu_seqlens."""
    from phi4.data.chat import PackedChatDataset

    root, _ = packed
    row = next(r for r in PackedChatDataset(root / "sft", 64) if len(r["segments"]) >= 3)
    out = run_ranks(_thd_vs_alone, 1, row, row["segments"], timeout=600)[0]
    assert (out["packed"] - out["alone"]).abs().max() < 1e-3
