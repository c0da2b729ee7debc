"""Training data checked before the model is built: each Megatron-Core indexed dataset (`.bin` +
`.idx`) is whole and consistent, and its token ids fit the vocabulary.

The largest id of a `.bin` is computed once and cached beside it (`<prefix>.check.json`, with the
files' sizes and modification times, so a re-made dataset is read again). Each failure is one
ConfigError naming the file: found in a second, not as an IndexError (CPU) or a device-side assert
(GPU) minutes into the job.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import numpy

from phi4.errors import ConfigError

_HEADER = b"MMIDIDX\x00\x00"
_DTYPES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64, 6: numpy.float64,
           7: numpy.float32, 8: numpy.uint16}
_FIXED = len(_HEADER) + 8 + 1 + 8 + 8  # header, version, dtype code, sequence count, document count
_CHUNK = 1 << 26  # elements per pass over a .bin


def _stamp(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


def read_index(prefix: str) -> tuple[type, numpy.ndarray]:
    """(dtype, sequence lengths) of `<prefix>.idx`, checked against itself and against
    `<prefix>.bin`'s size; the arrays are memory-mapped, as Megatron-Core reads them."""
    idx, binary = Path(f"{prefix}.idx"), Path(f"{prefix}.bin")
    for path in (idx, binary):
        if not path.is_file():
            raise ConfigError(f"{path} not found; make it with `phi4-data preprocess --output-prefix {prefix}`")
    with open(idx, "rb") as f:
        head = f.read(_FIXED)
    if len(head) < _FIXED or not head.startswith(_HEADER):
        raise ConfigError(f"{idx}: not a Megatron-Core index (no MMIDIDX header); re-make it with phi4-data")
    version, code, sequences, documents = struct.unpack_from("<QBQQ", head, len(_HEADER))
    if version != 1 or code not in _DTYPES:
        raise ConfigError(f"{idx}: index version {version}, dtype code {code}; valid: version 1, codes 1-8")
    expected = _FIXED + 12 * sequences + 8 * documents
    if idx.stat().st_size not in (expected, expected + sequences):  # + one mode byte per sequence (multimodal)
        raise ConfigError(f"{idx}: {idx.stat().st_size} bytes, but its counts ({sequences} sequences, {documents} "
                          f"document boundaries) need {expected}: truncated or corrupt; re-make it with phi4-data")
    dtype = _DTYPES[code]
    if not sequences:
        return dtype, numpy.zeros(0, numpy.int32)
    lengths = numpy.memmap(idx, numpy.int32, "r", _FIXED, (sequences,))
    last = int(numpy.memmap(idx, numpy.int64, "r", _FIXED + 4 * sequences + 8 * (sequences - 1), (1,))[0])
    size, itemsize = binary.stat().st_size, numpy.dtype(dtype).itemsize
    need = int(lengths.sum(dtype=numpy.int64)) * itemsize
    if size != need or last + int(lengths[-1]) * itemsize != size:
        raise ConfigError(f"{binary}: {size} bytes, but {idx} describes {need} ({sequences} sequences of "
                          f"{numpy.dtype(dtype).name}): the pair does not match (truncated, or one of them re-made)")
    return dtype, lengths


def largest_id(prefix: str, dtype: type) -> int:
    """The largest value in `<prefix>.bin` (of `dtype`, as its index says), cached beside it while
    both files stay the same."""
    binary, idx = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    cache = Path(f"{prefix}.check.json")
    stamp = dict(bin=_stamp(binary), idx=_stamp(idx))
    try:
        saved = json.loads(cache.read_text())
        if saved.get("stamp") == stamp:
            return int(saved["largest_id"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    values = numpy.memmap(binary, dtype=dtype, mode="r") if binary.stat().st_size else numpy.zeros(0, dtype)
    top = -1
    for start in range(0, len(values), _CHUNK):
        top = max(top, int(values[start:start + _CHUNK].max()))
    try:
        partial = cache.with_name(f".{cache.name}.{os.getpid()}")
        partial.write_text(json.dumps(dict(stamp=stamp, largest_id=top)) + "\n")
        os.replace(partial, cache)
    except OSError:  # a read-only dataset directory: check again next time
        pass
    return top


def check_tokens(prefix: str, vocab_size: int, setting: str) -> numpy.ndarray:
    """`<prefix>.bin`/`.idx` whole, matching, not empty, and every id below `vocab_size`; returns
    the sequence lengths."""
    dtype, lengths = read_index(prefix)
    if not len(lengths) or not lengths.any():
        raise ConfigError(f"{setting}: {prefix}.bin holds no tokens; re-make it with phi4-data")
    top = largest_id(prefix, dtype)
    if top >= vocab_size:
        raise ConfigError(f"{setting}: {prefix}.bin holds token id {top}, but the model's vocabulary has "
                          f"model.vocab_size={vocab_size} ids (0-{vocab_size - 1}): tokenized for another model?")
    return lengths


def sources_fingerprint(prefixes: list[str]) -> str:
    """A short hash of the sources' files (sizes and times): Megatron-Core's index cache is kept
    under it, so a re-made dataset is never read through a stale cache."""
    digest = hashlib.sha256()
    for prefix in prefixes:
        for suffix in (".bin", ".idx"):
            path = Path(f"{prefix}{suffix}")
            digest.update(f"{path.resolve()}:{_stamp(path)}\n".encode())
    return digest.hexdigest()[:16]
