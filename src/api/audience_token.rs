//! AudienceToken: one access token, for one audience, in one Secret.
// kube's `printcolumn(...)` repeats attribute names by design.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::common::Condition;

/// Annotation on an AudienceToken that forces one renewal for each new value (RFC 3339 time).
pub const RENEW_REQUESTED_AT_ANNOTATION: &str = "audiencetoken.io/renew-requested-at";

/// A request for one narrowly scoped access token: one audience, the scopes asked for, kept
/// fresh in a Secret.
#[derive(CustomResource, Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[kube(
    group = "audiencetoken.io",
    version = "v1alpha1",
    kind = "AudienceToken",
    namespaced,
    status = "AudienceTokenStatus",
    shortname = "audtoken",
    category = "audience-token-operator",
    doc = "A single-audience OAuth 2.0 access token, issued into a Secret and renewed before it expires.",
    printcolumn(
        name = "Ready",
        type_ = "string",
        json_path = ".status.conditions[?(@.type==\"Ready\")].status"
    ),
    printcolumn(name = "Resource", type_ = "string", json_path = ".spec.resource"),
    printcolumn(name = "Expires", type_ = "string", json_path = ".status.expiresAt"),
    printcolumn(name = "Renewal", type_ = "string", json_path = ".status.renewalTime"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("!(has(self.renewBefore) && has(self.renewBeforePercentage))").message("set renewBefore or renewBeforePercentage, not both"))]
pub struct AudienceTokenSpec {
    /// The issuer to ask for the token.
    pub issuer_ref: IssuerRef,

    /// The one API the token is for: an absolute URI without fragment (RFC 8707 §2), such as
    /// `https://orders.example.com` or `urn:api:orders`.
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("self.matches('^[A-Za-z][A-Za-z0-9+.-]*:[^\\\\s]+$')").message("resource must be an absolute URI (with a scheme), such as https://api.example.com or urn:example:api"))]
    #[x_kube(validation = Rule::new("!self.contains('#')").message("resource must not contain a fragment (RFC 8707 §2)"))]
    pub resource: String,

    /// The `aud` the token must carry when the server maps the resource to another
    /// identifier; sent as `audience=` when the issuer's audienceParameter is Audience.
    /// Default: `resource`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    #[x_kube(validation = Rule::new("size(self) > 0").message("audience must not be empty; omit it to use resource"))]
    pub audience: Option<String>,

    /// The scopes to ask for (RFC 6749 §3.3 scope tokens, no spaces).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 64), inner(length(max = 256)))]
    #[x_kube(validation = Rule::new("self.all(s, s.matches('^[!#-\\\\[\\\\]-~]+$'))").message("each scope must be a non-empty RFC 6749 scope token: printable ASCII without spaces, quotes or backslashes"))]
    pub scopes: Vec<ScopeToken>,

    /// Name of the Secret to write. Default: the AudienceToken's name.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 253))]
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$')").message("secretName must be a DNS subdomain name"))]
    pub secret_name: Option<String>,

    /// Renew this long before expiry, a duration such as `5m`. Exclusive with
    /// renewBeforePercentage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^([0-9]+(\\\\.[0-9]+)?(ns|us|ms|s|m|h))+$')").message("renewBefore must be a duration such as 5m or 1h30m"))]
    pub renew_before: Option<String>,

    /// Renew when this percentage of the lifetime remains (1–90). Default 33: renewal at two
    /// thirds of the lifetime.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 90").message("renewBeforePercentage must be between 1 and 90"))]
    pub renew_before_percentage: Option<i32>,

    /// Labels and annotations added to the Secret. A change reaches the Secret at once,
    /// without a new token; keys dropped from it are removed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_template: Option<SecretTemplate>,

    /// What happens to the Secret when the AudienceToken is deleted: `Delete` (default; the
    /// Secret is owned by the AudienceToken) or `Retain`. A change reaches the Secret's
    /// ownerReferences at once, without a new token.
    #[serde(default)]
    pub deletion_policy: DeletionPolicy,

    /// Make the token sender-constrained with DPoP (RFC 9449): the operator keeps a key pair
    /// for this AudienceToken, proves possession of it at every token request, and writes the
    /// private key (`dpop-private-key`, a JWK) and its thumbprint (`dpop-jkt`) into the
    /// Secret beside the token, so the workload can make the proofs for its API calls.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dpop: Option<DpopSpec>,

    /// Authorization details (RFC 9396) to ask for with the token: JSON objects, each with
    /// a string `type` and any further members the server defines for that type, such as
    /// HelseID's `{type: helseid_authorization, practitioner_role: {organization:
    /// {identifier: {system, type, value}}}}`. At most 8 items; the operator sends at most
    /// 8 KiB of them (serialised JSON) and refuses a larger list without asking the server.
    /// The issuer's authorizationDetailsIn says where they go: the `authorization_details`
    /// form parameter, or the `assertion_details` claim of the client assertion. A change
    /// gets a new token at once; what the server granted shows in
    /// `status.authorizationDetails`. Never written into the Secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8), transform = authorization_detail_items)]
    pub authorization_details: Vec<serde_json::Value>,
}

/// The schema of an authorization detail (RFC 9396 §2): a JSON object whose members are
/// kept as they are (`x-kubernetes-preserve-unknown-fields`), with a non-empty string
/// `type`, which a CEL rule checks (members other than declared ones are invisible to CEL).
fn authorization_detail_items(schema: &mut schemars::Schema) {
    schema.insert(
        "items".into(),
        serde_json::json!({
            "type": "object",
            "x-kubernetes-preserve-unknown-fields": true,
            "properties": {
                "type": {
                    "description": "The kind of authorization detail, e.g. `helseid_authorization`; the server defines the other members for it.",
                    "type": "string",
                    "maxLength": 256
                }
            },
            "x-kubernetes-validations": [{
                "rule": "has(self.type) && size(self.type) > 0",
                "message": "each authorization detail must be an object with a non-empty string type (RFC 9396 §2)"
            }]
        }),
    );
}

/// The schema of granted authorization details in status: JSON objects kept as they are.
fn granted_detail_items(schema: &mut schemars::Schema) {
    schema.insert(
        "items".into(),
        serde_json::json!({"type": "object", "x-kubernetes-preserve-unknown-fields": true}),
    );
}

/// DPoP settings of an AudienceToken.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
pub struct DpopSpec {
    /// The key's algorithm: `ES256` (default), `ES384`, `PS256` or `RS256`. Changing it
    /// makes a new key and a new token.
    #[serde(default)]
    pub algorithm: DpopAlgorithmName,
}

/// The algorithms a DPoP key may use; `none` and HMAC are not among them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum DpopAlgorithmName {
    /// ECDSA P-256 with SHA-256.
    #[default]
    ES256,
    /// ECDSA P-384 with SHA-384.
    ES384,
    /// RSASSA-PSS with SHA-256 (RSA 2048).
    PS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256 (RSA 2048).
    RS256,
}

/// An RFC 6749 scope token.
pub type ScopeToken = String;

/// Which issuer an AudienceToken uses.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("size(self.name) > 0").message("issuerRef.name must not be empty"))]
pub struct IssuerRef {
    /// Name of the TokenIssuer (same namespace) or ClusterTokenIssuer.
    #[schemars(length(max = 253))]
    pub name: String,
    /// `TokenIssuer` (default) or `ClusterTokenIssuer`.
    #[serde(default)]
    pub kind: IssuerKind,
}

/// The kinds of issuer an AudienceToken can reference.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum IssuerKind {
    /// A TokenIssuer in the AudienceToken's namespace.
    #[default]
    TokenIssuer,
    /// A ClusterTokenIssuer that allows the AudienceToken's namespace and resource.
    ClusterTokenIssuer,
}

/// Extra metadata for the written Secret.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
pub struct SecretTemplate {
    /// Labels added to the Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Annotations added to the Secret.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub annotations: BTreeMap<String, String>,
}

/// What happens to the Secret when its AudienceToken is deleted.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum DeletionPolicy {
    /// The Secret carries an owner reference and is garbage-collected with the AudienceToken.
    #[default]
    Delete,
    /// The Secret is left in place (and stops being renewed).
    Retain,
}

/// Observed state of an AudienceToken. Never holds a token.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct AudienceTokenStatus {
    /// `Ready` with reason Issued, Renewed, IssuerNotReady, TokenRequestFailed,
    /// AudienceMismatch, DPoPBindingMismatch, CertificateBindingMismatch, SecretConflict,
    /// Expired, NotAllowed or RefreshChainLost. Issued and Renewed mean the last attempt
    /// succeeded; while a still-valid token is kept and renewals fail, Ready is True with
    /// the failure's reason.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The `metadata.generation` last acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// The `aud` of the current token (JWT access tokens only).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub audience: Vec<String>,
    /// The scopes granted, as the server reported them (or as requested when it did not).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    /// The token type: `Bearer`, or `DPoP` for a DPoP-bound token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token_type: Option<String>,
    /// When the current token was issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issued_at: Option<Time>,
    /// When the current token expires.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<Time>,
    /// When the operator will renew the current token.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub renewal_time: Option<Time>,
    /// Failed token requests since the last success.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub failed_attempts: i32,
    /// When the last token request failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_time: Option<Time>,
    /// Why the last token request failed (the server's error, never a token).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_failure_message: Option<String>,
    /// When the operator will try again after a failure (backoff or `Retry-After`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_time: Option<Time>,
    /// The last `audiencetoken.io/renew-requested-at` value acted on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_renew_requested_at: Option<String>,
    /// The authorization details (RFC 9396 §7) the server granted the current token, as its
    /// token response listed them; absent when it listed none (servers that read the
    /// details from the client assertion may not list them). Set at each issuance and
    /// renewal, kept across operator restarts; not in the Secret.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(transform = granted_detail_items)]
    pub authorization_details: Vec<serde_json::Value>,
}

fn is_zero(n: &i32) -> bool {
    *n == 0
}

impl AudienceToken {
    /// The Secret this AudienceToken writes.
    pub fn secret_name(&self) -> &str {
        self.spec
            .secret_name
            .as_deref()
            .or(self.metadata.name.as_deref())
            .unwrap_or_default()
    }

    /// The `aud` the token must carry: `audience` when set, else `resource`.
    pub fn expected_audience(&self) -> &str {
        self.spec.audience.as_deref().unwrap_or(&self.spec.resource)
    }
}
