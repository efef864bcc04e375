#!/usr/bin/env bash
# Break and mend the running dev cluster on purpose, for tests of outages. Every command is
# idempotent (stopping what is stopped, or starting what runs, is success) and bounded in time:
# it waits at most DEV_CLUSTER_WAIT_SECONDS (30) for the daemon, then fails with the end of its log.
#
#   ctl.sh status                      one line per daemon; exit 0 only if all of them run
#   ctl.sh stop-sshd CLUSTER           login node down: listener and open sessions end
#   ctl.sh start-sshd CLUSTER          back, once it accepts connections
#   ctl.sh stop-slurmctld CLUSTER      controller down: squeue/sbatch fail, running jobs go on
#   ctl.sh start-slurmctld CLUSTER     back, once it answers scontrol ping and its nodes responded
#   ctl.sh stop-slurmdbd               accounting down: sacct/sacctmgr fail, clusters go on
#   ctl.sh start-slurmdbd              back, once sacctmgr answers
#
# CLUSTER is alpha or beta. The configuration is the one up.sh wrote; run up.sh first.
set -euo pipefail
umask 022
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

usage() {
    echo "usage:" >&2
    sed -n '/^#   ctl.sh/s/^#   //p' "${BASH_SOURCE[0]}" >&2
    exit 2
}

main() {
    local cmd=${1:-} cluster=${2:-}
    ((EUID == 0)) || die "run as root"
    [[ $cmd == status ]] || lock_state
    case $cmd in
    status) status ;;
    stop-slurmdbd) stop_slurmdbd ;;
    start-slurmdbd) start_slurmdbd ;;
    stop-sshd | start-sshd | stop-slurmctld | start-slurmctld)
        [[ -n $cluster ]] || usage
        require_cluster "$cluster"
        case $cmd in
        stop-sshd) stop_sshd "$cluster" ;;
        start-sshd) start_sshd "$cluster" ;;
        stop-slurmctld) stop_slurmctld "$cluster" ;;
        start-slurmctld)
            start_slurmctld "$cluster"
            # Wait for the service, not just the process: a test uses it right away.
            wait_slurmctld "$cluster"
            wait_nodes "$cluster" "$NODES_RESPONDING"
            ;;
        esac
        ;;
    *) usage ;;
    esac
}

# status: one line per daemon; munged and MariaDB may be used without being ours.
status() {
    local spec name comm pid all_up=0
    while IFS= read -r spec; do
        name=${spec%%:*} comm=${spec#*:}
        if pid=$(running_pid "$name" "$comm"); then
            printf '%-20s running  pid %s\n' "$name" "$pid"
        elif [[ $name == munged ]] && munge_works; then
            printf '%-20s running  (not started by up.sh)\n' "$name"
        elif [[ $name == mariadbd ]] && mariadb_answers; then
            printf '%-20s running  (not started by up.sh)\n' "$name"
        else
            printf '%-20s stopped\n' "$name"
            all_up=1
        fi
    done < <(all_daemons)
    return "$all_up"
}

main "$@"
