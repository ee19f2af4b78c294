//! The controllers and their wiring ([`run`]): one for AudienceTokens
//! ([`reconcile::reconcile`]: gather, plan, execute), one each for TokenIssuer and
//! ClusterTokenIssuer status ([`issuer_status`]).
//!
//! - [`context`]: what every reconcile shares, and the one [`Error`].
//! - [`plan`]: pure decisions and statuses; [`reconcile`]: gathers, plans, executes.
//! - [`issuer`]: which issuer an AudienceToken may use (caches and tenancy).
//! - [`refresh_chain`]: the RefreshToken grant's chains; [`signals`]: how a chain asks the
//!   other controllers to look again.
//! - [`secret_watch`]: renewed client certificates re-issue the tokens bound to them;
//!   bootstrap values that `login` writes are adopted at once.
//! - `watches`: reflectors and trigger predicates.
//!
//! Caches are kept small on purpose (10,000 tokens on one replica): owned Secrets are
//! watched metadata-only by label; namespaces metadata-only; `managedFields` and the
//! last-applied annotation are dropped from everything cached.

pub mod context;
pub mod dpop_keys;
pub mod issuer;
pub mod issuer_status;
pub mod owned_secrets;
pub mod plan;
pub mod reconcile;
pub mod refresh_chain;
pub mod secret_watch;
pub mod signals;
mod watches;

pub use context::{Context, Error, IssuerRevision, Settings};
use watches::{Tasks, changed, spawn_reflector, spec_changed, strip_token, token_trigger};

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::channel::mpsc;
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, ObjectReference, Secret};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::controller::{
    Action, Config as ControllerConfig, Controller, Error as ControllerError,
};
use kube::runtime::events::{Recorder, Reporter};
use kube::runtime::reflector::{self, ObjectRef};
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Client, ResourceExt};
use tracing::{info, warn};

use crate::api::{AudienceToken, ClusterTokenIssuer, IssuerKind, TokenIssuer};
use crate::leader::{self, Shutdown};
use crate::oauth::TokenClient;
use crate::server::Health;
use crate::telemetry::Metrics;

use crate::issuer::IssuerEndpoints;
use crate::issuer::credentials::SecretSource;

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
    let issuer_secrets_api = secrets_api.clone();
    let (secrets, deleted_secrets) = owned_secrets::spawn(&mut tasks, secrets_api);

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
    if let (Err(e), _, _, ()) | (_, Err(e), _, ()) | (_, _, Err(e), ()) = ready {
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
        dpop_keys: Default::default(),
        certificates: Default::default(),
        recorder,
        reporter,
        failures: Mutex::new(HashMap::new()),
        ready_epochs: Mutex::new(HashMap::new()),
        foreign_secrets: Mutex::default(),
    });

    let stores = || secret_watch::IssuerStores {
        issuers: ctx.issuers.clone(),
        cluster_issuers: ctx.cluster_issuers.clone(),
        cluster_resource_namespace: settings.cluster_resource_namespace.clone(),
    };
    // Client certificates renewed in their Secrets: the cached one goes, the issuer and its
    // tokens look again.
    tasks.0.push(secret_watch::spawn_watch(
        secret_watch::Followed::Certificates,
        stores(),
        ctx.certificates.clone(),
        issuer_secrets_api.clone(),
        {
            let ctx = ctx.clone();
            move |namespace: &str, name: &str, issuers: &[ObjectReference]| {
                ctx.endpoints.forget_certificate(namespace, name);
                for issuer in issuers {
                    ctx.signals.recheck_issuer(issuer);
                    ctx.signals.retry_tokens_of(issuer);
                }
            }
        },
    ));
    // Bootstrap values written by `login`: the chain reads its bootstrap Secret at once.
    tasks.0.push(secret_watch::spawn_watch(
        secret_watch::Followed::Bootstraps,
        stores(),
        Default::default(),
        issuer_secrets_api,
        {
            let ctx = ctx.clone();
            move |_: &str, _: &str, issuers: &[ObjectReference]| {
                for issuer in issuers {
                    ctx.refresh_chains.bootstrap_changed(issuer);
                    ctx.signals.recheck_issuer(issuer);
                }
            }
        },
    ));

    let (reader, writer) = reflector::store::<AudienceToken>();
    let forget_deleted = {
        let metrics = metrics.clone();
        let ctx = ctx.clone();
        move |event: &watcher::Event<AudienceToken>| {
            if let watcher::Event::Delete(token) = event {
                metrics.forget_token(&token.namespace().unwrap_or_default(), &token.name_any());
                ctx.dpop_keys.forget(&ObjectRef::from_obj(token));
            }
        }
    };
    let token_stream = watcher(tokens_api, watcher::Config::default())
        .default_backoff()
        .modify(strip_token)
        .reflect(writer)
        .inspect_ok(forget_deleted)
        .try_filter_map(|event| futures::future::ready(Ok(token_trigger(event))));

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
        .reconcile_on(deleted_secrets)
        .reconcile_on(tokens_of_issuer)
        .graceful_shutdown_on(leader::cheap_to_poll(stop.clone()))
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
        .graceful_shutdown_on(leader::cheap_to_poll(stop.clone()))
        .run(
            issuer_status::reconcile_token_issuer,
            issuer_status::error_policy,
            ctx.clone(),
        )
        .for_each(|_| async {});
    let cluster_issuer_statuses =
        Controller::for_stream(cluster_issuer_status_triggers, ctx.cluster_issuers.clone())
            .reconcile_on(signal_streams.cluster_issuer_status)
            .graceful_shutdown_on(leader::cheap_to_poll(stop))
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
