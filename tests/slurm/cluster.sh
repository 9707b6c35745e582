#!/usr/bin/env bash
# A real SLURM cluster on this machine for the launch tests: one node (default), or several nodes, each a slurmd in
# a network namespace of its own, on a bridge this script creates (tests/test_launch_slurm*.py).
#
#   bash tests/slurm/cluster.sh start    # install (only what is missing) and start; no-op if already up
#                                        # (ours with this config, or any usable cluster someone else started)
#   bash tests/slurm/cluster.sh status   # daemons + node states; exit 1 if the cluster is not usable
#   bash tests/slurm/cluster.sh stop     # cancel jobs, stop the daemons we started (by PID), remove our network
#   bash tests/slurm/cluster.sh exec NODE [--] CMD...   # run CMD on NODE (its network, hostname and /etc/hosts)
#
#   CATDOG_SLURM_NODES=2 bash tests/slurm/cluster.sh start   # two nodes, catdog-n1 and catdog-n2
#
# Debian 12 packages: slurm-wlm 22.05 (slurmctld + slurmd + client), munge, slurmdbd + MariaDB. Accounting
# stays ON: without slurmdbd `sacct` fails, submitit sees every job as UNKNOWN and `job.result()` on a job
# that died without a result waits forever. No systemd: each daemon is started by hand, and its PID file
# (all under $STATE) is the only way it is stopped, so nothing else on the machine is touched.
#
# Several nodes: node i is named catdog-n<i> and lives in the network namespace of that name, with an interface
# eth0 at $SUBNET.(10+i) on the bridge $BRIDGE ($SUBNET.1, where slurmctld listens), in a UTS namespace with its
# own hostname and in a mount namespace whose /etc/hosts is the node's own: its name on 127.0.1.1 (as Debian's
# installer writes it on every machine), the other nodes and the controller at their bridge addresses. The host's
# /etc/hosts gets the nodes' addresses in a marked block (removed by `stop`). The subnet defaults to one of RFC
# 2544's benchmarking networks, which nothing routes: only this machine's bridge is ever addressed.
# Needs root. CLUSTER_FORCE_RESTART=1 restarts even when the running cluster matches this config.
set -euo pipefail

NODES=${CATDOG_SLURM_NODES:-1}
SUBNET=${CATDOG_SLURM_SUBNET:-198.18.77} # first three octets of a /24
BRIDGE=catdogbr0
CTL_ADDR=$SUBNET.1
HOSTS_BEGIN="# catdog-slurm nodes BEGIN (tests/slurm/cluster.sh; removed by its stop)"
HOSTS_END="# catdog-slurm nodes END"

# PID files, one folder per daemon user (each daemon writes its own after dropping privileges).
STATE=/run/catdog-slurm
LOGDIR=/var/log/catdog-slurm
MUNGE_PID=$STATE/munge/munged.pid
MYSQL_PID=$STATE/mysql/mariadbd.pid
DBD_PID=$STATE/slurm/slurmdbd.pid
CTLD_PID=$STATE/slurm/slurmctld.pid
SERVICE_PIDS="$CTLD_PID $DBD_PID $MYSQL_PID $MUNGE_PID"
PKGS="slurmctld slurmd slurm-client munge slurmdbd mariadb-server"

log() { echo "cluster.sh: $*" >&2; }
die() { log "$*"; exit 1; }

case "$NODES" in [1-8]) ;; *) die "CATDOG_SLURM_NODES=$NODES: use 1 to 8" ;; esac
[[ "$SUBNET" =~ ^[0-9]+\.[0-9]+\.[0-9]+$ ]] || die "CATDOG_SLURM_SUBNET=$SUBNET: give three octets, e.g. 198.18.77"

node_name() { if [ "$NODES" = 1 ]; then hostname -s; else echo "catdog-n$1"; fi; }
node_addr() { echo "$SUBNET.$((10 + $1))"; }
slurmd_pidfile() { echo "$STATE/slurm/slurmd-$1.pid"; } # SlurmdPidFile's %n
# Every slurmd PID file there is (also those of another node count, and the pre-%n name), for stop.
all_slurmd_pidfiles() { ls "$STATE"/slurm/slurmd-*.pid "$STATE/slurm/slurmd.pid" 2>/dev/null || true; }

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

node_states() { sinfo -h -N -o '%N %T' 2>/dev/null || true; } # "NAME STATE" per node

all_nodes_ready() { # the configured nodes, and only they, accept jobs
    local states want i
    states=$(node_states)
    [ "$(echo "$states" | grep -c .)" = "$NODES" ] || return 1
    for i in $(seq "$NODES"); do
        want=$(node_name "$i")
        echo "$states" | grep -Eq "^$want (idle|mix|alloc|completing)" || return 1
    done
}

usable() { # all our daemons alive and every node accepts jobs
    local f i
    for f in $SERVICE_PIDS; do alive "$f" || return 1; done
    for i in $(seq "$NODES"); do alive "$(slurmd_pidfile "$(node_name "$i")")" || return 1; done
    all_nodes_ready
}

foreign_cluster_usable() { # someone else's daemons run a cluster with a node that accepts jobs
    node_states | grep -Eq " (idle|mix|alloc|completing)"
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
    # shellcheck disable=SC2046
    stop_pidfiles $(all_slurmd_pidfiles) "$CTLD_PID"
    stop_pidfiles "$DBD_PID"
    stop_pidfiles "$MYSQL_PID" "$MUNGE_PID"
    net_down
}

# ------------------------------------------------------------------------------------------ the nodes' network

# The hosts file of node i: its own name on loopback (Debian's 127.0.1.1), everything else at bridge addresses.
node_hosts() {
    local i=$1 j
    printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n'
    printf '# this node: its own name on loopback, as Debian writes /etc/hosts on every machine\n'
    printf '127.0.1.1\t%s\n' "$(node_name "$i")"
    printf '%s\t%s\n' "$CTL_ADDR" "$(hostname -s)"
    for j in $(seq "$NODES"); do
        [ "$j" = "$i" ] || printf '%s\t%s\n' "$(node_addr "$j")" "$(node_name "$j")"
    done
}

hosts_without_block() { awk -v b="$HOSTS_BEGIN" -v e="$HOSTS_END" '$0==b{skip=1} !skip{print} $0==e{skip=0}' /etc/hosts; }

set_host_block() { # the nodes' names in the host's /etc/hosts (rewritten in place: it may be a bind mount)
    local rest i
    rest=$(hosts_without_block)
    {
        echo "$rest"
        if [ "$#" -gt 0 ]; then
            echo "$HOSTS_BEGIN"
            for i in "$@"; do printf '%s\t%s\n' "$(node_addr "$i")" "$(node_name "$i")"; done
            echo "$HOSTS_END"
        fi
    } >"$STATE/hosts.new"
    cat "$STATE/hosts.new" >/etc/hosts
    rm -f "$STATE/hosts.new"
}

net_up() {
    local i ns
    # The subnet must be ours alone: on another interface it would send the nodes' traffic somewhere real.
    if ip -4 -o addr show | grep -v " $BRIDGE " | grep -q " inet $SUBNET\."; then
        die "subnet $SUBNET.0/24 is already on an interface of this machine; pick another: CATDOG_SLURM_SUBNET=a.b.c"
    fi
    ip link show "$BRIDGE" >/dev/null 2>&1 || ip link add "$BRIDGE" type bridge
    ip addr replace "$CTL_ADDR/24" dev "$BRIDGE"
    ip link set "$BRIDGE" up
    install -d -m 0755 "$STATE/hosts"
    for i in $(seq "$NODES"); do
        ns=$(node_name "$i")
        [ -e "/run/netns/$ns" ] || ip netns add "$ns"
        # The node's interface is called eth0, as on most machines (the host-side end: cdveth<i>).
        ip -n "$ns" link show eth0 >/dev/null 2>&1 || ip link add "cdveth$i" type veth peer name eth0 netns "$ns"
        ip link set "cdveth$i" master "$BRIDGE" up
        ip -n "$ns" addr replace "$(node_addr "$i")/24" dev eth0
        ip -n "$ns" link set lo up
        ip -n "$ns" link set eth0 up
        node_hosts "$i" >"$STATE/hosts/$ns"
    done
    set_host_block $(seq "$NODES")
}

net_down() { # everything net_up made, whatever the node count it was made for
    local ns
    for ns in $(ip netns list 2>/dev/null | awk '{print $1}' | grep -E '^catdog-n[0-9]+$' || true); do
        ip netns delete "$ns" # takes its veth pair with it
    done
    ip link show "$BRIDGE" >/dev/null 2>&1 && ip link delete "$BRIDGE"
    grep -qxF "$HOSTS_BEGIN" /etc/hosts && set_host_block
    rm -rf "$STATE/hosts"
}

start_slurmd() { # start_slurmd I: the slurmd of node i, in its namespaces (one node: on the host itself)
    local i=$1 name
    name=$(node_name "$i")
    install -d -m 0755 "/var/spool/slurmd/$name"
    if [ "$NODES" = 1 ]; then
        /usr/sbin/slurmd # daemonizes, stays root (it starts jobs as their users)
        return
    fi
    # `nsenter --net` and not `ip netns exec`: the latter remounts /sys, and slurmd then stops with "No filesystem
    # mounted on /sys/fs/cgroup". The UTS and mount namespaces (the hostname, /etc/hosts) live as long as slurmd
    # and the jobs it starts, which inherit them.
    nsenter --net="/run/netns/$name" -- unshare --uts --mount --propagation private -- sh -c \
        "mount --bind '$STATE/hosts/$name' /etc/hosts && hostname '$name' && exec /usr/sbin/slurmd -N '$name'"
}

# ------------------------------------------------------------------------------------------ configuration

slurm_conf() {  # the cluster's slurm.conf on stdout; sized from this machine (slurmd -C)
    local host cpus mem ctl_addr acct_host i
    host=$(hostname -s)
    cpus=$(nproc)
    mem=$(slurmd -C | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
    mem=$((mem > 2048 ? mem - 1024 : mem * 9 / 10)) # leave the OS some headroom
    ctl_addr=127.0.0.1
    acct_host=localhost
    if [ "$NODES" != 1 ]; then
        # The nodes share this machine's CPUs (each is told it has all of them) and split its memory.
        mem=$((mem / NODES))
        ctl_addr=$CTL_ADDR
        acct_host=$CTL_ADDR # "localhost" inside a node is the node itself
    fi
    cat <<EOF
ClusterName=catdog
SlurmctldHost=${host}(${ctl_addr})
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
# %n: the node's name, so that several slurmd on one machine keep apart.
SlurmdPidFile=${STATE}/slurm/slurmd-%n.pid
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldLogFile=${LOGDIR}/slurmctld.log
SlurmdLogFile=${LOGDIR}/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
SchedulerType=sched/backfill
# Look at pending and requeued jobs every 1-2 s instead of every 30-60 s: requeue tests take 20-40 s, not 3 min.
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=${acct_host}
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
EOF
    if [ "$NODES" = 1 ]; then
        echo "NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN"
    else
        for i in $(seq "$NODES"); do
            echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") CPUs=${cpus} RealMemory=${mem} State=UNKNOWN"
        done
    fi
    echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
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

# ------------------------------------------------------------------------------------------ commands

status() {
    local f i
    for f in $SERVICE_PIDS; do
        if alive "$f"; then echo "$(basename "$f" .pid): pid $(cat "$f")"; else echo "$(basename "$f" .pid): not running"; fi
    done
    for i in $(seq "$NODES"); do
        f=$(slurmd_pidfile "$(node_name "$i")")
        if alive "$f"; then echo "slurmd $(node_name "$i"): pid $(cat "$f")"; else echo "slurmd $(node_name "$i"): not running"; fi
    done
    if usable; then sinfo -N -o '%N %T %c %m %O' | column -t; return 0; fi
    echo "cluster of $NODES node(s) not usable (nodes: $(node_states | tr '\n' ' ')); logs in $LOGDIR" >&2
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
    for f in $SERVICE_PIDS $(all_slurmd_pidfiles); do alive "$f" && ours=1; done
    if [ "$ours" = 0 ] && [ -z "${CLUSTER_FORCE_RESTART:-}" ] && foreign_cluster_usable; then
        # Someone else's daemons (systemd, another script) already run a usable cluster: use it as it is.
        log "a SLURM cluster not started by this script is already running here; using it"
        sinfo
        return 0
    fi
    stop_all
    [ "$NODES" = 1 ] || net_up

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
    local i
    for i in $(seq "$NODES"); do start_slurmd "$i"; done
    wait_for 30 slurmctld scontrol ping
    for _ in $(seq 150); do
        all_nodes_ready && break
        # A node left DOWN/DRAINED by an earlier, killed slurmd: we own this cluster, put it back.
        for f in $(node_states | awk '$2 ~ /^(down|drain)/ {print $1}'); do
            scontrol update NodeName="$f" State=RESUME 2>/dev/null || true
        done
        sleep 0.2
    done
    status || die "nodes not ready after start: $(node_states | tr '\n' ' ')"
}

exec_on() { # exec_on NODE [--] CMD...: CMD in NODE's namespaces, in the current directory
    local node=${1:-} f
    [ -n "$node" ] && shift || die "usage: $0 exec NODE [--] CMD..."
    [ "${1:-}" = -- ] && shift
    [ "$#" -gt 0 ] || die "usage: $0 exec NODE [--] CMD..."
    [ "$node" = "$(hostname -s)" ] && exec "$@" # the one-node cluster's node is this machine
    f=$(slurmd_pidfile "$node")
    alive "$f" || die "node $node: no slurmd of ours runs it (start the cluster with CATDOG_SLURM_NODES=2)"
    exec nsenter --target "$(cat "$f")" --net --uts --mount --wd="$PWD" -- "$@"
}

case "${1:-}" in
    start) start ;;
    stop) stop_all ;;
    status) status ;;
    exec) shift; exec_on "$@" ;;
    *) die "usage: $0 start|stop|status|exec NODE CMD..." ;;
esac
