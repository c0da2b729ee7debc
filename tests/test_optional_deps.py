"""phi4 imports and the local spec builds with neither Transformer Engine nor apex."""

import importlib.util
import json
import subprocess
import sys

import pytest

MODULES = [
    "phi4",
    "phi4.errors",
    "phi4.model.config",
    "phi4.model.validate",
    "phi4.model.build",
    "phi4.model.spec",
    "phi4.model.norm",
    "phi4.model.hf_weights",
    "phi4.runtime.launch_env",
    "phi4.runtime.distributed",
    "phi4.runtime.cpu",
    "phi4.runtime.device",
    "phi4.model.pipeline_schedule",
    "phi4.checkpoint.run",
    "phi4.train.trainer",
    "phi4.posttrain.dpo",
    "phi4.cli.train_job",
]


@pytest.fixture(scope="module")
def imported():
    """Every module above imported in a fresh process, and the local spec built: what got loaded."""
    code = (
        "import json, sys\n"
        f"for name in {MODULES!r}: __import__(name)\n"
        "import phi4.model.spec as spec; spec.phi4_layer_spec('local')\n"
        "import torch, megatron.core.jit as jit\n"
        "print(json.dumps(dict(gpu=sorted(m for m in ('transformer_engine', 'apex') if m in sys.modules),\n"
        "    cuda=torch.cuda.is_available(), inductor='torch._inductor.compile_fx' in sys.modules,\n"
        "    compile=torch.compile.__module__, jit_fuser=jit.jit_fuser.__qualname__)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_import_phi4_loads_no_gpu_library(imported):
    assert imported["gpu"] == []


def test_megatron_loads_without_torch_compile_where_cuda_is_absent(imported):
    """phi4's import hook: Megatron-Core's modules load with torch.compile a no-op on the CPU (its
    fused functions run as written), so torch's compiler stack is never imported; torch.compile
    itself is left as it was."""
    if imported["cuda"]:
        assert imported["jit_fuser"] == "compile", imported  # with CUDA nothing changes
        return
    assert imported["jit_fuser"] == "_no_op_compile" and not imported["inductor"], imported
    assert imported["compile"] == "torch", imported


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="Transformer Engine is installed")
def test_te_backend_without_te_is_a_clear_error():
    from phi4.errors import ConfigError
    from phi4.model.spec import phi4_layer_spec

    with pytest.raises(ConfigError, match=r"model.transformer_impl=te needs Transformer Engine.*or use model.transformer_impl=local"):
        phi4_layer_spec("te")


def test_a_checkout_on_pythonpath_finds_its_configs(tmp_path):
    """As the GPU kit runs phi4 (bench/gpu/run.sh: the machine's python3, PYTHONPATH=<checkout>/src
    plus a --target site, no install, so no editable finder and no package phi4.conf): phi4's
    configs are the checkout's conf/, and Hydra composes phi4-train's config from them. `-S` keeps the
    venv's .pth files (the editable install's finder) out, as a --target site has none."""
    import sysconfig
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    site = sysconfig.get_paths()["purelib"]
    code = ("import phi4, phi4.settings\n"
            "from hydra import compose, initialize_config_dir\n"
            "with initialize_config_dir(config_dir=phi4.conf_dir(), version_base=None):\n"
            "    cfg = compose('train', overrides=['stage=pretrain'])\n"
            "print(phi4.conf_dir(), cfg.stage.name)\n")
    out = subprocess.run([sys.executable, "-S", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                         env={"PYTHONPATH": f"{root / 'src'}:{site}", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [str(root / "conf"), "pretrain"]
