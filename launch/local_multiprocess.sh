#!/usr/bin/env bash
# Runs N processes of one program on this machine, as a multi-host job would (CPU, fake devices).
# Each process gets JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID, which
# vitjax.parallel.maybe_initialize turns into jax.distributed.initialize(...).
#
#   launch/local_multiprocess.sh 2 4 -- python -m vitjax.main --config=configs/digits.py \
#       --workdir=runs/digits_mp --config.stages=pretrain
#
# (2 processes with 4 fake CPU devices each: an 8-device mesh.) The output of
# process i is prefixed with "[pi]". If one process fails, the others are stopped.
set -euo pipefail

if [[ $# -lt 3 || "$3" != "--" ]]; then
  echo "usage: $0 NUM_PROCESSES DEVICES_PER_PROCESS -- command [args...]" >&2
  exit 2
fi
num_processes=$1
devices=$2
shift 3

port=${JAX_PORT:-$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
}
trap cleanup EXIT INT TERM

for ((i = 0; i < num_processes; i++)); do
  (
    export JAX_PLATFORMS=cpu
    export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${devices}"
    export JAX_COORDINATOR_ADDRESS="127.0.0.1:${port}"
    export JAX_NUM_PROCESSES="${num_processes}"
    export JAX_PROCESS_ID="${i}"
    exec "$@"
  ) 2>&1 | sed -u "s/^/[p${i}] /" &
  pids+=($!)
done

status=0
for pid in "${pids[@]}"; do
  wait "$pid" || status=$?
done
trap - EXIT
exit "$status"
