//! Refresh-token chains when things go wrong: a lost chain recovered with a new bootstrap
//! value while several AudienceTokens renew at once (issue 8), and an operator that dies
//! between the server's answer and the write of the rotated refresh token. Written against
//! the Kubernetes API only, like every scenario, so they run on the API double and in e2e.

use std::time::Duration;

use audience_token_operator::api::AudienceToken;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::super::oidc::{self, TestClient};
use super::super::operator::OperatorProcess;
use super::{READY_TIMEOUT, TestEnv, claims, eventually};

/// The in-flight annotation on a chain's state Secret.
const IN_FLIGHT_ANNOTATION: &str = "audiencetoken.io/refresh-in-flight";
/// How soon a chain's AudienceTokens and issuer must notice a change the operator has to
/// poll for (a new bootstrap value, an interrupted rotation found at start): seconds, not
/// the minutes of a backoff.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(30);

impl TestEnv {
    /// Sets a new `renew-requested-at` value on each AudienceToken.
    pub async fn force_renewal(&self, names: &[&str], value: &str) {
        for name in names {
            self.tokens()
                .patch(
                    name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"annotations": {"audiencetoken.io/renew-requested-at": value}}})),
                )
                .await
                .expect("annotate renew-requested-at");
        }
    }

    /// Waits until the AudienceToken acted on the forced-renewal `value` (successfully or
    /// not) and returns it.
    pub async fn wait_forced(&self, name: &str, value: &str, timeout: Duration) -> AudienceToken {
        let api = self.tokens();
        eventually(
            &format!("{name} to act on renew-requested-at {value}"),
            timeout,
            || {
                let api = api.clone();
                async move {
                    let token = api.get(name).await.map_err(|e| e.to_string())?;
                    let status = token.status.clone().unwrap_or_default();
                    match status.last_renew_requested_at.as_deref() {
                        Some(v) if v == value => Ok(token),
                        other => Err(format!("lastRenewRequestedAt {other:?}, status {status:?}")),
                    }
                }
            },
        )
        .await
    }

    /// Annotations of the chain's state Secret.
    async fn state_annotations(&self, issuer: &str) -> std::collections::BTreeMap<String, String> {
        self.secrets()
            .get(&format!("{issuer}-refresh-state"))
            .await
            .expect("state Secret")
            .annotations()
            .clone()
    }
}

fn ready(token: &AudienceToken) -> Option<(String, String)> {
    token
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// Three AudienceTokens (two resources) on one chain. The chain is lost (someone spends the
/// current refresh token), then recovered with a new bootstrap value while all three renew
/// at once; four rounds, the last with an operator restart between the new bootstrap value
/// and the renewals. Each recovery costs exactly one request per token and no
/// `invalid_grant`: the bootstrap value is adopted once and every later request uses the
/// rotated token.
pub async fn lost_chain_recovers_with_one_request_per_token(
    env: &TestEnv,
    operator: &mut OperatorProcess,
) {
    let client = oidc::M2M_REFRESH;
    let resources = [oidc::ORDERS, oidc::PAYMENTS];
    let issuer = "shared";
    let bootstrap_secret = "shared-bootstrap";
    let tokens = [
        ("shared-orders", oidc::ORDERS, "orders/read"),
        ("shared-orders-write", oidc::ORDERS, "orders/write"),
        ("shared-payments", oidc::PAYMENTS, "payments/read"),
    ];
    let names: Vec<&str> = tokens.iter().map(|(name, _, _)| *name).collect();
    let first = env
        .idp
        .mint_refresh_token(client.id, &resources, None)
        .await;
    env.put_bootstrap(bootstrap_secret, &first).await;
    env.create_refresh_issuer_for(issuer, &client, bootstrap_secret, &resources)
        .await;
    for (name, resource, scope) in tokens {
        env.create_token(name, issuer, resource, &[scope], None)
            .await;
    }
    for name in &names {
        env.wait_condition(name, "True", "Issued", READY_TIMEOUT)
            .await;
    }

    for round in 1..=4 {
        let restart = round == 4;
        // Lose the chain: another party spends the current refresh token, so the next
        // renewal is refused (and the stock server revokes the grant).
        let current = env
            .state_refresh_token(issuer)
            .await
            .expect("the state Secret holds the chain");
        let (status, body) = env
            .idp
            .spend_refresh_token(&client, &current, oidc::ORDERS)
            .await;
        assert_eq!(
            status, 200,
            "round {round}: spending the chain's token: {body}"
        );
        let lose = format!("2026-12-01T0{round}:00:00Z");
        env.force_renewal(&names, &lose).await;
        for name in &names {
            env.wait_forced(name, &lose, READY_TIMEOUT).await;
        }
        env.wait_issuer(issuer, "False", "RefreshChainLost").await;

        // Recover: a new bootstrap value, then all three renew at once.
        if restart {
            operator.stop().await;
        }
        env.idp.reset_counts().await;
        let before: Vec<String> = tokens_in(env, &names).await;
        let fresh = env
            .idp
            .mint_refresh_token(client.id, &resources, None)
            .await;
        env.put_bootstrap(bootstrap_secret, &fresh).await;
        if restart {
            operator.start_again();
        }
        let recover = format!("2026-12-01T0{round}:30:00Z");
        env.force_renewal(&names, &recover).await;
        for ((name, resource, _), old) in tokens.iter().zip(&before) {
            let token = env.wait_forced(name, &recover, READY_TIMEOUT).await;
            assert_eq!(
                ready(&token),
                Some(("True".into(), "Renewed".into())),
                "round {round}: {name} renewed: {:?}",
                token.status
            );
            let new = env.token_in(name).await;
            assert_ne!(&new, old, "round {round}: {name} has a new token");
            assert_eq!(claims(&new)["aud"], json!(resource));
        }
        env.wait_issuer(issuer, "True", "Ready").await;
        let counts = env.idp.token_requests().await;
        assert_eq!(
            counts.errors("invalid_grant"),
            0,
            "round {round}: no refresh token was used twice: {counts:?}"
        );
        assert_eq!(
            counts.for_client(client.id),
            3,
            "round {round}: one request per token: {counts:?}"
        );
    }
}

/// The tokens the AudienceTokens' Secrets hold now.
async fn tokens_in(env: &TestEnv, names: &[&str]) -> Vec<String> {
    let mut tokens = Vec::new();
    for name in names {
        tokens.push(env.token_in(name).await);
    }
    tokens
}

/// The operator is killed after the server rotated the refresh token and before the answer
/// arrived. The state Secret recorded the request as in flight; at the next start the
/// operator retries once with the recorded token. On a server with a reuse grace period
/// (`survives`) that works and the chain goes on; on a strict server the chain shows as
/// lost at once, saying why, instead of at the next renewal.
pub async fn interrupted_rotation_is_resolved_at_start(
    env: &TestEnv,
    operator: &mut OperatorProcess,
    client: &TestClient,
    survives: bool,
) {
    let issuer = if survives { "grace" } else { "strict" };
    let token = format!("{issuer}-orders");
    let bootstrap_secret = format!("{issuer}-bootstrap");
    let resources = [oidc::ORDERS];
    let bootstrap = env
        .idp
        .mint_refresh_token(client.id, &resources, None)
        .await;
    env.put_bootstrap(&bootstrap_secret, &bootstrap).await;
    env.create_refresh_issuer_for(issuer, client, &bootstrap_secret, &resources)
        .await;
    env.create_token(&token, issuer, oidc::ORDERS, &["orders/read"], None)
        .await;
    env.wait_condition(&token, "True", "Issued", READY_TIMEOUT)
        .await;
    let issued = env.token_in(&token).await;
    assert!(
        !env.state_annotations(issuer)
            .await
            .contains_key(IN_FLIGHT_ANNOTATION),
        "nothing in flight after an answer"
    );

    // The next refresh answer is held; the operator dies while it waits for it.
    env.idp.reset_counts().await;
    env.idp.hold_next_refresh(Duration::from_secs(5)).await;
    env.force_renewal(&[&token], "2026-12-01T12:00:00Z").await;
    eventually(
        "the server to hold a refresh answer",
        READY_TIMEOUT,
        || async {
            let counts = env.idp.token_requests().await;
            if counts.held == 1 {
                Ok(())
            } else {
                Err(format!("{counts:?}"))
            }
        },
    )
    .await;
    operator.kill().await;
    let annotations = env.state_annotations(issuer).await;
    let record = annotations
        .get(IN_FLIGHT_ANNOTATION)
        .unwrap_or_else(|| panic!("the request was recorded as in flight: {annotations:?}"));
    assert!(record.contains(oidc::ORDERS), "{record}");

    operator.start_again();
    if survives {
        let renewed = env
            .wait_forced(&token, "2026-12-01T12:00:00Z", NOTICE_TIMEOUT)
            .await;
        assert_eq!(
            ready(&renewed),
            Some(("True".into(), "Renewed".into())),
            "{:?}",
            renewed.status
        );
        assert_ne!(env.token_in(&token).await, issued);
        env.wait_issuer(issuer, "True", "Ready").await;
        eventually("the in-flight record to go", NOTICE_TIMEOUT, || async {
            let annotations = env.state_annotations(issuer).await;
            if annotations.contains_key(IN_FLIGHT_ANNOTATION) {
                Err(format!("{annotations:?}"))
            } else {
                Ok(())
            }
        })
        .await;
        // The chain goes on with the token the held answer carried.
        let before = env.token_in(&token).await;
        env.force_renewal(&[&token], "2026-12-01T12:10:00Z").await;
        env.wait_forced(&token, "2026-12-01T12:10:00Z", READY_TIMEOUT)
            .await;
        assert_ne!(env.token_in(&token).await, before);
        env.wait_issuer(issuer, "True", "Ready").await;
        let counts = env.idp.token_requests().await;
        assert_eq!(counts.errors("invalid_grant"), 0, "{counts:?}");
    } else {
        let lost = env.wait_issuer(issuer, "False", "RefreshChainLost").await;
        let message = lost
            .status
            .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"))
            .map(|c| c.message)
            .unwrap_or_default();
        assert!(
            message.contains("in flight"),
            "says the rotation was interrupted: {message}"
        );
        assert!(
            message.contains(&bootstrap_secret),
            "says how to recover: {message}"
        );
        let counts = env.idp.token_requests().await;
        assert_eq!(
            counts.errors("invalid_grant"),
            1,
            "one retry with the recorded token, no more: {counts:?}"
        );
        // The workload still has its valid token.
        assert_eq!(env.token_in(&token).await, issued);
    }
}
