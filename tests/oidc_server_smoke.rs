//! Proves the test authorization server (`tests/oidc-server`, oidc-provider) behaves as the
//! other integration tests assume: one `aud` per resource, scopes filtered per resource,
//! `invalid_target` / `invalid_client` errors, an array `aud` where asked for, counters.
//! Uses only the harness and reqwest, not the operator.
//!
//! Needs Node.js and `npm ci --prefix tests/oidc-server`.

mod support;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use serde_json::Value;
use support::oidc::*;

/// Sends a token request with `client`'s credentials the way it is registered for.
async fn token_request(
    idp: &OidcServer,
    client: TestClient,
    params: &[(&str, &str)],
) -> (StatusCode, Value) {
    let mut form: Vec<(&str, &str)> = params.to_vec();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let mut request = http.post(idp.token_endpoint());
    match client.method {
        AuthMethod::ClientSecretBasic => {
            // RFC 6749 §2.3.1: form-urlencode id and secret, then Basic.
            request = request.basic_auth(form_encode(client.id), Some(form_encode(client.secret)));
        }
        AuthMethod::ClientSecretPost => {
            form.push(("client_id", client.id));
            form.push(("client_secret", client.secret));
        }
        AuthMethod::PrivateKeyJwt => {
            panic!("this test has no JWT signer; sign a client_assertion yourself")
        }
        AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth => {
            panic!("mTLS clients need a client certificate: see tests/mtls_oidc.rs")
        }
        AuthMethod::ServiceAccountToken | AuthMethod::None => {
            panic!("federation clients need a ServiceAccount token: see tests/federation_oidc.rs")
        }
    }
    send(request.form(&form)).await
}

async fn send(request: reqwest::RequestBuilder) -> (StatusCode, Value) {
    let response = request.send().await.expect("token request");
    let status = response.status();
    let body = response.json::<Value>().await.expect("JSON token response");
    (status, body)
}

fn form_encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

async fn client_credentials(
    idp: &OidcServer,
    client: TestClient,
    resource: &str,
    scope: &str,
) -> (StatusCode, Value) {
    token_request(
        idp,
        client,
        &[
            ("grant_type", "client_credentials"),
            ("resource", resource),
            ("scope", scope),
        ],
    )
    .await
}

fn jwt_part(token: &str, index: usize) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "not a JWS compact token: {token}");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[index]).expect("base64url")).expect("JSON")
}

fn jwt_claims(token: &str) -> Value {
    jwt_part(token, 1)
}

fn access_token(body: &Value) -> &str {
    body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no access_token in {body}"))
}

#[tokio::test]
async fn discovery_lists_the_token_endpoint() {
    let idp = OidcServer::start().await;
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
    assert_eq!(discovery["issuer"], idp.issuer.as_str());
    assert_eq!(discovery["token_endpoint"], idp.token_endpoint().as_str());
    assert_eq!(discovery["jwks_uri"], idp.jwks_uri().as_str());
    // mTLS is only on in OidcServer::start_mtls (tests/mtls_oidc.rs).
    assert_eq!(idp.mtls_token_endpoint, None);
    assert!(
        discovery.get("mtls_endpoint_aliases").is_none(),
        "{discovery}"
    );
    let grants = discovery["grant_types_supported"].as_array().unwrap();
    assert!(grants.contains(&"client_credentials".into()), "{grants:?}");
    assert!(grants.contains(&"refresh_token".into()), "{grants:?}");
}

#[tokio::test]
async fn two_resources_give_two_single_audience_jwts() {
    let idp = OidcServer::start().await;

    let (status, orders) = client_credentials(&idp, M2M_BASIC, ORDERS, "orders/read").await;
    assert_eq!(status, StatusCode::OK, "{orders}");
    assert_eq!(orders["token_type"], "Bearer");
    assert_eq!(orders["scope"], "orders/read");
    assert_eq!(orders["expires_in"], 3600);
    assert!(orders.get("refresh_token").is_none());
    let header = jwt_part(access_token(&orders), 0);
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["typ"], "at+jwt");
    let claims = jwt_claims(access_token(&orders));
    assert_eq!(
        claims["aud"], ORDERS,
        "aud must be a single string: {claims}"
    );
    assert_eq!(claims["scope"], "orders/read");
    assert_eq!(claims["iss"], idp.issuer.as_str());
    assert_eq!(claims["client_id"], "m2m-basic");
    assert_eq!(claims["sub"], "m2m-basic");
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        3600
    );

    let (status, payments) =
        client_credentials(&idp, M2M_POST, PAYMENTS, "payments/read payments/write").await;
    assert_eq!(status, StatusCode::OK, "{payments}");
    assert_eq!(payments["scope"], "payments/read payments/write");
    let claims = jwt_claims(access_token(&payments));
    assert_eq!(claims["aud"], PAYMENTS, "{claims}");
    assert_eq!(claims["scope"], "payments/read payments/write");
    assert_eq!(claims["client_id"], "m2m-post");
}

#[tokio::test]
async fn scopes_the_resource_does_not_allow_are_dropped_silently() {
    let idp = OidcServer::start().await;

    let (status, body) =
        client_credentials(&idp, M2M_BASIC, ORDERS, "payments/read orders/write").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["scope"], "orders/write");
    assert_eq!(jwt_claims(access_token(&body))["scope"], "orders/write");

    // Nothing left: still a token for the resource, but with no scope at all.
    let (status, body) = client_credentials(&idp, M2M_BASIC, ORDERS, "payments/read").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("scope").is_none(), "{body}");
    let claims = jwt_claims(access_token(&body));
    assert_eq!(claims["aud"], ORDERS);
    assert!(claims.get("scope").is_none(), "{claims}");
}

#[tokio::test]
async fn unknown_resource_is_invalid_target() {
    let idp = OidcServer::start().await;
    let (status, body) = client_credentials(&idp, M2M_BASIC, UNKNOWN_RESOURCE, "orders/read").await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_target");

    // Only one resource per client_credentials request.
    let (status, body) = token_request(
        &idp,
        M2M_BASIC,
        &[
            ("grant_type", "client_credentials"),
            ("resource", ORDERS),
            ("resource", PAYMENTS),
        ],
    )
    .await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_target");
}

#[tokio::test]
async fn bad_client_authentication_is_invalid_client() {
    let idp = OidcServer::start().await;

    let wrong_secret = TestClient {
        secret: "wrong",
        ..M2M_BASIC
    };
    let (status, body) = client_credentials(&idp, wrong_secret, ORDERS, "orders/read").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "invalid_client");

    // The registered method is enforced: Basic client sending its secret in the body ...
    let as_post = TestClient {
        method: AuthMethod::ClientSecretPost,
        ..M2M_BASIC
    };
    let (status, body) = client_credentials(&idp, as_post, ORDERS, "orders/read").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "invalid_client");
    // ... and a post client using Basic.
    let as_basic = TestClient {
        method: AuthMethod::ClientSecretBasic,
        ..M2M_POST
    };
    let (status, body) = client_credentials(&idp, as_basic, ORDERS, "orders/read").await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "invalid_client");
}

#[tokio::test]
async fn basic_credentials_are_form_urlencoded_before_base64() {
    let idp = OidcServer::start().await;

    let (status, body) = client_credentials(&idp, M2M_SPECIAL, SHORT_LIVED, "short/read").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(jwt_claims(access_token(&body))["client_id"], "m2m:special");

    // Without the encoding, the ':' in the id splits it: authentication fails.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let raw = http
        .post(idp.token_endpoint())
        .basic_auth(M2M_SPECIAL.id, Some(M2M_SPECIAL.secret))
        .form(&[
            ("grant_type", "client_credentials"),
            ("resource", SHORT_LIVED),
        ]);
    let (status, body) = send(raw).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "invalid_client");
}

#[tokio::test]
async fn multi_audience_resource_gives_an_array_aud() {
    let idp = OidcServer::start().await;
    let (status, body) = client_credentials(&idp, M2M_BASIC, MULTI_AUDIENCE, "multi/read").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let claims = jwt_claims(access_token(&body));
    assert_eq!(
        claims["aud"],
        serde_json::json!([MULTI_AUDIENCE, MULTI_AUDIENCE_OTHER]),
        "{claims}"
    );
    assert_eq!(claims["scope"], "multi/read");
}

#[tokio::test]
async fn lifetimes_opaque_tokens_and_missing_expires_in() {
    let idp = OidcServer::start().await;

    let (status, body) = client_credentials(&idp, M2M_BASIC, SHORT_LIVED, "short/read").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["expires_in"], 6);
    let claims = jwt_claims(access_token(&body));
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        6
    );

    let (status, body) = client_credentials(&idp, M2M_BASIC, OPAQUE, "opaque/read").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["expires_in"], 600);
    assert_eq!(body["scope"], "opaque/read");
    assert!(
        !access_token(&body).contains('.'),
        "expected an opaque token: {body}"
    );

    let (status, body) = client_credentials(&idp, M2M_BASIC, NO_EXPIRES_IN, "noexp/read").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("expires_in").is_none(), "{body}");
    let claims = jwt_claims(access_token(&body));
    assert_eq!(claims["aud"], NO_EXPIRES_IN);
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        900
    );

    let (status, body) =
        client_credentials(&idp, M2M_BASIC, NO_EXPIRES_IN_OPAQUE, "noexp/read").await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert!(body.get("expires_in").is_none(), "{body}");
    assert!(
        !access_token(&body).contains('.'),
        "expected an opaque token: {body}"
    );
}

#[tokio::test]
async fn counts_every_token_request() {
    let idp = OidcServer::start().await;
    assert_eq!(idp.token_requests().await, TokenRequestCounts::default());

    client_credentials(&idp, M2M_BASIC, ORDERS, "orders/read").await;
    client_credentials(&idp, M2M_BASIC, ORDERS, "orders/write").await;
    client_credentials(&idp, M2M_POST, PAYMENTS, "payments/read").await;
    client_credentials(&idp, M2M_BASIC, UNKNOWN_RESOURCE, "orders/read").await; // invalid_target
    client_credentials(
        &idp,
        TestClient {
            secret: "wrong",
            ..M2M_POST
        },
        ORDERS,
        "orders/read",
    )
    .await; // invalid_client
    client_credentials(&idp, M2M_SPECIAL, SHORT_LIVED, "short/read").await;

    let counts = idp.token_requests().await;
    assert_eq!(counts.total, 6, "{counts:?}");
    assert_eq!(counts.for_resource(ORDERS), 3, "{counts:?}");
    assert_eq!(counts.for_resource(PAYMENTS), 1, "{counts:?}");
    assert_eq!(counts.for_resource(UNKNOWN_RESOURCE), 1, "{counts:?}");
    assert_eq!(counts.for_resource(SHORT_LIVED), 1, "{counts:?}");
    assert_eq!(counts.for_client("m2m-basic"), 3, "{counts:?}");
    assert_eq!(counts.for_client("m2m-post"), 2, "{counts:?}");
    assert_eq!(counts.for_client("m2m:special"), 1, "{counts:?}");

    idp.reset_counts().await;
    assert_eq!(idp.token_requests().await, TokenRequestCounts::default());
    client_credentials(&idp, M2M_BASIC, PAYMENTS, "payments/read").await;
    let counts = idp.token_requests().await;
    assert_eq!(counts.total, 1);
    assert_eq!(counts.for_resource(PAYMENTS), 1);
}

#[tokio::test]
async fn refresh_tokens_rotate_and_reuse_revokes_the_grant() {
    let idp = OidcServer::start().await;
    let rt0 = idp
        .mint_refresh_token(M2M_REFRESH.id, &[ORDERS, PAYMENTS], None)
        .await;

    let refresh = |rt: String, resource: &'static str| {
        let idp = &idp;
        async move {
            token_request(
                idp,
                M2M_REFRESH,
                &[
                    ("grant_type", "refresh_token"),
                    ("refresh_token", &rt),
                    ("resource", resource),
                ],
            )
            .await
        }
    };

    let (status, body) = refresh(rt0.clone(), ORDERS).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    let claims = jwt_claims(access_token(&body));
    assert_eq!(claims["aud"], ORDERS);
    assert_eq!(claims["scope"], "orders/read orders/write");
    let rt1 = body["refresh_token"]
        .as_str()
        .expect("rotated refresh token")
        .to_owned();
    assert_ne!(rt1, rt0);

    let (status, body) = refresh(rt1.clone(), PAYMENTS).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(jwt_claims(access_token(&body))["aud"], PAYMENTS);
    let rt2 = body["refresh_token"].as_str().unwrap().to_owned();

    // A resource outside the grant is invalid_target.
    let (status, body) = refresh(rt2.clone(), OPAQUE).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_target");
    // ... and that failed request has consumed rt2 all the same (oidc-provider rotates first).
    let (status, body) = refresh(rt2, ORDERS).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_grant");

    // Reuse detection revoked the whole grant: a fresh one, then reuse.
    let rt0 = idp
        .mint_refresh_token(M2M_REFRESH.id, &[ORDERS], Some("orders/read"))
        .await;
    let (status, body) = refresh(rt0.clone(), ORDERS).await;
    assert_eq!(status, StatusCode::OK, "{body}");
    assert_eq!(body["scope"], "orders/read");
    let rt1 = body["refresh_token"].as_str().unwrap().to_owned();
    let (status, body) = refresh(rt0, ORDERS).await; // reuse
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_grant");
    let (status, body) = refresh(rt1, ORDERS).await; // the latest one is dead too
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
    assert_eq!(body["error"], "invalid_grant");
}

#[tokio::test]
async fn dropping_the_harness_stops_the_server() {
    let idp = OidcServer::start().await;
    let discovery = idp.discovery_url();
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    assert!(
        http.get(&discovery)
            .send()
            .await
            .unwrap()
            .status()
            .is_success()
    );
    drop(idp);
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        if http.get(&discovery).send().await.is_err() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "server still answering after drop"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn private_key_jwt_clients_keys_are_served() {
    let idp = OidcServer::start().await;
    for (client, alg, kty) in [
        (M2M_JWT_RS256, "RS256", "RSA"),
        (M2M_JWT_ES256, "ES256", "EC"),
    ] {
        let key = idp.client_private_key(client.id).await;
        assert_eq!(key.alg, alg);
        assert!(
            key.pem.starts_with("-----BEGIN PRIVATE KEY-----"),
            "{}",
            key.pem
        );
        assert_eq!(key.jwk["kty"], kty);
        assert_eq!(key.jwk["kid"], key.kid.as_str());
        assert!(key.jwk.get("d").is_some(), "private JWK expected");
    }
    // A client_secret client presenting no secret at all fails (sanity of the JWT clients'
    // registration: they have no secret to fall back on).
    let (status, body) = token_request(
        &idp,
        TestClient {
            secret: "",
            method: AuthMethod::ClientSecretPost,
            ..M2M_JWT_RS256
        },
        &[("grant_type", "client_credentials"), ("resource", ORDERS)],
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "invalid_client");
}
