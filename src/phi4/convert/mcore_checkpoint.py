"""Megatron-Core distributed checkpoints (torch_dist), written and read one tensor at a time.

The format is what Megatron-Core's `dist_checkpointing` writes with its torch_dist backend: a
PyTorch Distributed Checkpoint whose keys are the model's sharded keys (layers stacked on a
leading axis), a `common_state` object holding the non-sharded state, and `metadata.json`. The
writer declares every tensor's global shape up front and produces each piece (one layer of one
parameter) only when the checkpoint writer asks for it, so the whole model is never in memory.
Any TP/PP/VP layout then loads it through `dist_checkpointing.load`, which reads the slices it
needs. The reader goes the other way for any checkpoint this project writes, training
checkpoints with optimizer state included (it reads only the model's keys).
"""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch
from torch.distributed import checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from phi4.checkpoint.safe_load import check_checkpoint
from phi4.errors import ConfigError

METADATA_JSON = {"sharded_backend": "torch_dist", "sharded_backend_version": 1}
COMMON_KEY = "common_state/shard_0_1"  # Megatron-Core's ShardedObject("common_state", (1,), (0,))


class _StreamedTensor:
    """A checkpoint tensor known by shape and dtype; each chunk is produced on demand."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        self.shape, self.dtype = tuple(shape), dtype
        self.chunks: dict[tuple[int, ...], tuple[tuple[int, ...], Callable[[], torch.Tensor]]] = {}

    def add(self, offsets: tuple[int, ...], sizes: tuple[int, ...], produce: Callable[[], torch.Tensor]) -> None:
        self.chunks[tuple(offsets)] = (tuple(sizes), produce)

    def __create_write_items__(self, fqn: str, obj) -> list[WriteItem]:  # PyTorch DCP's hook
        return [
            WriteItem(
                index=MetadataIndex(fqn, torch.Size(offsets)),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes)),
                    properties=TensorProperties(dtype=self.dtype),
                    size=torch.Size(self.shape),
                ),
            )
            for offsets, (sizes, _) in self.chunks.items()
        ]

    def produce(self, offsets) -> torch.Tensor:
        sizes, make = self.chunks[tuple(offsets)]
        tensor = make().to(self.dtype).contiguous()
        if tuple(tensor.shape) != sizes:
            tensor = tensor.reshape(sizes)
        return tensor


class _StreamingSavePlanner(DefaultSavePlanner):
    def __init__(self, on_write: Optional[Callable[[str, torch.Tensor], None]] = None):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.on_write = on_write

    def lookup_object(self, index: MetadataIndex):
        obj = self.state_dict[index.fqn]
        if isinstance(obj, _StreamedTensor):
            tensor = obj.produce(index.offset)
            if self.on_write:
                self.on_write(index.fqn, tensor)
            return tensor
        return super().lookup_object(index)

    def transform_object(self, write_item, object):
        return object  # bytes are serialized already, as Megatron-Core's planner does


class CheckpointWriter:
    """Collects the pieces of a checkpoint, then writes them in one streamed pass."""

    def __init__(self):
        self.tensors: dict[str, _StreamedTensor] = {}

    def add(self, key: str, piece_shape: tuple[int, ...], dtype: torch.dtype, layer: Optional[int],
            num_layers: int, produce: Callable[[], torch.Tensor]) -> None:
        """One piece of `key`: the whole tensor, or layer `layer` of a layer-stacked tensor."""
        if layer is None:
            shape, offsets, sizes = piece_shape, (0,) * len(piece_shape), piece_shape
        else:
            shape = (num_layers, *piece_shape)
            offsets, sizes = (layer,) + (0,) * len(piece_shape), (1, *piece_shape)
        target = self.tensors.setdefault(key, _StreamedTensor(shape, dtype))
        target.add(offsets, sizes, produce)

    def write(self, directory: Path, common: dict, on_write=None) -> None:
        state = dict(self.tensors)
        buffer = io.BytesIO()
        torch.save([common], buffer)
        state[COMMON_KEY] = buffer
        writer = dcp.FileSystemWriter(str(directory), single_file_per_rank=True, thread_count=1)
        dcp.save(state, storage_writer=writer, planner=_StreamingSavePlanner(on_write), no_dist=True)
        (Path(directory) / "metadata.json").write_text(json.dumps(METADATA_JSON))


class _Region:
    """Where a slice of a checkpoint tensor lands: its offsets in the checkpoint, and a buffer."""

    def __init__(self, offsets: tuple[int, ...], buffer: torch.Tensor):
        self.offsets, self.buffer = offsets, buffer

    def __create_chunk_list__(self):  # PyTorch DCP's hook
        return [ChunkStorageMetadata(offsets=torch.Size(self.offsets), sizes=self.buffer.shape)]


class _RegionLoadPlanner(DefaultLoadPlanner):
    def __init__(self):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        regions = dict(state_dict)
        super().set_up_planner(state_dict, metadata, is_coordinator)
        state_dict.update(regions)  # the default set-up replaces objects that are not tensors
        self.state_dict = regions

    def resolve_tensor(self, read_item):
        region = self.state_dict[read_item.dest_index.fqn]
        out = region.buffer
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            out = out.narrow(dim, start, length)
        return out


class CheckpointReader:
    """Reads whole tensors, or single layers of layer-stacked tensors, from a torch_dist checkpoint."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        if not (self.dir / ".metadata").exists():
            hint = " (a training run directory? pass one of its checkpoint directories)" if self.dir.is_dir() else ""
            raise ConfigError(f"{self.dir} is not a Megatron-Core torch_dist checkpoint: no .metadata{hint}")
        meta_json = self.dir / "metadata.json"
        if meta_json.exists():
            backend = json.loads(meta_json.read_text()).get("sharded_backend")
            if backend != "torch_dist":
                raise ConfigError(f"{meta_json}: sharded_backend={backend!r}; valid: 'torch_dist'")
        self.metadata = check_checkpoint(self.dir)  # the plain readers below unpickle: nothing in it may run code
        self.tensors = {
            k: v for k, v in self.metadata.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)
        }

    def shape(self, key: str) -> tuple[int, ...]:
        if key not in self.tensors:
            raise ConfigError(f"{self.dir}: the checkpoint has no tensor {key!r}")
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def read(self, requests: Iterable[tuple[str, Optional[int]]]) -> dict[tuple[str, Optional[int]], torch.Tensor]:
        """{(key, layer): tensor} for each requested key (layer None: the whole tensor)."""
        state, out = {}, {}
        for key, layer in requests:
            shape = self.shape(key)
            if layer is None:
                buffer, offsets = torch.empty(shape, dtype=self.dtype(key)), (0,) * len(shape)
            else:
                buffer = torch.empty((1, *shape[1:]), dtype=self.dtype(key))
                offsets = (layer,) + (0,) * (len(shape) - 1)
            state[key] = _Region(offsets, buffer)
            out[(key, layer)] = buffer if layer is None else buffer[0]
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(self.dir)), planner=_RegionLoadPlanner(), no_dist=True)
        return out

    def common_state(self) -> dict:
        if COMMON_KEY not in self.metadata.state_dict_metadata:
            return {}
        state = {COMMON_KEY: io.BytesIO()}
        dcp.load(state, storage_reader=dcp.FileSystemReader(str(self.dir)), no_dist=True)
        value = state[COMMON_KEY]  # DCP hands back the deserialized list, or the raw bytes
        if isinstance(value, io.BytesIO):
            value.seek(0)
            value = torch.load(value, weights_only=True)
        return value[0]
