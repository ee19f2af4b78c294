//! The benchmark's phases against a real cluster (`BENCH_KUBECONFIG=<kubeconfig>`): the CRDs
//! are applied, everything happens in new namespaces (`ato-bench-<n>`, and two for the
//! floor clients) that are deleted afterwards. AudienceTokens are created through the API
//! (32 at a time; the creation time is reported apart), readiness is read by listing them
//! every second, and the operator runs as a local process with that kubeconfig, so it
//! reaches the test OAuth server on 127.0.0.1. The operator's API calls are not counted
//! here (the API server does not tell them apart): the API-double run does that.
//!
//! `BENCH_KUBECONFIG=double` runs these same phases against the in-process API double, to
//! check them without a cluster.

use std::path::Path;
use std::time::{Duration, Instant};

use audience_token_operator::api::{AudienceToken, RENEW_REQUESTED_AT_ANNOTATION};
use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Namespace;
use kube::Client;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use serde_json::{Value, json};

use super::support::kube_double::KubeApiDouble;
use super::support::oidc::{self, OidcServer};
use super::support::scenarios::TestEnv;
use super::{
    CpuSample, Floor, FloorCalls, ISSUER, Mode, Report, clock_ticks, is_ready, machine_facts,
    memory, mib, per_second, poll_until, run_floor, secs, token_object,
};

/// API writes in flight while creating or annotating the AudienceTokens.
const WRITERS: usize = 32;

/// AudienceTokens of `namespace`, as JSON, listed in pages of 500.
async fn list_tokens(client: &Client, namespace: &str) -> Vec<Value> {
    let api: Api<AudienceToken> = Api::namespaced(client.clone(), namespace);
    let mut params = ListParams::default().limit(500);
    let mut all = Vec::new();
    loop {
        let page = api.list(&params).await.expect("list AudienceTokens");
        all.extend(
            page.items
                .iter()
                .map(|t| serde_json::to_value(t).expect("AudienceToken serializes")),
        );
        match page.metadata.continue_ {
            Some(token) if !token.is_empty() => params = params.continue_token(&token),
            _ => return all,
        }
    }
}

/// How many AudienceTokens of `namespace` `accept` accepts.
async fn count(client: &Client, namespace: &str, accept: impl Fn(&Value) -> bool) -> usize {
    list_tokens(client, namespace)
        .await
        .iter()
        .filter(|t| accept(t))
        .count()
}

async fn create_namespace(client: &Client, name: &str) {
    let namespaces: Api<Namespace> = Api::all(client.clone());
    let namespace =
        serde_json::from_value(json!({"metadata": {"name": name, "labels": {"team": "test"}}}))
            .expect("Namespace");
    namespaces
        .create(&PostParams::default(), &namespace)
        .await
        .expect("create namespace");
}

/// Creates AudienceTokens 0..n in `namespace`, [`WRITERS`] at a time; returns their uids.
async fn create_tokens(client: &Client, namespace: &str, n: usize) -> Vec<String> {
    let api: Api<AudienceToken> = Api::namespaced(client.clone(), namespace);
    let created = futures::stream::iter(0..n)
        .map(|i| {
            let api = api.clone();
            let namespace = namespace.to_string();
            async move {
                let token: AudienceToken =
                    serde_json::from_value(token_object(&namespace, i)).expect("AudienceToken");
                let created = api
                    .create(&PostParams::default(), &token)
                    .await
                    .unwrap_or_else(|e| panic!("create AudienceToken {i}: {e}"));
                (i, created.metadata.uid.unwrap_or_default())
            }
        })
        .buffer_unordered(WRITERS)
        .collect::<Vec<_>>()
        .await;
    let mut uids = vec![String::new(); n];
    for (i, uid) in created {
        uids[i] = uid;
    }
    uids
}

/// Runs the phases against the cluster of `kubeconfig` (or the API double for `double`).
pub async fn run(mode: Mode, kubeconfig: &str) {
    let n = mode.tokens;
    // `double`: held to the end, when the phases run against it.
    let (client, kube_config, kubeconfig_path, label, double) = if kubeconfig == "double" {
        let started = KubeApiDouble::start().await;
        let path = std::env::temp_dir().join(format!("ato-bench-double-{}", std::process::id()));
        std::fs::write(&path, started.kubeconfig_yaml()).expect("write kubeconfig");
        let client = started.client();
        let label = "the API double, through the real-cluster phases".to_string();
        (client, started.config(), path, label, Some(started))
    } else {
        let path = Path::new(kubeconfig).to_path_buf();
        let config = kube::Config::from_custom_kubeconfig(
            Kubeconfig::read_from(&path).expect("read BENCH_KUBECONFIG"),
            &KubeConfigOptions::default(),
        )
        .await
        .expect("usable BENCH_KUBECONFIG");
        let client = Client::try_from(config.clone()).expect("client");
        super::support::cluster::install_crds(&client).await;
        let version = client
            .apiserver_version()
            .await
            .expect("API server version");
        let label = format!("a real cluster, Kubernetes {}", version.git_version);
        (client, config, path, label, None)
    };
    let suffix = std::process::id();
    let namespace = format!("ato-bench-{suffix}");
    let floor_namespace = format!("ato-bench-{suffix}-floor");
    let floor_op_namespace = format!("ato-bench-{suffix}-floor-op");
    for name in [&namespace, &floor_namespace, &floor_op_namespace] {
        create_namespace(&client, name).await;
    }
    let idp = OidcServer::start().await;
    let token_endpoint = idp.token_endpoint();
    let env = TestEnv {
        client: client.clone(),
        namespace: namespace.clone(),
        idp,
    };
    env.create_issuer(ISSUER, &oidc::M2M_BASIC, oidc::M2M_BASIC.secret)
        .await;
    super::warm_up(&env, &kube_config, &mode, &floor_namespace).await;
    let (mut operator, pid, rss_empty) =
        super::start_operator(&env, &kubeconfig_path, &namespace, &mode).await;
    let ticks = clock_ticks();
    let node_pid = env.idp.pid();
    let timeout = Duration::from_secs(300) + Duration::from_millis(100 * n as u64);

    // Cold issuance: created through the API, timed from the first create.
    let cpu_cold = CpuSample::take(Some(pid), node_pid);
    let started = Instant::now();
    create_tokens(&client, &namespace, n).await;
    let created_in = started.elapsed();
    poll_until("every AudienceToken Ready=True", timeout, || {
        let client = client.clone();
        let namespace = namespace.clone();
        async move {
            let ready = count(&client, &namespace, is_ready).await;
            (ready == n, format!("{ready}/{n} Ready"))
        }
    })
    .await;
    let cold = started.elapsed();
    let cpu_cold_end = CpuSample::take(Some(pid), node_pid);
    let operator_cpu_cold = cpu_cold.operator_seconds(&cpu_cold_end, ticks);
    let cpu_cold = cpu_cold.since(&cpu_cold_end, ticks);
    let cold_requests = env.idp.token_requests().await.total;
    let (rss_ready, _) = memory(pid).expect("operator memory");
    tokio::time::sleep(mode.idle).await;
    let (rss_idle, _) = memory(pid).expect("operator memory");

    // Restart.
    env.idp.reset_counts().await;
    operator.stop().await;
    operator.restart().await;
    let new_pid = operator.pid().expect("restarted operator pid");
    let restarted_in = super::wait_ready_series(&operator, &namespace, n, timeout).await;
    let restart_requests = env.idp.token_requests().await.total;
    let (rss_restarted, hwm_restarted) = memory(new_pid).expect("operator memory");

    // Forced renewal of every token.
    let stamp = "2030-01-01T00:00:00Z";
    env.idp.reset_counts().await;
    let tokens: Api<AudienceToken> = Api::namespaced(client.clone(), &namespace);
    let started = Instant::now();
    futures::stream::iter(0..n)
        .map(|i| {
            let tokens = tokens.clone();
            async move {
                let patch =
                    json!({"metadata": {"annotations": {RENEW_REQUESTED_AT_ANNOTATION: stamp}}});
                tokens
                    .patch(
                        &super::token_name(i),
                        &PatchParams::default(),
                        &Patch::Merge(&patch),
                    )
                    .await
                    .unwrap_or_else(|e| panic!("annotate AudienceToken {i}: {e}"));
            }
        })
        .buffer_unordered(WRITERS)
        .collect::<Vec<_>>()
        .await;
    let renewed = |obj: &Value| obj["status"]["lastRenewRequestedAt"] == stamp && is_ready(obj);
    poll_until("every AudienceToken renewed", timeout, || {
        let client = client.clone();
        let namespace = namespace.clone();
        async move {
            let done = count(&client, &namespace, renewed).await;
            (done == n, format!("{done}/{n} renewed"))
        }
    })
    .await;
    let renewal_wave = started.elapsed();
    let renew_requests = env.idp.token_requests().await.total;
    let (rss_renewed, hwm_renewed) = memory(new_pid).expect("operator memory");
    operator.stop().await;

    // The floor, with the operator stopped, on AudienceTokens created untimed.
    let mut floors = Vec::new();
    for (floor_ns, calls) in [
        (&floor_namespace, FloorCalls::Minimal),
        (&floor_op_namespace, FloorCalls::LikeOperator),
    ] {
        let uids = create_tokens(&client, floor_ns, n).await;
        let floor = Floor {
            kube: kube_config.clone(),
            endpoint: token_endpoint.clone(),
            namespace: floor_ns.clone(),
            calls,
            events: mode.issuance_events,
        };
        let before = CpuSample::take(None, node_pid);
        let (elapsed, client_cpu) = run_floor(floor, uids).await;
        floors.push((
            elapsed,
            before.since(&CpuSample::take(None, node_pid), ticks),
            client_cpu,
        ));
    }

    let mut report = Report::default();
    report.title(&format!(
        "audience-token-operator scale benchmark on {label}: {n} AudienceTokens, Issued/Renewed Events {}",
        if mode.issuance_events { "on" } else { "off" }
    ));
    report.section("Machine");
    for (name, value) in machine_facts() {
        report.row(name, &value, "");
    }
    report.section("Cold issuance (AudienceTokens created through the API, 32 at a time)");
    report.row("created in", &secs(created_in), "");
    report.row(
        "all Ready after",
        &format!("{} = {:.0} tokens/s", secs(cold), per_second(n, cold)),
        "",
    );
    report.row("  CPU meanwhile", &cpu_cold, "");
    report.row(
        "token requests",
        &cold_requests.to_string(),
        "one per token",
    );
    report.section("Memory of the operator process (VmRSS)");
    report.row("before any AudienceToken", &mib(rss_empty), "");
    report.row("all Ready", &mib(rss_ready), "target <= 64 MiB");
    report.row("after the idle time", &mib(rss_idle), "");
    report.row(
        "restarted, all ready again",
        &format!("{} (peak {})", mib(rss_restarted), mib(hwm_restarted)),
        "",
    );
    report.row(
        "after renewing every token",
        &format!("{} (peak {})", mib(rss_renewed), mib(hwm_renewed)),
        "",
    );
    report.section("Restart and renewal");
    report.row(
        "restart: all series ready after",
        &secs(restarted_in),
        "within seconds",
    );
    report.row(
        "restart: token requests",
        &restart_requests.to_string(),
        "0",
    );
    report.row(
        "forced renewal of all",
        &format!(
            "{} = {:.0} tokens/s, {renew_requests} requests",
            secs(renewal_wave),
            per_second(n, renewal_wave)
        ),
        "",
    );
    report.section("The floor (same servers, same concurrency)");
    report.row(
        "minimal client: POST + Secret apply + status patch",
        &format!(
            "{:.0} tokens/s ({})",
            per_second(n, floors[0].0),
            secs(floors[0].0)
        ),
        "",
    );
    report.row("  CPU meanwhile", &floors[0].1, "");
    report.row(
        "  the client's own CPU (its thread)",
        &format!("{:.1} s", floors[0].2),
        "",
    );
    report.row(
        "minimal client making the operator's calls",
        &format!(
            "{:.0} tokens/s ({})",
            per_second(n, floors[1].0),
            secs(floors[1].0)
        ),
        "",
    );
    report.row("  CPU meanwhile", &floors[1].1, "");
    report.row(
        "  the client's own CPU (its thread)",
        &format!("{:.1} s", floors[1].2),
        "",
    );
    if let Some(operator_cpu) = operator_cpu_cold {
        report.row(
            "operator CPU, cold issuance",
            &format!(
                "{operator_cpu:.1} s = {:.1}x the minimal client's",
                operator_cpu / floors[0].2.max(1e-9)
            ),
            "target <= 1.5x",
        );
    }
    report.row(
        "operator cold issuance",
        &format!(
            "{:.0}% of the minimal client, {:.0}% of the operator-like one",
            100.0 * per_second(n, cold) / per_second(n, floors[0].0),
            100.0 * per_second(n, cold) / per_second(n, floors[1].0)
        ),
        "target >= 80%",
    );
    report.text("  API calls per token: not counted on a real cluster (see the API-double run)\n");
    println!("{}", report.out);

    assert_eq!(
        cold_requests, n as u64,
        "one token request per AudienceToken"
    );
    assert_eq!(restart_requests, 0, "a restart makes no token requests");
    let namespaces: Api<Namespace> = Api::all(client.clone());
    for name in [&namespace, &floor_namespace, &floor_op_namespace] {
        if let Err(e) = namespaces.delete(name, &DeleteParams::default()).await {
            eprintln!("[scale] could not delete namespace {name}: {e}; delete it by hand");
        }
    }
    drop(double);
}
