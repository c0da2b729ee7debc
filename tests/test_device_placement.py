"""Tensors made in the code that runs on the accelerator carry the device of the data they meet.

A CPU tensor stacked with, subtracted from or reduced with a CUDA one is an error only on a GPU, so
the CPU suite cannot see it run (posttrain/dpo.py once stacked CUDA sums with a CPU count, and
convert/verify.py subtracted the Hugging Face model's CPU logits from GPU ones). This reads the
source instead: every torch factory call in the step, objective, checkpoint, evaluation, generation
and verification modules names its `device=`, is moved at once (`.put(...)`, `.to(...)`,
`.cuda(...)`), or says why it stays on the CPU in a `# on the CPU:` comment on its line or the one
before.
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "phi4"
CHECKED = [*sorted((SRC / "train").glob("*.py")), *sorted((SRC / "posttrain").glob("*.py")),
           *sorted((SRC / "eval").glob("*.py")), *sorted((SRC / "model").glob("*.py")),
           *sorted((SRC / "checkpoint").glob("*.py")), SRC / "convert" / "verify.py"]
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "full", "empty", "arange", "rand", "randn", "randint",
             "eye", "linspace"}
MOVES = {"put", "to", "cuda"}
REASON = "# on the CPU:"


def unplaced(source: str, name: str = "<source>") -> list[str]:
    """`name:line` of each torch factory call that neither names a device, nor is moved at once,
    nor gives a reason."""
    tree = ast.parse(source)
    lines = source.splitlines()
    parent = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        func = getattr(node, "func", None)
        if not (isinstance(node, ast.Call) and isinstance(func, ast.Attribute) and func.attr in FACTORIES
                and isinstance(func.value, ast.Name) and func.value.id == "torch"):
            continue
        if any(k.arg == "device" for k in node.keywords):
            continue
        outer = parent.get(node)
        if isinstance(outer, ast.Call) and isinstance(outer.func, ast.Attribute) and outer.func.attr in MOVES:
            continue  # device.current().put(torch.tensor(...)), torch.tensor(...).to(x)
        if isinstance(outer, ast.Attribute) and outer.attr in MOVES:
            continue
        if any(REASON in lines[i] for i in (node.lineno - 1, node.lineno - 2) if i >= 0):
            continue
        found.append(f"{name}:{node.lineno}")
    return sorted(found, key=lambda hit: int(hit.rsplit(":", 1)[1]))


def test_every_tensor_made_on_the_accelerators_path_names_its_device():
    assert len(CHECKED) > 30 and all(p.is_file() for p in CHECKED)
    found = [hit for path in CHECKED for hit in unplaced(path.read_text(), str(path.relative_to(SRC)))]
    assert not found, f"torch tensors made without a device (name it, move it, or say '{REASON} why'): {found}"


def test_the_check_finds_what_broke_dpo_on_a_gpu():
    before = ("report = torch.stack([s.sum() for s in sums] + [torch.tensor(float(k))])\n"
              "count = torch.tensor(k, dtype=torch.int)\n")
    assert unplaced(before) == ["<source>:1", "<source>:2"]
    after = ("report = torch.stack([s.sum() for s in sums] + [torch.tensor(float(k), device=s.device)])\n"
             "flag = device.current().put(torch.tensor([1.0]))\n"
             "# on the CPU: the reference model reads them there\n"
             "tokens = torch.randint(0, 10, (2, 3))\n")
    assert unplaced(after) == []
