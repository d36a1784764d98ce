#!/usr/bin/env bash
# A private Slurm on this machine, for nanorun's Slurm launcher tests (and for trying the launcher by hand).
#
#   tests/slurm/cluster.sh up      install munge + slurm-wlm when missing (apt, as root), start munged, slurmctld and
#                                  slurmd(s) as background daemons, wait for the node(s) to be idle, print the env
#   tests/slurm/cluster.sh env     print the environment lines again (`eval "$(tests/slurm/cluster.sh env)"`)
#   tests/slurm/cluster.sh down    stop every daemon this script started and delete the state directory
#
# Everything lives in $NANORUN_SLURM_DIR (default /tmp/nanorun-slurm): munge key and socket, slurm.conf, spool, state,
# logs, pid files; nothing under /etc is written. Settings (environment):
#   NANORUN_SLURM_DIR    state directory                      NANORUN_SLURM_PORT  slurmctld port (default 16817;
#   NANORUN_SLURM_NODES  1, or 2 for two slurmd on this machine                      slurmd ports follow it)
#   NANORUN_SLURM_GPUS   fake GRES gpus per node (default 0: no GRES; device files under $STATE/dev)
#   NANORUN_SLURM_TIMEOUT  seconds to wait for the daemons / the package install (default 60 / 900)
# up is idempotent (a running cluster is reused; a half-started one is restarted), down is safe when nothing runs.
# A failure prints one line on stderr naming what failed and the log to read, and exits 1; nothing waits forever.
set -euo pipefail

STATE=${NANORUN_SLURM_DIR:-/tmp/nanorun-slurm}
PORT=${NANORUN_SLURM_PORT:-16817}
NODES=${NANORUN_SLURM_NODES:-1}
GPUS=${NANORUN_SLURM_GPUS:-0}
WAIT=${NANORUN_SLURM_TIMEOUT:-60}
HOST=$(hostname -s)
CONF=$STATE/slurm.conf

die() { echo "cluster.sh: $*" >&2; exit 1; }

env_lines() {
    echo "export SLURM_CONF=$CONF"
}

# --- packages -----------------------------------------------------------------------------------------------------

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || die "missing ${missing[*]}: run as root (it installs them with apt-get) or install them first"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get to install them (install Slurm and munge)"
    local t=${NANORUN_SLURM_INSTALL_TIMEOUT:-900} log=/tmp/nanorun-slurm-apt.log
    echo "cluster.sh: installing ${missing[*]} with apt-get (log: $log)" >&2
    # RUNLEVEL=1: the packages' own init scripts do not start daemons with the system config
    if ! DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 timeout "$t" apt-get install -y -q --no-install-recommends \
            "${missing[@]}" >"$log" 2>&1; then
        timeout "$t" apt-get update -q >>"$log" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive RUNLEVEL=1 timeout "$t" apt-get install -y -q --no-install-recommends \
            "${missing[@]}" >>"$log" 2>&1 || die "apt-get install ${missing[*]} failed or timed out; see $log"
    fi
}

# --- config -------------------------------------------------------------------------------------------------------

node_name() { if [ "$NODES" = 1 ]; then echo "$HOST"; else echo "node$1"; fi; }

render_config() {   # slurm.conf on stdout
    local cpus mem_mb
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {printf "%d", $2 / 1024 * 0.9}' /proc/meminfo)   # a bit under the real memory
    echo "# written by tests/slurm/cluster.sh"
    echo "ClusterName=nanorun"
    echo "SlurmctldHost=$HOST(127.0.0.1)"
    echo "SlurmctldPort=$PORT"
    echo "SlurmdPort=$((PORT + 1))"
    echo "SlurmUser=root"
    echo "SlurmdUser=root"
    echo "AuthType=auth/munge"
    echo "CredType=cred/munge"
    # cred_expire: also how long a requeued job waits before it may start again (default 120 s)
    echo "AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=20"
    echo "StateSaveLocation=$STATE/ctld"
    echo "SlurmdSpoolDir=$STATE/spool-%n"
    echo "SlurmctldPidFile=$STATE/run/slurmctld.pid"
    echo "SlurmdPidFile=$STATE/run/slurmd-%n.pid"
    echo "SlurmctldLogFile=$STATE/log/slurmctld.log"
    echo "SlurmdLogFile=$STATE/log/slurmd-%n.log"
    echo "ProctrackType=proctrack/pgid"   # no cgroups needed (containers, CI)
    echo "TaskPlugin=task/none"
    echo "JobAcctGatherType=jobacct_gather/none"
    echo "AccountingStorageType=accounting_storage/none"
    echo "JobCompType=jobcomp/none"
    echo "MpiDefault=none"
    echo "SchedulerType=sched/backfill"
    echo "SelectType=select/cons_tres"
    echo "SelectTypeParameters=CR_CPU"
    echo "SlurmdParameters=config_overrides"   # the node is what this file says (fake GPUs, 2 nodes on 1 machine)
    echo "ReturnToService=2"
    echo "MinJobAge=3600"           # finished jobs stay visible to scontrol (no accounting database here)
    echo "SchedulerParameters=sched_interval=2,bf_interval=2"
    echo "SlurmctldTimeout=30"
    echo "SlurmdTimeout=30"
    echo "KillWait=10"
    echo "InactiveLimit=0"
    echo "JobRequeue=1"
    [ "$GPUS" -gt 0 ] && echo "GresTypes=gpu"
    local i gres=""
    [ "$GPUS" -gt 0 ] && gres=" Gres=gpu:$GPUS"
    for i in $(seq 1 "$NODES"); do
        echo "NodeName=$(node_name "$i") NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$cpus RealMemory=$mem_mb$gres State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO"
}

write_config() {
    mkdir -p "$STATE"/{munge,ctld,log,run}
    chmod 0755 "$STATE"
    chmod 0700 "$STATE/munge"
    if [ ! -s "$STATE/munge/munge.key" ]; then
        head -c 1024 /dev/urandom >"$STATE/munge/munge.key"
        chmod 0400 "$STATE/munge/munge.key"
    fi
    render_config >"$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    if [ "$GPUS" -gt 0 ]; then
        # fake GPUs: slurmd counts a gpu GRES by its device files, so each node gets character devices like /dev/null
        # (plain files if mknod is not allowed; slurmd logs a complaint and counts them all the same); jobs see
        # CUDA_VISIBLE_DEVICES set to the indexes they were given
        local i g
        for i in $(seq 1 "$NODES"); do
            mkdir -p "$STATE/dev/$(node_name "$i")"
            for g in $(seq 0 $((GPUS - 1))); do
                local dev="$STATE/dev/$(node_name "$i")/gpu$g"
                [ -e "$dev" ] || mknod "$dev" c 1 3 2>/dev/null || touch "$dev"
            done
            echo "NodeName=$(node_name "$i") Name=gpu File=$STATE/dev/$(node_name "$i")/gpu[0-$((GPUS - 1))]"
        done >"$STATE/gres.conf"
    else
        rm -f "$STATE/gres.conf"
    fi
}

# --- daemons ------------------------------------------------------------------------------------------------------

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

stop_pidfile() {   # TERM, then KILL after 10 s
    local pidfile=$1 pid n
    [ -s "$pidfile" ] || return 0
    pid=$(cat "$pidfile")
    if kill -0 "$pid" 2>/dev/null; then
        kill "$pid" 2>/dev/null || true
        for n in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

cluster_ok() {   # every daemon alive and every node idle (or allocated/mixed: jobs may run)
    alive "$STATE/munge/munged.pid" && alive "$STATE/run/slurmctld.pid" || return 1
    local i states
    for i in $(seq 1 "$NODES"); do alive "$STATE/run/slurmd-$(node_name "$i").pid" || return 1; done
    states=$(SLURM_CONF=$CONF timeout 10 sinfo -h -N -o '%t' 2>/dev/null) || return 1
    [ "$(echo "$states" | grep -cE '^(idle|alloc|mix|comp)')" = "$NODES" ]
}

start_daemons() {
    export SLURM_CONF=$CONF
    if ! alive "$STATE/munge/munged.pid"; then
        timeout "$WAIT" munged --force --key-file="$STATE/munge/munge.key" --socket="$STATE/munge/munge.socket" \
            --pid-file="$STATE/munge/munged.pid" --log-file="$STATE/log/munged.log" \
            --seed-file="$STATE/munge/munged.seed" >>"$STATE/log/munged.out" 2>&1 \
            || die "munged did not start; see $STATE/log/munged.log"
    fi
    timeout 10 munge -n -S "$STATE/munge/munge.socket" | timeout 10 unmunge -S "$STATE/munge/munge.socket" >/dev/null 2>&1 \
        || die "munge does not answer on $STATE/munge/munge.socket; see $STATE/log/munged.log"
    if ! alive "$STATE/run/slurmctld.pid"; then
        timeout "$WAIT" slurmctld -c -f "$CONF" >>"$STATE/log/slurmctld.out" 2>&1 \
            || die "slurmctld did not start; see $STATE/log/slurmctld.log"
    fi
    local i name
    for i in $(seq 1 "$NODES"); do
        name=$(node_name "$i")
        if ! alive "$STATE/run/slurmd-$name.pid"; then
            local args=(-f "$CONF")
            [ "$NODES" -gt 1 ] && args+=(-N "$name")
            timeout "$WAIT" slurmd "${args[@]}" >>"$STATE/log/slurmd-$name.out" 2>&1 \
                || die "slurmd $name did not start; see $STATE/log/slurmd-$name.log and $STATE/log/slurmd-$name.out"
        fi
    done
    local deadline=$((SECONDS + WAIT))
    until cluster_ok; do
        if [ $SECONDS -ge $deadline ]; then
            die "the node(s) did not become idle within ${WAIT}s (sinfo: $(timeout 10 sinfo -h -N -o '%N %t %E' 2>&1 | tr '\n' ';')); see $STATE/log/"
        fi
        # a node that came up DOWN/DRAIN (e.g. after an unclean stop) is resumed once
        for i in $(seq 1 "$NODES"); do
            if timeout 10 sinfo -h -n "$(node_name "$i")" -o '%t' 2>/dev/null | grep -qE '^(down|drain|drng)'; then
                timeout 10 scontrol update nodename="$(node_name "$i")" state=resume >/dev/null 2>&1 || true
            fi
        done
        sleep 0.5
    done
}

down() {
    if [ -f "$CONF" ] && alive "$STATE/run/slurmctld.pid"; then
        SLURM_CONF=$CONF timeout 10 scancel --full --quiet --user="$(id -un)" >/dev/null 2>&1 || true
    fi
    local f
    for f in "$STATE"/run/slurmd-*.pid; do [ -e "$f" ] && stop_pidfile "$f"; done
    stop_pidfile "$STATE/run/slurmctld.pid"
    stop_pidfile "$STATE/munge/munged.pid"
    case "$STATE" in /|"") die "refusing to delete state directory '$STATE'";; esac
    rm -rf "$STATE"
}

case "${1:-}" in
    up)
        install_packages
        if [ -f "$CONF" ] && [ "$(render_config)" != "$(cat "$CONF")" ]; then down; fi   # other settings: restart
        if [ -f "$CONF" ] && cluster_ok; then env_lines; exit 0; fi
        write_config
        start_daemons
        env_lines
        ;;
    down) down ;;
    env)
        [ -f "$CONF" ] || die "no cluster in $STATE (run: $0 up)"
        env_lines
        ;;
    *) echo "usage: $0 up|down|env" >&2; exit 2 ;;
esac
