#!/usr/bin/env bash
# Stop the test cluster of tests/cluster/start.sh: kill exactly the PIDs it recorded, newest first.
set -uo pipefail

STATE=${STMDIT_SLURM_STATE:-/var/tmp/stmdit-slurm}
DAEMONS=(slurmd slurmctld slurmdbd mariadbd munged)

say() { echo "cluster/stop: $*" >&2; }

stop_daemon() {
    local name=$1 pidfile=$STATE/pids/$1 pid
    [[ -s $pidfile ]] || return 0
    pid=$(cat "$pidfile")
    # the PID must still belong to the program we started (PIDs get reused)
    if kill -0 "$pid" 2>/dev/null && [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$name" ]]; then
        kill -TERM "$pid"
        for ((i = 0; i < 40; i++)); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.5
        done
        if kill -0 "$pid" 2>/dev/null; then
            say "$name (pid $pid) ignored SIGTERM for 20s: SIGKILL"
            kill -KILL "$pid"
        fi
        say "stopped $name (pid $pid)"
    fi
    rm -f "$pidfile"
}

for daemon in "${DAEMONS[@]}"; do stop_daemon "$daemon"; done
