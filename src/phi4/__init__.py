"""phi4-megatron: a Phi-4-class training stack on Megatron-Core.

Importing the package is cheap and needs neither a GPU nor Transformer Engine nor apex; the
heavy modules are imported where they are used.
"""
from importlib.resources import files

__version__ = "0.1.0"


def conf_dir() -> str:
    """The Hydra configs' folder, found through the installed package phi4.conf: the checkout's
    conf/ under an editable install, the wheel's copy otherwise."""
    return str(files("phi4.conf"))
