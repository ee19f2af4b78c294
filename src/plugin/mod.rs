//! `kubectl audtoken`: the kubectl plugin, built into the same binary. Installed (or linked)
//! on `PATH` as `kubectl-audtoken`, the binary runs this instead of the operator's commands
//! (`main` looks at the name it was called by), so `kubectl audtoken status orders` works.
//!
//! It talks to the cluster with the user's kubeconfig and permissions only: get, list and
//! patch on AudienceTokens, get on issuers, list on Events, and get on the token's Secret for
//! `inspect` (a user who may not read the Secret still gets `status`). It never prints a
//! token.
//!
//! Exit codes, for scripts: [`exit`].

mod inspect;
mod list;
mod renew;
mod status;

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Args, Parser, Subcommand, ValueEnum};
use jiff::Timestamp;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, ListParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use serde::Serialize;

use crate::api::{AudienceToken, Condition};

/// The name the binary answers to as a kubectl plugin.
pub const PLUGIN_NAME: &str = "kubectl-audtoken";

/// Exit codes of the plugin's commands.
pub mod exit {
    /// Healthy: Ready, the last attempt succeeded (or, for `inspect`, the token is what
    /// the AudienceToken asked for).
    pub const HEALTHY: u8 = 0;
    /// The command itself failed: bad arguments, not found, forbidden, unreachable.
    pub const ERROR: u8 = 1;
    /// Not Ready.
    pub const NOT_READY: u8 = 2;
    /// Ready (a valid token is kept) but the last attempt to renew it failed.
    pub const FAILING: u8 = 3;
    /// `inspect`: the token in the Secret is not what the AudienceToken asks for.
    pub const MISMATCH: u8 = 4;
    /// `renew --wait`: no new token and no failure within `--timeout`.
    pub const TIMEOUT: u8 = 5;
}

/// Whether `program` (a path, as in `argv[0]`) names the plugin.
pub fn called_as_plugin(program: &std::ffi::OsStr) -> bool {
    std::path::Path::new(program)
        .file_name()
        .and_then(|name| name.to_str())
        .is_some_and(|name| name == PLUGIN_NAME || name.starts_with("kubectl-audtoken."))
}

/// `kubectl audtoken`: the everyday AudienceToken tasks, one command each.
#[derive(Parser)]
#[command(
    name = "kubectl audtoken",
    bin_name = "kubectl audtoken",
    version,
    about = "Everyday AudienceToken tasks: why is it (not) Ready, renew it now, what is in its token, list them",
    after_help = "Exit codes: 0 healthy; 1 the command failed (not found, forbidden, unreachable); 2 not Ready; 3 Ready but the last renewal failed; 4 (inspect) the token is not what was asked for; 5 (renew --wait) timed out."
)]
pub struct PluginCli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: PluginCommand,
}

/// kubectl's connection and output flags.
#[derive(Args, Clone)]
struct Global {
    /// The namespace [default: the kubeconfig context's, else `default`].
    #[arg(short = 'n', long, global = true)]
    namespace: Option<String>,
    /// The kubeconfig file [default: $KUBECONFIG, else ~/.kube/config].
    #[arg(long, global = true)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context [default: the current one].
    #[arg(long, global = true)]
    context: Option<String>,
    /// Output format.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// How results are printed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Output {
    /// For people.
    Table,
    /// For scripts.
    Json,
    /// For scripts.
    Yaml,
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Why an AudienceToken is or is not Ready: its issuer, audience, scopes, token type,
    /// issued/expires/renewal times, failures and the next attempt, and recent Events of
    /// the token and its issuer.
    Status {
        /// The AudienceToken.
        name: String,
    },
    /// Ask for a new token now (sets `audiencetoken.io/renew-requested-at`), and with
    /// `--wait`, wait until it is published or the failure shows.
    Renew(renew::RenewArgs),
    /// The decoded header and claims of the token in the Secret (`aud`, `scope`, `exp`,
    /// `cnf`, issuer), never the token itself, and whether it is what the AudienceToken
    /// asks for.
    Inspect {
        /// The AudienceToken.
        name: String,
    },
    /// AudienceTokens with the columns of `kubectl get audtoken`, plus the time left.
    List(list::ListArgs),
}

/// Runs the plugin with these arguments (`args[0]` is the program) and returns its exit
/// code; errors are printed to stderr as `error: …`.
pub async fn run(args: Vec<std::ffi::OsString>) -> u8 {
    let cli = match PluginCli::try_parse_from(args) {
        Ok(cli) => cli,
        Err(e) => {
            // --help and --version are "errors" that print to stdout and succeed.
            let code = if e.use_stderr() {
                exit::ERROR
            } else {
                exit::HEALTHY
            };
            let _ = e.print();
            return code;
        }
    };
    match execute(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            exit::ERROR
        }
    }
}

async fn execute(cli: PluginCli) -> anyhow::Result<u8> {
    let (client, namespace) = connect(&cli.global).await?;
    let ctx = Ctx {
        client,
        namespace,
        output: cli.global.output,
        now: Timestamp::now(),
    };
    match cli.command {
        PluginCommand::Status { name } => status::run(&ctx, &name).await,
        PluginCommand::Renew(args) => renew::run(&ctx, args).await,
        PluginCommand::Inspect { name } => inspect::run(&ctx, &name).await,
        PluginCommand::List(args) => list::run(&ctx, args).await,
    }
}

/// What every command needs.
struct Ctx {
    client: Client,
    /// `-n`, else the kubeconfig context's namespace.
    namespace: String,
    output: Output,
    /// When the command started: relative times are counted from it.
    now: Timestamp,
}

impl Ctx {
    /// AudienceToken `name` of the namespace.
    async fn token(&self, name: &str) -> anyhow::Result<AudienceToken> {
        let api: Api<AudienceToken> = Api::namespaced(self.client.clone(), &self.namespace);
        api.get(name)
            .await
            .map_err(|e| api_error(&format!("AudienceToken {}/{name}", self.namespace), e))
    }

    /// The AudienceTokens of the namespace (or of all, with `all_namespaces`), those with
    /// the labels of `selector` if given.
    async fn tokens(
        &self,
        all_namespaces: bool,
        selector: Option<&str>,
    ) -> anyhow::Result<Vec<AudienceToken>> {
        let api: Api<AudienceToken> = if all_namespaces {
            Api::all(self.client.clone())
        } else {
            Api::namespaced(self.client.clone(), &self.namespace)
        };
        let mut params = ListParams::default();
        if let Some(selector) = selector {
            params = params.labels(selector);
        }
        let list = api
            .list(&params)
            .await
            .map_err(|e| api_error("listing AudienceTokens", e))?;
        Ok(list.items)
    }
}

/// The client and namespace from the user's kubeconfig (or in-cluster config), as kubectl
/// picks them.
async fn connect(global: &Global) -> anyhow::Result<(Client, String)> {
    let options = KubeConfigOptions {
        context: global.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match (&global.kubeconfig, &global.context) {
        (Some(path), _) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kubeconfig, &options)
                .await
                .with_context(|| format!("using kubeconfig {}", path.display()))?
        }
        (None, Some(_)) => Config::from_kubeconfig(&options)
            .await
            .context("using the kubeconfig context")?,
        (None, None) => Config::infer()
            .await
            .context("no kubeconfig or in-cluster configuration found")?,
    };
    let namespace = global
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).context("building the Kubernetes client")?;
    Ok((client, namespace))
}

/// Prints `value` as JSON or YAML (for `-o json|yaml`).
fn print_structured<T: Serialize>(output: Output, value: &T) -> anyhow::Result<()> {
    match output {
        Output::Json => println!("{}", serde_json::to_string_pretty(value)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(value)?),
        Output::Table => anyhow::bail!("not a structured output format"),
    }
    Ok(())
}

/// A Kubernetes API error, said the way kubectl says it (`… not found`, `forbidden`).
fn api_error(what: &str, error: kube::Error) -> anyhow::Error {
    match &error {
        kube::Error::Api(status) => anyhow::anyhow!("{what}: {}", status.message),
        _ => anyhow::Error::new(error).context(what.to_string()),
    }
}

/// The `Ready` condition.
fn ready_condition(conditions: &[Condition]) -> Option<&Condition> {
    conditions.iter().find(|c| c.type_ == "Ready")
}

/// `2026-12-01T18:00:00Z (in 35m)`.
fn absolute_and_relative(at: &Time, now: Timestamp) -> String {
    format!("{} ({})", seconds(at.0), relative(at.0, now))
}

/// RFC 3339 with whole seconds.
fn seconds(at: Timestamp) -> String {
    crate::secret::rfc3339(at)
}

/// `in 35m`, `5m ago`, `now`.
fn relative(at: Timestamp, now: Timestamp) -> String {
    let diff = at.as_second() - now.as_second();
    if diff == 0 {
        return "now".into();
    }
    let span = short_duration(diff.unsigned_abs());
    if diff > 0 {
        format!("in {span}")
    } else {
        format!("{span} ago")
    }
}

/// `45s`, `35m`, `2h5m`, `3d4h`: the two largest units, as kubectl's ages.
fn short_duration(seconds: u64) -> String {
    let (days, hours, minutes, secs) = (
        seconds / 86_400,
        seconds % 86_400 / 3_600,
        seconds % 3_600 / 60,
        seconds % 60,
    );
    match (days, hours, minutes) {
        (0, 0, 0) => format!("{secs}s"),
        (0, 0, m) if m < 10 && secs > 0 => format!("{m}m{secs}s"),
        (0, 0, m) => format!("{m}m"),
        (0, h, 0) => format!("{h}h"),
        (0, h, m) => format!("{h}h{m}m"),
        (d, 0, _) => format!("{d}d"),
        (d, h, _) => format!("{d}d{h}h"),
    }
}

/// A plain-text table: columns padded to their widest cell, three spaces apart.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, (cell, width)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                out.push_str(cell);
            } else {
                out.push_str(&format!("{cell:<width$}   "));
            }
        }
        out.trim_end().to_string()
    };
    let mut out = line(header.to_vec());
    for row in rows {
        out.push('\n');
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}

/// One Event, as `status` shows it.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct EventLine {
    #[serde(rename = "type")]
    type_: String,
    reason: String,
    /// When it last happened.
    last_seen: Option<String>,
    count: i32,
    note: String,
}

/// The newest Events about the object with this uid (events.k8s.io, which the operator
/// publishes), newest first, at most `limit`.
async fn events_about(
    client: &Client,
    namespace: &str,
    uid: &str,
    limit: usize,
) -> anyhow::Result<Vec<EventLine>> {
    let api: Api<Event> = Api::namespaced(client.clone(), namespace);
    let params = ListParams::default().fields(&format!("regarding.uid={uid}"));
    let events = api
        .list(&params)
        .await
        .map_err(|e| api_error("listing Events", e))?;
    let mut lines: Vec<(Timestamp, EventLine)> = events
        .items
        .into_iter()
        .map(|event| {
            let last = event
                .series
                .as_ref()
                .map(|s| s.last_observed_time.0)
                .or(event.event_time.as_ref().map(|t| t.0))
                .or(event.deprecated_last_timestamp.as_ref().map(|t| t.0))
                .or(event.metadata.creation_timestamp.as_ref().map(|t| t.0))
                .unwrap_or(Timestamp::UNIX_EPOCH);
            let count = event
                .series
                .as_ref()
                .map_or(event.deprecated_count.unwrap_or(1), |s| s.count);
            (
                last,
                EventLine {
                    type_: event.type_.unwrap_or_default(),
                    reason: event.reason.unwrap_or_default(),
                    last_seen: (last != Timestamp::UNIX_EPOCH).then(|| seconds(last)),
                    count,
                    note: event.note.unwrap_or_default(),
                },
            )
        })
        .collect();
    lines.sort_by_key(|line| std::cmp::Reverse(line.0));
    lines.truncate(limit);
    Ok(lines.into_iter().map(|(_, line)| line).collect())
}

/// The Events as a table, with ages.
fn events_table(events: &[EventLine], now: Timestamp) -> String {
    let rows: Vec<Vec<String>> = events
        .iter()
        .map(|e| {
            let age = e
                .last_seen
                .as_deref()
                .and_then(|t| t.parse::<Timestamp>().ok())
                .map_or_else(|| "-".into(), |t| relative(t, now));
            let reason = if e.count > 1 {
                format!("{} (x{})", e.reason, e.count)
            } else {
                e.reason.clone()
            };
            vec![age, e.type_.clone(), reason, e.note.clone()]
        })
        .collect();
    table(&["LAST SEEN", "TYPE", "REASON", "MESSAGE"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_binary_is_a_plugin_only_under_the_plugin_name() {
        for name in [
            "kubectl-audtoken",
            "/usr/local/bin/kubectl-audtoken",
            "kubectl-audtoken.exe",
        ] {
            assert!(called_as_plugin(name.as_ref()), "{name}");
        }
        for name in [
            "audience-token-operator",
            "/bin/kubectl",
            "kubectl-audtokens",
        ] {
            assert!(!called_as_plugin(name.as_ref()), "{name}");
        }
    }

    #[test]
    fn times_read_like_kubectl_ages() {
        let now = Timestamp::from_second(1_800_000_000).unwrap();
        let at = |offset: i64| Timestamp::from_second(1_800_000_000 + offset).unwrap();
        assert_eq!(relative(at(0), now), "now");
        assert_eq!(relative(at(45), now), "in 45s");
        assert_eq!(relative(at(-300), now), "5m ago");
        assert_eq!(relative(at(125), now), "in 2m5s");
        assert_eq!(relative(at(2_100), now), "in 35m");
        assert_eq!(relative(at(7_500), now), "in 2h5m");
        assert_eq!(relative(at(-3_600), now), "1h ago");
        assert_eq!(relative(at(3 * 86_400 + 4 * 3_600 + 60), now), "in 3d4h");
    }

    #[test]
    fn tables_pad_columns_to_the_widest_cell() {
        let out = table(
            &["NAME", "READY"],
            &[
                vec!["orders".into(), "True".into()],
                vec!["a".into(), "False".into()],
            ],
        );
        assert_eq!(out, "NAME     READY\norders   True\na        False");
    }
}
