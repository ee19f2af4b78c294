//! From an AudienceToken's `issuerRef` to an [`Endpoint`] the token client can call:
//! the issuer from the cache, the tenancy rules of ClusterTokenIssuers, the client secret
//! (cached briefly), and the token endpoint (configured or discovered, cached).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::api::Api;
use kube::core::{Selector, SelectorExt};
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use url::Url;

use super::Context;
use crate::api::{
    AudienceToken, ClientAuthMethod, ClusterTokenIssuer, IssuerKind, IssuerSpec, SecretKeySelector,
    SigningAlgorithm, TokenIssuer, parse_duration,
};
use crate::failure::{Failure, reason};
use crate::oauth::assertion::{ClientKey, SigningAlg};
use crate::oauth::client::check_transport_security;
use crate::oauth::discovery::ServerMetadata;
use crate::oauth::{ClientCredentials, Endpoint, TokenError};
use crate::redact::SecretString;

/// Client secrets are re-read at most this often (and at once after `invalid_client`), so a
/// renewal costs no Secret read while a rotated secret is still picked up.
const CREDENTIAL_TTL: Duration = Duration::from_secs(300);
/// Discovery documents are re-fetched this often, and after a failure.
const DISCOVERY_TTL: Duration = Duration::from_secs(3600);

/// An issuer found and allowed for one AudienceToken.
#[derive(Clone, Debug)]
pub struct ResolvedIssuer {
    /// `TokenIssuer/<ns>/<name>` or `ClusterTokenIssuer/<name>`, for logs and caches.
    pub key: String,
    /// The issuer's spec.
    pub spec: IssuerSpec,
    /// Where the issuer's Secrets live.
    pub secret_namespace: String,
    /// The issuer's `metadata.generation`: a change waives the retry backoff.
    pub generation: i64,
    /// The issuer's name (state Secrets are named after it).
    pub name: String,
    /// The issuer object, for Events and owner references.
    pub object: ObjectReference,
}

/// The issuer as logs and metrics name it: `TokenIssuer/<namespace>/<name>` or
/// `ClusterTokenIssuer/<name>`.
pub fn issuer_key(token: &AudienceToken) -> String {
    let issuer = &token.spec.issuer_ref;
    match issuer.kind {
        IssuerKind::TokenIssuer => format!(
            "TokenIssuer/{}/{}",
            token.namespace().unwrap_or_default(),
            issuer.name
        ),
        IssuerKind::ClusterTokenIssuer => format!("ClusterTokenIssuer/{}", issuer.name),
    }
}

/// Finds the issuer in the cache and applies the tenancy rules. No API call.
pub fn resolve(ctx: &Context, token: &AudienceToken) -> Result<ResolvedIssuer, Failure> {
    let namespace = token.namespace().unwrap_or_default();
    let issuer_ref = &token.spec.issuer_ref;
    match issuer_ref.kind {
        IssuerKind::TokenIssuer => {
            let found = ctx
                .issuers
                .get(&ObjectRef::<TokenIssuer>::new(&issuer_ref.name).within(&namespace))
                .ok_or_else(|| Failure {
                    reason: reason::ISSUER_NOT_READY,
                    message: format!("TokenIssuer {namespace}/{} not found", issuer_ref.name),
                    retry_after: None,
                })?;
            Ok(ResolvedIssuer {
                key: issuer_key(token),
                spec: found.spec.issuer.clone(),
                secret_namespace: namespace,
                generation: found.meta().generation.unwrap_or_default(),
                name: issuer_ref.name.clone(),
                object: found.object_ref(&()),
            })
        }
        IssuerKind::ClusterTokenIssuer => {
            let found = ctx
                .cluster_issuers
                .get(&ObjectRef::<ClusterTokenIssuer>::new(&issuer_ref.name))
                .ok_or_else(|| Failure {
                    reason: reason::ISSUER_NOT_READY,
                    message: format!("ClusterTokenIssuer {} not found", issuer_ref.name),
                    retry_after: None,
                })?;
            let labels = ctx
                .namespaces
                .get(&ObjectRef::new(&namespace))
                .map(|ns| ns.labels().clone())
                .unwrap_or_default();
            check_tenancy(&found, &namespace, &labels, &token.spec.resource)?;
            Ok(ResolvedIssuer {
                key: issuer_key(token),
                spec: found.spec.issuer.clone(),
                secret_namespace: ctx.settings.cluster_resource_namespace.clone(),
                generation: found.meta().generation.unwrap_or_default(),
                name: issuer_ref.name.clone(),
                object: found.object_ref(&()),
            })
        }
    }
}

/// A ClusterTokenIssuer serves a namespace only when `allowedNamespaces` selects it (absent:
/// nobody), and a resource only when it matches `allowedResources` (absent: any).
pub fn check_tenancy(
    issuer: &ClusterTokenIssuer,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    resource: &str,
) -> Result<(), Failure> {
    let name = issuer.name_any();
    let not_allowed = |message: String| Failure {
        reason: reason::NOT_ALLOWED,
        message,
        retry_after: None,
    };
    let selector = issuer.spec.allowed_namespaces.clone().ok_or_else(|| {
        not_allowed(format!(
            "ClusterTokenIssuer {name} has no allowedNamespaces, so no namespace may use it"
        ))
    })?;
    let selector = Selector::try_from(selector).map_err(|e| {
        not_allowed(format!(
            "ClusterTokenIssuer {name} has an invalid allowedNamespaces: {e}"
        ))
    })?;
    if !selector.matches(namespace_labels) {
        return Err(not_allowed(format!(
            "ClusterTokenIssuer {name} does not allow namespace {namespace}"
        )));
    }
    if let Some(patterns) = &issuer.spec.allowed_resources
        && !patterns.iter().any(|p| glob_match(p, resource))
    {
        return Err(not_allowed(format!(
            "ClusterTokenIssuer {name} does not allow resource {resource}"
        )));
    }
    Ok(())
}

/// `*` matches any run of characters (including `/`); everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first)
        || !text[first.len()..].ends_with(last)
        || text.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

/// Namespace, Secret name and key of a cached credential.
type CredentialKey = (String, String, String);

/// Short-lived caches of issuer material: client secrets and discovery documents.
#[derive(Default)]
pub struct IssuerCaches {
    credentials: Mutex<HashMap<CredentialKey, (SecretString, Instant)>>,
    discovery: Mutex<HashMap<String, (ServerMetadata, Instant)>>,
    /// JWKS by URL, for `verifyAccessTokenSignature`.
    pub(super) jwks: super::signature::JwksCache,
}

impl IssuerCaches {
    /// Forgets what was cached for an issuer after a failure that stale material may explain.
    pub fn invalidate(&self, issuer: &ResolvedIssuer, error: &TokenError) {
        if error.is_client_auth_failure() {
            let auth = &issuer.spec.client_auth;
            for r in [&auth.client_secret_ref, &auth.private_key_ref]
                .into_iter()
                .flatten()
            {
                lock(&self.credentials).remove(&credential_key(&issuer.secret_namespace, r));
            }
        }
        if matches!(
            error,
            TokenError::Transport { .. } | TokenError::Server { status: 404, .. }
        ) && let Some(url) = &issuer.spec.issuer_url
        {
            lock(&self.discovery).remove(url);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Settings of one token request that come from the issuer.
#[derive(Clone, Debug)]
pub struct IssuerRequest {
    /// Where and as whom to ask.
    pub endpoint: Endpoint,
    /// Lifetime assumed when the response does not say.
    pub default_lifetime: Duration,
}

fn not_ready(message: String) -> Failure {
    Failure {
        reason: reason::ISSUER_NOT_READY,
        message,
        retry_after: None,
    }
}

/// Builds the endpoint for an issuer: credentials from the (cached) Secret, the token
/// endpoint from the spec or (cached) discovery.
pub async fn endpoint(ctx: &Context, issuer: &ResolvedIssuer) -> Result<IssuerRequest, Failure> {
    let spec = &issuer.spec;
    let timeout = optional_duration(
        spec.request_timeout.as_deref(),
        crate::issuer_params::DEFAULT_REQUEST_TIMEOUT,
        "requestTimeout",
    )?;
    let default_lifetime = optional_duration(
        spec.default_token_lifetime.as_deref(),
        crate::issuer_params::DEFAULT_TOKEN_LIFETIME,
        "defaultTokenLifetime",
    )?;
    let credentials = match spec.client_auth.method {
        ClientAuthMethod::ClientSecretBasic => {
            ClientCredentials::Basic(client_secret(ctx, issuer).await?)
        }
        ClientAuthMethod::ClientSecretPost => {
            ClientCredentials::Post(client_secret(ctx, issuer).await?)
        }
        ClientAuthMethod::NoAuth => ClientCredentials::None,
        ClientAuthMethod::PrivateKeyJwt => private_key_jwt(ctx, issuer, timeout).await?,
    };
    let token_endpoint = token_endpoint(ctx, issuer, timeout).await?;
    Ok(IssuerRequest {
        endpoint: Endpoint {
            token_endpoint,
            client_id: spec.client_id.clone(),
            credentials,
            ca_bundle: spec.ca_bundle.clone(),
            timeout,
        },
        default_lifetime,
    })
}

fn optional_duration(
    value: Option<&str>,
    default: Duration,
    field: &str,
) -> Result<Duration, Failure> {
    match value {
        None => Ok(default),
        Some(v) => parse_duration(v).map_err(|e| not_ready(format!("{field}: {e}"))),
    }
}

async fn token_endpoint(
    ctx: &Context,
    issuer: &ResolvedIssuer,
    timeout: Duration,
) -> Result<Url, Failure> {
    let spec = &issuer.spec;
    if let Some(configured) = &spec.token_endpoint {
        let url = Url::parse(configured)
            .map_err(|e| not_ready(format!("tokenEndpoint {configured:?}: {e}")))?;
        check_transport_security(&url, spec.allow_insecure_http)
            .map_err(|e| not_ready(e.to_string()))?;
        return Ok(url);
    }
    Ok(server_metadata(ctx, issuer, timeout).await?.token_endpoint)
}

/// The server metadata from discovery at issuerURL (cached for [`DISCOVERY_TTL`]).
pub async fn server_metadata(
    ctx: &Context,
    issuer: &ResolvedIssuer,
    timeout: Duration,
) -> Result<ServerMetadata, Failure> {
    let spec = &issuer.spec;
    let issuer_url = spec.issuer_url.as_deref().ok_or_else(|| {
        not_ready(format!(
            "{}: neither issuerURL nor tokenEndpoint is set",
            issuer.key
        ))
    })?;
    if let Some((metadata, fetched)) = lock(&ctx.issuer_caches.discovery).get(issuer_url)
        && fetched.elapsed() < DISCOVERY_TTL
    {
        return Ok(metadata.clone());
    }
    let parsed =
        Url::parse(issuer_url).map_err(|e| not_ready(format!("issuerURL {issuer_url:?}: {e}")))?;
    let metadata = ctx
        .tokens
        .discover(
            &parsed,
            spec.ca_bundle.as_deref(),
            timeout,
            spec.allow_insecure_http,
        )
        .await
        .map_err(|e| not_ready(e.to_string()))?;
    lock(&ctx.issuer_caches.discovery)
        .insert(issuer_url.to_string(), (metadata.clone(), Instant::now()));
    Ok(metadata)
}

async fn client_secret(ctx: &Context, issuer: &ResolvedIssuer) -> Result<SecretString, Failure> {
    let reference = issuer
        .spec
        .client_auth
        .client_secret_ref
        .as_ref()
        .ok_or_else(|| {
            not_ready(format!(
                "{}: clientAuth.clientSecretRef is required for this method",
                issuer.key
            ))
        })?;
    cached_secret_key(ctx, &issuer.secret_namespace, reference).await
}

fn credential_key(namespace: &str, reference: &SecretKeySelector) -> CredentialKey {
    (
        namespace.to_string(),
        reference.name.clone(),
        reference.key.clone(),
    )
}

/// [`read_secret_key`] through the credential cache ([`CREDENTIAL_TTL`], dropped after
/// `invalid_client`): client secrets and private keys alike.
/// One key of a Secret, from the credential cache when read less than 5 minutes ago.
pub(super) async fn cached_secret_key(
    ctx: &Context,
    namespace: &str,
    reference: &SecretKeySelector,
) -> Result<SecretString, Failure> {
    let cache_key = credential_key(namespace, reference);
    if let Some((value, read_at)) = lock(&ctx.issuer_caches.credentials).get(&cache_key)
        && read_at.elapsed() < CREDENTIAL_TTL
    {
        return Ok(value.clone());
    }
    let value = read_secret_key(ctx, namespace, reference).await?;
    lock(&ctx.issuer_caches.credentials).insert(cache_key, (value.clone(), Instant::now()));
    Ok(value)
}

/// `private_key_jwt` credentials: the key from `privateKeyRef` (cached like a client secret),
/// and the assertion audience per `assertionAudience`.
async fn private_key_jwt(
    ctx: &Context,
    issuer: &ResolvedIssuer,
    timeout: Duration,
) -> Result<ClientCredentials, Failure> {
    let auth = &issuer.spec.client_auth;
    let reference = auth.private_key_ref.as_ref().ok_or_else(|| {
        not_ready(format!(
            "{}: clientAuth.privateKeyRef is required for PrivateKeyJWT",
            issuer.key
        ))
    })?;
    let namespace = &issuer.secret_namespace;
    let text = cached_secret_key(ctx, namespace, reference).await?;
    let key = ClientKey::parse(
        text.expose(),
        auth.signing_algorithm.map(signing_alg),
        auth.key_id.as_deref(),
    )
    .map_err(|e| {
        // Not kept: a fixed Secret is read again at the next attempt.
        lock(&ctx.issuer_caches.credentials).remove(&credential_key(namespace, reference));
        not_ready(format!(
            "Secret {namespace}/{} key {:?} is not a usable private key: {e}",
            reference.name, reference.key
        ))
    })?;
    let token_endpoint = token_endpoint(ctx, issuer, timeout).await?;
    let discovered = match (&issuer.spec.token_endpoint, &issuer.spec.issuer_url) {
        (None, Some(url)) => lock(&ctx.issuer_caches.discovery)
            .get(url)
            .map(|(metadata, _)| metadata.issuer.clone()),
        _ => None,
    };
    let audience = assertion_audience(
        &issuer.spec,
        &issuer.key,
        discovered.as_deref(),
        &token_endpoint,
    )?;
    Ok(ClientCredentials::PrivateKeyJwt {
        key: Arc::new(key),
        audience,
    })
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
    crate::issuer_params::assertion_audience(
        spec.client_auth.assertion_audience,
        issuer,
        token_endpoint,
    )
    .map_err(|why| not_ready(format!("{label}: {why}")))
}

/// Reads one key of a Secret. Errors name the Secret and key, never the value.
pub async fn read_secret_key(
    ctx: &Context,
    namespace: &str,
    reference: &SecretKeySelector,
) -> Result<SecretString, Failure> {
    let api: Api<Secret> = Api::namespaced(ctx.client.clone(), namespace);
    let secret = api
        .get_opt(&reference.name)
        .await
        .map_err(|e| {
            not_ready(format!(
                "cannot read Secret {namespace}/{}: {e}",
                reference.name
            ))
        })?
        .ok_or_else(|| not_ready(format!("Secret {namespace}/{} not found", reference.name)))?;
    let bytes = secret
        .data
        .as_ref()
        .and_then(|data| data.get(&reference.key))
        .ok_or_else(|| {
            not_ready(format!(
                "Secret {namespace}/{} has no key {:?}",
                reference.name, reference.key
            ))
        })?;
    let text = String::from_utf8(bytes.0.clone()).map_err(|_| {
        not_ready(format!(
            "Secret {namespace}/{} key {:?} is not UTF-8",
            reference.name, reference.key
        ))
    })?;
    // Secrets created with `echo` often end in a newline that is not part of the credential.
    Ok(SecretString::new(
        text.trim_end_matches(['\n', '\r']).to_string(),
    ))
}

/// For log fields: the kind and name of an AudienceToken's issuer.
pub fn issuer_label(token: &AudienceToken) -> String {
    let kind = match token.spec.issuer_ref.kind {
        IssuerKind::TokenIssuer => TokenIssuer::kind(&()),
        IssuerKind::ClusterTokenIssuer => ClusterTokenIssuer::kind(&()),
    };
    format!("{kind}/{}", token.spec.issuer_ref.name)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::AssertionAudience;
    use crate::api::ClusterTokenIssuerSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    #[test]
    fn glob_patterns() {
        assert!(glob_match(
            "https://*.example.com",
            "https://orders.example.com"
        ));
        assert!(glob_match(
            "https://*.example.com",
            "https://a.b.example.com"
        ));
        assert!(!glob_match(
            "https://*.example.com",
            "https://example.com.evil.org"
        ));
        assert!(glob_match("*", "urn:anything"));
        assert!(glob_match("urn:api:*", "urn:api:orders"));
        assert!(!glob_match("urn:api:*", "urn:apx:orders"));
        assert!(glob_match("https://*/v1/*", "https://x/v1/y"));
        assert!(!glob_match("a*a", "a"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
    }

    fn cluster_issuer(
        allowed: Option<LabelSelector>,
        resources: Option<Vec<&str>>,
    ) -> ClusterTokenIssuer {
        ClusterTokenIssuer::new(
            "corp",
            ClusterTokenIssuerSpec {
                allowed_namespaces: allowed,
                allowed_resources: resources.map(|r| r.into_iter().map(String::from).collect()),
                ..ClusterTokenIssuerSpec::default()
            },
        )
    }

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
        assert_eq!(err.reason, reason::ISSUER_NOT_READY);
        assert!(
            err.message
                .contains("set issuerURL, or set assertionAudience: TokenEndpoint"),
            "{}",
            err.message
        );
    }

    #[test]
    fn tenancy_denies_by_default() {
        let labels = BTreeMap::from([("team".to_string(), "shop".to_string())]);
        let deny = cluster_issuer(None, None);
        assert_eq!(
            check_tenancy(&deny, "shop", &labels, "urn:a")
                .unwrap_err()
                .reason,
            reason::NOT_ALLOWED
        );
        let everyone = cluster_issuer(Some(LabelSelector::default()), None);
        assert!(check_tenancy(&everyone, "shop", &BTreeMap::new(), "urn:a").is_ok());
        let shop_only = cluster_issuer(
            Some(LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            }),
            Some(vec!["https://*.example.com"]),
        );
        assert!(check_tenancy(&shop_only, "shop", &labels, "https://orders.example.com").is_ok());
        assert!(
            check_tenancy(
                &shop_only,
                "other",
                &BTreeMap::new(),
                "https://orders.example.com"
            )
            .is_err()
        );
        let err =
            check_tenancy(&shop_only, "shop", &labels, "https://orders.evil.org").unwrap_err();
        assert!(
            err.message.contains("does not allow resource"),
            "{}",
            err.message
        );
    }
}
