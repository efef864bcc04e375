#!/usr/bin/env bash
# Make sure a PostgreSQL server answers on 127.0.0.1:5432 for the test suite, and print the admin
# URL the tests should use (tests/conftest.py reads it from BROKER_TEST_POSTGRES).
# Order: a server that already answers (trust auth, as on the project's CI machines); else start
# the installed cluster; else install Debian's postgresql and give the postgres role a password.
set -euo pipefail

trust_url=postgresql://postgres@127.0.0.1:5432/postgres
password_url=postgresql://postgres:broker-tests@127.0.0.1:5432/postgres

answers() { PGCONNECT_TIMEOUT=3 psql "$1" -Atqc 'SELECT 1' >/dev/null 2>&1; }

start_installed() {
    local version
    version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n 1)
    [[ -n $version ]] || return 1
    pg_ctlcluster --skip-systemctl-redirect "$version" main start >/dev/null 2>&1 || true
    for _ in $(seq 30); do pg_isready -q -h 127.0.0.1 && return 0; sleep 1; done
    return 1
}

if command -v psql >/dev/null && answers "$trust_url"; then echo "$trust_url"; exit 0; fi
if command -v psql >/dev/null && answers "$password_url"; then echo "$password_url"; exit 0; fi
if ! command -v pg_ctlcluster >/dev/null; then
    echo "postgres-for-tests.sh: installing postgresql" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
fi
start_installed || { echo "postgres-for-tests.sh: PostgreSQL did not start" >&2; exit 1; }
if answers "$trust_url"; then echo "$trust_url"; exit 0; fi
su postgres -c "psql -qc \"ALTER ROLE postgres PASSWORD 'broker-tests'\"" >&2
answers "$password_url" || { echo "postgres-for-tests.sh: cannot log in as postgres" >&2; exit 1; }
echo "$password_url"
