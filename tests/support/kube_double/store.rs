//! The object store: objects, the global resourceVersion, the event history watches replay,
//! finalizers and the owner-reference cascade.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Mutex;

use serde_json::{Value, json};
use tokio::sync::watch;

use super::RequestRecord;
use super::token_request::Issuer;

/// Events kept for watch replay; older ones are dropped and a watch from before them gets 410.
const HISTORY_LIMIT: usize = 10_000;

/// (API group, plural): what identifies a resource type (the double keeps one version of each).
pub type Gr = (String, String);
/// (group+plural, namespace or "" when cluster-scoped, name)
pub type Key = (Gr, String, String);

#[derive(Clone, Debug)]
pub struct KindInfo {
    pub kind: String,
    pub status_subresource: bool,
}

const AT: &str = "audiencetoken.io";
pub const RBAC: &str = "rbac.authorization.k8s.io";
/// Resource types known from the start: (group, plural, kind, has a status subresource).
const KINDS: [(&str, &str, &str, bool); 13] = [
    ("", "secrets", "Secret", false),
    ("", "serviceaccounts", "ServiceAccount", false),
    ("", "configmaps", "ConfigMap", false),
    ("", "namespaces", "Namespace", false),
    ("events.k8s.io", "events", "Event", false),
    ("coordination.k8s.io", "leases", "Lease", false),
    (RBAC, "roles", "Role", false),
    (RBAC, "rolebindings", "RoleBinding", false),
    (RBAC, "clusterroles", "ClusterRole", false),
    (RBAC, "clusterrolebindings", "ClusterRoleBinding", false),
    (AT, "audiencetokens", "AudienceToken", true),
    (AT, "tokenissuers", "TokenIssuer", true),
    (AT, "clustertokenissuers", "ClusterTokenIssuer", true),
];

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum EventType {
    Added,
    Modified,
    Deleted,
}

impl EventType {
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Added => "ADDED",
            EventType::Modified => "MODIFIED",
            EventType::Deleted => "DELETED",
        }
    }
}

pub struct Event {
    pub rv: u64,
    pub gr: Gr,
    pub namespace: String,
    pub kind: EventType,
    pub obj: Value,
    /// The object before a MODIFIED event (label-selected watches need it).
    pub prev: Option<Value>,
}

impl Store {
    /// The kept events after resourceVersion `rv`, oldest first. The history is in
    /// resourceVersion order, so this is a binary search, not a scan of the whole history.
    pub fn events_after(&self, rv: u64) -> impl Iterator<Item = &Event> {
        let start = self.history.partition_point(|e| e.rv <= rv);
        self.history.range(start..)
    }
}

/// An API error, rendered as a `Status` body.
#[derive(Debug)]
pub struct ApiError {
    pub code: u16,
    pub reason: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(code: u16, reason: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            code,
            reason,
            message: message.into(),
        }
    }
    pub fn not_found(gr: &Gr, name: &str) -> Self {
        Self::new(
            404,
            "NotFound",
            format!("{} \"{name}\" not found", qualified(gr)),
        )
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(400, "BadRequest", message)
    }
    pub fn status(&self) -> Value {
        json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
               "message": self.message, "reason": self.reason, "code": self.code})
    }
}

/// `plural.group`, as the real server names resources in messages.
pub fn qualified((group, plural): &Gr) -> String {
    if group.is_empty() {
        plural.clone()
    } else {
        format!("{plural}.{group}")
    }
}

pub struct Store {
    pub rv: u64,
    next_uid: u64,
    pub objects: BTreeMap<Key, Value>,
    pub history: VecDeque<Event>,
    /// A watch must start at or after this resourceVersion (events up to it were dropped).
    pub compacted_rv: u64,
    pub kinds: HashMap<Gr, KindInfo>,
    pub requests: Vec<RequestRecord>,
    /// Every token the TokenRequest subresource issued, in order.
    pub minted: Vec<String>,
    /// Bearer token -> user name, for the TokenRequest authorization check.
    pub identities: HashMap<String, String>,
}

/// State shared by the HTTP server, the watch tasks and [`super::KubeApiDouble`].
pub struct Shared {
    pub store: Mutex<Store>,
    /// Latest resourceVersion; watch tasks wait on it.
    pub rv_tx: watch::Sender<u64>,
    pub shutdown: watch::Sender<bool>,
    pub issuer: Issuer,
}

impl Shared {
    /// `url` is the double's own URL (for the issuer's `jwks_uri`).
    pub fn new(url: &str) -> Self {
        let kinds = KINDS.map(|(group, plural, kind, status_subresource)| {
            let info = KindInfo {
                kind: kind.to_string(),
                status_subresource,
            };
            ((group.to_string(), plural.to_string()), info)
        });
        let store = Store {
            rv: 0,
            next_uid: 0,
            objects: BTreeMap::new(),
            history: VecDeque::new(),
            compacted_rv: 0,
            kinds: kinds.into_iter().collect(),
            requests: Vec::new(),
            minted: Vec::new(),
            identities: HashMap::new(),
        };
        Shared {
            store: Mutex::new(store),
            rv_tx: watch::channel(0).0,
            shutdown: watch::channel(false).0,
            issuer: Issuer::generate(url),
        }
    }

    /// Runs `f` on the store, then wakes the watches if it wrote something (a new
    /// resourceVersion). Reads and the request log wake nobody: with thousands of objects,
    /// waking every watch on every request made the double the bottleneck.
    pub fn with<R>(&self, f: impl FnOnce(&mut Store) -> R) -> R {
        let (result, rv) = {
            let mut store = self.store.lock().unwrap_or_else(|e| e.into_inner());
            let result = f(&mut store);
            (result, store.rv)
        };
        self.rv_tx.send_if_modified(|current| {
            let changed = *current != rv;
            *current = rv;
            changed
        });
        result
    }
}

pub fn now() -> String {
    let secs = jiff::Timestamp::now().as_second();
    jiff::Timestamp::from_second(secs)
        .expect("valid time")
        .to_string()
}

fn meta(obj: &mut Value) -> &mut serde_json::Map<String, Value> {
    if !obj["metadata"].is_object() {
        obj["metadata"] = json!({});
    }
    obj["metadata"]
        .as_object_mut()
        .expect("metadata is an object")
}

/// Sets `obj[field]` to `value`, or removes it when `value` is `None`.
pub fn set_or_remove(obj: &mut Value, field: &str, value: Option<Value>) {
    if let Some(map) = obj.as_object_mut() {
        match value {
            Some(v) => map.insert(field.to_string(), v),
            None => map.remove(field),
        };
    }
}

/// The object without metadata, status and type fields: what `generation` tracks.
fn spec_part(obj: &Value) -> Value {
    let mut v = obj.clone();
    if let Some(m) = v.as_object_mut() {
        for f in ["metadata", "status", "apiVersion", "kind"] {
            m.remove(f);
        }
    }
    v
}

fn has_finalizers(obj: &Value) -> bool {
    obj["metadata"]["finalizers"]
        .as_array()
        .is_some_and(|f| !f.is_empty())
}

impl Store {
    pub fn info(&self, gr: &Gr) -> Option<&KindInfo> {
        self.kinds.get(gr)
    }

    pub fn status_subresource(&self, gr: &Gr) -> bool {
        self.info(gr).is_some_and(|i| i.status_subresource)
    }

    /// Remembers the kind of a resource type not in the table, from an object written to it.
    pub fn learn_kind(&mut self, gr: &Gr, obj: &Value) {
        if let Some(kind) = obj["kind"].as_str() {
            let info = KindInfo {
                kind: kind.to_string(),
                status_subresource: false,
            };
            self.kinds.entry(gr.clone()).or_insert(info);
        }
    }

    fn emit(&mut self, kind: EventType, key: &Key, obj: Value, prev: Option<Value>) {
        let (gr, namespace) = (key.0.clone(), key.1.clone());
        self.history.push_back(Event {
            rv: self.rv,
            gr,
            namespace,
            kind,
            obj,
            prev,
        });
        while self.history.len() > HISTORY_LIMIT {
            let dropped = self.history.pop_front().expect("non-empty");
            self.compacted_rv = dropped.rv;
        }
    }

    /// Drops the whole event history, like an etcd compaction: watches from older resource
    /// versions get `410 Gone`.
    pub fn compact(&mut self) {
        self.history.clear();
        self.compacted_rv = self.rv;
    }

    fn next_rv(&mut self) -> String {
        self.rv += 1;
        self.rv.to_string()
    }

    /// Creates an object (name from `metadata.name`, or `generateName` plus a suffix).
    /// System metadata (uid, creationTimestamp, generation, resourceVersion) is assigned here.
    pub fn create(&mut self, gr: &Gr, namespace: &str, mut obj: Value) -> Result<Value, ApiError> {
        let m = meta(&mut obj);
        let name = match (
            m.get("name").and_then(Value::as_str),
            m.get("generateName").and_then(Value::as_str),
        ) {
            (Some(name), _) if !name.is_empty() => name.to_string(),
            (_, Some(prefix)) => format!("{prefix}{:05x}", self.next_uid + 1),
            _ => {
                return Err(ApiError::new(
                    422,
                    "Invalid",
                    "metadata.name: Required value: name or generateName is required",
                ));
            }
        };
        let key: Key = (gr.clone(), namespace.to_string(), name.clone());
        if self.objects.contains_key(&key) {
            let message = format!("{} \"{name}\" already exists", qualified(gr));
            return Err(ApiError::new(409, "AlreadyExists", message));
        }
        self.next_uid += 1;
        let uid = format!("00000000-0000-4000-8000-{:012x}", self.next_uid);
        let rv = self.next_rv();
        let m = meta(&mut obj);
        m.insert("name".into(), json!(name));
        if !namespace.is_empty() {
            m.insert("namespace".into(), json!(namespace));
        }
        m.insert("uid".into(), json!(uid));
        m.insert("resourceVersion".into(), json!(rv));
        m.insert("creationTimestamp".into(), json!(now()));
        m.insert("generation".into(), json!(1));
        self.objects.insert(key.clone(), obj.clone());
        self.emit(EventType::Added, &key, obj.clone(), None);
        Ok(obj)
    }

    /// Replaces a stored object. System metadata is kept from the stored object (a direct
    /// `put` may set `deletionTimestamp`); `generation` goes up when the non-metadata,
    /// non-status part changed. A write that changes nothing is not persisted: no new
    /// resourceVersion, no event (as on the real server). A terminating object whose last
    /// finalizer goes away is removed.
    pub fn update(&mut self, key: &Key, mut new: Value, direct: bool) -> Result<Value, ApiError> {
        let old = self
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&key.0, &key.2))?;
        let deletion = new["metadata"]
            .get("deletionTimestamp")
            .filter(|_| direct)
            .cloned();
        let m = meta(&mut new);
        for field in [
            "name",
            "namespace",
            "uid",
            "creationTimestamp",
            "deletionTimestamp",
            "resourceVersion",
        ] {
            match old["metadata"].get(field) {
                Some(v) => m.insert(field.into(), v.clone()),
                None => m.remove(field),
            };
        }
        if let Some(ts) = deletion {
            m.insert("deletionTimestamp".into(), ts);
        }
        let generation = old["metadata"]["generation"].as_i64().unwrap_or(1);
        let bump = i64::from(spec_part(&old) != spec_part(&new));
        meta(&mut new).insert("generation".into(), json!(generation + bump));
        if new == old {
            return Ok(old);
        }
        let rv = self.next_rv();
        meta(&mut new).insert("resourceVersion".into(), json!(rv));
        if new["metadata"].get("deletionTimestamp").is_some() && !has_finalizers(&new) {
            self.remove(key, new.clone());
        } else {
            self.objects.insert(key.clone(), new.clone());
            self.emit(EventType::Modified, key, new.clone(), Some(old));
        }
        Ok(new)
    }

    /// Deletes: with finalizers, marks the object terminating (deletionTimestamp, generation+1);
    /// otherwise removes it.
    pub fn delete(&mut self, key: &Key) -> Result<Value, ApiError> {
        let mut obj = self
            .objects
            .get(key)
            .cloned()
            .ok_or_else(|| ApiError::not_found(&key.0, &key.2))?;
        if has_finalizers(&obj) {
            if obj["metadata"].get("deletionTimestamp").is_some() {
                return Ok(obj);
            }
            let prev = obj.clone();
            let generation = obj["metadata"]["generation"].as_i64().unwrap_or(1);
            let rv = self.next_rv();
            let m = meta(&mut obj);
            m.insert("deletionTimestamp".into(), json!(now()));
            m.insert("generation".into(), json!(generation + 1));
            m.insert("resourceVersion".into(), json!(rv));
            self.objects.insert(key.clone(), obj.clone());
            self.emit(EventType::Modified, key, obj.clone(), Some(prev));
            return Ok(obj);
        }
        let rv = self.next_rv();
        meta(&mut obj).insert("resourceVersion".into(), json!(rv));
        self.remove(key, obj.clone());
        Ok(obj)
    }

    /// Removes an object for good, then (synchronously, unlike the real garbage collector and
    /// namespace controller) deletes its dependents: objects listing its uid in
    /// `ownerReferences`, and for a Namespace every object in it.
    fn remove(&mut self, key: &Key, obj: Value) {
        self.objects.remove(key);
        self.emit(EventType::Deleted, key, obj.clone(), None);
        let uid = obj["metadata"]["uid"].clone();
        let is_namespace = key.0 == (String::new(), "namespaces".to_string());
        let dependents: Vec<Key> = self
            .objects
            .iter()
            .filter(|(k, o)| {
                let owned = o["metadata"]["ownerReferences"]
                    .as_array()
                    .is_some_and(|refs| refs.iter().any(|r| r["uid"] == uid));
                owned || (is_namespace && k.1 == key.2)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for dependent in dependents {
            let _ = self.delete(&dependent);
        }
    }

    /// Direct create-or-replace used by the test-facing API: no preconditions, no status rules.
    pub fn put(&mut self, gr: &Gr, namespace: &str, obj: Value) -> Value {
        self.learn_kind(gr, &obj);
        let name = obj["metadata"]["name"]
            .as_str()
            .expect("put: metadata.name is required")
            .to_string();
        let key: Key = (gr.clone(), namespace.to_string(), name);
        if self.objects.contains_key(&key) {
            self.update(&key, obj, true).expect("object exists")
        } else {
            let deletion = obj["metadata"].get("deletionTimestamp").cloned();
            let created = self.create(gr, namespace, obj).expect("object is absent");
            match deletion {
                Some(ts) => {
                    let mut terminating = created;
                    meta(&mut terminating).insert("deletionTimestamp".into(), ts);
                    self.update(&key, terminating, true).expect("object exists")
                }
                None => created,
            }
        }
    }
}
