#!/bin/bash
# Train on this machine: Ray on 127.0.0.1 with one worker per CPU share (or GPU), live view.
#   launch/local.sh                                   # the default small model
#   launch/local.sh model=tiny trainer=quick          # a smoke run in seconds
#   WORKERS=2 launch/local.sh parallelism=zero2       # two ranks
# Without a W&B key, W&B writes offline files under run.dir (sync them later with `wandb sync`).
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${SHEEPOP:-sheepop}" train cluster=local "cluster.num_workers=${WORKERS:-1}" "$@"
