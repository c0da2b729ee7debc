"""Run console scripts as a wheel installed with only its declared dependencies would: every
module of an installed distribution outside the closure of `Requires-Dist` (extras left out)
fails to import, as if it were not installed. Cheaper than a fresh venv (torch is 5.5 GB) and
exact about which distribution a module belongs to.

    python only_declared.py DIST '[["phi4-convert", ["hf-to-mcore", ...]], ...]'

prints one JSON line: each command's exit code, and the first module it could not import.
"""

from __future__ import annotations

import importlib.abc
import importlib.metadata as md
import importlib.util
import json
import os
import re
import sys
from importlib.machinery import PathFinder

from packaging.requirements import Requirement


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def closure(dist: str) -> set[str]:
    """`dist` and every distribution its requirements (without extras) reach."""
    seen, todo = set(), [dist]
    while todo:
        name = _canonical(todo.pop())
        if name in seen:
            continue
        seen.add(name)
        try:
            requires = md.requires(name) or []
        except md.PackageNotFoundError:
            continue  # an optional platform dependency that is not installed here
        for line in requires:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                todo.append(req.name)
    return seen


def _importer() -> str:
    """The module whose code asked for the import being resolved (past importlib's own frames)."""
    frame = sys._getframe(2)
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen importlib")
                                 or frame.f_globals.get("__name__", "").startswith("importlib")):
        frame = frame.f_back
    return frame.f_globals.get("__name__", "") if frame is not None else ""


class Undeclared(importlib.abc.MetaPathFinder):
    """Every undeclared distribution's modules fail to import. The first that phi4's own code asked
    for is recorded (a soft fallback in phi4 hides a missing dependency); another library's probe
    of an optional package it can do without (Megatron-Core's timers try `import wandb`) is only
    refused, as it would be in a wheel installed with its declared dependencies."""

    def __init__(self, blocked: dict[str, list[str]]):
        self.blocked, self.first = blocked, None
        # where each blocked module's distribution is installed (a site-packages directory)
        self.homes = {top: {os.path.realpath(md.distribution(d).locate_file("")) for d in dists}
                      for top, dists in blocked.items()}

    def find_spec(self, fullname, path=None, target=None):
        top = fullname.partition(".")[0]
        if top in self.blocked and fullname != top and top in sys.modules:
            return None  # the package itself was allowed: a copy vendored by a declared distribution
        if top in self.blocked and fullname == top:
            # A declared distribution's own copy (setuptools vendors more_itertools on a path it adds)
            # is what an install without the undeclared distribution would import.
            elsewhere = [p for p in sys.path if os.path.realpath(p or ".") not in self.homes[top]]
            spec = PathFinder.find_spec(fullname, elsewhere)
            if spec is not None:
                return spec
        if top in self.blocked:
            importer = _importer()
            if importer == "phi4" or importer.startswith("phi4."):
                self.first = self.first or f"{top} (from {', '.join(self.blocked[top])})"
            raise ModuleNotFoundError(f"No module named {top!r} (not a declared dependency)", name=top)
        return None


def _probe_as_missing(finder: Undeclared):
    """importlib.util.find_spec of an undeclared top-level module answers None, as it does where the
    module is not installed (transformers probes for accelerate so), instead of raising."""
    real = importlib.util.find_spec

    def find_spec(name, package=None):
        try:
            return real(name, package)
        except ModuleNotFoundError:
            if "." in name or name not in finder.blocked:
                raise
            return None

    importlib.util.find_spec = find_spec


def main() -> None:
    dist, commands = sys.argv[1], json.loads(sys.argv[2])
    allowed = closure(dist)
    blocked = {top: dists for top, dists in md.packages_distributions().items()
               if not any(_canonical(d) in allowed for d in dists) and top not in sys.modules}
    finder = Undeclared(blocked)
    sys.meta_path.insert(0, finder)
    _probe_as_missing(finder)
    scripts = {ep.name: ep for ep in md.entry_points(group="console_scripts")}
    results = []
    for name, args in commands:
        sys.argv = [name, *args]
        try:
            code = scripts[name].load()() or 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else 1
        except ImportError as err:
            code = f"ImportError: {err}"
        results.append(dict(command=name, args=args, code=code, undeclared=finder.first))
        finder.first = None
    print(json.dumps(results))


if __name__ == "__main__":
    main()
