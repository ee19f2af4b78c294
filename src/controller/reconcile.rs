//! The reconcile loop for one AudienceToken: decide, maybe request a token, publish it,
//! record status, and requeue for the renewal time.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};
use tracing::{debug, info, warn};

use super::issuer::{self, ResolvedIssuer};
use super::plan::{self, Decision, Failure, Observed, reason};
use super::{Context, Error};
use crate::api::{
    AudienceToken, AudienceTokenStatus, GrantType, RENEW_REQUESTED_AT_ANNOTATION, parse_duration,
};
use crate::oauth::{Grant, IssuedToken, TokenError, TokenRequest, issue};
use crate::rate_limit::Admission;
use crate::renewal::{RenewBefore, RenewalWarning, backoff_delay, unit_from_seed};
use crate::secret::{
    MANAGER, PublishedToken, desired_secret, is_owned_by, published_token, spec_hash,
};

/// How often to look again at an AudienceToken that is blocked on something the operator
/// cannot watch closely (a foreign Secret, a missing issuer, a namespace not allowed).
const BLOCKED_RECHECK: Duration = Duration::from_secs(60);

/// Who holds the Secret an AudienceToken wants to write.
enum SecretState {
    /// No such Secret.
    Absent,
    /// Ours; with the token it holds, if its annotations are complete.
    Ours(Option<PublishedToken>),
    /// Someone else's: never written.
    Foreign,
}

/// Reconciles one AudienceToken. Token-request failures are handled here (status, backoff)
/// and return `Ok`; only Kubernetes API failures return `Err`.
pub async fn reconcile(token: Arc<AudienceToken>, ctx: Arc<Context>) -> Result<Action, Error> {
    let namespace = token
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = token.name_any();
    let now = Timestamp::now();
    let spec_hash = spec_hash(&token.spec);
    let status = token.status.clone().unwrap_or_default();
    let uid = token.uid().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &namespace);

    let secret_state = secret_state(&ctx, &secrets, &namespace, token.secret_name(), &name).await?;
    let published = match &secret_state {
        SecretState::Ours(published) => published.clone(),
        SecretState::Absent | SecretState::Foreign => None,
    };
    let observed = Observed {
        now,
        generation: token.meta().generation,
        spec_hash: &spec_hash,
        published: published.as_ref(),
        status: &status,
        renew_requested_at: token
            .annotations()
            .get(RENEW_REQUESTED_AT_ANNOTATION)
            .map(String::as_str),
        policy: renew_policy(&token),
        jitter_seed: &uid,
        namespace: &namespace,
        secret_name: token.secret_name(),
        audience: token.expected_audience(),
        foreign_secret: matches!(secret_state, SecretState::Foreign),
    };

    if let SecretState::Foreign = secret_state {
        let failure = Failure {
            reason: reason::SECRET_CONFLICT,
            message: format!(
                "Secret {namespace}/{} exists and is not managed by this AudienceToken; it is left untouched",
                token.secret_name()
            ),
            retry_after: None,
        };
        let next = plan::status_failed(&status, &failure, None, false, &observed);
        write_status(&ctx, &token, &status, &next, Some(&failure)).await?;
        return Ok(Action::requeue(BLOCKED_RECHECK));
    }

    let resolved = issuer::resolve(&ctx, &token);
    let backoff_waived = match &resolved {
        Ok(issuer) => ctx.issuer_changed_since_failure(&token, issuer),
        Err(_) => false,
    };

    match plan::decide(&observed, backoff_waived) {
        Decision::Keep(renewal) => {
            let published = published
                .as_ref()
                .ok_or(Error::MissingField("published token"))?;
            let next = plan::status_current(
                &status,
                published,
                &renewal,
                token.expected_audience(),
                &observed,
            );
            write_derived_status(&ctx, &token, &status, &next).await?;
            Ok(requeue_at(renewal.renewal_time, now))
        }
        Decision::Wait { until } => {
            let wake = match &published {
                Some(p) if p.expires_at > now => until.min(p.expires_at),
                _ => until,
            };
            // Ready turns False (Expired) when the old token runs out while waiting.
            if published.as_ref().is_some_and(|p| p.expires_at <= now) && ready_is_true(&status) {
                let next = plan::status_expired_while_waiting(&status, &observed);
                write_derived_status(&ctx, &token, &status, &next).await?;
            }
            Ok(requeue_at(wake, now))
        }
        Decision::Request(why) => {
            let issuer = match resolved {
                Ok(issuer) => issuer,
                Err(failure) => {
                    let next = plan::status_failed(&status, &failure, None, false, &observed);
                    write_status(&ctx, &token, &status, &next, Some(&failure)).await?;
                    return Ok(Action::requeue(BLOCKED_RECHECK));
                }
            };
            if let Some(limit) = &issuer.spec.rate_limit {
                match ctx
                    .rate_limiter
                    .admit(&issuer.key, limit, std::time::Instant::now())
                {
                    Admission::Now => {}
                    Admission::After(wait) => tokio::time::sleep(wait).await,
                    Admission::Later(wait) => {
                        // Spread the retries so that they do not all come back at once.
                        let spread = unit_from_seed(&format!("{uid}/{now}"));
                        let wait = wait.mul_f64(1.0 + spread);
                        debug!(namespace, name, issuer = issuer.key, resource = token.spec.resource, retry_in = ?wait, "rateLimit reached; token request deferred");
                        return Ok(Action::requeue(wait));
                    }
                }
            }
            info!(namespace, name, issuer = issuer.key, resource = token.spec.resource, reason = ?why, "requesting token");
            match request_token(&ctx, &token, &issuer, now).await {
                Ok(issued) => publish(&ctx, &token, &secrets, &status, &issued, &observed).await,
                Err(failure) => {
                    ctx.record_failure(&token, ctx.issuer_revision(&issuer));
                    let attempts = u32::try_from(status.failed_attempts)
                        .unwrap_or(0)
                        .saturating_add(1);
                    let jitter = unit_from_seed(&format!("{uid}/{attempts}"));
                    let delay = backoff_delay(attempts, jitter, failure.retry_after);
                    let retry_at = now + delay;
                    warn!(namespace, name, issuer = issuer.key, resource = token.spec.resource, error = %failure.message, retry_in = ?delay, "token request failed");
                    let next =
                        plan::status_failed(&status, &failure, Some(retry_at), true, &observed);
                    write_status(&ctx, &token, &status, &next, Some(&failure)).await?;
                    let wake = match &published {
                        Some(p) if p.expires_at > now => retry_at.min(p.expires_at),
                        _ => retry_at,
                    };
                    Ok(requeue_at(wake, now))
                }
            }
        }
    }
}

async fn request_token(
    ctx: &Context,
    token: &AudienceToken,
    issuer: &ResolvedIssuer,
    now: Timestamp,
) -> Result<IssuedToken, Failure> {
    let settings = ctx.endpoints.endpoint(issuer.target()).await?;
    let failed = |error: TokenError| {
        ctx.endpoints.invalidate(issuer.target(), &error);
        Failure::from_token_error(&error)
    };
    let response = match issuer.spec.grant.type_ {
        GrantType::RefreshToken => {
            ctx.refresh_chains
                .request(
                    ctx,
                    issuer,
                    &settings.endpoint,
                    &token.spec.scopes,
                    &token.spec.resource,
                    token.expected_audience(),
                )
                .await?
        }
        GrantType::ClientCredentials => {
            let request = TokenRequest {
                grant: Grant::ClientCredentials,
                scopes: token.spec.scopes.clone(),
                audience: crate::issuer::params::audience_param(
                    issuer.spec.audience_parameter,
                    &token.spec.resource,
                    token.expected_audience(),
                ),
            };
            ctx.token_request(&issuer.key, &settings.endpoint, &request)
                .await
                .map_err(failed)?
        }
    };
    let issued = issue(
        response,
        now,
        settings.default_lifetime,
        token.expected_audience(),
        &token.spec.scopes,
    )
    .map_err(failed)?;
    // Optional: a JWT access token must also be signed by the issuer (opaque ones pass).
    if issuer.spec.verify_access_token_signature {
        let timeout = settings.endpoint.timeout;
        ctx.endpoints
            .verify_signature(issuer.target(), issued.access_token.expose(), timeout)
            .await?;
    }
    // RFC 6749 §4.4.3: a refresh token in a client-credentials response is not used; the
    // refresh-token chain took its own already.
    Ok(IssuedToken {
        refresh_token: None,
        ..issued
    })
}

async fn publish(
    ctx: &Context,
    token: &AudienceToken,
    secrets: &Api<Secret>,
    status: &AudienceTokenStatus,
    issued: &IssuedToken,
    observed: &Observed<'_>,
) -> Result<Action, Error> {
    let secret = desired_secret(token, issued);
    secrets
        .patch(
            token.secret_name(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await?;
    ctx.forget_failure(token);
    let renewal = observed.renewal_plan(issued.issued_at, issued.expires_at);
    let next = plan::status_issued(
        status,
        issued,
        &renewal,
        token.expected_audience(),
        observed,
    );
    write_status(ctx, token, status, &next, None).await?;
    let renewed = next
        .conditions
        .iter()
        .any(|c| c.type_ == crate::api::READY && c.reason == reason::RENEWED);
    info!(
        namespace = token.namespace().unwrap_or_default(),
        name = token.name_any(),
        issuer = super::issuer::issuer_key(token),
        resource = token.spec.resource,
        expires_at = %issued.expires_at,
        renewal_time = %renewal.renewal_time,
        renewed,
        "published token"
    );
    let (why, what) = if renewed {
        (reason::RENEWED, "renewed the token")
    } else {
        (reason::ISSUED, "issued a token")
    };
    ctx.event(
        token,
        kube::runtime::events::EventType::Normal,
        why,
        format!(
            "{what} for {} into Secret {}; it expires at {}, renewal at {}",
            token.expected_audience(),
            token.secret_name(),
            crate::secret::rfc3339(issued.expires_at),
            crate::secret::rfc3339(renewal.renewal_time),
        ),
    )
    .await;
    // Said once per token and spec, not at every renewal.
    let first_for_spec = observed
        .published
        .is_none_or(|p| p.spec_hash != observed.spec_hash);
    if let Some(warning) = renewal.warning.filter(|_| first_for_spec) {
        let note = match warning {
            RenewalWarning::LifetimeTooShort { lifetime } => format!(
                "token lifetime {}s is too short to renew 90s before expiry; pods may read the new token late",
                lifetime.as_secs()
            ),
            RenewalWarning::RenewBeforeTooLong { lifetime } => format!(
                "renewBefore is not shorter than the token lifetime ({}s); renewing at two thirds instead",
                lifetime.as_secs()
            ),
        };
        ctx.warn(token, "RenewalWindow", note).await;
    }
    Ok(requeue_at(renewal.renewal_time, observed.now))
}

/// Looks the Secret up in the metadata cache; on a miss, asks the API server (the Secret may
/// be someone else's, which the label-selected cache cannot show).
async fn secret_state(
    ctx: &Context,
    secrets: &Api<Secret>,
    namespace: &str,
    secret_name: &str,
    token_name: &str,
) -> Result<SecretState, Error> {
    let meta = match ctx
        .secrets
        .get(&ObjectRef::new(secret_name).within(namespace))
    {
        Some(cached) => Some(cached.metadata.clone()),
        None => secrets
            .get_metadata_opt(secret_name)
            .await?
            .map(|m| m.metadata),
    };
    Ok(match meta {
        None => SecretState::Absent,
        Some(meta) if is_owned_by(&meta, token_name) => SecretState::Ours(published_token(&meta)),
        Some(_) => SecretState::Foreign,
    })
}

fn renew_policy(token: &AudienceToken) -> RenewBefore {
    if let Some(before) = token
        .spec
        .renew_before
        .as_deref()
        .and_then(|d| parse_duration(d).ok())
    {
        return RenewBefore::Duration(before);
    }
    match token.spec.renew_before_percentage {
        Some(p) => RenewBefore::Percentage(u8::try_from(p.clamp(1, 90)).unwrap_or(33)),
        None => RenewBefore::default(),
    }
}

fn ready_is_true(status: &AudienceTokenStatus) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == crate::api::READY && c.status == "True")
}

/// Patches status when it changed, and raises a Warning Event when the Ready reason
/// changes to a failure.
async fn write_status(
    ctx: &Context,
    token: &AudienceToken,
    previous: &AudienceTokenStatus,
    next: &AudienceTokenStatus,
    failure: Option<&Failure>,
) -> Result<(), Error> {
    write_status_patch(ctx, token, previous, next, plan::status_patch(next)).await?;
    if let Some(failure) = failure {
        // One Warning per kind of failure, not one per retry.
        if plan::last_failure_reason(previous) != Some(failure.reason) {
            ctx.warn(token, failure.reason, failure.message.clone())
                .await;
        }
    }
    Ok(())
}

/// Like [`write_status`], but patches only the fields derived from the published token and
/// the Ready condition. Used where `previous` comes from a cache that may lag our own last
/// status write: a full patch from it could wipe fields that write set.
async fn write_derived_status(
    ctx: &Context,
    token: &AudienceToken,
    previous: &AudienceTokenStatus,
    next: &AudienceTokenStatus,
) -> Result<(), Error> {
    write_status_patch(ctx, token, previous, next, plan::derived_status_patch(next)).await
}

async fn write_status_patch(
    ctx: &Context,
    token: &AudienceToken,
    previous: &AudienceTokenStatus,
    next: &AudienceTokenStatus,
    patch: serde_json::Value,
) -> Result<(), Error> {
    let namespace = token.namespace().unwrap_or_default();
    let expires_at = next.expires_at.as_ref().map(|t| t.0.as_second());
    ctx.metrics.token_state(
        &namespace,
        &token.name_any(),
        expires_at,
        ready_is_true(next),
    );
    if previous == next {
        return Ok(());
    }
    let api: Api<AudienceToken> =
        Api::namespaced(ctx.client.clone(), &token.namespace().unwrap_or_default());
    api.patch_status(
        &token.name_any(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await?;
    Ok(())
}

fn requeue_at(at: Timestamp, now: Timestamp) -> Action {
    let wait = at.duration_since(now).unsigned_abs();
    let wait = if at <= now {
        Duration::from_secs(1)
    } else {
        wait.max(Duration::from_secs(1))
    };
    Action::requeue(wait)
}
