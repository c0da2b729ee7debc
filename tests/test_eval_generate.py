"""The shared decoder (phi4.eval.generate) against transformers' `generate()`: greedy completions of a
checkpoint converted by phi4-convert equal token for token, in a batch of prompts of different lengths, with the
KV cache (TP=1 with two data-parallel ranks, TP=2) and with full forwards through the pipeline
schedule (PP=2, and TP=2 with sequence parallelism)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import TopologyConfig, load_in_layouts, phi3_reference, random_hf_weights, tiny_model
from multirank import run_ranks

MODEL = dict(vocab_size=1000, num_layers=2, max_position_embeddings=128)
NEW_TOKENS = 12
PROMPTS = [torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (3, 9, 5, 14)]
LAYOUTS = {"tp1_dp2": TopologyConfig(), "tp2": TopologyConfig(tp=2), "tp2_sp": TopologyConfig(tp=2, sp=True),
           "pp2": TopologyConfig(pp=2)}


def _hf_greedy(hf, prompt: list[int], eos: int | None) -> tuple[list[int], float]:
    """transformers' greedy completion (cut after eos, as ours ends) and its smallest top-2 logit gap."""
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos,
                      pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    new = out.sequences[0, len(prompt):].tolist()
    if eos is not None and eos in new:
        new = new[: new.index(eos) + 1]
    gap = min((s[0].topk(2).values[0] - s[0].topk(2).values[1]).item() for s in out.scores[: len(new)])
    return new, gap


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    model = tiny_model(**MODEL)
    hf = phi3_reference(model)
    hf.load_state_dict(random_hf_weights(model, seed=11))
    directory = tmp_path_factory.mktemp("gen")
    hf.save_pretrained(str(directory / "hf"))
    convert = subprocess.run([str(Path(sys.executable).parent / "phi4-convert"), "hf-to-mcore", "--hf",
                              str(directory / "hf"), "--out", str(directory / "mcore"), "--no-progress"],
                             capture_output=True, text=True)
    assert convert.returncode == 0, convert.stderr[-2000:]
    with torch.no_grad():
        # A stop id the model really emits: prompt 0's fifth greedy token, so one row stops early.
        eos = _hf_greedy(hf, PROMPTS[0], None)[0][4]
        completions, gaps = zip(*(_hf_greedy(hf, p, eos) for p in PROMPTS))
    # Near-ties would make the comparison a coin toss at fp32 rounding; these weights have none.
    assert min(gaps) > 1e-3, gaps
    return directory / "mcore", eos, list(completions)


def _decode_in_layouts(ckpt: str, prompts: list[list[int]], eos: int) -> dict:
    from phi4.eval.generate import Decoder

    model = tiny_model(**MODEL)
    out = {}
    for name, chunks in load_in_layouts(model, LAYOUTS, ckpt):
        for chunk in chunks:
            chunk.eval()
        decoder = Decoder(chunks, model.vocab_size, [eos])
        out[name] = (decoder.kv_cache, decoder.generate(prompts, NEW_TOKENS))
    return out


def test_greedy_decoding_equals_transformers_generate(reference):
    ckpt, eos, expected = reference
    assert expected[0][-1] == eos and len(expected[0]) == 5 and any(len(c) == NEW_TOKENS for c in expected)
    for rank, result in enumerate(run_ranks(_decode_in_layouts, 2, str(ckpt), PROMPTS, eos)):
        for layout, (kv_cache, got) in result.items():
            assert kv_cache == (layout in ("tp1_dp2", "tp2")), layout
            assert got == expected, (rank, layout)
