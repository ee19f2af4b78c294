//! Proves the test authorization server's federation mode (`tests/oidc-server`,
//! [`OidcServer::start_federated`]) behaves as Entra ID workload identity federation and
//! Keycloak federated client authentication do with Kubernetes ServiceAccount tokens, and
//! that its RFC 8693 token exchange answers as the README says. The ServiceAccount tokens
//! are made here: a P-256 key generated at run time signs ServiceAccount-shaped JWTs, and
//! its public half is served as the "cluster's" JWKS on a loopback server
//! ([`FederationKeys::Uri`]) or handed over as a document ([`FederationKeys::Document`]).
//! Uses only the harness, reqwest and jsonwebtoken, not the operator.
//!
//! Needs Node.js and `npm ci --prefix tests/oidc-server`.

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use reqwest::StatusCode;
use serde_json::{Value, json};
use support::oidc::*;

/// The `iss` of the "cluster's" ServiceAccount tokens.
const CLUSTER_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const NAMESPACE: &str = "federation-test";

/// A signing key of the "cluster": P-256, ES256, with its public JWK.
struct ClusterKey {
    kid: String,
    encoding: EncodingKey,
    jwk: Value,
}

impl ClusterKey {
    fn generate(kid: &str) -> ClusterKey {
        let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        // The uncompressed point: 0x04, then x and y, 32 bytes each.
        let point = key.public_key_raw();
        assert_eq!(
            (point.len(), point[0]),
            (65, 4),
            "an uncompressed P-256 point"
        );
        let jwk = json!({
            "kty": "EC",
            "crv": "P-256",
            "x": URL_SAFE_NO_PAD.encode(&point[1..33]),
            "y": URL_SAFE_NO_PAD.encode(&point[33..]),
            "kid": kid,
            "alg": "ES256",
            "use": "sig",
        });
        let encoding = EncodingKey::from_ec_pem(key.serialize_pem().as_bytes()).unwrap();
        ClusterKey {
            kid: kid.to_string(),
            encoding,
            jwk,
        }
    }

    /// Signs `claims` as the API server signs ServiceAccount tokens (header `alg`, `kid`).
    fn sign(&self, claims: &Value) -> String {
        self.sign_as(&self.kid, claims)
    }

    /// Signs with this key but names `kid` in the header.
    fn sign_as(&self, kid: &str, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = None;
        header.kid = Some(kid.to_string());
        jsonwebtoken::encode(&header, claims, &self.encoding).unwrap()
    }
}

fn jwks(keys: &[&ClusterKey]) -> String {
    json!({ "keys": keys.iter().map(|k| k.jwk.clone()).collect::<Vec<_>>() }).to_string()
}

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        .try_into()
        .unwrap()
}

/// The claims of a TokenRequest token of ServiceAccount `name` in NAMESPACE for `audiences`,
/// valid for ten minutes from now.
fn service_account_claims(name: &str, audiences: &[&str]) -> Value {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let now = now();
    json!({
        "iss": CLUSTER_ISSUER,
        "sub": format!("system:serviceaccount:{NAMESPACE}:{name}"),
        "aud": audiences,
        "exp": now + 600,
        "iat": now,
        "nbf": now,
        "jti": format!("jti-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed)),
        "kubernetes.io": {
            "namespace": NAMESPACE,
            "serviceaccount": { "name": name, "uid": "5f6c1d52-3c1e-4bd0-9a57-0b6a1f1c0a11" },
        },
    })
}

/// The "cluster's" JWKS endpoint on the loopback: serves `document` at /openid/v1/jwks and
/// counts the fetches. Stops when dropped.
struct JwksServer {
    uri: String,
    fetches: Arc<AtomicU32>,
    task: tokio::task::JoinHandle<()>,
}

impl JwksServer {
    async fn start(document: String) -> JwksServer {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let uri = format!("http://{}/openid/v1/jwks", listener.local_addr().unwrap());
        let fetches = Arc::new(AtomicU32::new(0));
        let counter = fetches.clone();
        let app = axum::Router::new().route(
            "/openid/v1/jwks",
            axum::routing::get(move || {
                let counter = counter.clone();
                let document = document.clone();
                async move {
                    counter.fetch_add(1, Ordering::SeqCst);
                    (
                        [(axum::http::header::CONTENT_TYPE, "application/json")],
                        document,
                    )
                }
            }),
        );
        let task = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        JwksServer { uri, fetches, task }
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn federation(keys: FederationKeys) -> Federation {
    Federation {
        issuer: CLUSTER_ISSUER.to_string(),
        keys,
        namespace: NAMESPACE.to_string(),
    }
}

/// A federation server whose cluster keys are `trusted`, served at a JWKS URI.
async fn start_with_jwks_uri(trusted: &ClusterKey) -> (OidcServer, JwksServer) {
    let jwks_server = JwksServer::start(jwks(&[trusted])).await;
    let idp =
        OidcServer::start_federated(&federation(FederationKeys::Uri(jwks_server.uri.clone())))
            .await;
    (idp, jwks_server)
}

async fn post_form(idp: &OidcServer, form: &[(&str, &str)]) -> (StatusCode, Value) {
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(idp.token_endpoint())
        .form(form)
        .send()
        .await
        .expect("token request");
    let status = response.status();
    let body = response.json::<Value>().await.expect("JSON token response");
    (status, body)
}

/// client_credentials for `client`, authenticated by `service_account_token`.
async fn federated_request(
    idp: &OidcServer,
    client: TestClient,
    service_account_token: &str,
) -> (StatusCode, Value) {
    assert_eq!(client.method, AuthMethod::ServiceAccountToken);
    post_form(
        idp,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", client.id),
            ("client_assertion_type", CLIENT_ASSERTION_TYPE_JWT_BEARER),
            ("client_assertion", service_account_token),
            ("resource", ORDERS),
            ("scope", "orders/read"),
        ],
    )
    .await
}

/// A token exchange by M2M_EXCHANGE (no client authentication) of `subject_token`, with
/// `extra` parameters (target, scope, types).
async fn exchange(
    idp: &OidcServer,
    subject_token: &str,
    extra: &[(&str, &str)],
) -> (StatusCode, Value) {
    assert_eq!(M2M_EXCHANGE.method, AuthMethod::None);
    let mut form = vec![
        ("grant_type", GRANT_TOKEN_EXCHANGE),
        ("client_id", M2M_EXCHANGE.id),
        ("subject_token", subject_token),
        ("subject_token_type", TOKEN_TYPE_JWT),
    ];
    for (name, value) in extra {
        // A given subject_token_type replaces the default.
        form.retain(|(n, _)| n != name);
        form.push((name, value));
    }
    post_form(idp, &form).await
}

/// Extra form parameters of a request.
type Form<'a> = &'a [(&'a str, &'a str)];

fn jwt_claims(token: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "not a JWS compact token: {token}");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("base64url")).expect("JSON")
}

fn access_token(body: &Value) -> &str {
    body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no access_token in {body}"))
}

/// Asserts a refusal: `status`, `error`, and an `error_description` containing `reason`
/// (and not the token).
fn assert_refused(
    (status, body): &(StatusCode, Value),
    expected_status: StatusCode,
    error: &str,
    reason: &str,
    token: &str,
) {
    assert_eq!(*status, expected_status, "{body}");
    assert_eq!(body["error"], error, "{body}");
    let description = body["error_description"]
        .as_str()
        .unwrap_or_else(|| panic!("no error_description in {body}"));
    assert!(
        description.contains(reason),
        "error_description {description:?} should say {reason:?}"
    );
    assert!(
        !description.contains(token),
        "the error_description echoes the token: {description}"
    );
    assert!(body.get("access_token").is_none(), "{body}");
}

#[tokio::test]
async fn a_federated_client_authenticates_with_a_service_account_token() {
    let cluster = ClusterKey::generate("cluster-key-1");
    let (idp, jwks_server) = start_with_jwks_uri(&cluster).await;
    let discovery: Value = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(idp.discovery_url())
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let grants = discovery["grant_types_supported"].as_array().unwrap();
    assert!(grants.contains(&GRANT_TOKEN_EXCHANGE.into()), "{grants:?}");

    let token = cluster.sign(&service_account_claims(
        FEDERATED_SERVICE_ACCOUNT,
        &[idp.issuer.as_str(), "https://kubernetes.default.svc"],
    ));
    let (status, body) = federated_request(&idp, M2M_FEDERATED, &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["scope"], "orders/read");
    assert_eq!(body["expires_in"], 3600);
    let claims = jwt_claims(access_token(&body));
    assert_eq!(claims["aud"], ORDERS, "{claims}");
    assert_eq!(claims["iss"], idp.issuer.as_str());
    assert_eq!(claims["client_id"], M2M_FEDERATED.id);
    assert_eq!(claims["sub"], M2M_FEDERATED.id);
    assert!(
        jwks_server.fetches.load(Ordering::SeqCst) >= 1,
        "the server verified the token without fetching the cluster's JWKS"
    );

    // The same token again: no replay check (as Entra ID), it is valid until it expires.
    let (status, body) = federated_request(&idp, M2M_FEDERATED, &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");

    let counts = idp.token_requests().await;
    assert_eq!(counts.for_client(M2M_FEDERATED.id), 2, "{counts:?}");
    assert_eq!(counts.for_resource(ORDERS), 2, "{counts:?}");
    let seen = idp.secrets_seen().await;
    assert!(seen.service_account_tokens.contains(&token), "{seen:?}");
    assert!(seen.client_assertions.contains(&token), "{seen:?}");
    assert!(
        seen.access_tokens
            .contains(&access_token(&body).to_string())
    );
    // The server-internal secret it authenticated the client with never shows.
    assert!(seen.client_secrets.is_empty(), "{seen:?}");
}

#[tokio::test]
async fn a_federated_client_refuses_every_other_credential() {
    let cluster = ClusterKey::generate("cluster-key-1");
    let (idp, _jwks_server) = start_with_jwks_uri(&cluster).await;
    let issuer = idp.issuer.clone();
    let good = || service_account_claims(FEDERATED_SERVICE_ACCOUNT, &[issuer.as_str()]);
    let with = |name: &str, value: Value| {
        let mut claims = good();
        claims[name] = value;
        claims
    };
    let another_key = ClusterKey::generate("cluster-key-1");

    let cases: Vec<(&str, String, &str)> = vec![
        (
            "another ServiceAccount",
            cluster.sign(&service_account_claims("someone-else", &[issuer.as_str()])),
            "is not the trusted ServiceAccount \"system:serviceaccount:federation-test:idp-federated\"",
        ),
        (
            "the right name in another namespace",
            cluster.sign(&with(
                "sub",
                "system:serviceaccount:other-namespace:idp-federated".into(),
            )),
            "is not the trusted ServiceAccount",
        ),
        (
            "another issuer",
            cluster.sign(&with("iss", "https://other-cluster.example.test".into())),
            "is not the trusted issuer",
        ),
        (
            "another audience",
            cluster.sign(&with("aud", json!(["https://kubernetes.default.svc"]))),
            "does not contain",
        ),
        (
            "expired beyond the clock skew",
            cluster.sign(&with("exp", (now() - 120).into())),
            "it expired",
        ),
        (
            "not valid yet",
            cluster.sign(&with("nbf", (now() + 300).into())),
            "not valid yet",
        ),
        (
            "signed by another key with the trusted kid",
            another_key.sign(&good()),
            "signature does not verify",
        ),
        (
            "an unknown kid",
            another_key.sign_as("unknown-kid", &good()),
            "names no key of the trusted JWKS",
        ),
        ("not a JWT", "not-a-jwt".to_string(), "not a JWT"),
    ];
    for (case, token, reason) in &cases {
        let answer = federated_request(&idp, M2M_FEDERATED, token).await;
        assert!(
            answer.0 == StatusCode::UNAUTHORIZED,
            "{case}: expected 401, got {answer:?}"
        );
        assert_refused(
            &answer,
            StatusCode::UNAUTHORIZED,
            "invalid_client",
            reason,
            token,
        );
    }

    // A right token with a wrong client_assertion_type.
    let token = cluster.sign(&good());
    let answer = post_form(
        &idp,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", M2M_FEDERATED.id),
            (
                "client_assertion_type",
                "urn:ietf:params:oauth:client-assertion-type:saml2-bearer",
            ),
            ("client_assertion", &token),
            ("resource", ORDERS),
        ],
    )
    .await;
    assert_refused(
        &answer,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        "client_assertion_type is urn:ietf:params:oauth:client-assertion-type:saml2-bearer",
        &token,
    );
    // No other authentication: no assertion at all, a client secret, HTTP Basic.
    let answer = post_form(
        &idp,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", M2M_FEDERATED.id),
            ("resource", ORDERS),
        ],
    )
    .await;
    assert_refused(
        &answer,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        "there is no client_assertion",
        &token,
    );
    let answer = post_form(
        &idp,
        &[
            ("grant_type", "client_credentials"),
            ("client_id", M2M_FEDERATED.id),
            ("client_secret", "guessed"),
            ("resource", ORDERS),
        ],
    )
    .await;
    assert_refused(
        &answer,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        "not with a client_secret",
        &token,
    );
    let response = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .post(idp.token_endpoint())
        .basic_auth(M2M_FEDERATED.id, Some("guessed"))
        .form(&[("grant_type", "client_credentials"), ("resource", ORDERS)])
        .send()
        .await
        .unwrap();
    let answer = (response.status(), response.json::<Value>().await.unwrap());
    assert_refused(
        &answer,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        "not with an Authorization header",
        &token,
    );

    // Each refusal is counted as a failed request of the client; the right token still works.
    let counts = idp.token_requests().await;
    let refused = u64::try_from(cases.len()).unwrap() + 4;
    assert_eq!(counts.errors("invalid_client"), refused, "{counts:?}");
    assert_eq!(counts.for_client(M2M_FEDERATED.id), refused, "{counts:?}");
    let (status, body) = federated_request(&idp, M2M_FEDERATED, &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let seen = idp.secrets_seen().await;
    for (case, token, _) in &cases {
        assert!(
            seen.service_account_tokens.contains(token),
            "{case}: refused token not in secrets seen"
        );
    }
}

#[tokio::test]
async fn the_entra_client_needs_the_entra_audience_with_keys_from_a_document() {
    let cluster = ClusterKey::generate("cluster-key-doc");
    let idp =
        OidcServer::start_federated(&federation(FederationKeys::Document(jwks(&[&cluster])))).await;

    let token = cluster.sign(&service_account_claims(
        FEDERATED_ENTRA_SERVICE_ACCOUNT,
        &[ENTRA_AUDIENCE],
    ));
    let (status, body) = federated_request(&idp, M2M_FEDERATED_ENTRA, &token).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let claims = jwt_claims(access_token(&body));
    assert_eq!(claims["aud"], ORDERS, "{claims}");
    assert_eq!(claims["client_id"], M2M_FEDERATED_ENTRA.id);

    // The issuer identifier is the audience of m2m-federated, not of the Entra client...
    let for_issuer = cluster.sign(&service_account_claims(
        FEDERATED_ENTRA_SERVICE_ACCOUNT,
        &[idp.issuer.as_str()],
    ));
    let answer = federated_request(&idp, M2M_FEDERATED_ENTRA, &for_issuer).await;
    assert_refused(
        &answer,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        "does not contain \"api://AzureADTokenExchange\"",
        &for_issuer,
    );
    // ...and the Entra audience is not the audience of m2m-federated.
    let entra_for_plain = cluster.sign(&service_account_claims(
        FEDERATED_SERVICE_ACCOUNT,
        &[ENTRA_AUDIENCE],
    ));
    let answer = federated_request(&idp, M2M_FEDERATED, &entra_for_plain).await;
    assert_refused(
        &answer,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        "does not contain",
        &entra_for_plain,
    );
    // One client's ServiceAccount does not authenticate the other client.
    let answer = federated_request(&idp, M2M_FEDERATED_ENTRA, &entra_for_plain).await;
    assert_refused(
        &answer,
        StatusCode::UNAUTHORIZED,
        "invalid_client",
        "is not the trusted ServiceAccount",
        &entra_for_plain,
    );
}

#[tokio::test]
async fn token_exchange_of_a_service_account_token() {
    let cluster = ClusterKey::generate("cluster-key-1");
    let (idp, _jwks_server) = start_with_jwks_uri(&cluster).await;
    let subject = federation(FederationKeys::Uri(String::new())).subject(EXCHANGE_SERVICE_ACCOUNT);
    let token = cluster.sign(&service_account_claims(
        EXCHANGE_SERVICE_ACCOUNT,
        &[idp.issuer.as_str()],
    ));

    // Without requested_token_type: an access token, for the resource, about the
    // ServiceAccount.
    let (status, body) = exchange(
        &idp,
        &token,
        &[("resource", ORDERS), ("scope", "orders/read")],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["issued_token_type"], TOKEN_TYPE_ACCESS_TOKEN);
    assert_eq!(body["token_type"], "Bearer");
    assert_eq!(body["expires_in"], 3600);
    assert_eq!(body["scope"], "orders/read");
    let first = access_token(&body).to_string();
    let claims = jwt_claims(&first);
    assert_eq!(claims["aud"], ORDERS, "{claims}");
    assert_eq!(claims["sub"], subject.as_str(), "{claims}");
    assert_eq!(claims["client_id"], M2M_EXCHANGE.id);
    assert_eq!(claims["iss"], idp.issuer.as_str());
    assert_eq!(claims["scope"], "orders/read");

    // Asked for a JWT: the same kind of token, said to be a JWT; `audience` names the target.
    let (status, body) = exchange(
        &idp,
        &token,
        &[
            ("audience", PAYMENTS),
            ("scope", "payments/read payments/write"),
            ("requested_token_type", TOKEN_TYPE_JWT),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["issued_token_type"], TOKEN_TYPE_JWT);
    assert_eq!(body["scope"], "payments/read payments/write");
    let claims = jwt_claims(access_token(&body));
    assert_eq!(claims["aud"], PAYMENTS, "{claims}");
    assert_eq!(claims["sub"], subject.as_str(), "{claims}");

    // Asked for an access token explicitly, and for an ID token: an access token either way.
    for requested in [TOKEN_TYPE_ACCESS_TOKEN, TOKEN_TYPE_ID_TOKEN] {
        let (status, body) = exchange(
            &idp,
            &token,
            &[("resource", ORDERS), ("requested_token_type", requested)],
        )
        .await;
        assert_eq!(status, StatusCode::OK, "{requested}: {body}");
        assert_eq!(body["issued_token_type"], TOKEN_TYPE_ACCESS_TOKEN, "{body}");
        assert!(body.get("scope").is_none(), "no scope asked for: {body}");
        assert_eq!(jwt_claims(access_token(&body))["aud"], ORDERS);
    }

    let counts = idp.token_requests().await;
    assert_eq!(counts.for_client(M2M_EXCHANGE.id), 4, "{counts:?}");
    assert_eq!(counts.for_resource(ORDERS), 3, "{counts:?}");
    assert_eq!(counts.for_resource(PAYMENTS), 1, "{counts:?}");
    let seen = idp.secrets_seen().await;
    assert!(seen.service_account_tokens.contains(&token), "{seen:?}");
    assert!(seen.access_tokens.contains(&first), "{seen:?}");
    assert!(seen.client_assertions.is_empty(), "{seen:?}");
}

#[tokio::test]
async fn token_exchange_refusals() {
    let cluster = ClusterKey::generate("cluster-key-1");
    let (idp, _jwks_server) = start_with_jwks_uri(&cluster).await;
    let token = cluster.sign(&service_account_claims(
        EXCHANGE_SERVICE_ACCOUNT,
        &[idp.issuer.as_str()],
    ));

    // Another subject token type.
    let answer = exchange(
        &idp,
        &token,
        &[
            ("resource", ORDERS),
            ("subject_token_type", TOKEN_TYPE_ACCESS_TOKEN),
        ],
    )
    .await;
    assert_refused(
        &answer,
        StatusCode::BAD_REQUEST,
        "invalid_request",
        "subject_token_type urn:ietf:params:oauth:token-type:access_token is not supported",
        &token,
    );
    // Bad subject tokens: another ServiceAccount, another audience, an unknown key.
    let bad = [
        (
            cluster.sign(&service_account_claims(
                FEDERATED_SERVICE_ACCOUNT,
                &[idp.issuer.as_str()],
            )),
            "is not the trusted ServiceAccount",
        ),
        (
            cluster.sign(&service_account_claims(
                EXCHANGE_SERVICE_ACCOUNT,
                &[ENTRA_AUDIENCE],
            )),
            "does not contain",
        ),
        (
            ClusterKey::generate("stranger").sign(&service_account_claims(
                EXCHANGE_SERVICE_ACCOUNT,
                &[idp.issuer.as_str()],
            )),
            "names no key of the trusted JWKS",
        ),
    ];
    for (bad_token, reason) in &bad {
        let answer = exchange(&idp, bad_token, &[("resource", ORDERS)]).await;
        assert_refused(
            &answer,
            StatusCode::BAD_REQUEST,
            "invalid_request",
            reason,
            bad_token,
        );
        assert!(
            answer.1["error_description"]
                .as_str()
                .unwrap()
                .starts_with("the subject_token is refused"),
            "{}",
            answer.1
        );
    }
    // An actor token (no delegation), no target, an unknown target, a foreign scope.
    let cases: [(Form, StatusCode, &str, &str); 4] = [
        (
            &[
                ("resource", ORDERS),
                ("actor_token", "an-actor"),
                ("actor_token_type", TOKEN_TYPE_JWT),
            ],
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "actor_token is not supported",
        ),
        (
            &[("scope", "orders/read")],
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "resource or audience is required",
        ),
        (
            &[("audience", UNKNOWN_RESOURCE)],
            StatusCode::BAD_REQUEST,
            "invalid_target",
            "unknown resource server",
        ),
        (
            &[("resource", ORDERS), ("scope", "orders/read payments/read")],
            StatusCode::BAD_REQUEST,
            "invalid_scope",
            "payments/read is not a scope of https://orders.example.test",
        ),
    ];
    for (extra, status, error, reason) in cases {
        let answer = exchange(&idp, &token, extra).await;
        assert_refused(&answer, status, error, reason, &token);
    }
    // Only m2m-exchange may exchange; a federated client authenticated right may not.
    let federated = cluster.sign(&service_account_claims(
        FEDERATED_SERVICE_ACCOUNT,
        &[idp.issuer.as_str()],
    ));
    let answer = post_form(
        &idp,
        &[
            ("grant_type", GRANT_TOKEN_EXCHANGE),
            ("client_id", M2M_FEDERATED.id),
            ("client_assertion_type", CLIENT_ASSERTION_TYPE_JWT_BEARER),
            ("client_assertion", &federated),
            ("subject_token", &token),
            ("subject_token_type", TOKEN_TYPE_JWT),
            ("resource", ORDERS),
        ],
    )
    .await;
    assert_eq!(answer.0, StatusCode::BAD_REQUEST, "{:?}", answer.1);
    assert!(answer.1.get("access_token").is_none());

    let counts = idp.token_requests().await;
    assert_eq!(
        counts.errors("invalid_request"),
        1 + 3 + 2 + 1,
        "{counts:?}"
    );
    assert_eq!(counts.errors("invalid_target"), 1, "{counts:?}");
    assert_eq!(counts.errors("invalid_scope"), 1, "{counts:?}");
    let seen = idp.secrets_seen().await;
    for (bad_token, _) in &bad {
        assert!(seen.service_account_tokens.contains(bad_token));
    }
    assert!(seen.access_tokens.is_empty(), "{seen:?}");
}
