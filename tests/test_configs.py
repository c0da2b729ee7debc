"""Every configuration the stages use composes with Hydra, and the cluster layout validates."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException

from helpers import ROOT
from phi4.model.validate import check_run
from phi4.train.checks import check_numbers, check_training, total_steps
from phi4.settings import typed

CONF = str(ROOT / "conf")
STAGES = sorted(p.stem for p in (ROOT / "conf/stage").glob("*.yaml"))


def _compose(*overrides):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose(config_name="train", overrides=list(overrides))


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_composes(stage):
    cfg = _compose(f"stage={stage}")
    check_numbers(cfg)  # every shipped number has its type and range
    model, topology, precision = (typed(cfg, g) for g in ("model", "topology", "precision"))
    assert total_steps(typed(cfg, "train")) >= 1


@pytest.mark.parametrize("topology, precision", [("h100_1920", "bf16"), ("h100_1920_fp8", "fp8")])
def test_phi4_pretraining_on_1920_h100s(topology, precision):
    cfg = _compose("stage=pretrain", "model=phi4_14b", f"topology={topology}", f"precision={precision}", "data=phi4_pretrain")
    model, topology, precision = (typed(cfg, g) for g in ("model", "topology", "precision"))
    assert topology.world_size == 1920 == topology.tp * topology.pp * topology.cp * topology.data_parallel_size(1920)
    check_run(model, topology, precision, world_size=1920)
    dp = topology.data_parallel_size(1920)
    check_training(typed(cfg, "train"), typed(cfg, "optim"), cfg.data.split, Path(cfg.run_dir), dp,
                   total_steps(typed(cfg, "train")), model)  # global batch 5760 divides over DP x micro-batch
    assert cfg.train.seq_length == 4096 and cfg.train.global_batch_size == 5760 and cfg.optim.lr == 3e-4
    assert cfg.model.rope_base == 10000 and cfg.optim.weight_decay == 0.1
    assert 420_000 < total_steps(typed(cfg, "train")) < 430_000  # 10T tokens / 23.6M tokens a step
    weights = {s.name: s.weight for s in cfg.data.sources}
    assert weights == {"web": 15, "web_rewrites": 15, "synthetic": 40, "code": 20, "acquired": 10}


def test_unknown_key_is_hydras_error():
    with pytest.raises(ConfigCompositionException, match="Could not override 'train.stepz'"):
        _compose("train.stepz=3")
