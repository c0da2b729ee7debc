"""Sharded safetensors, read and written one tensor at a time.

Reading parses each shard's header and reads a tensor's bytes at its offsets, so memory holds
one tensor, never a whole shard (a memory map would count every page it touches). Writing lays
out every shard's header from the known shapes first, then streams each tensor's bytes into
place, so the writer too holds one tensor at a time. The format is the safetensors spec: an
8-byte little-endian header length, a JSON header of dtype/shape/data_offsets, then the data.
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Iterable

import torch

from phi4.errors import ConfigError

DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
INDEX_NAME = "model.safetensors.index.json"


def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConfigError(f"{path}: not a safetensors file (shorter than its 8-byte header length)")
        (length,) = struct.unpack("<Q", raw)
        if 8 + length > size:
            raise ConfigError(f"{path}: truncated (header of {length} bytes, file of {size})")
        try:
            header = json.loads(f.read(length))
        except json.JSONDecodeError as err:
            raise ConfigError(f"{path}: corrupt safetensors header ({err})") from None
    header.pop("__metadata__", None)
    data_start = 8 + length
    for name, info in header.items():
        end = data_start + info["data_offsets"][1]
        if end > size:
            raise ConfigError(f"{path}: truncated: tensor {name} ends at byte {end}, the file has {size}")
    return header, data_start


class HFCheckpointReader:
    """The tensors of a Hugging Face checkpoint directory: `model.safetensors.index.json` and the
    shards it names, or, without an index, every `*.safetensors` file in the directory."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = Path(directory)
        index = self.dir / INDEX_NAME
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not (self.dir / f).exists()]
            if missing:
                raise ConfigError(f"{index} names shard(s) that are missing: {', '.join(missing)}")
        else:
            files = sorted(p.name for p in self.dir.glob("*.safetensors"))
            if not files:
                raise ConfigError(f"{self.dir}: no {INDEX_NAME} and no *.safetensors files")
            weight_map = None
        self._where: dict[str, tuple[Path, dict, int]] = {}
        for name in files:
            path = self.dir / name
            header, data_start = _read_header(path)
            for tensor, info in header.items():
                if tensor in self._where:
                    raise ConfigError(f"{self.dir}: tensor {tensor} appears in two shards")
                self._where[tensor] = (path, info, data_start)
        if weight_map is not None:
            for tensor, file in weight_map.items():
                if tensor not in self._where or self._where[tensor][0].name != file:
                    raise ConfigError(f"{index}: {tensor} is listed in {file} but that shard does not hold it")

    def names(self) -> list[str]:
        return list(self._where)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def dtype(self, name: str) -> torch.dtype:
        code = self._where[name][1]["dtype"]
        if code not in DTYPES:
            raise ConfigError(f"{name}: unsupported dtype {code}; supported: {', '.join(DTYPES)}")
        return DTYPES[code]

    def nbytes(self, name: str) -> int:
        begin, end = self._where[name][1]["data_offsets"]
        return end - begin

    def read(self, name: str) -> torch.Tensor:
        """The tensor, read straight into its own buffer (no intermediate copy)."""
        path, info, data_start = self._where[name]
        begin, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=self.dtype(name))
        if end > begin:
            with path.open("rb") as f:
                f.seek(data_start + begin)
                view = memoryview(out.view(torch.uint8).reshape(-1).numpy())
                if f.readinto(view) != end - begin:
                    raise ConfigError(f"{path}: truncated while reading {name}")
        return out


class ShardedSafetensorsWriter:
    """Writes named tensors, in a fixed order, into shards of at most `max_shard_bytes` with a
    `model.safetensors.index.json`, streaming each tensor to disk as it is given."""

    def __init__(self, directory: Path, plan: Iterable[tuple[str, tuple[int, ...], torch.dtype]], max_shard_bytes: int):
        self.dir = Path(directory)
        self.order: list[str] = []
        shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
        used = 0
        for name, shape, dtype in plan:
            size = _numel(shape) * dtype.itemsize
            if shards[-1] and used + size > max_shard_bytes:
                shards.append([])
                used = 0
            shards[-1].append((name, shape, dtype))
            used += size
            self.order.append(name)
        count = len(shards)
        self._slots: dict[str, tuple[Path, int, int]] = {}
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        for n, shard in enumerate(shards, 1):
            path = self.dir / f"model-{n:05d}-of-{count:05d}.safetensors"
            header, offset = {"__metadata__": {"format": "pt"}}, 0
            for name, shape, dtype in shard:
                size = _numel(shape) * dtype.itemsize
                header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
                offset += size
            raw = json.dumps(header, separators=(",", ":")).encode()
            raw += b" " * (-len(raw) % 8)  # the spec pads the header to 8 bytes
            with path.open("wb") as f:
                f.write(struct.pack("<Q", len(raw)))
                f.write(raw)
                f.truncate(8 + len(raw) + offset)
            for name, shape, dtype in shard:
                self._slots[name] = (path, 8 + len(raw) + header[name]["data_offsets"][0], _numel(shape) * dtype.itemsize)
                self.weight_map[name] = path.name
            self.total_bytes += offset
        self._header_info = {name: (shape, dtype) for shard in shards for name, shape, dtype in shard}

    def write(self, name: str, tensor: torch.Tensor) -> None:
        shape, dtype = self._header_info[name]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ConfigError(f"{name}: got {tuple(tensor.shape)} {tensor.dtype}, planned {tuple(shape)} {dtype}")
        path, offset, size = self._slots[name]
        data = tensor.contiguous().view(torch.uint8).reshape(-1).numpy().data if size else b""
        with path.open("r+b") as f:
            f.seek(offset)
            f.write(data)

    def finish(self) -> None:
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": self.weight_map}
        (self.dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
