#!/usr/bin/env bash
# Runs the same deme command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE pretrain --config=configs/church_ddpm.py --workdir=gs://bucket/runs/church
#
# Every worker must have the project installed (`pip install -e '.[tpu]'` in the
# same directory on each, e.g. with --command below). jax.distributed discovers
# the workers itself on TPU VMs. The workdir must be shared (a GCS bucket).
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE DEME_ARGS...}; zone=${2:?zone}; shift 2
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
  --command="cd ~/deme-jax && DEME_DISTRIBUTED=1 .venv/bin/deme$args"
