"""The CPU backend: CUDA device arguments run on the CPU, and the RNG tracker's regions each
draw from a generator of their own (MEGATRON_CPU.md)."""

import logging

import torch

from helpers import FP32, TopologyConfig, tiny_model
from multirank import run_ranks


def cuda_redirects():
    from phi4.runtime import cpu

    cpu.activate()
    cpu.activate()  # idempotent
    a = torch.zeros(3, device="cuda")
    b = torch.ones(2, device=torch.cuda.current_device()).cuda()
    c = torch.arange(4).to("cuda", non_blocking=True)
    p = torch.nn.Parameter(torch.empty(2, dtype=torch.bfloat16, device="cuda"))
    x = torch.ones(3, requires_grad=True, device="cuda")
    (x * 2).sum().backward()  # backward functions run under the backend too
    event = torch.cuda.Event()
    event.record()
    torch.cuda.current_stream().wait_event(event)
    torch.cuda.synchronize()
    return dict(
        devices={t.device.type for t in (a, b, c, p, x.grad)},
        grad=x.grad.tolist(),
        types=(a.type(), p.type()),
        active=cpu.is_active(),
    )


def test_cuda_arguments_run_on_the_cpu():
    (result,) = run_ranks(cuda_redirects, 1, timeout=120)
    assert result["devices"] == {"cpu"}
    assert result["grad"] == [2.0, 2.0, 2.0]
    # Megatron-Core's optimizers accept only these type names.
    assert result["types"] == ("torch.cuda.FloatTensor", "torch.cuda.BFloat16Tensor")
    assert result["active"]


def rng_regions(tp: int):
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import get_cuda_rng_tracker

    from phi4.model.parallel import init_model_parallel
    from phi4.runtime.distributed import seed_all

    warnings = []

    class Catch(logging.Handler):
        def emit(self, record):
            warnings.append(record.getMessage())

    logging.getLogger("megatron.core.tensor_parallel.random").addHandler(Catch())
    init_model_parallel(tiny_model(), TopologyConfig(tp=tp), FP32, seed=7)
    tracker = get_cuda_rng_tracker()
    outside_before = torch.get_rng_state()
    with tracker.fork():
        region_a = torch.rand(4)
    with tracker.fork():
        region_b = torch.rand(4)  # continues the region's stream, not a restart
    unchanged = torch.equal(outside_before, torch.get_rng_state())
    with tracker.fork("data-parallel-rng"):
        data_parallel = torch.rand(4)
    outside = torch.rand(4)
    seed_all(7)  # what a fresh launch with the same seed starts from
    with tracker.fork():
        region_a_again = torch.rand(4)
    return dict(
        tp_rank=parallel_state.get_tensor_model_parallel_rank(),
        region_a=region_a, region_b=region_b, data_parallel=data_parallel, outside=outside,
        region_a_again=region_a_again,
        outside_unchanged=unchanged, warnings=warnings, tracker=type(tracker).__name__,
    )


def test_rng_tracker_regions_are_independent():
    tp2 = run_ranks(rng_regions, 2, 2, timeout=120)
    for r in tp2:
        assert r["tracker"] == "CpuRNGStatesTracker"
        assert r["outside_unchanged"], "forking a region moved the default generator"
        assert not r["warnings"], r["warnings"]
        assert not torch.equal(r["region_a"], r["region_b"])
        assert not torch.equal(r["region_a"], r["data_parallel"])
        assert not torch.equal(r["region_a"], r["outside"])
    # The model-parallel region differs across TP ranks; the data-parallel one does not.
    assert not torch.equal(tp2[0]["region_a"], tp2[1]["region_a"])
    assert torch.equal(tp2[0]["data_parallel"], tp2[1]["data_parallel"])
    # Same seed, same streams: seeding again (as a launch does) reproduces the first draw.
    assert all(torch.equal(r["region_a"], r["region_a_again"]) for r in tp2)
