// A real OAuth 2.0 authorization server for the operator's integration tests.
//
// Built on `oidc-provider` (panva/node-oidc-provider). It issues client_credentials access
// tokens for RFC 8707 resource indicators: one `resource=` per request, one audience per
// token. This file documents exactly what the tests run against; see README.md beside it.
//
// Contract with the test harness (tests/support/oidc.rs):
//   * listens on 127.0.0.1, on a free port chosen by the OS;
//   * when ready, prints exactly ONE line to stdout: {"issuer":"http://127.0.0.1:PORT"};
//     everything else (logs, warnings) goes to stderr;
//   * mTLS mode (RFC 8705), when OIDC_SERVER_MTLS_DIR names a directory holding ca.pem,
//     server.pem, server-key.pem and self-signed-client.pem: the issuer is
//     https://127.0.0.1:PORT, a second HTTPS listener asks for client certificates, and the
//     ready line is {"issuer":"https://127.0.0.1:P1","mtls_token_endpoint":"https://127.0.0.1:P2/token"};
//   * federation mode, when OIDC_SERVER_FEDERATION_ISSUER is set (see "Federation mode"
//     below): Kubernetes ServiceAccount tokens authenticate clients m2m-federated and
//     m2m-federated-entra, and are exchanged (RFC 8693) by m2m-exchange;
//   * exits on SIGTERM, SIGINT, and when its stdin closes (so a crashed harness never
//     leaves it running).
//
// TEST USE ONLY: in-memory storage, keys generated at startup, well-known client secrets.

import * as crypto from 'node:crypto';
import * as fs from 'node:fs';
import * as http from 'node:http';
import * as https from 'node:https';
import * as path from 'node:path';

// ---------------------------------------------------------------------------------------
// stdout belongs to the ready line. oidc-provider prints notices with console.info (which
// goes to stdout), so send console.log/info/debug to stderr before anything else runs.
// The development-only warnings that are expected for a test server (in-memory adapter,
// Node version notice) are dropped unless OIDC_SERVER_VERBOSE=1.
// ---------------------------------------------------------------------------------------
const verbose = process.env.OIDC_SERVER_VERBOSE === '1';
const toStderr = (...args) => console.error(...args);
console.log = toStderr;
console.info = toStderr;
console.debug = toStderr;
const originalWarn = console.warn;
const expectedDevWarnings = [
  'quick start development-only in-memory adapter',
  'quick start development-only feature devInteractions',
  'Unsupported runtime',
  // The middleware below reads some token requests' bodies itself, on purpose.
  'already parsed request body detected',
];
console.warn = (...args) => {
  const text = args.map(String).join(' ');
  if (!verbose && expectedDevWarnings.some((w) => text.includes(w))) return;
  originalWarn(...args);
};
const log = (msg) => process.stderr.write(`[oidc-server] ${msg}\n`);

// Imported dynamically so the console redirection above is in place first.
const { default: Provider, errors } = await import('oidc-provider');
const jose = await import('jose');

// ---------------------------------------------------------------------------------------
// Resource servers (RFC 8707 resource indicators). The key is the exact `resource` value a
// client sends; a resource not listed here is answered with `invalid_target`.
// A token's `scope` is the requested scopes filtered down to this list (oidc-provider drops
// the others silently; if nothing is left the response has no `scope` at all).
// ---------------------------------------------------------------------------------------
const RESOURCE_SERVERS = {
  'https://orders.example.test': {
    scope: 'orders/read orders/write',
    accessTokenFormat: 'jwt',
    accessTokenTTL: 3600,
  },
  'https://payments.example.test': {
    scope: 'payments/read payments/write',
    accessTokenFormat: 'jwt',
    accessTokenTTL: 3600,
  },
  // Short-lived, to test renewal.
  'urn:test:short-lived': {
    scope: 'short/read',
    accessTokenFormat: 'jwt',
    accessTokenTTL: 6,
  },
  // The issued JWT carries `aud` as an ARRAY of two values (see formats.customizers.jwt
  // below): the operator must refuse it.
  'urn:test:multi-audience': {
    scope: 'multi/read',
    accessTokenFormat: 'jwt',
    accessTokenTTL: 3600,
  },
  // Opaque (not a JWT): nothing to decode, lifetime only from `expires_in`.
  'urn:test:opaque': {
    scope: 'opaque/read',
    accessTokenFormat: 'opaque',
    accessTokenTTL: 600,
  },
  // JWT whose token RESPONSE has no `expires_in` (removed by the middleware below); the JWT
  // itself still has `exp` (TTL 900 s), so a client must fall back to the JWT's `exp`.
  'urn:test:no-expires-in': {
    scope: 'noexp/read',
    accessTokenFormat: 'jwt',
    accessTokenTTL: 900,
  },
  // Opaque token AND no `expires_in`: the client knows nothing about the lifetime and must
  // use its configured default (TokenIssuer spec.defaultTokenLifetime).
  'urn:test:no-expires-in-opaque': {
    scope: 'noexp/read',
    accessTokenFormat: 'opaque',
    accessTokenTTL: 900,
  },
};

// Resources whose token response must not contain `expires_in`.
const STRIP_EXPIRES_IN = new Set(['urn:test:no-expires-in', 'urn:test:no-expires-in-opaque']);

// Extra audiences added to the JWT `aud` (making it an array) per resource.
const EXTRA_AUDIENCES = {
  'urn:test:multi-audience': ['https://other.example.test'],
};

// ---------------------------------------------------------------------------------------
// Rich authorization requests (RFC 9396): the one authorization details type this server
// knows, HelseID's. A detail of another type is 400 invalid_authorization_details
// (oidc-provider's own check), and so is a helseid_authorization detail without
// practitioner_role.organization.identifier.value as a string (this check). Granted details
// are exactly those requested; they come back in the token response (`authorization_details`)
// and in JWT access tokens (claim `authorization_details`).
// ---------------------------------------------------------------------------------------
const HELSEID_AUTHORIZATION = 'helseid_authorization';
const AUTHORIZATION_DETAILS_TYPES = {
  [HELSEID_AUTHORIZATION]: {
    validate(ctx, detail) {
      const value = detail.practitioner_role?.organization?.identifier?.value;
      if (typeof value !== 'string') {
        throw new errors.InvalidAuthorizationDetails(
          `${HELSEID_AUTHORIZATION} needs practitioner_role.organization.identifier.value, a string`,
        );
      }
    },
  },
};
// The details of this request's `authorization_details` parameter (already checked by
// oidc-provider and the type's validate), or undefined.
const requestedAuthorizationDetails = (ctx) => {
  const raw = ctx.oidc?.params?.authorization_details;
  return raw === undefined ? undefined : JSON.parse(raw);
};

const ALL_SCOPES = [...new Set(
  Object.values(RESOURCE_SERVERS).flatMap((rs) => rs.scope.split(' ')),
)].join(' ');

// ---------------------------------------------------------------------------------------
// Clients (static). All are machine-to-machine: client_credentials only, no redirects.
// ---------------------------------------------------------------------------------------
const m2mClient = (clientId, secret, authMethod) => ({
  client_id: clientId,
  client_secret: secret,
  token_endpoint_auth_method: authMethod,
  grant_types: ['client_credentials'],
  redirect_uris: [],
  response_types: [],
  scope: ALL_SCOPES,
  authorization_details_types: [HELSEID_AUTHORIZATION],
});

// Private keys of the private_key_jwt clients, by client id: { pem (PKCS#8), jwk }.
const CLIENT_PRIVATE_KEYS = {};

// Node 20 can deadlock when a garbage collection runs while a key object that
// generateKeyPairSync returned is being exported (the key-generation job's destructor takes
// the key's lock, which the export holds; seen as a server that never starts). So keys are
// generated straight to PEM and read back into fresh key objects that no job owns.
function generateKeyPair(type, options) {
  const { privateKey: pem } = crypto.generateKeyPairSync(type, {
    ...options,
    privateKeyEncoding: { type: 'pkcs8', format: 'pem' },
    publicKeyEncoding: { type: 'spki', format: 'pem' },
  });
  const privateKey = crypto.createPrivateKey(pem);
  return { privateKey, publicKey: crypto.createPublicKey(privateKey) };
}

function privateKeyJwtClient(clientId, alg) {
  const { privateKey, publicKey } = alg.startsWith('ES')
    ? generateKeyPair('ec', { namedCurve: alg === 'ES384' ? 'P-384' : 'P-256' })
    : generateKeyPair('rsa', { modulusLength: 2048 });
  const kid = `${clientId}-${crypto.randomBytes(4).toString('hex')}`;
  CLIENT_PRIVATE_KEYS[clientId] = {
    kid,
    alg,
    pem: privateKey.export({ format: 'pem', type: 'pkcs8' }),
    jwk: { ...privateKey.export({ format: 'jwk' }), kid, alg, use: 'sig' },
  };
  return {
    client_id: clientId,
    token_endpoint_auth_method: 'private_key_jwt',
    token_endpoint_auth_signing_alg: alg,
    jwks: { keys: [{ ...publicKey.export({ format: 'jwk' }), kid, alg, use: 'sig' }] },
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    scope: ALL_SCOPES,
    authorization_details_types: [HELSEID_AUTHORIZATION],
  };
}

// ---------------------------------------------------------------------------------------
// mTLS mode (RFC 8705): on when OIDC_SERVER_MTLS_DIR is set. The test writes the PEM files
// there (generated at test run time, tests/support/certs.rs); nothing is generated here.
//   ca.pem                  the CA that client certificates of tls_client_auth chain to
//   server.pem              this server's certificate (for 127.0.0.1), signed by that CA
//   server-key.pem          its private key
//   self-signed-client.pem  the certificate registered for self_signed_tls_client_auth
// ---------------------------------------------------------------------------------------
const MTLS_FILES = {
  ca: 'ca.pem',
  serverCert: 'server.pem',
  serverKey: 'server-key.pem',
  selfSignedClient: 'self-signed-client.pem',
};

function readMtlsDir(dir) {
  const files = {};
  for (const [name, file] of Object.entries(MTLS_FILES)) {
    const full = path.join(dir, file);
    try {
      files[name] = fs.readFileSync(full, 'utf8');
    } catch (err) {
      throw new Error(`OIDC_SERVER_MTLS_DIR: cannot read ${full}: ${err.message}`);
    }
  }
  return files;
}

const mtlsFiles = process.env.OIDC_SERVER_MTLS_DIR
  ? readMtlsDir(process.env.OIDC_SERVER_MTLS_DIR)
  : undefined;

// The client certificate of the request's TLS connection, or undefined (plain HTTP, the
// listener that asks for none, or a client that sent none).
function peerCertificate(ctx) {
  const { socket } = ctx;
  if (typeof socket?.getPeerCertificate !== 'function') return undefined;
  const peer = socket.getPeerCertificate();
  if (!peer?.raw) return undefined;
  return new crypto.X509Certificate(peer.raw);
}

// A certificate's subject as an RFC 4514 string ("CN=m2m-tls"; several RDNs joined with ','
// from the last to the first). Simple subjects only: values are not escaped.
const subjectDn = (cert) => cert.subject.split('\n').reverse().join(',');

// The mTLS clients. Both must present a certificate, at the mTLS alias of the token
// endpoint, and get tokens bound to it (cnf["x5t#S256"]):
//   m2m-tls          tls_client_auth (RFC 8705 §2.1): a certificate issued by ca.pem with
//                    subject CN=m2m-tls (any key: a renewed certificate is accepted too);
//   m2m-self-signed  self_signed_tls_client_auth (§2.2): exactly self-signed-client.pem,
//                    registered as the one key of its jwks (x5c = the certificate).
function mtlsClients(selfSignedPem) {
  const m2m = (clientId, authMethod) => ({
    client_id: clientId,
    token_endpoint_auth_method: authMethod,
    tls_client_certificate_bound_access_tokens: true,
    grant_types: ['client_credentials'],
    redirect_uris: [],
    response_types: [],
    scope: ALL_SCOPES,
  });
  const selfSigned = new crypto.X509Certificate(selfSignedPem);
  const jwk = {
    ...selfSigned.publicKey.export({ format: 'jwk' }),
    x5c: [selfSigned.raw.toString('base64')],
  };
  return [
    { ...m2m('m2m-tls', 'tls_client_auth'), tls_client_auth_subject_dn: 'CN=m2m-tls' },
    { ...m2m('m2m-self-signed', 'self_signed_tls_client_auth'), jwks: { keys: [jwk] } },
  ];
}

// ---------------------------------------------------------------------------------------
// Federation mode: Kubernetes ServiceAccount tokens as credentials, as Entra ID workload
// identity federation and Keycloak's federated client authentication accept them, and the
// RFC 8693 token-exchange grant. On only when OIDC_SERVER_FEDERATION_ISSUER is set:
//   OIDC_SERVER_FEDERATION_ISSUER     the `iss` the ServiceAccount tokens must carry (the
//                                     cluster's service-account issuer)
//   OIDC_SERVER_FEDERATION_JWKS_URI   the cluster's public keys, fetched from this URL (as
//                                     Entra ID and Keycloak fetch /openid/v1/jwks), or
//   OIDC_SERVER_FEDERATION_JWKS_FILE  a JWKS JSON file, read at start (for clusters whose
//                                     JWKS needs authentication: the harness fetches it)
//   OIDC_SERVER_FEDERATION_NAMESPACE  the namespace of the trusted ServiceAccounts
// ---------------------------------------------------------------------------------------
const GRANT_TOKEN_EXCHANGE = 'urn:ietf:params:oauth:grant-type:token-exchange';
const TOKEN_TYPE_JWT = 'urn:ietf:params:oauth:token-type:jwt';
const TOKEN_TYPE_ACCESS_TOKEN = 'urn:ietf:params:oauth:token-type:access_token';
const JWT_BEARER_ASSERTION = 'urn:ietf:params:oauth:client-assertion-type:jwt-bearer';
// The audience Entra ID requires in a federated credential's token.
const ENTRA_AUDIENCE = 'api://AzureADTokenExchange';
// The signature algorithms the Kubernetes API server signs ServiceAccount tokens with.
const SERVICE_ACCOUNT_TOKEN_ALGS = ['RS256', 'ES256', 'ES384', 'ES512'];
// Allowed clock difference for `exp` and `nbf`, seconds.
const FEDERATION_CLOCK_SKEW = 30;

function readFederation(env) {
  const {
    OIDC_SERVER_FEDERATION_ISSUER: trustedIssuer,
    OIDC_SERVER_FEDERATION_JWKS_URI: jwksUri,
    OIDC_SERVER_FEDERATION_JWKS_FILE: jwksFile,
    OIDC_SERVER_FEDERATION_NAMESPACE: namespace,
  } = env;
  if (!trustedIssuer) {
    if (jwksUri || jwksFile || namespace) {
      throw new Error('OIDC_SERVER_FEDERATION_* is set without OIDC_SERVER_FEDERATION_ISSUER');
    }
    return undefined;
  }
  if (!namespace) throw new Error('OIDC_SERVER_FEDERATION_NAMESPACE is required in federation mode');
  if (Boolean(jwksUri) === Boolean(jwksFile)) {
    throw new Error('federation mode needs exactly one of OIDC_SERVER_FEDERATION_JWKS_URI and OIDC_SERVER_FEDERATION_JWKS_FILE');
  }
  let keys;
  let keysFrom;
  if (jwksUri) {
    // Fetched at the first token that needs it, cached for 10 minutes; an unknown `kid`
    // makes it fetch again, at most every 30 s (jose's defaults).
    keys = jose.createRemoteJWKSet(new URL(jwksUri));
    keysFrom = jwksUri;
  } else {
    let document;
    try {
      document = JSON.parse(fs.readFileSync(jwksFile, 'utf8'));
    } catch (err) {
      throw new Error(`OIDC_SERVER_FEDERATION_JWKS_FILE: cannot read ${jwksFile}: ${err.message}`);
    }
    keys = jose.createLocalJWKSet(document);
    keysFrom = jwksFile;
  }
  return {
    issuer: trustedIssuer, keys, keysFrom, namespace,
  };
}

const federation = readFederation(process.env);

// The ServiceAccount each federated client trusts, and the `aud` its tokens must hold (the
// issuer identifier is known only once the server listens, hence a function).
//   FEDERATED_CLIENTS  client_credentials, authenticated by the token as client_assertion;
//   EXCHANGE_CLIENTS   token exchange, the token as subject_token.
const FEDERATED_CLIENTS = {
  'm2m-federated': { serviceAccount: 'idp-federated', audience: () => issuer },
  'm2m-federated-entra': { serviceAccount: 'idp-federated-entra', audience: () => ENTRA_AUDIENCE },
};
const EXCHANGE_CLIENTS = {
  'm2m-exchange': { serviceAccount: 'workload-exchange', audience: () => issuer },
};

// The federated clients are registered with client_secret_post and a secret generated
// here, which never leaves this process: the middleware in front of the token endpoint
// verifies the ServiceAccount token and, only then, hands the request to oidc-provider
// authenticated with this secret (oidc-provider's private_key_jwt wants iss = sub =
// client_id, which a ServiceAccount token never has).
const INTERNAL_SECRETS = new Map();

function federatedClients() {
  if (!federation) return [];
  const clients = Object.keys(FEDERATED_CLIENTS).map((clientId) => {
    const secret = crypto.randomBytes(32).toString('base64url');
    INTERNAL_SECRETS.set(clientId, secret);
    return m2mClient(clientId, secret, 'client_secret_post');
  });
  const exchange = Object.keys(EXCHANGE_CLIENTS).map((clientId) => ({
    client_id: clientId,
    token_endpoint_auth_method: 'none',
    grant_types: [GRANT_TOKEN_EXCHANGE],
    redirect_uris: [],
    response_types: [],
    scope: ALL_SCOPES,
  }));
  return [...clients, ...exchange];
}

// Access tokens issued by the token exchange -> the ServiceAccount subject they are about
// (their JWT `sub`, set by formats.customizers.jwt).
const EXCHANGE_SUBJECTS = new WeakMap();

// A ServiceAccount token that is refused; `message` says why (never the token itself).
class ServiceAccountTokenRefused extends Error {}

const subjectOf = (serviceAccount) => `system:serviceaccount:${federation.namespace}:${serviceAccount}`;

// Verifies a ServiceAccount token as Entra ID and Keycloak do: the signature with the
// cluster's keys, `iss` exactly the trusted issuer, `exp` and `nbf` (FEDERATION_CLOCK_SKEW),
// `aud` holding `trust.audience()`, `sub` exactly the trusted ServiceAccount. Returns the
// claims; throws ServiceAccountTokenRefused, or another error when the keys cannot be had.
async function verifyServiceAccountToken(token, trust) {
  if (typeof token !== 'string' || token.split('.').length !== 3) {
    throw new ServiceAccountTokenRefused('it is not a JWT (JWS compact serialization)');
  }
  let header;
  try {
    header = jose.decodeProtectedHeader(token);
  } catch {
    throw new ServiceAccountTokenRefused('its JWS header cannot be decoded');
  }
  if (!SERVICE_ACCOUNT_TOKEN_ALGS.includes(header.alg)) {
    throw new ServiceAccountTokenRefused(
      `it is signed with alg ${header.alg}, not one of ${SERVICE_ACCOUNT_TOKEN_ALGS.join(', ')}`,
    );
  }
  const kid = header.kid === undefined ? 'no kid' : `kid "${header.kid}"`;
  let claims;
  try {
    ({ payload: claims } = await jose.jwtVerify(token, federation.keys, {
      algorithms: SERVICE_ACCOUNT_TOKEN_ALGS,
      clockTolerance: FEDERATION_CLOCK_SKEW,
      requiredClaims: ['iss', 'sub', 'aud', 'exp'],
    }));
  } catch (err) {
    const now = Math.floor(Date.now() / 1000);
    switch (err.code) {
      case 'ERR_JWKS_NO_MATCHING_KEY':
        throw new ServiceAccountTokenRefused(`its ${kid} names no key of the trusted JWKS`);
      case 'ERR_JWKS_MULTIPLE_MATCHING_KEYS':
        throw new ServiceAccountTokenRefused(`its ${kid} matches several keys of the trusted JWKS`);
      case 'ERR_JWS_SIGNATURE_VERIFICATION_FAILED':
        throw new ServiceAccountTokenRefused(`its signature does not verify with the trusted key (${kid})`);
      case 'ERR_JWT_EXPIRED':
        throw new ServiceAccountTokenRefused(
          `it expired (exp ${err.payload?.exp}, now ${now}, ${FEDERATION_CLOCK_SKEW} s clock skew allowed)`,
        );
      case 'ERR_JWT_CLAIM_VALIDATION_FAILED':
        if (err.reason === 'missing') throw new ServiceAccountTokenRefused(`it has no "${err.claim}" claim`);
        if (err.claim === 'nbf') {
          throw new ServiceAccountTokenRefused(
            `it is not valid yet (nbf ${err.payload?.nbf}, now ${now}, ${FEDERATION_CLOCK_SKEW} s clock skew allowed)`,
          );
        }
        throw new ServiceAccountTokenRefused(`its "${err.claim}" claim is invalid (${err.message})`);
      case 'ERR_JWT_INVALID':
      case 'ERR_JWS_INVALID':
        throw new ServiceAccountTokenRefused(`it is not a valid JWT (${err.message})`);
      case 'ERR_JOSE_ALG_NOT_ALLOWED':
      case 'ERR_JOSE_NOT_SUPPORTED':
        throw new ServiceAccountTokenRefused(`its alg cannot be used with the trusted key (${err.message})`);
      default:
        // The keys could not be fetched or read: not the client's fault.
        throw new Error(`cannot verify ServiceAccount tokens with the keys from ${federation.keysFrom}: ${err.message}`);
    }
  }
  if (claims.iss !== federation.issuer) {
    throw new ServiceAccountTokenRefused(
      `its iss ${JSON.stringify(claims.iss)} is not the trusted issuer ${JSON.stringify(federation.issuer)}`,
    );
  }
  const audience = trust.audience();
  const audiences = Array.isArray(claims.aud) ? claims.aud : [claims.aud];
  if (!audiences.includes(audience)) {
    throw new ServiceAccountTokenRefused(
      `its aud ${JSON.stringify(claims.aud)} does not contain ${JSON.stringify(audience)}`,
    );
  }
  const subject = subjectOf(trust.serviceAccount);
  if (claims.sub !== subject) {
    throw new ServiceAccountTokenRefused(
      `its sub ${JSON.stringify(claims.sub)} is not the trusted ServiceAccount ${JSON.stringify(subject)}`,
    );
  }
  return claims;
}

const GRACE_CLIENT = 'm2m-refresh-grace';
// The client of a person's login (see CLIENTS).
const LOGIN_CLIENT = 'login-client';
const REUSE_GRACE_MS = 120_000;

const CLIENTS = [
  m2mClient('m2m-basic', 'm2m-basic-secret', 'client_secret_basic'),
  m2mClient('m2m-post', 'm2m-post-secret', 'client_secret_post'),
  // RFC 6749 §2.3.1: id and secret are application/x-www-form-urlencoded before they are
  // joined with ':' and base64-encoded. oidc-provider decodes them that way, so a client
  // that does not encode (sending a raw ':' in the id) gets `invalid_client`.
  m2mClient('m2m:special', 's3cr3t/with+special&chars=', 'client_secret_basic'),
  // private_key_jwt (RFC 7523): RSA clients for RS256 and PS256, EC clients for ES256
  // (P-256) and ES384 (P-384). Their key pairs are
  // generated at every start; tests fetch the private key from
  // GET /__test/client-keys/<client_id>. The assertion's `aud` may be the issuer or the
  // token endpoint URL; `iss` and `sub` must be the client id; `jti` must be unique; `exp`
  // is required; the `alg` must be the registered one.
  privateKeyJwtClient('m2m-jwt-rs256', 'RS256'),
  privateKeyJwtClient('m2m-jwt-es256', 'ES256'),
  privateKeyJwtClient('m2m-jwt-ps256', 'PS256'),
  privateKeyJwtClient('m2m-jwt-es384', 'ES384'),
  // May also use the refresh_token grant, with refresh tokens minted by the test-only
  // endpoint POST /__test/refresh-token (there is no login UI to obtain one the real way).
  {
    ...m2mClient('m2m-refresh', 'm2m-refresh-secret', 'client_secret_basic'),
    grant_types: ['client_credentials', 'refresh_token'],
  },
  // Like m2m-refresh, but this server gives it a reuse grace period (as Auth0's "reuse
  // interval", Okta's grace period and Keycloak's refresh-token max reuse do): a refresh
  // token presented again within REUSE_GRACE_MS of its first use gets that first answer
  // again, whose rotated refresh token is still unused.
  {
    ...m2mClient(GRACE_CLIENT, 'm2m-refresh-grace-secret', 'client_secret_basic'),
    grant_types: ['client_credentials', 'refresh_token'],
  },
  // DPoP (RFC 9449): every token of this client must be DPoP-bound, so a request without a
  // `DPoP` proof is refused (invalid_dpop_proof) and JWTs carry `cnf.jkt`.
  {
    ...m2mClient('m2m-dpop', 'm2m-dpop-secret', 'client_secret_basic'),
    dpop_bound_access_tokens: true,
  },
  // A person's login (the `login` command): the authorization code flow with PKCE at a
  // loopback redirect URI on any port (a native application, RFC 8252 §7.3), offline_access
  // for a refresh token, then the refresh_token grant for the operator's chain. Pushed
  // authorization requests are offered (discovery names the PAR endpoint), not required.
  {
    ...m2mClient(LOGIN_CLIENT, 'login-client-secret', 'client_secret_basic'),
    application_type: 'native',
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: ['http://127.0.0.1/callback'],
    scope: `openid offline_access ${ALL_SCOPES}`,
  },
  // login-client with private_key_jwt (as HelseID's clients): the assertion at the PAR
  // endpoint and at the token endpoint; its key from GET /__test/client-keys/login-jwt.
  {
    ...privateKeyJwtClient('login-jwt', 'ES256'),
    application_type: 'native',
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: ['http://127.0.0.1/callback'],
    scope: `openid offline_access ${ALL_SCOPES}`,
  },
  // A web application's client: its one redirect URI is not on the loopback, so a
  // command-line login (any port on 127.0.0.1) is refused with invalid_redirect_uri.
  {
    ...m2mClient('login-web', 'login-web-secret', 'client_secret_basic'),
    grant_types: ['authorization_code', 'refresh_token'],
    response_types: ['code'],
    redirect_uris: ['https://app.example.test/callback'],
    scope: `openid offline_access ${ALL_SCOPES}`,
  },
  // Like login-client, but without the refresh_token grant: its logins never get a refresh
  // token (what a person sees when offline_access is not granted).
  {
    ...m2mClient('login-no-offline', 'login-no-offline-secret', 'client_secret_basic'),
    application_type: 'native',
    grant_types: ['authorization_code'],
    response_types: ['code'],
    redirect_uris: ['http://127.0.0.1/callback'],
    scope: `openid offline_access ${ALL_SCOPES}`,
  },
  ...(mtlsFiles ? mtlsClients(mtlsFiles.selfSignedClient) : []),
  // Federation mode only: m2m-federated, m2m-federated-entra and m2m-exchange.
  ...federatedClients(),
];

// The algorithms a DPoP proof may be signed with (oidc-provider's default is ES256 and EdDSA).
const DPOP_ALGS = ['ES256', 'ES384', 'PS256', 'RS256'];
// Whether the token endpoint demands a DPoP nonce (RFC 9449 §8): toggled by
// POST /__test/dpop-require-nonce. Off at start.
let requireDpopNonce = false;

const TEST_ACCOUNT = 'test-account';

// ---------------------------------------------------------------------------------------
// Signing key: generated in memory at every start (never written to disk).
// ---------------------------------------------------------------------------------------
function generateSigningJwk() {
  const { privateKey } = generateKeyPair('rsa', { modulusLength: 2048 });
  const jwk = privateKey.export({ format: 'jwk' });
  return { ...jwk, kid: `test-rs256-${crypto.randomBytes(4).toString('hex')}`, use: 'sig', alg: 'RS256' };
}
const signingJwk = generateSigningJwk();
// The public half, for /__test/resource to verify access tokens with.
const signingPublicKey = crypto.createPublicKey({ key: signingJwk, format: 'jwk' });

// ---------------------------------------------------------------------------------------
// Token request counters, served by the /__test/ endpoints.
// ---------------------------------------------------------------------------------------
const counts = { total: 0, byResource: {}, byClient: {}, byError: {}, held: 0 };
const resetCounts = () => {
  counts.total = 0;
  counts.byResource = {};
  counts.byClient = {};
  counts.byError = {};
  counts.held = 0;
};

// POST /__test/hold-next-refresh {"ms": N}: the next refresh_token answer is held N ms after
// the provider made it (the refresh token is already rotated), so a test can stop a client
// between the server's answer and the client's receipt. `held` counts answers held.
let holdNextRefreshMs = 0;

// The reuse grace period of GRACE_CLIENT: first answers by the refresh token they used.
const graceAnswers = new Map();
const bump = (map, key) => { map[key] = (map[key] ?? 0) + 1; };

// Every secret value the server saw or handed out, served by GET /__test/secrets-seen so a
// test can assert that none of them shows up in the operator's logs, Events or status.
// Never reset (a leak of a value from before a reset is still a leak).
const secretsSeen = {
  accessTokens: new Set(),
  refreshTokens: new Set(),
  clientAssertions: new Set(),
  clientSecrets: new Set(),
  // Federation mode: ServiceAccount tokens received as the client_assertion of a federated
  // client (these are in clientAssertions too) or as the subject_token of a token exchange.
  serviceAccountTokens: new Set(),
};
const remember = (kind, value) => {
  if (typeof value === 'string' && value !== '') secretsSeen[kind].add(value);
};

// Records the secrets of one token request: those the client sent (client secret in the
// Basic header or the form, client assertion, refresh token) and those in the response.
function recordTokenRequestSecrets(ctx) {
  const body = ctx.oidc?.body ?? {};
  // The internal secret of a federated client was put there by this server (see
  // authenticateFederatedClient, which records the client's own credentials).
  if (![...INTERNAL_SECRETS.values()].includes(body.client_secret)) {
    remember('clientSecrets', body.client_secret);
  }
  remember('clientAssertions', body.client_assertion);
  remember('refreshTokens', body.refresh_token);
  remember('serviceAccountTokens', body.subject_token);
  const match = /^basic\s+(.+)$/i.exec(ctx.get('authorization'));
  if (match) {
    const decoded = Buffer.from(match[1], 'base64').toString('utf8');
    const i = decoded.indexOf(':');
    if (i !== -1) {
      const raw = decoded.slice(i + 1);
      remember('clientSecrets', raw);
      try {
        remember('clientSecrets', decodeURIComponent(raw.replace(/\+/g, '%20')));
      } catch {
        // not form-urlencoded: the raw value is recorded
      }
    }
  }
  if (ctx.body && typeof ctx.body === 'object') {
    remember('accessTokens', ctx.body.access_token);
    remember('refreshTokens', ctx.body.refresh_token);
  }
}

// The client id of a token request, even when authentication failed (then ctx.oidc.client
// is not set): from client_id in the body, else from the HTTP Basic header.
function requestClientId(ctx) {
  const authenticated = ctx.oidc?.client?.clientId;
  if (authenticated) return authenticated;
  const fromBody = ctx.oidc?.params?.client_id ?? ctx.state.tokenForm?.get('client_id');
  if (fromBody) return fromBody;
  const assertion = ctx.oidc?.params?.client_assertion;
  if (typeof assertion === 'string') {
    try {
      const { sub } = JSON.parse(Buffer.from(assertion.split('.')[1], 'base64url').toString('utf8'));
      if (typeof sub === 'string') return sub;
    } catch {
      // not a JWT: fall through
    }
  }
  return basicClientId(ctx) ?? '(none)';
}

// The client id of an HTTP Basic Authorization header (RFC 6749 §2.3.1), if there is one.
function basicClientId(ctx) {
  const match = /^basic\s+(.+)$/i.exec(ctx.get('authorization'));
  if (!match) return undefined;
  const decoded = Buffer.from(match[1], 'base64').toString('utf8');
  const i = decoded.indexOf(':');
  if (i === -1) return undefined;
  try {
    return decodeURIComponent(decoded.slice(0, i).replace(/\+/g, '%20'));
  } catch {
    return decoded.slice(0, i);
  }
}

// ---------------------------------------------------------------------------------------
// Start: listen on port 0 first, then build the provider with the real issuer URL.
// In mTLS mode the main listener is HTTPS without client certificates, and a second one
// (the RFC 8705 §5 mTLS endpoint alias) asks for them. It accepts any certificate in the
// handshake (rejectUnauthorized: false) so that self-signed ones reach the provider; whether
// one chains to ca.pem is the socket's `authorized`, read by certificateAuthorized below.
// ---------------------------------------------------------------------------------------
const TOKEN_PATH = '/token';

async function listen(httpServer) {
  await new Promise((resolve, reject) => {
    httpServer.once('error', reject);
    httpServer.listen(0, '127.0.0.1', resolve);
  });
  return `127.0.0.1:${httpServer.address().port}`;
}

const server = mtlsFiles
  ? https.createServer({ cert: mtlsFiles.serverCert, key: mtlsFiles.serverKey })
  : http.createServer();
const issuer = `${mtlsFiles ? 'https' : 'http'}://${await listen(server)}`;
const mtlsServer = mtlsFiles
  ? https.createServer({
    cert: mtlsFiles.serverCert,
    key: mtlsFiles.serverKey,
    ca: mtlsFiles.ca,
    requestCert: true,
    rejectUnauthorized: false,
  })
  : undefined;
const mtlsTokenEndpoint = mtlsServer
  ? `https://${await listen(mtlsServer)}${TOKEN_PATH}`
  : undefined;
const servers = mtlsServer ? [server, mtlsServer] : [server];

const config = {
  clients: CLIENTS,
  // Every scope a client may hold must be known to the server.
  scopes: ['openid', 'offline_access', ...ALL_SCOPES.split(' ')],
  jwks: { keys: [signingJwk] },
  // oidc-provider's default list plus ES384 (for m2m-jwt-es384).
  enabledJWA: {
    clientAuthSigningAlgValues: ['HS256', 'RS256', 'PS256', 'ES256', 'ES384', 'Ed25519', 'EdDSA'],
    dPoPSigningAlgValues: DPOP_ALGS,
  },
  cookies: { keys: [crypto.randomBytes(32).toString('hex')] },
  routes: { token: TOKEN_PATH },
  // oidc-provider's default list, plus the RFC 8705 methods in mTLS mode (enabling the
  // feature alone does not allow them: a client registered for one fails at its first
  // request with invalid_client_metadata).
  clientAuthMethods: [
    'client_secret_basic',
    'client_secret_jwt',
    'client_secret_post',
    'private_key_jwt',
    'none',
    ...(mtlsFiles ? ['tls_client_auth', 'self_signed_tls_client_auth'] : []),
  ],
  // RFC 8705 §5: where clients authenticating with a certificate send token requests.
  discovery: mtlsTokenEndpoint
    ? { mtls_endpoint_aliases: { token_endpoint: mtlsTokenEndpoint } }
    : {},

  features: {
    // oidc-provider's own login and consent pages, which the `login` test drives over HTTP
    // as a browser would: any password, the login name must be TEST_ACCOUNT.
    devInteractions: { enabled: true },
    clientCredentials: { enabled: true },
    introspection: { enabled: false },
    revocation: { enabled: false },
    // RFC 8705, in mTLS mode only: tls_client_auth, self_signed_tls_client_auth and
    // certificate-bound access tokens (cnf["x5t#S256"]).
    mTLS: mtlsFiles
      ? {
        enabled: true,
        certificateBoundAccessTokens: true,
        tlsClientAuth: true,
        selfSignedTlsClientAuth: true,
        getCertificate: peerCertificate,
        // The handshake verified the certificate against ca.pem (the mTLS listener's `ca`).
        certificateAuthorized: (ctx) => ctx.socket?.authorized === true,
        certificateSubjectMatches(ctx, property, expected) {
          const cert = peerCertificate(ctx);
          if (!cert) return false;
          if (property === 'tls_client_auth_subject_dn') return subjectDn(cert) === expected;
          return false;
        },
      }
      : { enabled: false },
    // DPoP (RFC 9449). With a nonceSecret the provider can hand out nonces (a `DPoP-Nonce`
    // header on answers to DPoP requests); it demands them only while requireDpopNonce is on.
    dPoP: {
      enabled: true,
      nonceSecret: crypto.randomBytes(32),
      requireNonce: () => requireDpopNonce,
    },
    resourceIndicators: {
      enabled: true,
      // No default: a request without `resource` gets no resource server (see README).
      defaultResource: () => undefined,
      // One resource per token request; unknown resources are rejected.
      getResourceServerInfo(ctx, resourceIndicator /* , client */) {
        const info = RESOURCE_SERVERS[resourceIndicator];
        if (!info) throw new errors.InvalidTarget();
        return { ...info };
      },
      useGrantedResource: () => false,
    },
    // RFC 9396 (see AUTHORIZATION_DETAILS_TYPES): what a token request asks for is granted
    // as it is; a refresh request without the parameter keeps what its grant had.
    richAuthorizationRequests: {
      enabled: true,
      types: AUTHORIZATION_DETAILS_TYPES,
      authorizationDetailsForAccessToken: (ctx, token, source) => (
        requestedAuthorizationDetails(ctx) ?? source?.rar
      ),
      authorizationDetailsForGrantSource: (ctx) => requestedAuthorizationDetails(ctx),
      authorizationDetailsForIntrospection: (ctx, token) => token.rar,
    },
  },

  // Refresh tokens are rotated on EVERY use; presenting an already used one fails with
  // invalid_grant and revokes the whole grant (reuse detection).
  rotateRefreshToken: true,
  // Refresh tokens minted by /__test/refresh-token belong to this one synthetic account.
  findAccount: (ctx, accountId) => (accountId === TEST_ACCOUNT
    ? { accountId, claims: () => ({ sub: accountId }) }
    : undefined),

  // Lifetimes. Client-credentials tokens live as long as their resource server says.
  ttl: {
    ClientCredentials: (ctx, token) => token.resourceServer?.accessTokenTTL ?? 600,
    AccessToken: (ctx, token) => token.resourceServer?.accessTokenTTL ?? 3600,
    AuthorizationCode: 60,
    Grant: 14 * 24 * 3600,
    IdToken: 3600,
    Interaction: 3600,
    Session: 14 * 24 * 3600,
    RefreshToken: 14 * 24 * 3600,
  },

  formats: {
    customizers: {
      // Runs for every JWT access token before it is signed.
      jwt(ctx, token, jwt) {
        const extra = EXTRA_AUDIENCES[token.aud];
        if (extra) jwt.payload.aud = [token.aud, ...extra];
        // A token-exchange token is about the subject token's ServiceAccount, not the client.
        const subject = EXCHANGE_SUBJECTS.get(token);
        if (subject) jwt.payload.sub = subject;
      },
    },
  },

  // Plain-text errors for the (unused) HTML endpoints; token errors are JSON regardless.
  renderError(ctx, out) {
    ctx.type = 'json';
    ctx.body = out;
  },
};

const provider = new Provider(issuer, config);
const tokenPath = new URL(provider.urlFor('token')).pathname;
if (tokenPath !== TOKEN_PATH) throw new Error(`token endpoint at ${tokenPath}, not ${TOKEN_PATH}`);

// ---------------------------------------------------------------------------------------
// RFC 8693 token exchange (federation mode only): a ServiceAccount token as subject_token
// (subject_token_type ...:jwt) for an access token for one resource server. No actor
// tokens (no delegation). The clients of EXCHANGE_CLIENTS are public (method none).
// ---------------------------------------------------------------------------------------
// A parameter given once or several times, as a list.
const paramValues = (value) => {
  if (value === undefined) return [];
  return Array.isArray(value) ? value : [value];
};

async function tokenExchange(ctx) {
  const { params, client } = ctx.oidc;
  const trust = EXCHANGE_CLIENTS[client.clientId];
  if (!trust) throw new errors.UnauthorizedClient(`${client.clientId} may not exchange tokens`);
  if (params.actor_token !== undefined || params.actor_token_type !== undefined) {
    throw new errors.InvalidRequest('actor_token is not supported (no delegation)');
  }
  if (!params.subject_token) throw new errors.InvalidRequest("missing required parameter 'subject_token'");
  if (!params.subject_token_type) {
    throw new errors.InvalidRequest("missing required parameter 'subject_token_type'");
  }
  if (params.subject_token_type !== TOKEN_TYPE_JWT) {
    throw new errors.InvalidRequest(
      `subject_token_type ${params.subject_token_type} is not supported: only ${TOKEN_TYPE_JWT} (a Kubernetes ServiceAccount token)`,
    );
  }
  let claims;
  try {
    claims = await verifyServiceAccountToken(params.subject_token, trust);
  } catch (err) {
    if (err instanceof ServiceAccountTokenRefused) {
      throw new errors.InvalidRequest(`the subject_token is refused: ${err.message}`);
    }
    throw err;
  }

  // The target: one resource (RFC 8707) or one audience, naming a resource server.
  const targets = [...new Set([...paramValues(params.resource), ...paramValues(params.audience)])];
  if (targets.length === 0) {
    throw new errors.InvalidRequest('resource or audience is required (the resource server the token is for)');
  }
  if (targets.length > 1) {
    throw new errors.InvalidTarget(`one resource server per token, not ${targets.length}: ${targets.join(' ')}`);
  }
  const [target] = targets;
  let info;
  try {
    info = await config.features.resourceIndicators.getResourceServerInfo(ctx, target, client);
  } catch (err) {
    if (err instanceof errors.InvalidTarget) throw new errors.InvalidTarget(`unknown resource server ${target}`);
    throw err;
  }
  const resourceServer = new provider.ResourceServer(target, info);

  // Unlike client_credentials (which drops them), a scope the resource server does not
  // have is an error here.
  const requested = [...new Set((params.scope ?? '').split(' ').filter(Boolean))];
  const unknown = requested.filter((scope) => !resourceServer.scopes.has(scope));
  if (unknown.length > 0) {
    throw new errors.InvalidScope(`scope ${unknown.join(' ')} is not a scope of ${target}`, unknown.join(' '));
  }

  const token = new provider.ClientCredentials({
    client,
    resourceServer,
    scope: requested.join(' ') || undefined,
  });
  EXCHANGE_SUBJECTS.set(token, claims.sub);
  ctx.oidc.entity('ClientCredentials', token);
  const value = await token.save();

  // A JWT was asked for and this is one: say so. Anything else asked for (an id_token, a
  // SAML assertion, ...) still gets an access token, and says so: a client must compare.
  const issuedTokenType = params.requested_token_type === TOKEN_TYPE_JWT
    && resourceServer.accessTokenFormat === 'jwt'
    ? TOKEN_TYPE_JWT
    : TOKEN_TYPE_ACCESS_TOKEN;
  log(`token exchange: ${claims.sub} -> ${target} for ${client.clientId}`
    + ` (requested ${params.requested_token_type ?? 'no type'}, issued ${issuedTokenType})`);
  ctx.body = {
    access_token: value,
    issued_token_type: issuedTokenType,
    token_type: token.tokenType,
    expires_in: token.expiration,
    ...(token.scope ? { scope: token.scope } : {}),
  };
}

if (federation) {
  provider.registerGrantType(
    GRANT_TOKEN_EXCHANGE,
    tokenExchange,
    ['subject_token', 'subject_token_type', 'actor_token', 'actor_token_type',
      'requested_token_type', 'resource', 'audience', 'scope'],
    ['resource', 'audience'],
  );
}

// Log token request failures on stderr (never a token or a secret).
provider.on('grant.error', (ctx, err) => {
  const detail = err.error_detail ? ` [${err.error_detail}]` : '';
  log(`token request failed: ${err.error ?? err.name}: ${err.error_description ?? err.message}${detail}`
    + ` (client=${requestClientId(ctx)}, resource=${ctx.oidc?.params?.resource ?? '-'})`);
});
provider.on('server_error', (ctx, err) => log(`server_error: ${err.stack ?? err}`));

// Reads a small JSON request body (test-only endpoints; provider routes parse their own).
async function readText(ctx) {
  const chunks = [];
  let size = 0;
  for await (const chunk of ctx.req) {
    size += chunk.length;
    if (size > 64 * 1024) ctx.throw(413, 'body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

async function readJson(ctx) {
  const text = await readText(ctx);
  if (!text) return {};
  try {
    return JSON.parse(text);
  } catch {
    return ctx.throw(400, 'body must be JSON');
  }
}

// POST /__test/refresh-token {"client_id": "m2m-refresh", "resources": [...], "scope": "..."}
// Mints a refresh token as if a user had authorized the client for these resources (one
// grant covering all of them; each resource gets the requested scopes it allows, or all of
// its scopes when "scope" is absent). Answers {"refresh_token": "..."}.
async function mintRefreshToken(ctx) {
  const body = await readJson(ctx);
  const clientId = body.client_id ?? 'm2m-refresh';
  const client = await provider.Client.find(clientId);
  if (!client) ctx.throw(400, `unknown client ${clientId}`);
  if (!client.grantTypeAllowed('refresh_token')) ctx.throw(400, `client ${clientId} may not use refresh_token`);
  const resources = Array.isArray(body.resources) ? body.resources : [];
  if (resources.length === 0) ctx.throw(400, 'resources must be a non-empty array');

  const requested = typeof body.scope === 'string' ? new Set(body.scope.split(' ').filter(Boolean)) : undefined;
  const grant = new provider.Grant({ accountId: TEST_ACCOUNT, clientId });
  grant.addOIDCScope('offline_access');
  const granted = new Set(['offline_access']);
  for (const resource of resources) {
    const info = RESOURCE_SERVERS[resource];
    if (!info) ctx.throw(400, `unknown resource ${resource}`);
    const scopes = info.scope.split(' ').filter((s) => !requested || requested.has(s));
    grant.addResourceScope(resource, scopes.join(' '));
    scopes.forEach((s) => granted.add(s));
  }
  const grantId = await grant.save();

  const refreshToken = new provider.RefreshToken({
    accountId: TEST_ACCOUNT,
    client,
    grantId,
    gty: 'authorization_code',
    scope: [...granted].join(' '),
    resource: resources.length === 1 ? resources[0] : resources,
    expiresWithSession: false,
  });
  const minted = await refreshToken.save();
  remember('refreshTokens', minted);
  ctx.type = 'json';
  ctx.body = { refresh_token: minted };
}

// GET /__test/resource: a resource server's DPoP check (RFC 9449 §7). Needs
// `Authorization: DPoP <access token>` and a `DPoP` proof header. 200 {"ok":true,"sub","jkt"}
// only when the proof verifies with the `jwk` in its header, `typ` is dpop+jwt, `htm`/`htu`
// are this request's, `ath` is the token's hash, `iat` is within 60 s, and the access token
// (a JWT verified with the provider's signing key) has `cnf.jkt` = the proof key's
// thumbprint. Otherwise 401 {"error":"invalid_token"|"invalid_dpop_proof","reason":"..."}.
async function checkDpopResource(ctx) {
  const refuse = (error, reason) => {
    ctx.status = 401;
    ctx.set('WWW-Authenticate', `DPoP error="${error}", algs="${DPOP_ALGS.join(' ')}"`);
    ctx.type = 'json';
    ctx.body = { error, reason };
  };
  const match = /^DPoP\s+(\S+)$/.exec(ctx.get('authorization'));
  if (!match) return refuse('invalid_token', 'no "Authorization: DPoP <token>" header');
  const token = match[1];
  const proof = ctx.get('dpop');
  if (!proof) return refuse('invalid_dpop_proof', 'no DPoP proof header');
  let header;
  let claims;
  try {
    ({ protectedHeader: header, payload: claims } = await jose.jwtVerify(proof, jose.EmbeddedJWK, {
      typ: 'dpop+jwt',
      algorithms: DPOP_ALGS,
    }));
  } catch (err) {
    return refuse('invalid_dpop_proof', `the proof does not verify with its jwk: ${err.code ?? err.message}`);
  }
  if (typeof claims.jti !== 'string' || claims.jti === '') return refuse('invalid_dpop_proof', 'no jti');
  if (claims.htm !== ctx.method) return refuse('invalid_dpop_proof', `htm ${claims.htm} is not ${ctx.method}`);
  const expectedHtu = `${issuer}${ctx.path}`;
  if (claims.htu !== expectedHtu) return refuse('invalid_dpop_proof', `htu ${claims.htu} is not ${expectedHtu}`);
  const ath = crypto.createHash('sha256').update(token).digest('base64url');
  if (claims.ath !== ath) return refuse('invalid_dpop_proof', 'ath is not the hash of the access token');
  const now = Math.floor(Date.now() / 1000);
  if (typeof claims.iat !== 'number' || Math.abs(now - claims.iat) > 60) {
    return refuse('invalid_dpop_proof', `iat ${claims.iat} is not within 60 s of ${now}`);
  }
  let access;
  try {
    ({ payload: access } = await jose.jwtVerify(token, signingPublicKey, { issuer, typ: 'at+jwt' }));
  } catch (err) {
    return refuse('invalid_token', `the access token does not verify: ${err.code ?? err.message}`);
  }
  const jkt = await jose.calculateJwkThumbprint(header.jwk);
  if (access.cnf?.jkt !== jkt) {
    return refuse('invalid_token', `the token's cnf.jkt ${access.cnf?.jkt} is not the proof key's thumbprint ${jkt}`);
  }
  ctx.type = 'json';
  ctx.body = { ok: true, sub: access.sub, jkt };
  return undefined;
}

// Registered auth method, enforced strictly: oidc-provider itself accepts either
// client_secret_basic or client_secret_post for a client registered with one of them; this
// server answers 401 invalid_client when a client uses the other one, so tests prove the
// operator uses the configured method.
function wrongAuthMethod(ctx) {
  const registered = ctx.oidc?.client?.clientAuthMethod;
  const usedBasic = ctx.get('authorization') !== '';
  const usedPost = ctx.oidc?.params?.client_secret !== undefined;
  return (registered === 'client_secret_basic' && !usedBasic && usedPost)
    || (registered === 'client_secret_post' && usedBasic);
}

// Federation mode: authenticates a token request of a FEDERATED_CLIENTS client, which
// must carry a ServiceAccount token as client_assertion (client_assertion_type jwt-bearer)
// next to its client_id, and nothing else to authenticate with. A verified token is swapped
// for the client's internal secret (client_secret_post), and oidc-provider does the rest.
// Otherwise answers 401 invalid_client (500 server_error when the keys cannot be had) and
// returns true. Requests of other clients pass untouched (false).
async function refuseFederatedClient(ctx, form) {
  const clientId = form.get('client_id') ?? basicClientId(ctx);
  const trust = Object.hasOwn(FEDERATED_CLIENTS, clientId) ? FEDERATED_CLIENTS[clientId] : undefined;
  if (!trust) return false;
  for (const assertion of form.getAll('client_assertion')) {
    remember('clientAssertions', assertion);
    remember('serviceAccountTokens', assertion);
  }
  form.getAll('client_secret').forEach((secret) => remember('clientSecrets', secret));

  const answer = (status, error, description) => {
    log(`token request failed: ${error}: ${description} (client=${clientId})`);
    ctx.status = status;
    ctx.set('Cache-Control', 'no-store');
    ctx.type = 'json';
    ctx.body = { error, error_description: description };
    return true;
  };
  const refuse = (description) => answer(401, 'invalid_client', description);
  const only = `${clientId} authenticates only with a Kubernetes ServiceAccount token`
    + ` (client_assertion, client_assertion_type ${JWT_BEARER_ASSERTION})`;
  if (ctx.get('authorization')) return refuse(`${only}, not with an Authorization header`);
  if (form.has('client_secret')) return refuse(`${only}, not with a client_secret`);
  const assertions = form.getAll('client_assertion');
  if (assertions.length !== 1) {
    return refuse(assertions.length === 0 ? `${only}: there is no client_assertion` : `${only}: one client_assertion, not ${assertions.length}`);
  }
  if (form.get('client_assertion_type') !== JWT_BEARER_ASSERTION) {
    return refuse(`${only}: client_assertion_type is ${form.get('client_assertion_type') ?? 'missing'}`);
  }
  try {
    await verifyServiceAccountToken(assertions[0], trust);
  } catch (err) {
    if (err instanceof ServiceAccountTokenRefused) {
      return refuse(`the client_assertion is refused: ${err.message}`);
    }
    return answer(500, 'server_error', err.message);
  }
  form.delete('client_assertion');
  form.delete('client_assertion_type');
  form.set('client_secret', INTERNAL_SECRETS.get(clientId));
  ctx.request.body = form.toString();
  return false;
}

// Test-only endpoints and token-request counting.
provider.use(async (ctx, next) => {
  if (ctx.path === '/__test/token-requests' && ctx.method === 'GET') {
    ctx.type = 'json';
    ctx.body = counts;
    return;
  }
  if (ctx.path === '/__test/secrets-seen' && ctx.method === 'GET') {
    ctx.type = 'json';
    ctx.body = Object.fromEntries(
      Object.entries(secretsSeen).map(([kind, values]) => [kind, [...values]]),
    );
    return;
  }
  if (ctx.path === '/__test/reset' && ctx.method === 'POST') {
    resetCounts();
    ctx.status = 204;
    return;
  }
  const keyPath = /^\/__test\/client-keys\/([^/]+)$/.exec(ctx.path);
  if (keyPath && ctx.method === 'GET') {
    const key = CLIENT_PRIVATE_KEYS[decodeURIComponent(keyPath[1])];
    if (!key) ctx.throw(404, 'no such private_key_jwt client');
    ctx.type = 'json';
    ctx.body = key;
    return;
  }
  if (ctx.path === '/__test/refresh-token' && ctx.method === 'POST') {
    await mintRefreshToken(ctx);
    return;
  }
  if (ctx.path === '/__test/resource' && ctx.method === 'GET') {
    await checkDpopResource(ctx);
    return;
  }
  if (ctx.path === '/__test/dpop-require-nonce' && ctx.method === 'POST') {
    const body = await readJson(ctx);
    requireDpopNonce = body.require === true;
    log(`DPoP nonces ${requireDpopNonce ? 'required' : 'not required'} at the token endpoint`);
    ctx.status = 204;
    return;
  }
  if (ctx.path === '/__test/hold-next-refresh' && ctx.method === 'POST') {
    const body = await readJson(ctx);
    holdNextRefreshMs = Number(body.ms ?? 0);
    ctx.status = 204;
    return;
  }

  const isTokenRequest = ctx.method === 'POST' && ctx.path === tokenPath;
  let form;
  if (isTokenRequest && (basicClientId(ctx) === GRACE_CLIENT || federation)) {
    // Read the form here (oidc-provider takes an already read body as it is): to answer a
    // reused refresh token from the grace record without asking the provider, and to
    // authenticate federated clients.
    form = new URLSearchParams(await readText(ctx));
    ctx.request.body = form.toString();
    ctx.state.tokenForm = form;
  }
  let graceKey;
  if (form && basicClientId(ctx) === GRACE_CLIENT) {
    if (form.get('grant_type') === 'refresh_token') {
      graceKey = form.get('refresh_token') ?? '';
      const earlier = graceAnswers.get(graceKey);
      // Only the client that made the first request gets its answer again.
      if (earlier && earlier.authorization === ctx.get('authorization')
        && Date.now() - earlier.at < REUSE_GRACE_MS) {
        log(`refresh token of ${GRACE_CLIENT} reused within the grace period: first answer repeated`);
        counts.total += 1;
        bump(counts.byResource, form.get('resource') ?? '(none)');
        bump(counts.byClient, GRACE_CLIENT);
        ctx.type = 'json';
        ctx.body = earlier.body;
        return;
      }
    }
  }
  try {
    if (form && federation && await refuseFederatedClient(ctx, form)) return;
    await next();
    if (isTokenRequest && ctx.oidc?.params?.grant_type === 'refresh_token') {
      if (graceKey !== undefined && ctx.status === 200) {
        graceAnswers.set(graceKey, { at: Date.now(), body: ctx.body, authorization: ctx.get('authorization') });
      }
      if (holdNextRefreshMs > 0) {
        const ms = holdNextRefreshMs;
        holdNextRefreshMs = 0;
        counts.held += 1;
        log(`holding a refresh_token answer for ${ms} ms`);
        await new Promise((resolve) => { setTimeout(resolve, ms); });
      }
    }
  } finally {
    if (isTokenRequest) {
      // Secrets the client sent, and any it was given (the response body is replaced below
      // only by an error, never by another token).
      recordTokenRequestSecrets(ctx);
      // Counted after the provider ran, so its parsed parameters are available; errors are
      // rendered by the provider's own error handler, so this also runs for failed requests.
      counts.total += 1;
      // A token exchange may name its resource server with `audience`; a request refused
      // before the provider saw it (refuseFederatedClient) has only the form.
      const resource = ctx.oidc?.params?.resource ?? ctx.oidc?.params?.audience
        ?? (ctx.oidc ? undefined : form?.getAll('resource').join(' ') || undefined);
      bump(counts.byResource, Array.isArray(resource) ? resource.join(' ') : (resource ?? '(none)'));
      bump(counts.byClient, requestClientId(ctx));
      if (ctx.status !== 200) bump(counts.byError, ctx.body?.error ?? `http_${ctx.status}`);
    }
  }
  if (!isTokenRequest || ctx.status !== 200) return;

  if (wrongAuthMethod(ctx)) {
    // The token was minted but is never handed out.
    log(`token request failed: invalid_client: ${ctx.oidc.client.clientId} is registered for`
      + ` ${ctx.oidc.client.clientAuthMethod} but used another method`);
    ctx.status = 401;
    if (ctx.oidc.client.clientAuthMethod === 'client_secret_basic') {
      ctx.set('WWW-Authenticate', 'Basic realm="test"');
    }
    ctx.body = {
      error: 'invalid_client',
      error_description: 'client authentication failed (wrong token_endpoint_auth_method)',
    };
    return;
  }

  // Simulate a server that omits expires_in from the token response.
  if (ctx.body && typeof ctx.body === 'object' && STRIP_EXPIRES_IN.has(ctx.oidc?.params?.resource)) {
    delete ctx.body.expires_in;
  }
});

const handle = provider.callback();
for (const listener of servers) listener.on('request', handle);

// The one and only line on stdout.
const ready = mtlsTokenEndpoint ? { issuer, mtls_token_endpoint: mtlsTokenEndpoint } : { issuer };
process.stdout.write(`${JSON.stringify(ready)}\n`);
log(`listening, issuer ${issuer}, token endpoint ${issuer}${tokenPath}`
  + `${mtlsTokenEndpoint ? `, mTLS token endpoint ${mtlsTokenEndpoint}` : ''}`
  + `${federation ? `, federation: ServiceAccount tokens of ${federation.issuer}, namespace ${federation.namespace}, keys from ${federation.keysFrom}` : ''}`);

// ---------------------------------------------------------------------------------------
// Shutdown: on signals, and when stdin closes (the parent went away).
// ---------------------------------------------------------------------------------------
let stopping = false;
function shutdown(why) {
  if (stopping) return;
  stopping = true;
  log(`stopping (${why})`);
  Promise.all(servers.map((listener) => new Promise((resolve) => { listener.close(resolve); })))
    .then(() => process.exit(0));
  for (const listener of servers) listener.closeAllConnections?.();
  setTimeout(() => process.exit(0), 1000).unref();
}
process.on('SIGTERM', () => shutdown('SIGTERM'));
process.on('SIGINT', () => shutdown('SIGINT'));
// Set OIDC_SERVER_IGNORE_STDIN=1 to run it in the background by hand (`node server.mjs &`
// gives it a closed stdin in a non-interactive shell).
if (process.env.OIDC_SERVER_IGNORE_STDIN !== '1') {
  process.stdin.on('end', () => shutdown('stdin closed'));
  process.stdin.on('close', () => shutdown('stdin closed'));
  process.stdin.on('error', () => shutdown('stdin error'));
  process.stdin.resume();
}
