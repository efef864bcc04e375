# shellcheck shell=bash
# Point Slurm's commands at one cluster of the dev cluster, for a human at a shell:
#
#   source deploy/dev-cluster/env.sh alpha     # or beta
#   sinfo; squeue; sacct -X
#
# Sourced, so it sets no shell options and returns (never exits) on a bad argument.

dev_cluster_env() {
    local cluster=${1:-} conf
    case $cluster in
    alpha | beta) ;;
    *)
        echo "usage: source deploy/dev-cluster/env.sh alpha|beta" >&2
        return 2
        ;;
    esac
    conf="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd -P)/.dev-cluster/$cluster/slurm.conf"
    if [[ ! -r $conf ]]; then
        echo "no $conf: run deploy/dev-cluster/up.sh first" >&2
        return 1
    fi
    export SLURM_CONF=$conf
    echo "SLURM_CONF=$SLURM_CONF" >&2
}

dev_cluster_env "$@"
