//! A real OAuth 2.0 authorization server for integration tests: starts
//! `tests/oidc-server/server.mjs` (oidc-provider on Node) and talks to its test-only
//! endpoints. See `tests/oidc-server/README.md` for what it issues.
//!
//! Needs `node` on PATH (or `$NODE`) and `npm ci --prefix tests/oidc-server` done first.
//!
//! ```ignore
//! mod support;
//! use support::oidc::{OidcServer, ORDERS, M2M_BASIC};
//! let idp = OidcServer::start().await;
//! let token_endpoint = idp.token_endpoint();
//! ```
//!
//! For mutual TLS (RFC 8705), [`OidcServer::start_mtls`] starts it with certificates from
//! [`super::certs`]: an https issuer and [`OidcServer::mtls_token_endpoint`].
//!
//! For Kubernetes ServiceAccount tokens as credentials (Entra ID workload identity
//! federation, Keycloak federated client authentication) and the RFC 8693 token exchange,
//! [`OidcServer::start_federated`] with a [`Federation`]: clients [`M2M_FEDERATED`],
//! [`M2M_FEDERATED_ENTRA`] and [`M2M_EXCHANGE`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdin, ChildStdout, Command};

use super::certs::{ClientCert, TestPki};

/// How long the server may take to print its ready line.
const START_TIMEOUT: Duration = Duration::from_secs(20);
/// Starts tried before giving up (see [`OidcServer::start`]).
const START_ATTEMPTS: u32 = 3;

// ---- Resources (RFC 8707 resource indicators) the server knows ----------------------------

/// JWT, `aud` = this string, scopes `orders/read orders/write`, 3600 s.
pub const ORDERS: &str = "https://orders.example.test";
/// JWT, `aud` = this string, scopes `payments/read payments/write`, 3600 s.
pub const PAYMENTS: &str = "https://payments.example.test";
/// JWT, scope `short/read`, lives 6 s (`expires_in: 6`).
pub const SHORT_LIVED: &str = "urn:test:short-lived";
/// JWT, scope `multi/read`, `aud` is an ARRAY: `[MULTI_AUDIENCE, MULTI_AUDIENCE_OTHER]`.
pub const MULTI_AUDIENCE: &str = "urn:test:multi-audience";
/// The second `aud` value of tokens for [`MULTI_AUDIENCE`].
pub const MULTI_AUDIENCE_OTHER: &str = "https://other.example.test";
/// Opaque (not a JWT) token, scope `opaque/read`, `expires_in: 600`.
pub const OPAQUE: &str = "urn:test:opaque";
/// JWT (scope `noexp/read`, `exp` = iat + 900 s) whose token response has NO `expires_in`.
pub const NO_EXPIRES_IN: &str = "urn:test:no-expires-in";
/// Opaque token (scope `noexp/read`) whose response has NO `expires_in`: lifetime unknown.
pub const NO_EXPIRES_IN_OPAQUE: &str = "urn:test:no-expires-in-opaque";
/// Not configured: token requests for it fail with 400 `invalid_target`.
pub const UNKNOWN_RESOURCE: &str = "https://unknown.example.test";

// ---- Clients -------------------------------------------------------------------------------

/// How a test client must authenticate at the token endpoint (enforced strictly: using the
/// other method gives 401 `invalid_client`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    ClientSecretBasic,
    ClientSecretPost,
    /// RFC 7523 `client_assertion`, signed with the key from [`OidcServer::client_private_key`].
    PrivateKeyJwt,
    /// RFC 8705 §2.1 `tls_client_auth` (mTLS server only, [`OidcServer::start_mtls`]): a
    /// certificate issued by the test CA with the registered subject, presented in the TLS
    /// handshake at [`OidcServer::mtls_token_endpoint`]; `client_id` in the form, no secret.
    TlsClientAuth,
    /// RFC 8705 §2.2 `self_signed_tls_client_auth` (mTLS server only): the one self-signed
    /// certificate registered for the client, presented at [`OidcServer::mtls_token_endpoint`];
    /// `client_id` in the form, no secret.
    SelfSignedTlsClientAuth,
    /// Federated client authentication (federation server only, [`OidcServer::start_federated`]):
    /// `client_id`, `client_assertion_type` [`CLIENT_ASSERTION_TYPE_JWT_BEARER`] and
    /// `client_assertion` = a Kubernetes ServiceAccount token of the client's ServiceAccount
    /// (not signed by the client: by the cluster). No secret.
    ServiceAccountToken,
    /// A public client (`token_endpoint_auth_method: none`): `client_id` in the form only.
    None,
}

#[derive(Debug, Clone, Copy)]
pub struct TestClient {
    pub id: &'static str,
    pub secret: &'static str,
    pub method: AuthMethod,
}

/// client_credentials only, HTTP Basic.
pub const M2M_BASIC: TestClient = TestClient {
    id: "m2m-basic",
    secret: "m2m-basic-secret",
    method: AuthMethod::ClientSecretBasic,
};
/// client_credentials only, credentials in the form body.
pub const M2M_POST: TestClient = TestClient {
    id: "m2m-post",
    secret: "m2m-post-secret",
    method: AuthMethod::ClientSecretPost,
};
/// HTTP Basic with characters that must be form-urlencoded before base64 (RFC 6749 §2.3.1).
pub const M2M_SPECIAL: TestClient = TestClient {
    id: "m2m:special",
    secret: "s3cr3t/with+special&chars=",
    method: AuthMethod::ClientSecretBasic,
};
/// private_key_jwt with RS256 (RSA 2048 key generated at server start). `secret` is empty.
pub const M2M_JWT_RS256: TestClient = TestClient {
    id: "m2m-jwt-rs256",
    secret: "",
    method: AuthMethod::PrivateKeyJwt,
};
/// private_key_jwt with ES256 (P-256 key generated at server start). `secret` is empty.
pub const M2M_JWT_ES256: TestClient = TestClient {
    id: "m2m-jwt-es256",
    secret: "",
    method: AuthMethod::PrivateKeyJwt,
};
/// private_key_jwt with PS256 (RSA 2048 key generated at server start). `secret` is empty.
pub const M2M_JWT_PS256: TestClient = TestClient {
    id: "m2m-jwt-ps256",
    secret: "",
    method: AuthMethod::PrivateKeyJwt,
};
/// private_key_jwt with ES384 (P-384 key generated at server start). `secret` is empty.
pub const M2M_JWT_ES384: TestClient = TestClient {
    id: "m2m-jwt-es384",
    secret: "",
    method: AuthMethod::PrivateKeyJwt,
};
/// client_credentials and refresh_token (refresh tokens from [`OidcServer::mint_refresh_token`]).
pub const M2M_REFRESH: TestClient = TestClient {
    id: "m2m-refresh",
    secret: "m2m-refresh-secret",
    method: AuthMethod::ClientSecretBasic,
};

/// Like [`M2M_REFRESH`], on a server with a refresh-token reuse grace period of 120 s: a
/// refresh token presented again within that time gets its first answer again.
pub const M2M_REFRESH_GRACE: TestClient = TestClient {
    id: "m2m-refresh-grace",
    secret: "m2m-refresh-grace-secret",
    method: AuthMethod::ClientSecretBasic,
};

/// client_credentials, HTTP Basic; every token must be DPoP-bound (RFC 9449): a request
/// without a `DPoP` proof is `invalid_grant`, JWTs carry `cnf.jkt`, `token_type` is `DPoP`.
pub const M2M_DPOP: TestClient = TestClient {
    id: "m2m-dpop",
    secret: "m2m-dpop-secret",
    method: AuthMethod::ClientSecretBasic,
};

/// mTLS server only ([`OidcServer::start_mtls`]): client_credentials with `tls_client_auth`.
/// Any certificate from [`TestPki::client`]`("m2m-tls")` (subject `CN=m2m-tls`) is accepted,
/// so a renewed one is too; tokens are bound to it (`cnf["x5t#S256"]`). Without a certificate
/// (e.g. at [`OidcServer::token_endpoint`]) or with one the CA did not issue:
/// 401 `invalid_client`. `secret` is empty.
pub const M2M_TLS: TestClient = TestClient {
    id: "m2m-tls",
    secret: "",
    method: AuthMethod::TlsClientAuth,
};

/// mTLS server only: client_credentials with `self_signed_tls_client_auth`. Only the
/// self-signed certificate given to [`OidcServer::start_mtls`] is accepted (another one:
/// 401 `invalid_client`); tokens are bound to it (`cnf["x5t#S256"]`). `secret` is empty.
pub const M2M_SELF_SIGNED: TestClient = TestClient {
    id: "m2m-self-signed",
    secret: "",
    method: AuthMethod::SelfSignedTlsClientAuth,
};

// ---- Federation (Kubernetes ServiceAccount tokens, RFC 8693 token exchange) -------------

/// The `client_assertion_type` of RFC 7523 assertions (here: ServiceAccount tokens).
pub const CLIENT_ASSERTION_TYPE_JWT_BEARER: &str =
    "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
/// The RFC 8693 token-exchange `grant_type`.
pub const GRANT_TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// RFC 8693 token type of a JWT: the only `subject_token_type` the server takes (a
/// ServiceAccount token), and an `issued_token_type` when asked for as `requested_token_type`.
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// RFC 8693 token type of an access token: the `issued_token_type` without
/// `requested_token_type`, with this one, and with any type other than [`TOKEN_TYPE_JWT`].
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
/// RFC 8693 token type of an ID token: asked for, the server still answers an access token.
pub const TOKEN_TYPE_ID_TOKEN: &str = "urn:ietf:params:oauth:token-type:id_token";
/// The audience Entra ID requires in a federated credential's token: what
/// [`M2M_FEDERATED_ENTRA`]'s ServiceAccount tokens must hold.
pub const ENTRA_AUDIENCE: &str = "api://AzureADTokenExchange";
/// The ServiceAccount (in [`Federation::namespace`]) whose tokens authenticate [`M2M_FEDERATED`].
pub const FEDERATED_SERVICE_ACCOUNT: &str = "idp-federated";
/// The ServiceAccount whose tokens authenticate [`M2M_FEDERATED_ENTRA`].
pub const FEDERATED_ENTRA_SERVICE_ACCOUNT: &str = "idp-federated-entra";
/// The ServiceAccount whose tokens [`M2M_EXCHANGE`] may exchange.
pub const EXCHANGE_SERVICE_ACCOUNT: &str = "workload-exchange";

/// Federation server only: client_credentials, authenticated only by a ServiceAccount token
/// of [`FEDERATED_SERVICE_ACCOUNT`] whose `aud` contains the server's issuer identifier
/// ([`OidcServer::issuer`]). Resources, scopes and tokens as [`M2M_BASIC`]. `secret` is empty.
pub const M2M_FEDERATED: TestClient = TestClient {
    id: "m2m-federated",
    secret: "",
    method: AuthMethod::ServiceAccountToken,
};
/// Like [`M2M_FEDERATED`], for ServiceAccount [`FEDERATED_ENTRA_SERVICE_ACCOUNT`] and `aud`
/// [`ENTRA_AUDIENCE`] (a token for the issuer identifier is refused).
pub const M2M_FEDERATED_ENTRA: TestClient = TestClient {
    id: "m2m-federated-entra",
    secret: "",
    method: AuthMethod::ServiceAccountToken,
};
/// Federation server only: a public client (method none) with only the RFC 8693
/// token-exchange grant; trusts subject tokens of [`EXCHANGE_SERVICE_ACCOUNT`] whose `aud`
/// contains the server's issuer identifier. `secret` is empty.
pub const M2M_EXCHANGE: TestClient = TestClient {
    id: "m2m-exchange",
    secret: "",
    method: AuthMethod::None,
};

/// Where the federation server gets the cluster's public keys from.
#[derive(Debug, Clone)]
pub enum FederationKeys {
    /// A JWKS URL the server fetches (as Entra ID and Keycloak fetch `/openid/v1/jwks`);
    /// plain `http` on the loopback works.
    Uri(String),
    /// A JWKS JSON document, written to a temporary file for the server (for clusters whose
    /// JWKS needs authentication: the test fetches it).
    Document(String),
}

/// What [`OidcServer::start_federated`] trusts: ServiceAccount tokens with `iss` = `issuer`,
/// signed by `keys`, of ServiceAccounts in `namespace`.
#[derive(Debug, Clone)]
pub struct Federation {
    /// The cluster's service-account issuer, e.g. `https://kubernetes.default.svc.cluster.local`.
    pub issuer: String,
    pub keys: FederationKeys,
    pub namespace: String,
}

impl Federation {
    /// `system:serviceaccount:<namespace>:<service_account>`: the `sub` the server expects.
    pub fn subject(&self, service_account: &str) -> String {
        format!("system:serviceaccount:{}:{service_account}", self.namespace)
    }
}

/// Token endpoint requests seen by the server since start or the last reset, successful or
/// not. A request without `resource` is counted under `"(none)"`; one with several under
/// the values joined by a space.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TokenRequestCounts {
    pub total: u64,
    pub by_resource: BTreeMap<String, u64>,
    pub by_client: BTreeMap<String, u64>,
    /// Failed requests by OAuth `error` code (`http_<status>` when the body had none).
    #[serde(default)]
    pub by_error: BTreeMap<String, u64>,
    /// Answers held by [`OidcServer::hold_next_refresh`].
    #[serde(default)]
    pub held: u64,
}

impl TokenRequestCounts {
    pub fn for_resource(&self, resource: &str) -> u64 {
        self.by_resource.get(resource).copied().unwrap_or(0)
    }

    pub fn for_client(&self, client_id: &str) -> u64 {
        self.by_client.get(client_id).copied().unwrap_or(0)
    }

    pub fn errors(&self, error: &str) -> u64 {
        self.by_error.get(error).copied().unwrap_or(0)
    }
}

/// Every secret value the server received or handed out since it started (never reset), as
/// served by `/__test/secrets-seen`: for tests asserting that none of them leaks.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SecretsSeen {
    /// Access tokens in token responses.
    pub access_tokens: Vec<String>,
    /// Refresh tokens in token responses, presented in refresh requests, or minted by
    /// [`OidcServer::mint_refresh_token`].
    pub refresh_tokens: Vec<String>,
    /// `client_assertion`s (private_key_jwt) received.
    pub client_assertions: Vec<String>,
    /// Client secrets received, from the Basic header (raw and form-decoded) or the form.
    pub client_secrets: Vec<String>,
    /// Federation server: ServiceAccount tokens received, as a federated client's
    /// `client_assertion` (also in [`client_assertions`](Self::client_assertions)) or as a
    /// token exchange's `subject_token`.
    #[serde(default)]
    pub service_account_tokens: Vec<String>,
}

/// The private key of a private_key_jwt client, as served by `/__test/client-keys/<id>`.
#[derive(Debug, Clone, Deserialize)]
pub struct ClientKey {
    pub kid: String,
    /// `RS256`, `PS256`, `ES256` or `ES384`: the only `alg` the server accepts for this client.
    pub alg: String,
    /// PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`).
    pub pem: String,
    /// The same key as a private JWK, with `kid`, `alg` and `use`.
    pub jwk: serde_json::Value,
}

/// A running test authorization server. Killed when dropped (and it also exits by itself
/// when its stdin, held here, closes).
pub struct OidcServer {
    /// `http://127.0.0.1:PORT` (`https://` from [`start_mtls`](Self::start_mtls)), no
    /// trailing slash.
    pub issuer: String,
    /// mTLS server only: the RFC 8705 §5 mTLS alias of the token endpoint
    /// (`https://127.0.0.1:PORT2/token`, discovery's `mtls_endpoint_aliases.token_endpoint`),
    /// where clients present their certificates. `None` from [`start`](Self::start).
    pub mtls_token_endpoint: Option<String>,
    // Trusts the test CA on an mTLS server.
    http: reqwest::Client,
    child: Child,
    // Held open: the server exits when its stdin closes, i.e. when this process goes away.
    _stdin: ChildStdin,
    // Held open so the server never writes to a closed pipe.
    _stdout: Lines<BufReader<ChildStdout>>,
    // The PEM files of an mTLS server, the JWKS file of a federation server; removed after
    // the server is killed.
    _temp_dir: Option<TempDir>,
}

/// What an mTLS start needs: the directory with the PEM files, and the CA to trust.
struct MtlsSetup {
    dir: TempDir,
    ca_pem: String,
}

/// What a federation start needs: the `OIDC_SERVER_FEDERATION_*` values, and the directory
/// holding the JWKS file of [`FederationKeys::Document`].
struct FederationSetup {
    issuer: String,
    namespace: String,
    keys: FederationKeySetup,
}

enum FederationKeySetup {
    Uri(String),
    File(TempDir),
}

const FEDERATION_JWKS_FILE: &str = "jwks.json";

/// The mode a server is started in (at most one of them).
#[derive(Default)]
struct Setup {
    mtls: Option<MtlsSetup>,
    federation: Option<FederationSetup>,
}

impl Setup {
    fn into_temp_dir(self) -> Option<TempDir> {
        let federation_dir = self.federation.and_then(|f| match f.keys {
            FederationKeySetup::File(dir) => Some(dir),
            FederationKeySetup::Uri(_) => None,
        });
        self.mtls.map(|m| m.dir).or(federation_dir)
    }
}

/// The server's answer once it listens.
#[derive(Debug, Deserialize)]
struct Ready {
    issuer: String,
    #[serde(default)]
    mtls_token_endpoint: Option<String>,
}

impl OidcServer {
    /// The folder holding `server.mjs`.
    pub fn dir() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests")
            .join("oidc-server")
    }

    /// Starts `tests/oidc-server/server.mjs` and waits (at most 20 s) for its ready line. A
    /// start that prints nothing in that time is killed and tried again, up to 3 times. Node
    /// 20 used to deadlock at startup (a GC during a key export, see `generateKeyPair` in
    /// server.mjs); that is worked around, and the retry stays as a safety net.
    pub async fn start() -> OidcServer {
        Self::start_with(Setup::default()).await
    }

    /// Starts the server in mTLS mode (RFC 8705): `pki`'s CA, server certificate and key, and
    /// `self_signed` (the certificate registered for [`M2M_SELF_SIGNED`]) are written to a
    /// fresh temporary directory (removed when the server is dropped) named by
    /// `OIDC_SERVER_MTLS_DIR`. The issuer is `https://127.0.0.1:PORT` (a server certificate
    /// for `127.0.0.1` signed by the test CA, no client certificate asked for); token
    /// requests with a client certificate go to [`mtls_token_endpoint`](Self::mtls_token_endpoint).
    /// The helpers here trust the test CA; a test's own client must too
    /// (`reqwest::ClientBuilder::tls_certs_only` with [`TestPki::ca_pem`]).
    pub async fn start_mtls(pki: &TestPki, self_signed: &ClientCert) -> OidcServer {
        let dir = TempDir::new("oidc-server-mtls");
        dir.write("ca.pem", &pki.ca_pem);
        dir.write("server.pem", &pki.server_cert_pem);
        dir.write("server-key.pem", &pki.server_key_pem);
        dir.write("self-signed-client.pem", &self_signed.cert_pem);
        Self::start_with(Setup {
            mtls: Some(MtlsSetup {
                dir,
                ca_pem: pki.ca_pem.clone(),
            }),
            federation: None,
        })
        .await
    }

    /// Starts the server in federation mode (see the README): Kubernetes ServiceAccount
    /// tokens with `iss` = `federation.issuer`, signed by a key of `federation.keys`, of
    /// ServiceAccounts in `federation.namespace`, authenticate [`M2M_FEDERATED`] and
    /// [`M2M_FEDERATED_ENTRA`] (client_credentials) and are exchanged by [`M2M_EXCHANGE`]
    /// (RFC 8693, [`GRANT_TOKEN_EXCHANGE`]). A [`FederationKeys::Document`] is written to a
    /// temporary directory removed when the server is dropped; a [`FederationKeys::Uri`] is
    /// fetched by the server when it first needs the keys. The issuer stays
    /// `http://127.0.0.1:PORT`; every other client and resource works as from [`start`](Self::start).
    pub async fn start_federated(federation: &Federation) -> OidcServer {
        let keys = match &federation.keys {
            FederationKeys::Uri(uri) => FederationKeySetup::Uri(uri.clone()),
            FederationKeys::Document(document) => {
                let dir = TempDir::new("oidc-server-federation");
                dir.write(FEDERATION_JWKS_FILE, document);
                FederationKeySetup::File(dir)
            }
        };
        Self::start_with(Setup {
            mtls: None,
            federation: Some(FederationSetup {
                issuer: federation.issuer.clone(),
                namespace: federation.namespace.clone(),
                keys,
            }),
        })
        .await
    }

    /// [`start`](Self::start), [`start_mtls`](Self::start_mtls) or
    /// [`start_federated`](Self::start_federated): the retries of all.
    async fn start_with(setup: Setup) -> OidcServer {
        let mut last = String::new();
        for attempt in 1..=START_ATTEMPTS {
            match Self::try_start(&setup).await {
                Ok(mut server) => {
                    server._temp_dir = setup.into_temp_dir();
                    return server;
                }
                Err(why) => {
                    eprintln!("[oidc-server] attempt {attempt}: {why}");
                    last = why;
                }
            }
        }
        panic!("{last} ({START_ATTEMPTS} attempts)")
    }

    async fn try_start(setup: &Setup) -> Result<OidcServer, String> {
        let mtls = setup.mtls.as_ref();
        let dir = Self::dir();
        if !dir.join("node_modules").join("oidc-provider").is_dir() {
            panic!(
                "the test OAuth server's dependencies are not installed ({} is missing): \
                 run `npm ci --prefix tests/oidc-server` first",
                dir.join("node_modules").display()
            );
        }
        let node = std::env::var("NODE").unwrap_or_else(|_| "node".to_owned());

        let mut command = Command::new(&node);
        command.arg("server.mjs").current_dir(&dir);
        match mtls {
            Some(setup) => command.env("OIDC_SERVER_MTLS_DIR", setup.dir.path()),
            None => command.env_remove("OIDC_SERVER_MTLS_DIR"),
        };
        for var in [
            "OIDC_SERVER_FEDERATION_ISSUER",
            "OIDC_SERVER_FEDERATION_JWKS_URI",
            "OIDC_SERVER_FEDERATION_JWKS_FILE",
            "OIDC_SERVER_FEDERATION_NAMESPACE",
        ] {
            command.env_remove(var);
        }
        if let Some(federation) = &setup.federation {
            command
                .env("OIDC_SERVER_FEDERATION_ISSUER", &federation.issuer)
                .env("OIDC_SERVER_FEDERATION_NAMESPACE", &federation.namespace);
            match &federation.keys {
                FederationKeySetup::Uri(uri) => {
                    command.env("OIDC_SERVER_FEDERATION_JWKS_URI", uri);
                }
                FederationKeySetup::File(dir) => {
                    command.env(
                        "OIDC_SERVER_FEDERATION_JWKS_FILE",
                        dir.path().join(FEDERATION_JWKS_FILE),
                    );
                }
            }
        }
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot start `{node} server.mjs` in {}: {e} (is Node.js installed?)",
                    dir.display()
                )
            });
        let stdin = child.stdin.take().expect("piped stdin");
        let mut stdout = BufReader::new(child.stdout.take().expect("piped stdout")).lines();

        let ready = match tokio::time::timeout(START_TIMEOUT, read_ready(&mut stdout)).await {
            Ok(Ok(ready)) => ready,
            Ok(Err(why)) => {
                let status = child.wait().await.ok();
                panic!(
                    "test OAuth server did not start: {why} (exit status {status:?}); see its stderr above"
                );
            }
            Err(_) => {
                let _ = child.start_kill();
                return Err(format!(
                    "test OAuth server printed no ready line within {START_TIMEOUT:?}; see its stderr above"
                ));
            }
        };

        assert_eq!(
            ready.mtls_token_endpoint.is_some(),
            mtls.is_some(),
            "ready line {ready:?}: an mTLS token endpoint if and only if started in mTLS mode"
        );

        let mut http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10));
        if let Some(setup) = mtls {
            let ca = reqwest::Certificate::from_pem(setup.ca_pem.as_bytes()).expect("CA PEM");
            http = http.tls_certs_only([ca]);
        }
        let http = http.build().expect("reqwest client");

        Ok(OidcServer {
            issuer: ready.issuer.trim_end_matches('/').to_owned(),
            mtls_token_endpoint: ready.mtls_token_endpoint,
            http,
            child,
            _stdin: stdin,
            _stdout: stdout,
            _temp_dir: None,
        })
    }

    /// The process id of the Node server (`None` once it has exited).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// An endpoint of the OAuth client for this server's token endpoint, as `client_id` with
    /// `credentials` (system roots, no client certificate, a 10 s timeout).
    pub fn endpoint(
        &self,
        client_id: &str,
        credentials: audience_token_operator::oauth::ClientCredentials,
    ) -> audience_token_operator::oauth::Endpoint {
        audience_token_operator::oauth::Endpoint {
            token_endpoint: url::Url::parse(&self.token_endpoint()).expect("token endpoint URL"),
            client_id: client_id.to_string(),
            credentials,
            ca_bundle: None,
            client_certificate: None,
            timeout: Duration::from_secs(10),
        }
    }

    /// The token endpoint (`{issuer}/token`, as in the server's discovery document).
    pub fn token_endpoint(&self) -> String {
        format!("{}/token", self.issuer)
    }

    /// `{issuer}/.well-known/openid-configuration`.
    pub fn discovery_url(&self) -> String {
        format!("{}/.well-known/openid-configuration", self.issuer)
    }

    /// `{issuer}/jwks` (the server's public signing keys; new at every start).
    pub fn jwks_uri(&self) -> String {
        format!("{}/jwks", self.issuer)
    }

    /// Token endpoint requests counted since start or the last [`reset_counts`](Self::reset_counts).
    pub async fn token_requests(&self) -> TokenRequestCounts {
        let url = format!("{}/__test/token-requests", self.issuer);
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .expect("GET /__test/token-requests");
        assert!(
            response.status().is_success(),
            "GET {url}: {}",
            response.status()
        );
        response.json().await.expect("token request counts JSON")
    }

    /// Every secret value the server received or handed out since start.
    pub async fn secrets_seen(&self) -> SecretsSeen {
        let url = format!("{}/__test/secrets-seen", self.issuer);
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .expect("GET /__test/secrets-seen");
        assert!(
            response.status().is_success(),
            "GET {url}: {}",
            response.status()
        );
        response.json().await.expect("secrets seen JSON")
    }

    /// Sets the token request counters back to zero.
    pub async fn reset_counts(&self) {
        let url = format!("{}/__test/reset", self.issuer);
        let response = self
            .http
            .post(&url)
            .send()
            .await
            .expect("POST /__test/reset");
        assert!(
            response.status().is_success(),
            "POST {url}: {}",
            response.status()
        );
    }

    /// The private key of a private_key_jwt client ([`M2M_JWT_RS256`], [`M2M_JWT_ES256`],
    /// [`M2M_JWT_PS256`], [`M2M_JWT_ES384`]),
    /// generated at server start. Assertions: `iss` = `sub` = client id, `aud` = issuer or
    /// token endpoint, unique `jti`, `exp` required, header `alg` = [`ClientKey::alg`].
    pub async fn client_private_key(&self, client_id: &str) -> ClientKey {
        let url = format!(
            "{}/__test/client-keys/{}",
            self.issuer,
            url::form_urlencoded::byte_serialize(client_id.as_bytes()).collect::<String>()
        );
        let response = self
            .http
            .get(&url)
            .send()
            .await
            .expect("GET /__test/client-keys");
        assert!(
            response.status().is_success(),
            "GET {url}: {}",
            response.status()
        );
        response.json().await.expect("client key JSON")
    }

    /// Mints a refresh token for `client_id` (e.g. [`M2M_REFRESH`]) as if a user had authorized
    /// it for `resources` (one grant covering all of them). Each resource gets the scopes in
    /// `scope` that it allows, or all of its scopes when `scope` is `None`.
    ///
    /// Refresh tokens rotate on every use; reusing a used one gives `invalid_grant` and revokes
    /// the grant (all its refresh tokens).
    pub async fn mint_refresh_token(
        &self,
        client_id: &str,
        resources: &[&str],
        scope: Option<&str>,
    ) -> String {
        #[derive(Deserialize)]
        struct Minted {
            refresh_token: String,
        }
        let url = format!("{}/__test/refresh-token", self.issuer);
        let mut body = serde_json::json!({ "client_id": client_id, "resources": resources });
        if let Some(scope) = scope {
            body["scope"] = scope.into();
        }
        let response = self
            .http
            .post(&url)
            .json(&body)
            .send()
            .await
            .expect("POST /__test/refresh-token");
        let status = response.status();
        let text = response.text().await.unwrap_or_default();
        assert!(status.is_success(), "POST {url}: {status}: {text}");
        serde_json::from_str::<Minted>(&text)
            .expect("refresh token JSON")
            .refresh_token
    }
}

impl OidcServer {
    /// Holds the next `refresh_token` answer for `hold` after the server made it (the
    /// refresh token is rotated already): a client stopped meanwhile never sees it.
    pub async fn hold_next_refresh(&self, hold: Duration) {
        let url = format!("{}/__test/hold-next-refresh", self.issuer);
        let millis = u64::try_from(hold.as_millis()).expect("hold fits");
        let response = self
            .http
            .post(&url)
            .json(&serde_json::json!({ "ms": millis }))
            .send()
            .await
            .expect("POST /__test/hold-next-refresh");
        assert!(
            response.status().is_success(),
            "POST {url}: {}",
            response.status()
        );
    }

    /// Spends `refresh_token` as another client of the chain would: one refresh request
    /// for `resource`. Returns the server's answer (status, JSON body).
    pub async fn spend_refresh_token(
        &self,
        client: &TestClient,
        refresh_token: &str,
        resource: &str,
    ) -> (u16, serde_json::Value) {
        let response = self
            .http
            .post(self.token_endpoint())
            .basic_auth(client.id, Some(client.secret))
            .form(&[
                ("grant_type", "refresh_token"),
                ("refresh_token", refresh_token),
                ("resource", resource),
            ])
            .send()
            .await
            .expect("POST token endpoint");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
    }
}

impl OidcServer {
    /// `{issuer}/__test/resource`: a resource server's DPoP check (see the README).
    pub fn resource_url(&self) -> String {
        format!("{}/__test/resource", self.issuer)
    }

    /// Makes the token endpoint demand DPoP nonces (RFC 9449 §8), or stop demanding them.
    pub async fn require_dpop_nonce(&self, require: bool) {
        let url = format!("{}/__test/dpop-require-nonce", self.issuer);
        let response = self
            .http
            .post(&url)
            .json(&serde_json::json!({ "require": require }))
            .send()
            .await
            .expect("POST /__test/dpop-require-nonce");
        assert!(
            response.status().is_success(),
            "POST {url}: {}",
            response.status()
        );
    }

    /// `GET /__test/resource` with `Authorization: DPoP <token>` and a `DPoP: <proof>`
    /// header (each only when given). Returns the status and the JSON body (`reason` on 401).
    pub async fn call_resource(
        &self,
        token: Option<&str>,
        proof: Option<&str>,
    ) -> (u16, serde_json::Value) {
        let mut request = self.http.get(self.resource_url());
        if let Some(token) = token {
            request = request.header("authorization", format!("DPoP {token}"));
        }
        if let Some(proof) = proof {
            request = request.header("dpop", proof);
        }
        let response = request.send().await.expect("GET /__test/resource");
        let status = response.status().as_u16();
        (status, response.json().await.unwrap_or_default())
    }
}

impl Drop for OidcServer {
    fn drop(&mut self) {
        // SIGKILL; the server also exits on its own when its stdin (dropped with us) closes.
        let _ = self.child.start_kill();
    }
}

/// Reads stdout lines until the ready line: `{"issuer": "..."}`, with
/// `"mtls_token_endpoint": "..."` in mTLS mode.
async fn read_ready(stdout: &mut Lines<BufReader<ChildStdout>>) -> Result<Ready, String> {
    loop {
        match stdout.next_line().await {
            Ok(Some(line)) => match serde_json::from_str::<Ready>(line.trim()) {
                Ok(ready) => return Ok(ready),
                Err(_) => eprintln!("[oidc-server stdout] {line}"),
            },
            Ok(None) => {
                return Err("it exited (stdout closed) before printing its ready line".to_owned());
            }
            Err(e) => return Err(format!("reading its stdout: {e}")),
        }
    }
}

/// A directory under the system temp directory, unique to this process and call, removed
/// (with its files) when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new(prefix: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or_default();
        let path = std::env::temp_dir().join(format!(
            "{prefix}-{}-{}-{nanos}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let mut builder = std::fs::DirBuilder::new();
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        // `create`, not `create_all`: fails rather than reuse a directory that exists.
        builder
            .create(&path)
            .unwrap_or_else(|e| panic!("cannot create {}: {e}", path.display()));
        TempDir(path)
    }

    fn path(&self) -> &Path {
        &self.0
    }

    fn write(&self, name: &str, contents: &str) {
        let path = self.0.join(name);
        std::fs::write(&path, contents)
            .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
