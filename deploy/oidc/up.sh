#!/usr/bin/env bash
# Start the local OpenID provider (server.mjs, node-oidc-provider) in the background and wait until
# its discovery document answers. Settings come from the environment (deploy/oidc/README.md):
#   OIDC_PORT (9400), OIDC_HOST (127.0.0.1), OIDC_ISSUER (http://$OIDC_HOST:$OIDC_PORT),
#   OIDC_STATE_DIR (.dev-oidc at the top of the repository: keys, pid file, log, admin token),
#   OIDC_AUDIENCE (urn:aifactory:broker), OIDC_ACCESS_TOKEN_TTL (600 s), OIDC_UI_REDIRECT_URIS,
#   OIDC_UI_POST_LOGOUT_REDIRECT_URIS, ...
# Prints OIDC_ISSUER=... and OIDC_ADMIN_TOKEN=... lines (eval-able). Already running: prints them
# again and starts nothing. Stop it with deploy/oidc/down.sh (same OIDC_STATE_DIR).
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../.." && pwd)

export OIDC_HOST=${OIDC_HOST:-127.0.0.1}
export OIDC_PORT=${OIDC_PORT:-9400}
export OIDC_ISSUER=${OIDC_ISSUER:-http://$OIDC_HOST:$OIDC_PORT}
export OIDC_STATE_DIR=${OIDC_STATE_DIR:-$repo/.dev-oidc}
mkdir -p "$OIDC_STATE_DIR"
chmod 700 "$OIDC_STATE_DIR"
pidfile=$OIDC_STATE_DIR/oidc.pid
tokenfile=$OIDC_STATE_DIR/admin-token

if [[ -z ${OIDC_ADMIN_TOKEN:-} ]]; then
    if [[ ! -s $tokenfile ]]; then
        (umask 077 && od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$tokenfile")
    fi
    OIDC_ADMIN_TOKEN=$(cat "$tokenfile")
fi
export OIDC_ADMIN_TOKEN

report() {
    echo "OIDC_ISSUER=$OIDC_ISSUER"
    echo "OIDC_ADMIN_TOKEN=$OIDC_ADMIN_TOKEN"
}

if [[ -s $pidfile ]] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    report
    exit 0
fi

bash "$here/install.sh"
nohup node "$here/server.mjs" >>"$OIDC_STATE_DIR/oidc.log" 2>&1 </dev/null &
echo $! >"$pidfile"

# The server listens once it is set up: an open port means it answers.
for _ in $(seq 150); do
    if (exec 3<>"/dev/tcp/$OIDC_HOST/$OIDC_PORT") 2>/dev/null; then
        report
        exit 0
    fi
    if ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then break; fi
    sleep 0.1
done
echo "deploy/oidc/up.sh: the provider did not come up; its log ($OIDC_STATE_DIR/oidc.log):" >&2
tail -n 20 "$OIDC_STATE_DIR/oidc.log" >&2
exit 1
