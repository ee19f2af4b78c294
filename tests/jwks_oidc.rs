//! The optional signature check (`verifyAccessTokenSignature`) against a real authorization
//! server (`tests/oidc-server`, oidc-provider): discovery names the JWKS, a real access token
//! verifies against the server's real keys, and a tampered one does not.
//!
//! Needs Node.js and `npm ci --prefix tests/oidc-server`.

mod support;

use std::time::Duration;

use audience_token_operator::oauth::jwks::{JwkSet, key_missing, verify_signature};
use audience_token_operator::oauth::jwt::decode_claims;
use audience_token_operator::oauth::{
    AudienceParam, ClientCredentials, Endpoint, Grant, Tls, TokenClient, TokenError, TokenRequest,
};
use audience_token_operator::redact::SecretString;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use support::oidc::*;
use url::Url;

const TIMEOUT: Duration = Duration::from_secs(10);

fn client() -> TokenClient {
    TokenClient::new().expect("token client")
}

/// A client-credentials token for `resource` from `idp`, as the raw access token.
async fn access_token(
    idp: &OidcServer,
    tokens: &TokenClient,
    resource: &str,
    scope: &str,
) -> String {
    let endpoint = Endpoint {
        token_endpoint: Url::parse(&idp.token_endpoint()).unwrap(),
        client_id: M2M_BASIC.id.to_string(),
        credentials: ClientCredentials::Basic(SecretString::new(M2M_BASIC.secret)),
        ca_bundle: None,
        client_certificate: None,
        timeout: TIMEOUT,
    };
    let request = TokenRequest {
        grant: Grant::ClientCredentials,
        scopes: vec![scope.to_string()],
        audience: AudienceParam::Resource(resource.to_string()),
        dpop: None,
        authorization_details: None,
    };
    let response = tokens
        .request(&endpoint, &request)
        .await
        .expect("token request");
    response.access_token.expose().to_string()
}

/// The server's metadata and its JWKS, the way the controller finds them.
async fn discovered_jwks(idp: &OidcServer, tokens: &TokenClient) -> (String, JwkSet) {
    let metadata = tokens
        .discover(
            &Url::parse(&idp.issuer).unwrap(),
            Tls::default(),
            TIMEOUT,
            false,
        )
        .await
        .expect("discovery");
    let jwks_uri = metadata.jwks_uri.expect("discovery names a jwks_uri");
    let jwks = tokens
        .fetch_jwks(&jwks_uri, Tls::default(), TIMEOUT, false)
        .await
        .expect("JWKS");
    (metadata.issuer, jwks)
}

fn signature_error(result: Result<(), TokenError>) -> String {
    match result {
        Err(TokenError::SignatureInvalid(message)) => message,
        other => panic!("expected SignatureInvalid, got {other:?}"),
    }
}

#[tokio::test]
async fn discovery_exposes_the_jwks_uri() {
    let idp = OidcServer::start().await;
    let metadata = client()
        .discover(
            &Url::parse(&idp.issuer).unwrap(),
            Tls::default(),
            TIMEOUT,
            false,
        )
        .await
        .expect("discovery");
    assert_eq!(
        metadata.jwks_uri.map(String::from),
        Some(idp.jwks_uri()),
        "jwks_uri from the metadata document"
    );
}

#[tokio::test]
async fn a_real_token_verifies_against_the_real_jwks() {
    let idp = OidcServer::start().await;
    let tokens = client();
    let (issuer, jwks) = discovered_jwks(&idp, &tokens).await;
    assert!(!jwks.keys.is_empty(), "the server publishes signing keys");
    for (resource, scope) in [(ORDERS, "orders/read"), (PAYMENTS, "payments/read")] {
        let token = access_token(&idp, &tokens, resource, scope).await;
        assert!(decode_claims(&token).is_some(), "{resource}: a JWT");
        assert!(!key_missing(&token, &jwks));
        verify_signature(&token, &jwks, Some(&issuer))
            .unwrap_or_else(|e| panic!("{resource}: {e}"));
        // The issuer as configured (no trailing slash) and as copied with one.
        verify_signature(&token, &jwks, Some(&format!("{}/", idp.issuer))).unwrap();
    }
}

#[tokio::test]
async fn a_tampered_token_fails() {
    let idp = OidcServer::start().await;
    let tokens = client();
    let (issuer, jwks) = discovered_jwks(&idp, &tokens).await;
    let token = access_token(&idp, &tokens, ORDERS, "orders/read").await;
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);

    // One payload character flipped.
    let mut payload = parts[1].as_bytes().to_vec();
    let at = payload.len() / 2;
    payload[at] = if payload[at] == b'A' { b'B' } else { b'A' };
    let flipped = format!(
        "{}.{}.{}",
        parts[0],
        String::from_utf8(payload).unwrap(),
        parts[2]
    );
    let message = signature_error(verify_signature(&flipped, &jwks, Some(&issuer)));
    assert!(
        !message.contains(&token),
        "the message never carries the token"
    );

    // A widened audience with the original signature.
    let mut claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    claims["aud"] = serde_json::json!(PAYMENTS);
    let widened = format!(
        "{}.{}.{}",
        parts[0],
        URL_SAFE_NO_PAD.encode(claims.to_string()),
        parts[2]
    );
    let message = signature_error(verify_signature(&widened, &jwks, Some(&issuer)));
    assert!(message.contains("does not verify"), "{message}");

    // The real token, but expected from another issuer.
    let message = signature_error(verify_signature(
        &token,
        &jwks,
        Some("http://127.0.0.1:1/other"),
    ));
    assert!(message.contains("is not the issuer"), "{message}");

    // Keys from a server started later (new keys, new kid): the key is missing.
    let other = OidcServer::start().await;
    let (_, other_jwks) = discovered_jwks(&other, &tokens).await;
    assert!(key_missing(&token, &other_jwks));
    let message = signature_error(verify_signature(&token, &other_jwks, None));
    assert!(message.contains("no key with kid"), "{message}");
}

#[tokio::test]
async fn jwks_fetch_failures_are_reported() {
    let idp = OidcServer::start().await;
    let tokens = client();
    let missing = Url::parse(&format!("{}/no-such-jwks", idp.issuer)).unwrap();
    let message = signature_error(
        tokens
            .fetch_jwks(&missing, Tls::default(), TIMEOUT, false)
            .await
            .map(|_| ()),
    );
    assert!(message.contains("HTTP 404"), "{message}");
    // Keys decide what is trusted: plain http only on loopback, as for credentials.
    let remote = Url::parse("http://idp.example.com/jwks").unwrap();
    let err = tokens
        .fetch_jwks(&remote, Tls::default(), TIMEOUT, false)
        .await
        .unwrap_err();
    assert!(matches!(err, TokenError::Config(_)), "{err:?}");
}

#[tokio::test]
async fn opaque_tokens_are_not_jwts() {
    // The controller skips opaque tokens (they cannot be verified locally); the verifier
    // itself refuses them rather than pretending.
    let idp = OidcServer::start().await;
    let tokens = client();
    let (issuer, jwks) = discovered_jwks(&idp, &tokens).await;
    let token = access_token(&idp, &tokens, OPAQUE, "opaque/read").await;
    assert!(decode_claims(&token).is_none());
    signature_error(verify_signature(&token, &jwks, Some(&issuer)));
}
