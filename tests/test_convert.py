"""phi4-convert, proven by logits: HF <-> Megatron-Core checkpoints of a tiny Phi-4-shaped model.

The reference is transformers' Phi3ForCausalLM with random weights (4 query heads per group,
a vocabulary that needs padding). fp32 logits agree within 1e-4; round trips are bit-exact.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import FP32, TopologyConfig, load_in_layouts, phi3_reference, random_hf_weights, tiny_model
from multirank import run_ranks

TOL = 1e-4
MODEL = dict(vocab_size=1000, num_layers=4, rope_base=250000.0, max_position_embeddings=128)
BIN = Path(sys.executable).parent


def _hf_logits(directory, tokens):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        return hf(input_ids=tokens).logits


def _tensors(directory) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(directory).glob("*.safetensors")):
        out.update(load_file(f))
    return out


TOKENS = torch.randint(0, MODEL["vocab_size"], (2, 40), generator=torch.Generator().manual_seed(5))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A sharded (with index) fp32 HF checkpoint and its logits on TOKENS."""
    model = tiny_model(**MODEL)
    hf = phi3_reference(model)
    hf.load_state_dict(random_hf_weights(model, seed=3))
    directory = tmp_path_factory.mktemp("hf") / "phi3"
    hf.save_pretrained(str(directory), max_shard_size="1MB")
    assert (directory / "model.safetensors.index.json").exists()
    with torch.no_grad():
        logits = hf(input_ids=TOKENS).logits
    assert logits.abs().max() > 1.0
    return directory, logits


@pytest.fixture(scope="module")
def mcore_dir(hf_dir, tmp_path_factory):
    from phi4.convert.convert import hf_to_mcore

    out = tmp_path_factory.mktemp("mcore") / "ckpt"
    hf_to_mcore(hf_dir[0], out, progress=False)
    return out


def test_round_trip_is_bit_exact(hf_dir, mcore_dir, tmp_path):
    from phi4.convert.convert import mcore_to_hf

    back = tmp_path / "hf_again"
    mcore_to_hf(mcore_dir, back, max_shard_bytes=300_000, progress=False)
    original, again = _tensors(hf_dir[0]), _tensors(back)
    assert sorted(original) == sorted(again)
    for name, tensor in original.items():
        assert again[name].dtype == tensor.dtype and torch.equal(again[name], tensor), name
    index = json.loads((back / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1  # sharded, with an index


def test_bf16_single_file_round_trip(tmp_path):
    """Without an index (one model.safetensors), in bf16 as microsoft/phi-4 ships."""
    from phi4.convert.convert import hf_to_mcore, mcore_to_hf

    model = tiny_model(**{**MODEL, "num_layers": 2})
    hf = phi3_reference(model)
    hf.load_state_dict(random_hf_weights(model, seed=8))
    hf.to(torch.bfloat16).save_pretrained(str(tmp_path / "hf"))
    assert not (tmp_path / "hf" / "model.safetensors.index.json").exists()
    hf_to_mcore(tmp_path / "hf", tmp_path / "mc", progress=False)
    mcore_to_hf(tmp_path / "mc", tmp_path / "back", progress=False)
    original, again = _tensors(tmp_path / "hf"), _tensors(tmp_path / "back")
    assert sorted(original) == sorted(again)
    assert all(again[k].dtype == torch.bfloat16 and torch.equal(again[k], v) for k, v in original.items())
    assert json.loads((tmp_path / "back" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def load_converted(ckpt: str, tokens: torch.Tensor) -> dict:
    """On 2 ranks: the converted checkpoint at TP=2, then at PP=2; logits of each."""
    from megatron.core import parallel_state

    from phi4.model.pipeline_schedule import logits_of_tokens

    model = tiny_model(**MODEL)
    out = {}
    for name, chunks in load_in_layouts(model, {"tp2": TopologyConfig(tp=2), "pp2": TopologyConfig(pp=2)}, ckpt):
        logits = logits_of_tokens(chunks, tokens)
        last = parallel_state.is_pipeline_last_stage()
        out[name] = logits[..., : model.vocab_size] if last else None
    return out


def test_converted_checkpoint_matches_transformers_at_tp2_and_pp2(hf_dir, mcore_dir):
    _, reference = hf_dir
    results = run_ranks(load_converted, 2, str(mcore_dir), TOKENS)
    for layout in ("tp2", "pp2"):
        got = [r[layout] for r in results if r[layout] is not None]
        assert got, layout
        for logits in got:
            diff = (logits - reference).abs().max().item()
            print(f"{layout}: max logit diff vs transformers {diff:.2e}")
            assert diff <= TOL, (layout, diff)


def train_and_save(run_dir: str, tokens: torch.Tensor) -> dict:
    """At TP=2: 3 optimizer steps from random init, then the checkpoint phi4-train writes
    (optimizer, scheduler and RNG state included)."""
    import dataclasses

    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from phi4.model.build import build_phi4_model, transformer_config
    from phi4.model.parallel import init_model_parallel
    from phi4.checkpoint.run import RunCheckpointer, run_states
    from phi4.train.trainer import TrainState
    from phi4.checkpoint.weights import MODEL_CONFIG_KEY
    from helpers import optim_settings
    from phi4.model.pipeline_schedule import logits_of_tokens, micro_batches_from_tokens
    from phi4.train.lm import lm_update
    from phi4.train.optimizer import build_optimizer, wrap_ddp

    model = dataclasses.replace(tiny_model(**MODEL), init_std=0.2)  # logits of order 1 from random init
    topology = TopologyConfig(tp=2)
    init_model_parallel(model, topology, FP32, seed=11)
    config = transformer_config(model, topology, FP32)
    ddp = wrap_ddp(build_phi4_model(model, topology, FP32, config=config), config)
    optimizer = build_optimizer(ddp, config, optim_settings(lr=1e-2))
    scheduler = OptimizerParamScheduler(optimizer, init_lr=1e-2, max_lr=1e-2, min_lr=1e-2, lr_warmup_steps=0,
                                        lr_decay_steps=3, lr_decay_style="constant", start_wd=0.1, end_wd=0.1,
                                        wd_incr_steps=3, wd_incr_style="constant")
    rows = torch.randint(0, model.vocab_size, (4, 33), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        lm_update(ddp, optimizer, micro_batches_from_tokens(rows, 2))
        scheduler.step(1)
    states = run_states(ddp, optimizer, scheduler, TrainState(step=3))
    directory = RunCheckpointer(run_dir, keep=1, async_save=False, states=states,
                                describe=lambda: {MODEL_CONFIG_KEY: dataclasses.asdict(model)}).save(3)
    return dict(logits=logits_of_tokens(ddp, tokens)[..., : model.vocab_size], checkpoint=str(directory))


def test_trained_tp2_checkpoint_converts_to_transformers(tmp_path):
    from phi4.convert.convert import mcore_to_hf

    results = run_ranks(train_and_save, 2, str(tmp_path / "run"), TOKENS)
    ckpt = Path(results[0]["checkpoint"])
    ours = results[0]["logits"]
    assert ours.abs().max() > 1.0
    assert torch.equal(results[0]["logits"], results[1]["logits"])
    mcore_to_hf(ckpt, tmp_path / "hf", progress=False)  # optimizer state in the checkpoint is skipped
    diff = (_hf_logits(tmp_path / "hf", TOKENS) - ours).abs().max().item()
    print(f"trained at TP=2 -> transformers: max logit diff {diff:.2e}")
    assert diff <= TOL


def test_exported_tokenizer(tmp_path):
    """The produced directory's tokenizer gives the ids of docs/model.md, "Tokenizer", agrees with
    phi4's own tokenizer on many varied strings, and renders the Phi-4 chat format exactly."""
    import random

    from transformers import AutoTokenizer

    from phi4.convert.tokenizer_export import write_tokenizer
    from phi4.data.tokenizer import get_tokenizer

    write_tokenizer(tmp_path, 16384)
    assert "chat_template" in json.loads((tmp_path / "tokenizer_config.json").read_text())
    hf = AutoTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert hf.encode("hello world") == [15339, 1917]
    assert hf.encode("tiktoken is great!") == [83, 1609, 5963, 374, 2294, 0]
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (100257, 100265, 100349)
    assert hf.convert_tokens_to_ids(["<|im_start|>", "<|im_sep|>", "<|endofprompt|>", "<|dummy_85|>"]) == [
        100264, 100266, 100276, 100349]
    messages = [{"role": "system", "content": "You are a tutor."}, {"role": "user", "content": "2+2?"},
                {"role": "assistant", "content": "4"}]
    assert hf.apply_chat_template(messages, tokenize=False) == (
        "<|im_start|>system<|im_sep|>You are a tutor.<|im_end|><|im_start|>user<|im_sep|>2+2?<|im_end|>"
        "<|im_start|>assistant<|im_sep|>4<|im_end|>")
    assert hf.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_end|><|im_start|>assistant<|im_sep|>")

    ours = get_tokenizer()
    rng = random.Random(0)
    alphabet = list("abcXYZ019 \t\n\r.,;:'\"!?()[]{}-_/\\@#$%^&*+=<>|~`") + list("éßøЖщ中文字日本語한국어🙂🚀ـعربية") + [
        "'s", "'ll", "  ", "\n\n", "1234567", "don't", "<|im_end|>"]
    for _ in range(500):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 40)))
        assert hf.encode(text) == ours.encode(text), repr(text)


# --- bad input: one message, exit code 2, nothing left behind ----------------------------------


def _convert(*args):
    return subprocess.run([str(BIN / "phi4-convert"), *map(str, args), "--no-progress"], capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _nothing_left(out: Path):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


@pytest.mark.parametrize("args, message", [
    (["--max-shard-size", "0"], "--max-shard-size '0': give a size above 0"),
    (["--max-shard-size", "lots"], "--max-shard-size 'lots': give a size above 0"),
    (["--tolerance", "-1"], "argument --tolerance: '-1': give a number of at least 0"),
    (["--tolerance", "nan"], "argument --tolerance: 'nan': give a number of at least 0"),
])
def test_a_size_or_tolerance_out_of_range_is_one_line(mcore_dir, tmp_path, capsys, args, message):
    from phi4.cli.convert import main

    with pytest.raises(SystemExit) as stop:
        main(["mcore-to-hf", "--ckpt", str(mcore_dir), "--out", str(tmp_path / "hf"), "--no-progress", *args])
    assert stop.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and message in errors[0], errors
    _nothing_left(tmp_path / "hf")


def test_missing_shard(hf_dir, tmp_path):
    src = _copy(hf_dir[0], tmp_path / "src")
    shard = sorted(src.glob("*.safetensors"))[1]
    shard.unlink()
    out = _convert("hf-to-mcore", "--hf", src, "--out", tmp_path / "out")
    assert out.returncode == 2
    assert f"names shard(s) that are missing: {shard.name}" in out.stderr
    _nothing_left(tmp_path / "out")


def test_other_architecture(hf_dir, tmp_path):
    src = _copy(hf_dir[0], tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama")
    (src / "config.json").write_text(json.dumps(config))
    out = _convert("hf-to-mcore", "--hf", src, "--out", tmp_path / "out")
    assert out.returncode == 2
    assert "architectures=['LlamaForCausalLM'] model_type='llama'; valid: [Phi3ForCausalLM]" in out.stderr
    _nothing_left(tmp_path / "out")


def test_config_that_does_not_match_the_model(hf_dir, tmp_path):
    out = _convert("hf-to-mcore", "--hf", hf_dir[0], "--out", tmp_path / "out", "--model", "phi4_tiny")
    assert out.returncode == 2
    assert "does not match the model config: vocab_size: 1000 in" in out.stderr and "100352 in the model config" in out.stderr
    _nothing_left(tmp_path / "out")


def test_shape_and_key_errors(hf_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    from phi4.convert.convert import hf_to_mcore
    from phi4.errors import ConfigError

    src = _copy(hf_dir[0], tmp_path / "src")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.down_proj.weight"
    shard = src / index["weight_map"][name]
    tensors = load_file(shard)
    tensors[name] = tensors[name][:, :-1].contiguous()
    save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"model.layers.1.mlp.down_proj.weight has shape \(128, 447\), the config needs \(128, 448\)"):
        hf_to_mcore(src, tmp_path / "out", progress=False)
    _nothing_left(tmp_path / "out")

    del tensors[name]
    tensors["model.layers.1.self_attn.o_proj.bias"] = torch.zeros(128)
    save_file(tensors, shard, metadata={"format": "pt"})
    index["weight_map"].pop(name)
    index["weight_map"]["model.layers.1.self_attn.o_proj.bias"] = shard.name
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ConfigError, match=r"missing 1 tensor\(s\), e.g. model.layers.1.mlp.down_proj.weight; "
                                          r"1 unknown tensor\(s\), e.g. model.layers.1.self_attn.o_proj.bias"):
        hf_to_mcore(src, tmp_path / "out", progress=False)
    _nothing_left(tmp_path / "out")


def test_truncated_shard(hf_dir, tmp_path):
    src = _copy(hf_dir[0], tmp_path / "src")
    shard = sorted(src.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 100])
    out = _convert("hf-to-mcore", "--hf", src, "--out", tmp_path / "out")
    assert out.returncode == 2 and f"{shard.name}: truncated" in out.stderr
    _nothing_left(tmp_path / "out")


def test_existing_output_is_refused(hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    out = _convert("hf-to-mcore", "--hf", hf_dir[0], "--out", tmp_path / "out")
    assert out.returncode == 2 and "already exists; choose another --out or pass --overwrite" in out.stderr


def test_cli_verify_both_directions(hf_dir, tmp_path):
    """--verify prints the largest logit difference; over the tolerance it exits 1 and writes nothing."""
    out = _convert("hf-to-mcore", "--hf", hf_dir[0], "--out", tmp_path / "mc", "--verify")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "verify: largest logit difference" in out.stdout and ": ok" in out.stdout
    out = _convert("mcore-to-hf", "--ckpt", tmp_path / "mc", "--out", tmp_path / "hf", "--verify", "--max-shard-size", "500KB")
    assert out.returncode == 0, out.stderr[-3000:]
    assert ": ok" in out.stdout and (tmp_path / "hf" / "tokenizer.json").exists()
    out = _convert("mcore-to-hf", "--ckpt", tmp_path / "mc", "--out", tmp_path / "strict", "--verify", "--tolerance", "0")
    assert out.returncode == 1 and "FAILED" in out.stdout
    _nothing_left(tmp_path / "strict")


def test_a_config_json_that_is_not_json_or_lacks_a_field_is_one_line(tmp_path):
    import json

    from phi4.convert.hf_config import model_config_from_hf
    from phi4.errors import ConfigError

    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match=rf"^{path}: not valid JSON .*; a Hugging Face config.json is one JSON object$"):
        model_config_from_hf(path)
    path.write_text(json.dumps({"architectures": ["Phi3ForCausalLM"], "model_type": "phi3", "hidden_size": 64}))
    with pytest.raises(ConfigError, match=r"no whole number under intermediate_size, num_hidden_layers, "
                                          r"num_attention_heads, vocab_size"):
        model_config_from_hf(path)



def test_the_commands_run_with_only_the_declared_dependencies(hf_dir, tmp_path):
    """A wheel installed with its declared dependencies and no test extra runs phi4-convert both
    ways (the tokenizer export included), phi4-data preprocess and phi4-report: tests/only_declared.py makes
    every installed module outside setup.py's install_requires closure fail to import. phi4-lm-eval,
    whose lm-eval is an extra, stops with the line that names the extra to install."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(dict(step=1, loss=2.0, lr=1e-3, grad_norm=1.0, tokens_per_s=10.0)) + "\n")
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"document {i}: the sum of {i} and 3"}) + "\n" for i in range(20)))
    commands = [["phi4-convert", ["hf-to-mcore", "--hf", str(hf_dir[0]), "--out", str(tmp_path / "mc"), "--no-progress"]],
                ["phi4-convert", ["mcore-to-hf", "--ckpt", str(tmp_path / "mc"), "--out", str(tmp_path / "hf"),
                                  "--no-progress"]],
                ["phi4-data", ["preprocess", "--input", str(docs), "--output-prefix", str(tmp_path / "data" / "docs"),
                               "--workers", "1", "--no-progress"]],
                ["phi4-report", [str(run)]],
                ["phi4-lm-eval", ["--model_args", "checkpoint=" + str(tmp_path / "mc"), "--tasks", "hellaswag"]]]
    out = subprocess.run([sys.executable, str(Path(__file__).parent / "only_declared.py"), "phi4-megatron",
                          json.dumps(commands)], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.strip().splitlines()[-1])
    assert [(r["code"], r["undeclared"]) for r in results[:4]] == [(0, None)] * 4, results
    assert (results[4]["code"], results[4]["undeclared"].partition(" ")[0]) == (2, "lm_eval"), results
    assert out.stderr.strip().splitlines()[-1] == ("error: phi4-lm-eval needs lm-evaluation-harness, which is not "
                                                   "installed: pip install 'phi4-megatron[harness]'")
    assert (tmp_path / "hf" / "tokenizer.json").exists() and (tmp_path / "data" / "docs.idx").exists()


def _verify_here(hf, ckpt) -> tuple:
    from phi4.convert.verify import max_logit_difference

    return max_logit_difference(Path(hf), Path(ckpt), tiny_model(**MODEL))


@pytest.mark.gpu
def test_verification_on_a_gpu_compares_on_the_cpu(hf_dir, mcore_dir):
    """The converted model runs on the GPU; the Hugging Face model's logits are on the CPU."""
    difference, largest = run_ranks(_verify_here, 1, str(hf_dir[0]), str(mcore_dir), timeout=600)[0]
    assert difference < TOL * 10 and largest > 1.0  # TF32 matmuls on the GPU
