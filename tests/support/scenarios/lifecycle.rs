//! The life of a token issued with client credentials: one Secret per audience, a re-issue
//! when the spec changes, forced renewal by annotation, renewal before expiry, and an
//! operator restart that requests nothing.
//!
//! All but the first need TokenIssuer `idp`. `issues_one_token_per_audience` creates it,
//! with AudienceTokens `orders` and `payments` (Secret `payments-api-token`), which
//! `reissues_on_spec_change`, `forced_renewal` and `restart_makes_no_token_requests` use.

use audience_token_operator::api::{AudienceToken, AudienceTokenSpec, SecretTemplate};
use audience_token_operator::secret::{
    EXPIRES_AT_ANNOTATION, ISSUED_AT_ANNOTATION, MANAGED_BY_LABEL, MANAGER, NAME_LABEL,
    SPEC_HASH_ANNOTATION, keys,
};
use k8s_openapi::api::core::v1::Secret;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::super::oidc;
use super::super::operator::OperatorProcess;
use super::{READY_TIMEOUT, TestEnv, claims, data};

/// Two AudienceTokens on one issuer get two Secrets, each holding a token for only its own
/// audience and scopes; status says so.
pub async fn issues_one_token_per_audience(env: &TestEnv) {
    env.create_issuer("idp", &oidc::M2M_BASIC, oidc::M2M_BASIC.secret)
        .await;
    env.create_token("orders", "idp", oidc::ORDERS, &["orders/read"], None)
        .await;
    env.create_token(
        "payments",
        "idp",
        oidc::PAYMENTS,
        &["payments/read"],
        Some("payments-api-token"),
    )
    .await;

    let orders = env
        .wait_condition("orders", "True", "Issued", READY_TIMEOUT)
        .await;
    let payments = env
        .wait_condition("payments", "True", "Issued", READY_TIMEOUT)
        .await;

    let orders_secret = env.secrets().get("orders").await.expect("Secret orders");
    assert_secret_layout(&orders_secret, &orders, oidc::ORDERS, "orders/read");
    let payments_secret = env
        .secrets()
        .get("payments-api-token")
        .await
        .expect("Secret payments-api-token");
    assert_secret_layout(&payments_secret, &payments, oidc::PAYMENTS, "payments/read");

    let issuer = env.wait_issuer("idp", "True", "Ready").await;
    assert_eq!(
        issuer.status.unwrap().token_endpoint,
        Some(env.idp.token_endpoint()),
        "discovered"
    );

    let status = orders.status.clone().unwrap();
    assert_eq!(status.audience, vec![oidc::ORDERS.to_string()]);
    assert_eq!(status.scopes, vec!["orders/read".to_string()]);
    assert_eq!(status.token_type.as_deref(), Some("Bearer"));
    assert_eq!(status.observed_generation, orders.metadata.generation);
    let (issued, expires, renewal) = (
        status.issued_at.unwrap().0,
        status.expires_at.unwrap().0,
        status.renewal_time.unwrap().0,
    );
    assert!(
        issued < renewal && renewal < expires,
        "issued {issued} < renewal {renewal} < expires {expires}"
    );
    let lifetime = expires.duration_since(issued).as_secs_f64();
    let renew_after = renewal.duration_since(issued).as_secs_f64();
    assert!(
        (0.6..=0.74).contains(&(renew_after / lifetime)),
        "renewal at about two thirds: {renew_after}/{lifetime}"
    );
    env.wait_event("orders", "Normal", "Issued", "Secret orders")
        .await;
}

/// Changing the scopes issues a new token at once (exactly one request).
pub async fn reissues_on_spec_change(env: &TestEnv) {
    let before = env.idp.token_requests().await.for_resource(oidc::ORDERS);
    let old = env.token_in("orders").await;
    env.tokens()
        .patch(
            "orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"scopes": ["orders/read", "orders/write"]}})),
        )
        .await
        .expect("patch scopes");
    let secret = env
        .wait_secret("orders", "a token with both scopes", |s| {
            data(s, keys::SCOPE) == "orders/read orders/write"
        })
        .await;
    let token = data(&secret, keys::TOKEN);
    assert_ne!(token, old);
    assert_eq!(claims(&token)["scope"], json!("orders/read orders/write"));
    let token_resource = env
        .wait_condition("orders", "True", "Renewed", READY_TIMEOUT)
        .await;
    assert_eq!(
        token_resource.status.unwrap().observed_generation,
        token_resource.metadata.generation
    );
    assert_eq!(
        env.idp.token_requests().await.for_resource(oidc::ORDERS),
        before + 1
    );
}

/// What the spec no longer asks for leaves the Secret at the next token: a `secretTemplate`
/// label and annotation, and the ownerReference after `deletionPolicy: Retain`. (A Secret
/// the operator created is owned by the create, which server-side apply never prunes; the
/// operator removes these itself.) A label someone else put on the Secret stays.
pub async fn dropped_fields_leave_the_secret(env: &TestEnv) {
    let spec = AudienceTokenSpec {
        secret_template: Some(SecretTemplate {
            labels: [("team".to_string(), "shop".to_string())].into(),
            annotations: [("note".to_string(), "hi".to_string())].into(),
        }),
        ..TestEnv::token_spec("idp", oidc::ORDERS, &["orders/read"])
    };
    env.submit_token("templated", spec).await;
    env.wait_condition("templated", "True", "Issued", READY_TIMEOUT)
        .await;
    let secret = env.secrets().get("templated").await.expect("Secret");
    assert_eq!(
        secret.labels().get("team").map(String::as_str),
        Some("shop")
    );
    assert_eq!(secret.owner_references().len(), 1);
    env.secrets()
        .patch(
            "templated",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"added-by-hand": "yes"}}})),
        )
        .await
        .expect("label the Secret by hand");

    env.tokens()
        .patch(
            "templated",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "secretTemplate": {"labels": {"team": null}},
                "deletionPolicy": "Retain",
                "scopes": ["orders/read", "orders/write"],
            }})),
        )
        .await
        .expect("drop the template label, retain the Secret, new scopes");
    let secret = env
        .wait_secret("templated", "the token with the new scopes", |s| {
            data(s, keys::SCOPE) == "orders/read orders/write"
        })
        .await;
    assert_eq!(secret.labels().get("team"), None, "dropped template label");
    assert_eq!(
        secret.annotations().get("note").map(String::as_str),
        Some("hi")
    );
    assert!(
        secret.owner_references().is_empty(),
        "Retain: no ownerReference left: {:?}",
        secret.owner_references()
    );
    assert_eq!(
        secret.labels().get("added-by-hand").map(String::as_str),
        Some("yes"),
        "someone else's label stays"
    );

    // (Without an ownerReference the garbage collector has nothing to follow; that the
    // Secret outlives its AudienceToken is the API server's part.)
    env.tokens()
        .delete("templated", &Default::default())
        .await
        .expect("delete AudienceToken");
    env.secrets()
        .delete("templated", &Default::default())
        .await
        .expect("clean up");
}

/// `deletionPolicy` and `secretTemplate` reach the Secret at once, without a new token: a
/// Secret switched to `Retain` loses its ownerReference before its AudienceToken can be
/// deleted (it waited for the next renewal before), and the template's labels and
/// annotations come and go, while the token and the token requests stay as they are.
pub async fn metadata_follows_the_spec_without_a_new_token(env: &TestEnv) {
    env.submit_token(
        "kept",
        TestEnv::token_spec("idp", oidc::ORDERS, &["orders/read"]),
    )
    .await;
    let issued = env
        .wait_condition("kept", "True", "Issued", READY_TIMEOUT)
        .await;
    let uid = issued.uid().expect("uid");
    let token = env.token_in("kept").await;
    let requests = env.idp.token_requests().await.for_resource(oidc::ORDERS);

    env.tokens()
        .patch(
            "kept",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {
                "deletionPolicy": "Retain",
                "secretTemplate": {"labels": {"team": "shop"}, "annotations": {"note": "hi"}},
            }})),
        )
        .await
        .expect("retain the Secret, add a template");
    let secret = env
        .wait_secret(
            "kept",
            "no ownerReference, the template's label and annotation",
            |s| {
                s.owner_references().is_empty()
                    && s.labels().get("team").map(String::as_str) == Some("shop")
                    && s.annotations().get("note").map(String::as_str) == Some("hi")
            },
        )
        .await;
    assert_eq!(data(&secret, keys::TOKEN), token, "the same token");
    assert_eq!(
        secret.labels().get(NAME_LABEL).map(String::as_str),
        Some("kept")
    );

    env.tokens()
        .patch(
            "kept",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"deletionPolicy": "Delete", "secretTemplate": null}})),
        )
        .await
        .expect("back to Delete, no template");
    let secret = env
        .wait_secret(
            "kept",
            "our ownerReference back, the template's keys gone",
            |s| {
                s.owner_references().iter().any(|r| r.uid == uid)
                    && !s.labels().contains_key("team")
                    && !s.annotations().contains_key("note")
            },
        )
        .await;
    assert_eq!(data(&secret, keys::TOKEN), token, "still the same token");
    // The status write follows the Secret's: wait for it to observe the new generation.
    env.wait_token(
        "kept",
        "Ready=True, Issued, for the current generation",
        READY_TIMEOUT,
        |t| {
            let status = t.status.clone().unwrap_or_default();
            let ready = status.conditions.iter().find(|c| c.type_ == "Ready");
            match ready {
                Some(c)
                    if c.status == "True"
                        && c.reason == "Issued"
                        && status.observed_generation == t.metadata.generation =>
                {
                    Ok(())
                }
                _ => Err(format!("{ready:?} at {:?}", status.observed_generation)),
            }
        },
    )
    .await;
    assert_eq!(
        env.idp.token_requests().await.for_resource(oidc::ORDERS),
        requests,
        "no token request for metadata"
    );
    env.tokens()
        .delete("kept", &Default::default())
        .await
        .expect("delete AudienceToken");
}

/// `audiencetoken.io/renew-requested-at` forces exactly one renewal for each new value.
pub async fn forced_renewal(env: &TestEnv) {
    let before = env.idp.token_requests().await.for_resource(oidc::PAYMENTS);
    let mut token = env.token_in("payments-api-token").await;
    for (round, value) in ["2026-11-21T10:00:00Z", "2026-11-21T10:05:00Z"]
        .into_iter()
        .enumerate()
    {
        env.force_renewal(&["payments"], value).await;
        token = env.wait_token_change("payments-api-token", &token).await;
        env.wait_forced("payments", value, READY_TIMEOUT).await;
        let requests = env.idp.token_requests().await.for_resource(oidc::PAYMENTS);
        assert_eq!(
            requests,
            before + round as u64 + 1,
            "one renewal per new value"
        );
    }
}

/// A token close to expiry is replaced by a new one in the same Secret.
pub async fn renews_before_expiry(env: &TestEnv) {
    env.issue_token("short", "idp", oidc::SHORT_LIVED, &["short/read"])
        .await;
    let first = env.token_in("short").await;
    let renewed = env.wait_token_change("short", &first).await;
    assert_eq!(claims(&renewed)["aud"], json!(oidc::SHORT_LIVED));
    env.wait_condition("short", "True", "Renewed", READY_TIMEOUT)
        .await;
    env.wait_event("short", "Normal", "Renewed", "").await;
    // A 6 s token cannot be renewed 90 s before expiry: a Warning Event says so.
    env.wait_event("short", "Warning", "RenewalWindow", "too short")
        .await;
}

/// After a restart, valid tokens are recognised from the Secrets' annotations: no token
/// request, and a lost status is rebuilt.
pub async fn restart_makes_no_token_requests(env: &TestEnv, operator: &mut OperatorProcess) {
    operator.stop().await;
    // Lose the status of one token entirely; keep the other's.
    env.tokens()
        .patch_status(
            "payments",
            &PatchParams::default(),
            &Patch::Merge(json!({"status": null})),
        )
        .await
        .expect("clear status");
    env.idp.reset_counts().await;
    operator.restart().await;

    let restored = env
        .wait_condition("payments", "True", "Issued", READY_TIMEOUT)
        .await;
    assert!(
        restored.status.unwrap().expires_at.is_some(),
        "status rebuilt from the Secret's annotations"
    );
    // A new token after the restart proves the restarted operator is reconciling.
    env.issue_token("after-restart", "idp", oidc::ORDERS, &["orders/read"])
        .await;

    let counts = env.idp.token_requests().await;
    assert_eq!(
        counts.total, 1,
        "only the new AudienceToken asked for a token: {counts:?}"
    );
    assert_eq!(counts.for_resource(oidc::PAYMENTS), 0);
}

/// Checks that a Secret has exactly the documented layout for this AudienceToken.
fn assert_secret_layout(secret: &Secret, token: &AudienceToken, resource: &str, scopes: &str) {
    let labels = secret.labels();
    assert_eq!(
        labels.get(MANAGED_BY_LABEL).map(String::as_str),
        Some(MANAGER)
    );
    assert_eq!(labels.get(NAME_LABEL), Some(&token.name_any()));
    let annotations = secret.annotations();
    for key in [
        EXPIRES_AT_ANNOTATION,
        ISSUED_AT_ANNOTATION,
        SPEC_HASH_ANNOTATION,
    ] {
        assert!(annotations.contains_key(key), "missing annotation {key}");
    }
    let owners = secret.owner_references();
    assert_eq!(owners.len(), 1, "one owner reference");
    assert_eq!(owners[0].uid, token.uid().unwrap());
    assert_eq!(owners[0].controller, Some(true));
    let data_keys: Vec<&str> = secret
        .data
        .as_ref()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        data_keys,
        vec![
            keys::AUDIENCE,
            keys::EXPIRES_AT,
            keys::SCOPE,
            keys::TOKEN,
            keys::TOKEN_TYPE
        ]
    );
    assert_eq!(data(secret, keys::TOKEN_TYPE), "Bearer");
    assert_eq!(data(secret, keys::AUDIENCE), resource);
    assert_eq!(data(secret, keys::SCOPE), scopes);
    assert_eq!(
        data(secret, keys::EXPIRES_AT),
        annotations[EXPIRES_AT_ANNOTATION]
    );
    let claims = claims(&data(secret, keys::TOKEN));
    assert_eq!(
        claims["aud"],
        json!(resource),
        "the token is for exactly this one audience"
    );
    assert_eq!(claims["scope"], json!(scopes));
}
