"""A layout that cannot work fails with one message naming the setting, before any process group."""

import dataclasses

import pytest
import torch
from phi4.settings import load_group

from helpers import FP32, ROOT, tiny_model
from phi4.errors import ConfigError
from phi4.model.config import FP8Config, ModelConfig, PrecisionConfig, TopologyConfig
from phi4.model.validate import check_run, valid_tp_sizes

PHI4 = ModelConfig.from_dict(load_group("model", ROOT / "conf/model/phi4_14b.yaml"))
BF16 = PrecisionConfig(dtype="bf16")


def test_phi4_tp_must_divide_the_ten_query_groups():
    assert valid_tp_sizes(PHI4) == [1, 2, 5, 10]
    with pytest.raises(ConfigError) as err:
        check_run(PHI4, TopologyConfig(tp=4), BF16)
    message = str(err.value)
    assert "topology.tp=4" in message and "model.num_query_groups=10" in message
    assert message.endswith("valid topology.tp: 1, 2, 5, 10")
    with pytest.raises(ConfigError, match=r"topology.tp=8 .*valid topology.tp: 1, 2, 5, 10"):
        check_run(PHI4, TopologyConfig(tp=8), BF16)


@pytest.mark.parametrize(
    "topology, pattern",
    [
        (TopologyConfig(pp=3), r"model.num_layers=40 does not split into topology.pp=3 x topology.vp=None = 3 .*valid topology.pp with this vp: 1, 2, 4, 5, 8, 10, 20, 40"),
        (TopologyConfig(pp=4, vp=3), r"model.num_layers=40 does not split into topology.pp=4 x topology.vp=3 = 12"),
        (TopologyConfig(pp=1, vp=2), r"topology.vp=2 needs topology.pp >= 2"),
        (TopologyConfig(pp=2, vp=1), r"topology.vp=1: .*valid: null or >= 2"),
        (TopologyConfig(cp=2), r"topology.cp=2 needs model.transformer_impl=te"),
        (TopologyConfig(tp=1, sp=True), r"topology.sp=true needs topology.tp > 1 .*valid: topology.sp=false, or topology.tp in 2, 5, 10"),
        (TopologyConfig(tp=0), r"topology.tp=0 must be a positive integer"),
        (TopologyConfig(pp=2, pp_layout="Et*9|t*10|t*10|t*11,L"),
         r"topology.pp_layout='Et\*9\|t\*10\|t\*10\|t\*11,L' has 4 stages; topology.pp=2 x topology.vp=None needs 2"),
        (TopologyConfig(pp=2, pp_layout="Et*20|t*19,L"), r"places 39 decoder layers; model.num_layers=40"),
        (TopologyConfig(pp=2, pp_layout="t*20|Et*20,L"), r"the embedding E must come once, first in the first stage"),
        (TopologyConfig(pp=2, pp_layout="Et*20,L|t*20"), r"the loss L must come once, last in the last stage"),
        (TopologyConfig(pp=2, pp_layout="Et*20|t*19,m,L"), r"unknown layer character\(s\) m; valid: one run of E"),
        (TopologyConfig(pp=1, pp_layout="Et*40,L"), r"needs topology.pp >= 2"),
        (TopologyConfig(recompute_layers=2), r"topology.recompute_layers=2 needs topology.recompute=full \(got none\)"),
        (TopologyConfig(pp=4, recompute="full", recompute_layers=11),
         r"topology.recompute_layers=11: the first N layers of each pipeline stage; valid: 1 to 10"),
        (TopologyConfig(recompute="full", recompute_layers=0), r"topology.recompute_layers=0: .*valid: 1 to 40"),
    ],
)
def test_bad_topology_names_the_setting(topology, pattern):
    local = dataclasses.replace(PHI4, transformer_impl="local")
    with pytest.raises(ConfigError, match=pattern):
        check_run(local, topology, BF16)


def test_world_size_must_be_a_multiple_of_the_model_parallel_size():
    with pytest.raises(ConfigError, match=r"6 processes do not divide into topology.tp=2 x topology.pp=4 x topology.cp=1 = 8"):
        check_run(PHI4, TopologyConfig(tp=2, pp=4), BF16, world_size=6)
    check_run(PHI4, TopologyConfig(tp=2, pp=4), BF16, world_size=16)  # valid: no error


def test_precision_rules():
    local = dataclasses.replace(PHI4, transformer_impl="local")
    fp8 = PrecisionConfig(dtype="bf16", fp8=FP8Config())
    with pytest.raises(ConfigError, match=r"precision.fp8 needs model.transformer_impl=te .*got model.transformer_impl=local"):
        check_run(local, TopologyConfig(), fp8)
    with pytest.raises(ConfigError, match=r"precision.fp8.recipe='current'; valid: delayed, tensorwise, blockwise, mxfp8"):
        check_run(PHI4, TopologyConfig(), PrecisionConfig(dtype="bf16", fp8=FP8Config(recipe="current")))
    with pytest.raises(ConfigError, match=r"precision.fp8 runs on top of bf16; got precision.dtype=fp32"):
        check_run(PHI4, TopologyConfig(), PrecisionConfig(dtype="fp32", fp8=FP8Config()))
    with pytest.raises(ConfigError, match=r"precision.dtype='fp16'; valid: fp32, bf16"):
        check_run(PHI4, TopologyConfig(), PrecisionConfig(dtype="fp16"))
    check_run(PHI4, TopologyConfig(tp=10, pp=4, vp=2, cp=2, sp=True), fp8)  # the te backend allows it all


def test_wrong_topology_fails_before_any_process_group():
    """init_distributed validates first: a bad TP is a ConfigError and torch.distributed stays down."""
    from phi4.model.parallel import init_model_parallel
    from phi4.runtime.launch_env import LaunchEnv

    model = dataclasses.replace(tiny_model(), num_query_groups=2)
    with pytest.raises(ConfigError, match=r"topology.tp=4 does not divide the model evenly .*valid topology.tp: 1, 2"):
        init_model_parallel(model, TopologyConfig(tp=4), FP32, launch=LaunchEnv(0, 4, 0, "127.0.0.1", 1, "torchrun"))
    assert not torch.distributed.is_initialized()


def test_tp_comm_overlap_is_on_where_it_can_run_and_refused_by_name_where_asked_for_and_not():
    from phi4.model.tp_overlap import tp_comm_overlap_on, without_tp_comm_overlap

    te = dataclasses.replace(PHI4, transformer_impl="te")
    cluster = TopologyConfig(tp=2, sp=True)
    assert tp_comm_overlap_on(cluster, "te", on_cuda=True)
    assert not tp_comm_overlap_on(cluster, "te", on_cuda=False)  # the CPU: off, not refused
    assert not tp_comm_overlap_on(cluster, "local", on_cuda=True)
    assert not tp_comm_overlap_on(TopologyConfig(tp=2), "te", on_cuda=True)  # needs SP
    assert not tp_comm_overlap_on(dataclasses.replace(cluster, tp_comm_overlap=False), "te", on_cuda=True)
    asked = dataclasses.replace(cluster, tp_comm_overlap=True)
    with pytest.raises(ConfigError, match=r"topology.tp_comm_overlap=true needs a GPU .*valid here: "):
        tp_comm_overlap_on(asked, "te", on_cuda=False)
    check_run(te, asked, BF16)
    with pytest.raises(ConfigError, match=r"tp_comm_overlap=true needs topology.tp > 1, topology.sp=true and "
                                          r"model.transformer_impl=te \(got tp=1, sp=false, transformer_impl=te\)"):
        check_run(te, TopologyConfig(tp_comm_overlap=True), BF16)
    # decoding's forwards run with the modules' userbuffer flags off, restored after (also on error)
    from types import SimpleNamespace

    layer = torch.nn.Linear(2, 2)
    layer.ub_overlap_ag_fprop, layer.ub_bulk_wgrad, layer.ub_overlap_rs_dgrad = True, True, False
    chunk = torch.nn.Sequential(layer)
    chunk.config = SimpleNamespace(tp_comm_overlap=False)  # built without the overlap: left alone
    with without_tp_comm_overlap([chunk]):
        assert layer.ub_overlap_ag_fprop
    chunk.config = SimpleNamespace(tp_comm_overlap=True)
    with pytest.raises(RuntimeError, match="inside"):
        with without_tp_comm_overlap([chunk]):
            assert (layer.ub_overlap_ag_fprop, layer.ub_bulk_wgrad) == (False, False)
            raise RuntimeError("inside")
    assert (layer.ub_overlap_ag_fprop, layer.ub_bulk_wgrad, layer.ub_overlap_rs_dgrad) == (True, True, False)


def test_uneven_pipeline_stages():
    """topology.pp_layout: Megatron-Core's layout grammar, read as Megatron-Core reads it; 40 layers
    in stages the even split cannot make, accepted; the planner's uneven candidates are valid."""
    from megatron.core.transformer.pipeline_parallel_layer_layout import PipelineParallelLayerLayout

    from phi4.model.pipeline_layout import lighter_last, stage_layers, unroll

    short = {"embedding": "E", "decoder": "t", "loss": "L", "mtp": "m"}
    for text in ("Et*9|t*10|t*10|t*11,L", "E|(t*4|)*10L", "Ettt|(tt|)*29,m|L", "Et|(tt|)*2,tL"):
        theirs = ["".join(short[kind.name] for kind in stage) for stage in PipelineParallelLayerLayout.parse_str_to_list(text)]
        assert unroll(text) == theirs
    layout = TopologyConfig(pp=3, vp=2, pp_layout="Et*6|t*7|t*7|t*7|t*7|t*6,L")  # 40 layers do not split into 6 equally
    check_run(PHI4, layout, BF16)
    assert [[len(r) for r in rank] for rank in stage_layers(PHI4, layout)] == [[6, 7], [7, 7], [7, 6]]
    assert stage_layers(PHI4, layout)[1][1] == range(27, 34)  # stage 4 of 6: after 6 + 7 + 7 + 7 layers
    for pp, vp in ((2, None), (4, None), (2, 5), (8, 5)):
        uneven = lighter_last(PHI4, pp, vp or 1)
        check_run(PHI4, TopologyConfig(pp=pp, vp=vp, pp_layout=uneven), BF16)
        counts = [len(r) for rank in stage_layers(PHI4, TopologyConfig(pp=pp, vp=vp, pp_layout=uneven)) for r in rank]
        even = 40 // (pp * (vp or 1))
        assert counts[-1] == even - 1 and sum(counts) == 40  # the last rank's last stage: one layer lighter
