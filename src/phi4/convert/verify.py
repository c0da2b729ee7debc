"""--verify: the source and the converted model on the same tokens, on the CPU, in fp32."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from phi4.checkpoint.weights import load_model_weights
from phi4.model.build import build_phi4_model
from phi4.model.config import ModelConfig, PrecisionConfig, TopologyConfig
from phi4.model.parallel import init_model_parallel
from phi4.model.pipeline_schedule import logits_of_tokens
from phi4.runtime.distributed import shutdown
from phi4.runtime.launch_env import read_launch_env


def verification_tokens(model: ModelConfig, length: int = 64) -> torch.Tensor:
    length = min(length, model.max_position_embeddings)
    # on the CPU: the Hugging Face model reads them there, and the schedule moves Megatron-Core's copy
    return torch.randint(0, model.vocab_size, (2, length), generator=torch.Generator().manual_seed(0))


def hf_logits(hf_dir: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        logits = hf(input_ids=tokens).logits
    del hf
    return logits


def megatron_logits(ckpt_dir: Path, model: ModelConfig, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the checkpoint loaded into the local spec, TP=1, in this one process, on the CPU
    (where the Hugging Face model's are, whatever device the model ran on)."""
    model = dataclasses.replace(model, transformer_impl="local")
    topology, precision = TopologyConfig(), PrecisionConfig(dtype="fp32")
    init_model_parallel(model, topology, precision, launch=read_launch_env({}))  # alone, on a free port
    try:
        chunks = build_phi4_model(model, topology, precision)
        load_model_weights(chunks, ckpt_dir)
        logits = logits_of_tokens(chunks, tokens)
    finally:
        shutdown()
    return logits[..., : model.vocab_size].float().cpu()


def max_logit_difference(hf_dir: Path, ckpt_dir: Path, model: ModelConfig) -> tuple[float, float]:
    """(largest |difference|, largest |logit|) between the HF and the Megatron-Core model."""
    tokens = verification_tokens(model)
    reference = hf_logits(hf_dir, tokens)
    ours = megatron_logits(ckpt_dir, model, tokens)
    return (ours - reference).abs().max().item(), reference.abs().max().item()
