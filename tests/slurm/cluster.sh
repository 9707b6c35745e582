#!/usr/bin/env bash
# A real single-node SLURM cluster on this machine, for the launch tests (tests/test_launch_slurm.py).
#
#   bash tests/slurm/cluster.sh start    # install (only what is missing) and start; no-op if already up
#                                        # (ours with this config, or any usable cluster someone else started)
#   bash tests/slurm/cluster.sh status   # daemons + node state; exit 1 if the cluster is not usable
#   bash tests/slurm/cluster.sh stop     # cancel jobs, stop the daemons we started (by PID), keep packages
#
# Debian 12 packages: slurm-wlm (slurmctld + slurmd + client), munge, slurmdbd + MariaDB. Accounting
# stays ON: without slurmdbd `sacct` fails, submitit sees every job as UNKNOWN and `job.result()` on a job
# that died without a result waits forever. No systemd: each daemon is started by hand, and its PID file
# (all under $STATE) is the only way it is stopped, so nothing else on the machine is touched.
# Needs root. CLUSTER_FORCE_RESTART=1 restarts even when the running cluster matches this config.
set -euo pipefail

# PID files, one folder per daemon user (each daemon writes its own after dropping privileges).
STATE=/run/catdog-slurm
LOGDIR=/var/log/catdog-slurm
MUNGE_PID=$STATE/munge/munged.pid
MYSQL_PID=$STATE/mysql/mariadbd.pid
DBD_PID=$STATE/slurm/slurmdbd.pid
CTLD_PID=$STATE/slurm/slurmctld.pid
SLURMD_PID=$STATE/slurm/slurmd.pid
ALL_PIDS="$SLURMD_PID $CTLD_PID $DBD_PID $MYSQL_PID $MUNGE_PID"
PKGS="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"

log() { echo "cluster.sh: $*" >&2; }
die() { log "$*"; exit 1; }

# The daemon a PID file names, if it is still alive and still that daemon (a reused PID is not ours).
alive() {
    local f=$1 pid
    [ -s "$f" ] || return 1
    pid=$(cat "$f")
    case "$(cat /proc/"$pid"/comm 2>/dev/null)" in
        munged | mariadbd | slurmdbd | slurmctld | slurmd) return 0 ;;
    esac
    return 1
}

node_state() { sinfo -h -N -o '%T' 2>/dev/null | head -1 || true; }

usable() {  # all five daemons alive and the node accepts jobs
    local f
    for f in $ALL_PIDS; do alive "$f" || return 1; done
    case "$(node_state)" in idle* | mix* | alloc* | completing*) return 0 ;; esac
    return 1
}

stop_pidfiles() {  # TERM the daemons in these PID files, wait (<=15 s each) for them to exit, then KILL
    local f pid pids=""
    for f in "$@"; do
        if alive "$f"; then
            pid=$(cat "$f")
            kill "$pid" 2>/dev/null || true
            pids="$pids $pid"
        fi
        rm -f "$f"
    done
    for pid in $pids; do
        for _ in $(seq 150); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -0 "$pid" 2>/dev/null && kill -9 "$pid" 2>/dev/null || true
    done
}

stop_all() {
    if alive "$CTLD_PID" && scontrol ping >/dev/null 2>&1; then
        # Cancel jobs first so that no slurmstepd or job process outlives slurmd.
        local jobs
        jobs=$(squeue -h -o %A 2>/dev/null || true)
        if [ -n "$jobs" ]; then
            # shellcheck disable=SC2086
            scancel $jobs || true
            for _ in $(seq 100); do [ -z "$(squeue -h -o %A 2>/dev/null)" ] && break; sleep 0.2; done
        fi
    fi
    stop_pidfiles "$SLURMD_PID" "$CTLD_PID"
    stop_pidfiles "$DBD_PID"
    stop_pidfiles "$MYSQL_PID" "$MUNGE_PID"
}

status() {
    local f
    for f in $ALL_PIDS; do
        if alive "$f"; then echo "$(basename "$f" .pid): pid $(cat "$f")"; else echo "$(basename "$f" .pid): not running"; fi
    done
    if usable; then sinfo; return 0; fi
    echo "cluster not usable (node state: '$(node_state)'); logs in $LOGDIR" >&2
    return 1
}

install_packages() {
    local p missing=""
    for p in $PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
    [ -z "$missing" ] && return 0
    log "installing$missing"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    # Without systemd the postinst scripts cannot start services ("policy-rc.d denied execution"): harmless,
    # we start the daemons ourselves below.
    # shellcheck disable=SC2086
    apt-get install -y -q --no-install-recommends $missing
}

slurm_conf() {  # the cluster's slurm.conf on stdout; sized from this machine (slurmd -C)
    local host cpus mem
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$((mem > 2048 ? mem - 1024 : mem * 9 / 10)) # leave the OS some headroom
    cat <<EOF
ClusterName=catdog
SlurmctldHost=${host}(127.0.0.1)
AuthType=auth/munge
CryptoType=crypto/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s).
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SwitchType=switch/none
ReturnToService=2
SlurmUser=slurm
SlurmdUser=root
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldLogFile=${LOGDIR}/slurmctld.log
SlurmdLogFile=${LOGDIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
# Look at pending and requeued jobs every 1-2 s instead of every 30-60 s: requeue tests take 20-40 s, not 3 min.
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
JobCompType=jobcomp/none
InactiveLimit=0
KillWait=10
MinJobAge=300
SlurmctldTimeout=30
SlurmdTimeout=30
JobRequeue=1
MailProg=/bin/true
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
}

slurmdbd_conf() {
    cat <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=6819
SlurmUser=slurm
PidFile=${DBD_PID}
LogFile=${LOGDIR}/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=catdog-slurmdbd
StorageLoc=slurm_acct_db
EOF
}

wait_for() {  # wait_for SECONDS WHAT CMD...: poll CMD every 0.2 s
    local secs=$1 what=$2
    shift 2
    for _ in $(seq $((secs * 5))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
    die "$what did not come up within ${secs} s; see $LOGDIR"
}

dbd_port_open() { (exec 3<>/dev/tcp/127.0.0.1/6819) 2>/dev/null; }

start() {
    [ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts system daemons)"
    install_packages
    install -d -m 0755 "$STATE"
    install -d -o munge -g munge -m 0755 "$STATE/munge"
    install -d -o mysql -g mysql -m 0755 "$STATE/mysql"
    install -d -o slurm -g slurm -m 0755 "$STATE/slurm"
    install -d -o slurm -g slurm -m 0755 "$LOGDIR" /var/spool/slurmctld /etc/slurm
    install -d -m 0755 /var/spool/slurmd

    local conf dbd
    conf=$(slurm_conf)
    dbd=$(slurmdbd_conf)
    # Already up with this very config: nothing to do (make test calls us before every run).
    if [ -z "${CLUSTER_FORCE_RESTART:-}" ] && usable && [ "$conf" = "$(cat /etc/slurm/slurm.conf 2>/dev/null)" ]; then
        log "already running"
        status
        return 0
    fi
    local f ours=0
    for f in $ALL_PIDS; do alive "$f" && ours=1; done
    if [ "$ours" = 0 ] && [ -z "${CLUSTER_FORCE_RESTART:-}" ]; then
        case "$(node_state)" in
            idle* | mix* | alloc* | completing*)
                # Someone else's daemons (systemd, another script) already run a usable cluster: use it as it is.
                log "a SLURM cluster not started by this script is already running here; using it"
                sinfo
                return 0
                ;;
        esac
    fi
    stop_all

    # munge: the package creates /etc/munge/munge.key; make one if it is missing.
    if [ ! -s /etc/munge/munge.key ]; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
        chown munge:munge /etc/munge/munge.key
        chmod 600 /etc/munge/munge.key
    fi
    install -d -o munge -g munge -m 0755 /run/munge
    install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID" # daemonizes
    wait_for 10 munged test -S /run/munge/munge.socket.2
    munge -n | unmunge >/dev/null || die "munge credential round trip failed"

    # MariaDB (the package's postinst initialised /var/lib/mysql; root logs in over the unix socket).
    install -d -o mysql -g mysql -m 0755 /run/mysqld
    setsid /usr/sbin/mariadbd --user=mysql --pid-file="$MYSQL_PID" </dev/null >>"$LOGDIR/mariadbd.log" 2>&1 &
    wait_for 30 mariadbd mysqladmin ping
    mysql -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'catdog-slurmdbd';
              ALTER USER 'slurm'@'localhost' IDENTIFIED BY 'catdog-slurmdbd';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

    echo "$dbd" >/etc/slurm/slurmdbd.conf
    chown slurm:slurm /etc/slurm/slurmdbd.conf
    chmod 600 /etc/slurm/slurmdbd.conf # slurmdbd refuses a config others can read
    /usr/sbin/slurmdbd                 # daemonizes
    wait_for 30 slurmdbd dbd_port_open

    echo "$conf" >/etc/slurm/slurm.conf
    /usr/sbin/slurmctld # daemonizes, drops to SlurmUser
    /usr/sbin/slurmd    # daemonizes, stays root (it starts jobs as their users)
    wait_for 30 slurmctld scontrol ping
    local st=""
    for _ in $(seq 100); do
        st=$(node_state)
        case "$st" in
            idle* | mix* | alloc*) break ;;
            # A node left DOWN/DRAINED by an earlier, killed slurmd: we own this cluster, put it back.
            down* | drain*) scontrol update NodeName="$(hostname -s)" State=RESUME 2>/dev/null || true ;;
        esac
        sleep 0.2
    done
    status || die "node state '$st' after start"
}

case "${1:-}" in
    start) start ;;
    stop) stop_all ;;
    status) status ;;
    *) die "usage: $0 start|stop|status" ;;
esac
