//! What every reconcile shares: the [`Context`] (API client, issuer layer, caches, refresh
//! chains, metrics, Event recorder, signals), the operator [`Settings`], and the one
//! [`Error`] of the controllers (Kubernetes API failures; token failures are
//! [`crate::failure::Failure`]s in status instead).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::{Namespace, ObjectReference};
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use kube::api::PostParams;
use kube::core::{PartialObjectMeta, Request};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{ObjectRef, Store};
use kube::{Client, Resource, ResourceExt};
use tracing::warn;

use super::{refresh_chain, signals};
use crate::api::{AudienceToken, ClusterTokenIssuer, TokenIssuer};
use crate::issuer::IssuerEndpoints;
use crate::issuer::credentials::SecretSource;
use crate::oauth::{Endpoint, TokenError, TokenRequest, TokenResponse};
use crate::telemetry::{GrantLabel, Metrics, request_result};

/// Errors that make a reconcile retry: Kubernetes API failures and malformed objects.
/// Token-request failures are not errors here; they are recorded in status.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A Kubernetes API call failed.
    #[error("Kubernetes API call failed: {0}")]
    Kube(#[from] kube::Error),
    /// The object lacks a field the API server always sets.
    #[error("object has no {0}")]
    MissingField(&'static str),
    /// The token client could not be built.
    #[error(transparent)]
    TokenClient(#[from] TokenError),
}

impl Error {
    /// A short, fixed name of the kind of error, for log fields and metric labels.
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube_api",
            Error::MissingField(_) => "missing_field",
            Error::TokenClient(_) => "token_client",
        }
    }
}

/// Operator-wide settings (the `run` flags).
#[derive(Clone, Debug)]
pub struct Settings {
    /// Watch only this namespace; `None` watches all.
    pub namespace: Option<String>,
    /// Where ClusterTokenIssuers' Secrets live.
    pub cluster_resource_namespace: String,
    /// How many AudienceTokens are reconciled at once.
    pub concurrency: u16,
    /// Reporter instance name for Events (the pod name).
    pub instance: Option<String>,
    /// Publish a Normal Event for each token issued or renewed (`--issuance-events`).
    pub issuance_events: bool,
}

/// What every reconcile shares: the API client, the token client, the caches.
pub struct Context {
    /// Kubernetes API client.
    pub client: Client,
    /// The issuer layer: endpoints, credentials from Secrets, discovery and key-set caches.
    pub endpoints: IssuerEndpoints<SecretSource>,
    /// Operator settings.
    pub settings: Settings,
    /// TokenIssuers.
    pub issuers: Store<TokenIssuer>,
    /// ClusterTokenIssuers.
    pub cluster_issuers: Store<ClusterTokenIssuer>,
    /// Namespaces, metadata only (labels for ClusterTokenIssuer tenancy).
    pub namespaces: Store<PartialObjectMeta<Namespace>>,
    /// Secrets the operator manages, as compact entries of their metadata.
    pub secrets: Arc<super::owned_secrets::OwnedSecrets>,
    /// Refresh-token chains, one per issuer using the RefreshToken grant.
    pub refresh_chains: refresh_chain::RefreshChains,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Issuers' `rateLimit` buckets.
    pub rate_limiter: crate::rate_limit::RateLimiter,
    /// Events about issuers and Warnings: kube-runtime's recorder keeps each Event it
    /// publishes for a few minutes, to fold repeats into a series.
    pub(super) recorder: Recorder,
    /// Who reports Events (for the one-off recorders of Normal token Events).
    pub(super) reporter: Reporter,
    /// Asks the other controllers to look again.
    pub signals: signals::Signals,
    /// DPoP keys of AudienceTokens with `spec.dpop`.
    pub dpop_keys: super::dpop_keys::DpopKeys,
    /// Changes seen of the Secrets that issuers' client certificates are in.
    pub certificates: Arc<super::secret_watch::SecretChanges>,
    /// For AudienceTokens whose last request failed: the issuer's revision at that time. A
    /// new revision (the issuer was fixed, its chain got a new bootstrap value) waives the
    /// backoff.
    pub(super) failures: Mutex<HashMap<ObjectRef<AudienceToken>, IssuerRevision>>,
    /// How often this process saw each issuer (by key) become Ready after it was not.
    pub(super) ready_epochs: Mutex<HashMap<String, u64>>,
    /// Secrets (namespace, name) last seen to be someone else's: read before any token is
    /// requested for them, even while the cached status does not say SecretConflict yet.
    pub(super) foreign_secrets: Mutex<std::collections::HashSet<(String, String)>>,
}

/// What may fix a failed token request when it changes: the issuer's spec, and for a
/// refresh-token chain, its bootstrap value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IssuerRevision {
    /// The issuer's `metadata.generation`.
    pub generation: i64,
    /// New bootstrap values this process saw for the issuer's chain (0 after a start).
    pub bootstrap_epoch: u64,
    /// Changes of the issuer's client certificate Secret this process saw (0 after a start).
    pub certificate_epoch: u64,
    /// Times this process saw the issuer become Ready after it was not (a Secret created,
    /// a ServiceAccount grant given; 0 after a start).
    pub ready_epoch: u64,
}

impl Context {
    fn failures(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<AudienceToken>, IssuerRevision>> {
        self.failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The issuer as it is now (its key and generation), for comparing with a recorded
    /// failure.
    pub fn issuer_revision(
        &self,
        issuer_key: &str,
        generation: i64,
        certificate_epoch: u64,
    ) -> IssuerRevision {
        IssuerRevision {
            generation,
            bootstrap_epoch: self.refresh_chains.bootstrap_epoch(issuer_key),
            certificate_epoch,
            ready_epoch: self.ready_epoch(issuer_key),
        }
    }

    fn ready_epochs(&self) -> std::sync::MutexGuard<'_, HashMap<String, u64>> {
        self.ready_epochs
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn ready_epoch(&self, issuer_key: &str) -> u64 {
        self.ready_epochs().get(issuer_key).copied().unwrap_or(0)
    }

    /// Records whether Secret `namespace/name` is someone else's.
    pub fn set_foreign_secret(&self, namespace: &str, name: &str, foreign: bool) {
        let mut known = self
            .foreign_secrets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let key = (namespace.to_string(), name.to_string());
        if foreign {
            known.insert(key);
        } else {
            known.remove(&key);
        }
    }

    /// Whether Secret `namespace/name` was last seen to be someone else's.
    pub fn is_known_foreign(&self, namespace: &str, name: &str) -> bool {
        self.foreign_secrets
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .contains(&(namespace.to_string(), name.to_string()))
    }

    /// Notes that an issuer became Ready: tokens that failed before may try again now.
    pub fn issuer_became_ready(&self, issuer_key: &str) {
        *self
            .ready_epochs()
            .entry(issuer_key.to_string())
            .or_insert(0) += 1;
    }

    /// Whether the issuer changed since this token's last failure. A failure from before
    /// this process started counts as the current generation at epoch 0, so a new bootstrap
    /// value seen since the start still waives its backoff.
    pub fn issuer_changed_since_failure(&self, token: &AudienceToken, now: IssuerRevision) -> bool {
        let then = self
            .failures()
            .get(&ObjectRef::from_obj(token))
            .copied()
            .unwrap_or(IssuerRevision {
                generation: now.generation,
                bootstrap_epoch: 0,
                certificate_epoch: 0,
                ready_epoch: 0,
            });
        then != now
    }

    /// Remembers a failure against the issuer revision it happened with.
    pub fn record_failure(&self, token: &AudienceToken, revision: IssuerRevision) {
        self.failures().insert(ObjectRef::from_obj(token), revision);
    }

    /// Forgets a failure after success.
    pub fn forget_failure(&self, token: &AudienceToken) {
        self.failures().remove(&ObjectRef::from_obj(token));
    }

    /// Sends one token request to `endpoint`, counted and timed in the metrics under the
    /// issuer's key.
    pub async fn token_request(
        &self,
        issuer_key: &str,
        endpoint: &Endpoint,
        request: &TokenRequest,
    ) -> Result<TokenResponse, TokenError> {
        let grant = match request.grant {
            crate::oauth::Grant::ClientCredentials => GrantLabel::ClientCredentials,
            crate::oauth::Grant::RefreshToken(_) => GrantLabel::RefreshToken,
            crate::oauth::Grant::AuthorizationCode { .. } => GrantLabel::AuthorizationCode,
            crate::oauth::Grant::TokenExchange { .. } => GrantLabel::TokenExchange,
        };
        let started = std::time::Instant::now();
        let response = self.endpoints.tokens().request(endpoint, request).await;
        let result = request_result(response.as_ref().map(|_| ()));
        self.metrics
            .token_request(issuer_key, grant, result, started.elapsed());
        response
    }

    /// Publishes a Warning Event on an AudienceToken. Event failures are logged, not fatal.
    pub async fn warn(&self, token: &AudienceToken, reason: &str, note: String) {
        self.event(token, EventType::Warning, reason, note).await;
    }

    /// Publishes an Event on an issuer.
    pub async fn issuer_event(
        &self,
        issuer: &ObjectReference,
        type_: EventType,
        reason: &str,
        note: String,
    ) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "RequestToken".into(),
            secondary: None,
        };
        if let Err(e) = self.recorder.publish(&event, issuer).await {
            warn!(issuer = ?issuer.name, error = %e, "cannot publish event");
        }
    }

    /// Publishes an Event on an AudienceToken.
    pub async fn event(&self, token: &AudienceToken, type_: EventType, reason: &str, note: String) {
        let event = Event {
            type_,
            reason: reason.into(),
            note: Some(note),
            action: "Reconcile".into(),
            secondary: None,
        };
        // Issued/Renewed come once per token per renewal: through the shared recorder, 10,000
        // tokens would keep 10,000 Events in its cache (37 MiB in the scale benchmark) for
        // nothing to fold. They are created as they are, and the answer is not read back.
        let published = match type_ {
            EventType::Normal => self.create_event(&event, &token.object_ref(&())).await,
            EventType::Warning => self.recorder.publish(&event, &token.object_ref(&())).await,
        };
        if let Err(e) = published {
            warn!(namespace = token.namespace(), name = token.name_any(), error = %e, "cannot publish event");
        }
    }

    /// Creates an Event as kube's `Recorder` makes a first occurrence (the same name,
    /// reporter and fields), without its cache and without deserializing the answer.
    async fn create_event(
        &self,
        event: &Event,
        regarding: &ObjectReference,
    ) -> Result<(), kube::Error> {
        let now = k8s_openapi::jiff::Timestamp::now();
        let namespace = regarding.namespace.as_deref().unwrap_or("default");
        let controller = &self.reporter.controller;
        let body = K8sEvent {
            action: Some(event.action.clone()),
            reason: Some(event.reason.clone()),
            note: event.note.clone(),
            event_time: Some(MicroTime(now)),
            regarding: Some(regarding.clone()),
            related: event.secondary.clone(),
            metadata: ObjectMeta {
                namespace: Some(namespace.to_string()),
                name: Some(format!(
                    "{}.{:x}",
                    regarding.name.as_ref().unwrap_or(controller),
                    now.as_nanosecond()
                )),
                ..ObjectMeta::default()
            },
            reporting_controller: Some(controller.clone()),
            reporting_instance: Some(
                self.reporter
                    .instance
                    .clone()
                    .unwrap_or_else(|| controller.clone()),
            ),
            type_: Some(match event.type_ {
                EventType::Normal => "Normal".into(),
                EventType::Warning => "Warning".into(),
            }),
            ..K8sEvent::default()
        };
        let body = serde_json::to_vec(&body).map_err(kube::Error::SerdeError)?;
        let request = Request::new(K8sEvent::url_path(&(), Some(namespace)))
            .create(&PostParams::default(), body);
        self.send_unread(request).await.map(|_| ())
    }

    /// Sends one of the operator's writes and returns the written object's resourceVersion.
    /// The rest of the answer (the whole object, a Secret's `data` too) is never turned into
    /// an object: at 10,000 tokens deserializing it was a good part of each write's CPU.
    pub(super) async fn send_write(
        &self,
        request: Result<http::Request<Vec<u8>>, kube::core::request::Error>,
    ) -> Result<Option<String>, kube::Error> {
        #[derive(serde::Deserialize)]
        struct Written {
            metadata: WrittenMeta,
        }
        #[derive(serde::Deserialize)]
        #[serde(rename_all = "camelCase")]
        struct WrittenMeta {
            resource_version: Option<String>,
        }
        let answer = self.send_unread(request).await?;
        Ok(serde_json::from_str::<Written>(&answer)
            .ok()
            .and_then(|w| w.metadata.resource_version))
    }

    /// Sends a write whose answer nothing reads (a status patch, an Event): only whether
    /// it succeeded matters, so the answer is not even scanned for its resourceVersion.
    pub(super) async fn send_unread(
        &self,
        request: Result<http::Request<Vec<u8>>, kube::core::request::Error>,
    ) -> Result<String, kube::Error> {
        let request = request.map_err(kube::Error::BuildRequest)?;
        self.client.request_text(request).await
    }
}
