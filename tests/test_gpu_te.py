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
    from phi4.model.parallel import init_model_parallel
    from helpers import optim_settings
    from phi4.model.pipeline_schedule import micro_batches_from_tokens
    from phi4.train.lm import lm_update
    from phi4.train.optimizer import build_optimizer, wrap_ddp

    model = dataclasses.replace(tiny_model(), transformer_impl="te")
    precision = PrecisionConfig.from_dict(precision_values)
    topology = TopologyConfig()
    init_model_parallel(model, topology, precision, seed=1)
    config = transformer_config(model, topology, precision)
    chunks = build_phi4_model(model, topology, precision, config=config)
    load_hf_weights(chunks, {k: v.cuda() for k, v in random_hf_weights(model, seed=0).items()}, model)
    batches = [{k: v.cuda() for k, v in b.items()} for b in micro_batches_from_tokens(token_rows(model, 8, 64), 2)]
    ddp = wrap_ddp(chunks, config)
    optimizer = build_optimizer(ddp, config, optim_settings(lr=3e-3, weight_decay=0.0))
    losses = [lm_update(ddp, optimizer, batches).loss for _ in range(STEPS)]
    layer = chunks[0].decoder.layers[0]
    return dict(losses=losses, cpu_backend=cpu.is_active(), qkv=type(layer.self_attention.linear_qkv).__name__)


# Every FP8 recipe that runs on Hopper; delayed scaling cannot keep the first/last layers in bf16.
FP8_RECIPES = {
    "tensorwise": dict(recipe="tensorwise"),
    "delayed": dict(recipe="delayed", amax_history_len=16, first_last_layers_bf16=False),
    "blockwise": dict(recipe="blockwise"),
}


@pytest.fixture(scope="module")
def bf16_run():
    return run_ranks(train_te, 1, dict(dtype="bf16"), timeout=600)[0]


def test_te_spec_trains_in_bf16(bf16_run):
    assert bf16_run["qkv"] == "TELayerNormColumnParallelLinear" and not bf16_run["cpu_backend"]
    assert bf16_run["losses"][-1] < bf16_run["losses"][0] - 0.3, bf16_run["losses"]


@pytest.mark.parametrize("recipe", sorted(FP8_RECIPES))
def test_te_spec_trains_in_fp8_close_to_bf16(bf16_run, recipe):
    fp8 = run_ranks(train_te, 1, dict(dtype="bf16", fp8=dict(format="hybrid", **FP8_RECIPES[recipe])), timeout=600)[0]
    assert fp8["losses"][-1] < fp8["losses"][0] - 0.3, fp8["losses"]
    gap = max(abs(a - b) / a for a, b in zip(bf16_run["losses"], fp8["losses"]))
    assert gap < 0.05, (bf16_run["losses"], fp8["losses"])


def test_mxfp8_stops_at_start_on_a_gpu_older_than_blackwell():
    import torch

    from phi4.errors import ConfigError
    from phi4.model.parallel import init_model_parallel

    if torch.cuda.get_device_capability() >= (10, 0):
        pytest.skip("this GPU runs mxfp8")
    model = dataclasses.replace(tiny_model(), transformer_impl="te")
    precision = dict(dtype="bf16", fp8=dict(recipe="mxfp8"))
    from phi4.model.config import PrecisionConfig

    with pytest.raises(ConfigError, match=r"precision.fp8.recipe=mxfp8 needs .*Blackwell.*valid here: precision.fp8.recipe="):
        init_model_parallel(model, TopologyConfig(), PrecisionConfig.from_dict(precision))


def decode_te_cached_and_full(prompts: list, new_tokens: int) -> dict:
    """Greedy decoding on the te spec (fp32, so that both paths see the same logits up to
    rounding) with Megatron-Core's KV cache, and with a full forward per token."""
    import torch

    from helpers import sample_tokens
    from phi4.eval.generate import Decoder
    from phi4.model.build import build_phi4_model, transformer_config
    from phi4.model.config import PrecisionConfig
    from phi4.model.hf_weights import load_hf_weights
    from phi4.model.parallel import init_model_parallel
    from phi4.model.pipeline_schedule import logits_of_tokens

    model = dataclasses.replace(tiny_model(), transformer_impl="te")
    precision, topology = PrecisionConfig(dtype="fp32"), TopologyConfig()
    init_model_parallel(model, topology, precision, seed=1)
    chunks = build_phi4_model(model, topology, precision, config=transformer_config(model, topology, precision))
    load_hf_weights(chunks, {k: v.cuda() for k, v in random_hf_weights(model, seed=0).items()}, model)
    for chunk in chunks:
        chunk.eval()
    decoder = Decoder(chunks, model.vocab_size, [], device="cuda")
    cached = decoder.generate(prompts, new_tokens)

    def logits(rows):
        return logits_of_tokens(chunks, rows)[..., : model.vocab_size]

    full = [sample_tokens(logits, p, 1, new_tokens, 0.0, 1.0, None, device="cuda")[0] for p in prompts]
    return dict(kv_cache=decoder.kv_cache, cached=cached, full=full)


def test_te_kv_cache_decoding_equals_full_forward_decoding():
    prompts = [[11, 22, 33, 44, 55, 66], [7, 8, 9], [100, 200, 300, 400, 500, 600, 700, 800, 900]]
    result = run_ranks(decode_te_cached_and_full, 1, prompts, 12, timeout=600)[0]
    assert result["kv_cache"]
    assert result["cached"] == result["full"]


def test_cpu_backend_refuses_a_cuda_host():
    from phi4.runtime import cpu

    with pytest.raises(RuntimeError, match="CUDA is available"):
        cpu.activate()
    assert not cpu.is_active()


def dpo_and_scoring_on_cuda() -> dict:
    """DPO's loss and report on CUDA tensors, and full logits of an odd token count (PTS, scoring)
    from an FP8 model: FP8 is off for them, as for decoding."""
    import torch

    from phi4.model.build import build_phi4_model, transformer_config
    from phi4.model.config import PrecisionConfig
    from phi4.model.hf_weights import load_hf_weights
    from phi4.model.parallel import init_model_parallel
    from phi4.model.pipeline_schedule import logits_of_tokens
    from phi4.posttrain.dpo import _dpo_loss, _reference_loss

    model = dataclasses.replace(tiny_model(), transformer_impl="te")
    precision = PrecisionConfig.from_dict(dict(dtype="bf16", fp8=dict(format="hybrid", recipe="tensorwise")))
    topology = TopologyConfig()
    init_model_parallel(model, topology, precision, seed=1)
    chunks = build_phi4_model(model, topology, precision, config=transformer_config(model, topology, precision))
    load_hf_weights(chunks, {k: v.cuda() for k, v in random_hf_weights(model, seed=0).items()}, model)
    logits = logits_of_tokens(chunks, token_rows(model, 1, 7)[:, :7].cuda())
    per_token = torch.rand(4, 9, device="cuda")
    batch = dict(loss_mask=torch.ones(4, 9, device="cuda"), ref_logps=torch.zeros(4, device="cuda"))
    loss, pairs, report = _dpo_loss(batch, 0.1, per_token)
    _, count, _ = _reference_loss(batch["loss_mask"], per_token)
    return dict(logits=tuple(logits.shape), fp8_back=chunks[0].config.fp8 is not None,
                devices={t.device.type for t in (loss, pairs, report["dpo"], count)}, pairs=float(report["dpo"][-1]))


def test_dpo_and_full_logits_run_on_cuda_and_under_fp8():
    result = run_ranks(dpo_and_scoring_on_cuda, 1, timeout=600)[0]
    assert result["devices"] == {"cuda"} and result["pairs"] == 2.0
    assert result["logits"][:2] == (1, 7) and result["fp8_back"]


def train_te_tp2(overlap: bool) -> list:
    """Tiny te model at TP=2 with sequence parallelism, bf16, with or without TE's TP communication
    overlap (userbuffers for the training micro-batch's shape)."""
    import os

    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    from helpers import optim_settings
    from phi4.model.build import build_phi4_model, transformer_config
    from phi4.model.config import PrecisionConfig
    from phi4.model.parallel import init_model_parallel
    from phi4.model.pipeline_schedule import data_parallel_slice, micro_batches_from_tokens
    from phi4.model.tp_overlap import destroy_userbuffers, initialize_userbuffers
    from phi4.train.lm import lm_update
    from phi4.train.optimizer import build_optimizer, wrap_ddp

    model = dataclasses.replace(tiny_model(), transformer_impl="te")
    precision = PrecisionConfig(dtype="bf16")
    topology = TopologyConfig(tp=2, sp=True, tp_comm_overlap=overlap)
    init_model_parallel(model, topology, precision, seed=1)
    config = transformer_config(model, topology, precision)
    assert config.tp_comm_overlap == overlap
    if overlap:
        initialize_userbuffers(64 * 2, model.hidden_size, 2, None)
    ddp = wrap_ddp(build_phi4_model(model, topology, precision, config=config), config)
    optimizer = build_optimizer(ddp, config, optim_settings(lr=3e-3, weight_decay=0.0))
    batches = micro_batches_from_tokens(data_parallel_slice(token_rows(model, 8, 64)), 2)
    losses = [lm_update(ddp, optimizer, batches).loss for _ in range(8)]
    if overlap:
        destroy_userbuffers()
    return losses


def test_tp_comm_overlap_trains_as_without_it():
    import torch

    if torch.cuda.device_count() < 2:
        pytest.skip("TP=2 needs two GPUs")
    plain = run_ranks(train_te_tp2, 2, False, timeout=600)[0]
    overlapped = run_ranks(train_te_tp2, 2, True, timeout=600)[0]
    assert overlapped[-1] < overlapped[0] - 0.3
    assert max(abs(a - b) / a for a, b in zip(plain, overlapped)) < 0.02, (plain, overlapped)
