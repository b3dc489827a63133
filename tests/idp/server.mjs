// Test identity provider for the tokend test suite.
//
// A real oidc-provider (OAuth 2.0 / OpenID Connect) server plus a small
// control API under /_test/ used by tests to seed grants, inject faults at the
// token endpoint and inspect what the token endpoint saw.
//
// Usage:  node tests/idp/server.mjs CONFIG.json
//
// Once listening it prints exactly one line to stdout:
//   READY {"port": N, "issuer": "http://127.0.0.1:N"}
// Everything else (diagnostics, oidc-provider notices) goes to stderr.
//
// Config JSON (only "clients" is required):
//   port                   int, 0 = pick a free port (default 0)
//   access_token_ttl       seconds (default 5)
//   refresh_token_ttl      seconds (default 86400)
//   rotate_refresh_tokens  bool (default true)
//   reuse_grace_seconds    seconds a just-rotated refresh token stays usable (default 0)
//   device_interval        seconds: the polling interval the device authorization
//                          response names (default: none named, so clients use 5)
//   exit_on_stdin_eof      bool: exit when stdin closes, so the server never
//                          outlives the process that started it (default false)
//   clients                list of oidc-provider client metadata objects
//   tls                    {cert, key, ca}: PEM file paths. Serve HTTPS and ask every
//                          client for a certificate (verified against ca for
//                          tls_client_auth; any for self_signed_tls_client_auth);
//                          mTLS client authentication and certificate-bound
//                          access tokens are then enabled
//
// Control API (never part of OAuth), all JSON:
//   POST   /_test/seed          {client_id, scope?, account_id?} -> {refresh_token, grant_id, ...}
//   POST   /_test/fault         {mode, count?, client_id?, user_agent_contains?, grant_type?,
//                                retry_after?, delay_ms?, error?, status?, body?, raw?, fields?,
//                                raw_fields?}
//                                (mode oauth_error answers {error} with status, default 400;
//                                html answers an HTML page with status, default 200;
//                                token_rewrite handles the request, then changes a 200's
//                                body: expires_in? (null removes it), drop_refresh_token?)
//     respond_with: answer {status (default 200), body (JSON) or raw (text sent as
//                   application/json)} without asking oidc-provider
//     override:     handled normally (a refresh token IS rotated), then the JSON
//                   answer's fields are replaced by `fields` and by `raw_fields`
//                   (name -> raw JSON text, for values JSON.stringify cannot write)
//   GET    /_test/fault         current fault
//   POST   /_test/config        {reuse_grace_seconds?, rotate_refresh_tokens?, access_token_ttl?,
//                                refresh_token_ttl?, device_interval?, refresh_expires_in?,
//                                refresh_expires_at?}
//     refresh_expires_in: seconds; token responses say refresh_expires_in: N (a sliding
//                         refresh-token lifetime, as Keycloak's SSO idle timeout)
//     refresh_expires_at: unix seconds; token responses say refresh_expires_in: the
//                         seconds left until then (an absolute one, as its SSO max)
//                         (null: not sent, the default for both)
//
// Sign-in pages are oidc-provider's development interactions: any login name is
// accepted (it becomes the account id) and consent grants what was asked.
//   GET    /_test/config        current runtime settings
//   GET    /_test/log           token endpoint requests, in arrival order
//   DELETE /_test/log           clear the log
//   GET    /_test/stats         {max_concurrent_per_grant, max_concurrent_total, requests, in_flight_total}
//   DELETE /_test/stats         reset the counters (requests still in flight stay counted)
//   POST   /_test/revoke_grant  {grant_id} -> {revoked: bool}

import { createHash, generateKeyPairSync, randomBytes, randomUUID } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { createServer as createHttpsServer } from 'node:https';

// oidc-provider prints notices with console.info (stdout). stdout is reserved
// for the READY line, so route every console message to stderr.
const toStderr = (...args) => console.error(...args);
console.log = toStderr;
console.info = toStderr;
console.debug = toStderr;
console.warn = (...args) => {
  // The token endpoint body is read here first (to log and filter requests by
  // client), then handed to oidc-provider as a pre-read body. oidc-provider
  // supports that and warns once; the warning is expected, so drop it.
  if (String(args[0]).includes('already parsed request body detected')) return;
  console.error(...args);
};

const { default: Provider } = await import('oidc-provider');

// ---------------------------------------------------------------------------
// configuration and runtime state

const configPath = process.argv[2];
if (!configPath) {
  console.error('usage: node server.mjs CONFIG.json');
  process.exit(2);
}
const config = JSON.parse(readFileSync(configPath, 'utf8'));
if (!Array.isArray(config.clients)) {
  console.error('config: "clients" must be a list of client metadata objects');
  process.exit(2);
}

const settings = {
  access_token_ttl: config.access_token_ttl ?? 5,
  refresh_token_ttl: config.refresh_token_ttl ?? 86400,
  rotate_refresh_tokens: config.rotate_refresh_tokens ?? true,
  reuse_grace_seconds: config.reuse_grace_seconds ?? 0,
  device_interval: config.device_interval ?? null,
  refresh_expires_in: config.refresh_expires_in ?? null,
  refresh_expires_at: config.refresh_expires_at ?? null,
};

const FAULT_MODES = new Set([
  'none', 'status_500', 'status_429', 'status_503', 'html_403',
  'delay', 'hang', 'reset', 'lost_after_rotate', 'oauth_error', 'html', 'token_rewrite',
  'respond_with', 'override',
]);
const NO_FAULT = { mode: 'none' };
let fault = NO_FAULT;
// resolvers of requests parked by the "hang" fault; called when the fault changes
const hangWaiters = new Set();

const requestLog = [];
const stats = {
  requests: 0,
  inFlightTotal: 0,
  maxConcurrentTotal: 0,
  inFlightPerGrant: new Map(),
  maxConcurrentPerGrant: new Map(),
};

// refresh token value -> grant id, for every refresh token ever stored (kept
// after revocation so the log can still name the grant of a dead token)
const refreshTokenGrant = new Map();
// refresh token value -> Date.now() of its rotation (consumption)
const rotatedAt = new Map();

const sha256 = (value) => createHash('sha256').update(value).digest('hex');
const epoch = () => Math.floor(Date.now() / 1000);

// ---------------------------------------------------------------------------
// Unbounded in-memory adapter: one Map per model name, expiry honoured on read
// (the adapter bundled with oidc-provider is an LRU capped at ~1000 entries).

const stores = new Map(); // model name -> Map(id -> {payload, expiresAt})
const grantIndexes = new Map(); // model name -> Map(grantId -> Set(id))
const uidIndex = new Map(); // session uid -> id
const userCodeIndex = new Map(); // user code -> id

class UnboundedMemoryAdapter {
  constructor(name) {
    this.name = name;
    if (!stores.has(name)) {
      stores.set(name, new Map());
      grantIndexes.set(name, new Map());
    }
    this.store = stores.get(name);
    this.grants = grantIndexes.get(name);
  }

  #unindex(id, payload) {
    if (payload.grantId) {
      const ids = this.grants.get(payload.grantId);
      if (ids) {
        ids.delete(id);
        if (ids.size === 0) this.grants.delete(payload.grantId);
      }
    }
    if (payload.uid && uidIndex.get(payload.uid) === id) uidIndex.delete(payload.uid);
    if (payload.userCode && userCodeIndex.get(payload.userCode) === id) {
      userCodeIndex.delete(payload.userCode);
    }
  }

  #entry(id) {
    const entry = this.store.get(id);
    if (!entry) return undefined;
    if (entry.expiresAt <= Date.now()) {
      this.store.delete(id);
      this.#unindex(id, entry.payload);
      return undefined;
    }
    return entry;
  }

  async upsert(id, payload, expiresIn) {
    const previous = this.store.get(id);
    if (previous) this.#unindex(id, previous.payload);
    const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : Infinity;
    this.store.set(id, { payload: structuredClone(payload), expiresAt });
    if (payload.grantId) {
      if (!this.grants.has(payload.grantId)) this.grants.set(payload.grantId, new Set());
      this.grants.get(payload.grantId).add(id);
    }
    if (payload.uid) uidIndex.set(payload.uid, id);
    if (payload.userCode) userCodeIndex.set(payload.userCode, id);
    if (this.name === 'RefreshToken' && payload.grantId) refreshTokenGrant.set(id, payload.grantId);
  }

  async find(id) {
    const entry = this.#entry(id);
    return entry ? structuredClone(entry.payload) : undefined;
  }

  async findByUid(uid) {
    const id = uidIndex.get(uid);
    return id === undefined ? undefined : this.find(id);
  }

  async findByUserCode(userCode) {
    const id = userCodeIndex.get(userCode);
    return id === undefined ? undefined : this.find(id);
  }

  async consume(id) {
    const entry = this.#entry(id);
    if (entry) {
      entry.payload.consumed = epoch();
      if (this.name === 'RefreshToken') rotatedAt.set(id, Date.now());
    }
  }

  async destroy(id) {
    const entry = this.store.get(id);
    this.store.delete(id);
    if (entry) this.#unindex(id, entry.payload);
  }

  async revokeByGrantId(grantId) {
    const ids = this.grants.get(grantId);
    if (!ids) return;
    for (const id of ids) {
      const entry = this.store.get(id);
      this.store.delete(id);
      if (entry?.payload.uid && uidIndex.get(entry.payload.uid) === id) uidIndex.delete(entry.payload.uid);
      if (entry?.payload.userCode && userCodeIndex.get(entry.payload.userCode) === id) {
        userCodeIndex.delete(entry.payload.userCode);
      }
    }
    this.grants.delete(grantId);
  }
}

// Drop expired entries now and then so long runs do not accumulate garbage.
setInterval(() => {
  const now = Date.now();
  for (const [name, store] of stores) {
    const adapter = new UnboundedMemoryAdapter(name);
    for (const [id, entry] of store) {
      if (entry.expiresAt <= now) adapter.destroy(id);
    }
  }
}, 30_000).unref();

// Revoke a grant and every token issued under it (used by the control API).
function revokeGrant(grantId) {
  const grantStore = stores.get('Grant');
  const existed = !!grantStore?.has(grantId);
  for (const name of stores.keys()) {
    new UnboundedMemoryAdapter(name).revokeByGrantId(grantId);
  }
  grantStore?.delete(grantId);
  return existed;
}

// ---------------------------------------------------------------------------
// provider configuration

const OIDC_SCOPES = ['openid', 'offline_access'];
// Every scope any client may hold is registered as a static scope, so that
// refresh grants return them and scope narrowing on refresh works without a
// resource indicator.
const allScopes = new Set([...OIDC_SCOPES, 'profile', 'email', 'read', 'write']);
for (const client of config.clients) {
  for (const scope of (client.scope ?? '').split(' ')) if (scope) allScopes.add(scope);
}

const resourceServerScope = () => [...allScopes].filter((s) => !OIDC_SCOPES.includes(s)).join(' ');

// ID token signing key, generated per run (avoids the development keys).
const signingKey = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
signingKey.kid = `idp-${randomUUID()}`;
signingKey.use = 'sig';
signingKey.alg = 'RS256';

const providerConfiguration = {
  adapter: UnboundedMemoryAdapter,
  clients: config.clients,
  jwks: { keys: [signingKey] },
  cookies: { keys: [randomBytes(32).toString('hex')] },
  scopes: [...allScopes],
  clockTolerance: 2,
  clientAuthMethods: [
    'client_secret_basic', 'client_secret_jwt', 'client_secret_post', 'private_key_jwt', 'none',
    ...(config.tls ? ['tls_client_auth', 'self_signed_tls_client_auth'] : []),
  ],
  routes: { token: '/token' },
  features: {
    devInteractions: { enabled: true },
    deviceFlow: { enabled: true },
    clientCredentials: { enabled: true },
    // Any authenticated client may introspect; public clients only their own tokens.
    introspection: {
      enabled: true,
      allowedPolicy: async (ctx, client, token) => client.clientAuthMethod !== 'none' || token.clientId === client.clientId,
    },
    // A client may only revoke its own tokens.
    revocation: {
      enabled: true,
      allowedPolicy: async (ctx, client, token) => token.clientId === client.clientId,
    },
    // The client certificate is the TLS connection's own (node:https with requestCert).
    mTLS: {
      enabled: !!config.tls,
      certificateBoundAccessTokens: true,
      tlsClientAuth: true,
      selfSignedTlsClientAuth: true,
      getCertificate: (ctx) => ctx.req.socket.getPeerX509Certificate?.(),
      certificateAuthorized: (ctx) => ctx.req.socket.authorized === true,
      certificateSubjectMatches: (ctx, property, expected) => {
        const cert = ctx.req.socket.getPeerX509Certificate?.();
        if (!cert) return false;
        if (property === 'tls_client_auth_san_dns') {
          return (cert.subjectAltName ?? '').split(', ').includes(`DNS:${expected}`);
        }
        return false;
      },
    },
    resourceIndicators: {
      enabled: true,
      // Only used when a request names a resource explicitly: any absolute
      // URI is accepted as an API audience with an opaque access token.
      defaultResource: async (ctx, client, oneOf) => oneOf,
      useGrantedResource: async () => true,
      getResourceServerInfo: async () => ({
        scope: resourceServerScope(),
        accessTokenTTL: settings.access_token_ttl,
        accessTokenFormat: 'opaque',
      }),
    },
  },
  ttl: {
    AccessToken: () => settings.access_token_ttl,
    ClientCredentials: () => settings.access_token_ttl,
    RefreshToken: () => settings.refresh_token_ttl,
    Grant: () => Math.max(settings.refresh_token_ttl * 2, 14 * 86400),
    IdToken: () => 3600,
    AuthorizationCode: () => 60,
    DeviceCode: () => 600,
    BackchannelAuthenticationRequest: () => 600,
    PreAuthorizedCode: () => 600,
    Interaction: () => 3600,
    Session: () => 14 * 86400,
  },
  rotateRefreshToken: () => settings.rotate_refresh_tokens,
  issueRefreshToken: async (ctx, client) => client.grantTypeAllowed('refresh_token'),
  // Seeded refresh tokens are not tied to a browser session.
  expiresWithSession: async () => false,
  findAccount: async (ctx, sub) => ({
    accountId: sub,
    claims: async () => ({ sub }),
  }),
};

// ---------------------------------------------------------------------------
// token endpoint request inspection helpers

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (chunk) => chunks.push(chunk));
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function formDecode(value) {
  try {
    return decodeURIComponent(value.replace(/\+/g, '%20'));
  } catch {
    return value;
  }
}

function decodeJwtPayload(jwt) {
  try {
    return JSON.parse(Buffer.from(String(jwt).split('.')[1], 'base64url').toString('utf8'));
  } catch {
    return undefined;
  }
}

// Which client sent this request and how it authenticated (nothing verified).
function identifyClient(headers, params) {
  const authorization = headers.authorization ?? '';
  if (/^basic\s/i.test(authorization)) {
    const decoded = Buffer.from(authorization.slice(6).trim(), 'base64').toString('utf8');
    const i = decoded.indexOf(':');
    return { clientId: formDecode(i === -1 ? decoded : decoded.slice(0, i)), authMethod: 'basic' };
  }
  if (params.get('client_assertion')) {
    const payload = decodeJwtPayload(params.get('client_assertion'));
    return { clientId: payload?.iss ?? payload?.sub ?? params.get('client_id'), authMethod: 'jwt' };
  }
  if (params.get('client_secret') !== null) {
    return { clientId: params.get('client_id'), authMethod: 'post' };
  }
  return { clientId: params.get('client_id'), authMethod: 'none' };
}

function faultApplies(entry) {
  if (fault.mode === 'none') return false;
  if (fault.client_id !== undefined && fault.client_id !== entry.client_id) return false;
  if (fault.user_agent_contains !== undefined && !entry.user_agent.includes(fault.user_agent_contains)) {
    return false;
  }
  if (fault.grant_type !== undefined && fault.grant_type !== entry.grant_type) return false;
  return true;
}

function takeFault(entry) {
  if (!faultApplies(entry)) return undefined;
  const applied = fault;
  if (typeof fault.remaining === 'number') {
    fault.remaining -= 1;
    if (fault.remaining <= 0) fault = NO_FAULT;
  }
  return applied;
}

function setFault(next) {
  fault = next;
  for (const wake of hangWaiters) wake();
  hangWaiters.clear();
}

const BLOCKED_PAGE = `<!DOCTYPE html>
<html lang="en-US">
<head>
<meta charset="UTF-8">
<title>Attention Required! | Edge Shield</title>
</head>
<body>
<div id="block-page">
  <h1>Sorry, you have been blocked</h1>
  <h2>You are unable to access this site</h2>
  <p>This website is using a security service to protect itself from online attacks.
  The action you just performed triggered the security solution.</p>
  <p>Ray ID: <strong>${randomBytes(8).toString('hex')}</strong></p>
</div>
</body>
</html>
`;

function startInFlight(grantId) {
  stats.requests += 1;
  stats.inFlightTotal += 1;
  stats.maxConcurrentTotal = Math.max(stats.maxConcurrentTotal, stats.inFlightTotal);
  if (grantId) {
    const n = (stats.inFlightPerGrant.get(grantId) ?? 0) + 1;
    stats.inFlightPerGrant.set(grantId, n);
    stats.maxConcurrentPerGrant.set(grantId, Math.max(stats.maxConcurrentPerGrant.get(grantId) ?? 0, n));
  }
}

function endInFlight(grantId) {
  stats.inFlightTotal -= 1;
  if (grantId) {
    const n = stats.inFlightPerGrant.get(grantId) - 1;
    if (n <= 0) stats.inFlightPerGrant.delete(grantId);
    else stats.inFlightPerGrant.set(grantId, n);
  }
}

// If grace reuse applies to the presented (already rotated) refresh token,
// mint a fresh copy of it for the same grant and return the copy's value.
async function graceCopy(provider, value, clientId) {
  const graceMs = settings.reuse_grace_seconds * 1000;
  if (!(graceMs > 0) || !rotatedAt.has(value)) return undefined;
  if (Date.now() - rotatedAt.get(value) >= graceMs) return undefined;
  const old = await provider.RefreshToken.find(value, { ignoreExpiration: true });
  if (!old || !old.consumed || old.isExpired || old.clientId !== clientId) return undefined;
  if (!(await provider.Grant.find(old.grantId))) return undefined;
  const client = await provider.Client.find(old.clientId);
  if (!client) return undefined;
  const copy = new provider.RefreshToken({
    accountId: old.accountId,
    acr: old.acr,
    amr: old.amr,
    authTime: old.authTime,
    claims: old.claims,
    client,
    expiresWithSession: old.expiresWithSession,
    grantId: old.grantId,
    gty: old.gty,
    iiat: old.iiat,
    nonce: old.nonce,
    resource: old.resource,
    rotations: old.rotations,
    scope: old.scope,
    sessionUid: old.sessionUid,
    sid: old.sid,
  });
  return copy.save();
}

// ---------------------------------------------------------------------------
// token endpoint middleware: logging, concurrency stats, faults

async function tokenEndpoint(provider, ctx, next) {
  const { req, res } = ctx;
  const entry = {
    t_start: Date.now() / 1000,
    t_end: null,
    client_id: null,
    grant_type: null,
    refresh_token_sha256: null,
    grant_id: null,
    status: null,
    fault: null,
    user_agent: req.headers['user-agent'] ?? '',
    auth_method_seen: 'none',
    provider_status: null,
    error: null,
    grace_reuse: false,
  };
  requestLog.push(entry);

  const raw = await readBody(req);
  const params = new URLSearchParams(raw.toString('utf8'));
  let rewritten = false;

  const { clientId, authMethod } = identifyClient(req.headers, params);
  entry.client_id = clientId ?? null;
  entry.auth_method_seen = authMethod;
  entry.grant_type = params.get('grant_type');

  const presented = params.get('refresh_token');
  if (presented) {
    entry.refresh_token_sha256 = sha256(presented);
    entry.grant_id = refreshTokenGrant.get(presented) ?? null;
  }

  const grantId = entry.grant_id;
  startInFlight(grantId);
  let finished = false;
  res.once('finish', () => {
    entry.status = res.statusCode;
  });
  res.once('close', () => {
    if (finished) return;
    finished = true;
    entry.t_end = Date.now() / 1000;
    endInFlight(grantId);
  });

  const applied = takeFault(entry);
  entry.fault = applied ? applied.mode : null;

  const abandon = (reset) => {
    ctx.respond = false;
    if (reset && typeof req.socket.resetAndDestroy === 'function') req.socket.resetAndDestroy();
    else req.socket.destroy();
  };

  switch (applied?.mode) {
    case 'status_500':
      ctx.status = 500;
      ctx.body = { error: 'server_error', error_description: 'injected fault' };
      return;
    case 'status_429':
    case 'status_503':
      ctx.status = applied.mode === 'status_429' ? 429 : 503;
      if (applied.retry_after !== undefined) ctx.set('Retry-After', String(applied.retry_after));
      ctx.body = applied.mode === 'status_429'
        ? { error: 'too_many_requests', error_description: 'rate limit exceeded' }
        : { error: 'temporarily_unavailable', error_description: 'service unavailable' };
      return;
    case 'oauth_error':
      ctx.status = applied.status ?? 400;
      ctx.body = { error: applied.error ?? 'invalid_request', error_description: 'injected fault' };
      return;
    case 'html':
      ctx.status = applied.status ?? 200;
      ctx.type = 'text/html; charset=UTF-8';
      ctx.body = '<!DOCTYPE html><html><head><title>Down for maintenance</title></head>'
        + '<body><h1>We will be back soon</h1></body></html>';
      return;
    case 'html_403':
      ctx.status = 403;
      ctx.type = 'text/html; charset=UTF-8';
      ctx.body = BLOCKED_PAGE;
      return;
    case 'reset':
      abandon(true);
      return;
    case 'respond_with':
      ctx.status = applied.status ?? 200;
      ctx.type = 'application/json';
      ctx.body = applied.raw ?? JSON.stringify(applied.body ?? {});
      return;
    case 'delay':
      await new Promise((resolve) => { setTimeout(resolve, applied.delay_ms ?? 1000); });
      break;
    case 'hang': {
      // Park until the fault is changed through the control API or the
      // client goes away. A released request is then handled normally.
      await new Promise((resolve) => {
        hangWaiters.add(resolve);
        res.once('close', resolve);
      });
      if (res.destroyed || req.socket.destroyed) {
        ctx.respond = false;
        return;
      }
      break;
    }
    default:
      break;
  }

  // client_credentials without a scope parameter: grant the client's allowed
  // (non-OpenID) scopes, as most identity providers do.
  if (entry.grant_type === 'client_credentials' && !params.get('scope') && clientId) {
    const client = await provider.Client.find(clientId);
    const allowed = (client?.scope ?? '').split(' ').filter((s) => s && !OIDC_SCOPES.includes(s));
    if (allowed.length) {
      params.set('scope', allowed.join(' '));
      rewritten = true;
    }
  }

  // Reuse grace window: answer a just-rotated refresh token as if it were
  // valid by handing the provider a fresh copy of it for the same grant.
  if (entry.grant_type === 'refresh_token' && presented) {
    const copy = await graceCopy(provider, presented, clientId);
    if (copy) {
      params.set('refresh_token', copy);
      rewritten = true;
      entry.grace_reuse = true;
    }
  }

  req.body = rewritten ? Buffer.from(params.toString()) : raw;
  await next();

  entry.provider_status = ctx.status;
  if (ctx.body && typeof ctx.body === 'object' && typeof ctx.body.error === 'string') {
    entry.error = ctx.body.error;
  }

  if (applied?.mode === 'token_rewrite' && ctx.status === 200 && ctx.body && typeof ctx.body === 'object') {
    const body = { ...ctx.body };
    if ('expires_in' in applied) {
      if (applied.expires_in === null) delete body.expires_in;
      else body.expires_in = applied.expires_in;
    }
    if (applied.drop_refresh_token) delete body.refresh_token;
    ctx.body = body;
  }

  if (ctx.status === 200 && ctx.body && typeof ctx.body === 'object' && ctx.body.refresh_token) {
    if (settings.refresh_expires_at !== null) {
      const left = Math.max(0, Math.round(settings.refresh_expires_at - Date.now() / 1000));
      ctx.body = { ...ctx.body, refresh_expires_in: left };
    } else if (settings.refresh_expires_in !== null) {
      ctx.body = { ...ctx.body, refresh_expires_in: settings.refresh_expires_in };
    }
  }

  if (applied?.mode === 'lost_after_rotate') {
    abandon(false);
  }
  if (applied?.mode === 'override' && ctx.body && typeof ctx.body === 'object') {
    const rawFields = applied.raw_fields ?? {};
    const merged = { ...ctx.body, ...(applied.fields ?? {}) };
    for (const name of Object.keys(rawFields)) delete merged[name];
    const pieces = Object.entries(rawFields).map(([name, raw]) => `${JSON.stringify(name)}:${raw}`);
    const text = JSON.stringify(merged);
    ctx.type = 'application/json';
    ctx.body = pieces.length === 0
      ? text
      : `${text.slice(0, -1)}${text.length > 2 ? ',' : ''}${pieces.join(',')}}`;
  }
}

// ---------------------------------------------------------------------------
// control API

async function readJson(req) {
  const raw = await readBody(req);
  if (raw.length === 0) return {};
  return JSON.parse(raw.toString('utf8'));
}

function parseFault(body) {
  const mode = body.mode ?? 'none';
  if (!FAULT_MODES.has(mode)) throw new Error(`unknown fault mode: ${mode}`);
  if (mode === 'none') return NO_FAULT;
  const next = { mode };
  if (body.count !== undefined && body.count !== null) {
    if (!Number.isInteger(body.count) || body.count < 1) throw new Error('count must be a positive integer');
    next.count = body.count;
    next.remaining = body.count;
  }
  for (const key of ['client_id', 'user_agent_contains', 'grant_type', 'error']) {
    if (body[key] !== undefined && body[key] !== null) next[key] = String(body[key]);
  }
  if ('expires_in' in body) next.expires_in = body.expires_in;
  if (body.drop_refresh_token) next.drop_refresh_token = true;
  for (const key of ['retry_after', 'delay_ms', 'status']) {
    if (body[key] !== undefined && body[key] !== null) {
      if (typeof body[key] !== 'number' || body[key] < 0) throw new Error(`${key} must be a non-negative number`);
      next[key] = body[key];
    }
  }
  if (body.status !== undefined && body.status !== null) {
    if (!Number.isInteger(body.status) || body.status < 100 || body.status > 599) throw new Error('status must be an HTTP status');
    next.status = body.status;
  }
  if (body.raw !== undefined && body.raw !== null) next.raw = String(body.raw);
  for (const key of ['body', 'fields', 'raw_fields']) {
    if (body[key] !== undefined && body[key] !== null) {
      if (typeof body[key] !== 'object' || Array.isArray(body[key])) throw new Error(`${key} must be an object`);
      next[key] = body[key];
    }
  }
  if (next.raw_fields) {
    for (const value of Object.values(next.raw_fields)) {
      if (typeof value !== 'string') throw new Error('raw_fields values must be strings of raw JSON');
    }
  }
  return next;
}

async function seed(provider, body) {
  const clientId = body.client_id;
  const scope = body.scope ?? 'openid offline_access read';
  const accountId = body.account_id ?? 'user';
  const client = clientId ? await provider.Client.find(clientId) : undefined;
  if (!client) {
    return [404, { error: 'unknown_client', error_description: `no client ${clientId}` }];
  }
  const grant = new provider.Grant({ accountId, clientId });
  grant.addOIDCScope(scope);
  const grantId = await grant.save();
  const refreshToken = new provider.RefreshToken({
    client,
    accountId,
    grantId,
    scope,
    gty: 'authorization_code',
    authTime: epoch(),
    expiresWithSession: false,
    rotations: 0,
  });
  const value = await refreshToken.save();
  return [200, {
    refresh_token: value, grant_id: grantId, client_id: clientId, account_id: accountId, scope,
  }];
}

function snapshotStats() {
  return {
    max_concurrent_per_grant: Object.fromEntries(stats.maxConcurrentPerGrant),
    max_concurrent_total: stats.maxConcurrentTotal,
    requests: stats.requests,
    in_flight_total: stats.inFlightTotal,
  };
}

function publicFault() {
  const { remaining, ...rest } = fault;
  return remaining === undefined ? rest : { ...rest, remaining };
}

async function control(provider, ctx) {
  const route = `${ctx.method} ${ctx.path}`;
  let status = 200;
  let body;
  try {
    switch (route) {
      case 'POST /_test/seed':
        [status, body] = await seed(provider, await readJson(ctx.req));
        break;
      case 'POST /_test/fault':
        setFault(parseFault(await readJson(ctx.req)));
        body = publicFault();
        break;
      case 'GET /_test/fault':
        body = publicFault();
        break;
      case 'POST /_test/config': {
        const update = await readJson(ctx.req);
        for (const key of Object.keys(update)) {
          if (!(key in settings)) throw new Error(`unknown setting: ${key}`);
          const expected = key === 'rotate_refresh_tokens' ? 'boolean' : 'number';
          const nullable = ['device_interval', 'refresh_expires_in', 'refresh_expires_at'].includes(key)
            && update[key] === null;
          if (!nullable && typeof update[key] !== expected) throw new Error(`${key} must be a ${expected}`);
        }
        Object.assign(settings, update);
        body = { ...settings };
        break;
      }
      case 'GET /_test/config':
        body = { ...settings };
        break;
      case 'GET /_test/log':
        body = requestLog;
        break;
      case 'DELETE /_test/log':
        requestLog.length = 0;
        body = { cleared: true };
        break;
      case 'GET /_test/stats':
        body = snapshotStats();
        break;
      case 'DELETE /_test/stats':
        stats.requests = 0;
        stats.maxConcurrentTotal = stats.inFlightTotal;
        stats.maxConcurrentPerGrant = new Map(stats.inFlightPerGrant);
        body = snapshotStats();
        break;
      case 'POST /_test/revoke_grant': {
        const { grant_id: grantId } = await readJson(ctx.req);
        if (!grantId) throw new Error('grant_id is required');
        body = { revoked: revokeGrant(grantId) };
        break;
      }
      default:
        status = 404;
        body = { error: 'not_found', error_description: `no control route ${route}` };
    }
  } catch (err) {
    status = 400;
    const detail = err.error_description ? `: ${err.error_description}` : '';
    body = { error: 'bad_request', error_description: `${err.message}${detail}` };
  }
  ctx.status = status;
  ctx.body = body;
}

// ---------------------------------------------------------------------------
// startup

const server = config.tls
  ? createHttpsServer({
    cert: readFileSync(config.tls.cert),
    key: readFileSync(config.tls.key),
    ca: readFileSync(config.tls.ca),
    requestCert: true,
    // Unverified (self-signed) certificates are accepted at the TLS layer and judged
    // by client authentication: certificateAuthorized says whether ca issued it.
    rejectUnauthorized: false,
  })
  : createServer();
server.listen(config.port ?? 0, '127.0.0.1', () => {
  const { port } = server.address();
  const issuer = `${config.tls ? 'https' : 'http'}://127.0.0.1:${port}`;
  const provider = new Provider(issuer, providerConfiguration);

  provider.on('server_error', (ctx, err) => console.error('server_error', err));
  provider.on('grant.error', (ctx, err) => {
    const detail = err.error_detail ? ` (${err.error_detail})` : '';
    console.error(`grant.error ${err.error}: ${err.error_description ?? ''}${detail}`);
  });

  const tokenPath = new URL(provider.urlFor('token')).pathname;
  const devicePath = new URL(provider.urlFor('device_authorization')).pathname;
  provider.use(async (ctx, next) => {
    if (ctx.path.startsWith('/_test/')) return control(provider, ctx);
    if (ctx.method === 'POST' && ctx.path === tokenPath) return tokenEndpoint(provider, ctx, next);
    await next();
    if (ctx.path === devicePath && ctx.status === 200 && settings.device_interval !== null) {
      ctx.body = { ...ctx.body, interval: settings.device_interval };
    }
  });

  server.on('request', provider.callback());
  process.stdout.write(`READY {"port": ${port}, "issuer": "${issuer}"}\n`);
});

function shutdown() {
  setFault(NO_FAULT);
  server.close();
  server.closeAllConnections?.();
  process.exit(0);
}
process.on('SIGTERM', shutdown);
process.on('SIGINT', shutdown);
if (config.exit_on_stdin_eof) {
  process.stdin.on('end', shutdown);
  process.stdin.on('error', shutdown);
  process.stdin.resume();
}
