# Shared by start.sh / stop.sh / status.sh: the private prefix and its layout. Sourced, not run.
# Everything lives under one prefix (default /tmp/abdist-slurm, or $ABDIST_SLURM_PREFIX), so the
# cluster never touches /etc/slurm, /etc/munge, /var/lib/mysql or the system's services.
P=${ABDIST_SLURM_PREFIX:-/tmp/abdist-slurm}
ETC=$P/etc
RUN=$P/run
LOG=$P/log
MUNGE_DIR=$P/munge
MUNGE_SOCK=$MUNGE_DIR/munge.socket
DB_DIR=$P/mysql
SLURM_CONF_FILE=$ETC/slurm.conf
export SLURM_CONF=$SLURM_CONF_FILE

# Daemons in start order; each has a pid file under $RUN (munged's and mariadbd's are theirs).
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

pidfile() {
  case $1 in
    munged) echo "$MUNGE_DIR/munged.pid" ;;
    mariadbd) echo "$DB_DIR/mariadbd.pid" ;;
    *) echo "$RUN/$1.pid" ;;
  esac
}

# Prints the pid of a running daemon started from this prefix, or nothing.
running_pid() {
  local f pid
  f=$(pidfile "$1")
  [ -s "$f" ] || return 0
  pid=$(tr -dc 0-9 <"$f")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 0
  # Guard against a recycled pid: the process must be the daemon we started.
  if [ -r "/proc/$pid/comm" ] && [ "$(cat "/proc/$pid/comm")" != "$1" ]; then
    return 0
  fi
  echo "$pid"
}

log() { echo "abdist-slurm: $*" >&2; }
die() {
  log "error: $*"
  exit 1
}
