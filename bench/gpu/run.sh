#!/usr/bin/env bash
# There, on the GPU machine (and here, as a rehearsal): bring in whatever part of the kit has
# arrived, and run every check that can run with it, in order of value, within --budget seconds.
# Called once per `run` call of the plan that bench/gpu/prepare.sh printed; each call picks up
# where the last stopped (the state lives in $KIT_STATE, which stays while the machine is held).
#
#   bench/gpu/run.sh [--budget SECONDS] [--only CHECK,...] [--rebuild]
#   (--rebuild: build transformer_engine_torch again, after a failed build was fixed)
#
# 1. Verifies the carried files against .gpu/manifest.json (sha256).
# 2. Once the small wheels are there: installs them (not Transformer Engine) into a temporary
#    site folder, and starts building transformer_engine_torch from its sdist against this
#    machine's torch, in the background (setsid: it outlives this call), logging to the state.
# 3. Once every part is there: joins and verifies the large wheels and installs Transformer
#    Engine (meta package, core library, the extension just built) in one pip call into a second
#    site folder, after waiting for the build.
# 4. Runs bench/gpu/checks.py: the checks whose needs are met and that fit the time left, each
#    under its own budget; figures and logs go to $OUT after each check, so a call stopped at its
#    limit still returns what it measured.
set -uo pipefail
cd "$(dirname "$0")/../.."
START=$(date +%s)
BUDGET=540
ONLY=""
REBUILD=0
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET="${2:?--budget needs seconds}"; shift 2 ;;
    --only) ONLY="${2:?--only needs check names}"; shift 2 ;;
    --rebuild) REBUILD=1; shift ;;
    *) echo "run.sh: unknown argument '$1'; valid: --budget SECONDS, --only CHECK,..., --rebuild" >&2; exit 2 ;;
  esac
done

PY=${PY:-python3}
KIT=${KIT_DIR:-.gpu}  # (another folder only for rehearsals)
STATE=${KIT_STATE:-/tmp/phi4-gpu-kit}
OUT=${OUT:-$STATE/out}
mkdir -p "$STATE/logs" "$OUT"
[ "$REBUILD" = 1 ] && rm -rf "$STATE"/te-build.* "$STATE/te-wheel" "$STATE/te-site.ok"
log() { echo "[run.sh +$(( $(date +%s) - START ))s] $*" | tee -a "$STATE/logs/run.log"; }
[ -f "$KIT/manifest.json" ] || { log "no $KIT/manifest.json here: carry it (bench/gpu/prepare.sh prints the calls)"; exit 2; }

SITE=$STATE/site          # megatron-core, hydra, bpe-openai, pydantic ...
TE_SITE=$STATE/te-site    # transformer_engine, its core library and the extension built here
PIP=("$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check)

ready() { "$PY" bench/gpu/kit.py verify --kit "$KIT" --need "$1" > "$STATE/verify.json" 2>>"$STATE/logs/run.log"; }
ready all; log "arrived: $("$PY" -c "import json; r=json.load(open('$STATE/verify.json')); print('; '.join(k.split('-')[0] + (' ok' if v['ready'] else ' missing %d bad %d' % (len(v['missing']), len(v['bad']))) for k, v in r.items()))")"

# Where this machine keeps CUDA and the cuDNN/NCCL headers that the extension includes.
cuda_home() {
  if [ -n "${CUDA_HOME:-}" ]; then echo "$CUDA_HOME"; return; fi
  if command -v nvcc >/dev/null; then dirname "$(dirname "$(readlink -f "$(command -v nvcc)")")"; return; fi
  if [ -d /usr/local/cuda ]; then echo /usr/local/cuda; return; fi
  # pip's CUDA headers (the image's cuda-toolkit package), as a last resort
  [ -f "$NVIDIA_SP/nvidia/cu13/include/cuda_runtime.h" ] && echo "$NVIDIA_SP/nvidia/cu13"
}
NVIDIA_SP=$("$PY" -c "import nvidia, os; print(os.path.dirname(list(nvidia.__path__)[0]))" 2>/dev/null || true)

# 2. The small wheels, and the extension's build in the background.
if [ ! -f "$STATE/site.ok" ] && ready whole; then
  SMALL=$(ls "$KIT"/wheels/*.whl | grep -v '/transformer_engine')
  rm -rf "$SITE" && "${PIP[@]}" --target "$SITE" $SMALL >> "$STATE/logs/run.log" 2>&1 \
    && touch "$STATE/site.ok" && log "installed $(echo $SMALL | wc -w) wheels into $SITE"
fi
SDIST=$(ls "$KIT"/wheels/transformer_engine_torch-*.tar.gz 2>/dev/null | head -1)
if [ -n "$SDIST" ] && [ -f "$STATE/site.ok" ] && [ ! -f "$STATE/te-build.started" ]; then
  CH=$(cuda_home)
  if [ -z "$CH" ]; then
    log "no CUDA toolkit found (nvcc, /usr/local/cuda or CUDA_HOME): transformer_engine_torch cannot be built"
  else
    touch "$STATE/te-build.started"
    log "building transformer_engine_torch in the background against torch $("$PY" -c 'import torch; print(torch.__version__)'), CUDA_HOME=$CH"
    mkdir -p "$STATE/te-wheel"
    CUDA_HOME=$CH CUDA_PATH=$CH CUDNN_PATH=$NVIDIA_SP/nvidia/cudnn PATH=$CH/bin:$PATH \
      CPATH=$NVIDIA_SP/nvidia/cudnn/include:$NVIDIA_SP/nvidia/nccl/include:$CH/include:$NVIDIA_SP/nvidia/cu13/include${CPATH:+:$CPATH} \
      NVTE_FRAMEWORK=pytorch NVTE_PYTORCH_FORCE_BUILD=TRUE MAX_JOBS=${MAX_JOBS:-$(( $(nproc) > 4 ? $(nproc) - 2 : $(nproc) ))} \
      setsid bash -c "start=\$(date +%s); if '$PY' -m pip wheel --no-deps --no-build-isolation --no-index -w '$STATE/te-wheel' '$SDIST'; then echo \$(( \$(date +%s) - start )) > '$STATE/te-build.ok'; else echo failed > '$STATE/te-build.failed'; fi" \
      > "$STATE/logs/te-build.log" 2>&1 < /dev/null &
  fi
fi

if [ -f "$STATE/te-build.started" ] && [ ! -f "$STATE/te-build.ok" ]; then
  log "transformer_engine_torch build: $( [ -f "$STATE/te-build.failed" ] && echo "FAILED (logs/te-build.log; fix, then --rebuild)" \
       || echo "running for $(( $(date +%s) - $(stat -c %Y "$STATE/te-build.started") )) s")"
fi

# 3. Transformer Engine, once every part has arrived and the extension is built.
if [ ! -f "$STATE/te-site.ok" ] && ready split; then
  while [ ! -f "$STATE/te-build.ok" ] && [ ! -f "$STATE/te-build.failed" ] && [ -f "$STATE/te-build.started" ] \
        && [ $(( $(date +%s) - START )) -lt $(( BUDGET / 2 )) ]; do sleep 5; done
  if [ -f "$STATE/te-build.ok" ]; then
    "$PY" bench/gpu/kit.py join --kit "$KIT" --out "$STATE/joined" >> "$STATE/logs/run.log" 2>&1 || log "join failed (see run.log)"
    rm -rf "$TE_SITE"
    if "${PIP[@]}" --target "$TE_SITE" "$STATE"/joined/transformer_engine-*.whl "$STATE"/joined/transformer_engine_cu13-*.whl \
         "$STATE"/te-wheel/transformer_engine_torch-*.whl >> "$STATE/logs/run.log" 2>&1; then
      touch "$STATE/te-site.ok"; log "Transformer Engine installed into $TE_SITE (extension built in $(cat "$STATE/te-build.ok") s)"
    else
      log "installing Transformer Engine failed (see run.log)"
    fi
  else
    log "transformer_engine_torch is not built yet ($( [ -f "$STATE/te-build.failed" ] && echo failed || echo still building); tail of its log:"
    tail -5 "$STATE/logs/te-build.log" | tee -a "$STATE/logs/run.log"
  fi
fi

# 4. The checks.
export PYTHONPATH=$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}
[ -f "$STATE/te-site.ok" ] && export PHI4_TE_SITE=$TE_SITE
export LD_LIBRARY_PATH=$NVIDIA_SP/nvidia/nccl/lib:$NVIDIA_SP/nvidia/cu13/lib:$NVIDIA_SP/nvidia/cudnn/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PYTHONUNBUFFERED=1
"$PY" bench/gpu/checks.py --state "$STATE" --out "$OUT" --deadline $(( START + BUDGET )) ${ONLY:+--only "$ONLY"}
