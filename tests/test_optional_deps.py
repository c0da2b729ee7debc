"""phi4 imports and the local spec builds with neither Transformer Engine nor apex."""

import importlib.util
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
    "phi4.model.schedule",
    "phi4.checkpoint.run",
    "phi4.train.trainer",
    "phi4.posttrain.dpo",
    "phi4.cli.train_job",
]


def test_import_phi4_loads_no_gpu_library():
    code = (
        "import sys\n"
        f"for name in {MODULES!r}: __import__(name)\n"
        "import phi4.model.spec as spec; spec.phi4_layer_spec('local')\n"
        "print(sorted(m for m in ('transformer_engine', 'apex') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


@pytest.mark.skipif(importlib.util.find_spec("transformer_engine") is not None, reason="Transformer Engine is installed")
def test_te_backend_without_te_is_a_clear_error():
    from phi4.errors import ConfigError
    from phi4.model.spec import phi4_layer_spec

    with pytest.raises(ConfigError, match=r"model.backend=te needs Transformer Engine.*or use model.backend=local"):
        phi4_layer_spec("te")
