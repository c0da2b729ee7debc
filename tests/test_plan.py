"""phi4-plan against reality and against the model card.

Memory: one 2-rank launch builds the tiny model under several layouts with Megatron-Core DDP and
the distributed optimizer, takes a training step, and measures what was allocated: the weight and
gradient buffers and the optimizer state must equal the planner's bytes exactly; the peak of a
forward-backward (CPU allocator, through torch.profiler) must be within 20% of the planner's
activation estimate. Layouts are chosen so that different terms dominate: the loss's logits
(last stages), the embedding gradient, the layers' saved activations (long sequences on the first
pipeline stage), recomputation, sequence parallelism, bf16.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from helpers import ROOT, TopologyConfig, tiny_model, token_rows
from multirank import run_ranks
from phi4.model.config import PrecisionConfig
from phi4.plan import memory
from phi4.cli.plan import main as plan_main
from phi4.plan.spec import PlanSpec

ACTIVATION_TOLERANCE = 0.20
# The measured layouts use a vocabulary of 8192, not phi4_tiny's 100352: at 100352 the logits and the
# embedding gradient (97% of the tiny model's weights) set most peaks and hid a 22% error in the
# layers' term (the core attention's backward under selective recomputation), the term that
# dominates at Phi-4's own shape. Smaller, the layers are what is tested, and it runs in a third of the time.
MEASURED_VOCAB = 8192

# name: (topology, dtype, seq, micro-batch, global batch over 2 ranks)
LAYOUTS = {
    "dp2": (TopologyConfig(), "fp32", 64, 2, 8),
    "dp2_bf16": (TopologyConfig(), "bf16", 64, 2, 8),
    "tp2_sp": (TopologyConfig(tp=2, sp=True), "fp32", 128, 2, 4),
    "pp2_vp2": (TopologyConfig(pp=2, vp=2), "fp32", 128, 2, 8),
    "pp2_full": (TopologyConfig(pp=2, recompute="full"), "fp32", 256, 4, 8),
    "pp2_long": (TopologyConfig(pp=2), "fp32", 256, 4, 8),
    "pp2_long_selective": (TopologyConfig(pp=2, recompute="selective"), "fp32", 256, 4, 8),
    # uneven stages: 3 layers on the first rank, 1 beside the output layer and loss on the last
    "pp2_uneven": (TopologyConfig(pp=2, pp_layout="Ettt|t,L"), "fp32", 256, 4, 8),
    # full recomputation of the first of each stage's 2 layers only (Megatron-Core's block method)
    "pp2_full_block1": (TopologyConfig(pp=2, recompute="full", recompute_layers=1), "fp32", 256, 4, 8),
}


def _spec(topology, dtype, seq, mbs, gbs) -> PlanSpec:
    model = tiny_model(vocab_size=MEASURED_VOCAB)
    return PlanSpec(model, topology, PrecisionConfig(dtype=dtype), 2, seq, mbs, gbs)


def measure_layouts(layouts: dict, backend: str = "local") -> dict:
    from megatron.core import parallel_state

    from memory_probe import activation_peak, static_bytes
    from phi4.model.build import build_phi4_model, transformer_config
    from phi4.model.parallel import init_model_parallel
    from phi4.runtime.distributed import seed_all, set_parallel_layout
    from helpers import optim_settings
    from phi4.model.pipeline_schedule import data_parallel_slice, micro_batches_from_tokens, run_schedule
    from phi4.train.lm import lm_forward_step, lm_update
    from phi4.train.optimizer import build_optimizer, wrap_ddp

    model = tiny_model(transformer_impl=backend, vocab_size=MEASURED_VOCAB)
    results = {}
    for i, (name, (topology, dtype, seq, mbs, gbs)) in enumerate(layouts.items()):
        precision = PrecisionConfig(dtype=dtype)
        if i == 0:
            init_model_parallel(model, topology, precision)
        else:
            set_parallel_layout(topology)
            seed_all(1234)
        config = transformer_config(model, topology, precision)
        ddp = wrap_ddp(build_phi4_model(model, topology, precision, config=config), config)
        optimizer = build_optimizer(ddp, config, optim_settings())
        batches = micro_batches_from_tokens(data_parallel_slice(token_rows(model, gbs, seq)), mbs)
        first = lm_update(ddp, optimizer, batches)  # Adam's state exists from the first step on
        second = lm_update(ddp, optimizer, batches)

        def forward_backward():
            for chunk in ddp:
                chunk.zero_grad_buffer()
            run_schedule(lm_forward_step, ddp, batches, forward_only=False)

        results[name] = dict(
            static=static_bytes(ddp, optimizer),
            peak=activation_peak(forward_backward),
            pp_rank=parallel_state.get_pipeline_model_parallel_rank(),
            dp_rank=parallel_state.get_data_parallel_rank(),
            losses=(first.loss, second.loss),
        )
        del ddp, optimizer
    return results


@pytest.fixture(scope="module")
def measured():
    return run_ranks(measure_layouts, 2, LAYOUTS, timeout=600)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_memory_model_meets_megatron(measured, name):
    spec = _spec(*LAYOUTS[name])
    for rank in measured:
        got = rank[name]
        planned = memory.static_memory(spec, got["pp_rank"], got["dp_rank"])
        assert got["static"] == dict(params=planned.params, grads=planned.grads, optimizer=planned.optimizer), (
            f"{name} rank pp{got['pp_rank']}/dp{got['dp_rank']}")
        estimate = memory.activation_memory(spec, got["pp_rank"], gloo=True).total
        assert abs(estimate - got["peak"]) <= ACTIVATION_TOLERANCE * got["peak"], (
            f"{name} pp rank {got['pp_rank']}: estimated {estimate / 1e6:.2f} MB, measured {got['peak'] / 1e6:.2f} MB")


def test_recomputation_changes_memory_not_numbers(measured):
    """Selective and full recomputation train exactly as no recomputation does (fp32, dropout 0)."""
    last = measured[1]
    reference = last["pp2_long"]["losses"]
    assert None not in reference
    for name in ("pp2_long_selective", "pp2_full", "pp2_full_block1"):
        assert last[name]["losses"] == pytest.approx(reference, abs=1e-6)
    assert last["pp2_full"]["peak"] < last["pp2_full_block1"]["peak"] < last["pp2_long"]["peak"]


def test_layer_activations_dominate_somewhere():
    """The layouts really test the layers' term, not only the logits and embedding gradient."""
    spec = _spec(*LAYOUTS["pp2_long"])
    act = memory.activation_memory(spec, 0)
    assert act.stored > act.transient


def test_buffer_layout_is_megatron_cores():
    """Padding and bucketing against Megatron-Core's own layout function, on awkward sizes."""
    from megatron.core.distributed import DistributedDataParallelConfig
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    g = torch.Generator().manual_seed(0)
    numels = [int(n) for n in torch.randint(1, 5000, (40,), generator=g)]
    params = [torch.nn.Parameter(torch.empty(n)) for n in numels]
    for dp in (1, 3, 8, 240):
        for bucket_size in (None, 7000, 20000):
            config = DistributedDataParallelConfig(use_distributed_optimizer=True)
            reference = DistributedOptimizer._compute_per_buffer_param_layout(params, bucket_size, dp, config)
            ours = memory.buffer_layout(numels, bucket_size, dp)
            assert ours.buckets == list(reference.bucket_indices)
            assert ours.param_ranges == [reference.param_index_map[p][:2] for p in reversed(params)]


def test_flops_per_token_counts_hf_linears():
    """6 x the weights of every matmul of transformers' Phi3ForCausalLM (embedding excluded) plus
    causal attention's 6 x layers x seq x hidden."""
    from helpers import phi3_reference
    from phi4.model.flops import flops_per_token

    model = tiny_model()
    hf = phi3_reference(model)
    linear = sum(m.weight.numel() for m in hf.modules() if isinstance(m, torch.nn.Linear))
    seq = 128
    assert flops_per_token(model, seq) == 6 * linear + 6 * model.num_layers * seq * model.hidden_size


def _plan_json(capsys, *args) -> dict:
    assert plan_main(["--json", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_model_card_21_days_at_25_percent_mfu(capsys):
    """1920 H100s, 9.8T tokens, 21 days [MC]: given 25% MFU the planner's days agree within 10%."""
    plan = _plan_json(capsys, "plan.mfu=0.25", "train.token_budget=9.8e12")
    assert plan["layout"]["gpus"] == 1920
    assert abs(plan["days"] - 21) <= 0.1 * 21
    for key in ("memory_gb_per_gpu", "step_time_s", "mfu", "tokens_per_s_per_gpu", "days"):
        assert isinstance(plan[key], float)
    assert plan["mfu"] == pytest.approx(0.25)
    # 2.8k tokens/s per GPU, the model card's derived rate (docs/model.md, "Compute")
    assert plan["tokens_per_s_per_gpu"] == pytest.approx(9.8e12 / (21 * 86400 * 1920), rel=0.1)


CLUSTER_LAYOUTS = [
    ("h100_1920", ["stage=pretrain", "precision=bf16"]),
    ("h100_1920_fp8", ["stage=pretrain", "precision=fp8"]),
    ("h100_1920_midtrain", ["stage=midtrain", "precision=bf16"]),
]


@pytest.mark.parametrize("topology, overrides", CLUSTER_LAYOUTS)
def test_cluster_layouts_are_the_planners_best(capsys, topology, overrides):
    plan = _plan_json(capsys, f"topology={topology}", *overrides)
    assert plan["memory"]["fits"]
    # A topology file chooses the layout; the stage keeps its micro-batch size.
    mbs = plan["layout"]["micro_batch_size"]
    result = _plan_json(capsys, "--search", f"topology={topology}", *overrides, f"plan.micro_batch_sizes=[{mbs}]")
    best = result["valid"][0]
    # Within 0.5% of the search's best: closer than that, the simpler layout is kept (the time
    # model is not that precise; h100_1920_fp8 vs PP 2 x VP 4 differ by 0.15%).
    assert math.isclose(plan["estimated_step_time_s"], best["estimated_step_time_s"], rel_tol=5e-3), (
        f"{topology}: {plan['estimated_step_time_s']:.4f} s, the search's best {best['layout']} "
        f"{best['estimated_step_time_s']:.4f} s")


def test_search_says_why_each_layout_is_rejected(capsys):
    result = _plan_json(capsys, "--search")
    rejected = result["rejected"]
    assert rejected and all(r["reason"] for r in rejected)
    by_layout = {(r["layout"]["tp"], r["layout"]["pp"], r["layout"]["vp"], r["layout"]["cp"],
                  r["layout"]["micro_batch_size"], r["layout"]["recompute"]): r for r in rejected}
    tp4 = by_layout[(4, 1, None, 1, 1, "none")]
    assert "topology.tp=4" in tp4["reason"] and "valid topology.tp: 1, 2, 5, 10" in tp4["reason"]
    no_parallel = by_layout[(1, 1, None, 1, 1, "none")]  # 14.7B weights + fp32 grads on one GPU
    assert no_parallel["kind"] == "memory" and "GB usable" in no_parallel["reason"]
    times = [round(p["estimated_step_time_s"], 6) for p in result["valid"]]
    assert times == sorted(times) and all(p["memory"]["fits"] for p in result["valid"])


def test_text_report(capsys):
    assert plan_main([]) == 0
    out = capsys.readouterr().out
    for text in ("weights", "gradients", "optimizer shard", "activations", "pipeline bubble", "pipeline sends",
                 "per micro-batch gemm", "optimizer step", "data parallel", "step time", "days"):
        assert text in out
    assert plan_main(["--search", "plan.top=3"]) == 0
    out = capsys.readouterr().out
    assert " 1  tp=" in out and " 4  tp=" not in out and "rejected, by reason" in out


@pytest.mark.parametrize("args, message", [
    (["topology.tp=4"], "topology.tp=4 does not divide the model evenly"),
    (["train.global_batch_size=5761"], "train.global_batch_size=5761 is not a multiple"),
    (["topology.tpp=2"], "invalid override"),
    (["hardware=a100"], "invalid override"),
    (["hardware.gemm_efficiency_fp8=1.5"], "hardware.gemm_efficiency_fp8=1.5; valid: (0, 1]"),
    (["hardware.sustained_clock=0"], "hardware.sustained_clock=0.0; valid: (0, 1]"),
    (["--searhc"], "unknown option(s) --searhc"),
    (["plan.gpus=0"], "plan.gpus=0; valid: a whole number at least 1 (devices; or null"),
    (["plan.gpus=abc"], "plan.gpus=abc; Value 'abc' of type 'str' could not be converted to Integer"),
    (["plan.mfu=2"], "plan.mfu=2.0; valid: a number above 0 and at most 1"),
    (["plan.gpus=-8"], "plan.gpus=-8; valid"),
    (["plan.save_from=/nowhere"], "plan.save_from=/nowhere: no metrics.jsonl there"),
    (["plan.save_seconds=0"], "plan.save_seconds=0.0; valid: a number above 0"),
    (["train.micro_batch_size=0"], "train.micro_batch_size=0; valid: a whole number at least 1"),
    (["train.seq_length=-4"], "train.seq_length=-4; valid: a whole number at least 1"),
])
def test_bad_input_is_one_clear_error(capsys, args, message):
    assert plan_main(args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


@pytest.mark.gpu
def test_memory_model_meets_megatron_on_gpu():
    """The te spec in bf16 on one GPU: static bytes exact, the activation peak within 20%."""
    layouts = {"te_bf16": (TopologyConfig(), "bf16", 256, 2, 4)}
    got = run_ranks(measure_layouts, 1, layouts, "te", timeout=600)[0]["te_bf16"]
    topology, dtype, seq, mbs, gbs = layouts["te_bf16"]
    spec = PlanSpec(tiny_model(transformer_impl="te"), topology, PrecisionConfig(dtype=dtype), 1, seq, mbs, gbs)
    planned = memory.static_memory(spec)
    assert got["static"] == dict(params=planned.params, grads=planned.grads, optimizer=planned.optimizer)
    estimate = memory.activation_memory(spec).total
    assert abs(estimate - got["peak"]) <= ACTIVATION_TOLERANCE * got["peak"], (estimate, got["peak"])


def test_readme_has_the_plans():
    readme = (ROOT / "README.md").read_text()
    for command in ("phi4-plan", "phi4-plan topology=h100_1920_fp8 precision=fp8",
                    "phi4-plan stage=midtrain topology=h100_1920_midtrain"):
        assert command in readme


def test_fp8_layers_follow_megatron_cores_first_last_bf16_rule():
    """Megatron-Core keeps the model's first and last layers (global numbers) in bf16, wherever
    the interleaved pipeline puts them: the FP8 weight copies and the FP8-rate FLOPs count only
    the rest."""
    from phi4.model.config import FP8Config
    from phi4.plan.estimate import estimate
    from phi4.runtime.hardware import HardwareConfig
    from phi4.settings import load_group

    model = tiny_model(num_layers=8, transformer_impl="te")
    layout = TopologyConfig(pp=2, vp=2)  # rank 0: layers 0, 1, 4, 5; rank 1: 2, 3, 6, 7

    def spec(fp8):
        return PlanSpec(model, layout, PrecisionConfig(dtype="bf16", fp8=fp8), 2, 64, 1, 4)

    keep = FP8Config(recipe="tensorwise", first_last_layers_bf16=True, num_layers_at_start_in_bf16=1,
                     num_layers_at_end_in_bf16=2)
    assert [memory.fp8_layers(spec(keep), r) for r in (0, 1)] == [(4, 3), (4, 2)]
    every = FP8Config(recipe="tensorwise", first_last_layers_bf16=False)
    assert [memory.fp8_layers(spec(every), r) for r in (0, 1)] == [(4, 4), (4, 4)]
    assert memory.fp8_layers(spec(None), 0) == (4, 0)
    assert memory.fp8_extra_bytes(spec(keep), 1) * 2 == memory.fp8_extra_bytes(spec(every), 1)
    hw = HardwareConfig.from_dict(load_group("hardware", ROOT / "conf/hardware/h100_80gb.yaml"))
    bf16, all_fp8, mixed = (estimate(spec(p), hw)["compute_s"] for p in (None, every, keep))
    assert all_fp8 < mixed < bf16


def test_tp_traffic_hides_under_the_gemms_with_tes_overlap(capsys):
    """phi4-plan on the cluster: with topology.tp_comm_overlap (on by default there) the TP traffic
    is exposed only where it outlasts the GEMM it runs under (at TP=2 on NVLink none does: none of it
    is exposed); turned off, the six of each layer's ten collectives that nothing issues
    asynchronously are (the four forward ones and the backward all-gathers before the dgrad GEMMs of
    proj and fc2; TE overlaps the wgrad-side ones by itself). The same traffic either way."""
    def tp(*overrides):
        comm = _plan_json(capsys, "topology=h100_1920", "topology.tp=2", "topology.pp=1", "topology.vp=null",
                          "topology.sp=true", *overrides)["comm"]["tp"]
        return comm["overlapped"], comm["gb_per_step"], comm["exposed_s"] / comm["seconds"]

    (on, traffic_on, share_on), (off, traffic_off, share_off) = tp(), tp("topology.tp_comm_overlap=false")
    assert on and not off and traffic_on == traffic_off > 0
    assert share_on == 0.0 and share_off == pytest.approx(6 / 10)


def _static_with_grads_in(grad_reduce_in_fp32: bool) -> dict:
    from memory_probe import static_bytes

    from helpers import optim_settings
    from phi4.model.build import build_phi4_model, transformer_config
    from phi4.model.parallel import init_model_parallel
    from phi4.train.optimizer import build_optimizer, wrap_ddp

    model, topology, precision = tiny_model(vocab_size=MEASURED_VOCAB), TopologyConfig(), PrecisionConfig(dtype="bf16")
    init_model_parallel(model, topology, precision)
    config = transformer_config(model, topology, precision)
    ddp = wrap_ddp(build_phi4_model(model, topology, precision, config=config), config,
                   grad_reduce_in_fp32=grad_reduce_in_fp32)
    optimizer = build_optimizer(ddp, config, optim_settings())
    from phi4.model.pipeline_schedule import micro_batches_from_tokens
    from phi4.train.lm import lm_update

    lm_update(ddp, optimizer, micro_batches_from_tokens(token_rows(model, 4, 64), 2))  # Adam's state exists now
    return static_bytes(ddp, optimizer)


def test_gradients_in_the_weights_dtype_are_planned_exactly():
    """train.grad_reduce_in_fp32=false (NeMo's grad_sync_dtype=bf16, Megatron-LM's default): the
    gradient buffers Megatron-Core allocates in bf16, byte for byte what the planner counts, and half
    the fp32 ones."""
    got = run_ranks(_static_with_grads_in, 1, False)[0]
    spec = PlanSpec(tiny_model(vocab_size=MEASURED_VOCAB), TopologyConfig(), PrecisionConfig(dtype="bf16"), 1, 64, 2, 4,
                    grad_reduce_in_fp32=False)
    planned = memory.static_memory(spec)
    assert got == dict(params=planned.params, grads=planned.grads, optimizer=planned.optimizer)
    fp32 = memory.static_memory(PlanSpec(spec.model, spec.topology, spec.precision, 1, 64, 2, 4))
    assert planned.grads * 2 == fp32.grads


def _h100():
    from phi4.runtime.hardware import HardwareConfig
    from phi4.settings import load_group

    return HardwareConfig.from_dict(load_group("hardware", ROOT / "conf/hardware/h100_80gb.yaml"))


def test_plan_meets_nvidias_measured_h100_throughput():
    """Each row of NVIDIA's NeMo 24.07 H100 FP8 performance summary (dense Llama models of Phi-4's
    architecture, each in its published layout), planned by phi4-plan's own code: the predicted
    tokens/s per GPU within 10% of the measured figure, and the layout fits in 80 GB as it did."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plan_vs_published", ROOT / "bench/plan_vs_published.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.compare(_h100())
    assert len(rows) == len(bench.PUBLISHED) and not [r for r in rows if "refused" in r]
    for r in rows:
        assert abs(r["tokens_ratio"] - 1) <= 0.10, (r["model"], r["planned_tokens_per_s"], r["measured_tokens_per_s"])
        assert r["fits"], (r["model"], r["memory_gb"])
    # newer rows, each with its recipe's settings (partial recomputation, FP8 current scaling, TE's
    # cross entropy): the held-out kind, held to 15%
    newer = bench.compare(_h100(), bench.NEWER)
    assert newer and not [r for r in newer if "refused" in r]
    for r in newer:
        assert abs(r["tokens_ratio"] - 1) <= 0.15 and r["fits"], (r["model"], r["tokens_ratio"], r["memory_gb"])


def test_gemm_shapes_precisions_and_tp_overlap_pieces():
    """phi4.plan.timing's GEMM model by its parts, not its seconds: waves of 128 x 128 output tiles
    over the 132 SMs, TE's accumulation per GEMM (fast in FP8 fprop, split in dgrad and wgrad), and
    the pieces TE's userbuffer overlap cuts each GEMM into, on the SMs its communication leaves
    (transformer_engine/pytorch/module/base.py, get_default_config)."""
    from phi4.plan.timing import UB_COMM_SMS, Gemm, gemm_efficiency, ub_pieces, waves

    hw = _h100()
    tiles = lambda a, b: Gemm("fc1_fprop", 128 * a, 128 * b, 8192, False)  # noqa: E731 (a x b tiles)
    assert [waves(tiles(11, 12), 132), waves(tiles(7, 19), 132), waves(tiles(12, 22), 132)] == [1, 2, 2]
    assert waves(Gemm("fc1_fprop", 129, 128, 64, False), 132) == 1  # a partial tile is a whole one
    assert waves(tiles(11, 12), 132 - UB_COMM_SMS) == 2  # 132 tiles on the 116 SMs TE's overlap leaves
    shape = dict(m=8192, n=8192, k=8192)
    assert gemm_efficiency(Gemm("qkv_fprop", fp8=True, **shape), hw) == hw.gemm_efficiency_fp8
    assert gemm_efficiency(Gemm("qkv_dgrad", fp8=True, **shape), hw) == hw.gemm_efficiency_fp8_split
    assert gemm_efficiency(Gemm("fc2_wgrad", fp8=True, **shape), hw) == hw.gemm_efficiency_fp8_split
    assert gemm_efficiency(Gemm("fc2_wgrad", fp8=False, **shape), hw) == hw.gemm_efficiency_bf16
    pieces = {name: ub_pieces(Gemm(name, fp8=True, **shape), hw, 4) for name in
              ("qkv_fprop", "proj_dgrad", "proj_fprop", "fc1_dgrad", "fc2_wgrad")}
    as_rows = {name: (piece.m, count, sms) for name, (piece, count, sms) in pieces.items()}
    assert as_rows == {
        "qkv_fprop": (8192 // 4, 4, 132),   # ring exchange: one TP step of rows at a time, copy engines
        "proj_dgrad": (8192 // 4, 4, 132),
        "proj_fprop": (8192 // 4, 4, 116),  # pipelined reduce-scatter: 4 chunks beside 16 comm SMs
        "fc1_dgrad": (8192, 1, 116),        # bulk all-gather beside it
        "fc2_wgrad": (8192, 1, 132),        # not overlapped
    }


def test_search_lists_only_layouts_the_trainer_accepts(capsys):
    """Every layout `phi4-plan --search` lists for Phi-4 on 1920 H100s, uneven pipeline stages among
    them, passes phi4-train's checks and builds Megatron-Core's TransformerConfig (which checks a
    pipeline layout against the model and the pipeline itself)."""
    from phi4.model.build import transformer_config
    from phi4.model.config import ModelConfig
    from phi4.model.validate import check_run
    from phi4.settings import load_group

    phi4 = ModelConfig.from_dict(load_group("model", ROOT / "conf/model/phi4_14b.yaml"))
    result = _plan_json(capsys, "--search", "plan.micro_batch_sizes=[1]", "plan.recompute=[none]")
    layouts = {tuple(sorted((k, v) for k, v in p["layout"].items()
                            if k in ("tp", "pp", "vp", "cp", "sp", "recompute", "pp_layout"))) for p in result["valid"]}
    assert len(layouts) > 100 and any(dict(k)["pp_layout"] for k in layouts)
    for key in layouts:
        topology = TopologyConfig(**dict(key))
        check_run(phi4, topology, PrecisionConfig(dtype="bf16"), 1920)
        config = transformer_config(phi4, topology, PrecisionConfig(dtype="bf16"))
        assert config.pipeline_model_parallel_size == topology.pp
        if topology.pp_layout:
            assert config.pipeline_model_parallel_layout.virtual_pipeline_model_parallel_size == (topology.vp or 1)
