"""Batched decoding from a Megatron-Core GPTModel in any tensor/pipeline layout: the one decoder
behind evaluation (phi4-eval, `eval.every` during training) and Pivotal Token Search's rollouts.

Prompts of different lengths share a batch without attention masks (Megatron-LM's static
generation): decoding starts after the shortest prompt, and a row still inside its prompt takes
its prompt's next token instead of the chosen one. Attention is causal, so the positions not yet
filled are never looked at.

Where each rank of a tensor-parallel group holds the whole depth of the model (pp=1, no sequence
parallelism) a new token costs one single-position forward over Megatron-Core's KV cache
(StaticInferenceContext). Otherwise (pipeline stages, or sequence parallelism) every token costs
a forward over the whole sequence through Megatron-Core's pipeline schedule and the last stage
broadcasts its choice: right on every layout, slower for long answers.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Optional

import torch
from megatron.core import parallel_state
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

from phi4.eval.sampling import top_p_filter
from phi4.model.build import unwrap, without_fp8
from phi4.model.pipeline_schedule import run_schedule
from phi4.model.tp_overlap import without_tp_comm_overlap


def full_vocab_logits(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[..., vocab] fp32 logits from a tensor-parallel shard of the (padded) vocabulary."""
    if parallel_state.get_tensor_model_parallel_world_size() > 1:
        logits = gather_from_tensor_model_parallel_region(logits)
    return logits[..., :vocab_size].float()


class _CachedSteps:
    """Prefill once into the KV cache, then one position per call."""

    def __init__(self, net, batch: int, max_length: int, vocab_size: int):
        self.net, self.vocab_size = net, vocab_size
        self.context = StaticInferenceContext(batch, max_length)

    def _forward(self, tokens: torch.Tensor, first_position: int) -> torch.Tensor:
        positions = torch.arange(first_position, first_position + tokens.shape[1], device=tokens.device)
        out = self.net(tokens, positions.expand(tokens.shape[0], -1), None, inference_context=self.context)
        self.context.sequence_len_offset = first_position + tokens.shape[1]
        return full_vocab_logits(out[:, -1], self.vocab_size)

    def first(self, prefix: torch.Tensor) -> torch.Tensor:
        return self._forward(prefix, 0)

    def next(self, tokens: torch.Tensor, position: int) -> torch.Tensor:
        return self._forward(tokens[:, position : position + 1], position)


class _FullForwardSteps:
    """A forward over the whole prefix at every step, through the pipeline schedule; logits on the
    last pipeline stage only (None elsewhere)."""

    def __init__(self, chunks: list, vocab_size: int, pad_to: int):
        self.chunks, self.vocab_size, self.pad_to = chunks, vocab_size, pad_to

    def first(self, prefix: torch.Tensor) -> Optional[torch.Tensor]:
        length = prefix.shape[1]
        padded = -(-length // self.pad_to) * self.pad_to  # sequence parallelism splits the sequence over TP
        tokens = torch.nn.functional.pad(prefix, (0, padded - length))
        positions = torch.arange(padded, device=prefix.device).expand(prefix.shape[0], -1)
        vocab_size = self.vocab_size

        def step(data_iterator, model):
            batch = next(data_iterator)
            output = model(batch["tokens"], batch["position_ids"], None)

            def last_position(logits, non_loss_data=True):
                return full_vocab_logits(logits[:, length - 1], vocab_size)

            return output, last_position

        outputs = run_schedule(step, self.chunks, [dict(tokens=tokens, position_ids=positions)],
                               forward_only=True, collect_non_loss_data=True)
        return outputs[0] if outputs else None

    def next(self, tokens: torch.Tensor, position: int) -> Optional[torch.Tensor]:
        return self.first(tokens[:, : position + 1])


def decoding_topology(topology):
    """The layout a decoding-only job (phi4-eval, phi4-pts) builds its model in: the given one
    without sequence parallelism, which only saves activation memory in training and would cost
    the KV cache (a one-token step cannot be split over the tensor-parallel ranks)."""
    return dataclasses.replace(topology, sp=False) if topology.sp else topology


class Decoder:
    """Greedy (temperature 0) or sampled completions of token-id prompts from model chunks built
    by `build_phi4_model` (DDP-wrapped or not). Every rank of a model-parallel group gets the same
    tokens; for sampling, give each the same seeded generator."""

    def __init__(self, chunks: list, vocab_size: int, stop_ids: Iterable[int], device: str | torch.device = "cpu"):
        self.chunks, self.vocab_size, self.device = chunks, vocab_size, device
        self.stop_ids = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
        self.pipeline = parallel_state.get_pipeline_model_parallel_world_size() > 1
        self.net = unwrap(chunks[0])
        sequence_parallel = self.net.config.sequence_parallel
        self.kv_cache = not self.pipeline and not sequence_parallel
        self.pad_to = parallel_state.get_tensor_model_parallel_world_size() if sequence_parallel else 1

    def _choose(self, logits: Optional[torch.Tensor], batch: int, temperature: float, top_p: float,
                generator: Optional[torch.Generator]) -> torch.Tensor:
        if logits is not None:
            if temperature == 0:
                chosen = logits.argmax(dim=-1)
            else:
                probs = top_p_filter(logits / temperature, top_p).softmax(dim=-1)
                chosen = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            chosen = torch.empty(batch, dtype=torch.long, device=self.device)
        if self.pipeline:  # the last stage chose; the stages before it feed the next step

            torch.distributed.broadcast(chosen, parallel_state.get_pipeline_model_parallel_last_rank(),
                                        group=parallel_state.get_pipeline_model_parallel_group())
        return chosen

    def generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> list[list[int]]:
        """The new tokens of each prompt: up to `max_new_tokens`, ending with a stop id when the
        model emitted one. Decoding runs in bf16 even when the model trains in FP8: Transformer
        Engine's FP8 GEMMs need token counts in multiples of 16, and a cached decoding step has
        one token per prompt."""
        with without_fp8(self.net.config), without_tp_comm_overlap(self.chunks):
            return self._generate(prompts, max_new_tokens, temperature, top_p, generator)

    @torch.no_grad()
    def _generate(self, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> list[list[int]]:
        if not prompts or not all(prompts):
            raise ValueError("generate needs at least one prompt, and no empty one (it has no next-token logits)")
        if max_new_tokens < 1 or temperature < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 1 and temperature={temperature} >= 0")
        batch = len(prompts)
        lengths = torch.tensor([len(p) for p in prompts], device=self.device)
        start, end = int(lengths.min()), int(lengths.max()) + max_new_tokens
        tokens = torch.zeros(batch, end, dtype=torch.long, device=self.device)
        for row, prompt in enumerate(prompts):
            tokens[row, : len(prompt)] = torch.tensor(prompt, dtype=torch.long, device=self.device)
        steps = (_CachedSteps(self.net, batch, end, self.vocab_size) if self.kv_cache
                 else _FullForwardSteps(self.chunks, self.vocab_size, self.pad_to))
        completions: list[list[int]] = [[] for _ in range(batch)]
        made = torch.zeros(batch, dtype=torch.long, device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        logits = steps.first(tokens[:, :start])
        for position in range(start, end):
            chosen = self._choose(logits, batch, temperature, top_p, generator)
            writing = (position >= lengths) & ~done
            tokens[:, position] = torch.where(writing, chosen, tokens[:, position])
            chosen_ids = chosen.tolist()  # one device-to-host copy per step
            for row in writing.nonzero().flatten().tolist():
                completions[row].append(chosen_ids[row])
            made += writing.long()
            done |= (writing & torch.isin(chosen, self.stop_ids)) | (made >= max_new_tokens)
            if bool(done.all()) or position == end - 1:
                break
            logits = steps.next(tokens, position)
        return completions

