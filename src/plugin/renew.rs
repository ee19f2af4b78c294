//! `kubectl audtoken renew NAME… | --all [-l selector]`: sets
//! `audiencetoken.io/renew-requested-at` to now, and with `--wait` waits until each token's
//! status shows that value acted on: a new token published, or the failure.

use std::time::Duration;

use anyhow::Context as _;
use clap::Args;
use kube::ResourceExt;
use kube::api::{Api, Patch, PatchParams};
use serde::Serialize;

use super::status::Health;
use super::{Ctx, Output, api_error, exit, print_structured, ready_condition, table};
use crate::api::{AudienceToken, RENEW_REQUESTED_AT_ANNOTATION, parse_duration};

/// How often `--wait` looks.
const POLL: Duration = Duration::from_millis(500);

#[derive(Args)]
pub(super) struct RenewArgs {
    /// The AudienceTokens to renew.
    #[arg(required_unless_present = "all")]
    names: Vec<String>,
    /// Renew every AudienceToken in the namespace (with -A: in every namespace), or those
    /// `-l` selects.
    #[arg(long, conflicts_with = "names")]
    all: bool,
    /// Only AudienceTokens with these labels (with --all), e.g. `-l team=shop`.
    #[arg(short = 'l', long, requires = "all")]
    selector: Option<String>,
    /// With --all: in every namespace.
    #[arg(short = 'A', long, requires = "all")]
    all_namespaces: bool,
    /// Wait until each new token is published or its failure shows.
    #[arg(long)]
    wait: bool,
    /// How long --wait waits, e.g. `30s`, `2m`.
    #[arg(long, default_value = "2m")]
    timeout: String,
}

/// One token's outcome (also the `-o json|yaml` items).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Renewal {
    namespace: String,
    name: String,
    requested_at: String,
    /// `requested`, or with --wait: `renewed`, `failed`, `timedOut`.
    outcome: &'static str,
    /// The Ready condition's reason and message once the request was acted on.
    reason: Option<String>,
    message: Option<String>,
}

pub(super) async fn run(ctx: &Ctx, args: RenewArgs) -> anyhow::Result<u8> {
    if !args.all && args.names.is_empty() {
        anyhow::bail!("name the AudienceTokens to renew, or use --all");
    }
    let timeout = parse_duration(&args.timeout).context("--timeout")?;
    let targets = targets(ctx, &args).await?;
    if targets.is_empty() {
        eprintln!("no AudienceTokens found");
        return Ok(exit::HEALTHY);
    }
    // A new value each time (to the nanosecond), so two renewals in one second both count.
    let requested_at = jiff::Timestamp::now().to_string();
    let mut renewals = Vec::new();
    for (namespace, name) in targets {
        let api: Api<AudienceToken> = Api::namespaced(ctx.client.clone(), &namespace);
        let patch = serde_json::json!({"metadata": {"annotations": {
            RENEW_REQUESTED_AT_ANNOTATION: requested_at,
        }}});
        api.patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
            .await
            .map_err(|e| api_error(&format!("AudienceToken {namespace}/{name}"), e))?;
        renewals.push(Renewal {
            namespace,
            name,
            requested_at: requested_at.clone(),
            outcome: "requested",
            reason: None,
            message: None,
        });
    }
    if args.wait {
        wait(ctx, &mut renewals, timeout).await?;
    }
    let code = renewals
        .iter()
        .map(|r| match r.outcome {
            "requested" | "renewed" => exit::HEALTHY,
            "failed" => exit::FAILING,
            "notReady" => exit::NOT_READY,
            _ => exit::TIMEOUT,
        })
        .max()
        .unwrap_or(exit::HEALTHY);
    match ctx.output {
        Output::Table => {
            let rows: Vec<Vec<String>> = renewals
                .iter()
                .map(|r| {
                    vec![
                        r.namespace.clone(),
                        r.name.clone(),
                        r.outcome.to_string(),
                        match (&r.reason, &r.message) {
                            (Some(reason), Some(message)) => format!("{reason}: {message}"),
                            _ => String::new(),
                        },
                    ]
                })
                .collect();
            println!(
                "{}",
                table(&["NAMESPACE", "NAME", "OUTCOME", "STATUS"], &rows)
            );
        }
        structured => print_structured(structured, &renewals)?,
    }
    Ok(code)
}

/// (namespace, name) of each AudienceToken to renew.
async fn targets(ctx: &Ctx, args: &RenewArgs) -> anyhow::Result<Vec<(String, String)>> {
    if !args.all {
        return Ok(args
            .names
            .iter()
            .map(|name| (ctx.namespace.clone(), name.clone()))
            .collect());
    }
    let tokens = ctx
        .tokens(args.all_namespaces, args.selector.as_deref())
        .await?;
    Ok(tokens
        .iter()
        .map(|t| (t.namespace().unwrap_or_default(), t.name_any()))
        .collect())
}

/// Polls each AudienceToken until its status has acted on the request, or `timeout`.
async fn wait(ctx: &Ctx, renewals: &mut [Renewal], timeout: Duration) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let mut pending = 0;
        for renewal in renewals.iter_mut().filter(|r| r.outcome == "requested") {
            let api: Api<AudienceToken> = Api::namespaced(ctx.client.clone(), &renewal.namespace);
            let token = api.get(&renewal.name).await.map_err(|e| {
                api_error(
                    &format!("AudienceToken {}/{}", renewal.namespace, renewal.name),
                    e,
                )
            })?;
            let status = token.status.clone().unwrap_or_default();
            if status.last_renew_requested_at.as_deref() != Some(renewal.requested_at.as_str()) {
                pending += 1;
                continue;
            }
            let ready = ready_condition(&status.conditions);
            renewal.reason = ready.map(|c| c.reason.clone());
            renewal.message = ready.map(|c| c.message.clone());
            renewal.outcome = match Health::of(&token) {
                Health::Healthy => "renewed",
                Health::Failing => "failed",
                Health::NotReady => "notReady",
            };
        }
        if pending == 0 {
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            for renewal in renewals.iter_mut().filter(|r| r.outcome == "requested") {
                renewal.outcome = "timedOut";
            }
            return Ok(());
        }
        tokio::time::sleep(POLL).await;
    }
}
