//! Proves the test authorization server's mTLS mode (RFC 8705) behaves as tests of the
//! operator's certificate-based client authentication assume: an https issuer whose
//! discovery names an mTLS alias of the token endpoint, `tls_client_auth` for certificates
//! of the test CA with the registered subject (renewed ones included),
//! `self_signed_tls_client_auth` for the one registered certificate, `invalid_client`
//! otherwise, and access tokens bound to the certificate (`cnf["x5t#S256"]`).
//! Uses only the harness and reqwest, not the operator.
//!
//! Needs Node.js and `npm ci --prefix tests/oidc-server`.

mod support;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use reqwest::StatusCode;
use serde_json::Value;
use support::certs::{ClientCert, TestPki, self_signed};
use support::oidc::*;

/// A running mTLS server with the certificates it was started with.
struct Setup {
    pki: TestPki,
    /// The certificate registered for [`M2M_SELF_SIGNED`].
    self_signed: ClientCert,
    idp: OidcServer,
}

impl Setup {
    async fn start() -> Setup {
        let pki = TestPki::generate();
        let self_signed = self_signed(M2M_SELF_SIGNED.id);
        let idp = OidcServer::start_mtls(&pki, &self_signed).await;
        Setup {
            pki,
            self_signed,
            idp,
        }
    }

    fn mtls_token_endpoint(&self) -> &str {
        self.idp
            .mtls_token_endpoint
            .as_deref()
            .expect("an mTLS server has an mTLS token endpoint")
    }

    /// An HTTPS client trusting only the test CA, presenting `cert` when a server asks.
    fn http(&self, cert: Option<&ClientCert>) -> reqwest::Client {
        let ca = reqwest::Certificate::from_pem(self.pki.ca_pem.as_bytes()).expect("CA PEM");
        let mut builder = reqwest::Client::builder().no_proxy().tls_certs_only([ca]);
        if let Some(cert) = cert {
            let identity =
                reqwest::Identity::from_pem(cert.identity_pem().as_bytes()).expect("identity PEM");
            builder = builder.identity(identity);
        }
        builder.build().expect("reqwest client")
    }

    /// client_credentials for [`ORDERS`] as `client` (id in the form, no secret) at `url`,
    /// presenting `cert`.
    async fn token_request(
        &self,
        url: &str,
        client: TestClient,
        cert: Option<&ClientCert>,
    ) -> (StatusCode, Value) {
        let response = self
            .http(cert)
            .post(url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", client.id),
                ("resource", ORDERS),
                ("scope", "orders/read"),
            ])
            .send()
            .await
            .expect("token request");
        let status = response.status();
        let body = response.json::<Value>().await.expect("JSON token response");
        (status, body)
    }
}

fn jwt_claims(token: &str) -> Value {
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3, "not a JWS compact token: {token}");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).expect("base64url")).expect("JSON")
}

/// Asserts a successful token response for [`ORDERS`] to `client_id` whose JWT is bound to
/// `cert`.
fn assert_bound_token(status: StatusCode, body: &Value, client_id: &str, cert: &ClientCert) {
    assert_eq!(status, StatusCode::OK, "{body}");
    // RFC 8705 §3: certificate binding does not change the token type.
    assert_eq!(body["token_type"], "Bearer", "{body}");
    let token = body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no access_token in {body}"));
    let claims = jwt_claims(token);
    assert_eq!(claims["aud"], ORDERS, "{claims}");
    assert_eq!(claims["client_id"], client_id, "{claims}");
    assert_eq!(
        claims["cnf"]["x5t#S256"],
        cert.thumbprint.as_str(),
        "the token must be bound to the presented certificate: {claims}"
    );
}

fn assert_invalid_client(status: StatusCode, body: &Value) {
    assert_eq!(status, StatusCode::UNAUTHORIZED, "{body}");
    assert_eq!(body["error"], "invalid_client", "{body}");
}

#[tokio::test]
async fn discovery_at_the_https_issuer_names_the_mtls_alias() {
    let setup = Setup::start().await;
    let idp = &setup.idp;
    assert!(
        idp.issuer.starts_with("https://127.0.0.1:"),
        "{}",
        idp.issuer
    );
    let alias = setup.mtls_token_endpoint();
    assert!(alias.starts_with("https://127.0.0.1:"), "{alias}");
    assert!(alias.ends_with("/token"), "{alias}");
    assert_ne!(alias, idp.token_endpoint(), "the alias is another listener");

    // No client certificate needed at the issuer.
    let discovery: Value = setup
        .http(None)
        .get(idp.discovery_url())
        .send()
        .await
        .expect("discovery over https")
        .json()
        .await
        .expect("discovery JSON");
    assert_eq!(discovery["issuer"], idp.issuer.as_str());
    assert_eq!(discovery["token_endpoint"], idp.token_endpoint().as_str());
    assert_eq!(
        discovery["mtls_endpoint_aliases"]["token_endpoint"], alias,
        "{discovery}"
    );
    assert_eq!(
        discovery["tls_client_certificate_bound_access_tokens"], true,
        "{discovery}"
    );
    let methods = discovery["token_endpoint_auth_methods_supported"]
        .as_array()
        .expect("token_endpoint_auth_methods_supported");
    assert!(methods.contains(&"tls_client_auth".into()), "{methods:?}");
    assert!(
        methods.contains(&"self_signed_tls_client_auth".into()),
        "{methods:?}"
    );
}

#[tokio::test]
async fn tls_client_auth_gets_a_token_bound_to_its_certificate_only_at_the_alias() {
    let setup = Setup::start().await;
    let cert = setup.pki.client(M2M_TLS.id);

    let (status, body) = setup
        .token_request(setup.mtls_token_endpoint(), M2M_TLS, Some(&cert))
        .await;
    assert_bound_token(status, &body, M2M_TLS.id, &cert);
    assert_eq!(body["scope"], "orders/read", "{body}");

    // The main listener asks for no certificate: the same request there has none.
    let (status, body) = setup
        .token_request(&setup.idp.token_endpoint(), M2M_TLS, None)
        .await;
    assert_invalid_client(status, &body);
    let (status, body) = setup
        .token_request(&setup.idp.token_endpoint(), M2M_TLS, Some(&cert))
        .await;
    assert_invalid_client(status, &body);

    // The harness reads the counters over https; both listeners count.
    let counts = setup.idp.token_requests().await;
    assert_eq!(counts.total, 3, "{counts:?}");
    assert_eq!(counts.for_client(M2M_TLS.id), 3, "{counts:?}");
    assert_eq!(counts.for_resource(ORDERS), 3, "{counts:?}");
    assert_eq!(counts.errors("invalid_client"), 2, "{counts:?}");
    setup.idp.reset_counts().await;
    assert_eq!(setup.idp.token_requests().await.total, 0);
}

#[tokio::test]
async fn tls_client_auth_refuses_a_certificate_the_ca_did_not_issue_or_for_another_subject() {
    let setup = Setup::start().await;

    // Right subject, but self-signed: not verified by the CA.
    let lone = self_signed(M2M_TLS.id);
    let (status, body) = setup
        .token_request(setup.mtls_token_endpoint(), M2M_TLS, Some(&lone))
        .await;
    assert_invalid_client(status, &body);

    // Issued by the CA, but for another subject.
    let other = setup.pki.client("someone-else");
    let (status, body) = setup
        .token_request(setup.mtls_token_endpoint(), M2M_TLS, Some(&other))
        .await;
    assert_invalid_client(status, &body);

    // No certificate at all, at the alias.
    let (status, body) = setup
        .token_request(setup.mtls_token_endpoint(), M2M_TLS, None)
        .await;
    assert_invalid_client(status, &body);

    assert_eq!(setup.idp.token_requests().await.errors("invalid_client"), 3);
}

#[tokio::test]
async fn self_signed_tls_client_auth_accepts_only_the_registered_certificate() {
    let setup = Setup::start().await;

    let (status, body) = setup
        .token_request(
            setup.mtls_token_endpoint(),
            M2M_SELF_SIGNED,
            Some(&setup.self_signed),
        )
        .await;
    assert_bound_token(status, &body, M2M_SELF_SIGNED.id, &setup.self_signed);

    // Same subject, another key: not the registered certificate.
    let impostor = self_signed(M2M_SELF_SIGNED.id);
    let (status, body) = setup
        .token_request(
            setup.mtls_token_endpoint(),
            M2M_SELF_SIGNED,
            Some(&impostor),
        )
        .await;
    assert_invalid_client(status, &body);
}

#[tokio::test]
async fn a_renewed_certificate_is_accepted_and_binds_tokens_to_itself() {
    let setup = Setup::start().await;
    let first = setup.pki.client(M2M_TLS.id);
    let renewed = setup.pki.client(M2M_TLS.id);
    assert_ne!(first.cert_pem, renewed.cert_pem);
    assert_ne!(first.key_pem, renewed.key_pem);
    assert_ne!(first.thumbprint, renewed.thumbprint);

    let (status, body) = setup
        .token_request(setup.mtls_token_endpoint(), M2M_TLS, Some(&first))
        .await;
    assert_bound_token(status, &body, M2M_TLS.id, &first);
    let (status, body) = setup
        .token_request(setup.mtls_token_endpoint(), M2M_TLS, Some(&renewed))
        .await;
    assert_bound_token(status, &body, M2M_TLS.id, &renewed);
}

#[test]
fn thumbprints_are_base64url_sha256_without_padding() {
    let pki = TestPki::generate();
    let cert = pki.client("m2m-tls");
    // 32 bytes → 43 base64url characters, no '='.
    assert_eq!(cert.thumbprint.len(), 43, "{}", cert.thumbprint);
    assert!(
        cert.thumbprint
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_'),
        "{}",
        cert.thumbprint
    );
    assert!(cert.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
    assert!(cert.key_pem.starts_with("-----BEGIN PRIVATE KEY-----"));
}
