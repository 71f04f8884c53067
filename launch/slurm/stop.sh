#!/usr/bin/env bash
# Stop the private cluster started by start.sh (same prefix: $ABDIST_SLURM_PREFIX or
# /tmp/abdist-slurm). Cancels its jobs first, then stops slurmd, slurmctld, slurmdbd, mariadbd and
# munged by the pids in their pid files (nothing else is touched).
#   launch/slurm/stop.sh            # keep state: the next start.sh resumes in 2-3 s
#   launch/slurm/stop.sh --purge    # also delete the prefix (jobs, accounting DB, keys, logs)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"
export PATH=$PATH:/usr/sbin:/sbin
purge=0
case ${1:-} in
  --purge) purge=1 ;;
  "") ;;
  *) die "usage: stop.sh [--purge]" ;;
esac

if [ -n "$(running_pid slurmctld)" ]; then
  jobs=$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')
  if [ -n "${jobs// /}" ]; then
    log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    for _ in $(seq 50); do
      [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break
      sleep 0.2
    done
  fi
fi

# Stop daemons in stages, the daemons of a stage in parallel: the Slurm daemons first (slurmctld
# saves its state and reports to slurmdbd), then slurmdbd, then MariaDB and munge.
stop_daemons() {
  local d pid pids=() names=()
  for d in "$@"; do
    pid=$(running_pid "$d")
    [ -n "$pid" ] || continue
    kill -TERM "$pid" 2>/dev/null || true
    pids+=("$pid")
    names+=("$d")
  done
  for i in "${!pids[@]}"; do
    for _ in $(seq 200); do
      kill -0 "${pids[i]}" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "${pids[i]}" 2>/dev/null; then
      log "${names[i]} (pid ${pids[i]}) ignored SIGTERM for 20 s: SIGKILL"
      kill -KILL "${pids[i]}" 2>/dev/null || true
    else
      log "${names[i]} stopped"
    fi
  done
}
stop_daemons slurmd slurmctld
stop_daemons slurmdbd
stop_daemons mariadbd munged

if [ $purge = 1 ] && [ -d "$P" ]; then
  [ -e "$P/.abdist-slurm" ] || die "$P was not created by start.sh (no .abdist-slurm marker): not deleting it"
  rm -rf "$P"
  log "deleted $P"
fi
