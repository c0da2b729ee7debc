"""The harness itself: a failing rank's traceback surfaces, a hang becomes a failure."""

import os
import time

import pytest

from multirank import RankFailed, run_ranks


def report_env():
    return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), os.environ["MASTER_PORT"]


def fail_on_rank_one():
    if os.environ["RANK"] == "1":
        raise ValueError("deliberate failure on rank one")
    return "fine"


def hang_on_rank_zero():
    if os.environ["RANK"] == "0":
        time.sleep(600)
    return "done"


def test_each_rank_gets_torchrun_env():
    results = run_ranks(report_env, 2, timeout=60)
    assert [r[:2] for r in results] == [(0, 2), (1, 2)]
    assert results[0][2] == results[1][2]


def test_failing_rank_traceback_is_reported():
    with pytest.raises(RankFailed, match=r"(?s)rank 1 of 2 failed.*ValueError: deliberate failure on rank one"):
        run_ranks(fail_on_rank_one, 2, timeout=60)


def test_hang_becomes_failure():
    # long enough for rank 1 to start and finish on a loaded machine (8 s was not, once)
    with pytest.raises(RankFailed, match=r"rank\(s\) \[0\] of 2 did not finish within 20s"):
        run_ranks(hang_on_rank_zero, 2, timeout=20)
