"""The local spec computes Hugging Face's Phi3ForCausalLM: same weights in, same logits out.

A random tiny Phi3 (grouped-query attention with 4 query heads per group, RoPE base 250000 as
after Phi-4's mid-training, a vocabulary that needs padding) is the reference; its weights go
through the converter's mapping into the Megatron-Core model at TP=1 and at TP=2 (one 2-rank
launch). fp32 on the CPU, tolerance 1e-4 on logits of order 1, and on the next-token loss and
DPO's sequence log-probabilities, which exclude the padded vocabulary rows at every layout.
"""

from __future__ import annotations

import pytest
import torch

from helpers import FP32, TopologyConfig, phi3_reference, random_hf_weights, tiny_model
from multirank import run_ranks

TOL = 1e-4
MODEL = dict(vocab_size=1000, num_layers=2, rope_base=250000.0, max_position_embeddings=64)
RESPONSE_FROM = 30  # DPO's log-probability sums the labels from this position on


def response_mask(tokens: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros(tokens.shape[0], tokens.shape[1] - 1)
    mask[:, RESPONSE_FROM:] = 1.0
    return mask


def megatron_logits(weights: dict, tokens: torch.Tensor) -> dict:
    from megatron.core import parallel_state

    from phi4.model.build import build_phi4_model
    from phi4.model.hf_weights import load_hf_weights
    from phi4.posttrain.dpo import attach_reference_logps
    from phi4.model.parallel import init_model_parallel
    from phi4.runtime.distributed import set_parallel_layout
    from phi4.model.pipeline_schedule import logits_of_tokens, micro_batches_from_tokens
    from phi4.train.lm import evaluate_loss

    model = tiny_model(**MODEL)
    out = {}
    for i, (name, topology) in enumerate({"tp1": TopologyConfig(tp=1), "tp2": TopologyConfig(tp=2)}.items()):
        if i == 0:
            init_model_parallel(model, topology, FP32)
        else:
            set_parallel_layout(topology)
        chunks = build_phi4_model(model, topology, FP32)
        load_hf_weights(chunks, weights, model)
        logits = logits_of_tokens(chunks, tokens)
        batches = micro_batches_from_tokens(tokens, tokens.shape[0])
        loss = evaluate_loss(chunks, batches)
        logps = attach_reference_logps(chunks, [{**batches[0], "loss_mask": response_mask(tokens)}])[0]["ref_logps"]
        out[name] = dict(logits=logits, loss=loss, logps=logps, padded_vocab=model.padded_vocab_size(topology.tp),
                         tp_size=parallel_state.get_tensor_model_parallel_world_size(),
                         checkpoint_keys=sorted({getattr(v, "key", k) for k, v in chunks[0].sharded_state_dict().items()}))
    return out


@pytest.fixture(scope="module")
def reference():
    model = tiny_model(**MODEL)
    hf = phi3_reference(model)
    assert hf.config.num_attention_heads // hf.config.num_key_value_heads == 4
    weights = random_hf_weights(model, seed=3)
    hf.load_state_dict(weights, strict=True)
    tokens = torch.randint(0, model.vocab_size, (2, 48), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        hf_logits = hf(input_ids=tokens).logits
    return weights, tokens, hf_logits


def hf_token_logps(hf_logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(next token) [batch, seq-1] from the reference's own (unpadded) softmax."""
    logp = torch.log_softmax(hf_logits[:, :-1].double(), dim=-1)
    return logp.gather(-1, tokens[:, 1:].unsqueeze(-1)).squeeze(-1)


@pytest.fixture(scope="module")
def megatron(reference):
    weights, tokens, _ = reference
    return run_ranks(megatron_logits, 2, weights, tokens)


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_local_spec_matches_transformers(reference, megatron, layout):
    _, _, hf_logits = reference
    assert hf_logits.abs().max() > 1.0, "reference logits too small for a meaningful comparison"
    for rank, result in enumerate(megatron):
        got = result[layout]
        assert got["logits"].shape == (*hf_logits.shape[:2], got["padded_vocab"])
        diff = (got["logits"][..., : hf_logits.shape[-1]] - hf_logits).abs().max().item()
        print(f"{layout} rank {rank}: max |logit| {hf_logits.abs().max():.3f}, max diff {diff:.2e}")
        assert diff <= TOL


@pytest.mark.parametrize("layout", ["tp1", "tp2"])
def test_padded_vocabulary_takes_no_probability(reference, megatron, layout):
    """The loss and DPO's log-probabilities equal the reference's, whose softmax has only the real
    1000 rows, at both layouts (1000 is padded to 1024). Zero padded rows with logit 0 would add
    24 terms to every softmax: about 0.01 nats per token here."""
    _, tokens, hf_logits = reference
    token_logps = hf_token_logps(hf_logits, tokens)
    want_loss = -token_logps.mean().item()
    want_logps = (token_logps * response_mask(tokens).double()).sum(dim=1)
    for result in megatron:
        got = result[layout]
        assert got["padded_vocab"] > hf_logits.shape[-1]
        assert torch.isneginf(got["logits"][..., hf_logits.shape[-1]:]).all()
        print(f"{layout}: loss {got['loss']:.6f} vs {want_loss:.6f}; logps {got['logps'].tolist()} vs {want_logps.tolist()}")
        assert abs(got["loss"] - want_loss) <= TOL
        assert (got["logps"].double() - want_logps).abs().max().item() <= TOL * (tokens.shape[1] - RESPONSE_FROM)


def test_mapping_is_not_a_plain_copy(reference):
    """The regrouped qkv differs from HF's fused tensor, and the inverse restores it exactly."""
    from phi4.model.hf_weights import hf_qkv_to_mcore, mcore_qkv_to_hf

    model = tiny_model(**MODEL)
    weights, _, _ = reference
    qkv = weights["model.layers.0.self_attn.qkv_proj.weight"]
    regrouped = hf_qkv_to_mcore(qkv, model)
    assert not torch.equal(regrouped, qkv)
    assert torch.equal(mcore_qkv_to_hf(regrouped, model), qkv)


def test_local_checkpoint_keys_are_the_te_names(megatron):
    """The local spec saves its norms under the TE spec's fused names, so checkpoints written on
    GPUs (te) load on the CPU (local) and back."""
    keys = megatron[0]["tp2"]["checkpoint_keys"]
    assert "decoder.layers.self_attention.linear_qkv.layer_norm_weight" in keys
    assert "decoder.layers.mlp.linear_fc1.layer_norm_weight" in keys
    assert not [k for k in keys if "input_layernorm" in k or "pre_mlp_layernorm" in k]
