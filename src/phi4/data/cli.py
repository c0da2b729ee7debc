"""`phi4-data`: make and prepare training data.

    phi4-data synth --count N [--seed S] --out problems.jsonl
    phi4-data preprocess --input a.jsonl [b.jsonl ...] --output-prefix data/web [--text-key text] [--workers N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from phi4.errors import ConfigError
from phi4.logs import quiet_dependencies


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="phi4-data", description="Make and prepare training data.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="synthetic arithmetic word problems with worked solutions, as JSONL")
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("preprocess", help="JSONL documents -> Megatron-Core indexed dataset (.bin/.idx)")
    p.add_argument("--input", type=Path, nargs="+", required=True)
    p.add_argument("--output-prefix", type=Path, required=True)
    p.add_argument("--text-key", default="text")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: one per core)")
    p.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    quiet_dependencies()
    try:
        if args.command == "synth":
            from phi4.data.synth import write_synthetic_jsonl

            write_synthetic_jsonl(args.out, args.count, args.seed)
            print(f"wrote {args.count} problems to {args.out}")
        else:
            from phi4.data.preprocess import preprocess

            report = preprocess(args.input, args.output_prefix, args.text_key, args.workers, not args.no_progress)
            print(f"wrote {args.output_prefix}.bin/.idx: {report.documents} documents, {report.tokens} tokens")
            if report.bad_lines:
                shown = "\n  ".join(report.bad_lines[:10])
                more = f"\n  ... all {len(report.bad_lines)} in {args.output_prefix}.bad_lines.txt" if len(report.bad_lines) > 10 else ""
                print(f"skipped {len(report.bad_lines)} bad line(s):\n  {shown}{more}", file=sys.stderr)
    except ConfigError as err:
        print(f"phi4-data: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
