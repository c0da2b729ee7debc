"""phi4-megatron: a Phi-4-class training stack on Megatron-Core.

Importing the package is cheap and needs neither a GPU nor Transformer Engine nor apex; the
heavy modules are imported where they are used.
"""

__version__ = "0.1.0"
