"""How tests/data/run_before_states/checkpoints was written: at commit a1fe7c9 (before the
checkpointer's states dict, when Trainer.save passed the TrainState's values flat beside the run's
description), 3 steps of a 2-layer vocabulary-128 model on one rank, saved as Trainer.save did.
tests/test_checkpoint_states.py loads it with today's code. Run from a checkout of that commit:
    .venv/bin/python tests/data/run_before_states/write.py OUT_RUN_DIR"""
import dataclasses, sys
from pathlib import Path
sys.path.insert(0, "tests")
import torch
from omegaconf import OmegaConf
from helpers import FP32, TopologyConfig, tiny_model, optim_settings
from multirank import run_ranks

MODEL = dict(vocab_size=128, hidden_size=32, ffn_hidden_size=112, num_layers=2, num_attention_heads=4,
             num_query_groups=2, max_position_embeddings=64)

def write(run_dir):
    from phi4.model.build import build_phi4_model, transformer_config
    from phi4.model.parallel import init_model_parallel
    from phi4.checkpoint.run import RunCheckpointer
    from phi4.checkpoint.weights import MODEL_CONFIG_KEY, weights_fingerprint
    from phi4.model.schedule import micro_batches_from_tokens
    from phi4.train.lm import lm_train_step
    from phi4.train.optimizer import build_optimizer, build_scheduler, schedule, wrap_ddp
    from phi4.train.trainer import TrainState
    model, topology = tiny_model(**MODEL), TopologyConfig()
    init_model_parallel(model, topology, FP32, seed=5)
    config = transformer_config(model, topology, FP32)
    ddp = wrap_ddp(build_phi4_model(model, topology, FP32, config=config), config)
    optim = optim_settings(lr=1e-2, min_lr=1e-3, warmup_steps=1, decay_style="cosine")
    optimizer = build_optimizer(ddp, config, optim)
    scheduler = build_scheduler(optimizer, optim, 8)
    rows = torch.randint(0, model.vocab_size, (4, 17), generator=torch.Generator().manual_seed(2))
    for _ in range(3):
        lm_train_step(ddp, optimizer, micro_batches_from_tokens(rows, 2))
        scheduler.step(increment=1)
    state = TrainState(step=3, consumed_samples=12, skipped_steps=1, recent_losses=[5.5, 5.25],
                       skipped_windows=[[4, 8]])
    cfg = OmegaConf.create(dict(train=dict(seq_length=16, global_batch_size=4, steps=8), optim=dataclasses.asdict(optim)))
    extra = dict(state.state_dict(), layout=dict(tp=1, pp=1, vp=None, cp=1, dp=1),
                 config_yaml=OmegaConf.to_yaml(cfg), weights_fingerprint=weights_fingerprint(ddp),
                 schedule=schedule(optim, 8))
    extra[MODEL_CONFIG_KEY] = dataclasses.asdict(model)
    ckpt = RunCheckpointer(Path(run_dir), keep=1, async_save=False)
    return str(ckpt.save(3, ddp, optimizer, scheduler, extra, final=False))

if __name__ == "__main__":
    print(run_ranks(write, 1, sys.argv[1]))
