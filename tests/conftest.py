import importlib.util
import os
import sys
from pathlib import Path

import pytest

import phi4.settings  # noqa: F401  registers the config schemas that conf/ composes onto

# The tests' own helpers (multirank, helpers) import as top-level modules in every rank process.
sys.path.insert(0, str(Path(__file__).parent))

# One thread per process, inherited by every process the tests start (torchrun ranks, SLURM jobs):
# two workers keep both cores busy, and a second thread only spins. Measured on the tiny models:
# a 20-step SFT run takes 42 CPU-seconds with one thread, 58 with two, in the same 40 s.
os.environ.setdefault("OMP_NUM_THREADS", "1")


def _gpu_missing() -> str | None:
    import torch

    if not torch.cuda.is_available():
        return "needs CUDA"
    if importlib.util.find_spec("transformer_engine") is None:
        return "needs Transformer Engine"
    return None


# The longest module (one SLURM chain of every stage) goes first, then the others by their number of
# tests, most first: `make test` runs the modules on two workers in this order (pytest-xdist, --dist
# loadfile --no-loadscope-reorder). xdist's own order (most tests first) started the chain four
# minutes in; the collection's order left test_train.py running alone at the end. test_harness.py
# (two tests, 2:20 alone) goes early too, not among the short modules at the end.
FIRST = ("test_stage_chain.py", "test_harness.py")


def pytest_collection_modifyitems(config, items):
    tests_in = {}
    for item in items:
        tests_in[item.path] = tests_in.get(item.path, 0) + 1
    # stable: each module's tests keep their order
    items.sort(key=lambda item: (item.path.name not in FIRST, -tests_in[item.path], str(item.path)))
    reason = None
    for item in items:
        if "gpu" in item.keywords:
            reason = reason or _gpu_missing()
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A private single-node SLURM cluster (munged, slurmctld, slurmd) for the whole session; see
    tests/slurm_cluster.py. Skips where SLURM is not installed or the tests do not run as root."""
    from slurm_cluster import SlurmCluster, missing_reason

    reason = missing_reason()
    if reason:
        pytest.skip(reason)
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()  # raises with the logs' tails
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def two_node_cluster(tmp_path_factory):
    """A private two-node SLURM cluster: nodes n1 and n2, each a slurmd in a network namespace of its
    own (tests/netns.py), one slurmctld. Skips where SLURM or network namespaces are missing."""
    import netns
    from slurm_cluster import SlurmCluster, missing_reason

    reason = missing_reason() or netns.missing_reason()
    if reason:
        pytest.skip(reason)
    netns.remove_stale()
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm2"), nodes=2).start()
    try:
        yield cluster
    finally:
        cluster.stop()

