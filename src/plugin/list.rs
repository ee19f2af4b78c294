//! `kubectl audtoken list`: the columns of `kubectl get audtoken`, plus the time left,
//! sorted by expiry (soonest first) unless asked otherwise.

use clap::{Args, ValueEnum};
use jiff::Timestamp;
use kube::ResourceExt;
use serde::Serialize;

use super::status::Health;
use super::{
    Ctx, Output, exit, print_structured, ready_condition, relative, seconds, short_duration, table,
};
use crate::api::AudienceToken;

#[derive(Args)]
pub(super) struct ListArgs {
    /// In every namespace.
    #[arg(short = 'A', long)]
    all_namespaces: bool,
    /// Only AudienceTokens with these labels, e.g. `-l team=shop`.
    #[arg(short = 'l', long)]
    selector: Option<String>,
    /// Sort order.
    #[arg(long, value_enum, default_value_t = SortBy::Expiry)]
    sort_by: SortBy,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum SortBy {
    /// Soonest expiry first; tokens without one last.
    Expiry,
    /// Namespace, then name.
    Name,
}

/// One row (also the `-o json|yaml` items).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Row {
    namespace: String,
    name: String,
    ready: String,
    reason: String,
    health: Health,
    resource: String,
    expires_at: Option<String>,
    renewal_time: Option<String>,
    /// Seconds until expiry (negative once expired).
    seconds_left: Option<i64>,
    created: Option<String>,
}

pub(super) async fn run(ctx: &Ctx, args: ListArgs) -> anyhow::Result<u8> {
    let tokens = ctx
        .tokens(args.all_namespaces, args.selector.as_deref())
        .await?;
    let mut rows: Vec<Row> = tokens.iter().map(|t| row(t, ctx.now)).collect();
    match args.sort_by {
        SortBy::Expiry => rows.sort_by_key(|r| {
            (
                r.seconds_left.is_none(),
                r.seconds_left,
                r.namespace.clone(),
                r.name.clone(),
            )
        }),
        SortBy::Name => rows.sort_by_key(|r| (r.namespace.clone(), r.name.clone())),
    }
    match ctx.output {
        Output::Table if rows.is_empty() => eprintln!("No AudienceTokens found."),
        Output::Table => println!("{}", text(&rows, args.all_namespaces, ctx.now)),
        structured => print_structured(structured, &rows)?,
    }
    Ok(exit::HEALTHY)
}

fn row(token: &AudienceToken, now: Timestamp) -> Row {
    let status = token.status.clone().unwrap_or_default();
    let ready = ready_condition(&status.conditions);
    let expires = status.expires_at.as_ref().map(|t| t.0);
    Row {
        namespace: token.namespace().unwrap_or_default(),
        name: token.name_any(),
        ready: ready.map_or_else(String::new, |c| c.status.clone()),
        reason: ready.map_or_else(String::new, |c| c.reason.clone()),
        health: Health::of(token),
        resource: token.spec.resource.clone(),
        expires_at: expires.map(seconds),
        renewal_time: status.renewal_time.as_ref().map(|t| seconds(t.0)),
        seconds_left: expires.map(|e| e.as_second() - now.as_second()),
        created: token
            .metadata
            .creation_timestamp
            .as_ref()
            .map(|t| seconds(t.0)),
    }
}

fn text(rows: &[Row], all_namespaces: bool, now: Timestamp) -> String {
    let mut header = vec![
        "NAME",
        "READY",
        "REASON",
        "RESOURCE",
        "EXPIRES",
        "RENEWAL",
        "TIME LEFT",
        "AGE",
    ];
    if all_namespaces {
        header.insert(0, "NAMESPACE");
    }
    let cells: Vec<Vec<String>> = rows
        .iter()
        .map(|r| {
            let dash = || "-".to_string();
            let left = r.seconds_left.map_or_else(dash, |s| {
                if s > 0 {
                    short_duration(s.unsigned_abs())
                } else {
                    "expired".into()
                }
            });
            let age = r
                .created
                .as_deref()
                .and_then(|c| c.parse::<Timestamp>().ok())
                .map_or_else(dash, |c| {
                    relative(c, now).trim_end_matches(" ago").to_string()
                });
            let mut row = vec![
                r.name.clone(),
                if r.ready.is_empty() {
                    dash()
                } else {
                    r.ready.clone()
                },
                if r.reason.is_empty() {
                    dash()
                } else {
                    r.reason.clone()
                },
                r.resource.clone(),
                r.expires_at.clone().unwrap_or_else(dash),
                r.renewal_time.clone().unwrap_or_else(dash),
                left,
                age,
            ];
            if all_namespaces {
                row.insert(0, r.namespace.clone());
            }
            row
        })
        .collect();
    table(&header, &cells)
}
