//! Transport failures name their cause: what the token, discovery and JWKS requests report
//! (and so what status, Events and logs show, through `Failure`) when the server's
//! certificate is not signed by the `caBundle`, or when the connection is refused, the name does not resolve, or the server never answers.
//! reqwest's own text ("error sending request for url …") says none of that.
//!
//! Needs Node.js and `npm ci --prefix tests/oidc-server`.

mod support;

use std::time::Duration;

use audience_token_operator::failure::Failure;
use audience_token_operator::oauth::{
    AudienceParam, ClientCredentials, Endpoint, Grant, Tls, TokenClient, TokenError, TokenRequest,
    error_chain,
};
use audience_token_operator::redact::SecretString;
use support::certs::{TestPki, self_signed};
use support::oidc::{M2M_BASIC, ORDERS, OidcServer};
use url::Url;

fn request() -> TokenRequest {
    TokenRequest {
        grant: Grant::ClientCredentials,
        scopes: vec!["orders/read".into()],
        audience: AudienceParam::Resource(ORDERS.into()),
        dpop: None,
        authorization_details: None,
    }
}

fn endpoint(token_endpoint: &str, ca_bundle: Option<&str>, timeout: Duration) -> Endpoint {
    Endpoint {
        token_endpoint: Url::parse(token_endpoint).expect("URL"),
        client_id: M2M_BASIC.id.into(),
        credentials: ClientCredentials::Basic(SecretString::new(M2M_BASIC.secret)),
        ca_bundle: ca_bundle.map(str::to_string),
        client_certificate: None,
        timeout,
    }
}

/// The message a user sees: the Failure's, as status, Events and logs carry it.
fn shown(error: &TokenError) -> String {
    let failure = Failure::from_token_error(error);
    assert_eq!(
        failure.message,
        error_chain(error),
        "status shows the whole chain"
    );
    failure.message
}

fn assert_names(message: &str, causes: &[&str]) {
    assert!(
        causes.iter().any(|c| message.contains(c)),
        "expected one of {causes:?} in: {message}"
    );
}

/// A server certificate the `caBundle` does not sign: the token request, discovery and the
/// JWKS fetch all say so. (A certificate for another host name is reported the same way,
/// by rustls' `NotValidForName`; the test certificates name every loopback name.)
#[tokio::test]
async fn certificate_problems_are_named_for_token_discovery_and_jwks() {
    let pki = TestPki::generate();
    let other_ca = TestPki::generate();
    let idp = OidcServer::start_mtls(&pki, &self_signed("m2m-self-signed")).await;
    let client = TokenClient::new().expect("client");
    let timeout = Duration::from_secs(10);
    let untrusted = Tls {
        ca_bundle: Some(&other_ca.ca_pem),
        client_certificate: None,
    };
    // Both test CAs have the same name, so rustls finds "the" issuer and its signature
    // fails (BadSignature); an unrelated CA gives UnknownIssuer. Either way rustls says so.
    const UNKNOWN_ISSUER: &[&str] = &["invalid peer certificate"];

    let token = client
        .request(
            &endpoint(&idp.token_endpoint(), Some(&other_ca.ca_pem), timeout),
            &request(),
        )
        .await
        .expect_err("an untrusted certificate fails the token request");
    assert!(matches!(token, TokenError::Transport { .. }), "{token:?}");
    let message = shown(&token);
    assert_names(&message, UNKNOWN_ISSUER);
    assert!(message.contains(&idp.token_endpoint()), "{message}");

    let issuer = Url::parse(&idp.issuer).expect("issuer URL");
    let discovery = client
        .discover(&issuer, untrusted, timeout, false)
        .await
        .expect_err("an untrusted certificate fails discovery");
    assert_names(&shown(&discovery), UNKNOWN_ISSUER);

    let jwks = Url::parse(&idp.jwks_uri()).expect("JWKS URL");
    let keys = client
        .fetch_jwks(&jwks, untrusted, timeout, false)
        .await
        .expect_err("an untrusted certificate fails the JWKS fetch");
    assert_names(&shown(&keys), UNKNOWN_ISSUER);

    // The right CA and name: the same request succeeds, so the failures above are theirs.
    client
        .request(
            &endpoint(&idp.token_endpoint(), Some(&pki.ca_pem), timeout),
            &request(),
        )
        .await
        .expect("the trusted server answers");
}

/// A refused connection, a name that does not resolve and a server that never answers.
#[tokio::test]
async fn connection_problems_are_named() {
    let client = TokenClient::new().expect("client");

    let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = closed.local_addr().expect("address").port();
    drop(closed);
    let refused = client
        .request(
            &endpoint(
                &format!("http://127.0.0.1:{port}/token"),
                None,
                Duration::from_secs(10),
            ),
            &request(),
        )
        .await
        .expect_err("nothing listens");
    assert_names(
        &shown(&refused),
        &["Connection refused", "connection refused"],
    );

    let unresolvable = client
        .request(
            &endpoint(
                "https://idp.does-not-exist.invalid/token",
                None,
                Duration::from_secs(30),
            ),
            &request(),
        )
        .await
        .expect_err("the name does not resolve");
    assert_names(&shown(&unresolvable), &["dns error", "lookup"]);

    // Accepts connections and never answers.
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let silent_port = silent.local_addr().expect("address").port();
    let _held = tokio::spawn(async move {
        let mut open = Vec::new();
        while let Ok((stream, _)) = silent.accept().await {
            open.push(stream);
        }
    });
    let timed_out = client
        .request(
            &endpoint(
                &format!("http://127.0.0.1:{silent_port}/token"),
                None,
                Duration::from_millis(500),
            ),
            &request(),
        )
        .await
        .expect_err("no answer");
    assert_names(&shown(&timed_out), &["timed out", "timeout"]);
}
