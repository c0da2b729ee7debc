"""phi4-data: preprocess JSONL into indexed datasets Megatron-Core reads back exactly, with bad
lines reported; blends draw each source in proportion to its weight."""

import collections
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from phi4.data.tokenizer import get_tokenizer

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
