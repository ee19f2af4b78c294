//! The `audience-token-operator` binary: flags, logging, and a call into the library.

use std::io::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use audience_token_operator::leader::{self, LeaseSettings, Shutdown};
use audience_token_operator::server::{self, Health, Leadership};
use audience_token_operator::telemetry::Metrics;
use audience_token_operator::{api, controller, debug_token, dpop_proof, rbac};
use clap::{Parser, Subcommand, ValueEnum};
use futures::FutureExt as _;

// jemalloc, not glibc's malloc: at 10,000 tokens it held RSS within 64 MiB through a
// restart and a renewal wave where glibc's arenas did not, for less CPU per token
// (docs/performance.md, session 7).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Parser)]
#[command(
    version,
    about = "Issues single-audience OAuth 2.0 access tokens into Kubernetes Secrets"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the operator against the cluster of the kubeconfig or the in-cluster config.
    Run(RunArgs),
    /// Print the CustomResourceDefinitions (what `crds/` holds).
    Crds {
        /// Write one file per CRD into this directory instead of printing.
        #[arg(long)]
        write_dir: Option<PathBuf>,
    },
    /// Make one token request from an issuer manifest, without a cluster (debugging).
    ///
    /// Prints the response metadata, the operator's single-audience check and the decoded
    /// JWT header and claims; the access token only with --show-token.
    #[command(after_help = TOKEN_AFTER_HELP)]
    Token(TokenArgs),
    /// Log in as a person to bootstrap an issuer's refresh-token chain.
    ///
    /// Runs the authorization-code flow (PKCE S256; PAR when the server has it) for every
    /// resource of grant.refreshToken.resources with offline_access, at a loopback redirect
    /// URI on 127.0.0.1, and writes the refresh token into the issuer's bootstrap Secret
    /// (through the current kubeconfig) or a file. Prints who logged in and what was
    /// granted; never the tokens.
    #[command(after_help = LOGIN_AFTER_HELP)]
    Login(LoginArgs),
    /// Print, as JSON, the Kubernetes permissions the operator uses (what the Helm chart's
    /// RBAC grants): cluster-wide rules have `"namespace": null`.
    Rbac(RbacArgs),
    /// Print a DPoP proof (RFC 9449) for one API call, from a mounted DPoP token Secret.
    ///
    /// For example: curl -H "Authorization: DPoP $(cat /var/run/token/token)"
    /// -H "DPoP: $(audience-token-operator dpop-proof --secret-dir /var/run/token
    /// --method GET --url https://api.example.com/orders)" https://api.example.com/orders
    DpopProof(DpopProofArgs),
}

const LOGIN_AFTER_HELP: &str = "\
The client authenticates as in the token command: --client-secret-file or ATO_CLIENT_SECRET,
--private-key-file or ATO_PRIVATE_KEY.

Example:
  ATO_CLIENT_SECRET=... audience-token-operator login -f token-issuer-refresh.yaml \\
      --scope orders/read --scope payments/read";

#[derive(clap::Args)]
struct LoginArgs {
    /// TokenIssuer or ClusterTokenIssuer manifest (grant.type RefreshToken), YAML or JSON;
    /// `-` reads stdin.
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    file: PathBuf,
    /// A scope to ask for besides offline_access (and openid at an OpenID provider);
    /// repeat the flag or separate scopes with spaces.
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    /// The port of the redirect URI http://127.0.0.1:PORT/callback, for servers that
    /// register a fixed one [default: an ephemeral port].
    #[arg(long, value_name = "PORT", default_value_t = 0)]
    redirect_port: u16,
    /// Push the authorization request (RFC 9126) even if the server does not require it
    /// [default: whenever discovery names a PAR endpoint].
    #[arg(long)]
    par: bool,
    /// Do not try to open a browser; only print the URL.
    #[arg(long)]
    no_browser: bool,
    /// How long to wait for the login in the browser, e.g. `10m`.
    #[arg(long, value_name = "DURATION", value_parser = api::parse_duration, default_value = "5m")]
    timeout: Duration,
    /// Write the refresh token to this file (mode 0600) instead of the bootstrap Secret.
    #[arg(long, value_name = "FILE")]
    output: Option<PathBuf>,
    /// The namespace of the bootstrap Secret [default: the TokenIssuer's, else the
    /// kubeconfig context's]; required for a ClusterTokenIssuer (its cluster resource
    /// namespace).
    #[arg(short = 'n', long)]
    namespace: Option<String>,
    /// RFC 9396 authorization_details (a JSON array) for the authorization request.
    #[arg(long, value_name = "FILE")]
    authorization_details: Option<PathBuf>,
    /// File holding the client secret [default: env ATO_CLIENT_SECRET].
    #[arg(long, value_name = "PATH")]
    client_secret_file: Option<PathBuf>,
    /// File holding the private key (PrivateKeyJWT) [default: env ATO_PRIVATE_KEY].
    #[arg(long, value_name = "PATH")]
    private_key_file: Option<PathBuf>,
    /// Output format of the report.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Text)]
    format: OutputFormat,
}

#[derive(clap::Args)]
struct DpopProofArgs {
    /// The directory the token Secret is mounted in (it holds `token` and `dpop-private-key`).
    #[arg(long)]
    secret_dir: PathBuf,
    /// The HTTP method of the call.
    #[arg(long, default_value = "GET")]
    method: String,
    /// The URL of the call (query and fragment are left out of the proof's `htu`).
    #[arg(long)]
    url: String,
    /// The nonce the API asked for in a `DPoP-Nonce` header.
    #[arg(long)]
    nonce: Option<String>,
}

#[derive(clap::Args)]
struct RbacArgs {
    /// The namespace `run --namespace` will watch (default: all namespaces).
    #[arg(long)]
    namespace: Option<String>,
    /// The namespace the operator runs in (its Lease lives there).
    #[arg(long)]
    operator_namespace: String,
    /// `run --cluster-resource-namespace` [default: the operator namespace].
    #[arg(long)]
    cluster_resource_namespace: Option<String>,
    /// `run --leader-elect`.
    #[arg(long)]
    leader_elect: bool,
}

const TOKEN_AFTER_HELP: &str = "\
Credentials (the issuer's clientSecretRef/privateKeyRef name Secrets this command cannot read):
  client secret: --client-secret-file, else the ATO_CLIENT_SECRET environment variable
  private key:   --private-key-file, else the ATO_PRIVATE_KEY environment variable
  ServiceAccount token (ServiceAccountToken, TokenExchange): --service-account-token-file,
                 else ATO_SERVICE_ACCOUNT_TOKEN; make one with `kubectl create token`
  One trailing newline is removed from files. Credentials are never printed.

Exit status: 0 the operator would accept the token; 1 error (bad manifest, missing
credentials, discovery failure, OAuth error from the server); 2 usage error; 3 a token was
issued but the operator would refuse it (audience check FAIL, already expired).

Example:
  ATO_CLIENT_SECRET=... audience-token-operator token -f issuer.yaml \\
      --resource https://orders.example.com --scope orders/read";

#[derive(clap::Args)]
struct TokenArgs {
    /// TokenIssuer or ClusterTokenIssuer manifest, YAML or JSON; `-` reads stdin. The first
    /// issuer in a multi-document file is used.
    #[arg(short = 'f', long = "file", value_name = "PATH")]
    file: PathBuf,
    /// The resource (API) to ask a token for.
    #[arg(long)]
    resource: String,
    /// The `aud` the token must carry [default: the resource].
    #[arg(long)]
    audience: Option<String>,
    /// A scope to request; repeat the flag or separate scopes with spaces.
    #[arg(long = "scope", value_name = "SCOPE")]
    scopes: Vec<String>,
    /// File holding the client secret (ClientSecretBasic, ClientSecretPost) [default: env
    /// ATO_CLIENT_SECRET].
    #[arg(long, value_name = "PATH")]
    client_secret_file: Option<PathBuf>,
    /// File holding the private key (PrivateKeyJWT) [default: env ATO_PRIVATE_KEY].
    #[arg(long, value_name = "PATH")]
    private_key_file: Option<PathBuf>,
    /// File holding a ServiceAccount token (`kubectl create token NAME --audience A`), for
    /// clientAuth.method ServiceAccountToken and the TokenExchange grant [default: env
    /// ATO_SERVICE_ACCOUNT_TOKEN].
    #[arg(long, value_name = "PATH")]
    service_account_token_file: Option<PathBuf>,
    /// File holding the client certificate (PEM, with its chain), for an issuer with
    /// tlsClientCertificate: the Secret's tls.crt.
    #[arg(long, value_name = "PATH", requires = "client_key_file")]
    client_certificate_file: Option<PathBuf>,
    /// File holding the client certificate's private key (PEM): the Secret's tls.key.
    #[arg(long, value_name = "PATH", requires = "client_certificate_file")]
    client_key_file: Option<PathBuf>,
    /// Timeout of discovery and of the token request, e.g. `30s` [default: the issuer's
    /// requestTimeout, else 10s].
    #[arg(long, value_name = "DURATION", value_parser = api::parse_duration)]
    timeout: Option<Duration>,
    /// Also print the access token.
    #[arg(long)]
    show_token: bool,
    /// Ask for a DPoP-bound token (RFC 9449), with a new key of this algorithm: ES256,
    /// ES384, PS256 or RS256. The report shows the key's thumbprint and the token's `cnf`.
    #[arg(long, value_name = "ALG", value_parser = parse_dpop_algorithm)]
    dpop: Option<audience_token_operator::oauth::dpop::DpopAlgorithm>,
    /// Send RFC 9396 authorization details (a JSON array in this file), where the issuer's
    /// authorizationDetailsIn says; the report shows what the server granted.
    #[arg(long, value_name = "FILE")]
    authorization_details: Option<PathBuf>,
    /// Output format.
    #[arg(long, short = 'o', value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum OutputFormat {
    Text,
    Json,
}

#[derive(clap::Args)]
struct RunArgs {
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "ATO_NAMESPACE")]
    namespace: Option<String>,
    /// Namespace of the Secrets that ClusterTokenIssuers reference (default: the
    /// operator's own namespace).
    #[arg(long, env = "ATO_CLUSTER_RESOURCE_NAMESPACE")]
    cluster_resource_namespace: Option<String>,
    /// AudienceTokens reconciled at once.
    #[arg(long, env = "ATO_CONCURRENCY", default_value_t = 16)]
    concurrency: u16,
    /// Publish a Normal Event (Issued, Renewed) for each token written, as cert-manager
    /// does: one API write per issuance and renewal. `false` leaves only Warnings.
    #[arg(long, env = "ATO_ISSUANCE_EVENTS", default_value_t = true, action = clap::ArgAction::Set)]
    issuance_events: bool,
    /// Threads that run the operator's async work (reconciles, watches, HTTP). One issued
    /// 800-1,170 tokens a second on a 2-CPU test machine, where the OAuth server was the
    /// limit, for the least CPU per token; raise it when that thread is measured busy.
    #[arg(long, env = "ATO_WORKER_THREADS", default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    worker_threads: u16,
    /// Log format.
    #[arg(long, env = "ATO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    /// Run as one of several replicas: only the holder of a Lease requests tokens and writes.
    #[arg(long, env = "ATO_LEADER_ELECT")]
    leader_elect: bool,
    /// Name of the leader-election Lease (in the operator's namespace).
    #[arg(
        long,
        env = "ATO_LEADER_ELECT_LEASE_NAME",
        default_value = "audience-token-operator"
    )]
    leader_elect_lease_name: String,
    /// How long the Lease holds without renewal: a standby takes over at most this long
    /// after a leader stops renewing (at once when the leader shuts down cleanly).
    #[arg(long, env = "ATO_LEADER_ELECT_LEASE_DURATION", default_value = "15s", value_parser = api::parse_duration)]
    leader_elect_lease_duration: Duration,
    /// Where `/metrics` is served.
    #[arg(long, env = "ATO_METRICS_ADDR", default_value = "0.0.0.0:8080")]
    metrics_addr: SocketAddr,
    /// Where `/healthz` and `/readyz` are served (may equal --metrics-addr).
    #[arg(long, env = "ATO_HEALTH_ADDR", default_value = "0.0.0.0:8081")]
    health_addr: SocketAddr,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn parse_dpop_algorithm(
    name: &str,
) -> Result<audience_token_operator::oauth::dpop::DpopAlgorithm, String> {
    audience_token_operator::oauth::dpop::DpopAlgorithm::from_name(name).map_err(|e| e.to_string())
}

/// Where the service account's namespace is mounted in a pod.
const IN_CLUSTER_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

fn main() -> anyhow::Result<()> {
    // One process-wide rustls provider for kube and reqwest alike.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    // Installed or linked as `kubectl-audtoken`, the binary is the kubectl plugin.
    let args: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if args
        .first()
        .is_some_and(|program| audience_token_operator::plugin::called_as_plugin(program))
    {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        let code = runtime.block_on(audience_token_operator::plugin::run(args));
        std::process::exit(i32::from(code));
    }
    let cli = Cli::parse();
    let worker_threads = match &cli.command {
        Command::Run(args) => usize::from(args.worker_threads),
        _ => 1,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(worker_threads)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    // On the workers, not on this thread: the controllers' streams and the reconciles they
    // spawn then share a thread, instead of waking each other across two for every token.
    runtime.block_on(async move {
        match cli.command {
            Command::Run(args) => tokio::spawn(run(args))
                .await
                .context("the operator's main task failed")?,
            command => dispatch(command).await,
        }
    })
}

/// Runs one command (`main` spawns `run` onto the runtime's workers instead).
async fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Crds { write_dir: None } => {
            print!("{}", api::crds_yaml().context("rendering CRDs")?);
            Ok(())
        }
        Command::Crds {
            write_dir: Some(dir),
        } => {
            for (file, contents) in api::crd_files().context("rendering CRDs")? {
                let path = dir.join(file);
                std::fs::write(&path, contents)
                    .with_context(|| format!("writing {}", path.display()))?;
                println!("wrote {}", path.display());
            }
            Ok(())
        }
        Command::Run(args) => run(args).await,
        Command::Token(args) => token(args).await,
        Command::Login(args) => login(args).await,
        Command::DpopProof(args) => {
            let proof = dpop_proof::proof_from_secret_dir(
                &args.secret_dir,
                &args.method,
                &args.url,
                args.nonce.as_deref(),
            )?;
            println!("{proof}");
            Ok(())
        }
        Command::Rbac(args) => {
            let scope = rbac::Scope {
                watched: args.namespace,
                cluster_resource_namespace: args
                    .cluster_resource_namespace
                    .unwrap_or_else(|| args.operator_namespace.clone()),
                operator_namespace: args.operator_namespace,
                leader_elect: args.leader_elect,
            };
            let rules = rbac::required_rules(&scope);
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "rules": rules }))?
            );
            Ok(())
        }
    }
}

/// Exit status of `token` when a token came back but the operator would refuse it.
const TOKEN_REFUSED_EXIT: i32 = 3;

async fn token(args: TokenArgs) -> anyhow::Result<()> {
    let options = debug_token::Options {
        manifest: args.file,
        resource: args.resource,
        audience: args.audience,
        scopes: args.scopes,
        timeout: args.timeout,
        show_token: args.show_token,
        dpop: args.dpop,
        authorization_details: args.authorization_details,
        credentials: debug_token::CredentialSources::with_env(
            args.client_secret_file,
            args.private_key_file,
        )
        .with_client_certificate(args.client_certificate_file, args.client_key_file)
        .with_service_account_token(args.service_account_token_file),
    };
    let json = args.output == OutputFormat::Json;
    match debug_token::run(&options).await {
        Ok(report) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&report.to_json())?);
            } else {
                print!("{}", report.to_text());
            }
            if !report.passed() {
                std::io::stdout().flush()?;
                std::process::exit(TOKEN_REFUSED_EXIT);
            }
            Ok(())
        }
        Err(error) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&error.to_json())?);
            }
            Err(anyhow::anyhow!(debug_token::error_chain(&error)))
        }
    }
}

async fn login(args: LoginArgs) -> anyhow::Result<()> {
    let options = audience_token_operator::login::Options {
        manifest: args.file,
        scopes: args.scopes,
        redirect_port: args.redirect_port,
        par: args.par,
        open_browser: !args.no_browser,
        timeout: args.timeout,
        output: args.output,
        namespace: args.namespace,
        authorization_details: args.authorization_details,
        credentials: debug_token::CredentialSources::with_env(
            args.client_secret_file,
            args.private_key_file,
        ),
    };
    let mut say = |text: &str| eprintln!("{text}");
    let report = audience_token_operator::login::run(&options, &mut say)
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    if args.format == OutputFormat::Json {
        println!("{}", serde_json::to_string_pretty(&report.to_json())?);
    } else {
        print!("{}", report.to_text());
    }
    Ok(())
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    init_logging(args.log_format);
    let config = kube::Config::infer()
        .await
        .context("no kubeconfig or in-cluster configuration found")?;
    let own_namespace = std::fs::read_to_string(IN_CLUSTER_NAMESPACE_FILE)
        .map(|ns| ns.trim().to_string())
        .unwrap_or_else(|_| config.default_namespace.clone());
    let client = kube::Client::try_from(config).context("creating the Kubernetes client")?;
    let pod_name = std::env::var("POD_NAME").ok();
    let settings = controller::Settings {
        namespace: args.namespace,
        cluster_resource_namespace: args
            .cluster_resource_namespace
            .unwrap_or_else(|| own_namespace.clone()),
        concurrency: args.concurrency.max(1),
        instance: pod_name.clone(),
        issuance_events: args.issuance_events,
    };

    let metrics = Arc::new(Metrics::new());
    let health = Arc::new(Health::default());
    server::spawn(
        args.metrics_addr,
        args.health_addr,
        metrics.clone(),
        health.clone(),
    )
    .await
    .context("starting the metrics and health endpoints")?;
    let shutdown = shutdown_signal();
    let work = {
        let (client, metrics, health) = (client.clone(), metrics.clone(), health.clone());
        move |stop: Shutdown| controller::run(client, settings, metrics, health, stop)
    };

    if !args.leader_elect {
        health.set_leadership(Leadership::Leader);
        metrics.set_leader(true);
        return work(shutdown).await.context("controller failed");
    }
    let lease = LeaseSettings {
        name: args.leader_elect_lease_name,
        namespace: own_namespace,
        identity: pod_name.unwrap_or_else(fallback_identity),
        duration: args.leader_elect_lease_duration,
    };
    leader::run_as_leader(client, lease, health, metrics, shutdown, work)
        .await
        .context("leader election")?
        .context("controller failed")
}

/// Resolves at the first SIGTERM or SIGINT; a second one exits at once.
fn shutdown_signal() -> Shutdown {
    async {
        signal_received().await;
        tracing::info!("stop signal: finishing in-flight work, then stopping");
        tokio::spawn(async {
            signal_received().await;
            tracing::warn!("second stop signal: exiting now");
            std::process::exit(130);
        });
    }
    .boxed()
    .shared()
}

async fn signal_received() {
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => futures::future::pending::<()>().await,
        }
    };
    tokio::select! {
        () = terminate => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}

/// A Lease identity outside a pod (no POD_NAME): the host name and process id.
fn fallback_identity() -> String {
    let host = std::env::var("HOSTNAME")
        .ok()
        .or_else(|| std::fs::read_to_string("/etc/hostname").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "local".into());
    format!("{host}-{}", std::process::id())
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    // Colours only on a terminal (and without NO_COLOR): in a pod stdout is a file, and
    // `kubectl logs` and log pipelines would show every escape code. They also cost CPU on
    // every line.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stdout())
        && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
