#!/usr/bin/env bash
# Install the Debian 12 packages the local dev cluster (deploy/dev-cluster/up.sh) and the project's
# tests need. Idempotent and quiet when everything is present: apt-get update runs only when
# something is missing, so up.sh can call this on every run at no cost.
set -euo pipefail

# slurm-wlm: slurmctld, slurmd and the clients; slurmdbd: accounting; mariadb-client: up.sh creates
# the accounting database with it. The rest are programs the tests and the benchmark smoke test run
# (tests/deploy/test_install_packages.py checks that this list covers every one): prometheus
# (promtool), systemd (systemd-analyze), wrk (the benchmarks' HTTP load), git (the benchmark report
# records the commit), sudo (jobs run as the researcher through sudo on the login node), nodejs and
# npm (the local OpenID provider, deploy/oidc; NodeSource's nodejs package provides npm itself),
# chromium (the browser tests of the web pages drive it through Playwright).
PACKAGES=(slurm-wlm slurmdbd munge openssh-server openssh-client mariadb-client prometheus systemd
    wrk git sudo nodejs npm chromium)

# These replace the slurmctld/slurmd alternatives with an emulator that cannot run real nodes
# ("No front end nodes defined"): never install them, and refuse to go on when they are present.
FORBIDDEN=(slurm-wlm-emulator slurm-client-emulator)

installed() { [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]; }

# An installed package that provides "$1" (npm comes with NodeSource's nodejs; installing Debian's
# npm over it would conflict).
provided() {
    dpkg-query -W -f='${db:Status-Status} ${Provides}\n' 2>/dev/null |
        awk -v want="$1" '$1 == "installed" { for (i = 2; i <= NF; i++) { sub(/[ ,(].*/, "", $i); if ($i == want) found = 1 } } END { exit !found }'
}

# A MariaDB that already answers (local or in another container) serves slurmdbd; install a server
# only when there is none.
mariadb_answers() {
    if command -v mariadb >/dev/null; then
        mariadb --protocol=socket -uroot --connect-timeout=2 -N -e 'SELECT 1' >/dev/null 2>&1
    else
        [[ -S /run/mysqld/mysqld.sock ]] # no client yet: a live socket is the best sign we have
    fi
}

main() {
    ((EUID == 0)) || { echo "install-packages.sh: run as root" >&2; exit 1; }
    local pkg missing=()
    for pkg in "${FORBIDDEN[@]}"; do
        if installed "$pkg"; then
            echo "install-packages.sh: $pkg is installed and breaks the real Slurm daemons;" \
                "remove it: apt-get purge $pkg" >&2
            exit 1
        fi
    done
    for pkg in "${PACKAGES[@]}"; do installed "$pkg" || provided "$pkg" || missing+=("$pkg"); done
    if ! installed mariadb-server && ! mariadb_answers; then missing+=(mariadb-server); fi
    ((${#missing[@]} == 0)) && return 0

    echo "install-packages.sh: installing ${missing[*]}" >&2
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    # --no-install-recommends keeps optional extras (and any emulator suggestion) out.
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

main "$@"
