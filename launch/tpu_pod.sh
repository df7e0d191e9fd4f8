#!/usr/bin/env bash
# Run a kvjax experiment on every host of a Cloud TPU pod slice (multi-host JAX).
#
#   launch/tpu_pod.sh TPU_NAME ZONE configs/quickstart.py [--config.x=y ...]
#
# Each host installs kvjax from this checkout (copied with scp) and runs `python -m kvjax.launch --distributed`,
# which calls jax.distributed.initialize() (the TPU runtime supplies the coordinator); only process 0 writes the run
# directory. Requires the gcloud CLI and a TPU VM slice that you created beforehand.
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
