#!/usr/bin/env bash
# Install the local OpenID provider's npm packages (node-oidc-provider, pinned by package-lock.json)
# into deploy/oidc/node_modules with `npm ci`. Idempotent: does nothing when node_modules already
# matches the lockfile. Needs node and npm (deploy/install-packages.sh) and the npm registry.
set -euo pipefail
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
cd "$here"

stamp=node_modules/.installed-lock.sha256
want=$(sha256sum package-lock.json | cut -d' ' -f1)
if [[ -f $stamp && $(cat "$stamp") == "$want" ]]; then exit 0; fi
echo "deploy/oidc/install.sh: npm ci (oidc-provider)" >&2
npm ci --omit=dev --no-audit --no-fund --loglevel=error >&2
echo "$want" >"$stamp"
