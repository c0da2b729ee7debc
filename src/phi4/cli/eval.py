"""`phi4-eval` (and launch/eval.py): generative evaluation of a checkpoint, on every rank; the job
is phi4.eval.job.

    phi4-eval checkpoint=runs/tiny eval.synthetic='{problems: 64, seed: 1}'
    torchrun --nproc-per-node 2 launch/eval.py checkpoint=runs/sft topology.tp=2 eval.tasks=[math.jsonl]

The model's shape comes from the checkpoint; the layout (any TP/PP, cp=1) and precision are
chosen as for phi4-train. Writes run_dir/metrics.jsonl, tensorboard/ and generations.jsonl.
Resumable: each data-parallel rank appends every answered batch to run_dir/parts/, and a rerun
in the same run_dir asks only what is missing. SIGTERM/SIGUSR1 (SLURM's warning before a time
limit) stops after the current batch with exit 75, for a requeue.
"""

from __future__ import annotations

import logging

from phi4.runtime import signals

signals.install()  # first: a stop signal during the slow imports below must not kill the job

import hydra
from omegaconf import DictConfig

import phi4.settings  # noqa: F401  registers the config schemas before Hydra composes
from phi4 import conf_dir
from phi4.errors import ConfigError
from phi4.eval.job import evaluate_checkpoint
from phi4.logs import one_line_config_errors, run_job

CONF_DIR = conf_dir()
log = logging.getLogger("phi4.eval")


@one_line_config_errors
@hydra.main(version_base=None, config_path=CONF_DIR, config_name="evaluate")
def main(cfg: DictConfig) -> None:
    run_job(evaluate_checkpoint, cfg, log, {ConfigError: 2})


if __name__ == "__main__":
    main()
