# shellcheck shell=bash
# shellcheck disable=SC2034 # the variables here are used by the scripts that source this file
# Shared by up.sh, down.sh and ctl.sh (sourced, never run): the layout of the dev cluster under
# <repo>/.dev-cluster, and starting, finding and stopping its daemons by their pid files.
#
# Slurm daemons chdir to the directory of their log file, under .dev-cluster; slurmstepd inherits
# that from slurmd. down.sh uses this to find job steps that outlive slurmd, which hold no pid file.

DEV_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd -P)
REPO=$(cd "$DEV_DIR/../.." && pwd -P)
STATE=$REPO/.dev-cluster
PIDS=$STATE/pids
CLUSTERS=(alpha beta)
SVC_USER=slurmsvc
SVC_HOME=$STATE/home/$SVC_USER
# Researchers: real Unix accounts that jobs run as. The service account may act as members of
# RESEARCH_GROUP only (sudoers); OUTSIDER exists but is not in the group, so sudo must refuse it.
RESEARCH_GROUP=broker-users
RESEARCHERS=(alice bob)
OUTSIDER=carol
# The Slurm account under which the broker creates projects' accounts; the service account is its
# coordinator, not a Slurm administrator.
PARENT_ACCOUNT=broker
SUDOERS_FILE=/etc/sudoers.d/broker-$SVC_USER
SUDO_LOG=/var/log/sudo-broker.log
SSH_DIR=$STATE/ssh
DBD_DIR=$STATE/slurmdbd
DBD_PORT=16819
DB_NAME=slurm_acct_db_dev
DB_USER=slurm_dev
# One deadline for every wait: daemons here come up in 1-5 s, so 30 s means something is broken.
WAIT_SECONDS=${DEV_CLUSTER_WAIT_SECONDS:-30}

# cluster_spec CLUSTER: set the facts of one cluster as globals. The one table of the topology:
# configs, waits and broker.toml are all derived from it. Ports are away from Slurm's defaults
# (6817-6819) so that a system Slurm could run beside this one.
cluster_spec() {
    case $1 in
    alpha) SSH_PORT=2221 CTLD_PORT=16817 NODE_PREFIX=a NODE_COUNT=4 NODE_PORT0=16901 GPU_TYPE=h100 GPUS_PER_NODE=8
        PARTITIONS=(gpu debug) ;;
    beta) SSH_PORT=2222 CTLD_PORT=16827 NODE_PREFIX=b NODE_COUNT=2 NODE_PORT0=16911 GPU_TYPE=a100 GPUS_PER_NODE=4
        PARTITIONS=(gpu) ;;
    *) die "unknown cluster '$1' (expected one of: ${CLUSTERS[*]})" ;;
    esac
}
cluster_nodes() {
    local i
    cluster_spec "$1"
    for ((i = 1; i <= NODE_COUNT; i++)); do echo "$NODE_PREFIX$i"; done
}
cluster_conf() { echo "$STATE/$1/slurm.conf"; }
cluster_log_dir() { echo "$STATE/$1/log"; }
require_cluster() { cluster_spec "${1:-}"; }

# lock_state: up.sh, down.sh and ctl.sh may be run by several tests at once; one at a time, or two
# of them could start the same daemon. The lock is released when the script exits.
lock_state() {
    [[ -d $STATE ]] || return 0
    exec 9>"$STATE/.lock"
    flock -w $((3 * WAIT_SECONDS)) 9 || die "timed out waiting for $STATE/.lock (another up/down/ctl.sh runs)"
}

# log MESSAGE: progress on stderr, with the seconds since the script started.
T0_US=${EPOCHREALTIME/./}
log() {
    local us=$((${EPOCHREALTIME/./} - T0_US))
    printf '[dev-cluster %3d.%ds] %s\n' $((us / 1000000)) $((us / 100000 % 10)) "$*" >&2
}

# die MESSAGE [LOGFILE...]: fail loudly, with the end of the daemon logs that explain why.
die() {
    local msg=$1 f
    shift
    printf '\nERROR: %s\n' "$msg" >&2
    for f in "$@"; do
        [[ -r $f ]] || continue
        printf -- '--- last lines of %s ---\n' "$f" >&2
        tail -n 25 "$f" >&2
    done
    exit 1
}

# wait_until DESCRIPTION "LOGFILE..." COMMAND...: poll COMMAND until it succeeds, at most
# WAIT_SECONDS. COMMAND runs in this shell, keeps its own stderr quiet, may set WAIT_DETAIL to say
# what it saw last, and may die at once when waiting longer is pointless.
wait_until() {
    local what=$1 logfiles=$2
    shift 2
    local deadline=$((SECONDS + WAIT_SECONDS))
    WAIT_DETAIL=
    until "$@" >/dev/null; do
        if ((SECONDS >= deadline)); then
            # shellcheck disable=SC2086 # paths never hold whitespace (up.sh checks)
            die "timed out after ${WAIT_SECONDS}s waiting for $what${WAIT_DETAIL:+ (last seen: $WAIT_DETAIL)}" $logfiles
        fi
        sleep 0.2
    done
}

# pid_alive PID: the process exists and is not a zombie. PID 1 of some sandboxes reaps orphans late,
# so an exited daemon can linger as a zombie for seconds; it is gone for our purposes.
pid_alive() {
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }
    [[ ${stat:0:1} != [ZX] ]]
}

# running_pid NAME COMM: print the pid recorded in pids/NAME.pid if that process is alive and still is
# the program COMM (a stale pid file may name a recycled pid: never signal a stranger).
running_pid() {
    local file=$PIDS/$1.pid pid comm
    [[ -r $file ]] || return 1
    read -r pid <"$file" 2>/dev/null || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [[ $comm == "$2" ]] && pid_alive "$pid" || return 1
    echo "$pid"
}

# conf_sum FILE...: fingerprint of a daemon's configuration, kept beside its pid file so a rerun of
# up.sh restarts a daemon whose configuration changed and reuses it otherwise.
conf_sum() { cat "$@" | sha256sum | cut -d' ' -f1; }

# start_daemon NAME COMM SUM LOGFILE COMMAND...: start a self-daemonizing program that writes
# pids/NAME.pid itself, unless it already runs with the same configuration fingerprint.
start_daemon() {
    local name=$1 comm=$2 sum=$3 logfile=$4 pid
    shift 4
    if pid=$(running_pid "$name" "$comm"); then
        if [[ $(cat "$PIDS/$name.sum" 2>/dev/null) == "$sum" ]]; then
            return 0
        fi
        log "$name: configuration changed, restarting"
        stop_daemons "$name:$comm"
    fi
    rm -f "$PIDS/$name.pid"
    # 9>&-: a daemon must not inherit the lock (see lock_state), or it would hold it forever.
    "$@" 9>&- || die "$name failed to start: $*" "$logfile"
    wait_until "$name to write its pid file" "$logfile" running_pid "$name" "$comm"
    echo "$sum" >"$PIDS/$name.sum"
    log "$name started (pid $(running_pid "$name" "$comm"))"
}

# stop_daemons NAME:COMM...: SIGTERM every listed daemon that runs, wait for all of them together,
# SIGKILL what is left after WAIT_SECONDS. Stopping in parallel keeps down.sh short.
stop_daemons() {
    local spec name comm pid pids=() names=()
    for spec in "$@"; do
        name=${spec%%:*} comm=${spec#*:}
        if pid=$(running_pid "$name" "$comm"); then
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid") names+=("$name")
            log "$name: stopping pid $pid"
        fi
        rm -f "$PIDS/$name.sum"
    done
    wait_pids_gone "${pids[@]}"
    for name in "${names[@]}"; do rm -f "$PIDS/$name.pid"; done
}

# wait_pids_gone PID...: wait for the processes to exit; SIGKILL them at the deadline.
wait_pids_gone() {
    local deadline=$((SECONDS + WAIT_SECONDS)) pid alive
    (($# > 0)) || return 0
    while :; do
        alive=()
        for pid in "$@"; do pid_alive "$pid" && alive+=("$pid"); done
        ((${#alive[@]} == 0)) && return 0
        if ((SECONDS >= deadline)); then
            log "still alive after ${WAIT_SECONDS}s, killing: ${alive[*]}"
            kill -KILL "${alive[@]}" 2>/dev/null || true
            return 0
        fi
        sleep 0.1
    done
}

munge_works() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }

mariadb_answers() { mariadb --protocol=socket -uroot --connect-timeout=2 -N -e 'SELECT 1' >/dev/null 2>&1; }

# --- the daemons, one start/stop pair each (up.sh writes their configuration first) ---

slurmctld_conf_sum() { conf_sum "$(cluster_conf "$1")" "$STATE/$1/gres.conf"; }

start_slurmctld() {
    local c=$1 conf
    conf=$(cluster_conf "$c")
    [[ -r $conf ]] || die "$conf is missing: run deploy/dev-cluster/up.sh first"
    start_daemon "$c-slurmctld" slurmctld "$(slurmctld_conf_sum "$c")" "$(cluster_log_dir "$c")/slurmctld.log" \
        /usr/sbin/slurmctld -f "$conf"
}

start_slurmds() {
    local c=$1 conf node
    conf=$(cluster_conf "$c")
    for node in $(cluster_nodes "$c"); do
        # -N: several slurmd on one host, each playing one node of the NodeName line.
        start_daemon "$c-slurmd-$node" slurmd "$(slurmctld_conf_sum "$c")" \
            "$(cluster_log_dir "$c")/slurmd-$node.log" /usr/sbin/slurmd -f "$conf" -N "$node"
    done
}

# alive_and NAME COMM LOGFILE CHECK...: CHECK, but fail at once if the daemon died during start-up
# (a configuration error): no point waiting for the deadline.
alive_and() {
    local name=$1 comm=$2 logfile=$3
    shift 3
    running_pid "$name" "$comm" >/dev/null || die "$name exited during start-up" "$logfile"
    "$@"
}

slurmctld_answers() { SLURM_CONF=$(cluster_conf "$1") scontrol ping 2>/dev/null | grep -q 'is UP'; }

wait_slurmctld() {
    local c=$1 logfile
    logfile="$(cluster_log_dir "$1")/slurmctld.log"
    wait_until "slurmctld of $c to answer scontrol ping" "$logfile" \
        alive_and "$c-slurmctld" slurmctld "$logfile" slurmctld_answers "$c"
}

# Node states (sinfo %t) that count as up for up.sh: responding and schedulable (busy on a rerun).
NODES_UP='idle|mix|alloc|comp'
# ... and for ctl.sh start-slurmctld: responding to the controller, whatever a test did to them
# (drained, set down). Right after slurmctld restarts, nodes are "unk" until their slurmd re-registers.
NODES_RESPONDING='idle|mix|alloc|comp|drain|drng|down|resv|maint|plnd|fail|failg'

# nodes_in_states CLUSTER STATES: every node of CLUSTER is in one of STATES (an ERE alternation).
nodes_in_states() {
    local c=$1 states node
    states=$(SLURM_CONF=$(cluster_conf "$c") sinfo -h -N -o '%N %t' 2>&1 | sort -u) || {
        WAIT_DETAIL=$states
        return 1
    }
    WAIT_DETAIL=$(tr '\n' ' ' <<<"$states")
    for node in $(cluster_nodes "$c"); do
        grep -qxE "$node ($2)" <<<"$states" || return 1
    done
}

# wait_nodes CLUSTER STATES: wait for nodes_in_states; on timeout show the controller and node logs.
wait_nodes() {
    local c=$1 logs node
    logs="$(cluster_log_dir "$c")/slurmctld.log"
    for node in $(cluster_nodes "$c"); do logs+=" $(cluster_log_dir "$c")/slurmd-$node.log"; done
    wait_until "all nodes of $c in state $2 (a drained node needs: scontrol update nodename=NODE state=resume)" \
        "$logs" nodes_in_states "$c" "$2"
    log "cluster $c: all nodes up"
}

stop_slurmctld() { stop_daemons "$1-slurmctld:slurmctld"; }

start_sshd() {
    local c=$1 conf=$STATE/$1/sshd_config
    [[ -r $conf ]] || die "$conf is missing: run deploy/dev-cluster/up.sh first"
    # sshd refuses to start without its privilege separation directory; /run is a tmpfs.
    mkdir -p /run/sshd && chmod 755 /run/sshd
    /usr/sbin/sshd -t -f "$conf" || die "sshd configuration $conf is invalid"
    # -E: sshd logs to syslog by default, and there is none here.
    start_daemon "$c-sshd" sshd "$(conf_sum "$conf")" "$(cluster_log_dir "$c")/sshd.log" \
        /usr/sbin/sshd -f "$conf" -E "$(cluster_log_dir "$c")/sshd.log"
    cluster_spec "$c"
    wait_until "sshd of $c to listen on port $SSH_PORT" "$(cluster_log_dir "$c")/sshd.log" port_open "$SSH_PORT"
}

# stop_sshd CLUSTER: a login node that goes down takes its sessions with it: end every process below
# our listener (per-connection sshd and the commands they run, which would outlive them) too.
stop_sshd() {
    local name=$1-sshd pid below
    if pid=$(running_pid "$name" sshd); then
        # Freeze the listener first: a connection it accepted after the sessions were listed
        # would otherwise outlive the stop (a client connecting at that instant kept working).
        kill -STOP "$pid" 2>/dev/null || true
        below=$(descendants "$pid" | tr '\n' ' ')
        if [[ -n ${below// /} ]]; then
            # shellcheck disable=SC2086 # one pid per word
            kill -KILL $below 2>/dev/null || true
        fi
        kill -KILL "$pid" 2>/dev/null || true
        wait_pids_gone "$pid"
    fi
    stop_daemons "$name:sshd"
    rm -f "$PIDS/$name.pid"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

start_slurmdbd() {
    [[ -r $DBD_DIR/slurmdbd.conf ]] || die "$DBD_DIR/slurmdbd.conf is missing: run deploy/dev-cluster/up.sh first"
    # slurmdbd looks for slurmdbd.conf in the directory of SLURM_CONF; that slurm.conf need not exist.
    start_daemon slurmdbd slurmdbd "$(conf_sum "$DBD_DIR/slurmdbd.conf")" "$DBD_DIR/slurmdbd.log" \
        env SLURM_CONF="$DBD_DIR/slurm.conf" /usr/sbin/slurmdbd
    wait_until "slurmdbd to answer sacctmgr" "$DBD_DIR/slurmdbd.log" \
        alive_and slurmdbd slurmdbd "$DBD_DIR/slurmdbd.log" slurmdbd_answers
}

slurmdbd_answers() { SLURM_CONF=$(cluster_conf alpha) sacctmgr -n -P show cluster format=cluster >/dev/null 2>&1; }

stop_slurmdbd() { stop_daemons slurmdbd:slurmdbd; }

# slurm_pids_of_state [COMM...]: pids of the Slurm processes of this dev cluster (by default all of
# slurmctld, slurmscriptd, slurmd, slurmdbd, slurmstepd): those whose working directory is under
# .dev-cluster. Job processes are not among them: they run in the job's directory.
slurm_pids_of_state() {
    local d comm cwd wanted=" ${*:-slurmctld slurmscriptd slurmd slurmdbd slurmstepd} "
    for d in /proc/[0-9]*; do
        { read -r comm <"$d/comm"; } 2>/dev/null || continue
        [[ $wanted == *" $comm "* ]] || continue
        cwd=$(readlink "$d/cwd" 2>/dev/null) || continue
        if [[ $cwd == "$STATE"/* ]] && pid_alive "${d#/proc/}"; then echo "${d#/proc/}"; fi
    done
    return 0
}

# descendants PID...: the processes below PID (a job's shell and its children under slurmstepd).
descendants() {
    local tree
    tree=$(ps -e -o pid=,ppid=)
    awk -v roots="$*" '
        BEGIN { n = split(roots, r, " "); for (i = 1; i <= n; i++) keep[r[i]] = 1 }
        { parent[$1] = $2 }
        END {
            do { changed = 0
                 for (p in parent) if (!(p in keep) && (parent[p] in keep)) { keep[p] = 1; changed = 1 }
            } while (changed)
            for (i = 1; i <= n; i++) delete keep[r[i]]
            for (p in keep) print p
        }' <<<"$tree"
}

# all_daemons: NAME:COMM of every daemon up.sh may start, in the order down.sh stops them.
all_daemons() {
    local c node
    for c in "${CLUSTERS[@]}"; do echo "$c-sshd:sshd"; done
    for c in "${CLUSTERS[@]}"; do
        echo "$c-slurmctld:slurmctld"
        for node in $(cluster_nodes "$c"); do echo "$c-slurmd-$node:slurmd"; done
    done
    echo slurmdbd:slurmdbd
    echo munged:munged
    echo mariadbd:mariadbd
}
