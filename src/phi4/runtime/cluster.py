"""Cluster settings (conf/cluster/<name>.yaml) -> the sbatch command of each stage of the chain.

slurm/pipeline.sh asks this module, stage by stage, for the sbatch options and the stage's
command, as bash assignments it `eval`s:

    python -m phi4.runtime.cluster CLUSTER STAGE --runs DIR [--after JOBID]

Each stage runs in `<runs>/<stage>` and starts from the previous stage's run directory, whose
final checkpoint exists once that job has completed (`--dependency=afterok`): midtrain from
pretrain, SFT from midtrain, PTS and DPO from SFT (DPO on PTS's pairs).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from omegaconf import OmegaConf

from phi4 import conf_dir
from phi4.errors import ConfigError

STAGES = ("pretrain", "midtrain", "sft", "pts", "dpo")
ROOT = Path(__file__).resolve().parents[3]  # the checkout: jobs run here
CONF = Path(conf_dir()) / "cluster"
TRAIN = ["-m", "phi4.cli.train"]
PTS = ["-m", "phi4.cli.pts"]
PER_STAGE = ("tasks_per_node", "cpus_per_task", "time_limit", "signal_seconds")  # cluster values a stage may override


def load_cluster(name_or_path: str) -> dict:
    path = Path(name_or_path)
    if not path.suffix:
        path = CONF / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in CONF.glob("*.yaml")))
        raise ConfigError(f"cluster settings {name_or_path!r} not found (a file, or one of: {known})")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def chain_overrides(stage: str, runs: Path) -> list[str]:
    """The Hydra overrides that place a stage in the chain."""
    chained = {
        "pretrain": [],
        "midtrain": [f"checkpoint.load={runs / 'pretrain'}"],
        "sft": [f"checkpoint.load={runs / 'midtrain'}"],
        "pts": [f"pts.checkpoint={runs / 'sft'}"],
        "dpo": [f"checkpoint.load={runs / 'sft'}", f"data.pairs={runs / 'pts' / 'pairs.jsonl'}"],
    }
    return [f"run_dir={runs / stage}"] + chained[stage]


# The run directories each stage reads: the stage before it (and PTS's pairs, for DPO).
READS = {"pretrain": (), "midtrain": ("pretrain",), "sft": ("midtrain",), "pts": ("sft",), "dpo": ("sft", "pts")}


def check_chain(cluster: dict, stages: list[str], runs: Path, after: str | None = None) -> None:
    """The whole submission, before any job is queued: known stage names, in the chain's order,
    without gaps, each with its cluster entry, and every run directory a stage reads either made
    by an earlier stage of this submission or already there (unless --after names the job that
    will make it)."""
    if not stages:
        raise ConfigError(f"--stages is empty; valid: a run of the chain {' '.join(STAGES)}")
    unknown = [s for s in stages if s not in STAGES]
    if unknown:
        raise ConfigError(f"--stages: unknown stage(s) {', '.join(unknown)}; valid: {', '.join(STAGES)}")
    first = STAGES.index(stages[0])
    expected = list(STAGES[first:first + len(stages)])
    if stages != expected:
        raise ConfigError(f"--stages {' '.join(stages)}: stages run in the chain's order without gaps; "
                          f"starting at {stages[0]}: {' '.join(expected)}")
    missing = [s for s in stages if s not in (cluster.get("stages") or {})]
    if missing:
        raise ConfigError(f"the cluster settings have no stages.{missing[0]} entry (nodes, overrides)")
    if after:
        return
    absent = [f"{runs / d}" for d in READS[stages[0]] if d not in stages and not (runs / d).is_dir()]
    if absent:
        raise ConfigError(f"--stages starts at {stages[0]}, which reads {', '.join(absent)}: not found; run the "
                          f"earlier stages first, point --runs at their root, or give --after JOBID")


def stage_job(cluster: dict, stage: str, runs: Path, after: str | None = None) -> tuple[list[str], list[str], dict]:
    """(sbatch options, the command srun starts in every task, environment for the batch script)."""
    if stage not in STAGES:
        raise ConfigError(f"stage {stage!r}; valid: {', '.join(STAGES)}")
    spec = (cluster.get("stages") or {}).get(stage)
    if spec is None:
        raise ConfigError(f"the cluster settings have no stages.{stage} entry (nodes, overrides)")
    job = {**cluster, **{k: v for k, v in spec.items() if k in PER_STAGE}}  # a stage may size itself
    gpus = int(job.get("gpus_per_node") or 0)
    tasks = gpus or int(job.get("tasks_per_node") or 1)
    options = [f"--job-name=phi4-{stage}", f"--nodes={spec.get('nodes', 1)}", f"--ntasks-per-node={tasks}",
               f"--time={job['time_limit']}", f"--signal=USR1@{int(job['signal_seconds'])}",
               "--requeue", "--open-mode=append", f"--chdir={ROOT}", f"--output={runs / 'logs' / f'{stage}-%j.out'}"]
    for key, option in (("partition", "--partition"), ("account", "--account"), ("qos", "--qos"),
                        ("cpus_per_task", "--cpus-per-task"), ("mem", "--mem")):
        if job.get(key) is not None:
            options.append(f"{option}={job[key]}")
    if gpus:
        options.append(f"--gpus-per-node={gpus}")
    if after:
        options += [f"--dependency=afterok:{after}", "--kill-on-invalid-dep=yes"]
    program = PTS if stage == "pts" else TRAIN
    command = [cluster.get("python", "python")] + program + list(spec.get("overrides") or []) + chain_overrides(stage, runs)
    srun = []
    if cluster.get("container_image"):
        srun.append(f"--container-image={cluster['container_image']}")
        if cluster.get("container_mounts"):
            srun.append(f"--container-mounts={cluster['container_mounts']}")
    env = {"PHI4_SETUP": "; ".join(cluster.get("setup") or []), "PHI4_SRUN_ARGS": shlex.join(srun)}
    env.update({str(k): str(v) for k, v in (cluster.get("env") or {}).items()})  # every task inherits them
    return options, command, env


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m phi4.runtime.cluster",
                                     description="A stage's sbatch options and command, as bash assignments; "
                                                 "with --check, the whole chain's submission is checked instead.")
    parser.add_argument("cluster", help="conf/cluster/<name>.yaml, by name or path")
    parser.add_argument("stage", nargs="?", help="one stage (without --check)")
    parser.add_argument("--check", metavar="STAGES", help="check this space-separated run of stages and exit")
    parser.add_argument("--runs", type=Path, help="the chain's root directory (default: the cluster's `runs`)")
    parser.add_argument("--after", help="job id this stage depends on (afterok)")
    args = parser.parse_args(argv)
    try:
        cluster = load_cluster(args.cluster)
        runs = (args.runs or Path(cluster["runs"])).resolve()
        if args.check is not None:
            check_chain(cluster, args.check.split(), runs, args.after)
            return
        options, command, env = stage_job(cluster, args.stage, runs, args.after)
    except ConfigError as err:
        print(f"pipeline: error: {err}", file=sys.stderr)
        sys.exit(2)
    print(f"SBATCH_OPTIONS=({shlex.join(options)})")
    print(f"STAGE_COMMAND=({shlex.join(command)})")
    print(f"STAGE_RUN_DIR={shlex.quote(str(runs / args.stage))}")
    for key, value in env.items():
        print(f"export {key}={shlex.quote(value)}")


if __name__ == "__main__":
    main()
