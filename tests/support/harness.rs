//! One operator under test: a fresh Kubernetes API double, test OAuth server and namespace,
//! and the operator binary watching that namespace (its ClusterTokenIssuer Secrets there
//! too). Shared by `tests/controller.rs` and `tests/security.rs`.

use std::path::{Path, PathBuf};

use super::certs::{ClientCert, TestPki};
use super::kube_double::KubeApiDouble;
use super::oidc::{Federation, FederationKeys, OidcServer};
use super::operator::{OperatorProcess, Options};
use super::scenarios::TestEnv;
use super::scenarios::secretless::OperatorIdentity;

/// Each harness runs a Node server and an operator process; on a 2-core machine more than
/// two at once only slows them all down.
static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

/// The bearer token in the operator's kubeconfig: singles out its requests to the double
/// (the tests' own client sends none). The double does not check it.
pub const OPERATOR_TOKEN: &str = "operator";

/// Fields drop in order: the operator stops before the double and the OAuth server go.
pub struct Harness {
    pub operator: OperatorProcess,
    pub env: TestEnv,
    pub double: KubeApiDouble,
    kubeconfig: TempFile,
    _slot: tokio::sync::SemaphorePermit<'static>,
}

/// A file removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

impl Harness {
    /// The operator's kubeconfig, for starting more operators against the same double.
    pub fn kubeconfig(&self) -> &Path {
        &self.kubeconfig.0
    }
}

/// Starts a harness; waits while two others run.
pub async fn start(namespace: &str, options: Options) -> Harness {
    let slot = SLOTS.acquire().await.expect("semaphore open");
    let idp = OidcServer::start().await;
    start_with(slot, namespace, options, KubeApiDouble::start().await, idp).await
}

/// Who the operator is at the double of [`start_secretless`]: the double authorizes its
/// TokenRequests by the RBAC objects stored in it.
pub fn operator_identity() -> OperatorIdentity {
    OperatorIdentity {
        namespace: "audience-token-operator".into(),
        name: "audience-token-operator".into(),
    }
}

/// Starts a harness whose OAuth server trusts the double's ServiceAccount tokens (its
/// issuer and JWKS, for ServiceAccounts in `namespace`), and whose operator is
/// [`operator_identity`] to the double: it may mint a ServiceAccount's tokens only where a
/// Role and RoleBinding in the double allow it.
pub async fn start_secretless(namespace: &str) -> (Harness, OperatorIdentity) {
    let slot = SLOTS.acquire().await.expect("semaphore open");
    let double = KubeApiDouble::start().await;
    let identity = operator_identity();
    double.authenticate(OPERATOR_TOKEN, &identity.username());
    let idp = OidcServer::start_federated(&Federation {
        issuer: KubeApiDouble::SERVICE_ACCOUNT_ISSUER.to_string(),
        keys: FederationKeys::Uri(double.service_account_jwks_uri()),
        namespace: namespace.to_string(),
    })
    .await;
    let harness = start_with(slot, namespace, Options::default(), double, idp).await;
    (harness, identity)
}

/// Starts a harness whose OAuth server is in its mTLS mode ([`OidcServer::start_mtls`]).
pub async fn start_mtls(namespace: &str, pki: &TestPki, self_signed: &ClientCert) -> Harness {
    let slot = SLOTS.acquire().await.expect("semaphore open");
    let idp = OidcServer::start_mtls(pki, self_signed).await;
    let double = KubeApiDouble::start().await;
    start_with(slot, namespace, Options::default(), double, idp).await
}

async fn start_with(
    slot: tokio::sync::SemaphorePermit<'static>,
    namespace: &str,
    options: Options,
    double: KubeApiDouble,
    idp: OidcServer,
) -> Harness {
    let env = TestEnv {
        client: double.client(),
        namespace: namespace.to_string(),
        idp,
    };
    env.create_namespace().await;
    let dir = std::env::temp_dir().join(format!("ato-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = TempFile(dir.join(format!("kubeconfig-{namespace}")));
    std::fs::write(
        &kubeconfig.0,
        double.kubeconfig_yaml_with_token(OPERATOR_TOKEN),
    )
    .expect("write kubeconfig");
    let operator = OperatorProcess::start_with(&kubeconfig.0, namespace, options);
    Harness {
        operator,
        env,
        double,
        kubeconfig,
        _slot: slot,
    }
}
