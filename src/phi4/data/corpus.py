"""Bundled synthetic corpora: generated and indexed on first use, then reused from the cache.

A data source with a `generate:` entry names one of these corpora; the first run makes it at the
source's path (atomically), later runs find it there:
- `arithmetic`: the word problems as pre-training documents (the embedded default's corpus),
- `long`: documents of many problems each, longer than the pre-training sequence (the tiny
  stand-in for mid-training's long-context sources),
- `chat`: problems as conversations, packed for SFT at the run's sequence length.
"""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path
from typing import Sequence

from phi4.data.chat import pack_chat
from phi4.data.preprocess import preprocess
from phi4.data.synth import WORD_PROBLEMS, generate, write_synthetic_jsonl

log = logging.getLogger("phi4.data")

CORPORA = ("arithmetic", "long", "chat")


def _exists(prefix: Path, corpus: str) -> bool:
    needed = [".bin", ".idx"] + ([".json"] if corpus == "chat" else [])
    return all(Path(f"{prefix}{suffix}").exists() for suffix in needed)


def ensure_corpus(prefix: Path, corpus: str = "arithmetic", problems: int = 10000, seed: int = 0,
                  kinds: Sequence[str] = WORD_PROBLEMS, problems_per_document: int = 8,
                  seq_length: int | None = None, split: str = "all") -> Path:
    """`<prefix>.bin/.idx` (and, for chat, the loss mask and `.json`) of a synthetic corpus; `split`
    "train" leaves out the questions of the held-out test split (phi4.data.synth)."""
    if corpus not in CORPORA:
        raise ValueError(f"generate.corpus={corpus!r}; valid: {', '.join(CORPORA)}")
    prefix = Path(prefix)
    if _exists(prefix, corpus):
        return prefix
    log.info(f"generating the synthetic {corpus} corpus ({problems} problems) into {prefix}")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=prefix.parent) as tmp:
        jsonl = Path(tmp) / "records.jsonl"
        if corpus == "long":
            with jsonl.open("w") as f:
                texts = [p.text() for p in generate(problems, seed, kinds, split)]
                for start in range(0, len(texts), problems_per_document):
                    f.write(json.dumps({"text": "\n\n".join(texts[start:start + problems_per_document])}) + "\n")
        else:
            write_synthetic_jsonl(jsonl, problems, seed, kinds, chat=corpus == "chat", split=split)
        if corpus == "chat":
            pack_chat([jsonl], prefix, seq_length)
        else:
            preprocess([jsonl], prefix, workers=0, progress=False)
    return prefix

