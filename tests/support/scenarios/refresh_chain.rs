//! Refresh-token chains (the RefreshToken grant): several AudienceTokens share one rotating
//! chain, each with a token for only its own audience; the chain survives renewals and
//! restarts, is reported lost without a retry storm, and recovers with a new bootstrap
//! value, also while several AudienceTokens renew at once (issue 8); a rotation interrupted
//! by a crash between the server's answer and the write of the rotated refresh token is
//! resolved at the next start.
//!
//! Each scenario creates its own issuer and AudienceTokens.

use std::time::Duration;

use audience_token_operator::api::AudienceToken;
use base64::Engine;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::super::oidc::{self, TestClient};
use super::super::operator::OperatorProcess;
use super::{BOOTSTRAP_KEY, READY_TIMEOUT, TestEnv, claims, eventually};

/// The in-flight annotation on a chain's state Secret.
const IN_FLIGHT_ANNOTATION: &str = "audiencetoken.io/refresh-in-flight";
/// How soon a chain's AudienceTokens and issuer must notice a change the operator has to
/// poll for (a new bootstrap value, an interrupted rotation found at start): seconds, not
/// the minutes of a backoff.
const NOTICE_TIMEOUT: Duration = Duration::from_secs(30);

/// Three AudienceTokens share one rotating refresh-token chain (the seeds' pattern): each gets
/// a token for only its own audience, the chain survives renewals and an operator restart, a
/// resource outside the grant is refused locally, a stale refresh token is reported as a lost
/// chain without a retry storm, and a new bootstrap token recovers.
pub async fn refresh_token_chain(env: &TestEnv, operator: &mut OperatorProcess) {
    let resources = [oidc::ORDERS, oidc::PAYMENTS, oidc::SHORT_LIVED];
    let bootstrap = env
        .idp
        .mint_refresh_token(oidc::M2M_REFRESH.id, &resources, None)
        .await;
    env.put_bootstrap("chain-bootstrap", &bootstrap).await;
    env.create_refresh_issuer("chain", "chain-bootstrap", &resources)
        .await;
    env.create_token(
        "chain-orders",
        "chain",
        oidc::ORDERS,
        &["orders/read"],
        None,
    )
    .await;
    env.create_token(
        "chain-payments",
        "chain",
        oidc::PAYMENTS,
        &["payments/read"],
        None,
    )
    .await;
    env.create_token(
        "chain-short",
        "chain",
        oidc::SHORT_LIVED,
        &["short/read"],
        None,
    )
    .await;
    for (name, resource) in [
        ("chain-orders", oidc::ORDERS),
        ("chain-payments", oidc::PAYMENTS),
        ("chain-short", oidc::SHORT_LIVED),
    ] {
        env.wait_condition(name, "True", "Issued", READY_TIMEOUT)
            .await;
        assert_eq!(
            claims(&env.token_in(name).await)["aud"],
            json!(resource),
            "{name} has only its own audience"
        );
    }
    let rotated = env
        .state_refresh_token("chain")
        .await
        .expect("state Secret holds the chain");
    assert_ne!(
        rotated, bootstrap,
        "the bootstrap token was used and rotated"
    );

    // Several renewals of the 6 s token, each rotating the chain.
    let mut short = env.token_in("chain-short").await;
    for _ in 0..2 {
        short = env.wait_token_change("chain-short", &short).await;
        assert_eq!(claims(&short)["aud"], json!(oidc::SHORT_LIVED));
    }

    // A resource the grant does not cover is refused without a request.
    let before = env.idp.token_requests().await;
    env.create_token("chain-elsewhere", "chain", oidc::OPAQUE, &[], None)
        .await;
    env.wait_condition("chain-elsewhere", "False", "NotAllowed", READY_TIMEOUT)
        .await;
    assert_eq!(
        env.idp.token_requests().await.for_resource(oidc::OPAQUE),
        before.for_resource(oidc::OPAQUE)
    );
    env.wait_event("chain-elsewhere", "Warning", "NotAllowed", "")
        .await;

    // The chain survives a restart between rotations: the state Secret carries it on.
    operator.stop().await;
    let persisted = env
        .state_refresh_token("chain")
        .await
        .expect("state Secret");
    operator.restart().await;
    env.wait_token_change("chain-short", &short).await;
    assert_ne!(
        env.state_refresh_token("chain").await.expect("state"),
        persisted,
        "rotated after restart"
    );
    env.wait_condition("chain-orders", "True", "Issued", READY_TIMEOUT)
        .await;

    // A stale (already used) refresh token: reported as a lost chain, not retried in a loop.
    operator.stop().await;
    env.secrets()
        .patch(
            "chain-refresh-state",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {BOOTSTRAP_KEY: base64::engine::general_purpose::STANDARD.encode(&persisted)}})),
        )
        .await
        .expect("plant a spent refresh token");
    operator.restart().await;
    let lost = env
        .wait_condition("chain-short", "False", "Expired", READY_TIMEOUT)
        .await;
    assert!(
        lost.status
            .unwrap()
            .last_failure_message
            .unwrap()
            .contains("RefreshChainLost")
    );
    let requests_after_loss = env
        .idp
        .token_requests()
        .await
        .for_client(oidc::M2M_REFRESH.id);
    let attempts = failed_attempts(
        &env.tokens()
            .get("chain-short")
            .await
            .expect("AudienceToken"),
    );
    env.wait_token(
        "chain-short",
        "more local attempts on the lost chain",
        Duration::from_secs(60),
        |token| {
            let now = failed_attempts(token);
            if now >= attempts + 2 {
                Ok(())
            } else {
                Err(format!("{now} attempts"))
            }
        },
    )
    .await;
    assert_eq!(
        env.idp
            .token_requests()
            .await
            .for_client(oidc::M2M_REFRESH.id),
        requests_after_loss,
        "a lost chain makes no further token requests"
    );
    env.wait_event("chain", "Warning", "RefreshChainLost", "")
        .await;
    // Rotations are Events on the issuer.
    env.wait_event(
        "chain",
        "Normal",
        "RefreshTokenRotated",
        "chain-refresh-state",
    )
    .await;

    // A new bootstrap token starts a new chain, and everything recovers by itself, within
    // seconds and without an annotation: before chain-short's next attempt would be due.
    let next_attempt = env
        .wait_token(
            "chain-short",
            "chain-short's backoff to grow past 30 s",
            Duration::from_secs(180),
            |token| {
                let status = token.status.clone().unwrap_or_default();
                let next = status.next_attempt_time.map(|t| t.0);
                match next {
                    Some(at) if at > jiff::Timestamp::now() + Duration::from_secs(30) => Ok(at),
                    other => Err(format!("nextAttemptTime {other:?}")),
                }
            },
        )
        .await;
    let fresh = env
        .idp
        .mint_refresh_token(oidc::M2M_REFRESH.id, &resources, None)
        .await;
    env.put_bootstrap("chain-bootstrap", &fresh).await;
    // The issuer looks for a new bootstrap value every few seconds, and a new value waives
    // the backoff of the chain's tokens.
    env.wait_condition("chain-short", "True", "Renewed", Duration::from_secs(25))
        .await;
    assert!(
        jiff::Timestamp::now() < next_attempt,
        "renewed before the backed-off attempt at {next_attempt} was due"
    );
    env.wait_issuer("chain", "True", "Ready").await;
    assert_eq!(
        claims(&env.token_in("chain-short").await)["aud"],
        json!(oidc::SHORT_LIVED)
    );
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
    env.issue_token(&token, issuer, oidc::ORDERS, &["orders/read"])
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

/// The status and reason of the AudienceToken's Ready condition.
fn ready(token: &AudienceToken) -> Option<(String, String)> {
    token
        .status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready")
        .map(|c| (c.status.clone(), c.reason.clone()))
}

/// The tokens the AudienceTokens' Secrets hold now.
async fn tokens_in(env: &TestEnv, names: &[&str]) -> Vec<String> {
    let mut tokens = Vec::new();
    for name in names {
        tokens.push(env.token_in(name).await);
    }
    tokens
}

/// The AudienceToken's `status.failedAttempts` (0 without a status).
fn failed_attempts(token: &AudienceToken) -> i32 {
    token
        .status
        .as_ref()
        .map(|s| s.failed_attempts)
        .unwrap_or_default()
}
