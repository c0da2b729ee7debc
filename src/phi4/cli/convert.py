"""`phi4-convert`: Hugging Face Phi-4 <-> Megatron-Core checkpoints.

    phi4-convert hf-to-mcore --hf DIR --out DIR [--model NAME|YAML] [--dtype keep|bf16|fp32] [--verify]
    phi4-convert mcore-to-hf --ckpt DIR --out DIR [--model NAME|YAML] [--dtype ...] [--max-shard-size 2GB] [--verify]

Exit codes: 0 done, 1 verification over tolerance, 2 bad input (one line naming it).
"""

from __future__ import annotations

import argparse
import logging
import math
import re
import sys
import time
from pathlib import Path

import torch

from phi4 import conf_dir
from phi4.convert.convert import hf_to_mcore, mcore_to_hf
from phi4.convert.verify import max_logit_difference
from phi4.errors import ConfigError
from phi4.logs import quiet_dependencies
from phi4.model.config import ModelConfig
from phi4.settings import load_group

CONF_MODEL_DIR = Path(conf_dir()) / "model"
DTYPES = {"keep": None, "bf16": torch.bfloat16, "fp32": torch.float32}


def _load_model_config(spec: str | None):
    if spec is None:
        return None

    path = Path(spec)
    if not path.exists():
        path = CONF_MODEL_DIR / f"{spec}.yaml"
    if not path.exists():
        names = ", ".join(sorted(p.stem for p in CONF_MODEL_DIR.glob("*.yaml")))
        raise ConfigError(f"--model {spec}: neither a yaml file nor a model in conf/model ({names})")
    return ModelConfig.from_dict(load_group("model", path))


def _size(text: str) -> int:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([KMG]?)B?", text.strip().upper())
    size = int(float(match.group(1)) * {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3}[match.group(2)]) if match else 0
    if size < 1:
        raise ConfigError(f"--max-shard-size {text!r}: give a size above 0, such as 2GB, 500MB")
    return size


def _tolerance(text: str) -> float:
    """An argparse type: a logit difference of at least 0 (argparse names the option)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of at least 0, e.g. 1e-4")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="phi4-convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, source in (("hf-to-mcore", "--hf"), ("mcore-to-hf", "--ckpt")):
        p = sub.add_parser(name)
        p.add_argument(source, required=True, type=Path, dest="source",
                       help="Hugging Face directory" if source == "--hf" else "Megatron-Core torch_dist checkpoint directory")
        p.add_argument("--out", required=True, type=Path, help="output directory (must not exist, unless --overwrite)")
        p.add_argument("--model", help="model config to check against: a name in conf/model or a yaml file")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="keep", help="output dtype (default: as stored)")
        p.add_argument("--verify", action="store_true", help="compare logits of source and result on the CPU")
        p.add_argument("--tolerance", type=_tolerance, default=1e-4, help="largest logit difference --verify accepts")
        p.add_argument("--overwrite", action="store_true", help="replace an existing --out once the new one is complete")
        p.add_argument("--no-progress", action="store_true")
        if name == "mcore-to-hf":
            p.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard (default 2GB)")
    return parser


class VerificationFailed(Exception):
    pass


def run(argv=None) -> int:
    args = _parser().parse_args(argv)

    model = _load_model_config(args.model)
    to_mcore = args.command == "hf-to-mcore"

    def verify(model, written: Path) -> None:
        hf_dir, ckpt_dir = (args.source, written) if to_mcore else (written, args.source)
        diff, scale = max_logit_difference(hf_dir, ckpt_dir, model)
        verdict = "ok" if diff <= args.tolerance else "FAILED"
        print(f"verify: largest logit difference {diff:.3e} (largest logit {scale:.3f}, "
              f"tolerance {args.tolerance:.0e}): {verdict}")
        if diff > args.tolerance:
            raise VerificationFailed(f"largest logit difference {diff:.3e} over the tolerance {args.tolerance:.0e}")

    check = verify if args.verify else None
    started = time.perf_counter()
    try:
        if to_mcore:
            hf_to_mcore(args.source, args.out, model, DTYPES[args.dtype], args.overwrite, not args.no_progress, check)
        else:
            mcore_to_hf(args.source, args.out, model, DTYPES[args.dtype], _size(args.max_shard_size),
                        args.overwrite, not args.no_progress, check)
    except VerificationFailed as err:
        print(f"phi4-convert: {err}; {args.out} was not written", file=sys.stderr)
        return 1
    print(f"wrote {args.out} in {time.perf_counter() - started:.1f}s", file=sys.stderr)
    return 0


def main(argv=None) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    quiet_dependencies()
    try:
        code = run(argv)
    except ConfigError as err:
        print(f"phi4-convert: error: {err}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
