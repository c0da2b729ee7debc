"""lm-evaluation-harness (`lm-eval`) on a phi4 checkpoint, in any tensor/pipeline layout, without a
conversion to Hugging Face: the model `phi4`, registered with lm-eval when this module is imported.

    phi4-lm-eval --model_args checkpoint=runs/sft,tp=2 --tasks mmlu,gsm8k --output_path results/
    torchrun --nproc-per-node 8 launch/harness.py --model_args checkpoint=runs/sft,tp=2,pp=2 --tasks mmlu

Its three request kinds run through the code phi4-eval uses: log-likelihoods (multiple-choice tasks)
and rolling log-likelihoods (perplexity tasks) through Megatron-Core's pipeline schedule, one
forward per batch, with only the continuation's positions gathered over the tensor-parallel ranks;
greedy or sampled generation through phi4.eval.generate's Decoder (its KV cache where pp=1).

Every rank of a model-parallel group gets the same requests: lm-eval shards its requests by `rank`
and `world_size`, which here are the data-parallel rank and size, and its gathers run over the
data-parallel group. Tokenization is phi4's (phi4.data.tokenizer), which equals the tokenizer
phi4-convert exports; the prefix of an empty context is <|endoftext|> (the export's bos_token) and
generation ends at <|im_end|> (its eos_token), as lm-eval's `hf` model does on that export.

Model arguments (`--model_args k=v,...`): checkpoint (a checkpoint or run directory; required),
tp, pp, vp (the layout, as topology.*; default 1, 1, none), dtype (bf16 or fp32; default bf16 on
a GPU, fp32 on the CPU), batch_size (requests per forward on each data-parallel rank; default 8),
max_length (tokens of context; default the model's max_position_embeddings), max_gen_toks
(default 256), seed (sampling; default 1234). lm-eval's --device is not used: each process takes
the GPU of its LOCAL_RANK, as phi4-train does.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Optional

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from megatron.core import parallel_state
from tqdm import tqdm

from phi4.checkpoint.pointers import resolve_checkpoint
from phi4.checkpoint.weights import MODEL_CONFIG_KEY, checkpoint_common_state, load_model_weights
from phi4.data.tokenizer import FIRST_SPECIAL, get_tokenizer, render_chat
from phi4.errors import ConfigError
from phi4.eval.generate import Decoder, full_vocab_logits
from phi4.eval.harness_args import check_model_args
from phi4.model.build import build_phi4_model
from phi4.model.config import ModelConfig, PrecisionConfig, TopologyConfig
from phi4.model.parallel import init_model_parallel
from phi4.model.pipeline_schedule import run_schedule
from phi4.model.tp_overlap import without_tp_comm_overlap
from phi4.model.validate import DTYPES
from phi4.runtime import device as devices
from phi4.runtime.launch_env import LaunchEnv, read_launch_env

log = logging.getLogger("phi4.eval")

GENERATION_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")
ASSISTANT_PROMPT = "<|im_start|>assistant<|im_sep|>"

# Who this process is, as launched: read once, before the LOCAL_RANK lm-eval reads is changed.
_LAUNCH: Optional[LaunchEnv] = None


def _whole(name: str, value, minimum: int = 1) -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = None
    if number is None or str(number) != str(value).strip() or number < minimum:
        raise ConfigError(f"model_args {name}={value!r}: a whole number >= {minimum} is needed")
    return number


@register_model("phi4")
class Phi4LM(TemplateLM):
    """A phi4 checkpoint as an lm-eval model, built in the layout its arguments give (see the module)."""

    def __init__(self, checkpoint: Optional[str] = None, tp=1, pp=1, vp=None, dtype: Optional[str] = None,
                 batch_size=8, max_length=None, max_gen_toks=256, seed=1234, **others):
        super().__init__()
        check_model_args(others)
        if not checkpoint:
            raise ConfigError("model_args checkpoint=... is not set: give a checkpoint or run directory, "
                              "e.g. --model_args checkpoint=runs/sft")
        if str(batch_size).startswith("auto"):
            raise ConfigError(f"batch_size={batch_size}: the phi4 model takes a number of requests per forward "
                              f"(on each data-parallel rank), e.g. --batch_size 8")
        dtype = dtype or ("bf16" if devices.kind() == "cuda" else "fp32")
        if dtype not in DTYPES:
            raise ConfigError(f"model_args dtype={dtype!r}; valid: {', '.join(DTYPES)}")
        self.batch_size_per_rank = _whole("batch_size", batch_size)
        self._max_gen_toks = _whole("max_gen_toks", max_gen_toks)
        self.seed = _whole("seed", seed, 0)
        self.checkpoint = resolve_checkpoint(checkpoint, "model_args checkpoint")
        self.model = ModelConfig.from_dict(checkpoint_common_state(self.checkpoint)[MODEL_CONFIG_KEY])
        self._max_length = _whole("max_length", max_length) if max_length is not None \
            else self.model.max_position_embeddings
        topology = TopologyConfig(tp=_whole("tp", tp), pp=_whole("pp", pp),
                                  vp=None if vp is None else _whole("vp", vp))
        self._start(topology, PrecisionConfig(dtype=dtype))

    def _start(self, topology: TopologyConfig, precision: PrecisionConfig) -> None:
        global _LAUNCH
        _LAUNCH = _LAUNCH or read_launch_env()
        init_model_parallel(self.model, topology, precision, seed=self.seed, launch=_LAUNCH)
        self.chunks = build_phi4_model(self.model, topology, precision)
        load_model_weights(self.chunks, self.checkpoint)
        for chunk in self.chunks:
            chunk.eval()
        self.tok = get_tokenizer()
        on = devices.current()
        self._device = torch.device(on.type, on.index) if on.is_cuda else torch.device("cpu")
        self.decoder = Decoder(self.chunks, self.model.vocab_size, [self.eot_token_id], on.type)
        self.dp_group = parallel_state.get_data_parallel_group()
        self._rank = parallel_state.get_data_parallel_rank()
        self._world_size = parallel_state.get_data_parallel_world_size()
        self.global_rank = torch.distributed.get_rank()
        # lm-eval returns its results (and its CLI writes them) where lm.rank == 0 and LOCAL_RANK == 0
        # (lm_eval/evaluator.py, simple_evaluate): with a model-parallel group across nodes, the first
        # process of another node would write them too. One writer: global rank 0.
        os.environ["LOCAL_RANK"] = str(self.global_rank)
        if self.global_rank == 0:
            log.info(f"lm-eval: {self.checkpoint} as tp={topology.tp} pp={topology.pp} vp={topology.vp} "
                     f"x {self._world_size} data-parallel, {precision.dtype}, batch {self.batch_size_per_rank}, "
                     f"max_length {self._max_length}")

    # What lm-eval asks of a model.

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tok.bos_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def max_gen_toks(self) -> int:
        return self._max_gen_toks

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_rank

    @property
    def tokenizer_name(self) -> str:
        return "phi4"

    def tok_encode(self, string: str, add_special_tokens: Optional[bool] = None, left_truncate_len=None,
                   **kwargs) -> list[int]:
        ids = self.tok.encode(string)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids) -> str:
        """Text of ids without the special tokens (as the `hf` model decodes a generation)."""
        return self.tok.decode([i for i in ids if i < FIRST_SPECIAL])

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        return render_chat(chat_history) + (ASSISTANT_PROMPT if add_generation_prompt else "")

    # Collectives over the data-parallel group (every model-parallel position has its own).

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        torch.distributed.all_gather(parts, tensor.contiguous(), group=self.dp_group)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        out = [None] * self._world_size if self._rank == dst else None
        torch.distributed.gather_object(obj, out, group=self.dp_group, group_dst=dst)
        return out

    def barrier(self) -> None:
        torch.distributed.barrier(group=self.dp_group)

    def _progress(self, total: int, what: str, disable: bool):
        return tqdm(total=total, desc=what, disable=disable or self.global_rank != 0)

    # Log-likelihoods.

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of the continuation's log-probabilities, whether greedy decoding gives it) of each
        (key, context ids, continuation ids); a row longer than max_length + 1 loses its oldest tokens."""
        rows = []
        for _, context, continuation in requests:
            if not continuation:
                raise ValueError("a log-likelihood request with an empty continuation")
            if len(continuation) > self.max_length:
                raise ConfigError(f"a continuation of {len(continuation)} tokens is longer than max_length="
                                  f"{self.max_length}: raise model_args max_length (up to the model's "
                                  f"{self.model.max_position_embeddings})")
            rows.append(((context + continuation)[-(self.max_length + 1):][:-1], continuation))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        results: list[Optional[tuple[float, bool]]] = [None] * len(rows)
        progress = self._progress(len(rows), "phi4 log-likelihoods", disable_tqdm)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            scores = self._score([rows[i] for i in batch])
            for i, (logprob, greedy) in zip(batch, scores.tolist()):
                results[i] = (logprob, bool(greedy))
                if requests[i][0] is not None:  # lm-eval's --use_cache key (a rolling window has none)
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], results[i])
            progress.update(len(batch))
        progress.close()
        return results

    @torch.no_grad()
    def _score(self, rows: list[tuple[list[int], list[int]]]) -> torch.Tensor:
        """[rows, 2] float64: each row's continuation log-probability and greedy flag, on every rank."""
        length = max(len(inputs) for inputs, _ in rows)
        tokens = torch.zeros(len(rows), length, dtype=torch.long, device=self._device)
        for r, (inputs, _) in enumerate(rows):
            tokens[r, : len(inputs)] = torch.tensor(inputs, device=self._device)
        # the continuation's tokens are predicted at its positions, the last input's included
        spans = [(len(inputs) - len(continuation), torch.tensor(continuation, device=self._device))
                 for inputs, continuation in rows]
        vocab_size = self.model.vocab_size

        def score(logits, non_loss_data=True):
            out = torch.zeros(len(rows), 2, dtype=torch.float64, device=logits.device)
            for r, (first, targets) in enumerate(spans):
                picked = full_vocab_logits(logits[r, first:first + len(targets)].contiguous(), vocab_size)
                logprobs = torch.log_softmax(picked, dim=-1)
                out[r, 0] = logprobs.gather(1, targets[:, None]).sum()
                out[r, 1] = float(bool((picked.argmax(dim=-1) == targets).all()))
            return out

        def step(data_iterator, model):
            batch = next(data_iterator)
            return model(batch["tokens"], batch["position_ids"], None), score

        positions = torch.arange(length, device=self._device).expand(len(rows), -1)
        with without_tp_comm_overlap(self.chunks):
            outputs = run_schedule(step, self.chunks, [dict(tokens=tokens, position_ids=positions)],
                                   forward_only=True, collect_non_loss_data=True)
        scores = outputs[0] if outputs else torch.zeros(len(rows), 2, dtype=torch.float64, device=self._device)
        if parallel_state.get_pipeline_model_parallel_world_size() > 1:  # the last stage scored
            torch.distributed.broadcast(scores, parallel_state.get_pipeline_model_parallel_last_rank(),
                                        group=parallel_state.get_pipeline_model_parallel_group())
        return scores.cpu()

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's log-likelihood from the prefix token on, in windows of max_length tokens
        (lm-eval's own windowing: every token predicted once, each window with as much context as fits)."""
        windows, owner = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, prediction in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, prediction))
                owner.append(index)
        totals = [0.0] * len(requests)
        for index, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm)):
            totals[index] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # Generation.

    def _generation_settings(self, gen_kwargs: dict) -> tuple[list[str], int, float, float]:
        """(stop strings, max new tokens, temperature (0: greedy), top_p) of a request's gen_kwargs."""
        kwargs = normalize_gen_kwargs(dict(gen_kwargs), self.max_gen_toks)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=self.tok.decode([self.eot_token_id]))
        max_new = int(kwargs.pop("max_gen_toks"))
        sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        temperature = temperature if sample else 0.0
        top_p = kwargs.pop("top_p", None)
        top_p = 1.0 if top_p is None else float(top_p)
        if kwargs:
            raise ConfigError(f"generation setting(s) {', '.join(sorted(kwargs))} are not supported by the phi4 "
                              f"model; supported: {', '.join(GENERATION_KWARGS)}")
        if max_new >= self.max_length:
            raise ConfigError(f"max_gen_toks={max_new} leaves no context within max_length={self.max_length}")
        return until, max_new, temperature, top_p

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Each (context, gen_kwargs) completed greedily (or sampled, with do_sample) up to
        max_gen_toks or <|im_end|>, cut before the first `until` string; the context keeps its
        last max_length - max_gen_toks tokens."""
        groups: dict[str, list[int]] = {}
        for index, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(index)
        results: list[Optional[str]] = [None] * len(requests)
        progress = self._progress(len(requests), "phi4 generation", disable_tqdm)
        generator = None
        for indices in groups.values():
            until, max_new, temperature, top_p = self._generation_settings(requests[indices[0]].args[1])
            if temperature > 0 and generator is None:  # the same seeded stream on every model-parallel rank
                generator = torch.Generator(device=self._device).manual_seed(self.seed)
            prompts = {i: self.tok_encode(requests[i].args[0])[-(self.max_length - max_new):] or [self.prefix_token_id]
                       for i in indices}
            order = sorted(indices, key=lambda i: -len(prompts[i]))
            for start in range(0, len(order), self.batch_size):
                batch = order[start:start + self.batch_size]
                completions = self.decoder.generate([prompts[i] for i in batch], max_new, temperature, top_p,
                                                    generator)
                for i, ids in zip(batch, completions):
                    text = self.tok_decode(ids)
                    for stop in until:
                        if stop:
                            text = text.split(stop)[0]
                    results[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                progress.update(len(batch))
        progress.close()
        return results
