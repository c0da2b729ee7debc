"""Synthetic arithmetic problems: deterministic, varied, and their answers are right."""

import re
from fractions import Fraction

import pytest

from phi4.data.synth import KINDS, WORD_PROBLEMS, chat_record, generate


def test_deterministic_for_a_seed():
    assert list(generate(30, seed=5)) == list(generate(30, seed=5))
    assert list(generate(30, seed=5)) != list(generate(30, seed=6))


def test_every_kind_appears():
    assert {p.kind for p in generate(len(KINDS) * 2)} == set(WORD_PROBLEMS)  # the default mix
    assert {p.kind for p in generate(len(KINDS) * 2, kinds=list(KINDS))} == set(KINDS)
    with pytest.raises(ValueError, match="valid kinds"):
        list(generate(1, kinds=["nope"]))


def test_small_sums_as_conversations():
    problems = list(generate(200, seed=2, kinds=["small_sum"]))
    assert {p.answer for p in problems} == set(range(9))
    record = chat_record(problems[0])
    assert [m["role"] for m in record["messages"]] == ["user", "assistant"]
    assert record["messages"][1]["content"].endswith(f"Answer: {problems[0].answer}")


def _check(problem) -> bool:
    """Re-derive the answer from the question's numbers, independently of the generator."""
    n = [int(x) for x in re.findall(r"\d+", problem.question)]
    if problem.kind == "consecutive_evens":
        count, total = n
        first = Fraction(total - count * (count - 1), count)
        return first.denominator == 1 and first % 2 == 0 and first + 2 * (count - 1) == problem.answer
    if problem.kind == "rectangle":
        diff, perimeter = n
        width = (perimeter // 2 - diff) / 2
        return width * (width + diff) == problem.answer
    if problem.kind == "trip":
        t1, s1, t2, s2 = n
        return s1 * t1 + s2 * t2 == problem.answer
    if problem.kind == "discount":
        price, percent = n
        return Fraction(price * (100 - percent), 100) == problem.answer
    if problem.kind == "sequence":
        count, a, b, _ = n
        return count * (2 * a + (count - 1) * (b - a)) / 2 == problem.answer
    if problem.kind == "small_sum":
        a, b = n
        return a + b == problem.answer
    if problem.kind == "ages":
        ratio, years, total = n
        child = Fraction(total - 2 * years, ratio + 1)
        return ratio * child == problem.answer
    raise AssertionError(problem.kind)


def test_answers_are_correct():
    problems = list(generate(700, seed=11, kinds=list(KINDS)))
    wrong = [p for p in problems if not _check(p)]
    assert not wrong, wrong[:3]


def test_seed_example_shape():
    p = next(p for p in generate(200) if p.kind == "consecutive_evens" and "5 consecutive" in p.question)
    assert p.text().startswith("Problem: The sum of 5 consecutive even numbers")
    assert p.text().endswith(f"Answer: {p.answer}")


def test_held_out_split_never_meets_training():
    """Questions of the test split never appear in a training draw, whatever the seed; a training
    corpus generated for the default data has none of them."""
    from phi4.data.synth import TEST_PERCENT, split_of

    test = list(generate(300, seed=1, split="test"))
    train = [p for seed in (0, 1, 2) for p in generate(3000, seed=seed, split="train")]
    assert {split_of(p) for p in test} == {"test"} and {split_of(p) for p in train} == {"train"}
    assert not {p.question for p in test} & {p.question for p in train}
    assert {p.kind for p in test} == set(WORD_PROBLEMS)
    everything = list(generate(3000, seed=0))
    share = sum(split_of(p) == "test" for p in everything) / len(everything)
    assert abs(share - TEST_PERCENT / 100) < 0.03, share
    with pytest.raises(ValueError, match="valid: all, train, test"):
        list(generate(1, split="dev"))


def test_cli_writes_a_test_split_and_refuses_an_empty_one(tmp_path, capsys):
    import json

    from phi4.cli.data import main
    from phi4.data.synth import Problem, split_of

    main(["synth", "--count", "4", "--split", "test", "--kinds", "trip", "ages", "--out", str(tmp_path / "t.jsonl")])
    records = [json.loads(l) for l in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["trip", "ages", "trip", "ages"]
    assert {split_of(Problem(r["kind"], r["question"], "", r["answer"])) for r in records} == {"test"}
    with pytest.raises(SystemExit) as stop:  # 25 small sums: none falls in the test buckets
        main(["synth", "--count", "2", "--split", "test", "--kinds", "small_sum", "--out", str(tmp_path / "s.jsonl")])
    assert stop.value.code == 2
    assert "--split test: problem kind 'small_sum' has no questions in the test split" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.jsonl"]  # nothing half-written


@pytest.mark.parametrize("count", ["-5", "0", "ten"])
def test_cli_refuses_a_count_that_is_not_positive(tmp_path, capsys, count):
    from phi4.cli.data import main

    with pytest.raises(SystemExit) as stop:
        main(["synth", "--count", count, "--out", str(tmp_path / "p.jsonl")])
    assert stop.value.code == 2
    assert f"argument --count: '{count}': give a whole number of at least 1" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, named", [
    (["chat", "--input", "c.jsonl", "--output-prefix", "out/sft", "--seq-length", "-5"], "--seq-length: '-5'"),
    (["chat", "--input", "c.jsonl", "--output-prefix", "out/sft", "--seq-length", "0"], "--seq-length: '0'"),
    (["preprocess", "--input", "d.jsonl", "--output-prefix", "out/d", "--workers", "-1"], "--workers: '-1'"),
    (["decontaminate", "--eval", "e.jsonl", "--input", "d.jsonl", "--output-dir", "out", "--ngram", "0"], "--ngram: '0'"),
    (["synth", "--count", "3", "--seed", "-2", "--out", "out/p.jsonl"], "--seed: '-2'"),
])
def test_cli_refuses_a_size_that_is_not_a_whole_number_in_range(tmp_path, capsys, monkeypatch, args, named):
    """Each of phi4-data's counts and sizes is refused by name (before any input is read: none exists)."""
    from phi4.cli.data import main

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as stop:
        main(args)
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and f"argument {named}: give a whole number of at least" in errors[0], errors
    assert not list(tmp_path.iterdir())
