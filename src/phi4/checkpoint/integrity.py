"""A just-written checkpoint checked against its own `.metadata` before anything names it: each
rank's files must be tiled exactly by their entries, and each tensor entry must begin a torch.save
record. Offsets that belong to another save (see RunCheckpointer.abandon) or a torn write would
otherwise be found only by the load that reads them, at a rewind or a resume."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from phi4.checkpoint.safe_load import read_metadata

RECORD_START = b"PK\x03\x04"  # torch.save writes a zip archive; every tensor entry is one


def check_written(directory: Path, rank: int) -> Optional[str]:
    """What is wrong with the files this rank wrote into `directory` (`__<rank>_<n>.distcp`), or None."""
    directory = Path(directory)
    metadata = read_metadata(directory)
    per_file: dict[str, list] = {}
    for index, info in metadata.storage_data.items():
        if info.relative_path.startswith(f"__{rank}_"):
            is_tensor = isinstance(metadata.state_dict_metadata.get(index.fqn), TensorStorageMetadata)
            per_file.setdefault(info.relative_path, []).append((info.offset, info.length, index.fqn, is_tensor))
    for name, entries in sorted(per_file.items()):
        path = directory / name
        try:
            size = path.stat().st_size
        except FileNotFoundError:
            return f"{name} is missing"
        end = 0
        with open(path, "rb") as f:
            for offset, length, fqn, is_tensor in sorted(entries):
                if offset != end:
                    return f"{name}: {fqn} is said to start at byte {offset}, but the entry before it ends at {end}"
                if is_tensor:
                    f.seek(offset)
                    if f.read(len(RECORD_START)) != RECORD_START:
                        return f"{name}: no tensor record starts at byte {offset}, where {fqn} is said to be"
                end = offset + length
        if end != size:
            return f"{name} is {size} bytes, but its entries end at byte {end}"
    return None
