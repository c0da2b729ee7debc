"""The GPU kit's files: split the wheels into carries that fit the device tool, and join and verify
them on the GPU machine. Standard library only: it runs under any Python 3 on either machine.

    python3 bench/gpu/kit.py prepare DOWNLOADS [--kit .gpu] [--limit-mib 60]   # here
    python3 bench/gpu/kit.py plan [--kit .gpu] [--limit-mib 60]                # here
    python3 bench/gpu/kit.py join [--kit .gpu] --out DIR                       # there

The kit folder (git-ignored, so it travels only where a `run` call's `carry` names it):
  wheels/          every file small enough to travel whole (wheels and sdists)
  parts/           the large files, each cut into equal parts named NAME.partNN
  manifest.json    each file's size and sha256, and its parts' sizes and sha256s
A `run` call carries the working tree (tracked and untracked-not-ignored files) plus what it
names; the device tool takes at most 64 MiB, and this kit keeps every command under a stricter
limit (60 MiB by default) so that a grown working tree does not break the plan.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

MIB = 1024 * 1024
ROOT = Path(__file__).resolve().parents[2]
MANIFEST = "manifest.json"
MAX_CARRY_PATHS = 8  # the device tool's limit per call


class KitError(Exception):
    """One line for the user: what is wrong and what would be valid."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 * MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def tree_bytes(root: Path = ROOT) -> int:
    """What every `run` call sends anyway: tracked and untracked-not-ignored files (and a
    `shared/` folder inside the checkout, which travels too)."""
    names = subprocess.run(["git", "ls-files", "-z", "-co", "--exclude-standard"], cwd=root,
                           capture_output=True, check=True).stdout.split(b"\0")
    total = sum((root / n.decode()).stat().st_size for n in names if n and (root / n.decode()).is_file())
    shared = root / "shared"
    if shared.is_dir():
        total += sum(p.stat().st_size for p in shared.rglob("*") if p.is_file())
    return total


def budget_bytes(limit_mib: float, tree: int) -> int:
    """Bytes a command may carry besides the tree and the manifest."""
    budget = int(limit_mib * MIB) - tree - 64 * 1024
    if budget <= 0:
        raise KitError(f"the working tree alone is {tree / MIB:.1f} MiB, over the {limit_mib} MiB limit per command")
    return budget


def split_file(path: Path, parts_dir: Path, parts: int) -> list[dict]:
    """Cut `path` into `parts` files of equal size (the last may be shorter)."""
    size = path.stat().st_size
    part_size = math.ceil(size / parts)
    parts_dir.mkdir(parents=True, exist_ok=True)
    out = []
    with open(path, "rb") as src:
        for i in range(parts):
            target = parts_dir / f"{path.name}.part{i:02d}"
            with open(target, "wb") as dst:
                remaining = part_size
                while remaining:
                    block = src.read(min(4 * MIB, remaining))
                    if not block:
                        break
                    dst.write(block)
                    remaining -= len(block)
            out.append(dict(path=str(target.relative_to(parts_dir.parent)), bytes=target.stat().st_size,
                            sha256=sha256(target)))
    return out


def prepare(downloads: Path, kit: Path, limit_mib: float, tree: int) -> dict:
    """Move what `downloads` holds into the kit: small files whole, large ones in parts sized so
    that one part and the tree fit one command. Writes and returns the manifest."""
    files = sorted((p for p in downloads.iterdir() if p.is_file()), key=lambda p: (p.stat().st_size, p.name))
    if not files:
        raise KitError(f"{downloads} holds no files to carry")
    budget = budget_bytes(limit_mib, tree)
    for sub in ("wheels", "parts"):
        shutil.rmtree(kit / sub, ignore_errors=True)
    (kit / "wheels").mkdir(parents=True)
    entries, whole = [], 0
    for path in files:  # smallest first: as many whole files as fit the first command
        entry = dict(name=path.name, bytes=path.stat().st_size, sha256=sha256(path), parts=None)
        if whole + entry["bytes"] <= budget:
            whole += entry["bytes"]
            shutil.copy2(path, kit / "wheels" / path.name)
        else:
            entry["parts"] = split_file(path, kit / "parts", math.ceil(entry["bytes"] / budget))
        entries.append(entry)
    manifest = dict(limit_mib=limit_mib, files=entries)
    (kit / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def plan(manifest: dict, limit_mib: float, tree: int) -> list[dict]:
    """The `run` calls that bring the kit over, in order: the first carries every small file (so
    that checks without Transformer Engine can start), then the parts, packed in order. Each
    also carries the manifest. Raises KitError when a command would exceed the limit."""
    budget = budget_bytes(limit_mib, tree)
    small = sum(f["bytes"] for f in manifest["files"] if not f["parts"])
    commands = [dict(carry=[MANIFEST, "wheels"], bytes=small)]
    for f in manifest["files"]:
        for part in f["parts"] or []:
            last = commands[-1]
            if last["bytes"] + part["bytes"] > budget or len(last["carry"]) >= MAX_CARRY_PATHS:
                last = dict(carry=[MANIFEST], bytes=0)
                commands.append(last)
            last["carry"].append(part["path"])
            last["bytes"] += part["bytes"]
    for i, command in enumerate(commands, 1):
        command["total_mib"] = (command["bytes"] + tree) / MIB
        if command["total_mib"] > limit_mib:
            raise KitError(f"command {i} would carry {command['total_mib']:.1f} MiB with the working tree, over "
                           f"the {limit_mib} MiB limit; re-run prepare (its parts follow the tree's size)")
    return commands


def format_plan(commands: list[dict], kit: str, tree: int) -> str:
    lines = [f"working tree: {tree / MIB:.2f} MiB; {len(commands)} run calls bring the kit over:"]
    for i, command in enumerate(commands, 1):
        carry = [f"{kit}/{c}" for c in command["carry"]]
        lines.append(f"  {i}. {command['total_mib']:5.1f} MiB  carry={json.dumps(carry)}")
    return "\n".join(lines)


def verify(kit: Path) -> dict:
    """What has arrived: per file, `ready` (whole and matching), `missing` parts, `bad` parts."""
    manifest = json.loads((kit / MANIFEST).read_text())
    report = {}
    for f in manifest["files"]:
        if not f["parts"]:
            path = kit / "wheels" / f["name"]
            ok = path.is_file() and path.stat().st_size == f["bytes"] and sha256(path) == f["sha256"]
            report[f["name"]] = dict(ready=ok, missing=[] if path.is_file() else [str(path)],
                                     bad=[] if ok or not path.is_file() else [str(path)])
            continue
        missing, bad = [], []
        for part in f["parts"]:
            path = kit / part["path"]
            if not path.is_file():
                missing.append(part["path"])
            elif path.stat().st_size != part["bytes"] or sha256(path) != part["sha256"]:
                bad.append(part["path"])
        report[f["name"]] = dict(ready=not missing and not bad, missing=missing, bad=bad)
    return report


def join(kit: Path, out: Path) -> list[Path]:
    """Every file of the kit, whole and checked, in `out`; a KitError names what is missing or
    corrupt. A joined file appears under its name only once its sha256 matched."""
    manifest = json.loads((kit / MANIFEST).read_text())
    out.mkdir(parents=True, exist_ok=True)
    report = verify(kit)
    problems = [f"{name}: missing {r['missing']} bad {r['bad']}" for name, r in report.items() if not r["ready"]]
    if problems:
        raise KitError("the kit is incomplete or corrupt (carry the parts named; re-run prepare.sh if bad): "
                       + "; ".join(problems))
    joined = []
    for f in manifest["files"]:
        target = out / f["name"]
        if target.is_file() and target.stat().st_size == f["bytes"] and sha256(target) == f["sha256"]:
            joined.append(target)
            continue
        if not f["parts"]:
            shutil.copy2(kit / "wheels" / f["name"], target)
        else:
            partial = target.with_name(target.name + ".joining")
            with open(partial, "wb") as dst:
                for part in f["parts"]:
                    with open(kit / part["path"], "rb") as src:
                        shutil.copyfileobj(src, dst, 4 * MIB)
            if sha256(partial) != f["sha256"]:
                partial.unlink()
                raise KitError(f"{f['name']}: the joined parts do not match its sha256; re-run prepare.sh")
            os.replace(partial, target)
        joined.append(target)
    return joined


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("prepare", "plan", "join", "verify"):
        p = sub.add_parser(name)
        p.add_argument("--kit", default=".gpu", help="the kit folder, relative to the repository root")
        p.add_argument("--limit-mib", type=float, default=60.0)
        if name == "prepare":
            p.add_argument("downloads", type=Path)
        if name == "join":
            p.add_argument("--out", type=Path, required=True)
        if name == "verify":
            p.add_argument("--need", choices=("whole", "split", "all"), default="all",
                           help="exit 0 only if these files are ready: the whole ones, the split ones, or all")
    args = parser.parse_args(argv)
    kit = ROOT / args.kit
    try:
        if args.command in ("prepare", "plan"):
            if not 0 < args.limit_mib <= 64:
                raise KitError(f"--limit-mib={args.limit_mib}; valid: (0, 64], the device tool's limit")
            tree = tree_bytes()
            manifest = (prepare(args.downloads, kit, args.limit_mib, tree) if args.command == "prepare"
                        else json.loads((kit / MANIFEST).read_text()))
            print(format_plan(plan(manifest, args.limit_mib, tree), args.kit, tree))
        elif args.command == "verify":
            report = verify(kit)
            print(json.dumps(report, indent=1))
            split = {f["name"] for f in json.loads((kit / MANIFEST).read_text())["files"] if f["parts"]}
            needed = [r["ready"] for name, r in report.items()
                      if args.need == "all" or (name in split) == (args.need == "split")]
            return 0 if all(needed) else 1
        else:
            for path in join(kit, args.out):
                print(path)
    except (KitError, FileNotFoundError) as err:
        print(f"kit.py {args.command}: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
