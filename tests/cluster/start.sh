#!/usr/bin/env bash
# Start a real single-node SLURM (with accounting) for tests/test_cluster.py.
#
# Installs Debian's slurmctld, slurmd, slurm-client, slurmdbd, munge and mariadb-server, writes a
# one-node configuration with a fake GPU, starts every daemon directly (no systemd) and records
# its PID under $STMDIT_SLURM_STATE; tests/cluster/stop.sh kills exactly those PIDs.
# Run as root in a throw-away Debian 12 container or VM. Running it again while the cluster is
# up does nothing.
set -euo pipefail

STATE=${STMDIT_SLURM_STATE:-/var/tmp/stmdit-slurm}
CLUSTER=stmdit
MARKER="# written by stmdit tests/cluster/start.sh"
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)
PACKAGES=(munge slurm-client slurmctld slurmd slurmdbd mariadb-server)
NODE=$(hostname -s)
MYSQL_SOCKET=/run/mysqld/mysqld.sock   # where slurmdbd's client library looks for "localhost"

say() { echo "cluster/start: $*" >&2; }
die() { say "error: $*"; exit 1; }

alive() { [[ -s "$STATE/pids/$1" ]] && kill -0 "$(cat "$STATE/pids/$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local seconds=$1 what=$2
    shift 2
    for ((i = 0; i < seconds * 2; i++)); do
        if "$@" >/dev/null 2>&1; then return 0; fi
        sleep 0.5
    done
    die "$what did not come up within ${seconds}s (logs: $STATE/logs)"
}

# start_daemon NAME [--as USER] COMMAND...: run in the foreground of its own session, record PID.
start_daemon() {
    local name=$1
    shift
    local -a prefix=()
    if [[ $1 == --as ]]; then
        prefix=(setpriv --reuid="$2" --regid="$2" --init-groups)
        shift 2
    fi
    setsid "${prefix[@]}" "$@" >>"$STATE/logs/$name.out" 2>&1 </dev/null &
    echo $! >"$STATE/pids/$name"
    say "started $name (pid $!)"
}

install_packages() {
    local missing=0
    for cmd in munged sbatch slurmctld slurmd slurmdbd mariadbd; do
        command -v "$cmd" >/dev/null || missing=1
    done
    ((missing)) || return 0
    say "installing ${PACKAGES[*]}"
    # Package scripts must not start services; keep an existing policy-rc.d (docker images have one).
    local own_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        own_policy=1
    fi
    export DEBIAN_FRONTEND=noninteractive
    local status=0
    { apt-get update -qq && apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"; } >"$STATE/logs/apt.log" 2>&1 || status=$?
    ((own_policy)) && rm -f /usr/sbin/policy-rc.d
    ((status == 0)) || die "apt-get failed, see $STATE/logs/apt.log"
}

write_slurm_conf() {
    local cpus memory
    cpus=$(nproc)
    # below the machine's memory, or slurmd registers with less than configured and the node drains
    memory=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    mkdir -p /etc/slurm
    cat >/etc/slurm/slurm.conf <<EOF
$MARKER
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/spool/slurmctld
SlurmdSpoolDir=$STATE/spool/slurmd
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/logs/slurmctld.log
SlurmdLogFile=$STATE/logs/slurmd.log
# no cgroups in a container
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# finished jobs stay visible to squeue/scontrol for a day
MinJobAge=86400
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStorageTRES=gres/gpu
AccountingStoreFlags=job_comment
JobAcctGatherType=jobacct_gather/linux
JobCompType=jobcomp/none
# one fake GPU: without File= in gres.conf the node drains
GresTypes=gpu
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$cpus Sockets=1 CoresPerSocket=$cpus ThreadsPerCore=1 RealMemory=$memory Gres=gpu:1 State=UNKNOWN
PartitionName=cpu Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE MaxTime=INFINITE State=UP
EOF
    cat >/etc/slurm/gres.conf <<EOF
$MARKER
AutoDetect=off
NodeName=$NODE Name=gpu File=/dev/null
EOF
    cat >/etc/slurm/slurmdbd.conf <<EOF
$MARKER
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=root
StorageLoc=slurm_acct_db
PidFile=$STATE/run/slurmdbd.pid
LogFile=$STATE/logs/slurmdbd.log
EOF
    chmod 600 /etc/slurm/slurmdbd.conf
}

start_munge() {
    [[ -s /etc/munge/munge.key ]] || mungekey --create --keyfile=/etc/munge/munge.key
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
    install -d -o munge -g munge -m 755 /run/munge /var/lib/munge /var/log/munge
    start_daemon munged --as munge munged --foreground
    wait_for 20 munged bash -c 'munge -n | unmunge'
}

start_mariadb() {
    local datadir=$STATE/mysql
    install -d -o mysql -g mysql -m 755 /run/mysqld "$datadir"
    if [[ ! -d $datadir/mysql ]]; then
        mariadb-install-db --no-defaults --user=mysql --datadir="$datadir" --skip-test-db \
            >"$STATE/logs/mariadb-install.log" 2>&1 || die "mariadb-install-db failed ($STATE/logs)"
    fi
    # socket only: no TCP port is opened
    start_daemon mariadbd mariadbd --no-defaults --user=mysql --datadir="$datadir" \
        --socket="$MYSQL_SOCKET" --skip-networking --log-error="$STATE/logs/mariadb.log" \
        --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900
    wait_for 60 mariadbd mariadb-admin --socket="$MYSQL_SOCKET" ping
    mariadb --socket="$MYSQL_SOCKET" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db"
}

start_slurm() {
    start_daemon slurmdbd slurmdbd -D
    wait_for 60 slurmdbd sacctmgr -n list cluster
    if [[ -z $(sacctmgr -n -P list cluster format=cluster "where" cluster=$CLUSTER) ]]; then
        sacctmgr -i add cluster "$CLUSTER" >/dev/null
    fi
    start_daemon slurmctld slurmctld -D -c
    wait_for 60 slurmctld scontrol ping
    start_daemon slurmd slurmd -D -N "$NODE"
    wait_for 60 "node $NODE (idle)" bash -c "sinfo -h -N -n '$NODE' -o %t | grep -qx idle"
}

main() {
    [[ $EUID -eq 0 ]] || die "run as root (it installs packages and writes /etc/slurm)"
    local running=1
    for daemon in "${DAEMONS[@]}"; do alive "$daemon" || running=0; done
    if ((running)) && sinfo -h >/dev/null 2>&1; then
        say "already running (state in $STATE)"
        return 0
    fi
    local any=0
    for daemon in "${DAEMONS[@]}"; do alive "$daemon" && any=1; done
    if ((any)); then
        say "partly running: stopping what this script started, then starting afresh"
        bash "$(dirname "$0")/stop.sh"
    fi
    if [[ -e /etc/slurm/slurm.conf ]] && ! grep -qxF "$MARKER" /etc/slurm/slurm.conf; then
        die "/etc/slurm/slurm.conf exists and was not written by this script: not touching a real cluster"
    fi
    mkdir -p "$STATE"/{pids,logs,run,spool/slurmctld,spool/slurmd}
    chmod 755 "$STATE"
    local started=$SECONDS
    install_packages
    write_slurm_conf
    start_munge
    start_mariadb
    start_slurm
    say "up in $((SECONDS - started))s: $(sinfo -h -o '%P %t %G' | tr '\n' ' ')"
}

main "$@"
