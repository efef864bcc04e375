#!/usr/bin/env bash
# Stop exactly what up.sh started, found by the pid files in .dev-cluster/pids/, and wait for it to
# exit. A MariaDB or munged that was already running before up.sh is never touched.
#
#   down.sh           stop; keep the state (configuration, keys, Slurm state, accounting database),
#                     so the next up.sh is quick
#   down.sh --purge   stop, drop the accounting database and its user, and delete .dev-cluster
set -euo pipefail
umask 022
# shellcheck source=lib.sh source-path=SCRIPTDIR
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

main() {
    local purge=false slurm_daemons c
    case ${1:-} in
    "") ;;
    --purge) purge=true ;;
    *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
    esac
    ((EUID == 0)) || die "run as root"
    lock_state

    if [[ -d $PIDS ]]; then
        cancel_jobs
        for c in "${CLUSTERS[@]}"; do stop_sshd "$c"; done
        # Slurm daemons all at once; munged and MariaDB last, since the others still talk to them.
        mapfile -t slurm_daemons < <(all_daemons | grep -E ':(slurmctld|slurmd|slurmdbd)$')
        stop_daemons "${slurm_daemons[@]}"
    fi
    # Drop the database while MariaDB still runs (it may be ours, and about to stop).
    if $purge; then drop_accounting_db; fi
    if [[ -d $PIDS ]]; then
        stop_daemons munged:munged mariadbd:mariadbd
        kill_stragglers
    fi
    if $purge; then
        # Guard the rm -rf: only ever the .dev-cluster directory of this checkout.
        [[ $STATE == "$REPO/.dev-cluster" && -n $REPO ]] || die "refusing to delete '$STATE'"
        rm -rf "$STATE"
        log "purged $STATE"
    fi
    log "dev cluster down"
}

# cancel_jobs: jobs left running would keep slurmstepd and the job's processes alive after slurmd
# stops (by design, slurmstepd outlives slurmd). Cancel them and give them KillWait to end.
cancel_jobs() {
    local c conf ids cancelled=false
    for c in "${CLUSTERS[@]}"; do
        conf=$(cluster_conf "$c")
        running_pid "$c-slurmctld" slurmctld >/dev/null || continue
        ids=$(SLURM_CONF=$conf timeout 10 squeue -h -o %F 2>/dev/null | sort -u | tr '\n' ' ') || continue
        [[ -n ${ids// /} ]] || continue
        log "$c: cancelling jobs $ids"
        # shellcheck disable=SC2086 # one job id per word
        SLURM_CONF=$conf timeout 10 scancel $ids || true
        cancelled=true
    done
    # Steps of a cluster whose controller is down cannot be cancelled: kill_stragglers ends them.
    if $cancelled; then wait_steps_gone; fi
}

wait_steps_gone() {
    local deadline=$((SECONDS + 15))
    while [[ -n $(slurm_pids_of_state slurmstepd) ]] && ((SECONDS < deadline)); do sleep 0.2; done
}

# kill_stragglers: Slurm processes of this cluster still there once every daemon is stopped (a
# slurmstepd whose job could not be cancelled, the slurmscriptd of a slurmctld that was SIGKILLed),
# with the job processes below them.
kill_stragglers() {
    local pids
    pids=$(slurm_pids_of_state | tr '\n' ' ')
    [[ -n ${pids// /} ]] || return 0
    # shellcheck disable=SC2086 # one pid per word
    pids="$pids$(descendants $pids | tr '\n' ' ')"
    log "killing leftover processes: $pids"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
    # shellcheck disable=SC2086
    wait_pids_gone $pids
}

drop_accounting_db() {
    if ! mariadb_answers; then
        log "MariaDB does not answer: accounting database $DB_NAME NOT dropped"
        return 0
    fi
    mariadb --protocol=socket -uroot -e "DROP DATABASE IF EXISTS $DB_NAME; DROP USER IF EXISTS '$DB_USER'@'localhost';"
    log "dropped database $DB_NAME and user $DB_USER"
}

main "$@"
