"""The GPU kit's CPU side (bench/gpu): the carry plan's splitting, verification and size limit on
stand-in files (nothing downloaded), its pins against the tested versions, and the throughput
script at a tiny shape on the CPU, through the same code path it takes on the GPU."""

import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from helpers import ROOT

KIT = ROOT / "bench/gpu"
MIB = 1024 * 1024


def kit_module():
    spec = importlib.util.spec_from_file_location("gpu_kit", KIT / "kit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def downloads(tmp_path):
    """Stand-ins: two small wheels, an sdist, and one large 'core library' wheel."""
    folder = tmp_path / "downloads"
    folder.mkdir()
    sizes = {"a-1.0-py3-none-any.whl": 1000, "b-2.0-py3-none-any.whl": 300 * 1024, "c-3.0.tar.gz": 20 * 1024,
             "big_cu13-1.0-py3-none-manylinux_2_28_x86_64.whl": int(2.5 * MIB) + 17}
    for i, (name, size) in enumerate(sizes.items()):
        (folder / name).write_bytes(os.urandom(size))
    return folder


def test_large_files_are_cut_to_fit_each_command_with_the_tree(tmp_path, downloads):
    kit = kit_module()
    tree = 100 * 1024
    manifest = kit.prepare(downloads, tmp_path / "kit", limit_mib=1.0, tree=tree)
    by_name = {f["name"]: f for f in manifest["files"]}
    assert all(by_name[n]["parts"] is None for n in ("a-1.0-py3-none-any.whl", "b-2.0-py3-none-any.whl", "c-3.0.tar.gz"))
    parts = by_name["big_cu13-1.0-py3-none-manylinux_2_28_x86_64.whl"]["parts"]
    assert len(parts) == 3 and sum(p["bytes"] for p in parts) == int(2.5 * MIB) + 17
    commands = kit.plan(manifest, limit_mib=1.0, tree=tree)
    assert commands[0]["carry"] == ["manifest.json", "wheels"]  # the small files first, for the checks without TE
    assert [c["carry"][1:] for c in commands[1:]] == [[p["path"]] for p in parts]
    assert all(c["bytes"] + tree <= MIB for c in commands)
    # A bigger tree no longer fits the parts cut for the smaller one: the plan says so.
    with pytest.raises(kit.KitError, match=r"command 2 would carry .* MiB with the working tree, over the 1.0 MiB limit"):
        kit.plan(manifest, limit_mib=1.0, tree=400 * 1024)
    with pytest.raises(kit.KitError, match=r"the working tree alone is 2.0 MiB, over the 1.0 MiB limit"):
        kit.plan(manifest, limit_mib=1.0, tree=2 * MIB)


def test_join_verifies_every_part_and_names_what_is_missing_or_corrupt(tmp_path, downloads):
    kit = kit_module()
    folder = tmp_path / "kit"
    manifest = kit.prepare(downloads, folder, limit_mib=1.0, tree=0)
    big = next(f for f in manifest["files"] if f["parts"])
    original = hashlib.sha256((downloads / big["name"]).read_bytes()).hexdigest()

    first = folder / big["parts"][0]["path"]
    saved = first.read_bytes()
    first.unlink()
    report = kit.verify(folder)
    assert not report[big["name"]]["ready"] and report[big["name"]]["missing"] == [big["parts"][0]["path"]]
    assert report["a-1.0-py3-none-any.whl"]["ready"]
    with pytest.raises(kit.KitError, match=r"incomplete or corrupt.*missing \['parts/big_cu13.*part00'\]"):
        kit.join(folder, tmp_path / "joined")

    first.write_bytes(saved[:-1] + bytes([saved[-1] ^ 1]))  # one bit flipped
    with pytest.raises(kit.KitError, match=r"bad \['parts/big_cu13.*part00'\]"):
        kit.join(folder, tmp_path / "joined")
    assert not (tmp_path / "joined" / big["name"]).exists()

    first.write_bytes(saved)
    joined = {p.name: p for p in kit.join(folder, tmp_path / "joined")}
    assert hashlib.sha256(joined[big["name"]].read_bytes()).hexdigest() == original
    assert sorted(joined) == sorted(p.name for p in downloads.iterdir())


def test_prepare_and_plan_commands_print_the_calls_and_refuse_a_limit_the_tree_exceeds(tmp_path, downloads):
    def kit_cli(*args):
        return subprocess.run([sys.executable, str(KIT / "kit.py"), *args], capture_output=True, text=True)

    # room for every stand-in whole beside the working tree, whatever the tree's size now
    limit = f"{kit_module().tree_bytes() / MIB + 3.5:.2f}"
    done = kit_cli("prepare", str(downloads), "--kit", str(tmp_path / "kit"), "--limit-mib", limit)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert "run calls bring the kit over" in lines[0]
    assert json.loads(lines[1].split("carry=", 1)[1]) == [f"{tmp_path}/kit/manifest.json", f"{tmp_path}/kit/wheels"]
    assert kit_cli("plan", "--kit", str(tmp_path / "kit"), "--limit-mib", limit).stdout == done.stdout
    bad = kit_cli("plan", "--kit", str(tmp_path / "kit"), "--limit-mib", "0.01")
    assert bad.returncode == 1 and bad.stderr.startswith("kit.py plan: the working tree alone is")
    assert bad.stderr.count("\n") == 1
    assert kit_cli("plan", "--kit", str(tmp_path / "kit"), "--limit-mib", "65").returncode == 1


def test_kit_pins_are_the_tested_versions():
    def pins(path):
        out = {}
        for line in path.read_text().splitlines():
            line = line.split("#")[0].strip()
            if "==" in line:
                name, version = line.split("==")
                out[name.lower().replace("_", "-")] = version
        return out

    kit, tested = pins(KIT / "wheels.txt"), pins(ROOT / "requirements/tested.txt")
    shared = set(kit) & set(tested)
    assert {"megatron-core", "hydra-core", "omegaconf", "bpe-openai"} <= shared
    assert {name: kit[name] for name in shared} == {name: tested[name] for name in shared}
    te = {kit[n] for n in ("transformer-engine", "transformer-engine-cu13", "transformer-engine-torch")}
    assert len(te) == 1  # the extension must match its core library exactly


def as_on_the_machine(tmp_path, *args, timeout=300):
    """A command as bench/gpu/run.sh runs it on the GPU machine: its python3 with
    PYTHONPATH=<checkout>/src:<site folder>, nothing installed (no editable finder, no phi4.conf
    package); `-S` keeps this venv's .pth files out, as the machine's site folder has none."""
    site = sysconfig.get_paths()["purelib"]
    env = {"PYTHONPATH": f"{ROOT / 'src'}:{site}", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1",
           "HOME": str(tmp_path), "PHI4_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "-S", *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_the_kit_rehearsed_as_the_machine_runs_it(tmp_path):
    """Every entry point imports, the gpu tests collect (pytest_gpu's command), and the training
    check's command trains a step, in the machine's environment (the throughput script runs there
    too: the test below). A rehearsal inside the venv once hid an import that failed every check."""
    entries = re.findall(r'"(phi4-[\w-]+) = ([\w.]+):(\w+)"', (ROOT / "setup.py").read_text())
    assert len(entries) == 8
    code = "import importlib\n" + "".join(f"assert callable(importlib.import_module('{m}').{f}), '{n}'\n"
                                          for n, m, f in entries)
    imported = as_on_the_machine(tmp_path, "-c", code + "import phi4; print(phi4.conf_dir())")
    assert imported.returncode == 0, imported.stderr[-2000:]
    assert imported.stdout.split() == [str(ROOT / "conf")]
    collected = as_on_the_machine(tmp_path, "-m", "pytest", "-m", "gpu", "--collect-only", "-q", "tests")
    assert collected.returncode == 0, collected.stdout[-2000:] + collected.stderr[-2000:]
    gpu_tests = {line.split("::")[1].split("[")[0] for line in collected.stdout.splitlines() if "::" in line}
    assert {"test_te_spec_trains_in_fp8_close_to_bf16", "test_thd_packing_on_transformer_engine",
            "test_thd_partition_is_transformer_engines", "test_dpo_and_full_logits_run_on_cuda_and_under_fp8",
            "test_verification_on_a_gpu_compares_on_the_cpu"} <= gpu_tests, gpu_tests
    run_dir = tmp_path / "run"
    trained = as_on_the_machine(tmp_path, "launch/train.py", "train.steps=1", "optim.warmup_steps=0", "checkpoint.every=0",
                                "train.log_every=1", "train.valid_every=0", "eval.every=0", "model.hidden_size=64",
                                "model.ffn_hidden_size=224",
                                "train.seq_length=32", "train.global_batch_size=2", "train.micro_batch_size=2",
                                "data.synthetic.problems=300", "train.tensorboard=false", f"run_dir={run_dir}")
    assert trained.returncode == 0, trained.stdout[-2000:] + trained.stderr[-2000:]
    assert '"step": 1' in (run_dir / "metrics.jsonl").read_text()


def test_throughput_script_at_a_tiny_shape_on_the_cpu(tmp_path):
    """The figures the GPU run reports, computed by the same code at the tiny shape, run as the
    machine runs it: tokens/s from the step time, model TFLOP/s from phi4's FLOP count, MFU against
    the hardware file's bf16 peak, and phi4-plan's estimate for the same shape."""
    sys.path.insert(0, str(ROOT / "src"))
    from phi4.model.config import ModelConfig, PrecisionConfig, TopologyConfig
    from phi4.model.flops import flops_per_token
    from phi4.plan.estimate import estimate
    from phi4.settings import load_group
    from phi4.runtime.hardware import HardwareConfig
    from phi4.plan.spec import PlanSpec

    profile = tmp_path / "profile.txt"
    done = as_on_the_machine(tmp_path, str(KIT / "throughput.py"), "--shape", "tiny", "--backend", "local",
                             "--dtype", "fp32", "--hardware", "cpu", "--layers", "2", "--steps", "2", "--warmup", "1",
                             "--profile", str(profile), "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    r = json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])
    assert (r["layers"], r["seq"], r["micro_batch_size"], r["micro_batches"]) == (2, 64, 2, 2)
    tokens_per_step = 64 * 2 * 2
    assert r["tokens_per_s"] == pytest.approx(tokens_per_step / r["step_s"], rel=1e-9)
    model = ModelConfig.from_dict({**load_group("model", ROOT / "conf/model/phi4_tiny.yaml"),
                                   "num_layers": 2})
    assert r["model_tflops"] == pytest.approx(flops_per_token(model, 64) * r["tokens_per_s"] / 1e12, rel=1e-9)
    hardware = HardwareConfig.from_dict(load_group("hardware", ROOT / "conf/hardware/cpu.yaml"))
    assert r["mfu"] == pytest.approx(r["model_tflops"] / hardware.peak_tflops_bf16, rel=1e-9)
    plan = estimate(PlanSpec(model, TopologyConfig(), PrecisionConfig(dtype="fp32"), 1, 64, 2, 4), hardware)
    assert r["plan_tokens_per_s"] == pytest.approx(plan["tokens_per_s_per_gpu"], rel=1e-9)
    assert r["plan_memory_gb"] == pytest.approx(plan["memory_gb_per_gpu"], rel=1e-9)
    assert r["measured_over_plan"] == pytest.approx(r["tokens_per_s"] / plan["tokens_per_s_per_gpu"], rel=1e-9)
    assert len(r["losses"]) == 3 and all(l == l and l < 20 for l in r["losses"])  # finite, near ln(100352)
    assert "aten::mm" in profile.read_text()
    assert "tokens/s" in done.stdout and "measured/plan" in done.stdout


def test_throughput_script_refuses_a_bad_layer_count():
    done = subprocess.run([sys.executable, str(KIT / "throughput.py"), "--layers", "0"], capture_output=True, text=True)
    assert done.returncode == 2 and "--layers=0; valid: auto or a positive number" in done.stderr


def test_checks_record_once_wait_for_what_they_need_and_return_everything_to_out(tmp_path):
    """checks.py on this machine: `env` runs and is recorded; checks that need CUDA or Transformer
    Engine wait ("later"), and a check whose budget passes the deadline waits too; what comes back
    is results.jsonl, summary.txt and logs.tar.gz; a second call does not run `env` again."""
    import tarfile
    import time

    state, out = tmp_path / "state", tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "PHI4_TE_SITE"}

    def call(deadline_s):
        return subprocess.run([sys.executable, str(KIT / "checks.py"), "--state", str(state), "--out", str(out),
                               "--deadline", str(time.time() + deadline_s)], capture_output=True, text=True,
                              env=env, timeout=120)

    first = call(60)
    assert first.returncode == 0, first.stderr
    assert "[checks] env: running" in first.stdout
    assert "[checks] te_import: later (needs cuda, te)" in first.stdout
    results = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert [r["name"] for r in results] == ["env"]
    assert "env" in (out / "summary.txt").read_text()
    with tarfile.open(out / "logs.tar.gz") as tar:
        assert "logs/env.log" in tar.getnames()
    second = call(10)
    assert "[checks] env: running" not in second.stdout
    assert [json.loads(l)["name"] for l in (out / "results.jsonl").read_text().splitlines()] == ["env"]
    unknown = subprocess.run([sys.executable, str(KIT / "checks.py"), "--state", str(state), "--out", str(out),
                              "--deadline", "0", "--only", "nonsense"], capture_output=True, text=True)
    assert unknown.returncode == 2 and "unknown check(s) ['nonsense']; valid: env, " in unknown.stderr


def test_fp8_runs_are_compared_with_bf16_at_the_same_steps():
    spec = importlib.util.spec_from_file_location("gpu_checks", KIT / "checks.py")
    checks = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = checks  # its dataclasses look their module up
    spec.loader.exec_module(checks)
    assert checks.loss_gap([[10, 8.0], [20, 4.0]], [[10, 8.4], [20, 4.1], [30, 3.0]]) == pytest.approx(0.05)
    assert checks.loss_gap([[10, 8.0]], [[20, 4.0]]) is None


def test_the_bf16_reference_runs_before_every_fp8_check_and_call_six_measures_a_gap():
    """Every FP8 loss gap is measured against te_train_bf16, so it runs first among the TE checks;
    call 6 (--budget 360, bench/gpu/README.md) holds te_import, the bf16 and default-FP8 runs and the
    bf16 throughput."""
    spec = importlib.util.spec_from_file_location("gpu_checks_order", KIT / "checks.py")
    checks = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = checks
    spec.loader.exec_module(checks)
    names = [c.name for c in checks.checks(Path("/tmp/x"))]
    te = [c for c in checks.checks(Path("/tmp/x")) if "te" in c.needs]
    assert [c.name for c in te][:4] == ["te_import", "te_train_bf16", "te_train_tensorwise", "throughput_te_bf16"]
    fp8 = [n for n in names if any(r in n for r in ("tensorwise", "delayed", "blockwise", "mxfp8"))]
    assert all(names.index("te_train_bf16") < names.index(n) for n in fp8)
    assert sum(c.budget for c in te[:4]) <= 360
    assert "--budget 360" in (KIT / "README.md").read_text()
