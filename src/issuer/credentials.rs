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

/// Reads credentials. Errors name the place, never the value.
pub trait CredentialSource: Send + Sync {
    /// Reads one credential, fresh (the issuer layer caches).
    fn read(
        &self,
        reference: CredentialRef<'_>,
    ) -> impl Future<Output = Result<Credential, Failure>> + Send;
}

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

impl CredentialSource for SecretSource {
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
        let api: Api<Secret> = Api::namespaced(self.client.clone(), namespace);
        let secret = api
            .get_opt(&selector.name)
            .await
            .map_err(|e| {
                Failure::issuer_not_ready(format!(
                    "cannot read Secret {namespace}/{}: {e}",
                    selector.name
                ))
            })?
            .ok_or_else(|| {
                Failure::issuer_not_ready(format!("Secret {namespace}/{} not found", selector.name))
            })?;
        let bytes = secret
            .data
            .as_ref()
            .and_then(|data| data.get(&selector.key))
            .ok_or_else(|| {
                Failure::issuer_not_ready(format!(
                    "Secret {namespace}/{} has no key {:?}",
                    selector.name, selector.key
                ))
            })?;
        let text = String::from_utf8(bytes.0.clone()).map_err(|_| {
            Failure::issuer_not_ready(format!(
                "Secret {namespace}/{} key {:?} is not UTF-8",
                selector.name, selector.key
            ))
        })?;
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
