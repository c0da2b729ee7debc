"""Run a function on N gloo ranks, each a fresh process, and collect what each returns.

`run_ranks(fn, world_size, *args)` spawns the ranks with torchrun's environment variables set
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so `fn` starts up exactly as a real job
does. The first rank to raise fails the call with that rank's traceback; a rank that does not
finish within `timeout` s fails it too (a hang becomes a failure, with every rank's stack dumped
to stderr first). Process start-up costs seconds, so a test should run several checks per launch.
"""

from __future__ import annotations

import faulthandler
import io
import multiprocessing
import os
import queue
import sys
import time
import traceback

import torch

from phi4.runtime.launch_env import free_port


class RankFailed(AssertionError):
    pass


def _encode(value) -> bytes:
    buffer = io.BytesIO()
    torch.save(value, buffer)
    return buffer.getvalue()


def _rank_main(fn, rank, world_size, port, args, out, timeout, threads):
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(threads)
    # Shortly before the parent gives up, print where this rank is stuck.
    faulthandler.dump_traceback_later(max(timeout - 5, 1), exit=False)
    try:
        result = fn(*args)
        out.put((rank, "ok", _encode(result)))
    except BaseException:
        out.put((rank, "error", traceback.format_exc()))
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        try:
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()
        except Exception:
            pass


def run_ranks(fn, world_size: int, *args, timeout: float = 300.0):
    """Run `fn(*args)` on `world_size` ranks; return the list of their results, by rank."""
    # Not daemonic: a rank may start processes of its own (dist_checkpointing's writer does).
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world_size, port, args, out, timeout, threads))
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    results: dict[int, object] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(results) < world_size:
            left = deadline - time.monotonic()
            if left <= 0:
                missing = sorted(set(range(world_size)) - set(results))
                raise RankFailed(f"rank(s) {missing} of {world_size} did not finish within {timeout:.0f}s (hang?)")
            try:
                rank, status, payload = out.get(timeout=min(left, 1.0))
            except queue.Empty:
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0) and r not in results]
                if dead:
                    raise RankFailed(f"rank {dead[0]} died with exit code {procs[dead[0]].exitcode} and no traceback")
                continue
            if status == "error":
                raise RankFailed(f"rank {rank} of {world_size} failed:\n{payload}")
            results[rank] = torch.load(io.BytesIO(payload), weights_only=False)
    finally:
        # Finished ranks get a moment to exit (their writer processes flush); after a failure the
        # others may wait in a collective forever, so they are killed at once.
        grace = 10 if len(results) == world_size else 0
        for p in procs:
            p.join(timeout=grace)
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    return [results[r] for r in range(world_size)]
