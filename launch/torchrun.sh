#!/usr/bin/env bash
# Train on one node with N processes (one per GPU, or N CPU ranks):
#
#   launch/torchrun.sh N CONFIG [section.key=value ...] [--out DIR]
#
# is exactly
#
#   OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=N -m abdist train CONFIG \
#       dist.backend=ddp [section.key=value ...] [--out DIR]
#
# - dist.backend=ddp comes first, so a later dist.backend=deepspeed (with dist.zero_stage=1|2)
#   overrides it.
# - train.batch_size is the GLOBAL batch: each of the N ranks takes batch_size/N samples.
# - Re-running the same command resumes from the run directory's latest checkpoint.
# - TORCHRUN_ARGS passes extra launcher options, e.g. TORCHRUN_ARGS=--max-restarts=2 to restart
#   the ranks from the latest checkpoint when one of them dies.
# - OMP_NUM_THREADS defaults to 1: ranks on a CPU node share its cores (set it to cores/N).
# - Several nodes: call torchrun yourself (--nnodes, --node-rank, --rdzv-endpoint); see
#   launch/README.md.
set -euo pipefail
nproc=${1:?usage: launch/torchrun.sh NPROC CONFIG [section.key=value ...] [--out DIR]}
config=${2:?usage: launch/torchrun.sh NPROC CONFIG [section.key=value ...] [--out DIR]}
shift 2
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-}
if [ -z "$python" ]; then
  if [ -x "$here/.venv/bin/python" ]; then python=$here/.venv/bin/python; else python=python3; fi
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}"
# shellcheck disable=SC2086  # TORCHRUN_ARGS is a list of options
exec "$python" -m torch.distributed.run --standalone --nproc_per_node="$nproc" ${TORCHRUN_ARGS:-} \
  -m abdist train "$config" dist.backend=ddp "$@"
