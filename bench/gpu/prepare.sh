#!/usr/bin/env bash
# Here, on the CPU machine: fetch every package the GPU machine lacks (bench/gpu/wheels.txt) for
# CPython 3.12 on manylinux x86_64, cut the large ones into parts, write .gpu/manifest.json with
# sha256 sums, and print the `run` calls that carry the kit over, failing if any would carry more
# than the limit (60 MiB by default) with the working tree. Re-running starts from a clean .gpu/.
#
#   bench/gpu/prepare.sh [--limit-mib 60]
set -euo pipefail
cd "$(dirname "$0")/../.."
LIMIT=60
while [ $# -gt 0 ]; do
  case "$1" in
    --limit-mib) LIMIT="${2:?--limit-mib needs a number of MiB}"; shift 2 ;;
    *) echo "prepare.sh: unknown argument '$1'; valid: --limit-mib N" >&2; exit 2 ;;
  esac
done

KIT=.gpu
DL=$KIT/downloads
git check-ignore -q "$KIT/" || { echo "prepare.sh: $KIT/ is not git-ignored; add '/$KIT/' to .gitignore" >&2; exit 1; }
# The sdist of transformer_engine_torch imports torch while pip reads its metadata: use the
# project's venv (make setup), which has torch.
make setup >/dev/null
PIP=(quiet_pip .venv/bin/python -m pip)
rm -rf "$DL" && mkdir -p "$DL"
# pip's warnings about this machine's unused local indexes are noise here; its errors are not.
quiet_pip() { "$@" 2> >(grep -v "^WARNING: Location '.*' is ignored" >&2); }

PLATFORMS=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
  PLATFORMS+=(--platform "$p")
done
mapfile -t WANTED < <(grep -vE '^\s*(#|$)' bench/gpu/wheels.txt)
BINARY=() SOURCE=()
for req in "${WANTED[@]}"; do
  case "${req%%==*}" in
    transformer-engine-torch) SOURCE+=("$req") ;;          # built there, against its torch
    antlr4-python3-runtime) SOURCE+=("$req") ;;            # pure Python, no wheel on PyPI
    *) BINARY+=("$req") ;;
  esac
done

echo "== downloading ${#BINARY[@]} wheels for cp312 manylinux x86_64"
"${PIP[@]}" download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --abi cp312 --abi abi3 --abi none "${PLATFORMS[@]}" --platform any -d "$DL" "${BINARY[@]}"
for req in "${SOURCE[@]}"; do
  if [ "${req%%==*}" = antlr4-python3-runtime ]; then
    echo "== building a wheel of $req (pure Python)"
    "${PIP[@]}" wheel --quiet --no-deps -w "$DL" "$req"
  else
    echo "== downloading the sdist of $req"
    "${PIP[@]}" download --quiet --no-deps --no-binary=:all: --no-build-isolation -d "$DL" "$req"
  fi
done
echo "== splitting and writing $KIT/manifest.json"
ls -l "$DL" | awk 'NR > 1 {printf "   %10.1f MiB  %s\n", $5 / 1048576, $9}'
.venv/bin/python bench/gpu/kit.py prepare "$DL" --kit "$KIT" --limit-mib "$LIMIT"
rm -rf "$DL"
