#!/usr/bin/env bash
# The one install procedure, shared by the Makefile, CI and the Docker images.
#   docker/install.sh VENV [EXTRAS]     e.g. docker/install.sh .venv dev
# Creates VENV if missing and installs the project (editable) with the pinned torch/torchvision.
#
# Optional FFCV backend: "ffcv" among EXTRAS (e.g. dev,ffcv) or ABDIST_WITH_FFCV=1 asks for it,
# ABDIST_WITH_FFCV=0 vetoes it. ffcv builds from source against Debian packages: when they are
# missing, they are apt-get installed if we are root and have apt-get; otherwise FFCV is skipped
# with one line on stderr and everything else is installed as usual.
set -euo pipefail
venv=${1:?usage: docker/install.sh VENV [EXTRAS]}
extras=${2:-}
here=$(cd "$(dirname "$0")/.." && pwd)
python=${PYTHON:-python3}
if [ ! -x "$venv/bin/python" ]; then
  "$python" -m venv "$venv"
fi

ffcv_debs="pkg-config libopencv-dev libturbojpeg0-dev"
want_ffcv=0
case ",$extras," in *,ffcv,*) want_ffcv=1 ;; esac
case "${ABDIST_WITH_FFCV:-}" in
  1) want_ffcv=1 ;;
  0) want_ffcv=0 ;;
esac
extras=$(printf '%s' "$extras" | tr ',' '\n' | grep -vx 'ffcv' | paste -sd, - || true)
if [ "$want_ffcv" = 1 ]; then
  debs=$ffcv_debs
  # Building ffcv also needs a C compiler and Python.h (Debian's python3 lacks it without -dev).
  command -v cc >/dev/null 2>&1 || debs="$debs gcc"
  "$venv/bin/python" -c 'import os, sysconfig, sys
sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
    || debs="$debs python3-dev"
  missing=""
  for d in $debs; do
    dpkg-query -W -f='${Status}' "$d" 2>/dev/null | grep -q "install ok installed" \
      || missing="$missing $d"
  done
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "docker/install.sh: installing FFCV build dependencies:$missing" >&2
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      # shellcheck disable=SC2086  # a list of package names
      apt-get install -y -qq $missing >/dev/null
    else
      why="not root"
      [ "$(id -u)" = 0 ] && why="no apt-get"
      echo "docker/install.sh: skipping FFCV ($why; needs Debian packages:$missing)" >&2
      want_ffcv=0
    fi
  fi
  [ "$want_ffcv" = 1 ] && extras="${extras:+$extras,}ffcv"
fi
# DeepSpeed (dist.backend=deepspeed): install without building its C++/CUDA ops. The ZeRO path
# used here needs none of them (it is given a torch optimizer), and building them takes minutes.
case ",$extras," in *,deepspeed,*) export DS_BUILD_OPS="${DS_BUILD_OPS:-0}" ;; esac
spec="$here"
[ -n "$extras" ] && spec="$here[$extras]"
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  -c "$here/docker/constraints.txt" -e "$spec"
