//! The `audience-token-operator` binary: flags, logging, and a call into the library.

use std::path::PathBuf;

use anyhow::Context as _;
use audience_token_operator::{api, controller};
use clap::{Parser, Subcommand, ValueEnum};

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
    /// Log format.
    #[arg(long, env = "ATO_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

/// Where the service account's namespace is mounted in a pod.
const IN_CLUSTER_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    // One process-wide rustls provider for kube and reqwest alike.
    let _ = rustls::crypto::aws_lc_rs::default_provider().install_default();
    let cli = Cli::parse();
    match cli.command {
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
    }
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
    let settings = controller::Settings {
        namespace: args.namespace,
        cluster_resource_namespace: args.cluster_resource_namespace.unwrap_or(own_namespace),
        concurrency: args.concurrency.max(1),
        instance: std::env::var("POD_NAME").ok(),
    };
    controller::run(client, settings)
        .await
        .context("controller failed")
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
