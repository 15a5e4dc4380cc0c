#!/usr/bin/env bash
# Runs the same command on every worker of a Cloud TPU pod slice (what multi-host JAX needs).
# jax.distributed.initialize() finds the coordinator from the TPU metadata by itself.
#
#   TPU_NAME=my-v4-64 ZONE=us-central2-b REPO_DIR=~/vitjax \
#   launch/tpu_pod.sh --config=configs/deit_b.py --workdir=gs://my-bucket/runs/deit_b
#
# The workdir must be shared by all workers (a gs:// bucket): checkpoints are written by all
# processes together (orbax), metrics by process 0. Preempted (spot) slices get SIGTERM; the
# trainer saves a checkpoint at a step all hosts agree on, and re-running the same command
# resumes from it. One-time setup on all workers:
#   gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --worker=all \
#     --command "git clone <repo> $REPO_DIR && pip install -e '$REPO_DIR' 'jax[tpu]'"
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
REPO_DIR=${REPO_DIR:-vitjax}
if [[ $# -eq 0 ]]; then
  echo "usage: TPU_NAME=.. ZONE=.. $0 --config=configs/<exp>.py --workdir=gs://.. [--config.x=y]" >&2
  exit 2
fi

args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "${TPU_NAME}" --zone "${ZONE}" --worker=all \
  --command "cd ${REPO_DIR} && python -m vitjax.main ${args} --config.distributed.initialize=True"
