"""phi4-report: pictures and a one-page summary of training runs, from their metrics.jsonl.

    phi4-report RUN_DIR [RUN_DIR ...] [--out DIR]

Several run directories are a chain of stages (pretrain, midtrain, sft, dpo): their steps are
laid end to end, each stage's start marked. Works on a run still running (it reads the records
written so far). Writes into --out (default: the first run directory's report/):
  loss.png        training loss, validation loss (the blend's and each source's), spikes and
                  skipped steps marked
  lr.png          the learning rate
  grad_norm.png   the gradient norm
  throughput.png  tokens/s and MFU
  eval.png        each evaluation task's accuracy with its 95% interval (when there are any)
  README.md       the summary table, linking the pictures
Exit status: 0, or 2 when a directory holds no metrics.jsonl.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from phi4.errors import ConfigError

USAGE = "usage: phi4-report RUN_DIR [RUN_DIR ...] [--out DIR]"


@dataclass
class Stage:
    """One run directory's records, placed at `offset` steps into the chain."""

    run_dir: Path
    offset: int
    records: list[dict] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.run_dir.name

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(chain steps, values) of every record holding a number under `key`."""
        pairs = [(self.offset + r["step"], r[key]) for r in self.records
                 if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    @property
    def last_step(self) -> int:
        return max((r.get("step", 0) for r in self.records), default=0)


def read_records(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records; a last line still being written is left out."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise ConfigError(f"{run_dir}: no metrics.jsonl (not a phi4-train run directory, or no step logged yet)")
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def read_chain(run_dirs: list[Path]) -> list[Stage]:
    stages, offset = [], 0
    for run_dir in run_dirs:
        stage = Stage(run_dir, offset, read_records(run_dir))
        stages.append(stage)
        offset += stage.last_step
    return stages


def _keys(stages: list[Stage], prefix: str, suffix: str = "") -> list[str]:
    return sorted({k for s in stages for r in s.records for k in r if k.startswith(prefix) and k.endswith(suffix)})


def _figure(title: str, ylabel: str, stages: list[Stage]):
    import matplotlib  # lazy: phi4-report alone needs it

    matplotlib.use("Agg")
    from matplotlib import pyplot  # lazy: phi4-report alone needs it

    figure, axes = pyplot.subplots(figsize=(9, 4.5), dpi=110)
    axes.set_title(title)
    axes.set_xlabel("step" if len(stages) == 1 else "step (stages end to end)")
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if len(stages) > 1:
        for stage in stages:
            axes.axvline(stage.offset, color="grey", linestyle=":", linewidth=1)
            axes.annotate(stage.name, (stage.offset, 1), xycoords=("data", "axes fraction"), rotation=90,
                          va="top", ha="right", fontsize=8, color="grey")
    return figure, axes


def _save(figure, path: Path) -> Path:
    for axes in figure.axes:
        axes.set_xlim(left=0)  # the whole run, from its start
    figure.tight_layout()
    figure.savefig(path)
    import matplotlib.pyplot as pyplot  # lazy: phi4-report alone needs it

    pyplot.close(figure)
    return path


def plot_loss(stages: list[Stage], out: Path) -> Path:
    figure, axes = _figure("loss", "loss", stages)
    labelled = set()

    def label(text: str) -> Optional[str]:  # each curve in the legend once, not once per stage
        if text in labelled:
            return None
        labelled.add(text)
        return text

    for stage in stages:
        axes.plot(*stage.series("loss"), color="C0", label=label("training"))
        axes.plot(*stage.series("val_loss"), "o-", color="C1", markersize=3, label=label("validation (blend)"))
        for j, key in enumerate(_keys([stage], "val_loss/")):
            axes.plot(*stage.series(key), "s--", color=f"C{2 + j}", markersize=3, linewidth=1,
                      label=label(f"validation: {key.split('/', 1)[1]}"))
        spikes = [(stage.offset + r["step"], r["loss"]) for r in stage.records if r.get("spike") and "loss" in r]
        if spikes:
            axes.scatter(*zip(*spikes), marker="x", color="red", zorder=3, label=label("spike (update not applied)"))
        for step in _skipped_steps(stage):
            axes.axvline(step, color="red", alpha=0.25, linewidth=1)
    axes.legend(fontsize=8)
    return _save(figure, out / "loss.png")


def _skipped_steps(stage: Stage) -> list[int]:
    """Chain steps at which the count of skipped steps rose (a non-finite update or a spike)."""
    steps, counts = stage.series("skipped_steps")
    return [s for s, before, now in zip(steps[1:], counts, counts[1:]) if now > before] + \
        ([steps[0]] if counts and counts[0] > 0 else [])


def plot_one(stages: list[Stage], key: str, title: str, ylabel: str, out: Path, log_scale: bool = False) -> Path:
    figure, axes = _figure(title, ylabel, stages)
    for stage in stages:
        axes.plot(*stage.series(key), color="C0")
    if log_scale and any(v > 0 for s in stages for v in s.series(key)[1]):
        axes.set_yscale("log")
    return _save(figure, out / f"{key}.png")


def plot_throughput(stages: list[Stage], out: Path) -> Path:
    figure, axes = _figure("throughput", "tokens/s", stages)
    for stage in stages:
        axes.plot(*stage.series("tokens_per_s"), color="C0")
    if any(stage.series("mfu")[0] for stage in stages):
        twin = axes.twinx()
        twin.set_ylabel("MFU", color="C3")
        for stage in stages:
            twin.plot(*stage.series("mfu"), color="C3", linestyle="--")
    return _save(figure, out / "throughput.png")


def plot_eval(stages: list[Stage], out: Path) -> Optional[Path]:
    tasks = sorted({k[len("eval/"):-len("/accuracy")] for k in _keys(stages, "eval/", "/accuracy")})
    if not tasks:
        return None
    figure, axes = _figure("evaluation accuracy (95% interval)", "accuracy", stages)
    for j, task in enumerate(tasks):
        for i, stage in enumerate(stages):
            steps, accuracy = stage.series(f"eval/{task}/accuracy")
            low = dict(zip(*stage.series(f"eval/{task}/ci95_low")))
            high = dict(zip(*stage.series(f"eval/{task}/ci95_high")))
            # the interval's ends as distances (never below 0: a Wilson bound may round past the estimate)
            errors = [[max(0.0, a - low.get(s, a)) for s, a in zip(steps, accuracy)],
                      [max(0.0, high.get(s, a) - a) for s, a in zip(steps, accuracy)]]
            axes.errorbar(steps, accuracy, yerr=errors, fmt="o-", capsize=3, color=f"C{j}",
                          label=task if i == 0 else None)
    axes.set_ylim(0, 1)
    axes.legend(fontsize=8)
    return _save(figure, out / "eval.png")


def _last(stage: Stage, key: str):
    values = stage.series(key)[1]
    return values[-1] if values else None


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def summary(stages: list[Stage], pictures: list[Path]) -> str:
    rows = ["| stage | steps | last loss | last validation loss | median tokens/s | median MFU | skipped steps "
            "| spikes | checkpoint saves |", "|---|---|---|---|---|---|---|---|---|"]
    for stage in stages:
        tokens, mfu = stage.series("tokens_per_s")[1], stage.series("mfu")[1]
        spikes = sum(1 for r in stage.records if r.get("spike"))
        saves = stage.series("checkpoint_save_s")[1]
        def median(values):
            return statistics.median(values) if values else None

        rows.append(f"| {stage.name} | {stage.last_step} | {_fmt(_last(stage, 'loss'))} | "
                    f"{_fmt(_last(stage, 'val_loss'))} | {_fmt(median(tokens), ',.0f')} | {_fmt(median(mfu), '.1%')} | "
                    f"{_fmt(_last(stage, 'skipped_steps'), 'd')} | {spikes} | {len(saves)} "
                    f"({_fmt(median(saves), '.2f')} s median) |")
    by_source = [(stage.name, key.split("/", 1)[1], _last(stage, key))
                 for stage in stages for key in _keys([stage], "val_loss/")]
    lines = [f"# Training report: {', '.join(s.name for s in stages)}", "",
             "Run directories: " + ", ".join(f"`{s.run_dir}`" for s in stages), "", *rows, ""]
    if by_source:
        lines += ["Last validation loss by source:", "", "| stage | source | loss |", "|---|---|---|",
                  *[f"| {stage} | {source} | {_fmt(loss)} |" for stage, source, loss in by_source], ""]
    evals = [(stage.name, key[len("eval/"):-len("/accuracy")], _last(stage, key),
              _last(stage, key.replace("/accuracy", "/ci95_low")), _last(stage, key.replace("/accuracy", "/ci95_high")))
             for stage in stages for key in _keys([stage], "eval/", "/accuracy")]
    if evals:
        lines += ["Last evaluation:", "", "| stage | task | accuracy | 95% interval |", "|---|---|---|---|",
                  *[f"| {s} | {t} | {_fmt(a, '.1%')} | {_fmt(lo, '.1%')} - {_fmt(hi, '.1%')} |"
                    for s, t, a, lo, hi in evals], ""]
    lines += [f"![{p.stem}]({p.name})" for p in pictures]
    return "\n".join(lines) + "\n"


def report(run_dirs: list[Path], out: Optional[Path] = None) -> Path:
    """The pictures and README.md of the runs; returns the summary's path."""
    stages = read_chain(run_dirs)
    out = Path(out) if out is not None else run_dirs[0] / "report"
    out.mkdir(parents=True, exist_ok=True)
    pictures = [plot_loss(stages, out), plot_one(stages, "lr", "learning rate", "lr", out),
                plot_one(stages, "grad_norm", "gradient norm", "norm", out, log_scale=True),
                plot_throughput(stages, out)]
    evaluated = plot_eval(stages, out)
    pictures += [evaluated] if evaluated is not None else []
    path = out / "README.md"
    path.write_text(summary(stages, pictures))
    return path


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or "--help" in args or "-h" in args:
        print(__doc__.strip())
        return 0 if args else 2
    out = None
    if "--out" in args:
        i = args.index("--out")
        if i + 1 >= len(args):
            print(f"phi4-report: error: --out needs a directory; {USAGE}", file=sys.stderr)
            return 2
        out = Path(args[i + 1])
        del args[i:i + 2]
    unknown = [a for a in args if a.startswith("--")]
    if unknown:
        print(f"phi4-report: error: unknown option {unknown[0]}; {USAGE}", file=sys.stderr)
        return 2
    try:
        path = report([Path(a) for a in args], out)
    except ConfigError as err:
        print(f"phi4-report: error: {err}", file=sys.stderr)
        return 2
    print(f"phi4-report: {path} (and its pictures beside it)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
