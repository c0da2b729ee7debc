"""PTS's sampler over a Megatron-Core model: the KV-cached rollouts equal sampling with a full
forward at every step (greedy: the same tokens; sampled: the same first draws from one seed),
and its log-probabilities equal a log-softmax of the full logits."""

from __future__ import annotations

import torch

from helpers import FP32, TopologyConfig, sample_tokens, tiny_model
from multirank import run_ranks


def _both_samplers() -> dict:
    from phi4.model.build import build_phi4_model
    from phi4.posttrain.generate import MegatronPolicy
    from phi4.model.parallel import init_model_parallel

    model = tiny_model(vocab_size=1024, num_layers=2)
    topology = TopologyConfig()
    init_model_parallel(model, topology, FP32)
    chunks = build_phi4_model(model, topology, FP32)
    for chunk in chunks:
        chunk.eval()
    prefix = [5, 17, 300, 41, 8]
    out = {}
    for temperature in (0.0, 1.0):
        cached = MegatronPolicy(chunks, 1024, eos_id=7, max_new_tokens=12, temperature=temperature, top_p=0.9,
                                generator=torch.Generator().manual_seed(3))
        out[f"cached_{temperature}"] = cached.sample(prefix, 6)
        with torch.no_grad():
            out[f"full_{temperature}"] = sample_tokens(cached.logits, prefix, 6, 12, temperature, 0.9, 7,
                                                       torch.Generator().manual_seed(3))
    policy = MegatronPolicy(chunks, 1024, eos_id=7, max_new_tokens=4)
    tokens = [9, 10, 11]
    out["logprobs"] = policy.token_logprobs(prefix, tokens)
    with torch.no_grad():
        logits = policy.logits(torch.tensor([prefix + tokens]))[0].double().log_softmax(-1)
    out["reference"] = [logits[len(prefix) - 1 + i, t].item() for i, t in enumerate(tokens)]
    return out


def test_kv_cache_sampling_matches_full_forward():
    out = run_ranks(_both_samplers, 1)[0]
    assert out["cached_0.0"] == out["full_0.0"]
    assert all(len(c) == 12 or c[-1] == 7 for c in out["cached_0.0"])
    assert [c[0] for c in out["cached_1.0"]] == [c[0] for c in out["full_1.0"]]
    assert len({tuple(c) for c in out["cached_1.0"]}) > 1  # sampling, not greedy
    assert max(abs(a - b) for a, b in zip(out["logprobs"], out["reference"])) < 1e-5
