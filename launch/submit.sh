#!/bin/bash
# Submit a training job to a running Ray cluster and follow its logs; exits with the job's state.
#   launch/submit.sh model=small cluster.storage_path=s3://YOUR-BUCKET/runs run.name=small-001
#                                                                         # to $RAY_ADDRESS or 127.0.0.1:8265
#   CLUSTER=cluster/aws.yaml launch/submit.sh model=small ...             # a `ray up` cluster: tunnels the
#                                                                         # dashboard over SSH first
#   launch/submit.sh -m trainer.lr=3e-4,1e-3 'run.name=lr${trainer.lr}' cluster.storage_path=s3://YOUR-BUCKET/runs
#                                                                         # a sweep: one job each, no follow
# With cluster.storage_path (and data.out_dir) in object storage the nodes need no shared filesystem;
# on a cluster that has one, plain paths (run.dir=/shared/runs/x) work as well. See docs/cluster.md.
# Forward secrets by name: ENV="WANDB_API_KEY HF_TOKEN" launch/submit.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
sheepop=${SHEEPOP:-sheepop}

env_args=()
for name in ${ENV:-}; do env_args+=(--env "$name"); done

tunnel=""
if [[ -n "${CLUSTER:-}" ]]; then
  ray dashboard "$CLUSTER" >/dev/null 2>&1 &
  tunnel=$!
  trap 'kill "$tunnel" 2>/dev/null || true' EXIT
  for _ in $(seq 1 30); do (exec 3<>/dev/tcp/127.0.0.1/8265) 2>/dev/null && break; sleep 1; done
  export RAY_ADDRESS=http://127.0.0.1:8265
fi

follow=(--follow)
for arg in "$@"; do [[ "$arg" == "-m" || "$arg" == "--multirun" ]] && follow=(); done
"$sheepop" submit "${follow[@]}" "${env_args[@]}" "$@"
