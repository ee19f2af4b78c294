//! Every CEL rule (`x-kubernetes-validations`) in the generated CRDs, evaluated with
//! `kube-cel` against whole objects the way the API server would at admission: known-good
//! objects pass, and each rule has at least one mutation that fails with that rule's message
//! (and no other). `every_rule_is_exercised_by_a_failing_case` fails when a rule is added
//! without a case here.
//!
//! Also: every rule compiles, stays within the API server's static cost budget, and no schema
//! `default` breaks a rule (the API server refuses such a CRD).

use std::collections::{BTreeMap, BTreeSet, HashMap};

use audience_token_operator::api::crds;
use kube_cel::cel::common::ast::{Expr, LiteralValue};
use kube_cel::{
    CompiledSchema, ErrorKind, ScopeContext, ValidationError, Validator, WarningKind, analyze_rule,
    compile_schema,
};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// The CRDs under test

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
enum Kind {
    AudienceToken,
    TokenIssuer,
    ClusterTokenIssuer,
}

const KINDS: [Kind; 3] = [
    Kind::AudienceToken,
    Kind::TokenIssuer,
    Kind::ClusterTokenIssuer,
];
const ISSUER_KINDS: [Kind; 2] = [Kind::TokenIssuer, Kind::ClusterTokenIssuer];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::AudienceToken => "AudienceToken",
            Kind::TokenIssuer => "TokenIssuer",
            Kind::ClusterTokenIssuer => "ClusterTokenIssuer",
        }
    }
}

/// `openAPIV3Schema` of the CRD's one version.
fn schema(kind: Kind) -> Value {
    let crd = crds()
        .into_iter()
        .find(|c| c.spec.names.kind == kind.name())
        .expect("CRD exists");
    let crd = serde_json::to_value(crd).unwrap();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"].clone()
}

struct Admission {
    validator: Validator,
    compiled: HashMap<Kind, CompiledSchema>,
}

impl Admission {
    fn new() -> Self {
        Self {
            validator: Validator::new(),
            compiled: KINDS
                .iter()
                .map(|&k| (k, compile_schema(&schema(k))))
                .collect(),
        }
    }

    /// The CEL errors for `object` (schema defaults applied first, as the API server does).
    fn errors(&self, kind: Kind, object: &Value) -> Vec<ValidationError> {
        match self
            .validator
            .validate_compiled(&self.compiled[&kind], object, None)
        {
            Ok(()) => Vec::new(),
            Err(errors) => errors.into_vec(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Known-good objects

fn good_token() -> Value {
    json!({
        "apiVersion": "audiencetoken.io/v1alpha1",
        "kind": "AudienceToken",
        "metadata": {"name": "orders", "namespace": "shop"},
        "spec": {
            "issuerRef": {"name": "corp-idp", "kind": "TokenIssuer"},
            "resource": "https://orders.example.com",
            "audience": "https://orders.example.com/api",
            "scopes": ["orders/read", "orders:write", "api://orders/.default"],
            "secretName": "orders-api-token",
            "renewBefore": "5m",
            "secretTemplate": {"labels": {"team": "shop"}, "annotations": {"note": "x"}},
            "deletionPolicy": "Delete"
        }
    })
}

fn good_issuer_spec() -> Value {
    json!({
        "issuerURL": "https://idp.example.com",
        "tokenEndpoint": "https://idp.example.com/connect/token",
        "clientID": "shop-m2m",
        "clientAuth": {
            "method": "ClientSecretBasic",
            "clientSecretRef": {"name": "idp-client", "key": "client-secret"}
        },
        "audienceParameter": "Resource",
        "grant": {"type": "ClientCredentials"},
        "caBundle": "-----BEGIN CERTIFICATE-----\n...\n-----END CERTIFICATE-----\n",
        "allowInsecureHTTP": false,
        "defaultTokenLifetime": "5m",
        "requestTimeout": "10s",
        "rateLimit": {"requestsPerSecond": 10, "burst": 20}
    })
}

fn good_issuer(kind: Kind) -> Value {
    let mut spec = good_issuer_spec();
    let metadata = match kind {
        Kind::TokenIssuer => json!({"name": "corp-idp", "namespace": "shop"}),
        Kind::ClusterTokenIssuer => {
            spec["allowedNamespaces"] = json!({
                "matchLabels": {"team": "shop"},
                "matchExpressions": [{"key": "env", "operator": "In", "values": ["prod"]}]
            });
            spec["allowedResources"] = json!(["https://*.example.com", "urn:example:*"]);
            json!({"name": "corp-idp"})
        }
        Kind::AudienceToken => unreachable!("not an issuer"),
    };
    json!({
        "apiVersion": "audiencetoken.io/v1alpha1",
        "kind": kind.name(),
        "metadata": metadata,
        "spec": spec,
    })
}

fn good(kind: Kind) -> Value {
    match kind {
        Kind::AudienceToken => good_token(),
        issuer => good_issuer(issuer),
    }
}

// ---------------------------------------------------------------------------------------------
// Mutations

/// A change to an object: set (or, with `None`, remove) the value at a `/`-separated path
/// under the object, creating missing parents.
type Edit = (&'static str, Option<Value>);

fn set(path: &'static str, value: Value) -> Edit {
    (path, Some(value))
}

fn unset(path: &'static str) -> Edit {
    (path, None)
}

fn apply(mut object: Value, edits: &[Edit]) -> Value {
    for (path, value) in edits {
        let segments: Vec<&str> = path.split('/').collect();
        let (last, parents) = segments.split_last().unwrap();
        let mut node = &mut object;
        for segment in parents {
            let map = node
                .as_object_mut()
                .unwrap_or_else(|| panic!("{path}: {segment} is not an object"));
            node = map.entry(segment.to_string()).or_insert_with(|| json!({}));
        }
        let map = node
            .as_object_mut()
            .unwrap_or_else(|| panic!("{path}: parent is not an object"));
        match value {
            Some(v) => {
                map.insert(last.to_string(), v.clone());
            }
            None => {
                map.remove(*last);
            }
        }
    }
    object
}

// The rules' messages, as users see them.
const RESOURCE_URI: &str = "resource must be an absolute URI (with a scheme), such as https://api.example.com or urn:example:api";
const RESOURCE_FRAGMENT: &str = "resource must not contain a fragment (RFC 8707 §2)";
const RENEW_BOTH: &str = "set renewBefore or renewBeforePercentage, not both";
const RENEW_PERCENTAGE: &str = "renewBeforePercentage must be between 1 and 90";
const RENEW_BEFORE: &str = "renewBefore must be a duration such as 5m or 1h30m";
const AUDIENCE_EMPTY: &str = "audience must not be empty; omit it to use resource";
const SCOPE: &str = "each scope must be a non-empty RFC 6749 scope token: printable ASCII without spaces, quotes or backslashes";
const SECRET_NAME: &str = "secretName must be a DNS subdomain name";
const ISSUER_REF_NAME: &str = "issuerRef.name must not be empty";
const ISSUER_OR_ENDPOINT: &str = "set issuerURL (discovery) or tokenEndpoint";
const CLIENT_ID: &str = "clientID must not be empty";
const CLIENT_AUTH_REQUIRED: &str = "clientAuth is required: a method and its credentials (clientSecretRef, privateKeyRef, serviceAccountRef, or tlsClientCertificate for the TLS methods), or method None";
const SA_REF_NEEDED: &str = "ServiceAccountToken needs serviceAccountRef: the ServiceAccount whose tokens authenticate the client";
const SA_NAME: &str = "serviceAccountRef.name is the name of a ServiceAccount in the issuer's own namespace (a ClusterTokenIssuer: the cluster resource namespace); no other namespace can be named";
const SA_AUDIENCE: &str = "the ServiceAccount token's audience defaults to the issuer identifier: set issuerURL, or clientAuth.serviceAccountRef.audience";
const EXCHANGE_AUDIENCE: &str = "the subject token's audience defaults to the issuer identifier: set issuerURL, or grant.tokenExchange.serviceAccountRef.audience";
const GRANT_EXCHANGE: &str =
    "tokenExchange is required with, and only allowed with, type TokenExchange";
const REQUESTED_TYPE: &str =
    "requestedTokenType is a token type URI such as urn:ietf:params:oauth:token-type:access_token";
const TLS_METHOD_NEEDS_CERTIFICATE: &str = "TLSClientAuth and SelfSignedTLSClientAuth authenticate with the client certificate: set tlsClientCertificate.secretRef (a kubernetes.io/tls Secret)";
const CLIENT_SECRET_NEEDED: &str = "ClientSecretBasic and ClientSecretPost need clientSecretRef";
const PRIVATE_KEY_NEEDED: &str = "PrivateKeyJWT needs privateKeyRef";
const REF_NAME: &str = "a Secret reference needs a name";
const REF_KEY: &str = "a Secret reference needs a key";
const GRANT_REFRESH: &str =
    "refreshToken is required with, and only allowed with, type RefreshToken";
const DEFAULT_LIFETIME: &str = "defaultTokenLifetime must be a duration such as 5m or 1h30m";
const REQUEST_TIMEOUT: &str = "requestTimeout must be a duration such as 10s";
const ISSUER_URL: &str = "issuerURL must be an http(s) URL without query or fragment";
const TOKEN_ENDPOINT: &str = "tokenEndpoint must be an http(s) URL without fragment";
const RATE: &str = "requestsPerSecond must be positive";
const BURST: &str = "burst must be at least 1";
const VERIFY_NEEDS_KEYS: &str = "verifyAccessTokenSignature needs issuerURL (its discovery document names the jwks_uri) or jwksURI";
const JWKS_URI: &str = "jwksURI must be an http(s) URL without fragment";
const DETAIL_TYPE: &str =
    "each authorization detail must be an object with a non-empty string type (RFC 9396 §2)";
const DETAILS_IN_ASSERTION: &str = "authorizationDetailsIn ClientAssertion puts the authorization details into the client assertion: it needs clientAuth.method PrivateKeyJWT";

/// A HelseID authorization detail for the organisation `value` (DESIGN.md).
fn helseid_detail(value: &str) -> Value {
    json!({
        "type": "helseid_authorization",
        "practitioner_role": {"organization": {"identifier": {
            "system": "urn:oid:1.0.6523", "type": "ENH", "value": value
        }}}
    })
}

/// `clientAuth` of an issuer that authenticates with a ServiceAccount token.
fn service_account_auth(name: &str) -> Value {
    json!({"method": "ServiceAccountToken", "serviceAccountRef": {"name": name}})
}

/// `grant` of a token exchange of a ServiceAccount's token.
fn token_exchange_grant(name: &str) -> Value {
    json!({"type": "TokenExchange", "tokenExchange": {
        "subjectTokenSource": "ServiceAccount",
        "serviceAccountRef": {"name": name}
    }})
}

/// `clientAuth` of a PrivateKeyJWT issuer.
fn private_key_jwt_auth() -> Value {
    json!({
        "method": "PrivateKeyJWT",
        "privateKeyRef": {"name": "idp-client", "key": "private-key.pem"}
    })
}

struct Case {
    name: String,
    kind: Kind,
    object: Value,
    /// The messages the object must be rejected with, exactly; empty: it must pass.
    rejected_with: Vec<&'static str>,
}

fn token_case(name: &str, edits: &[Edit], rejected_with: &[&'static str]) -> Case {
    Case {
        name: format!("AudienceToken: {name}"),
        kind: Kind::AudienceToken,
        object: apply(good_token(), edits),
        rejected_with: rejected_with.to_vec(),
    }
}

/// The same spec mutation on a TokenIssuer and on a ClusterTokenIssuer (they share IssuerSpec).
fn issuer_cases(name: &str, edits: &[Edit], rejected_with: &[&'static str]) -> Vec<Case> {
    ISSUER_KINDS
        .iter()
        .map(|&kind| Case {
            name: format!("{}: {name}", kind.name()),
            kind,
            object: apply(good_issuer(kind), edits),
            rejected_with: rejected_with.to_vec(),
        })
        .collect()
}

fn valid_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    for kind in KINDS {
        cases.push(Case {
            name: format!("{}: the known-good object", kind.name()),
            kind,
            object: good(kind),
            rejected_with: vec![],
        });
    }
    let ok = |name: &str, edits: &[Edit]| token_case(name, edits, &[]);
    cases.extend([
        ok(
            "a URN resource",
            &[set("spec/resource", json!("urn:example:api"))],
        ),
        ok(
            "a resource with a query",
            &[set(
                "spec/resource",
                json!("https://api.example.com/v1?x=1"),
            )],
        ),
        ok(
            "a resource with a port and path",
            &[set(
                "spec/resource",
                json!("https://api.example.com:8443/a/b"),
            )],
        ),
        ok(
            "renewBefore 1h30m",
            &[set("spec/renewBefore", json!("1h30m"))],
        ),
        ok(
            "renewBefore 1.5h",
            &[set("spec/renewBefore", json!("1.5h"))],
        ),
        ok("renewBefore 90s", &[set("spec/renewBefore", json!("90s"))]),
        ok(
            "renewBefore 250ms",
            &[set("spec/renewBefore", json!("250ms"))],
        ),
        ok(
            "renewBeforePercentage 1",
            &[
                unset("spec/renewBefore"),
                set("spec/renewBeforePercentage", json!(1)),
            ],
        ),
        ok(
            "renewBeforePercentage 90",
            &[
                unset("spec/renewBefore"),
                set("spec/renewBeforePercentage", json!(90)),
            ],
        ),
        ok(
            "neither renewBefore nor renewBeforePercentage",
            &[unset("spec/renewBefore")],
        ),
        ok("no audience", &[unset("spec/audience")]),
        ok("no scopes", &[unset("spec/scopes")]),
        ok("empty scope list", &[set("spec/scopes", json!([]))]),
        ok(
            "scopes at the edges of the RFC 6749 character set",
            &[set(
                "spec/scopes",
                json!(["!", "#", "[", "]", "~", "a.b:c/d-e_f", "x=y&z"]),
            )],
        ),
        ok("no secretName", &[unset("spec/secretName")]),
        ok(
            "a dotted secretName",
            &[set("spec/secretName", json!("orders.api-token.v2"))],
        ),
        ok(
            "a one-character secretName",
            &[set("spec/secretName", json!("a"))],
        ),
        ok(
            "a ClusterTokenIssuer ref, Retain",
            &[
                set(
                    "spec/issuerRef",
                    json!({"name": "corp", "kind": "ClusterTokenIssuer"}),
                ),
                set("spec/deletionPolicy", json!("Retain")),
            ],
        ),
        ok(
            "issuerRef kind defaulted",
            &[set("spec/issuerRef", json!({"name": "corp-idp"}))],
        ),
        ok(
            "a HelseID authorization detail",
            &[set(
                "spec/authorizationDetails",
                json!([helseid_detail("NO:ORGNR:999977775:999977776")]),
            )],
        ),
        ok(
            "several authorization details with nested members of any kind",
            &[set(
                "spec/authorizationDetails",
                json!([
                    helseid_detail("NO:ORGNR:1:2"),
                    {"type": "payment_initiation", "locations": ["https://a.example"],
                     "instructedAmount": {"currency": "NOK", "amount": 12.5}, "urgent": true,
                     "nothing": null}
                ]),
            )],
        ),
        ok(
            "an empty list of authorization details",
            &[set("spec/authorizationDetails", json!([]))],
        ),
    ]);
    let ok = |name: &str, edits: &[Edit]| issuer_cases(name, edits, &[]);
    for batch in [
        ok("tokenEndpoint only", &[unset("spec/issuerURL")]),
        ok(
            "a ServiceAccount token as client assertion",
            &[set("spec/clientAuth", service_account_auth("idp-client"))],
        ),
        ok(
            "a ServiceAccount token for Entra ID, tokenEndpoint only",
            &[
                unset("spec/issuerURL"),
                set(
                    "spec/clientAuth",
                    json!({"method": "ServiceAccountToken", "serviceAccountRef": {
                        "name": "idp-client.v2", "audience": "api://AzureADTokenExchange"
                    }}),
                ),
            ],
        ),
        ok(
            "a token exchange by a public client",
            &[
                set("spec/clientAuth", json!({"method": "None"})),
                set("spec/grant", token_exchange_grant("workload")),
                set(
                    "spec/grant/tokenExchange/requestedTokenType",
                    json!("urn:ietf:params:oauth:token-type:access_token"),
                ),
            ],
        ),
        ok("issuerURL only", &[unset("spec/tokenEndpoint")]),
        ok(
            "an issuerURL with a path",
            &[set(
                "spec/issuerURL",
                json!("https://login.example.com/tenant/v2.0"),
            )],
        ),
        ok(
            "a loopback http issuer",
            &[set("spec/issuerURL", json!("http://127.0.0.1:8080"))],
        ),
        ok(
            "a tokenEndpoint with a query",
            &[set(
                "spec/tokenEndpoint",
                json!("https://idp.example.com/token?p=1"),
            )],
        ),
        ok(
            "method None without credentials",
            &[set("spec/clientAuth", json!({"method": "None"}))],
        ),
        ok(
            "TLSClientAuth with a client certificate",
            &[
                set("spec/clientAuth", json!({"method": "TLSClientAuth"})),
                set(
                    "spec/tlsClientCertificate",
                    json!({"secretRef": {"name": "client-cert"}}),
                ),
            ],
        ),
        ok(
            "SelfSignedTLSClientAuth with a client certificate",
            &[
                set(
                    "spec/clientAuth",
                    json!({"method": "SelfSignedTLSClientAuth"}),
                ),
                set(
                    "spec/tlsClientCertificate",
                    json!({"secretRef": {"name": "client-cert"}}),
                ),
            ],
        ),
        ok(
            "a client certificate for certificate-bound tokens with a client secret",
            &[set(
                "spec/tlsClientCertificate",
                json!({"secretRef": {"name": "client-cert"}}),
            )],
        ),
        ok(
            "ClientSecretPost",
            &[set(
                "spec/clientAuth",
                json!({"method": "ClientSecretPost", "clientSecretRef": {"name": "s", "key": "k"}}),
            )],
        ),
        ok(
            "clientAuth with the method defaulted",
            &[set(
                "spec/clientAuth",
                json!({"clientSecretRef": {"name": "s", "key": "k"}}),
            )],
        ),
        ok(
            "PrivateKeyJWT",
            &[set(
                "spec/clientAuth",
                json!({
                    "method": "PrivateKeyJWT",
                    "privateKeyRef": {"name": "idp-client", "key": "private-key.pem"},
                    "signingAlgorithm": "PS256",
                    "keyID": "k1",
                    "assertionAudience": "TokenEndpoint"
                }),
            )],
        ),
        ok(
            "RefreshToken grant",
            &[set(
                "spec/grant",
                json!({
                    "type": "RefreshToken",
                    "refreshToken": {
                        "bootstrapSecretRef": {"name": "idp-bootstrap", "key": "refresh-token"},
                        "resources": ["urn:api-a", "urn:api-b"]
                    }
                }),
            )],
        ),
        ok("grant defaulted", &[unset("spec/grant")]),
        ok("no rateLimit", &[unset("spec/rateLimit")]),
        ok(
            "a fractional rate, burst defaulted",
            &[set("spec/rateLimit", json!({"requestsPerSecond": 0.5}))],
        ),
        ok(
            "durations 1h30m and 1.5s",
            &[
                set("spec/defaultTokenLifetime", json!("1h30m")),
                set("spec/requestTimeout", json!("1.5s")),
            ],
        ),
        ok(
            "signature check with issuerURL (jwks_uri from discovery)",
            &[
                unset("spec/tokenEndpoint"),
                set("spec/verifyAccessTokenSignature", json!(true)),
            ],
        ),
        ok(
            "signature check with tokenEndpoint and jwksURI",
            &[
                unset("spec/issuerURL"),
                set("spec/verifyAccessTokenSignature", json!(true)),
                set(
                    "spec/jwksURI",
                    json!("https://idp.example.com/.well-known/jwks.json"),
                ),
            ],
        ),
        ok(
            "signature check off, tokenEndpoint only",
            &[
                unset("spec/issuerURL"),
                set("spec/verifyAccessTokenSignature", json!(false)),
            ],
        ),
        ok(
            "authorization details in the client assertion of a PrivateKeyJWT client",
            &[
                set("spec/clientAuth", private_key_jwt_auth()),
                set("spec/authorizationDetailsIn", json!("ClientAssertion")),
            ],
        ),
        ok(
            "authorization details in the token request, explicitly",
            &[set("spec/authorizationDetailsIn", json!("TokenRequest"))],
        ),
        ok(
            "a loopback http jwksURI with a query, check defaulted off",
            &[set("spec/jwksURI", json!("http://127.0.0.1:8080/jwks?v=2"))],
        ),
    ] {
        cases.extend(batch);
    }
    cases
}

fn invalid_cases() -> Vec<Case> {
    let mut cases = Vec::new();
    let bad = token_case;
    cases.extend([
        bad(
            "a relative resource",
            &[set("spec/resource", json!("orders"))],
            &[RESOURCE_URI],
        ),
        bad(
            "an absolute-path resource",
            &[set("spec/resource", json!("/orders"))],
            &[RESOURCE_URI],
        ),
        bad(
            "a scheme-relative resource",
            &[set("spec/resource", json!("//orders.example.com"))],
            &[RESOURCE_URI],
        ),
        bad(
            "an empty resource",
            &[set("spec/resource", json!(""))],
            &[RESOURCE_URI],
        ),
        bad(
            "a scheme without the rest",
            &[set("spec/resource", json!("https:"))],
            &[RESOURCE_URI],
        ),
        bad(
            "a resource with a space",
            &[set("spec/resource", json!("https://a.example/x y"))],
            &[RESOURCE_URI],
        ),
        bad(
            "a fragment",
            &[set("spec/resource", json!("https://a.example#x"))],
            &[RESOURCE_FRAGMENT],
        ),
        bad(
            "an empty fragment",
            &[set("spec/resource", json!("urn:example:api#"))],
            &[RESOURCE_FRAGMENT],
        ),
        bad(
            "renewBefore and renewBeforePercentage",
            &[
                set("spec/renewBefore", json!("5m")),
                set("spec/renewBeforePercentage", json!(33)),
            ],
            &[RENEW_BOTH],
        ),
        bad(
            "renewBeforePercentage 0",
            &[
                unset("spec/renewBefore"),
                set("spec/renewBeforePercentage", json!(0)),
            ],
            &[RENEW_PERCENTAGE],
        ),
        bad(
            "renewBeforePercentage 91",
            &[
                unset("spec/renewBefore"),
                set("spec/renewBeforePercentage", json!(91)),
            ],
            &[RENEW_PERCENTAGE],
        ),
        bad(
            "renewBeforePercentage -5",
            &[
                unset("spec/renewBefore"),
                set("spec/renewBeforePercentage", json!(-5)),
            ],
            &[RENEW_PERCENTAGE],
        ),
        bad(
            "renewBefore `5 minutes`",
            &[set("spec/renewBefore", json!("5 minutes"))],
            &[RENEW_BEFORE],
        ),
        bad(
            "renewBefore `-5m`",
            &[set("spec/renewBefore", json!("-5m"))],
            &[RENEW_BEFORE],
        ),
        bad(
            "renewBefore without unit",
            &[set("spec/renewBefore", json!("5"))],
            &[RENEW_BEFORE],
        ),
        bad(
            "renewBefore in days",
            &[set("spec/renewBefore", json!("1d"))],
            &[RENEW_BEFORE],
        ),
        bad(
            "renewBefore `1h30`",
            &[set("spec/renewBefore", json!("1h30"))],
            &[RENEW_BEFORE],
        ),
        bad(
            "renewBefore empty",
            &[set("spec/renewBefore", json!(""))],
            &[RENEW_BEFORE],
        ),
        bad(
            "an empty audience",
            &[set("spec/audience", json!(""))],
            &[AUDIENCE_EMPTY],
        ),
        bad(
            "a scope with a space",
            &[set("spec/scopes", json!(["orders read"]))],
            &[SCOPE],
        ),
        bad(
            "an empty scope",
            &[set("spec/scopes", json!(["orders/read", ""]))],
            &[SCOPE],
        ),
        bad(
            "a scope with a quote",
            &[set("spec/scopes", json!(["a\"b"]))],
            &[SCOPE],
        ),
        bad(
            "a scope with a backslash",
            &[set("spec/scopes", json!(["a\\b"]))],
            &[SCOPE],
        ),
        bad(
            "a scope with a non-ASCII letter",
            &[set("spec/scopes", json!(["bestilling/lés"]))],
            &[SCOPE],
        ),
        bad(
            "a scope with a tab",
            &[set("spec/scopes", json!(["a\tb"]))],
            &[SCOPE],
        ),
        bad(
            "secretName Bad_Name",
            &[set("spec/secretName", json!("Bad_Name"))],
            &[SECRET_NAME],
        ),
        bad(
            "secretName with a leading dash",
            &[set("spec/secretName", json!("-token"))],
            &[SECRET_NAME],
        ),
        bad(
            "secretName with an empty label",
            &[set("spec/secretName", json!("a..b"))],
            &[SECRET_NAME],
        ),
        bad(
            "secretName empty",
            &[set("spec/secretName", json!(""))],
            &[SECRET_NAME],
        ),
        bad(
            "an empty issuerRef name",
            &[set("spec/issuerRef/name", json!(""))],
            &[ISSUER_REF_NAME],
        ),
        bad(
            "an authorization detail without a type",
            &[set(
                "spec/authorizationDetails",
                json!([
                    helseid_detail("NO:ORGNR:1:2"),
                    {"practitioner_role": {"organization": {"identifier": {"value": "x"}}}}
                ]),
            )],
            &[DETAIL_TYPE],
        ),
        bad(
            "an authorization detail with an empty type",
            &[set("spec/authorizationDetails", json!([{"type": ""}]))],
            &[DETAIL_TYPE],
        ),
    ]);
    let bad = issuer_cases;
    for batch in [
        bad(
            "authorization details in the client assertion of a client-secret client",
            &[set("spec/authorizationDetailsIn", json!("ClientAssertion"))],
            &[DETAILS_IN_ASSERTION],
        ),
        bad(
            "authorization details in the client assertion, clientAuth method defaulted",
            &[
                set(
                    "spec/clientAuth",
                    json!({"clientSecretRef": {"name": "s", "key": "k"}}),
                ),
                set("spec/authorizationDetailsIn", json!("ClientAssertion")),
            ],
            &[DETAILS_IN_ASSERTION],
        ),
        bad(
            "authorization details in the client assertion of a public client",
            &[
                set("spec/clientAuth", json!({"method": "None"})),
                set("spec/authorizationDetailsIn", json!("ClientAssertion")),
            ],
            &[DETAILS_IN_ASSERTION],
        ),
        bad(
            "an empty clientID",
            &[set("spec/clientID", json!(""))],
            &[CLIENT_ID],
        ),
        bad(
            "neither issuerURL nor tokenEndpoint",
            &[unset("spec/issuerURL"), unset("spec/tokenEndpoint")],
            &[ISSUER_OR_ENDPOINT],
        ),
        bad(
            "no clientAuth",
            &[unset("spec/clientAuth")],
            &[CLIENT_AUTH_REQUIRED],
        ),
        bad(
            "ServiceAccountToken without serviceAccountRef",
            &[set(
                "spec/clientAuth",
                json!({"method": "ServiceAccountToken"}),
            )],
            &[SA_REF_NEEDED],
        ),
        bad(
            "a ServiceAccount in another namespace",
            &[set(
                "spec/clientAuth",
                service_account_auth("other-team/idp-client"),
            )],
            &[SA_NAME],
        ),
        bad(
            "a ServiceAccount named by its user name",
            &[set(
                "spec/clientAuth",
                service_account_auth("system:serviceaccount:other-team:idp-client"),
            )],
            &[SA_NAME],
        ),
        bad(
            "a ServiceAccount token without issuerURL or audience",
            &[
                unset("spec/issuerURL"),
                set("spec/clientAuth", service_account_auth("idp-client")),
            ],
            &[SA_AUDIENCE],
        ),
        bad(
            "TokenExchange without tokenExchange",
            &[set("spec/grant", json!({"type": "TokenExchange"}))],
            &[GRANT_EXCHANGE],
        ),
        bad(
            "tokenExchange with type ClientCredentials",
            &[
                set("spec/grant", token_exchange_grant("workload")),
                set("spec/grant/type", json!("ClientCredentials")),
            ],
            &[GRANT_EXCHANGE],
        ),
        bad(
            "a token exchange of a ServiceAccount in another namespace",
            &[set(
                "spec/grant",
                token_exchange_grant("other-team/workload"),
            )],
            &[SA_NAME],
        ),
        bad(
            "a requestedTokenType that is not a URI",
            &[
                set("spec/grant", token_exchange_grant("workload")),
                set(
                    "spec/grant/tokenExchange/requestedTokenType",
                    json!("access_token"),
                ),
            ],
            &[REQUESTED_TYPE],
        ),
        bad(
            "a token exchange without issuerURL or audience",
            &[
                unset("spec/issuerURL"),
                set("spec/grant", token_exchange_grant("workload")),
            ],
            &[EXCHANGE_AUDIENCE],
        ),
        bad(
            "ClientSecretBasic without clientSecretRef",
            &[set(
                "spec/clientAuth",
                json!({"method": "ClientSecretBasic"}),
            )],
            &[CLIENT_SECRET_NEEDED],
        ),
        bad(
            "ClientSecretPost without clientSecretRef",
            &[set(
                "spec/clientAuth",
                json!({"method": "ClientSecretPost"}),
            )],
            &[CLIENT_SECRET_NEEDED],
        ),
        bad(
            "an empty clientAuth (method defaults to ClientSecretBasic)",
            &[set("spec/clientAuth", json!({}))],
            &[CLIENT_SECRET_NEEDED],
        ),
        bad(
            "TLSClientAuth without a client certificate",
            &[set("spec/clientAuth", json!({"method": "TLSClientAuth"}))],
            &[TLS_METHOD_NEEDS_CERTIFICATE],
        ),
        bad(
            "SelfSignedTLSClientAuth without a client certificate",
            &[set(
                "spec/clientAuth",
                json!({"method": "SelfSignedTLSClientAuth"}),
            )],
            &[TLS_METHOD_NEEDS_CERTIFICATE],
        ),
        bad(
            "a client certificate Secret without a name",
            &[set(
                "spec/tlsClientCertificate",
                json!({"secretRef": {"name": ""}}),
            )],
            &[REF_NAME],
        ),
        bad(
            "PrivateKeyJWT without privateKeyRef",
            &[set(
                "spec/clientAuth",
                json!({"method": "PrivateKeyJWT", "clientSecretRef": {"name": "s", "key": "k"}}),
            )],
            &[PRIVATE_KEY_NEEDED],
        ),
        bad(
            "clientSecretRef without key",
            &[set("spec/clientAuth/clientSecretRef/key", json!(""))],
            &[REF_KEY],
        ),
        bad(
            "clientSecretRef without name",
            &[set("spec/clientAuth/clientSecretRef/name", json!(""))],
            &[REF_NAME],
        ),
        bad(
            "privateKeyRef without key",
            &[set(
                "spec/clientAuth",
                json!({"method": "PrivateKeyJWT", "privateKeyRef": {"name": "p", "key": ""}}),
            )],
            &[REF_KEY],
        ),
        bad(
            "privateKeyRef without name",
            &[set(
                "spec/clientAuth",
                json!({"method": "PrivateKeyJWT", "privateKeyRef": {"name": "", "key": "k"}}),
            )],
            &[REF_NAME],
        ),
        bad(
            "bootstrapSecretRef without key",
            &[set(
                "spec/grant",
                json!({"type": "RefreshToken", "refreshToken": {"bootstrapSecretRef": {"name": "b", "key": ""}}}),
            )],
            &[REF_KEY],
        ),
        bad(
            "bootstrapSecretRef without name",
            &[set(
                "spec/grant",
                json!({"type": "RefreshToken", "refreshToken": {"bootstrapSecretRef": {"name": "", "key": "k"}}}),
            )],
            &[REF_NAME],
        ),
        bad(
            "RefreshToken grant without refreshToken",
            &[set("spec/grant", json!({"type": "RefreshToken"}))],
            &[GRANT_REFRESH],
        ),
        bad(
            "refreshToken with ClientCredentials",
            &[set(
                "spec/grant",
                json!({"type": "ClientCredentials", "refreshToken": {"bootstrapSecretRef": {"name": "b", "key": "k"}}}),
            )],
            &[GRANT_REFRESH],
        ),
        bad(
            "refreshToken with the grant type defaulted",
            &[set(
                "spec/grant",
                json!({"refreshToken": {"bootstrapSecretRef": {"name": "b", "key": "k"}}}),
            )],
            &[GRANT_REFRESH],
        ),
        bad(
            "defaultTokenLifetime `5 minutes`",
            &[set("spec/defaultTokenLifetime", json!("5 minutes"))],
            &[DEFAULT_LIFETIME],
        ),
        bad(
            "defaultTokenLifetime `-5m`",
            &[set("spec/defaultTokenLifetime", json!("-5m"))],
            &[DEFAULT_LIFETIME],
        ),
        bad(
            "requestTimeout `5 minutes`",
            &[set("spec/requestTimeout", json!("5 minutes"))],
            &[REQUEST_TIMEOUT],
        ),
        bad(
            "requestTimeout `-5m`",
            &[set("spec/requestTimeout", json!("-5m"))],
            &[REQUEST_TIMEOUT],
        ),
        bad(
            "requestTimeout `10`",
            &[set("spec/requestTimeout", json!("10"))],
            &[REQUEST_TIMEOUT],
        ),
        bad(
            "issuerURL with a query",
            &[set(
                "spec/issuerURL",
                json!("https://idp.example.com?tenant=a"),
            )],
            &[ISSUER_URL],
        ),
        bad(
            "issuerURL with a fragment",
            &[set("spec/issuerURL", json!("https://idp.example.com#x"))],
            &[ISSUER_URL],
        ),
        bad(
            "issuerURL not http(s)",
            &[set("spec/issuerURL", json!("ftp://idp.example.com"))],
            &[ISSUER_URL],
        ),
        bad(
            "issuerURL without scheme",
            &[set("spec/issuerURL", json!("idp.example.com"))],
            &[ISSUER_URL],
        ),
        bad(
            "tokenEndpoint with a fragment",
            &[set(
                "spec/tokenEndpoint",
                json!("https://idp.example.com/token#x"),
            )],
            &[TOKEN_ENDPOINT],
        ),
        bad(
            "tokenEndpoint not a URL",
            &[set("spec/tokenEndpoint", json!("/connect/token"))],
            &[TOKEN_ENDPOINT],
        ),
        bad(
            "rateLimit 0",
            &[set(
                "spec/rateLimit",
                json!({"requestsPerSecond": 0, "burst": 1}),
            )],
            &[RATE],
        ),
        bad(
            "rateLimit 0.0",
            &[set("spec/rateLimit", json!({"requestsPerSecond": 0.0}))],
            &[RATE],
        ),
        bad(
            "rateLimit negative",
            &[set("spec/rateLimit", json!({"requestsPerSecond": -1.5}))],
            &[RATE],
        ),
        bad(
            "burst 0",
            &[set(
                "spec/rateLimit",
                json!({"requestsPerSecond": 5, "burst": 0}),
            )],
            &[BURST],
        ),
        bad(
            "signature check with tokenEndpoint only",
            &[
                unset("spec/issuerURL"),
                set("spec/verifyAccessTokenSignature", json!(true)),
            ],
            &[VERIFY_NEEDS_KEYS],
        ),
        bad(
            "jwksURI with a fragment",
            &[set("spec/jwksURI", json!("https://idp.example.com/jwks#k"))],
            &[JWKS_URI],
        ),
        bad(
            "jwksURI not a URL",
            &[set("spec/jwksURI", json!("/jwks"))],
            &[JWKS_URI],
        ),
        bad(
            "jwksURI not http(s)",
            &[set("spec/jwksURI", json!("file:///etc/jwks.json"))],
            &[JWKS_URI],
        ),
    ] {
        cases.extend(batch);
    }
    cases
}

// ---------------------------------------------------------------------------------------------
// Running the cases

/// What a rule is, wherever it sits: the CRD, the schema path (`spec.clientAuth`, list items
/// as `[*]`), the rule text.
type RuleSite = (Kind, String, String);

fn normalize_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    let mut in_index = false;
    for c in path.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push_str("[*]");
            }
            ']' => in_index = false,
            _ if in_index => {}
            _ => out.push(c),
        }
    }
    out
}

/// Runs every case; returns the problems found and the rule sites that some case made fail
/// with their own message.
fn run_cases(cases: &[Case]) -> (Vec<String>, BTreeSet<RuleSite>) {
    let admission = Admission::new();
    let mut problems = Vec::new();
    let mut exercised = BTreeSet::new();
    for case in cases {
        let errors = admission.errors(case.kind, &case.object);
        for e in &errors {
            if e.kind != ErrorKind::ValidationFailure {
                problems.push(format!(
                    "{}: {:?} at {}: {}",
                    case.name, e.kind, e.field_path, e.message
                ));
            }
        }
        let got: BTreeSet<&str> = errors.iter().map(|e| e.message.as_str()).collect();
        let want: BTreeSet<&str> = case.rejected_with.iter().copied().collect();
        if got != want {
            let shown: Vec<String> = errors
                .iter()
                .map(|e| format!("{}: {}", e.field_path, e.message))
                .collect();
            problems.push(format!(
                "{}: expected {}, got {}",
                case.name,
                if want.is_empty() {
                    "no errors".to_string()
                } else {
                    format!("{want:?}")
                },
                if shown.is_empty() {
                    "no errors".to_string()
                } else {
                    format!("{shown:?}")
                },
            ));
        }
        for e in errors {
            if want.contains(e.message.as_str()) {
                exercised.insert((case.kind, normalize_path(&e.field_path), e.rule));
            }
        }
    }
    (problems, exercised)
}

#[test]
fn known_good_objects_and_variants_pass() {
    let (problems, _) = run_cases(&valid_cases());
    assert!(
        problems.is_empty(),
        "valid objects were rejected:\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn bad_objects_fail_with_their_rules_message() {
    let (problems, _) = run_cases(&invalid_cases());
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
}

/// Every rule in the schemas, with its message.
fn rule_sites() -> BTreeMap<RuleSite, String> {
    fn walk(kind: Kind, node: &Value, path: &str, out: &mut BTreeMap<RuleSite, String>) {
        for rule in node
            .get("x-kubernetes-validations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let text = rule["rule"].as_str().unwrap().to_string();
            let message = rule
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            out.insert((kind, path.to_string(), text), message);
        }
        for (name, child) in node
            .get("properties")
            .and_then(Value::as_object)
            .into_iter()
            .flatten()
        {
            let child_path = if path.is_empty() {
                name.clone()
            } else {
                format!("{path}.{name}")
            };
            walk(kind, child, &child_path, out);
        }
        if let Some(items) = node.get("items") {
            walk(kind, items, &format!("{path}[*]"), out);
        }
        if let Some(additional) = node.get("additionalProperties").filter(|a| a.is_object()) {
            walk(kind, additional, &format!("{path}.*"), out);
        }
    }
    let mut out = BTreeMap::new();
    for kind in KINDS {
        walk(kind, &schema(kind), "", &mut out);
    }
    out
}

#[test]
fn every_rule_is_exercised_by_a_failing_case() {
    let sites = rule_sites();
    assert!(
        sites.len() > 20,
        "found only {} rules; is the walk broken?",
        sites.len()
    );
    let (_, exercised) = run_cases(&invalid_cases());
    let missing: Vec<String> = sites
        .iter()
        .filter(|(site, _)| !exercised.contains(*site))
        .map(|((kind, path, rule), message)| {
            format!("{}: {path}: `{rule}` ({message})", kind.name())
        })
        .collect();
    assert!(
        missing.is_empty(),
        "rules without a failing case in tests/crd_cel.rs (add one to invalid_cases()):\n  {}",
        missing.join("\n  ")
    );
    // And no case asserts a message that no rule has (a renamed message would otherwise
    // leave a case that can never pass, which the case test reports, but say why here).
    let messages: BTreeSet<&str> = sites.values().map(String::as_str).collect();
    for case in invalid_cases() {
        for m in &case.rejected_with {
            assert!(
                messages.contains(m),
                "{}: no rule has the message {m:?}",
                case.name
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Compilation, cost, defaults

/// Calls `f` for every schema node that carries rules, with its path and compiled form.
fn for_each_rule_node<'a>(
    node: &'a Value,
    compiled: &CompiledSchema,
    path: &str,
    cardinality: u64,
    f: &mut dyn FnMut(&'a Value, &CompiledSchema, &str, u64),
) {
    if node.get("x-kubernetes-validations").is_some() {
        f(node, compiled, path, cardinality);
    }
    for (name, child) in node
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        let child_path = if path.is_empty() {
            name.clone()
        } else {
            format!("{path}.{name}")
        };
        for_each_rule_node(
            child,
            &compiled.properties[name],
            &child_path,
            cardinality,
            f,
        );
    }
    if let (Some(items), Some(compiled_items)) = (node.get("items"), &compiled.items) {
        let n = max_items(node);
        for_each_rule_node(
            items,
            compiled_items,
            &format!("{path}[*]"),
            cardinality.saturating_mul(n),
            f,
        );
    }
    if let (Some(additional), Some(compiled_additional)) = (
        node.get("additionalProperties").filter(|a| a.is_object()),
        &compiled.additional_properties,
    ) {
        let n = node
            .get("maxProperties")
            .and_then(Value::as_u64)
            .unwrap_or(UNBOUNDED);
        for_each_rule_node(
            additional,
            compiled_additional,
            &format!("{path}.*"),
            cardinality.saturating_mul(n),
            f,
        );
    }
}

/// The variables that comprehension macros (`all`, `exists`, `map`, …) bind in `expr`.
fn comprehension_variables(expr: &Expr, out: &mut Vec<String>) {
    match expr {
        Expr::Comprehension(comp) => {
            out.push(comp.iter_var.clone());
            out.extend(comp.iter_var2.clone());
            out.push(comp.accu_var.clone());
            for e in [
                &comp.iter_range,
                &comp.accu_init,
                &comp.loop_cond,
                &comp.loop_step,
                &comp.result,
            ] {
                comprehension_variables(&e.expr, out);
            }
        }
        Expr::Call(call) => {
            if let Some(t) = &call.target {
                comprehension_variables(&t.expr, out);
            }
            for a in &call.args {
                comprehension_variables(&a.expr, out);
            }
        }
        Expr::Select(select) => comprehension_variables(&select.operand.expr, out),
        Expr::List(list) => list
            .elements
            .iter()
            .for_each(|e| comprehension_variables(&e.expr, out)),
        _ => {}
    }
}

#[test]
fn every_rule_compiles_in_crd_scope() {
    let mut problems = Vec::new();
    for kind in KINDS {
        let schema = schema(kind);
        let compiled = compile_schema(&schema);
        for_each_rule_node(&schema, &compiled, "", 1, &mut |node, compiled, path, _| {
            for e in compiled.compilation_errors() {
                problems.push(format!("{}: {path}: {e}", kind.name()));
            }
            for rule in node["x-kubernetes-validations"].as_array().unwrap() {
                let rule = rule["rule"].as_str().unwrap();
                let program = match kube_cel::cel::Program::compile(rule) {
                    Ok(p) => p,
                    Err(e) => {
                        problems.push(format!(
                            "{}: {path}: `{rule}` does not compile: {e}",
                            kind.name()
                        ));
                        continue;
                    }
                };
                let mut bound = Vec::new();
                comprehension_variables(&program.expression().expr, &mut bound);
                for w in analyze_rule(rule, compiled, ScopeContext::CrdValidation) {
                    // kube-cel's scope check does not know the variables that macros such as
                    // `all(s, …)` bind; those are fine.
                    let is_bound = w.kind == WarningKind::WrongScope
                        && bound
                            .iter()
                            .any(|v| w.message.starts_with(&format!("variable '{v}' ")));
                    if !is_bound {
                        problems.push(format!(
                            "{}: {path}: `{rule}`: {:?}: {}",
                            kind.name(),
                            w.kind,
                            w.message
                        ));
                    }
                }
            }
        });
    }
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
}

/// The API server refuses a CRD whose `default` values break the rules at their node
/// (apiextensions `defaulting.ValidateDefaults` runs the CEL validator on each default).
#[test]
fn schema_defaults_satisfy_the_rules() {
    let validator = Validator::new();
    let mut problems = Vec::new();
    for kind in KINDS {
        default_problems(&schema(kind), kind.name(), &validator, &mut problems);
    }
    assert!(
        problems.is_empty(),
        "defaults the API server would refuse:\n  {}",
        problems.join("\n  ")
    );
}

/// Each `default` in `node`'s tree, validated against the rules of the node it sits on and
/// below, as the API server does when the CRD is created.
fn default_problems(node: &Value, path: &str, validator: &Validator, problems: &mut Vec<String>) {
    if let Some(default) = node.get("default") {
        let compiled = compile_schema(node);
        if let Err(errors) = validator.validate_compiled(&compiled, default, None) {
            for e in errors {
                problems.push(format!(
                    "{path}: default {default}: {}: {}",
                    e.field_path, e.message
                ));
            }
        }
    }
    for (name, child) in node
        .get("properties")
        .and_then(Value::as_object)
        .into_iter()
        .flatten()
    {
        default_problems(child, &format!("{path}.{name}"), validator, problems);
    }
    if let Some(items) = node.get("items") {
        default_problems(items, &format!("{path}[*]"), validator, problems);
    }
}

#[test]
fn the_default_check_catches_a_default_that_breaks_its_rule() {
    // What `clientAuth` looked like before: `{method: ClientSecretBasic}` as the default of
    // an object whose rule demands clientSecretRef with that method.
    let schema = json!({
        "type": "object",
        "properties": {
            "clientAuth": {
                "type": "object",
                "default": {"method": "ClientSecretBasic"},
                "properties": {
                    "method": {"type": "string", "default": "ClientSecretBasic"},
                    "clientSecretRef": {"type": "object"}
                },
                "x-kubernetes-validations": [{
                    "rule": "self.method != 'ClientSecretBasic' || has(self.clientSecretRef)",
                    "message": "ClientSecretBasic needs clientSecretRef"
                }]
            }
        }
    });
    let mut problems = Vec::new();
    default_problems(&schema, "T.spec", &Validator::new(), &mut problems);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        problems[0].contains("ClientSecretBasic needs clientSecretRef"),
        "{problems:?}"
    );
}

// The API server's static cost estimate, approximated. kube-cel's `estimate_rule_cost` is a
// coarse heuristic (it assumes 1000-character strings everywhere), so this follows the
// Kubernetes CEL cost model (k8s.io/apiserver/pkg/cel/library/cost.go) for the functions the
// rules use: strings without maxLength and lists without maxItems are as large as a request
// allows, `matches` costs (length × 0.1) × (regex length × 0.25), comprehensions multiply by
// the list size, and rules under a list run once per item.

/// Largest request the API server accepts: the size of an unbounded string or list.
const UNBOUNDED: u64 = 3 * 1024 * 1024;
/// `StaticEstimatedCostLimit`: the most one rule may cost.
const RULE_COST_LIMIT: u64 = 10_000_000;
/// `StaticEstimatedCRDCostLimit`: the most all rules of one CRD may cost together.
const CRD_COST_LIMIT: u64 = 100_000_000;

fn max_items(node: &Value) -> u64 {
    node.get("maxItems")
        .and_then(Value::as_u64)
        .unwrap_or(UNBOUNDED)
}

fn max_length(node: Option<&Value>) -> u64 {
    let Some(node) = node else { return UNBOUNDED };
    if let Some(n) = node.get("maxLength").and_then(Value::as_u64) {
        return n;
    }
    if let Some(values) = node.get("enum").and_then(Value::as_array) {
        return values
            .iter()
            .filter_map(Value::as_str)
            .map(|s| s.len() as u64)
            .max()
            .unwrap_or(0);
    }
    match node.get("format").and_then(Value::as_str) {
        Some("date-time") => 32,
        Some("int32" | "int64" | "double") => 8,
        _ => match node.get("type").and_then(Value::as_str) {
            Some("integer" | "number" | "boolean") => 8,
            _ => UNBOUNDED,
        },
    }
}

fn factor(n: u64, f: f64) -> u64 {
    (n as f64 * f).ceil() as u64
}

/// (cost, schema of the result if it is a schema node, length of a string literal).
fn estimate<'a>(
    expr: &Expr,
    env: &HashMap<String, &'a Value>,
) -> (u64, Option<&'a Value>, Option<u64>) {
    match expr {
        Expr::Ident(name) => (1, env.get(name).copied(), None),
        Expr::Select(select) => {
            let (cost, node, _) = estimate(&select.operand.expr, env);
            let child = node
                .and_then(|n| n.get("properties"))
                .and_then(|p| p.get(&select.field));
            (cost + 1, if select.test { None } else { child }, None)
        }
        Expr::Literal(LiteralValue::String(s)) => (0, None, Some(s.inner().len() as u64)),
        Expr::Literal(_) => (0, None, None),
        Expr::List(list) => (
            1 + list
                .elements
                .iter()
                .map(|e| estimate(&e.expr, env).0)
                .sum::<u64>(),
            None,
            None,
        ),
        Expr::Call(call) => {
            let target = call.target.as_ref().map(|t| estimate(&t.expr, env));
            let args: Vec<_> = call.args.iter().map(|a| estimate(&a.expr, env)).collect();
            let mut cost = target.map_or(0, |t| t.0) + args.iter().map(|a| a.0).sum::<u64>();
            let target_len = || max_length(target.and_then(|t| t.1));
            let arg_len = |i: usize| {
                args.get(i)
                    .map_or(UNBOUNDED, |a| a.2.unwrap_or_else(|| max_length(a.1)))
            };
            cost += match call.func_name.as_str() {
                "matches" => factor(target_len(), 0.1).max(1) * factor(arg_len(0), 0.25).max(1),
                "contains" | "startsWith" | "endsWith" => {
                    factor(target_len() + arg_len(0), 0.1).max(1)
                }
                "_==_" | "_!=_" => {
                    // Comparing strings traverses the shorter one; anything else is constant.
                    let string_len = |a: &(u64, Option<&Value>, Option<u64>)| match (a.1, a.2) {
                        (_, Some(literal)) => literal,
                        (Some(node), None) if node.get("type") == Some(&json!("string")) => {
                            max_length(Some(node))
                        }
                        _ => 0,
                    };
                    1 + factor(args.iter().map(string_len).min().unwrap_or(0), 0.1)
                }
                _ => 1,
            };
            (cost, None, None)
        }
        Expr::Comprehension(comp) => {
            let (range_cost, range, _) = estimate(&comp.iter_range.expr, env);
            let n = range.map_or(UNBOUNDED, max_items);
            let mut inner = env.clone();
            match range.and_then(|r| r.get("items")) {
                Some(items) => inner.insert(comp.iter_var.clone(), items),
                None => inner.remove(&comp.iter_var),
            };
            inner.remove(&comp.accu_var);
            let step =
                estimate(&comp.loop_step.expr, &inner).0 + estimate(&comp.loop_cond.expr, &inner).0;
            let rest =
                estimate(&comp.accu_init.expr, env).0 + estimate(&comp.result.expr, &inner).0;
            (
                range_cost + n.saturating_mul(step.max(1)) + rest,
                None,
                None,
            )
        }
        _ => (1, None, None),
    }
}

fn rule_cost(rule: &str, node: &Value) -> u64 {
    let program = kube_cel::cel::Program::compile(rule).unwrap_or_else(|e| panic!("`{rule}`: {e}"));
    let env = HashMap::from([("self".to_string(), node)]);
    estimate(&program.expression().expr, &env).0
}

#[test]
fn rules_fit_the_api_servers_cost_budget() {
    let mut problems = Vec::new();
    for kind in KINDS {
        let schema = schema(kind);
        let compiled = compile_schema(&schema);
        let mut total: u64 = 0;
        for_each_rule_node(
            &schema,
            &compiled,
            "",
            1,
            &mut |node, _, path, cardinality| {
                for rule in node["x-kubernetes-validations"].as_array().unwrap() {
                    let rule = rule["rule"].as_str().unwrap();
                    let cost = rule_cost(rule, node);
                    if cost > RULE_COST_LIMIT {
                        problems.push(format!(
                        "{}: {path}: `{rule}` costs about {cost} > {RULE_COST_LIMIT}; bound the strings/lists it reads (maxLength, maxItems)",
                        kind.name()
                    ));
                    }
                    total = total.saturating_add(cost.saturating_mul(cardinality));
                }
            },
        );
        println!("{}: estimated total rule cost {total}", kind.name());
        if total > CRD_COST_LIMIT {
            problems.push(format!(
                "{}: total rule cost about {total} > {CRD_COST_LIMIT}",
                kind.name()
            ));
        }
    }
    assert!(problems.is_empty(), "\n  {}", problems.join("\n  "));
}

#[test]
fn the_cost_estimate_flags_unbounded_regex_matching() {
    // Without maxLength on the items, this is what the API server refuses.
    let unbounded = json!({"type": "array", "maxItems": 64, "items": {"type": "string"}});
    let bounded =
        json!({"type": "array", "maxItems": 64, "items": {"type": "string", "maxLength": 256}});
    let rule = "self.all(s, s.matches('^[!#-\\\\[\\\\]-~]+$'))";
    assert!(rule_cost(rule, &unbounded) > RULE_COST_LIMIT);
    assert!(rule_cost(rule, &bounded) < 100_000);
    let string = json!({"type": "string"});
    assert!(rule_cost("self.matches('^[a-z]+$')", &string) > 300_000);
    assert!(rule_cost("size(self) > 0", &string) < 10);
}

// ---------------------------------------------------------------------------------------------
// The manifests users copy

/// Problems of `value` against a structural `schema`, the way the API server would prune and
/// refuse: unknown fields, missing required ones, values outside an `enum`, wrong types.
fn schema_problems(value: &Value, schema: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        out.push(format!("{path}: {value} is not one of {allowed:?}"));
    }
    let type_ok = match (schema["type"].as_str(), value) {
        (Some("object"), Value::Object(_))
        | (Some("array"), Value::Array(_))
        | (Some("string"), Value::String(_))
        | (Some("boolean"), Value::Bool(_))
        | (None, _) => true,
        (Some("integer"), Value::Number(n)) => n.is_i64() || n.is_u64(),
        (Some("number"), Value::Number(_)) => true,
        _ => schema["x-kubernetes-int-or-string"] == json!(true),
    };
    if !type_ok {
        out.push(format!("{path}: {value} is not of type {}", schema["type"]));
        return;
    }
    match value {
        Value::Object(fields) => {
            if let Some(required) = schema["required"].as_array() {
                for name in required.iter().filter_map(Value::as_str) {
                    if !fields.contains_key(name) {
                        out.push(format!("{path}: missing required field {name}"));
                    }
                }
            }
            let properties = schema["properties"].as_object();
            for (name, field) in fields {
                let field_path = format!("{path}.{name}");
                match properties.and_then(|p| p.get(name)) {
                    Some(field_schema) => schema_problems(field, field_schema, &field_path, out),
                    None if schema["additionalProperties"].is_object() => {
                        schema_problems(field, &schema["additionalProperties"], &field_path, out)
                    }
                    None if schema["x-kubernetes-preserve-unknown-fields"] == json!(true)
                        || path.is_empty()
                            && ["apiVersion", "kind", "metadata"].contains(&name.as_str()) => {}
                    None => out.push(format!("{field_path}: unknown field")),
                }
            }
        }
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                schema_problems(item, &schema["items"], &format!("{path}[{i}]"), out);
            }
        }
        _ => {}
    }
}

#[test]
fn the_schema_check_catches_typos() {
    let mut object = good(Kind::TokenIssuer);
    object["spec"]["tlsClientCertificat"] = json!({"secretRef": {"name": "c"}});
    object["spec"]["clientAuth"]["method"] = json!("TlsClientAuth");
    let mut problems = Vec::new();
    schema_problems(&object, &schema(Kind::TokenIssuer), "", &mut problems);
    assert_eq!(problems.len(), 2, "{problems:?}");
}

/// Every AudienceToken, TokenIssuer and ClusterTokenIssuer under `examples/` (and the
/// chart's) is accepted as it is: known fields and enum values only, and every CEL rule
/// passes. Examples are what users copy; they must not rot when the API moves.
#[test]
fn every_example_passes_admission() {
    let admission = Admission::new();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples");
    let mut files = Vec::new();
    let mut dirs = vec![root];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).expect("read examples") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                files.push(path);
            }
        }
    }
    let mut checked = BTreeMap::<&str, usize>::new();
    let mut problems = Vec::new();
    for file in &files {
        let text = std::fs::read_to_string(file).expect("read example");
        for document in serde_yaml::Deserializer::from_str(&text) {
            let object: Value = serde::Deserialize::deserialize(document)
                .unwrap_or_else(|e| panic!("{}: not YAML: {e}", file.display()));
            let api_version = object["apiVersion"].as_str().unwrap_or_default();
            if !api_version.starts_with("audiencetoken.io/") {
                continue;
            }
            let Some(kind) = KINDS
                .into_iter()
                .find(|k| object["kind"].as_str() == Some(k.name()))
            else {
                problems.push(format!(
                    "{}: unknown kind {}",
                    file.display(),
                    object["kind"]
                ));
                continue;
            };
            *checked.entry(kind.name()).or_default() += 1;
            let name = format!("{} {}", file.display(), object["metadata"]["name"]);
            let mut found = Vec::new();
            schema_problems(&object, &schema(kind), "", &mut found);
            problems.extend(found.into_iter().map(|p| format!("{name}: {p}")));
            for e in admission.errors(kind, &object) {
                problems.push(format!("{name}: {} {}", e.field_path, e.message));
            }
        }
    }
    assert!(
        problems.is_empty(),
        "examples refused:\n{}",
        problems.join("\n")
    );
    assert!(
        checked.get("AudienceToken") >= Some(&5) && checked.get("TokenIssuer") >= Some(&5),
        "too few examples found: {checked:?}"
    );
}
