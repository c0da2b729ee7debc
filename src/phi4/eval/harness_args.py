"""The phi4 lm-eval model's arguments, apart from the model (which imports lm-eval and
Megatron-Core): phi4-lm-eval checks `--model_args` with them before lm-eval reads its task files."""

from __future__ import annotations

from phi4.errors import ConfigError

MODEL_ARGS = ("checkpoint", "tp", "pp", "vp", "dtype", "batch_size", "max_length", "max_gen_toks", "seed")
IGNORED_ARGS = ("device", "max_batch_size")  # lm-eval's CLI passes these to every model


def check_model_args(names) -> None:
    """ConfigError naming each argument the phi4 model does not take, and the ones it does."""
    unknown = sorted(set(names) - set(MODEL_ARGS) - set(IGNORED_ARGS))
    if unknown:
        raise ConfigError(f"model_args {', '.join(unknown)}: not an argument of the phi4 model; "
                          f"valid: {', '.join(MODEL_ARGS)}")
