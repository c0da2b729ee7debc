"""phi4-data decontaminate: planted copies of evaluation text (verbatim, re-cased, re-spaced and
re-punctuated) are all found, near misses that share only 12 consecutive words are all kept,
and the report counts what went per source."""

from __future__ import annotations

import json
import random

import pytest

from phi4.data.decontaminate import decontaminate
from phi4.errors import ConfigError

# Two disjoint vocabularies: evaluation text from one, filler from the other, so a window of an
# item can only be extended by the words the test puts next to it.
EVAL_WORDS = [f"alpha{i}" for i in range(400)] + ["the", "of", "and", "a"]
FILLER = [f"zulu{i}" for i in range(400)]


def _sentence(rng, words, n):
    return " ".join(rng.choice(words) for _ in range(n))


def _recase(text, rng):
    return "".join(c.upper() if rng.random() < 0.5 else c for c in text)


def _respace(words):
    seps = ["  ", "\n", "\t", ", ", " - ", ".\n\n", " ; "]
    return "".join(w + seps[i % len(seps)] for i, w in enumerate(words)).strip()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = random.Random(7)
    root = tmp_path_factory.mktemp("decontaminate")
    items = [_sentence(rng, EVAL_WORDS, 30) for _ in range(40)]
    with (root / "bench.jsonl").open("w") as f:
        for i, item in enumerate(items[:30]):
            f.write(json.dumps({"id": i, "question": item, "answer": 3}) + "\n")
        for item in items[30:]:
            f.write(json.dumps({"messages": [{"role": "user", "content": item}]}) + "\n")
        f.write(json.dumps({"question": "too short to share thirteen words"}) + "\n")
    planted, near = set(), set()
    sources = {}
    for name in ("web", "books"):
        docs = []
        for i in range(120):
            doc = _sentence(rng, FILLER, rng.randint(20, 200))
            kind = i % 6
            item = items[rng.randrange(len(items))].split()
            start = rng.randrange(len(item) - 13)
            if kind in (0, 1, 2):  # a 13-word (or longer) window of an item, in three disguises
                window = item[start : start + 13 + rng.randrange(3)]
                text = [" ".join(window), _recase(" ".join(window), rng), _respace(window)][kind]
                planted.add((name, i))
            elif kind == 3:  # a near miss: 12 words of an item
                text = " ".join(item[start : start + 12])
                near.add((name, i))
            else:
                text = None
            if text is not None:
                cut = rng.randrange(len(doc) // 2)
                doc = f"{doc[:cut]} {text} {doc[cut:]}" if rng.random() < 0.5 else f"{doc} {text}"
            docs.append({"text": doc, "doc": f"{name}{i}"})
        with (root / f"{name}.jsonl").open("w") as f:
            for d in docs:
                f.write(json.dumps(d) + "\n")
            if name == "web":
                f.write('{"text": "broken\n')
        sources[name] = docs
    return root, sources, planted, near


def _ids(path):
    return {json.loads(l)["doc"] for l in path.read_text().splitlines()}


def test_every_planted_copy_found_and_no_near_miss(corpus, tmp_path):
    from phi4.data.tokenizer import get_tokenizer

    root, sources, planted, near = corpus
    report = decontaminate([root / "web.jsonl", root / "books.jsonl"], [root / "bench.jsonl"], tmp_path / "clean",
                           removed_path=tmp_path / "removed.jsonl", workers=2, progress=False, lines_per_batch=16)
    removed = _ids(tmp_path / "removed.jsonl")
    assert removed == {f"{n}{i}" for n, i in planted}
    assert not removed & {f"{n}{i}" for n, i in near}
    tok = get_tokenizer()
    for source, name in zip(report.sources, ("web", "books")):
        kept = _ids(tmp_path / "clean" / f"{name}.jsonl")
        assert kept == {d["doc"] for d in sources[name]} - removed
        gone = [d for d in sources[name] if d["doc"] in removed]
        assert source.documents == 120 and source.removed_documents == len(gone) == 60
        assert source.removed_tokens == sum(len(tok.encode(d["text"], allow_special=False)) for d in gone)
    (bad,) = report.sources[0].bad_lines
    assert bad.startswith(f"{root / 'web.jsonl'}:121: not valid JSON") and not report.sources[1].bad_lines
    (bench,) = report.eval_sets
    assert bench.items == 41 and bench.too_short == 1
    saved = json.loads((tmp_path / "clean" / "decontamination.json").read_text())
    assert saved["sources"][1]["removed_documents"] == 60 and saved["eval_sets"][0]["too_short"] == 1


def test_shorter_ngram_catches_the_near_misses(corpus, tmp_path):
    root, _, planted, near = corpus
    decontaminate([root / "books.jsonl"], [root / "bench.jsonl"], tmp_path / "out", n=12, workers=1, progress=False)
    kept = _ids(tmp_path / "out" / "books.jsonl")
    assert not kept & {f"books{i}" for n, i in planted | near if n == "books"}


def test_bad_requests_leave_nothing_behind(corpus, tmp_path):
    root, *_ = corpus
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match="--eval .*missing.jsonl: not found"):
        decontaminate([root / "web.jsonl"], [root / "missing.jsonl"], out, progress=False)
    with pytest.raises(ConfigError, match="would overwrite the input"):
        decontaminate([root / "web.jsonl"], [root / "bench.jsonl"], root, progress=False)
    with pytest.raises(ConfigError, match="no item of .* has 40 words"):
        decontaminate([root / "web.jsonl"], [root / "bench.jsonl"], out, n=40, progress=False)
    assert not out.exists() or not any(out.iterdir())


def test_cli_reports_per_source_and_eval_set(corpus, tmp_path, capsys):
    from phi4.cli.data import main

    root, *_ = corpus
    main(["decontaminate", "--eval", str(root / "bench.jsonl"), "--input", str(root / "books.jsonl"),
          "--output-dir", str(tmp_path / "out"), "--workers", "1", "--no-progress"])
    out = capsys.readouterr().out
    assert "bench.jsonl: 41 items" in out and "1 shorter than 13 words (not checkable)" in out
    assert "books.jsonl: 120 documents, removed 60 (50.00%)" in out and "documents/s" in out
    with pytest.raises(SystemExit) as stop:
        main(["decontaminate", "--eval", str(root / "nope.jsonl"), "--input", str(root / "books.jsonl"),
              "--output-dir", str(tmp_path / "out2"), "--no-progress"])
    assert stop.value.code == 2 and "phi4-data: error: --eval" in capsys.readouterr().err


def test_invalid_utf8_is_a_bad_line_and_other_bytes_pass_unchanged(corpus, tmp_path):
    """The one policy of every JSONL reader: a line that is not UTF-8 is reported by file and
    line and not copied; every other line is copied byte for byte (no re-encoding)."""
    root, *_ = corpus
    lines = [json.dumps({"id": "a", "text": "café crème"}, ensure_ascii=False).encode(),
             b'{"id": "b", "text": "caf\xe9"}', b"", json.dumps({"id": "c", "text": "plain"}).encode()]
    (tmp_path / "in").mkdir()
    source = tmp_path / "in" / "mixed.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    report = decontaminate([source], [root / "bench.jsonl"], tmp_path / "out", workers=1, progress=False)
    assert report.sources[0].bad_lines == [f"{source}:2: not valid UTF-8 (byte 24 of the line)"]
    assert report.sources[0].documents == 2
    assert (tmp_path / "out" / "mixed.jsonl").read_bytes() == lines[0] + b"\n" + lines[3] + b"\n"
