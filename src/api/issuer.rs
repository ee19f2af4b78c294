//! TokenIssuer and ClusterTokenIssuer: who the operator is at an authorization server and
//! how it asks that server for tokens.
// kube's `printcolumn(...)` repeats attribute names by design.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::{Condition, SecretKeySelector, SecretReference};

/// How to reach an authorization server and authenticate to it. Shared by TokenIssuer and
/// ClusterTokenIssuer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.issuerURL) || has(self.tokenEndpoint)").message("set issuerURL (discovery) or tokenEndpoint"))]
#[x_kube(validation = Rule::new("size(self.clientID) > 0").message("clientID must not be empty"))]
#[x_kube(validation = Rule::new("has(self.clientAuth)").message("clientAuth is required: a method and its credentials (clientSecretRef, privateKeyRef, serviceAccountRef, or tlsClientCertificate for the TLS methods), or method None"))]
#[x_kube(validation = Rule::new("!has(self.clientAuth) || self.clientAuth.method != 'ServiceAccountToken' || has(self.issuerURL) || (has(self.clientAuth.serviceAccountRef) && has(self.clientAuth.serviceAccountRef.audience) && size(self.clientAuth.serviceAccountRef.audience) > 0)").message("the ServiceAccount token's audience defaults to the issuer identifier: set issuerURL, or clientAuth.serviceAccountRef.audience"))]
#[x_kube(validation = Rule::new("!has(self.grant) || !has(self.grant.tokenExchange) || has(self.issuerURL) || (has(self.grant.tokenExchange.serviceAccountRef.audience) && size(self.grant.tokenExchange.serviceAccountRef.audience) > 0)").message("the subject token's audience defaults to the issuer identifier: set issuerURL, or grant.tokenExchange.serviceAccountRef.audience"))]
#[x_kube(validation = Rule::new("!has(self.clientAuth) || !(self.clientAuth.method == 'TLSClientAuth' || self.clientAuth.method == 'SelfSignedTLSClientAuth') || has(self.tlsClientCertificate)").message("TLSClientAuth and SelfSignedTLSClientAuth authenticate with the client certificate: set tlsClientCertificate.secretRef (a kubernetes.io/tls Secret)"))]
#[x_kube(validation = Rule::new("!self.verifyAccessTokenSignature || has(self.issuerURL) || has(self.jwksURI)").message("verifyAccessTokenSignature needs issuerURL (its discovery document names the jwks_uri) or jwksURI"))]
#[x_kube(validation = Rule::new("!has(self.authorizationDetailsIn) || self.authorizationDetailsIn != 'ClientAssertion' || (has(self.clientAuth) && has(self.clientAuth.method) && self.clientAuth.method == 'PrivateKeyJWT')").message("authorizationDetailsIn ClientAssertion puts the authorization details into the client assertion: it needs clientAuth.method PrivateKeyJWT"))]
pub struct IssuerSpec {
    /// The authorization server's issuer identifier. The token endpoint is discovered from
    /// RFC 8414 metadata (`/.well-known/oauth-authorization-server`), then OpenID Connect
    /// discovery (`/.well-known/openid-configuration`).
    #[serde(rename = "issuerURL", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^?#\\\\s]+$')").message("issuerURL must be an http(s) URL without query or fragment"))]
    pub issuer_url: Option<String>,

    /// The token endpoint. When set, discovery is skipped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^#\\\\s]+$')").message("tokenEndpoint must be an http(s) URL without fragment"))]
    pub token_endpoint: Option<String>,

    /// The OAuth client identifier the operator authenticates as.
    #[serde(rename = "clientID")]
    #[schemars(length(max = 1024))]
    pub client_id: String,

    /// How the client authenticates at the token endpoint. Required: the default method,
    /// ClientSecretBasic, needs clientSecretRef; a public client sets method None.
    #[serde(default)]
    // No schema default: the API server refuses a CRD whose default breaks a CEL rule, and
    // `{method: ClientSecretBasic}` without clientSecretRef would. The rule on IssuerSpec
    // requires the field instead.
    #[schemars(transform = |s: &mut schemars::Schema| { s.remove("default"); })]
    pub client_auth: ClientAuth,

    /// How the wanted audience is named in the token request.
    #[serde(default)]
    pub audience_parameter: AudienceParameter,

    /// Where token requests carry an AudienceToken's authorizationDetails (RFC 9396):
    /// `TokenRequest` (default), the `authorization_details` form parameter, a JSON array
    /// (RFC 9396 §6); or `ClientAssertion`, an `assertion_details` claim (the same array)
    /// inside the PrivateKeyJWT client assertion, as HelseID's multi-tenant clients name the
    /// organisation they act for. A change applies from the next token request.
    #[serde(default)]
    pub authorization_details_in: AuthorizationDetailsIn,

    /// The grant used to obtain tokens. Default: client credentials.
    #[serde(default)]
    pub grant: Grant,

    /// PEM-encoded CA certificates that sign the server's TLS certificate. Default: the
    /// system roots.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,

    /// A client certificate (RFC 8705 mutual TLS) presented on every connection to the
    /// server: for clientAuth methods TLSClientAuth and SelfSignedTLSClientAuth, and for
    /// certificate-bound tokens with any method. When the discovery document names
    /// `mtls_endpoint_aliases`, token requests go to its `token_endpoint`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_client_certificate: Option<TlsClientCertificate>,

    /// Allow plain `http://` endpoints that are not on a loopback address. Only for tests.
    #[serde(rename = "allowInsecureHTTP", default)]
    pub allow_insecure_http: bool,

    /// Lifetime assumed when the response has neither `expires_in` nor a JWT `exp`.
    /// A duration such as `5m`. Default `5m`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|ms|s|m|h))+$')").message("defaultTokenLifetime must be a duration such as 5m or 1h30m"))]
    pub default_token_lifetime: Option<String>,

    /// Timeout of one request to the server (discovery or token). Default `10s`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|ms|s|m|h))+$')").message("requestTimeout must be a duration such as 10s"))]
    pub request_timeout: Option<String>,

    /// Client-side limit on token requests to this server (a token bucket). Requests over
    /// the limit wait (up to 1s) or are deferred; a deferral is not a failure. Absent: only
    /// the operator's `--concurrency` limits them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,

    /// Verify the signature of JWT access tokens before writing them, in addition to the
    /// exact-audience check. The token must be signed by a key from the server's JWKS
    /// (jwksURI, else the `jwks_uri` of the discovery document at issuerURL), chosen by the
    /// token's `kid`, with an asymmetric `alg` that fits the key: RS256, RS384, RS512, PS256,
    /// PS384, PS512, ES256, ES384 or EdDSA; `none` and HMAC (HS256…) are always refused.
    /// `exp` and `nbf` are checked with 30s of clock skew, and when issuerURL is set `iss`
    /// must equal the issuer identifier. A token that fails is not written (reason
    /// TokenRequestFailed). Opaque (non-JWT) access tokens cannot be verified locally and are
    /// written as before. The key set is cached for an hour and fetched again at most every
    /// 30s when a token names a key it lacks (key rotation). Default false.
    #[serde(default)]
    pub verify_access_token_signature: bool,

    /// The server's JWKS URL (its public signing keys), for verifyAccessTokenSignature.
    /// Default: the `jwks_uri` of the discovery document at issuerURL. Needed when only
    /// tokenEndpoint is set.
    #[serde(rename = "jwksURI", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^https?://[^#\\\\s]+$')").message("jwksURI must be an http(s) URL without fragment"))]
    pub jwks_uri: Option<String>,
}

/// The client certificate of an issuer (RFC 8705).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsClientCertificate {
    /// A Secret of type `kubernetes.io/tls`, as cert-manager writes it: `tls.crt` (the
    /// certificate, then its chain, PEM) and `tls.key` (its private key, PEM). When it
    /// changes (a renewal), the next connections present the new certificate and tokens
    /// bound to the old one are replaced at once.
    pub secret_ref: SecretReference,
}

/// Client authentication at the token endpoint (RFC 6749 §2.3, RFC 7523, RFC 8705).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(self.method == 'ClientSecretBasic' || self.method == 'ClientSecretPost') || has(self.clientSecretRef)").message("ClientSecretBasic and ClientSecretPost need clientSecretRef"))]
#[x_kube(validation = Rule::new("self.method != 'PrivateKeyJWT' || has(self.privateKeyRef)").message("PrivateKeyJWT needs privateKeyRef"))]
#[x_kube(validation = Rule::new("self.method != 'ServiceAccountToken' || has(self.serviceAccountRef)").message("ServiceAccountToken needs serviceAccountRef: the ServiceAccount whose tokens authenticate the client"))]
pub struct ClientAuth {
    /// The authentication method. Default `ClientSecretBasic`.
    #[serde(default)]
    pub method: ClientAuthMethod,
    /// The client secret, for ClientSecretBasic and ClientSecretPost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_ref: Option<SecretKeySelector>,
    /// The private key (PEM: PKCS#1, PKCS#8, SEC1; or a JWK), for PrivateKeyJWT.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key_ref: Option<SecretKeySelector>,
    /// The ServiceAccount whose tokens authenticate the client, for ServiceAccountToken:
    /// in the issuer's namespace (a ClusterTokenIssuer: the cluster resource namespace).
    /// The operator may mint its tokens only where that namespace's owner allows it (see
    /// ServiceAccountRef).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_account_ref: Option<ServiceAccountRef>,
    /// JWS algorithm of the client assertion. Default: derived from the key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signing_algorithm: Option<SigningAlgorithm>,
    /// Optional `kid` header of the client assertion.
    #[serde(rename = "keyID", default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    pub key_id: Option<String>,
    /// The `aud` of the client assertion: the issuer identifier (default, RFC 7523 as
    /// updated) or the token endpoint URL.
    #[serde(default)]
    pub assertion_audience: AssertionAudience,
}

/// Client authentication methods.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum ClientAuthMethod {
    /// HTTP Basic with the form-encoded client ID and secret (RFC 6749 §2.3.1).
    #[default]
    ClientSecretBasic,
    /// `client_id` and `client_secret` in the request body.
    ClientSecretPost,
    /// A signed JWT assertion (RFC 7523 §2.2).
    #[serde(rename = "PrivateKeyJWT")]
    PrivateKeyJwt,
    /// No client authentication: `client_id` only (public clients).
    #[serde(rename = "None")]
    NoAuth,
    /// `tls_client_auth` (RFC 8705 §2.1): the tlsClientCertificate, issued by a CA the
    /// server trusts, authenticates; `client_id` in the body.
    #[serde(rename = "TLSClientAuth")]
    TlsClientAuth,
    /// `self_signed_tls_client_auth` (RFC 8705 §2.2): the tlsClientCertificate, registered
    /// with the server as it is, authenticates; `client_id` in the body.
    #[serde(rename = "SelfSignedTLSClientAuth")]
    SelfSignedTlsClientAuth,
    /// A Kubernetes ServiceAccount token (serviceAccountRef), minted for each use through
    /// the TokenRequest API, as the `client_assertion` (RFC 7523 §2.2, jwt-bearer): Entra
    /// ID workload identity federation, Keycloak federated client authentication. No
    /// Secret holds a credential.
    ServiceAccountToken,
}

/// A ServiceAccount whose short-lived tokens the operator mints through the TokenRequest
/// API (`serviceaccounts/<name>/token`, 10 minutes, reused while more than half of that
/// is left). It lives in the issuer's namespace (a ClusterTokenIssuer: the cluster
/// resource namespace); no other namespace can be named. The operator's own RBAC does not
/// allow minting: that namespace's owner grants it with a Role allowing `create` on
/// `serviceaccounts/token` with `resourceNames: [<name>]`, bound to the operator's
/// ServiceAccount. Until then the issuer is not Ready and its message shows that Role and
/// RoleBinding.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAccountRef {
    /// The ServiceAccount's name.
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("serviceAccountRef.name is the name of a ServiceAccount in the issuer's own namespace (a ClusterTokenIssuer: the cluster resource namespace); no other namespace can be named"))]
    pub name: String,
    /// The token's audience (`aud`): what the authorization server expects, such as
    /// `api://AzureADTokenExchange` for Entra ID. Default: the issuer identifier (as
    /// discovery declares it, else issuerURL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub audience: Option<String>,
}

/// JWS algorithm of the client assertion. Default: derived from the key.
// This text is also the `signingAlgorithm` field's description in the CRD: kube's
// Option<enum> rewrite replaces the field's doc with the enum's.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum SigningAlgorithm {
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    RS256,
    /// RSASSA-PSS with SHA-256.
    PS256,
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// ECDSA P-384 with SHA-384.
    ES384,
}

/// What a client assertion's `aud` names.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum AssertionAudience {
    /// The issuer identifier.
    #[default]
    Issuer,
    /// The token endpoint URL.
    TokenEndpoint,
}

/// How the token request names the one API the token is for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum AudienceParameter {
    /// `resource=<resource>` (RFC 8707 resource indicators). HelseID, Duende, oidc-provider,
    /// Keycloak (with the resource-indicator feature).
    #[default]
    Resource,
    /// `audience=<audience>` (Auth0, Ory Hydra).
    Audience,
    /// No parameter: the scopes select the API (Entra ID `api://…/.default`, BankID, Cognito).
    #[serde(rename = "None")]
    ScopeOnly,
}

/// Where token requests carry authorization details (RFC 9396).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum AuthorizationDetailsIn {
    /// The `authorization_details` form parameter of the token request (RFC 9396 §6).
    #[default]
    TokenRequest,
    /// An `assertion_details` claim in the PrivateKeyJWT client assertion (HelseID).
    ClientAssertion,
}

/// The OAuth grant used for token requests.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("(self.type == 'RefreshToken') == has(self.refreshToken)").message("refreshToken is required with, and only allowed with, type RefreshToken"))]
#[x_kube(validation = Rule::new("(self.type == 'TokenExchange') == has(self.tokenExchange)").message("tokenExchange is required with, and only allowed with, type TokenExchange"))]
pub struct Grant {
    /// `ClientCredentials` (default), `RefreshToken` or `TokenExchange`.
    #[serde(rename = "type", default)]
    pub type_: GrantType,
    /// The refresh-token chain, with type RefreshToken.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<RefreshTokenGrant>,
    /// What is exchanged, with type TokenExchange.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_exchange: Option<TokenExchangeGrant>,
}

/// Grant types.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum GrantType {
    /// `grant_type=client_credentials` (RFC 6749 §4.4).
    #[default]
    ClientCredentials,
    /// `grant_type=refresh_token` with a rotating refresh token (RFC 6749 §6).
    RefreshToken,
    /// `grant_type=urn:ietf:params:oauth:grant-type:token-exchange` (RFC 8693): a
    /// ServiceAccount token exchanged for the access token. Client authentication is
    /// optional (clientAuth.method None).
    TokenExchange,
}

/// An RFC 8693 token exchange: each token request sends a newly minted (or reused, while
/// more than half of its life is left) ServiceAccount token as `subject_token`
/// (`subject_token_type` `urn:ietf:params:oauth:token-type:jwt`), with the AudienceToken's
/// resource (per audienceParameter) and scopes.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct TokenExchangeGrant {
    /// Where the subject token comes from. `ServiceAccount` (the only source, default).
    #[serde(default)]
    pub subject_token_source: SubjectTokenSource,
    /// The ServiceAccount whose token is exchanged; the same namespace rules and grant as
    /// clientAuth.serviceAccountRef.
    pub service_account_ref: ServiceAccountRef,
    /// The `requested_token_type` (an RFC 8693 token type URI such as
    /// `urn:ietf:params:oauth:token-type:access_token`). The answer's `issued_token_type`
    /// must be exactly this. Default: none is sent, and the answer must be an access token
    /// (`...:access_token` or `...:jwt`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 256))]
    #[x_kube(validation = Rule::new("self.matches('^[a-zA-Z][a-zA-Z0-9+.-]*:[^\\\\s]+$')").message("requestedTokenType is a token type URI such as urn:ietf:params:oauth:token-type:access_token"))]
    pub requested_token_type: Option<String>,
}

/// Where a token exchange's subject token comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum SubjectTokenSource {
    /// A token of serviceAccountRef, minted through the TokenRequest API.
    #[default]
    ServiceAccount,
}

/// A refresh-token chain shared by every AudienceToken of the issuer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct RefreshTokenGrant {
    /// The Secret holding the initial refresh token. Adopted when the operator has no state
    /// yet or when its value changes.
    pub bootstrap_secret_ref: SecretKeySelector,
    /// The resources the bootstrap grant covers. A token for any other resource is refused
    /// without asking the server.
    #[serde(default)]
    #[schemars(length(max = 64))]
    pub resources: Vec<String>,
}

/// A token-bucket limit on requests.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.requestsPerSecond > 0.0").message("requestsPerSecond must be positive"))]
#[x_kube(validation = Rule::new("self.burst >= 1").message("burst must be at least 1"))]
pub struct RateLimit {
    /// Sustained requests per second.
    pub requests_per_second: f64,
    /// Requests allowed at once above the sustained rate.
    #[serde(default = "default_burst")]
    pub burst: i32,
}

fn default_burst() -> i32 {
    1
}

/// Observed state of an issuer.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct IssuerStatus {
    /// `Ready`: the token endpoint is known (configured or discovered) and the credentials are
    /// readable. Reasons: Ready, NotReady, RefreshChainLost.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The token endpoint as resolved by discovery or configuration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_endpoint: Option<String>,
    /// The generation the status was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// A namespaced authorization-server configuration. AudienceTokens in the same namespace
/// use it; its Secrets are read from the same namespace.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "audiencetoken.io",
    version = "v1alpha1",
    kind = "TokenIssuer",
    namespaced,
    status = "IssuerStatus",
    category = "audience-token-operator",
    doc = "An OAuth 2.0 authorization server and the client the operator is there, for AudienceTokens in this namespace.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Client", type_ = "string", json_path = ".spec.clientID"),
    printcolumn(
        name = "Token Endpoint",
        type_ = "string",
        json_path = ".status.tokenEndpoint",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
pub struct TokenIssuerSpec {
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub issuer: IssuerSpec,
}

/// A cluster-wide authorization-server configuration. Its Secrets live in the operator's
/// cluster resource namespace; which namespaces and resources may use it is explicit.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "audiencetoken.io",
    version = "v1alpha1",
    kind = "ClusterTokenIssuer",
    status = "IssuerStatus",
    category = "audience-token-operator",
    doc = "A cluster-wide OAuth 2.0 authorization server and client, usable by the namespaces it allows.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Client", type_ = "string", json_path = ".spec.clientID"),
    printcolumn(
        name = "Token Endpoint",
        type_ = "string",
        json_path = ".status.tokenEndpoint",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct ClusterTokenIssuerSpec {
    #[serde(flatten)]
    #[allow(missing_docs)]
    pub issuer: IssuerSpec,
    /// Namespaces whose AudienceTokens may use this issuer. Absent: none (deny by default);
    /// `{}`: every namespace.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_namespaces: Option<LabelSelector>,
    /// Glob patterns (`*` matches any run of characters) of resources that may be requested.
    /// Absent: any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    pub allowed_resources: Option<Vec<String>>,
}
