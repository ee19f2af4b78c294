//! `verifyAccessTokenSignature`: a token signed by the issuer's keys is written, an opaque
//! one is written unchecked, and one that does not verify is never written.

use serde_json::json;

use super::super::oidc::{self, OidcServer};
use super::{READY_TIMEOUT, TestEnv, claims};

/// With `verifyAccessTokenSignature`, a token signed by the issuer's keys is written, an
/// opaque one is written unchecked, and one that does not verify against the configured keys
/// is never written (TokenRequestFailed).
pub async fn signature_check(env: &TestEnv) {
    env.create_verifying_issuer("verified", &oidc::M2M_BASIC, None)
        .await;
    env.issue_token("signed", "verified", oidc::ORDERS, &["orders/read"])
        .await;
    assert_eq!(
        claims(&env.token_in("signed").await)["aud"],
        json!(oidc::ORDERS)
    );

    env.issue_token("opaque", "verified", oidc::OPAQUE, &["opaque/read"])
        .await;

    // Keys of another server: the token's kid is not there, so it is not trusted.
    let stranger = OidcServer::start().await;
    env.create_verifying_issuer("wrong-keys", &oidc::M2M_BASIC, Some(stranger.jwks_uri()))
        .await;
    env.create_token(
        "untrusted",
        "wrong-keys",
        oidc::ORDERS,
        &["orders/read"],
        None,
    )
    .await;
    let failed = env
        .wait_condition("untrusted", "False", "TokenRequestFailed", READY_TIMEOUT)
        .await;
    let message = failed.status.unwrap().conditions[0].message.clone();
    assert!(
        message.contains("signature check failed") && message.contains("no key with kid"),
        "{message}"
    );
    assert!(
        env.secrets().get_opt("untrusted").await.unwrap().is_none(),
        "a token that does not verify is never written"
    );
}
