"""The CPU backend: CUDA device arguments run on the CPU, and the RNG tracker's regions each
draw from a generator of their own (docs/cpu_backend.md, "CUDA assumptions")."""

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


def _phi4_log() -> list[str]:
    """The messages phi4's loggers log from now on, INFO and up."""
    messages = []

    class Keep(logging.Handler):
        def emit(self, record):
            messages.append(record.getMessage())

    logging.getLogger("phi4").addHandler(Keep())
    logging.getLogger("phi4").setLevel(logging.INFO)
    return messages


def _cuda_factory_error() -> str | None:
    try:
        torch.zeros(1, device="cuda")
    except (RuntimeError, AssertionError) as err:  # no GPU, or a torch without CUDA
        return type(err).__name__
    return None


def activate_deactivate_activate():
    from megatron.core.tensor_parallel import random as mcore_random

    from phi4.runtime import cpu

    log = _phi4_log()
    missing = object()
    # Everything the backend may replace, watched whole: after deactivate() nothing differs.
    owners = {"torch.cuda": torch.cuda, "torch.cuda.nvtx": torch.cuda.nvtx, "torch.cuda.random": torch.cuda.random,
              "mcore_random": mcore_random}
    before = {where: dict(vars(module)) for where, module in owners.items()}

    def changed():
        return sorted(f"{where}.{name}" for where, module in owners.items()
                      for name in set(before[where]) | set(vars(module))
                      if vars(module).get(name, missing) is not before[where].get(name, missing))

    originals = (torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.Stream, torch.cuda.get_rng_state,
                 torch.cuda.nvtx.range_push, mcore_random._lazy_call, mcore_random._CUDA_RNG_STATE_TRACKER)
    error_before = _cuda_factory_error()
    cpu.activate()
    active = dict(changed=changed(), device=torch.zeros(1, device="cuda").device.type,
                  tracker=type(mcore_random.get_cuda_rng_tracker()).__name__, modes=torch._C._len_torch_function_stack())
    cpu.deactivate()
    cpu.deactivate()  # a second time does nothing
    after = dict(changed=changed(), active=cpu.is_active(), error=_cuda_factory_error(),
                 modes=torch._C._len_torch_function_stack(),
                 same=[a is b for a, b in zip(originals, (
                     torch.cuda.current_device, torch.cuda.synchronize, torch.cuda.Stream, torch.cuda.get_rng_state,
                     torch.cuda.nvtx.range_push, mcore_random._lazy_call, mcore_random._CUDA_RNG_STATE_TRACKER))])
    cpu.activate()  # again, as from the start
    again = dict(active=cpu.is_active(), device=torch.zeros(1, device="cuda").device.type,
                 current_device=torch.cuda.current_device(), changed=changed())
    return dict(error_before=error_before, active=active, after=after, again=again, log=log)


def test_deactivate_puts_back_what_activate_replaced(monkeypatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    (r,) = run_ranks(activate_deactivate_activate, 1, timeout=120)
    assert r["error_before"] is not None, "a CUDA tensor factory works here: this test needs a host without CUDA"
    assert r["active"]["device"] == "cpu" and r["active"]["modes"] == 1
    assert r["active"]["tracker"] == "CpuRNGStatesTracker"
    for name in ("torch.cuda.current_device", "torch.cuda.Stream", "torch.cuda.nvtx.range_push",
                 "torch.cuda.random.get_rng_state", "mcore_random._CUDA_RNG_STATE_TRACKER"):
        assert name in r["active"]["changed"], r["active"]["changed"]
    # Every attribute back as it was, the mode left, and CUDA tensor factories refused again.
    assert r["after"]["changed"] == [], r["after"]["changed"]
    assert all(r["after"]["same"]), r["after"]["same"]
    assert r["after"]["modes"] == 0 and not r["after"]["active"]
    assert r["after"]["error"] == r["error_before"]
    assert r["again"]["active"] and r["again"]["device"] == "cpu" and r["again"]["current_device"] == 0
    assert r["again"]["changed"] == r["active"]["changed"]
    # The steps named once per activation, and the malloc setting with its value.
    summaries = [m for m in r["log"] if m.startswith("CPU backend active")]
    assert len(summaries) == 2, r["log"]
    for step in ("replace_cuda_functions", "replace_rng_tracker", "end_children_with_this_process",
                 "fork_checkpoint_writer_manager", "set_malloc_mmap_threshold", "enter_cuda_to_cpu_mode"):
        assert step in summaries[0], summaries[0]
    malloc = [m for m in r["log"] if "mmap threshold" in m]
    assert malloc and "1 GiB" in malloc[0] and "MALLOC_MMAP_THRESHOLD_ unset" in malloc[0], r["log"]


def malloc_log_line():
    from phi4.runtime import cpu

    log = _phi4_log()
    cpu.activate()
    return [m for m in log if "mmap threshold" in m]


def test_the_environments_mmap_threshold_rules(monkeypatch):
    """glibc reads MALLOC_MMAP_THRESHOLD_ as the process starts (the rank's does: it inherits it);
    phi4 leaves it so and says so."""
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    (lines,) = run_ranks(malloc_log_line, 1, timeout=120)
    assert len(lines) == 1, lines
    assert "MALLOC_MMAP_THRESHOLD_=65536 (64 KiB)" in lines[0] and "1 GiB" not in lines[0], lines
