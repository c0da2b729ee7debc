"""Measure what a built Megatron-Core model and optimizer allocate, on this rank.

Static bytes are read from the objects themselves: DDP's weight and gradient buffers, and the
distributed optimizer's Adam moments and fp32 master copies. The activation peak of a training
step's forward and backward is read from the CPU allocator through torch.profiler's memory events
(every allocation and free, in order): the running total's maximum, counted from the step's start.
On a GPU, `torch.cuda.max_memory_allocated` gives the same figure.
"""

from __future__ import annotations

import torch


def static_bytes(ddp_chunks: list, optimizer) -> dict:
    params = grads = 0
    for chunk in ddp_chunks:
        for buffer in chunk.buffers:
            if buffer.param_data is not None:
                params += buffer.param_data.numel() * buffer.param_data.element_size()
            grads += buffer.grad_data.numel() * buffer.grad_data.element_size()
    optimizers = getattr(optimizer, "chained_optimizers", [optimizer])
    state = 0
    for opt in optimizers:
        for per_param in opt.optimizer.state.values():
            for key in ("exp_avg", "exp_avg_sq"):
                state += per_param[key].numel() * per_param[key].element_size()
        for group in getattr(opt, "shard_fp32_from_float16_groups", []):
            state += sum(p.numel() * p.element_size() for p in group)
    return dict(params=params, grads=grads, optimizer=state)


def activation_peak(run) -> int:
    """Peak bytes allocated (above the start) while `run()` executes, on the CPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    total = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        total += event.nbytes()
        peak = max(peak, total)
    return peak
