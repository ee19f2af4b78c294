//! Scale benchmark: the real operator binary with N AudienceTokens (default 10,000) in one
//! namespace, against the in-process Kubernetes API double (`tests/support/kube_double`)
//! and the real oidc-provider test server (`tests/oidc-server`). It prints figures; it
//! asserts nothing about speed.
//!
//! ```sh
//! npm ci --prefix tests/oidc-server
//! cargo bench --bench scale                      # N = 10,000
//! BENCH_TOKENS=1000 cargo bench --bench scale    # another N
//! BENCH_KUBECONFIG=~/.kube/config cargo bench --bench scale   # on a real cluster
//! BENCH_WARMUP=10000 cargo bench --bench scale  # more token POSTs to warm Node first (default 500)
//! ```
//!
//! What it measures, with one TokenIssuer (client `m2m-basic`, HTTP Basic), resource
//! `https://orders.example.test` (3600 s tokens) and default operator settings
//! (`--concurrency 16`, log filter `info,kube=warn`):
//!
//! 1. cold issuance: N AudienceTokens put straight into the double's store, timed from the
//!    first one until all N have `Ready=True`; token requests the OAuth server received;
//! 2. the operator's Kubernetes API calls during issuance (singled out by its kubeconfig's
//!    bearer token): writes per token (Secret, status, Events), reads, lists and watches;
//! 3. the operator process's VmRSS and VmHWM once all are Ready, after 30 s idle, after a
//!    restart, and after that restarted operator renewed every token (only the operator
//!    process: the double and the Node server are the harness and are not counted);
//! 4. the spread of `status.renewalTime` after the cold issuance (10 s buckets: peak / mean);
//! 5. restart (SIGTERM, start again): time to `/readyz` 200 and to all N
//!    `audience_token_ready` series at 1, token requests and writes made meanwhile;
//! 6. a renewal of every token by the restarted operator, forced with a new
//!    `audiencetoken.io/renew-requested-at` (the path of a renewal that falls due, with the
//!    Secret cached): time, token requests, writes and reads per renewal;
//! 7. the floor: the OAuth server alone, a minimal keep-alive client doing the same token
//!    POST + Secret apply + status patch at the same concurrency against the same servers,
//!    and one making the operator's calls (token POST, Secret create, status patch, and the
//!    Event create unless `BENCH_ISSUANCE_EVENTS=false`, which also runs the operator with
//!    `--issuance-events=false`).
//!
//! CPU time of the operator, the Node server and this process (the double and the
//! clients) is shown beside the rates, to tell which one limits them.
//!
//! `cargo test` runs bench targets without `--bench`: then this is a smoke run with 20
//! tokens that asserts the pipeline works (all Ready, N token requests, one per forced
//! renewal, none on restart).

#[path = "scale/real_cluster.rs"]
mod real_cluster;
#[path = "../tests/support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use audience_token_operator::api::{
    AudienceToken, AudienceTokenSpec, IssuerRef, RENEW_REQUESTED_AT_ANNOTATION,
};
use audience_token_operator::secret::{
    EXPIRES_AT_ANNOTATION, ISSUED_AT_ANNOTATION, MANAGED_BY_LABEL, NAME_LABEL, SPEC_HASH_ANNOTATION,
};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use support::kube_double::{KubeApiDouble, RequestRecord, ResourceKey};
use support::oidc::{self, OidcServer};
use support::operator::{OperatorProcess, Options};
use support::scenarios::TestEnv;

/// The operator's kubeconfig bearer token: singles out its requests in the double's log.
const OPERATOR_TOKEN: &str = "scale-bench-operator";
const NAMESPACE: &str = "bench";
const FLOOR_NAMESPACE: &str = "floor";
const FLOOR5_NAMESPACE: &str = "floor5";
const ISSUER: &str = "idp";
const SCOPE: &str = "orders/read";
/// The operator's default `--concurrency`, also used by the minimal client.
const CONCURRENCY: usize = 16;
/// The binary's own default log filter (what runs when RUST_LOG is unset).
const LOG_FILTER: &str = "info,kube=warn";
const POLL: Duration = Duration::from_millis(250);
const BUCKET_SECS: i64 = 10;
const MIB: f64 = 1024.0 * 1024.0;

struct Mode {
    full: bool,
    tokens: usize,
    idle: Duration,
    warmup: usize,
    /// The operator publishes Issued/Renewed Events (`BENCH_ISSUANCE_EVENTS`, default on).
    issuance_events: bool,
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let mode = if full {
        let tokens = match std::env::var("BENCH_TOKENS") {
            Ok(v) => v
                .trim()
                .replace(['_', ','], "")
                .parse()
                .unwrap_or_else(|_| panic!("BENCH_TOKENS must be a number, not {v:?}")),
            Err(_) => 10_000,
        };
        Mode {
            full,
            tokens,
            idle: Duration::from_secs(30),
            warmup: match std::env::var("BENCH_WARMUP") {
                Ok(v) => v
                    .trim()
                    .parse()
                    .unwrap_or_else(|_| panic!("BENCH_WARMUP must be a number, not {v:?}")),
                Err(_) => 500,
            },
            issuance_events: std::env::var("BENCH_ISSUANCE_EVENTS").as_deref() != Ok("false"),
        }
    } else {
        Mode {
            full,
            tokens: 20,
            idle: Duration::from_secs(1),
            warmup: 0,
            issuance_events: true,
        }
    };
    assert!(mode.tokens > 0, "BENCH_TOKENS must be at least 1");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    match std::env::var("BENCH_KUBECONFIG") {
        Ok(kubeconfig) if full && !kubeconfig.is_empty() => {
            runtime.block_on(real_cluster::run(mode, &kubeconfig));
        }
        _ => runtime.block_on(run(mode)),
    }
}

fn namespaces() -> ResourceKey {
    ResourceKey::namespaces()
}

/// A file removed on drop.
struct TempFile(PathBuf);

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn token_name(i: usize) -> String {
    format!("tok-{i:05}")
}

/// AudienceToken `i` in `namespace`, as JSON for the double's store.
fn token_object(namespace: &str, i: usize) -> Value {
    let token = AudienceToken::new(
        &token_name(i),
        AudienceTokenSpec {
            issuer_ref: IssuerRef {
                name: ISSUER.into(),
                ..IssuerRef::default()
            },
            resource: oidc::ORDERS.into(),
            scopes: vec![SCOPE.into()],
            ..AudienceTokenSpec::default()
        },
    );
    let mut value = serde_json::to_value(&token).expect("AudienceToken serializes");
    value["metadata"]["namespace"] = json!(namespace);
    value
}

fn is_ready(obj: &Value) -> bool {
    obj["status"]["conditions"].as_array().is_some_and(|c| {
        c.iter()
            .any(|c| c["type"] == "Ready" && c["status"] == "True")
    })
}

/// VmRSS and VmHWM of a process, in bytes.
fn memory(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find_map(|l| {
            l.strip_prefix(name)
                .and_then(|rest| rest.trim().strip_suffix("kB"))
                .and_then(|kib| kib.trim().parse::<u64>().ok())
                .map(|kib| kib * 1024)
        })
    };
    Some((field("VmRSS:")?, field("VmHWM:")?))
}

/// Clock ticks per second of /proc/<pid>/stat times (`getconf CLK_TCK`, usually 100).
fn clock_ticks() -> f64 {
    command_output("getconf", &["CLK_TCK"])
        .parse()
        .unwrap_or(100.0)
}

/// User + system CPU time of a process (`self` or a pid), in clock ticks.
fn cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces): state is field 3, utime 14,
    // stime 15.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
}

/// CPU time of the operator, the Node server and this process (the API double, the
/// pollers and the minimal client), at one moment.
#[derive(Clone, Copy)]
struct CpuSample {
    at: Instant,
    operator: Option<u64>,
    node: Option<u64>,
    harness: Option<u64>,
}

impl CpuSample {
    fn take(operator: Option<u32>, node: Option<u32>) -> Self {
        CpuSample {
            at: Instant::now(),
            operator: operator.and_then(|p| cpu_ticks(&p.to_string())),
            node: node.and_then(|p| cpu_ticks(&p.to_string())),
            harness: cpu_ticks("self"),
        }
    }

    /// The operator's CPU seconds from `self` to `later`.
    fn operator_seconds(&self, later: &CpuSample, ticks: f64) -> Option<f64> {
        #[allow(clippy::cast_precision_loss)]
        self.operator
            .zip(later.operator)
            .map(|(a, b)| b.saturating_sub(a) as f64 / ticks)
    }

    /// "operator 12.3 s (46% of a CPU), …" from `self` to `later`.
    fn since(&self, later: &CpuSample, ticks: f64) -> String {
        let wall = later.at.duration_since(self.at).as_secs_f64().max(1e-9);
        let one = |name: &str, a: Option<u64>, b: Option<u64>| {
            a.zip(b).map(|(a, b)| {
                #[allow(clippy::cast_precision_loss)]
                let cpu = b.saturating_sub(a) as f64 / ticks;
                format!("{name} {cpu:.1} s ({:.0}%)", 100.0 * cpu / wall)
            })
        };
        [
            one("operator", self.operator, later.operator),
            one("node", self.node, later.node),
            one("harness", self.harness, later.harness),
        ]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(", ")
    }
}

fn mib(bytes: u64) -> String {
    #[allow(clippy::cast_precision_loss)]
    let m = bytes as f64 / MIB;
    format!("{m:.1} MiB")
}

#[allow(clippy::cast_precision_loss)]
fn per_second(count: usize, elapsed: Duration) -> f64 {
    count as f64 / elapsed.as_secs_f64().max(1e-9)
}

fn secs(d: Duration) -> String {
    format!("{:.2} s", d.as_secs_f64())
}

/// Waits until `check` says done, polling every [`POLL`]; `progress` is printed every 5 s.
async fn poll_until<F, Fut>(what: &str, timeout: Duration, mut check: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = (bool, String)>,
{
    let started = Instant::now();
    let mut last_print = Instant::now();
    loop {
        let (done, progress) = check().await;
        if done {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < timeout,
            "timed out after {timeout:?} waiting for {what}; last seen: {progress}"
        );
        if last_print.elapsed() >= Duration::from_secs(5) {
            eprintln!(
                "[scale] {:>6.1} s  waiting for {what}: {progress}",
                started.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
        tokio::time::sleep(POLL).await;
    }
}

// ---- The operator's API calls --------------------------------------------------------------

fn resource_of(r: &RequestRecord) -> String {
    let mut name = if r.group.is_empty() {
        r.plural.clone()
    } else {
        format!("{}.{}", r.plural, r.group)
    };
    if let Some(sub) = &r.subresource {
        name.push('/');
        name.push_str(sub);
    }
    if r.accept
        .as_deref()
        .is_some_and(|a| a.contains("as=PartialObjectMetadata"))
    {
        name.push_str(" (metadata)");
    }
    name
}

fn is_write(verb: &str) -> bool {
    matches!(verb, "create" | "update" | "patch" | "delete")
}

/// The operator's requests (by its bearer token) to resource paths, by (verb, resource).
#[derive(Default)]
struct Tally(BTreeMap<(String, String), usize>);

impl Tally {
    fn of(records: &[RequestRecord]) -> Self {
        let mut tally = Tally::default();
        for r in records
            .iter()
            .filter(|r| r.bearer_token.as_deref() == Some(OPERATOR_TOKEN) && !r.plural.is_empty())
        {
            *tally.0.entry((r.verb.clone(), resource_of(r))).or_default() += 1;
        }
        tally
    }

    fn writes_to(&self, resource_prefix: &str) -> usize {
        (self.0.iter())
            .filter(|((verb, res), _)| is_write(verb) && res.starts_with(resource_prefix))
            .map(|(_, n)| n)
            .sum()
    }

    fn writes(&self) -> usize {
        (self.0.iter())
            .filter(|((verb, _), _)| is_write(verb))
            .map(|(_, n)| n)
            .sum()
    }

    fn count(&self, verb: &str, resource_prefix: &str) -> usize {
        (self.0.iter())
            .filter(|((v, res), _)| v == verb && res.starts_with(resource_prefix))
            .map(|(_, n)| n)
            .sum()
    }

    fn render(&self, indent: &str) -> String {
        let mut out = String::new();
        for ((verb, resource), n) in &self.0 {
            let _ = writeln!(out, "{indent}{verb:<7} {resource:<48} {n:>7}");
        }
        if self.0.is_empty() {
            let _ = writeln!(out, "{indent}(none)");
        }
        out
    }
}

// ---- Renewal spread ---------------------------------------------------------------------------

struct Spread {
    tokens: usize,
    first: i64,
    last: i64,
    buckets: usize,
    peak: usize,
    ratio: f64,
}

/// Buckets `times` (seconds) per [`BUCKET_SECS`] over the span from the first to the last;
/// peak bucket / mean bucket.
fn spread(times: &[i64]) -> Option<Spread> {
    let (&first, &last) = (times.iter().min()?, times.iter().max()?);
    let buckets = usize::try_from((last - first) / BUCKET_SECS + 1).ok()?;
    let mut counts = vec![0usize; buckets];
    for t in times {
        counts[usize::try_from((t - first) / BUCKET_SECS).ok()?] += 1;
    }
    let peak = *counts.iter().max()?;
    #[allow(clippy::cast_precision_loss)]
    let mean = times.len() as f64 / buckets as f64;
    #[allow(clippy::cast_precision_loss)]
    let ratio = peak as f64 / mean;
    Some(Spread {
        tokens: times.len(),
        first,
        last,
        buckets,
        peak,
        ratio,
    })
}

/// For each status field (conditions by type and field), how many AudienceTokens' values
/// differ between `before` (by name) and `after`.
fn status_changes(
    before: &BTreeMap<String, Value>,
    after: &[Value],
) -> BTreeMap<String, (usize, String)> {
    let mut changed: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for obj in after {
        let name = obj["metadata"]["name"].as_str().unwrap_or_default();
        let (old, new) = (
            &before.get(name).cloned().unwrap_or_default(),
            &obj["status"],
        );
        let fields = |v: &Value| -> BTreeMap<String, Value> {
            let mut out = BTreeMap::new();
            for (k, v) in v.as_object().into_iter().flatten() {
                if k == "conditions" {
                    for c in v.as_array().into_iter().flatten() {
                        for (ck, cv) in c.as_object().into_iter().flatten() {
                            let t = c["type"].as_str().unwrap_or_default();
                            out.insert(format!("conditions[{t}].{ck}"), cv.clone());
                        }
                    }
                } else {
                    out.insert(k.clone(), v.clone());
                }
            }
            out
        };
        let (old, new) = (fields(old), fields(new));
        for key in old
            .keys()
            .chain(new.keys())
            .collect::<std::collections::BTreeSet<_>>()
        {
            if old.get(key) != new.get(key) {
                let entry = changed.entry(key.clone()).or_insert_with(|| {
                    let show = |v: Option<&Value>| v.map_or("-".into(), Value::to_string);
                    let example =
                        format!("{name}: {} -> {}", show(old.get(key)), show(new.get(key)));
                    (0, example)
                });
                entry.0 += 1;
            }
        }
    }
    changed
}

fn timestamp(v: &Value) -> Option<i64> {
    v.as_str()?
        .parse::<jiff::Timestamp>()
        .ok()
        .map(|t| t.as_second())
}

// ---- The floor: a minimal keep-alive client ---------------------------------------------------

/// One token POST, as the operator sends it (client_secret_basic, scope, resource).
async fn token_post(http: &reqwest::Client, endpoint: &str) -> Result<Value, String> {
    let response = http
        .post(endpoint)
        .basic_auth(oidc::M2M_BASIC.id, Some(oidc::M2M_BASIC.secret))
        .form(&[
            ("grant_type", "client_credentials"),
            ("scope", SCOPE),
            ("resource", oidc::ORDERS),
        ])
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let body: Value = response.json().await.map_err(|e| e.to_string())?;
    if !status.is_success() {
        return Err(format!("{status}: {body}"));
    }
    Ok(body)
}

/// What the minimal client does per token.
#[derive(Clone, Copy, PartialEq, Eq)]
enum FloorCalls {
    /// The token POST only.
    TokenOnly,
    /// Token POST, Secret apply, status patch: the design's floor.
    Minimal,
    /// The operator's calls for a new token: token POST, Secret create, status patch, and
    /// the Event create unless the operator runs with `--issuance-events=false`.
    LikeOperator,
}

/// One run of a minimal client: where, what, and for which AudienceTokens.
struct Floor {
    /// How the client reaches the API server (its own client is built from it).
    kube: kube::Config,
    endpoint: String,
    namespace: String,
    calls: FloorCalls,
    /// With [`FloorCalls::LikeOperator`]: create the Issued Event too.
    events: bool,
}

struct FloorClient {
    http: reqwest::Client,
    endpoint: String,
    namespace: String,
    secrets: Api<Secret>,
    tokens: Api<AudienceToken>,
    events_api: Api<k8s_openapi::api::events::v1::Event>,
    calls: FloorCalls,
    /// With [`FloorCalls::LikeOperator`]: create the Issued Event too.
    events: bool,
}

impl FloorClient {
    fn new(client: &kube::Client, floor: &Floor) -> Self {
        FloorClient {
            http: floor_http(),
            endpoint: floor.endpoint.clone(),
            namespace: floor.namespace.clone(),
            secrets: Api::namespaced(client.clone(), &floor.namespace),
            tokens: Api::namespaced(client.clone(), &floor.namespace),
            events_api: Api::namespaced(client.clone(), &floor.namespace),
            calls: floor.calls,
            events: floor.events,
        }
    }

    /// The calls of [`FloorCalls`] for AudienceToken `i` (uid `uid`).
    async fn one(&self, i: usize, uid: &str) -> Result<(), String> {
        let name = token_name(i);
        let response = token_post(&self.http, &self.endpoint).await?;
        if self.calls == FloorCalls::TokenOnly {
            return Ok(());
        }
        let access_token = response["access_token"].as_str().ok_or("no access_token")?;
        let lifetime = response["expires_in"].as_i64().ok_or("no expires_in")?;
        let issued = jiff::Timestamp::from_second(jiff::Timestamp::now().as_second())
            .map_err(|e| e.to_string())?;
        let expires = issued + jiff::SignedDuration::from_secs(lifetime);
        let renewal = expires - jiff::SignedDuration::from_secs(lifetime / 3);
        let b64 = |s: &str| STANDARD.encode(s);
        let secret = json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {MANAGED_BY_LABEL: "floor-client", NAME_LABEL: name},
                "annotations": {
                    EXPIRES_AT_ANNOTATION: expires.to_string(),
                    ISSUED_AT_ANNOTATION: issued.to_string(),
                    SPEC_HASH_ANNOTATION: "0123456789abcdef",
                },
                "ownerReferences": [{
                    "apiVersion": "audiencetoken.io/v1alpha1", "kind": "AudienceToken",
                    "name": name, "uid": uid, "controller": true,
                }],
            },
            "type": "Opaque",
            "data": {
                "token": b64(access_token),
                "token-type": b64("Bearer"),
                "expires-at": b64(&expires.to_string()),
                "audience": b64(oidc::ORDERS),
                "scope": b64(SCOPE),
            },
        });
        if self.calls == FloorCalls::LikeOperator {
            let secret: Secret = serde_json::from_value(secret).map_err(|e| e.to_string())?;
            self.secrets
                .create(&kube::api::PostParams::default(), &secret)
                .await
                .map_err(|e| e.to_string())?;
        } else {
            self.secrets
                .patch(
                    &name,
                    &PatchParams::apply("floor-client").force(),
                    &Patch::Apply(&secret),
                )
                .await
                .map_err(|e| e.to_string())?;
        }
        let status = json!({"status": {
            "conditions": [{
                "type": "Ready", "status": "True", "reason": "Issued",
                "message": format!("token for {} in Secret {name}", oidc::ORDERS),
                "lastTransitionTime": issued.to_string(), "observedGeneration": 1,
            }],
            "observedGeneration": 1,
            "audience": [oidc::ORDERS],
            "scopes": [SCOPE],
            "tokenType": "Bearer",
            "issuedAt": issued.to_string(),
            "expiresAt": expires.to_string(),
            "renewalTime": renewal.to_string(),
        }});
        self.tokens
            .patch_status(&name, &PatchParams::default(), &Patch::Merge(&status))
            .await
            .map_err(|e| e.to_string())?;
        if self.calls == FloorCalls::LikeOperator && self.events {
            let event = serde_json::from_value(json!({
                "metadata": {"name": format!("{name}.{:x}", jiff::Timestamp::now().as_nanosecond()), "namespace": self.namespace},
                "eventTime": jiff::Timestamp::now().to_string(),
                "type": "Normal", "reason": "Issued", "action": "Reconcile",
                "note": format!("issued a token for {} into Secret {name}", oidc::ORDERS),
                "reportingController": "floor-client", "reportingInstance": "floor-client",
                "regarding": {"apiVersion": "audiencetoken.io/v1alpha1", "kind": "AudienceToken",
                              "name": name, "namespace": self.namespace, "uid": uid},
            }))
            .map_err(|e| e.to_string())?;
            self.events_api
                .create(&kube::api::PostParams::default(), &event)
                .await
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }
}

/// The minimal clients' HTTP client: keep-alive, a connection per worker.
fn floor_http() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .pool_max_idle_per_host(CONCURRENCY)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("reqwest client")
}

/// Warms the Node server's JIT before anything is timed, then zeroes its counters.
async fn warm_up(env: &TestEnv, kube: &kube::Config, mode: &Mode, namespace: &str) {
    if mode.warmup > 0 {
        let warm = Floor {
            kube: kube.clone(),
            endpoint: env.idp.token_endpoint(),
            namespace: namespace.to_string(),
            calls: FloorCalls::TokenOnly,
            events: false,
        };
        run_floor(warm, vec![String::new(); mode.warmup]).await;
    }
    env.idp.reset_counts().await;
}

/// Starts the operator for `namespace` and waits until it and the issuer are ready;
/// returns it, its pid and its RSS before any AudienceToken.
async fn start_operator(
    env: &TestEnv,
    kubeconfig: &std::path::Path,
    namespace: &str,
    mode: &Mode,
) -> (OperatorProcess, u32, u64) {
    let operator = OperatorProcess::start_with_log_filter(
        kubeconfig,
        namespace,
        operator_options(mode),
        Some(LOG_FILTER),
    );
    poll_until(
        "the operator's /readyz",
        Duration::from_secs(60),
        || async {
            let (status, _) = operator.http_get("/readyz").await;
            (status == 200, format!("status {status}"))
        },
    )
    .await;
    env.wait_issuer(ISSUER, "True", "Ready").await;
    let pid = operator.pid().expect("operator pid");
    let (rss, _) = memory(pid).expect("operator memory");
    (operator, pid, rss)
}

/// Waits until the operator's `/metrics` has `n` `audience_token_ready` series at 1 for
/// `namespace` (every token reconciled by this process); returns the time it took.
async fn wait_ready_series(
    operator: &OperatorProcess,
    namespace: &str,
    n: usize,
    timeout: Duration,
) -> Duration {
    let series = format!("audience_token_ready{{namespace=\"{namespace}\",");
    poll_until(
        "all audience_token_ready series at 1 after restart",
        timeout,
        || async {
            let (_, body) = operator.http_get("/metrics").await;
            let ready = body
                .lines()
                .filter(|l| l.starts_with(&series) && l.ends_with(" 1"))
                .count();
            (ready == n, format!("{ready}/{n} series at 1"))
        },
    )
    .await
}

/// The operator's options for `mode`: `--issuance-events=false` when Events are off.
fn operator_options(mode: &Mode) -> Options {
    Options {
        extra_args: if mode.issuance_events {
            Vec::new()
        } else {
            vec!["--issuance-events=false".into()]
        },
        ..Options::default()
    }
}

/// Runs `client.one` for every index on [`CONCURRENCY`] tasks; returns the elapsed time.
/// Runs `floor` once per uid, `CONCURRENCY` at a time, on a thread and runtime of its own
/// with its own kube and HTTP clients, so that thread's CPU time is the client's own (the
/// API double shares this process). Returns the wall time and the client's CPU seconds.
async fn run_floor(floor: Floor, uids: Vec<String>) -> (Duration, f64) {
    tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("floor client runtime");
        let cpu_before = thread_cpu_ticks();
        let elapsed = runtime.block_on(async move {
            let kube = kube::Client::try_from(floor.kube.clone()).expect("floor kube client");
            run_floor_workers(FloorClient::new(&kube, &floor), uids).await
        });
        drop(runtime);
        let ticks = thread_cpu_ticks().saturating_sub(cpu_before);
        #[allow(clippy::cast_precision_loss)]
        (elapsed, ticks as f64 / clock_ticks())
    })
    .await
    .expect("floor client thread")
}

async fn run_floor_workers(client: FloorClient, uids: Vec<String>) -> Duration {
    let client = Arc::new(client);
    let uids = Arc::new(uids);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let workers: Vec<_> = (0..CONCURRENCY)
        .map(|_| {
            let (client, uids, next) = (client.clone(), uids.clone(), next.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(uid) = uids.get(i) else { return };
                    if let Err(e) = client.one(i, uid).await {
                        panic!("minimal client, token {i}: {e}");
                    }
                }
            })
        })
        .collect();
    for worker in workers {
        worker.await.expect("minimal client worker");
    }
    started.elapsed()
}

/// CPU time (user + system, in clock ticks) of the calling thread.
fn thread_cpu_ticks() -> u64 {
    cpu_ticks("thread-self").unwrap_or(0)
}

// ---- Machine facts ------------------------------------------------------------------------

fn command_output(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_else(|| "unknown".into())
}

fn machine_facts() -> Vec<(&'static str, String)> {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name").and_then(|r| r.split_once(':')))
        .map_or_else(|| "unknown".into(), |(_, m)| m.trim().to_string());
    let cpus = cpuinfo
        .lines()
        .filter(|l| l.starts_with("processor"))
        .count();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().strip_suffix("kB"))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .map_or_else(
            || "unknown".into(),
            |kib| {
                #[allow(clippy::cast_precision_loss)]
                let gib = kib as f64 / (1024.0 * 1024.0);
                format!("{gib:.1} GiB")
            },
        );
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map_or_else(|_| "unknown".into(), |k| k.trim().to_string());
    let node = std::env::var("NODE").unwrap_or_else(|_| "node".into());
    vec![
        ("CPU", format!("{model} x {cpus} (logical CPUs)")),
        ("memory", total),
        ("kernel", kernel),
        ("rustc", command_output("rustc", &["--version"])),
        ("node", command_output(&node, &["--version"])),
        (
            "profile",
            if cfg!(debug_assertions) {
                "debug (cargo test: smoke run)".into()
            } else {
                "release".into()
            },
        ),
    ]
}

// ---- The run ------------------------------------------------------------------------------

#[allow(clippy::too_many_lines)]
async fn run(mode: Mode) {
    let n = mode.tokens;
    let mut report = Report::default();
    eprintln!(
        "[scale] {} run with {n} AudienceTokens",
        if mode.full { "benchmark" } else { "smoke" }
    );

    // The harness: API double, OAuth server, namespace, issuer.
    let double = KubeApiDouble::start().await;
    let idp = OidcServer::start().await;
    let token_endpoint = idp.token_endpoint();
    let env = TestEnv {
        client: double.client(),
        namespace: NAMESPACE.into(),
        idp,
    };
    env.create_namespace().await;
    env.create_issuer(ISSUER, &oidc::M2M_BASIC, oidc::M2M_BASIC.secret)
        .await;
    let kube_config = double.config();
    warm_up(&env, &kube_config, &mode, FLOOR_NAMESPACE).await;

    let dir = std::env::temp_dir().join(format!("ato-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temp dir");
    let kubeconfig = TempFile(dir.join("kubeconfig"));
    std::fs::write(
        &kubeconfig.0,
        double.kubeconfig_yaml_with_token(OPERATOR_TOKEN),
    )
    .expect("write kubeconfig");
    let (mut operator, pid, rss_empty) =
        start_operator(&env, &kubeconfig.0, NAMESPACE, &mode).await;

    // Cold issuance.
    let at = ResourceKey::of::<AudienceToken>(true);
    let ticks = clock_ticks();
    let node_pid = env.idp.pid();
    let mark_cold = double.request_count();
    let cpu_cold = CpuSample::take(Some(pid), node_pid);
    let started = Instant::now();
    for i in 0..n {
        double.put(&at, token_object(NAMESPACE, i));
    }
    let created_in = started.elapsed();
    let mut first_ready = None;
    let timeout = Duration::from_secs(120) + Duration::from_millis(60 * n as u64);
    poll_until("every AudienceToken Ready=True", timeout, || {
        let ready = double.count(&at, Some(NAMESPACE), is_ready);
        if ready > 0 && first_ready.is_none() {
            first_ready = Some(started.elapsed());
        }
        async move { (ready == n, format!("{ready}/{n} Ready")) }
    })
    .await;
    let cold = started.elapsed();
    let cpu_cold_end = CpuSample::take(Some(pid), node_pid);
    let operator_cpu_cold = cpu_cold.operator_seconds(&cpu_cold_end, ticks);
    let cpu_cold = cpu_cold.since(&cpu_cold_end, ticks);
    let cold_requests = env.idp.token_requests().await;
    let (rss_ready, hwm_ready) = memory(pid).expect("operator memory");
    eprintln!(
        "[scale] cold issuance: {n} Ready in {:.2} s; idling {:?}",
        cold.as_secs_f64(),
        mode.idle
    );

    // Memory after idling (the writes of phase 2 are counted over this window too, so
    //    that late writes show).
    tokio::time::sleep(mode.idle).await;
    let (rss_idle, hwm_idle) = memory(pid).expect("operator memory");
    let mark_idle_end = double.request_count();
    let cold_calls = Tally::of(&double.requests_since(mark_cold)[..mark_idle_end - mark_cold]);
    let idle_requests = env.idp.token_requests().await.total - cold_requests.total;

    // Renewal spread of the cold issuance.
    let objects = double.list(&at, Some(NAMESPACE));
    let renewals: Vec<i64> = (objects.iter())
        .filter_map(|o| timestamp(&o["status"]["renewalTime"]))
        .collect();
    let offsets: Vec<i64> = (objects.iter())
        .filter_map(|o| {
            Some(timestamp(&o["status"]["renewalTime"])? - timestamp(&o["status"]["issuedAt"])?)
        })
        .collect();
    let issued: Vec<i64> = (objects.iter())
        .filter_map(|o| timestamp(&o["status"]["issuedAt"]))
        .collect();
    let events_stored = double.count(&ResourceKey::events(), Some(NAMESPACE), |_| true);
    let warnings = operator
        .logs()
        .lines()
        .filter(|l| l.contains(" WARN "))
        .count();

    // Restart.
    let before_restart: BTreeMap<String, Value> = (objects.iter())
        .map(|o| {
            (
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
                o["status"].clone(),
            )
        })
        .collect();
    let mark_restart = double.request_count();
    env.idp.reset_counts().await;
    let stop_started = Instant::now();
    let exit = operator.stop().await;
    let stopped_in = stop_started.elapsed();
    operator.restart().await;
    let new_pid = operator.pid().expect("restarted operator pid");
    let readyz = poll_until(
        "/readyz after restart",
        Duration::from_secs(120),
        || async {
            let (status, _) = operator.http_get("/readyz").await;
            (status == 200, format!("status {status}"))
        },
    )
    .await;
    let all_ready_again = wait_ready_series(&operator, NAMESPACE, n, timeout)
        .await
        .max(readyz);
    // Anything the restarted operator does a little later (late writes) counts too.
    tokio::time::sleep(Duration::from_secs(if mode.full { 5 } else { 1 })).await;
    let restart_token_requests = env.idp.token_requests().await.total;
    let mark_restart_end = double.request_count();
    let restart_calls =
        Tally::of(&double.requests_since(mark_restart)[..mark_restart_end - mark_restart]);
    let (rss_restarted, hwm_restarted) = memory(new_pid).expect("operator memory");
    let still_ready = double.count(&at, Some(NAMESPACE), is_ready);
    let changed_fields = status_changes(&before_restart, &double.list(&at, Some(NAMESPACE)));

    // Forced renewal of every token, by the restarted operator: the same path as a renewal
    // that falls due (token request, Secret apply, status patch, Event), with the Secret
    // already cached.
    let stamp = "2030-01-01T00:00:00Z";
    env.idp.reset_counts().await;
    let mark_renew = double.request_count();
    let started = Instant::now();
    for mut obj in double.list(&at, Some(NAMESPACE)) {
        obj["metadata"]["annotations"][RENEW_REQUESTED_AT_ANNOTATION] = json!(stamp);
        double.put(&at, obj);
    }
    let renewed = |obj: &Value| obj["status"]["lastRenewRequestedAt"] == stamp && is_ready(obj);
    poll_until("every AudienceToken renewed", timeout, || {
        let done = double.count(&at, Some(NAMESPACE), renewed);
        async move { (done == n, format!("{done}/{n} renewed")) }
    })
    .await;
    let renewal_wave = started.elapsed();
    tokio::time::sleep(Duration::from_secs(if mode.full { 5 } else { 1 })).await;
    let renew_requests = env.idp.token_requests().await.total;
    let (rss_renewed, hwm_renewed) = memory(new_pid).expect("operator memory");
    let renew_calls = Tally::of(&double.requests_since(mark_renew));

    operator.stop().await;

    // The floor, with the operator stopped: token endpoint alone, then a minimal client.
    // Each run gets its own namespace of N fresh AudienceTokens, put in untimed.
    let fresh_tokens = |namespace: &str| -> Vec<String> {
        double.put(&namespaces(), json!({"metadata": {"name": namespace}}));
        (0..n)
            .map(|i| {
                double.put(&at, token_object(namespace, i))["metadata"]["uid"]
                    .as_str()
                    .expect("uid")
                    .to_string()
            })
            .collect()
    };
    env.idp.reset_counts().await;
    let mut floors = Vec::new();
    for (namespace, calls) in [
        (FLOOR_NAMESPACE, FloorCalls::TokenOnly),
        (FLOOR_NAMESPACE, FloorCalls::Minimal),
        (FLOOR5_NAMESPACE, FloorCalls::LikeOperator),
    ] {
        let uids = if calls == FloorCalls::TokenOnly {
            vec![String::new(); n]
        } else {
            fresh_tokens(namespace)
        };
        let floor = Floor {
            kube: kube_config.clone(),
            endpoint: token_endpoint.clone(),
            namespace: namespace.to_string(),
            calls,
            events: mode.issuance_events,
        };
        let before = CpuSample::take(None, node_pid);
        let (elapsed, client_cpu) = run_floor(floor, uids).await;
        let cpu = before.since(&CpuSample::take(None, node_pid), ticks);
        let ready = double.count(&at, Some(namespace), is_ready);
        floors.push((calls, elapsed, cpu, ready, client_cpu));
    }
    let floor_requests = env.idp.token_requests().await.total;

    // ---- Report ----
    let cold_rate = per_second(n, cold);
    let floor_of = |calls| {
        floors
            .iter()
            .find(|f| f.0 == calls)
            .map(|f| (f.1, f.2.clone(), f.3, f.4))
            .expect("every floor ran")
    };
    let (endpoint_only, cpu_endpoint, _, _) = floor_of(FloorCalls::TokenOnly);
    let (floor, cpu_floor, floor_ready, client_cpu) = floor_of(FloorCalls::Minimal);
    let (floor5, cpu_floor5, floor5_ready, client5_cpu) = floor_of(FloorCalls::LikeOperator);
    #[allow(clippy::cast_precision_loss)]
    let ms_per_token = |seconds: f64| 1000.0 * seconds / n as f64;
    let floor_rate = per_second(n, floor);
    let floor5_rate = per_second(n, floor5);
    #[allow(clippy::cast_precision_loss)]
    let per_token = |count: usize| count as f64 / n as f64;
    let secret_writes = cold_calls.writes_to("secrets");
    let status_writes = cold_calls.writes_to("audiencetokens.audiencetoken.io/status");
    let main_writes = cold_calls.writes_to("audiencetokens.audiencetoken.io") - status_writes;
    let event_writes = cold_calls.writes_to("events");
    let other_writes =
        cold_calls.writes() - secret_writes - status_writes - main_writes - event_writes;
    let spread_all = spread(&renewals);
    let spread_jitter = spread(&offsets);
    let issuance_span = issued
        .iter()
        .max()
        .zip(issued.iter().min())
        .map(|(a, b)| a - b);

    report.title(&format!(
        "audience-token-operator scale benchmark: {n} AudienceTokens, 1 TokenIssuer, {}, Issued/Renewed Events {}",
        if mode.full {
            "full run"
        } else {
            "SMOKE run (cargo test)"
        },
        if mode.issuance_events { "on" } else { "off" }
    ));
    report.section("Machine");
    for (k, v) in machine_facts() {
        report.row(k, &v, "");
    }
    report.row(
        "rerun",
        &format!("npm ci --prefix tests/oidc-server && BENCH_TOKENS={n} cargo bench --bench scale"),
        "",
    );
    report.row(
        "setup",
        &format!(
            "operator: release binary, --concurrency {CONCURRENCY}, RUST_LOG={LOG_FILTER}; resource {} (3600 s tokens), client m2m-basic (HTTP Basic); API double and Node OAuth server share the machine",
            oidc::ORDERS
        ),
        "",
    );

    report.section("1. Cold issuance (N created at once, until all Ready=True)");
    report.row("created in (direct store puts)", &secs(created_in), "");
    report.row(
        "first Ready after",
        &first_ready.map_or("-".into(), secs),
        "",
    );
    report.row("all Ready after", &secs(cold), "");
    report.row("issuance rate", &format!("{cold_rate:.0} tokens/s"), "");
    report.row("CPU meanwhile (% of one CPU)", &cpu_cold, "");
    report.row(
        "token requests received",
        &format!(
            "{} (by resource {}: {})",
            cold_requests.total,
            oidc::ORDERS,
            cold_requests.for_resource(oidc::ORDERS)
        ),
        &verdict(cold_requests.total == n as u64, &format!("= N = {n}")),
    );
    report.row(
        "token requests during idle",
        &idle_requests.to_string(),
        &verdict(idle_requests == 0, "0"),
    );

    report.section("2. The operator's API calls during issuance and idle (per token = / N)");
    report.row(
        "Secret writes",
        &format!("{secret_writes} ({:.2}/token)", per_token(secret_writes)),
        "",
    );
    report.row(
        "status writes",
        &format!("{status_writes} ({:.2}/token)", per_token(status_writes)),
        "",
    );
    report.row(
        "Secret + status writes",
        &format!(
            "{} ({:.2}/token)",
            secret_writes + status_writes,
            per_token(secret_writes + status_writes)
        ),
        &verdict(secret_writes + status_writes <= 2 * n, "<= 2/token"),
    );
    report.row(
        "Event writes (Issued)",
        &format!("{event_writes} ({:.2}/token)", per_token(event_writes)),
        if mode.issuance_events {
            "a third write, beside the target (--issuance-events)"
        } else {
            "off (--issuance-events=false)"
        },
    );
    report.row(
        "other writes",
        &format!(
            "{} ({:.2}/token)",
            other_writes + main_writes,
            per_token(other_writes + main_writes)
        ),
        "",
    );
    let secret_gets = cold_calls.count("get", "secrets");
    report.row(
        "Secret reads (GET)",
        &format!("{secret_gets} ({:.2}/token)", per_token(secret_gets)),
        "design: no extra reads",
    );
    report.row(
        "Events stored in the namespace",
        &events_stored.to_string(),
        "",
    );
    report.row("WARN lines in the operator log", &warnings.to_string(), "");
    report.text(&format!(
        "  every call, by verb and resource:\n{}",
        cold_calls.render("    ")
    ));

    report.section("3. Memory of the operator process (VmRSS / VmHWM; harness not counted)");
    report.row(
        "before any AudienceToken",
        &format!("RSS {}", mib(rss_empty)),
        "",
    );
    report.row(
        "all Ready",
        &format!("RSS {}  peak {}", mib(rss_ready), mib(hwm_ready)),
        &verdict(hwm_ready <= 64 << 20, "<= 64 MiB"),
    );
    report.row(
        &format!("after {} s idle", mode.idle.as_secs()),
        &format!("RSS {}  peak {}", mib(rss_idle), mib(hwm_idle)),
        &verdict(rss_idle <= 64 << 20, "<= 64 MiB"),
    );
    report.row(
        "restarted, all Ready again",
        &format!("RSS {}  peak {}", mib(rss_restarted), mib(hwm_restarted)),
        &verdict(hwm_restarted <= 64 << 20, "<= 64 MiB"),
    );

    report.row(
        "restarted, then all N renewed",
        &format!("RSS {}  peak {}", mib(rss_renewed), mib(hwm_renewed)),
        &verdict(rss_renewed <= 64 << 20, "<= 64 MiB"),
    );

    report.section("4. Renewal spread after the cold issuance (status.renewalTime, 10 s buckets)");
    report.row(
        "issuedAt span",
        &issuance_span.map_or("-".into(), |s| format!("{s} s")),
        "",
    );
    if let Some(s) = &spread_all {
        report.row(
            "renewals fall over",
            &format!(
                "{} s ({} tokens, {} buckets, {} .. {})",
                s.last - s.first,
                s.tokens,
                s.buckets,
                jiff::Timestamp::from_second(s.first).map_or(String::new(), |t| t.to_string()),
                jiff::Timestamp::from_second(s.last).map_or(String::new(), |t| t.to_string()),
            ),
            "",
        );
        #[allow(clippy::cast_precision_loss)]
        let mean = s.tokens as f64 / s.buckets as f64;
        report.row(
            "peak / mean bucket",
            &format!("{} / {mean:.1} = {:.2}", s.peak, s.ratio),
            &if mean >= 30.0 {
                verdict(s.ratio <= 1.5, "<= 1.5")
            } else {
                "too few tokens per bucket to judge".into()
            },
        );
    }
    if let Some(s) = &spread_jitter {
        report.row(
            "renewalTime - issuedAt",
            &format!(
                "{} .. {} s; peak/mean {:.2} (the jitter alone)",
                s.first, s.last, s.ratio
            ),
            "",
        );
    }

    report.section("5. Restart (SIGTERM, start again, valid tokens)");
    report.row(
        "stop (SIGTERM to exit)",
        &format!("{} ({exit:?})", secs(stopped_in)),
        "",
    );
    report.row("/readyz 200 after", &secs(readyz), "");
    report.row(
        "all N audience_token_ready = 1 after",
        &secs(all_ready_again),
        &verdict(all_ready_again <= Duration::from_secs(10), "within seconds"),
    );
    report.row(
        "token requests during restart",
        &restart_token_requests.to_string(),
        &verdict(restart_token_requests == 0, "0"),
    );
    report.row(
        "writes during restart",
        &restart_calls.writes().to_string(),
        &verdict(restart_calls.writes() == 0, "0 (nothing rewritten)"),
    );
    report.row(
        "AudienceTokens still Ready=True",
        &format!("{still_ready}/{n}"),
        "",
    );
    report.row(
        "status fields changed by the restart",
        &if changed_fields.is_empty() {
            "none".to_string()
        } else {
            (changed_fields.iter())
                .map(|(field, (count, _))| format!("{field} x{count}"))
                .collect::<Vec<_>>()
                .join(", ")
        },
        "",
    );
    for (field, (_, example)) in &changed_fields {
        report.row(&format!("  e.g. {field}"), example, "");
    }
    report.text(&format!(
        "  every call of the restarted operator, by verb and resource:\n{}",
        restart_calls.render("    ")
    ));

    report.section(&format!(
        "6. Renewal of every token by the restarted operator (forced: a new {RENEW_REQUESTED_AT_ANNOTATION} on all N)"
    ));
    report.row("all renewed after", &secs(renewal_wave), "");
    report.row(
        "renewal rate",
        &format!("{:.0} tokens/s", per_second(n, renewal_wave)),
        "",
    );
    report.row(
        "token requests",
        &renew_requests.to_string(),
        &verdict(
            renew_requests == n as u64,
            &format!("one per renewal = {n}"),
        ),
    );
    let renew_sw = renew_calls.writes_to("secrets");
    let renew_st = renew_calls.writes_to("audiencetokens.audiencetoken.io/status");
    let renew_ev = renew_calls.writes_to("events");
    report.row(
        "Secret + status writes",
        &format!(
            "{} + {} ({:.2}/renewal)",
            renew_sw,
            renew_st,
            per_token(renew_sw + renew_st)
        ),
        &verdict(renew_sw + renew_st <= 2 * n, "<= 2/renewal"),
    );
    report.row(
        "Event writes (Renewed)",
        &format!("{renew_ev} ({:.2}/renewal)", per_token(renew_ev)),
        if mode.issuance_events {
            "a third write, beside the target (--issuance-events)"
        } else {
            "off (--issuance-events=false)"
        },
    );
    let renew_other = renew_calls.writes() - renew_sw - renew_st - renew_ev;
    report.row("other writes", &renew_other.to_string(), "");
    let renew_reads = renew_calls.count("get", "") + renew_calls.count("list", "");
    report.row(
        "reads (GET, list)",
        &renew_reads.to_string(),
        &verdict(renew_reads == 0, "no extra reads"),
    );
    report.text(&format!(
        "  every call, by verb and resource:\n{}",
        renew_calls.render("    ")
    ));

    report.section("7. The floor (operator stopped; same servers, same concurrency 16)");
    report.row(
        "token endpoint alone (POSTs only)",
        &format!(
            "{:.0} tokens/s ({})",
            per_second(n, endpoint_only),
            secs(endpoint_only)
        ),
        "",
    );
    report.row("  CPU meanwhile", &cpu_endpoint, "");
    report.row(
        "minimal client: POST + Secret apply + status patch",
        &format!("{floor_rate:.0} tokens/s ({})", secs(floor)),
        "",
    );
    report.row("  CPU meanwhile", &cpu_floor, "");
    report.row(
        "  the client's own CPU (its thread)",
        &format!(
            "{client_cpu:.1} s = {:.2} ms/token",
            ms_per_token(client_cpu)
        ),
        "",
    );
    report.row(
        "minimal client making the operator's calls",
        &format!("{floor5_rate:.0} tokens/s ({})", secs(floor5)),
        if mode.issuance_events {
            "POST + Secret create + status patch + Event create"
        } else {
            "POST + Secret create + status patch"
        },
    );
    report.row("  CPU meanwhile", &cpu_floor5, "");
    report.row(
        "  the client's own CPU (its thread)",
        &format!(
            "{client5_cpu:.1} s = {:.2} ms/token",
            ms_per_token(client5_cpu)
        ),
        "",
    );
    report.row(
        "operator cold issuance",
        &format!(
            "{cold_rate:.0} tokens/s = {:.0}% of the minimal client, {:.0}% of the one making the operator's calls",
            100.0 * cold_rate / floor_rate,
            100.0 * cold_rate / floor5_rate
        ),
        "close to the floor",
    );
    if let Some(operator_cpu) = operator_cpu_cold {
        let ratio = operator_cpu / client_cpu.max(1e-9);
        report.row(
            "operator CPU per token, cold issuance",
            &format!(
                "{:.2} ms = {ratio:.1}x the minimal client's, {:.1}x the one making the operator's calls",
                ms_per_token(operator_cpu),
                operator_cpu / client5_cpu.max(1e-9)
            ),
            &verdict(ratio <= 1.5, "<= 1.5x the minimal client's"),
        );
    }
    println!("{}", report.out);

    // Smoke checks (and sanity of the full run).
    assert_eq!(
        cold_requests.total, n as u64,
        "exactly one token request per AudienceToken"
    );
    assert_eq!(
        restart_token_requests, 0,
        "a restart makes no token requests"
    );
    assert_eq!(still_ready, n, "every AudienceToken stays Ready");
    assert_eq!(floor_ready, n, "the minimal client made every token Ready");
    assert_eq!(
        floor5_ready, n,
        "the operator-like client made every token Ready"
    );
    assert_eq!(
        floor_requests,
        3 * n as u64,
        "the floor runs made 3N token requests"
    );
    drop(operator);
    drop(kubeconfig);
    let _ = std::fs::remove_dir(&dir);
    double.shutdown().await;
}

fn verdict(met: bool, target: &str) -> String {
    format!("{} (target {target})", if met { "MET" } else { "NOT MET" })
}

#[derive(Default)]
struct Report {
    out: String,
}

impl Report {
    fn title(&mut self, title: &str) {
        let _ = writeln!(self.out, "\n{title}\n{}", "=".repeat(title.len()));
    }
    fn section(&mut self, name: &str) {
        let _ = writeln!(self.out, "\n{name}");
    }
    fn row(&mut self, label: &str, value: &str, note: &str) {
        let _ = writeln!(self.out, "  {label:<40} {value:<44} {note}");
    }
    fn text(&mut self, text: &str) {
        self.out.push_str(text);
    }
}
