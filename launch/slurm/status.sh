#!/usr/bin/env bash
# Show the private cluster's daemons, node and queue; exit 0 when all daemons run, 1 otherwise.
set -uo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"
export PATH=$PATH:/usr/sbin:/sbin
ok=0
for d in "${DAEMONS[@]}"; do
  pid=$(running_pid "$d")
  if [ -n "$pid" ]; then echo "$d: running (pid $pid)"; else echo "$d: stopped"; ok=1; fi
done
echo "prefix: $P"
echo "export SLURM_CONF=$SLURM_CONF"
if [ $ok = 0 ]; then
  sinfo -N -o "%N %T %c %m" 2>&1
  squeue 2>&1
fi
exit $ok
