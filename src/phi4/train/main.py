"""`phi4-train`: the Hydra entry point (launch/train.py is the same). All logic is in loop.py.

Run under torchrun or srun for several processes, or alone for one. With no arguments it trains
the tiny model on the bundled synthetic corpus: the embedded default.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from phi4.runtime import signals

signals.install()  # first: a stop signal during the slow imports below must not kill the job

import hydra
from omegaconf import DictConfig

from phi4.errors import ConfigError
from phi4.logs import quiet_dependencies

CONF_DIR = str(Path(__file__).resolve().parents[3] / "conf")
log = logging.getLogger("phi4.train")


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    quiet_dependencies()
    from phi4.train.loop import TrainingStopped, train

    try:
        code = train(cfg)
    except ConfigError as err:  # one clear line, not a traceback, for a setting that cannot work
        log.error(f"error: {err}")
        code = 2
    except TrainingStopped as err:
        log.error(f"error: {err}")
        code = 3
    if code:  # returning on success lets a Hydra launcher (submitit) see a finished job, not SystemExit(0)
        sys.exit(code)


if __name__ == "__main__":  # dist_checkpointing's spawned writer re-imports the entry module
    main()
