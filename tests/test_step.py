"""A non-finite gradient norm skips the optimizer update, on every rank, and leaves the weights."""

import math

import torch

from helpers import FP32, TopologyConfig, tiny_model, token_rows
from multirank import run_ranks


def nan_gradient_step():
    from phi4.model.build import build_phi4_model, transformer_config
    from phi4.model.parallel import init_model_parallel
    from phi4.train import update as step_module
    from helpers import optim_settings
    from phi4.model.pipeline_schedule import micro_batches_from_tokens
    from phi4.train.lm import lm_update
    from phi4.train.optimizer import build_optimizer, wrap_ddp

    model, topology = tiny_model(vocab_size=1024), TopologyConfig(tp=2)
    init_model_parallel(model, topology, FP32)
    config = transformer_config(model, topology, FP32)
    ddp = wrap_ddp(build_phi4_model(model, topology, FP32, config=config), config)
    optimizer = build_optimizer(ddp, config, optim_settings(lr=1e-2))
    batches = micro_batches_from_tokens(token_rows(model, 4, 16), 2)
    healthy = lm_update(ddp, optimizer, batches)

    before = [p.detach().clone() for p in ddp[0].parameters()]
    original = step_module.run_schedule

    def poisoned(*args, **kwargs):  # a NaN gradient on TP rank 0 only
        out = original(*args, **kwargs)
        if torch.distributed.get_rank() == 0:
            next(ddp[0].parameters()).main_grad.view(-1)[0] = float("nan")
        return out

    step_module.run_schedule = poisoned
    skipped = lm_update(ddp, optimizer, batches)
    step_module.run_schedule = original
    unchanged = all(torch.equal(a, b) for a, b in zip(before, ddp[0].parameters()))
    after = lm_update(ddp, optimizer, batches)
    return dict(healthy=healthy.update_successful, skipped=skipped.update_successful,
                norm=float(skipped.grad_norm), unchanged=unchanged, after=after.update_successful)


def test_nan_gradient_skips_the_update_on_every_rank():
    for r in run_ranks(nan_gradient_step, 2, timeout=300):
        assert r["healthy"] and r["after"]
        assert not r["skipped"] and math.isnan(r["norm"])
        assert r["unchanged"]
