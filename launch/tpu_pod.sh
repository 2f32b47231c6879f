#!/usr/bin/env bash
# Runs the same deme command on every worker of a Cloud TPU VM pod slice.
#
#   launch/tpu_pod.sh TPU_NAME ZONE pretrain --config=configs/church_ddpm.py --workdir=/mnt/shared/runs/church
#
# Every worker must have the project checked out in ~/deme-jax with its virtual
# environment in ~/deme-jax/.venv (`python3.11 -m venv .venv && .venv/bin/pip
# install -e '.[tpu]'` on each). jax.distributed discovers the workers itself on
# TPU VMs. The workdir must be a directory that every worker mounts (Filestore or
# another NFS share): the workdir lock and the checkpoints' checksums need a POSIX
# file system, so a gs:// URL is refused.
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE DEME_ARGS...}; zone=${2:?zone}; shift 2
args=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all \
  --command="cd ~/deme-jax && DEME_DISTRIBUTED=1 .venv/bin/deme$args"
