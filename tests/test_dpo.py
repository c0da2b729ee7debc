"""DPO: the loss, rewards and accuracy equal an independent computation from the same
log-probabilities, by hand and through the model; preference JSONL in its three forms."""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import FP32, TopologyConfig, tiny_model
from multirank import run_ranks
from phi4.errors import ConfigError

BETA = 0.25


def by_hand(pi_c, pi_r, ref_c, ref_r, beta):
    margin = beta * ((pi_c - ref_c) - (pi_r - ref_r))
    return dict(loss=math.log1p(math.exp(-margin)), reward_accuracy=1.0 if margin > 0 else 0.0,
                reward_margin=margin, chosen_reward=beta * (pi_c - ref_c), rejected_reward=beta * (pi_r - ref_r))


def test_dpo_terms_on_hand_made_log_probabilities():
    from phi4.posttrain.dpo import dpo_terms

    cases = [(-3.0, -5.0, -4.0, -4.0), (-10.0, -2.0, -9.0, -2.5), (-1.0, -1.0, -1.0, -1.0)]
    t = lambda i: torch.tensor([c[i] for c in cases], dtype=torch.float64)  # noqa: E731
    terms = dpo_terms(t(0), t(1), t(2), t(3), BETA)
    for k, case in enumerate(cases):
        expected = by_hand(*case, BETA)
        for name, value in expected.items():
            assert terms[name][k].item() == pytest.approx(value, abs=1e-12), name


def _dpo_through_the_model(rows: dict) -> dict:
    from phi4.model.build import build_phi4_model
    from phi4.posttrain.dpo import evaluate_preferences, freeze
    from phi4.model.parallel import init_model_parallel
    from phi4.runtime.distributed import seed_all
    from phi4.model.pipeline_schedule import logits_of_tokens

    model = tiny_model(vocab_size=1024, num_layers=2)  # no padded rows: both sides see the same softmax
    topology = TopologyConfig()
    init_model_parallel(model, topology, FP32)
    policy = build_phi4_model(model, topology, FP32)
    seed_all(7)
    reference = build_phi4_model(model, topology, FP32)
    report = evaluate_preferences(freeze(reference), BETA, policy, [rows])

    def logps(chunks):  # independent: log-softmax of full logits, gathered at the labels
        logits = logits_of_tokens(chunks, rows["tokens"])[..., : model.vocab_size].double()
        token_logp = logits.log_softmax(-1).gather(-1, rows["labels"][..., None])[..., 0]
        return (token_logp * rows["loss_mask"].double()).sum(1)

    return dict(report=report, policy=logps(policy), reference=logps(reference))


def test_dpo_step_equals_independent_computation():
    g = torch.Generator().manual_seed(0)
    k, seq = 3, 12
    tokens = torch.randint(0, 1024, (2 * k, seq + 1), generator=g)
    mask = torch.zeros(2 * k, seq)
    for row, start in enumerate([5, 7, 3, 5, 9, 2]):  # response tokens from `start` on
        mask[row, start:] = 1
    rows = dict(tokens=tokens[:, :-1], labels=tokens[:, 1:], loss_mask=mask,
                position_ids=torch.arange(seq).expand(2 * k, -1))
    out = run_ranks(_dpo_through_the_model, 1, rows)[0]
    pi, ref = out["policy"].tolist(), out["reference"].tolist()
    expected = [by_hand(pi[i], pi[k + i], ref[i], ref[k + i], BETA) for i in range(k)]
    assert all(abs(e["reward_margin"]) > 1e-3 for e in expected)  # two different models: margins are not ties
    for name in ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward"):
        mean = sum(e[name] for e in expected) / k
        assert out["report"][name] == pytest.approx(mean, abs=1e-4), name
    assert out["report"]["chosen_logp"] == pytest.approx(sum(pi[:k]) / k, abs=1e-3)


def test_preference_forms_and_bad_lines(tmp_path):
    from phi4.data.preference import PreferenceDataset, read_pairs

    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in [
        {"prompt_ids": [1, 2, 3], "chosen_ids": [4], "rejected_ids": [5]},
        {"prompt": "What is 2 + 2?", "chosen": "4", "rejected": "5"},
        {"prompt": [{"role": "user", "content": "Hi"}], "responses": [{"text": "a", "score": 1}, {"text": "b", "score": 7}]},
    ]) + "\n")
    pairs = read_pairs(path)
    assert pairs[2]["chosen"] == "b" and pairs[2]["rejected"] == "a"
    data = PreferenceDataset(path, 16)
    first = data[0]
    assert first["chosen"]["tokens"][:3].tolist() == [1, 2, 3]
    assert first["chosen"]["labels"][2].item() == 4 and first["rejected"]["labels"][2].item() == 5
    assert first["chosen"]["loss_mask"].tolist() == [0, 0, 1] + [0] * 13  # only the response token
    for row in (data[1]["chosen"], data[2]["rejected"]):  # the response and its <|im_end|>
        learnt = row["labels"][row["loss_mask"] > 0].tolist()
        assert learnt[-1] == 100265 and len(learnt) >= 2
    path.write_text(json.dumps({"prompt": "x", "chosen": "y"}) + "\n")
    with pytest.raises(ConfigError, match=r"pairs.jsonl:1: not a preference pair"):
        read_pairs(path)
    path.write_text(json.dumps({"prompt": "x", "responses": [{"text": "a", "score": 1}, {"text": "b", "score": 1}]}) + "\n")
    with pytest.raises(ConfigError, match="same score"):
        read_pairs(path)
