"""`phi4-data`: make and prepare training data.

    phi4-data synth --count N [--seed S] [--split all|train|test] [--kinds K ...] --out problems.jsonl
    phi4-data preprocess --input a.jsonl [b.jsonl.zst c.parquet hf_dataset_dir/ ...] --output-prefix data/web
                         [--text-key text] [--workers N]
    phi4-data preprocess --input-list files.txt --output-prefix data/web/shard --tasks 64 --submit [--cluster h100]
    phi4-data manifest --output-prefix data/web/shard
    phi4-data index [OVERRIDE ...]   (phi4-train's overrides: its dataset indices built ahead, into data.cache_dir)
    phi4-data chat --input chats.jsonl [...] --output-prefix data/sft --seq-length 4096
    phi4-data decontaminate --eval bench.jsonl [...] --input web.jsonl [...] --output-dir clean/ [--ngram 13]
                            [--removed removed.jsonl] [--text-key text] [--eval-keys prompt ...] [--workers N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
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


def _index(overrides: list[str]) -> None:
    """phi4-train's datasets for these overrides, built in this one process: Megatron-Core's
    document, sample and shuffle indices and the blend's land in data.cache_dir, where every rank
    of the job then reads them instead of waiting while rank 0 builds them."""
    from hydra import compose, initialize_config_dir  # lazy: only for this command
    from hydra.errors import HydraException  # lazy: only for this command
    from omegaconf.errors import OmegaConfBaseException  # lazy: only for this command

    from phi4 import conf_dir  # lazy: only for this command
    from phi4.data.formats import data_format, prepare_sources, run_datasets  # lazy: torch and Megatron-Core
    from phi4.logs import config_error_line  # lazy: only for this command
    from phi4.settings import RunSettings  # lazy: only for this command
    from phi4.train.checks import check_numbers, total_steps  # lazy: only for this command

    try:
        with initialize_config_dir(config_dir=conf_dir(), version_base=None):
            cfg = compose("train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as error:
        raise ConfigError(f"invalid override: {config_error_line(error)}") from error
    check_numbers(cfg)
    fmt = data_format(cfg.data)
    run = RunSettings.from_config(cfg)
    if not fmt.megatron_indices:
        raise ConfigError(f"data.format={fmt.name} builds no Megatron-Core indices (only data.format=gpt does): "
                          "nothing to build ahead")
    steps, start = total_steps(run.train), time.monotonic()
    sources = prepare_sources(run.data, fmt, run.train.seq_length, 0, run.model.vocab_size)
    built = run_datasets(run.data, fmt, sources, run.train, steps, run.seed)
    what = (f"built {built.made} files" if built.made else "already there: nothing to build") + f" in {built.cache}"
    print(f"dataset indices for {steps} steps x {run.train.global_batch_size} samples of {run.train.seq_length} "
          f"tokens ({len(sources)} source{'s' if len(sources) != 1 else ''}, seed {run.seed}): {what} ({time.monotonic() - start:.1f} s); "
          f"phi4-train with the same overrides reads them")


def _preprocess(args) -> None:
    from phi4.data import array  # lazy: only for preprocess

    for flag, given in (("task", args.task is not None), ("submit", args.submit), ("dry_run", args.dry_run)):
        if given and args.tasks is None:
            raise ConfigError(f"--{flag.replace('_', '-')} goes with --tasks N (the array's size)")
    if args.tasks is not None and args.submit:
        array_id, manifest_id = array.submit(args.input, args.input_list, args.output_prefix, args.tasks, args.text_key,
                                             args.cluster, args.dry_run)
        if not args.dry_run:
            print(f"submitted array {array_id} ({args.tasks} tasks) -> {args.output_prefix}_NNNNN, then manifest job "
                  f"{manifest_id} -> {args.output_prefix}.manifest.json")
        return
    inputs = args.input or array.read_input_list(args.input_list)
    if args.tasks is not None:
        task = args.task
        if task is None:
            if not os.environ.get("SLURM_ARRAY_TASK_ID", "").isdigit():
                raise ConfigError("--tasks without --task: give --task I, or run it as a task of a SLURM array "
                                  "(SLURM_ARRAY_TASK_ID is not set)")
            task = int(os.environ["SLURM_ARRAY_TASK_ID"])
        shard, done, skipped = array.run_task(inputs, args.output_prefix, task, args.tasks, args.text_key,
                                              args.workers, not args.no_progress)
        what = f"{shard}.bin/.idx already done for the same inputs: skipped" if skipped else f"wrote {shard}.bin/.idx"
        print(f"task {task} of {args.tasks}: {what} ({len(done['inputs'])} inputs, {done['documents']} documents, "
              f"{done['tokens']} tokens)")
        if done["bad_lines"]:
            print(f"skipped {done['bad_lines']} bad line(s): all in {shard}.bad_lines.txt", file=sys.stderr)
        return
    from phi4.data.preprocess import preprocess  # lazy: torch and Megatron-Core (6 s) only for this command

    report = preprocess(inputs, args.output_prefix, args.text_key, args.workers, not args.no_progress)
    blank = f", {report.blank_lines} blank lines skipped" if report.blank_lines else ""
    print(f"wrote {args.output_prefix}.bin/.idx: {report.documents} documents, {report.tokens} tokens{blank}")
    _report_bad_lines(args.output_prefix, report.bad_lines)


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
    given = p.add_mutually_exclusive_group(required=True)
    given.add_argument("--input", type=Path, nargs="+",
                       help="JSONL (.jsonl/.json/.ndjson, also .gz or .zst), .parquet, .arrow, or a directory that "
                            "Dataset.save_to_disk wrote")
    given.add_argument("--input-list", type=Path, help="a file of inputs, one a line (for thousands of files)")
    p.add_argument("--output-prefix", type=Path, required=True)
    p.add_argument("--text-key", default="text", help="the JSON key or the column holding each document's text")
    p.add_argument("--workers", type=_whole(0), default=0, help="tokenizer processes (default: one per core)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--tasks", type=_positive, default=None,
                   help="split the inputs over this many tasks (a SLURM array), one shard <prefix>_NNNNN each")
    p.add_argument("--task", type=_whole(0), default=None,
                   help="with --tasks: the task to run (default: $SLURM_ARRAY_TASK_ID)")
    p.add_argument("--submit", action="store_true",
                   help="with --tasks: sbatch the array and, after it, `phi4-data manifest`")
    p.add_argument("--cluster", default="h100", help="with --submit: conf/cluster/<NAME>.yaml or a file (default h100)")
    p.add_argument("--dry-run", action="store_true", help="with --submit: print the sbatch commands only")
    x = sub.add_parser("index", help="build a run's Megatron-Core dataset indices ahead of the job, into data.cache_dir")
    x.add_argument("overrides", nargs="*", metavar="OVERRIDE", help="the run's Hydra overrides, as phi4-train takes them")
    m = sub.add_parser("manifest", help="check the shards of an array's preprocess and write <prefix>.manifest.json")
    m.add_argument("--output-prefix", type=Path, required=True, help="the array's --output-prefix")
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
        elif args.command == "index":
            _index(args.overrides)
        elif args.command == "manifest":
            from phi4.data.array import write_manifest  # lazy: torch-free, but only for this command

            path, manifest = write_manifest(args.output_prefix)
            print(f"wrote {path}: {len(manifest['shards'])} shards, {manifest['documents']} documents, "
                  f"{manifest['tokens']} tokens")
        else:
            _preprocess(args)
    except ConfigError as err:
        print(f"phi4-data: error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 2))


if __name__ == "__main__":
    main()
