//! Watch plumbing: reflectors whose caches fill before the controllers start, and the
//! predicates that decide which watch events trigger a reconcile.

use std::collections::HashMap;
use std::hash::{Hash, Hasher};
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
/// annotations reconcile reads only `renew-requested-at`. A non-empty map costs a 544-byte
/// node before its first entry, and Helm or GitOps tools put several on every object.
pub(super) fn strip_token(token: &mut AudienceToken) {
    let meta = token.meta_mut();
    meta.managed_fields = None;
    meta.labels = None;
    let renew_requested_at = meta
        .annotations
        .take()
        .and_then(|mut annotations| annotations.remove_entry(RENEW_REQUESTED_AT_ANNOTATION));
    meta.annotations = renew_requested_at.map(|entry| std::collections::BTreeMap::from([entry]));
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

/// Reconcile triggers for an AudienceToken: a new generation, or a new forced-renewal value.
/// Status writes (including our own) do not trigger.
pub(super) fn token_trigger_hash(token: &AudienceToken) -> Option<u64> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    token.meta().generation.hash(&mut hasher);
    token
        .annotations()
        .get(RENEW_REQUESTED_AT_ANNOTATION)
        .hash(&mut hasher);
    Some(hasher.finish())
}
