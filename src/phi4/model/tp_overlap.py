"""Transformer Engine's tensor-parallel communication overlap (userbuffers): with sequence
parallelism, each layer's all-gather (before QKV and FC1) and reduce-scatter (after the attention
projection and FC2) run in chunks under the GEMMs they feed, instead of before and after them.
What Megatron-Bridge's TP > 1 H100 recipes use (CommOverlapConfig.tp_comm_overlap).

`topology.tp_comm_overlap`: null (the default) turns it on where it can run: TP > 1 with sequence
parallelism on the te backend, on GPUs; true asks for it (refused by name where it cannot run);
false turns it off. The userbuffers are allocated once for the training micro-batch's shape
([sequence / CP x rows, hidden]), as Megatron-LM's _initialize_tp_communicators does
(megatron/training/initialize.py: te_module.base.initialize_ub with the bootstrap backend
nccl); forwards of other shapes (decoding in the evaluation) run with the overlap off
(`without_tp_comm_overlap`).
"""

from __future__ import annotations

import contextlib
from typing import Optional

from phi4.errors import ConfigError
from phi4.model.config import FP8Config, TopologyConfig


def tp_comm_overlap_on(topology: TopologyConfig, backend: str, on_cuda: bool) -> bool:
    """Whether this run overlaps its TP communication (see the module docstring). The layout's
    own conditions (TP > 1, SP, te) are phi4.model.validate.check_topology's; this adds the device."""
    if topology.tp_comm_overlap and not on_cuda:
        raise ConfigError("topology.tp_comm_overlap=true needs a GPU (Transformer Engine's userbuffers overlap the "
                          "sequence-parallel all-gather and reduce-scatter with the GEMMs); "
                          "valid here: topology.tp_comm_overlap=false or null")
    if topology.tp_comm_overlap is not None:
        return topology.tp_comm_overlap
    return topology.tp > 1 and topology.sp and backend == "te" and on_cuda


def initialize_userbuffers(tokens: int, hidden_size: int, tp: int, fp8: Optional[FP8Config]) -> None:
    """TE's userbuffers for a [tokens, hidden] activation (collective over the TP groups): FP8
    buffers in an FP8 run, plus high-precision ones where layers stay in bf16 (first/last layers),
    as Megatron-LM's initialize_tp_communicators asks TE >= 2.7 for them (quantization_modes)."""
    from transformer_engine.pytorch import module as te_module

    modes = te_module.base.UserBufferQuantizationMode
    bf16_layers = fp8 is not None and fp8.first_last_layers_bf16 and \
        fp8.num_layers_at_start_in_bf16 + fp8.num_layers_at_end_in_bf16 > 0
    quantization_modes = [modes.FP8 if fp8 else modes.NONE] + ([modes.NONE] if bf16_layers else [])
    try:
        te_module.base.initialize_ub(shape=[tokens, hidden_size], tp_size=tp, quantization_modes=quantization_modes,
                                     ub_cfgs={}, bootstrap_backend="nccl")
    except RuntimeError as err:  # e.g. no CUDA multicast on this driver/toolkit
        raise ConfigError(f"topology.tp_comm_overlap: Transformer Engine could not set up its userbuffers ({err}); "
                          "run with topology.tp_comm_overlap=false, or UB_SKIPMC=1 in the environment where TE "
                          "suggests it") from err


def destroy_userbuffers() -> None:
    from transformer_engine.pytorch import module as te_module

    te_module.base.destroy_ub()


@contextlib.contextmanager
def without_tp_comm_overlap(chunks: list):
    """The TE modules' userbuffer overlaps off for the forwards inside (their shapes differ from the
    buffers'), restored after: TE reads its `ub_overlap_*`/`ub_bulk_*` flags at each forward.
    Nothing to do (and no walk over the modules) when the model was built without the overlap."""
    if not getattr(getattr(chunks[0], "config", None), "tp_comm_overlap", False):
        yield
        return
    saved = []
    for chunk in chunks:
        for module in chunk.modules():
            for name, value in vars(module).items():
                if name.startswith(("ub_overlap", "ub_bulk")) and value is True:
                    saved.append((module, name))
    for module, name in saved:
        setattr(module, name, False)
    try:
        yield
    finally:
        for module, name in saved:
            setattr(module, name, True)
