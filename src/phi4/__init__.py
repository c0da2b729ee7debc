"""phi4-megatron: a Phi-4-class training stack on Megatron-Core.

Importing the package is cheap and needs neither a GPU nor Transformer Engine nor apex; the
heavy modules are imported where they are used.

Importing it also installs one import hook, `_MegatronWithoutTorchCompile`, at the front of
`sys.meta_path`: where CUDA is absent, Megatron-Core's modules load with torch.compile a no-op
(about 3 s of every CPU process's start-up; see the class). It logs once per process, at INFO on
the "phi4" logger, the first time it does so. Switches:

- `PHI4_MEGATRON_TORCH_COMPILE=1` (any value but empty or 0), read when phi4 is first imported:
  the hook is not installed and torch.compile stays as it is while Megatron-Core loads.
- `torch_compile_hook()` returns the installed hook (or None); `remove_torch_compile_hook()`
  takes it out of `sys.meta_path` (modules already loaded keep what they were loaded with).
"""
import importlib.abc
import importlib.machinery
import importlib.util
import logging
import os
import sys
from importlib.resources import files
from pathlib import Path

__version__ = "0.1.0"

log = logging.getLogger("phi4")

# Set (to anything but "" or "0") before phi4 is imported: Megatron-Core keeps torch.compile.
KEEP_TORCH_COMPILE = "PHI4_MEGATRON_TORCH_COMPILE"


def conf_dir() -> str:
    """The Hydra configs' folder, found through the installed package phi4.conf: the checkout's
    conf/ under an editable install, the wheel's copy otherwise. A checkout put on PYTHONPATH
    (`PYTHONPATH=<checkout>/src`, as the GPU kit runs it, with no install) has no package phi4.conf:
    its conf/ beside src/ is the one."""
    if importlib.util.find_spec("phi4.conf") is not None:
        return str(files("phi4.conf"))
    checkout = Path(__file__).resolve().parents[2] / "conf"
    if (checkout / "train.yaml").is_file():
        return str(checkout)
    raise ModuleNotFoundError("phi4's configs are neither installed (the package phi4.conf) nor beside this "
                              f"checkout's src/ ({checkout}): install phi4-megatron, or run from a checkout")


def _no_op_compile(model=None, **options):
    """torch.compile as a decorator that changes nothing (with or without options)."""
    return model if model is not None else _no_op_compile


class _MegatronWithoutTorchCompile(importlib.abc.MetaPathFinder):
    """Loads Megatron-Core's modules with torch.compile as a no-op where CUDA is absent.

    Megatron-Core applies torch.compile when its modules load (its JIT fuser, megatron.core.jit, and
    the MoE router); each use imports torch's whole compiler stack, about 3 s of every process's
    start on a 2-core machine. The functions it compiles are CUDA fusions that the CPU backend turns
    off (phi4.model.build) and MoE routing, which Phi-4 does not use; on the CPU they run as written.
    With CUDA, nothing changes. torch.compile is put back as soon as each module has loaded.
    Not installed when PHI4_MEGATRON_TORCH_COMPILE is set (see the package's docstring).
    """

    logged = False  # the one log line of the process

    def find_spec(self, name, path=None, target=None):
        if not (name == "megatron.core" or name.startswith("megatron.core.")):
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or not isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            return spec
        run = spec.loader.exec_module

        def exec_module(module):
            torch = importlib.import_module("torch")
            if torch.cuda.is_available() or torch.compile is _no_op_compile:
                return run(module)
            if not _MegatronWithoutTorchCompile.logged:
                _MegatronWithoutTorchCompile.logged = True
                log.info(f"torch.compile is a no-op while Megatron-Core's modules load (no CUDA; first "
                         f"{module.__name__}); {KEEP_TORCH_COMPILE}=1 keeps it")
            compile_, torch.compile = torch.compile, _no_op_compile
            try:
                run(module)
            finally:
                torch.compile = compile_

        spec.loader.exec_module = exec_module
        return spec


def torch_compile_hook() -> "_MegatronWithoutTorchCompile | None":
    """The import hook in sys.meta_path, or None (switched off by PHI4_MEGATRON_TORCH_COMPILE, or removed)."""
    return next((finder for finder in sys.meta_path if isinstance(finder, _MegatronWithoutTorchCompile)), None)


def remove_torch_compile_hook() -> bool:
    """Take the import hook out of sys.meta_path: Megatron-Core's modules loaded from now on keep
    torch.compile (those already loaded keep what they were loaded with). True if it was there."""
    hook = torch_compile_hook()
    if hook is None:
        return False
    sys.meta_path.remove(hook)
    return True


if os.environ.get(KEEP_TORCH_COMPILE, "").strip() in ("", "0") and torch_compile_hook() is None:
    sys.meta_path.insert(0, _MegatronWithoutTorchCompile())
