//! User-level scenarios, written against the Kubernetes API only, so they run unchanged
//! against the in-process API double (`tests/controller.rs`, `tests/security.rs`) and a
//! real cluster (`tests/e2e`). Each waits on conditions with timeouts; none sleeps and hopes.
//!
//! One file per capability:
//!
//! - `lifecycle`: issuance, re-issue on a spec change, forced renewal, renewal before
//!   expiry, and an operator restart;
//! - `failures`: a Secret the operator does not own, and failures that reach status and
//!   recover;
//! - `refresh_chain`: refresh-token chains shared by several AudienceTokens, their loss and
//!   recovery, and rotations interrupted by a crash;
//! - `private_key_jwt`: PrivateKeyJWT client authentication;
//! - `signature`: `verifyAccessTokenSignature`;
//! - `rate_limit`: an issuer's `rateLimit`;
//! - `dpop`: DPoP-bound tokens (RFC 9449);
//! - `mtls`: client certificates and certificate-bound tokens (RFC 8705);
//! - `login`: the `login` command bootstraps a refresh-token chain;
//! - `authorization_details`: authorization details (RFC 9396) in the token request or the
//!   client assertion;
//! - `secretless`: ServiceAccount tokens (TokenRequest API) as client assertions and as
//!   RFC 8693 subject tokens, and the grant that allows the operator to mint them.
//!
//! This file holds what they share: [`TestEnv`] with its fixtures, and the helpers
//! [`eventually`], [`claims`] and [`data`].

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use audience_token_operator::api::{
    AudienceToken, AudienceTokenSpec, ClientAuth, ClientAuthMethod, IssuerRef, IssuerSpec,
    SecretKeySelector, TokenIssuer, TokenIssuerSpec,
};
use audience_token_operator::secret::keys;
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::{Namespace, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{Value, json};

use super::oidc::{self, AuthMethod, OidcServer, TestClient};

pub mod authorization_details;
pub mod dpop;
pub mod failures;
pub mod lifecycle;
pub mod login;
pub mod mtls;
pub mod plugin;
pub mod private_key_jwt;
pub mod rate_limit;
pub mod refresh_chain;
pub mod secretless;
pub mod signature;

/// How long a first token may take to appear (operator start, caches, one token request).
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);

/// The key of the bootstrap refresh token in its Secret (and of the chain's current refresh
/// token in the state Secret).
const BOOTSTRAP_KEY: &str = "refresh-token";

/// A namespace to play in, the cluster client and the authorization server.
pub struct TestEnv {
    pub client: Client,
    pub namespace: String,
    pub idp: OidcServer,
}

/// Polls `check` every 100 ms until it returns `Ok`, or panics after `timeout` saying what
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

impl TestEnv {
    // ---- The APIs of the namespace ----------------------------------------------------------

    pub fn tokens(&self) -> Api<AudienceToken> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn secrets(&self) -> Api<Secret> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    pub fn issuers(&self) -> Api<TokenIssuer> {
        Api::namespaced(self.client.clone(), &self.namespace)
    }

    // ---- Creating and changing objects ------------------------------------------------------

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

    /// Server-side applies Secret `name` holding `value` under `key` (and nothing else).
    async fn put_secret(&self, name: &str, key: &str, value: &str, what: &str) {
        self.apply_secret(name, None, &[(key, value)], what).await;
    }

    /// Server-side applies Secret `name` of `type_` (default Opaque) holding exactly `data`.
    pub async fn apply_secret(
        &self,
        name: &str,
        type_: Option<&str>,
        data: &[(&str, &str)],
        what: &str,
    ) {
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            type_: type_.map(str::to_string),
            data: Some(
                data.iter()
                    .map(|(k, v)| (k.to_string(), ByteString(v.as_bytes().to_vec())))
                    .collect(),
            ),
            ..Secret::default()
        };
        self.secrets()
            .patch(
                name,
                &PatchParams::apply("e2e-test").force(),
                &Patch::Apply(&secret),
            )
            .await
            .unwrap_or_else(|e| panic!("apply {what} Secret {name}: {e}"));
    }

    /// Writes a client secret into Secret `name`, key `client-secret`.
    pub async fn put_client_secret(&self, name: &str, secret_value: &str) {
        self.put_secret(name, "client-secret", secret_value, "client")
            .await;
    }

    /// Writes a bootstrap refresh token into Secret `name`.
    pub async fn put_bootstrap(&self, name: &str, refresh_token: &str) {
        self.put_secret(name, BOOTSTRAP_KEY, refresh_token, "bootstrap")
            .await;
    }

    /// Creates a TokenIssuer.
    async fn submit_issuer(&self, issuer: &TokenIssuer) {
        self.issuers()
            .create(&PostParams::default(), issuer)
            .await
            .expect("create TokenIssuer");
    }

    /// Writes `secret_value` into Secret `<name>-client` and returns the spec of an issuer at
    /// the test server, found by discovery, that authenticates `client_id` with `method` and
    /// that Secret.
    async fn client_secret_issuer_spec(
        &self,
        name: &str,
        client_id: &str,
        method: ClientAuthMethod,
        secret_value: &str,
    ) -> IssuerSpec {
        let secret_name = format!("{name}-client");
        self.put_client_secret(&secret_name, secret_value).await;
        IssuerSpec {
            issuer_url: Some(self.idp.issuer.clone()),
            client_id: client_id.into(),
            client_auth: ClientAuth {
                method,
                client_secret_ref: Some(SecretKeySelector {
                    name: secret_name,
                    key: "client-secret".into(),
                }),
                ..ClientAuth::default()
            },
            ..IssuerSpec::default()
        }
    }

    /// A TokenIssuer for `client` at the test server, found by discovery (`issuerURL`).
    pub async fn create_issuer(&self, name: &str, client: &TestClient, secret_value: &str) {
        let method = match client.method {
            AuthMethod::ClientSecretBasic => ClientAuthMethod::ClientSecretBasic,
            AuthMethod::ClientSecretPost => ClientAuthMethod::ClientSecretPost,
            AuthMethod::PrivateKeyJwt => ClientAuthMethod::PrivateKeyJwt,
            AuthMethod::TlsClientAuth | AuthMethod::SelfSignedTlsClientAuth => {
                panic!(
                    "create_issuer: {} authenticates with a client certificate, which it cannot set up",
                    client.id
                )
            }
            AuthMethod::ServiceAccountToken | AuthMethod::None => {
                panic!(
                    "create_issuer: {} authenticates with a ServiceAccount token (or not at all), which it cannot set up",
                    client.id
                )
            }
        };
        let issuer = self
            .client_secret_issuer_spec(name, client.id, method, secret_value)
            .await;
        self.submit_issuer(&TokenIssuer::new(name, TokenIssuerSpec { issuer }))
            .await;
    }

    /// Creates TokenIssuer `name` for `client` (HTTP Basic) with the signature check on;
    /// keys from discovery, or from `jwks_uri` when given.
    pub async fn create_verifying_issuer(
        &self,
        name: &str,
        client: &TestClient,
        jwks_uri: Option<String>,
    ) {
        let spec = self
            .client_secret_issuer_spec(
                name,
                client.id,
                ClientAuthMethod::ClientSecretBasic,
                client.secret,
            )
            .await;
        let issuer = IssuerSpec {
            verify_access_token_signature: true,
            jwks_uri,
            ..spec
        };
        self.submit_issuer(&TokenIssuer::new(name, TokenIssuerSpec { issuer }))
            .await;
    }

    /// A TokenIssuer authenticating with PrivateKeyJWT, the key in Secret `<name>-key`.
    pub async fn create_private_key_issuer(
        &self,
        name: &str,
        client_id: &str,
        key: &str,
        assertion_audience: &str,
    ) {
        self.create_private_key_issuer_with(
            name,
            client_id,
            key,
            json!({"assertionAudience": assertion_audience}),
            json!({}),
        )
        .await;
    }

    /// A PrivateKeyJWT TokenIssuer as [`TestEnv::create_private_key_issuer`], with these
    /// members added to its `clientAuth` and its `spec`.
    pub async fn create_private_key_issuer_with(
        &self,
        name: &str,
        client_id: &str,
        key: &str,
        client_auth: Value,
        spec: Value,
    ) {
        let secret_name = format!("{name}-key");
        self.put_secret(&secret_name, "private-key", key, "key")
            .await;
        let mut auth = json!({
            "method": "PrivateKeyJWT",
            "privateKeyRef": {"name": secret_name, "key": "private-key"}
        });
        let mut full = json!({"issuerURL": self.idp.issuer, "clientID": client_id});
        for (target, extra) in [(&mut auth, client_auth), (&mut full, spec)] {
            if let (Some(target), Value::Object(extra)) = (target.as_object_mut(), extra) {
                target.extend(extra);
            }
        }
        full["clientAuth"] = auth;
        let issuer: TokenIssuer = serde_json::from_value(json!({
            "apiVersion": "audiencetoken.io/v1alpha1",
            "kind": "TokenIssuer",
            "metadata": {"name": name},
            "spec": full
        }))
        .expect("TokenIssuer");
        self.submit_issuer(&issuer).await;
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
        self.submit_issuer(&issuer).await;
    }

    /// The spec of an AudienceToken for `resource` from TokenIssuer `issuer`.
    pub fn token_spec(issuer: &str, resource: &str, scopes: &[&str]) -> AudienceTokenSpec {
        AudienceTokenSpec {
            issuer_ref: IssuerRef {
                name: issuer.into(),
                ..IssuerRef::default()
            },
            resource: resource.into(),
            scopes: scopes.iter().map(|s| s.to_string()).collect(),
            ..AudienceTokenSpec::default()
        }
    }

    /// Creates AudienceToken `name` with `spec`.
    pub async fn submit_token(&self, name: &str, spec: AudienceTokenSpec) {
        self.tokens()
            .create(&PostParams::default(), &AudienceToken::new(name, spec))
            .await
            .expect("create AudienceToken");
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
        let spec = AudienceTokenSpec {
            secret_name: secret_name.map(str::to_string),
            ..Self::token_spec(issuer, resource, scopes)
        };
        self.submit_token(name, spec).await;
    }

    /// Creates AudienceToken `name` (its Secret named alike) and waits until it is
    /// `Ready=True` reason `Issued`.
    pub async fn issue_token(
        &self,
        name: &str,
        issuer: &str,
        resource: &str,
        scopes: &[&str],
    ) -> AudienceToken {
        self.create_token(name, issuer, resource, scopes, None)
            .await;
        self.wait_condition(name, "True", "Issued", READY_TIMEOUT)
            .await
    }

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

    // ---- Waiting and reading ----------------------------------------------------------------

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

    /// Waits until TokenIssuer `name`'s Ready condition has this status and reason.
    pub async fn wait_issuer(&self, name: &str, status: &str, reason: &str) -> TokenIssuer {
        wait_ready(
            self.issuers(),
            name,
            status,
            reason,
            READY_TIMEOUT,
            |i: &TokenIssuer| i.status.as_ref().map(|s| s.conditions.clone()),
        )
        .await
    }

    /// Reads AudienceToken `name` until `check` accepts it (`Ok`), and returns what `check`
    /// returned; `Err` says what was seen.
    pub async fn wait_token<T>(
        &self,
        name: &str,
        what: &str,
        timeout: Duration,
        check: impl Fn(&AudienceToken) -> Result<T, String>,
    ) -> T {
        let api = self.tokens();
        let check = &check;
        eventually(what, timeout, || {
            let api = api.clone();
            async move { check(&api.get(name).await.map_err(|e| e.to_string())?) }
        })
        .await
    }

    /// Waits until the AudienceToken acted on the forced-renewal `value` (successfully or
    /// not) and returns it.
    pub async fn wait_forced(&self, name: &str, value: &str, timeout: Duration) -> AudienceToken {
        self.wait_token(
            name,
            &format!("{name} to act on renew-requested-at {value}"),
            timeout,
            |token| {
                let status = token.status.clone().unwrap_or_default();
                match status.last_renew_requested_at.as_deref() {
                    Some(v) if v == value => Ok(token.clone()),
                    other => Err(format!("lastRenewRequestedAt {other:?}, status {status:?}")),
                }
            },
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

    /// Waits until Secret `secret` holds a token other than `from`, and returns it.
    pub async fn wait_token_change(&self, secret: &str, from: &str) -> String {
        let changed = self
            .wait_secret(secret, &format!("a new token in {secret}"), |s| {
                data(s, keys::TOKEN) != from
            })
            .await;
        data(&changed, keys::TOKEN)
    }

    /// The token Secret `secret` holds now.
    pub async fn token_in(&self, secret: &str) -> String {
        data(
            &self.secrets().get(secret).await.expect("token Secret"),
            keys::TOKEN,
        )
    }

    /// The refresh token in the state Secret of `issuer`'s chain, if there is one.
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

    /// Annotations of the state Secret of `issuer`'s chain.
    pub async fn state_annotations(&self, issuer: &str) -> BTreeMap<String, String> {
        self.secrets()
            .get(&format!("{issuer}-refresh-state"))
            .await
            .expect("state Secret")
            .annotations()
            .clone()
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
