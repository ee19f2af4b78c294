//! The issuer layer: an issuer's spec plus a [`CredentialSource`] become a ready endpoint
//! (token endpoint URL, client authentication with its key material, audience dialect,
//! timeouts, CA bundle, default lifetime), for the controller, the issuer status and the `token` command alike.
//! It owns the caches that make a renewal cost no extra reads: credentials (5 min, dropped
//! after `invalid_client`), discovery documents (1 h, dropped after a transport error or a
//! 404) and key sets for the signature check.
//!
//! It knows Kubernetes only through [`credentials::SecretSource`]; the OAuth client under it
//! ([`crate::oauth`]) knows nothing of it.

pub mod credentials;
mod jwks_cache;
pub mod params;
pub mod tenancy;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use url::Url;

use crate::api::{
    AudienceParameter, AuthorizationDetailsIn, ClientAuthMethod, GrantType, IssuerSpec,
    SecretKeySelector, ServiceAccountRef, SigningAlgorithm,
};
use crate::failure::Failure;
use crate::oauth::assertion::{ClientKey, SigningAlg};
use crate::oauth::client::check_transport_security;
use crate::oauth::discovery::ServerMetadata;
use crate::oauth::jwks;
use crate::oauth::jwt::decode_claims;
use crate::oauth::token_exchange::TOKEN_TYPE_JWT;
use crate::oauth::{
    AudienceParam, AuthorizationDetails, ClientCertificate, ClientCredentials, Endpoint, Grant,
    Tls, TokenClient, TokenError,
};
use crate::redact::SecretString;
pub use credentials::{
    CertificateCredential, CertificateRef, Credential, CredentialKind, CredentialRef,
    CredentialSource, SERVICE_ACCOUNT_TOKEN_LIFETIME, ServiceAccountToken, ServiceAccountTokenRef,
};
pub use jwks_cache::{JWKS_MIN_REFRESH, JWKS_TTL};

/// Credentials are re-read at most this often (and at once after `invalid_client`), so a
/// renewal costs no Secret read while a rotated secret is still picked up.
pub const CREDENTIAL_TTL: Duration = Duration::from_secs(300);
/// A refused mint is answered from memory this long (shorter than the 5 s recheck of an
/// issuer waiting for its grant, so every recheck asks the API server).
pub const MINT_FAILURE_TTL: Duration = Duration::from_secs(3);
/// Discovery documents are re-fetched this often, and after a failure.
pub const DISCOVERY_TTL: Duration = Duration::from_secs(3600);

/// The issuer an endpoint is wanted for.
#[derive(Clone, Copy, Debug)]
pub struct IssuerTarget<'a> {
    /// `TokenIssuer/<ns>/<name>` or `ClusterTokenIssuer/<name>`: for messages, logs and
    /// caches.
    pub key: &'a str,
    /// The issuer's spec.
    pub spec: &'a IssuerSpec,
    /// Where the issuer's Secrets live.
    pub secret_namespace: &'a str,
}

/// Everything one token request needs from the issuer.
#[derive(Clone, Debug)]
pub struct ReadyEndpoint {
    /// Where and as whom to ask.
    pub endpoint: Endpoint,
    /// Lifetime assumed when the response does not say.
    pub default_lifetime: Duration,
    /// How a request names the one API (`audienceParameter`).
    pub audience_parameter: AudienceParameter,
    /// Where a request carries authorization details (`authorizationDetailsIn`).
    pub authorization_details_in: AuthorizationDetailsIn,
    /// `tokenEndpoint`, or `discovery from issuerURL <url>`.
    pub token_endpoint_source: String,
    /// Where the client credential came from (`Secret ns/name key k`, `file …`), if any.
    pub credential_from: Option<String>,
    /// Where the client certificate came from (`Secret ns/name`, `files …`), if any.
    pub certificate_from: Option<String>,
    /// With `grant.type: TokenExchange`: the subject token and the type asked for.
    pub exchange: Option<Exchange>,
}

/// What a token exchange (RFC 8693) sends besides the AudienceToken's resource and scopes.
#[derive(Clone, Debug)]
pub struct Exchange {
    /// The `subject_token`: a ServiceAccount token.
    pub subject_token: SecretString,
    /// The `requested_token_type`, if set.
    pub requested_token_type: Option<String>,
    /// Where the subject token came from (`ServiceAccount ns/name`, `file …`).
    pub from: String,
}

impl ReadyEndpoint {
    /// The grant of this issuer's own token requests: client credentials, or a token
    /// exchange of its subject token (a refresh-token chain builds its own).
    pub fn grant(&self) -> Grant {
        match &self.exchange {
            Some(exchange) => Grant::TokenExchange {
                subject_token: exchange.subject_token.clone(),
                subject_token_type: TOKEN_TYPE_JWT.to_string(),
                requested_token_type: exchange.requested_token_type.clone(),
            },
            None => Grant::ClientCredentials,
        }
    }

    /// The audience parameter of a request for `resource` whose token must carry
    /// `expected_audience`, in the issuer's dialect.
    pub fn audience_for(&self, resource: &str, expected_audience: &str) -> AudienceParam {
        params::audience_param(self.audience_parameter, resource, expected_audience)
    }

    /// An AudienceToken's `authorizationDetails` as this issuer sends them: none for an
    /// empty list; in the client assertion only with PrivateKeyJWT (else IssuerNotReady,
    /// which admission normally prevents); a list the client would not send (over 8 KiB)
    /// is TokenRequestFailed without asking the server.
    pub fn authorization_details_for(
        &self,
        details: &[serde_json::Value],
    ) -> Result<Option<AuthorizationDetails>, Failure> {
        if details.is_empty() {
            return Ok(None);
        }
        if self.authorization_details_in == AuthorizationDetailsIn::ClientAssertion
            && !matches!(
                self.endpoint.credentials,
                ClientCredentials::PrivateKeyJwt { .. }
            )
        {
            return Err(Failure::issuer_not_ready(
                "authorizationDetailsIn ClientAssertion needs clientAuth.method PrivateKeyJWT: \
                 the authorization details go into the client assertion",
            ));
        }
        params::authorization_details(self.authorization_details_in, details)
            .map(Some)
            .map_err(|e| {
                Failure::new(
                    crate::failure::reason::TOKEN_REQUEST_FAILED,
                    format!("spec.authorizationDetails not sent: {e}"),
                )
            })
    }
}

/// Namespace, ServiceAccount name and audience of a minted token.
type MintedKey = (String, String, String);

/// Namespace, kind, Secret name and key of a cached credential.
type CredentialKey = (String, &'static str, String, String);

/// A parsed client certificate and where it came from.
#[derive(Clone, Debug)]
pub struct IssuerCertificate {
    /// The certificate and key, ready for connections.
    pub certificate: Arc<ClientCertificate>,
    /// Where it was read (`Secret ns/name`, `files …`).
    pub from: String,
}

/// The issuer layer for one credential source. See the module docs.
pub struct IssuerEndpoints<S> {
    tokens: TokenClient,
    source: S,
    credentials: Mutex<HashMap<CredentialKey, (Credential, Instant)>>,
    /// Client certificates by namespace and Secret name, parsed once per read.
    certificates: Mutex<HashMap<(String, String), (IssuerCertificate, Instant)>>,
    /// Minted ServiceAccount tokens by namespace, name and audience, with the moment half
    /// of their life is gone (then a new one is minted).
    minted: Mutex<HashMap<MintedKey, (ServiceAccountToken, Instant)>>,
    /// Refused mints (no grant, no ServiceAccount) by the same key, kept for
    /// [`MINT_FAILURE_TTL`]: a thousand tokens waiting on one missing grant make one
    /// TokenRequest, not a thousand.
    mint_failures: Mutex<HashMap<MintedKey, (Failure, Instant)>>,
    discovery: Mutex<HashMap<String, (ServerMetadata, Instant)>>,
    jwks: jwks_cache::JwksCache,
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn kind_name(kind: CredentialKind) -> &'static str {
    match kind {
        CredentialKind::ClientSecret => "client-secret",
        CredentialKind::PrivateKey => "private-key",
        CredentialKind::BootstrapRefreshToken => "bootstrap",
    }
}

fn credential_key(reference: &CredentialRef<'_>) -> CredentialKey {
    let (name, key) = reference
        .secret
        .map(|s| (s.name.clone(), s.key.clone()))
        .unwrap_or_default();
    (
        reference.namespace.to_string(),
        kind_name(reference.kind),
        name,
        key,
    )
}

/// The issuer's `clientAuth.method` as written in the spec.
pub fn method_name(method: ClientAuthMethod) -> &'static str {
    match method {
        ClientAuthMethod::ClientSecretBasic => "ClientSecretBasic",
        ClientAuthMethod::ClientSecretPost => "ClientSecretPost",
        ClientAuthMethod::PrivateKeyJwt => "PrivateKeyJWT",
        ClientAuthMethod::NoAuth => "None",
        ClientAuthMethod::TlsClientAuth => "TLSClientAuth",
        ClientAuthMethod::SelfSignedTlsClientAuth => "SelfSignedTLSClientAuth",
        ClientAuthMethod::ServiceAccountToken => "ServiceAccountToken",
    }
}

/// The API's `signingAlgorithm` as the token client's algorithm.
pub fn signing_alg(algorithm: SigningAlgorithm) -> SigningAlg {
    match algorithm {
        SigningAlgorithm::RS256 => SigningAlg::RS256,
        SigningAlgorithm::PS256 => SigningAlg::PS256,
        SigningAlgorithm::ES256 => SigningAlg::ES256,
        SigningAlgorithm::ES384 => SigningAlg::ES384,
    }
}

/// A duration setting of the spec, or its default.
pub fn optional_duration(
    value: Option<&str>,
    default: Duration,
    field: &str,
) -> Result<Duration, Failure> {
    match value {
        None => Ok(default),
        Some(v) => crate::api::parse_duration(v)
            .map_err(|e| Failure::issuer_not_ready(format!("{field}: {e}"))),
    }
}

/// The `aud` of a client assertion: with `assertionAudience: Issuer` the issuer identifier
/// (as discovery declared it, else `issuerURL`), with `TokenEndpoint` the token endpoint URL.
/// `label` names the issuer in the error.
pub fn assertion_audience(
    spec: &IssuerSpec,
    label: &str,
    discovered_issuer: Option<&str>,
    token_endpoint: &Url,
) -> Result<String, Failure> {
    let issuer = discovered_issuer.or(spec.issuer_url.as_deref());
    params::assertion_audience(spec.client_auth.assertion_audience, issuer, token_endpoint)
        .map_err(|why| Failure::issuer_not_ready(format!("{label}: {why}")))
}

impl<S: CredentialSource> IssuerEndpoints<S> {
    /// A layer that sends requests with `tokens` and reads credentials from `source`.
    pub fn new(tokens: TokenClient, source: S) -> Self {
        Self {
            tokens,
            source,
            credentials: Mutex::default(),
            certificates: Mutex::default(),
            minted: Mutex::default(),
            mint_failures: Mutex::default(),
            discovery: Mutex::default(),
            jwks: jwks_cache::JwksCache::default(),
        }
    }

    /// The token client requests go through.
    pub fn tokens(&self) -> &TokenClient {
        &self.tokens
    }

    /// The endpoint for an issuer: credentials from the (cached) source, the token endpoint
    /// from the spec or (cached) discovery.
    pub async fn endpoint(&self, issuer: IssuerTarget<'_>) -> Result<ReadyEndpoint, Failure> {
        let spec = issuer.spec;
        let timeout = optional_duration(
            spec.request_timeout.as_deref(),
            params::DEFAULT_REQUEST_TIMEOUT,
            "requestTimeout",
        )?;
        let default_lifetime = optional_duration(
            spec.default_token_lifetime.as_deref(),
            params::DEFAULT_TOKEN_LIFETIME,
            "defaultTokenLifetime",
        )?;
        let certificate = self.client_certificate(issuer).await?;
        let client_certificate = certificate.as_ref().map(|c| c.certificate.clone());
        let (token_endpoint, token_endpoint_source, discovered_issuer) = self
            .token_endpoint(issuer, client_certificate.as_deref(), timeout)
            .await?;
        let auth = &spec.client_auth;
        let method = method_name(auth.method);
        let secret_ref = |kind, secret| CredentialRef {
            kind,
            method,
            namespace: issuer.secret_namespace,
            secret,
        };
        let (credentials, credential_from) = match auth.method {
            ClientAuthMethod::ClientSecretBasic | ClientAuthMethod::ClientSecretPost => {
                let credential = self
                    .cached(secret_ref(
                        CredentialKind::ClientSecret,
                        auth.client_secret_ref.as_ref(),
                    ))
                    .await?;
                let value = credential.value;
                let credentials = if auth.method == ClientAuthMethod::ClientSecretBasic {
                    ClientCredentials::Basic(value)
                } else {
                    ClientCredentials::Post(value)
                };
                (credentials, Some(credential.from))
            }
            ClientAuthMethod::NoAuth => (ClientCredentials::None, None),
            ClientAuthMethod::TlsClientAuth | ClientAuthMethod::SelfSignedTlsClientAuth => {
                // Admission refuses this without a certificate; an issuer stored before
                // that rule still gets a clear answer.
                let certificate = certificate.as_ref().ok_or_else(|| {
                    Failure::issuer_not_ready(format!(
                        "{method} authenticates with the client certificate: set tlsClientCertificate.secretRef"
                    ))
                })?;
                (
                    ClientCredentials::TlsClientCertificate,
                    Some(certificate.from.clone()),
                )
            }
            ClientAuthMethod::ServiceAccountToken => {
                // Admission requires the reference; an issuer stored before still gets an
                // answer.
                let account = auth.service_account_ref.as_ref().ok_or_else(|| {
                    Failure::issuer_not_ready(
                        "ServiceAccountToken needs clientAuth.serviceAccountRef",
                    )
                })?;
                let minted = self
                    .service_account_token(
                        issuer,
                        account,
                        "clientAuth.serviceAccountRef",
                        discovered_issuer.as_deref(),
                    )
                    .await?;
                (
                    ClientCredentials::FederatedAssertion(minted.token),
                    Some(minted.from),
                )
            }
            ClientAuthMethod::PrivateKeyJwt => {
                let reference =
                    secret_ref(CredentialKind::PrivateKey, auth.private_key_ref.as_ref());
                let credential = self.cached(reference).await?;
                let key = ClientKey::parse(
                    credential.value.expose(),
                    auth.signing_algorithm.map(signing_alg),
                    auth.key_id.as_deref(),
                )
                .map_err(|e| {
                    // Not kept: a fixed key is read again at the next attempt.
                    lock(&self.credentials).remove(&credential_key(&reference));
                    Failure::issuer_not_ready(format!(
                        "{} is not a usable private key: {e}",
                        credential.from
                    ))
                })?;
                let audience = assertion_audience(
                    spec,
                    issuer.key,
                    discovered_issuer.as_deref(),
                    &token_endpoint,
                )?;
                (
                    ClientCredentials::PrivateKeyJwt {
                        key: Arc::new(key),
                        audience,
                    },
                    Some(credential.from),
                )
            }
        };
        let exchange = match (&spec.grant.type_, &spec.grant.token_exchange) {
            (GrantType::TokenExchange, Some(grant)) => {
                let minted = self
                    .service_account_token(
                        issuer,
                        &grant.service_account_ref,
                        "grant.tokenExchange.serviceAccountRef",
                        discovered_issuer.as_deref(),
                    )
                    .await?;
                Some(Exchange {
                    subject_token: minted.token,
                    requested_token_type: grant
                        .requested_token_type
                        .clone()
                        .filter(|t| !t.is_empty()),
                    from: minted.from,
                })
            }
            (GrantType::TokenExchange, None) => {
                return Err(Failure::issuer_not_ready(
                    "grant.type TokenExchange needs grant.tokenExchange",
                ));
            }
            _ => None,
        };
        Ok(ReadyEndpoint {
            endpoint: Endpoint {
                token_endpoint,
                client_id: spec.client_id.clone(),
                credentials,
                ca_bundle: spec.ca_bundle.clone(),
                client_certificate,
                timeout,
            },
            default_lifetime,
            audience_parameter: spec.audience_parameter,
            authorization_details_in: spec.authorization_details_in,
            token_endpoint_source,
            credential_from,
            certificate_from: certificate.map(|c| c.from),
            exchange,
        })
    }

    /// A ServiceAccount token for `account` (in the issuer's Secret namespace), minted
    /// through the source and reused while more than half of its life is left. Its
    /// audience: `account.audience`, else the issuer identifier (discovery's, else
    /// issuerURL).
    async fn service_account_token(
        &self,
        issuer: IssuerTarget<'_>,
        account: &ServiceAccountRef,
        field: &'static str,
        discovered_issuer: Option<&str>,
    ) -> Result<ServiceAccountToken, Failure> {
        let audience = account
            .audience
            .as_deref()
            .filter(|a| !a.is_empty())
            .or(discovered_issuer)
            .or(issuer.spec.issuer_url.as_deref())
            .ok_or_else(|| {
                Failure::issuer_not_ready(format!(
                    "{field}.audience is needed without issuerURL: the ServiceAccount token's audience defaults to the issuer identifier"
                ))
            })?;
        let cache_key = (
            issuer.secret_namespace.to_string(),
            account.name.clone(),
            audience.to_string(),
        );
        if let Some((minted, reuse_until)) = lock(&self.minted).get(&cache_key)
            && Instant::now() < *reuse_until
        {
            return Ok(minted.clone());
        }
        if let Some((failure, failed_at)) = lock(&self.mint_failures).get(&cache_key)
            && failed_at.elapsed() < MINT_FAILURE_TTL
        {
            return Err(failure.clone());
        }
        let minted = self
            .source
            .service_account_token(ServiceAccountTokenRef {
                namespace: issuer.secret_namespace,
                name: &account.name,
                audience,
                expiration: SERVICE_ACCOUNT_TOKEN_LIFETIME,
                field,
            })
            .await
            .inspect_err(|failure| {
                lock(&self.mint_failures)
                    .insert(cache_key.clone(), (failure.clone(), Instant::now()));
            })?;
        lock(&self.mint_failures).remove(&cache_key);
        // An already expired token (a stale file for the `token` command) is never reused.
        let life_left =
            Duration::try_from(minted.expires_at.duration_since(jiff::Timestamp::now()))
                .unwrap_or(Duration::ZERO);
        let reuse_until = Instant::now() + life_left / 2;
        lock(&self.minted).insert(cache_key, (minted.clone(), reuse_until));
        Ok(minted)
    }

    /// Forgets the minted tokens of a ServiceAccount (any audience): the next use mints.
    fn forget_minted(&self, namespace: &str, name: &str) {
        lock(&self.minted).retain(|(ns, account, _), _| !(ns == namespace && account == name));
    }

    /// The issuer's client certificate (`tlsClientCertificate`), if it names one: read
    /// through the cache ([`CREDENTIAL_TTL`], dropped when the Secret changes or the server
    /// refuses the client) and parsed once per read.
    pub async fn client_certificate(
        &self,
        issuer: IssuerTarget<'_>,
    ) -> Result<Option<IssuerCertificate>, Failure> {
        let Some(configured) = &issuer.spec.tls_client_certificate else {
            return Ok(None);
        };
        let name = &configured.secret_ref.name;
        let cache_key = (issuer.secret_namespace.to_string(), name.clone());
        if let Some((certificate, read_at)) = lock(&self.certificates).get(&cache_key)
            && read_at.elapsed() < CREDENTIAL_TTL
        {
            return Ok(Some(certificate.clone()));
        }
        let read = self
            .source
            .read_certificate(CertificateRef {
                namespace: issuer.secret_namespace,
                secret_name: name,
            })
            .await?;
        let certificate = ClientCertificate::from_pem(&read.chain, &read.key).map_err(|why| {
            Failure::issuer_not_ready(format!("tlsClientCertificate {}: {why}", read.from))
        })?;
        let certificate = IssuerCertificate {
            certificate: Arc::new(certificate),
            from: read.from,
        };
        lock(&self.certificates).insert(cache_key, (certificate.clone(), Instant::now()));
        Ok(Some(certificate))
    }

    /// Forgets a cached client certificate: its Secret changed.
    pub fn forget_certificate(&self, namespace: &str, secret_name: &str) {
        lock(&self.certificates).remove(&(namespace.to_string(), secret_name.to_string()));
    }

    /// The configured token endpoint, or the discovered one; where it came from; and the
    /// issuer identifier discovery declared.
    async fn token_endpoint(
        &self,
        issuer: IssuerTarget<'_>,
        client_certificate: Option<&ClientCertificate>,
        timeout: Duration,
    ) -> Result<(Url, String, Option<String>), Failure> {
        let spec = issuer.spec;
        if let Some(configured) = &spec.token_endpoint {
            let url = Url::parse(configured).map_err(|e| {
                Failure::issuer_not_ready(format!("tokenEndpoint {configured:?}: {e}"))
            })?;
            check_transport_security(&url, spec.allow_insecure_http)
                .map_err(|e| Failure::issuer_not_ready(e.to_string()))?;
            return Ok((url, "tokenEndpoint".to_string(), None));
        }
        let metadata = self
            .server_metadata(issuer, client_certificate, timeout)
            .await?;
        let issuer_url = spec.issuer_url.as_deref().unwrap_or_default();
        let presents_certificate = client_certificate.is_some();
        let source = match &metadata.mtls_token_endpoint {
            Some(_) if presents_certificate => {
                format!("discovery from issuerURL {issuer_url}, its mtls_endpoint_aliases")
            }
            _ => format!("discovery from issuerURL {issuer_url}"),
        };
        let url = metadata.token_endpoint_for(presents_certificate).clone();
        Ok((url, source, Some(metadata.issuer)))
    }

    /// The server metadata from discovery at issuerURL (cached for [`DISCOVERY_TTL`]).
    pub async fn server_metadata(
        &self,
        issuer: IssuerTarget<'_>,
        client_certificate: Option<&ClientCertificate>,
        timeout: Duration,
    ) -> Result<ServerMetadata, Failure> {
        let spec = issuer.spec;
        let issuer_url = spec.issuer_url.as_deref().ok_or_else(|| {
            Failure::issuer_not_ready(format!(
                "{}: neither issuerURL nor tokenEndpoint is set",
                issuer.key
            ))
        })?;
        if let Some((metadata, fetched)) = lock(&self.discovery).get(issuer_url)
            && fetched.elapsed() < DISCOVERY_TTL
        {
            return Ok(metadata.clone());
        }
        let parsed = Url::parse(issuer_url)
            .map_err(|e| Failure::issuer_not_ready(format!("issuerURL {issuer_url:?}: {e}")))?;
        let metadata = self
            .tokens
            .discover(
                &parsed,
                Tls {
                    ca_bundle: spec.ca_bundle.as_deref(),
                    client_certificate,
                },
                timeout,
                spec.allow_insecure_http,
            )
            .await
            .map_err(|e| Failure::issuer_not_ready(e.to_string()))?;
        lock(&self.discovery).insert(issuer_url.to_string(), (metadata.clone(), Instant::now()));
        Ok(metadata)
    }

    /// A credential through the cache ([`CREDENTIAL_TTL`], dropped after `invalid_client`).
    async fn cached(&self, reference: CredentialRef<'_>) -> Result<Credential, Failure> {
        let cache_key = credential_key(&reference);
        if let Some((credential, read_at)) = lock(&self.credentials).get(&cache_key)
            && read_at.elapsed() < CREDENTIAL_TTL
        {
            return Ok(credential.clone());
        }
        let credential = self.source.read(reference).await?;
        lock(&self.credentials).insert(cache_key, (credential.clone(), Instant::now()));
        Ok(credential)
    }

    /// Reads one credential fresh, past the cache: a refresh-token chain's bootstrap value,
    /// whose every read must see the newest write.
    pub async fn read_fresh(
        &self,
        issuer: IssuerTarget<'_>,
        kind: CredentialKind,
        secret: &SecretKeySelector,
    ) -> Result<SecretString, Failure> {
        let reference = CredentialRef {
            kind,
            method: method_name(issuer.spec.client_auth.method),
            namespace: issuer.secret_namespace,
            secret: Some(secret),
        };
        Ok(self.source.read(reference).await?.value)
    }

    /// Forgets what was cached for an issuer after a failure that stale material may explain.
    pub fn invalidate(&self, issuer: IssuerTarget<'_>, error: &TokenError) {
        // A refused client may come from a certificate renewed since (the watch of its
        // Secret usually says so first). Not on transport errors: while a server is down,
        // every retry of every bound token would read the Secret again.
        if error.is_client_auth_failure()
            && let Some(configured) = &issuer.spec.tls_client_certificate
        {
            self.forget_certificate(issuer.secret_namespace, &configured.secret_ref.name);
        }
        // A refused ServiceAccount token (its account deleted and made again, keys rotated)
        // is not offered again.
        if error.is_client_auth_failure()
            && let Some(account) = &issuer.spec.client_auth.service_account_ref
        {
            self.forget_minted(issuer.secret_namespace, &account.name);
        }
        if matches!(error, TokenError::Server { status: 400, .. })
            && let Some(grant) = &issuer.spec.grant.token_exchange
        {
            self.forget_minted(issuer.secret_namespace, &grant.service_account_ref.name);
        }
        if error.is_client_auth_failure() {
            let auth = &issuer.spec.client_auth;
            lock(&self.credentials).retain(|(namespace, kind, name, key), _| {
                let refers = |r: &Option<SecretKeySelector>| {
                    r.as_ref().is_none_or(|r| &r.name == name && &r.key == key)
                };
                let stale = namespace == issuer.secret_namespace
                    && match *kind {
                        "client-secret" => refers(&auth.client_secret_ref),
                        "private-key" => refers(&auth.private_key_ref),
                        _ => false,
                    };
                !stale
            });
        }
        if matches!(
            error,
            TokenError::Transport { .. } | TokenError::Server { status: 404, .. }
        ) && let Some(url) = &issuer.spec.issuer_url
        {
            lock(&self.discovery).remove(url);
        }
    }

    /// Verifies the signature of a JWT access token against the issuer's JWKS
    /// (`jwksURI`, else discovery's `jwks_uri`; `iss` must be the issuer). Opaque tokens
    /// cannot be verified locally and pass. Call only with `verifyAccessTokenSignature` set.
    pub async fn verify_signature(
        &self,
        issuer: IssuerTarget<'_>,
        access_token: &str,
        timeout: Duration,
    ) -> Result<(), Failure> {
        if decode_claims(access_token).is_none() {
            return Ok(());
        }
        let certificate = self.client_certificate(issuer).await?;
        let client_certificate = certificate.as_ref().map(|c| &*c.certificate);
        let (url, expected_issuer) = self.key_source(issuer, client_certificate, timeout).await?;
        let source = jwks_cache::JwksSource {
            url: &url,
            tls: Tls {
                ca_bundle: issuer.spec.ca_bundle.as_deref(),
                client_certificate,
            },
            allow_insecure_http: issuer.spec.allow_insecure_http,
        };
        let set = self
            .jwks
            .key_set(&self.tokens, issuer.key, source, timeout, access_token)
            .await
            .map_err(|error| {
                // An unreachable key set may come from a stale discovery document.
                self.invalidate(issuer, &error);
                Failure::from_token_error(&error)
            })?;
        Ok(jwks::verify_signature(
            access_token,
            &set,
            expected_issuer.as_deref(),
        )?)
    }

    /// Where an issuer's keys are, and the `iss` its tokens must carry.
    async fn key_source(
        &self,
        issuer: IssuerTarget<'_>,
        client_certificate: Option<&ClientCertificate>,
        timeout: Duration,
    ) -> Result<(Url, Option<String>), Failure> {
        let spec = issuer.spec;
        let expected_issuer = spec.issuer_url.clone();
        if let Some(configured) = &spec.jwks_uri {
            let url = Url::parse(configured)
                .map_err(|e| Failure::issuer_not_ready(format!("jwksURI {configured:?}: {e}")))?;
            return Ok((url, expected_issuer));
        }
        if spec.issuer_url.is_none() {
            return Err(Failure::issuer_not_ready(format!(
                "{}: verifyAccessTokenSignature needs issuerURL or jwksURI",
                issuer.key
            )));
        }
        let metadata = self
            .server_metadata(issuer, client_certificate, timeout)
            .await?;
        let url = metadata.jwks_uri.ok_or_else(|| {
            Failure::issuer_not_ready(format!(
                "{}: verifyAccessTokenSignature is set but the server's metadata has no usable jwks_uri; set jwksURI",
                issuer.key
            ))
        })?;
        // Discovery checked that the document's issuer is issuerURL (up to a trailing `/`).
        Ok((url, Some(metadata.issuer)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AssertionAudience;

    #[test]
    fn assertion_audience_is_the_issuer_or_the_token_endpoint() {
        let token_endpoint = Url::parse("https://idp.example.com/oauth2/token").unwrap();
        let mut spec = IssuerSpec {
            issuer_url: Some("https://idp.example.com".into()),
            ..IssuerSpec::default()
        };
        let audience = |spec: &IssuerSpec, discovered: Option<&str>| {
            assertion_audience(spec, "TokenIssuer/ns/idp", discovered, &token_endpoint)
        };
        assert_eq!(audience(&spec, None).unwrap(), "https://idp.example.com");
        // Discovery's `issuer` is the identifier, even when issuerURL differs by a slash.
        assert_eq!(
            audience(&spec, Some("https://idp.example.com/")).unwrap(),
            "https://idp.example.com/"
        );
        spec.client_auth.assertion_audience = AssertionAudience::TokenEndpoint;
        assert_eq!(
            audience(&spec, None).unwrap(),
            "https://idp.example.com/oauth2/token"
        );
        spec.issuer_url = None;
        spec.token_endpoint = Some(token_endpoint.to_string());
        assert!(audience(&spec, None).is_ok());
        spec.client_auth.assertion_audience = AssertionAudience::Issuer;
        let err = audience(&spec, None).unwrap_err();
        assert_eq!(err.reason, crate::failure::reason::ISSUER_NOT_READY);
        assert!(
            err.message
                .contains("set issuerURL, or set assertionAudience: TokenEndpoint"),
            "{}",
            err.message
        );
    }

    /// A source that counts reads and answers from a map.
    #[derive(Default)]
    struct Counting {
        reads: std::sync::atomic::AtomicUsize,
        mints: std::sync::atomic::AtomicUsize,
    }

    impl CredentialSource for Counting {
        async fn read_certificate(
            &self,
            _: CertificateRef<'_>,
        ) -> Result<CertificateCredential, Failure> {
            Err(Failure::issuer_not_ready("no certificates here"))
        }

        async fn service_account_token(
            &self,
            reference: ServiceAccountTokenRef<'_>,
        ) -> Result<ServiceAccountToken, Failure> {
            self.mints
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            if reference.name == "forbidden" {
                return Err(Failure::issuer_not_ready("may not mint"));
            }
            let lifetime = match reference.name {
                // Already expired when it arrives: never reused.
                "short-lived" => jiff::SignedDuration::from_secs(-600),
                _ => jiff::SignedDuration::try_from(reference.expiration).unwrap(),
            };
            Ok(ServiceAccountToken {
                token: SecretString::new(format!("sa-token-for-{}", reference.audience)),
                expires_at: jiff::Timestamp::now() + lifetime,
                from: format!("ServiceAccount {}/{}", reference.namespace, reference.name),
            })
        }

        async fn read(&self, reference: CredentialRef<'_>) -> Result<Credential, Failure> {
            self.reads
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let secret = reference
                .secret
                .ok_or_else(|| Failure::issuer_not_ready("no ref"))?;
            Ok(Credential {
                value: SecretString::new(format!("value-of-{}", secret.name)),
                from: format!("map {}", secret.name),
            })
        }
    }

    /// The server's refusal of the client (RFC 6749 §5.2).
    fn invalid_client() -> TokenError {
        TokenError::Server {
            status: 401,
            error: "invalid_client".into(),
            description: None,
            retry_after: None,
        }
    }

    fn basic_spec() -> IssuerSpec {
        let mut spec = IssuerSpec {
            token_endpoint: Some("https://idp.example.com/token".into()),
            client_id: "shop".into(),
            ..IssuerSpec::default()
        };
        spec.client_auth.method = ClientAuthMethod::ClientSecretBasic;
        spec.client_auth.client_secret_ref = Some(SecretKeySelector {
            name: "idp-client".into(),
            key: "client-secret".into(),
        });
        spec
    }

    #[tokio::test]
    async fn authorization_details_in_the_assertion_need_private_key_jwt() {
        let layer = IssuerEndpoints::new(TokenClient::new().unwrap(), Counting::default());
        let mut spec = basic_spec();
        spec.authorization_details_in = AuthorizationDetailsIn::ClientAssertion;
        let target = IssuerTarget {
            key: "TokenIssuer/ns/idp",
            spec: &spec,
            secret_namespace: "ns",
        };
        let ready = layer.endpoint(target).await.unwrap();
        let details = [serde_json::json!({"type": "helseid_authorization"})];
        assert_eq!(ready.authorization_details_for(&[]).unwrap(), None);
        let err = ready.authorization_details_for(&details).unwrap_err();
        assert_eq!(err.reason, crate::failure::reason::ISSUER_NOT_READY);
        assert!(err.message.contains("PrivateKeyJWT"), "{}", err.message);

        let ready = ReadyEndpoint {
            authorization_details_in: AuthorizationDetailsIn::TokenRequest,
            ..ready
        };
        let sent = ready.authorization_details_for(&details).unwrap().unwrap();
        assert_eq!(sent.location(), crate::oauth::DetailsLocation::TokenRequest);
        let huge = [serde_json::json!({"type": "t", "x": "a".repeat(9000)})];
        let err = ready.authorization_details_for(&huge).unwrap_err();
        assert_eq!(err.reason, crate::failure::reason::TOKEN_REQUEST_FAILED);
        assert!(
            err.message
                .starts_with("spec.authorizationDetails not sent:"),
            "{}",
            err.message
        );
    }

    #[tokio::test]
    async fn service_account_tokens_are_reused_while_half_their_life_is_left() {
        let layer = IssuerEndpoints::new(TokenClient::new().unwrap(), Counting::default());
        let mints = || {
            layer
                .source
                .mints
                .load(std::sync::atomic::Ordering::Relaxed)
        };
        let mut spec = basic_spec();
        spec.issuer_url = Some("https://idp.example.com".into());
        spec.client_auth.method = ClientAuthMethod::ServiceAccountToken;
        spec.client_auth.service_account_ref = Some(ServiceAccountRef {
            name: "idp-client".into(),
            audience: None,
        });
        let target = IssuerTarget {
            key: "TokenIssuer/shop/idp",
            spec: &spec,
            secret_namespace: "shop",
        };
        let ready = layer.endpoint(target).await.unwrap();
        // The audience defaults to the issuer identifier.
        assert!(matches!(
            ready.endpoint.credentials,
            ClientCredentials::FederatedAssertion(ref t) if t.expose() == "sa-token-for-https://idp.example.com"
        ));
        assert_eq!(
            ready.credential_from.as_deref(),
            Some("ServiceAccount shop/idp-client")
        );
        assert!(matches!(ready.grant(), Grant::ClientCredentials));
        layer.endpoint(target).await.unwrap();
        assert_eq!(mints(), 1, "a 10-minute token is reused");
        // A refused client forgets it.
        let refused = invalid_client();
        layer.invalidate(target, &refused);
        layer.endpoint(target).await.unwrap();
        assert_eq!(mints(), 2);

        // A token exchange mints the subject token, for its own audience.
        spec.client_auth.method = ClientAuthMethod::NoAuth;
        spec.grant.type_ = GrantType::TokenExchange;
        spec.grant.token_exchange = Some(crate::api::TokenExchangeGrant {
            service_account_ref: ServiceAccountRef {
                name: "short-lived".into(),
                audience: Some("urn:exchange".into()),
            },
            ..Default::default()
        });
        let target = IssuerTarget {
            key: "TokenIssuer/shop/exchange",
            spec: &spec,
            secret_namespace: "shop",
        };
        let ready = layer.endpoint(target).await.unwrap();
        let Grant::TokenExchange {
            subject_token,
            subject_token_type,
            requested_token_type,
        } = ready.grant()
        else {
            panic!("a token exchange");
        };
        assert_eq!(subject_token.expose(), "sa-token-for-urn:exchange");
        assert_eq!(subject_token_type, TOKEN_TYPE_JWT);
        assert_eq!(requested_token_type, None);
        assert_eq!(mints(), 3);
        // Less than half its life left: minted again.
        layer.endpoint(target).await.unwrap();
        assert_eq!(mints(), 4);
    }

    #[tokio::test]
    async fn a_refused_mint_is_remembered_for_a_few_seconds() {
        let layer = IssuerEndpoints::new(TokenClient::new().unwrap(), Counting::default());
        let mut spec = basic_spec();
        spec.issuer_url = Some("https://idp.example.com".into());
        spec.client_auth.method = ClientAuthMethod::ServiceAccountToken;
        spec.client_auth.service_account_ref = Some(ServiceAccountRef {
            name: "forbidden".into(),
            audience: None,
        });
        let target = IssuerTarget {
            key: "TokenIssuer/shop/idp",
            spec: &spec,
            secret_namespace: "shop",
        };
        for _ in 0..3 {
            let failure = layer.endpoint(target).await.unwrap_err();
            assert_eq!(failure.message, "may not mint");
        }
        assert_eq!(
            layer
                .source
                .mints
                .load(std::sync::atomic::Ordering::Relaxed),
            1,
            "tokens waiting on one missing grant ask the API server once"
        );
    }

    #[tokio::test]
    async fn credentials_are_cached_until_the_server_refuses_them() {
        let layer = IssuerEndpoints::new(TokenClient::new().unwrap(), Counting::default());
        let spec = basic_spec();
        let target = IssuerTarget {
            key: "TokenIssuer/shop/idp",
            spec: &spec,
            secret_namespace: "shop",
        };
        let ready = layer.endpoint(target).await.unwrap();
        assert_eq!(
            ready.credential_from.as_deref(),
            Some("map idp-client"),
            "says where, not what"
        );
        assert_eq!(ready.token_endpoint_source, "tokenEndpoint");
        assert!(matches!(
            ready.endpoint.credentials,
            ClientCredentials::Basic(ref v) if v.expose() == "value-of-idp-client"
        ));
        layer.endpoint(target).await.unwrap();
        assert_eq!(
            layer
                .source
                .reads
                .load(std::sync::atomic::Ordering::Relaxed),
            1
        );
        let refused = invalid_client();
        layer.invalidate(target, &refused);
        layer.endpoint(target).await.unwrap();
        assert_eq!(
            layer
                .source
                .reads
                .load(std::sync::atomic::Ordering::Relaxed),
            2
        );
        // Fresh reads (bootstrap values) never come from the cache.
        let selector = spec.client_auth.client_secret_ref.clone().unwrap();
        layer
            .read_fresh(target, CredentialKind::BootstrapRefreshToken, &selector)
            .await
            .unwrap();
        assert_eq!(
            layer
                .source
                .reads
                .load(std::sync::atomic::Ordering::Relaxed),
            3
        );
    }
}
