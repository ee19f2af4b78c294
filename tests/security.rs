//! Security properties of the running operator, checked on the real binary against the
//! in-process Kubernetes API double and the real test OAuth server:
//!
//! - nothing secret leaks: after the integration flows, no access token, refresh token,
//!   client assertion, client secret, private key or ServiceAccount token the OAuth server
//!   saw (or the API double minted) appears in the
//!   operator's logs (text and JSON, `audience_token_operator=debug`), in any Event, in any
//!   AudienceToken, TokenIssuer or ClusterTokenIssuer, in Secrets' metadata, or in `/metrics`;
//! - RBAC: every request the operator makes is allowed by `rbac::required_rules`, and every
//!   verb of every rule is used.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use audience_token_operator::api::{AudienceToken, ClusterTokenIssuer, TokenIssuer};
use audience_token_operator::rbac::{self, Rule, Scope};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use kube::api::{Api, PostParams};
use serde_json::{Value, json};

use support::harness::{self, Harness, OPERATOR_TOKEN};
use support::kube_double::{KubeApiDouble, RequestRecord, ResourceKey};
use support::oidc::{self, OidcServer, SecretsSeen};
use support::operator::Options;
use support::scenarios::{
    READY_TIMEOUT, dpop, eventually, failures, lifecycle, mtls, private_key_jwt, refresh_chain,
    secretless, signature,
};

async fn start(namespace: &str, options: Options) -> Harness {
    harness::start(namespace, options).await
}

fn core_events() -> ResourceKey {
    ResourceKey::custom("", "v1", "events", "Event", true)
}

// ---- Test 1: nothing secret leaks -----------------------------------------------------------

/// What kind of secret a value is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    AccessToken,
    RefreshToken,
    ClientAssertion,
    ClientSecret,
    /// A client secret as sent in an HTTP Basic header (`base64(id:secret)`).
    BasicCredentials,
    PrivateKey,
    /// A ServiceAccount token minted through the TokenRequest API (a client assertion or a
    /// token exchange's subject token).
    ServiceAccountToken,
}

/// One secret value and the forms it could leak in.
struct Sensitive {
    kind: Kind,
    /// Its position among the values of its kind (to name it without showing it).
    index: usize,
    /// (form name, text); only forms long enough not to match by chance.
    forms: Vec<(&'static str, String)>,
}

/// Forms shorter than this are not searched (they could occur by chance).
const MIN_FORM_LEN: usize = 8;

/// The forms a value could leak in: as is, base64 (a Secret's `data`, a header),
/// form-urlencoded (a request body), a byte-array `Debug` (`ByteString([..])`), and for a
/// JWT its signature alone (which is what makes a token usable).
fn forms(value: &str) -> Vec<(&'static str, String)> {
    let mut forms = vec![
        ("raw", value.to_string()),
        (
            "base64",
            STANDARD.encode(value).trim_end_matches('=').to_string(),
        ),
        ("base64url", URL_SAFE_NO_PAD.encode(value)),
        (
            "form-urlencoded",
            url::form_urlencoded::byte_serialize(value.as_bytes()).collect(),
        ),
        ("byte array", format!("{:?}", value.as_bytes())),
    ];
    let parts: Vec<&str> = value.split('.').collect();
    if parts.len() == 3 && parts[2].len() >= 16 {
        forms.push(("JWT signature", parts[2].to_string()));
    }
    forms.retain(|(_, f)| f.len() >= MIN_FORM_LEN);
    let mut seen = BTreeSet::new();
    forms.retain(|(_, f)| seen.insert(f.clone()));
    forms
}

/// Every secret value of the run: what the OAuth server recorded, the test clients'
/// secrets (and Basic credentials), and the private keys of the private_key_jwt clients.
async fn sensitive_values(idp: &OidcServer, seen: &SecretsSeen) -> Vec<Sensitive> {
    let mut values: Vec<(Kind, String)> = Vec::new();
    for (kind, recorded) in [
        (Kind::AccessToken, &seen.access_tokens),
        (Kind::RefreshToken, &seen.refresh_tokens),
        (Kind::ClientAssertion, &seen.client_assertions),
        (Kind::ClientSecret, &seen.client_secrets),
        (Kind::ServiceAccountToken, &seen.service_account_tokens),
    ] {
        values.extend(recorded.iter().map(|v| (kind, v.clone())));
    }
    let encode = |s: &str| url::form_urlencoded::byte_serialize(s.as_bytes()).collect::<String>();
    for client in [
        oidc::M2M_BASIC,
        oidc::M2M_POST,
        oidc::M2M_SPECIAL,
        oidc::M2M_REFRESH,
        oidc::M2M_DPOP,
    ] {
        values.push((Kind::ClientSecret, client.secret.to_string()));
        let basic = format!("{}:{}", encode(client.id), encode(client.secret));
        values.push((Kind::BasicCredentials, STANDARD.encode(basic)));
    }
    for client in [
        oidc::M2M_JWT_RS256,
        oidc::M2M_JWT_ES256,
        oidc::M2M_JWT_PS256,
        oidc::M2M_JWT_ES384,
    ] {
        let key = idp.client_private_key(client.id).await;
        // Every full line of the PEM body, and the private parts of the JWK.
        values.extend(
            (key.pem.lines())
                .filter(|l| !l.starts_with("-----") && l.len() >= 32)
                .map(|l| (Kind::PrivateKey, l.to_string())),
        );
        for part in ["d", "p", "q", "dp", "dq", "qi"] {
            if let Some(v) = key.jwk[part].as_str() {
                values.push((Kind::PrivateKey, v.to_string()));
            }
        }
    }
    // The unreadable "key" of `private_key_jwt::private_key_jwt`: its content is never shown.
    values.push((Kind::PrivateKey, "not a key at all".to_string()));

    let mut counters = std::collections::BTreeMap::<Kind, usize>::new();
    let mut unique = BTreeSet::new();
    values
        .into_iter()
        .filter(|(kind, v)| !v.is_empty() && unique.insert((*kind, v.clone())))
        .map(|(kind, value)| {
            let index = counters.entry(kind).or_default();
            *index += 1;
            Sensitive {
                kind,
                index: *index,
                forms: forms(&value),
            }
        })
        .collect()
}

/// One place that was searched: a name and its text.
struct Place {
    name: String,
    text: String,
}

/// Everything the operator made visible to people who may not read Secrets' data: its
/// logs, Events, the custom resources (status included), Secrets' metadata, `/metrics`.
async fn observable_places(h: &Harness) -> Vec<Place> {
    let mut places = vec![Place {
        name: "operator log".into(),
        text: h.operator.logs(),
    }];
    let (status, metrics) = h.operator.http_get("/metrics").await;
    assert_eq!(status, 200, "GET /metrics");
    places.push(Place {
        name: "/metrics".into(),
        text: metrics,
    });
    let object_name = |obj: &Value| {
        format!(
            "{}/{}",
            obj["metadata"]["namespace"].as_str().unwrap_or("-"),
            obj["metadata"]["name"].as_str().unwrap_or("?")
        )
    };
    for (label, key) in [
        ("Event (events.k8s.io)", ResourceKey::events()),
        ("Event (core)", core_events()),
        ("AudienceToken", ResourceKey::of::<AudienceToken>(true)),
        ("TokenIssuer", ResourceKey::of::<TokenIssuer>(true)),
        (
            "ClusterTokenIssuer",
            ResourceKey::of::<ClusterTokenIssuer>(false),
        ),
    ] {
        for obj in h.double.list(&key, None) {
            places.push(Place {
                name: format!("{label} {}", object_name(&obj)),
                text: serde_json::to_string_pretty(&obj).expect("JSON"),
            });
        }
    }
    for secret in h.double.list(&ResourceKey::secrets(), None) {
        places.push(Place {
            name: format!("metadata of Secret {}", object_name(&secret)),
            text: serde_json::to_string_pretty(&secret["metadata"]).expect("JSON"),
        });
    }
    places
}

/// Where a form of a sensitive value occurs: one report per value and line of a place,
/// naming the kind, the value's index, the form, the place and line, and the text before the
/// hit with every known secret masked. Never the value itself.
fn find_leaks(values: &[Sensitive], places: &[Place]) -> Vec<String> {
    let mask = |text: &str| {
        let mut masked = text.to_string();
        for value in values {
            for (_, form) in &value.forms {
                masked = masked.replace(form.as_str(), "[SECRET]");
            }
        }
        masked
    };
    let mut leaks = Vec::new();
    for place in places {
        for (line_number, line) in place.text.lines().enumerate() {
            for value in values {
                // One report per value and line: the first form found (`raw` first).
                let hit = (value.forms.iter())
                    .find_map(|(form, text)| line.find(text.as_str()).map(|at| (form, text, at)));
                if let Some((form, text, at)) = hit {
                    let before: String = mask(&line[..at]).chars().rev().take(120).collect();
                    let before: String = before.chars().rev().collect();
                    leaks.push(format!(
                        "{:?} #{} ({form}, {} chars) in {}, line {}, after: {before:?}",
                        value.kind,
                        value.index,
                        text.len(),
                        place.name,
                        line_number + 1,
                    ));
                }
            }
        }
    }
    leaks
}

/// The values of `key` in the stored Secrets' `data` that have it, decoded.
fn secret_data_values(double: &KubeApiDouble, key: &str) -> Vec<String> {
    double
        .list(&ResourceKey::secrets(), None)
        .iter()
        .filter_map(|s| s["data"][key].as_str())
        .filter_map(|b64| STANDARD.decode(b64).ok())
        .filter_map(|bytes| String::from_utf8(bytes).ok())
        .collect()
}

/// Collects every secret value the OAuth server saw and every place the operator writes to
/// that is not a Secret's data, and asserts that no secret is in any of them. Positive
/// controls first: the kinds in `exercised` were seen, the collection finds the access
/// tokens in the token Secrets (so a leak would be found), there are logs and Events.
async fn assert_nothing_leaks(h: Harness, exercised: &[Kind], client_secrets_used: &[&str]) {
    let seen = h.env.idp.secrets_seen().await;
    for kind in exercised {
        let count = match kind {
            Kind::AccessToken => seen.access_tokens.len(),
            Kind::RefreshToken => seen.refresh_tokens.len(),
            Kind::ClientAssertion => seen.client_assertions.len(),
            Kind::ClientSecret => seen.client_secrets.len(),
            Kind::ServiceAccountToken => seen.service_account_tokens.len(),
            Kind::BasicCredentials | Kind::PrivateKey => continue,
        };
        assert!(count > 0, "the OAuth server recorded no {kind:?}");
    }
    for (i, secret) in client_secrets_used.iter().enumerate() {
        assert!(
            seen.client_secrets.iter().any(|s| s == secret),
            "the OAuth server did not record client secret #{} of the flows",
            i + 1
        );
    }
    let mut values = sensitive_values(&h.env.idp, &seen).await;
    // DPoP private keys the operator made: the private members of each, as written into the
    // token Secrets' data (the only place they may be).
    let dpop_keys = secret_data_values(&h.double, "dpop-private-key");
    for (index, jwk) in dpop_keys.iter().enumerate() {
        let jwk: serde_json::Value = serde_json::from_str(jwk).expect("a DPoP JWK");
        for part in ["d", "p", "q", "dp", "dq", "qi"] {
            if let Some(v) = jwk[part].as_str() {
                values.push(Sensitive {
                    kind: Kind::PrivateKey,
                    index: 1000 + index,
                    forms: forms(v),
                });
            }
        }
    }
    // Every ServiceAccount token the double minted, also those never sent to the server.
    for (index, token) in h.double.minted_tokens().iter().enumerate() {
        values.push(Sensitive {
            kind: Kind::ServiceAccountToken,
            index: 3000 + index,
            forms: forms(token),
        });
    }
    // Client certificates' private keys (RFC 8705), as the tests wrote them into
    // kubernetes.io/tls Secrets: every full line of each PEM body.
    let tls_keys = secret_data_values(&h.double, "tls.key");
    for (index, pem) in tls_keys.iter().enumerate() {
        for (line_no, line) in pem
            .lines()
            .filter(|l| !l.starts_with("-----") && l.len() >= 32)
            .enumerate()
        {
            values.push(Sensitive {
                kind: Kind::PrivateKey,
                index: 2000 + 10 * index + line_no,
                forms: forms(line),
            });
        }
    }

    // Positive controls: the recorded access tokens are the ones in the token Secrets, and
    // the search finds them there, in the form the API serves them (base64 `data`).
    let in_secrets = secret_data_values(&h.double, "token");
    assert!(
        in_secrets
            .iter()
            .any(|t| seen.access_tokens.iter().any(|s| s == t)),
        "no recorded access token is in a token Secret's data.token ({} token Secrets, {} tokens recorded)",
        in_secrets.len(),
        seen.access_tokens.len()
    );
    let token_secrets: Vec<Place> = h
        .double
        .list(&ResourceKey::secrets(), None)
        .into_iter()
        .filter(|s| s["data"]["token"].is_string())
        .map(|s| Place {
            name: format!("Secret {}", s["metadata"]["name"]),
            text: serde_json::to_string_pretty(&s).expect("JSON"),
        })
        .collect();
    assert!(
        find_leaks(&values, &token_secrets)
            .iter()
            .any(|l| l.starts_with("AccessToken") && l.contains("(base64,")),
        "the search does not find the access tokens in the token Secrets"
    );
    if exercised.contains(&Kind::RefreshToken) {
        let state = secret_data_values(&h.double, "refresh-token");
        assert!(
            state
                .iter()
                .any(|t| seen.refresh_tokens.iter().any(|s| s == t)),
            "no recorded refresh token is in a refresh-token Secret"
        );
    }

    let places = observable_places(&h).await;
    let log = &places[0].text;
    assert!(
        log.contains("published token"),
        "the operator log is empty or says nothing about publishing ({} bytes)",
        log.len()
    );
    let events: Vec<&Place> = places
        .iter()
        .filter(|p| p.name.starts_with("Event"))
        .collect();
    assert!(
        events
            .iter()
            .any(|p| p.text.contains(r#""reason": "Issued""#)),
        "no Issued Event among {} Events",
        events.len()
    );
    assert!(
        places
            .iter()
            .any(|p| p.name.starts_with("AudienceToken") && p.text.contains(r#""status""#)),
        "no AudienceToken with a status"
    );
    assert!(
        places[1].text.contains("audience_token"),
        "/metrics has no operator metrics"
    );

    let leaks = find_leaks(&values, &places);
    // The harness prints the operator's log when a test fails: not for a leak, whose values
    // the log would show. The report says where to look.
    drop(h);
    assert!(
        leaks.is_empty(),
        "{} secret value(s) leaked ({} values in {} forms searched in {} places):\n{}",
        leaks.len(),
        values.len(),
        values.iter().map(|v| v.forms.len()).sum::<usize>(),
        places.len(),
        leaks.join("\n")
    );
    eprintln!(
        "searched {} secret values ({} access tokens, {} refresh tokens, {} assertions, {} client secrets) in {} places: no leak",
        values.len(),
        seen.access_tokens.len(),
        seen.refresh_tokens.len(),
        seen.client_assertions.len(),
        seen.client_secrets.len(),
        places.len()
    );
}

/// Client secrets (HTTP Basic and form post, a wrong one too), failures, forced renewals,
/// private_key_jwt assertions, the signature check and DPoP keys, with text logs.
#[tokio::test]
async fn no_secret_leaks_with_text_logs() {
    let mut h = start("leak-text", Options::default()).await;
    lifecycle::issues_one_token_per_audience(&h.env).await;
    lifecycle::forced_renewal(&h.env).await;
    failures::failures_reach_status_and_recover(&h.env).await;
    private_key_jwt::private_key_jwt(&h.env).await;
    signature::signature_check(&h.env).await;
    dpop::dpop_bound_tokens(&h.env, &mut h.operator).await;
    assert!(
        !secret_data_values(&h.double, "dpop-private-key").is_empty(),
        "DPoP keys were made, so a leak of one would be found"
    );
    assert_nothing_leaks(
        h,
        &[Kind::AccessToken, Kind::ClientAssertion, Kind::ClientSecret],
        &[
            oidc::M2M_BASIC.secret,
            oidc::M2M_POST.secret,
            "not-the-secret",
        ],
    )
    .await;
}

/// Secretless issuers: ServiceAccount tokens the double minted (as client assertions and
/// as subject tokens) never leave the token requests, also not in the NotReady messages of
/// a missing grant.
#[tokio::test]
async fn no_secret_leaks_with_service_account_tokens() {
    let (h, operator) = harness::start_secretless("leak-secretless").await;
    secretless::missing_grant_is_reported_then_fixed(&h.env, &operator).await;
    secretless::federated_client_credentials(&h.env, &operator).await;
    secretless::token_exchange(&h.env, &operator).await;
    assert!(
        h.double.minted_count() >= 3,
        "ServiceAccount tokens were minted, so a leak of one would be found"
    );
    assert_nothing_leaks(h, &[Kind::AccessToken, Kind::ServiceAccountToken], &[]).await;
}

/// Client certificates (RFC 8705): TLS client authentication, a renewal, a restart and
/// refused certificates; their private keys never leave their Secrets.
#[tokio::test]
async fn no_secret_leaks_with_mutual_tls() {
    let pki = support::certs::TestPki::generate();
    let self_signed = support::certs::self_signed("m2m-self-signed");
    let mut h = harness::start_mtls("leak-mtls", &pki, &self_signed).await;
    mtls::tls_client_auth_and_certificate_renewal(&h.env, &mut h.operator, &pki).await;
    mtls::self_signed_tls_client_auth(&h.env, &self_signed, &pki).await;
    mtls::certificate_problems_reach_status(&h.env, &self_signed, &pki).await;
    assert!(
        secret_data_values(&h.double, "tls.key").len() >= 2,
        "client certificate keys are in Secrets, so a leak of one would be found"
    );
    assert_nothing_leaks(h, &[Kind::AccessToken], &[]).await;
}

/// The refresh-token chain (rotations, restarts, a spent refresh token, a new bootstrap)
/// and renewals of a short-lived token with a form-post client secret, with JSON logs.
#[tokio::test]
async fn no_secret_leaks_with_json_logs() {
    let mut h = start(
        "leak-json",
        Options {
            json_logs: true,
            ..Options::default()
        },
    )
    .await;
    h.env
        .create_issuer("idp", &oidc::M2M_POST, oidc::M2M_POST.secret)
        .await;
    lifecycle::renews_before_expiry(&h.env).await;
    refresh_chain::refresh_token_chain(&h.env, &mut h.operator).await;
    assert!(
        h.operator.logs().lines().any(|l| l.starts_with('{')),
        "JSON logs"
    );
    assert_nothing_leaks(
        h,
        &[Kind::AccessToken, Kind::RefreshToken, Kind::ClientSecret],
        &[oidc::M2M_POST.secret, oidc::M2M_REFRESH.secret],
    )
    .await;
}

// ---- Test 2: RBAC ----------------------------------------------------------------------------

/// What one request needs: (namespace, or `None` cluster-wide; group; resource with
/// `/subresource`; verb).
type Need = (Option<String>, String, String, String);

fn need(r: &RequestRecord) -> Need {
    let resource = match &r.subresource {
        Some(sub) => format!("{}/{sub}", r.plural),
        None => r.plural.clone(),
    };
    (
        r.namespace.clone(),
        r.group.clone(),
        resource,
        r.verb.clone(),
    )
}

/// The operator's resource requests (non-resource paths such as `/version` left out).
fn operator_requests(double: &KubeApiDouble) -> Vec<RequestRecord> {
    double
        .requests()
        .into_iter()
        .filter(|r| r.bearer_token.as_deref() == Some(OPERATOR_TOKEN) && !r.plural.is_empty())
        .collect()
}

fn show(n: &(Option<String>, String, String, String)) -> String {
    let (ns, group, resource, verb) = n;
    let group = if group.is_empty() { "core" } else { group };
    format!(
        "{verb} {group}/{resource} in {}",
        ns.as_deref()
            .map_or("(cluster-wide)".to_string(), |n| format!("namespace {n}"))
    )
}

/// Every (namespace, group, resource, verb) of `rules` that no request in `needs` used. A
/// cluster-wide rule counts as used only by a cluster-wide request: in single-namespace mode
/// cluster-wide rules are for cluster-scoped resources only.
fn unused_grants(rules: &[Rule], needs: &BTreeSet<Need>) -> Vec<String> {
    let mut unused = Vec::new();
    for rule in rules {
        for verb in &rule.verbs {
            let used = needs.iter().any(|(ns, group, resource, v)| {
                group == rule.api_group
                    && resource == rule.resource
                    && v == verb
                    && rule.namespace.as_ref() == ns.as_ref()
            });
            if !used {
                unused.push(show(&(
                    rule.namespace.clone(),
                    rule.api_group.to_string(),
                    rule.resource.to_string(),
                    verb.to_string(),
                )));
            }
        }
    }
    unused
}

/// Every request of `needs` that `rules` do not allow.
fn denied_requests(rules: &[Rule], needs: &BTreeSet<Need>) -> Vec<String> {
    needs
        .iter()
        .filter(|(ns, group, resource, verb)| {
            !rbac::allows(rules, ns.as_deref(), group, resource, verb)
        })
        .map(show)
        .collect()
}

/// Runs one leader-elected operator in single-namespace mode through everything that needs a
/// permission (client-credentials and refresh-token issuers, a ClusterTokenIssuer with a
/// refresh-token chain, renewals that repeat Events), logging every API request it makes.
/// Every request must be allowed by `rbac::required_rules`, and every rule must be used.
#[tokio::test]
async fn rbac_rules_allow_every_request_and_every_rule_is_used() {
    let h = start(
        "rbac",
        Options {
            leader_elect: Some((Duration::from_secs(5), "op-a".into())),
            ..Options::default()
        },
    )
    .await;
    let env = &h.env;
    let ns = env.namespace.clone();
    let rules = rbac::required_rules(&Scope {
        watched: Some(ns.clone()),
        operator_namespace: "default".into(),
        cluster_resource_namespace: ns.clone(),
        leader_elect: true,
    });

    // Client credentials, a 6 s token: Issued, then Renewed again and again (the repeated
    // Renewed Event is patched: events create and patch in the namespace). Its Secret is
    // looked up with `get` before it exists (not in the cache); the client secret too.
    env.create_issuer("idp", &oidc::M2M_BASIC, oidc::M2M_BASIC.secret)
        .await;
    env.create_token("short", "idp", oidc::SHORT_LIVED, &["short/read"], None)
        .await;

    // A namespaced refresh-token chain: the state Secret is created, then replaced at each
    // rotation; RefreshTokenRotated repeats on the TokenIssuer.
    let resources = [oidc::SHORT_LIVED];
    let bootstrap = env
        .idp
        .mint_refresh_token(oidc::M2M_REFRESH.id, &resources, None)
        .await;
    env.put_bootstrap("chain-bootstrap", &bootstrap).await;
    env.create_refresh_issuer("chain", "chain-bootstrap", &resources)
        .await;
    env.create_token(
        "chain-short",
        "chain",
        oidc::SHORT_LIVED,
        &["short/read"],
        None,
    )
    .await;

    // A ClusterTokenIssuer (status patched; namespaces watched for allowedNamespaces) with
    // a refresh-token chain: its RefreshTokenRotated Events are about a cluster-scoped
    // object, so kube-runtime puts them in `default`, and repeats patch them there.
    let cluster_bootstrap = env
        .idp
        .mint_refresh_token(oidc::M2M_REFRESH.id, &resources, None)
        .await;
    env.put_bootstrap("cluster-chain-bootstrap", &cluster_bootstrap)
        .await;
    env.put_client_secret("cluster-chain-client", oidc::M2M_REFRESH.secret)
        .await;
    let cluster_issuer: ClusterTokenIssuer = serde_json::from_value(json!({
        "apiVersion": "audiencetoken.io/v1alpha1",
        "kind": "ClusterTokenIssuer",
        "metadata": {"name": "cluster-chain"},
        "spec": {
            "issuerURL": env.idp.issuer,
            "clientID": oidc::M2M_REFRESH.id,
            "clientAuth": {"method": "ClientSecretBasic", "clientSecretRef": {"name": "cluster-chain-client", "key": "client-secret"}},
            "grant": {
                "type": "RefreshToken",
                "refreshToken": {"bootstrapSecretRef": {"name": "cluster-chain-bootstrap", "key": "refresh-token"}, "resources": resources}
            },
            "allowedNamespaces": {"matchLabels": {"team": "test"}}
        }
    }))
    .expect("ClusterTokenIssuer");
    Api::<ClusterTokenIssuer>::all(env.client.clone())
        .create(&PostParams::default(), &cluster_issuer)
        .await
        .expect("create ClusterTokenIssuer");
    let cluster_token: AudienceToken = serde_json::from_value(json!({
        "apiVersion": "audiencetoken.io/v1alpha1",
        "kind": "AudienceToken",
        "metadata": {"name": "cluster-short"},
        "spec": {
            "issuerRef": {"name": "cluster-chain", "kind": "ClusterTokenIssuer"},
            "resource": oidc::SHORT_LIVED,
            "scopes": ["short/read"]
        }
    }))
    .expect("AudienceToken");
    env.tokens()
        .create(&PostParams::default(), &cluster_token)
        .await
        .expect("create AudienceToken");

    // Ready (Issued, or already Renewed: the 6 s tokens renew every few seconds).
    for name in ["short", "chain-short", "cluster-short"] {
        let tokens = env.tokens();
        eventually(
            &format!("AudienceToken {name} Ready"),
            READY_TIMEOUT,
            || {
                let tokens = tokens.clone();
                async move {
                    let token = tokens.get(name).await.map_err(|e| e.to_string())?;
                    let conditions = token.status.map(|s| s.conditions).unwrap_or_default();
                    match conditions.iter().find(|c| c.type_ == "Ready") {
                        Some(c) if c.status == "True" => Ok(()),
                        other => Err(format!("{other:?}")),
                    }
                }
            },
        )
        .await;
    }

    // Wait until every grant was used (or time out and report what was not).
    let all_used = || {
        let needs: BTreeSet<Need> = operator_requests(&h.double).iter().map(need).collect();
        unused_grants(&rules, &needs).is_empty()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(45);
    while !all_used() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let requests = operator_requests(&h.double);
    assert!(
        !requests.is_empty(),
        "no request carried the operator's bearer token: the kubeconfig token is not sent"
    );
    assert!(
        h.double
            .requests()
            .iter()
            .any(|r| r.bearer_token.is_none() && !r.plural.is_empty()),
        "the test's own requests are told apart (they carry no token)"
    );
    let needs: BTreeSet<Need> = requests.iter().map(need).collect();
    let denied = denied_requests(&rules, &needs);
    let unused = unused_grants(&rules, &needs);
    let used: Vec<String> = needs.iter().map(show).collect();
    assert!(
        denied.is_empty() && unused.is_empty(),
        "RBAC of rbac::required_rules does not match what the operator does.\n\
         Requests the rules do NOT allow (the operator would get 403):\n  {}\n\
         Grants never used in this run (not exercised, or not needed):\n  {}\n\
         What the operator did ({} requests, {} distinct):\n  {}",
        if denied.is_empty() {
            "(none)".to_string()
        } else {
            denied.join("\n  ")
        },
        if unused.is_empty() {
            "(none)".to_string()
        } else {
            unused.join("\n  ")
        },
        requests.len(),
        used.len(),
        used.join("\n  "),
    );
    eprintln!(
        "RBAC: {} operator requests, all allowed, every grant used:\n  {}",
        requests.len(),
        used.join("\n  ")
    );
    // Sanity: the flows did what the grants above were exercised by.
    let events = h.double.list(&ResourceKey::events(), Some("default"));
    assert!(
        events
            .iter()
            .any(|e| e["reason"] == "RefreshTokenRotated" && e["series"].is_object()),
        "a repeated RefreshTokenRotated Event about the ClusterTokenIssuer in default"
    );
}
