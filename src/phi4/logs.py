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
