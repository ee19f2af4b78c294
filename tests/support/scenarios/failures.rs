//! What the operator refuses and how failures show: a Secret it does not own is never
//! written (`SecretConflict`); server errors and multi-audience tokens reach status and
//! Events, never a Secret; a fixed credential recovers by itself.
//!
//! Both need TokenIssuer `idp`, as `lifecycle::issues_one_token_per_audience` creates it.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::ResourceExt;
use kube::api::PostParams;
use serde_json::json;

use super::super::oidc;
use super::{READY_TIMEOUT, TestEnv, claims, data};

/// A Secret of the wanted name that the operator does not own is never written. It is not
/// in the operator's cache (only owned Secrets are), so the first token is requested and
/// then dropped when the create finds the Secret; after that the operator reads the Secret
/// before anything else and requests no token for it.
pub async fn never_writes_a_foreign_secret(env: &TestEnv) {
    let foreign = Secret {
        metadata: ObjectMeta {
            name: Some("hands-off".into()),
            labels: Some(BTreeMap::from([("app".into(), "someone-else".into())])),
            ..ObjectMeta::default()
        },
        data: Some(BTreeMap::from([(
            "token".into(),
            ByteString(b"not yours".to_vec()),
        )])),
        ..Secret::default()
    };
    let created = env
        .secrets()
        .create(&PostParams::default(), &foreign)
        .await
        .expect("create foreign Secret");
    let before = env.idp.token_requests().await.total;

    env.create_token(
        "conflicted",
        "idp",
        oidc::PAYMENTS,
        &["payments/read"],
        Some("hands-off"),
    )
    .await;
    let token = env
        .wait_condition("conflicted", "False", "SecretConflict", READY_TIMEOUT)
        .await;
    let message = &token.status.unwrap().conditions[0].message;
    assert!(message.contains("hands-off"), "{message}");

    let after = env
        .secrets()
        .get("hands-off")
        .await
        .expect("foreign Secret still there");
    assert_eq!(
        after.resource_version(),
        created.resource_version(),
        "foreign Secret untouched"
    );
    assert_eq!(data(&after, "token"), "not yours");
    let first = env.idp.token_requests().await.total - before;
    assert!(
        first <= 1,
        "{first} tokens requested for a Secret we cannot write"
    );
    env.wait_event("conflicted", "Warning", "SecretConflict", "")
        .await;
    // Look again (a forced renewal): the Secret is read first, and no token is requested.
    env.force_renewal(&["conflicted"], "2026-01-01T00:00:00Z")
        .await;
    let again = env
        .wait_forced("conflicted", "2026-01-01T00:00:00Z", READY_TIMEOUT)
        .await;
    let ready = &again.status.unwrap().conditions[0];
    assert_eq!(ready.reason, "SecretConflict", "{ready:?}");
    assert_eq!(
        env.idp.token_requests().await.total - before,
        first,
        "no token requested once the Secret is known to be someone else's"
    );
    let after = env.secrets().get("hands-off").await.expect("still there");
    assert_eq!(after.resource_version(), created.resource_version());
}

/// Server errors reach status (never a token), a multi-audience token is refused, and a
/// fixed credential recovers without anyone touching the AudienceToken.
pub async fn failures_reach_status_and_recover(env: &TestEnv) {
    env.create_token("unknown", "idp", oidc::UNKNOWN_RESOURCE, &[], None)
        .await;
    let unknown = env
        .wait_condition("unknown", "False", "TokenRequestFailed", READY_TIMEOUT)
        .await;
    let status = unknown.status.unwrap();
    assert!(
        status.conditions[0].message.contains("invalid_target"),
        "{:?}",
        status.conditions[0]
    );
    assert!(status.failed_attempts >= 1);
    assert!(
        status
            .last_failure_message
            .unwrap()
            .contains("invalid_target")
    );
    assert!(status.next_attempt_time.is_some());
    assert!(
        env.secrets().get_opt("unknown").await.unwrap().is_none(),
        "no Secret without a token"
    );

    env.create_token("multi", "idp", oidc::MULTI_AUDIENCE, &["multi/read"], None)
        .await;
    let multi = env
        .wait_condition("multi", "False", "AudienceMismatch", READY_TIMEOUT)
        .await;
    let message = multi.status.unwrap().conditions[0].message.clone();
    assert!(message.contains(oidc::MULTI_AUDIENCE_OTHER), "{message}");
    assert!(
        env.secrets().get_opt("multi").await.unwrap().is_none(),
        "a multi-audience token is never written"
    );
    for (name, reason) in [
        ("unknown", "TokenRequestFailed"),
        ("multi", "AudienceMismatch"),
    ] {
        env.wait_event(name, "Warning", reason, "").await;
    }

    env.create_issuer("wrong-secret", &oidc::M2M_POST, "not-the-secret")
        .await;
    env.create_token(
        "recovering",
        "wrong-secret",
        oidc::ORDERS,
        &["orders/read"],
        None,
    )
    .await;
    let failing = env
        .wait_condition("recovering", "False", "TokenRequestFailed", READY_TIMEOUT)
        .await;
    assert!(
        failing.status.unwrap().conditions[0]
            .message
            .contains("invalid_client")
    );
    env.put_client_secret("wrong-secret-client", oidc::M2M_POST.secret)
        .await;
    let recovered = env
        .wait_condition("recovering", "True", "Issued", Duration::from_secs(120))
        .await;
    let status = recovered.status.unwrap();
    assert_eq!(status.failed_attempts, 0);
    assert!(
        status.last_failure_message.is_none(),
        "a success clears the failure"
    );
    let token = env.token_in("recovering").await;
    assert_eq!(claims(&token)["aud"], json!(oidc::ORDERS));

    // Valid but failing: the issuer goes away and a renewal is forced. Ready stays True
    // (the token still works) but the reason is the failure, never `Issued`/`Renewed`.
    env.issuers()
        .delete("wrong-secret", &Default::default())
        .await
        .expect("delete TokenIssuer");
    env.force_renewal(&["recovering"], "2026-01-01T00:00:01Z")
        .await;
    let failing = env
        .wait_forced("recovering", "2026-01-01T00:00:01Z", READY_TIMEOUT)
        .await;
    let ready = failing.status.as_ref().unwrap().conditions[0].clone();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("True", "IssuerNotReady"),
        "{ready:?}"
    );
    assert!(
        ready.message.contains("renewal failing"),
        "{}",
        ready.message
    );
    assert_eq!(
        env.token_in("recovering").await,
        token,
        "the valid token is kept"
    );
    // Healthy again once the issuer is back.
    env.create_issuer("wrong-secret", &oidc::M2M_POST, oidc::M2M_POST.secret)
        .await;
    env.force_renewal(&["recovering"], "2026-01-01T00:00:02Z")
        .await;
    env.wait_condition("recovering", "True", "Renewed", READY_TIMEOUT)
        .await;
}
