//! PrivateKeyJWT client authentication through the operator: keys as PEM and as JWK, both
//! assertion audiences, a fresh assertion for every renewal, and an unreadable key reported
//! without its content.

use serde_json::json;

use super::super::oidc;
use super::{READY_TIMEOUT, TestEnv, claims};

/// PrivateKeyJWT through the operator: a PEM key and a JWK both get single-audience tokens
/// (every renewal signs a new assertion, or the server would refuse the replay); an
/// unreadable key is reported without its content.
pub async fn private_key_jwt(env: &TestEnv) {
    let es256 = env.idp.client_private_key(oidc::M2M_JWT_ES256.id).await;
    env.create_private_key_issuer("pkjwt-pem", oidc::M2M_JWT_ES256.id, &es256.pem, "Issuer")
        .await;
    let rs256 = env.idp.client_private_key(oidc::M2M_JWT_RS256.id).await;
    env.create_private_key_issuer(
        "pkjwt-jwk",
        oidc::M2M_JWT_RS256.id,
        &rs256.jwk.to_string(),
        "TokenEndpoint",
    )
    .await;
    env.create_private_key_issuer(
        "pkjwt-garbage",
        oidc::M2M_JWT_RS256.id,
        "not a key at all",
        "Issuer",
    )
    .await;

    env.create_token(
        "pk-short",
        "pkjwt-pem",
        oidc::SHORT_LIVED,
        &["short/read"],
        None,
    )
    .await;
    env.create_token(
        "pk-orders",
        "pkjwt-jwk",
        oidc::ORDERS,
        &["orders/read"],
        None,
    )
    .await;
    env.create_token(
        "pk-broken",
        "pkjwt-garbage",
        oidc::ORDERS,
        &["orders/read"],
        None,
    )
    .await;

    env.wait_condition("pk-orders", "True", "Issued", READY_TIMEOUT)
        .await;
    assert_eq!(
        claims(&env.token_in("pk-orders").await)["aud"],
        json!(oidc::ORDERS)
    );
    env.wait_condition("pk-short", "True", "Issued", READY_TIMEOUT)
        .await;
    let first = env.token_in("pk-short").await;
    let renewed = env.wait_token_change("pk-short", &first).await;
    assert_eq!(
        claims(&renewed)["aud"],
        json!(oidc::SHORT_LIVED),
        "renewed with a fresh assertion"
    );

    let broken = env
        .wait_condition("pk-broken", "False", "IssuerNotReady", READY_TIMEOUT)
        .await;
    let message = broken.status.unwrap().conditions[0].message.clone();
    assert!(
        message.contains("pkjwt-garbage-key"),
        "names the Secret: {message}"
    );
    assert!(
        !message.contains("not a key at all"),
        "never the content: {message}"
    );
    env.wait_issuer("pkjwt-garbage", "False", "NotReady").await;
    env.wait_issuer("pkjwt-jwk", "True", "Ready").await;
}
