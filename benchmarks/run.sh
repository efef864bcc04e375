#!/usr/bin/env bash
# The benchmarks behind docs/performance.md, in one command. As root on Debian 12:
#   bash benchmarks/run.sh            # full run (32-42 minutes with --baseline, 27 Nov): rewrites docs/performance.md,
#                                     # docs/performance-*.png and benchmarks/results/performance.json
#   bash benchmarks/run.sh --quick    # smoke run (under a minute) into benchmarks/out/quick/
# Other arguments go to `python -m benchmarks` (--only, --out, --from-json; see --help).
# It installs what it needs (deploy/install-packages.sh, wrk among them; the venv's bench extra),
# makes sure PostgreSQL answers and brings the Slurm dev cluster up (idempotent; a cluster already
# up is left as it is).
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"
((EUID == 0)) || { echo "benchmarks/run.sh: run as root (sbatch as slurmsvc, sacctmgr, sdiag)" >&2; exit 1; }

bash deploy/install-packages.sh # wrk and everything else the benchmarks run
bash deploy/python-env.sh dev,bench
BROKER_TEST_POSTGRES=$(bash deploy/postgres-for-tests.sh)
export BROKER_TEST_POSTGRES
bash deploy/dev-cluster/up.sh

exec .venv/bin/python -m benchmarks "$@"
