"""`phi4-pts` (and launch/pts.py): Pivotal Token Search with a Megatron-Core model, on every rank;
the job is phi4.posttrain.pts_job.

Each data-parallel rank searches its share of the problems with its own copy of the model
(tensor parallelism allowed; the ranks of a tensor-parallel group draw the same samples) and
appends to its own part file, so a rerun skips what is done. SIGTERM/SIGUSR1 (SLURM's warning
before a time limit) stops each rank after its current problem with exit 75, for a requeue.
At the end rank 0 merges the parts into `pts.output`, the DPO stage's pairs.
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
from phi4.logs import one_line_config_errors, run_job
from phi4.posttrain.pts_job import search

CONF_DIR = conf_dir()
log = logging.getLogger("phi4.pts")


@one_line_config_errors
@hydra.main(version_base=None, config_path=CONF_DIR, config_name="pts")
def main(cfg: DictConfig) -> None:
    run_job(search, cfg, log, {ConfigError: 2})


if __name__ == "__main__":
    main()
