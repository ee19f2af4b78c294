//! User-level scenarios, written against the Kubernetes API only, so they run unchanged
//! against the in-process API double (`tests/controller.rs`) and a real cluster
//! (`tests/e2e`). Each waits on conditions with timeouts; none sleeps and hopes.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use audience_token_operator::api::{
    AudienceToken, AudienceTokenSpec, ClientAuth, ClientAuthMethod, IssuerRef, IssuerSpec,
    SecretKeySelector, TokenIssuer, TokenIssuerSpec,
};
use audience_token_operator::secret::{
    EXPIRES_AT_ANNOTATION, ISSUED_AT_ANNOTATION, MANAGED_BY_LABEL, MANAGER, NAME_LABEL,
    SPEC_HASH_ANNOTATION, keys,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use super::oidc::{self, AuthMethod, OidcServer, TestClient};
use super::operator::OperatorProcess;

pub mod refresh_chain;

/// How long a first token may take to appear (operator start, caches, one token request).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// A namespace to play in, the cluster client and the authorization server.
pub struct TestEnv {
    pub client: Client,
    pub namespace: String,
    pub idp: OidcServer,
}

/// Polls `check` every 100 ms until it returns `Some`, or panics after `timeout` saying what
/// was awaited and what was last seen.
pub async fn eventually<T, F, Fut>(what: &str, timeout: Duration, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match check().await {
            Ok(value) => return value,
            Err(last) if tokio::time::Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}; last seen: {last}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

/// The decoded payload of a JWT (no signature check: tests look at claims).
pub fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a JWT has a payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url"))
        .expect("JSON claims")
}

/// A key of a Secret's data, as text.
pub fn data(secret: &Secret, key: &str) -> String {
    let bytes = secret
        .data
        .as_ref()
        .and_then(|d| d.get(key))
        .unwrap_or_else(|| panic!("Secret has no {key}"));
    String::from_utf8(bytes.0.clone()).expect("UTF-8")
}

impl TestEnv {
    pub fn tokens(&self) -> Api<AudienceToken> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    /// Creates the namespace (labelled `team: test`).
    pub async fn create_namespace(&self) {
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(self.namespace.clone()),
                labels: Some(BTreeMap::from([("team".into(), "test".into())])),
                ..ObjectMeta::default()
            },
            ..Namespace::default()
        };
        Api::<Namespace>::all(self.client.clone())
            .create(&PostParams::default(), &ns)
            .await
            .expect("create namespace");
    }

    /// Writes the client secret of `client` into Secret `name`, key `client-secret`.
    pub async fn put_client_secret(&self, name: &str, secret_value: &str) {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                "client-secret".into(),
                ByteString(secret_value.as_bytes().to_vec()),
            )])),
            ..Secret::default()
        };
        self.secrets()
            .patch(
                name,
                &PatchParams::apply("e2e-test").force(),
                &Patch::Apply(&secret),
            )
            .await
            .expect("apply client Secret");
    }

    /// A TokenIssuer for `client` at the test server, found by discovery (`issuerURL`).
    pub async fn create_issuer(&self, name: &str, client: &TestClient, secret_value: &str) {
        let secret_name = format!("{name}-client");
        self.put_client_secret(&secret_name, secret_value).await;
        let method = match client.method {
            AuthMethod::ClientSecretBasic => ClientAuthMethod::ClientSecretBasic,
            AuthMethod::ClientSecretPost => ClientAuthMethod::ClientSecretPost,
            AuthMethod::PrivateKeyJwt => ClientAuthMethod::PrivateKeyJwt,
        };
        let issuer = TokenIssuer::new(
            name,
            TokenIssuerSpec {
                issuer: IssuerSpec {
                    issuer_url: Some(self.idp.issuer.clone()),
                    client_id: client.id.into(),
                    client_auth: ClientAuth {
                        method,
                        client_secret_ref: Some(SecretKeySelector {
                            name: secret_name,
                            key: "client-secret".into(),
                        }),
                        ..ClientAuth::default()
                    },
                    ..IssuerSpec::default()
                },
            },
        );
        Api::<TokenIssuer>::namespaced(self.client.clone(), &self.namespace)
            .create(&PostParams::default(), &issuer)
            .await
            .expect("create TokenIssuer");
    }

    /// Creates an AudienceToken.
    pub async fn create_token(
        &self,
        name: &str,
        issuer: &str,
        resource: &str,
        scopes: &[&str],
        secret_name: Option<&str>,
    ) {
        let token = AudienceToken::new(
            name,
            AudienceTokenSpec {
                issuer_ref: IssuerRef {
                    name: issuer.into(),
                    ..IssuerRef::default()
                },
                resource: resource.into(),
                scopes: scopes.iter().map(|s| s.to_string()).collect(),
                secret_name: secret_name.map(str::to_string),
                ..AudienceTokenSpec::default()
            },
        );
        self.tokens()
            .create(&PostParams::default(), &token)
            .await
            .expect("create AudienceToken");
    }

    /// Waits until the AudienceToken's Ready condition has this status and reason.
    pub async fn wait_condition(
        &self,
        name: &str,
        status: &str,
        reason: &str,
        timeout: Duration,
    ) -> AudienceToken {
        wait_ready(
            self.tokens(),
            name,
            status,
            reason,
            timeout,
            |t: &AudienceToken| t.status.as_ref().map(|s| s.conditions.clone()),
        )
        .await
    }

    /// Waits until Secret `name` exists and `accept` likes it.
    pub async fn wait_secret(
        &self,
        name: &str,
        what: &str,
        accept: impl Fn(&Secret) -> bool,
    ) -> Secret {
        let api = self.secrets();
        let accept = &accept;
        eventually(what, READY_TIMEOUT, || {
            let api = api.clone();
            async move {
                match api.get_opt(name).await.map_err(|e| e.to_string())? {
                    Some(secret) if accept(&secret) => Ok(secret),
                    Some(secret) => Err(format!("Secret annotations {:?}", secret.annotations())),
                    None => Err("no Secret".into()),
                }
            }
        })
        .await
    }

    /// Events in the namespace about `object`, as (type, reason, note).
    pub async fn events_for(&self, object: &str) -> Vec<(String, String, String)> {
        let api: Api<k8s_openapi::api::events::v1::Event> =
            Api::namespaced(self.client.clone(), &self.namespace);
        let events = api.list(&ListParams::default()).await.expect("list events");
        events
            .items
            .into_iter()
            .filter(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(object))
            .map(|e| {
                (
                    e.type_.unwrap_or_default(),
                    e.reason.unwrap_or_default(),
                    e.note.unwrap_or_default(),
                )
            })
            .collect()
    }

    /// Waits for an Event about `object` of this type and reason whose note contains
    /// `note_part`. Events are published after the status write, so a test that has just
    /// seen the condition may not see the Event yet.
    pub async fn wait_event(&self, object: &str, type_: &str, reason: &str, note_part: &str) {
        eventually(
            &format!("a {type_} {reason} Event on {object} saying {note_part:?}"),
            READY_TIMEOUT,
            || async {
                let events = self.events_for(object).await;
                if events
                    .iter()
                    .any(|(t, r, note)| t == type_ && r == reason && note.contains(note_part))
                {
                    Ok(())
                } else {
                    Err(format!("{events:?}"))
                }
            },
        )
        .await;
    }
}

/// Waits until object `name`'s Ready condition has this status and reason.
async fn wait_ready<K>(
    api: Api<K>,
    name: &str,
    status: &str,
    reason: &str,
    timeout: Duration,
    conditions: impl Fn(&K) -> Option<Vec<audience_token_operator::api::Condition>>,
) -> K
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    K::DynamicType: Default,
{
    let kind = K::kind(&Default::default()).into_owned();
    let conditions = &conditions;
    eventually(
        &format!("{kind} {name} Ready={status} reason {reason}"),
        timeout,
        || {
            let api = api.clone();
            async move {
                let object = api.get(name).await.map_err(|e| e.to_string())?;
                let ready = conditions(&object)
                    .and_then(|all| all.into_iter().find(|c| c.type_ == "Ready"));
                match ready {
                    Some(c) if c.status == status && c.reason == reason => Ok(object),
                    other => Err(format!("{other:?}")),
                }
            }
        },
    )
    .await
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

/// A token close to expiry is replaced by a new one in the same Secret.
pub async fn renews_before_expiry(env: &TestEnv) {
    env.create_token("short", "idp", oidc::SHORT_LIVED, &["short/read"], None)
        .await;
    env.wait_condition("short", "True", "Issued", READY_TIMEOUT)
        .await;
    let first = data(
        &env.secrets().get("short").await.expect("Secret short"),
        keys::TOKEN,
    );
    let renewed = env
        .wait_secret("short", "the short-lived token to be renewed", |s| {
            data(s, keys::TOKEN) != first
        })
        .await;
    let claims = claims(&data(&renewed, keys::TOKEN));
    assert_eq!(claims["aud"], json!(oidc::SHORT_LIVED));
    env.wait_condition("short", "True", "Renewed", READY_TIMEOUT)
        .await;
    env.wait_event("short", "Normal", "Renewed", "").await;
    // A 6 s token cannot be renewed 90 s before expiry: a Warning Event says so.
    env.wait_event("short", "Warning", "RenewalWindow", "too short")
        .await;
}

/// Changing the scopes issues a new token at once (exactly one request).
pub async fn reissues_on_spec_change(env: &TestEnv) {
    let before = env.idp.token_requests().await.for_resource(oidc::ORDERS);
    let old = data(
        &env.secrets().get("orders").await.expect("Secret orders"),
        keys::TOKEN,
    );
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
    env.create_token("after-restart", "idp", oidc::ORDERS, &["orders/read"], None)
        .await;
    env.wait_condition("after-restart", "True", "Issued", READY_TIMEOUT)
        .await;

    let counts = env.idp.token_requests().await;
    assert_eq!(
        counts.total, 1,
        "only the new AudienceToken asked for a token: {counts:?}"
    );
    assert_eq!(counts.for_resource(oidc::PAYMENTS), 0);
}

/// A Secret of the wanted name that the operator does not own is never written, and no
/// token is requested for it.
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
    assert_eq!(
        env.idp.token_requests().await.total,
        before,
        "no token requested for a Secret we cannot write"
    );
    env.wait_event("conflicted", "Warning", "SecretConflict", "")
        .await;
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
    let secret = env
        .secrets()
        .get("recovering")
        .await
        .expect("Secret after recovery");
    assert_eq!(
        claims(&data(&secret, keys::TOKEN))["aud"],
        json!(oidc::ORDERS)
    );
}

/// The key of the bootstrap refresh token in its Secret.
const BOOTSTRAP_KEY: &str = "refresh-token";

impl TestEnv {
    /// Writes a bootstrap refresh token into Secret `name`.
    pub async fn put_bootstrap(&self, name: &str, refresh_token: &str) {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                BOOTSTRAP_KEY.into(),
                ByteString(refresh_token.as_bytes().to_vec()),
            )])),
            ..Secret::default()
        };
        self.secrets()
            .patch(
                name,
                &PatchParams::apply("e2e-test").force(),
                &Patch::Apply(&secret),
            )
            .await
            .expect("apply bootstrap Secret");
    }

    /// A TokenIssuer using the RefreshToken grant of `m2m-refresh` for `resources`.
    pub async fn create_refresh_issuer(
        &self,
        name: &str,
        bootstrap_secret: &str,
        resources: &[&str],
    ) {
        self.create_refresh_issuer_for(name, &oidc::M2M_REFRESH, bootstrap_secret, resources)
            .await;
    }

    /// A TokenIssuer using the RefreshToken grant of `client` (HTTP Basic) for `resources`.
    pub async fn create_refresh_issuer_for(
        &self,
        name: &str,
        client: &TestClient,
        bootstrap_secret: &str,
        resources: &[&str],
    ) {
        let secret_name = format!("{name}-client");
        self.put_client_secret(&secret_name, client.secret).await;
        let issuer: TokenIssuer = serde_json::from_value(json!({
            "apiVersion": "audiencetoken.io/v1alpha1",
            "kind": "TokenIssuer",
            "metadata": {"name": name},
            "spec": {
                "issuerURL": self.idp.issuer,
                "clientID": client.id,
                "clientAuth": {"method": "ClientSecretBasic", "clientSecretRef": {"name": secret_name, "key": "client-secret"}},
                "grant": {
                    "type": "RefreshToken",
                    "refreshToken": {"bootstrapSecretRef": {"name": bootstrap_secret, "key": BOOTSTRAP_KEY}, "resources": resources}
                }
            }
        }))
        .expect("TokenIssuer");
        Api::<TokenIssuer>::namespaced(self.client.clone(), &self.namespace)
            .create(&PostParams::default(), &issuer)
            .await
            .expect("create TokenIssuer");
    }

    pub async fn token_in(&self, secret: &str) -> String {
        data(
            &self.secrets().get(secret).await.expect("token Secret"),
            keys::TOKEN,
        )
    }

    pub async fn state_refresh_token(&self, issuer: &str) -> Option<String> {
        let state = self
            .secrets()
            .get_opt(&format!("{issuer}-refresh-state"))
            .await
            .expect("read state")?;
        state
            .data
            .as_ref()?
            .get(BOOTSTRAP_KEY)
            .map(|b| String::from_utf8(b.0.clone()).expect("UTF-8"))
    }

    pub async fn wait_token_change(&self, secret: &str, from: &str) -> String {
        let changed = self
            .wait_secret(secret, &format!("a new token in {secret}"), |s| {
                data(s, keys::TOKEN) != from
            })
            .await;
        data(&changed, keys::TOKEN)
    }
}

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
    let attempts = lost_attempts(env, "chain-short").await;
    eventually(
        "more local attempts on the lost chain",
        Duration::from_secs(60),
        || async {
            let now = lost_attempts(env, "chain-short").await;
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
    let api = env.tokens();
    let next_attempt = eventually(
        "chain-short's backoff to grow past 30 s",
        Duration::from_secs(180),
        || {
            let api = api.clone();
            async move {
                let status = api
                    .get("chain-short")
                    .await
                    .map_err(|e| e.to_string())?
                    .status
                    .unwrap_or_default();
                let next = status.next_attempt_time.map(|t| t.0);
                match next {
                    Some(at) if at > jiff::Timestamp::now() + Duration::from_secs(30) => Ok(at),
                    other => Err(format!("nextAttemptTime {other:?}")),
                }
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

async fn lost_attempts(env: &TestEnv, name: &str) -> i32 {
    let token = env.tokens().get(name).await.expect("AudienceToken");
    token.status.map(|s| s.failed_attempts).unwrap_or_default()
}

impl TestEnv {
    /// Waits until TokenIssuer `name`'s Ready condition has this status and reason.
    pub async fn wait_issuer(&self, name: &str, status: &str, reason: &str) -> TokenIssuer {
        let api: Api<TokenIssuer> = Api::namespaced(self.client.clone(), &self.namespace);
        wait_ready(
            api,
            name,
            status,
            reason,
            READY_TIMEOUT,
            |i: &TokenIssuer| i.status.as_ref().map(|s| s.conditions.clone()),
        )
        .await
    }
}

// ---- verifyAccessTokenSignature -------------------------------------------------------------

impl TestEnv {
    /// Creates TokenIssuer `name` for `client` (HTTP Basic) with the signature check on;
    /// keys from discovery, or from `jwks_uri` when given.
    pub async fn create_verifying_issuer(
        &self,
        name: &str,
        client: &TestClient,
        jwks_uri: Option<String>,
    ) {
        let secret_name = format!("{name}-client");
        self.put_client_secret(&secret_name, client.secret).await;
        let issuer = TokenIssuer::new(
            name,
            TokenIssuerSpec {
                issuer: IssuerSpec {
                    issuer_url: Some(self.idp.issuer.clone()),
                    client_id: client.id.into(),
                    client_auth: ClientAuth {
                        method: ClientAuthMethod::ClientSecretBasic,
                        client_secret_ref: Some(SecretKeySelector {
                            name: secret_name,
                            key: "client-secret".into(),
                        }),
                        ..ClientAuth::default()
                    },
                    verify_access_token_signature: true,
                    jwks_uri,
                    ..IssuerSpec::default()
                },
            },
        );
        Api::<TokenIssuer>::namespaced(self.client.clone(), &self.namespace)
            .create(&PostParams::default(), &issuer)
            .await
            .expect("create TokenIssuer");
    }
}

/// With `verifyAccessTokenSignature`, a token signed by the issuer's keys is written, an
/// opaque one is written unchecked, and one that does not verify against the configured keys
/// is never written (TokenRequestFailed).
pub async fn signature_check(env: &TestEnv) {
    env.create_verifying_issuer("verified", &oidc::M2M_BASIC, None)
        .await;
    env.create_token("signed", "verified", oidc::ORDERS, &["orders/read"], None)
        .await;
    env.wait_condition("signed", "True", "Issued", READY_TIMEOUT)
        .await;
    let secret = env.secrets().get("signed").await.expect("Secret");
    assert_eq!(
        claims(&data(&secret, keys::TOKEN))["aud"],
        json!(oidc::ORDERS)
    );

    env.create_token("opaque", "verified", oidc::OPAQUE, &["opaque/read"], None)
        .await;
    env.wait_condition("opaque", "True", "Issued", READY_TIMEOUT)
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

impl TestEnv {
    /// A TokenIssuer authenticating with PrivateKeyJWT, the key in Secret `<name>-key`.
    pub async fn create_private_key_issuer(
        &self,
        name: &str,
        client_id: &str,
        key: &str,
        assertion_audience: &str,
    ) {
        let secret_name = format!("{name}-key");
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(secret_name.clone()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                "private-key".into(),
                ByteString(key.as_bytes().to_vec()),
            )])),
            ..Secret::default()
        };
        self.secrets()
            .patch(
                &secret_name,
                &PatchParams::apply("e2e-test").force(),
                &Patch::Apply(&secret),
            )
            .await
            .expect("apply key Secret");
        let issuer: TokenIssuer = serde_json::from_value(json!({
            "apiVersion": "audiencetoken.io/v1alpha1",
            "kind": "TokenIssuer",
            "metadata": {"name": name},
            "spec": {
                "issuerURL": self.idp.issuer,
                "clientID": client_id,
                "clientAuth": {
                    "method": "PrivateKeyJWT",
                    "privateKeyRef": {"name": secret_name, "key": "private-key"},
                    "assertionAudience": assertion_audience
                }
            }
        }))
        .expect("TokenIssuer");
        Api::<TokenIssuer>::namespaced(self.client.clone(), &self.namespace)
            .create(&PostParams::default(), &issuer)
            .await
            .expect("create TokenIssuer");
    }
}

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

/// `audiencetoken.io/renew-requested-at` forces exactly one renewal for each new value.
pub async fn forced_renewal(env: &TestEnv) {
    let before = env.idp.token_requests().await.for_resource(oidc::PAYMENTS);
    let mut token = env.token_in("payments-api-token").await;
    for (round, value) in ["2026-11-21T10:00:00Z", "2026-11-21T10:05:00Z"]
        .into_iter()
        .enumerate()
    {
        env.tokens()
            .patch(
                "payments",
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"annotations": {"audiencetoken.io/renew-requested-at": value}}})),
            )
            .await
            .expect("annotate");
        token = env.wait_token_change("payments-api-token", &token).await;
        let api = env.tokens();
        eventually(
            &format!("lastRenewRequestedAt {value}"),
            READY_TIMEOUT,
            || {
                let api = api.clone();
                async move {
                    let status = api
                        .get("payments")
                        .await
                        .map_err(|e| e.to_string())?
                        .status
                        .unwrap_or_default();
                    match status.last_renew_requested_at.as_deref() {
                        Some(v) if v == value => Ok(()),
                        other => Err(format!("{other:?}")),
                    }
                }
            },
        )
        .await;
        let requests = env.idp.token_requests().await.for_resource(oidc::PAYMENTS);
        assert_eq!(
            requests,
            before + round as u64 + 1,
            "one renewal per new value"
        );
    }
}

/// An issuer's `rateLimit` spaces its token requests; every token still gets issued and no
/// deferred request counts as a failure.
pub async fn rate_limit_spaces_requests(env: &TestEnv) {
    env.create_issuer("limited", &oidc::M2M_BASIC, oidc::M2M_BASIC.secret)
        .await;
    // One request every 2 s, no burst above one.
    Api::<TokenIssuer>::namespaced(env.client.clone(), &env.namespace)
        .patch(
            "limited",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"rateLimit": {"requestsPerSecond": 0.5, "burst": 1}}})),
        )
        .await
        .expect("set rateLimit");
    env.wait_issuer("limited", "True", "Ready").await;
    let names = ["limited-a", "limited-b", "limited-c"];
    for name in names {
        env.create_token(name, "limited", oidc::ORDERS, &["orders/read"], None)
            .await;
    }
    let mut issued = Vec::new();
    for name in names {
        let token = env
            .wait_condition(name, "True", "Issued", READY_TIMEOUT)
            .await;
        let status = token.status.expect("status");
        assert_eq!(
            status.failed_attempts, 0,
            "{name}: deferral is not a failure"
        );
        issued.push(status.issued_at.expect("issuedAt").0);
    }
    issued.sort();
    for pair in issued.windows(2) {
        // Admissions are 2 s apart; a request may have started its reconcile up to 1 s
        // before its admitted time (it waits inside the reconcile), so at least 1 s.
        let gap = pair[1].duration_since(pair[0]).as_secs_f64();
        assert!(
            gap >= 1.0,
            "requests 2 s apart at 0.5/s; issued at {issued:?}"
        );
    }
}
