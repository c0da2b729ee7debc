"""The command-line tools, the top layer: each entry point composes its settings, hands the parts
to the layers below and turns their refusals into one line and an exit code."""

from phi4.logs import quiet_dependencies

# Before any tool imports Megatron-Core: its start-up warnings (no Transformer Engine, no apex, no
# CUDA) are not actionable for the user of a tool; the tool's own messages keep the console.
quiet_dependencies()
