#!/usr/bin/env bash
# Stop the local OpenID provider that deploy/oidc/up.sh started (the one of OIDC_STATE_DIR).
# Its keys stay in the state directory, so the next up.sh publishes the same ones.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)
state=${OIDC_STATE_DIR:-$repo/.dev-oidc}
pidfile=$state/oidc.pid

[[ -s $pidfile ]] || exit 0
pid=$(cat "$pidfile")
if kill "$pid" 2>/dev/null; then
    for _ in $(seq 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
fi
rm -f "$pidfile"
