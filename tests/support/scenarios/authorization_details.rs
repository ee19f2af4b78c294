//! Authorization details (RFC 9396, `spec.authorizationDetails`) through the operator: in
//! the token request (the test server grants them, status shows what it granted, the Secret
//! holds the usual keys only, a change re-issues at once, a restart re-issues nothing), by
//! both grants, and
//! in the client assertion of a PrivateKeyJWT issuer (`authorizationDetailsIn:
//! ClientAssertion`, HelseID's multi-tenant clients), where the assertion the server
//! received carries exactly the spec's details.

use std::collections::BTreeSet;

use audience_token_operator::api::{AudienceToken, AudienceTokenSpec};
use audience_token_operator::secret::keys;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Patch, PatchParams};
use serde_json::{Value, json};

use super::super::oidc;
use super::super::operator::OperatorProcess;
use super::{READY_TIMEOUT, TestEnv, claims, data};

/// HelseID's authorization detail for organisation `child` of `parent` (DESIGN.md).
pub fn helseid(parent: &str, child: &str) -> Value {
    json!({
        "type": "helseid_authorization",
        "practitioner_role": {"organization": {"identifier": {
            "system": "urn:oid:1.0.6523",
            "type": "ENH",
            "value": format!("NO:ORGNR:{parent}:{child}")
        }}}
    })
}

impl TestEnv {
    /// Creates AudienceToken `name` for `resource` from `issuer` with these
    /// authorization details.
    pub async fn create_token_with_details(
        &self,
        name: &str,
        issuer: &str,
        resource: &str,
        details: Vec<Value>,
    ) {
        let spec = AudienceTokenSpec {
            authorization_details: details,
            ..Self::token_spec(issuer, resource, &[])
        };
        self.submit_token(name, spec).await;
    }

    /// Replaces (or, with an empty list, removes) AudienceToken `name`'s authorization
    /// details.
    pub async fn set_details(&self, name: &str, details: &[Value]) {
        let value = if details.is_empty() {
            Value::Null
        } else {
            json!(details)
        };
        self.tokens()
            .patch(
                name,
                &PatchParams::default(),
                &Patch::Merge(json!({"spec": {"authorizationDetails": value}})),
            )
            .await
            .expect("patch spec.authorizationDetails");
    }

    /// Waits until AudienceToken `name`'s status lists exactly `granted`.
    pub async fn wait_granted(&self, name: &str, granted: &[Value]) -> AudienceToken {
        self.wait_token(
            name,
            &format!("{name} to show the granted authorization details {granted:?}"),
            READY_TIMEOUT,
            |token| {
                let shown = token
                    .status
                    .as_ref()
                    .map(|s| s.authorization_details.clone())
                    .unwrap_or_default();
                if shown == granted {
                    Ok(token.clone())
                } else {
                    Err(format!("status.authorizationDetails {shown:?}"))
                }
            },
        )
        .await
    }

    /// The `assertion_details` of every client assertion of `client_id` the server has
    /// received that carried the claim, oldest first.
    pub async fn assertion_details_seen(&self, client_id: &str) -> Vec<Value> {
        self.idp
            .secrets_seen()
            .await
            .client_assertions
            .iter()
            .map(|assertion| claims(assertion))
            .filter(|claims| claims["sub"] == client_id)
            .filter_map(|claims| claims.get("assertion_details").cloned())
            .collect()
    }
}

/// The data keys every token Secret has, and nothing else for a bearer token.
const USUAL_KEYS: [&str; 5] = [
    keys::TOKEN,
    keys::TOKEN_TYPE,
    keys::EXPIRES_AT,
    keys::AUDIENCE,
    keys::SCOPE,
];

/// The Secret has the usual keys only, and no organisation number anywhere in it.
fn assert_no_details_in(secret: &Secret) {
    let data_keys: BTreeSet<&str> = secret
        .data
        .as_ref()
        .expect("Secret data")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(data_keys, BTreeSet::from(USUAL_KEYS), "the usual keys only");
    let written = serde_json::to_string(secret).expect("Secret as JSON");
    assert!(
        !written.contains("NO:ORGNR"),
        "no authorization detail in the Secret: {written}"
    );
}

/// `authorizationDetailsIn: TokenRequest` (the default): the details go in the form, the
/// server grants them, status shows them, the token carries them; a change gets a new token
/// at once, removing them clears status; a restart keeps status and asks for nothing.
pub async fn details_in_the_token_request(env: &TestEnv, operator: &mut OperatorProcess) {
    env.create_issuer("rar-idp", &oidc::M2M_BASIC, oidc::M2M_BASIC.secret)
        .await;
    let first = vec![helseid("999977775", "999977776")];
    env.create_token_with_details("rar-orders", "rar-idp", oidc::ORDERS, first.clone())
        .await;
    env.wait_condition("rar-orders", "True", "Issued", READY_TIMEOUT)
        .await;
    let ready = env.wait_granted("rar-orders", &first).await;
    let status = ready.status.expect("status");
    assert_eq!(status.audience, vec![oidc::ORDERS.to_string()]);
    let secret = env.secrets().get("rar-orders").await.expect("token Secret");
    assert_no_details_in(&secret);
    let token = data(&secret, keys::TOKEN);
    assert_eq!(claims(&token)["authorization_details"], json!(first));

    // Another organisation: another token, at once (it would otherwise live an hour).
    let second = vec![helseid("999977775", "999977777")];
    env.set_details("rar-orders", &second).await;
    let renewed = env.wait_token_change("rar-orders", &token).await;
    assert_eq!(claims(&renewed)["authorization_details"], json!(second));
    env.wait_granted("rar-orders", &second).await;

    // No details any more: a plain token, and status lists none.
    env.set_details("rar-orders", &[]).await;
    let plain = env.wait_token_change("rar-orders", &renewed).await;
    assert!(
        claims(&plain).get("authorization_details").is_none(),
        "{}",
        claims(&plain)
    );
    env.wait_granted("rar-orders", &[]).await;

    // A restart keeps what status shows and asks for no token for them.
    env.set_details("rar-orders", &second).await;
    let with_second = env.wait_token_change("rar-orders", &plain).await;
    env.wait_granted("rar-orders", &second).await;
    operator.stop().await;
    env.idp.reset_counts().await;
    operator.restart().await;
    // A new token after the restart proves the restarted operator is reconciling.
    env.issue_token("rar-after-restart", "rar-idp", oidc::PAYMENTS, &[])
        .await;
    // (Other scenarios' short-lived tokens may renew meanwhile on a shared server; none of
    // them is for ORDERS.)
    let counts = env.idp.token_requests().await;
    assert_eq!(
        (
            counts.for_resource(oidc::ORDERS),
            counts.for_resource(oidc::PAYMENTS)
        ),
        (0, 1),
        "only the new AudienceToken asked for a token: {counts:?}"
    );
    assert_eq!(env.token_in("rar-orders").await, with_second);
    env.wait_granted("rar-orders", &second).await;
}

/// The refresh-token grant sends an AudienceToken's details too: the chain's refresh
/// request carries them, and status shows what the server granted.
pub async fn details_through_the_refresh_chain(env: &TestEnv) {
    let resources = [oidc::ORDERS, oidc::PAYMENTS];
    let bootstrap = env
        .idp
        .mint_refresh_token(oidc::M2M_REFRESH.id, &resources, None)
        .await;
    env.put_bootstrap("rar-chain-bootstrap", &bootstrap).await;
    env.create_refresh_issuer("rar-chain", "rar-chain-bootstrap", &resources)
        .await;
    let org = vec![helseid("999977775", "999977780")];
    env.create_token_with_details("rar-chained", "rar-chain", oidc::PAYMENTS, org.clone())
        .await;
    env.wait_condition("rar-chained", "True", "Issued", READY_TIMEOUT)
        .await;
    env.wait_granted("rar-chained", &org).await;
    let secret = env
        .secrets()
        .get("rar-chained")
        .await
        .expect("token Secret");
    assert_no_details_in(&secret);
    assert_eq!(
        claims(&data(&secret, keys::TOKEN))["authorization_details"],
        json!(org)
    );
}

/// `authorizationDetailsIn: ClientAssertion` with PrivateKeyJWT: the details ride in the
/// client assertion's `assertion_details` claim, exactly as the spec has them, and not in
/// the form (the test server, which does not read the claim, grants none); a change sends
/// the new ones.
pub async fn details_in_the_client_assertion(env: &TestEnv) {
    let client = oidc::M2M_JWT_PS256.id;
    let key = env.idp.client_private_key(client).await;
    // Key in Secret `rar-helseid-key`, signing with the server's `alg` for this client.
    env.create_private_key_issuer_with(
        "rar-helseid",
        client,
        &key.pem,
        json!({"signingAlgorithm": key.alg}),
        json!({"authorizationDetailsIn": "ClientAssertion"}),
    )
    .await;
    let org = vec![helseid("999977775", "999977778")];
    env.create_token_with_details("rar-tenant", "rar-helseid", oidc::ORDERS, org.clone())
        .await;
    let ready = env
        .wait_condition("rar-tenant", "True", "Issued", READY_TIMEOUT)
        .await;
    let seen = env.assertion_details_seen(client).await;
    assert_eq!(
        seen,
        vec![json!(org)],
        "one assertion, carrying the spec's details"
    );
    assert!(
        ready
            .status
            .expect("status")
            .authorization_details
            .is_empty(),
        "the server listed no granted details"
    );
    let secret = env.secrets().get("rar-tenant").await.expect("token Secret");
    assert_no_details_in(&secret);
    let token = data(&secret, keys::TOKEN);
    assert!(
        claims(&token).get("authorization_details").is_none(),
        "not sent in the form, where the server would have granted them"
    );

    let other = vec![helseid("999977775", "999977779")];
    env.set_details("rar-tenant", &other).await;
    env.wait_token_change("rar-tenant", &token).await;
    let seen = env.assertion_details_seen(client).await;
    assert_eq!(seen.last(), Some(&json!(other)), "{seen:?}");
}
