"""`phi4-train`: the Hydra entry point (launch/train.py is the same); the job is phi4.cli.train_job.

Run under torchrun or srun for several processes, or alone for one. With no arguments it trains
the tiny model on the bundled synthetic corpus: the embedded default.
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

CONF_DIR = conf_dir()
log = logging.getLogger("phi4.train")


@one_line_config_errors
@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    # dist_checkpointing's spawned writer re-imports this module, and needs none of the training stack
    from phi4.cli.train_job import TrainingStopped, train  # lazy: kept out of the spawned writer's start-up

    signals.install()  # again: in a submitit launcher's job, submitit put its own handlers over ours

    # a setting that cannot work: 2; too many non-finite steps: 3 (each one clear line)
    run_job(train, cfg, log, {ConfigError: 2, TrainingStopped: 3})


if __name__ == "__main__":  # dist_checkpointing's spawned writer re-imports the entry module
    main()
