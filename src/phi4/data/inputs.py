"""The documents `phi4-data preprocess` reads, from the formats public corpora ship in:

- JSON Lines, plain (`.jsonl`, `.json`, `.ndjson`), gzip (`.gz`) or zstd (`.zst`) compressed: one
  JSON object a line, the text under the text key; the lines go to the workers as bytes, which parse
  them (a bad line is reported by file and line, as before);
- Parquet (`.parquet`): the text column, streamed a batch of rows at a time within each row group
  (pyarrow), so a file of any size takes little memory;
- Arrow (`.arrow`, the IPC stream or file format) and a Hugging Face dataset directory
  (`Dataset.save_to_disk`: `state.json` naming its `.arrow` files in order, read as
  `datasets.load_from_disk` reads them, without importing datasets).

A column that is missing or holds no strings is one ConfigError naming the file, the column and the
columns there are, before any tokenizing; a null in a text column is a bad row, `file:row N`. Each
item carries its share of the input's bytes on disk, so the progress bar and the "how far" of an
interruption count compressed and columnar input as they do JSONL.
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Iterator, NamedTuple, Optional, Union

from phi4.errors import ConfigError

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
COMPRESSED = (".gz", ".zst")
ROWS_PER_BATCH = 1024
FORMATS_HELP = ("JSONL (.jsonl, .json, .ndjson, each also .gz or .zst), Parquet (.parquet), Arrow (.arrow) "
                "or a Hugging Face dataset directory (save_to_disk)")


class Item(NamedTuple):
    """One document for a worker (sent as a plain tuple): a JSON line (bytes, parsed there) or a
    text already taken from its column (str); `error` instead when the row has none. `where` is
    the line number (JSONL) or `row N`."""

    source: str
    where: str
    payload: Union[bytes, str, None]
    nbytes: int
    error: Optional[str] = None


def input_kind(path: Path) -> str:
    """jsonl | parquet | arrow | hf_dataset, or one ConfigError naming the file and the formats."""
    path = Path(path)
    if path.is_dir():
        if (path / "dataset_dict.json").is_file():
            splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
            raise ConfigError(f"{path}: a Hugging Face DatasetDict (splits: {', '.join(splits)}); give one split's "
                              f"directory, e.g. {path / (splits[0] if splits else 'train')}")
        if not (path / "state.json").is_file():
            raise ConfigError(f"{path}: a directory without state.json, not a Hugging Face dataset directory "
                              f"(Dataset.save_to_disk); valid inputs: {FORMATS_HELP}")
        return "hf_dataset"
    if not path.is_file():
        raise ConfigError(f"input file not found: {path}")
    suffixes = path.suffixes[-2:] if path.suffix in COMPRESSED else path.suffixes[-1:]
    if suffixes and suffixes[0] in JSONL_SUFFIXES:
        return "jsonl"
    if path.suffix == ".parquet":
        return "parquet"
    if path.suffix == ".arrow":
        return "arrow"
    raise ConfigError(f"{path}: not a format preprocess reads (by its name); valid: {FORMATS_HELP}")


def arrow_files(directory: Path) -> list[Path]:
    """A Hugging Face dataset directory's Arrow files, in the order its state.json lists them."""
    try:
        state = json.loads((Path(directory) / "state.json").read_text())
        files = [Path(directory) / entry["filename"] for entry in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ConfigError(f"{directory}/state.json: not a Hugging Face dataset state ({type(err).__name__}: {err}); "
                          "re-save the dataset with Dataset.save_to_disk") from None
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{directory}: state.json lists {', '.join(missing)}, which is not there")
    return files


def disk_bytes(path: Path) -> int:
    path = Path(path)
    return sum(f.stat().st_size for f in arrow_files(path)) if path.is_dir() else path.stat().st_size


def check_input(path: Path, text_key: str) -> str:
    """The input's kind, its text column checked where it has columns."""
    kind = input_kind(path)
    if kind == "parquet":
        _text_column(_parquet(path).schema_arrow, path, text_key)
    elif kind == "arrow":
        _text_column(_arrow_batches(path, schema_only=True), path, text_key)
    elif kind == "hf_dataset":
        for f in arrow_files(path):
            _text_column(_arrow_batches(f, schema_only=True), f, text_key)
    return kind


def _text_column(schema, path: Path, text_key: str) -> None:
    import pyarrow  # lazy: only for columnar input

    if text_key not in schema.names:
        raise ConfigError(f"{path}: no column {text_key!r} (--text-key); its columns: {', '.join(schema.names)}")
    kind = schema.field(text_key).type
    if not (pyarrow.types.is_string(kind) or pyarrow.types.is_large_string(kind)):
        raise ConfigError(f"{path}: column {text_key!r} (--text-key) holds {kind}, not strings")


def _parquet(path: Path):
    import pyarrow  # lazy: only for columnar input
    import pyarrow.parquet  # lazy: only for columnar input

    try:
        return pyarrow.parquet.ParquetFile(path)
    except (pyarrow.ArrowException, OSError) as err:
        raise ConfigError(f"{path}: not a readable Parquet file ({err})") from None


def _arrow_batches(path: Path, schema_only: bool = False):
    """An Arrow file's record batches (its schema with `schema_only`): the IPC stream format, which
    Hugging Face datasets write, or the file format."""
    import pyarrow  # lazy: only for columnar input
    import pyarrow.ipc  # lazy: only for columnar input

    for opener in (pyarrow.ipc.open_stream, pyarrow.ipc.open_file):
        try:
            reader = opener(pyarrow.memory_map(str(path)))
        except (pyarrow.ArrowInvalid, OSError):
            continue
        if schema_only:
            return reader.schema
        if opener is pyarrow.ipc.open_file:
            return (reader.get_batch(i) for i in range(reader.num_record_batches))
        return iter(reader)
    raise ConfigError(f"{path}: not an Arrow IPC stream or file")


def _rows(path: Path, batches, total_rows: int, text_key: str) -> Iterator[Item]:
    """Items of a column's texts, ROWS_PER_BATCH rows converted at a time, each row carrying its
    share of the file's bytes."""
    size, row, done = disk_bytes(path), 0, 0
    for whole in batches:
        for start in range(0, whole.num_rows, ROWS_PER_BATCH):
            for text in whole.slice(start, ROWS_PER_BATCH).column(text_key).to_pylist():
                row += 1
                upto = size * row // max(total_rows, 1)
                nbytes, done = upto - done, upto
                if text is None:
                    yield Item(str(path), f"row {row}", None, nbytes, f"no string under the key {text_key!r} (null)")
                else:
                    yield Item(str(path), f"row {row}", text, nbytes)


def _lines(path: Path) -> Iterator[tuple[int, bytes, int]]:
    """(line number, line, bytes of the file on disk read for it) of a JSONL file, decompressed."""
    raw = open(path, "rb")
    try:
        if path.suffix == ".gz":
            stream = gzip.GzipFile(fileobj=raw)
        elif path.suffix == ".zst":
            import zstandard  # lazy: only for .zst input

            stream = io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=False))
        else:
            stream = raw
        position, line_no = 0, 0
        try:
            for line_no, line in enumerate(stream, 1):
                now = raw.tell()
                yield line_no, line, now - position
                position = now
        except (EOFError, OSError, ValueError) as err:  # gzip.BadGzipFile is an OSError; zstandard's errors ValueErrors
            raise ConfigError(f"{path}: cannot be decompressed after line {line_no} "
                              f"({type(err).__name__}: {err}): a truncated or corrupt file") from None
    finally:
        raw.close()


def items(path: Path, text_key: str) -> Iterator[Item]:
    """Every document of one input, in order (blank JSONL lines as items of no payload)."""
    path = Path(path)
    kind = input_kind(path)
    if kind == "jsonl":
        for line_no, line, nbytes in _lines(path):
            yield Item(str(path), str(line_no), line if line.strip() else None, nbytes)
    elif kind == "parquet":
        parquet = _parquet(path)
        yield from _rows(path, parquet.iter_batches(ROWS_PER_BATCH, columns=[text_key]), parquet.metadata.num_rows,
                         text_key)
    else:
        files = arrow_files(path) if kind == "hf_dataset" else [path]
        for f in files:
            batches = list(_arrow_batches(f))
            yield from _rows(f, batches, sum(b.num_rows for b in batches), text_key)
