#!/usr/bin/env bash
# Install the local OpenID provider's npm packages (node-oidc-provider, pinned by package-lock.json)
# into deploy/oidc/node_modules with `npm ci`. Idempotent: does nothing when node_modules already
# matches the lockfile. Needs node and npm (deploy/install-packages.sh) and the npm registry.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here"

# oidc-provider 9 needs Node.js 20 or later (Web Crypto globals); Debian 12's own nodejs is 18.
if ! node -e 'process.exit(Number(process.versions.node.split(".")[0]) >= 20 ? 0 : 1)'; then
    echo "deploy/oidc/install.sh: Node.js $(node --version) is too old for oidc-provider 9;" \
        "install Node.js 20 or later (e.g. NodeSource's nodejs package)" >&2
    exit 1
fi

stamp=node_modules/.installed-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then exit 0; fi
echo "deploy/oidc/install.sh: npm ci (oidc-provider)" >&2
npm ci --omit=dev --no-audit --no-fund --loglevel=error >&2
echo "$want" >"$stamp"
