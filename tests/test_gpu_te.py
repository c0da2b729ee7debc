"""On a GPU with Transformer Engine: the te spec trains in bf16 and in FP8, and the CPU backend
stays out of the way. Skipped where CUDA or Transformer Engine is missing."""

import dataclasses

import pytest

from helpers import TopologyConfig, random_hf_weights, tiny_model, token_rows
from multirank import run_ranks

pytestmark = pytest.mark.gpu

STEPS = 20


def train_te(precision_values: dict) -> dict:
    from phi4.model.build import build_phi4_model, transformer_config
    from phi4.model.config import PrecisionConfig
    from phi4.model.hf_weights import load_hf_weights
    from phi4.runtime import cpu
    from phi4.runtime.distributed import init_distributed
    from phi4.train.step import OptimSettings, build_optimizer, micro_batches_from_tokens, train_step, wrap_ddp

    model = dataclasses.replace(tiny_model(), backend="te")
    precision = PrecisionConfig.from_dict(precision_values)
    topology = TopologyConfig()
    init_distributed(model, topology, precision, seed=1)
    config = transformer_config(model, topology, precision)
    chunks = build_phi4_model(model, topology, precision, config=config)
    load_hf_weights(chunks, {k: v.cuda() for k, v in random_hf_weights(model, seed=0).items()}, model)
    batches = [{k: v.cuda() for k, v in b.items()} for b in micro_batches_from_tokens(token_rows(model, 8, 64), 2)]
    ddp = wrap_ddp(chunks, config)
    optimizer = build_optimizer(ddp, config, OptimSettings(lr=3e-3, weight_decay=0.0))
    losses = [train_step(ddp, optimizer, batches)["loss"] for _ in range(STEPS)]
    layer = chunks[0].decoder.layers[0]
    return dict(losses=losses, cpu_backend=cpu.is_active(), qkv=type(layer.self_attention.linear_qkv).__name__)


def test_te_spec_trains_in_bf16_and_fp8():
    bf16 = run_ranks(train_te, 1, dict(dtype="bf16"), timeout=600)[0]
    fp8 = run_ranks(train_te, 1, dict(dtype="bf16", fp8=dict(format="hybrid", recipe="delayed", amax_history_len=16)), timeout=600)[0]
    for run in (bf16, fp8):
        assert run["qkv"] == "TELayerNormColumnParallelLinear"
        assert not run["cpu_backend"]
        assert run["losses"][-1] < run["losses"][0] - 0.3, run["losses"]
    gap = max(abs(a - b) / a for a, b in zip(bf16["losses"], fp8["losses"]))
    assert gap < 0.05, (bf16["losses"], fp8["losses"])


def test_cpu_backend_refuses_a_cuda_host():
    from phi4.runtime import cpu

    with pytest.raises(RuntimeError, match="CUDA is available"):
        cpu.activate()
    assert not cpu.is_active()
