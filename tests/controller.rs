//! The real operator binary and kube-runtime Controller against the in-process Kubernetes
//! API double and a real OAuth server (oidc-provider). The same scenarios run against a
//! real cluster in `tests/e2e`.

mod support;

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use support::harness::{self, Harness};
use support::oidc;
use support::operator::{OperatorProcess, Options};
use support::scenarios::{
    READY_TIMEOUT, TestEnv, authorization_details, dpop, eventually, failures, lifecycle, login,
    mtls, plugin, private_key_jwt, rate_limit, refresh_chain, secretless, signature,
};

/// A fresh API double, OAuth server, namespace, and a running operator.
async fn start(namespace: &str) -> Harness {
    harness::start(namespace, Options::default()).await
}

#[tokio::test]
async fn issues_reissues_renews_and_survives_restart() {
    let mut h = start("lifecycle").await;
    lifecycle::issues_one_token_per_audience(&h.env).await;
    lifecycle::reissues_on_spec_change(&h.env).await;
    lifecycle::dropped_fields_leave_the_secret(&h.env).await;
    lifecycle::metadata_follows_the_spec_without_a_new_token(&h.env).await;
    lifecycle::forced_renewal(&h.env).await;
    lifecycle::renews_before_expiry(&h.env).await;
    lifecycle::restart_makes_no_token_requests(&h.env, &mut h.operator).await;
}

/// JSON logs with fields; `/metrics` follows the tokens: requests by issuer and result, expiry and readiness per
/// AudienceToken (gone when it is deleted), reconciles; `/healthz` and `/readyz` answer.
#[tokio::test]
async fn metrics_and_probes_and_json_logs() {
    let json_logs = Options {
        json_logs: true,
        ..Options::default()
    };
    let h = harness::start("metrics", json_logs).await;
    lifecycle::issues_one_token_per_audience(&h.env).await;
    let op = &h.operator;

    // Logs: one JSON object per line; token lines carry namespace, name, issuer, resource.
    let logs = op.logs();
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect();
    let published = lines
        .iter()
        .find(|l| l["message"] == "published token" && l["name"] == "orders")
        .unwrap_or_else(|| panic!("a published-token line for orders in {logs}"));
    assert_eq!(published["namespace"], "metrics");
    assert_eq!(published["issuer"], "TokenIssuer/metrics/idp");
    assert_eq!(published["resource"], oidc::ORDERS);
    assert_eq!(published["level"], "INFO");

    assert_eq!(op.http_get("/healthz").await.0, 200);
    wait_role(op, "leader: caches synced", READY_TIMEOUT).await;
    assert_eq!(op.metric("audience_token_leader").await, Some(1.0));

    let requests = r#"audience_token_requests_total{issuer="TokenIssuer/metrics/idp",grant="client_credentials",result="success"}"#;
    assert!(op.metric(requests).await >= Some(2.0), "two tokens issued");
    let count =
        r#"audience_token_request_duration_seconds_count{issuer="TokenIssuer/metrics/idp"}"#;
    assert!(op.metric(count).await >= Some(2.0));
    assert!(
        op.metric(r#"audience_token_reconcile_total{result="success"}"#)
            .await
            >= Some(2.0)
    );

    let orders = h.env.tokens().get("orders").await.expect("orders");
    let expires = orders.status.unwrap().expires_at.unwrap().0.as_second();
    let expiry = r#"audience_token_expiry_timestamp_seconds{namespace="metrics",name="orders"}"#;
    let ready = r#"audience_token_ready{namespace="metrics",name="orders"}"#;
    #[allow(clippy::cast_precision_loss)]
    let expected = Some(expires as f64);
    eventually("the expiry metric", READY_TIMEOUT, || async {
        let seen = op.metric(expiry).await;
        if seen == expected {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;
    assert_eq!(op.metric(ready).await, Some(1.0));
    let orders_failing = r#"audience_token_failing{namespace="metrics",name="orders"}"#;
    assert_eq!(op.metric(orders_failing).await, None, "healthy: no series");

    // A token that cannot be issued reports ready 0, failing 1 and an error result.
    h.env
        .create_token("unknown", "idp", oidc::UNKNOWN_RESOURCE, &[], None)
        .await;
    h.env
        .wait_condition("unknown", "False", "TokenRequestFailed", READY_TIMEOUT)
        .await;
    let failed = r#"audience_token_requests_total{issuer="TokenIssuer/metrics/idp",grant="client_credentials",result="error"}"#;
    assert!(op.metric(failed).await >= Some(1.0));
    eventually("ready 0 for the failing token", READY_TIMEOUT, || async {
        match op
            .metric(r#"audience_token_ready{namespace="metrics",name="unknown"}"#)
            .await
        {
            Some(0.0) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    })
    .await;
    assert_eq!(
        op.metric(r#"audience_token_failing{namespace="metrics",name="unknown"}"#)
            .await,
        Some(1.0)
    );

    h.env
        .tokens()
        .delete("orders", &DeleteParams::default())
        .await
        .expect("delete orders");
    eventually(
        "the deleted token's series to go",
        READY_TIMEOUT,
        || async {
            let (_, body) = op.http_get("/metrics").await;
            if body.contains(r#"name="orders""#) {
                Err("still there".to_string())
            } else {
                Ok(())
            }
        },
    )
    .await;
}

/// Two replicas: only the Lease holder requests tokens; on SIGTERM it releases the Lease
/// and the standby takes over within the Lease duration; a killed leader is replaced once
/// its Lease expires.
#[tokio::test]
async fn leader_election_hands_over() {
    const LEASE: Duration = Duration::from_secs(4);
    // Lease expiry, plus the up-to-1 s pause kube-lease-manager takes after seeing it.
    const TAKEOVER: Duration = Duration::from_secs(4 + 3);
    let elect = |id: &str| Options {
        leader_elect: Some((LEASE, id.to_string())),
        ..Options::default()
    };
    let mut h = harness::start("leader", elect("op-a")).await;
    let kubeconfig = h.kubeconfig().to_path_buf();
    wait_role(&h.operator, "leader", READY_TIMEOUT).await;
    let mut b = OperatorProcess::start_with(&kubeconfig, "leader", elect("op-b"));
    wait_role(&b, "standby", READY_TIMEOUT).await;
    assert_eq!(b.metric("audience_token_leader").await, Some(0.0));
    assert_eq!(lease_holder(&h.env).await.as_deref(), Some("op-a"));

    h.env
        .create_issuer("idp", &oidc::M2M_BASIC, oidc::M2M_BASIC.secret)
        .await;
    h.env
        .issue_token("orders", "idp", oidc::ORDERS, &["orders/read"])
        .await;
    let (_, standby_metrics) = b.http_get("/metrics").await;
    assert!(
        !standby_metrics.contains("audience_token_requests_total{"),
        "the standby made no token request:\n{standby_metrics}"
    );
    assert!(!b.logs().contains("published token"), "{}", b.logs());

    // SIGTERM: a clean exit that hands the Lease over.
    let exit = h.operator.stop().await;
    assert!(exit.is_some_and(|e| e.success()), "clean exit: {exit:?}");
    assert!(h.operator.logs().contains("released the leader Lease"));
    wait_role(&b, "leader", TAKEOVER).await;
    assert_eq!(lease_holder(&h.env).await.as_deref(), Some("op-b"));

    // The new leader writes: a forced renewal goes through it.
    let first = h.env.token_in("orders").await;
    h.env
        .force_renewal(&["orders"], "2026-01-01T00:00:00Z")
        .await;
    h.env.wait_token_change("orders", &first).await;
    assert!(b.logs().contains("published token"));
    // Text logs to a file, as in a pod: plain, no terminal colour codes, so a WARN line reads
    // " WARN " to grep and `kubectl logs`.
    assert!(!b.logs().contains('\x1b'), "escape codes in {}", b.logs());
    assert!(b.logs().contains(" INFO "), "{}", b.logs());

    // A crashed leader releases nothing: the standby waits for the Lease to expire.
    let mut a = OperatorProcess::start_with(&kubeconfig, "leader", elect("op-a"));
    wait_role(&a, "standby", READY_TIMEOUT).await;
    b.kill().await;
    wait_role(&a, "leader", TAKEOVER).await;
    assert_eq!(lease_holder(&h.env).await.as_deref(), Some("op-a"));
    assert!(a.exit_status().is_none(), "the new leader keeps running");

    // A leader that finds another holder (it was cut off and someone took over) stops its
    // controllers and exits 1, to come back as a standby.
    let now = jiff::Timestamp::now().to_string();
    Api::<Lease>::namespaced(h.env.client.clone(), "default")
        .patch(
            "audience-token-operator",
            &PatchParams::default(),
            &Patch::Merge(
                json!({"spec": {"holderIdentity": "intruder", "renewTime": now,
                "acquireTime": now, "leaseDurationSeconds": 60}}),
            ),
        )
        .await
        .expect("take the Lease");
    let exited = eventually("the displaced leader to exit", TAKEOVER, || {
        let status = a.exit_status();
        async move { status.ok_or_else(|| "still running".to_string()) }
    })
    .await;
    assert_eq!(exited.code(), Some(1), "{}", a.logs());
    assert!(a.logs().contains("lost the leader Lease"), "{}", a.logs());
}

/// Waits until `/readyz` says the operator is `role` (leader or standby).
async fn wait_role(operator: &OperatorProcess, role: &str, timeout: Duration) {
    eventually(&format!("the operator to be {role}"), timeout, || async {
        let (status, body) = operator.http_get("/readyz").await;
        if status == 200 && body.contains(role) {
            Ok(())
        } else {
            Err(format!("{status} {body}"))
        }
    })
    .await;
}

async fn lease_holder(env: &TestEnv) -> Option<String> {
    let lease = Api::<Lease>::namespaced(env.client.clone(), "default")
        .get("audience-token-operator")
        .await
        .expect("the Lease");
    lease.spec.and_then(|s| s.holder_identity)
}

#[tokio::test]
async fn rate_limit_spaces_token_requests() {
    let h = start("ratelimit").await;
    rate_limit::rate_limit_spaces_requests(&h.env).await;
}

#[tokio::test]
async fn foreign_secret_is_never_written() {
    let h = start("conflict").await;
    h.env
        .create_issuer("idp", &oidc::M2M_BASIC, oidc::M2M_BASIC.secret)
        .await;
    failures::never_writes_a_foreign_secret(&h.env).await;
}

#[tokio::test]
async fn failures_reach_status_and_recover() {
    let h = start("failures").await;
    h.env
        .create_issuer("idp", &oidc::M2M_BASIC, oidc::M2M_BASIC.secret)
        .await;
    failures::failures_reach_status_and_recover(&h.env).await;
}

#[tokio::test]
async fn refresh_token_chain_is_shared_and_survives_restarts() {
    let mut h = start("chain").await;
    refresh_chain::refresh_token_chain(&h.env, &mut h.operator).await;
}

/// Issue 8: a lost chain recovered while three AudienceTokens renew at once, four rounds
/// (the last across a restart): one request per token, no `invalid_grant`.
#[tokio::test]
async fn lost_refresh_chain_recovers_with_one_request_per_token() {
    let mut h = start("recovery").await;
    refresh_chain::lost_chain_recovers_with_one_request_per_token(&h.env, &mut h.operator).await;
}

/// A crash between the server's answer and the write of the rotated refresh token: seen at
/// the next start, survived where the server has a reuse grace period.
#[tokio::test]
async fn interrupted_rotation_is_resolved_at_start() {
    let mut h = start("interrupted").await;
    refresh_chain::interrupted_rotation_is_resolved_at_start(
        &h.env,
        &mut h.operator,
        &oidc::M2M_REFRESH,
        false,
    )
    .await;
    refresh_chain::interrupted_rotation_is_resolved_at_start(
        &h.env,
        &mut h.operator,
        &oidc::M2M_REFRESH_GRACE,
        true,
    )
    .await;
}

/// `spec.dpop`: DPoP-bound tokens with the key in the Secret, kept across renewals and
/// restarts, replaced when the algorithm changes.
#[tokio::test]
async fn dpop_bound_tokens_carry_their_key() {
    let mut h = start("dpop").await;
    dpop::dpop_bound_tokens(&h.env, &mut h.operator).await;
}

/// `login`: a person's login (PAR, PKCE, every resource) bootstraps a refresh-token chain that
/// the operator runs at once; a second login replaces the chain within seconds.
#[tokio::test]
async fn login_bootstraps_a_refresh_token_chain() {
    let h = start("login").await;
    login::login_bootstraps_a_refresh_token_chain(&h.env, h.kubeconfig()).await;
}

/// `spec.authorizationDetails` (RFC 9396): in the token request, granted and shown in
/// status, re-issued at once on a change, kept across a restart, sent by the refresh-token
/// grant too; in the client assertion of
/// a PrivateKeyJWT issuer, exactly as the spec has them.
#[tokio::test]
async fn authorization_details_in_the_request_or_the_assertion() {
    let mut h = start("rar").await;
    authorization_details::details_in_the_token_request(&h.env, &mut h.operator).await;
    authorization_details::details_through_the_refresh_chain(&h.env).await;
    authorization_details::details_in_the_client_assertion(&h.env).await;
}

/// `tlsClientCertificate`: TLS client authentication (CA-issued and self-signed), bound
/// tokens with their thumbprint, a restart, a certificate renewal, and what users get wrong.
#[tokio::test]
async fn mutual_tls_client_certificates_and_bound_tokens() {
    let pki = support::certs::TestPki::generate();
    let self_signed = support::certs::self_signed("m2m-self-signed");
    let mut h = harness::start_mtls("mtls", &pki, &self_signed).await;
    mtls::tls_client_auth_and_certificate_renewal(&h.env, &mut h.operator, &pki).await;
    mtls::self_signed_tls_client_auth(&h.env, &self_signed, &pki).await;
    mtls::certificate_problems_reach_status(&h.env, &self_signed, &pki).await;
}

#[tokio::test]
async fn signature_check_writes_only_tokens_signed_by_the_issuer() {
    let h = start("signature").await;
    signature::signature_check(&h.env).await;
}

#[tokio::test]
async fn private_key_jwt_client_authentication() {
    let h = start("pkjwt").await;
    private_key_jwt::private_key_jwt(&h.env).await;
}

/// Secretless issuers: no Secret holds a credential; ServiceAccount tokens minted by the
/// double (TokenRequest), trusted by the OAuth server through the double's JWKS, and a
/// grant per ServiceAccount that the double's RBAC check enforces.
#[tokio::test]
async fn service_account_tokens_replace_client_secrets() {
    let (h, operator) = harness::start_secretless("secretless").await;
    secretless::missing_grant_is_reported_then_fixed(&h.env, &operator).await;
    secretless::federated_client_credentials(&h.env, &operator).await;
    secretless::token_exchange(&h.env, &operator).await;
    // The operator asked to mint only the ServiceAccounts it was granted.
    let asked: std::collections::BTreeSet<String> = h
        .double
        .requests()
        .iter()
        .filter(|r| r.subresource.as_deref() == Some("token"))
        .inspect(|r| {
            assert_eq!(r.bearer_token.as_deref(), Some(harness::OPERATOR_TOKEN));
            assert_eq!(
                (r.verb.as_str(), r.plural.as_str()),
                ("create", "serviceaccounts")
            );
        })
        .filter_map(|r| r.name.clone())
        .collect();
    assert_eq!(
        asked,
        [
            oidc::EXCHANGE_SERVICE_ACCOUNT,
            oidc::FEDERATED_ENTRA_SERVICE_ACCOUNT,
            oidc::FEDERATED_SERVICE_ACCOUNT
        ]
        .map(String::from)
        .into(),
    );
    let mints = h.double.minted_count();
    assert!(
        (3..=8).contains(&mints),
        "one ServiceAccount token per account and audience is reused (3 accounts), and a few \
         issuer checks may race the first mint: {mints} minted"
    );
}

/// A new token costs one Secret write (a create: the Secret is not known, and nothing is
/// read first) and one status write, and with `--issuance-events=false` no Event; a
/// renewal reads nothing either.
#[tokio::test]
async fn an_issuance_makes_two_api_writes_without_events() {
    let quiet = Options {
        extra_args: vec!["--issuance-events=false".into()],
        ..Options::default()
    };
    let h = harness::start("calls", quiet).await;
    let env = &h.env;
    env.create_issuer("idp", &oidc::M2M_BASIC, oidc::M2M_BASIC.secret)
        .await;
    env.wait_issuer("idp", "True", "Ready").await;
    // The issuer's credential is read once, by its status check: not per token.
    let mark = h.double.request_count();
    env.issue_token("orders", "idp", oidc::ORDERS, &["orders/read"])
        .await;
    let calls: Vec<String> = h
        .double
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.bearer_token.as_deref() == Some(harness::OPERATOR_TOKEN))
        .filter(|r| r.verb != "watch")
        .map(|r| {
            let sub = r.subresource.map(|s| format!("/{s}")).unwrap_or_default();
            format!("{} {}{sub}", r.verb, r.plural)
        })
        .collect();
    assert_eq!(
        calls,
        ["create secrets", "patch audiencetokens/status"],
        "the operator's API calls for one new token"
    );
    let events = env.events_for("orders").await;
    assert!(events.is_empty(), "no Issued Event: {events:?}");
    env.force_renewal(&["orders"], "2026-01-01T00:00:00Z").await;
    env.wait_condition("orders", "True", "Renewed", READY_TIMEOUT)
        .await;
    assert!(
        env.events_for("orders").await.is_empty(),
        "no Renewed Event"
    );
}

/// `kubectl audtoken` (the binary linked as `kubectl-audtoken`) with a user's kubeconfig:
/// status of a healthy, a failing and an expired token, renew --wait, inspect, list.
#[tokio::test]
async fn kubectl_plugin_status_renew_inspect_list() {
    const USER: &str = "plugin-user";
    let h = start("plugin").await;
    let kubeconfig = std::env::temp_dir().join(format!("ato-plugin-user-{}", std::process::id()));
    std::fs::write(&kubeconfig, h.double.kubeconfig_yaml_with_token(USER))
        .expect("write user kubeconfig");
    let mark = h.double.request_count();
    plugin::kubectl_plugin(&h.env, &kubeconfig).await;
    // Only what a user of AudienceTokens may do: get/list/patch them, get their issuers,
    // list Events, get the Secret (inspect only).
    let mut calls: Vec<String> = h
        .double
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.bearer_token.as_deref() == Some(USER))
        .map(|r| format!("{} {}", r.verb, r.plural))
        .collect();
    calls.sort();
    calls.dedup();
    let allowed = [
        "get audiencetokens",
        "get secrets",
        "get tokenissuers",
        "list audiencetokens",
        "list events",
        "patch audiencetokens",
    ];
    assert_eq!(calls, allowed, "the plugin's calls");
    // `status` reads no Secret: a user who may not read it still gets the status.
    let user = plugin::Plugin::install(&kubeconfig);
    let mark = h.double.request_count();
    let status = user.run("plugin", &["status", "plugin-healthy"]).await;
    assert_eq!(status.code, 0, "{status}");
    let secrets_read = h
        .double
        .requests_since(mark)
        .into_iter()
        .filter(|r| r.bearer_token.as_deref() == Some(USER) && r.plural == "secrets")
        .count();
    assert_eq!(secrets_read, 0, "status read a Secret");
    let _ = std::fs::remove_file(&kubeconfig);
}
