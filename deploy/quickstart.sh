#!/usr/bin/env bash
# Everything for a first look, on a fresh Debian 12 machine as root: packages, the virtualenv,
# the local Slurm dev cluster (alpha: 4 nodes x 8 h100, beta: 2 nodes x 4 a100, login nodes on
# 127.0.0.1:2221 and :2222), the broker's database, a demo admin, a researcher and a project with
# a quota, and the local OpenID provider (deploy/oidc, 127.0.0.1:9400) the broker accepts sign-ins
# from. Then it serves the broker (API and poller) in the foreground; Ctrl-C stops it. The dev
# cluster and the provider keep running: deploy/dev-cluster/down.sh and deploy/oidc/down.sh.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$repo"

bash deploy/install-packages.sh
bash deploy/python-env.sh postgres
bash deploy/dev-cluster/up.sh

port=${BROKER_PORT:-8080}
url=http://127.0.0.1:$port

# The local OpenID provider (deploy/oidc, on 127.0.0.1:${OIDC_PORT:-9400}): users alice, bob and
# admin (passwords in deploy/oidc/users.json). The broker trusts it through BROKER_AUTH__OIDC__*
# (the [auth.oidc] table of the configuration, set here without touching the dev cluster's file).
export OIDC_UI_REDIRECT_URIS=$url/ui/auth/callback
eval "$(bash deploy/oidc/up.sh)"
export BROKER_AUTH__OIDC__ENABLED=true
export BROKER_AUTH__OIDC__ISSUER=$OIDC_ISSUER
export BROKER_AUTH__OIDC__AUDIENCE=urn:aifactory:broker
export BROKER_AUTH__OIDC__WEB_CLIENT_ID=broker-ui
export BROKER_AUTH__OIDC__WEB_CLIENT_SECRET=dev-only-broker-ui-secret
export BROKER_AUTH__OIDC__WEB_LOGIN_LABEL="the local provider"

config=$repo/.dev-cluster/broker.toml
export BROKER_CONFIG=$config
.venv/bin/broker db upgrade >/dev/null
eval "$(.venv/bin/python deploy/dev-cluster/demo.py "$config")"
cat <<MSG

The broker is starting at $url (OpenAPI: $url/docs, metrics: $url/metrics).
Demo researcher "alice" in project "demo" (1000 GPU-hours; h100 weight 1.0, a100 weight 0.5);
her jobs run as the Unix user alice on the dev cluster. In another shell:

  export BROKER_URL=$url
  export BROKER_TOKEN=$RESEARCHER_TOKEN
  printf '#!/bin/bash\nid -un\nsrun hostname\nsleep 30\n' > job.sh
  $repo/.venv/bin/broker submit job.sh --project demo --cluster alpha --gpus 8 --time 10
  $repo/.venv/bin/broker jobs
  $repo/.venv/bin/broker usage demo
  $repo/.venv/bin/broker logs JOB_ID -f     # JOB_ID: the "id" submit printed

Admin token (for 'broker project ...' and 'broker user ...'): $ADMIN_TOKEN

In a browser: $url/ui/ and press "Sign in with the local provider" (user alice, password
alice-dev-password; admin / admin-dev-password for the admin pages), or paste alice's token above.
The CLI can sign in at the local identity provider ($OIDC_ISSUER) too:
  $repo/.venv/bin/broker --url $url login --issuer $OIDC_ISSUER
  (open the link it prints; user alice, password alice-dev-password), then
  $repo/.venv/bin/broker --url $url whoami
The provider keeps running after Ctrl-C: deploy/oidc/down.sh stops it.

MSG
exec .venv/bin/broker serve --config "$config" --port "$port"
