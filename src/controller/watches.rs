//! Watch plumbing: reflectors whose caches fill before the controllers start, and the
//! predicates that decide which watch events trigger a reconcile.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Mutex;

use futures::channel::mpsc;
use futures::{Stream, StreamExt};
use kube::Resource;
use kube::ResourceExt;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{WatchStreamExt, watcher};
use tracing::warn;

use crate::api::{AudienceToken, RENEW_REQUESTED_AT_ANNOTATION};

/// Drops what caches do not need: `managedFields` and the last-applied annotation can be
/// larger than the rest of the object.
pub(super) fn strip<K: Resource>(obj: &mut K) {
    obj.meta_mut().managed_fields = None;
    if let Some(annotations) = obj.meta_mut().annotations.as_mut() {
        annotations.remove("kubectl.kubernetes.io/last-applied-configuration");
    }
}

/// [`strip`] for AudienceTokens, which are cached by the thousand: of their labels and
/// annotations reconcile reads only `renew-requested-at`, and only while it is pending. A
/// non-empty map costs a 544-byte node before its first entry, and Helm or GitOps tools put
/// several on every object; a renewal request already acted on (`status.lastRenewRequestedAt`
/// shows its value) stays on the object for good, so it is dropped here too: to the plan, a
/// request acted on and none at all are the same.
pub(super) fn strip_token(token: &mut AudienceToken) {
    let acted_on = token
        .status
        .as_ref()
        .and_then(|status| status.last_renew_requested_at.clone());
    let meta = token.meta_mut();
    meta.managed_fields = None;
    meta.labels = None;
    let pending = meta
        .annotations
        .take()
        .and_then(|mut annotations| annotations.remove_entry(RENEW_REQUESTED_AT_ANNOTATION))
        .filter(|(_, value)| acted_on.as_ref() != Some(value));
    meta.annotations = pending.map(|entry| std::collections::BTreeMap::from([entry]));
}

pub(super) type Trigger<K> = mpsc::UnboundedSender<Result<K, watcher::Error>>;

/// Background tasks that end with the controller (also when its future is dropped).
#[derive(Default)]
pub(super) struct Tasks(pub(super) Vec<tokio::task::JoinHandle<()>>);

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
pub(super) fn spawn_reflector<K, S>(
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
pub(super) fn changed<K: Clone>(event: &watcher::Event<K>) -> Option<K> {
    match event {
        watcher::Event::Apply(obj) | watcher::Event::Delete(obj) => Some(obj.clone()),
        _ => None,
    }
}

/// Triggers when an object's spec changed (a new generation) or it was deleted; status
/// updates, including the operator's own, do not trigger.
pub(super) fn spec_changed<K: Resource + Clone + 'static>()
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

/// Which watch events of AudienceTokens start a reconcile: every listed one (a restart
/// looks at each token once), and a change only when it asks for work ([`needs_reconcile`]).
/// The operator's own status writes do not trigger. Unlike a predicate over a hash of the
/// last event, this keeps no memory per token.
pub(super) fn token_trigger(event: watcher::Event<AudienceToken>) -> Option<AudienceToken> {
    match event {
        watcher::Event::InitApply(token) => Some(token),
        watcher::Event::Apply(token) if needs_reconcile(&token) => Some(token),
        _ => None,
    }
}

/// Whether a changed AudienceToken asks for work its status does not show done: a new
/// token or a lost status, a spec the status has not caught up with (a new generation), or
/// a forced-renewal value not acted on yet.
pub(super) fn needs_reconcile(token: &AudienceToken) -> bool {
    let Some(status) = token.status.as_ref() else {
        return true;
    };
    let pending_renewal = token
        .annotations()
        .get(RENEW_REQUESTED_AT_ANNOTATION)
        .is_some_and(|value| {
            !value.is_empty() && status.last_renew_requested_at.as_ref() != Some(value)
        });
    status.observed_generation != token.meta().generation || pending_renewal
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AudienceTokenSpec, AudienceTokenStatus};
    use std::collections::BTreeMap;

    /// An AudienceToken at generation 2 with `annotations`, and `status` if given.
    fn token(annotations: &[(&str, &str)], status: Option<AudienceTokenStatus>) -> AudienceToken {
        let mut token = AudienceToken::new(
            "orders",
            AudienceTokenSpec {
                resource: "https://orders.example.com".into(),
                ..AudienceTokenSpec::default()
            },
        );
        token.metadata.namespace = Some("shop".into());
        token.metadata.generation = Some(2);
        token.metadata.labels = Some(BTreeMap::from([("app".into(), "shop".into())]));
        token.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        token.status = status;
        token
    }

    fn status(observed_generation: i64, last_renew: Option<&str>) -> AudienceTokenStatus {
        AudienceTokenStatus {
            observed_generation: Some(observed_generation),
            last_renew_requested_at: last_renew.map(str::to_string),
            ..AudienceTokenStatus::default()
        }
    }

    const RENEW: &str = RENEW_REQUESTED_AT_ANNOTATION;

    #[test]
    fn the_operators_own_status_write_triggers_nothing() {
        // What the watch shows after the operator published a token for generation 2.
        let written = token(&[("helm.sh/chart", "x")], Some(status(2, None)));
        assert!(!needs_reconcile(&written));
        assert!(token_trigger(watcher::Event::Apply(written.clone())).is_none());
        // After a restart every listed token is looked at once, done or not.
        assert!(token_trigger(watcher::Event::InitApply(written)).is_some());
    }

    #[test]
    fn work_the_status_does_not_show_done_triggers() {
        assert!(needs_reconcile(&token(&[], None)), "a new token");
        assert!(
            needs_reconcile(&token(&[], Some(status(1, None)))),
            "a new generation"
        );
        assert!(
            needs_reconcile(&token(&[(RENEW, "t2")], Some(status(2, Some("t1"))))),
            "a renewal request not yet acted on"
        );
        assert!(
            !needs_reconcile(&token(&[(RENEW, "t2")], Some(status(2, Some("t2"))))),
            "a renewal request acted on"
        );
        assert!(
            !needs_reconcile(&token(&[(RENEW, "")], Some(status(2, None)))),
            "an empty value asks for nothing (as the plan reads it)"
        );
    }

    #[test]
    fn the_cache_keeps_only_a_pending_renewal_request() {
        let mut pending = token(
            &[(RENEW, "t2"), ("helm.sh/chart", "x")],
            Some(status(2, Some("t1"))),
        );
        strip_token(&mut pending);
        assert_eq!(pending.metadata.labels, None);
        assert_eq!(
            pending.metadata.annotations,
            Some(BTreeMap::from([(RENEW.to_string(), "t2".to_string())]))
        );
        // Still asks for its renewal after stripping.
        assert!(needs_reconcile(&pending));

        let mut acted_on = token(
            &[(RENEW, "t2"), ("helm.sh/chart", "x")],
            Some(status(2, Some("t2"))),
        );
        strip_token(&mut acted_on);
        assert_eq!(acted_on.metadata.annotations, None);
        assert!(!needs_reconcile(&acted_on));
    }
}
