#!/bin/bash
# Train on Slurm: allocate NODES nodes, start Ray on them, run the job (cluster/slurm/sheepop.sbatch).
#   NODES=4 launch/slurm.sh model=small run.dir=/shared/runs/small-001 data.out_dir=/shared/data/stdlib
#   NODES=2 GPUS=8 PARTITION=a100 SHEEPOP_VENV=$PWD/.venv launch/slurm.sh model=gpt2-124m ...
# run.dir and data.out_dir on the cluster's shared filesystem (or cluster.storage_path=s3://... for
# object storage). The job's log lands in sheepop-<jobid>.out in this directory.
set -euo pipefail
cd "$(dirname "$0")/.."
args=(--nodes="${NODES:-2}" --gpus-per-node="${GPUS:-4}")
[[ -n "${PARTITION:-}" ]] && args+=(--partition="$PARTITION")
[[ -n "${TIME:-}" ]] && args+=(--time="$TIME")
exec sbatch "${args[@]}" --export=ALL cluster/slurm/sheepop.sbatch "$@"
