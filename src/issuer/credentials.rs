//! Where an issuer's credentials come from: a small trait, with Kubernetes Secrets for the
//! operator ([`SecretSource`]) and files or environment variables for the `token` command
//! (`crate::debug_token::CommandLineCredentials`).

use std::future::Future;

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;

use crate::api::SecretKeySelector;
use crate::failure::Failure;
use crate::redact::SecretString;

/// What a credential is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CredentialKind {
    /// `clientAuth.clientSecretRef`.
    ClientSecret,
    /// `clientAuth.privateKeyRef`.
    PrivateKey,
    /// `grant.refreshToken.bootstrapSecretRef`.
    BootstrapRefreshToken,
}

/// One credential an issuer names: what it is for, and the Secret key the issuer's spec
/// points at (in `namespace`, where the issuer's Secrets live).
#[derive(Clone, Copy, Debug)]
pub struct CredentialRef<'a> {
    /// What the credential is for.
    pub kind: CredentialKind,
    /// The issuer's `clientAuth.method`, for messages (`ClientSecretBasic`, …).
    pub method: &'static str,
    /// Where the issuer's Secrets live.
    pub namespace: &'a str,
    /// The Secret and key the spec names, when it names one.
    pub secret: Option<&'a SecretKeySelector>,
}

/// A credential's value and where it was read from (`Secret ns/name key k`, `file …`,
/// `env …`): the report shows the latter, never the value.
#[derive(Clone, Debug)]
pub struct Credential {
    /// The value.
    pub value: SecretString,
    /// Where it came from.
    pub from: String,
}

/// A client certificate with its key, as read (`tls.crt` and `tls.key` of one Secret, or
/// two files). `Debug` redacts the key.
#[derive(Clone, Debug)]
pub struct CertificateCredential {
    /// The certificate and its chain, PEM.
    pub chain: String,
    /// The private key, PEM.
    pub key: SecretString,
    /// Where it came from (`Secret ns/name`, `files …`).
    pub from: String,
}

/// The `tlsClientCertificate` an issuer names: the Secret, in `namespace`.
#[derive(Clone, Copy, Debug)]
pub struct CertificateRef<'a> {
    /// Where the issuer's Secrets live.
    pub namespace: &'a str,
    /// The `kubernetes.io/tls` Secret's name.
    pub secret_name: &'a str,
}

/// Reads credentials. Errors name the place, never the value.
pub trait CredentialSource: Send + Sync {
    /// Reads one credential, fresh (the issuer layer caches).
    fn read(
        &self,
        reference: CredentialRef<'_>,
    ) -> impl Future<Output = Result<Credential, Failure>> + Send;

    /// Reads a client certificate and its key together, fresh: both from one read, so a
    /// renewal between two reads cannot pair a new certificate with an old key.
    fn read_certificate(
        &self,
        reference: CertificateRef<'_>,
    ) -> impl Future<Output = Result<CertificateCredential, Failure>> + Send;
}

/// The keys of a `kubernetes.io/tls` Secret.
pub const TLS_CERT_KEY: &str = "tls.crt";
/// The private key's key in a `kubernetes.io/tls` Secret.
pub const TLS_PRIVATE_KEY_KEY: &str = "tls.key";
/// The type of Secret a `tlsClientCertificate` names.
pub const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// Credentials from Kubernetes Secrets, through the API (one GET per read).
#[derive(Clone)]
pub struct SecretSource {
    client: kube::Client,
}

impl SecretSource {
    /// Reads Secrets with this client.
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }
}

impl SecretSource {
    async fn get(&self, namespace: &str, name: &str) -> Result<Secret, Failure> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        api.get_opt(name)
            .await
            .map_err(|e| {
                Failure::issuer_not_ready(format!("cannot read Secret {namespace}/{name}: {e}"))
            })?
            .ok_or_else(|| {
                Failure::issuer_not_ready(format!("Secret {namespace}/{name} not found"))
            })
    }
}

/// The text of one key of a Secret's `data`.
fn data_text(secret: &Secret, namespace: &str, name: &str, key: &str) -> Result<String, Failure> {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|data| data.get(key))
        .ok_or_else(|| {
            Failure::issuer_not_ready(format!("Secret {namespace}/{name} has no key {key:?}"))
        })?;
    String::from_utf8(bytes.0.clone()).map_err(|_| {
        Failure::issuer_not_ready(format!(
            "Secret {namespace}/{name} key {key:?} is not UTF-8"
        ))
    })
}

impl CredentialSource for SecretSource {
    async fn read_certificate(
        &self,
        reference: CertificateRef<'_>,
    ) -> Result<CertificateCredential, Failure> {
        let (namespace, name) = (reference.namespace, reference.secret_name);
        let secret = self.get(namespace, name).await?;
        let type_ = secret.type_.as_deref().unwrap_or("Opaque");
        if type_ != TLS_SECRET_TYPE {
            // Only that type is watched for renewals (by a field selector).
            return Err(Failure::issuer_not_ready(format!(
                "Secret {namespace}/{name} is of type {type_}; tlsClientCertificate needs a {TLS_SECRET_TYPE} Secret ({TLS_CERT_KEY}, {TLS_PRIVATE_KEY_KEY}), as cert-manager writes"
            )));
        }
        Ok(CertificateCredential {
            chain: data_text(&secret, namespace, name, TLS_CERT_KEY)?,
            key: SecretString::new(data_text(&secret, namespace, name, TLS_PRIVATE_KEY_KEY)?),
            from: format!("Secret {namespace}/{name}"),
        })
    }

    async fn read(&self, reference: CredentialRef<'_>) -> Result<Credential, Failure> {
        let namespace = reference.namespace;
        let Some(selector) = reference.secret else {
            let field = match reference.kind {
                CredentialKind::ClientSecret => "clientAuth.clientSecretRef",
                CredentialKind::PrivateKey => "clientAuth.privateKeyRef",
                CredentialKind::BootstrapRefreshToken => "grant.refreshToken.bootstrapSecretRef",
            };
            return Err(Failure::issuer_not_ready(format!(
                "{field} is required for {}",
                reference.method
            )));
        };
        let secret = self.get(namespace, &selector.name).await?;
        let text = data_text(&secret, namespace, &selector.name, &selector.key)?;
        Ok(Credential {
            value: SecretString::new(trim_line_end(&text)),
            from: format!("Secret {namespace}/{} key {}", selector.name, selector.key),
        })
    }
}

/// Secrets and files created with `echo` often end in a newline that is not part of the
/// credential.
pub fn trim_line_end(text: &str) -> String {
    text.trim_end_matches(['\n', '\r']).to_string()
}
