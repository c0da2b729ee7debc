"""Console set-up shared by the command-line tools."""

from __future__ import annotations

import logging
import warnings


def quiet_dependencies() -> None:
    """Megatron-Core's and torch's deprecation notices and CUDA-less start-up warnings are not
    actionable for a user of this stack; keep the console for the tool's own messages."""
    for category in (UserWarning, FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=r"(megatron|torch|transformers|phi4\.runtime\.cpu)")
    for noisy in ("megatron", "torch", "torch.utils.cpp_extension"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def run_job(job, cfg, log: logging.Logger, errors: dict) -> None:
    """A Hydra entry point's body: the console set up, `job(cfg)` run, each expected error class
    in `errors` reported as one line (no traceback) with its exit code. Exits only when the code is
    not 0: returning on success lets a Hydra launcher (submitit) see a finished job, not SystemExit(0)."""
    import sys

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    quiet_dependencies()
    from omegaconf.errors import MissingMandatoryValue

    try:
        code = job(cfg)
    except tuple(errors) as err:
        log.error(f"error: {err}")
        code = next(c for kind, c in errors.items() if isinstance(err, kind))
    except MissingMandatoryValue as err:  # a `???` setting left unset
        log.error(f"error: {err.full_key} is not set; give {err.full_key}=... on the command line")
        code = 2
    if code:
        sys.exit(code)

