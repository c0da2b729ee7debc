"""DPO data: preference pairs from JSONL, as padded chosen/rejected rows with a response mask.

One pair a line, in any of three forms (they mix freely in one file):
- token ids, as Pivotal Token Search writes them:
  `{"prompt_ids": [...], "chosen_ids": [t], "rejected_ids": [t'], ...}`
- full responses: `{"prompt": "text" | [messages], "chosen": "text", "rejected": "text"}`
- judge-scored responses (DPO round 2): `{"prompt": ..., "responses": [{"text": ..., "score": s}, ...]}`;
  the best-scored response is chosen and the worst rejected (a line whose scores all tie is invalid).
A text prompt is one user message; messages are rendered in the Phi-4 chat format and followed by
the assistant header; a text response is followed by `<|im_end|>`. Loss (the log-probability DPO
compares) covers the response tokens only. A pair longer than `seq_length + 1` loses prompt
tokens from the left (then response tokens from the right), so the response stays whole.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from omegaconf import OmegaConf

from phi4.data.chat import ROLES, message_ids
from phi4.data.jsonl import checked_records
from phi4.data.registry import DataFormat, blend_by_weight, register
from phi4.data.tokenizer import Phi4Tokenizer
from phi4.errors import ConfigError

FORMS = ("prompt_ids/chosen_ids/rejected_ids", "prompt/chosen/rejected", "prompt/responses[{text, score}]")


def _check(record, where: str) -> dict:
    def ids_list(v):
        return isinstance(v, list) and v and all(isinstance(i, int) and i >= 0 for i in v)

    if not isinstance(record, dict):
        raise ConfigError(f"{where}: not a JSON object; a pair is one of: {'; '.join(FORMS)}")
    if "prompt_ids" in record:
        if all(ids_list(record.get(k)) for k in ("prompt_ids", "chosen_ids", "rejected_ids")):
            return record
    elif isinstance(record.get("prompt"), str) or (isinstance(record.get("prompt"), list) and all(
            isinstance(m, dict) and m.get("role") in ROLES and isinstance(m.get("content"), str) for m in record["prompt"])):
        if isinstance(record.get("chosen"), str) and isinstance(record.get("rejected"), str):
            return record
        responses = record.get("responses")
        if isinstance(responses, list) and len(responses) >= 2 and all(
                isinstance(r, dict) and isinstance(r.get("text"), str) and isinstance(r.get("score"), (int, float))
                for r in responses):
            ranked = sorted(responses, key=lambda r: r["score"])
            if ranked[0]["score"] == ranked[-1]["score"]:
                raise ConfigError(f"{where}: every response has the same score; nothing to prefer")
            return {**record, "chosen": ranked[-1]["text"], "rejected": ranked[0]["text"]}
    raise ConfigError(f"{where}: not a preference pair; valid forms: {'; '.join(FORMS)} "
                      f"(keys here: {', '.join(sorted(record))[:100]})")


def read_pairs(path: str | Path) -> list[dict]:
    """Every pair of a JSONL file, checked; the first bad line stops with its file and line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"preference data {path} not found (a JSONL of pairs; PTS writes one: phi4-pts)")
    pairs = []
    for where, record in checked_records(path):
        pairs.append(_check(record, where))
    if not pairs:
        raise ConfigError(f"{path} holds no preference pairs")
    return pairs


def pair_ids(record: dict) -> tuple[list[int], list[int], list[int]]:
    """(prompt, chosen, rejected) token ids of a checked pair."""
    if "prompt_ids" in record:
        return record["prompt_ids"], record["chosen_ids"], record["rejected_ids"]
    prompt = record["prompt"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    prompt_ids = []
    for m in messages:  # the conversation so far, none of it learnt
        header, body = message_ids(m["role"], m["content"])
        prompt_ids += header + body
    prompt_ids += message_ids("assistant", "")[0]
    return prompt_ids, message_ids("assistant", record["chosen"])[1], message_ids("assistant", record["rejected"])[1]


def _row(prompt: list[int], response: list[int], length: int, pad_id: int) -> dict:
    """One next-token row of `length` inputs: prompt + response, loss on the response."""
    row = length + 1
    response = response[:row - 1]
    prompt = prompt[max(len(prompt) + len(response) - row, 0):]
    ids = prompt + response
    mask = [0.0] * len(prompt) + [1.0] * len(response)
    pad = row - len(ids)
    ids, mask = ids + [pad_id] * pad, mask + [0.0] * pad
    return dict(tokens=torch.tensor(ids[:-1]), labels=torch.tensor(ids[1:]), loss_mask=torch.tensor(mask[1:]),
                position_ids=torch.arange(length))


class PreferenceDataset:
    """The pairs of one JSONL file (a subset of them: `rows`), each as {"chosen": row, "rejected": row}."""

    def __init__(self, path: str | Path, seq_length: int, rows: Optional[range] = None):
        self.pairs = read_pairs(path)
        self.seq_length, self.pad_id = seq_length, Phi4Tokenizer.pad_id
        self.rows = rows if rows is not None else range(len(self.pairs))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        prompt, chosen, rejected = pair_ids(self.pairs[self.rows[i]])
        return {"chosen": _row(prompt, chosen, self.seq_length, self.pad_id),
                "rejected": _row(prompt, rejected, self.seq_length, self.pad_id)}


def collate_pairs(samples: list[dict], micro_batch_size: int) -> list[dict]:
    """Micro-batches of `micro_batch_size` pairs: rows [chosen_1..k, rejected_1..k], so the DPO
    loss finds both halves of every pair in the same micro-batch."""
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    batches = []
    for start in range(0, len(samples), micro_batch_size):
        group = samples[start : start + micro_batch_size]
        rows = [s["chosen"] for s in group] + [s["rejected"] for s in group]
        batches.append({k: torch.stack([r[k] for r in rows]) for k in keys})
    return batches


@register("preference")
class PreferenceFormat(DataFormat):
    """JSONL preference pairs (PTS pairs, full-response and judge-scored pairs): DPO. Lines are
    checked as they are read."""

    def check(self, data) -> None:
        if OmegaConf.is_missing(data, "pairs"):
            raise ConfigError("data.pairs is not set: give the preference JSONL (PTS writes one: "
                              "<pts run_dir>/pairs.jsonl)")

    def check_files(self, data, sources: list, vocab_size: int) -> None:
        for s in sources:
            if not isinstance(s.path, str):
                raise ConfigError(f"data.sources.{s.name}.path: preference pairs are one JSONL file a source, "
                                  f"not a list ({list(s.path)})")

    def datasets(self, data, sources: list, seq_length: int, train_samples: int, valid_samples: int,
                 seed: int) -> tuple:
        return blend_by_weight(sources, lambda s, rows: PreferenceDataset(s.path, seq_length, rows), data.split,
                               train_samples, valid_samples)

    def collate(self, samples: list[dict], micro_batch_size: int, packed_attention: str,
                sequence_multiple: int = 1) -> list[dict]:
        return collate_pairs(samples, micro_batch_size)
