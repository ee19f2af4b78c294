//! Mutual TLS (RFC 8705): an issuer presents the client certificate of a `kubernetes.io/tls`
//! Secret on every connection, authenticates with it (`TLSClientAuth`,
//! `SelfSignedTLSClientAuth`), uses the server's `mtls_endpoint_aliases`, checks and records
//! the thumbprint that certificate-bound tokens carry, and replaces those tokens at once when
//! the certificate is renewed. Needs the test server in its mTLS mode
//! ([`OidcServer::start_mtls`](super::super::oidc::OidcServer::start_mtls)), whose
//! certificates [`TestPki`] made.

use audience_token_operator::secret::keys;
use kube::api::PostParams;
use serde_json::json;

use super::super::certs::{ClientCert, TestPki};
use super::super::oidc;
use super::super::operator::OperatorProcess;
use super::{READY_TIMEOUT, TestEnv, claims, data, eventually};
use audience_token_operator::api::TokenIssuer;

/// How soon a renewed certificate must have replaced the token bound to the old one (the
/// token itself lives an hour; its renewal is 40 minutes away).
const ROTATION_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

impl TestEnv {
    /// Server-side applies `kubernetes.io/tls` Secret `name` with `certificate`, as
    /// cert-manager writes one (and rewrites it at a renewal).
    pub async fn put_tls_secret(&self, name: &str, certificate: &ClientCert) {
        self.put_certificate_secret(name, "kubernetes.io/tls", certificate)
            .await;
    }

    /// Server-side applies Secret `name` of `type_` holding `certificate` as `tls.crt` and
    /// `tls.key`.
    async fn put_certificate_secret(&self, name: &str, type_: &str, certificate: &ClientCert) {
        let data = [
            ("tls.crt", certificate.cert_pem.as_str()),
            ("tls.key", certificate.key_pem.as_str()),
        ];
        self.apply_secret(name, Some(type_), &data, "certificate")
            .await;
    }

    /// TokenIssuer `name` at the mTLS test server (discovery, the test CA as `caBundle`)
    /// for `client_id`, authenticating with `method` and the certificate in `cert_secret`.
    pub async fn create_mtls_issuer(
        &self,
        name: &str,
        client_id: &str,
        method: &str,
        cert_secret: &str,
        pki: &TestPki,
    ) {
        let issuer: TokenIssuer = serde_json::from_value(json!({
            "apiVersion": "audiencetoken.io/v1alpha1",
            "kind": "TokenIssuer",
            "metadata": {"name": name},
            "spec": {
                "issuerURL": self.idp.issuer,
                "caBundle": pki.ca_pem,
                "clientID": client_id,
                "clientAuth": {"method": method},
                "tlsClientCertificate": {"secretRef": {"name": cert_secret}}
            }
        }))
        .expect("TokenIssuer");
        self.issuers()
            .create(&PostParams::default(), &issuer)
            .await
            .expect("create TokenIssuer");
    }

    /// The token in Secret `name`, checked to be bound to `certificate`: the JWT's
    /// `cnf.x5t#S256` and the Secret's `certificate-thumbprint` are its thumbprint.
    pub async fn checked_certificate_bound_secret(
        &self,
        name: &str,
        certificate: &ClientCert,
    ) -> String {
        let secret = self.secrets().get(name).await.expect("token Secret");
        let token = data(&secret, keys::TOKEN);
        assert_eq!(
            claims(&token)["cnf"]["x5t#S256"],
            json!(certificate.thumbprint),
            "the token is bound to the presented certificate"
        );
        assert_eq!(
            data(&secret, keys::CERTIFICATE_THUMBPRINT),
            certificate.thumbprint,
            "the Secret names the certificate to present with the token"
        );
        assert_eq!(
            data(&secret, keys::TOKEN_TYPE),
            "Bearer",
            "RFC 8705 keeps the Bearer type"
        );
        token
    }
}

/// `TLSClientAuth` with a CA-issued certificate: the token comes from the mTLS alias, bound
/// to the certificate; a restart makes no request; a renewed certificate (same subject, new
/// key) replaces the bound token within seconds, with exactly one request.
pub async fn tls_client_auth_and_certificate_renewal(
    env: &TestEnv,
    operator: &mut OperatorProcess,
    pki: &TestPki,
) {
    let first = pki.client("m2m-tls");
    env.put_tls_secret("m2m-tls-cert", &first).await;
    env.create_mtls_issuer(
        "mtls-idp",
        oidc::M2M_TLS.id,
        "TLSClientAuth",
        "m2m-tls-cert",
        pki,
    )
    .await;
    let issuer = env.wait_issuer("mtls-idp", "True", "Ready").await;
    let alias = env
        .idp
        .mtls_token_endpoint
        .clone()
        .expect("the mTLS test server has an alias");
    assert_eq!(
        issuer.status.and_then(|s| s.token_endpoint),
        Some(alias),
        "token requests go to mtls_endpoint_aliases.token_endpoint"
    );
    env.issue_token("tls-orders", "mtls-idp", oidc::ORDERS, &["orders/read"])
        .await;
    let old_token = env
        .checked_certificate_bound_secret("tls-orders", &first)
        .await;

    // A restart: the bound token is still the certificate's; nothing is asked for.
    env.idp.reset_counts().await;
    operator.restart().await;
    env.issue_token(
        "tls-after-restart",
        "mtls-idp",
        oidc::PAYMENTS,
        &["payments/read"],
    )
    .await;
    let counts = env.idp.token_requests().await;
    assert_eq!(
        counts.total, 1,
        "only the new AudienceToken asked for a token after the restart: {counts:?}"
    );

    // cert-manager renews the certificate: same subject, new key.
    let renewed = pki.client("m2m-tls");
    assert_ne!(renewed.thumbprint, first.thumbprint);
    env.idp.reset_counts().await;
    env.put_tls_secret("m2m-tls-cert", &renewed).await;
    for name in ["tls-orders", "tls-after-restart"] {
        eventually(
            &format!("{name} re-issued for the renewed certificate"),
            ROTATION_TIMEOUT,
            || async {
                let secret = env.secrets().get(name).await.map_err(|e| e.to_string())?;
                let thumbprint = data(&secret, keys::CERTIFICATE_THUMBPRINT);
                if thumbprint == renewed.thumbprint {
                    Ok(())
                } else {
                    Err(format!("certificate-thumbprint {thumbprint}"))
                }
            },
        )
        .await;
        env.checked_certificate_bound_secret(name, &renewed).await;
        env.wait_condition(name, "True", "Renewed", READY_TIMEOUT)
            .await;
    }
    assert_ne!(env.token_in("tls-orders").await, old_token);
    let counts = env.idp.token_requests().await;
    assert_eq!(
        (counts.total, counts.for_client(oidc::M2M_TLS.id)),
        (2, 2),
        "one request per bound token, none refused: {counts:?}"
    );
}

/// `SelfSignedTLSClientAuth`: the certificate registered with the server as it is.
pub async fn self_signed_tls_client_auth(env: &TestEnv, self_signed: &ClientCert, pki: &TestPki) {
    env.put_tls_secret("self-signed-cert", self_signed).await;
    env.create_mtls_issuer(
        "self-signed-idp",
        oidc::M2M_SELF_SIGNED.id,
        "SelfSignedTLSClientAuth",
        "self-signed-cert",
        pki,
    )
    .await;
    env.issue_token(
        "self-signed-payments",
        "self-signed-idp",
        oidc::PAYMENTS,
        &["payments/read"],
    )
    .await;
    env.checked_certificate_bound_secret("self-signed-payments", self_signed)
        .await;
}

/// What users get wrong: a certificate Secret of the wrong type makes the issuer NotReady
/// with a message that says so; a certificate the server does not accept for the client
/// fails the token request with the server's `invalid_client`, and nothing is written.
pub async fn certificate_problems_reach_status(
    env: &TestEnv,
    self_signed: &ClientCert,
    pki: &TestPki,
) {
    // An Opaque Secret with the right keys: not what cert-manager writes, and not watched.
    env.put_certificate_secret("opaque-cert", "Opaque", self_signed)
        .await;
    env.create_mtls_issuer(
        "opaque-idp",
        oidc::M2M_TLS.id,
        "TLSClientAuth",
        "opaque-cert",
        pki,
    )
    .await;
    let issuer = env.wait_issuer("opaque-idp", "False", "NotReady").await;
    let message = issuer
        .status
        .and_then(|s| s.conditions.into_iter().next())
        .map(|c| c.message)
        .unwrap_or_default();
    assert!(
        message.contains("kubernetes.io/tls"),
        "the message names the Secret type needed: {message}"
    );

    // A self-signed certificate for the CA-authenticated client.
    env.put_tls_secret("impostor-cert", self_signed).await;
    env.create_mtls_issuer(
        "impostor-idp",
        oidc::M2M_TLS.id,
        "TLSClientAuth",
        "impostor-cert",
        pki,
    )
    .await;
    env.create_token("impostor-orders", "impostor-idp", oidc::ORDERS, &[], None)
        .await;
    let refused = env
        .wait_condition(
            "impostor-orders",
            "False",
            "TokenRequestFailed",
            READY_TIMEOUT,
        )
        .await;
    let message = refused
        .status
        .and_then(|s| s.conditions.into_iter().next())
        .map(|c| c.message)
        .unwrap_or_default();
    assert!(message.contains("invalid_client"), "{message}");
    assert!(
        env.secrets()
            .get_opt("impostor-orders")
            .await
            .expect("get")
            .is_none(),
        "nothing written"
    );
}
