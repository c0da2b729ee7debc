"""Every parallel layout computes the same model: logits, and losses over 3 optimizer steps.

One single-process launch gives the reference (TP=1, PP=1, DP=1); one 2-rank launch runs, in
turn, TP=2, TP=2 with sequence parallelism, PP=2, PP=2 with 2 virtual stages, both with uneven
stages (topology.pp_layout), and DP=2. Each
layout starts from the same weights (HF layout, copied in by the converter's mapping), trains on
the same global batch with Megatron-Core DDP and the distributed optimizer in fp32, and reports
the logits before training and the loss before each of 3 optimizer steps and after the last.
Tolerance 1e-5: the layouts differ only in fp32 reduction order.
"""

from __future__ import annotations

import pytest
import torch

from helpers import FP32, TopologyConfig, random_hf_weights, tiny_model, token_rows
from multirank import run_ranks

TOL = 1e-5
# A small vocabulary that TP pads (1000 -> 1024): the layouts agree with the padded rows masked,
# and each step costs a fraction of the real vocabulary's (its embeddings are 97% of phi4_tiny).
MODEL = dict(vocab_size=1000)
GLOBAL_BATCH, SEQ, MICRO_BATCH, STEPS = 4, 32, 1, 3
LR = 1e-3

LAYOUTS = {
    "tp2": TopologyConfig(tp=2),
    "tp2_sp": TopologyConfig(tp=2, sp=True),
    "pp2": TopologyConfig(pp=2),
    "pp2_vp2": TopologyConfig(pp=2, vp=2),
    # uneven stages (Megatron-Core's pipeline_model_parallel_layout): 1 + 3 layers; and the
    # embedding in a virtual stage of its own
    "pp2_uneven": TopologyConfig(pp=2, pp_layout="Et|ttt,L"),
    "pp2_vp2_uneven": TopologyConfig(pp=2, vp=2, pp_layout="E|tt|t|t,L"),
    "dp2": TopologyConfig(),
}


def run_layouts(layouts: dict, weights: dict, tokens: torch.Tensor) -> dict:
    """On each rank: for every layout, build, load weights, take logits, train STEPS steps."""
    from megatron.core import parallel_state

    from phi4.model.build import build_phi4_model, transformer_config
    from phi4.model.hf_weights import load_hf_weights
    from phi4.model.parallel import init_model_parallel
    from phi4.runtime.distributed import set_parallel_layout, seed_all
    from helpers import optim_settings
    from phi4.model.pipeline_schedule import data_parallel_slice, forward_logits, micro_batches_from_tokens
    from phi4.train.lm import evaluate_loss, lm_update
    from phi4.train.optimizer import build_optimizer, wrap_ddp

    model = tiny_model(**MODEL)
    results = {}
    for i, (name, topology) in enumerate(layouts.items()):
        if i == 0:
            init_model_parallel(model, topology, FP32, seed=1234)
        else:
            set_parallel_layout(topology)
            seed_all(1234)
        config = transformer_config(model, topology, FP32)
        chunks = build_phi4_model(model, topology, FP32, config=config)
        load_hf_weights(chunks, weights, model)
        batches = micro_batches_from_tokens(data_parallel_slice(tokens), MICRO_BATCH)

        logits = forward_logits(chunks, batches)
        ddp = wrap_ddp(chunks, config)
        optimizer = build_optimizer(ddp, config, optim_settings(lr=LR, weight_decay=0.0))
        steps = [lm_update(ddp, optimizer, batches) for _ in range(STEPS)]
        final = evaluate_loss(ddp, batches)

        reports = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
        results[name] = dict(
            reports=reports,
            dp_rank=parallel_state.get_data_parallel_rank(),
            dp_size=parallel_state.get_data_parallel_world_size(),
            logits=logits[..., : model.vocab_size].clone() if reports else None,
            losses=[s.loss for s in steps] + [final],
            grad_norms=[float(s.grad_norm) for s in steps],
            updated=all(s.update_successful for s in steps),
            pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
            layer_numbers=[[layer.layer_number - 1 for layer in chunk.decoder.layers] for chunk in chunks],
        )
    return results


def _gather(per_rank: list[dict], name: str) -> dict:
    """The layout's full-batch logits (DP slices in order) and its losses, from the reporting ranks."""
    reporters = sorted((r[name] for r in per_rank if r[name]["reports"]), key=lambda r: r["dp_rank"])
    assert len(reporters) == reporters[0]["dp_size"], f"{name}: one report per data-parallel rank expected"
    for r in reporters[1:]:  # every DP rank saw the same global loss
        assert r["losses"] == reporters[0]["losses"]
    return dict(
        layer_numbers={r[name]["pp_rank"]: r[name]["layer_numbers"] for r in per_rank},
        logits=torch.cat([r["logits"] for r in reporters]),
        losses=torch.tensor(reporters[0]["losses"], dtype=torch.float64),
        grad_norms=torch.tensor(reporters[0]["grad_norms"], dtype=torch.float64),
        updated=all(r["updated"] for r in reporters),
    )


@pytest.fixture(scope="module")
def layouts():
    model = tiny_model(**MODEL)
    weights = random_hf_weights(model, seed=0)
    tokens = token_rows(model, GLOBAL_BATCH, SEQ, seed=1)
    reference = run_ranks(run_layouts, 1, {"tp1_pp1_dp1": TopologyConfig()}, weights, tokens)
    parallel = run_ranks(run_layouts, 2, LAYOUTS, weights, tokens)
    out = {"tp1_pp1_dp1": _gather(reference, "tp1_pp1_dp1")}
    out.update({name: _gather(parallel, name) for name in LAYOUTS})
    return out


PAIRS = [
    ("tp1_pp1_dp1", "tp2"),
    ("tp2", "tp2_sp"),
    ("tp1_pp1_dp1", "pp2"),
    ("pp2", "pp2_vp2"),
    ("pp2", "pp2_uneven"),
    ("pp2_vp2", "pp2_vp2_uneven"),
    ("tp1_pp1_dp1", "dp2"),
]


@pytest.mark.parametrize("a,b", PAIRS, ids=[f"{a}-vs-{b}" for a, b in PAIRS])
def test_same_logits_and_losses(layouts, a, b):
    x, y = layouts[a], layouts[b]
    print(f"{a} vs {b}: max |logit| {x['logits'].abs().max():.3f}, max logit diff "
          f"{(x['logits'] - y['logits']).abs().max():.2e}, max loss diff {(x['losses'] - y['losses']).abs().max():.2e}")
    assert x["logits"].shape == y["logits"].shape == (GLOBAL_BATCH, SEQ, tiny_model(**MODEL).vocab_size)
    assert x["logits"].abs().max() > 1.0, "logits too small for the comparison to mean anything"
    assert (x["logits"] - y["logits"]).abs().max().item() <= TOL
    assert x["updated"] and y["updated"]
    assert torch.allclose(x["losses"], y["losses"], rtol=0, atol=TOL), (x["losses"], y["losses"])
    assert torch.allclose(x["grad_norms"], y["grad_norms"], rtol=1e-5, atol=TOL)


def test_training_moves_the_loss(layouts):
    losses = layouts["tp1_pp1_dp1"]["losses"]
    assert losses[-1] < losses[0] - 0.01, losses


@pytest.mark.parametrize("name", ["pp2", "pp2_vp2", "pp2_uneven", "pp2_vp2_uneven"])
def test_each_stage_builds_the_layers_its_layout_names(layouts, name):
    """Megatron-Core built, on each pipeline rank and virtual stage, the decoder layers that
    phi4.model.pipeline_layout (what the planner counts) says it holds."""
    from phi4.model.pipeline_layout import stage_layers

    want = stage_layers(tiny_model(**MODEL), LAYOUTS[name])
    for pp_rank, built in layouts[name]["layer_numbers"].items():
        assert built == [list(r) for r in want[pp_rank]], (name, pp_rank, built)
