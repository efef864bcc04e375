// The local OpenID Connect provider of the broker's dev set-up and tests: node-oidc-provider (an
// OpenID-certified implementation) with static users, the broker's clients, JWT access tokens
// whose audience is the broker (resource indicators), and signing keys that can be rotated while
// it runs. Started by up.sh; every setting comes from the environment (see README.md here).
//
// Endpoints besides the provider's own (/.well-known/openid-configuration, /jwks, /auth, /token,
// /device/auth, /device, ...):
//   GET/POST /interaction/:uid        the login form (users.json) and the automatic consent
//   GET  /admin/keys                  the public signing keys, newest (signing) first
//   POST /admin/keys/rotate           a new key signs from now on; the old ones stay published
//   POST /admin/keys/retire           unpublish every key but the newest
// /admin/* need "Authorization: Bearer $OIDC_ADMIN_TOKEN".

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as path from 'node:path';
import { fileURLToPath } from 'node:url';

import Provider, { errors } from 'oidc-provider';

const here = path.dirname(fileURLToPath(import.meta.url));
const env = process.env;

const HOST = env.OIDC_HOST || '127.0.0.1';
const PORT = Number(env.OIDC_PORT || 9400);
const ISSUER = env.OIDC_ISSUER || `http://${HOST}:${PORT}`;
const STATE_DIR = env.OIDC_STATE_DIR || path.join(here, '..', '..', '.dev-oidc');
const KEYS_FILE = env.OIDC_KEYS_FILE || path.join(STATE_DIR, 'jwks.json');
const USERS_FILE = env.OIDC_USERS_FILE || path.join(here, 'users.json');
const AUDIENCE = env.OIDC_AUDIENCE || 'urn:aifactory:broker';
// Another resource server the CLI client may ask tokens for: a token for it is a real token whose
// audience is not the broker.
const OTHER_AUDIENCE = env.OIDC_OTHER_AUDIENCE || 'urn:aifactory:other-service';
const ACCESS_TOKEN_TTL = Number(env.OIDC_ACCESS_TOKEN_TTL || 600);
const SHORT_TTL = Number(env.OIDC_SHORT_TTL || 3);
const ADMIN_TOKEN = env.OIDC_ADMIN_TOKEN || '';
const UI_SECRET = env.OIDC_UI_CLIENT_SECRET || 'dev-only-broker-ui-secret';
const ROBOT_SECRET = env.OIDC_ROBOT_CLIENT_SECRET || 'dev-only-broker-robot-secret';
const UI_REDIRECTS = (env.OIDC_UI_REDIRECT_URIS || 'http://127.0.0.1:8080/ui/auth/callback')
  .split(',').map((s) => s.trim()).filter(Boolean);
// Where the broker's sign-out comes back to after ending the session here: its sign-in page,
// beside each callback unless given.
const UI_AFTER_LOGOUT = (env.OIDC_UI_POST_LOGOUT_REDIRECT_URIS
  || UI_REDIRECTS.map((uri) => uri.replace(/\/ui\/auth\/callback$/, '/ui/login')).join(','))
  .split(',').map((s) => s.trim()).filter(Boolean);
const SIGNING_ALG = 'RS256';
const DEVICE_GRANT = 'urn:ietf:params:oauth:grant-type:device_code';

function log(message) {
  process.stdout.write(`${new Date().toISOString()} oidc ${message}\n`);
}

const { users } = JSON.parse(fs.readFileSync(USERS_FILE, 'utf8'));
const usersBySub = new Map(users.map((u) => [u.sub, u]));
const usersByName = new Map(users.map((u) => [u.username, u]));

// --- signing keys: a JWKS file of private keys, newest first (the first one signs) ---

function newSigningKey() {
  const { privateKey } = crypto.generateKeyPairSync('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: `k-${crypto.randomBytes(6).toString('hex')}`, use: 'sig', alg: SIGNING_ALG };
}

function readKeys() {
  if (fs.existsSync(KEYS_FILE)) return JSON.parse(fs.readFileSync(KEYS_FILE, 'utf8'));
  const jwks = { keys: [newSigningKey()] };
  writeKeys(jwks);
  return jwks;
}

function writeKeys(jwks) {
  fs.mkdirSync(path.dirname(KEYS_FILE), { recursive: true });
  const partial = `${KEYS_FILE}.${process.pid}.tmp`;
  fs.writeFileSync(partial, JSON.stringify(jwks, null, 2), { mode: 0o600 });
  fs.renameSync(partial, KEYS_FILE);
}

function publicKeys(jwks) {
  return jwks.keys.map(({ kty, kid, use, alg, n, e, crv, x, y }) => (
    Object.fromEntries(Object.entries({ kty, kid, use, alg, n, e, crv, x, y })
      .filter(([, v]) => v !== undefined))));
}

// --- the provider ---

const clients = [
  {
    client_id: 'broker-ui',
    client_name: 'AI Factory GPU broker (web)',
    client_secret: UI_SECRET,
    redirect_uris: UI_REDIRECTS,
    post_logout_redirect_uris: UI_AFTER_LOGOUT,
    grant_types: ['authorization_code'],
    response_types: ['code'],
    token_endpoint_auth_method: 'client_secret_basic',
  },
  {
    client_id: 'broker-cli',
    client_name: 'AI Factory GPU broker (command line)',
    token_endpoint_auth_method: 'none',
    grant_types: [DEVICE_GRANT],
    response_types: [],
    redirect_uris: [],
  },
  {
    // Like broker-cli, but its access tokens live OIDC_SHORT_TTL seconds: for expiry tests.
    client_id: 'broker-tests-short',
    client_name: 'broker tests (short-lived tokens)',
    token_endpoint_auth_method: 'none',
    grant_types: [DEVICE_GRANT],
    response_types: [],
    redirect_uris: [],
  },
  {
    // A machine client (no user): its tokens name no broker user.
    client_id: 'broker-robot',
    client_name: 'broker tests (client credentials)',
    client_secret: ROBOT_SECRET,
    token_endpoint_auth_method: 'client_secret_basic',
    grant_types: ['client_credentials'],
    response_types: [],
    redirect_uris: [],
    scope: 'broker',
  },
];

function account(user) {
  return {
    accountId: user.sub,
    async claims() {
      return {
        sub: user.sub, preferred_username: user.username, name: user.name, email: user.email,
      };
    },
  };
}

function buildProvider(jwks) {
  const provider = new Provider(ISSUER, {
    clients,
    jwks,
    cookies: { keys: [cookieSecret] },
    findAccount: async (ctx, sub) => {
      const user = usersBySub.get(sub);
      return user ? account(user) : undefined;
    },
    claims: {
      openid: ['sub'],
      profile: ['preferred_username', 'name'],
      email: ['email'],
    },
    scopes: ['openid', 'profile', 'email', 'broker'],
    responseTypes: ['code'],
    conformIdTokenClaims: false,
    pkce: { required: () => true },
    features: {
      devInteractions: { enabled: false },
      deviceFlow: { enabled: true },
      clientCredentials: { enabled: true },
      revocation: { enabled: true },
      resourceIndicators: {
        enabled: true,
        defaultResource: async (ctx, client, oneOf) => oneOf || AUDIENCE,
        useGrantedResource: async () => true,
        getResourceServerInfo: async (ctx, resource, client) => {
          if (resource !== AUDIENCE && resource !== OTHER_AUDIENCE) throw new errors.InvalidTarget();
          return {
            scope: 'broker',
            audience: resource,
            accessTokenTTL: client.clientId === 'broker-tests-short' ? SHORT_TTL : ACCESS_TOKEN_TTL,
            accessTokenFormat: 'jwt',
            jwt: { sign: { alg: SIGNING_ALG } },
          };
        },
      },
    },
    // The broker names users by preferred_username: put it (and email, as Keycloak does) into
    // the JWT access tokens as well.
    extraTokenClaims: async (ctx, token) => {
      const user = token.accountId ? usersBySub.get(token.accountId) : undefined;
      return user ? { preferred_username: user.username, email: user.email } : undefined;
    },
    ttl: {
      AccessToken: (ctx, token) => token.resourceServer?.accessTokenTTL || ACCESS_TOKEN_TTL,
      ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL || ACCESS_TOKEN_TTL,
      AuthorizationCode: 60,
      DeviceCode: 600,
      IdToken: ACCESS_TOKEN_TTL,
      Interaction: 600,
      Session: 3600,
      Grant: 3600,
    },
    renderError: async (ctx, out) => {
      ctx.type = 'html';
      ctx.body = page('Sign-in error', `<p>${escape(out.error)}: ${escape(out.error_description || '')}</p>`);
    },
  });
  provider.proxy = false;
  return provider;
}

const cookieSecret = (() => {
  const file = path.join(STATE_DIR, 'cookie-secret');
  fs.mkdirSync(STATE_DIR, { recursive: true });
  if (!fs.existsSync(file)) fs.writeFileSync(file, crypto.randomBytes(32).toString('hex'), { mode: 0o600 });
  return fs.readFileSync(file, 'utf8').trim();
})();

let keys = readKeys();
let provider = buildProvider(keys);
let handle = provider.callback();

// Replace the provider with one holding the new keys. Sessions, grants and interactions live in
// the memory adapter's module-level storage, so they survive the swap.
function installKeys(jwks) {
  writeKeys(jwks);
  keys = jwks;
  provider = buildProvider(jwks);
  handle = provider.callback();
}

// --- HTML of the login form ---

function escape(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function page(title, body) {
  return `<!DOCTYPE html><html><head><meta charset="utf-8"><title>${escape(title)}</title></head>`
    + `<body><h1>${escape(title)}</h1>${body}</body></html>`;
}

function loginForm(uid, clientName, error) {
  return page('Sign in', `<p>to ${escape(clientName)}</p>`
    + (error ? `<p class="error" role="alert">${escape(error)}</p>` : '')
    + `<form method="post" action="/interaction/${escape(uid)}/login">`
    + '<label>User name <input name="username" autocomplete="username" autofocus></label>'
    + '<label>Password <input name="password" type="password" autocomplete="current-password"></label>'
    + '<button type="submit">Sign in</button></form>');
}

// --- request handling ---

async function readForm(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 16384) throw new Error('form too large');
    chunks.push(chunk);
  }
  return new URLSearchParams(Buffer.concat(chunks).toString('utf8'));
}

function send(res, status, type, body) {
  res.writeHead(status, { 'Content-Type': type, 'Cache-Control': 'no-store' });
  res.end(body);
}

async function consent(req, res, details) {
  // The broker's clients are first-party: grant what they ask without asking the user.
  const { prompt: { details: missing }, params, session: { accountId } } = details;
  const grant = details.grantId
    ? await provider.Grant.find(details.grantId)
    : new provider.Grant({ accountId, clientId: params.client_id });
  if (missing.missingOIDCScope) grant.addOIDCScope(missing.missingOIDCScope.join(' '));
  if (missing.missingOIDCClaims) grant.addOIDCClaims(missing.missingOIDCClaims);
  for (const [resource, scopes] of Object.entries(missing.missingResourceScopes || {})) {
    grant.addResourceScope(resource, scopes.join(' '));
  }
  const grantId = await grant.save();
  await provider.interactionFinished(req, res, { consent: details.grantId ? {} : { grantId } });
}

async function interaction(req, res, uid, action) {
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) throw new errors.SessionNotFound('interaction mismatch');
  const client = await provider.Client.find(details.params.client_id);
  const clientName = client?.clientName || details.params.client_id;
  if (details.prompt.name === 'consent') {
    await consent(req, res, details);
    return;
  }
  if (req.method === 'GET' && !action) {
    send(res, 200, 'text/html; charset=utf-8', loginForm(uid, clientName));
    return;
  }
  if (req.method === 'POST' && action === 'login') {
    const form = await readForm(req);
    const user = usersByName.get(form.get('username') || '');
    const given = Buffer.from(form.get('password') || '');
    const expected = Buffer.from(user ? user.password : '');
    if (!user || given.length !== expected.length || !crypto.timingSafeEqual(given, expected)) {
      log(`login refused for ${JSON.stringify(form.get('username') || '')}`);
      send(res, 401, 'text/html; charset=utf-8', loginForm(uid, clientName, 'Wrong user name or password.'));
      return;
    }
    log(`login ${user.username} for ${details.params.client_id}`);
    await provider.interactionFinished(req, res, { login: { accountId: user.sub } });
    return;
  }
  send(res, 405, 'text/plain', 'method not allowed\n');
}

function adminAllowed(req) {
  if (!ADMIN_TOKEN) return false;
  const given = Buffer.from(req.headers.authorization || '');
  const expected = Buffer.from(`Bearer ${ADMIN_TOKEN}`);
  return given.length === expected.length && crypto.timingSafeEqual(given, expected);
}

function admin(req, res, action) {
  if (!adminAllowed(req)) {
    send(res, 401, 'application/json', '{"error":"unauthorized"}\n');
    return;
  }
  if (req.method === 'POST' && action === 'rotate') {
    const key = newSigningKey();
    installKeys({ keys: [key, ...keys.keys] });
    log(`signing key rotated: ${key.kid} signs now; published ${keys.keys.map((k) => k.kid).join(', ')}`);
  } else if (req.method === 'POST' && action === 'retire') {
    const retired = keys.keys.slice(1).map((k) => k.kid);
    installKeys({ keys: keys.keys.slice(0, 1) });
    log(`signing keys retired: ${retired.join(', ') || '(none)'}`);
  } else if (!(req.method === 'GET' && action === undefined)) {
    send(res, 404, 'application/json', '{"error":"not found"}\n');
    return;
  }
  send(res, 200, 'application/json', `${JSON.stringify({ keys: publicKeys(keys) })}\n`);
}

const server = http.createServer(async (req, res) => {
  const url = new URL(req.url, ISSUER);
  const parts = url.pathname.split('/').filter(Boolean);
  try {
    if (parts[0] === 'interaction' && parts.length >= 2 && parts.length <= 3) {
      await interaction(req, res, parts[1], parts[2]);
    } else if (parts[0] === 'admin' && parts[1] === 'keys' && parts.length <= 3) {
      admin(req, res, parts[2]);
    } else {
      handle(req, res);
    }
  } catch (err) {
    log(`error on ${req.method} ${url.pathname}: ${err.name}: ${err.message}`);
    if (!res.headersSent) {
      send(res, err.statusCode || 500, 'text/html; charset=utf-8', page('Sign-in error', `<p>${escape(err.message)}</p>`));
    }
  }
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => server.close(() => process.exit(0)));
}

server.listen(PORT, HOST, () => {
  log(`issuer ${ISSUER} listening on http://${HOST}:${PORT}; audience ${AUDIENCE}; `
    + `signing key ${keys.keys[0].kid}; access tokens live ${ACCESS_TOKEN_TTL}s`);
});
