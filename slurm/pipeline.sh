#!/usr/bin/env bash
# Submit the stages of an embedscale pipeline as dependent SLURM jobs: a stage starts only when the one
# before it ended OK (afterok); each job runs `embedscale pipeline pipeline.only=[<stage>]`, so every stage
# directory gets its lineage.json exactly as in a local run, and a finished stage is skipped on resubmission.
#
#   slurm/pipeline.sh OUT_DIR STAGE [STAGE ...] [-- PIPELINE_OVERRIDES ...]
#   slurm/pipeline.sh runs/iter1 round1 mine1 round2 -- recipe=iterative
#   SBATCH_ARGS="--gpus-per-node=1 --time=8:00:00" slurm/pipeline.sh runs/iter1 round1 mine1 round2
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,9p' "$0"; exit 2; }
here=$(cd "$(dirname "$0")" && pwd)
out=$(mkdir -p "$1" && cd "$1" && pwd); shift
stages=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do stages+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
prev=""
for stage in "${stages[@]}"; do
  # shellcheck disable=SC2086  # SBATCH_ARGS is a list of options
  prev=$(sbatch --parsable ${prev:+--dependency=afterok:$prev} --kill-on-invalid-dep=yes \
    --job-name="es-$stage" --output="$out/slurm-$stage-%j.out" --export="ALL,STAGE=$stage,OUT=$out" \
    ${SBATCH_ARGS:-} "$here/stage.sbatch" "$@")
  prev=${prev%%;*}
  echo "$stage: job $prev"
done
