//! The HTTP face of the double: path parsing, verbs, content types, watch streams.

use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use super::RequestRecord;
use super::patch::{json_patch, merge_patch};
use super::selector::Selector;
use super::store::{ApiError, EventType, Gr, Key, Shared, Store, qualified, set_or_remove};
use super::token_request;

/// How often a watch with `allowWatchBookmarks=true` gets a BOOKMARK.
const BOOKMARK_INTERVAL: Duration = Duration::from_secs(2);

pub fn router(shared: Arc<Shared>) -> axum::Router {
    axum::Router::new().fallback(handle).with_state(shared)
}

/// A parsed resource path: `/api/v1/...` or `/apis/{group}/{version}/...`.
struct Route {
    gr: Gr,
    version: String,
    namespace: Option<String>,
    name: Option<String>,
    sub: Option<String>,
}

impl Route {
    fn parse(path: &str) -> Option<Route> {
        let segs: Vec<&str> = path.trim_matches('/').split('/').collect();
        let (group, version, rest) = match segs.as_slice() {
            ["api", v, rest @ ..] => ("", *v, rest),
            ["apis", g, v, rest @ ..] => (*g, *v, rest),
            _ => return None,
        };
        // `/namespaces/{ns}/{plural}...` unless it is the Namespace's own subresource.
        let (namespace, rest) = match rest {
            ["namespaces", _, "status" | "finalize"] => (None, rest),
            ["namespaces", ns, rest @ ..] if !rest.is_empty() => (Some(ns.to_string()), rest),
            _ => (None, rest),
        };
        let (plural, name, sub) = match rest {
            [p] => (*p, None, None),
            [p, n] => (*p, Some(n.to_string()), None),
            [p, n, s] => (*p, Some(n.to_string()), Some(s.to_string())),
            _ => return None,
        };
        let gr = (group.to_string(), plural.to_string());
        Some(Route {
            gr,
            version: version.to_string(),
            namespace,
            name,
            sub,
        })
    }

    fn api_version(&self) -> String {
        if self.gr.0.is_empty() {
            self.version.clone()
        } else {
            format!("{}/{}", self.gr.0, self.version)
        }
    }

    fn key(&self, name: &str) -> Key {
        (
            self.gr.clone(),
            self.namespace.clone().unwrap_or_default(),
            name.to_string(),
        )
    }
}

fn json_response(code: u16, body: &Value) -> Response {
    let code = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

fn error(e: ApiError) -> Response {
    json_response(e.code, &e.status())
}

fn unsupported(method: &Method, uri: &str, code: u16, reason: &'static str) -> Response {
    eprintln!("kube-double: unsupported request {method} {uri} -> {code}");
    error(ApiError::new(
        code,
        reason,
        format!("the kube double does not serve {method} {uri}"),
    ))
}

/// The `PartialObjectMetadata` form of an object: metadata only, never data/spec/status.
fn partial(obj: &Value) -> Value {
    json!({"apiVersion": "meta.k8s.io/v1", "kind": "PartialObjectMetadata", "metadata": obj["metadata"]})
}

fn name_mismatch(obj: &Value, route: &Route, name: Option<&str>) -> Result<(), ApiError> {
    let check =
        |field: &str, expected: Option<&str>| match (obj["metadata"][field].as_str(), expected) {
            (Some(got), Some(want)) if got != want => Err(ApiError::bad_request(format!(
                "the {field} of the object ({got}) does not match the {field} on the URL ({want})"
            ))),
            _ => Ok(()),
        };
    check("name", name)?;
    check("namespace", route.namespace.as_deref())
}

async fn handle(State(shared): State<Arc<Shared>>, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    let (method, uri) = (parts.method.clone(), parts.uri.to_string());
    let header_value = |h| {
        parts
            .headers
            .get(h)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let (content_type, accept) = (
        header_value(header::CONTENT_TYPE),
        header_value(header::ACCEPT),
    );
    let query: HashMap<String, String> =
        url::form_urlencoded::parse(parts.uri.query().unwrap_or("").as_bytes())
            .into_owned()
            .collect();
    let route = Route::parse(parts.uri.path());
    let watch = matches!(query.get("watch").map(String::as_str), Some("true" | "1"));
    let verb = match (&method, route.as_ref().and_then(|r| r.name.as_ref())) {
        (&Method::GET, Some(_)) => "get",
        (&Method::GET, None) if watch => "watch",
        (&Method::GET, None) => "list",
        (&Method::POST, _) => "create",
        (&Method::PUT, _) => "update",
        (&Method::PATCH, _) => "patch",
        (&Method::DELETE, Some(_)) => "delete",
        (&Method::DELETE, None) => "deletecollection",
        _ => "unknown",
    };
    let bearer_token = header_value(header::AUTHORIZATION).and_then(|a| {
        a.strip_prefix("Bearer ")
            .or_else(|| a.strip_prefix("bearer "))
            .map(str::to_string)
    });
    shared.with(|s| {
        s.requests.push(RequestRecord {
            method: method.to_string(),
            path: parts.uri.path().to_string(),
            query: parts.uri.query().unwrap_or("").to_string(),
            verb: verb.to_string(),
            group: route.as_ref().map(|r| r.gr.0.clone()).unwrap_or_default(),
            plural: route.as_ref().map(|r| r.gr.1.clone()).unwrap_or_default(),
            namespace: route.as_ref().and_then(|r| r.namespace.clone()),
            name: route.as_ref().and_then(|r| r.name.clone()),
            subresource: route.as_ref().and_then(|r| r.sub.clone()),
            content_type: content_type.clone(),
            accept: accept.clone(),
            field_manager: query.get("fieldManager").cloned(),
            bearer_token: bearer_token.clone(),
        })
    });
    let Some(route) = route else {
        return match (method.clone(), parts.uri.path()) {
            (Method::GET, "/version") => json_response(
                200,
                &json!({
                "major": "1", "minor": "33", "gitVersion": "v1.33.0-kube-double", "gitCommit": "",
                "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "",
                "compiler": "", "platform": "linux/amd64"}),
            ),
            (Method::GET, "/api") => {
                json_response(200, &json!({"kind": "APIVersions", "versions": ["v1"]}))
            }
            (Method::GET, "/apis") => json_response(
                200,
                &json!({"kind": "APIGroupList", "apiVersion": "v1", "groups": []}),
            ),
            (Method::GET, "/healthz" | "/livez" | "/readyz") => "ok".into_response(),
            (Method::GET, "/.well-known/openid-configuration") => {
                json_response(200, &shared.issuer.discovery())
            }
            (Method::GET, "/openid/v1/jwks") => {
                let mut response = json_response(200, &shared.issuer.jwks());
                let jwk_set = "application/jwk-set+json".parse().expect("valid header");
                response.headers_mut().insert(header::CONTENT_TYPE, jwk_set);
                response
            }
            _ => unsupported(&method, &uri, 404, "NotFound"),
        };
    };
    let metadata_only = accept
        .as_deref()
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"));
    let token_request =
        route.gr == token_request::service_accounts() && route.sub.as_deref() == Some("token");
    if route.sub.as_deref().is_some_and(|s| s != "status") && !token_request {
        return unsupported(&method, &uri, 404, "NotFound");
    }
    if verb == "watch" {
        return watch_response(shared, route, &query, metadata_only);
    }
    let body = match axum::body::to_bytes(body, usize::MAX).await {
        Ok(b) => b,
        Err(e) => return error(ApiError::bad_request(format!("reading the body: {e}"))),
    };
    let result = match verb {
        "create" if token_request => parse_json(&body).and_then(|req| {
            let namespace = route.namespace.as_deref().unwrap_or_default();
            let name = route.name.as_deref().unwrap_or_default();
            let bearer_token = bearer_token.as_deref();
            shared.with(|s| {
                token_request::create(s, &shared.issuer, namespace, name, bearer_token, req)
            })
        }),
        _ if token_request => return unsupported(&method, &uri, 405, "MethodNotAllowed"),
        "list" => shared.with(|s| list(s, &route, &query, metadata_only)),
        "get" => shared.with(|s| {
            let key = route.key(route.name.as_deref().unwrap_or_default());
            s.objects
                .get(&key)
                .cloned()
                .ok_or_else(|| ApiError::not_found(&route.gr, &key.2))
                .map(|o| (200, o))
        }),
        "create" if route.name.is_none() => {
            parse_json(&body).and_then(|obj| shared.with(|s| create(s, &route, obj)))
        }
        "update" => parse_json(&body).and_then(|obj| shared.with(|s| update(s, &route, obj))),
        "patch" => shared.with(|s| patch(s, &route, content_type.as_deref(), &query, &body)),
        "delete" => parse_json(&body).and_then(|opts| shared.with(|s| delete(s, &route, &opts))),
        _ => return unsupported(&method, &uri, 405, "MethodNotAllowed"),
    };
    match result {
        Ok((code, obj)) if metadata_only && verb != "list" => json_response(code, &partial(&obj)),
        Ok((code, obj)) => json_response(code, &obj),
        Err(e) => error(e),
    }
}

fn parse_json(body: &Bytes) -> Result<Value, ApiError> {
    if body.is_empty() {
        return Ok(json!({}));
    }
    serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))
}

type Outcome = Result<(u16, Value), ApiError>;

fn selector(query: &HashMap<String, String>, route: &Route) -> Result<Selector, ApiError> {
    let get = |k: &str| query.get(k).map(String::as_str);
    let (group, plural) = &route.gr;
    Selector::parse(
        get("labelSelector"),
        get("fieldSelector"),
        (group.as_str(), plural.as_str()),
    )
    .map_err(ApiError::bad_request)
}

fn list(
    s: &mut Store,
    route: &Route,
    query: &HashMap<String, String>,
    metadata_only: bool,
) -> Outcome {
    let sel = selector(query, route)?;
    // Pagination: `limit` caps a page; `continue` (from the previous page) is
    // `{resourceVersion of the first page}/{namespace}/{name of the last item}`. Later pages
    // come from the live store, not a snapshot, and report the first page's
    // resourceVersion, so a watch started from it replays every change made meanwhile.
    let limit = query
        .get("limit")
        .and_then(|l| l.parse::<usize>().ok())
        .filter(|&l| l > 0);
    let (list_rv, after) = match query.get("continue").filter(|c| !c.is_empty()) {
        Some(token) => {
            let mut parts = token.splitn(3, '/');
            let (rv, ns, name) = (parts.next(), parts.next(), parts.next());
            match (rv.and_then(|rv| rv.parse::<u64>().ok()), ns, name) {
                (Some(rv), Some(ns), Some(name)) => (rv, Some((ns.to_string(), name.to_string()))),
                _ => {
                    return Err(ApiError::bad_request(format!(
                        "invalid continue token {token:?}"
                    )));
                }
            }
        }
        None => (s.rv, None),
    };
    let mut matching = s.objects.iter().filter(|((gr, ns, name), obj)| {
        *gr == route.gr
            && route.namespace.as_ref().is_none_or(|n| n == ns)
            && after
                .as_ref()
                .is_none_or(|(after_ns, after_name)| (ns, name) > (after_ns, after_name))
            && sel.matches(obj)
    });
    let mut items: Vec<Value> = Vec::new();
    let mut last = None;
    for ((_, ns, name), obj) in matching.by_ref().take(limit.unwrap_or(usize::MAX)) {
        items.push(if metadata_only {
            partial(obj)
        } else {
            obj.clone()
        });
        last = Some((ns, name));
    }
    let more = matching.next().is_some();
    let (api_version, kind) = if metadata_only {
        (
            "meta.k8s.io/v1".to_string(),
            "PartialObjectMetadataList".to_string(),
        )
    } else {
        let kind = s
            .info(&route.gr)
            .map_or("List".to_string(), |i| format!("{}List", i.kind));
        (route.api_version(), kind)
    };
    let mut metadata = json!({"resourceVersion": list_rv.to_string()});
    if let (true, Some((ns, name))) = (more, last) {
        metadata["continue"] = json!(format!("{list_rv}/{ns}/{name}"));
    }
    Ok((
        200,
        json!({"apiVersion": api_version, "kind": kind, "metadata": metadata, "items": items}),
    ))
}

/// Sets apiVersion (from the URL) and kind (from the table when the body has none).
fn typed(s: &mut Store, route: &Route, mut obj: Value) -> Result<Value, ApiError> {
    if !obj.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    obj["apiVersion"] = json!(route.api_version());
    if obj.get("kind").is_none_or(Value::is_null)
        && let Some(info) = s.info(&route.gr)
    {
        obj["kind"] = json!(info.kind);
    }
    s.learn_kind(&route.gr, &obj);
    Ok(obj)
}

fn create(s: &mut Store, route: &Route, obj: Value) -> Outcome {
    let mut obj = typed(s, route, obj)?;
    name_mismatch(&obj, route, None)?;
    if let Some(m) = obj["metadata"].as_object_mut() {
        for field in [
            "uid",
            "resourceVersion",
            "creationTimestamp",
            "deletionTimestamp",
            "generation",
        ] {
            m.remove(field);
        }
    }
    if s.status_subresource(&route.gr) {
        set_or_remove(&mut obj, "status", None); // create cannot set status
    }
    let namespace = route.namespace.clone().unwrap_or_default();
    Ok((201, s.create(&route.gr, &namespace, obj)?))
}

/// Commits `candidate` as the new state of the stored `old`: resourceVersion precondition,
/// status-subresource rules, then [`Store::update`].
fn commit(s: &mut Store, route: &Route, old: &Value, candidate: Value) -> Outcome {
    let name = route.name.as_deref().unwrap_or_default();
    name_mismatch(&candidate, route, Some(name))?;
    let wanted = candidate["metadata"]["resourceVersion"]
        .as_str()
        .filter(|rv| !rv.is_empty());
    if wanted.is_some_and(|rv| Some(rv) != old["metadata"]["resourceVersion"].as_str()) {
        let message = format!(
            "Operation cannot be fulfilled on {} \"{name}\": the object has been modified; \
             please apply your changes to the latest version and try again",
            qualified(&route.gr)
        );
        return Err(ApiError::new(409, "Conflict", message));
    }
    let new = if route.sub.is_some() {
        let mut new = old.clone();
        set_or_remove(&mut new, "status", candidate.get("status").cloned());
        new
    } else if s.status_subresource(&route.gr) {
        let mut new = typed(s, route, candidate)?;
        set_or_remove(&mut new, "status", old.get("status").cloned());
        new
    } else {
        typed(s, route, candidate)?
    };
    Ok((200, s.update(&route.key(name), new, false)?))
}

fn stored(s: &Store, route: &Route) -> Result<Value, ApiError> {
    let name = route.name.as_deref().unwrap_or_default();
    s.objects
        .get(&route.key(name))
        .cloned()
        .ok_or_else(|| ApiError::not_found(&route.gr, name))
}

fn update(s: &mut Store, route: &Route, obj: Value) -> Outcome {
    let old = stored(s, route)?;
    commit(s, route, &old, obj)
}

fn patch(
    s: &mut Store,
    route: &Route,
    content_type: Option<&str>,
    q: &HashMap<String, String>,
    body: &Bytes,
) -> Outcome {
    let content_type = content_type
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim();
    let old = stored(s, route);
    match content_type {
        "application/apply-patch+yaml" => {
            if q.get("fieldManager").is_none_or(String::is_empty) {
                let message = "PatchOptions.meta.k8s.io \"\" is invalid: fieldManager: Required value: \
                               is required for apply patch";
                return Err(ApiError::new(422, "Invalid", message));
            }
            let applied: Value = serde_json::from_slice(body)
                .or_else(|_| serde_yaml::from_slice(body))
                .map_err(|e| ApiError::bad_request(format!("invalid apply patch: {e}")))?;
            match old {
                Ok(old) => {
                    let mut candidate = old.clone();
                    merge_patch(&mut candidate, &applied);
                    commit(s, route, &old, candidate)
                }
                Err(e) if route.sub.is_some() => Err(e),
                Err(_) => {
                    if !applied.is_object() {
                        return Err(ApiError::bad_request("an apply patch must be an object"));
                    }
                    name_mismatch(&applied, route, route.name.as_deref())?;
                    let mut obj = applied;
                    obj["metadata"]["name"] = json!(route.name);
                    create(s, route, obj)
                }
            }
        }
        "application/merge-patch+json" | "application/strategic-merge-patch+json" => {
            let old = old?;
            let mut candidate = old.clone();
            merge_patch(&mut candidate, &parse_json(body)?);
            commit(s, route, &old, candidate)
        }
        "application/json-patch+json" => {
            let old = old?;
            let mut candidate = old.clone();
            json_patch(&mut candidate, &parse_json(body)?)
                .map_err(|e| ApiError::new(422, "Invalid", e))?;
            commit(s, route, &old, candidate)
        }
        other => Err(ApiError::new(
            415,
            "UnsupportedMediaType",
            format!(
                "the body of the request was in an unknown format - accepted media types include: application/json-patch+json, application/merge-patch+json, application/apply-patch+yaml (got {other:?})"
            ),
        )),
    }
}

/// DELETE honours `preconditions` (uid, resourceVersion); `propagationPolicy` and grace
/// periods are ignored.
fn delete(s: &mut Store, route: &Route, opts: &Value) -> Outcome {
    let old = stored(s, route)?;
    for field in ["uid", "resourceVersion"] {
        if let Some(want) = opts["preconditions"][field].as_str()
            && old["metadata"][field].as_str() != Some(want)
        {
            let message = format!(
                "Precondition failed: {field}: {want}, stored: {}",
                old["metadata"][field]
            );
            return Err(ApiError::new(409, "Conflict", message));
        }
    }
    let name = route.name.as_deref().unwrap_or_default();
    Ok((200, s.delete(&route.key(name))?))
}

/// Answers a watch with a chunked stream of newline-delimited watch events, fed by a task.
fn watch_response(
    shared: Arc<Shared>,
    route: Route,
    query: &HashMap<String, String>,
    metadata_only: bool,
) -> Response {
    let sel = match selector(query, &route) {
        Ok(sel) => sel,
        Err(e) => return error(e),
    };
    let from = query
        .get("resourceVersion")
        .filter(|rv| !["", "0"].contains(&rv.as_str()));
    let Ok(from) = from.map(|rv| rv.parse::<u64>()).transpose() else {
        return error(ApiError::bad_request("invalid resourceVersion"));
    };
    let opts = WatchOptions {
        from,
        sel,
        metadata_only,
        initial_events: query.get("sendInitialEvents").is_some_and(|v| v == "true"),
        bookmarks: query
            .get("allowWatchBookmarks")
            .is_some_and(|v| v == "true" || v == "1"),
        timeout: query
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .map(Duration::from_secs),
    };
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(64);
    tokio::spawn(run_watch(shared, route, opts, tx));
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        rx.recv()
            .await
            .map(|chunk| (Ok::<_, Infallible>(chunk), rx))
    });
    let mut response = Response::new(Body::from_stream(stream));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        "application/json".parse().expect("valid header"),
    );
    response
}

struct WatchOptions {
    from: Option<u64>,
    sel: Selector,
    metadata_only: bool,
    initial_events: bool,
    bookmarks: bool,
    timeout: Option<Duration>,
}

/// One watch event line, `type` before `object` as the API server writes it: `json!` would
/// sort `object` first, which makes a client buffer the whole object before it knows the
/// event's type, work no real API server causes.
fn line(kind: &str, object: Value) -> Bytes {
    Bytes::from(format!(
        "{{\"type\":{},\"object\":{object}}}\n",
        Value::from(kind)
    ))
}

async fn run_watch(
    shared: Arc<Shared>,
    route: Route,
    opts: WatchOptions,
    tx: tokio::sync::mpsc::Sender<Bytes>,
) {
    let shown = |obj: &Value| {
        if opts.metadata_only {
            partial(obj)
        } else {
            obj.clone()
        }
    };
    let (bookmark_version, bookmark_kind) = if opts.metadata_only {
        (
            "meta.k8s.io/v1".to_string(),
            "PartialObjectMetadata".to_string(),
        )
    } else {
        let kind = shared
            .with(|s| s.info(&route.gr).map(|i| i.kind.clone()))
            .unwrap_or_default();
        (route.api_version(), kind)
    };
    let bookmark = |rv: u64, annotations: Value| {
        let metadata = json!({"resourceVersion": rv.to_string(), "annotations": annotations});
        line(
            "BOOKMARK",
            json!({"apiVersion": bookmark_version, "kind": bookmark_kind, "metadata": metadata}),
        )
    };
    let in_scope =
        |gr: &Gr, ns: &str| *gr == route.gr && route.namespace.as_deref().is_none_or(|n| n == ns);
    let mut rv_rx = shared.rv_tx.subscribe();
    let mut shutdown = shared.shutdown.subscribe();
    let deadline = async {
        match opts.timeout {
            Some(t) => tokio::time::sleep(t).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(deadline);
    let mut ticks = tokio::time::interval_at(
        tokio::time::Instant::now() + BOOKMARK_INTERVAL,
        BOOKMARK_INTERVAL,
    );

    // Start: replay after a resourceVersion, or synthetic ADDED events for the current state.
    let (mut cursor, mut lines) = match opts.from {
        Some(rv) if !opts.initial_events => (rv, Vec::new()),
        _ => shared.with(|s| {
            let mut lines: Vec<Bytes> = (s.objects.iter())
                .filter(|((gr, ns, _), obj)| in_scope(gr, ns) && opts.sel.matches(obj))
                .map(|(_, obj)| line("ADDED", shown(obj)))
                .collect();
            if opts.initial_events && opts.bookmarks {
                lines.push(bookmark(s.rv, json!({"k8s.io/initial-events-end": "true"})));
            }
            (s.rv, lines)
        }),
    };
    loop {
        rv_rx.borrow_and_update();
        let next = shared.with(|s| {
            if cursor < s.compacted_rv {
                let message = format!("too old resource version: {cursor} ({})", s.compacted_rv);
                lines.push(line(
                    "ERROR",
                    ApiError::new(410, "Expired", message).status(),
                ));
                return None;
            }
            for e in (s.events_after(cursor)).filter(|e| in_scope(&e.gr, &e.namespace)) {
                let now = opts.sel.matches(&e.obj);
                let before = e.prev.as_ref().is_some_and(|p| opts.sel.matches(p));
                match (e.kind, before, now) {
                    (EventType::Modified, false, true) => lines.push(line("ADDED", shown(&e.obj))),
                    (EventType::Modified, true, false) => {
                        // Stopped matching: DELETED with the previous state at the new version.
                        let mut prev = e.prev.clone().unwrap_or_default();
                        prev["metadata"]["resourceVersion"] = json!(e.rv.to_string());
                        lines.push(line("DELETED", shown(&prev)));
                    }
                    (EventType::Modified, false, false) => {}
                    (kind, _, true) => lines.push(line(kind.as_str(), shown(&e.obj))),
                    _ => {}
                }
            }
            Some(s.rv)
        });
        for chunk in lines.drain(..) {
            if tx.send(chunk).await.is_err() {
                return;
            }
        }
        let Some(next) = next else { return };
        cursor = next;
        tokio::select! {
            changed = rv_rx.changed() => if changed.is_err() { return },
            _ = ticks.tick(), if opts.bookmarks => lines.push(bookmark(cursor, json!({}))),
            _ = &mut deadline => return,
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = tx.closed() => return,
        }
    }
}
