//! The real operator binary and kube-runtime Controller against the in-process Kubernetes
//! API double and a real OAuth server (oidc-provider). The same scenarios run against a
//! real cluster in `tests/e2e`.

mod support;

use std::path::PathBuf;

use support::kube_double::KubeApiDouble;
use support::oidc::{self, OidcServer};
use support::operator::OperatorProcess;
use support::scenarios::{self, TestEnv};

/// Each harness runs a Node server and an operator process; on a 2-core machine more than
/// two at once only slows them all down.
static SLOTS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(2);

struct Harness {
    _slot: tokio::sync::SemaphorePermit<'static>,
    env: TestEnv,
    operator: OperatorProcess,
    _double: KubeApiDouble,
    _kubeconfig: TempFile,
}

/// A file removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A fresh API double, OAuth server, namespace with issuer `idp`, and a running operator.
async fn start(namespace: &str) -> Harness {
    let slot = SLOTS.acquire().await.expect("semaphore open");
    let double = KubeApiDouble::start().await;
    let idp = OidcServer::start().await;
    let env = TestEnv {
        client: double.client(),
        namespace: namespace.to_string(),
        idp,
    };
    env.create_namespace().await;
    let dir = std::env::temp_dir().join(format!("ato-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = TempFile(dir.join(format!("kubeconfig-{namespace}")));
    std::fs::write(&kubeconfig.0, double.kubeconfig_yaml()).expect("write kubeconfig");
    let operator = OperatorProcess::start(&kubeconfig.0, namespace);
    Harness {
        _slot: slot,
        env,
        operator,
        _double: double,
        _kubeconfig: kubeconfig,
    }
}

#[tokio::test]
async fn issues_reissues_renews_and_survives_restart() {
    let mut h = start("lifecycle").await;
    scenarios::issues_one_token_per_audience(&h.env).await;
    scenarios::reissues_on_spec_change(&h.env).await;
    scenarios::forced_renewal(&h.env).await;
    scenarios::renews_before_expiry(&h.env).await;
    scenarios::restart_makes_no_token_requests(&h.env, &mut h.operator).await;
}

#[tokio::test]
async fn foreign_secret_is_never_written() {
    let h = start("conflict").await;
    h.env
        .create_issuer("idp", &oidc::M2M_BASIC, oidc::M2M_BASIC.secret)
        .await;
    scenarios::never_writes_a_foreign_secret(&h.env).await;
}

#[tokio::test]
async fn failures_reach_status_and_recover() {
    let h = start("failures").await;
    h.env
        .create_issuer("idp", &oidc::M2M_BASIC, oidc::M2M_BASIC.secret)
        .await;
    scenarios::failures_reach_status_and_recover(&h.env).await;
}

#[tokio::test]
async fn refresh_token_chain_is_shared_and_survives_restarts() {
    let mut h = start("chain").await;
    scenarios::refresh_token_chain(&h.env, &mut h.operator).await;
}

#[tokio::test]
async fn signature_check_writes_only_tokens_signed_by_the_issuer() {
    let h = start("signature").await;
    scenarios::signature_check(&h.env).await;
}

#[tokio::test]
async fn private_key_jwt_client_authentication() {
    let h = start("pkjwt").await;
    scenarios::private_key_jwt(&h.env).await;
}
