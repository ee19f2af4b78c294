//! The `token` debugging command: one token request from a TokenIssuer or
//! ClusterTokenIssuer manifest, without a cluster, and a report of what came back: the
//! response metadata, the single-audience check the operator applies, and the decoded JWT
//! header and claims. The access token is only in the report when asked for.
//!
//! The issuer's `clientSecretRef` / `privateKeyRef` name Secrets this command cannot read,
//! so credentials come from files or environment variables ([`CredentialSources`]).

use std::fmt::Write as _;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jiff::{SignedDuration, Timestamp};
use serde::Deserialize as _;
use serde_json::{Value, json};

use crate::api::{
    ClusterTokenIssuer, GROUP, GrantType, IssuerKind, IssuerSpec, SecretKeySelector, TokenIssuer,
};
use crate::failure::Failure;
use crate::issuer::params::{DEFAULT_REQUEST_TIMEOUT, DEFAULT_TOKEN_LIFETIME, audience_param};
use crate::issuer::tenancy::glob_match;
use crate::issuer::{
    CertificateCredential, CertificateRef, Credential, CredentialKind, CredentialRef,
    IssuerEndpoints, IssuerTarget, ServiceAccountToken, ServiceAccountTokenRef, method_name,
    optional_duration,
};
use crate::oauth::dpop::{DpopAlgorithm, DpopKey};
use crate::oauth::jwt::decode_claims;
use crate::oauth::{
    AudienceParam, Binding, ClientCredentials, Grant, TokenClient, TokenError, TokenRequest,
    TokenResponse, expiry, granted_scopes, issue,
};
use crate::redact::SecretString;

/// Environment variable holding the client secret (after `--client-secret-file`).
pub const CLIENT_SECRET_ENV: &str = "ATO_CLIENT_SECRET";
/// Environment variable holding the PrivateKeyJWT private key (after `--private-key-file`).
pub const PRIVATE_KEY_ENV: &str = "ATO_PRIVATE_KEY";
/// Environment variable holding a ServiceAccount token (after
/// `--service-account-token-file`).
pub const SERVICE_ACCOUNT_TOKEN_ENV: &str = "ATO_SERVICE_ACCOUNT_TOKEN";

/// Why the command could not produce a report. Messages never contain a credential or a
/// token.
#[derive(Debug, thiserror::Error)]
pub enum DebugTokenError {
    /// A file (manifest or credential) could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path as given (`-` is stdin).
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The manifest holds no usable TokenIssuer or ClusterTokenIssuer.
    #[error("{0}")]
    Manifest(String),
    /// The issuer's client authentication needs a credential that was not supplied.
    #[error(
        "{method} needs {what}{reference}, which this command cannot read without a cluster; \
         pass {flag} <path> or set {env}"
    )]
    MissingCredential {
        /// The issuer's `clientAuth.method`.
        method: &'static str,
        /// `a client secret` or `a private key`.
        what: &'static str,
        /// ` (clientSecretRef: Secret x, key y)`, or empty.
        reference: String,
        /// The command-line flag that supplies it.
        flag: &'static str,
        /// The environment variable that supplies it.
        env: &'static str,
    },
    /// A credential was supplied but cannot be used (an empty file, say).
    #[error("{0}")]
    Credential(String),
    /// The issuer uses something this command does not support.
    #[error("{0}")]
    Unsupported(String),
    /// The issuer's settings cannot be used as they are (a bad URL or duration, say).
    #[error("invalid issuer settings: {0}")]
    Config(String),
    /// Discovery failed, or the HTTP client could not be built.
    #[error("{0}")]
    Setup(#[source] TokenError),
    /// The issuer layer could not make an endpoint of the issuer (a missing or unusable
    /// credential, a bad setting, failed discovery): its message.
    #[error("{0}")]
    Issuer(String),
    /// The token request failed: the server's OAuth error, or no answer.
    #[error("token request to {token_endpoint} failed: {source}")]
    Token {
        /// The token endpoint that was called.
        token_endpoint: String,
        /// What went wrong; [`TokenError::Server`] carries the server's error and
        /// description.
        #[source]
        source: TokenError,
    },
}

impl DebugTokenError {
    /// The error as one JSON object, for `--output json`.
    pub fn to_json(&self) -> Value {
        let mut out = json!({ "ok": false, "message": error_chain(self) });
        if let DebugTokenError::Token {
            token_endpoint,
            source,
        } = self
        {
            out["token_endpoint"] = json!(token_endpoint);
            if let TokenError::Server {
                status,
                error,
                description,
                ..
            } = source
            {
                out["http_status"] = json!(status);
                out["error"] = json!(error);
                out["error_description"] = json!(description);
            }
        }
        out
    }
}

pub use crate::oauth::error_chain;

// ---- Manifest -----------------------------------------------------------------------------

/// The issuer found in a manifest.
#[derive(Clone, Debug)]
pub struct ManifestIssuer {
    /// Its kind.
    pub kind: IssuerKind,
    /// `namespace/name`, `name`, or `(unnamed)`.
    pub name: String,
    /// `metadata.namespace`, if the manifest has one.
    pub namespace: Option<String>,
    /// `metadata.name`, if the manifest has one.
    pub object_name: Option<String>,
    /// Its spec.
    pub spec: IssuerSpec,
    /// A ClusterTokenIssuer's `allowedResources`.
    pub allowed_resources: Option<Vec<String>>,
}

impl ManifestIssuer {
    /// `TokenIssuer shop/corp-idp`, for the report.
    pub fn label(&self) -> String {
        let kind = match self.kind {
            IssuerKind::TokenIssuer => "TokenIssuer",
            IssuerKind::ClusterTokenIssuer => "ClusterTokenIssuer",
        };
        format!("{kind} {}", self.name)
    }
}

/// Reads a manifest file, or stdin for `-`.
pub fn read_manifest(path: &Path) -> Result<String, DebugTokenError> {
    let read_error = |source| DebugTokenError::Read {
        path: path.display().to_string(),
        source,
    };
    if path.as_os_str() == "-" {
        let mut text = String::new();
        std::io::stdin()
            .read_to_string(&mut text)
            .map_err(read_error)?;
        Ok(text)
    } else {
        std::fs::read_to_string(path).map_err(read_error)
    }
}

/// The first TokenIssuer or ClusterTokenIssuer (`apiVersion: audiencetoken.io/…`) in a YAML
/// or JSON text. Several documents (`---`) and `kind: List` are searched in order; other
/// objects are skipped.
pub fn parse_manifest(text: &str) -> Result<ManifestIssuer, DebugTokenError> {
    let mut skipped = Vec::new();
    for (index, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let value = serde_yaml::Value::deserialize(document).map_err(|e| {
            DebugTokenError::Manifest(format!(
                "document {} of the manifest is not valid YAML or JSON: {e}",
                index + 1
            ))
        })?;
        let objects = match value.get("kind").and_then(|k| k.as_str()) {
            Some("List") => value
                .get("items")
                .and_then(|items| items.as_sequence())
                .cloned()
                .unwrap_or_default(),
            _ => vec![value],
        };
        for object in objects {
            if object.is_null() {
                continue;
            }
            let kind = object.get("kind").and_then(|k| k.as_str());
            let api_version = object.get("apiVersion").and_then(|v| v.as_str());
            let ours = api_version.is_some_and(|v| v.split('/').next() == Some(GROUP));
            match (ours, kind) {
                (true, Some("TokenIssuer")) => return token_issuer(object),
                (true, Some("ClusterTokenIssuer")) => return cluster_token_issuer(object),
                _ => skipped.push(format!(
                    "{} ({})",
                    kind.unwrap_or("no kind"),
                    api_version.unwrap_or("no apiVersion")
                )),
            }
        }
    }
    let found = if skipped.is_empty() {
        "it is empty".to_string()
    } else {
        format!("found: {}", skipped.join(", "))
    };
    Err(DebugTokenError::Manifest(format!(
        "the manifest holds no TokenIssuer or ClusterTokenIssuer (apiVersion {GROUP}/v1alpha1); {found}"
    )))
}

fn invalid(kind: &str, e: serde_yaml::Error) -> DebugTokenError {
    DebugTokenError::Manifest(format!("the {kind} in the manifest is invalid: {e}"))
}

fn token_issuer(object: serde_yaml::Value) -> Result<ManifestIssuer, DebugTokenError> {
    let issuer: TokenIssuer =
        serde_yaml::from_value(object).map_err(|e| invalid("TokenIssuer", e))?;
    let name = match (&issuer.metadata.namespace, &issuer.metadata.name) {
        (Some(ns), Some(name)) => format!("{ns}/{name}"),
        (None, Some(name)) => name.clone(),
        (_, None) => "(unnamed)".to_string(),
    };
    Ok(ManifestIssuer {
        kind: IssuerKind::TokenIssuer,
        name,
        namespace: issuer.metadata.namespace,
        object_name: issuer.metadata.name,
        spec: issuer.spec.issuer,
        allowed_resources: None,
    })
}

fn cluster_token_issuer(object: serde_yaml::Value) -> Result<ManifestIssuer, DebugTokenError> {
    let issuer: ClusterTokenIssuer =
        serde_yaml::from_value(object).map_err(|e| invalid("ClusterTokenIssuer", e))?;
    Ok(ManifestIssuer {
        kind: IssuerKind::ClusterTokenIssuer,
        name: issuer
            .metadata
            .name
            .clone()
            .unwrap_or_else(|| "(unnamed)".to_string()),
        namespace: None,
        object_name: issuer.metadata.name,
        spec: issuer.spec.issuer,
        allowed_resources: issuer.spec.allowed_resources,
    })
}

/// Reads RFC 9396 authorization details from a file: a JSON array of objects, each with a
/// non-empty string `type` (§2). For the `token` and `login` commands.
pub fn read_authorization_details(path: &Path) -> Result<Vec<Value>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let value: Value =
        serde_json::from_str(&text).map_err(|e| format!("{} is not JSON: {e}", path.display()))?;
    let typed = |item: &Value| {
        item.get("type")
            .and_then(Value::as_str)
            .is_some_and(|t| !t.is_empty())
    };
    match value {
        Value::Array(items) if items.iter().all(typed) => Ok(items),
        _ => Err(format!(
            "{}: authorization details must be a JSON array of objects, each with a string type (RFC 9396 §2)",
            path.display()
        )),
    }
}

// ---- Credentials --------------------------------------------------------------------------

/// Where credentials may come from, in order of precedence: the file, then the environment
/// variable. `Debug` redacts the values.
#[derive(Clone, Debug, Default)]
pub struct CredentialSources {
    /// `--client-secret-file`.
    pub client_secret_file: Option<PathBuf>,
    /// The value of [`CLIENT_SECRET_ENV`].
    pub client_secret_env: Option<SecretString>,
    /// `--private-key-file`.
    pub private_key_file: Option<PathBuf>,
    /// The value of [`PRIVATE_KEY_ENV`].
    pub private_key_env: Option<SecretString>,
    /// `--client-certificate-file`: the certificate (and chain) of `tlsClientCertificate`.
    pub client_certificate_file: Option<PathBuf>,
    /// `--client-key-file`: its private key.
    pub client_key_file: Option<PathBuf>,
    /// `--service-account-token-file`: a ServiceAccount token (`kubectl create token`),
    /// for ServiceAccountToken client authentication and the TokenExchange grant.
    pub service_account_token_file: Option<PathBuf>,
    /// The value of [`SERVICE_ACCOUNT_TOKEN_ENV`].
    pub service_account_token_env: Option<SecretString>,
}

impl CredentialSources {
    /// The given files, and the environment variables of this process (empty counts as
    /// unset).
    pub fn with_env(
        client_secret_file: Option<PathBuf>,
        private_key_file: Option<PathBuf>,
    ) -> Self {
        let env = |name| {
            std::env::var(name)
                .ok()
                .filter(|v| !v.is_empty())
                .map(SecretString::new)
        };
        Self {
            client_secret_file,
            client_secret_env: env(CLIENT_SECRET_ENV),
            private_key_file,
            private_key_env: env(PRIVATE_KEY_ENV),
            client_certificate_file: None,
            client_key_file: None,
            service_account_token_file: None,
            service_account_token_env: env(SERVICE_ACCOUNT_TOKEN_ENV),
        }
    }

    /// With a ServiceAccount token file, for issuers that mint ServiceAccount tokens.
    pub fn with_service_account_token(self, file: Option<PathBuf>) -> Self {
        Self {
            service_account_token_file: file,
            ..self
        }
    }

    /// With the client certificate and key files for an issuer's `tlsClientCertificate`.
    pub fn with_client_certificate(
        self,
        certificate_file: Option<PathBuf>,
        key_file: Option<PathBuf>,
    ) -> Self {
        Self {
            client_certificate_file: certificate_file,
            client_key_file: key_file,
            ..self
        }
    }
}

/// Where a credential was taken from: shown in the report instead of the value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum CredentialSource {
    /// A file.
    File(PathBuf),
    /// An environment variable.
    Env(&'static str),
}

impl std::fmt::Display for CredentialSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CredentialSource::File(path) => write!(f, "file {}", path.display()),
            CredentialSource::Env(name) => write!(f, "env {name}"),
        }
    }
}

/// The credential from `file` if given (one trailing newline removed), else from the
/// environment value. `None` when neither is there.
pub fn resolve_credential(
    file: Option<&Path>,
    env_value: Option<&SecretString>,
    env_name: &'static str,
) -> Result<Option<(SecretString, CredentialSource)>, DebugTokenError> {
    if let Some(path) = file {
        let text = std::fs::read_to_string(path).map_err(|source| DebugTokenError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let value = text
            .strip_suffix("\r\n")
            .or_else(|| text.strip_suffix('\n'))
            .unwrap_or(&text);
        if value.is_empty() {
            return Err(DebugTokenError::Credential(format!(
                "{} is empty",
                path.display()
            )));
        }
        return Ok(Some((
            SecretString::new(value),
            CredentialSource::File(path.to_path_buf()),
        )));
    }
    Ok(env_value
        .filter(|v| !v.is_empty())
        .map(|v| (v.clone(), CredentialSource::Env(env_name))))
}

fn reference_text(field: &str, reference: Option<&SecretKeySelector>) -> String {
    reference
        .map(|r| format!(" ({field}: Secret {}, key {})", r.name, r.key))
        .unwrap_or_default()
}

/// The `token` command's credential source: the issuer's Secrets cannot be read without a
/// cluster, so a client secret or private key comes from a file or the environment, and a
/// client certificate from two files.
impl crate::issuer::CredentialSource for CredentialSources {
    async fn read_certificate(
        &self,
        reference: CertificateRef<'_>,
    ) -> Result<CertificateCredential, Failure> {
        let (Some(certificate_file), Some(key_file)) =
            (&self.client_certificate_file, &self.client_key_file)
        else {
            return Err(Failure::issuer_not_ready(format!(
                "the issuer presents a client certificate (tlsClientCertificate: Secret {}): give \
                 --client-certificate-file and --client-key-file (its tls.crt and tls.key)",
                reference.secret_name
            )));
        };
        let read = |path: &Path| {
            std::fs::read_to_string(path).map_err(|e| {
                Failure::issuer_not_ready(format!("cannot read {}: {e}", path.display()))
            })
        };
        Ok(CertificateCredential {
            chain: read(certificate_file)?,
            key: SecretString::new(read(key_file)?),
            from: format!(
                "files {} and {}",
                certificate_file.display(),
                key_file.display()
            ),
        })
    }

    /// Without a cluster nothing is minted: the token comes from a file or the environment
    /// (`kubectl create token` makes one).
    async fn service_account_token(
        &self,
        reference: ServiceAccountTokenRef<'_>,
    ) -> Result<ServiceAccountToken, Failure> {
        let found = resolve_credential(
            self.service_account_token_file.as_deref(),
            self.service_account_token_env.as_ref(),
            SERVICE_ACCOUNT_TOKEN_ENV,
        )
        .map_err(|e| Failure::issuer_not_ready(e.to_string()))?;
        let Some((token, source)) = found else {
            return Err(Failure::issuer_not_ready(format!(
                "the issuer uses a ServiceAccount token ({}: {}, audience {}): make one with \
                 `kubectl create token {} -n {} --audience {} --duration 10m > sa.jwt` and give \
                 --service-account-token-file sa.jwt (or {SERVICE_ACCOUNT_TOKEN_ENV})",
                reference.field,
                reference.name,
                reference.audience,
                reference.name,
                if reference.namespace.is_empty() {
                    "<namespace>"
                } else {
                    reference.namespace
                },
                reference.audience,
            )));
        };
        // Its own `exp` when it is a JWT; only the issuer layer's reuse depends on it.
        let expires_at = decode_claims(token.expose())
            .and_then(|claims| claims.exp)
            .and_then(|exp| Timestamp::from_second(exp).ok())
            .unwrap_or_else(Timestamp::now);
        Ok(ServiceAccountToken {
            token,
            expires_at,
            from: source.to_string(),
        })
    }

    async fn read(&self, reference: CredentialRef<'_>) -> Result<Credential, Failure> {
        let (file, env, env_name, what, field, flag) = match reference.kind {
            CredentialKind::ClientSecret => (
                self.client_secret_file.as_deref(),
                self.client_secret_env.as_ref(),
                CLIENT_SECRET_ENV,
                "a client secret",
                "clientSecretRef",
                "--client-secret-file",
            ),
            CredentialKind::PrivateKey => (
                self.private_key_file.as_deref(),
                self.private_key_env.as_ref(),
                PRIVATE_KEY_ENV,
                "a private key",
                "privateKeyRef",
                "--private-key-file",
            ),
            CredentialKind::BootstrapRefreshToken => {
                return Err(Failure::issuer_not_ready(
                    "the token command never uses a refresh token",
                ));
            }
        };
        let found = resolve_credential(file, env, env_name)
            .map_err(|e| Failure::issuer_not_ready(e.to_string()))?;
        let (value, source) = found.ok_or_else(|| {
            Failure::issuer_not_ready(
                DebugTokenError::MissingCredential {
                    method: reference.method,
                    what,
                    reference: reference_text(field, reference.secret),
                    flag,
                    env: env_name,
                }
                .to_string(),
            )
        })?;
        Ok(Credential {
            value,
            from: source.to_string(),
        })
    }
}

/// How the report names the client authentication: the method, and for PrivateKeyJWT the
/// algorithm, `kid` and assertion `aud`.
fn client_auth_text(spec: &IssuerSpec, credentials: &ClientCredentials) -> String {
    match credentials {
        ClientCredentials::PrivateKeyJwt { key, audience } => format!(
            "PrivateKeyJWT, {}{}, assertion aud {audience}",
            key.algorithm(),
            key.key_id()
                .map(|k| format!(", kid {k}"))
                .unwrap_or_default()
        ),
        ClientCredentials::FederatedAssertion(_) => {
            "ServiceAccountToken (a ServiceAccount token as client_assertion)".to_string()
        }
        _ => method_name(spec.client_auth.method).to_string(),
    }
}

// ---- The request --------------------------------------------------------------------------

/// What to ask for. `Debug` redacts credentials.
#[derive(Clone, Debug)]
pub struct Options {
    /// The manifest (`-` for stdin).
    pub manifest: PathBuf,
    /// The resource the token is for.
    pub resource: String,
    /// The expected `aud`; default: the resource.
    pub audience: Option<String>,
    /// Scopes to request; each value may hold several, space separated.
    pub scopes: Vec<String>,
    /// Overrides the issuer's `requestTimeout`.
    pub timeout: Option<Duration>,
    /// Put the access token into the report.
    pub show_token: bool,
    /// Ask for a DPoP-bound token with a new key of this algorithm (RFC 9449).
    pub dpop: Option<DpopAlgorithm>,
    /// RFC 9396 authorization details to send (a JSON array file), where the issuer's
    /// `authorizationDetailsIn` says.
    pub authorization_details: Option<PathBuf>,
    /// Where credentials come from.
    pub credentials: CredentialSources,
}

/// `--scope` values, each possibly space separated, as one list without empty entries.
pub fn split_scopes(values: &[String]) -> Vec<String> {
    values
        .iter()
        .flat_map(|v| v.split_whitespace())
        .map(str::to_string)
        .collect()
}

/// Everything about the request that needs no I/O; the issuer layer supplies the rest
/// (credentials, token endpoint).
#[derive(Clone, Debug)]
pub struct Plan {
    /// What the report says about the request.
    pub summary: RequestSummary,
    /// The token request.
    pub request: TokenRequest,
    /// The issuer's spec, with `--timeout` applied.
    pub spec: IssuerSpec,
    /// Timeout of discovery and the token request.
    pub timeout: Duration,
    /// Lifetime assumed when the response does not say.
    pub default_lifetime: Duration,
}

/// What was asked, of whom: the first part of the report. Holds no secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestSummary {
    /// `TokenIssuer ns/name` or `ClusterTokenIssuer name`.
    pub issuer: String,
    /// The OAuth client ID.
    pub client_id: String,
    /// The `clientAuth.method`, with the algorithm, `kid` and assertion `aud` for
    /// PrivateKeyJWT.
    pub client_auth: String,
    /// Where the credential came from.
    pub credential_source: Option<String>,
    /// The token endpoint (filled in once known).
    pub token_endpoint: String,
    /// `tokenEndpoint` or `discovery from <issuerURL>`.
    pub token_endpoint_source: String,
    /// The resource.
    pub resource: String,
    /// The `aud` the token must have.
    pub expected_audience: String,
    /// `resource=…`, `audience=…`, or `none`.
    pub audience_parameter: String,
    /// The scopes requested.
    pub requested_scopes: Vec<String>,
    /// Things worth knowing that do not fail the check.
    pub notes: Vec<String>,
    /// With `--dpop`: the thumbprint of the key the token must be bound to.
    pub dpop_jkt: Option<String>,
    /// With a client certificate: its `x5t#S256`, and where it came from.
    pub client_certificate: Option<(String, String)>,
}

fn setting(
    value: Option<&str>,
    default: Duration,
    field: &str,
) -> Result<Duration, DebugTokenError> {
    optional_duration(value, default, field).map_err(|f| DebugTokenError::Config(f.message))
}

/// Works out the request for an issuer and the options. No I/O.
pub fn plan(issuer: &ManifestIssuer, options: &Options) -> Result<Plan, DebugTokenError> {
    let spec = &issuer.spec;
    if spec.grant.type_ == GrantType::RefreshToken {
        return Err(DebugTokenError::Unsupported(format!(
            "{} uses the RefreshToken grant; the token command only makes client_credentials and token-exchange \
             requests (using the operator's refresh token would rotate it away from the operator)",
            issuer.label()
        )));
    }
    let timeout = match options.timeout {
        Some(timeout) => timeout,
        None => setting(
            spec.request_timeout.as_deref(),
            DEFAULT_REQUEST_TIMEOUT,
            "requestTimeout",
        )?,
    };
    let default_lifetime = setting(
        spec.default_token_lifetime.as_deref(),
        DEFAULT_TOKEN_LIFETIME,
        "defaultTokenLifetime",
    )?;
    let mut spec_for_request = spec.clone();
    spec_for_request.request_timeout = Some(format!("{}ms", timeout.as_millis()));
    let expected_audience = options
        .audience
        .clone()
        .unwrap_or_else(|| options.resource.clone());
    let audience = audience_param(
        spec.audience_parameter,
        &options.resource,
        &expected_audience,
    );
    let scopes = split_scopes(&options.scopes);
    let mut notes = Vec::new();
    if let Some(patterns) = &issuer.allowed_resources
        && !patterns.iter().any(|p| glob_match(p, &options.resource))
    {
        notes.push(format!(
            "{}'s allowedResources {patterns:?} do not match {}: the operator would refuse \
             this resource",
            issuer.label(),
            options.resource
        ));
    }
    Ok(Plan {
        summary: RequestSummary {
            issuer: issuer.label(),
            client_id: spec.client_id.clone(),
            client_auth: method_name(spec.client_auth.method).to_string(),
            credential_source: None,
            token_endpoint: String::new(),
            token_endpoint_source: String::new(),
            resource: options.resource.clone(),
            expected_audience,
            audience_parameter: match &audience {
                AudienceParam::Resource(r) => format!("resource={r}"),
                AudienceParam::Audience(a) => format!("audience={a}"),
                AudienceParam::ScopeOnly => "none (the scopes select the API)".to_string(),
            },
            requested_scopes: scopes.clone(),
            notes,
            dpop_jkt: None,
            client_certificate: None,
        },
        request: TokenRequest {
            grant: Grant::ClientCredentials,
            scopes,
            audience,
            dpop: None,
            authorization_details: None,
        },
        spec: spec_for_request,
        timeout,
        default_lifetime,
    })
}

/// Reads the manifest, makes one token request and reports on the answer. A token the
/// operator would refuse is still a report ([`Report::passed`] is false); errors are for
/// when there is no token to report on.
pub async fn run(options: &Options) -> Result<Report, DebugTokenError> {
    let issuer = parse_manifest(&read_manifest(&options.manifest)?)?;
    let mut plan = plan(&issuer, options)?;
    let client = TokenClient::new().map_err(DebugTokenError::Setup)?;
    // The same issuer layer as the operator's, with credentials from files or env.
    let layer = IssuerEndpoints::new(client, options.credentials.clone());
    let label = issuer.label();
    // Only messages use it (`kubectl create token … -n <namespace>`).
    let namespace = issuer.namespace.clone().unwrap_or_default();
    let target = IssuerTarget {
        key: &label,
        spec: &plan.spec,
        secret_namespace: &namespace,
    };
    let ready = layer
        .endpoint(target)
        .await
        .map_err(|failure| DebugTokenError::Issuer(failure.message))?;
    plan.summary.client_auth = client_auth_text(&plan.spec, &ready.endpoint.credentials);
    plan.summary.credential_source = ready.credential_from.clone();
    plan.request.grant = ready.grant();
    if let Some(exchange) = &ready.exchange {
        plan.summary.notes.push(format!(
            "grant: token exchange (RFC 8693) of the ServiceAccount token from {}{}",
            exchange.from,
            exchange
                .requested_token_type
                .as_deref()
                .map(|t| format!(", requested_token_type {t}"))
                .unwrap_or_default()
        ));
    }
    plan.summary.token_endpoint = ready.endpoint.token_endpoint.to_string();
    plan.summary.token_endpoint_source = ready.token_endpoint_source.clone();
    plan.summary.client_certificate = ready
        .endpoint
        .client_certificate
        .as_ref()
        .zip(ready.certificate_from.clone())
        .map(|(certificate, from)| (certificate.thumbprint().to_string(), from));
    if let Some(path) = &options.authorization_details {
        let details = read_authorization_details(path).map_err(DebugTokenError::Config)?;
        plan.request.authorization_details = ready
            .authorization_details_for(&details)
            .map_err(|failure| DebugTokenError::Config(failure.message))?;
    }
    if let Some(algorithm) = options.dpop {
        let key = DpopKey::generate(algorithm)
            .map_err(|e| DebugTokenError::Config(format!("cannot make a DPoP key: {e}")))?;
        plan.summary.dpop_jkt = Some(key.thumbprint().to_string());
        plan.request.dpop = Some(std::sync::Arc::new(key));
    }
    let now = Timestamp::now();
    let response = layer
        .tokens()
        .request(&ready.endpoint, &plan.request)
        .await
        .map_err(|source| DebugTokenError::Token {
            token_endpoint: plan.summary.token_endpoint.clone(),
            source,
        })?;
    Ok(build_report(
        plan.summary,
        response,
        now,
        plan.default_lifetime,
        options.show_token,
    ))
}

// ---- The report ---------------------------------------------------------------------------

/// The single-audience check the operator applies to every token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AudienceCheck {
    /// The JWT's `aud` is exactly the expected audience.
    Pass,
    /// The JWT's `aud` is something else; the operator refuses the token.
    Fail {
        /// What the token carries.
        actual: Vec<String>,
    },
    /// An opaque token: its audience cannot be read; the operator accepts it.
    Opaque,
}

/// A decoded JWT: header and claims, unverified.
#[derive(Clone, Debug, PartialEq)]
pub struct JwtParts {
    /// The JOSE header.
    pub header: Value,
    /// The claims.
    pub claims: serde_json::Map<String, Value>,
}

/// What one token request produced. `Debug` redacts the token.
#[derive(Clone, Debug)]
pub struct Report {
    /// What was asked, of whom.
    pub request: RequestSummary,
    /// When the response arrived.
    pub received_at: Timestamp,
    /// `Bearer`, usually.
    pub token_type: String,
    /// The response's `expires_in`, in seconds.
    pub expires_in: Option<u64>,
    /// When the token expires, as the operator computes it.
    pub expires_at: Timestamp,
    /// The response's `scope`, as sent.
    pub granted_scope: Option<String>,
    /// The scopes the operator would record: `scope`, else the JWT's, else those requested.
    pub scopes: Vec<String>,
    /// Header and claims, for a JWT.
    pub jwt: Option<JwtParts>,
    /// The audience check.
    pub audience_check: AudienceCheck,
    /// Another reason the operator would refuse the token (an expired token, say).
    pub problem: Option<String>,
    /// Whether the server also sent a refresh token (never shown).
    pub refresh_token: bool,
    /// The `authorization_details` the server granted (RFC 9396 §7).
    pub authorization_details: Vec<Value>,
    /// The access token.
    pub access_token: SecretString,
    /// Whether [`Report::to_text`] and [`Report::to_json`] include the access token.
    pub show_token: bool,
}

/// The JOSE header of a JWS compact token.
fn decode_header(token: &str) -> Option<Value> {
    let header = token.split('.').next()?;
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()
}

/// Builds the report from a token response, checking it as the operator would ([`issue`]).
pub fn build_report(
    request: RequestSummary,
    response: TokenResponse,
    now: Timestamp,
    default_lifetime: Duration,
    show_token: bool,
) -> Report {
    let claims = decode_claims(response.access_token.expose());
    let jwt = claims.as_ref().map(|c| JwtParts {
        header: decode_header(response.access_token.expose()).unwrap_or(Value::Null),
        claims: c.raw.clone(),
    });
    let unchecked = match &claims {
        Some(_) => AudienceCheck::Pass,
        None => AudienceCheck::Opaque,
    };
    let (expires_at, scopes, audience_check, problem) = match issue(
        response.clone(),
        now,
        default_lifetime,
        &request.expected_audience,
        &request.requested_scopes,
        Binding {
            dpop_jkt: request.dpop_jkt.as_deref(),
            certificate_thumbprint: request.client_certificate.as_ref().map(|(t, _)| t.as_str()),
        },
    ) {
        Ok(issued) => (issued.expires_at, issued.scopes, unchecked, None),
        Err(TokenError::AudienceMismatch { actual, .. }) => (
            expiry(&response, claims.as_ref(), now, default_lifetime),
            granted_scopes(&response, claims.as_ref(), &request.requested_scopes),
            AudienceCheck::Fail { actual },
            None,
        ),
        Err(other) => (
            expiry(&response, claims.as_ref(), now, default_lifetime),
            granted_scopes(&response, claims.as_ref(), &request.requested_scopes),
            unchecked,
            Some(other.to_string()),
        ),
    };
    Report {
        request,
        received_at: now,
        token_type: response.token_type,
        expires_in: response.expires_in.map(|d| d.as_secs()),
        expires_at,
        granted_scope: response.scope,
        scopes,
        jwt,
        audience_check,
        problem,
        refresh_token: response.refresh_token.is_some(),
        authorization_details: response.authorization_details,
        access_token: response.access_token,
        show_token,
    }
}

/// The operator's lifetime rule, for tokens [`issue`] refused.
impl Report {
    /// Whether the operator would accept this token: a single, expected audience (or an
    /// opaque token) and no other problem.
    pub fn passed(&self) -> bool {
        !matches!(self.audience_check, AudienceCheck::Fail { .. }) && self.problem.is_none()
    }

    fn audience_line(&self) -> String {
        let expected = &self.request.expected_audience;
        match &self.audience_check {
            AudienceCheck::Pass => format!("PASS: aud is exactly {expected:?}"),
            AudienceCheck::Fail { actual } => format!(
                "FAIL: aud is {actual:?}, not exactly [{expected:?}]; the operator refuses this token"
            ),
            AudienceCheck::Opaque => {
                "SKIPPED: opaque token, its audience cannot be read (the operator accepts it)"
                    .to_string()
            }
        }
    }

    /// RFC 3339, whole seconds.
    fn expires_at_text(&self) -> String {
        Timestamp::from_second(self.expires_at.as_second())
            .unwrap_or(self.expires_at)
            .to_string()
    }

    fn expires_in_words(&self) -> String {
        let seconds = self.expires_at.as_second() - self.received_at.as_second();
        let friendly = format!("{:#}", SignedDuration::from_secs(seconds.abs()));
        if seconds >= 0 {
            format!("in {friendly}")
        } else {
            format!("{friendly} ago")
        }
    }

    /// The report for a terminal.
    pub fn to_text(&self) -> String {
        let r = &self.request;
        let mut out = String::new();
        let mut line = |label: &str, value: &str| {
            let _ = writeln!(out, "{:<17}{value}", format!("{label}:"));
        };
        line("issuer", &r.issuer);
        let credential = r
            .credential_source
            .as_deref()
            .map(|s| format!(", credential from {s}"))
            .unwrap_or_default();
        line(
            "client",
            &format!("{} ({}{credential})", r.client_id, r.client_auth),
        );
        line(
            "token endpoint",
            &format!("{} ({})", r.token_endpoint, r.token_endpoint_source),
        );
        line("resource", &r.resource);
        line("sent", &r.audience_parameter);
        line("requested scope", &or_none(&r.requested_scopes.join(" ")));
        if let Some((thumbprint, from)) = &r.client_certificate {
            line(
                "client cert",
                &format!("x5t#S256 {thumbprint} (from {from})"),
            );
        }
        if let Some(jkt) = &r.dpop_jkt {
            line("dpop key jkt", jkt);
        }
        if r.dpop_jkt.is_some() || r.client_certificate.is_some() || self.cnf().is_some() {
            line(
                "token cnf",
                &self
                    .cnf()
                    .map(|cnf| cnf.to_string())
                    .unwrap_or_else(|| "(none)".to_string()),
            );
        }
        line("HTTP outcome", "success (2xx), a token response");
        if !self.authorization_details.is_empty() {
            line(
                "granted details",
                &Value::Array(self.authorization_details.clone()).to_string(),
            );
        }
        line("token_type", &self.token_type);
        line(
            "expires_in",
            &self
                .expires_in
                .map(|s| format!("{s}s"))
                .unwrap_or_else(|| "(not in the response)".to_string()),
        );
        line(
            "expires_at",
            &format!("{} ({})", self.expires_at_text(), self.expires_in_words()),
        );
        line(
            "granted scope",
            &match &self.granted_scope {
                Some(scope) => scope.clone(),
                None => format!(
                    "(not in the response; recorded as: {})",
                    or_none(&self.scopes.join(" "))
                ),
            },
        );
        if self.refresh_token {
            line(
                "refresh_token",
                "present (not shown; not used for client_credentials)",
            );
        }
        line(
            "format",
            if self.jwt.is_some() {
                "JWT (claims decoded below, signature NOT verified)"
            } else {
                "opaque (not a JWT; no claims to show)"
            },
        );
        line("audience check", &self.audience_line());
        if let Some(problem) = &self.problem {
            line("problem", &format!("FAIL: {problem}"));
        }
        for note in &r.notes {
            line("note", note);
        }
        if let Some(jwt) = &self.jwt {
            let _ = writeln!(out, "\nJWT header:\n{}", pretty(&jwt.header));
            let _ = writeln!(
                out,
                "\nJWT claims:\n{}",
                pretty(&Value::Object(jwt.claims.clone()))
            );
        }
        if self.show_token {
            let _ = writeln!(out, "\naccess token:\n{}", self.access_token.expose());
        } else {
            let _ = writeln!(
                out,
                "\naccess token not shown; pass --show-token to print it"
            );
        }
        out
    }

    /// The report as one JSON object.
    pub fn to_json(&self) -> Value {
        let r = &self.request;
        let (result, actual) = match &self.audience_check {
            AudienceCheck::Pass => ("PASS", self.jwt_audience()),
            AudienceCheck::Fail { actual } => ("FAIL", Some(actual.clone())),
            AudienceCheck::Opaque => ("SKIPPED", None),
        };
        let mut out = json!({
            "ok": self.passed(),
            "issuer": r.issuer,
            "client_id": r.client_id,
            "client_auth": r.client_auth,
            "credential_source": r.credential_source,
            "token_endpoint": r.token_endpoint,
            "token_endpoint_source": r.token_endpoint_source,
            "resource": r.resource,
            "audience_parameter": r.audience_parameter,
            "requested_scopes": r.requested_scopes,
            "http": "success",
            "token_type": self.token_type,
            "expires_in": self.expires_in,
            "expires_at": self.expires_at_text(),
            "granted_scope": self.granted_scope,
            "scopes": self.scopes,
            "refresh_token_received": self.refresh_token,
            "jwt": self.jwt.is_some(),
            "audience_check": {
                "result": result,
                "expected": r.expected_audience,
                "actual": actual,
            },
            "problem": self.problem,
            "notes": r.notes,
            "dpop_jkt": r.dpop_jkt,
            "client_certificate_thumbprint": r.client_certificate.as_ref().map(|(t, _)| t),
            "client_certificate_source": r.client_certificate.as_ref().map(|(_, f)| f),
            "cnf": self.cnf(),
            "authorization_details": self.authorization_details,
            "header": self.jwt.as_ref().map(|j| j.header.clone()),
            "claims": self.jwt.as_ref().map(|j| Value::Object(j.claims.clone())),
        });
        if self.show_token {
            out["access_token"] = json!(self.access_token.expose());
        }
        out
    }

    /// The JWT's `cnf` (RFC 7800) confirmation claim, if any: `jkt` for DPoP, `x5t#S256`
    /// for a certificate-bound token.
    pub fn cnf(&self) -> Option<&Value> {
        self.jwt.as_ref().and_then(|j| j.claims.get("cnf"))
    }

    fn jwt_audience(&self) -> Option<Vec<String>> {
        self.jwt.as_ref().map(|j| match j.claims.get("aud") {
            Some(Value::String(s)) => vec![s.clone()],
            Some(Value::Array(values)) => values
                .iter()
                .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                .collect(),
            _ => Vec::new(),
        })
    }
}

fn or_none(text: &str) -> String {
    if text.is_empty() {
        "(none)".to_string()
    } else {
        text.to_string()
    }
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_else(|_| value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AudienceParameter, ClientAuth, ClientAuthMethod};

    const ISSUER_YAML: &str = r#"
apiVersion: audiencetoken.io/v1alpha1
kind: TokenIssuer
metadata:
  name: corp-idp
  namespace: shop
spec:
  issuerURL: https://idp.example.com
  clientID: shop-m2m
  clientAuth:
    method: ClientSecretBasic
    clientSecretRef:
      name: corp-idp-client
      key: client-secret
  audienceParameter: Audience
  requestTimeout: 3s
"#;

    fn jwt(header: Value, payload: Value) -> String {
        format!(
            "{}.{}.c2ln",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(payload.to_string())
        )
    }

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn summary() -> RequestSummary {
        RequestSummary {
            issuer: "TokenIssuer shop/corp-idp".into(),
            client_id: "shop-m2m".into(),
            client_auth: "ClientSecretBasic".into(),
            credential_source: Some("env ATO_CLIENT_SECRET".into()),
            token_endpoint: "https://idp.example.com/token".into(),
            token_endpoint_source: "tokenEndpoint".into(),
            resource: "urn:a".into(),
            expected_audience: "urn:a".into(),
            audience_parameter: "resource=urn:a".into(),
            requested_scopes: vec!["r".into()],
            notes: vec![],
            dpop_jkt: None,
            client_certificate: None,
        }
    }

    fn response(token: &str, expires_in: Option<u64>, scope: Option<&str>) -> TokenResponse {
        TokenResponse {
            access_token: SecretString::new(token),
            token_type: "Bearer".into(),
            expires_in: expires_in.map(Duration::from_secs),
            scope: scope.map(str::to_string),
            refresh_token: None,
            authorization_details: Vec::new(),
            issued_token_type: None,
        }
    }

    fn options(credentials: CredentialSources) -> Options {
        Options {
            manifest: "-".into(),
            resource: "https://orders.example.com".into(),
            audience: None,
            scopes: vec!["orders/read  orders/write".into(), "extra".into()],
            timeout: None,
            show_token: false,
            dpop: None,
            authorization_details: None,
            credentials,
        }
    }

    fn env_secret(value: &str) -> CredentialSources {
        CredentialSources {
            client_secret_env: Some(SecretString::new(value)),
            ..CredentialSources::default()
        }
    }

    #[test]
    fn parses_a_token_issuer() {
        let issuer = parse_manifest(ISSUER_YAML).unwrap();
        assert_eq!(issuer.kind, IssuerKind::TokenIssuer);
        assert_eq!(issuer.label(), "TokenIssuer shop/corp-idp");
        assert_eq!(issuer.spec.client_id, "shop-m2m");
        assert_eq!(issuer.spec.audience_parameter, AudienceParameter::Audience);
    }

    #[test]
    fn takes_the_first_issuer_of_several_documents_and_lists() {
        let text = format!(
            "# comment\n---\napiVersion: v1\nkind: Secret\nmetadata: {{name: s}}\n---\n{ISSUER_YAML}\n---\n\
             apiVersion: audiencetoken.io/v1alpha1\nkind: ClusterTokenIssuer\nmetadata: {{name: second}}\n\
             spec: {{clientID: x, tokenEndpoint: 'https://x', clientAuth: {{method: None}}}}\n"
        );
        assert_eq!(
            parse_manifest(&text).unwrap().label(),
            "TokenIssuer shop/corp-idp"
        );
        let list = r#"{"apiVersion":"v1","kind":"List","items":[
            {"apiVersion":"v1","kind":"ConfigMap"},
            {"apiVersion":"audiencetoken.io/v1alpha1","kind":"ClusterTokenIssuer",
             "metadata":{"name":"corp"},
             "spec":{"clientID":"c","tokenEndpoint":"https://idp/token","clientAuth":{"method":"None"},
                     "allowedResources":["https://*.example.com"]}}]}"#;
        let issuer = parse_manifest(list).unwrap();
        assert_eq!(issuer.label(), "ClusterTokenIssuer corp");
        assert_eq!(
            issuer.allowed_resources,
            Some(vec!["https://*.example.com".to_string()])
        );
    }

    #[test]
    fn manifests_without_an_issuer_are_clear_errors() {
        let err = parse_manifest("apiVersion: v1\nkind: Secret\n").unwrap_err();
        assert!(
            err.to_string()
                .contains("no TokenIssuer or ClusterTokenIssuer")
                && err.to_string().contains("Secret (v1)"),
            "{err}"
        );
        let err = parse_manifest("").unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        let err = parse_manifest("kind: TokenIssuer\napiVersion: other.io/v1\n").unwrap_err();
        assert!(err.to_string().contains("other.io/v1"), "{err}");
        let err = parse_manifest("a: [unclosed").unwrap_err();
        assert!(err.to_string().contains("not valid YAML"), "{err}");
        let err = parse_manifest(
            "apiVersion: audiencetoken.io/v1alpha1\nkind: TokenIssuer\nspec: {issuerURL: x}\n",
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("TokenIssuer in the manifest is invalid"),
            "{err}"
        );
    }

    fn temp_file(name: &str, contents: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ato-debug-token-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    #[test]
    fn credential_file_wins_over_env_and_loses_one_newline() {
        let file = temp_file("secret", "from-file\n\n");
        let env = SecretString::new("from-env");
        let (value, source) = resolve_credential(Some(&file), Some(&env), CLIENT_SECRET_ENV)
            .unwrap()
            .unwrap();
        assert_eq!(value.expose(), "from-file\n");
        assert_eq!(source, CredentialSource::File(file.clone()));
        let crlf = temp_file("secret-crlf", "crlf\r\n");
        let (value, _) = resolve_credential(Some(&crlf), None, CLIENT_SECRET_ENV)
            .unwrap()
            .unwrap();
        assert_eq!(value.expose(), "crlf");
        let (value, source) = resolve_credential(None, Some(&env), CLIENT_SECRET_ENV)
            .unwrap()
            .unwrap();
        assert_eq!(value.expose(), "from-env");
        assert_eq!(source.to_string(), "env ATO_CLIENT_SECRET");
        assert!(
            resolve_credential(None, Some(&SecretString::new("")), CLIENT_SECRET_ENV)
                .unwrap()
                .is_none()
        );
        assert!(
            resolve_credential(None, None, CLIENT_SECRET_ENV)
                .unwrap()
                .is_none()
        );
        let empty = temp_file("empty", "\n");
        let err = resolve_credential(Some(&empty), Some(&env), CLIENT_SECRET_ENV).unwrap_err();
        assert!(err.to_string().contains("is empty"), "{err}");
        let missing = file.with_file_name("does-not-exist");
        let err = resolve_credential(Some(&missing), Some(&env), CLIENT_SECRET_ENV).unwrap_err();
        assert!(err.to_string().contains("cannot read"), "{err}");
    }

    /// The endpoint the issuer layer makes of `spec` with these credential sources (a
    /// configured token endpoint: no I/O besides reading credential files).
    async fn endpoint(
        spec: &IssuerSpec,
        sources: &CredentialSources,
    ) -> Result<crate::issuer::ReadyEndpoint, Failure> {
        let mut spec = spec.clone();
        spec.token_endpoint = Some("https://idp.example.com/connect/token".into());
        let layer = IssuerEndpoints::new(TokenClient::new().unwrap(), sources.clone());
        let target = IssuerTarget {
            key: "TokenIssuer shop/corp-idp",
            spec: &spec,
            secret_namespace: "",
        };
        layer.endpoint(target).await
    }

    #[tokio::test]
    async fn credentials_follow_the_method() {
        let mut spec = parse_manifest(ISSUER_YAML).unwrap().spec;
        let ready = endpoint(&spec, &env_secret("pw")).await.unwrap();
        assert!(matches!(
            ready.endpoint.credentials,
            ClientCredentials::Basic(ref s) if s.expose() == "pw"
        ));
        assert_eq!(
            ready.credential_from.as_deref(),
            Some("env ATO_CLIENT_SECRET")
        );
        let err = endpoint(&spec, &CredentialSources::default())
            .await
            .unwrap_err();
        let message = err.message;
        for part in [
            "ClientSecretBasic needs a client secret",
            "Secret corp-idp-client, key client-secret",
            "--client-secret-file",
            "ATO_CLIENT_SECRET",
        ] {
            assert!(message.contains(part), "{message}");
        }
        spec.client_auth.method = ClientAuthMethod::ClientSecretPost;
        let ready = endpoint(&spec, &env_secret("pw")).await.unwrap();
        assert!(matches!(
            ready.endpoint.credentials,
            ClientCredentials::Post(_)
        ));
        spec.client_auth = ClientAuth {
            method: ClientAuthMethod::NoAuth,
            ..ClientAuth::default()
        };
        let ready = endpoint(&spec, &env_secret("pw")).await.unwrap();
        assert!(matches!(
            ready.endpoint.credentials,
            ClientCredentials::None
        ));
        assert_eq!(ready.credential_from, None);
    }

    #[tokio::test]
    async fn private_key_jwt_reads_and_checks_the_key() {
        use crate::api::{AssertionAudience, SigningAlgorithm};
        use crate::oauth::assertion::{KeyKind, test_keys};
        let mut spec = parse_manifest(ISSUER_YAML).unwrap().spec;
        spec.client_auth = ClientAuth {
            method: ClientAuthMethod::PrivateKeyJwt,
            private_key_ref: Some(SecretKeySelector {
                name: "idp-key".into(),
                key: "key.pem".into(),
            }),
            key_id: Some("k1".into()),
            assertion_audience: AssertionAudience::TokenEndpoint,
            ..ClientAuth::default()
        };
        let err = endpoint(&spec, &env_secret("a client secret is not enough"))
            .await
            .unwrap_err()
            .message;
        for part in [
            "PrivateKeyJWT needs a private key",
            "privateKeyRef: Secret idp-key, key key.pem",
            "--private-key-file",
            "ATO_PRIVATE_KEY",
        ] {
            assert!(err.contains(part), "{err}");
        }
        let pem = test_keys::ec(KeyKind::EcP256).pkcs8_pem;
        let file = temp_file("key.pem", &format!("{pem}\n"));
        let sources = CredentialSources {
            private_key_file: Some(file.clone()),
            ..CredentialSources::default()
        };
        let ready = endpoint(&spec, &sources).await.unwrap();
        let ClientCredentials::PrivateKeyJwt { key, audience } = &ready.endpoint.credentials else {
            panic!("PrivateKeyJwt credentials")
        };
        assert_eq!(key.key_id(), Some("k1"));
        assert_eq!(audience, "https://idp.example.com/connect/token");
        assert_eq!(
            ready.credential_from,
            Some(CredentialSource::File(file).to_string())
        );
        assert_eq!(
            client_auth_text(&spec, &ready.endpoint.credentials),
            "PrivateKeyJWT, ES256, kid k1, assertion aud https://idp.example.com/connect/token"
        );

        spec.client_auth.signing_algorithm = Some(SigningAlgorithm::RS256);
        let err = endpoint(&spec, &sources).await.unwrap_err().message;
        assert!(err.contains("is not a usable private key"), "{err}");
        assert!(!err.contains("PRIVATE KEY"), "{err}");
        let garbage = CredentialSources {
            private_key_env: Some(SecretString::new("not a key")),
            ..CredentialSources::default()
        };
        let err = endpoint(&spec, &garbage).await.unwrap_err().message;
        assert!(
            err.contains("env ATO_PRIVATE_KEY is not a usable private key"),
            "{err}"
        );
    }

    #[test]
    fn plan_builds_the_request_like_the_controller() {
        let issuer = parse_manifest(ISSUER_YAML).unwrap();
        let plan = plan(&issuer, &options(env_secret("topsecret"))).unwrap();
        assert_eq!(
            plan.request.scopes,
            vec!["orders/read", "orders/write", "extra"]
        );
        assert_eq!(
            plan.request.audience,
            AudienceParam::Audience("https://orders.example.com".into())
        );
        assert_eq!(plan.timeout, Duration::from_secs(3));
        assert_eq!(plan.default_lifetime, DEFAULT_TOKEN_LIFETIME);
        assert_eq!(
            plan.summary.audience_parameter,
            "audience=https://orders.example.com"
        );
        assert!(!format!("{plan:?}").contains("topsecret"));
        let mut with = options(env_secret("pw"));
        with.audience = Some("orders-api".into());
        with.timeout = Some(Duration::from_secs(1));
        let plan2 = super::plan(&issuer, &with).unwrap();
        assert_eq!(
            plan2.request.audience,
            AudienceParam::Audience("orders-api".into())
        );
        assert_eq!(plan2.timeout, Duration::from_secs(1));
        let mut refresh = issuer.clone();
        refresh.spec.grant.type_ = GrantType::RefreshToken;
        assert!(matches!(
            super::plan(&refresh, &with),
            Err(DebugTokenError::Unsupported(_))
        ));
        let mut bad = issuer;
        bad.spec.request_timeout = Some("soon".into());
        let err = super::plan(&bad, &options(env_secret("pw"))).unwrap_err();
        assert!(err.to_string().contains("requestTimeout"), "{err}");
    }

    #[test]
    fn plan_notes_a_resource_a_cluster_issuer_does_not_allow() {
        let mut issuer = parse_manifest(ISSUER_YAML).unwrap();
        issuer.kind = IssuerKind::ClusterTokenIssuer;
        issuer.allowed_resources = Some(vec!["https://payments.*".into()]);
        let plan = plan(&issuer, &options(env_secret("pw"))).unwrap();
        assert_eq!(plan.summary.notes.len(), 1, "{:?}", plan.summary.notes);
        issuer.allowed_resources = Some(vec!["https://*.example.com".into()]);
        let plan = super::plan(&issuer, &options(env_secret("pw"))).unwrap();
        assert!(plan.summary.notes.is_empty());
    }

    #[test]
    fn report_for_a_single_audience_jwt_passes() {
        let token = jwt(
            json!({"alg":"RS256","typ":"at+jwt","kid":"k1"}),
            json!({"aud":"urn:a","exp":1_800_003_600,"scope":"r w","sub":"shop-m2m"}),
        );
        let report = build_report(
            summary(),
            response(&token, Some(600), None),
            now(),
            DEFAULT_TOKEN_LIFETIME,
            false,
        );
        assert!(report.passed());
        assert_eq!(report.audience_check, AudienceCheck::Pass);
        assert_eq!(report.expires_at.as_second(), 1_800_000_600);
        assert_eq!(report.scopes, vec!["r", "w"]);
        let text = report.to_text();
        assert!(text.contains("PASS: aud is exactly \"urn:a\""), "{text}");
        assert!(text.contains("\"kid\": \"k1\""), "{text}");
        assert!(text.contains("\"sub\": \"shop-m2m\""), "{text}");
        assert!(text.contains("in 10m"), "{text}");
        assert!(!text.contains(&token), "{text}");
        let value = report.to_json();
        assert_eq!(value["audience_check"]["result"], "PASS");
        assert_eq!(value["audience_check"]["actual"], json!(["urn:a"]));
        assert_eq!(value["claims"]["sub"], "shop-m2m");
        assert_eq!(value["header"]["kid"], "k1");
        assert_eq!(value["ok"], true);
        assert!(value.get("access_token").is_none());
        assert!(!value.to_string().contains(&token));
        assert!(!format!("{report:?}").contains(&token));
    }

    #[test]
    fn report_for_a_multi_audience_jwt_fails_with_the_actual_list() {
        let token = jwt(
            json!({"alg":"RS256"}),
            json!({"aud":["urn:a","urn:b"],"exp":1_800_000_900}),
        );
        let report = build_report(
            summary(),
            response(&token, Some(3600), Some("r")),
            now(),
            DEFAULT_TOKEN_LIFETIME,
            true,
        );
        assert!(!report.passed());
        assert_eq!(
            report.audience_check,
            AudienceCheck::Fail {
                actual: vec!["urn:a".into(), "urn:b".into()]
            }
        );
        assert_eq!(report.expires_at.as_second(), 1_800_000_900);
        assert_eq!(report.scopes, vec!["r"]);
        let text = report.to_text();
        assert!(text.contains("FAIL"), "{text}");
        assert!(text.contains("urn:b"), "{text}");
        assert!(text.contains(&token), "--show-token prints it: {text}");
        let value = report.to_json();
        assert_eq!(value["audience_check"]["result"], "FAIL");
        assert_eq!(value["access_token"], json!(token));
        assert_eq!(value["ok"], false);
    }

    #[test]
    fn report_for_opaque_and_expired_tokens() {
        let report = build_report(
            summary(),
            response("opaque-token-value", None, None),
            now(),
            DEFAULT_TOKEN_LIFETIME,
            false,
        );
        assert!(report.passed());
        assert_eq!(report.audience_check, AudienceCheck::Opaque);
        assert_eq!(report.expires_at.as_second(), 1_800_000_300);
        assert_eq!(
            report.scopes,
            vec!["r"],
            "falls back to the requested scopes"
        );
        let text = report.to_text();
        assert!(text.contains("opaque"), "{text}");
        assert!(text.contains("SKIPPED"), "{text}");
        assert!(!text.contains("opaque-token-value"), "{text}");
        assert_eq!(report.to_json()["audience_check"]["result"], "SKIPPED");

        let expired = jwt(
            json!({"alg":"RS256"}),
            json!({"aud":"urn:a","exp":1_800_000_000 - 5}),
        );
        let report = build_report(
            summary(),
            response(&expired, None, None),
            now(),
            DEFAULT_TOKEN_LIFETIME,
            false,
        );
        assert!(!report.passed());
        assert_eq!(report.audience_check, AudienceCheck::Pass);
        assert!(report.problem.as_deref().unwrap().contains("expired"));
        assert!(report.to_text().contains("5s ago"), "{}", report.to_text());
    }

    #[test]
    fn oauth_errors_as_json_carry_the_server_error() {
        let err = DebugTokenError::Token {
            token_endpoint: "https://idp/token".into(),
            source: TokenError::Server {
                status: 400,
                error: "invalid_target".into(),
                description: Some("unknown resource".into()),
                retry_after: None,
            },
        };
        let value = err.to_json();
        assert_eq!(value["error"], "invalid_target");
        assert_eq!(value["error_description"], "unknown resource");
        assert_eq!(value["http_status"], 400);
        assert_eq!(value["ok"], false);
        assert!(err.to_string().contains("invalid_target: unknown resource"));
    }
}
