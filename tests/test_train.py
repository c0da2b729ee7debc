"""phi4-train end to end, as users run it (the console script, torchrun): the embedded default,
resume under another layout, signals, a crash during a save, bad settings. An exact resume in the
same layout (every step's loss as in an uninterrupted run) is checked on two nodes, after a node
is killed, in tests/test_stage_chain.py."""

import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from helpers import ROOT, write_indexed
from phi4.errors import ConfigError
from phi4.runtime.launch_env import free_port

BIN = Path(sys.executable).parent
EXIT_RESUMABLE = 75


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    """One synthetic corpus (and index cache) for every run of this module."""
    return tmp_path_factory.mktemp("cache")


def small(cache, *extra):
    # phi4_tiny at half its width: these runs test the loop, resume and saves, which a smaller model
    # (half the checkpoint bytes) does as well
    return ["model.hidden_size=64", "model.ffn_hidden_size=224",
            "train.seq_length=32", "train.global_batch_size=4", "train.micro_batch_size=2", "train.log_every=1",
            "train.valid_every=0", "eval.every=0", "train.tensorboard=false", "data.synthetic.problems=600",
            f"data.cache_dir={cache}", "optim.warmup_steps=2", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def train(run_dir, *overrides, env=None, procs=1):
    """Run to completion; output through files and the whole process group reaped, so a killed
    run's helper processes (dist_checkpointing's writer) cannot hold the test up."""
    if procs == 1:
        cmd = [str(BIN / "phi4-train")]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc-per-node", str(procs), "--master-port", str(free_port()), "launch/train.py"]
    log = Path(run_dir).parent / f".{Path(run_dir).name}.{time.monotonic_ns()}.log"
    with log.open("w+") as out:
        proc = subprocess.Popen([*cmd, f"run_dir={run_dir}", *overrides], stdout=out, stderr=subprocess.STDOUT,
                                text=True, cwd=ROOT, env=env or _env(),
                                start_new_session=True)
        try:
            code = proc.wait(timeout=600)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        out.seek(0)
        text = out.read()
    return subprocess.CompletedProcess(proc.args, code, stdout=text, stderr="")


def losses(run_dir) -> dict:
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if "loss" in r:
            out[r["step"]] = r["loss"]
    return out


def latest(run_dir) -> str:
    return (Path(run_dir) / "checkpoints" / "latest").read_text().strip()


def _ok(out):
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-5000:]


GENERATIVE = ["eval.every=12", "eval.synthetic.problems=6", "eval.max_new_tokens=12", "eval.batch_size=4"]


@pytest.fixture(scope="module")
def default_run(tmp_path_factory, cache):
    run = tmp_path_factory.mktemp("default")
    out = train(run, *small(cache, "train.steps=12", "train.log_every=4", "train.valid_every=6", "checkpoint.every=4",
                            "checkpoint.keep=2", "train.tensorboard=true", *GENERATIVE))
    return run, out


def test_default_run(default_run, capsys):
    """Loss falls, metrics, validation and the generative evaluation logged, checkpoints kept and
    pointed at, config saved; each save's time recorded, which phi4-plan reads (plan.save_from)."""
    tmp_path, out = default_run
    _ok(out)
    records = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    saves = [r for r in records if "checkpoint_save_s" in r]
    assert [r["step"] for r in saves] == [4, 8, 12] and all(r["checkpoint_save_s"] > 0 for r in saves)
    from phi4.cli.plan import main as plan_main

    assert plan_main(["--json", f"plan.save_from={tmp_path}"]) == 0
    planned = json.loads(capsys.readouterr().out)["saves"]
    assert planned["save_s"] == sorted(r["checkpoint_save_s"] for r in saves)[1]  # the median of three
    assert planned["save_source"] == f"the median of 3 save(s) measured in {tmp_path}"
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [4, 8, 12]
    assert {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tflops_per_gpu", "mfu", "memory_gb"} <= set(train_records[0])
    assert train_records[-1]["loss"] < train_records[0]["loss"] - 0.5
    # Megatron-LM's consumed samples and time per step, and the ETA at that pace (4 samples a step)
    assert [r["consumed_samples"] for r in train_records] == [16, 32, 48]
    assert all(r["ms_per_step"] > 0 for r in train_records) and train_records[-1]["eta_s"] == 0
    assert train_records[0]["eta_s"] == pytest.approx(8 * train_records[0]["ms_per_step"] / 1000)
    assert re.search(r"step +4/12 \| loss .* \| 16 samples \| [\d,]+ ms/step \| ETA 0:\d\d:\d\d \| ", out.stderr + out.stdout)
    assert [r["step"] for r in records if "val_loss" in r] == [6, 12]
    assert latest(tmp_path) == "step_0000012"
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000008", "step_0000012"]
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert saved["train"]["steps"] == 12 and saved["model"]["hidden_size"] == 64  # as small() set it
    assert list((tmp_path / "tensorboard").glob("events.*"))
    assert str(tmp_path) in out.stdout + out.stderr  # the run directory is printed
    # The held-out synthetic split, answered at the last step: its accuracy and interval are those
    # of the verdicts written beside the metrics.
    from phi4.eval.score import wilson_interval

    (scores,) = [r for r in records if "eval/heldout_6_1/accuracy" in r]
    generations = [json.loads(l) for l in (tmp_path / "generations" / "step_0000012.jsonl").read_text().splitlines()]
    right = sum(g["correct"] for g in generations)
    assert scores["step"] == 12 and len(generations) == 6 and {g["step"] for g in generations} == {12}
    assert scores["eval/heldout_6_1/accuracy"] == right / 6
    assert (scores["eval/heldout_6_1/ci95_low"], scores["eval/heldout_6_1/ci95_high"]) == wilson_interval(right, 6)
    assert all(g["tokens"] == 12 or g["stopped"] for g in generations)
    assert "eval heldout_6_1: accuracy" in out.stdout


@pytest.mark.parametrize("layout", ["topology.tp=1", "topology.pp=2"])
def test_phi4_eval_on_two_ranks_repeats_the_training_eval(default_run, tmp_path, layout):
    """phi4-eval on the final checkpoint, on two processes (the problems split over two
    data-parallel ranks, or the model over two pipeline stages): the same greedy answers and
    verdicts as the evaluation inside the training run."""
    run, _ = default_run
    cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", str(free_port()), "launch/eval.py",
           f"checkpoint={run}", f"run_dir={tmp_path}", "eval=synthetic_heldout", layout,
           *[o for o in GENERATIVE if "every" not in o]]
    out = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    ours = [json.loads(l) for l in (tmp_path / "generations.jsonl").read_text().splitlines()]
    theirs = [json.loads(l) for l in (run / "generations" / "step_0000012.jsonl").read_text().splitlines()]
    assert [(g["id"], g["response"], g["correct"]) for g in ours] == \
           [(g["id"], g["response"], g["correct"]) for g in theirs]
    (record,) = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert record["step"] == 12 and record["eval/heldout_6_1/problems"] == 6
    expected = "2 data-parallel rank(s)" if layout == "topology.tp=1" else "full forward per token, 1 data-parallel"
    assert expected in out.stdout + out.stderr


def test_phi4_eval_stops_on_sigterm_and_resumes(default_run, tmp_path):
    """SIGTERM after the first answered problem: exit 75 with it in the part file; the rerun asks
    only the rest and writes the training run's answers; a rerun with other settings is refused."""
    run, _ = default_run
    cmd = [str(BIN / "phi4-eval"), f"checkpoint={run}", f"run_dir={tmp_path}", "eval=synthetic_heldout",
           *[o for o in GENERATIVE if "every" not in o and "batch_size" not in o], "eval.batch_size=1"]
    part = tmp_path / "parts" / "part-00000-of-00001.jsonl"
    log = tmp_path / "first.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=out, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 120
        while not (part.exists() and part.read_text().count("\n") >= 1) and time.monotonic() < deadline:
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == EXIT_RESUMABLE, log.read_text()[-3000:]
    first = part.read_text().count("\n")
    assert 1 <= first < 6 and "exit 75 to resume" in log.read_text()
    again = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"({first} from an earlier run)" in again.stdout + again.stderr
    ours = [json.loads(l) for l in (tmp_path / "generations.jsonl").read_text().splitlines()]
    theirs = [json.loads(l) for l in (run / "generations" / "step_0000012.jsonl").read_text().splitlines()]
    assert [(g["id"], g["response"]) for g in ours] == [(g["id"], g["response"]) for g in theirs]
    other = subprocess.run([*cmd, "eval.max_new_tokens=11"], cwd=ROOT, env=_env(), capture_output=True, text=True,
                           timeout=300)
    assert other.returncode == 2 and "holds an evaluation of another checkpoint, other settings" in other.stderr


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
    """10 uninterrupted fp32 steps: the reference of the bf16 and overlapped-communication tests."""
    run = tmp_path_factory.mktemp("straight")
    _ok(train(run, *small(cache, "train.steps=10", "checkpoint.every=4", "checkpoint.keep=3")))
    return run


def test_resume_under_another_layout(tmp_path, cache):
    """torchrun with tensor and sequence parallelism; saved at TP=2 (+SP), PP=1 and resumed at TP=1,
    PP=2 (optimizer state included): losses within 1e-5. The resumed run starts from the straight
    run's step-4 checkpoint, alone in a run directory of its own, as a run stopped there leaves it."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    out = train(straight, *small(cache, "train.steps=8", "topology.tp=2", "topology.sp=true", "checkpoint.every=4"),
                procs=2)
    _ok(out)
    assert "tp=2" in out.stdout + out.stderr
    shutil.copytree(straight / "checkpoints" / "step_0000004", resumed / "checkpoints" / "step_0000004")
    (resumed / "checkpoints" / "latest").write_text("step_0000004\n")
    again = train(resumed, *small(cache, "train.steps=8", "topology.pp=2"), procs=2)
    _ok(again)
    assert "resumed from" in again.stdout and "at step 4" in again.stdout and "saved at {'tp': 2" in again.stdout
    a, b = losses(straight), losses(resumed)
    assert sorted(a) == list(range(1, 9)) and sorted(b) == list(range(5, 9))
    for step in b:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


def _model_tensors(directory) -> dict:
    from phi4.convert.mcore_checkpoint import CheckpointReader

    reader = CheckpointReader(Path(directory))
    keys = [k for k in reader.tensors if not k.startswith("optimizer") and reader.dtype(k).is_floating_point]
    return {key: tensor for (key, _), tensor in reader.read([(k, None) for k in keys]).items()}


def test_overlapped_grad_reduce_and_param_gather(tmp_path, cache, straight):
    """DP=2 with the reduce-scatter and all-gather overlapped: the losses of the single-process
    run, step for step (the same schedule: 10 steps, stopped after 4), and its step-4 checkpoint
    holds the single-process run's step-4 weights, every shard of them (each DP rank updates only
    its own shard; without a forced all-gather before the save the others would be step 3's)."""
    out = train(tmp_path, *small(cache, "train.steps=10", "train.exit_interval=4", "train.overlap_grad_reduce=true",
                                 "train.overlap_param_gather=true"), procs=2)
    assert "stopping at step 4" in out.stdout + out.stderr, out.stdout[-3000:]
    a, b = losses(straight), losses(tmp_path)
    assert sorted(b) == [1, 2, 3, 4] and all(abs(a[s] - b[s]) <= 1e-5 for s in b), (a, b)
    ours, reference = (_model_tensors(run / "checkpoints" / "step_0000004") for run in (tmp_path, straight))
    assert len(ours) >= 5 and ours.keys() == reference.keys()
    worst = max((ours[k] - reference[k]).abs().max().item() for k in ours)
    assert worst < 1e-5, worst
    # The weights, alike on both data-parallel ranks, were written by both (Megatron-LM's fully
    # parallel save), not all by DP rank 0: each rank's file holds some of them.
    from torch.distributed.checkpoint import FileSystemReader

    storage = FileSystemReader(str(tmp_path / "checkpoints" / "step_0000004")).read_metadata().storage_data
    writers = {info.relative_path.split("_")[2] for index, info in storage.items() if index.fqn in ours}
    assert writers == {"0", "1"}, writers


def test_sigterm_saves_and_exits_resumable(tmp_path, cache):
    """With the asynchronous writer: the checkpoint is finished and published before the exit."""
    cmd = [str(BIN / "phi4-train"), f"run_dir={tmp_path}", *small(cache, "train.steps=500", "checkpoint.async_save=true")]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == EXIT_RESUMABLE, output[-3000:]
    reached = max(losses(tmp_path))
    assert 3 <= reached < 500
    assert latest(tmp_path) == f"step_{reached:07d}"
    assert "SIGTERM" in output


def test_crash_during_save_keeps_previous_latest(tmp_path, cache):
    """SIGKILL after a checkpoint's data is written but before `latest` names it: the previous
    checkpoint stays latest and the next run resumes from it."""
    run = small(cache, "train.steps=6", "checkpoint.every=2")
    killed = train(tmp_path, *run, env={**_env(), "PHI4_FAULT": "kill_before_publish:4"})
    assert killed.returncode == -signal.SIGKILL
    assert (tmp_path / "checkpoints" / "step_0000004").exists()  # written, never published
    assert latest(tmp_path) == "step_0000002"
    again = train(tmp_path, *run)
    _ok(again)
    assert "at step 2" in again.stdout + again.stderr
    assert latest(tmp_path) == "step_0000006"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["topology.tp=3"], "topology.tp=3 does not divide the model evenly (model.num_query_groups=2, "
                            "model.num_attention_heads=8, model.ffn_hidden_size=448); valid topology.tp: 1, 2"),
        (["train.steps=4", "optim.warmup_steps=5"], "optim.warmup_steps=5 must be at least 0 and less than train.steps=4"),
        (["train.global_batch_size=5"], "train.global_batch_size=5 is not a multiple of train.micro_batch_size=2"),
        (["model=phi4_14b", "topology=h100_1920"], "topology.nodes x topology.gpus_per_node = 1920, but 1 processes were started"),
        (["stage=tiny_dpo", "checkpoint.load=/nowhere"], "data.pairs is not set: give the preference JSONL"),
        (["data=synthetic_chat", "train.objective=dpo"], "train.objective=dpo reads data.format preference, not packed_chat"),
        (["data=preference", "data.pairs=/x.jsonl", "train.objective=dpo"], "train.objective=dpo needs the dpo settings"),
        (["eval.samples=3"], "eval.samples=3 with eval.temperature=0: greedy decoding answers the same each time"),
        (["eval.tasks=[/no/bench.jsonl]"], "eval.tasks: not found: /no/bench.jsonl"),
        (["eval.every=-1"], "eval.every=-1; valid: a whole number at least 0"),
        (["checkpoint.keep=0"], "checkpoint.keep=0; valid: a whole number at least 1"),
        (["checkpoint.keep=-2"], "checkpoint.keep=-2; valid: a whole number at least 1"),
        (["checkpoint.every=-1"], "checkpoint.every=-1; valid: a whole number at least 0"),
        (["train.log_every=0"], "train.log_every=0; valid: a whole number at least 1"),
        (["train.global_batch_size=0"], "train.global_batch_size=0; valid: a whole number at least 1"),
        (["optim.lr=-1"], "optim.lr=-1.0; valid: a number above 0 (the peak learning rate)"),
        (["optim.adam_beta2=1.5"], "optim.adam_beta2=1.5; valid: a number at least 0 and below 1"),
        (["+train.stepz=3"], "train.stepz is not a setting; valid: objective, steps, token_budget"),
        (["data.sources=[{name: web, path: /x, weight: 0}]"], "data.sources[0].weight=0.0; valid: a number above 0"),
        (["stage=tiny_dpo", "dpo.beta=0", "data.pairs=/x.jsonl"], "dpo.beta=0.0; valid: a number above 0"),
        (["seed=-1"], "seed=-1; valid: a whole number at least 0"),
        (["train.spike_action=retry"], "train.spike_action='retry'; valid: skip, rewind"),
        (["train.hang_timeout_minutes=0"], "train.hang_timeout_minutes=0.0; valid: a number above 0"),
        (["checkpoint.load=/nowhere"], "checkpoint.load=/nowhere: /nowhere is not a Megatron-Core torch_dist checkpoint"),
        (["data.split='98;2'"], "data.split='98;2'; valid: train, validation and test shares"),
        (["data.split='0,0,0'"], "data.split='0,0,0'; valid"),
    ],
)
def test_bad_settings_stop_before_any_work(tmp_path, overrides, message):
    """Each raises before any process group or file exists (in this process: no launch needed)."""
    from hydra import compose, initialize_config_dir

    from phi4.cli.train_job import train as run_training

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        cfg = compose("train", overrides=[*overrides, f"run_dir={tmp_path}"])
    with pytest.raises(ConfigError) as err:
        run_training(cfg)
    assert message in str(err.value)
    assert not list(tmp_path.iterdir())


def test_bad_setting_is_one_line_and_exit_2(tmp_path):
    """From the command line: exit 2, one line, and nothing made or touched (Hydra makes no run
    directory or log file of its own; the in-process cases above cover each setting's message)."""
    run = tmp_path / "run"
    run.write_text("mine")
    out = train(run)
    assert out.returncode == 2
    assert f"error: run_dir={run} is a file; valid: a directory" in out.stdout, out.stdout[-2000:]
    assert "Traceback" not in out.stdout
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["run"]  # the helper's log is hidden
    assert run.read_text() == "mine"


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "train.steps=abc; Value 'abc' of type 'str' could not be converted to Integer"),
    ("train.micro_batch_size=2.5", "train.micro_batch_size=2.5; Value '2.5' of type 'float' could not be converted to Integer"),
    ("optim.lr=fast", "optim.lr=fast; Value 'fast' of type 'str' could not be converted to Float"),
    ("precision.fp8.margin=x", "precision.fp8.margin=x; Value 'x' of type 'str' could not be converted to Integer"),
    ("eval.tasks=/x.jsonl", "eval.tasks=/x.jsonl; Invalid value assigned: str is not a ListConfig"),
    ("train.stepz=3", "Could not override 'train.stepz'; Key 'stepz' not in 'Train'; valid: objective, steps, "),
    ("data.sources=[{name: web, pth: /x, weight: 1}]", "Key 'pth' not in 'Source'; valid: name, path, weight, generate"),
    ("model=phi4_huge", "Could not find 'model/phi4_huge'; available in 'model': phi4_14b, phi4_tiny"),
])
def test_wrong_type_or_unknown_key_is_refused_at_composition(override, message):
    """The typed groups (phi4.settings, ConfigStore schemas) refuse these while Hydra composes,
    before any of our code runs; the entry points print the refusal as this one line."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    from phi4.logs import config_error_line

    overrides = [override] + (["precision=fp8"] if "fp8" in override else [])
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
        with pytest.raises(HydraException) as err:
            compose("train", overrides=overrides)
    line = config_error_line(err.value)
    assert message in line and "\n" not in line, line


def test_composition_error_is_one_line_and_exit_2(tmp_path):
    out = train(tmp_path / "run", "train.stepz=3")
    assert out.returncode == 2
    lines = [line for line in out.stdout.splitlines() if line.strip()]
    assert len(lines) == 1, out.stdout
    assert lines[0].startswith("error: Could not override 'train.stepz'; Key 'stepz' not in 'Train'; valid: objective, "
                               "steps, token_budget"), lines[0]
    assert not list(tmp_path.iterdir()) or all(p.name.startswith(".") for p in tmp_path.iterdir())


def test_bf16_tracks_fp32(tmp_path, cache, straight):
    """precision=bf16 (bf16 weights and activations, fp32 master weights in the distributed
    optimizer) follows the fp32 run: within 1% of its loss at every step, both falling."""
    _ok(train(tmp_path / "bf16", *small(cache, "train.steps=10", "precision=bf16")))
    a, b = losses(straight), losses(tmp_path / "bf16")
    assert b[10] < b[1] - 1.0
    assert all(abs(a[s] - b[s]) <= 0.01 * a[s] for s in a), (a, b)


def test_pruning_never_removes_what_latest_or_final_names(tmp_path):
    """keep below 1 keeps the checkpoint just written; a checkpoint `final` names survives
    pruning however old (the run's end, another stage's start)."""
    from phi4.checkpoint.pointers import publish as _publish, checkpoint_dir

    dirs = [checkpoint_dir(tmp_path, step) for step in (10, 20, 30)]
    for d in dirs:
        d.mkdir(parents=True)
        (d / ".metadata").write_bytes(b"")
    _publish(tmp_path, dirs[0], keep=1, final=True)
    _publish(tmp_path, dirs[1], keep=1)
    _publish(tmp_path, dirs[2], keep=0)
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*")) == ["step_0000010", "step_0000030"]
    assert latest(tmp_path) == "step_0000030"


def test_resuming_with_another_model_or_batch_shape_is_refused_before_anything_is_written(tmp_path, cache, straight):
    from hydra import compose, initialize_config_dir

    from phi4.checkpoint.pointers import latest_checkpoint
    from phi4.train.checks import check_resume
    from phi4.settings import typed
    from phi4.cli.train_job import train as run_training

    run = tmp_path / "run"
    shutil.copytree(straight, run, copy_function=os.link)
    before = (run / "config.yaml").read_bytes()

    def cfg_with(*overrides):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            return compose("train", overrides=[*small(cache, "train.steps=10"), f"run_dir={run}", *overrides])

    with pytest.raises(ConfigError) as err:
        run_training(cfg_with("model.hidden_size=96"))
    assert "holds a run of another model (model.hidden_size 64 -> 96)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        run_training(cfg_with("train.global_batch_size=8"))
    assert "another batch shape (train.global_batch_size 4 -> 8)" in str(err.value)
    assert "checkpoint.allow_new_batch_shape=true" in str(err.value)
    assert (run / "config.yaml").read_bytes() == before
    # the learning-rate schedule: Megatron-Core's scheduler would take the checkpoint's values silently
    for overrides, named in [(["train.steps=14"], "decay steps (train.steps or train.token_budget) 10 -> 14"),
                             (["train.token_budget=1792"], "decay steps (train.steps or train.token_budget) 10 -> 14"),
                             (["optim.lr=1e-3", "optim.decay_style=wsd"],
                              "optim.lr 0.003 -> 0.001; optim.decay_style cosine -> wsd; optim.wsd_decay_fraction None "
                              "-> 0.1; optim.wsd_decay_style None -> linear"),
                             (["optim.min_lr=1e-5", "optim.warmup_steps=3", "optim.weight_decay=0.01"],
                              "optim.min_lr 0.0003 -> 1e-05; optim.warmup_steps 2 -> 3; optim.weight_decay 0.1 -> 0.01")]:
        with pytest.raises(ConfigError) as err:
            run_training(cfg_with(*overrides, *(["train.steps=null"] if "token" in overrides[0] else [])))
        message = str(err.value)
        assert f"was trained on another learning-rate schedule ({named}), resumed from step_0000010 at step 10" \
            in message and "optim.override_scheduler=true" in message and "\n" not in message, message
    assert (run / "config.yaml").read_bytes() == before
    allowed = cfg_with("train.global_batch_size=8", "checkpoint.allow_new_batch_shape=true", "model.transformer_impl=local")
    assert check_resume(run, typed(allowed, "model"), typed(allowed, "train"), typed(allowed, "checkpoint"),
                        latest_checkpoint(run), typed(allowed, "optim"), 10) == []  # asked for: accepted, and the schedule is the run's own


def _cosine_lr(step, peak, low, warmup, decay_steps):
    """The warm-up and cosine decay the optim settings describe (linear warm-up from 0), written out."""
    if step <= warmup:
        return peak * step / warmup
    if step > decay_steps:
        return low
    return low + (peak - low) * 0.5 * (math.cos(math.pi * (step - warmup) / (decay_steps - warmup)) + 1)


def test_a_run_extended_with_override_scheduler_decays_to_the_new_end(tmp_path, cache, straight):
    """The straight run (10 steps, cosine to min_lr at step 10) resumed with train.steps=14 and
    optim.override_scheduler=true: each change is logged, and steps 11-14 follow the cosine to step 14,
    not the old schedule's min_lr."""
    run = tmp_path / "run"
    shutil.copytree(straight, run, copy_function=lambda a, b: os.link(a, b) if a.endswith(".distcp") else shutil.copy2(a, b))
    out = train(run, *small(cache, "train.steps=14", "optim.override_scheduler=true"))
    _ok(out)
    assert "optim.override_scheduler=true: the schedule changes from step 10: decay steps (train.steps or " \
           "train.token_budget) 10 -> 14" in out.stdout
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    lr = {r["step"]: r["lr"] for r in records if "lr" in r}
    for step in (11, 12, 13):
        assert lr[step] == pytest.approx(_cosine_lr(step, 3e-3, 3e-4, 2, 14), rel=1e-9)
        assert lr[step] > 3e-4 * 1.01  # the old schedule had ended at min_lr
    assert lr[14] == pytest.approx(3e-4, rel=1e-9)


def test_a_checkpoint_without_a_schedule_record_is_compared_through_its_scheduler_state():
    """Checkpoints saved before phi4 recorded the schedule hold only Megatron-Core's scheduler state:
    check_resume reads the same settings from it (the wsd settings, which that state lacks, aside)."""
    import torch

    from phi4.settings import Optim
    from phi4.train.checks import _saved_schedule
    from phi4.train.optimizer import build_scheduler, schedule

    optim = Optim(lr=2e-3, min_lr=2e-4, warmup_steps=3, decay_style="cosine", weight_decay=0.05, adam_beta1=0.9,
                  adam_beta2=0.95, adam_eps=1e-8, clip_grad=1.0)
    state = build_scheduler(torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0), optim, 40).state_dict()
    expected = {k: v for k, v in schedule(optim, 40).items() if not k.startswith("optim.wsd_")}
    assert _saved_schedule({"scheduler": state}) == expected


def test_wsd_holds_the_peak_then_decays_over_its_last_fraction():
    """optim.decay_style=wsd through Megatron-Core's scheduler: warm-up, the peak until the last
    wsd_decay_fraction of the steps, then the wsd_decay_style to min_lr at the last step."""
    import torch

    from phi4.settings import Optim
    from phi4.train.optimizer import build_scheduler

    for style, coeff in [("linear", lambda r: 1 - r), ("cosine", lambda r: 0.5 * (math.cos(math.pi * r) + 1)),
                         ("minus_sqrt", lambda r: 1 - math.sqrt(r))]:
        optim = Optim(lr=1e-3, min_lr=1e-4, warmup_steps=2, decay_style="wsd", wsd_decay_fraction=0.25,
                      wsd_decay_style=style, weight_decay=0.1, adam_beta1=0.9, adam_beta2=0.95, adam_eps=1e-8,
                      clip_grad=1.0)
        sgd = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)
        scheduler = build_scheduler(sgd, optim, steps=20)  # decays over steps 15-20
        seen = {}
        for step in range(1, 21):
            scheduler.step(increment=1)
            seen[step] = sgd.param_groups[0]["lr"]
        expected = {step: 1e-3 * step / 2 if step <= 2 else 1e-3 if step <= 15
                    else 1e-4 + (1e-3 - 1e-4) * coeff((step - 15) / 5) for step in range(1, 21)}
        assert seen == pytest.approx(expected, rel=1e-9), style


def test_out_of_vocabulary_data_stops_before_the_model_with_the_files_name(tmp_path, cache):
    """A source of shards (a glob, from a Hydra override): the shard with the bad id is the file named."""
    write_indexed(tmp_path / "data" / "web_1", [[5, 7, 9] * 40])
    write_indexed(tmp_path / "data" / "web_2", [[5, 120000, 7] * 40])
    out = train(tmp_path / "run", *small(cache, "train.steps=3"),
                f"data.sources=[{{name: web, path: '{tmp_path}/data/web_*', weight: 1}}]")
    assert out.returncode == 2, out.stdout[-2000:]
    assert f"error: data.sources.web: {tmp_path}/data/web_2.bin holds token id 120000" in out.stdout
    assert "Traceback" not in out.stdout
    assert not (tmp_path / "run").exists()  # found after the process group: config.yaml and tensorboard/ gone again


def test_dataset_indices_built_ahead_are_what_the_run_reads(tmp_path, cache):
    """`phi4-data index` with a run's overrides builds its Megatron-Core indices; the run then adds
    no file to the index cache and says it read them. A run with another seed builds its own."""
    def files() -> dict:
        return {p: p.stat().st_mtime_ns for p in (Path(cache) / "index_cache").rglob("*") if p.is_file()}

    overrides = small(cache, "train.steps=3", "seed=4321")
    out = subprocess.run([str(BIN / "phi4-data"), "index", *overrides], capture_output=True, text=True, timeout=300,
                         env=_env())
    assert out.returncode == 0, out.stderr[-2000:]
    assert re.fullmatch(rf"dataset indices for 3 steps x 4 samples of 32 tokens \(1 source, seed 4321\): built \d+ "
                        rf"files in {cache}/index_cache/\w+ \(\d+\.\d s\); phi4-train with the same overrides reads them\n",
                        out.stdout), out.stdout
    before = files()
    log = train(tmp_path / "run", *overrides).stdout
    assert re.search(rf"dataset indices: read from {cache}/index_cache/\w+ \(built ahead", log), log[-2000:]
    assert files() == before
    log = train(tmp_path / "other", *small(cache, "train.steps=3", "seed=4322")).stdout
    assert re.search(rf"dataset indices: built into {cache}/index_cache/\w+ \(\d+ files\) in ", log), log[-2000:]


def still_running(children, seconds: float = 10.0) -> list[int]:
    """The pids among `children` still running (not a zombie) after up to `seconds`; those are
    killed, so that a failing test leaves no orphan either."""
    import psutil

    def running(p):
        try:
            return p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + seconds
    while any(running(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [p.pid for p in children if running(p)]
    for pid in alive:
        os.kill(pid, signal.SIGKILL)
    return alive


def test_kill_9_leaves_no_orphan_process(tmp_path, cache):
    """The checkpoint writer's helper (a forked multiprocessing Manager, ~450 MB) ends with its
    training process, kill -9 included."""
    import psutil

    run = tmp_path / "run"
    proc = subprocess.Popen([str(BIN / "phi4-train"), f"run_dir={run}", *small(cache, "train.steps=200",
                            "checkpoint.every=2", "train.log_every=50")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, cwd=ROOT, env=_env())
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "latest").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        children = psutil.Process(proc.pid).children(recursive=True)
        assert children, "the first save starts the writer's helper"
    finally:
        proc.kill()
        proc.wait()

    assert not still_running(children)


SPAWNS_A_MANAGER = """
import multiprocessing, time
from phi4.runtime import signals
signals.install()  # as every entry module does at import: a spawned child re-imports this file

if __name__ == "__main__":
    # what dist_checkpointing's writer does at a first save on GPUs (spawn: CUDA is initialised)
    manager = multiprocessing.get_context("spawn").Manager()
    print(*[p.pid for p in multiprocessing.active_children()], flush=True)
    time.sleep(120)
"""


def test_a_spawned_helper_ends_with_its_process(tmp_path):
    """The GPU path: the writer's Manager is spawned, not forked; kill -9 of the process that
    started it ends it too."""
    import psutil

    script = tmp_path / "entry.py"
    script.write_text(SPAWNS_A_MANAGER)
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True, env=_env())
    try:
        children = [psutil.Process(int(pid)) for pid in proc.stdout.readline().split()]
        assert children, "the Manager's server process"
    finally:
        proc.kill()
        proc.wait()
    assert not still_running(children)


def test_a_failed_start_leaves_the_run_directory_as_it_was(tmp_path):
    """What a start writes goes again when the run fails before its first step: the directory it
    made; in a directory that held a run, only the new entries, and the replaced config.yaml gets
    its old contents back. After keep() (a step ran) a failure leaves everything."""
    from phi4.runtime.run_dir import RunDirectory

    def fail(path, rank=0, keep=False):
        with pytest.raises(RuntimeError):
            with RunDirectory(path, rank) as run_files:
                run_files.write("config.yaml", "new: 1\n")
                (path / "tensorboard").mkdir(exist_ok=True)
                (path / "tensorboard" / "events.new").write_text("x")
                (path / "parts").mkdir()
                if keep:
                    run_files.keep()
                raise RuntimeError("data check failed")

    fail(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()

    held = tmp_path / "held"
    (held / "checkpoints").mkdir(parents=True)
    (held / "tensorboard").mkdir()
    (held / "tensorboard" / "events.old").write_text("old")
    (held / "config.yaml").write_text("old: 1\n")
    fail(held)
    assert sorted(p.name for p in held.iterdir()) == ["checkpoints", "config.yaml", "tensorboard"]
    assert [p.name for p in (held / "tensorboard").iterdir()] == ["events.old"]
    assert (held / "config.yaml").read_text() == "old: 1\n"

    fail(tmp_path / "kept", keep=True)
    assert (tmp_path / "kept" / "config.yaml").read_text() == "new: 1\n" and (tmp_path / "kept" / "parts").is_dir()
    (tmp_path / "other").mkdir()  # rank 1 neither writes nor removes: rank 0 owns the directory
    with pytest.raises(RuntimeError):
        with RunDirectory(tmp_path / "other", 1) as run_files:
            run_files.write("config.yaml", "x")
            raise RuntimeError
    assert (tmp_path / "other").is_dir() and not list((tmp_path / "other").iterdir())


def test_a_run_dir_that_is_a_file_or_not_writable_is_refused(tmp_path):
    from hydra import compose, initialize_config_dir

    from phi4.cli.train_job import train as run_training

    def refused(run_dir):
        with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base=None):
            cfg = compose("train", overrides=[f"run_dir={run_dir}"])
        with pytest.raises(ConfigError) as err:
            run_training(cfg)
        return str(err.value)

    (tmp_path / "file").write_text("x")
    assert refused(tmp_path / "file") == f"run_dir={tmp_path / 'file'} is a file; valid: a directory (made if missing)"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    if os.access(locked, os.W_OK):  # root writes anywhere: nothing to refuse
        pytest.skip("running as root: every directory is writable")
    assert "is not writable" in refused(locked / "run")



def test_an_installed_wheel_finds_its_config_from_another_directory(tmp_path, cache):
    """The config ships in the wheel (the package phi4.conf, mapped to conf/): the wheel installed
    without -e into a folder, phi4-train run from another directory composes its config from
    there and trains two steps."""
    wheels, site, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", wheels, ROOT], check=True,
                   capture_output=True)
    wheel, = wheels.glob("phi4_megatron-*.whl")
    subprocess.run([*pip, "install", "--no-deps", "--target", site, wheel], check=True, capture_output=True)
    elsewhere.mkdir()
    env = {**_env(), "PYTHONPATH": str(site)}  # the installed copy, not the checkout's editable one

    def run(*args):
        return subprocess.run(args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)

    found = run(sys.executable, "-c", "import phi4; print(phi4.__file__); print(phi4.conf_dir())").stdout.split()
    assert found == [str(site / "phi4" / "__init__.py"), str(site / "phi4" / "conf")]
    job = run(site / "bin" / "phi4-train", "--cfg", "job")
    assert job.returncode == 0 and "objective: lm" in job.stdout, job.stderr[-2000:]
    out = run(site / "bin" / "phi4-train", f"run_dir={elsewhere / 'run'}",
              *small(cache, "train.steps=2", "optim.warmup_steps=0"))
    assert out.returncode == 0, out.stderr[-3000:]
    assert sorted(losses(elsewhere / "run")) == [1, 2]


def test_phi4_report_on_a_real_run(default_run, tmp_path):
    """The console script on the default run: every picture, and the summary of its 12 steps."""
    run, _ = default_run
    out = subprocess.run([str(BIN / "phi4-report"), str(run), "--out", str(tmp_path / "report")], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for name in ("loss", "lr", "grad_norm", "throughput", "eval"):
        assert (tmp_path / "report" / f"{name}.png").read_bytes()[:4] == b"\x89PNG"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last_loss = [r["loss"] for r in records if "loss" in r][-1]
    assert f"| {run.name} | 12 | {last_loss:.4f} |" in (tmp_path / "report" / "README.md").read_text()
