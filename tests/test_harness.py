"""lm-evaluation-harness on a phi4 checkpoint (phi4.eval.harness, phi4-lm-eval) against lm-eval's own
`hf` model on the Hugging Face export of the same checkpoint, with local task files (no hub): a
multiple-choice task (log-likelihoods and their greedy flags), a perplexity task (rolling
log-likelihoods over several windows, an empty document included) and a generation task (greedy,
cut at a stop string, one prompt truncated from the left). The phi4 model runs in TP=2, PP=2 and
two data-parallel ranks; every log-likelihood equals the reference within 1e-4 at fp32 (a rolling
document's total, a sum of ~70 tokens of ~-11 each, within 1e-4 per token: fp32 itself resolves
a total of -790 only to 6e-5), and every generation and metric is the same."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import phi3_reference, random_hf_weights, tiny_model
from multirank import run_ranks

MODEL = dict(num_layers=2, max_position_embeddings=64)
MAX_LENGTH = 24  # tokens: the perplexity documents span several windows, one generation prompt is cut
TASKS = ["phi4_mc", "phi4_roll", "phi4_gen"]
BATCH = 4
TOL = 1e-4
OFFLINE = dict(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")

MC = [{"question": f"What is {a} plus {b}?", "choices": [str(a + b), str(a + b + 1), str(a * b), "none of these"],
       "answer": a % 3} for a, b in [(1, 2), (3, 4), (10, 7), (25, 31), (6, 6), (2, 9)]]
MC_CONTEXT = "Question: {question}\nAnswer:"
ROLL = [{"text": " ".join(f"word{i * j % 17} and the number {i + j}." for j in range(8))} for i in range(4)] + [{"text": ""}]
GEN = [{"prompt": f"Count: {' '.join(str(k) for k in range(i, i + n))}", "answer": str(i + n)}
       for i, n in [(1, 3), (5, 20), (2, 4), (9, 6)]]


def _task_files(directory: Path, mc: list[dict]) -> None:
    """Three lm-eval task configs over local JSONL files (the `json` dataset builder, offline)."""
    def common(name: str) -> str:
        return f"dataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {directory}/{name}.jsonl\ntest_split: test\n"

    for name, rows in (("mc", mc), ("roll", ROLL), ("gen", GEN)):
        (directory / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (directory / "mc.yaml").write_text(
        "task: phi4_mc\n" + common("mc") + "output_type: multiple_choice\n"
        + 'doc_to_text: "Question: {{question}}\\nAnswer:"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        + 'target_delimiter: ""\n'  # a choice is the continuation itself: the greedy choice stays greedy
        + "metric_list:\n  - metric: acc\n  - metric: acc_norm\n")
    (directory / "roll.yaml").write_text(
        "task: phi4_roll\n" + common("roll") + "output_type: loglikelihood_rolling\n"
        + 'doc_to_text: ""\ndoc_to_target: "{{text}}"\n'
        + "metric_list:\n  - metric: word_perplexity\n  - metric: byte_perplexity\n  - metric: bits_per_byte\n")
    (directory / "gen.yaml").write_text(
        "task: phi4_gen\n" + common("gen") + "output_type: generate_until\n"
        + 'doc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
        + 'generation_kwargs:\n  until: ["\\n\\n"]\n  max_gen_toks: 5\n  do_sample: false\n'
        + "metric_list:\n  - metric: exact_match\n")


def _with_greedy_choice(hf) -> list[dict]:
    """MC with one choice the model itself would continue with (one token), so a greedy flag is true."""
    from phi4.data.tokenizer import get_tokenizer

    tok = get_tokenizer()
    docs = [dict(d, choices=list(d["choices"])) for d in MC]
    for doc in docs:
        context = tok.encode(MC_CONTEXT.format(**doc))
        with torch.no_grad():
            token = int(hf(torch.tensor([context])).logits[0, -1].argmax())
        text = tok.decode([token])
        if token < 100256 and tok.encode(MC_CONTEXT.format(**doc) + text) == context + [token]:
            doc["choices"][1] = text
            return docs
    raise AssertionError("no question's greedy next token round-trips through the tokenizer")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(mcore checkpoint, its Hugging Face export, the task directory): random weights through
    phi4-convert hf-to-mcore, then back with mcore-to-hf (which writes the tokenizer)."""
    model = tiny_model(**MODEL)
    hf = phi3_reference(model)
    hf.load_state_dict(random_hf_weights(model, seed=5))
    directory = tmp_path_factory.mktemp("harness")
    hf.save_pretrained(str(directory / "source"))
    tasks = directory / "tasks"
    tasks.mkdir()
    _task_files(tasks, _with_greedy_choice(hf))
    convert = str(Path(sys.executable).parent / "phi4-convert")
    for args in (["hf-to-mcore", "--hf", str(directory / "source"), "--out", str(directory / "mcore")],
                 ["mcore-to-hf", "--ckpt", str(directory / "mcore"), "--out", str(directory / "export")]):
        out = subprocess.run([convert, *args, "--no-progress"], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
    return directory / "mcore", directory / "export", tasks


def _evaluate(model: str, model_args: dict, tasks: str, home: str):
    """lm-eval's simple_evaluate on the three tasks: (results, {task: [(doc_id, resps)]}), or None off rank 0.
    Only the test's own tasks are indexed: lm-eval's ~14,000 built-in task files take 20 s to read."""
    os.environ.update(OFFLINE, HF_HOME=home)  # before datasets is imported: its cache stays in the test's directory
    import lm_eval
    from lm_eval.tasks import TaskManager

    import phi4.eval.harness  # noqa: F401  registers the phi4 model

    out = lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=TASKS, batch_size=BATCH,
                                  task_manager=TaskManager(include_path=tasks, include_defaults=False),
                                  bootstrap_iters=0, log_samples=True)
    if out is None:
        return None
    samples = {t: sorted((s["doc_id"], s["resps"]) for s in out["samples"][t]) for t in TASKS}
    return json.loads(json.dumps(out["results"], default=str)), samples


def _hf_reference(export: str, tasks: str, home: str):
    return _evaluate("hf", dict(pretrained=export, dtype="float32", device="cpu", max_length=MAX_LENGTH), tasks, home)


def _phi4_in_layouts(checkpoint: str, tasks: str, home: str) -> dict:
    """Each layout in turn, on the same two ranks: a new phi4 model rebuilds the parallel groups."""
    from megatron.core import parallel_state

    out = {}
    for name, layout in {"tp2": dict(tp=2), "pp2": dict(pp=2), "dp2": {}}.items():
        args = dict(checkpoint=checkpoint, max_length=MAX_LENGTH, dtype="fp32", **layout)
        result = _evaluate("phi4", args, tasks, home)
        out[name] = (parallel_state.get_data_parallel_world_size(), result)
    return out


@pytest.fixture(scope="module")
def reference(checkpoints, tmp_path_factory):
    _, export, tasks = checkpoints
    home = tmp_path_factory.mktemp("hf_home")
    results, samples = run_ranks(_hf_reference, 1, str(export), str(tasks), str(home), timeout=600)[0]
    # The comparison has teeth: a greedy flag is true, some documents span windows, a prompt was cut.
    assert any(resp[0][1] for _, resps in samples["phi4_mc"] for resp in resps)
    return results, samples


def _token_count(text: str) -> int:
    from phi4.data.tokenizer import get_tokenizer

    return len(get_tokenizer().encode(text))


def _assert_same(got, expected, where: str) -> None:
    results, samples = got
    ref_results, ref_samples = expected
    for (doc, resps), (ref_doc, ref_resps) in zip(samples["phi4_mc"], ref_samples["phi4_mc"], strict=True):
        assert doc == ref_doc
        for (value, greedy), (ref_value, ref_greedy) in zip([r[0] for r in resps], [r[0] for r in ref_resps], strict=True):
            assert abs(value - ref_value) <= TOL and greedy == ref_greedy, (where, doc, value, ref_value)
    for (doc, resps), (ref_doc, ref_resps) in zip(samples["phi4_roll"], ref_samples["phi4_roll"], strict=True):
        tokens = max(1, _token_count(ROLL[doc]["text"]))
        assert doc == ref_doc and abs(resps[0][0] - ref_resps[0][0]) <= TOL * tokens, (where, doc, resps, ref_resps)
    assert samples["phi4_gen"] == ref_samples["phi4_gen"], where
    for task in TASKS:
        for key, ref_value in ref_results[task].items():
            value = results[task][key]
            if isinstance(ref_value, float) and key.startswith(("word_perplexity", "byte_perplexity", "bits_per_byte")):
                assert value == pytest.approx(ref_value, rel=1e-5), (where, task, key)
            else:
                assert value == ref_value, (where, task, key)


def test_loglikelihoods_and_generations_equal_lm_evals_hf_model_in_every_layout(checkpoints, reference, tmp_path):
    checkpoint, _, tasks = checkpoints
    assert _token_count(ROLL[0]["text"]) > 2 * MAX_LENGTH and _token_count(GEN[1]["prompt"]) > MAX_LENGTH
    ranks = run_ranks(_phi4_in_layouts, 2, str(checkpoint), str(tasks), str(tmp_path / "hf_home"), timeout=900)
    for layout in ("tp2", "pp2", "dp2"):
        dp, result = ranks[0][layout]
        assert dp == (2 if layout == "dp2" else 1), layout
        _assert_same(result, reference, layout)
        # one writer: lm-eval returns the results on global rank 0 only
        assert ranks[1][layout][1] is None, layout


def test_phi4_lm_eval_is_lm_evals_command_line_with_the_phi4_model(checkpoints, reference, tmp_path):
    """One process; the results file lm-eval writes holds the reference's metrics; a model argument
    that does not exist is one line naming it and the valid ones, exit 2, nothing written; so is
    lm-eval's --use_cache in a launch of several processes."""
    checkpoint, _, tasks = checkpoints
    command = [str(Path(sys.executable).parent / "phi4-lm-eval"), "--include_path", str(tasks), "--tasks", "phi4_mc",
               "--batch_size", str(BATCH), "--output_path", str(tmp_path / "out")]
    env = {**os.environ, **OFFLINE, "HF_HOME": str(tmp_path / "hf_home")}
    out = subprocess.run([*command, "--model_args", f"checkpoint={checkpoint},max_length={MAX_LENGTH},dtype=fp32",
                          "--use_cache", str(tmp_path / "cache")], capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    written = list((tmp_path / "out").rglob("results_*.json"))
    assert len(written) == 1, written
    got = json.loads(written[0].read_text())
    assert got["results"]["phi4_mc"]["acc,none"] == reference[0]["phi4_mc"]["acc,none"]
    assert got["results"]["phi4_mc"]["acc_norm,none"] == reference[0]["phi4_mc"]["acc_norm,none"]
    assert "phi4_mc" in out.stdout  # lm-eval's table
    assert (tmp_path / "cache_rank0.db").stat().st_size > 0  # one process: lm-eval's cache is allowed

    bad = subprocess.run([*command[:-1], str(tmp_path / "bad"), "--model_args", f"checkpoint={checkpoint},tpp=2"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode == 2, bad.stderr[-3000:]
    assert bad.stderr.strip().splitlines()[-1] == ("error: model_args tpp: not an argument of the phi4 model; valid: "
                                                   "checkpoint, tp, pp, vp, dtype, batch_size, max_length, "
                                                   "max_gen_toks, seed")
    assert not (tmp_path / "bad").exists()

    # lm-eval's response cache is one sqlite file a process, named by a rank two processes can share
    shared = subprocess.run([*command, "--model_args", f"checkpoint={checkpoint}", "--use_cache", str(tmp_path / "shared")],
                            capture_output=True, text=True, env={**env, "RANK": "0", "WORLD_SIZE": "2"}, timeout=600)
    assert shared.returncode == 2, shared.stderr[-3000:]
    assert shared.stderr.strip().splitlines()[-1] == ("error: --use_cache: lm-eval's response cache works with one "
                                                      "process, not 2; leave it out, or run phi4-lm-eval as one "
                                                      "process (tp=pp=1)")
    assert not list(tmp_path.glob("shared*"))
