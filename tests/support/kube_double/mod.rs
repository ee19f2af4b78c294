//! A **test double of the Kubernetes API server**, in process, over plain HTTP on 127.0.0.1.
//! It is not a Kubernetes API server: it exists so that the real kube-rs client, `watcher`s
//! and `Controller` can run in CI, where there is no cluster. Real-cluster runs use
//! `tests/e2e` with `E2E_KUBECONFIG`.
//!
//! What it implements, for any resource path (`/api/v1/[namespaces/{ns}/]{plural}[/{name}[/status]]`
//! and `/apis/{group}/{version}/...`, all-namespaces lists and watches included):
//! - one store, one global resourceVersion (an integer, bumped on every persisted write);
//!   `uid`, `creationTimestamp` and `generation: 1` on create; `generation` + 1 when anything
//!   outside `metadata` and `status` changes, and when `deletionTimestamp` is set;
//!   writes that change nothing are not persisted (no new resourceVersion, no event);
//! - get (404 `Status` when absent), list (`labelSelector` with `=`, `==`, `!=`, `in`, `notin`,
//!   `k`, `!k`; `fieldSelector` on `metadata.name`, `metadata.namespace` and `type`; pages of
//!   `limit` items with a `continue` token, later pages read from the live store (not a
//!   snapshot) and report the first page's resourceVersion),
//!   create (409 AlreadyExists; `generateName`), update (409 Conflict on a stale
//!   `metadata.resourceVersion`), delete (with `preconditions`);
//! - patch: `application/apply-patch+yaml` (server-side apply, JSON or YAML body, requires
//!   `fieldManager` (422 without), creates when absent), `application/merge-patch+json` (RFC 7386),
//!   `application/strategic-merge-patch+json` (treated as a merge patch),
//!   `application/json-patch+json` (RFC 6902; a failed `test` is a 422); a
//!   `metadata.resourceVersion` in any body is a precondition (409 when stale);
//! - the status subresource for kinds that have one (`store::KINDS`, [`KubeApiDouble::register`]):
//!   writes to `/status` change only `.status`; writes to the main resource keep the stored
//!   `.status`; create drops `.status`;
//! - watch: chunked newline-delimited events, replay from a resourceVersion out of the event
//!   history (410 `ERROR` event when older than the kept history, see
//!   [`KubeApiDouble::compact_history`]), synthetic ADDED events when the resourceVersion is
//!   unset or `0` or `sendInitialEvents=true` (then a BOOKMARK annotated
//!   `k8s.io/initial-events-end`), selectors (an object that stops matching is sent as
//!   DELETED, one that starts matching as ADDED), `timeoutSeconds`, BOOKMARKs every 2 s;
//! - metadata-only requests (`Accept: application/json;as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1`)
//!   answered with `PartialObjectMetadata[List]`: metadata only, never data, spec or status;
//! - finalizers: delete sets `deletionTimestamp` while finalizers remain; the object goes
//!   when a later write empties them;
//! - cascade: when an object is removed, objects naming its uid in `ownerReferences` are
//!   deleted (recursively), and deleting a Namespace deletes what is in it. The real garbage
//!   collector and namespace controller do this asynchronously; here it happens in the same
//!   write. `propagationPolicy` is ignored;
//! - any plural is served; the kind of one outside `store::KINDS` is learnt from the first
//!   object written (lists need it);
//! - `/version`, `/api`, `/apis` (no groups, no resource lists), `/healthz`; a log of every request;
//! - the TokenRequest subresource (`token_request.rs`): `POST
//!   /api/v1/namespaces/{ns}/serviceaccounts/{name}/token` with an `authentication.k8s.io/v1`
//!   TokenRequest answers 201 with it echoed (name, namespace, creationTimestamp set) plus
//!   `status: {token, expirationTimestamp}`. 404 when the ServiceAccount is not in the store;
//!   422 when `spec.expirationSeconds` is under 600 (or over 2^32) or the body's name or
//!   namespace differs from the URL's; `expirationSeconds` defaults to 3600 and empty
//!   `audiences` to the issuer. The token is a JWT signed ES256 with a P-256 key made when the
//!   double starts (header `alg`, `kid`), claims as the API server's: `iss`
//!   ([`KubeApiDouble::SERVICE_ACCOUNT_ISSUER`]), `sub` `system:serviceaccount:{ns}:{name}`,
//!   `aud` (an array), `exp`, `iat`, `nbf`, `jti` (a random UUID),
//!   `kubernetes.io: {namespace, serviceaccount: {name, uid}}`. Every token is kept
//!   ([`KubeApiDouble::minted_tokens`]);
//! - the issuer's discovery, as the API server serves it: `/.well-known/openid-configuration`
//!   (`jwks_uri` is the double's `/openid/v1/jwks`, [`KubeApiDouble::service_account_jwks_uri`])
//!   and `/openid/v1/jwks` (the one EC key, `application/jwk-set+json`);
//! - authorization **for the TokenRequest subresource only**: a request whose bearer token was
//!   given a user name with [`KubeApiDouble::authenticate`] is allowed only when the RBAC
//!   objects in the store grant it, evaluated at request time (a binding created or deleted
//!   takes effect at once), before anything else (403 even for a missing ServiceAccount):
//!   a RoleBinding in the namespace (to a Role there or a ClusterRole) or a
//!   ClusterRoleBinding (to a ClusterRole) with a `User` subject of that name or a
//!   `ServiceAccount` subject matching `system:serviceaccount:{ns}:{name}` (its namespace
//!   defaulting to the binding's), and a rule with apiGroups `""`/`*`, resources
//!   `serviceaccounts/token`/`*/token`/`*`, verbs `create`/`*`, and no resourceNames or the
//!   ServiceAccount's name. Otherwise 403 Forbidden with the real server's message. Requests
//!   with no bearer token or an unknown one are not checked (the tests' clients act as
//!   cluster admin). Roles and bindings are ordinary objects (`ResourceKey::roles()` etc.).
//!
//! What it does NOT implement: authentication and authorization (beyond the TokenRequest
//! check above: no Group subjects, no aggregated ClusterRoles, no other resource or verb is
//! ever refused), admission (webhooks, validating admission policies), OpenAPI/CEL
//! validation, defaulting and per-kind logic
//! (a Secret's `stringData` is not folded into `data`, no `type: Opaque` default), schema pruning,
//! version conversion (objects are stored as written, `apiVersion` is taken from the URL);
//! real server-side apply (no field ownership or managedFields, no conflicts, no removal of
//! fields a manager stops applying, lists are replaced, not merged by key); strategic merge
//! patch semantics; consistent pagination (pages are not a snapshot; an expired `continue`
//! token is not refused);
//! resourceVersion semantics on get/list (always the latest); the rule that updates without a
//! resourceVersion are refused for custom resources; namespace existence and Terminating
//! namespaces; dryRun; deletecollection; grace periods; other subresources; discovery
//! resource lists; protobuf; HTTP/2; TLS. For TokenRequest: `boundObjectRef` (ignored: no
//! pod/secret/node claims, no binding), `--service-account-max-token-expiration`, key
//! rotation, the TokenReview API, and accepting the tokens it issues as credentials.
//! Unsupported requests get 404/405 and a line on stderr.

mod http;
mod patch;
mod selector;
mod store;
mod token_request;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::{Value, json};
use tokio::task::JoinHandle;

use store::{Gr, KindInfo, RBAC, Shared};

/// A resource type: group (empty for core), version, plural, scope and kind.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ResourceKey {
    pub group: String,
    pub version: String,
    pub plural: String,
    pub namespaced: bool,
    pub kind: String,
}

impl ResourceKey {
    pub fn custom(group: &str, version: &str, plural: &str, kind: &str, namespaced: bool) -> Self {
        let s = str::to_string;
        ResourceKey {
            group: s(group),
            version: s(version),
            plural: s(plural),
            namespaced,
            kind: s(kind),
        }
    }
    /// The key of a typed resource, e.g. one of the operator's CRDs.
    pub fn of<K: kube::Resource<DynamicType = ()>>(namespaced: bool) -> Self {
        Self::custom(
            &K::group(&()),
            &K::version(&()),
            &K::plural(&()),
            &K::kind(&()),
            namespaced,
        )
    }
    pub fn secrets() -> Self {
        Self::custom("", "v1", "secrets", "Secret", true)
    }
    pub fn serviceaccounts() -> Self {
        Self::custom("", "v1", "serviceaccounts", "ServiceAccount", true)
    }
    pub fn configmaps() -> Self {
        Self::custom("", "v1", "configmaps", "ConfigMap", true)
    }
    pub fn namespaces() -> Self {
        Self::custom("", "v1", "namespaces", "Namespace", false)
    }
    pub fn events() -> Self {
        Self::custom("events.k8s.io", "v1", "events", "Event", true)
    }
    pub fn leases() -> Self {
        Self::custom("coordination.k8s.io", "v1", "leases", "Lease", true)
    }
    pub fn roles() -> Self {
        Self::custom(RBAC, "v1", "roles", "Role", true)
    }
    pub fn rolebindings() -> Self {
        Self::custom(RBAC, "v1", "rolebindings", "RoleBinding", true)
    }
    pub fn clusterroles() -> Self {
        Self::custom(RBAC, "v1", "clusterroles", "ClusterRole", false)
    }
    pub fn clusterrolebindings() -> Self {
        Self::custom(
            RBAC,
            "v1",
            "clusterrolebindings",
            "ClusterRoleBinding",
            false,
        )
    }
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }
    fn gr(&self) -> Gr {
        (self.group.clone(), self.plural.clone())
    }
    fn namespace<'a>(&self, namespace: Option<&'a str>) -> &'a str {
        if self.namespaced {
            namespace.expect("a namespaced resource needs a namespace")
        } else {
            ""
        }
    }
}

/// One HTTP request the double received.
#[derive(Clone, Debug)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    /// The raw query string (without `?`).
    pub query: String,
    /// `get`, `list`, `watch`, `create`, `update`, `patch`, `delete`, `deletecollection`, `unknown`.
    pub verb: String,
    /// API group, empty for core and non-resource paths.
    pub group: String,
    /// Resource plural, empty for non-resource paths such as `/version`.
    pub plural: String,
    pub namespace: Option<String>,
    pub name: Option<String>,
    pub subresource: Option<String>,
    pub content_type: Option<String>,
    pub accept: Option<String>,
    pub field_manager: Option<String>,
    /// The bearer token of the `Authorization` header, if any: tells apart the clients of
    /// one double (see [`KubeApiDouble::kubeconfig_yaml_with_token`]). Tests compare it,
    /// never print it.
    pub bearer_token: Option<String>,
}

/// The running double. Dropping it stops the server and ends open watch streams.
pub struct KubeApiDouble {
    addr: SocketAddr,
    shared: Arc<Shared>,
    server: Option<JoinHandle<()>>,
}

impl KubeApiDouble {
    /// The `iss` of the ServiceAccount tokens the double issues (the API server's default,
    /// `--service-account-issuer`), and their audience when a TokenRequest names none.
    pub const SERVICE_ACCOUNT_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

    /// Starts serving on a free loopback port (needs a tokio runtime).
    pub async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("local address");
        let shared = Arc::new(Shared::new(&format!("http://{addr}")));
        let app = http::router(shared.clone());
        let mut stop = shared.shutdown.subscribe();
        let server = tokio::spawn(async move {
            let signal = async move {
                let _ = stop.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(signal)
                .await
            {
                eprintln!("kube-double: server error: {e}");
            }
        });
        KubeApiDouble {
            addr,
            shared,
            server: Some(server),
        }
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A kube client for the double, default namespace `default`.
    pub fn client(&self) -> kube::Client {
        kube::Client::try_from(self.config()).expect("kube client")
    }

    /// The client configuration [`Self::client`] uses (namespace `default`, no credentials).
    pub fn config(&self) -> kube::Config {
        let mut config = kube::Config::new(self.url().parse().expect("valid url"));
        config.default_namespace = "default".to_string();
        config
    }

    /// A kubeconfig (context `kube-double`, namespace `default`, no credentials) for a child process.
    pub fn kubeconfig_yaml(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-double\n  cluster:\n    server: {}\n\
             users:\n- name: kube-double\n  user: {{}}\ncontexts:\n- name: kube-double\n  context:\n    \
             cluster: kube-double\n    user: kube-double\n    namespace: default\ncurrent-context: kube-double\n",
            self.url()
        )
    }

    /// Like [`KubeApiDouble::kubeconfig_yaml`], with a bearer `token` that the double records
    /// ([`RequestRecord::bearer_token`]): a test gives its process under test its own token
    /// to single out that process's requests. The double checks it only for TokenRequests,
    /// and only once [`KubeApiDouble::authenticate`] named its user.
    pub fn kubeconfig_yaml_with_token(&self, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: kube-double\n  cluster:\n    server: {}\n\
             users:\n- name: kube-double\n  user:\n    token: {}\ncontexts:\n- name: kube-double\n  context:\n    \
             cluster: kube-double\n    user: kube-double\n    namespace: default\ncurrent-context: kube-double\n",
            self.url(),
            serde_json::to_string(token).expect("a string serializes")
        )
    }

    /// Serves `r` with a status subresource (or not), for kinds outside the built-in table.
    pub fn register(&self, r: &ResourceKey, status_subresource: bool) {
        let info = KindInfo {
            kind: r.kind.clone(),
            status_subresource,
        };
        self.shared.with(|s| s.kinds.insert(r.gr(), info));
    }

    /// The stored object (full, with data/spec/status), bypassing HTTP.
    pub fn get(&self, r: &ResourceKey, namespace: Option<&str>, name: &str) -> Option<Value> {
        let key = (r.gr(), r.namespace(namespace).to_string(), name.to_string());
        self.shared.with(|s| s.objects.get(&key).cloned())
    }

    /// Creates or replaces `obj` (namespace from its metadata), bypassing HTTP and its rules:
    /// no preconditions, `.status` and `deletionTimestamp` are taken as given. Still assigns
    /// system metadata and a resourceVersion and emits the watch event. Returns the stored object.
    pub fn put(&self, r: &ResourceKey, mut obj: Value) -> Value {
        obj["apiVersion"] = json!(r.api_version());
        obj["kind"] = json!(r.kind);
        let namespace = r
            .namespace(obj["metadata"]["namespace"].as_str())
            .to_string();
        self.shared.with(|s| s.put(&r.gr(), &namespace, obj))
    }

    /// Deletes like an HTTP DELETE (finalizers, cascade); absent objects are ignored.
    pub fn delete(&self, r: &ResourceKey, namespace: Option<&str>, name: &str) {
        let key = (r.gr(), r.namespace(namespace).to_string(), name.to_string());
        let _ = self.shared.with(|s| s.delete(&key));
    }

    /// Stored objects of `r`: in `namespace`, or in all namespaces when `None`.
    pub fn list(&self, r: &ResourceKey, namespace: Option<&str>) -> Vec<Value> {
        let gr = r.gr();
        self.shared.with(|s| {
            (s.objects.iter())
                .filter(|((g, ns, _), _)| *g == gr && namespace.is_none_or(|n| n == ns))
                .map(|(_, obj)| obj.clone())
                .collect()
        })
    }

    /// How many stored objects of `r` (in `namespace`, or in all namespaces when `None`)
    /// satisfy `matches`: a cheap in-process poll (no copies, no HTTP).
    pub fn count(
        &self,
        r: &ResourceKey,
        namespace: Option<&str>,
        matches: impl Fn(&Value) -> bool,
    ) -> usize {
        let gr = r.gr();
        self.shared.with(|s| {
            (s.objects.iter())
                .filter(|((g, ns, _), obj)| {
                    *g == gr && namespace.is_none_or(|n| n == ns) && matches(obj)
                })
                .count()
        })
    }

    /// The current (latest) resourceVersion.
    pub fn resource_version(&self) -> u64 {
        self.shared.with(|s| s.rv)
    }

    /// Forgets the watch event history: watches from older resourceVersions get 410 Gone.
    pub fn compact_history(&self) {
        self.shared.with(|s| s.compact());
    }

    /// Every HTTP request received so far, in order.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.with(|s| s.requests.clone())
    }

    /// How many HTTP requests were received so far (a mark for [`KubeApiDouble::requests_since`]).
    pub fn request_count(&self) -> usize {
        self.shared.with(|s| s.requests.len())
    }

    /// The HTTP requests received after the first `mark` ones, in order.
    pub fn requests_since(&self, mark: usize) -> Vec<RequestRecord> {
        self.shared.with(|s| {
            s.requests
                .get(mark..)
                .map(<[_]>::to_vec)
                .unwrap_or_default()
        })
    }

    /// Makes requests bearing `bearer_token` those of `username` (e.g.
    /// `system:serviceaccount:{ns}:{name}`) for the one check the double makes: a TokenRequest
    /// from them needs an RBAC grant in the store. Requests with no bearer token or one never
    /// given here are not checked (the tests' own clients act as cluster admin).
    pub fn authenticate(&self, bearer_token: &str, username: &str) {
        let (token, user) = (bearer_token.to_string(), username.to_string());
        self.shared.with(|s| s.identities.insert(token, user));
    }

    /// Where the double serves the ServiceAccount issuer's JWKS (`{url}/openid/v1/jwks`, also
    /// the `jwks_uri` of `/.well-known/openid-configuration`). The issuer URL itself
    /// ([`KubeApiDouble::SERVICE_ACCOUNT_ISSUER`]) does not resolve: a verifier is given this.
    pub fn service_account_jwks_uri(&self) -> String {
        self.shared.issuer.jwks_uri().to_string()
    }

    /// Every ServiceAccount token the TokenRequest subresource issued so far, in order: leak
    /// tests search logs, Secrets and requests for them.
    pub fn minted_tokens(&self) -> Vec<String> {
        self.shared.with(|s| s.minted.clone())
    }

    /// How many ServiceAccount tokens were issued so far.
    pub fn minted_count(&self) -> usize {
        self.shared.with(|s| s.minted.len())
    }

    pub fn clear_requests(&self) {
        self.shared.with(|s| s.requests.clear());
    }

    /// Ends open watch streams, stops accepting, waits (up to 5 s) for the server to finish.
    pub async fn shutdown(mut self) {
        self.shared.shutdown.send_replace(true);
        if let Some(mut server) = self.server.take()
            && tokio::time::timeout(Duration::from_secs(5), &mut server)
                .await
                .is_err()
        {
            server.abort();
        }
    }
}

impl Drop for KubeApiDouble {
    fn drop(&mut self) {
        self.shared.shutdown.send_replace(true);
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }
}
