"""phi4's import hook (src/phi4/__init__.py): where CUDA is absent, Megatron-Core's modules load with
torch.compile a no-op, said once in the log; PHI4_MEGATRON_TORCH_COMPILE=1 leaves it out.

Each check runs in a fresh interpreter (the venv's python): the hook is installed by the first
`import phi4`, and whether Megatron-Core's modules load with it is decided once per process.
torch.compile is replaced by a counting wrapper before phi4 is imported, so a module that gets
the real torch.compile while it loads shows up as calls to the wrapper.
"""

import json
import os
import subprocess
import sys

SCRIPT = """
import json, logging, sys

records = []


class Keep(logging.Handler):
    def emit(self, record):
        records.append(record.getMessage())


logging.getLogger("phi4").addHandler(Keep())
logging.getLogger("phi4").setLevel(logging.DEBUG)

import torch

real_compile = torch.compile
calls = []


def counting_compile(*args, **kwargs):
    calls.append(getattr(args[0], "__name__", repr(args[0])) if args else "options only")
    return real_compile(*args, **kwargs)


torch.compile = counting_compile

import phi4

hooks = [type(f).__qualname__ for f in sys.meta_path if type(f).__module__ == "phi4"]
import megatron.core.jit as jit  # jit_fuser = torch.compile, as the module loads
import megatron.core.activations  # @jit_fuser on its functions, as it loads

result = dict(
    hooks=hooks, calls=calls, jit_fuser=jit.jit_fuser.__name__,
    restored=torch.compile is counting_compile, logs=records, dynamo="torch._dynamo" in sys.modules,
    queried=phi4.torch_compile_hook() is not None,
)
result["removed"] = phi4.remove_torch_compile_hook()
result["removed_again"] = phi4.remove_torch_compile_hook()
result["hooks_after_removal"] = [type(f).__qualname__ for f in sys.meta_path if type(f).__module__ == "phi4"]
print(json.dumps(result))
"""


def run_script(**env) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "PHI4_MEGATRON_TORCH_COMPILE"}
    environ["CUDA_VISIBLE_DEVICES"] = ""  # no CUDA, on a GPU host too: where the hook acts
    environ.update(env)
    out = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=environ, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_megatron_loads_with_torch_compile_a_no_op_and_says_so():
    r = run_script()
    assert r["hooks"] == ["_MegatronWithoutTorchCompile"], r
    assert r["queried"], r
    # Neither megatron.core.jit's `jit_fuser = torch.compile` nor activations' @jit_fuser reached it.
    assert r["calls"] == [], r
    assert r["jit_fuser"] == "_no_op_compile", r
    assert not r["dynamo"], "torch's compiler stack was imported"
    assert r["restored"], "torch.compile was not put back after Megatron-Core's modules loaded"
    lines = [m for m in r["logs"] if "torch.compile" in m]
    assert len(lines) == 1, r["logs"]  # once per process, not once per module
    assert "no-op" in lines[0] and "PHI4_MEGATRON_TORCH_COMPILE=1" in lines[0], lines
    assert "megatron.core" in lines[0], lines
    # Removable, once.
    assert r["removed"] and not r["removed_again"] and r["hooks_after_removal"] == [], r


def test_the_switch_keeps_torch_compile():
    r = run_script(PHI4_MEGATRON_TORCH_COMPILE="1")
    assert r["hooks"] == [] and not r["queried"], r
    assert r["jit_fuser"] == "counting_compile", r
    assert {"squared_relu", "quick_gelu", "fast_gelu"} <= set(r["calls"]), r  # and other modules' functions
    assert r["dynamo"], "the real torch.compile did not run"
    assert r["restored"], r
    assert not [m for m in r["logs"] if "torch.compile" in m], r["logs"]
    assert not r["removed"], r
