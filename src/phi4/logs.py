"""Console set-up shared by the command-line tools."""

from __future__ import annotations

import functools
import logging
import os
import sys
import warnings

from hydra.errors import HydraException
from omegaconf.errors import InterpolationKeyError, MissingMandatoryValue, OmegaConfBaseException


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
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", force=True)
    quiet_dependencies()

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


def config_error_line(err: Exception) -> str:
    """Hydra's refusal of a composition in one line: an override that does not parse, a group
    option that does not exist (with the options there are), a key that is not a setting (with the
    settings there are), a value of the wrong type (with the type it needs)."""
    message = str(err).split("\nConfig search path")[0]
    head, _, options = message.partition("\nAvailable options in")
    parts = [line.strip().removeprefix("Error merging override ").rstrip(".") for line in head.splitlines()
             if line.strip() and not line.strip().startswith("To append")]
    if options:
        group, _, listed = options.partition(":")
        parts.append(f"available in{group}: " + ", ".join(o.strip() for o in listed.split() if o.strip()))
    cause = err.__cause__
    if isinstance(cause, OmegaConfBaseException):
        parts.append(str(cause).splitlines()[0])
        schema = getattr(cause, "object_type", None)
        if "not in" in parts[-1] and schema is not None and hasattr(schema, "__dataclass_fields__"):
            parts.append("valid: " + ", ".join(schema.__dataclass_fields__))
    return "; ".join(parts)


def one_line_config_errors(hydra_main):
    """An entry point made by `@hydra.main`, with Hydra's composition errors (see
    `config_error_line`), and a setting that names one that is not there, as one line and exit
    code 2, like every other refused setting."""
    @functools.wraps(hydra_main)
    def main():
        # Hydra raises its errors instead of printing them (several lines, exit 1); errors of the
        # job itself are run_job's, and an unexpected one keeps its whole traceback.
        os.environ["HYDRA_FULL_ERROR"] = "1"
        try:
            return hydra_main()
        except HydraException as err:
            print(f"error: {config_error_line(err)}", file=sys.stderr)
            sys.exit(2)
        except InterpolationKeyError as err:  # e.g. a cluster file without a key the sweep launcher reads
            where = f" (in {err.full_key})" if err.full_key else ""
            print(f"error: {str(err).splitlines()[0]}{where}; set it, e.g. in the cluster file", file=sys.stderr)
            sys.exit(2)

    return main
