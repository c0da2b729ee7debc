"""The layering contract (docs/architecture.md): each package of src/phi4 imports only from its
own layer or lower ones, function-local imports included, and imports go at the top of modules
except optional packages (each such import named here with its reason) and lines marked
`# lazy: <reason>`."""

from __future__ import annotations

import ast
import shutil
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first; packages on one line are peers and may not import each other.
LAYERS = [
    ("phi4", "phi4.errors", "phi4.logs", "phi4.conf"),
    ("phi4.runtime",),
    ("phi4.model",),
    ("phi4.settings",),
    ("phi4.data",),
    ("phi4.checkpoint",),
    ("phi4.train",),
    ("phi4.eval", "phi4.convert", "phi4.plan"),
    ("phi4.posttrain",),
    ("phi4.cli",),
]

# Imported inside functions, and why.
OPTIONAL = {
    "transformer_engine": "the te backend and FP8 only: optional, and needs CUDA",
    "apex": "optional fused kernels; needs CUDA",
    "torch.utils.tensorboard": "only when train.tensorboard=true (and the tensorboard package is optional)",
    "transformers": "the Hugging Face reference and tokenizer export only (an extra)",
}


def _place(module: str) -> tuple[int, str]:
    """(layer index, package) of a phi4 module: the longest listed prefix."""
    best = None
    for index, packages in enumerate(LAYERS):
        for package in packages:
            if (module == package or module.startswith(package + ".")) and (best is None or len(package) > len(best[1])):
                best = (index, package)
    if best is None:
        raise AssertionError(f"{module} is in no layer of the contract: add its package to LAYERS")
    return best


def _modules(root: Path):
    for path in sorted(root.rglob("*.py")):
        name = ".".join(path.relative_to(root).with_suffix("").parts)
        yield name.removesuffix(".__init__"), path


def _imports(path: Path, module: str):
    """(line, imported module, inside a function) of every import in the file."""
    tree = ast.parse(path.read_text())
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]

    def walk(node, in_function):
        for child in ast.iter_child_nodes(node):
            inside = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                for alias in child.names:
                    yield child.lineno, alias.name, in_function
            elif isinstance(child, ast.ImportFrom):
                target = child.module or ""
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    target = ".".join(base + ([target] if target else []))
                yield child.lineno, target, in_function
                for alias in child.names:  # `from phi4 import settings` names a module too
                    if target == "phi4" or target.startswith("phi4."):
                        yield child.lineno, f"{target}.{alias.name}", in_function
            yield from walk(child, inside)

    yield from walk(tree, False)


def violations(root: Path) -> list[str]:
    """One line per offending import line."""
    found: dict[str, str] = {}
    for module, path in _modules(root):
        layer, package = _place(module)
        lines = path.read_text().splitlines()
        for line, target, in_function in _imports(path, module):
            where = f"{path.relative_to(root)}:{line}"
            if target == "phi4" or target.startswith("phi4."):
                try:
                    their_layer, their_package = _place(target)
                except AssertionError:
                    continue  # `from phi4.x import name` also yields phi4.x.name, a name and not a module
                if their_layer > layer:
                    found.setdefault(where, f"{where}: {module} (layer {package}) imports {target}, a higher layer")
                elif their_layer == layer and their_package != package and package != "phi4":
                    found.setdefault(where, f"{where}: {module} imports its peer {their_package}")
            elif in_function and not any(target == o or target.startswith(o + ".") for o in OPTIONAL) \
                    and "# lazy:" not in lines[line - 1]:
                found.setdefault(where, f"{where}: {module} imports {target} inside a function: move it to the top "
                                        "(or mark the line `# lazy: <reason>`)")
            if in_function and (target == "phi4" or target.startswith("phi4.")) and "# lazy:" not in lines[line - 1]:
                found.setdefault(where, f"{where}: {module} imports {target} inside a function: move it to the top")
    return list(found.values())


def test_src_keeps_its_layers():
    assert violations(SRC) == []


@pytest.mark.parametrize("source", [
    "from phi4.train.trainer import Trainer\n",
    "def f():\n    from phi4.posttrain import dpo\n    return dpo\n",
    "def f():\n    import numpy\n    return numpy\n",
])
def test_the_contract_refuses_an_upward_or_hidden_import(tmp_path, source):
    """The same check over a copy of src/phi4 with one line added to the model layer fails."""
    copy = tmp_path / "src"
    shutil.copytree(SRC / "phi4", copy / "phi4")
    (copy / "phi4" / "model" / "added.py").write_text(source)
    found = violations(copy)
    assert len(found) == 1 and found[0].startswith("phi4/model/added.py:"), found
