//! The controller scenarios against a real cluster: set `E2E_KUBECONFIG` to a kubeconfig of
//! a disposable cluster (kind, k3d, …). The CRDs are applied, the operator binary runs as a
//! local process (so it reaches the test OAuth server on 127.0.0.1), and everything happens
//! in a fresh namespace that is deleted afterwards.
//!
//! ```sh
//! E2E_KUBECONFIG=~/.kube/config cargo test --test e2e -- --nocapture
//! ```

mod limited_operator;
#[path = "../support/mod.rs"]
mod support;

use std::path::PathBuf;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{Api, DeleteParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

use support::certs::{TestPki, self_signed};
use support::oidc::{self, OidcServer};
use support::operator::OperatorProcess;
use support::scenarios::{
    TestEnv, authorization_details, dpop, failures, lifecycle, login, mtls, plugin,
    private_key_jwt, rate_limit, refresh_chain, secretless, signature,
};

#[tokio::test]
async fn scenarios_on_a_real_cluster() {
    let Some(path) = std::env::var_os("E2E_KUBECONFIG").map(PathBuf::from) else {
        // Written straight to stderr: the test harness captures `eprintln!`, and a skip
        // should be visible in every run.
        let _ = std::io::Write::write_all(
            &mut std::io::stderr(),
            b"e2e skipped: E2E_KUBECONFIG is not set. Point it at a disposable cluster (kind, k3d, ...) to run \
              the controller scenarios there: E2E_KUBECONFIG=~/.kube/config cargo test --test e2e -- --nocapture\n",
        );
        return;
    };
    let kubeconfig = Kubeconfig::read_from(&path).expect("read E2E_KUBECONFIG");
    let config = Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .expect("usable kubeconfig");
    let client = Client::try_from(config).expect("client");
    support::cluster::install_crds(&client).await;

    let suffix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis()
        % 1_000_000;
    let namespace = format!("ato-e2e-{suffix}");
    let env = TestEnv {
        client: client.clone(),
        namespace: namespace.clone(),
        idp: OidcServer::start().await,
    };
    env.create_namespace().await;
    eprintln!(
        "e2e: namespace {namespace}, OAuth server {}",
        env.idp.issuer
    );
    let mut operator = OperatorProcess::start(&path, &namespace);
    let kubeconfig_path = path.clone();

    let outcome = tokio::spawn(async move {
        lifecycle::issues_one_token_per_audience(&env).await;
        lifecycle::reissues_on_spec_change(&env).await;
        lifecycle::dropped_fields_leave_the_secret(&env).await;
        lifecycle::metadata_follows_the_spec_without_a_new_token(&env).await;
        lifecycle::forced_renewal(&env).await;
        lifecycle::renews_before_expiry(&env).await;
        lifecycle::restart_makes_no_token_requests(&env, &mut operator).await;
        failures::never_writes_a_foreign_secret(&env).await;
        failures::failures_reach_status_and_recover(&env).await;
        refresh_chain::refresh_token_chain(&env, &mut operator).await;
        refresh_chain::lost_chain_recovers_with_one_request_per_token(&env, &mut operator).await;
        refresh_chain::interrupted_rotation_is_resolved_at_start(
            &env,
            &mut operator,
            &oidc::M2M_REFRESH,
            false,
        )
        .await;
        refresh_chain::interrupted_rotation_is_resolved_at_start(
            &env,
            &mut operator,
            &oidc::M2M_REFRESH_GRACE,
            true,
        )
        .await;
        private_key_jwt::private_key_jwt(&env).await;
        signature::signature_check(&env).await;
        dpop::dpop_bound_tokens(&env, &mut operator).await;
        authorization_details::details_in_the_token_request(&env, &mut operator).await;
        authorization_details::details_through_the_refresh_chain(&env).await;
        authorization_details::details_in_the_client_assertion(&env).await;
        rate_limit::rate_limit_spaces_requests(&env).await;
        // The kubectl plugin with the same (the user's) kubeconfig.
        plugin::kubectl_plugin(&env, &kubeconfig_path).await;
        // Mutual TLS: the same namespace and operator, an OAuth server in its mTLS mode.
        let pki = TestPki::generate();
        let self_signed = self_signed("m2m-self-signed");
        let mtls = TestEnv {
            client: env.client.clone(),
            namespace: env.namespace.clone(),
            idp: OidcServer::start_mtls(&pki, &self_signed).await,
        };
        mtls::tls_client_auth_and_certificate_renewal(&mtls, &mut operator, &pki).await;
        mtls::self_signed_tls_client_auth(&mtls, &self_signed, &pki).await;
        mtls::certificate_problems_reach_status(&mtls, &self_signed, &pki).await;
        // `login` writes the bootstrap Secret through the same kubeconfig.
        login::login_bootstraps_a_refresh_token_chain(&env, &kubeconfig_path).await;
        operator.stop().await;

        // Secretless: the real API server mints the ServiceAccount tokens, for an operator
        // that has only its own RBAC (impersonated), so each grant is a namespace owner's.
        let limited = limited_operator::LimitedOperator::install(
            &env.client,
            &kubeconfig_path,
            &env.namespace,
        )
        .await;
        let federation = limited_operator::cluster_federation(&env.client, &env.namespace).await;
        eprintln!("e2e: ServiceAccount tokens of issuer {}", federation.issuer);
        let secretless_env = TestEnv {
            client: env.client.clone(),
            namespace: env.namespace.clone(),
            idp: OidcServer::start_federated(&federation).await,
        };
        let mut limited_process = OperatorProcess::start(&limited.kubeconfig, &env.namespace);
        secretless::missing_grant_is_reported_then_fixed(&secretless_env, &limited.identity).await;
        secretless::federated_client_credentials(&secretless_env, &limited.identity).await;
        secretless::token_exchange(&secretless_env, &limited.identity).await;
        secretless::other_namespaces_are_refused_at_admission(&secretless_env).await;
        limited_process.stop().await;
        limited.remove(&env.client).await;
    })
    .await;

    let namespaces: Api<Namespace> = Api::all(client);
    if let Err(e) = namespaces
        .delete(&namespace, &DeleteParams::default())
        .await
    {
        eprintln!("e2e: could not delete namespace {namespace}: {e}; delete it by hand");
    }
    if let Err(panic) = outcome {
        std::panic::resume_unwind(panic.into_panic());
    }
}
