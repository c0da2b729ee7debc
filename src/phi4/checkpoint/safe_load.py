"""Checkpoints from elsewhere never run code: a torch_dist checkpoint is checked before anything
reads it with the plain unpickler.

PyTorch's distributed checkpoint reader unpickles `.metadata` with `pickle.load`, and its load
planner unpickles every non-tensor item with `torch.load(weights_only=False)`; either can run
whatever a crafted file names. `check_checkpoint` reads `.metadata` with an unpickler that admits
only what that file holds (torch.distributed.checkpoint's metadata classes, torch dtypes, sizes
and layouts, the path it was saved under), and every non-tensor item as `weights_only` (plus
numpy arrays, which the RNG states hold). Anything else stops with one line naming the file, the
item and the class. A directory is checked once per process while its files stay the same.
"""

from __future__ import annotations

import collections
import importlib
import io
import pathlib
import pickle
from pathlib import Path

import numpy
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from phi4.errors import ConfigError

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")


class _Refused(Exception):
    pass


def _metadata_global(module: str, name: str):
    """The object a `.metadata` pickle may name, or None."""
    if module in _DCP_MODULES:
        obj = getattr(importlib.import_module(module), name, None)
        return obj if isinstance(obj, type) else None  # its dataclasses and enums, no functions
    if module == "torch":
        obj = getattr(torch, name, None)
        if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
            return obj
        return None
    if (module, name) == ("torch.serialization", "_get_layout"):  # how a layout is pickled: by name
        return torch.serialization._get_layout
    if (module, name) == ("collections", "OrderedDict"):
        return collections.OrderedDict
    if module == "pathlib" and name in ("Path", "PosixPath", "PurePosixPath"):  # the checkpoint id
        return getattr(pathlib, name)
    return None


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        obj = _metadata_global(module, name)
        if obj is None:
            raise _Refused(f"{module}.{name}")
        return obj


def read_metadata(directory: Path):
    """The checkpoint's `.metadata` (torch.distributed.checkpoint's Metadata), read without running
    code."""
    path = Path(directory) / ".metadata"
    try:
        with open(path, "rb") as f:
            return _MetadataUnpickler(f).load()
    except _Refused as refused:
        raise ConfigError(f"{path}: refused to load: it names {refused}, which a torch_dist checkpoint's metadata "
                          "never holds (unpickling it could run code)") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError, IndexError, KeyError) as err:
        raise ConfigError(f"{path}: not a readable torch_dist metadata file ({type(err).__name__}: {err}); "
                          "the checkpoint is truncated or corrupt") from None


def _numpy_globals() -> list:
    """What a numpy array pickles as (the RNG states hold numpy's), admitted beside weights_only's own."""
    reconstruct = getattr(getattr(numpy, "_core", numpy.core), "multiarray")._reconstruct
    dtypes = [type(numpy.dtype(t)) for t in ("uint32", "int64", "float64", "float32", "bool")]
    return [numpy.ndarray, numpy.dtype, reconstruct, *dtypes]


def _raw_items(directory: Path, keys: list[str]) -> dict[str, bytes]:
    """The stored bytes of the non-tensor items, not unpickled."""
    class RawBytes(DefaultLoadPlanner):
        def load_bytes(self, read_item, value):
            self.state_dict[read_item.dest_index.fqn] = value.getvalue()

    state = {key: io.BytesIO() for key in keys}
    planner = RawBytes(flatten_state_dict=False, flatten_sharded_tensors=False)
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(directory)), planner=planner, no_dist=True)
    return state


_CHECKED: dict[Path, tuple] = {}  # directory -> its files' (name, size, mtime) when it passed


def _contents(directory: Path) -> tuple:
    return tuple(sorted((p.name, st.st_size, st.st_mtime_ns) for p in directory.iterdir() if p.is_file()
                        for st in [p.stat()]))


def check_checkpoint(directory: Path):
    """The checkpoint's metadata, after refusing with one line a checkpoint whose metadata or
    non-tensor items name anything that could run code; tensors are raw bytes and need no check."""
    directory = Path(directory).resolve()
    metadata = read_metadata(directory)
    contents = _contents(directory)
    if _CHECKED.get(directory) == contents:  # resume, common state and weights read the same files
        return metadata
    keys = [k for k, v in metadata.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)]
    if keys:
        _check_items(directory, keys)
    _CHECKED[directory] = contents
    return metadata


def _check_items(directory: Path, keys: list[str]) -> None:
    allowed = _numpy_globals()
    for key, raw in _raw_items(directory, keys).items():
        try:
            with torch.serialization.safe_globals(allowed):
                torch.load(io.BytesIO(raw), weights_only=True)
        except pickle.UnpicklingError:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(io.BytesIO(raw))
            foreign = [n for n in names if n not in {f"{g.__module__}.{g.__qualname__}" for g in allowed}]
            raise ConfigError(f"{directory}: refused to load item {key!r}: it names {', '.join(foreign) or names}, "
                              "which a checkpoint's saved values never hold (unpickling it could run code)") from None
        except (RuntimeError, EOFError, ValueError) as err:
            raise ConfigError(f"{directory}: item {key!r} is not readable ({str(err).splitlines()[0]}); "
                              "the checkpoint is truncated or corrupt") from None
