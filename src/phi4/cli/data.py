"""`phi4-data`: make and prepare training data.

    phi4-data synth --count N [--seed S] [--split all|train|test] [--kinds K ...] --out problems.jsonl
    phi4-data preprocess --input a.jsonl [b.jsonl.zst c.parquet hf_dataset_dir/ ...] --output-prefix data/web
                         [--text-key text] [--workers N]
    phi4-data chat --input chats.jsonl [...] --output-prefix data/sft --seq-length 4096
    phi4-data decontaminate --eval bench.jsonl [...] --input web.jsonl [...] --output-dir clean/ [--ngram 13]
                            [--removed removed.jsonl] [--text-key text] [--eval-keys prompt ...] [--workers N]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from phi4.data.decontaminate import EVAL_KEYS, decontaminate
from phi4.data.synth import KINDS, WORD_PROBLEMS, write_synthetic_jsonl
from phi4.errors import ConfigError
from phi4.logs import quiet_dependencies


def _report_bad_lines(prefix: Path, bad_lines: list[str]) -> None:
    if bad_lines:
        shown = "\n  ".join(bad_lines[:10])
        more = f"\n  ... all {len(bad_lines)} in {prefix}.bad_lines.txt" if len(bad_lines) > 10 else ""
        print(f"skipped {len(bad_lines)} bad line(s):\n  {shown}{more}", file=sys.stderr)


def _decontaminate(args) -> None:
    report = decontaminate(args.input, args.eval, args.output_dir, args.ngram, args.text_key,
                           args.eval_keys or EVAL_KEYS, args.removed, args.workers, not args.no_progress)
    for e in report.eval_sets:
        short = f", {e.too_short} shorter than {report.ngram} words (not checkable)" if e.too_short else ""
        print(f"eval {e.path}: {e.items} items, {e.ngrams} {report.ngram}-grams{short}; "
              f"{e.found_in_training} found in the training data")
    for s in report.sources:
        share = s.removed_documents / s.documents if s.documents else 0.0
        print(f"{s.path} -> {s.output}: {s.documents} documents, removed {s.removed_documents} ({share:.2%}), "
              f"{s.removed_tokens} tokens")
        _report_bad_lines(Path(s.output), s.bad_lines)
    where = f"; removed documents in {args.removed}" if args.removed else ""
    print(f"{report.throughput()}; report in {args.output_dir / 'decontamination.json'}{where}")


def _whole(least: int):
    """An argparse type: a whole number of at least `least` (argparse names the option)."""
    def parse(text: str) -> int:
        if not text.isdigit() or int(text) < least:
            raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of at least {least}")
        return int(text)
    return parse


_positive = _whole(1)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="phi4-data", description="Make and prepare training data.")
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("synth", help="synthetic arithmetic word problems with worked solutions, as JSONL")
    s.add_argument("--count", type=_positive, required=True)
    s.add_argument("--seed", type=_whole(0), default=0)
    s.add_argument("--split", choices=["all", "train", "test"], default="all",
                   help="test: only held-out questions (never in a train draw, whatever the seed); train: none of them")
    s.add_argument("--kinds", nargs="+", default=None, help="problem kinds (default: the word problems of the corpus)")
    s.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("preprocess", help="documents (JSONL, .gz/.zst, Parquet, Arrow, a Hugging Face dataset "
                                          "directory) -> Megatron-Core indexed dataset (.bin/.idx)")
    p.add_argument("--input", type=Path, nargs="+", required=True,
                   help="JSONL (.jsonl/.json/.ndjson, also .gz or .zst), .parquet, .arrow, or a directory that "
                        "Dataset.save_to_disk wrote")
    p.add_argument("--output-prefix", type=Path, required=True)
    p.add_argument("--text-key", default="text", help="the JSON key or the column holding each document's text")
    p.add_argument("--workers", type=_whole(0), default=0, help="tokenizer processes (default: one per core)")
    p.add_argument("--no-progress", action="store_true")
    c = sub.add_parser("chat", help="chat JSONL ({'messages': [...]}) -> packed SFT rows with a loss mask")
    c.add_argument("--input", type=Path, nargs="+", required=True)
    c.add_argument("--output-prefix", type=Path, required=True)
    c.add_argument("--seq-length", type=_positive, required=True, help="train.seq_length of the SFT run")
    c.add_argument("--align", type=_positive, default=1,
                   help="room to pad each conversation to a multiple of this: with context parallelism, 2 x "
                        "topology.cp (x topology.tp with sequence parallelism), e.g. 16 for h100_1920_midtrain "
                        "(default 1: no padding)")
    d = sub.add_parser("decontaminate", help="drop training documents sharing an n-gram with evaluation items")
    d.add_argument("--eval", type=Path, nargs="+", required=True, help="evaluation JSONL files")
    d.add_argument("--input", type=Path, nargs="+", required=True, help="training JSONL files")
    d.add_argument("--output-dir", type=Path, required=True, help="each input is written here under its own name")
    d.add_argument("--ngram", type=_positive, default=13, help="n-gram length in normalized words (default 13)")
    d.add_argument("--removed", type=Path, default=None, help="write the removed documents here (default: drop)")
    d.add_argument("--text-key", default="text")
    d.add_argument("--eval-keys", nargs="+", default=None, help="fields of an evaluation item to take n-grams from "
                   "(default: prompt question problem text solution answer messages)")
    d.add_argument("--workers", type=_whole(0), default=0, help="processes (default: one per core)")
    d.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    quiet_dependencies()
    try:
        if args.command == "synth":
            unknown = sorted(set(args.kinds or ()) - set(KINDS))
            if unknown:
                raise ConfigError(f"--kinds {' '.join(unknown)}: valid kinds are {', '.join(KINDS)}")
            try:
                write_synthetic_jsonl(args.out, args.count, args.seed, args.kinds or WORD_PROBLEMS, split=args.split)
            except ValueError as err:  # a kind with no question in the asked split
                raise ConfigError(f"--split {args.split}: {err}") from err
            print(f"wrote {args.count} problems ({args.split} split) to {args.out}")
        elif args.command == "chat":
            from phi4.data.chat import pack_chat  # lazy: torch and Megatron-Core (6 s) only for this command

            report = pack_chat(args.input, args.output_prefix, args.seq_length, args.align)
            align = f", each conversation's room a multiple of {args.align}" if args.align > 1 else ""
            print(f"wrote {args.output_prefix}.bin/.idx (+ loss mask): {report.conversations} conversations in "
                  f"{report.packs} rows of {args.seq_length + 1} tokens ({report.fill:.0%} filled{align}, "
                  f"{report.loss_tokens} of {report.tokens} tokens carry loss)")
            _report_bad_lines(args.output_prefix, report.bad_lines)
        elif args.command == "decontaminate":
            _decontaminate(args)
        else:
            from phi4.data.preprocess import preprocess  # lazy: torch and Megatron-Core (6 s) only for this command

            report = preprocess(args.input, args.output_prefix, args.text_key, args.workers, not args.no_progress)
            blank = f", {report.blank_lines} blank lines skipped" if report.blank_lines else ""
            print(f"wrote {args.output_prefix}.bin/.idx: {report.documents} documents, {report.tokens} tokens{blank}")
            _report_bad_lines(args.output_prefix, report.bad_lines)
    except ConfigError as err:
        print(f"phi4-data: error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2))


if __name__ == "__main__":
    main()
