#!/usr/bin/env bash
# Start (idempotently) a private single-node Slurm cluster WITH accounting on this machine:
#   munged, a private MariaDB (mariadbd), slurmdbd, slurmctld and slurmd, all under one prefix.
#
#   sudo launch/slurm/start.sh            # prefix: $ABDIST_SLURM_PREFIX or /tmp/abdist-slurm
#   eval "$(sudo launch/slurm/start.sh)"  # ... and export SLURM_CONF in this shell
#
# Root on Debian/Ubuntu only (the daemons run as root, without systemd). Missing packages are
# installed with apt-get. Re-running it is safe: running daemons are kept, stopped ones are started
# again with their state (jobs, accounting) kept; `stop.sh --purge` wipes everything.
# Exit codes: 0 ready, 1 a daemon failed (see $PREFIX/log), 3 cannot run here (not root, no apt,
# packages not installable) -- tests skip on 3.
# The only thing written to stdout is the `export SLURM_CONF=...` line.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$here/common.sh"

CPUS=${ABDIST_SLURM_CPUS:-4}  # advertised CPUs (config_overrides), so 2-task jobs fit on 2 cores
PARTITION=${ABDIST_SLURM_PARTITION:-debug}

[ "$(id -u)" = 0 ] || { log "must run as root (daemons run as root here)"; exit 3; }

# --- packages -----------------------------------------------------------------------------------
export PATH=$PATH:/usr/sbin:/sbin
need=()
for pair in munged:munge mungekey:munge slurmctld:slurmctld slurmd:slurmd sbatch:slurm-client \
  slurmdbd:slurmdbd mariadbd:mariadb-server mariadb-install-db:mariadb-server; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if [ ${#need[@]} -gt 0 ]; then
  mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
  command -v apt-get >/dev/null || { log "missing ${need[*]} and no apt-get"; exit 3; }
  log "installing ${need[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  if ! apt-get install -y -q --no-install-recommends "${need[@]}" >"/tmp/abdist-slurm-apt.log" 2>&1;
  then
    apt-get update -q >>"/tmp/abdist-slurm-apt.log" 2>&1 || true
    apt-get install -y -q --no-install-recommends "${need[@]}" >>"/tmp/abdist-slurm-apt.log" 2>&1 ||
      { log "apt-get install ${need[*]} failed (see /tmp/abdist-slurm-apt.log)"; exit 3; }
  fi
fi

mkdir -p "$P" "$ETC" "$RUN" "$LOG" "$P/state" "$P/spool" "$DB_DIR"
chmod 0755 "$P"
touch "$P/.abdist-slurm"  # marker: stop.sh --purge only deletes a prefix that has it
HOST=$(hostname -s)

# --- ports: chosen once (free at the time), then kept so restarts find the same cluster --------
port_free() {
  if command -v ss >/dev/null; then
    [ -z "$(ss -Hltn "sport = :$1" 2>/dev/null)" ]
  else
    ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
  fi
}
if [ ! -s "$ETC/ports.env" ]; then
  base=16817
  while ! { port_free $base && port_free $((base + 1)) && port_free $((base + 2)) &&
    port_free $((base + 3)); }; do
    base=$((base + 10))
    [ $base -lt 17817 ] || die "no free port range found in 16817..17817"
  done
  cat >"$ETC/ports.env" <<EOF
CTLD_PORT=$base
SLURMD_PORT=$((base + 1))
DBD_PORT=$((base + 2))
DB_PORT=$((base + 3))
EOF
fi
# shellcheck disable=SC1091
. "$ETC/ports.env"
[ -s "$ETC/dbpass" ] || { head -c 18 /dev/urandom | base64 | tr -dc A-Za-z0-9 >"$ETC/dbpass"; }
chmod 600 "$ETC/dbpass"
DB_PASS=$(cat "$ETC/dbpass")

# --- config files (rewritten every time: same inputs give the same files) -----------------------
mem=$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
mem=${mem:-1000}
cat >"$SLURM_CONF_FILE" <<EOF
# Written by abdist launch/slurm/start.sh -- a private single-node cluster under $P.
ClusterName=abdist
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK,cred_expire=10
StateSaveLocation=$P/state
SlurmdSpoolDir=$P/spool
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SwitchType=switch/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# slurmctld->slurmdbd auth ignores AuthInfo=socket=; this is how it finds the private munged.
AccountingStoragePass=$MUNGE_SOCK
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=bf_interval=2,sched_interval=2
KillWait=5
MailProg=/bin/true
ReturnToService=2
SlurmdParameters=config_overrides
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS Sockets=1 CoresPerSocket=$CPUS ThreadsPerCore=1 RealMemory=$mem State=UNKNOWN
PartitionName=$PARTITION Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
cat >"$ETC/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chmod 600 "$ETC/slurmdbd.conf"

wait_for() {  # wait_for SECONDS WHAT CMD...: poll CMD until it succeeds
  local t=$1 what=$2
  shift 2
  for _ in $(seq $((t * 5))); do
    "$@" >/dev/null 2>&1 && return 0
    sleep 0.2
  done
  die "$what did not come up within ${t}s (logs: $LOG)"
}

# --- munge ----------------------------------------------------------------------------------------
if [ -z "$(running_pid munged)" ]; then
  mkdir -p "$MUNGE_DIR"
  chown munge:munge "$MUNGE_DIR"
  chmod 0711 "$MUNGE_DIR"
  if [ ! -s "$MUNGE_DIR/munge.key" ]; then
    runuser -u munge -- mungekey --create --keyfile="$MUNGE_DIR/munge.key"
  fi
  rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
  runuser -u munge -- munged --socket="$MUNGE_SOCK" --key-file="$MUNGE_DIR/munge.key" \
    --pid-file="$MUNGE_DIR/munged.pid" --log-file="$MUNGE_DIR/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed"
  wait_for 10 munged test -S "$MUNGE_SOCK"
  log "munged started"
fi

# --- MariaDB (private data dir, TCP on 127.0.0.1 only) -------------------------------------------
sql() { mariadb --no-defaults --socket="$DB_DIR/mysqld.sock" -u root -e "$1"; }
if [ -z "$(running_pid mariadbd)" ]; then
  if [ ! -d "$DB_DIR/data/mysql" ]; then
    mariadb-install-db --no-defaults --datadir="$DB_DIR/data" --user=root --skip-test-db \
      --auth-root-authentication-method=socket >"$LOG/mariadb-install.log" 2>&1 ||
      die "mariadb-install-db failed (see $LOG/mariadb-install.log)"
  fi
  rm -f "$DB_DIR/mysqld.sock"
  setsid mariadbd --no-defaults --datadir="$DB_DIR/data" --socket="$DB_DIR/mysqld.sock" \
    --pid-file="$DB_DIR/mariadbd.pid" --port="$DB_PORT" --bind-address=127.0.0.1 --user=root \
    --log-error="$LOG/mariadbd.log" --innodb-buffer-pool-size=32M --skip-name-resolve \
    </dev/null >/dev/null 2>&1 &
  wait_for 60 mariadbd sql "SELECT 1"
  log "mariadbd started on 127.0.0.1:$DB_PORT"
fi
sql "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
     ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';"

# --- slurmdbd, slurmctld, slurmd (each daemonizes and writes its pid file) ------------------------
if [ -z "$(running_pid slurmdbd)" ]; then
  slurmdbd
  wait_for 30 slurmdbd sacctmgr -n -i show cluster
  log "slurmdbd started on 127.0.0.1:$DBD_PORT"
fi
if [ -z "$(running_pid slurmctld)" ]; then
  slurmctld
  wait_for 30 slurmctld bash -c 'scontrol ping | grep -q UP'
  log "slurmctld started on 127.0.0.1:$CTLD_PORT"
fi
if [ -z "$(running_pid slurmd)" ]; then
  slurmd -N "$HOST"
  log "slurmd started"
fi

node_ready() {
  local s
  s=$(sinfo -h -n "$HOST" -o %T 2>/dev/null | head -1)
  case $s in
    idle* | mixed* | allocated* | completing*) return 0 ;;
    down* | drain* | fail*) scontrol update NodeName="$HOST" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  return 1
}
wait_for 60 "node $HOST" node_ready
log "ready: node $HOST ($CPUS CPUs), partition $PARTITION, accounting on"
echo "export SLURM_CONF=$SLURM_CONF_FILE"
