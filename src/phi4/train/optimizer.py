"""The optimizer and its schedule, built from the `optim` settings: Megatron-Core's DDP over each
model chunk, Adam through its distributed optimizer, and its OptimizerParamScheduler."""

from __future__ import annotations

from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

from phi4.settings import Optim


def wrap_ddp(chunks: list, config, overlap_grad_reduce: bool = False, overlap_param_gather: bool = False,
             grad_reduce_in_fp32: bool = True) -> list:
    """Megatron-Core DDP over each model chunk, sharing one grad buffer layout for the
    distributed optimizer; only the first virtual stage buckets (Megatron-LM's rule). Gradients
    accumulate and reduce in fp32 unless `grad_reduce_in_fp32` is off (then in the weights' dtype,
    Megatron-LM's default without --accumulate-allreduce-grads-in-fp32)."""
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=grad_reduce_in_fp32,
        overlap_grad_reduce=overlap_grad_reduce,
        overlap_param_gather=overlap_param_gather,
        use_distributed_optimizer=True,
        fp8_param_gather=bool(getattr(config, "fp8_param", False)),  # FP8 weights all-gathered as FP8
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


DECAY_STYLES = {"linear": "linear", "cosine": "cosine", "constant": "constant", "wsd": "WSD"}  # ours: Megatron-Core's
WSD_DECAY_STYLES = ("linear", "cosine", "exponential", "minus_sqrt")


def schedule(optim: Optim, steps: int) -> dict:
    """The learning-rate and weight-decay schedule these settings give a run of `steps` steps, by
    the settings' own names: what a checkpoint records, and what a resumed run compares."""
    wsd = optim.decay_style == "wsd"
    return {"optim.lr": optim.lr, "optim.min_lr": optim.min_lr, "optim.warmup_steps": optim.warmup_steps,
            "optim.decay_style": optim.decay_style, "decay steps (train.steps or train.token_budget)": steps,
            "optim.wsd_decay_fraction": optim.wsd_decay_fraction if wsd else None,
            "optim.wsd_decay_style": optim.wsd_decay_style if wsd else None,
            "optim.weight_decay": optim.weight_decay}


def build_scheduler(optimizer, optim: Optim, steps: int) -> OptimizerParamScheduler:
    """Warm-up to `optim.lr`, then decay to `optim.min_lr` at step `steps` (with wsd: held at
    `optim.lr` until the last `optim.wsd_decay_fraction` of the steps); constant weight decay.
    On resume the schedule is these settings' (Megatron-Core's default would take the
    checkpoint's silently): phi4.train.checks.check_resume refuses a change first, unless
    `optim.override_scheduler`."""
    return OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=optim.lr, min_lr=optim.min_lr, lr_warmup_steps=optim.warmup_steps,
        lr_decay_steps=steps, lr_decay_style=DECAY_STYLES[optim.decay_style], start_wd=optim.weight_decay,
        end_wd=optim.weight_decay, wd_incr_steps=steps, wd_incr_style="constant",
        wsd_decay_steps=max(1, round(optim.wsd_decay_fraction * steps)) if optim.decay_style == "wsd" else None,
        lr_wsd_decay_style=optim.wsd_decay_style if optim.decay_style == "wsd" else None,
        use_checkpoint_opt_param_scheduler=False, override_opt_param_scheduler=optim.override_scheduler)
