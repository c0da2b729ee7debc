"""`phi4-data`: make and prepare training data.

    phi4-data synth --count N [--seed S] [--split all|train|test] [--kinds K ...] --out problems.jsonl
    phi4-data preprocess --input a.jsonl [b.jsonl ...] --output-prefix data/web [--text-key text] [--workers N]
    phi4-data chat --input chats.jsonl [...] --output-prefix data/sft --seq-length 4096
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from phi4.errors import ConfigError
from phi4.logs import quiet_dependencies


def _report_bad_lines(prefix: Path, bad_lines: list[str]) -> None:
    if bad_lines:
        shown = "\n  ".join(bad_lines[:10])
        more = f"\n  ... all {len(bad_lines)} in {prefix}.bad_lines.txt" if len(bad_lines) > 10 else ""
        print(f"skipped {len(bad_lines)} bad line(s):\n  {shown}{more}", file=sys.stderr)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="phi4-data", description="Make and prepare training data.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="synthetic arithmetic word problems with worked solutions, as JSONL")
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--split", choices=["all", "train", "test"], default="all",
                   help="test: only held-out questions (never in a train draw, whatever the seed); train: none of them")
    s.add_argument("--kinds", nargs="+", default=None, help="problem kinds (default: the word problems of the corpus)")
    s.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("preprocess", help="JSONL documents -> Megatron-Core indexed dataset (.bin/.idx)")
    p.add_argument("--input", type=Path, nargs="+", required=True)
    p.add_argument("--output-prefix", type=Path, required=True)
    p.add_argument("--text-key", default="text")
    p.add_argument("--workers", type=int, default=0, help="tokenizer processes (default: one per core)")
    p.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("chat", help="chat JSONL ({'messages': [...]}) -> packed SFT rows with a loss mask")
    c.add_argument("--input", type=Path, nargs="+", required=True)
    c.add_argument("--output-prefix", type=Path, required=True)
    c.add_argument("--seq-length", type=int, required=True, help="train.seq_length of the SFT run")
    args = parser.parse_args(argv)
    quiet_dependencies()
    try:
        if args.command == "synth":
            from phi4.data.synth import KINDS, WORD_PROBLEMS, write_synthetic_jsonl

            unknown = sorted(set(args.kinds or ()) - set(KINDS))
            if unknown:
                raise ConfigError(f"--kinds {' '.join(unknown)}: valid kinds are {', '.join(KINDS)}")
            try:
                write_synthetic_jsonl(args.out, args.count, args.seed, args.kinds or WORD_PROBLEMS, split=args.split)
            except ValueError as err:  # a kind with no question in the asked split
                raise ConfigError(f"--split {args.split}: {err}") from err
            print(f"wrote {args.count} problems ({args.split} split) to {args.out}")
        elif args.command == "chat":
            from phi4.data.chat import pack_chat

            report = pack_chat(args.input, args.output_prefix, args.seq_length)
            print(f"wrote {args.output_prefix}.bin/.idx (+ loss mask): {report.conversations} conversations in "
                  f"{report.packs} rows of {args.seq_length + 1} tokens ({report.fill:.0%} filled, "
                  f"{report.loss_tokens} of {report.tokens} tokens carry loss)")
            _report_bad_lines(args.output_prefix, report.bad_lines)
        else:
            from phi4.data.preprocess import preprocess

            report = preprocess(args.input, args.output_prefix, args.text_key, args.workers, not args.no_progress)
            print(f"wrote {args.output_prefix}.bin/.idx: {report.documents} documents, {report.tokens} tokens")
            _report_bad_lines(args.output_prefix, report.bad_lines)
    except ConfigError as err:
        print(f"phi4-data: error: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
