"""SFT data: chat JSONL -> packed sequences with a loss mask, as Megatron-Core indexed datasets.

A line is `{"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}`,
rendered in the Phi-4 chat format (docs/model.md, "Chat format"). Loss falls on each assistant
message's content and its `<|im_end|>` (so the model learns to stop), never on headers, system or
user text.

Packing, not padding: conversations are packed in order into rows of `seq_length + 1` tokens
(next fit; a conversation never straddles two rows), and attention is kept inside each
conversation (a block-diagonal causal mask on the `local` backend, THD `cu_seqlens` on `te`),
with positions restarting at 0 for each. Padding every conversation to the full length would
waste most of each row on short chats; packing with the mask computes the same function as
one conversation at a time (tests/test_sft.py) at a fraction of the tokens.

Packed with `--align A`, each conversation takes the room of its length rounded up to a multiple
of A within the row's `seq_length` inputs: the room context parallelism needs, where each
conversation is padded to a multiple of 2 x cp (x tp with sequence parallelism) at collation and
cut into its own 2 x cp chunks (phi4.model.context_parallel).

On disk (`<prefix>`): `.bin/.idx` holds the tokens, one sequence per conversation, one document
per packed row; `.loss_mask.bin/.idx` the same shape in uint8; `.json` the packing's numbers
and the `seq_length` it was packed for, which training checks.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, Optional

import numpy
import torch
from megatron.core.datasets.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron.core.packed_seq_params import PackedSeqParams

from phi4.data.blend import check_sources
from phi4.data.check import check_tokens, read_index
from phi4.data.jsonl import BadLine, jsonl_records
from phi4.data.registry import DataFormat, blend_by_weight, register, stack_rows
from phi4.data.tokenizer import Phi4Tokenizer, get_tokenizer
from phi4.errors import ConfigError

ROLES = ("system", "user", "assistant")
MASK_SUFFIX = ".loss_mask"


def message_ids(role: str, content: str) -> tuple[list[int], list[int]]:
    """(header ids, body ids) of one message; the body is the content and its `<|im_end|>`."""
    tok = get_tokenizer()
    # Special-token strings inside content stay text: a message cannot forge a turn boundary.
    return tok.encode(f"<|im_start|>{role}<|im_sep|>"), tok.encode(content, allow_special=False) + [tok.eos_id]


def tokenize_conversation(messages) -> tuple[list[int], list[int]]:
    """(token ids, loss mask) of one conversation; raises ValueError for a malformed one."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list")
    ids: list[int] = []
    mask: list[int] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} must be {{'role': one of {', '.join(ROLES)}, 'content': a string}}")
        header, body = message_ids(m["role"], m["content"])
        learn = 1 if m["role"] == "assistant" else 0
        ids += header + body
        mask += [0] * len(header) + [learn] * len(body)
    if not any(mask):
        raise ValueError("no assistant message: nothing to learn from")
    return ids, mask


@dataclass
class PackReport:
    seq_length: int
    align: int = 1
    conversations: int = 0
    packs: int = 0
    tokens: int = 0
    loss_tokens: int = 0
    bad_lines: list[str] = field(default_factory=list)

    @property
    def fill(self) -> float:
        """Share of the packed rows' tokens that are conversation, not padding."""
        return self.tokens / (self.packs * (self.seq_length + 1)) if self.packs else 0.0


def _records(paths: Iterable[Path]) -> Iterator[tuple[str, object]]:
    for path in paths:
        for where, record in jsonl_records(path):
            if not isinstance(record, BadLine) and (not isinstance(record, dict) or "messages" not in record):
                record = ValueError("not an object with a 'messages' list")
            yield where, record if isinstance(record, Exception) else record["messages"]


def aligned(n: int, align: int) -> int:
    """`n` rounded up to a multiple of `align`."""
    return -(-n // align) * align


def pack_chat(inputs: list[Path], output_prefix: Path, seq_length: int, align: int = 1) -> PackReport:
    """Tokenize, mask and pack chat JSONL into `<output_prefix>` (written under temporary names,
    renamed only when complete). Bad lines and conversations longer than a row are reported.
    With `align` > 1 each conversation counts as its length rounded up to a multiple of `align`,
    and a row holds `seq_length` of them (the inputs), so that every conversation can be padded
    to that multiple inside its row."""
    missing = [str(p) for p in inputs if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"phi4-data chat: input file(s) not found: {', '.join(missing)}")
    if align < 1 or seq_length % align:
        raise ConfigError(f"phi4-data chat: --align {align} must be a positive divisor of --seq-length {seq_length}")
    row = seq_length + 1 if align == 1 else seq_length
    size = (lambda n: n) if align == 1 else (lambda n: aligned(n, align))
    output_prefix = Path(output_prefix)
    output_prefix.parent.mkdir(parents=True, exist_ok=True)
    partial = output_prefix.parent / f".{output_prefix.name}.partial-{os.getpid()}"
    names = [f"{partial}", f"{partial}{MASK_SUFFIX}"]
    tokens_out = IndexedDatasetBuilder(f"{names[0]}.bin", dtype=numpy.int32)
    mask_out = IndexedDatasetBuilder(f"{names[1]}.bin", dtype=numpy.uint8)
    report = PackReport(seq_length, align)
    used = 0  # tokens in the open row
    try:
        for where, messages in _records(inputs):
            try:
                if isinstance(messages, Exception):
                    raise messages
                ids, mask = tokenize_conversation(messages)
            except ValueError as err:
                report.bad_lines.append(f"{where}: {err}")
                continue
            if size(len(ids)) > row:
                room = f"seq_length + 1 = {row}" if align == 1 else f"seq_length = {row} (aligned to {align})"
                report.bad_lines.append(f"{where}: {len(ids)} tokens, longer than a row of {room}")
                continue
            if used and used + size(len(ids)) > row:  # next fit: close the open row
                tokens_out.end_document()
                mask_out.end_document()
                report.packs += 1
                used = 0
            tokens_out.add_item(torch.tensor(ids, dtype=torch.int32))
            mask_out.add_item(torch.tensor(mask, dtype=torch.uint8))
            used += size(len(ids))
            report.conversations += 1
            report.tokens += len(ids)
            report.loss_tokens += sum(mask)
        if used:
            tokens_out.end_document()
            mask_out.end_document()
            report.packs += 1
        if not report.conversations:
            raise ConfigError(f"phi4-data chat: no valid conversations in {', '.join(map(str, inputs))} "
                              f"({len(report.bad_lines)} bad lines, e.g. {report.bad_lines[:1]})")
        tokens_out.finalize(f"{names[0]}.idx")
        mask_out.finalize(f"{names[1]}.idx")
    except BaseException:
        for name in names:
            for suffix in (".bin", ".idx"):
                Path(f"{name}{suffix}").unlink(missing_ok=True)
        raise
    meta = {k: v for k, v in asdict(report).items() if k != "bad_lines"} | {"fill": report.fill, "format": "packed_chat"}
    Path(f"{partial}.json").write_text(json.dumps(meta, indent=1) + "\n")
    bad_path = Path(f"{output_prefix}.bad_lines.txt")
    if report.bad_lines:
        bad_path.write_text("\n".join(report.bad_lines) + "\n")
    else:
        bad_path.unlink(missing_ok=True)
    for name, final in zip(names, [str(output_prefix), f"{output_prefix}{MASK_SUFFIX}"]):
        for suffix in (".bin", ".idx"):
            os.replace(f"{name}{suffix}", f"{final}{suffix}")
    os.replace(f"{partial}.json", f"{output_prefix}.json")  # last: its presence marks a complete set
    return report


class PackedChatDataset:
    """Packed rows of one `pack_chat` output, as training samples: `tokens`, `labels`,
    `loss_mask`, `position_ids` (restarting per conversation), `segments` (the lengths of the
    conversations in the inputs, then of the padding) and `conversations` (how many of the segments
    are conversations)."""

    def __init__(self, prefix: str | Path, seq_length: int, rows: Optional[range] = None):
        prefix = str(prefix)
        meta_path = Path(f"{prefix}.json")
        if not meta_path.is_file():
            raise ConfigError(f"{prefix}: no {meta_path.name}; make the packed chat data with "
                              f"`phi4-data chat --input CHATS.jsonl --output-prefix {prefix} --seq-length {seq_length}`")
        meta = json.loads(meta_path.read_text())
        if meta.get("seq_length") != seq_length:
            raise ConfigError(f"{prefix} was packed for seq_length {meta.get('seq_length')}, but train.seq_length="
                              f"{seq_length}; repack it with `phi4-data chat ... --seq-length {seq_length}`")
        self.tokens = IndexedDataset(prefix)
        self.mask = IndexedDataset(prefix + MASK_SUFFIX)
        self.docs = self.tokens.document_indices
        if len(self.docs) - 1 != meta["packs"] or not numpy.array_equal(self.mask.sequence_lengths,
                                                                        self.tokens.sequence_lengths):
            raise ConfigError(f"{prefix}: tokens, loss mask and {meta_path.name} disagree; repack it")
        self.seq_length, self.pad_id = seq_length, Phi4Tokenizer.pad_id
        self.rows = rows if rows is not None else range(len(self.docs) - 1)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        pack = self.rows[i]
        first, last = int(self.docs[pack]), int(self.docs[pack + 1])
        ids = [numpy.asarray(self.tokens[j]) for j in range(first, last)]
        masks = [numpy.asarray(self.mask[j]) for j in range(first, last)]
        lengths = [len(x) for x in ids]
        row = self.seq_length + 1
        pad = row - sum(lengths)
        tokens = numpy.concatenate(ids + [numpy.full(pad, self.pad_id, numpy.int64)]).astype(numpy.int64)
        mask = numpy.concatenate(masks + [numpy.zeros(pad, numpy.uint8)]).astype(numpy.float32)
        positions = numpy.concatenate([numpy.arange(n) for n in lengths + [pad]])
        segments = [n for n in lengths + [pad] if n]  # of the row; the inputs drop its last token
        segments[-1] -= 1
        if segments[-1] == 0:
            segments.pop()
        return dict(tokens=torch.from_numpy(tokens[:-1].copy()), labels=torch.from_numpy(tokens[1:].copy()),
                    loss_mask=torch.from_numpy(mask[1:].copy()), position_ids=torch.from_numpy(positions[:-1].copy()),
                    segments=segments, conversations=min(len(lengths), len(segments)))


def block_causal_mask(segments: list[list[int]], seq: int):
    """[batch, 1, seq, seq] boolean mask (True = not attended) that keeps each position's
    attention causal and inside its own segment: Megatron-Core's attention-mask convention."""
    seg_ids = torch.stack([torch.repeat_interleave(torch.arange(len(s)), torch.tensor(s)) for s in segments])
    assert seg_ids.shape[1] == seq, (seg_ids.shape, seq)
    same = seg_ids[:, :, None] == seg_ids[:, None, :]
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    return ~(same & causal).unsqueeze(1)


def _cumulative(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *numpy.cumsum(lengths).tolist()], dtype=torch.int32)


def pad_conversations(batch: dict, segments: list[list[int]], conversations: list[int], multiple: int,
                      pad_id: int) -> tuple[dict, list[int], list[int]]:
    """The micro-batch with each conversation padded to a multiple of `multiple` inside its row
    (pad tokens and labels, no loss, positions running on), the row's trailing padding shortened to
    match; with the (actual, padded) lengths of every segment, row after row. The padding follows
    each conversation's last token, so causal attention leaves the real tokens' outputs as they were."""
    rows, seq = batch["tokens"].shape
    out = dict(tokens=torch.full((rows, seq), pad_id, dtype=batch["tokens"].dtype),
               labels=torch.full((rows, seq), pad_id, dtype=batch["labels"].dtype),
               loss_mask=torch.zeros((rows, seq), dtype=batch["loss_mask"].dtype),
               position_ids=torch.zeros((rows, seq), dtype=batch["position_ids"].dtype))
    actual, padded = [], []
    for b, (row_segments, count) in enumerate(zip(segments, conversations)):
        src = dst = 0
        for n in row_segments[:count]:
            room = aligned(n, multiple)
            if dst + room > seq:
                raise ConfigError(f"a packed row's conversations ({row_segments[:count]}) padded to multiples of "
                                  f"{multiple} exceed train.seq_length={seq}: the data was not packed with "
                                  f"`phi4-data chat --align` a multiple of {multiple}")
            for k in ("tokens", "labels", "loss_mask"):
                out[k][b, dst : dst + n] = batch[k][b, src : src + n]
            out["position_ids"][b, dst : dst + room] = torch.arange(room)
            actual.append(n)
            padded.append(room)
            src, dst = src + n, dst + room
        if dst < seq:  # the trailing padding: one segment of its own
            out["position_ids"][b, dst:] = torch.arange(seq - dst)
            actual.append(seq - dst)
            padded.append(seq - dst)
    return out, actual, padded


def thd_packed(batch: dict, segments: list[list[int]], conversations: Optional[list[int]] = None,
               multiple: int = 1, pad_id: int = Phi4Tokenizer.pad_id) -> dict:
    """The micro-batch flattened into one packed row with `cu_seqlens`, for Transformer Engine's
    attention (the te backend). With `multiple` > 1 (context parallelism) each conversation is first
    padded to a multiple of it, and `cu_seqlens_q_padded` gives the padded boundaries that TE's
    context-parallel attention and Megatron-Core's THD RoPE lay the tokens out by (Megatron-Bridge's
    packed sequences: cu_seqlens unpadded, cu_seqlens_padded padded)."""
    lengths = [n for row in segments for n in row]
    padded = None
    if multiple > 1:
        batch, lengths, padded = pad_conversations(batch, segments, conversations, multiple, pad_id)
    flat = {k: batch[k].reshape(1, -1) for k in ("tokens", "labels", "loss_mask", "position_ids")}
    cu = _cumulative(lengths)
    cu_padded = _cumulative(padded) if padded is not None else None
    longest = max(padded if padded is not None else lengths)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_padded,
                             cu_seqlens_kv_padded=cu_padded, max_seqlen_q=longest, max_seqlen_kv=longest)
    return {**flat, "packed_seq_params": params}


@register("packed_chat")
class PackedChatFormat(DataFormat):
    """Packed conversations with a loss mask (`phi4-data chat`): SFT. Attention stays inside each
    conversation: a block-causal mask (`mask`, the local backend) or THD boundaries (`thd`, te)."""

    def check_packing(self, sources: list, multiple: int, needed_by: str) -> None:
        """Each source packed with room to pad every conversation to `multiple` (`phi4-data chat --align`)."""
        if multiple == 1:
            return
        for s in sources:
            meta = json.loads(Path(f"{s.path}.json").read_text())
            align = int(meta.get("align", 1))
            if align % multiple:
                raise ConfigError(
                    f"data.sources.{s.name}: {s.path} was packed with --align {align}, but {needed_by} pads each "
                    f"conversation to a multiple of {multiple}; repack it with `phi4-data chat --input CHATS.jsonl "
                    f"--output-prefix {s.path} --seq-length {meta.get('seq_length')} --align {multiple}` "
                    f"(or a multiple of {multiple})")

    def check_files(self, data, sources: list, vocab_size: int) -> None:
        check_sources(sources, shards=False)
        for s in sources:
            lengths = check_tokens(s.path, vocab_size, f"data.sources.{s.name}")
            _, mask_lengths = read_index(s.path + MASK_SUFFIX)
            if not numpy.array_equal(lengths, mask_lengths):
                raise ConfigError(f"data.sources.{s.name}: {s.path}{MASK_SUFFIX}.idx does not match {s.path}.idx "
                                  "row for row: re-make both with `phi4-data chat`")

    def datasets(self, data, sources: list, seq_length: int, train_samples: int, valid_samples: int,
                 seed: int) -> tuple:
        return blend_by_weight(sources, lambda s, rows: PackedChatDataset(s.path, seq_length, rows), data.split,
                               train_samples, valid_samples)

    def collate(self, samples: list[dict], micro_batch_size: int, packed_attention: str,
                sequence_multiple: int = 1) -> list[dict]:
        batches = stack_rows(samples, micro_batch_size)
        for start, batch in zip(range(0, len(samples), micro_batch_size), batches):
            group = samples[start : start + micro_batch_size]
            segments = [s["segments"] for s in group]
            if packed_attention == "mask":
                batch["attention_mask"] = block_causal_mask(segments, batch["tokens"].shape[1])
            else:
                batch.update(thd_packed(batch, segments, [s["conversations"] for s in group], sequence_multiple))
        return batches
