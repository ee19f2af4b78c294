//! The library's OAuth client (`audience_token_operator::oauth`) against a real authorization
//! server (`tests/oidc-server`, oidc-provider): discovery, RFC 8707 resource indicators,
//! client authentication methods, OAuth errors, the single-audience check, token lifetimes,
//! redaction, and one POST per request.
//!
//! Needs Node.js and `npm ci --prefix tests/oidc-server`.

mod support;

use std::time::Duration;

use audience_token_operator::oauth::jwt::decode_claims;
use audience_token_operator::oauth::{
    AudienceParam, Binding, ClientCredentials, Endpoint, Grant, IssuedToken, Tls, TokenClient,
    TokenError, TokenRequest, TokenResponse, issue,
};
use audience_token_operator::redact::SecretString;
use jiff::{SignedDuration, Timestamp};
use support::oidc::*;
use url::Url;

const TIMEOUT: Duration = Duration::from_secs(10);
/// Passed to `issue` as the default lifetime; distinct from every lifetime the server uses.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(1234);

fn client() -> TokenClient {
    TokenClient::new().expect("token client")
}

fn basic(idp: &OidcServer, client: TestClient) -> Endpoint {
    idp.endpoint(
        client.id,
        ClientCredentials::Basic(SecretString::new(client.secret)),
    )
}

fn post(idp: &OidcServer, client: TestClient) -> Endpoint {
    idp.endpoint(
        client.id,
        ClientCredentials::Post(SecretString::new(client.secret)),
    )
}

fn client_credentials(resource: &str, scopes: &[&str]) -> TokenRequest {
    TokenRequest {
        grant: Grant::ClientCredentials,
        scopes: scopes.iter().map(|s| s.to_string()).collect(),
        audience: AudienceParam::Resource(resource.to_string()),
        dpop: None,
        authorization_details: None,
    }
}

fn strings(values: &[&str]) -> Vec<String> {
    values.iter().map(|s| s.to_string()).collect()
}

/// Sends one token request through the library and checks that the server saw exactly one
/// POST to its token endpoint for it, attributed to this client and resource.
async fn request(
    idp: &OidcServer,
    tokens: &TokenClient,
    endpoint: &Endpoint,
    request: &TokenRequest,
) -> Result<TokenResponse, TokenError> {
    let before = idp.token_requests().await;
    let result = tokens.request(endpoint, request).await;
    let after = idp.token_requests().await;
    assert_eq!(
        after.total,
        before.total + 1,
        "one `request` call must be exactly one POST /token (before {before:?}, after {after:?})"
    );
    assert_eq!(
        after.for_client(&endpoint.client_id),
        before.for_client(&endpoint.client_id) + 1,
        "the POST must be attributed to {}: {after:?}",
        endpoint.client_id
    );
    if let AudienceParam::Resource(resource) = &request.audience {
        assert_eq!(
            after.for_resource(resource),
            before.for_resource(resource) + 1,
            "the POST must carry resource={resource}: {after:?}"
        );
    }
    result
}

fn expect_server_error(result: Result<TokenResponse, TokenError>) -> TokenError {
    match result {
        Err(err @ TokenError::Server { .. }) => err,
        Err(other) => panic!("expected an OAuth error from the server, got {other:?}"),
        Ok(response) => panic!("expected an OAuth error, got a token: {response:?}"),
    }
}

fn secs(d: SignedDuration) -> i64 {
    d.as_secs()
}

// ---- 1. Discovery --------------------------------------------------------------------------

#[tokio::test]
async fn discovery_finds_the_token_endpoint() {
    let idp = OidcServer::start().await;

    // oidc-provider 9.x serves the same document at both well-known URLs (RFC 8414 and
    // OpenID discovery), so the client's first choice succeeds here; the fallback to OpenID
    // discovery is proven by `discovery_falls_back_to_openid_configuration` below.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    for url in [
        format!("{}/.well-known/oauth-authorization-server", idp.issuer),
        idp.discovery_url(),
    ] {
        let document: serde_json::Value = http
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .unwrap_or_else(|e| panic!("GET {url}: {e}"))
            .json()
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}"));
        assert_eq!(
            document["token_endpoint"].as_str(),
            Some(idp.token_endpoint().as_str()),
            "{url}"
        );
    }

    let issuer = Url::parse(&idp.issuer).unwrap();
    let metadata = client()
        .discover(&issuer, Tls::default(), TIMEOUT, false)
        .await
        .expect("discovery");
    assert_eq!(metadata.token_endpoint.as_str(), idp.token_endpoint());
    assert_eq!(metadata.issuer, idp.issuer);

    // A trailing slash on the configured issuer is tolerated.
    let with_slash = Url::parse(&format!("{}/", idp.issuer)).unwrap();
    let metadata = client()
        .discover(&with_slash, Tls::default(), TIMEOUT, false)
        .await
        .expect("discovery with a trailing slash");
    assert_eq!(metadata.token_endpoint.as_str(), idp.token_endpoint());

    // The discovered endpoint is usable as is.
    let endpoint = Endpoint {
        token_endpoint: metadata.token_endpoint,
        ..basic(&idp, M2M_BASIC)
    };
    let response = request(
        &idp,
        &client(),
        &endpoint,
        &client_credentials(ORDERS, &["orders/read"]),
    )
    .await
    .expect("token from the discovered endpoint");
    assert_eq!(response.token_type, "Bearer");
}

/// A server without RFC 8414 metadata (404) but with OpenID discovery, as many IdPs are:
/// the client must fall back. oidc-provider serves both, so this one is a small stub.
#[tokio::test]
async fn discovery_falls_back_to_openid_configuration() {
    use std::sync::{Arc, Mutex};

    use axum::extract::{Request, State};
    use axum::http::StatusCode;
    use axum::response::IntoResponse;

    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}/tenant1", listener.local_addr().unwrap());
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let document = serde_json::json!({
        "issuer": issuer,
        "token_endpoint": format!("{issuer}/oauth2/token"),
    });
    let app = axum::Router::new()
        .fallback(
            |State((seen, document)): State<(Arc<Mutex<Vec<String>>>, serde_json::Value)>,
             request: Request| async move {
                let path = request.uri().path().to_string();
                seen.lock().unwrap().push(path.clone());
                if path == "/tenant1/.well-known/openid-configuration" {
                    axum::Json(document).into_response()
                } else {
                    StatusCode::NOT_FOUND.into_response()
                }
            },
        )
        .with_state((seen.clone(), document));
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let metadata = client()
        .discover(
            &Url::parse(&issuer).unwrap(),
            Tls::default(),
            TIMEOUT,
            false,
        )
        .await
        .expect("discovery with fallback");
    assert_eq!(
        metadata.token_endpoint.as_str(),
        format!("{issuer}/oauth2/token")
    );
    assert_eq!(
        *seen.lock().unwrap(),
        vec![
            "/.well-known/oauth-authorization-server/tenant1".to_string(),
            "/tenant1/.well-known/openid-configuration".to_string(),
        ],
        "RFC 8414 first, then OpenID discovery, once each"
    );
    server.abort();
}

#[tokio::test]
async fn discovery_against_a_wrong_issuer_names_what_was_tried() {
    let idp = OidcServer::start().await;

    // An issuer with an extra path: neither metadata URL exists.
    let wrong = Url::parse(&format!("{}/tenant1", idp.issuer)).unwrap();
    let err = client()
        .discover(&wrong, Tls::default(), TIMEOUT, false)
        .await
        .expect_err("discovery of a non-existent issuer must fail");
    let TokenError::Discovery { url, reason } = &err else {
        panic!("expected TokenError::Discovery, got {err:?}");
    };
    assert_eq!(url, wrong.as_str());
    let rfc8414 = format!(
        "{}/.well-known/oauth-authorization-server/tenant1",
        idp.issuer
    );
    let oidc = format!("{}/tenant1/.well-known/openid-configuration", idp.issuer);
    assert!(reason.contains(&rfc8414), "{reason}");
    assert!(reason.contains(&oidc), "{reason}");
    assert!(reason.contains("404"), "{reason}");
    let message = err.to_string();
    assert!(
        message.contains(&rfc8414) && message.contains(&oidc),
        "{message}"
    );

    // The same server under another name: the document is found but names another issuer
    // (RFC 8414 §3.3), so it must not be used.
    let port = Url::parse(&idp.issuer).unwrap().port().expect("port");
    let alias = Url::parse(&format!("http://localhost:{port}")).unwrap();
    let err = client()
        .discover(&alias, Tls::default(), TIMEOUT, false)
        .await
        .expect_err("metadata of another issuer must be refused");
    let TokenError::Discovery { reason, .. } = &err else {
        panic!("expected TokenError::Discovery, got {err:?}");
    };
    assert!(reason.contains(&idp.issuer), "{reason}");
    assert!(reason.contains("is for issuer"), "{reason}");
}

// ---- 2. One token per resource, exactly its audience ---------------------------------------

#[tokio::test]
async fn two_resources_give_two_single_audience_tokens() {
    let idp = OidcServer::start().await;
    let tokens = client();
    let endpoint = basic(&idp, M2M_BASIC);
    // Ask for every scope of both APIs each time: the server keeps only the resource's own.
    let all_scopes = [
        "orders/read",
        "orders/write",
        "payments/read",
        "payments/write",
    ];

    let mut issued = Vec::new();
    for (resource, own_scopes) in [
        (ORDERS, ["orders/read", "orders/write"]),
        (PAYMENTS, ["payments/read", "payments/write"]),
    ] {
        let req = client_credentials(resource, &all_scopes);
        let response = request(&idp, &tokens, &endpoint, &req)
            .await
            .unwrap_or_else(|e| panic!("token for {resource}: {e}"));
        assert_eq!(response.token_type, "Bearer");
        let claims = decode_claims(response.access_token.expose())
            .unwrap_or_else(|| panic!("the {resource} token is not a JWT"));
        assert_eq!(
            claims.raw.get("aud"),
            Some(&serde_json::Value::String(resource.to_string())),
            "aud must be exactly the resource, as a string"
        );
        assert_eq!(claims.aud, vec![resource.to_string()]);
        assert_eq!(claims.scopes, Some(strings(&own_scopes)), "{resource}");
        assert_eq!(
            claims.raw.get("client_id").and_then(|v| v.as_str()),
            Some(M2M_BASIC.id)
        );

        let token = issue(
            response.clone(),
            Timestamp::now(),
            DEFAULT_LIFETIME,
            resource,
            &req.scopes,
            Binding::NONE,
        )
        .unwrap_or_else(|e| panic!("issue for {resource}: {e}"));
        assert_eq!(token.audience, vec![resource.to_string()]);
        assert_eq!(token.scopes, strings(&own_scopes));
        issued.push((resource, response, token));
    }

    let (_, orders_response, orders_token) = &issued[0];
    let (_, _, payments_token) = &issued[1];
    assert_ne!(
        orders_token.access_token.expose(),
        payments_token.access_token.expose()
    );

    // The ORDERS token must not pass as a PAYMENTS token.
    let err = issue(
        orders_response.clone(),
        Timestamp::now(),
        DEFAULT_LIFETIME,
        PAYMENTS,
        &[],
        Binding::NONE,
    )
    .expect_err("an ORDERS token accepted for PAYMENTS");
    match &err {
        TokenError::AudienceMismatch { expected, actual } => {
            assert_eq!(expected, PAYMENTS);
            assert_eq!(actual, &vec![ORDERS.to_string()]);
        }
        other => panic!("expected AudienceMismatch, got {other:?}"),
    }
}

// ---- 3. Client authentication methods -------------------------------------------------------

#[tokio::test]
async fn client_authentication_methods_follow_the_registration() {
    let idp = OidcServer::start().await;
    let tokens = client();
    let req = client_credentials(ORDERS, &["orders/read"]);

    // client_secret_post for the client registered for it.
    let response = request(&idp, &tokens, &post(&idp, M2M_POST), &req)
        .await
        .expect("client_secret_post with m2m-post");
    let claims = decode_claims(response.access_token.expose()).expect("JWT");
    assert_eq!(
        claims.raw.get("client_id").and_then(|v| v.as_str()),
        Some(M2M_POST.id)
    );

    // The server enforces the registered method: Basic for a post client is refused...
    let err = expect_server_error(request(&idp, &tokens, &basic(&idp, M2M_POST), &req).await);
    assert_eq!(err.oauth_error(), Some("invalid_client"), "{err}");
    assert!(err.is_client_auth_failure(), "{err}");
    // ...and so is the body for a Basic client.
    let err = expect_server_error(request(&idp, &tokens, &post(&idp, M2M_BASIC), &req).await);
    assert_eq!(err.oauth_error(), Some("invalid_client"), "{err}");

    // `m2m:special` / `s3cr3t/with+special&chars=` only works when id and secret are
    // form-urlencoded before base64 (RFC 6749 §2.3.1); sent raw it is invalid_client.
    let response = request(&idp, &tokens, &basic(&idp, M2M_SPECIAL), &req)
        .await
        .expect("client_secret_basic with special characters");
    let claims = decode_claims(response.access_token.expose()).expect("JWT");
    assert_eq!(
        claims.raw.get("client_id").and_then(|v| v.as_str()),
        Some(M2M_SPECIAL.id)
    );
    assert_eq!(claims.aud, vec![ORDERS.to_string()]);
}

// ---- 4. OAuth errors -------------------------------------------------------------------------

#[tokio::test]
async fn oauth_errors_surface_with_status_code_and_description() {
    let idp = OidcServer::start().await;
    let tokens = client();

    let err = expect_server_error(
        request(
            &idp,
            &tokens,
            &basic(&idp, M2M_BASIC),
            &client_credentials(UNKNOWN_RESOURCE, &["orders/read"]),
        )
        .await,
    );
    let TokenError::Server {
        status,
        error,
        description,
        retry_after,
    } = &err
    else {
        unreachable!()
    };
    assert_eq!(*status, 400);
    assert_eq!(error, "invalid_target");
    assert_eq!(*retry_after, None);
    let description = description
        .as_deref()
        .filter(|d| !d.is_empty())
        .expect("oidc-provider sends an error_description");
    let message = err.to_string();
    assert!(message.contains("400"), "{message}");
    assert!(message.contains("invalid_target"), "{message}");
    assert!(message.contains(description), "{message}");
    assert!(!err.is_client_auth_failure(), "{err}");

    // A wrong secret.
    let wrong_secret = idp.endpoint(
        M2M_BASIC.id,
        ClientCredentials::Basic(SecretString::new("not-the-secret")),
    );
    let err = expect_server_error(
        request(
            &idp,
            &tokens,
            &wrong_secret,
            &client_credentials(ORDERS, &["orders/read"]),
        )
        .await,
    );
    let TokenError::Server { status, error, .. } = &err else {
        unreachable!()
    };
    assert_eq!(*status, 401, "{err}");
    assert_eq!(error, "invalid_client");
    assert!(err.is_client_auth_failure(), "{err}");
    assert!(!err.to_string().contains("not-the-secret"), "{err}");
}

// ---- 5. Multi-audience tokens are refused ----------------------------------------------------

#[tokio::test]
async fn a_multi_audience_token_is_refused() {
    let idp = OidcServer::start().await;
    let req = client_credentials(MULTI_AUDIENCE, &["multi/read"]);
    let response = request(&idp, &client(), &basic(&idp, M2M_BASIC), &req)
        .await
        .expect("the raw response is a valid token response");
    assert_eq!(response.expires_in, Some(Duration::from_secs(3600)));

    let err = issue(
        response,
        Timestamp::now(),
        DEFAULT_LIFETIME,
        MULTI_AUDIENCE,
        &req.scopes,
        Binding::NONE,
    )
    .expect_err("a token for two audiences must be refused");
    match &err {
        TokenError::AudienceMismatch { expected, actual } => {
            assert_eq!(expected, MULTI_AUDIENCE);
            assert_eq!(actual, &strings(&[MULTI_AUDIENCE, MULTI_AUDIENCE_OTHER]));
        }
        other => panic!("expected AudienceMismatch, got {other:?}"),
    }
    let message = err.to_string();
    assert!(message.contains(MULTI_AUDIENCE_OTHER), "{message}");
}

// ---- 6. Lifetimes ----------------------------------------------------------------------------

#[tokio::test]
async fn lifetime_comes_from_expires_in_then_exp_then_the_default() {
    let idp = OidcServer::start().await;
    let tokens = client();
    let endpoint = basic(&idp, M2M_BASIC);

    // ORDERS: expires_in 3600 (and exp = iat + 3600).
    let req = client_credentials(ORDERS, &["orders/read"]);
    let response = request(&idp, &tokens, &endpoint, &req).await.unwrap();
    assert_eq!(response.expires_in, Some(Duration::from_secs(3600)));
    let now = Timestamp::now();
    let token = issue(
        response,
        now,
        DEFAULT_LIFETIME,
        ORDERS,
        &req.scopes,
        Binding::NONE,
    )
    .unwrap();
    assert_eq!(token.issued_at, now);
    let lifetime = secs(token.expires_at.duration_since(now));
    assert!(
        (3590..=3600).contains(&lifetime),
        "ORDERS expires {lifetime} s after now, want ≈ 3600"
    );

    // NO_EXPIRES_IN: a JWT without expires_in in the response → the JWT's exp.
    let req = client_credentials(NO_EXPIRES_IN, &["noexp/read"]);
    let response = request(&idp, &tokens, &endpoint, &req).await.unwrap();
    assert_eq!(response.expires_in, None, "the server strips expires_in");
    let exp = decode_claims(response.access_token.expose())
        .expect("JWT")
        .exp
        .expect("exp claim");
    let now = Timestamp::now();
    let token = issue(
        response,
        now,
        DEFAULT_LIFETIME,
        NO_EXPIRES_IN,
        &req.scopes,
        Binding::NONE,
    )
    .unwrap();
    assert_eq!(token.expires_at.as_second(), exp);
    let lifetime = secs(token.expires_at.duration_since(now));
    assert!((890..=900).contains(&lifetime), "{lifetime}");

    // NO_EXPIRES_IN_OPAQUE: nothing to go by → the default lifetime passed to `issue`.
    let response = request(
        &idp,
        &tokens,
        &endpoint,
        &client_credentials(NO_EXPIRES_IN_OPAQUE, &["noexp/read"]),
    )
    .await
    .unwrap();
    assert_eq!(response.expires_in, None);
    assert!(decode_claims(response.access_token.expose()).is_none());
    let now = Timestamp::now();
    let token = issue(
        response,
        now,
        DEFAULT_LIFETIME,
        NO_EXPIRES_IN_OPAQUE,
        &[],
        Binding::NONE,
    )
    .unwrap();
    assert_eq!(
        token.expires_at,
        now + SignedDuration::try_from(DEFAULT_LIFETIME).unwrap()
    );

    // OPAQUE: cannot be checked, so it passes; no audience; expires_in 600.
    let req = client_credentials(OPAQUE, &["opaque/read"]);
    let response = request(&idp, &tokens, &endpoint, &req).await.unwrap();
    assert!(
        decode_claims(response.access_token.expose()).is_none(),
        "the OPAQUE token parsed as a JWT"
    );
    let now = Timestamp::now();
    let token = issue(
        response,
        now,
        DEFAULT_LIFETIME,
        OPAQUE,
        &req.scopes,
        Binding::NONE,
    )
    .unwrap();
    assert!(token.audience.is_empty(), "{:?}", token.audience);
    assert_eq!(token.expires_at, now + SignedDuration::from_secs(600));
    assert_eq!(token.scopes, strings(&["opaque/read"]));
}

// ---- 7. Redaction ----------------------------------------------------------------------------

#[tokio::test]
async fn debug_output_never_shows_secrets_or_tokens() {
    let idp = OidcServer::start().await;
    let tokens = client();
    for endpoint in [basic(&idp, M2M_BASIC), post(&idp, M2M_POST)] {
        let secret = match &endpoint.credentials {
            ClientCredentials::Basic(s) | ClientCredentials::Post(s) => s.expose().to_string(),
            _ => unreachable!(),
        };
        let req = client_credentials(ORDERS, &["orders/read"]);
        let response: TokenResponse = request(&idp, &tokens, &endpoint, &req).await.unwrap();
        let access_token = response.access_token.expose().to_string();
        assert!(access_token.len() > 20, "{}", access_token.len());
        let issued: IssuedToken = issue(
            response.clone(),
            Timestamp::now(),
            DEFAULT_LIFETIME,
            ORDERS,
            &req.scopes,
            Binding::NONE,
        )
        .unwrap();

        for printed in [
            format!("{endpoint:?}"),
            format!("{endpoint:#?}"),
            format!("{response:?}"),
            format!("{response:#?}"),
            format!("{issued:?}"),
            format!("{issued:#?}"),
        ] {
            assert!(!printed.contains(&secret), "client secret in {printed}");
            assert!(
                !printed.contains(&access_token),
                "access token in {printed}"
            );
            // Not even a recognisable part of the JWT (its header segment is the same for
            // every token, so look at the signature).
            let signature = access_token.rsplit('.').next().unwrap();
            assert!(!printed.contains(signature), "token signature in {printed}");
            assert!(printed.contains("[redacted]"), "{printed}");
        }
        // The non-secret parts are still there to debug with.
        assert!(format!("{endpoint:?}").contains(&endpoint.client_id));
        assert!(format!("{issued:?}").contains(ORDERS));
    }
}

// ---- 8. One POST per request -----------------------------------------------------------------

#[tokio::test]
async fn each_request_is_exactly_one_post() {
    let idp = OidcServer::start().await;
    let tokens = client();
    let start = idp.token_requests().await;
    assert_eq!(start.total, 0, "{start:?}");

    // Successes and failures alike: no retries, no second attempt with another method.
    let calls: Vec<(Endpoint, TokenRequest, bool)> = vec![
        (
            basic(&idp, M2M_BASIC),
            client_credentials(ORDERS, &["orders/read"]),
            true,
        ),
        (
            basic(&idp, M2M_BASIC),
            client_credentials(PAYMENTS, &["payments/read"]),
            true,
        ),
        (
            post(&idp, M2M_POST),
            client_credentials(ORDERS, &["orders/read"]),
            true,
        ),
        (
            basic(&idp, M2M_POST),
            client_credentials(ORDERS, &["orders/read"]),
            false,
        ),
        (
            basic(&idp, M2M_BASIC),
            client_credentials(UNKNOWN_RESOURCE, &[]),
            false,
        ),
    ];
    for (n, (endpoint, req, ok)) in calls.iter().enumerate() {
        // `request` asserts before/after: exactly one POST, for this client and resource.
        let result = request(&idp, &tokens, endpoint, req).await;
        assert_eq!(result.is_ok(), *ok, "call {n}: {result:?}");
        assert_eq!(idp.token_requests().await.total, n as u64 + 1);
    }

    let end = idp.token_requests().await;
    assert_eq!(end.total, calls.len() as u64);
    assert_eq!(end.for_resource(ORDERS), 3);
    assert_eq!(end.for_resource(PAYMENTS), 1);
    assert_eq!(end.for_resource(UNKNOWN_RESOURCE), 1);
    assert_eq!(end.for_client(M2M_BASIC.id), 3);
    assert_eq!(end.for_client(M2M_POST.id), 2);
}
