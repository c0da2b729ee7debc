"""The optimizer and its schedule, built from the `optim` settings: Megatron-Core's DDP over each
model chunk, Adam through its distributed optimizer, and its OptimizerParamScheduler."""

from __future__ import annotations

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from phi4.settings import Optim


def wrap_ddp(chunks: list, config, overlap_grad_reduce: bool = False, overlap_param_gather: bool = False) -> list:
    """Megatron-Core DDP over each model chunk, sharing one grad buffer layout for the
    distributed optimizer; only the first virtual stage buckets (Megatron-LM's rule)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=True,
    )
    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=chunk, disable_bucketing=i > 0)
        for i, chunk in enumerate(chunks)
    ]


def _one_or_list(funcs: list):
    return funcs[0] if len(funcs) == 1 else funcs


def build_optimizer(ddp_chunks: list, config, optim: Optim):
    """Adam with the distributed optimizer, and the hooks the schedules call back into."""
    opt_config = OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=config.bf16,
        params_dtype=config.params_dtype,
        use_distributed_optimizer=True,
    )
    optimizer = get_megatron_optimizer(opt_config, ddp_chunks)
    config.finalize_model_grads_func = finalize_model_grads
    config.grad_scale_func = optimizer.scale_loss
    config.no_sync_func = _one_or_list([chunk.no_sync for chunk in ddp_chunks])
    ddp_config = ddp_chunks[0].ddp_config
    if ddp_config.overlap_grad_reduce:  # the schedules start each chunk's reduce as its grads finish
        config.grad_sync_func = _one_or_list([chunk.start_grad_sync for chunk in ddp_chunks])
    if ddp_config.overlap_param_gather:  # the next step's forward waits on each bucket's all-gather
        config.param_sync_func = _one_or_list([chunk.start_param_sync for chunk in ddp_chunks])
    return optimizer


def build_scheduler(optimizer, optim: Optim, steps: int) -> OptimizerParamScheduler:
    """Warm-up to `optim.lr`, then decay to `optim.min_lr` at step `steps`; constant weight decay."""
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr, lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=steps, lr_decay_style=optim.decay_style, start_wd=optim.weight_decay,
        end_wd=optim.weight_decay, wd_incr_steps=steps, wd_incr_style="constant")
