#!/usr/bin/env bash
# Convert a large photo collection on a Slurm cluster: 8 array tasks, each taking its own shard.
#
#   sbatch examples/slurm-array.sh /shared/photos /shared/photos-ghibli
#
# Cluster nodes usually have no internet: fetch the model once on a login node into a shared
# Hugging Face cache (the first `ghiblify` run there downloads it), then point HF_HOME at it here
# and run offline.
#
#SBATCH --job-name=ghiblify
#SBATCH --array=0-7
#SBATCH --cpus-per-task=8
#SBATCH --mem=16G
#SBATCH --time=12:00:00
#SBATCH --output=ghiblify-%A_%a.log
set -euo pipefail
in=${1:?usage: sbatch slurm-array.sh INPUT_DIR OUTPUT_DIR}
out=${2:?usage: sbatch slurm-array.sh INPUT_DIR OUTPUT_DIR}
export HF_HOME=${HF_HOME:-/shared/hf-cache}

# --shard K/N is 1-based; Slurm's task ids start at 0. The split is by a hash of each photo's path,
# so it is the same on every re-run and does not depend on listing order. (Kubernetes Indexed Jobs:
# use $JOB_COMPLETION_INDEX the same way.)
k=$((SLURM_ARRAY_TASK_ID + 1))
n=${SLURM_ARRAY_TASK_COUNT:-8}

# All shards write into the same output folder (different files); a re-submitted array skips what
# is done. Each task writes its own report.
ghiblify "$in" -o "$out" \
  --shard "$k/$n" \
  --seed 42 \
  --report "$out/report-$k-of-$n.jsonl"
