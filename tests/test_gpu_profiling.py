"""On a GPU: profile.memory_snapshot_on_oom dumps the caching allocator's history when a step runs
out of memory, and profile.kind=nsys opens and closes the CUDA profiler's capture range over its
window (without nsys attached, cudaProfilerStart/Stop are no-ops that must still succeed)."""

import pickle

import pytest

from multirank import run_ranks

pytestmark = pytest.mark.gpu


def _on_gpu(run_dir):
    import torch

    from phi4.settings import Profile
    from phi4.train.profiling import StepProfiler

    lines = []
    oom = StepProfiler(Profile(kind="none", memory_snapshot_on_oom=True), 0, run_dir, on_cuda=True)
    kept = torch.ones(1024, 1024, device="cuda")  # in the history
    raised = False
    try:
        with oom.snapshot_on_oom():
            torch.empty(1 << 50, dtype=torch.uint8, device="cuda")  # a petabyte
    except torch.OutOfMemoryError:
        raised = True
    nsys = StepProfiler(Profile(kind="nsys", first_step=2, last_step=3, record_shapes=True), 0, run_dir,
                        on_cuda=True, log_info=lines.append)
    for step in range(1, 5):
        nsys.step_started(step)
        kept @ kept
        nsys.step_ended(step)
    torch.cuda.synchronize()
    return dict(raised=raised, lines=lines)


def test_out_of_memory_dumps_the_allocators_history_and_nsys_ranges_open_and_close(tmp_path):
    seen = run_ranks(_on_gpu, 1, tmp_path, timeout=300)[0]
    assert seen["raised"]  # the error still reaches the caller
    snapshot = pickle.loads((tmp_path / "profile" / "rank00000_oom_memory.pickle").read_bytes())
    assert snapshot["segments"] and snapshot["device_traces"]
    assert seen["lines"] == ["profile: recording from step 2 to step 3 (nsys)",
                             "profile: the CUDA profiler capture range ends after step 3"]
