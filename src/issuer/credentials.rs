//! Where an issuer's credentials come from: a small trait, with Kubernetes Secrets for the
//! operator ([`SecretSource`]) and files or environment variables for the `token` command
//! (`crate::debug_token::CommandLineCredentials`).

use std::future::Future;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{Secret, ServiceAccount};
use kube::api::{Api, PostParams};

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

/// A ServiceAccount token to mint: whose, for which audience, for how long, and which
/// field of the issuer asks (for messages).
#[derive(Clone, Copy, Debug)]
pub struct ServiceAccountTokenRef<'a> {
    /// Where the issuer's Secrets (and ServiceAccounts) live.
    pub namespace: &'a str,
    /// The ServiceAccount's name.
    pub name: &'a str,
    /// The token's `aud`.
    pub audience: &'a str,
    /// The lifetime asked for.
    pub expiration: Duration,
    /// `clientAuth.serviceAccountRef` or `grant.tokenExchange.serviceAccountRef`.
    pub field: &'static str,
}

/// A minted ServiceAccount token. `Debug` redacts it.
#[derive(Clone, Debug)]
pub struct ServiceAccountToken {
    /// The token (a JWT).
    pub token: SecretString,
    /// When it expires, as the API server said.
    pub expires_at: Timestamp,
    /// Where it came from (`ServiceAccount ns/name`, `file …`).
    pub from: String,
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

    /// Mints (or, for the `token` command, reads) a ServiceAccount token, fresh (the issuer
    /// layer reuses it while more than half of its life is left).
    fn service_account_token(
        &self,
        reference: ServiceAccountTokenRef<'_>,
    ) -> impl Future<Output = Result<ServiceAccountToken, Failure>> + Send;
}

/// The lifetime of minted ServiceAccount tokens: the TokenRequest API's minimum.
pub const SERVICE_ACCOUNT_TOKEN_LIFETIME: Duration = Duration::from_secs(600);

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

    async fn service_account_token(
        &self,
        reference: ServiceAccountTokenRef<'_>,
    ) -> Result<ServiceAccountToken, Failure> {
        let (namespace, name) = (reference.namespace, reference.name);
        let api: Api<ServiceAccount> = Api::namespaced(self.client.clone(), namespace);
        let request = TokenRequest {
            spec: TokenRequestSpec {
                audiences: vec![reference.audience.to_string()],
                expiration_seconds: i64::try_from(reference.expiration.as_secs()).ok(),
                bound_object_ref: None,
            },
            ..TokenRequest::default()
        };
        let answer = api
            .create_token_request(name, &PostParams::default(), &request)
            .await
            .map_err(|error| match &error {
                kube::Error::Api(status) if status.code == 403 => {
                    Failure::issuer_not_ready(grant_missing(reference, &status.message))
                }
                kube::Error::Api(status) if status.code == 404 => {
                    Failure::issuer_not_ready(format!(
                        "{}: ServiceAccount {namespace}/{name} not found",
                        reference.field
                    ))
                }
                _ => Failure::issuer_not_ready(format!(
                    "cannot mint a token for ServiceAccount {namespace}/{name}: {}",
                    crate::oauth::error_chain(&error)
                )),
            })?;
        let status = answer.status.ok_or_else(|| {
            Failure::issuer_not_ready(format!(
                "the TokenRequest for ServiceAccount {namespace}/{name} came back without a token"
            ))
        })?;
        let expires_at = Timestamp::from_second(status.expiration_timestamp.0.as_second())
            .map_err(|e| {
                Failure::issuer_not_ready(format!(
                    "the TokenRequest for ServiceAccount {namespace}/{name} has an unusable expirationTimestamp: {e}"
                ))
            })?;
        Ok(ServiceAccountToken {
            token: SecretString::new(status.token),
            expires_at,
            from: format!("ServiceAccount {namespace}/{name}"),
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

/// What the issuer message says when the operator may not mint a ServiceAccount's tokens.
pub const MINT_NOT_ALLOWED: &str = "may not mint tokens of ServiceAccount";

/// The issuer message when the operator may not mint tokens of a ServiceAccount: who the
/// operator is (from the API server's answer) and the Role and RoleBinding that grant it.
pub fn grant_missing(reference: ServiceAccountTokenRef<'_>, forbidden: &str) -> String {
    let (namespace, name) = (reference.namespace, reference.name);
    let role = format!("audiencetoken-mint-{name}");
    let role = &role[..role.len().min(253)];
    let subject = forbidden_user(forbidden);
    let binding = match subject
        .as_deref()
        .and_then(|user| user.strip_prefix("system:serviceaccount:"))
    {
        Some(account) => format!("--serviceaccount={account}"),
        None => format!(
            "--user={}",
            subject.as_deref().unwrap_or("<the operator's user>")
        ),
    };
    let who = subject.map_or_else(
        || "the operator".to_string(),
        |u| format!("the operator ({u})"),
    );
    format!(
        "{field}: {who} {MINT_NOT_ALLOWED} {namespace}/{name}; its own RBAC \
         does not allow that anywhere. The owner of namespace {namespace} grants it: \
         kubectl -n {namespace} create role {role} --verb=create --resource=serviceaccounts/token --resource-name={name} && \
         kubectl -n {namespace} create rolebinding {role} --role={role} {binding} \
         (the issuer is checked again every few seconds)",
        field = reference.field,
    )
}

/// The user in an API server's 403 message: `... User "system:serviceaccount:ns:name" cannot ...`.
fn forbidden_user(message: &str) -> Option<String> {
    let rest = &message[message.find("User \"")? + 6..];
    let user = &rest[..rest.find('"')?];
    (!user.is_empty()).then(|| user.to_string())
}

/// Secrets and files created with `echo` often end in a newline that is not part of the
/// credential.
pub fn trim_line_end(text: &str) -> String {
    text.trim_end_matches(['\n', '\r']).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reference() -> ServiceAccountTokenRef<'static> {
        ServiceAccountTokenRef {
            namespace: "shop",
            name: "idp-client",
            audience: "https://idp.example.com",
            expiration: SERVICE_ACCOUNT_TOKEN_LIFETIME,
            field: "clientAuth.serviceAccountRef",
        }
    }

    #[test]
    fn a_missing_grant_names_the_account_and_the_commands_that_grant_it() {
        let message = grant_missing(
            reference(),
            r#"serviceaccounts "idp-client" is forbidden: User "system:serviceaccount:ato-system:audience-token-operator" cannot create resource "serviceaccounts/token" in API group "" in the namespace "shop""#,
        );
        for part in [
            "clientAuth.serviceAccountRef: the operator (system:serviceaccount:ato-system:audience-token-operator) may not mint tokens of ServiceAccount shop/idp-client",
            "kubectl -n shop create role audiencetoken-mint-idp-client --verb=create --resource=serviceaccounts/token --resource-name=idp-client",
            "kubectl -n shop create rolebinding audiencetoken-mint-idp-client --role=audiencetoken-mint-idp-client --serviceaccount=ato-system:audience-token-operator",
        ] {
            assert!(message.contains(part), "{part}\n{message}");
        }
    }

    #[test]
    fn a_user_outside_the_cluster_is_bound_as_a_user() {
        let message = grant_missing(
            reference(),
            r#"serviceaccounts "idp-client" is forbidden: User "alice@example.com" cannot create resource"#,
        );
        assert!(message.contains("--user=alice@example.com"), "{message}");
        let message = grant_missing(reference(), "forbidden");
        assert!(
            message.contains("the operator may not mint")
                && message.contains("--user=<the operator's user>"),
            "{message}"
        );
    }
}
