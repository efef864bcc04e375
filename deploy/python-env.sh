#!/usr/bin/env bash
# Create (or refresh) the project's virtualenv at .venv with the given extras, e.g.
#   deploy/python-env.sh dev        # tests, linters
#   deploy/python-env.sh postgres   # a deployment on PostgreSQL
# Needs Python 3.11+; on a fresh Debian 12 it installs python3-venv first. Re-running is cheap:
# pip runs again only when pyproject.toml changed since the last install.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
extras=${1:-dev}
venv=$repo/.venv
stamp=$venv/.installed-$extras

python=${PYTHON:-python3}
if ! "$python" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
    echo "python-env.sh: $python is missing or older than 3.11" >&2
    exit 1
fi
if ! "$python" -m venv --help >/dev/null 2>&1 || ! "$python" -c 'import ensurepip' 2>/dev/null; then
    if ((EUID == 0)) && command -v apt-get >/dev/null; then
        echo "python-env.sh: installing python3-venv" >&2
        DEBIAN_FRONTEND=noninteractive apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-venv python3-dev
    else
        echo "python-env.sh: $python cannot create virtualenvs (apt-get install python3-venv)" >&2
        exit 1
    fi
fi

[[ -x $venv/bin/python ]] || "$python" -m venv "$venv"
if [[ ! -f $stamp || $repo/pyproject.toml -nt $stamp ]]; then
    "$venv/bin/python" -m pip install -q --upgrade pip
    "$venv/bin/python" -m pip install -q -e "$repo[$extras]"
    touch "$stamp"
fi
