#!/usr/bin/env bash
# The whole test suite, as CI runs it: install what it needs (apt and pip), bring up the Slurm dev
# cluster, check lint and types, run every test. Run as root on Debian 12:
#   bash tests/run.sh            # everything
#   bash tests/run.sh -k quota   # extra arguments go to pytest
# A dev cluster this script started is torn down at the end, whatever happened; one that was
# already up is left running.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

bash deploy/install-packages.sh
bash deploy/python-env.sh dev,bench
bash deploy/oidc/install.sh # the local OpenID provider's npm packages (tests/oidc start it)
BROKER_TEST_POSTGRES=$(bash deploy/postgres-for-tests.sh)
export BROKER_TEST_POSTGRES

started_cluster=0
if ! bash deploy/dev-cluster/ctl.sh status >/dev/null 2>&1; then
    started_cluster=1
fi
teardown() {
    if ((started_cluster)); then bash deploy/dev-cluster/down.sh || true; fi
}
trap teardown EXIT
bash deploy/dev-cluster/up.sh

echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy --strict"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest "$@"
