//! What the reconciler should do for an AudienceToken, and the status that results. Pure:
//! everything it needs is passed in, so every rule is table-tested without a cluster.
//!
//! A reconcile is planned in up to three steps, because the rate limiter and the token
//! request happen in between:
//!
//! 1. [`before_request`]: from what was observed, either an [`Outcome`] (keep, wait, or
//!    blocked) or a token request ([`Step::Request`]).
//! 2. [`rate_limited`]: with the rate limiter's answer, go now, go after a short sleep, or
//!    defer with an [`Outcome`].
//! 3. [`after_request`]: with the request's result, publish (and the [`Outcome`] after
//!    that), or the [`Outcome`] of a failure with its backoff.
//!
//! An [`Outcome`] says everything the reconciler then does: the status to write, the Events
//! to publish and when to look again.

use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::runtime::events::EventType;

use crate::api::{AudienceTokenStatus, Condition, READY};
pub use crate::failure::{Failure, reason};
use crate::oauth::IssuedToken;
use crate::rate_limit::Admission;
use crate::renewal::{
    RenewBefore, RenewalPlan, RenewalWarning, backoff_delay, renewal_time, stable_jitter,
    unit_from_seed,
};
use crate::secret::{PublishedToken, rfc3339};

/// How often to look again at an AudienceToken that is blocked on something the operator
/// cannot watch closely (a foreign Secret, a missing issuer, a namespace not allowed).
pub const BLOCKED_RECHECK: Duration = Duration::from_secs(60);

/// The shortest requeue: a time already past, or about to be, is looked at again after this.
pub const MIN_REQUEUE: Duration = Duration::from_secs(1);

/// Reason of the Warning Event raised when the renewal time deviates from the spec.
pub const RENEWAL_WINDOW: &str = "RenewalWindow";

/// What the reconciler knows when it decides.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    /// The current time.
    pub now: Timestamp,
    /// `metadata.generation` of the AudienceToken.
    pub generation: Option<i64>,
    /// The spec hash of the AudienceToken as it is now.
    pub spec_hash: &'a str,
    /// What the owned Secret holds, if there is one.
    pub published: Option<&'a PublishedToken>,
    /// The AudienceToken's status.
    pub status: &'a AudienceTokenStatus,
    /// The `audiencetoken.io/renew-requested-at` annotation.
    pub renew_requested_at: Option<&'a str>,
    /// How long before expiry to renew.
    pub policy: RenewBefore,
    /// Stable per-object seed for renewal, backoff and deferral jitter (the UID).
    pub jitter_seed: &'a str,
    /// The AudienceToken's namespace.
    pub namespace: &'a str,
    /// The name of the Secret the token goes into.
    pub secret_name: &'a str,
    /// The audience the token must carry.
    pub audience: &'a str,
    /// A Secret of that name exists and is someone else's: it is never written, and
    /// `published` is `None`.
    pub foreign_secret: bool,
    /// The `x5t#S256` of the client certificate the issuer presents now, when the published
    /// token is certificate-bound (`None`: the issuer presents none). When the certificate
    /// cannot be read, the published token's own thumbprint: nothing is known to change.
    pub client_certificate: Option<&'a str>,
    /// Publish a Normal Event (`Issued`, `Renewed`) for each token written (`run
    /// --issuance-events`, default on). Warnings are published regardless.
    pub issuance_events: bool,
    /// The Secret's metadata lags the spec where that needs no new token: the
    /// ownerReference `deletionPolicy` asks for, the `secretTemplate`
    /// ([`crate::secret::metadata_update`]).
    pub secret_metadata_behind: bool,
}

/// Why a token is requested now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestReason {
    /// There is no token yet.
    Initial,
    /// The spec asks for another token (resource, audience, scopes or issuer changed).
    SpecChanged,
    /// The renewal time has come.
    Due,
    /// The published token has expired.
    Expired,
    /// A new `renew-requested-at` value asks for it.
    Forced,
    /// The token is bound to a client certificate the issuer no longer presents (it was
    /// renewed): the workload, which mounts the new one, could not use the token.
    CertificateChanged,
}

/// The reconciler's next step.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Decision {
    /// The published token is current; nothing to request before the plan's renewal time.
    Keep(RenewalPlan),
    /// A token is wanted, but the last attempt failed: wait for the backoff to pass.
    Wait {
        /// When to try again.
        until: Timestamp,
    },
    /// Request a token now.
    Request(RequestReason),
}

impl Observed<'_> {
    /// Whether the renew-requested-at annotation carries a value not yet acted on.
    pub fn forced(&self) -> bool {
        match self.renew_requested_at {
            Some(value) if !value.is_empty() => {
                self.status.last_renew_requested_at.as_deref() != Some(value)
                    && self.published.and_then(|p| p.renew_requested_at.as_deref()) != Some(value)
            }
            _ => false,
        }
    }

    /// The renewal plan for a published token.
    pub fn renewal_plan(&self, issued_at: Timestamp, expires_at: Timestamp) -> RenewalPlan {
        // Whole seconds, as the Secret's annotations keep them: the plan made at issuance
        // and the one rebuilt from the Secret after a restart must be the same, or every
        // restart rewrites statuses.
        let whole = |at: Timestamp| Timestamp::from_second(at.as_second()).unwrap_or(at);
        let (issued_at, expires_at) = (whole(issued_at), whole(expires_at));
        let seed = format!("{}/{}", self.jitter_seed, issued_at.as_second());
        renewal_time(issued_at, expires_at, self.policy, stable_jitter(&seed))
    }
}

/// Decides what to do. `backoff_waived` is set when something that may fix a failure (the
/// issuer's spec) changed since the last failed attempt.
pub fn decide(o: &Observed, backoff_waived: bool) -> Decision {
    let want = match o.published {
        None => Some(RequestReason::Initial),
        Some(p) if p.spec_hash != o.spec_hash => Some(RequestReason::SpecChanged),
        Some(p)
            if p.certificate_thumbprint.is_some()
                && p.certificate_thumbprint.as_deref() != o.client_certificate =>
        {
            Some(RequestReason::CertificateChanged)
        }
        Some(p) if p.expires_at <= o.now => Some(RequestReason::Expired),
        Some(_) if o.forced() => Some(RequestReason::Forced),
        Some(p) => {
            let plan = o.renewal_plan(p.issued_at, p.expires_at);
            if plan.renewal_time > o.now {
                return Decision::Keep(plan);
            }
            Some(RequestReason::Due)
        }
    };
    let reason = want.unwrap_or(RequestReason::Due);
    let spec_changed_since_failure = o.status.observed_generation != o.generation;
    if o.status.failed_attempts > 0
        && !backoff_waived
        && !spec_changed_since_failure
        && !o.forced()
        && let Some(next) = o.status.next_attempt_time.as_ref()
        && next.0 > o.now
    {
        return Decision::Wait { until: next.0 };
    }
    Decision::Request(reason)
}

fn time(at: Timestamp) -> Time {
    Time(Timestamp::from_second(at.as_second()).unwrap_or(at))
}

/// Sets the Ready condition, keeping `lastTransitionTime` when the status did not flip.
pub fn set_ready(
    conditions: &mut Vec<Condition>,
    ready: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: Timestamp,
) {
    let status = if ready { "True" } else { "False" };
    let previous = conditions.iter().find(|c| c.type_ == READY);
    let last_transition_time = match previous {
        Some(c) if c.status == status => c.last_transition_time.clone(),
        _ => Some(time(now)),
    };
    let condition = Condition {
        type_: READY.into(),
        status: status.into(),
        reason: reason.into(),
        message,
        last_transition_time,
        observed_generation: generation,
    };
    conditions.retain(|c| c.type_ != READY);
    conditions.insert(0, condition);
}

fn ready_message(audience: &str, expires_at: Timestamp, plan: &RenewalPlan) -> String {
    format!(
        "token for {audience} valid until {}; renewal at {}",
        rfc3339(expires_at),
        rfc3339(plan.renewal_time)
    )
}

/// Status after a token was issued and published.
pub fn status_issued(
    prev: &AudienceTokenStatus,
    token: &IssuedToken,
    plan: &RenewalPlan,
    audience: &str,
    o: &Observed,
) -> AudienceTokenStatus {
    let renewed = o.published.is_some() || prev.issued_at.is_some();
    let mut status = AudienceTokenStatus {
        conditions: prev.conditions.clone(),
        observed_generation: o.generation,
        audience: token.audience.clone(),
        scopes: token.scopes.clone(),
        token_type: Some(token.token_type.clone()),
        issued_at: Some(time(token.issued_at)),
        expires_at: Some(time(token.expires_at)),
        renewal_time: Some(time(plan.renewal_time)),
        failed_attempts: 0,
        last_failure_time: None,
        last_failure_message: None,
        next_attempt_time: None,
        last_renew_requested_at: o
            .renew_requested_at
            .map(str::to_string)
            .or_else(|| prev.last_renew_requested_at.clone()),
        // What the server granted this token: a token asked for without details (the spec
        // dropped them) clears the last token's.
        authorization_details: token.authorization_details.clone(),
    };
    let why = if renewed {
        reason::RENEWED
    } else {
        reason::ISSUED
    };
    set_ready(
        &mut status.conditions,
        true,
        why,
        ready_message(audience, token.expires_at, plan),
        o.generation,
        o.now,
    );
    status
}

/// Status while the published token is current and nothing needs doing. Equal to `prev`
/// when `prev` already says so, so a restart writes nothing.
pub fn status_current(
    prev: &AudienceTokenStatus,
    published: &PublishedToken,
    plan: &RenewalPlan,
    audience: &str,
    o: &Observed,
) -> AudienceTokenStatus {
    let mut status = prev.clone();
    status.observed_generation = o.generation;
    status.issued_at = Some(time(published.issued_at));
    status.expires_at = Some(time(published.expires_at));
    status.renewal_time = Some(time(plan.renewal_time));
    // A failing renewal's reason stays until a renewal succeeds (a forced renewal that
    // failed leaves a current token behind): a reason never claims success then.
    let reason = match prev.conditions.iter().find(|c| c.type_ == READY) {
        Some(c)
            if c.status == "True"
                && (status.failed_attempts > 0
                    || c.reason == reason::RENEWED
                    || c.reason == reason::ISSUED) =>
        {
            c.reason.clone()
        }
        _ => reason::ISSUED.to_string(),
    };
    let message = if status.failed_attempts > 0 {
        prev.conditions
            .iter()
            .find(|c| c.type_ == READY)
            .map(|c| c.message.clone())
            .unwrap_or_default()
    } else {
        ready_message(audience, published.expires_at, plan)
    };
    set_ready(
        &mut status.conditions,
        true,
        &reason,
        message,
        o.generation,
        o.now,
    );
    status
}

/// Status after a failed attempt (or a refusal to attempt). The published token, while
/// valid, keeps Ready true (workloads still have a good token), with the failure's reason:
/// `Issued` or `Renewed` only ever mean that the last attempt succeeded.
pub fn status_failed(
    prev: &AudienceTokenStatus,
    failure: &Failure,
    next_attempt: Option<Timestamp>,
    counts_as_attempt: bool,
    o: &Observed,
) -> AudienceTokenStatus {
    let mut status = prev.clone();
    status.observed_generation = o.generation;
    if counts_as_attempt {
        status.failed_attempts = prev.failed_attempts.saturating_add(1);
        status.last_failure_time = Some(time(o.now));
    }
    status.last_failure_message = Some(format!("{}: {}", failure.reason, failure.message));
    status.next_attempt_time = next_attempt.map(time);
    if o.forced() {
        status.last_renew_requested_at = o.renew_requested_at.map(str::to_string);
    }
    let retry = next_attempt
        .map(|t| format!("; next attempt at {}", rfc3339(t)))
        .unwrap_or_default();
    let valid = o
        .published
        .filter(|p| p.expires_at > o.now && p.spec_hash == o.spec_hash);
    match valid {
        Some(p) if failure.reason != reason::SECRET_CONFLICT => {
            let message = format!(
                "token valid until {}; renewal failing ({}: {}){retry}",
                rfc3339(p.expires_at),
                failure.reason,
                failure.message
            );
            set_ready(
                &mut status.conditions,
                true,
                failure.reason,
                message,
                o.generation,
                o.now,
            );
        }
        _ => {
            let expired = o.published.is_some_and(|p| p.expires_at <= o.now)
                && failure.reason != reason::SECRET_CONFLICT;
            let (why, message) = if expired {
                (
                    reason::EXPIRED,
                    format!(
                        "the token expired and renewal fails ({}: {}){retry}",
                        failure.reason, failure.message
                    ),
                )
            } else {
                (failure.reason, format!("{}{retry}", failure.message))
            };
            set_ready(
                &mut status.conditions,
                false,
                why,
                message,
                o.generation,
                o.now,
            );
        }
    }
    status
}

/// Every field of [`AudienceTokenStatus`] as serialised; a unit test keeps it complete.
const STATUS_FIELDS: [&str; 14] = [
    "conditions",
    "observedGeneration",
    "audience",
    "scopes",
    "tokenType",
    "issuedAt",
    "expiresAt",
    "renewalTime",
    "failedAttempts",
    "lastFailureTime",
    "lastFailureMessage",
    "nextAttemptTime",
    "lastRenewRequestedAt",
    "authorizationDetails",
];

/// Status when the published token ran out while a retry is still pending: Ready turns
/// False with reason Expired; the failure record is kept as it is.
pub fn status_expired_while_waiting(
    prev: &AudienceTokenStatus,
    o: &Observed,
) -> AudienceTokenStatus {
    let mut status = prev.clone();
    let expired_at = o
        .published
        .map(|p| rfc3339(p.expires_at))
        .unwrap_or_default();
    let failure = prev
        .last_failure_message
        .as_deref()
        .unwrap_or("unknown error");
    let retry = prev
        .next_attempt_time
        .as_ref()
        .map(|t| format!("; next attempt at {}", rfc3339(t.0)))
        .unwrap_or_default();
    let message = format!("the token expired at {expired_at} and renewal fails ({failure}){retry}");
    set_ready(
        &mut status.conditions,
        false,
        reason::EXPIRED,
        message,
        o.generation,
        o.now,
    );
    status
}

/// A merge patch of only what [`status_current`] and [`status_expired_while_waiting`]
/// derive: the Ready condition, the token times and the observed generation. Fields it
/// leaves out are left as they are.
pub fn derived_status_patch(status: &AudienceTokenStatus) -> serde_json::Value {
    let full = serde_json::to_value(status).unwrap_or_else(|_| serde_json::json!({}));
    let mut derived = serde_json::Map::new();
    for field in [
        "conditions",
        "observedGeneration",
        "issuedAt",
        "expiresAt",
        "renewalTime",
    ] {
        if let Some(value) = full.get(field) {
            derived.insert(field.to_string(), value.clone());
        }
    }
    serde_json::json!({ "status": derived })
}

/// The reason of the last failure recorded in status, if any.
pub fn last_failure_reason(status: &AudienceTokenStatus) -> Option<&str> {
    status
        .last_failure_message
        .as_deref()
        .and_then(|m| m.split(':').next())
}

/// The JSON merge patch that makes the stored status equal `status`: fields the new status
/// leaves out are set to `null` so stale values (an old failure message) are removed.
pub fn status_patch(status: &AudienceTokenStatus) -> serde_json::Value {
    serde_json::to_value(FullStatusPatch(status)).unwrap_or_else(|_| serde_json::json!({}))
}

/// [`status_patch`] as it is serialized: every field of [`STATUS_FIELDS`], `null` where the
/// status leaves it out. Written straight to the request body, without the JSON tree
/// [`status_patch`] builds: every issuance writes one, and building the tree first cost about
/// 3% of the operator's CPU at 10,000 tokens.
#[derive(Clone, Copy, Debug)]
pub struct FullStatusPatch<'a>(pub &'a AudienceTokenStatus);

impl serde::Serialize for FullStatusPatch<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;

        struct Fields<'a>(&'a AudienceTokenStatus);
        impl serde::Serialize for Fields<'_> {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                // `null` where the status's own serialization leaves the field out.
                fn listed<T>(list: &[T]) -> Option<&[T]> {
                    (!list.is_empty()).then_some(list)
                }
                let s = self.0;
                let failed_attempts = (s.failed_attempts != 0).then_some(s.failed_attempts);
                let mut map = serializer.serialize_map(Some(STATUS_FIELDS.len()))?;
                map.serialize_entry("conditions", &listed(&s.conditions))?;
                map.serialize_entry("observedGeneration", &s.observed_generation)?;
                map.serialize_entry("audience", &listed(&s.audience))?;
                map.serialize_entry("scopes", &listed(&s.scopes))?;
                map.serialize_entry("tokenType", &s.token_type)?;
                map.serialize_entry("issuedAt", &s.issued_at)?;
                map.serialize_entry("expiresAt", &s.expires_at)?;
                map.serialize_entry("renewalTime", &s.renewal_time)?;
                map.serialize_entry("failedAttempts", &failed_attempts)?;
                map.serialize_entry("lastFailureTime", &s.last_failure_time)?;
                map.serialize_entry("lastFailureMessage", &s.last_failure_message)?;
                map.serialize_entry("nextAttemptTime", &s.next_attempt_time)?;
                map.serialize_entry("lastRenewRequestedAt", &s.last_renew_requested_at)?;
                map.serialize_entry("authorizationDetails", &listed(&s.authorization_details))?;
                map.end()
            }
        }
        let mut map = serializer.serialize_map(Some(1))?;
        map.serialize_entry("status", &Fields(self.0))?;
        map.end()
    }
}

/// A status merge patch, ready to send.
#[derive(Debug)]
pub enum StatusPatch<'a> {
    /// [`FullStatusPatch`].
    Full(FullStatusPatch<'a>),
    /// [`derived_status_patch`].
    Derived(serde_json::Value),
}

impl serde::Serialize for StatusPatch<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            StatusPatch::Full(full) => full.serialize(serializer),
            StatusPatch::Derived(derived) => derived.serialize(serializer),
        }
    }
}

/// Whether the Ready condition in `status` has this reason.
pub fn last_reason_is(status: &AudienceTokenStatus, reason: &str) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == READY && c.reason == reason)
}

/// The Ready condition's reason, if there is one.
pub fn ready_reason(status: &AudienceTokenStatus) -> Option<&str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == READY)
        .map(|c| c.reason.as_str())
}

/// Whether the Ready condition in `status` is True.
pub fn ready_is_true(status: &AudienceTokenStatus) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == READY && c.status == "True")
}

/// The status to write at the end of a reconcile.
#[derive(Clone, Debug, PartialEq)]
pub enum StatusWrite {
    /// Leave the status as it is.
    Unchanged,
    /// Make the stored status equal this one ([`status_patch`]): stale fields are removed.
    Full(AudienceTokenStatus),
    /// Patch only the fields derived from the published token and the Ready condition
    /// ([`derived_status_patch`]). For statuses computed from a cache that may lag the
    /// operator's own last write, which a full patch could undo.
    Derived(AudienceTokenStatus),
}

impl StatusWrite {
    /// The status to write; `None` for [`StatusWrite::Unchanged`].
    pub fn status(&self) -> Option<&AudienceTokenStatus> {
        match self {
            StatusWrite::Unchanged => None,
            StatusWrite::Full(status) | StatusWrite::Derived(status) => Some(status),
        }
    }

    /// The status to write and the merge patch that writes it; `None` for
    /// [`StatusWrite::Unchanged`].
    pub fn patch(&self) -> Option<(&AudienceTokenStatus, StatusPatch<'_>)> {
        match self {
            StatusWrite::Unchanged => None,
            StatusWrite::Full(status) => Some((status, StatusPatch::Full(FullStatusPatch(status)))),
            StatusWrite::Derived(status) => {
                Some((status, StatusPatch::Derived(derived_status_patch(status))))
            }
        }
    }
}

/// An Event to publish on the AudienceToken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Event {
    /// Normal or Warning.
    pub type_: EventType,
    /// The Event's reason.
    pub reason: &'static str,
    /// The Event's note.
    pub note: String,
}

/// What a reconcile ends with: the status to write, then the Events to publish, then when
/// to reconcile again.
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    /// The status to write (skipped by the writer when equal to the current one).
    pub status: StatusWrite,
    /// Events to publish, in this order, after the status is written.
    pub events: Vec<Event>,
    /// When to reconcile again; never below [`MIN_REQUEUE`] unless a rate limit defers.
    pub requeue_after: Duration,
}

/// The first step of a reconcile, before any token request.
// One per reconcile, moved once: boxing the outcome would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Step<Issuer> {
    /// Nothing to request now: carry out this outcome.
    Done(Outcome),
    /// Ask the rate limiter ([`rate_limited`]), then request a token from `issuer`.
    Request {
        /// Why a token is wanted.
        reason: RequestReason,
        /// The resolved issuer, handed back for the request.
        issuer: Issuer,
    },
}

/// What the rate limiter's answer means for the token request.
// One per reconcile, moved once: boxing the outcome would buy nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Admitted {
    /// Request now.
    Now,
    /// A place is reserved: sleep this long (at most a second), then request.
    AfterSleep(Duration),
    /// Do not request now: carry out this outcome, which looks again later.
    Deferred(Outcome),
}

/// What to do with a token request's result. The request's token or failure is handed back.
#[derive(Clone, Debug)]
pub enum AfterRequest<'r> {
    /// Write `issued` into the Secret, then carry out `outcome` (status Issued or Renewed).
    Publish {
        /// The token to publish.
        issued: &'r IssuedToken,
        /// When to renew it.
        renewal_time: Timestamp,
        /// Whether it replaces an earlier token (Ready reason Renewed) or is the first.
        renewed: bool,
        /// Status, Events and requeue once the Secret is written.
        outcome: Outcome,
    },
    /// The request failed: carry out `outcome` (failure status, retry after the backoff).
    Retry {
        /// Why the request failed.
        failure: &'r Failure,
        /// The backoff before the next attempt.
        delay: Duration,
        /// Status, Events and requeue.
        outcome: Outcome,
    },
}

/// Plans a reconcile up to the token request. `issuer` is the issuer as resolved (or why it
/// cannot be); `backoff_waived` is set when the issuer changed since the last failed attempt.
pub fn before_request<Issuer>(
    o: &Observed,
    issuer: Result<Issuer, Failure>,
    backoff_waived: bool,
) -> Step<Issuer> {
    if o.foreign_secret {
        return Step::Done(blocked(o, &secret_conflict(o)));
    }
    let reason = match (decide(o, backoff_waived), o.published) {
        (Decision::Keep(renewal), Some(published)) => {
            let status = status_current(o.status, published, &renewal, o.audience, o);
            return Step::Done(Outcome {
                status: StatusWrite::Derived(status),
                events: Vec::new(),
                requeue_after: requeue_after(renewal.renewal_time, o.now),
            });
        }
        (Decision::Wait { until }, _) => return Step::Done(waiting(o, until)),
        (Decision::Request(reason), _) => reason,
        // `decide` keeps only a published token; without one, a first token is wanted.
        (Decision::Keep(_), None) => RequestReason::Initial,
    };
    match issuer {
        Ok(issuer) => Step::Request { reason, issuer },
        Err(failure) => Step::Done(blocked(o, &failure)),
    }
}

/// Whether a reconcile that writes no token brings the Secret's metadata to the spec
/// (deletionPolicy, secretTemplate) now: when the Secret holds a token of ours. A token
/// written carries the metadata anyway; a Secret switched to `Retain` must not wait for it
/// to outlive its AudienceToken.
pub fn update_secret_metadata(o: &Observed) -> bool {
    o.secret_metadata_behind && o.published.is_some() && !o.foreign_secret
}

/// Plans what the rate limiter's `admission` means: short waits are slept through, longer
/// ones defer the request by between one and two times the wait, spread per object and
/// moment so deferred requests do not all come back at once.
pub fn rate_limited(o: &Observed, admission: Admission) -> Admitted {
    match admission {
        Admission::Now => Admitted::Now,
        Admission::After(wait) => Admitted::AfterSleep(wait),
        Admission::Later(wait) => {
            let spread = unit_from_seed(&format!("{}/{}", o.jitter_seed, o.now));
            Admitted::Deferred(Outcome {
                status: StatusWrite::Unchanged,
                events: Vec::new(),
                requeue_after: wait.mul_f64(1.0 + spread),
            })
        }
    }
}

/// Plans what follows a token request: publish the token, or record the failure and back
/// off.
pub fn after_request<'r>(
    o: &Observed,
    result: Result<&'r IssuedToken, &'r Failure>,
) -> AfterRequest<'r> {
    match result {
        Ok(issued) => issued_outcome(o, issued),
        Err(failure) => {
            let delay = retry_delay(o, failure);
            let retry_at = o.now + delay;
            let status = status_failed(o.status, failure, Some(retry_at), true, o);
            AfterRequest::Retry {
                failure,
                delay,
                outcome: Outcome {
                    status: StatusWrite::Full(status),
                    events: new_failure_warning(o.status, failure).into_iter().collect(),
                    requeue_after: requeue_after(wake_time(o, retry_at), o.now),
                },
            }
        }
    }
}

fn issued_outcome<'r>(o: &Observed, issued: &'r IssuedToken) -> AfterRequest<'r> {
    let renewal = o.renewal_plan(issued.issued_at, issued.expires_at);
    let status = status_issued(o.status, issued, &renewal, o.audience, o);
    let renewed = status
        .conditions
        .iter()
        .any(|c| c.type_ == READY && c.reason == reason::RENEWED);
    let (why, what) = if renewed {
        (reason::RENEWED, "renewed the token")
    } else {
        (reason::ISSUED, "issued a token")
    };
    let mut events = Vec::new();
    if o.issuance_events {
        events.push(Event {
            type_: EventType::Normal,
            reason: why,
            note: format!(
                "{what} for {} into Secret {}; it expires at {}, renewal at {}",
                o.audience,
                o.secret_name,
                rfc3339(issued.expires_at),
                rfc3339(renewal.renewal_time),
            ),
        });
    }
    // Said once per token and spec, not at every renewal.
    let first_for_spec = o.published.is_none_or(|p| p.spec_hash != o.spec_hash);
    if let Some(warning) = renewal.warning.filter(|_| first_for_spec) {
        events.push(Event {
            type_: EventType::Warning,
            reason: RENEWAL_WINDOW,
            note: renewal_window_note(warning),
        });
    }
    AfterRequest::Publish {
        issued,
        renewal_time: renewal.renewal_time,
        renewed,
        outcome: Outcome {
            status: StatusWrite::Full(status),
            events,
            requeue_after: requeue_after(renewal.renewal_time, o.now),
        },
    }
}

/// The failure recorded when the Secret to write is someone else's.
fn secret_conflict(o: &Observed) -> Failure {
    Failure::new(
        reason::SECRET_CONFLICT,
        format!(
            "Secret {}/{} exists and is not managed by this AudienceToken; it is left untouched",
            o.namespace, o.secret_name
        ),
    )
}

/// The outcome when the Secret turns out to be someone else's only as the token is written
/// (it was not in the cache of owned Secrets, so it was created, and the create found it):
/// nothing is written, the token is dropped, SecretConflict as if it had been seen before.
pub fn foreign_at_publish(o: &Observed) -> Outcome {
    blocked(o, &secret_conflict(o))
}

/// Blocked on something the operator cannot watch closely: record why (not as an attempt,
/// no next attempt time) and look again after [`BLOCKED_RECHECK`].
fn blocked(o: &Observed, failure: &Failure) -> Outcome {
    // Woken at the published token's expiry if that comes first, so Ready turns False
    // (Expired) when the token does, not up to a recheck later.
    let recheck = o.now + BLOCKED_RECHECK;
    Outcome {
        status: StatusWrite::Full(status_failed(o.status, failure, None, false, o)),
        events: new_failure_warning(o.status, failure).into_iter().collect(),
        requeue_after: requeue_after(wake_time(o, recheck), o.now),
    }
}

/// Backing off until `until`: wake up at the retry, or earlier when the published token
/// expires first; once it has expired, Ready turns False (Expired).
fn waiting(o: &Observed, until: Timestamp) -> Outcome {
    let expired = o.published.is_some_and(|p| p.expires_at <= o.now);
    let status = if expired && ready_is_true(o.status) {
        StatusWrite::Derived(status_expired_while_waiting(o.status, o))
    } else {
        StatusWrite::Unchanged
    };
    Outcome {
        status,
        events: Vec::new(),
        requeue_after: requeue_after(wake_time(o, until), o.now),
    }
}

/// A Warning Event for `failure`, unless the last failure recorded in `previous` had the
/// same reason: one Warning per kind of failure, not one per retry.
fn new_failure_warning(previous: &AudienceTokenStatus, failure: &Failure) -> Option<Event> {
    (last_failure_reason(previous) != Some(failure.reason)).then(|| Event {
        type_: EventType::Warning,
        reason: failure.reason,
        note: failure.message.clone(),
    })
}

/// The backoff after this failure: the attempt number is one more than the failures in
/// status, and the jitter is stable per object and attempt.
fn retry_delay(o: &Observed, failure: &Failure) -> Duration {
    let attempts = u32::try_from(o.status.failed_attempts)
        .unwrap_or(0)
        .saturating_add(1);
    let jitter = unit_from_seed(&format!("{}/{attempts}", o.jitter_seed));
    backoff_delay(attempts, jitter, failure.retry_after)
}

/// When to look again while the next attempt is due at `next_attempt`: then, or when the
/// published token expires if that comes first (Ready must turn False on time).
fn wake_time(o: &Observed, next_attempt: Timestamp) -> Timestamp {
    match o.published {
        Some(p) if p.expires_at > o.now => next_attempt.min(p.expires_at),
        _ => next_attempt,
    }
}

/// How long from `now` until `at`, and at least [`MIN_REQUEUE`].
pub fn requeue_after(at: Timestamp, now: Timestamp) -> Duration {
    if at <= now {
        MIN_REQUEUE
    } else {
        at.duration_since(now).unsigned_abs().max(MIN_REQUEUE)
    }
}

/// The note of the [`RENEWAL_WINDOW`] Warning.
fn renewal_window_note(warning: RenewalWarning) -> String {
    match warning {
        RenewalWarning::LifetimeTooShort { lifetime } => format!(
            "token lifetime {}s is too short to renew 90s before expiry; pods may read the new token late",
            lifetime.as_secs()
        ),
        RenewalWarning::RenewBeforeTooLong { lifetime } => format!(
            "renewBefore is not shorter than the token lifetime ({}s); renewing at two thirds instead",
            lifetime.as_secs()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(secs: i64) -> Timestamp {
        Timestamp::from_second(1_800_000_000 + secs).unwrap()
    }

    fn published(issued: i64, expires: i64, hash: &str) -> PublishedToken {
        PublishedToken {
            issued_at: ts(issued),
            expires_at: ts(expires),
            spec_hash: hash.into(),
            renew_requested_at: None,
            dpop_jkt: None,
            certificate_thumbprint: None,
        }
    }

    fn observed<'a>(
        now: i64,
        published: Option<&'a PublishedToken>,
        status: &'a AudienceTokenStatus,
    ) -> Observed<'a> {
        Observed {
            now: ts(now),
            generation: Some(1),
            spec_hash: "h1",
            published,
            status,
            renew_requested_at: None,
            policy: RenewBefore::default(),
            jitter_seed: "uid",
            namespace: "ns",
            secret_name: "s",
            audience: "urn:a",
            foreign_secret: false,
            client_certificate: None,
            issuance_events: true,
            secret_metadata_behind: false,
        }
    }

    fn failing(next: i64, generation: i64) -> AudienceTokenStatus {
        AudienceTokenStatus {
            failed_attempts: 2,
            next_attempt_time: Some(time(ts(next))),
            observed_generation: Some(generation),
            ..AudienceTokenStatus::default()
        }
    }

    #[test]
    fn the_plan_rebuilt_from_the_secret_is_the_plan_made_at_issuance() {
        let none = AudienceTokenStatus::default();
        let o = observed(0, None, &none);
        // Issued at a fraction of a second; the Secret's annotations keep whole seconds.
        for millis in [1, 250, 500, 999] {
            let issued = ts(0) + jiff::SignedDuration::from_millis(millis);
            let expires = issued + jiff::SignedDuration::from_secs(3600);
            let at_issuance = o.renewal_plan(issued, expires);
            let from_secret = o.renewal_plan(ts(0), ts(3600));
            assert_eq!(
                at_issuance.renewal_time, from_secret.renewal_time,
                "{millis} ms"
            );
        }
    }

    #[test]
    fn decisions() {
        let none = AudienceTokenStatus::default();
        let fresh = published(0, 3600, "h1");
        let other_spec = published(0, 3600, "h0");
        let expired = published(-3600, -1, "h1");

        assert_eq!(
            decide(&observed(10, None, &none), false),
            Decision::Request(RequestReason::Initial)
        );
        assert!(matches!(
            decide(&observed(10, Some(&fresh), &none), false),
            Decision::Keep(_)
        ));
        assert_eq!(
            decide(&observed(10, Some(&other_spec), &none), false),
            Decision::Request(RequestReason::SpecChanged)
        );
        assert_eq!(
            decide(&observed(10, Some(&expired), &none), false),
            Decision::Request(RequestReason::Expired)
        );
        assert_eq!(
            decide(&observed(3000, Some(&fresh), &none), false),
            Decision::Request(RequestReason::Due)
        );

        // Backoff holds a due request until the next attempt time...
        let past_backoff = failing(100, 1);
        assert_eq!(
            decide(&observed(3000, Some(&fresh), &past_backoff), false),
            Decision::Request(RequestReason::Due)
        );
        let backing_off = failing(4000, 1);
        assert_eq!(
            decide(&observed(3000, Some(&fresh), &backing_off), false),
            Decision::Wait { until: ts(4000) }
        );
        // ...but not past it, not after a spec change, and not when waived.
        assert_eq!(
            decide(&observed(4001, Some(&fresh), &backing_off), false),
            Decision::Request(RequestReason::Expired)
        );
        let spec_changed = failing(4000, 0);
        assert_eq!(
            decide(&observed(3000, Some(&fresh), &spec_changed), false),
            Decision::Request(RequestReason::Due)
        );
        assert_eq!(
            decide(&observed(3000, Some(&fresh), &backing_off), true),
            Decision::Request(RequestReason::Due)
        );
    }

    #[test]
    fn a_token_bound_to_a_renewed_certificate_is_replaced_at_once() {
        let none = AudienceTokenStatus::default();
        let bound = PublishedToken {
            certificate_thumbprint: Some("cert-1".into()),
            ..published(0, 3600, "h1")
        };
        let mut o = observed(10, Some(&bound), &none);
        o.client_certificate = Some("cert-1");
        assert!(matches!(decide(&o, false), Decision::Keep(_)));
        o.client_certificate = Some("cert-2");
        assert_eq!(
            decide(&o, false),
            Decision::Request(RequestReason::CertificateChanged)
        );
        o.client_certificate = None;
        assert_eq!(
            decide(&o, false),
            Decision::Request(RequestReason::CertificateChanged),
            "the issuer presents no certificate any more"
        );
        // A bearer token does not care which certificate the issuer presents.
        let bearer = published(0, 3600, "h1");
        let mut o = observed(10, Some(&bearer), &none);
        o.client_certificate = Some("cert-2");
        assert!(matches!(decide(&o, false), Decision::Keep(_)));
        // A failed re-issue backs off like any other.
        let backing_off = failing(4000, 1);
        let mut o = observed(10, Some(&bound), &backing_off);
        o.client_certificate = Some("cert-2");
        assert_eq!(decide(&o, false), Decision::Wait { until: ts(4000) });
    }

    #[test]
    fn forced_renewal_once_per_value() {
        let fresh = published(0, 3600, "h1");
        let mut status = AudienceTokenStatus::default();
        let mut o = observed(10, Some(&fresh), &status);
        o.renew_requested_at = Some("2026-11-21T10:00:00Z");
        assert_eq!(decide(&o, false), Decision::Request(RequestReason::Forced));
        status.last_renew_requested_at = Some("2026-11-21T10:00:00Z".into());
        let mut o = observed(10, Some(&fresh), &status);
        o.renew_requested_at = Some("2026-11-21T10:00:00Z");
        assert!(matches!(decide(&o, false), Decision::Keep(_)));

        // Status lost, but the Secret records that the token answered this request.
        let recorded = PublishedToken {
            renew_requested_at: Some("2026-11-21T10:00:00Z".into()),
            ..fresh.clone()
        };
        let no_status = AudienceTokenStatus::default();
        let mut o = observed(10, Some(&recorded), &no_status);
        o.renew_requested_at = Some("2026-11-21T10:00:00Z");
        assert!(matches!(decide(&o, false), Decision::Keep(_)));
    }

    #[test]
    fn restart_with_current_status_changes_nothing() {
        let fresh = published(0, 3600, "h1");
        let none = AudienceTokenStatus::default();
        let o = observed(10, Some(&fresh), &none);
        let Decision::Keep(plan) = decide(&o, false) else {
            panic!("expected Keep")
        };
        let first = status_current(&none, &fresh, &plan, "urn:a", &o);
        let o2 = Observed {
            now: ts(500),
            status: &first,
            ..o
        };
        let Decision::Keep(plan2) = decide(&o2, false) else {
            panic!("expected Keep")
        };
        assert_eq!(plan, plan2, "renewal time is stable across reconciles");
        assert_eq!(status_current(&first, &fresh, &plan2, "urn:a", &o2), first);
    }

    #[test]
    fn failure_keeps_ready_while_the_old_token_is_valid_then_expires() {
        let fresh = published(0, 3600, "h1");
        let none = AudienceTokenStatus::default();
        let failure = Failure {
            reason: reason::TOKEN_REQUEST_FAILED,
            message: "token endpoint answered 400 invalid_target".into(),
            retry_after: None,
        };
        let o = observed(3000, Some(&fresh), &none);
        let s = status_failed(&none, &failure, Some(ts(3005)), true, &o);
        let ready = &s.conditions[0];
        // Ready while the old token is valid, but the reason says what fails: an alert or
        // `kubectl wait` can tell "valid but failing" from "healthy".
        assert_eq!(
            (ready.status.as_str(), ready.reason.as_str()),
            ("True", reason::TOKEN_REQUEST_FAILED)
        );
        assert!(
            ready.message.contains("invalid_target"),
            "{}",
            ready.message
        );
        assert_eq!(s.failed_attempts, 1);
        // A current token after the failure (a forced renewal failed) keeps the reason.
        let o_current = observed(10, Some(&fresh), &s);
        let Decision::Keep(plan) = decide(&o_current, false) else {
            panic!("a current token is kept")
        };
        let kept = status_current(&s, &fresh, &plan, "urn:a", &o_current);
        assert_eq!(kept.conditions[0].reason, reason::TOKEN_REQUEST_FAILED);
        assert!(
            s.last_failure_message
                .as_deref()
                .unwrap()
                .contains("invalid_target")
        );

        let o = observed(3700, Some(&fresh), &s);
        let s2 = status_failed(&s, &failure, Some(ts(3710)), true, &o);
        assert_eq!(
            (
                s2.conditions[0].status.as_str(),
                s2.conditions[0].reason.as_str()
            ),
            ("False", reason::EXPIRED)
        );
        assert_eq!(s2.failed_attempts, 2);

        let o = observed(10, None, &none);
        let s3 = status_failed(&none, &failure, Some(ts(15)), true, &o);
        assert_eq!(
            (
                s3.conditions[0].status.as_str(),
                s3.conditions[0].reason.as_str()
            ),
            ("False", reason::TOKEN_REQUEST_FAILED)
        );
    }

    #[test]
    fn ready_transition_time_moves_only_on_flips() {
        let mut conditions = Vec::new();
        set_ready(&mut conditions, true, "Issued", "a".into(), Some(1), ts(0));
        set_ready(
            &mut conditions,
            true,
            "Renewed",
            "b".into(),
            Some(1),
            ts(50),
        );
        assert_eq!(conditions[0].last_transition_time, Some(time(ts(0))));
        set_ready(
            &mut conditions,
            false,
            "Expired",
            "c".into(),
            Some(1),
            ts(90),
        );
        assert_eq!(conditions[0].last_transition_time, Some(time(ts(90))));
        assert_eq!(conditions.len(), 1);
    }

    #[test]
    fn status_patch_nulls_cleared_fields() {
        let patch = status_patch(&AudienceTokenStatus::default());
        assert_eq!(
            patch["status"]["lastFailureMessage"],
            serde_json::Value::Null
        );
        assert!(
            patch["status"]
                .as_object()
                .unwrap()
                .contains_key("lastFailureMessage")
        );
        assert!(
            patch["status"]
                .as_object()
                .unwrap()
                .contains_key("failedAttempts")
        );
    }

    #[test]
    fn status_fields_list_is_complete() {
        let full = AudienceTokenStatus {
            conditions: vec![Condition {
                type_: READY.into(),
                status: "True".into(),
                reason: "Issued".into(),
                message: String::new(),
                last_transition_time: None,
                observed_generation: None,
            }],
            observed_generation: Some(1),
            audience: vec!["a".into()],
            scopes: vec!["s".into()],
            token_type: Some("Bearer".into()),
            issued_at: Some(time(ts(0))),
            expires_at: Some(time(ts(1))),
            renewal_time: Some(time(ts(1))),
            failed_attempts: 1,
            last_failure_time: Some(time(ts(0))),
            last_failure_message: Some("m".into()),
            next_attempt_time: Some(time(ts(0))),
            last_renew_requested_at: Some("x".into()),
            authorization_details: vec![serde_json::json!({"type": "t"})],
        };
        let value = serde_json::to_value(&full).unwrap();
        let mut keys: Vec<&str> = value
            .as_object()
            .unwrap()
            .keys()
            .map(String::as_str)
            .collect();
        let mut listed = STATUS_FIELDS.to_vec();
        keys.sort_unstable();
        listed.sort_unstable();
        assert_eq!(keys, listed);
        // The patch written straight to the request says what the status says, field by
        // field, and null for every field an empty status leaves out.
        assert_eq!(status_patch(&full), serde_json::json!({ "status": value }));
        let empty = status_patch(&AudienceTokenStatus::default());
        let empty = empty["status"].as_object().unwrap();
        assert_eq!(empty.len(), STATUS_FIELDS.len());
        assert!(empty.values().all(serde_json::Value::is_null), "{empty:?}");
        let bytes =
            serde_json::to_vec(&StatusWrite::Full(full.clone()).patch().unwrap().1).unwrap();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
            status_patch(&full)
        );
    }

    #[test]
    fn status_shows_the_authorization_details_granted_to_the_current_token() {
        let granted = vec![serde_json::json!({
            "type": "helseid_authorization",
            "practitioner_role": {"organization": {"identifier": {"value": "NO:ORGNR:1:2"}}}
        })];
        let none = AudienceTokenStatus::default();
        let o = observed(10, None, &none);
        let with_details = IssuedToken {
            authorization_details: granted.clone(),
            ..issued(10, 3610)
        };
        let AfterRequest::Publish { outcome, .. } = after_request(&o, Ok(&with_details)) else {
            panic!("an issued token is published")
        };
        let StatusWrite::Full(status) = &outcome.status else {
            panic!("a new token writes the full status")
        };
        assert_eq!(status.authorization_details, granted, "issued: shown");

        // Kept while the token is current (a restart rebuilds only the derived fields) and
        // while renewals fail.
        let published_token = published(10, 3610, "h1");
        let o = observed(500, Some(&published_token), status);
        let Step::Done(kept) = before_request(&o, Ok::<(), Failure>(()), false) else {
            panic!("a current token is kept")
        };
        let (write, kept) = write_of(&kept.status);
        assert_eq!(write, Write::Derived);
        assert!(
            !derived_status_patch(kept.unwrap())["status"]
                .as_object()
                .unwrap()
                .contains_key("authorizationDetails"),
            "a derived write leaves them as they are"
        );
        let o = observed(3000, Some(&published_token), status);
        let failed = status_failed(status, &request_failed(), Some(ts(3005)), true, &o);
        assert_eq!(
            failed.authorization_details, granted,
            "renewal failing: kept"
        );

        // A token granted none (the spec no longer asks for any) clears them, and the full
        // patch removes them from the stored status.
        let old_spec = published(10, 3610, "h0");
        let o = observed(3000, Some(&old_spec), status);
        let AfterRequest::Publish { outcome, .. } = after_request(&o, Ok(&issued(3000, 6600)))
        else {
            panic!("an issued token is published")
        };
        let StatusWrite::Full(cleared) = &outcome.status else {
            panic!("a new token writes the full status")
        };
        assert!(cleared.authorization_details.is_empty(), "{cleared:?}");
        assert_eq!(
            status_patch(cleared)["status"]["authorizationDetails"],
            serde_json::Value::Null
        );
    }

    // --- Outcomes: before_request, rate_limited, after_request ---

    /// How an outcome's status is written.
    #[derive(Clone, Copy, Debug, PartialEq)]
    enum Write {
        Unchanged,
        Full,
        Derived,
    }

    fn write_of(status: &StatusWrite) -> (Write, Option<&AudienceTokenStatus>) {
        match status {
            StatusWrite::Unchanged => (Write::Unchanged, None),
            StatusWrite::Full(s) => (Write::Full, Some(s)),
            StatusWrite::Derived(s) => (Write::Derived, Some(s)),
        }
    }

    fn ready_of(status: &AudienceTokenStatus) -> (&str, &str) {
        let ready = status
            .conditions
            .iter()
            .find(|c| c.type_ == READY)
            .expect("a Ready condition");
        (ready.status.as_str(), ready.reason.as_str())
    }

    fn events_of(outcome: &Outcome) -> Vec<(EventType, &'static str)> {
        outcome.events.iter().map(|e| (e.type_, e.reason)).collect()
    }

    fn secs(d: Duration) -> f64 {
        d.as_secs_f64()
    }

    fn with_ready(mut status: AudienceTokenStatus, ready: &str, why: &str) -> AudienceTokenStatus {
        set_ready(
            &mut status.conditions,
            ready == "True",
            why,
            "earlier".into(),
            Some(1),
            ts(-10),
        );
        status
    }

    fn with_failure(mut status: AudienceTokenStatus, why: &str) -> AudienceTokenStatus {
        status.last_failure_message = Some(format!("{why}: earlier failure"));
        status
    }

    fn request_failed() -> Failure {
        Failure::new(
            reason::TOKEN_REQUEST_FAILED,
            "token endpoint answered 503 http_503",
        )
    }

    fn issued(issued_at: i64, expires_at: i64) -> IssuedToken {
        IssuedToken {
            access_token: crate::redact::SecretString::new("at"),
            token_type: "Bearer".into(),
            issued_at: ts(issued_at),
            expires_at: ts(expires_at),
            audience: vec!["urn:a".into()],
            scopes: vec![],
            refresh_token: None,
            certificate_thumbprint: None,
            authorization_details: Vec::new(),
        }
    }

    enum Want {
        Request(RequestReason),
        Done {
            write: Write,
            /// Ready (status, reason) of the status written, if one is.
            ready: Option<(&'static str, &'static str)>,
            events: Vec<(EventType, &'static str)>,
            /// Requeue, in seconds.
            requeue: std::ops::RangeInclusive<f64>,
        },
    }

    struct BeforeCase {
        name: &'static str,
        now: i64,
        published: Option<PublishedToken>,
        status: AudienceTokenStatus,
        renew_requested_at: Option<&'static str>,
        foreign_secret: bool,
        issuer: Result<&'static str, Failure>,
        backoff_waived: bool,
        want: Want,
    }

    fn before(name: &'static str, now: i64, want: Want) -> BeforeCase {
        BeforeCase {
            name,
            now,
            published: None,
            status: AudienceTokenStatus::default(),
            renew_requested_at: None,
            foreign_secret: false,
            issuer: Ok("issuer-a"),
            backoff_waived: false,
            want,
        }
    }

    fn done(
        write: Write,
        ready: Option<(&'static str, &'static str)>,
        events: Vec<(EventType, &'static str)>,
        requeue: std::ops::RangeInclusive<f64>,
    ) -> Want {
        Want::Done {
            write,
            ready,
            events,
            requeue,
        }
    }

    #[test]
    fn before_request_table() {
        use EventType::Warning;
        use RequestReason::*;
        let fresh = || Some(published(0, 3600, "h1"));
        let expired = || Some(published(-3600, -1, "h1"));
        let not_ready = || Err(Failure::issuer_not_ready("TokenIssuer ns/x not found"));
        let cases = [
            before("no Secret: a first token", 10, Want::Request(Initial)),
            BeforeCase {
                published: fresh(),
                // Renewal at 2412 s ± 10 % of the 1188 s window.
                ..before(
                    "current token: kept until the renewal time, derived status",
                    10,
                    done(
                        Write::Derived,
                        Some(("True", reason::ISSUED)),
                        vec![],
                        2280.0..=2525.0,
                    ),
                )
            },
            BeforeCase {
                published: Some(published(0, 3600, "h0")),
                ..before("spec changed", 10, Want::Request(SpecChanged))
            },
            BeforeCase {
                published: expired(),
                ..before("token expired", 10, Want::Request(Expired))
            },
            BeforeCase {
                published: fresh(),
                ..before("renewal time passed", 3000, Want::Request(Due))
            },
            BeforeCase {
                published: fresh(),
                renew_requested_at: Some("2026-11-21T10:00:00Z"),
                ..before("forced renewal", 10, Want::Request(Forced))
            },
            BeforeCase {
                published: fresh(),
                status: failing(3100, 1),
                ..before(
                    "backoff: wait for the next attempt, write nothing",
                    3000,
                    done(Write::Unchanged, None, vec![], 100.0..=100.0),
                )
            },
            BeforeCase {
                published: fresh(),
                status: failing(3700, 1),
                ..before(
                    "backoff: wake at expiry when it comes before the retry",
                    3500,
                    done(Write::Unchanged, None, vec![], 100.0..=100.0),
                )
            },
            BeforeCase {
                published: fresh(),
                status: failing(3000, 1),
                ..before("backoff over", 3000, Want::Request(Due))
            },
            BeforeCase {
                published: expired(),
                status: with_ready(failing(100, 1), "True", reason::ISSUED),
                ..before(
                    "expired while waiting: Ready turns False (Expired), derived status",
                    10,
                    done(
                        Write::Derived,
                        Some(("False", reason::EXPIRED)),
                        vec![],
                        90.0..=90.0,
                    ),
                )
            },
            BeforeCase {
                published: expired(),
                status: with_ready(failing(100, 1), "False", reason::EXPIRED),
                ..before(
                    "expired while waiting, already False: nothing to write",
                    10,
                    done(Write::Unchanged, None, vec![], 90.0..=90.0),
                )
            },
            BeforeCase {
                published: fresh(),
                status: failing(4000, 1),
                backoff_waived: true,
                ..before(
                    "backoff waived by an issuer change",
                    3000,
                    Want::Request(Due),
                )
            },
            BeforeCase {
                published: fresh(),
                status: failing(4000, 0),
                ..before("backoff waived by a spec change", 3000, Want::Request(Due))
            },
            BeforeCase {
                published: fresh(),
                status: failing(4000, 1),
                renew_requested_at: Some("2026-11-21T10:00:00Z"),
                ..before(
                    "backoff waived by a forced renewal",
                    3000,
                    Want::Request(Forced),
                )
            },
            BeforeCase {
                foreign_secret: true,
                ..before(
                    "foreign Secret: SecretConflict, Warning, recheck in a minute",
                    10,
                    done(
                        Write::Full,
                        Some(("False", reason::SECRET_CONFLICT)),
                        vec![(Warning, reason::SECRET_CONFLICT)],
                        60.0..=60.0,
                    ),
                )
            },
            BeforeCase {
                foreign_secret: true,
                status: with_failure(AudienceTokenStatus::default(), reason::SECRET_CONFLICT),
                ..before(
                    "foreign Secret again: no second Warning",
                    10,
                    done(
                        Write::Full,
                        Some(("False", reason::SECRET_CONFLICT)),
                        vec![],
                        60.0..=60.0,
                    ),
                )
            },
            BeforeCase {
                foreign_secret: true,
                status: failing(4000, 1),
                issuer: not_ready(),
                ..before(
                    "foreign Secret comes before backoff and issuer",
                    10,
                    done(
                        Write::Full,
                        Some(("False", reason::SECRET_CONFLICT)),
                        vec![(Warning, reason::SECRET_CONFLICT)],
                        60.0..=60.0,
                    ),
                )
            },
            BeforeCase {
                issuer: not_ready(),
                ..before(
                    "issuer not resolvable: IssuerNotReady, Warning, recheck in a minute",
                    10,
                    done(
                        Write::Full,
                        Some(("False", reason::ISSUER_NOT_READY)),
                        vec![(Warning, reason::ISSUER_NOT_READY)],
                        60.0..=60.0,
                    ),
                )
            },
            BeforeCase {
                published: fresh(),
                issuer: not_ready(),
                ..before(
                    "issuer not resolvable at renewal: Ready stays True, with the reason",
                    3000,
                    done(
                        Write::Full,
                        Some(("True", reason::ISSUER_NOT_READY)),
                        vec![(Warning, reason::ISSUER_NOT_READY)],
                        60.0..=60.0,
                    ),
                )
            },
            BeforeCase {
                issuer: not_ready(),
                status: with_failure(AudienceTokenStatus::default(), reason::ISSUER_NOT_READY),
                ..before(
                    "issuer not resolvable again: no second Warning",
                    10,
                    done(
                        Write::Full,
                        Some(("False", reason::ISSUER_NOT_READY)),
                        vec![],
                        60.0..=60.0,
                    ),
                )
            },
            BeforeCase {
                published: fresh(),
                issuer: not_ready(),
                ..before(
                    "issuer not resolvable but nothing to request: kept",
                    10,
                    done(
                        Write::Derived,
                        Some(("True", reason::ISSUED)),
                        vec![],
                        2280.0..=2525.0,
                    ),
                )
            },
            BeforeCase {
                published: fresh(),
                status: failing(4000, 1),
                issuer: not_ready(),
                ..before(
                    "issuer not resolvable while backing off: wait",
                    3000,
                    done(Write::Unchanged, None, vec![], 600.0..=600.0),
                )
            },
        ];
        for c in &cases {
            let mut o = observed(c.now, c.published.as_ref(), &c.status);
            o.renew_requested_at = c.renew_requested_at;
            o.foreign_secret = c.foreign_secret;
            let step = before_request(&o, c.issuer.clone(), c.backoff_waived);
            match (&c.want, step) {
                (Want::Request(want), Step::Request { reason, issuer }) => {
                    assert_eq!(reason, *want, "{}", c.name);
                    assert_eq!(issuer, "issuer-a", "{}: the issuer is handed back", c.name);
                }
                (
                    Want::Done {
                        write,
                        ready,
                        events,
                        requeue,
                    },
                    Step::Done(outcome),
                ) => {
                    let (got_write, status) = write_of(&outcome.status);
                    assert_eq!(got_write, *write, "{}", c.name);
                    assert_eq!(status.map(ready_of), *ready, "{}", c.name);
                    assert_eq!(events_of(&outcome), *events, "{}", c.name);
                    assert!(
                        requeue.contains(&secs(outcome.requeue_after)),
                        "{}: requeue {:?}",
                        c.name,
                        outcome.requeue_after
                    );
                }
                (_, step) => panic!("{}: got {step:?}", c.name),
            }
        }
    }

    #[test]
    fn blocked_statuses_say_why_and_count_no_attempt() {
        let none = AudienceTokenStatus::default();
        let mut o = observed(10, None, &none);
        o.foreign_secret = true;
        let Step::Done(outcome) = before_request(&o, Ok(()), false) else {
            panic!("a foreign Secret blocks")
        };
        let (_, Some(status)) = write_of(&outcome.status) else {
            panic!("a status is written")
        };
        let note =
            "Secret ns/s exists and is not managed by this AudienceToken; it is left untouched";
        assert_eq!(outcome.events[0].note, note);
        assert_eq!(status.conditions[0].message, note);
        assert_eq!(status.failed_attempts, 0);
        assert_eq!(status.next_attempt_time, None);

        let failure = Failure::issuer_not_ready("TokenIssuer ns/x not found");
        let o = observed(10, None, &none);
        let Step::Done(outcome) = before_request::<()>(&o, Err(failure.clone()), false) else {
            panic!("an unresolvable issuer blocks")
        };
        assert_eq!(outcome.events[0].note, failure.message);
        assert_eq!(
            outcome.status,
            StatusWrite::Full(status_failed(&none, &failure, None, false, &o))
        );
        assert_eq!(
            outcome.requeue_after, BLOCKED_RECHECK,
            "nothing expires sooner"
        );
    }

    #[test]
    fn a_blocked_token_is_looked_at_again_when_its_token_expires() {
        // Issued at 40, due for renewal by 100, expiring at 106, the issuer gone: woken at
        // 106, not a recheck later; then Ready is False, Expired.
        let none = AudienceTokenStatus::default();
        let token = published(40, 106, "h1");
        let failure = Failure::issuer_not_ready("TokenIssuer ns/x not found");
        let o = observed(100, Some(&token), &none);
        let Step::Done(outcome) = before_request::<()>(&o, Err(failure.clone()), false) else {
            panic!("an unresolvable issuer blocks")
        };
        assert_eq!(outcome.requeue_after, Duration::from_secs(6));
        let (_, Some(status)) = write_of(&outcome.status) else {
            panic!("a status is written")
        };
        assert_eq!(status.conditions[0].status, "True", "still valid");
        let o = observed(106, Some(&token), status);
        let Step::Done(outcome) = before_request::<()>(&o, Err(failure), false) else {
            panic!("still blocked")
        };
        let (_, Some(status)) = write_of(&outcome.status) else {
            panic!("a status is written")
        };
        assert_eq!(
            (
                status.conditions[0].status.as_str(),
                status.conditions[0].reason.as_str()
            ),
            ("False", reason::EXPIRED)
        );
        assert_eq!(outcome.requeue_after, BLOCKED_RECHECK);
    }

    struct FailureCase {
        name: &'static str,
        now: i64,
        published: Option<PublishedToken>,
        status: AudienceTokenStatus,
        failure: Failure,
        /// Backoff, in seconds.
        delay: std::ops::RangeInclusive<f64>,
        /// Requeue, in seconds; `None`: the backoff itself.
        requeue: Option<f64>,
        ready: (&'static str, &'static str),
        warning: bool,
    }

    fn failed_at(
        name: &'static str,
        now: i64,
        delay: std::ops::RangeInclusive<f64>,
    ) -> FailureCase {
        FailureCase {
            name,
            now,
            published: Some(published(0, 3600, "h1")),
            status: AudienceTokenStatus::default(),
            failure: request_failed(),
            delay,
            requeue: None,
            ready: ("True", reason::TOKEN_REQUEST_FAILED),
            warning: true,
        }
    }

    fn attempts(failed: i32, last: &str) -> AudienceTokenStatus {
        AudienceTokenStatus {
            failed_attempts: failed,
            ..with_failure(AudienceTokenStatus::default(), last)
        }
    }

    #[test]
    fn after_a_failed_request_table() {
        let with_retry_after = |secs| Failure {
            retry_after: Some(Duration::from_secs(secs)),
            ..request_failed()
        };
        let cases = [
            failed_at("first failure: 5 s ± 10 %", 3000, 4.5..=5.5),
            FailureCase {
                status: attempts(1, reason::TOKEN_REQUEST_FAILED),
                warning: false,
                ..failed_at(
                    "second failure: 10 s ± 10 %, no second Warning for the same reason",
                    3000,
                    9.0..=11.0,
                )
            },
            FailureCase {
                status: attempts(3, reason::TOKEN_REQUEST_FAILED),
                warning: false,
                ..failed_at("fourth failure: 40 s ± 10 %", 3000, 36.0..=44.0)
            },
            FailureCase {
                status: attempts(12, reason::TOKEN_REQUEST_FAILED),
                warning: false,
                ..failed_at("many failures: capped at 5 min", 3000, 270.0..=300.0)
            },
            FailureCase {
                status: attempts(1, reason::TOKEN_REQUEST_FAILED),
                failure: Failure::new(reason::AUDIENCE_MISMATCH, "aud is urn:b"),
                ready: ("True", reason::AUDIENCE_MISMATCH),
                ..failed_at("a new reason: Warning again", 3000, 9.0..=11.0)
            },
            FailureCase {
                failure: with_retry_after(120),
                ..failed_at(
                    "Retry-After longer than the backoff: honoured",
                    3000,
                    120.0..=120.0,
                )
            },
            FailureCase {
                status: attempts(8, reason::TOKEN_REQUEST_FAILED),
                failure: with_retry_after(2),
                warning: false,
                ..failed_at(
                    "Retry-After shorter than the backoff: the backoff",
                    3000,
                    270.0..=300.0,
                )
            },
            FailureCase {
                requeue: Some(2.0),
                ..failed_at(
                    "wake at expiry when it comes before the retry",
                    3598,
                    4.5..=5.5,
                )
            },
            FailureCase {
                published: Some(published(-3600, -1, "h1")),
                ready: ("False", reason::EXPIRED),
                ..failed_at("expired token with a failure: Expired", 10, 4.5..=5.5)
            },
            FailureCase {
                published: None,
                ready: ("False", reason::TOKEN_REQUEST_FAILED),
                ..failed_at("no token yet: the failure's reason", 10, 4.5..=5.5)
            },
            FailureCase {
                published: Some(published(0, 3600, "h0")),
                ready: ("False", reason::TOKEN_REQUEST_FAILED),
                requeue: Some(2.0),
                ..failed_at(
                    "token of an old spec: not Ready, but wake at its expiry",
                    3598,
                    4.5..=5.5,
                )
            },
        ];
        for c in &cases {
            let o = observed(c.now, c.published.as_ref(), &c.status);
            let AfterRequest::Retry {
                failure,
                delay,
                outcome,
            } = after_request(&o, Err(&c.failure))
            else {
                panic!("{}: a failure is retried", c.name)
            };
            assert_eq!(
                failure, &c.failure,
                "{}: the failure is handed back",
                c.name
            );
            assert!(
                c.delay.contains(&secs(delay)),
                "{}: delay {delay:?}",
                c.name
            );
            let requeue = c.requeue.unwrap_or(secs(delay));
            assert_eq!(secs(outcome.requeue_after), requeue, "{}", c.name);
            let StatusWrite::Full(status) = &outcome.status else {
                panic!("{}: a failure writes the full status", c.name)
            };
            assert_eq!(ready_of(status), c.ready, "{}", c.name);
            assert_eq!(
                status.failed_attempts,
                c.status.failed_attempts + 1,
                "{}",
                c.name
            );
            assert_eq!(
                status.last_failure_time,
                Some(time(ts(c.now))),
                "{}",
                c.name
            );
            assert_eq!(
                status.next_attempt_time,
                Some(time(o.now + delay)),
                "{}",
                c.name
            );
            let warnings: Vec<_> = if c.warning {
                vec![(EventType::Warning, c.failure.reason)]
            } else {
                vec![]
            };
            assert_eq!(events_of(&outcome), warnings, "{}", c.name);
        }
    }

    #[test]
    fn backoff_jitter_is_stable_per_object_and_attempt() {
        let fresh = published(0, 3600, "h1");
        let status = AudienceTokenStatus::default();
        let failure = request_failed();
        let delay_for = |seed: &'static str| {
            let mut o = observed(3000, Some(&fresh), &status);
            o.jitter_seed = seed;
            match after_request(&o, Err(&failure)) {
                AfterRequest::Retry { delay, .. } => delay,
                AfterRequest::Publish { .. } => panic!("a failure is retried"),
            }
        };
        assert_eq!(delay_for("uid-1"), delay_for("uid-1"));
        let delays: std::collections::BTreeSet<Duration> = ["uid-1", "uid-2", "uid-3", "uid-4"]
            .into_iter()
            .map(delay_for)
            .collect();
        assert!(
            delays.len() > 1,
            "objects back off at different times: {delays:?}"
        );
    }

    #[test]
    fn requeue_is_at_least_a_second() {
        assert_eq!(requeue_after(ts(5), ts(10)), MIN_REQUEUE);
        assert_eq!(requeue_after(ts(10), ts(10)), MIN_REQUEUE);
        let soon = ts(10) + jiff::SignedDuration::from_millis(300);
        assert_eq!(requeue_after(soon, ts(10)), MIN_REQUEUE);
        assert_eq!(
            requeue_after(ts(12) + jiff::SignedDuration::from_millis(500), ts(10)),
            Duration::from_millis(2500)
        );

        // The token expires in half a second, before the retry: wake in a second.
        let fresh = published(0, 3600, "h1");
        let none = AudienceTokenStatus::default();
        let o = Observed {
            now: ts(3599) + jiff::SignedDuration::from_millis(500),
            ..observed(0, Some(&fresh), &none)
        };
        let AfterRequest::Retry { outcome, .. } = after_request(&o, Err(&request_failed())) else {
            panic!("a failure is retried")
        };
        assert_eq!(outcome.requeue_after, MIN_REQUEUE);
    }

    struct IssuedCase {
        name: &'static str,
        now: i64,
        published: Option<PublishedToken>,
        status: AudienceTokenStatus,
        policy: RenewBefore,
        issued: IssuedToken,
        renewed: bool,
        /// The RenewalWindow Warning's note, when there is one.
        renewal_window: Option<&'static str>,
    }

    fn issued_case(name: &'static str, now: i64, lifetime: i64) -> IssuedCase {
        IssuedCase {
            name,
            now,
            published: None,
            status: AudienceTokenStatus::default(),
            policy: RenewBefore::default(),
            issued: issued(now, now + lifetime),
            renewed: false,
            renewal_window: None,
        }
    }

    #[test]
    fn after_an_issued_token_table() {
        const TOO_SHORT: &str = "token lifetime 60s is too short to renew 90s before expiry; pods may read the new token late";
        let cases = [
            issued_case("first token: Issued", 10, 3600),
            IssuedCase {
                published: Some(published(0, 3600, "h1")),
                renewed: true,
                ..issued_case("a token replaced: Renewed", 3000, 3600)
            },
            IssuedCase {
                status: with_ready(
                    AudienceTokenStatus {
                        issued_at: Some(time(ts(0))),
                        ..AudienceTokenStatus::default()
                    },
                    "True",
                    reason::ISSUED,
                ),
                renewed: true,
                ..issued_case("Secret gone but status had a token: Renewed", 3000, 3600)
            },
            IssuedCase {
                published: Some(published(0, 3600, "h1")),
                status: with_ready(failing(3100, 1), "True", reason::ISSUED),
                renewed: true,
                ..issued_case("after failures: the failure record is cleared", 3200, 3600)
            },
            IssuedCase {
                renewal_window: Some(TOO_SHORT),
                ..issued_case("first token, lifetime too short: RenewalWindow", 10, 60)
            },
            IssuedCase {
                published: Some(published(10, 70, "h1")),
                renewed: true,
                ..issued_case(
                    "renewed under the same spec: no second RenewalWindow",
                    60,
                    60,
                )
            },
            IssuedCase {
                published: Some(published(10, 70, "h0")),
                renewed: true,
                renewal_window: Some(TOO_SHORT),
                ..issued_case("first token of a new spec: RenewalWindow again", 60, 60)
            },
            IssuedCase {
                policy: RenewBefore::Duration(Duration::from_secs(7200)),
                renewal_window: Some(
                    "renewBefore is not shorter than the token lifetime (3600s); renewing at two thirds instead",
                ),
                ..issued_case(
                    "renewBefore longer than the lifetime: RenewalWindow",
                    10,
                    3600,
                )
            },
        ];
        for c in &cases {
            let mut o = observed(c.now, c.published.as_ref(), &c.status);
            o.policy = c.policy;
            let AfterRequest::Publish {
                issued,
                renewal_time,
                renewed,
                outcome,
            } = after_request(&o, Ok(&c.issued))
            else {
                panic!("{}: an issued token is published", c.name)
            };
            assert!(
                std::ptr::eq(issued, &c.issued),
                "{}: the token is handed back",
                c.name
            );
            let plan = o.renewal_plan(c.issued.issued_at, c.issued.expires_at);
            assert_eq!(renewal_time, plan.renewal_time, "{}", c.name);
            assert_eq!(renewed, c.renewed, "{}", c.name);
            assert_eq!(
                outcome.requeue_after,
                requeue_after(plan.renewal_time, o.now),
                "{}",
                c.name
            );

            let StatusWrite::Full(status) = &outcome.status else {
                panic!("{}: a new token writes the full status", c.name)
            };
            assert_eq!(
                status,
                &status_issued(&c.status, &c.issued, &plan, "urn:a", &o)
            );
            let why = if c.renewed {
                reason::RENEWED
            } else {
                reason::ISSUED
            };
            assert_eq!(ready_of(status), ("True", why), "{}", c.name);
            assert_eq!(status.failed_attempts, 0, "{}", c.name);
            assert_eq!(status.last_failure_message, None, "{}", c.name);
            assert_eq!(status.next_attempt_time, None, "{}", c.name);

            let what = if c.renewed {
                "renewed the token"
            } else {
                "issued a token"
            };
            let mut events = vec![Event {
                type_: EventType::Normal,
                reason: why,
                note: format!(
                    "{what} for urn:a into Secret s; it expires at {}, renewal at {}",
                    rfc3339(c.issued.expires_at),
                    rfc3339(plan.renewal_time)
                ),
            }];
            if let Some(note) = c.renewal_window {
                events.push(Event {
                    type_: EventType::Warning,
                    reason: RENEWAL_WINDOW,
                    note: note.into(),
                });
            }
            assert_eq!(outcome.events, events, "{}", c.name);
        }
    }

    #[test]
    fn rate_limit_table() {
        let fresh = published(0, 3600, "h1");
        let none = AudienceTokenStatus::default();
        let o = observed(3000, Some(&fresh), &none);
        assert_eq!(rate_limited(&o, Admission::Now), Admitted::Now);
        // Short waits (the limiter reserves a place for up to a second) are slept through.
        for wait in [
            Duration::from_millis(100),
            crate::rate_limit::MAX_INLINE_WAIT,
        ] {
            assert_eq!(
                rate_limited(&o, Admission::After(wait)),
                Admitted::AfterSleep(wait)
            );
        }
        // Longer ones defer by one to two times the wait, writing nothing.
        let wait = Duration::from_secs(10);
        let mut deferrals = std::collections::BTreeSet::new();
        for now in 3000..3050 {
            let o = observed(now, Some(&fresh), &none);
            let Admitted::Deferred(outcome) = rate_limited(&o, Admission::Later(wait)) else {
                panic!("a long wait defers")
            };
            assert_eq!(outcome.status, StatusWrite::Unchanged);
            assert!(outcome.events.is_empty());
            assert!(
                outcome.requeue_after >= wait && outcome.requeue_after < 2 * wait,
                "{:?}",
                outcome.requeue_after
            );
            assert_eq!(
                rate_limited(&o, Admission::Later(wait)),
                Admitted::Deferred(outcome.clone()),
                "the spread is stable for the same object and moment"
            );
            deferrals.insert(outcome.requeue_after);
        }
        assert!(
            deferrals.len() > 40,
            "deferrals spread: {}",
            deferrals.len()
        );
    }

    #[test]
    fn secret_metadata_follows_the_spec_only_for_a_secret_holding_our_token() {
        let fresh = published(0, 3600, "h1");
        let none = AudienceTokenStatus::default();
        let behind = |published, foreign| Observed {
            secret_metadata_behind: true,
            foreign_secret: foreign,
            ..observed(10, published, &none)
        };
        assert!(update_secret_metadata(&behind(Some(&fresh), false)));
        assert!(
            !update_secret_metadata(&behind(None, false)),
            "no Secret of ours"
        );
        assert!(
            !update_secret_metadata(&behind(Some(&fresh), true)),
            "someone else's"
        );
        assert!(
            !update_secret_metadata(&observed(10, Some(&fresh), &none)),
            "up to date"
        );
    }
}
