"""`phi4-lm-eval` (and launch/harness.py): lm-evaluation-harness's own command line, `lm-eval run`,
with the phi4 model (phi4.eval.harness) registered and chosen unless --model names another.

    phi4-lm-eval --model_args checkpoint=runs/sft --tasks hellaswag,mmlu --output_path results/
    torchrun --nproc-per-node 8 launch/harness.py --model_args checkpoint=runs/sft,tp=2,pp=2 --tasks mmlu --batch_size 16
    phi4-lm-eval --model_args checkpoint=runs/sft --include_path my_tasks/ --tasks my_task --log_samples --output_path out/

Every option of `lm-eval run` works (`phi4-lm-eval --help` lists them); `phi4-lm-eval ls tasks` and
`phi4-lm-eval validate` are lm-eval's. Every rank runs this; global rank 0 prints the table and writes
--output_path. Exit status: 0; 2 with one line for a bad model argument or checkpoint, or when
lm-eval is not installed (`pip install 'phi4-megatron[harness]'`).
"""

from __future__ import annotations

import sys
from typing import Optional

from phi4.errors import ConfigError
from phi4.eval.harness_args import check_model_args
from phi4.runtime.distributed import shutdown
from phi4.runtime.launch_env import read_launch_env

LM_EVAL_COMMANDS = ("run", "ls", "validate")


def harness_argv(argv: list[str]) -> list[str]:
    """lm-eval's arguments for phi4-lm-eval's: `run` made explicit, `--model phi4` unless a model is named."""
    if argv and argv[0] in LM_EVAL_COMMANDS[1:]:
        return argv
    args = argv[1:] if argv and argv[0] == "run" else argv
    if args and not {"-h", "--help"} & set(args) and not any(a in ("--model", "-M") or a.startswith("--model=") for a in args):
        args = ["--model", "phi4", *args]
    return ["run", *args]


def refuse_shared_cache(args, processes: int) -> None:
    """lm-eval's --use_cache names one sqlite file per `lm.rank or LOCAL_RANK`: with several
    processes two of them can share a file, and a cache hit on one rank of a model-parallel group
    but not on another would leave the group's collectives waiting. One process only."""
    if processes > 1 and getattr(args, "use_cache", None):
        raise ConfigError(f"--use_cache: lm-eval's response cache works with one process, not {processes}; "
                          f"leave it out, or run phi4-lm-eval as one process (tp=pp=1)")


def check_phi4_model_args(args) -> None:
    """A model argument the phi4 model does not take stops here, as lm-eval parsed it, before
    lm-eval reads its ~14,000 task files (20 s) and builds the model."""
    if getattr(args, "command", None) == "run" and getattr(args, "model", None) == "phi4":
        check_model_args(dict(getattr(args, "model_args", None) or {}))


def main(argv: Optional[list[str]] = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    try:
        import lm_eval  # noqa: F401  # lazy: lm-eval is an optional extra
    except ImportError:
        print("error: phi4-lm-eval needs lm-evaluation-harness, which is not installed: "
              "pip install 'phi4-megatron[harness]'", file=sys.stderr)
        sys.exit(2)
    sys.argv = ["phi4-lm-eval", *harness_argv(argv)]
    try:
        # lm_eval.__main__.cli_evaluate's three steps, with the phi4 model's arguments checked between
        from lm_eval._cli import HarnessCLI  # lazy: lm-eval is an optional extra
        from lm_eval.utils import setup_logging  # lazy: lm-eval is an optional extra

        setup_logging()
        cli = HarnessCLI()
        args = cli.parse_args()
        refuse_shared_cache(args, read_launch_env().world_size)
        check_phi4_model_args(args)
        import phi4.eval.harness  # noqa: F401  # lazy: lm-eval is an optional extra; importing registers `phi4`

        cli.execute(args)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    finally:
        shutdown()


if __name__ == "__main__":
    main()
