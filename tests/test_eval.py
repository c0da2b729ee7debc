"""Generative evaluation's model-agnostic parts: checkers, the score and its confidence interval,
pass@k, data-parallel shares, the generations file, and its settings' errors. A stand-in model
answers a known subset of the problems right."""

from __future__ import annotations

import json
import threading
from math import comb

import numpy
import pytest
from omegaconf import OmegaConf

from phi4.errors import ConfigError
from phi4.eval.checkers import load_checker, number_checker, string_checker
from phi4.eval.run import EvalSettings, evaluate, write_generations
from phi4.eval.score import Z95, pass_at_k, wilson_interval
from phi4.eval.tasks import load_items
from phi4.settings import Eval, check_ranges, load_group


def test_number_checker():
    right = {"answer": 1000}
    assert number_checker(right, "so the total is 1,000.\nAnswer: 1,000")
    assert number_checker(right, "Answer: 1000 dollars")
    assert number_checker(right, "first 12, then 1000")  # no "Answer:": the last number
    assert not number_checker(right, "Answer: 1000.5")
    assert not number_checker(right, "Answer: 100\n I meant 1000")  # the final answer is the answer line
    assert not number_checker(right, "no number at all")
    assert number_checker({"answer": "3/4"}, "Answer: 0.75")
    assert number_checker({"answer": -2}, "x = -2")
    assert not number_checker({"answer": 2}, "x = -2")


def test_string_checker():
    assert string_checker({"answer": "Paris"}, "The capital.\nAnswer:  Paris ")
    assert not string_checker({"answer": "Paris"}, "Answer: paris")
    assert string_checker({"answer": "B"}, "B")
    assert not string_checker({"answer": "B"}, "B because")


def custom_checker(problem: dict, response: str) -> bool:
    if "boom" in response:
        raise RuntimeError("cannot parse")
    return response.strip().endswith(problem["expect"])


def test_wilson_interval_is_the_root_pair_of_its_quadratic():
    """Wilson's interval: the p with (p_hat - p)^2 = z^2 p (1 - p) / n, solved here as a quadratic."""
    for k, n in ((7, 20), (0, 12), (12, 12), (33, 50)):
        p_hat, z2 = k / n, Z95 ** 2
        roots = sorted(numpy.roots([1 + z2 / n, -(2 * p_hat + z2 / n), p_hat ** 2]).real)
        low, high = wilson_interval(k, n)
        assert abs(low - max(roots[0], 0)) < 1e-12 and abs(high - min(roots[1], 1)) < 1e-12, (k, n)
    # and a worked value: 7 of 20 -> 18.1% to 56.7% (centre 0.3742, half-width 0.1930)
    low, high = wilson_interval(7, 20)
    assert round(low, 4) == 0.1812 and round(high, 4) == 0.5671


def test_pass_at_k_is_the_combinatorial_probability():
    for n, c, k in ((10, 3, 1), (10, 3, 5), (5, 0, 2), (5, 4, 2), (8, 8, 3)):
        expected = 1 - comb(n - c, k) / comb(n, k)
        assert abs(pass_at_k(n, c, k) - expected) < 1e-12


def _problems(tmp_path):
    """Eleven synthetic held-out problems (number checker), and three text problems with their own checkers."""
    from phi4.data.synth import write_synthetic_jsonl

    write_synthetic_jsonl(tmp_path / "arith.jsonl", 11, seed=4, split="test")
    with (tmp_path / "words.jsonl").open("w") as f:
        for i, (answer, checker) in enumerate([("Paris", "string"), ("Rome", "string"), ("x", None)]):
            # the third takes the configured default: a function named by eval.checker, not by the file
            f.write(json.dumps({"id": f"w{i}", "prompt": f"Question {i}?", "answer": answer, "expect": answer,
                                **({"checker": checker} if checker else {}), "task": "words"}) + "\n")
    return (load_items([tmp_path / "arith.jsonl"], "chat", "number")
            + load_items([tmp_path / "words.jsonl"], "chat", "test_eval:custom_checker"))


class StandIn:
    """Answers the problems whose position is in `right` correctly, the others wrong; a sample index
    can be made wrong too. It reads which problem it was asked from the prompt's tokens."""

    def __init__(self, items, right: set[int], wrong_samples: set[int] = frozenset()):
        from phi4.data.tokenizer import get_tokenizer

        self.tok = get_tokenizer()
        self.index = {tuple(item.prompt_ids): i for i, item in enumerate(items)}
        self.items, self.right, self.wrong_samples = items, right, wrong_samples
        self.seen: dict[int, int] = {}

    def __call__(self, prompts, seed):
        out = []
        for ids in prompts:
            i = self.index[tuple(ids)]
            sample = self.seen.get(i, 0)
            self.seen[i] = sample + 1
            item = self.items[i]
            good = i in self.right and sample not in self.wrong_samples
            answer = item.record["answer"] if good else "nothing"
            text = f"Working.\nAnswer: {answer}" if item.task != "words" or item.record.get("checker") == "string" \
                else ("boom" if not good else f"so {answer}")
            out.append(self.tok.encode(text, allow_special=False) + [self.tok.eos_id])
        return out


def test_a_tasks_file_cannot_name_code_to_run(tmp_path):
    """A line naming `module:function` as its checker is refused with its file and line, before
    anything is imported; the same function given as eval.checker is the runner's choice."""
    import sys

    path = tmp_path / "tasks.jsonl"
    path.write_text(json.dumps({"prompt": "2+2?", "answer": 4}) + "\n"
                    + json.dumps({"prompt": "hi", "answer": "x", "checker": "pydoc:pipepager"}) + "\n")
    sys.modules.pop("pydoc", None)
    with pytest.raises(ConfigError) as err:
        load_items([path], "chat", "number")
    message = str(err.value)
    assert message.startswith(f"{path}:2: checker='pydoc:pipepager': a tasks file may name only a built-in checker")
    assert "\n" not in message and "pydoc" not in sys.modules
    path.write_text(json.dumps({"prompt": "hi", "answer": "x", "expect": "x"}) + "\n")
    assert load_items([path], "chat", "test_eval:custom_checker")[0].checker is custom_checker


def test_accuracy_is_exactly_the_right_fraction(tmp_path):
    from phi4.data.tokenizer import get_tokenizer

    items = _problems(tmp_path)
    right = {0, 2, 3, 7, 10, 11, 12}  # 5 of the 11 arithmetic problems, 2 of the 3 words
    tok = get_tokenizer()
    report = evaluate(items, StandIn(items, right), tok.decode, {tok.eos_id}, EvalSettings(batch_size=4))
    scores = {s.task: s for s in report.scores}
    assert [s.task for s in report.scores] == ["arith", "words"]
    assert scores["arith"].accuracy == 5 / 11 and scores["arith"].problems == 11
    assert scores["words"].accuracy == 2 / 3
    assert scores["arith"].ci95 == wilson_interval(5, 11)
    assert [g["correct"] for g in report.generations] == [i in right for i in range(14)]
    assert report.generations[13].get("checker_error") == "RuntimeError: cannot parse"  # a failed check is wrong
    assert report.generations[0]["response"].endswith(f"Answer: {items[0].record['answer']}")  # eos cut off
    assert report.generations[0]["stopped"]
    record = scores["arith"].record()
    assert record["eval/arith/accuracy"] == 5 / 11 and record["eval/arith/ci95_low"] == wilson_interval(5, 11)[0]
    assert "45.5% (95% CI" in scores["arith"].line()
    write_generations(tmp_path / "g.jsonl", report.generations, {"step": 7})
    lines = [json.loads(l) for l in (tmp_path / "g.jsonl").read_text().splitlines()]
    assert len(lines) == 14 and lines[3]["step"] == 7 and lines[3]["correct"] and "index" not in lines[3]


def test_data_parallel_ranks_share_the_problems(tmp_path):
    """Three ranks (threads exchanging their lists as all_gather_object would) answer disjoint
    shares and agree on the same report as one rank alone."""
    from phi4.data.tokenizer import get_tokenizer

    items = _problems(tmp_path)
    tok = get_tokenizer()
    right = {1, 4, 5, 9, 12}
    single = evaluate(items, StandIn(items, right), tok.decode, {tok.eos_id}, EvalSettings())
    barrier, shared, asked, reports = threading.Barrier(3), {}, {}, {}

    def gather(rows):
        shared[threading.current_thread().name] = rows
        barrier.wait()
        return [r for name in sorted(shared) for r in shared[name]]

    def rank(r):
        model = StandIn(items, right)
        reports[r] = evaluate(items, model, tok.decode, {tok.eos_id}, EvalSettings(batch_size=2), r, 3, gather,
                              progress=False)
        asked[r] = set(model.seen)

    threads = [threading.Thread(target=rank, args=(r,), name=str(r)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [asked[r] for r in range(3)] == [set(range(r, 14, 3)) for r in range(3)]
    for r in range(3):
        assert reports[r].scores == single.scores
        assert reports[r].generations == single.generations


def test_pass_at_k_over_samples(tmp_path):
    from phi4.data.tokenizer import get_tokenizer

    items = _problems(tmp_path)[:11]
    tok = get_tokenizer()
    right = {0, 1, 2, 3}  # right on samples 0 and 2 of 4 (wrong on 1 and 3); the rest never
    settings = EvalSettings(samples=4, pass_at=(1, 2, 4), temperature=0.7)
    report = evaluate(items, StandIn(items, right, {1, 3}), tok.decode, {tok.eos_id}, settings)
    (score,) = report.scores
    assert score.samples == 4 and len(report.generations) == 44
    assert score.accuracy == 4 * 2 / 44
    assert abs(score.pass_at[2] - 4 * (1 - comb(2, 2) / comb(4, 2)) / 11) < 1e-12
    assert score.pass_at[4] == 4 / 11
    per_problem = [0.5] * 4 + [0.0] * 7
    mean, sd = numpy.mean(per_problem), numpy.std(per_problem, ddof=1)
    half = Z95 * sd / 11 ** 0.5
    assert abs(score.ci95[0] - (mean - half)) < 1e-12 and abs(score.ci95[1] - (mean + half)) < 1e-12


@pytest.mark.parametrize("settings,message", [
    (dict(samples=4), "greedy decoding answers the same"),
    (dict(samples=2, temperature=1.0, pass_at=(4,)), "eval.pass_at=.4.: each k must be between 1 and eval.samples=2"),
])
def test_bad_settings(settings, message):
    with pytest.raises(ConfigError, match=message):
        EvalSettings(**settings)


@pytest.mark.parametrize("settings,message", [
    (dict(top_p=0.0), r"eval.top_p=0.0; valid: a number above 0 and at most 1"),
    (dict(max_new_tokens=0), r"eval.max_new_tokens=0; valid: a whole number at least 1"),
])
def test_bad_ranges(settings, message):
    with pytest.raises(ConfigError, match=message):
        check_ranges(OmegaConf.create({"eval": settings}), ("eval",))


def test_bad_problem_files(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "2+2?", "answer": 4}\n{"prompt": "oops"\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not valid JSON"):
        load_items([bad], "chat", "number")
    bad.write_text('{"question": "no answer here"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: no 'answer' for the number checker"):
        load_items([bad], "chat", "number")
    bad.write_text('{"prompt": "2+2?", "answer": 4, "checker": "regex"}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: checker='regex' is not a known checker; valid: 'number'"):
        load_items([bad], "chat", "number")
    bad.write_text('{"prompt": "' + "word " * 200 + '", "answer": 4}\n')
    with pytest.raises(ConfigError, match=r"bad.jsonl:1: the prompt's \d+ tokens \+ eval.max_new_tokens=64 exceed"):
        load_items([bad], "chat", "number", max_length=256, max_new_tokens=64)
    with pytest.raises(ConfigError, match="eval.template='Q: ': use 'chat' or a text with {prompt} once"):
        load_items([bad], "Q: ", "number")
    with pytest.raises(ConfigError, match="missing.jsonl not found"):
        load_items([tmp_path / "missing.jsonl"], "chat", "number")
    with pytest.raises(ConfigError, match="eval.checker='nope' is not a known checker"):
        load_checker("nope", "eval.checker")


def test_templates_render_the_prompt_as_text(tmp_path):
    from phi4.data.tokenizer import get_tokenizer
    from phi4.eval.tasks import render

    tok = get_tokenizer()
    chat = tok.decode(render("chat", "What is <|im_end|> 2+2?"))
    assert chat == "<|im_start|>user<|im_sep|>What is <|im_end|> 2+2?<|im_end|><|im_start|>assistant<|im_sep|>"
    assert render("chat", "x <|im_end|>").count(tok.eos_id) == 1  # the prompt cannot forge a turn end
    assert tok.decode(render("Problem: {prompt}\nSolution:", "2+2?")) == "Problem: 2+2?\nSolution:"


def test_context_parallel_and_empty_tasks_are_refused():
    from phi4.eval.evaluator import check_eval

    from helpers import ROOT

    ev = Eval(**load_group("eval", ROOT / "conf/eval/default.yaml"))
    with pytest.raises(ConfigError, match="eval.tasks is empty and eval.synthetic is null"):
        check_eval(ev, cp=1)
    ev.tasks = ["no/such/bench.jsonl"]
    with pytest.raises(ConfigError, match="eval.tasks: not found: no/such/bench.jsonl"):
        check_eval(ev, cp=1)
    ev.tasks, ev.synthetic = [], {"problems": 4, "seed": 0}
    with pytest.raises(ConfigError, match="needs topology.cp=1"):
        check_eval(ev, cp=2)
    assert check_eval(ev, cp=1).max_new_tokens == 256


def test_decoding_jobs_drop_sequence_parallelism():
    """phi4-eval and phi4-pts build the model without SP (same weights), so tp > 1 keeps the KV cache."""
    from helpers import TopologyConfig
    from phi4.eval.generate import decoding_topology

    assert decoding_topology(TopologyConfig(tp=2, sp=True)) == TopologyConfig(tp=2)
    assert decoding_topology(TopologyConfig(pp=2)) == TopologyConfig(pp=2)


def test_a_stopped_evaluation_resumes_where_it_stopped(tmp_path):
    """Stopped after its first batch, then run again with what the first run recorded: only the
    other problems are asked, and the report is the uninterrupted run's."""
    from phi4.data.tokenizer import get_tokenizer
    from phi4.eval.run import EvalStopped

    items = _problems(tmp_path)
    tok = get_tokenizer()
    right = {0, 5, 6, 13}
    settings = EvalSettings(batch_size=4)
    straight = evaluate(items, StandIn(items, right), tok.decode, {tok.eos_id}, settings)
    recorded = []
    with pytest.raises(EvalStopped, match="stopped after 4 of 14 problems"):
        evaluate(items, StandIn(items, right), tok.decode, {tok.eos_id}, settings, record=recorded.extend,
                 should_stop=lambda: True)
    assert [g["index"] for g in recorded] == [0, 1, 2, 3]
    model = StandIn(items, right)
    resumed = evaluate(items, model, tok.decode, {tok.eos_id}, settings, done=recorded)
    assert set(model.seen) == set(range(4, 14))
    assert resumed.scores == straight.scores and resumed.generations == straight.generations


def test_part_files_lose_only_a_torn_last_line(tmp_path):
    from phi4.data.jsonl import append_records, read_part

    part = tmp_path / "part-00000-of-00001.jsonl"
    with part.open("a") as f:
        append_records(f, [{"index": 0}, {"index": 1}])
    with part.open("a") as f:
        f.write('{"index": 2, "resp')  # killed mid-write
    with pytest.raises(ConfigError, match="ends in a partial line"):
        read_part(part, repair=False)
    assert read_part(part, repair=True) == [{"index": 0}, {"index": 1}]
    assert part.read_text().endswith('{"index": 1}\n')
    part.write_text('{"index": 0}\nnot json\n{"index": 2}\n')
    with pytest.raises(ConfigError, match="line 2 is not valid JSON"):
        read_part(part, repair=True)


def test_phi4_eval_without_a_checkpoint_is_one_line(tmp_path, capsys):
    """An unset required setting (`???`) is one line and exit 2, from any entry point."""
    import logging

    from hydra import compose, initialize_config_dir

    from helpers import ROOT
    from phi4.eval.job import evaluate_checkpoint
    from phi4.logs import run_job

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("evaluate", overrides=[f"run_dir={tmp_path / 'e'}"])
    handlers, level = logging.root.handlers[:], logging.root.level  # run_job sets up the console
    try:
        with pytest.raises(SystemExit) as stop:
            run_job(evaluate_checkpoint, cfg, logging.getLogger("phi4.eval"), {ConfigError: 2})
    finally:
        logging.root.handlers[:] = handlers
        logging.root.setLevel(level)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "error: checkpoint is not set; give checkpoint=... on the command line" in err and "Traceback" not in err
    assert not (tmp_path / "e").exists()
