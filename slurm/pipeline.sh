#!/usr/bin/env bash
# Submit the Phi-4 chain: pretrain -> midtrain -> sft -> pts -> dpo, each an sbatch job that
# starts when the one before has completed (--dependency=afterok) from that stage's final
# checkpoint, and prints the job ids.
#
#   slurm/pipeline.sh [--cluster NAME|FILE] [--runs DIR] [--stages "sft pts dpo"] [--after JOBID] [--dry-run]
#
# --cluster   conf/cluster/<NAME>.yaml (partition, account, GPUs, time limit, setup, each stage's
#             nodes and Hydra overrides); default h100
# --runs      root of the stages' run directories (default: the cluster file's `runs`)
# --stages    a suffix of the chain to submit (the earlier stages' run directories must exist)
# --after     make the first submitted stage wait for this job
# --dry-run   print the sbatch commands instead of submitting them
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(dirname "$here")"
cluster=h100 runs="" stages="pretrain midtrain sft pts dpo" after="" dry=0
while [ $# -gt 0 ]; do
    case "$1" in
        --cluster|--runs|--stages|--after)
            [ $# -ge 2 ] && [ -n "$2" ] || { echo "pipeline: error: $1 needs a value (see --help)" >&2; exit 2; }
            case "$1" in
                --cluster) cluster="$2" ;; --runs) runs="$2" ;; --stages) stages="$2" ;; --after) after="$2" ;;
            esac
            shift 2 ;;
        --dry-run) dry=1; shift ;;
        -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
        *) echo "pipeline: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
done
python="${PHI4_PYTHON:-}"
if [ -z "$python" ]; then
    if [ -x "$root/.venv/bin/python" ]; then python="$root/.venv/bin/python"; else python=python3; fi
fi
# The whole chain is checked before anything is queued: names, order, the runs it reads, the cluster file.
check=("$cluster" --check "$stages")
[ -n "$runs" ] && check+=(--runs "$runs")
[ -n "$after" ] && check+=(--after "$after")
(cd "$root" && "$python" -m phi4.runtime.cluster "${check[@]}") || exit 2
for stage in $stages; do
    args=("$cluster" "$stage")
    [ -n "$runs" ] && args+=(--runs "$runs")
    [ -n "$after" ] && args+=(--after "$after")
    settings="$(cd "$root" && "$python" -m phi4.runtime.cluster "${args[@]}")" || exit 2
    eval "$settings"
    if [ "$dry" = 1 ]; then
        echo "sbatch ${SBATCH_OPTIONS[*]} $here/stage.sbatch ${STAGE_COMMAND[*]}"
        after="<$stage>"
        continue
    fi
    mkdir -p "$(dirname "$STAGE_RUN_DIR")/logs"
    job="$(sbatch --parsable "${SBATCH_OPTIONS[@]}" "$here/stage.sbatch" "${STAGE_COMMAND[@]}")"
    job="${job%%;*}"  # --parsable prints "id" or "id;cluster"
    echo "$stage: job $job -> $STAGE_RUN_DIR"
    after="$job"
done
