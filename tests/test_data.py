"""phi4-data: preprocess JSONL into indexed datasets Megatron-Core reads back exactly, with bad
lines reported; blends draw each source in proportion to its weight."""

import collections
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from phi4.data.tokenizer import get_tokenizer
from helpers import write_indexed

BIN = Path(sys.executable).parent


def _phi4_data(*args):
    return subprocess.run([str(BIN / "phi4-data"), *map(str, args)], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_preprocess_round_trip_and_bad_lines(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    docs = ["The sum of 5 consecutive even numbers is 90.", "naïve café — 中文 🙂\n\nnew paragraph",
            "<|im_start|> stays text here", "x" * 3000]
    good = tmp_path / "good.jsonl"
    good.write_text("".join(json.dumps({"content": d}) + "\n" for d in docs))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"content": "fine"}) + "\n{broken\n" + json.dumps({"text": "wrong key"}) + "\n[1]\n")
    out = _phi4_data("preprocess", "--input", good, bad, "--output-prefix", tmp_path / "out/docs",
                     "--text-key", "content", "--workers", "2", "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "skipped 3 bad line(s)" in out.stderr
    assert f"{bad}:2: not valid JSON" in out.stderr and f"{bad}:3: no string under the key 'content'" in out.stderr
    assert f"{bad}:4: a JSON list, not an object" in out.stderr
    assert len((tmp_path / "out/docs.bad_lines.txt").read_text().splitlines()) == 3

    tok = get_tokenizer()
    ds = IndexedDataset(str(tmp_path / "out/docs"))
    expected = [tok.encode(d, allow_special=False) + [tok.eod_id] for d in docs + ["fine"]]
    assert len(ds) == len(expected)
    for i, ids in enumerate(expected):
        assert ds[i].tolist() == ids
    assert 100264 not in numpy.concatenate([ds[i] for i in range(len(ds))])  # no forged specials


def test_preprocess_missing_input(tmp_path):
    out = _phi4_data("preprocess", "--input", tmp_path / "nope.jsonl", "--output-prefix", tmp_path / "x")
    assert out.returncode == 2 and "input file(s) not found" in out.stderr
    assert not list(tmp_path.glob("x*"))


FORMAT_DOCS = ["The sum of 5 consecutive even numbers is 90.", "naïve café — 中文 🙂\n\nnew paragraph",
               "<|endoftext|> stays text here", "x" * 3000] + [f"document {i}: {i} + {i} = {2 * i}" for i in range(40)]


def _write_formats(directory) -> dict:
    """FORMAT_DOCS in every input format preprocess reads, each written by its own library, with a
    second column beside the text (and for Parquet several row groups)."""
    import gzip

    import datasets
    import pyarrow
    import pyarrow.ipc
    import pyarrow.parquet
    import zstandard

    lines = "".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(FORMAT_DOCS)).encode()
    paths = {name: directory / name for name in ("a.jsonl", "a.jsonl.gz", "a.ndjson.zst", "a.parquet", "a.arrow")}
    paths["a.jsonl"].write_bytes(lines)
    paths["a.jsonl.gz"].write_bytes(gzip.compress(lines))
    paths["a.ndjson.zst"].write_bytes(zstandard.ZstdCompressor().compress(lines))
    table = pyarrow.table({"id": list(range(len(FORMAT_DOCS))), "body": FORMAT_DOCS})
    pyarrow.parquet.write_table(table, paths["a.parquet"], row_group_size=7)
    with pyarrow.ipc.new_file(str(paths["a.arrow"]), table.schema) as writer:  # the IPC file format
        writer.write_table(table, max_chunksize=10)
    paths["hf"] = directory / "hf"
    datasets.Dataset.from_dict({"id": list(range(len(FORMAT_DOCS))), "body": FORMAT_DOCS}).save_to_disk(
        str(paths["hf"]), max_shard_size="2KB")  # several .arrow files, in state.json's order
    return paths


def test_preprocess_reads_every_input_format_alike(tmp_path):
    """JSONL plain, gzip and zstd, Parquet (row groups of 7), an Arrow IPC file and a Hugging Face
    dataset directory of several Arrow files: the same ids, in order, for the same documents."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    from phi4.data.preprocess import preprocess

    paths = _write_formats(tmp_path)
    assert len(list(paths["hf"].glob("*.arrow"))) > 1
    tok = get_tokenizer()
    expected = [tok.encode(d, allow_special=False) + [tok.eod_id] for d in FORMAT_DOCS]
    for name, path in paths.items():
        report = preprocess([path], tmp_path / "out" / name, text_key="body", workers=1, progress=False)
        assert (report.documents, report.bad_lines) == (len(FORMAT_DOCS), []), name
        ds = IndexedDataset(str(tmp_path / "out" / name))
        assert [ds[i].tolist() for i in range(len(ds))] == expected, name


def test_preprocess_names_the_file_and_column_or_row_it_cannot_read(tmp_path):
    import gzip

    import pyarrow
    import pyarrow.parquet

    from phi4.data.preprocess import preprocess
    from phi4.errors import ConfigError

    def refused(path, key="body") -> str:
        with pytest.raises(ConfigError) as caught:
            preprocess([path], tmp_path / "out" / "x", text_key=key, workers=1, progress=False)
        assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())  # nothing written
        return str(caught.value)

    table = pyarrow.table({"id": [1, 2, 3], "body": ["one", None, "three"]})
    pyarrow.parquet.write_table(table, tmp_path / "nulls.parquet")
    assert refused(tmp_path / "nulls.parquet", key="text") == (
        f"{tmp_path}/nulls.parquet: no column 'text' (--text-key); its columns: id, body")
    assert refused(tmp_path / "nulls.parquet", key="id") == (
        f"{tmp_path}/nulls.parquet: column 'id' (--text-key) holds int64, not strings")
    (tmp_path / "notes.txt").write_text("hello\n")
    assert refused(tmp_path / "notes.txt").startswith(f"{tmp_path}/notes.txt: not a format preprocess reads")
    (tmp_path / "fake.parquet").write_text("not parquet")
    assert refused(tmp_path / "fake.parquet").startswith(f"{tmp_path}/fake.parquet: not a readable Parquet file")
    dd = tmp_path / "dd"
    (dd / "train").mkdir(parents=True)
    (dd / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    assert refused(dd) == (f"{dd}: a Hugging Face DatasetDict (splits: train, test); give one split's directory, "
                           f"e.g. {dd}/train")
    whole = gzip.compress("".join(json.dumps({"body": f"doc {i} " * 50}) + "\n" for i in range(200)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])
    assert re.fullmatch(rf"{tmp_path}/cut.jsonl.gz: cannot be decompressed after line \d+ \(EOFError: .*\): "
                        r"a truncated or corrupt file", refused(tmp_path / "cut.jsonl.gz"))

    # a null in the text column is a bad row by file and row; the others are tokenized
    report = preprocess([tmp_path / "nulls.parquet"], tmp_path / "out" / "nulls", text_key="body", workers=1,
                        progress=False)
    assert report.documents == 2
    assert report.bad_lines == [f"{tmp_path}/nulls.parquet:row 2: no string under the key 'body' (null)"]


def test_blend_follows_weights(tmp_path):
    """3 sources weighted 0.5/0.3/0.2: over 12,000 samples each share within 0.01 of its weight."""
    from phi4.data.blend import Source, build_datasets
    from phi4.data.synth import write_synthetic_jsonl
    from phi4.data.preprocess import preprocess

    sources = []
    for i, weight in enumerate([0.5, 0.3, 0.2]):
        write_synthetic_jsonl(tmp_path / f"s{i}.jsonl", 800, seed=i)
        preprocess([tmp_path / f"s{i}.jsonl"], tmp_path / f"s{i}", workers=1, progress=False)
        sources.append(Source(f"s{i}", str(tmp_path / f"s{i}"), weight))
    samples = 12_000
    train, valid = build_datasets(sources, 32, samples, 50, 7, "98,2,0", str(tmp_path / "cache"))
    counts = collections.Counter(int(train[i]["dataset_id"]) for i in range(samples))
    for i, source in enumerate(sources):
        assert abs(counts[i] / samples - source.weight) <= 0.01, counts
    sample = train[0]
    assert sample["tokens"].shape == (32,) and (sample["labels"][:-1] == sample["tokens"][1:]).all()
    assert len(valid) >= 50


def test_missing_source_is_named(tmp_path):
    from phi4.data.blend import Source, check_sources
    from phi4.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data.sources.web: .*/web.bin and .idx not found; make it with `phi4-data preprocess"):
        check_sources([Source("web", str(tmp_path / "web"), 1.0)])


def test_long_texts_are_encoded_in_pieces_that_give_one_calls_ids():
    """The BPE library refuses over 200,000 tokens in a call; a long text is cut where the
    pre-tokenizer cuts anyway, so its ids equal one call's (checked with small pieces on a text
    one call can still encode), and a text far past the limits is encoded whole."""
    import random

    from phi4.data.tokenizer import PIECE_CHARS

    tok = get_tokenizer()
    rng = random.Random(0)
    words = ["the", "sum", "of", "12345", "naïve", "café", "中文", "🙂", "  ", "\n", "\n\n", ",", ".", "'s",
             "don't", "(", ")", "\t", " ", "x" * 12]
    text = "".join(rng.choice(words) + rng.choice([" ", " ", "", "\n"]) for _ in range(20000))
    whole = tok._bpe.encode_ordinary(text)
    for piece_chars in (400, 1000, 7777):
        assert tok._encode_ordinary(text, piece_chars) == whole, piece_chars
    long = "ab " * 100_000 + "x" * (3 * PIECE_CHARS)  # 300,001 tokens, then 300,000 characters of one word
    ids = tok.encode(long, allow_special=False)
    assert tok.decode(ids) == long and ids[:100_000] == tok._bpe.encode_ordinary("ab " * 120_000 + "ab")[:100_000]


def test_preprocess_takes_long_documents_and_reports_what_it_cannot_read(tmp_path):
    """A 210,000-token document is tokenized (it used to hang the worker pool); invalid UTF-8 is a
    bad line by file and line; blank lines are counted."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    long = "word " * 210_000  # past the BPE library's 200,000-token limit
    path = tmp_path / "in.jsonl"
    with open(path, "wb") as f:
        f.write((json.dumps({"text": "short"}) + "\n").encode())
        f.write(b"\n   \n")
        f.write(b'{"text": "caf\xe9"}\n')
        f.write((json.dumps({"text": long}) + "\n").encode())
    out = _phi4_data("preprocess", "--input", path, "--output-prefix", tmp_path / "out", "--workers", "2",
                     "--no-progress")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "2 documents" in out.stdout and "2 blank lines skipped" in out.stdout
    assert f"{path}:4: not valid UTF-8 (byte 13 of the line)" in out.stderr
    tok = get_tokenizer()
    ds = IndexedDataset(str(tmp_path / "out"))
    assert ds[1].tolist() == tok.encode(long, allow_special=False) + [tok.eod_id]


def test_preprocess_stopped_by_sigterm_leaves_nothing_and_says_how_far(tmp_path):
    import signal
    import time

    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i} " * 200}) + "\n" for i in range(12000)))
    proc = subprocess.Popen([str(BIN / "phi4-data"), "preprocess", "--input", str(path), "--output-prefix",
                             str(tmp_path / "out/docs"), "--workers", "1", "--no-progress"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not list((tmp_path / "out").glob(".docs.partial-*.bin")) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "stopped by SIGTERM after" in err and "nothing was written" in err and "Traceback" not in err
    assert err.strip().count("\n") == 0
    assert not [p for p in (tmp_path / "out").iterdir()]


def test_invalid_utf8_is_a_bad_line_for_every_jsonl_reader(tmp_path):
    """One policy for chat, preference pairs, eval tasks and eval sets: a line that is not valid
    UTF-8 is a bad line by file and line (skipped and reported, or refused), never a traceback."""
    from phi4.data.jsonl import BadLine, checked_records, jsonl_records
    from phi4.errors import ConfigError

    path = tmp_path / "x.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    records = list(jsonl_records(path))
    assert records[0] == (f"{path}:1", {"a": 1})
    assert isinstance(records[1][1], BadLine) and str(records[1][1]) == "not valid UTF-8 (byte 7 of the line)"
    with pytest.raises(ConfigError, match=rf"^--eval {path}:2: not valid UTF-8 \(byte 7 of the line\)$"):
        list(checked_records(path, "--eval "))


def test_indexed_data_is_checked_whole_and_within_the_vocabulary(tmp_path):
    from phi4.data.check import check_tokens, largest_id, sources_fingerprint
    from phi4.errors import ConfigError

    prefix = tmp_path / "web"
    write_indexed(prefix, [[1, 2, 3], [100351, 5]])
    check_tokens(str(prefix), 100352, "data.sources.web")
    assert json.loads((tmp_path / "web.check.json").read_text())["largest_id"] == 100351  # cached beside it
    before = sources_fingerprint([str(prefix)])

    write_indexed(prefix, [[1, 2, 3], [100352, 5]])  # re-made: the cache no longer applies
    with pytest.raises(ConfigError, match=rf"data.sources.web: {prefix}.bin holds token id 100352, but the model's "
                                          r"vocabulary has model.vocab_size=100352 ids \(0-100351\)"):
        check_tokens(str(prefix), 100352, "data.sources.web")
    assert largest_id(str(prefix), numpy.int32) == 100352 and sources_fingerprint([str(prefix)]) != before

    data = (tmp_path / "web.bin").read_bytes()
    (tmp_path / "web.bin").write_bytes(data[:-4])
    with pytest.raises(ConfigError, match=rf"{prefix}.bin: 16 bytes, but {prefix}.idx describes 20 .* does not match"):
        check_tokens(str(prefix), 100352, "data.sources.web")
    idx = (tmp_path / "web.idx").read_bytes()
    (tmp_path / "web.idx").write_bytes(idx[:-3])
    with pytest.raises(ConfigError, match=rf"{prefix}.idx: \d+ bytes, but its counts .* truncated or corrupt"):
        check_tokens(str(prefix), 100352, "data.sources.web")
    (tmp_path / "web.idx").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"web.idx: not a Megatron-Core index"):
        check_tokens(str(prefix), 100352, "data.sources.web")
    write_indexed(tmp_path / "empty", [])
    with pytest.raises(ConfigError, match=r"empty.bin holds no tokens"):
        check_tokens(str(tmp_path / "empty"), 100352, "data.sources.empty")
