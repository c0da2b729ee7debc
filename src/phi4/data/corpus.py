"""The bundled synthetic corpus: generated and indexed on first use, then reused from the cache."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

log = logging.getLogger("phi4.data")


def ensure_synthetic_corpus(prefix: Path, problems: int, seed: int) -> Path:
    """`<prefix>.bin/.idx` of `problems` arithmetic problems; made once (atomically) if missing."""
    from phi4.data.synth import write_synthetic_jsonl
    from phi4.data.preprocess import preprocess

    prefix = Path(prefix)
    if Path(f"{prefix}.bin").exists() and Path(f"{prefix}.idx").exists():
        return prefix
    log.info(f"generating the synthetic corpus ({problems} problems) into {prefix}.bin/.idx")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=prefix.parent) as tmp:
        jsonl = Path(tmp) / "problems.jsonl"
        write_synthetic_jsonl(jsonl, problems, seed)
        preprocess([jsonl], prefix, workers=0, progress=False)
    return prefix
