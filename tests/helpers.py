"""Shared test material: the tiny model's config, seeded HF-layout weights, token batches."""

from __future__ import annotations

from pathlib import Path

import torch
from phi4.settings import load_group

from phi4.model.config import ModelConfig, PrecisionConfig, TopologyConfig
from phi4.model.hf_weights import hf_shapes
from phi4.eval.sampling import LogitsFn, top_p_filter

ROOT = Path(__file__).resolve().parents[1]


def tiny_model(**overrides) -> ModelConfig:
    values = load_group("model", ROOT / "conf/model/phi4_tiny.yaml")
    values.update(overrides)
    return ModelConfig.from_dict(values)


def random_hf_weights(model: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """HF Phi3ForCausalLM-layout weights, scaled so the logits are of order 1 (small random
    weights give logits near 0, where a wrong mapping can hide)."""
    g = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in hf_shapes(model).items():
        if name.endswith("norm.weight"):
            weights[name] = 1.0 + 0.2 * torch.randn(shape, generator=g)
        elif "embed_tokens" in name:
            weights[name] = torch.randn(shape, generator=g)
        else:
            weights[name] = torch.randn(shape, generator=g) / shape[1] ** 0.5
    return weights


def token_rows(model: ModelConfig, rows: int, seq: int, seed: int = 1) -> torch.Tensor:
    """[rows, seq + 1] token ids: inputs and their next-token labels."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, model.vocab_size, (rows, seq + 1), generator=g)


def phi3_reference(model: ModelConfig):
    """transformers' Phi3ForCausalLM of this shape (random init), in eval mode: the reference."""
    from transformers import Phi3Config, Phi3ForCausalLM

    config = Phi3Config(
        vocab_size=model.vocab_size, hidden_size=model.hidden_size, intermediate_size=model.ffn_hidden_size,
        num_hidden_layers=model.num_layers, num_attention_heads=model.num_attention_heads,
        num_key_value_heads=model.num_query_groups, max_position_embeddings=model.max_position_embeddings,
        original_max_position_embeddings=model.max_position_embeddings, rope_theta=model.rope_base,
        rms_norm_eps=model.norm_eps, tie_word_embeddings=False, pad_token_id=None, bos_token_id=None,
        eos_token_id=None,
    )
    return Phi3ForCausalLM(config).eval()


def load_in_layouts(model: ModelConfig, layouts: dict, checkpoint: str):
    """(name, model chunks holding the checkpoint's weights) for each layout in turn, on the ranks
    of a multirank run: the first starts the process group, the others rebuild the parallel groups."""
    from phi4.model.build import build_phi4_model
    from phi4.model.parallel import init_model_parallel
    from phi4.runtime.distributed import set_parallel_layout
    from phi4.checkpoint.weights import load_model_weights

    for i, (name, topology) in enumerate(layouts.items()):
        if i == 0:
            init_model_parallel(model, topology, FP32)
        else:
            set_parallel_layout(topology)
        chunks = build_phi4_model(model, topology, FP32)
        load_model_weights(chunks, checkpoint)
        yield name, chunks


# The reference sampler: a full forward at every token, no cache (the decoder is tested against it).
@torch.no_grad()
def sample_tokens(
    logits_fn: LogitsFn,
    prefix_ids: list[int],
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    eos_id: int | None,
    generator: torch.Generator | None = None,
    device: torch.device | str | None = None,
) -> list[list[int]]:
    """`n` completions of `prefix_ids`, sampled together: each stops after it emits `eos_id` (kept
    as its last token) or after `max_new_tokens`. Temperature 0 is greedy decoding.

    The logits are recomputed over the whole sequence at each step (no KV cache): correctness
    first. Rows that have finished leave the batch, so the rows fed to `logits_fn` always have the
    same length and need no padding. Tensors live on `device`, else on the generator's device."""
    if not prefix_ids:
        raise ValueError("sample_tokens needs a non-empty prefix: an empty one has no next-token logits")
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
    if device is None:
        device = generator.device if generator is not None else "cpu"
    rows = torch.tensor([list(prefix_ids)] * n, dtype=torch.long, device=device)
    active = torch.arange(n, device=device)  # the original index of each row still sampling
    completions: list[list[int]] = [[] for _ in range(n)]
    for _ in range(max_new_tokens):
        if active.numel() == 0:
            break
        logits = logits_fn(rows)[:, -1, :].float()
        if temperature == 0:
            chosen = logits.argmax(dim=-1)
        else:
            probs = top_p_filter(logits / temperature, top_p).softmax(dim=-1)
            chosen = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        for row, token in zip(active.tolist(), chosen.tolist()):
            completions[row].append(token)
        going_on = chosen != eos_id if eos_id is not None else torch.ones_like(chosen, dtype=torch.bool)
        rows = torch.cat([rows, chosen[:, None]], dim=1)[going_on]
        active = active[going_on]
    return completions


FP32 = PrecisionConfig(dtype="fp32")
__all__ = ["FP32", "ModelConfig", "TopologyConfig", "tiny_model", "random_hf_weights", "token_rows"]


def optim_settings(**changes):
    """The shipped Adam settings (conf/optim/adam.yaml), typed, with `changes`."""
    from phi4.settings import Optim, load_group

    return Optim(**{**load_group("optim", ROOT / "conf" / "optim" / "adam.yaml"), **changes})


def trainer_cfg(run_dir, cache, *overrides):
    """phi4-train's composed config for in-process Trainer runs: a two-layer half-width tiny model,
    4 samples of 32 tokens a step, no evaluation."""
    from hydra import compose, initialize_config_dir

    import phi4.settings  # noqa: F401  the schemas

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        return compose("train", overrides=[
            "train.seq_length=32", "train.global_batch_size=4", "train.micro_batch_size=2", "train.log_every=1",
            "train.valid_every=0", "eval.every=0", "data.synthetic.problems=600", f"data.cache_dir={cache}",
            "optim.warmup_steps=0", "model.num_layers=2", "model.hidden_size=64", "model.ffn_hidden_size=224",
            f"run_dir={run_dir}", *overrides])


def write_indexed(prefix, docs) -> None:
    """A Megatron-Core indexed dataset (`<prefix>.bin`/`.idx`, int32) of the documents `docs`
    (lists of token ids), written by Megatron-Core's own builder."""
    import numpy
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    Path(prefix).parent.mkdir(parents=True, exist_ok=True)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=numpy.int32)
    for ids in docs:
        builder.add_item(torch.tensor(ids, dtype=torch.int32))
        builder.end_document()
    builder.finalize(f"{prefix}.idx")


def gpt_samples(sources, cache, seq_length: int = 32, train: int = 120, valid: int = 16, vocab_size: int = 100352):
    """(train, validation) samples' tokens, as lists, of `sources` through the gpt format (its file
    checks, then Megatron-Core's blended GPTDatasets, index cache under `cache`)."""
    from types import SimpleNamespace

    from phi4.data.blend import GptFormat

    data = SimpleNamespace(cache_dir=str(cache), split="90,10,0")
    fmt = GptFormat()
    fmt.check_files(data, sources, vocab_size)
    train_set, valid_set = fmt.datasets(data, sources, seq_length, train, valid, seed=7)
    return ([train_set[i]["tokens"].tolist() for i in range(len(train_set))],
            [valid_set[i]["tokens"].tolist() for i in range(len(valid_set))])
