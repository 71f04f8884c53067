#!/usr/bin/env bash
# The one install procedure, shared by the Makefile, CI and the Docker images.
#   docker/install.sh VENV [EXTRAS]     e.g. docker/install.sh .venv dev
# Creates VENV if missing and installs the project (editable) with the pinned torch/torchvision.
set -euo pipefail
venv=${1:?usage: docker/install.sh VENV [EXTRAS]}
extras=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi
spec="$here"
[ -n "$extras" ] && spec="$here[$extras]"
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  -c "$here/docker/constraints.txt" -e "$spec"
