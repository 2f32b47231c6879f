#!/usr/bin/env bash
# N deme processes on this machine, as one multi-process JAX job (CPU collectives over gloo).
#
#   launch/local.sh N deme pretrain --config=configs/mnist_tiny.py --workdir=/tmp/run
#
# Process i gets DEME_PROCESS_ID=i; all share DEME_COORDINATOR_ADDRESS (a free
# localhost port) and DEME_NUM_PROCESSES=N, which deme_jax.train.distributed reads.
# Process 0 writes checkpoints' metadata, metrics and samples; output of process
# i goes to $DEME_LOG_DIR/process_i.log (default: the current directory).
# If one process fails, the others are stopped: a collective would wait forever.
set -euo pipefail
n=${1:?usage: launch/local.sh N COMMAND...}; shift
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
log_dir=${DEME_LOG_DIR:-.}
mkdir -p "$log_dir"
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; }
trap cleanup EXIT INT TERM
for ((i = 0; i < n; i++)); do
  DEME_COORDINATOR_ADDRESS=127.0.0.1:$port DEME_NUM_PROCESSES=$n DEME_PROCESS_ID=$i \
    "$@" >"$log_dir/process_$i.log" 2>&1 &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do
  wait -n || { status=$?; echo "a process failed (exit $status); stopping the others" >&2; break; }
done
exit $status
