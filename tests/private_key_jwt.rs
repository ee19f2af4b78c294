//! `private_key_jwt` client authentication (RFC 7523 §2.2/§3) against a real authorization
//! server (`tests/oidc-server`, oidc-provider): RS256, PS256, ES256 and ES384 keys in PEM
//! (PKCS#8, PKCS#1, SEC1) and JWK form, both assertion audiences, a fresh assertion for every
//! request (a replayed one is refused), and wrong keys refused.
//!
//! What oidc-provider 9 checks (lib/shared/jwt_client_auth.js): the header `alg` equals the
//! client's registered `token_endpoint_auth_signing_alg`; `exp`, `jti` and `iss` are present
//! and `iss` is the client id (`sub` selects the client); `aud` is the issuer identifier, the
//! token endpoint URL or the URL of the endpoint called (a string, or an array holding one of
//! them); the signature verifies with the client's registered JWKS (15 s clock tolerance);
//! `iss`+`jti` has not been seen before (remembered until `exp` + 15 s). `iat` and `nbf` are
//! optional and no upper bound on `exp` is enforced.
//!
//! Needs Node.js and `npm ci --prefix tests/oidc-server`.

mod support;

use std::sync::Arc;
use std::time::Duration;

use audience_token_operator::oauth::assertion::{ClientKey, KeyKind, SigningAlg};
use audience_token_operator::oauth::jwt::decode_claims;
use audience_token_operator::oauth::request::{PreparedRequest, prepare};
use audience_token_operator::oauth::{
    AudienceParam, ClientCredentials, Endpoint, Grant, TokenClient, TokenError, TokenRequest,
};
use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use support::oidc::{
    M2M_JWT_ES256, M2M_JWT_ES384, M2M_JWT_PS256, M2M_JWT_RS256, ORDERS, OidcServer, PAYMENTS,
    TestClient,
};
use url::Url;

const TIMEOUT: Duration = Duration::from_secs(10);

fn endpoint(idp: &OidcServer, client: TestClient, key: ClientKey, audience: &str) -> Endpoint {
    Endpoint {
        token_endpoint: Url::parse(&idp.token_endpoint()).expect("token endpoint URL"),
        client_id: client.id.to_string(),
        credentials: ClientCredentials::PrivateKeyJwt {
            key: Arc::new(key),
            audience: audience.to_string(),
        },
        ca_bundle: None,
        client_certificate: None,
        timeout: TIMEOUT,
    }
}

fn for_resource(resource: &str) -> TokenRequest {
    TokenRequest {
        grant: Grant::ClientCredentials,
        scopes: vec![],
        audience: AudienceParam::Resource(resource.to_string()),
        dpop: None,
        authorization_details: None,
    }
}

/// Asks for a token and checks it is a JWT for exactly `resource`.
async fn expect_token(endpoint: &Endpoint, resource: &str, what: &str) {
    let response = TokenClient::new()
        .unwrap()
        .request(endpoint, &for_resource(resource))
        .await
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let claims = decode_claims(response.access_token.expose())
        .unwrap_or_else(|| panic!("{what}: the token is not a JWT"));
    assert_eq!(claims.aud, vec![resource.to_string()], "{what}");
    assert_eq!(claims.raw["client_id"], endpoint.client_id, "{what}");
}

async fn expect_invalid_client(endpoint: &Endpoint, what: &str) -> TokenError {
    let result = TokenClient::new()
        .unwrap()
        .request(endpoint, &for_resource(ORDERS))
        .await;
    match result {
        Err(err) if err.oauth_error() == Some("invalid_client") => {
            assert!(err.is_client_auth_failure(), "{what}: {err}");
            err
        }
        Err(other) => panic!("{what}: expected invalid_client, got {other}"),
        Ok(_) => panic!("{what}: expected invalid_client, got a token"),
    }
}

fn alg(name: &str) -> SigningAlg {
    SigningAlg::from_name(name).unwrap_or_else(|| panic!("unexpected alg {name}"))
}

/// Contents of one DER element with `tag`, and the rest.
fn der(input: &[u8], tag: u8) -> (&[u8], &[u8]) {
    assert_eq!(input[0], tag, "unexpected DER tag");
    let (len, header) = match input[1] {
        n if n < 0x80 => (usize::from(n), 2),
        n => {
            let count = usize::from(n & 0x7f);
            let len = input[2..2 + count]
                .iter()
                .fold(0, |acc, b| (acc << 8) | usize::from(*b));
            (len, 2 + count)
        }
    };
    input[header..].split_at(len)
}

fn pem_der(pem: &str) -> Vec<u8> {
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    STANDARD.decode(body).unwrap()
}

fn pem(label: &str, der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let lines: Vec<String> = b64
        .as_bytes()
        .chunks(64)
        .map(|c| String::from_utf8(c.to_vec()).unwrap())
        .collect();
    format!(
        "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
        lines.join("\n")
    )
}

/// The server's PKCS#8 PEM in the traditional form: PKCS#1 for RSA, SEC1 for EC.
fn traditional_pem(pkcs8_pem: &str, alg: SigningAlg) -> String {
    let pkcs8 = pem_der(pkcs8_pem);
    match alg {
        SigningAlg::RS256 | SigningAlg::PS256 => {
            // PrivateKeyInfo { version, algorithm, privateKey OCTET STRING (RSAPrivateKey) }
            let (info, _) = der(&pkcs8, 0x30);
            let (_, rest) = der(info, 0x02);
            let (_, rest) = der(rest, 0x30);
            let (pkcs1, _) = der(rest, 0x04);
            pem("RSA PRIVATE KEY", pkcs1)
        }
        SigningAlg::ES256 | SigningAlg::ES384 => {
            let curve = if alg == SigningAlg::ES256 {
                &ECDSA_P256_SHA256_FIXED_SIGNING
            } else {
                &ECDSA_P384_SHA384_FIXED_SIGNING
            };
            let pair = EcdsaKeyPair::from_pkcs8(curve, &pkcs8).unwrap();
            pem(
                "EC PRIVATE KEY",
                pair.private_key().as_der().unwrap().as_ref(),
            )
        }
    }
}

fn form_value<'a>(prepared: &'a PreparedRequest, name: &str) -> &'a str {
    &prepared
        .form
        .iter()
        .find(|(n, _)| *n == name)
        .unwrap_or_else(|| panic!("no {name} in the form"))
        .1
}

fn assertion_part(assertion: &str, index: usize) -> serde_json::Value {
    let part = assertion.split('.').nth(index).expect("a JWS part");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).unwrap()).unwrap()
}

// ---- Every algorithm, every key form ----------------------------------------------------------

#[tokio::test]
async fn every_algorithm_and_key_form_gets_a_single_audience_token() {
    let idp = OidcServer::start().await;
    let cases = [
        (M2M_JWT_RS256, KeyKind::Rsa { bits: 2048 }),
        (M2M_JWT_PS256, KeyKind::Rsa { bits: 2048 }),
        (M2M_JWT_ES256, KeyKind::EcP256),
        (M2M_JWT_ES384, KeyKind::EcP384),
    ];
    for (client, kind) in cases {
        let server_key = idp.client_private_key(client.id).await;
        let alg = alg(&server_key.alg);
        let traditional = traditional_pem(&server_key.pem, alg);
        assert!(
            traditional.starts_with("-----BEGIN RSA PRIVATE KEY-----")
                || traditional.starts_with("-----BEGIN EC PRIVATE KEY-----")
        );
        // PEM carries no algorithm: configure it (RSA keys would default to RS256). The JWK
        // carries its `alg` and `kid`, so nothing needs configuring.
        let forms = [
            ("PKCS#8 PEM", server_key.pem.clone(), Some(alg)),
            ("PKCS#1/SEC1 PEM", traditional, Some(alg)),
            ("JWK", server_key.jwk.to_string(), None),
        ];
        for (form, text, configured) in forms {
            let what = format!("{} with {form}", client.id);
            let key = ClientKey::parse(&text, configured, Some(&server_key.kid))
                .unwrap_or_else(|e| panic!("{what}: {e}"));
            assert_eq!(key.algorithm(), alg, "{what}");
            assert_eq!(key.kind(), kind, "{what}");
            assert_eq!(key.key_id(), Some(server_key.kid.as_str()), "{what}");
            let endpoint = endpoint(&idp, client, key, &idp.issuer);
            expect_token(&endpoint, ORDERS, &what).await;
            expect_token(&endpoint, PAYMENTS, &what).await;
        }
        // EC keys need no configured algorithm at all: the curve decides.
        if matches!(kind, KeyKind::EcP256 | KeyKind::EcP384) {
            let key = ClientKey::parse(&server_key.pem, None, None).unwrap();
            assert_eq!(key.algorithm(), alg);
            expect_token(
                &endpoint(&idp, client, key, &idp.issuer),
                ORDERS,
                "derived alg",
            )
            .await;
        }
    }
}

// ---- assertionAudience ------------------------------------------------------------------------

#[tokio::test]
async fn issuer_and_token_endpoint_audiences_are_both_accepted() {
    let idp = OidcServer::start().await;
    let server_key = idp.client_private_key(M2M_JWT_ES256.id).await;
    let key = || ClientKey::parse(&server_key.pem, None, None).unwrap();
    for audience in [idp.issuer.clone(), idp.token_endpoint()] {
        let endpoint = endpoint(&idp, M2M_JWT_ES256, key(), &audience);
        let prepared = prepare(&endpoint, &for_resource(ORDERS)).unwrap();
        assert_eq!(
            assertion_part(form_value(&prepared, "client_assertion"), 1)["aud"],
            audience.as_str()
        );
        expect_token(&endpoint, ORDERS, &format!("aud {audience}")).await;
    }
    // The server does check `aud`.
    let elsewhere = endpoint(&idp, M2M_JWT_ES256, key(), "https://elsewhere.example.test");
    let err = expect_invalid_client(&elsewhere, "a foreign aud").await;
    assert!(!err.to_string().contains(&server_key.pem[40..80]), "{err}");
}

// ---- A new assertion for every request --------------------------------------------------------

#[tokio::test]
async fn every_request_carries_a_new_assertion_and_a_replay_is_refused() {
    let idp = OidcServer::start().await;
    let server_key = idp.client_private_key(M2M_JWT_RS256.id).await;
    let key = ClientKey::parse(&server_key.pem, None, Some(&server_key.kid)).unwrap();
    let endpoint = endpoint(&idp, M2M_JWT_RS256, key, &idp.issuer);
    let request = for_resource(ORDERS);

    // Two requests, two different assertions.
    let first = prepare(&endpoint, &request).unwrap();
    let second = prepare(&endpoint, &request).unwrap();
    let (a, b) = (
        form_value(&first, "client_assertion"),
        form_value(&second, "client_assertion"),
    );
    assert_ne!(a, b);
    let (claims_a, claims_b) = (assertion_part(a, 1), assertion_part(b, 1));
    assert_ne!(claims_a["jti"], claims_b["jti"]);
    for claims in [&claims_a, &claims_b] {
        assert_eq!(claims["iss"], M2M_JWT_RS256.id);
        assert_eq!(claims["sub"], M2M_JWT_RS256.id);
        assert_eq!(claims["aud"], idp.issuer.as_str());
        let lifetime = claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap();
        assert!((1..=60).contains(&lifetime), "{claims}");
    }
    let header = assertion_part(a, 0);
    assert_eq!(header["alg"], "RS256");
    assert_eq!(header["typ"], "JWT");
    assert_eq!(header["kid"], server_key.kid.as_str());
    assert_eq!(
        form_value(&first, "client_assertion_type"),
        "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
    );
    assert_eq!(form_value(&first, "client_id"), M2M_JWT_RS256.id);

    // Sent by hand: the first use of an assertion works, its replay is invalid_client, and
    // the other (fresh) assertion still works.
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let post =
        |prepared: &PreparedRequest| http.post(idp.token_endpoint()).form(&prepared.form).send();
    let ok = post(&first).await.unwrap();
    assert_eq!(ok.status(), 200, "{:?}", ok.text().await);
    let replay = post(&first).await.unwrap();
    assert_eq!(replay.status(), 401);
    let body: serde_json::Value = replay.json().await.unwrap();
    assert_eq!(body["error"], "invalid_client", "{body}");
    let fresh = post(&second).await.unwrap();
    assert_eq!(fresh.status(), 200, "{:?}", fresh.text().await);

    // So the library must (and does) sign anew every time: back-to-back requests all work.
    let before = idp.token_requests().await;
    for i in 0..3 {
        expect_token(&endpoint, ORDERS, &format!("request {i}")).await;
    }
    let after = idp.token_requests().await;
    assert_eq!(
        after.for_client(M2M_JWT_RS256.id),
        before.for_client(M2M_JWT_RS256.id) + 3
    );
}

// ---- Wrong keys -------------------------------------------------------------------------------

#[tokio::test]
async fn a_wrong_key_is_invalid_client() {
    let idp = OidcServer::start().await;

    // A P-256 key the server has never seen, for the ES256 client.
    let stranger = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
    let stranger_pem = pem("PRIVATE KEY", stranger.to_pkcs8v1().unwrap().as_ref());
    let key = ClientKey::parse(&stranger_pem, None, None).unwrap();
    expect_invalid_client(
        &endpoint(&idp, M2M_JWT_ES256, key, &idp.issuer),
        "an unknown key",
    )
    .await;

    // The RS256 client's (valid, RSA) key presented by the PS256 client.
    let rs256 = idp.client_private_key(M2M_JWT_RS256.id).await;
    let key = ClientKey::parse(&rs256.pem, Some(SigningAlg::PS256), None).unwrap();
    expect_invalid_client(
        &endpoint(&idp, M2M_JWT_PS256, key, &idp.issuer),
        "another client's key",
    )
    .await;

    // The right key with an algorithm other than the registered one.
    let ps256 = idp.client_private_key(M2M_JWT_PS256.id).await;
    let key = ClientKey::parse(&ps256.pem, Some(SigningAlg::RS256), None).unwrap();
    expect_invalid_client(
        &endpoint(&idp, M2M_JWT_PS256, key, &idp.issuer),
        "the registered key with RS256 instead of PS256",
    )
    .await;
}

// ---- Redaction --------------------------------------------------------------------------------

#[tokio::test]
async fn debug_output_shows_neither_key_nor_assertion() {
    let idp = OidcServer::start().await;
    let server_key = idp.client_private_key(M2M_JWT_ES384.id).await;
    let key = ClientKey::parse(&server_key.jwk.to_string(), None, None).unwrap();
    let endpoint = endpoint(&idp, M2M_JWT_ES384, key, &idp.issuer);
    let prepared = prepare(&endpoint, &for_resource(ORDERS)).unwrap();
    let assertion = form_value(&prepared, "client_assertion").to_string();
    let printed = format!("{endpoint:?} {prepared:?}");
    let d = server_key.jwk["d"].as_str().unwrap();
    assert!(!printed.contains(d), "{printed}");
    assert!(!printed.contains(&server_key.pem[30..70]), "{printed}");
    assert!(!printed.contains(&assertion[..30]), "{printed}");
    assert!(
        printed.contains("ES384") && printed.contains("[redacted]"),
        "{printed}"
    );
}
