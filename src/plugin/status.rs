//! `kubectl audtoken status NAME`: why an AudienceToken is or is not Ready, in the spirit of
//! `cmctl status certificate`.

use crate::api::Condition;
use kube::api::Api;
use kube::{Client, ResourceExt};
use serde::Serialize;

use super::{
    Ctx, EventLine, Output, absolute_and_relative, api_error, events_about, events_table, exit,
    print_structured, ready_condition, seconds,
};
use crate::api::{AudienceToken, ClusterTokenIssuer, IssuerKind, TokenIssuer};
use crate::failure::reason;

/// How many Events of each object are shown.
const EVENTS: usize = 10;

/// The health of an AudienceToken, as the exit code says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub(super) enum Health {
    /// Ready, and the last attempt succeeded.
    Healthy,
    /// Ready (a valid token is kept), but the last attempt failed.
    Failing,
    /// Not Ready (no status yet counts).
    NotReady,
}

impl Health {
    /// The health `token`'s status shows: Ready True with reason Issued or Renewed is
    /// healthy (the last attempt succeeded); True with any other reason is a kept token
    /// whose renewal failed.
    pub(super) fn of(token: &AudienceToken) -> Health {
        let ready = token
            .status
            .as_ref()
            .and_then(|s| ready_condition(&s.conditions));
        match ready {
            Some(c)
                if c.status == "True"
                    && [reason::ISSUED, reason::RENEWED].contains(&c.reason.as_str()) =>
            {
                Health::Healthy
            }
            Some(c) if c.status == "True" => Health::Failing,
            _ => Health::NotReady,
        }
    }

    pub(super) fn exit_code(self) -> u8 {
        match self {
            Health::Healthy => exit::HEALTHY,
            Health::Failing => exit::FAILING,
            Health::NotReady => exit::NOT_READY,
        }
    }
}

/// A condition as shown.
#[derive(Clone, Debug, Serialize)]
struct ConditionView {
    status: String,
    reason: String,
    message: String,
}

impl From<&Condition> for ConditionView {
    fn from(c: &Condition) -> Self {
        ConditionView {
            status: c.status.clone(),
            reason: c.reason.clone(),
            message: c.message.clone(),
        }
    }
}

/// The issuer as shown.
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct IssuerView {
    kind: IssuerKind,
    name: String,
    /// Its Ready condition; `None` with `problem` when it cannot be read.
    ready: Option<ConditionView>,
    /// Why it could not be read (missing, forbidden).
    problem: Option<String>,
    events: Vec<EventLine>,
}

/// What `status` reports (also its `-o json|yaml`).
#[derive(Clone, Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct StatusReport {
    name: String,
    namespace: String,
    health: Health,
    ready: Option<ConditionView>,
    issuer: IssuerView,
    resource: String,
    audience: String,
    requested_scopes: Vec<String>,
    granted_scopes: Vec<String>,
    token_type: Option<String>,
    secret: String,
    issued_at: Option<String>,
    expires_at: Option<String>,
    renewal_time: Option<String>,
    failed_attempts: i32,
    last_failure_time: Option<String>,
    last_failure_message: Option<String>,
    next_attempt_time: Option<String>,
    events: Vec<EventLine>,
}

pub(super) async fn run(ctx: &Ctx, name: &str) -> anyhow::Result<u8> {
    let token = ctx.token(name).await?;
    let issuer = issuer_view(&ctx.client, &token).await;
    // Events help, but a user who may not list them still gets the status.
    let events = match events_about(
        &ctx.client,
        &ctx.namespace,
        &token.uid().unwrap_or_default(),
        EVENTS,
    )
    .await
    {
        Ok(events) => events,
        Err(e) => {
            eprintln!("warning: {e:#}");
            Vec::new()
        }
    };
    let status = token.status.clone().unwrap_or_default();
    let time = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
        t.as_ref().map(|t| seconds(t.0))
    };
    let health = Health::of(&token);
    let report = StatusReport {
        name: token.name_any(),
        namespace: ctx.namespace.clone(),
        health,
        ready: ready_condition(&status.conditions).map(ConditionView::from),
        issuer,
        resource: token.spec.resource.clone(),
        audience: token.expected_audience().to_string(),
        requested_scopes: token.spec.scopes.clone(),
        granted_scopes: status.scopes.clone(),
        token_type: status.token_type.clone(),
        secret: token.secret_name().to_string(),
        issued_at: time(&status.issued_at),
        expires_at: time(&status.expires_at),
        renewal_time: time(&status.renewal_time),
        failed_attempts: status.failed_attempts,
        last_failure_time: time(&status.last_failure_time),
        last_failure_message: status.last_failure_message.clone(),
        next_attempt_time: time(&status.next_attempt_time),
        events,
    };
    match ctx.output {
        Output::Table => print!("{}", text(&report, &token, ctx)),
        structured => print_structured(structured, &report)?,
    }
    Ok(health.exit_code())
}

async fn issuer_view(client: &Client, token: &AudienceToken) -> IssuerView {
    let reference = &token.spec.issuer_ref;
    let namespace = token.namespace().unwrap_or_default();
    let read = match reference.kind {
        IssuerKind::TokenIssuer => {
            let api: Api<TokenIssuer> = Api::namespaced(client.clone(), &namespace);
            api.get(&reference.name)
                .await
                .map(|i| (i.uid(), i.status.map(|s| s.conditions)))
        }
        IssuerKind::ClusterTokenIssuer => {
            let api: Api<ClusterTokenIssuer> = Api::all(client.clone());
            api.get(&reference.name)
                .await
                .map(|i| (i.uid(), i.status.map(|s| s.conditions)))
        }
    };
    let mut view = IssuerView {
        kind: reference.kind,
        name: reference.name.clone(),
        ready: None,
        problem: None,
        events: Vec::new(),
    };
    match read {
        Ok((uid, conditions)) => {
            view.ready = conditions
                .as_deref()
                .and_then(ready_condition)
                .map(ConditionView::from);
            // A ClusterTokenIssuer's Events are in the namespace its Secrets live in, which
            // the user may not see; a TokenIssuer's are in the token's namespace.
            if let (IssuerKind::TokenIssuer, Some(uid)) = (reference.kind, uid) {
                view.events = events_about(client, &namespace, &uid, EVENTS)
                    .await
                    .unwrap_or_default();
            }
        }
        Err(e) => view.problem = Some(format!("{:#}", api_error("cannot read it", e))),
    }
    view
}

/// The report for people.
fn text(report: &StatusReport, token: &AudienceToken, ctx: &Ctx) -> String {
    let mut out = String::new();
    let mut line = |label: &str, value: String| {
        out.push_str(&format!("{:<14}{value}\n", format!("{label}:")));
    };
    line("Name", report.name.clone());
    line("Namespace", report.namespace.clone());
    line(
        "Ready",
        match &report.ready {
            Some(c) => format!("{} ({}): {}", c.status, c.reason, c.message),
            None => "unknown: the operator has not written a status yet".into(),
        },
    );
    let issuer_kind = match report.issuer.kind {
        IssuerKind::TokenIssuer => "TokenIssuer",
        IssuerKind::ClusterTokenIssuer => "ClusterTokenIssuer",
    };
    line(
        "Issuer",
        match (&report.issuer.ready, &report.issuer.problem) {
            (_, Some(problem)) => format!("{issuer_kind} {}: {problem}", report.issuer.name),
            (Some(c), None) => format!(
                "{issuer_kind} {}: Ready {} ({}){}",
                report.issuer.name,
                c.status,
                c.reason,
                if c.message.is_empty() {
                    String::new()
                } else {
                    format!(": {}", c.message)
                }
            ),
            (None, None) => format!("{issuer_kind} {}: no status yet", report.issuer.name),
        },
    );
    line(
        "Audience",
        if report.audience == report.resource {
            report.audience.clone()
        } else {
            format!("{} (resource {})", report.audience, report.resource)
        },
    );
    let list = |scopes: &[String]| {
        if scopes.is_empty() {
            "-".to_string()
        } else {
            scopes.join(" ")
        }
    };
    line(
        "Scopes",
        format!(
            "requested {}; granted {}",
            list(&report.requested_scopes),
            list(&report.granted_scopes)
        ),
    );
    line(
        "Token type",
        report.token_type.clone().unwrap_or_else(|| "-".into()),
    );
    line("Secret", report.secret.clone());
    let status = token.status.clone().unwrap_or_default();
    let when = |t: &Option<k8s_openapi::apimachinery::pkg::apis::meta::v1::Time>| {
        t.as_ref()
            .map_or_else(|| "-".into(), |t| absolute_and_relative(t, ctx.now))
    };
    line("Issued", when(&status.issued_at));
    line("Expires", when(&status.expires_at));
    line("Renewal", when(&status.renewal_time));
    match (&status.last_failure_message, status.failed_attempts) {
        (None, _) => line("Failures", "none since the last success".into()),
        // Blocked (the issuer is not ready, the Secret is someone else's): nothing was
        // sent, so no attempt is counted.
        (Some(message), 0) => line("Failures", message.clone()),
        (Some(message), attempts) => line(
            "Failures",
            format!(
                "{attempts} attempt{} since the last success, the last {}: {message}",
                if attempts == 1 { "" } else { "s" },
                when(&status.last_failure_time),
            ),
        ),
    }
    if status.last_failure_message.is_some() {
        line(
            "Next attempt",
            status.next_attempt_time.as_ref().map_or_else(
                || "when what blocks it changes (the operator looks again by itself)".into(),
                |t| absolute_and_relative(t, ctx.now),
            ),
        );
    }
    out.push_str("\nEvents:\n");
    out.push_str(&indent(&events_or_none(&report.events, ctx)));
    out.push_str(&format!(
        "\nEvents of {issuer_kind} {}:\n",
        report.issuer.name
    ));
    out.push_str(&indent(&events_or_none(&report.issuer.events, ctx)));
    out
}

fn events_or_none(events: &[EventLine], ctx: &Ctx) -> String {
    if events.is_empty() {
        "<none>".into()
    } else {
        events_table(events, ctx.now)
    }
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect()
}
