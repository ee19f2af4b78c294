//! DPoP (RFC 9449) through the library's token client against a real authorization server
//! (`tests/oidc-server`, oidc-provider with its dPoP feature): DPoP-bound tokens and their
//! checks, server nonces with one retry, every algorithm, and a resource server's check of
//! the token plus a proof.
//!
//! Needs Node.js and `npm ci --prefix tests/oidc-server`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use audience_token_operator::oauth::assertion::ClientKey;
use audience_token_operator::oauth::jwt::decode_claims;
use audience_token_operator::oauth::{
    AudienceParam, Binding, ClientCredentials, DpopAlgorithm, DpopKey, Endpoint, Grant,
    IssuedToken, TokenClient, TokenError, TokenRequest, issue,
};
use audience_token_operator::redact::SecretString;
use jiff::Timestamp;
use support::oidc::*;
use url::Url;

const TIMEOUT: Duration = Duration::from_secs(10);
const DEFAULT_LIFETIME: Duration = Duration::from_secs(1234);
const ALGORITHMS: [DpopAlgorithm; 4] = [
    DpopAlgorithm::ES256,
    DpopAlgorithm::ES384,
    DpopAlgorithm::PS256,
    DpopAlgorithm::RS256,
];

fn dpop_client(idp: &OidcServer) -> Endpoint {
    idp.endpoint(
        M2M_DPOP.id,
        ClientCredentials::Basic(SecretString::new(M2M_DPOP.secret)),
    )
}

fn orders(key: Option<&Arc<DpopKey>>) -> TokenRequest {
    TokenRequest {
        grant: Grant::ClientCredentials,
        scopes: vec!["orders/read".into()],
        audience: AudienceParam::Resource(ORDERS.into()),
        dpop: key.cloned(),
        authorization_details: None,
    }
}

fn new_key(algorithm: DpopAlgorithm) -> Arc<DpopKey> {
    Arc::new(DpopKey::generate(algorithm).expect("DPoP key"))
}

/// Asks for a DPoP-bound orders token with `key` and checks it as the operator would.
async fn bound_token(
    tokens: &TokenClient,
    endpoint: &Endpoint,
    key: &Arc<DpopKey>,
) -> Result<IssuedToken, TokenError> {
    let request = orders(Some(key));
    let response = tokens.request(endpoint, &request).await?;
    issue(
        response,
        Timestamp::now(),
        DEFAULT_LIFETIME,
        ORDERS,
        &request.scopes,
        Binding {
            dpop_jkt: Some(key.thumbprint()),
            ..Binding::NONE
        },
    )
}

fn cnf_jkt(token: &IssuedToken) -> String {
    let claims = decode_claims(token.access_token.expose()).expect("a JWT access token");
    claims.raw["cnf"]["jkt"]
        .as_str()
        .expect("cnf.jkt in the token")
        .to_string()
}

/// The token is accepted with a proof of `key`, refused alone and with another key's proof.
async fn check_at_resource(idp: &OidcServer, token: &IssuedToken, key: &DpopKey) {
    let access_token = token.access_token.expose();
    let url = idp.resource_url();
    let proof = key
        .proof("GET", &url, None, Some(access_token))
        .expect("proof");
    let (status, body) = idp.call_resource(Some(access_token), Some(&proof)).await;
    assert_eq!(
        status,
        200,
        "{} token with its key's proof: {body}",
        key.algorithm()
    );
    assert_eq!(body["jkt"], key.thumbprint());

    let (status, body) = idp.call_resource(Some(access_token), None).await;
    assert_eq!(status, 401, "token without proof: {body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("no DPoP proof"),
        "{body}"
    );

    let other = DpopKey::generate(key.algorithm()).expect("another key");
    let proof = other
        .proof("GET", &url, None, Some(access_token))
        .expect("proof");
    let (status, body) = idp.call_resource(Some(access_token), Some(&proof)).await;
    assert_eq!(status, 401, "token with another key's proof: {body}");
    assert!(
        body["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("cnf.jkt"),
        "{body}"
    );
}

#[tokio::test]
async fn a_dpop_bound_token_works_only_with_proofs_of_its_key() {
    let idp = OidcServer::start().await;
    let tokens = TokenClient::new().expect("token client");
    let endpoint = dpop_client(&idp);
    let key = new_key(DpopAlgorithm::default());

    let token = bound_token(&tokens, &endpoint, &key)
        .await
        .expect("bound token");
    assert_eq!(token.token_type, "DPoP");
    assert_eq!(cnf_jkt(&token), key.thumbprint());
    assert_eq!(token.audience, vec![ORDERS.to_string()]);
    check_at_resource(&idp, &token, &key).await;

    // A proof for another URL, method or token is refused too.
    let access_token = token.access_token.expose();
    let url = idp.resource_url();
    for (method, url, ath) in [
        ("POST", url.as_str(), access_token),
        ("GET", "http://127.0.0.1:1/__test/resource", access_token),
        ("GET", url.as_str(), "another-token"),
    ] {
        let proof = key.proof(method, url, None, Some(ath)).expect("proof");
        let (status, body) = idp.call_resource(Some(access_token), Some(&proof)).await;
        assert_eq!(status, 401, "{method} {url}: {body}");
    }

    // Without a key the client's request is refused: its tokens must be DPoP-bound.
    let err = tokens
        .request(&endpoint, &orders(None))
        .await
        .expect_err("no DPoP proof");
    assert_eq!(err.oauth_error(), Some("invalid_grant"), "{err}");
}

#[tokio::test]
async fn a_token_not_bound_to_the_key_is_refused() {
    let idp = OidcServer::start().await;
    let tokens = TokenClient::new().expect("token client");
    let key = new_key(DpopAlgorithm::ES256);
    let endpoint = dpop_client(&idp);
    let response = tokens
        .request(&endpoint, &orders(Some(&key)))
        .await
        .expect("token response");
    // The same answer checked against another key: bound, but not to that key.
    let other = new_key(DpopAlgorithm::ES256);
    let err = issue(
        response.clone(),
        Timestamp::now(),
        DEFAULT_LIFETIME,
        ORDERS,
        &[],
        Binding {
            dpop_jkt: Some(other.thumbprint()),
            ..Binding::NONE
        },
    )
    .expect_err("bound to another key");
    assert!(
        matches!(err, TokenError::DpopBindingMismatch { .. }),
        "{err}"
    );
    assert!(err.to_string().contains(key.thumbprint()), "{err}");
    assert!(
        !err.to_string().contains(response.access_token.expose()),
        "{err}"
    );

    // A Bearer token (m2m-basic, no DPoP) checked as if a DPoP key had been used.
    let basic = endpoint_basic(&idp);
    let bearer = tokens
        .request(&basic, &orders(None))
        .await
        .expect("bearer token");
    let err = issue(
        bearer,
        Timestamp::now(),
        DEFAULT_LIFETIME,
        ORDERS,
        &[],
        Binding {
            dpop_jkt: Some(key.thumbprint()),
            ..Binding::NONE
        },
    )
    .expect_err("a Bearer token");
    assert!(err.to_string().contains("token_type \"Bearer\""), "{err}");
}

fn endpoint_basic(idp: &OidcServer) -> Endpoint {
    idp.endpoint(
        M2M_BASIC.id,
        ClientCredentials::Basic(SecretString::new(M2M_BASIC.secret)),
    )
}

#[tokio::test]
async fn a_demanded_nonce_is_retried_once_and_remembered() {
    let idp = OidcServer::start().await;
    idp.require_dpop_nonce(true).await;
    let tokens = TokenClient::new().expect("token client");
    let endpoint = dpop_client(&idp);
    let key = new_key(DpopAlgorithm::ES256);
    assert_eq!(tokens.dpop_nonce(&endpoint.token_endpoint), None);

    idp.reset_counts().await;
    let token = bound_token(&tokens, &endpoint, &key)
        .await
        .expect("token after one retry");
    assert_eq!(cnf_jkt(&token), key.thumbprint());
    let counts = idp.token_requests().await;
    assert_eq!(counts.total, 2, "{counts:?}");
    assert_eq!(counts.errors("use_dpop_nonce"), 1, "{counts:?}");
    assert!(tokens.dpop_nonce(&endpoint.token_endpoint).is_some());

    // The remembered nonce makes the next request succeed at once.
    idp.reset_counts().await;
    let again = bound_token(&tokens, &endpoint, &key)
        .await
        .expect("second token");
    assert_eq!(cnf_jkt(&again), key.thumbprint());
    let counts = idp.token_requests().await;
    assert_eq!(counts.total, 1, "{counts:?}");
    assert!(counts.by_error.is_empty(), "{counts:?}");
    check_at_resource(&idp, &again, &key).await;
}

#[tokio::test]
async fn a_nonce_retry_signs_a_new_client_assertion() {
    // private_key_jwt: the server refuses a replayed assertion `jti`, so the retry must
    // carry a new assertion as well as a new proof. (oidc-provider binds the token of any
    // client that sends a proof.)
    let idp = OidcServer::start().await;
    idp.require_dpop_nonce(true).await;
    let tokens = TokenClient::new().expect("token client");
    let served = idp.client_private_key(M2M_JWT_ES256.id).await;
    let client_key = ClientKey::parse(&served.pem, None, Some(&served.kid)).expect("client key");
    let endpoint = idp.endpoint(
        M2M_JWT_ES256.id,
        ClientCredentials::PrivateKeyJwt {
            key: Arc::new(client_key),
            audience: idp.issuer.clone(),
        },
    );
    let key = new_key(DpopAlgorithm::ES384);
    idp.reset_counts().await;
    let token = bound_token(&tokens, &endpoint, &key)
        .await
        .expect("token after one retry");
    assert_eq!(token.token_type, "DPoP");
    assert_eq!(cnf_jkt(&token), key.thumbprint());
    let counts = idp.token_requests().await;
    assert_eq!(counts.total, 2, "{counts:?}");
    assert_eq!(counts.errors("use_dpop_nonce"), 1, "{counts:?}");
}

/// A token endpoint that answers every request with 400 `use_dpop_nonce` and a new
/// `DPoP-Nonce`; returns its URL and the `DPoP` header of each request it got.
async fn always_demanding_nonces() -> (Url, Arc<std::sync::Mutex<Vec<String>>>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let url = Url::parse(&format!(
        "http://{}/token",
        listener.local_addr().expect("addr")
    ))
    .expect("url");
    let proofs = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = proofs.clone();
    tokio::spawn(async move {
        let mut n = 0;
        while let Ok((mut socket, _)) = listener.accept().await {
            n += 1;
            let mut request = Vec::new();
            let mut buf = [0u8; 4096];
            // Headers, then as many body bytes as Content-Length says.
            while let Ok(read @ 1..) = socket.read(&mut buf).await {
                request.extend_from_slice(&buf[..read]);
                let text = String::from_utf8_lossy(&request).to_string();
                if let Some(end) = text.find("\r\n\r\n") {
                    let length = text[..end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    if request.len() >= end + 4 + length {
                        break;
                    }
                }
            }
            let text = String::from_utf8_lossy(&request).to_string();
            if let Some(proof) = text.lines().find_map(|l| {
                l.strip_prefix("dpop: ")
                    .or_else(|| l.strip_prefix("DPoP: "))
            }) {
                seen.lock().unwrap().push(proof.trim().to_string());
            }
            let body = r#"{"error":"use_dpop_nonce","error_description":"nonce required"}"#;
            let response = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ndpop-nonce: nonce-{n}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = socket.write_all(response.as_bytes()).await;
            let _ = socket.shutdown().await;
        }
    });
    (url, proofs)
}

fn proof_claims(proof: &str) -> serde_json::Value {
    use base64::Engine;
    let payload = proof.split('.').nth(1).expect("JWS payload");
    let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .expect("base64url");
    serde_json::from_slice(&json).expect("claims JSON")
}

#[tokio::test]
async fn a_server_that_keeps_demanding_nonces_gets_one_retry_only() {
    let (url, proofs) = always_demanding_nonces().await;
    let tokens = TokenClient::new().expect("token client");
    let endpoint = Endpoint {
        token_endpoint: url.clone(),
        client_id: "c".into(),
        credentials: ClientCredentials::None,
        ca_bundle: None,
        client_certificate: None,
        timeout: TIMEOUT,
    };
    let key = new_key(DpopAlgorithm::ES256);
    let err = tokens
        .request(&endpoint, &orders(Some(&key)))
        .await
        .expect_err("refused");
    assert_eq!(err.oauth_error(), Some("use_dpop_nonce"), "{err}");
    let proofs = proofs.lock().unwrap().clone();
    assert_eq!(proofs.len(), 2, "one request and exactly one retry");
    let (first, second) = (proof_claims(&proofs[0]), proof_claims(&proofs[1]));
    assert!(first.get("nonce").is_none(), "{first}");
    assert_eq!(second["nonce"], "nonce-1");
    assert_ne!(first["jti"], second["jti"]);
    assert_eq!(second["htm"], "POST");
    assert_eq!(second["htu"], url.as_str());
    // The newest nonce is remembered for the next request.
    assert_eq!(tokens.dpop_nonce(&url).as_deref(), Some("nonce-2"));
}

#[tokio::test]
async fn every_algorithm_gets_a_bound_token_that_the_resource_accepts() {
    let idp = OidcServer::start().await;
    let tokens = TokenClient::new().expect("token client");
    let endpoint = dpop_client(&idp);
    for algorithm in ALGORITHMS {
        let key = new_key(algorithm);
        let token = bound_token(&tokens, &endpoint, &key)
            .await
            .unwrap_or_else(|e| panic!("{algorithm}: {e}"));
        assert_eq!(token.token_type, "DPoP", "{algorithm}");
        assert_eq!(cnf_jkt(&token), key.thumbprint(), "{algorithm}");
        check_at_resource(&idp, &token, &key).await;
        // The key survives export and import: the stored key still makes valid proofs.
        let stored = DpopKey::from_private_jwk(key.private_jwk().expose()).expect("stored key");
        let proof = stored
            .proof(
                "GET",
                &idp.resource_url(),
                None,
                Some(token.access_token.expose()),
            )
            .expect("proof");
        let (status, body) = idp
            .call_resource(Some(token.access_token.expose()), Some(&proof))
            .await;
        assert_eq!(status, 200, "{algorithm}, stored key: {body}");
    }
}
