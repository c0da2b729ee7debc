"""What a run does about a rank that hangs and a rank that is slow: the hang watchdog
(phi4.runtime.watchdog) alone in a process, and a two-rank phi4-train run whose rank 1 first
sleeps inside a step (fault.hang_step: every rank writes its stacks to run_dir/hangs/ and exits 76
within the allowance plus a stated slack) and then, resumed from the last checkpoint, is slowed in
every step (fault.delay_rank: the straggler report names it)."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
from helpers import ROOT
from phi4.runtime.launch_env import free_port
from phi4.runtime.watchdog import EXIT_HUNG, GRACE_S

BIN = Path(sys.executable).parent
HOST = socket.gethostname().split(".")[0]
# Beyond the allowance: the watchdog's poll (at most 1 s), writing the stacks, GRACE_S before the
# exit, and the process ending; generous for a loaded 2-core machine.
SLACK_S = GRACE_S + 20


def _python(tmp_path, body: str) -> subprocess.CompletedProcess:
    script = tmp_path / "dog.py"
    script.write_text(textwrap.dedent(body))
    return subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60, cwd=tmp_path)


def test_no_progress_writes_every_stack_and_exits_76(tmp_path):
    out = _python(tmp_path, f"""
        import time
        from phi4.runtime.watchdog import Watchdog

        def stuck_in_here():
            time.sleep(30)

        dog = Watchdog({str(tmp_path / 'hangs')!r}, rank=3, grace_s=0.1)
        dog.arm("step 7", 0.5)
        stuck_in_here()
    """)
    assert out.returncode == EXIT_HUNG, out.stderr
    dump = (tmp_path / "hangs" / f"{HOST}-rank3.txt").read_text()
    assert f"rank 3 on {HOST}: no progress in step 7 for 0.5 s" in dump.splitlines()[0]
    assert "stuck_in_here" in dump and "phi4-watchdog" not in dump.splitlines()[0]
    assert f"exit {EXIT_HUNG}" in out.stderr


def test_a_longer_allowance_holds_for_its_work_and_the_step_allowance_counts_afresh(tmp_path):
    out = _python(tmp_path, f"""
        import time
        from phi4.runtime.watchdog import Watchdog

        dog = Watchdog({str(tmp_path / 'hangs')!r}, rank=0, grace_s=0.1)
        dog.arm("step 2", 0.8)
        with dog.allow("the save at step 1", 10):
            time.sleep(1.5)          # longer than a step may take: a save may
        time.sleep(0.5)              # the step's 0.8 s count from the save's end
        dog.arm("step 3", 0.8)
        dog.arm("between runs", None)
        time.sleep(1.5)              # unwatched
        dog.close()
        print("finished")
    """)
    assert out.returncode == 0 and out.stdout.strip() == "finished", out.stderr
    assert not (tmp_path / "hangs").exists()


def _small(cache):
    return ["model.hidden_size=64", "model.ffn_hidden_size=224", "train.seq_length=32", "train.global_batch_size=4",
            "train.micro_batch_size=2", "train.log_every=1", "train.valid_every=0", "eval.every=0",
            "train.tensorboard=false", "data.synthetic.problems=600", f"data.cache_dir={cache}",
            "optim.warmup_steps=2", "train.steps=5", "checkpoint.every=2", "train.straggler_factor=1.2",
            "train.straggler_windows=2"]


def _records(run: Path) -> list[dict]:
    path = run / "metrics.jsonl"
    if not path.exists():
        return []
    return [r for r in map(json.loads, path.read_text().splitlines()) if "loss" in r]


def _steps_logged(run: Path) -> list[int]:
    return [r["step"] for r in _records(run)]


def _torchrun(run: Path, cache: Path, *overrides: str) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()), "launch/train.py",
            f"run_dir={run}", *_small(cache), *overrides]


def test_a_hung_rank_ends_every_rank_and_the_resumed_run_names_a_slow_rank(tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    allowance_s = 4.0
    watched = f"train.hang_timeout_minutes={allowance_s / 60}"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    log = tmp_path / "hang.log"
    with log.open("w") as out:
        proc = subprocess.Popen(_torchrun(run, cache, watched, "fault.hang_step=3", "fault.hang_rank=1",
                                          "fault.hang_seconds=600"),
                                stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True, env=env)
        try:
            deadline = time.monotonic() + 300
            while 2 not in _steps_logged(run) and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            step_2_done = time.monotonic()
            ranks = [p for p in psutil.Process(proc.pid).children() if "launch/train.py" in p.cmdline()]
            assert len(ranks) == 2, ranks
            psutil.wait_procs(ranks, timeout=allowance_s + SLACK_S + 60)
            ended = time.monotonic()  # the ranks' end; torchrun's own teardown after them is not the run's
            code = proc.wait(timeout=120)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    text = log.read_text()
    assert code != 0 and 2 in _steps_logged(run) and 3 not in _steps_logged(run), text[-3000:]
    # every rank ended within the allowance plus the slack, not after the 600 s sleep
    assert ended - step_2_done < allowance_s + SLACK_S, (ended - step_2_done, text[-3000:])
    dumps = {rank: (run / "hangs" / f"{HOST}-rank{rank}.txt") for rank in (0, 1)}
    assert all(p.exists() for p in dumps.values()), (sorted(run.glob("hangs/*")), text[-3000:])
    stuck, waiting = dumps[1].read_text(), dumps[0].read_text()
    assert "no progress in step 3" in stuck.splitlines()[0] and "no progress in step 3" in waiting.splitlines()[0]
    assert "hang_inside_step" in stuck  # the function the stuck rank is in
    assert "hang_inside_step" not in waiting  # the other rank waits for it elsewhere (a collective)
    assert text.count(f"exit {EXIT_HUNG} to resume from the last checkpoint") == 2
    assert (run / "checkpoints" / "latest").read_text().strip() == "step_0000002"

    # the requeued job, without the hang but with rank 1 sleeping 1 s in every step, and the gradient
    # reduction overlapped with the backward (the pretrain stage's setting: rank 0's reduce-scatters are
    # queued before its time ends, and wait for rank 1): it resumes from step 2 and finishes; each
    # record names rank 1 the slowest, rank 0's own time stays below the delay, and the warning names
    # rank 1 from the second slow window on (train.straggler_windows=2)
    delay_s = 1.0
    again = subprocess.run(_torchrun(run, cache, watched, "fault.delay_rank=1", f"fault.delay_seconds={delay_s}",
                                     "train.overlap_grad_reduce=true"),
                           capture_output=True, text=True, cwd=ROOT, timeout=300, env=env)
    text = again.stdout + again.stderr
    assert again.returncode == 0, text[-3000:]
    assert "at step 2" in text.split("resumed from", 1)[1].splitlines()[0]
    resumed = _records(run)[-3:]
    assert [r["step"] for r in resumed] == [3, 4, 5]
    for r in resumed:
        assert (r["slowest_rank"], r["slowest_host"]) == (1, HOST)
        assert r["rank_time_max_s"] >= delay_s > r["rank_time_min_s"]
    named = [line for line in text.splitlines() if "is a straggler" in line]
    assert len(named) == 2 and all(f"rank 1 on {HOST} is a straggler" in line for line in named), named
    assert "step 4:" in named[0] and "in 2 windows in a row" in named[0] and "in 3 windows in a row" in named[1]


@pytest.mark.gpu
def test_a_ranks_own_time_ends_before_work_queued_on_another_stream():
    """The straggler report's timing on a GPU (phi4.train.stragglers.StepTimes): a rank's time ends
    where its compute stream reaches the gradient reduction. A long chain of matmuls on a side
    stream stands in for reduce-scatters that wait for a slow peer (train.overlap_grad_reduce):
    StepTimes has its time while that work still runs, where a device synchronize (the timing
    before) would have waited for it."""
    import torch

    from phi4.runtime import device
    from phi4.train.stragglers import StepTimes

    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    device.select(0)
    a = torch.randn(8192, 8192, device="cuda")
    torch.cuda.synchronize()
    times, side, side_done = StepTimes(factor=None, windows=1), torch.cuda.Stream(), torch.cuda.Event()
    times.step_started()
    with torch.cuda.stream(side):
        for _ in range(100):
            a = a @ a / 8192
        side_done.record(side)
    (torch.ones(16, device="cuda") * 2).sum()  # the compute stream's own, short work
    times.gradients_ready()
    times.step_ended()
    assert not side_done.query(), "the rank's time waited for the other stream's work"
    assert len(times.window) == 1 and times.window[0] >= 0
    torch.cuda.synchronize()
