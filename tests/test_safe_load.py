"""Checkpoints never run code: a torch_dist checkpoint whose `.metadata` or whose saved values name
a foreign class is refused with one line naming the file and the class, before anything unpickles
it; a real checkpoint (tensors, the common state, numpy RNG states) passes."""

import os
import pickle
import random
import subprocess
import sys

import numpy
import pytest
import torch
import torch.distributed.checkpoint as dcp

from helpers import ROOT
from phi4.errors import ConfigError
from phi4.checkpoint.safe_load import check_checkpoint

def _leave_marker(path):
    with open(path, "w") as f:
        f.write("code ran")
    return {}


class Payload:
    """What a crafted file carries: unpickling it calls _leave_marker."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (_leave_marker, (self.path,))


def _save(directory, state):
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(directory)), no_dist=True)


def test_a_real_checkpoints_values_pass(tmp_path):
    _save(tmp_path / "ok", {"w": torch.ones(3), "common": {"step": 4, "config": {"lr": 0.1}},
                            "rng": {"python": random.getstate(), "numpy": numpy.random.get_state(),
                                    "torch": torch.get_rng_state()}})
    check_checkpoint(tmp_path / "ok")


def test_a_foreign_class_in_a_saved_value_is_refused_before_it_runs(tmp_path):
    marker = tmp_path / "ran"
    _save(tmp_path / "bad", {"w": torch.ones(3), "common": {"step": Payload(marker)}})
    assert not marker.exists()
    with pytest.raises(ConfigError) as err:
        check_checkpoint(tmp_path / "bad")
    message = str(err.value)
    assert "refused to load item 'common.step'" in message and "_leave_marker" in message and "\n" not in message
    assert not marker.exists()
    # The plain reader would have run it: what the check stands in front of.
    dcp.load({"w": torch.empty(3), "common": {"step": None}}, storage_reader=dcp.FileSystemReader(str(tmp_path / "bad")), no_dist=True)
    assert marker.exists()


def test_a_foreign_class_in_metadata_is_refused_before_it_runs(tmp_path):
    directory = tmp_path / "bad"
    _save(directory, {"w": torch.ones(3)})
    metadata = dcp.FileSystemReader(str(directory)).read_metadata()
    marker = tmp_path / "ran"
    metadata.planner_data = Payload(marker)
    (directory / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ConfigError) as err:
        check_checkpoint(directory)
    assert str(err.value) == (f"{directory}/.metadata: refused to load: it names test_safe_load._leave_marker, "
                              "which a torch_dist checkpoint's metadata never holds (unpickling it could run code)")
    assert not marker.exists()


def test_truncated_metadata_is_one_line(tmp_path):
    directory = tmp_path / "cut"
    _save(directory, {"w": torch.ones(3)})
    data = (directory / ".metadata").read_bytes()
    (directory / ".metadata").write_bytes(data[: len(data) // 2])
    with pytest.raises(ConfigError, match=r"\.metadata: not a readable torch_dist metadata file .* truncated or corrupt"):
        check_checkpoint(directory)


def test_every_loader_checks_first(tmp_path):
    """Resume, checkpoint.load, phi4-eval and PTS go through resolve_checkpoint; phi4-convert
    through its own reader: each refuses the crafted checkpoint with exit 2 and one line."""
    from phi4.checkpoint.pointers import resolve_checkpoint

    marker = tmp_path / "ran"
    directory = tmp_path / "bad"
    _save(directory, {"w": torch.ones(3), "common": {"step": Payload(marker)}})
    with pytest.raises(ConfigError, match="refused to load item 'common.step'"):
        resolve_checkpoint(directory)
    out = subprocess.run([sys.executable, "-m", "phi4.cli.convert", "mcore-to-hf", "--ckpt", str(directory),
                          "--out", str(tmp_path / "hf"), "--no-progress"], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT / 'src'}"})
    assert out.returncode == 2, out.stderr[-2000:]
    assert "refused to load item 'common.step'" in out.stderr and "Traceback" not in out.stderr
    assert not marker.exists() and not (tmp_path / "hf").exists()


def test_a_checkpoint_rewritten_after_it_passed_is_checked_again(tmp_path):
    """Each directory is checked once per process while its files stay the same: a checkpoint
    written over in place is read again, not waved through."""
    directory = tmp_path / "ckpt"
    _save(directory, {"w": torch.ones(3), "common": {"step": 1}})
    check_checkpoint(directory)
    check_checkpoint(directory)  # the same files: no second read of the items
    marker = tmp_path / "ran"
    _save(directory, {"w": torch.ones(3), "common": {"step": Payload(marker)}})
    with pytest.raises(ConfigError, match="refused to load item 'common.step'"):
        check_checkpoint(directory)
    assert not marker.exists()


def test_a_save_whose_metadata_describes_other_files_is_found_before_it_is_published(tmp_path):
    """phi4.checkpoint.integrity: the check RunCheckpointer makes before `latest` may name a save. Two
    saves of one structure, whose saved config differs in length by more than torch.save's 64-byte
    record alignment: each passes; with the other's `.metadata` (the byte offsets an abandoned save's
    writer reported, see test_trainer) or with a file cut short, the check names the file."""
    import shutil

    from phi4.checkpoint.integrity import check_written

    for name, config in (("short", "a" * 8), ("long", "a" * 300)):
        _save(tmp_path / name, {"w": torch.ones(64), "v": torch.zeros(8), "common": {"config": config}})
        assert check_written(tmp_path / name, rank=0) is None
    shutil.copy(tmp_path / "short" / ".metadata", tmp_path / "long" / ".metadata")
    problem = check_written(tmp_path / "long", rank=0)
    assert problem is not None and problem.startswith("__0_0.distcp")
    with open(tmp_path / "short" / "__0_0.distcp", "r+b") as f:
        f.truncate(os.path.getsize(tmp_path / "short" / "__0_0.distcp") - 10)
    problem = check_written(tmp_path / "short", rank=0)
    assert problem is not None and "__0_0.distcp is" in problem and "bytes, but its entries end at byte" in problem
    assert check_written(tmp_path / "short", rank=1) is None  # another rank's files are its own to check
