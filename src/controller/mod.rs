//! The controller: caches, the shared [`Context`], and the kube-runtime wiring around
//! [`reconcile::reconcile`].
//!
//! Caches are kept small on purpose (10,000 tokens on one replica): owned Secrets are
//! watched metadata-only by label; namespaces metadata-only; `managedFields` and the
//! last-applied annotation are dropped from everything cached.

pub mod issuer;
pub mod issuer_status;
pub mod plan;
pub mod reconcile;
pub mod refresh_chain;
pub mod signals;

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc;
use futures::{Stream, StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Secret};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{
    Action, Config as ControllerConfig, Controller, Error as ControllerError,
};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::{
    AudienceToken, ClusterTokenIssuer, IssuerKind, RENEW_REQUESTED_AT_ANNOTATION, TokenIssuer,
};
use crate::leader::Shutdown;
use crate::oauth::{Endpoint, TokenClient, TokenError, TokenRequest, TokenResponse};
use crate::secret::{NAME_LABEL, managed_selector};
use crate::server::Health;
use crate::telemetry::{GrantLabel, Metrics, request_result};

use crate::issuer::IssuerEndpoints;
use crate::issuer::credentials::SecretSource;

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
    /// Secrets the operator manages, metadata only.
    pub secrets: Store<PartialObjectMeta<Secret>>,
    /// Refresh-token chains, one per issuer using the RefreshToken grant.
    pub refresh_chains: refresh_chain::RefreshChains,
    /// Prometheus metrics.
    pub metrics: Arc<Metrics>,
    /// Issuers' `rateLimit` buckets.
    pub rate_limiter: crate::rate_limit::RateLimiter,
    /// Events about issuers and Warnings: kube-runtime's recorder keeps each Event it
    /// publishes for a few minutes, to fold repeats into a series.
    recorder: Recorder,
    /// Who reports Events (for the one-off recorders of Normal token Events).
    reporter: Reporter,
    /// Asks the other controllers to look again.
    pub signals: signals::Signals,
    /// For AudienceTokens whose last request failed: the issuer's revision at that time. A
    /// new revision (the issuer was fixed, its chain got a new bootstrap value) waives the
    /// backoff.
    failures: Mutex<HashMap<ObjectRef<AudienceToken>, IssuerRevision>>,
}

/// What may fix a failed token request when it changes: the issuer's spec, and for a
/// refresh-token chain, its bootstrap value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IssuerRevision {
    /// The issuer's `metadata.generation`.
    pub generation: i64,
    /// New bootstrap values this process saw for the issuer's chain (0 after a start).
    pub bootstrap_epoch: u64,
}

impl Context {
    fn failures(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<AudienceToken>, IssuerRevision>> {
        self.failures
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The issuer as it is now, for comparing with a recorded failure.
    pub fn issuer_revision(&self, issuer: &issuer::ResolvedIssuer) -> IssuerRevision {
        IssuerRevision {
            generation: issuer.generation,
            bootstrap_epoch: self.refresh_chains.bootstrap_epoch(&issuer.key),
        }
    }

    /// Whether the issuer changed since this token's last failure. A failure from before
    /// this process started counts as the current generation at epoch 0, so a new bootstrap
    /// value seen since the start still waives its backoff.
    pub fn issuer_changed_since_failure(
        &self,
        token: &AudienceToken,
        issuer: &issuer::ResolvedIssuer,
    ) -> bool {
        let now = self.issuer_revision(issuer);
        let then = self
            .failures()
            .get(&ObjectRef::from_obj(token))
            .copied()
            .unwrap_or(IssuerRevision {
                generation: now.generation,
                bootstrap_epoch: 0,
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
        // nothing to fold. A recorder of its own per Event keeps nothing.
        let published = match type_ {
            EventType::Normal => {
                Recorder::new(self.client.clone(), self.reporter.clone())
                    .publish(&event, &token.object_ref(&()))
                    .await
            }
            EventType::Warning => self.recorder.publish(&event, &token.object_ref(&())).await,
        };
        if let Err(e) = published {
            warn!(namespace = token.namespace(), name = token.name_any(), error = %e, "cannot publish event");
        }
    }
}

/// Drops what caches do not need: `managedFields` and the last-applied annotation can be
/// larger than the rest of the object.
fn strip<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
    if let Some(annotations) = obj.meta_mut().annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

type Trigger<K> = mpsc::UnboundedSender<Result<K, watcher::Error>>;

/// Background tasks that end with the controller (also when its future is dropped).
#[derive(Default)]
struct Tasks(Vec<tokio::task::JoinHandle<()>>);

impl Drop for Tasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Runs a reflector in its own task so its cache fills before the controller starts, and
/// forwards the events `select` picks to the AudienceToken controller as triggers. With
/// `every_object`, every listed or changed object also goes there (for a controller of `K`).
fn spawn_reflector<K, S>(
    tasks: &mut Tasks,
    stream: S,
    select: impl Fn(&watcher::Event<K>) -> Option<K> + Send + 'static,
    every_object: Option<Trigger<K>>,
) -> (Store<K>, mpsc::UnboundedReceiver<Result<K, watcher::Error>>)
where
    K: Resource + Clone + Send + Sync + std::fmt::Debug + 'static,
    K::DynamicType: Default + Eq + Hash + Clone + Send + Sync,
    S: Stream<Item = Result<watcher::Event<K>, watcher::Error>> + Send + 'static,
{
    let (reader, writer) = reflector::store();
    let (tx, rx): (Trigger<K>, _) = mpsc::unbounded();
    let stream = stream.default_backoff().modify(strip).reflect(writer);
    tasks.0.push(tokio::spawn(async move {
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    // A controller may have stopped; then nobody needs the trigger.
                    if let Some(obj) = select(&event) {
                        let _ = tx.unbounded_send(Ok(obj));
                    }
                    if let (Some(all), watcher::Event::Apply(obj) | watcher::Event::InitApply(obj)) =
                        (&every_object, &event)
                    {
                        let _ = all.unbounded_send(Ok(obj.clone()));
                    }
                }
                Err(e) => {
                    warn!(error = %e, kind = %K::kind(&Default::default()), "watch failed; retrying")
                }
            }
        }
    }));
    (reader, rx)
}

/// Triggers on changes after the initial list: those objects get reconciled anyway.
fn changed<K: Clone>(event: &watcher::Event<K>) -> Option<K> {
    match event {
        watcher::Event::Apply(obj) | watcher::Event::Delete(obj) => Some(obj.clone()),
        _ => None,
    }
}

/// Triggers when an object's spec changed (a new generation) or it was deleted; status
/// updates, including the operator's own, do not trigger.
fn spec_changed<K: Resource + Clone + 'static>()
-> impl Fn(&watcher::Event<K>) -> Option<K> + Send + 'static
where
    K::DynamicType: Default + Eq + Hash + Clone,
{
    let seen: Mutex<HashMap<ObjectRef<K>, Option<i64>>> = Mutex::new(HashMap::new());
    move |event| {
        let mut seen = seen.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        match event {
            watcher::Event::InitApply(obj) => {
                seen.insert(ObjectRef::from_obj(obj), obj.meta().generation);
                None
            }
            watcher::Event::Apply(obj) => {
                let generation = obj.meta().generation;
                let before = seen.insert(ObjectRef::from_obj(obj), generation);
                (before != Some(generation)).then(|| obj.clone())
            }
            watcher::Event::Delete(obj) => {
                seen.remove(&ObjectRef::from_obj(obj));
                Some(obj.clone())
            }
            _ => None,
        }
    }
}

fn deleted<K: Clone>(event: &watcher::Event<K>) -> Option<K> {
    match event {
        watcher::Event::Delete(obj) => Some(obj.clone()),
        _ => None,
    }
}

/// Reconcile triggers for an AudienceToken: a new generation, or a new forced-renewal value.
/// Status writes (including our own) do not trigger.
fn token_trigger_hash(token: &AudienceToken) -> Option<u64> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    token.meta().generation.hash(&mut hasher);
    token
        .annotations()
        .get(RENEW_REQUESTED_AT_ANNOTATION)
        .hash(&mut hasher);
    Some(hasher.finish())
}

/// Builds the caches and runs the controllers until `stop` resolves; reconciles in flight
/// then finish (a refresh-token rotation is never cut off half-way).
pub async fn run(
    client: Client,
    settings: Settings,
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    stop: Shutdown,
) -> Result<(), Error> {
    let (tokens_api, issuers_api, secrets_api): (
        Api<AudienceToken>,
        Api<TokenIssuer>,
        Api<PartialObjectMeta<Secret>>,
    ) = match &settings.namespace {
        Some(ns) => (
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
            Api::namespaced(client.clone(), ns),
        ),
        None => (
            Api::all(client.clone()),
            Api::all(client.clone()),
            Api::all(client.clone()),
        ),
    };
    let cluster_issuers_api: Api<ClusterTokenIssuer> = Api::all(client.clone());
    let mut tasks = Tasks::default();
    let namespaces_api: Api<PartialObjectMeta<Namespace>> = Api::all(client.clone());

    // Issuers feed two controllers: their own status, and the AudienceTokens using them.
    let (issuer_status_tx, issuer_status_triggers) = mpsc::unbounded();
    let (cluster_issuer_status_tx, cluster_issuer_status_triggers) = mpsc::unbounded();
    let (issuers, issuer_triggers) = spawn_reflector(
        &mut tasks,
        watcher(issuers_api, watcher::Config::default()),
        spec_changed(),
        Some(issuer_status_tx),
    );
    let (cluster_issuers, cluster_issuer_triggers) = spawn_reflector(
        &mut tasks,
        watcher(cluster_issuers_api, watcher::Config::default()),
        spec_changed(),
        Some(cluster_issuer_status_tx),
    );
    let (namespaces, namespace_triggers) = spawn_reflector(
        &mut tasks,
        watcher(namespaces_api, watcher::Config::default()),
        changed,
        None,
    );
    let (secrets, secret_triggers) = spawn_reflector(
        &mut tasks,
        watcher(
            secrets_api,
            watcher::Config::default().labels(&managed_selector()),
        ),
        deleted,
        None,
    );

    info!("waiting for caches to sync");
    let ready = futures::future::join4(
        issuers.wait_until_ready(),
        cluster_issuers.wait_until_ready(),
        namespaces.wait_until_ready(),
        secrets.wait_until_ready(),
    );
    // An unreachable API server must not keep a stop request waiting.
    let ready = tokio::select! {
        ready = ready => ready,
        () = stop.clone() => {
            info!("stopped before the caches synced");
            health.set_stopped();
            return Ok(());
        }
    };
    if let (Err(e), _, _, _) | (_, Err(e), _, _) | (_, _, Err(e), _) | (_, _, _, Err(e)) = ready {
        warn!(error = %e, "a cache stopped before it was ready");
    }
    info!(
        secrets = secrets.len(),
        issuers = issuers.len(),
        "caches synced"
    );

    let (signals, signal_streams) = signals::Signals::new();
    let reporter = Reporter {
        controller: crate::secret::MANAGER.into(),
        instance: settings.instance.clone(),
    };
    let recorder = Recorder::new(client.clone(), reporter.clone());
    let ctx = Arc::new(Context {
        endpoints: IssuerEndpoints::new(TokenClient::new()?, SecretSource::new(client.clone())),
        client,
        settings: settings.clone(),
        issuers,
        cluster_issuers,
        namespaces,
        secrets,
        refresh_chains: refresh_chain::RefreshChains::default(),
        metrics: metrics.clone(),
        rate_limiter: Default::default(),
        signals,
        recorder,
        reporter,
        failures: Mutex::new(HashMap::new()),
    });

    let (reader, writer) = reflector::store::<AudienceToken>();
    let forget_deleted = {
        let metrics = metrics.clone();
        move |event: &watcher::Event<AudienceToken>| {
            if let watcher::Event::Delete(token) = event {
                metrics.forget_token(&token.namespace().unwrap_or_default(), &token.name_any());
            }
        }
    };
    let token_stream = watcher(tokens_api, watcher::Config::default())
        .default_backoff()
        .modify(strip)
        .reflect(writer)
        .inspect_ok(forget_deleted)
        .applied_objects()
        .predicate_filter(token_trigger_hash, Default::default());

    let by_issuer = {
        let reader = reader.clone();
        move |kind: IssuerKind, namespace: Option<String>, name: String| {
            reader
                .state()
                .into_iter()
                .filter(|t| {
                    t.spec.issuer_ref.kind == kind
                        && t.spec.issuer_ref.name == name
                        && (namespace.is_none() || t.namespace() == namespace)
                })
                .map(|t| ObjectRef::from_obj(&*t))
                .collect::<Vec<_>>()
        }
    };
    let issuer_mapper = {
        let by_issuer = by_issuer.clone();
        move |issuer: TokenIssuer| {
            by_issuer(
                IssuerKind::TokenIssuer,
                issuer.namespace(),
                issuer.name_any(),
            )
        }
    };
    let cluster_issuer_mapper = {
        let by_issuer = by_issuer.clone();
        move |issuer: ClusterTokenIssuer| {
            by_issuer(IssuerKind::ClusterTokenIssuer, None, issuer.name_any())
        }
    };
    // Signalled by refresh chains: every token of the issuer, now.
    let tokens_of_issuer = signal_streams.tokens_of_issuer.flat_map(move |issuer| {
        futures::stream::iter(by_issuer(issuer.kind, issuer.namespace, issuer.name))
    });
    let namespace_mapper = {
        let reader = reader.clone();
        move |ns: PartialObjectMeta<Namespace>| {
            let name = ns.name_any();
            reader
                .state()
                .into_iter()
                .filter(|t| {
                    t.spec.issuer_ref.kind == IssuerKind::ClusterTokenIssuer
                        && t.namespace().as_deref() == Some(&name)
                })
                .map(|t| ObjectRef::from_obj(&*t))
                .collect::<Vec<_>>()
        }
    };
    let secret_mapper = |secret: PartialObjectMeta<Secret>| {
        let owner: Option<String> = secret.labels().get(NAME_LABEL).cloned();
        let namespace: Option<String> = secret.namespace();
        owner
            .zip(namespace)
            .map(|(name, ns)| ObjectRef::<AudienceToken>::new(&name).within(&ns))
    };

    // Ready once the AudienceTokens are listed too (the controller drives that watch). The
    // store's readiness wakes only its latest waiter, and the Controller waits on it too: ask
    // again every 100 ms instead of waiting once.
    tasks.0.push(tokio::spawn({
        let reader = reader.clone();
        let health = health.clone();
        async move {
            loop {
                let wait =
                    tokio::time::timeout(Duration::from_millis(100), reader.wait_until_ready());
                match wait.await {
                    Ok(Ok(())) => {
                        info!(tokens = reader.len(), "AudienceTokens listed; ready");
                        health.set_caches_synced(true);
                        return;
                    }
                    Ok(Err(_)) => return,
                    Err(_) => {}
                }
            }
        }
    }));

    info!(concurrency = settings.concurrency, namespace = ?settings.namespace, "starting AudienceToken controller");
    let tokens = Controller::for_stream(token_stream, reader)
        .with_config(ControllerConfig::default().concurrency(settings.concurrency))
        .watches_stream(issuer_triggers, issuer_mapper)
        .watches_stream(cluster_issuer_triggers, cluster_issuer_mapper)
        .watches_stream(namespace_triggers, namespace_mapper)
        .watches_stream(secret_triggers, secret_mapper)
        .reconcile_on(tokens_of_issuer)
        .graceful_shutdown_on(stop.clone())
        .run(reconcile::reconcile, error_policy, ctx.clone())
        .for_each(|result| {
            match result {
                Ok(_) => metrics.reconciled(true),
                // Deleted while queued (a requeue or its Secret going): drop its series.
                Err(ControllerError::ObjectNotFound(token)) => metrics
                    .forget_token(token.namespace.as_deref().unwrap_or_default(), &token.name),
                Err(e @ ControllerError::ReconcilerFailed(..)) => {
                    metrics.reconciled(false);
                    warn!(error = %e, "reconcile failed");
                }
                Err(e) => warn!(error = %e, "controller error"),
            }
            futures::future::ready(())
        });
    let issuer_statuses = Controller::for_stream(issuer_status_triggers, ctx.issuers.clone())
        .reconcile_on(signal_streams.token_issuer_status)
        .graceful_shutdown_on(stop.clone())
        .run(
            issuer_status::reconcile_token_issuer,
            issuer_status::error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});
    let cluster_issuer_statuses =
        Controller::for_stream(cluster_issuer_status_triggers, ctx.cluster_issuers.clone())
            .reconcile_on(signal_streams.cluster_issuer_status)
            .graceful_shutdown_on(stop)
            .run(
                issuer_status::reconcile_cluster_issuer,
                issuer_status::error_policy,
                ctx.clone(),
            )
            .for_each(|_| async {});
    futures::future::join3(tokens, issuer_statuses, cluster_issuer_statuses).await;
    health.set_stopped();
    drop(tasks);
    info!("controller stopped");
    Ok(())
}

/// Kubernetes API failures: retry soon. Token failures never get here.
fn error_policy(token: Arc<AudienceToken>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(
        namespace = token.namespace(),
        name = token.name_any(),
        issuer = issuer::issuer_key(&token),
        resource = token.spec.resource,
        kind = error.metric_label(),
        error = %error,
        "reconcile error; retrying"
    );
    Action::requeue(Duration::from_secs(5))
}
