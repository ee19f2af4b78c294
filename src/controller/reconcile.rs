//! The reconcile loop for one AudienceToken: gather what is observed (the Secret, the
//! issuer, the rate limiter), let [`plan`] decide, and carry out its outcome (publish the
//! token, write status, publish Events, requeue).

use std::sync::Arc;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::Secret;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::core::Request;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tracing::{debug, info, warn};

use super::issuer::{self, ResolvedIssuer};
use super::owned_secrets::OwnedSecret;
use super::plan::{
    self, Admitted, AfterRequest, Failure, Observed, Outcome, StatusPatch, StatusWrite, Step,
};
use super::refresh_chain::ChainRequest;
use super::{Context, Error};
use crate::api::{
    AudienceToken, AudienceTokenStatus, GrantType, RENEW_REQUESTED_AT_ANNOTATION, parse_duration,
};
use crate::oauth::dpop::DpopKey;
use crate::oauth::{Binding, ClientCertificate, IssuedToken, TokenError, TokenRequest, issue};
use crate::renewal::RenewBefore;
use crate::secret::{
    MANAGER, MetadataUpdate, PublishedToken, desired_secret, is_owned_by, metadata_update,
    spec_hash, stale_fields,
};

/// Who holds the Secret an AudienceToken wants to write.
enum SecretState {
    /// Not among the owned Secrets the cache holds: absent, as far as anyone knows, so it
    /// is created (and read only if the create finds one).
    Absent,
    /// Ours: what its metadata says.
    Ours(Arc<OwnedSecret>),
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
    // Built only where a Secret is read (rare paths): per reconcile it was 0.5% of the CPU.
    let secrets = || -> Api<Secret> { Api::namespaced(ctx.client.clone(), &namespace) };

    let secret_state = secret_state(&ctx, secrets, &namespace, &token, &status).await?;
    // A Secret not known to exist is created, never applied over (it may be someone else's).
    let (existing_secret, published, foreign_secret) = match secret_state {
        SecretState::Ours(owned) => {
            let published = owned.published.clone();
            (Some(owned), published, false)
        }
        SecretState::Absent => (None, None, false),
        SecretState::Foreign => (None, None, true),
    };
    let metadata_update = existing_secret
        .as_deref()
        .and_then(|owned| metadata_update(&owned.metadata(), &token));
    let resolved = issuer::resolve(&ctx, &token);
    let backoff_waived = match &resolved {
        Ok(issuer) => ctx.issuer_changed_since_failure(&token, issuer.revision(&ctx)),
        Err(_) => false,
    };
    let client_certificate = match (&resolved, published.as_ref()) {
        (Ok(issuer), Some(published)) => {
            presented_certificate(&ctx, issuer, published, &namespace, &name).await
        }
        // Without the issuer nothing is known to have changed: the plan decides as for any
        // token (a valid one is kept).
        (Err(_), Some(published)) => published.certificate_thumbprint.clone(),
        (_, None) => None,
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
        foreign_secret,
        client_certificate: client_certificate.as_deref(),
        issuance_events: ctx.settings.issuance_events,
        secret_metadata_behind: metadata_update.is_some(),
    };
    // Carried out with any outcome that writes no token (a token written carries it).
    let metadata_update = metadata_update.filter(|_| plan::update_secret_metadata(&observed));
    let carry_out = |outcome| finish(&ctx, &token, &status, outcome, metadata_update.as_ref());

    let (why, issuer) = match plan::before_request(&observed, resolved, backoff_waived) {
        Step::Done(outcome) => return carry_out(outcome).await,
        Step::Request { reason, issuer } => (reason, issuer),
    };
    if let Some(limit) = &issuer.spec.rate_limit {
        let admission = ctx
            .rate_limiter
            .admit(&issuer.key, limit, std::time::Instant::now());
        match plan::rate_limited(&observed, admission) {
            Admitted::Now => {}
            Admitted::AfterSleep(wait) => tokio::time::sleep(wait).await,
            Admitted::Deferred(outcome) => {
                debug!(namespace, name, issuer = issuer.key, resource = token.spec.resource, retry_in = ?outcome.requeue_after, "rateLimit reached; token request deferred");
                return carry_out(outcome).await;
            }
        }
    }
    // One info line per issuance (the published one, or the failure's warning): at 10,000
    // tokens a second line cost 5% of the operator's CPU.
    debug!(namespace, name, issuer = issuer.key, resource = token.spec.resource, reason = ?why, "requesting token");
    let result = request_token(&ctx, &token, &issuer, secrets, published.as_ref(), now).await;
    let dpop = result.as_ref().ok().and_then(|(_, key)| key.clone());
    match plan::after_request(&observed, result.as_ref().map(|(issued, _)| issued)) {
        AfterRequest::Publish {
            issued,
            renewal_time,
            renewed,
            outcome,
        } => {
            let secret = desired_secret(&token, &spec_hash, issued, dpop.as_deref());
            if !write_secret(&ctx, &token, secrets, secret, existing_secret.as_deref()).await? {
                let outcome = plan::foreign_at_publish(&Observed {
                    foreign_secret: true,
                    ..observed
                });
                ctx.set_foreign_secret(&namespace, token.secret_name(), true);
                warn!(
                    namespace,
                    name,
                    secret = token.secret_name(),
                    "the Secret to create exists and is someone else's; the token is dropped"
                );
                return finish(&ctx, &token, &status, outcome, None).await;
            }
            ctx.forget_failure(&token);
            write_status(&ctx, &token, &status, &outcome.status).await?;
            info!(
                namespace,
                name,
                issuer = issuer.key,
                resource = token.spec.resource,
                expires_at = %issued.expires_at,
                renewal_time = %renewal_time,
                renewed,
                reason = ?why,
                "published token"
            );
            publish_events(&ctx, &token, outcome.events).await;
            Ok(Action::requeue(outcome.requeue_after))
        }
        AfterRequest::Retry {
            failure,
            delay,
            outcome,
        } => {
            ctx.record_failure(&token, issuer.revision(&ctx));
            warn!(namespace, name, issuer = issuer.key, resource = token.spec.resource, error = %failure.message, retry_in = ?delay, "token request failed");
            carry_out(outcome).await
        }
    }
}

/// Asks for a token (through the issuer's refresh chain for that grant) and checks it;
/// with `spec.dpop`, bound to the AudienceToken's DPoP key, which is returned with it.
async fn request_token(
    ctx: &Context,
    token: &AudienceToken,
    issuer: &ResolvedIssuer,
    secrets: impl Fn() -> Api<Secret>,
    published: Option<&PublishedToken>,
    now: Timestamp,
) -> Result<(IssuedToken, Option<Arc<DpopKey>>), Failure> {
    let settings = ctx.endpoints.endpoint(issuer.target()).await?;
    let dpop = match &token.spec.dpop {
        Some(spec) => {
            let published_jkt = published.and_then(|p| p.dpop_jkt.as_deref());
            Some(
                ctx.dpop_keys
                    .key_for(&secrets(), token, spec.algorithm, published_jkt)
                    .await?,
            )
        }
        None => None,
    };
    let failed = |error: TokenError| {
        ctx.endpoints.invalidate(issuer.target(), &error);
        Failure::from_token_error(&error)
    };
    let authorization_details =
        settings.authorization_details_for(&token.spec.authorization_details)?;
    let response = match issuer.spec.grant.type_ {
        GrantType::RefreshToken => {
            ctx.refresh_chains
                .request(
                    ctx,
                    issuer,
                    &settings,
                    ChainRequest {
                        scopes: &token.spec.scopes,
                        resource: &token.spec.resource,
                        audience: token.expected_audience(),
                        dpop: dpop.clone(),
                        authorization_details,
                    },
                )
                .await?
        }
        GrantType::ClientCredentials | GrantType::TokenExchange => {
            let request = TokenRequest {
                grant: settings.grant(),
                scopes: token.spec.scopes.clone(),
                audience: settings.audience_for(&token.spec.resource, token.expected_audience()),
                dpop: dpop.clone(),
                authorization_details,
            };
            ctx.token_request(&issuer.key, &settings.endpoint, &request)
                .await
                .map_err(failed)?
        }
    };
    let binding = Binding {
        dpop_jkt: dpop.as_deref().map(DpopKey::thumbprint),
        certificate_thumbprint: settings
            .endpoint
            .client_certificate
            .as_deref()
            .map(ClientCertificate::thumbprint),
    };
    let issued = issue(
        response,
        now,
        settings.default_lifetime,
        token.expected_audience(),
        &token.spec.scopes,
        binding,
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
    Ok((
        IssuedToken {
            refresh_token: None,
            ..issued
        },
        dpop,
    ))
}

/// The thumbprint of the client certificate the issuer presents now, for a published token
/// that is certificate-bound (read through the issuer layer's cache, which a change of the
/// certificate's Secret clears). When it cannot be read, the published thumbprint: the
/// request that reports the problem waits for the renewal.
async fn presented_certificate(
    ctx: &Context,
    issuer: &ResolvedIssuer,
    published: &PublishedToken,
    namespace: &str,
    name: &str,
) -> Option<String> {
    let bound_to = published.certificate_thumbprint.clone()?;
    match ctx.endpoints.client_certificate(issuer.target()).await {
        Ok(certificate) => certificate.map(|c| c.certificate.thumbprint().to_string()),
        Err(failure) => {
            debug!(namespace, name, issuer = issuer.key, error = %failure.message, "cannot read the client certificate; keeping the token bound to the last one");
            Some(bound_to)
        }
    }
}

/// Looks the Secret up in the metadata cache of owned Secrets. A miss is taken for an
/// absent Secret (the create that publishes the token finds out otherwise), so a new token
/// costs no read; only after a SecretConflict is the API server asked, to see whether the
/// other Secret is still there.
async fn secret_state(
    ctx: &Context,
    secrets: impl Fn() -> Api<Secret>,
    namespace: &str,
    token: &AudienceToken,
    status: &AudienceTokenStatus,
) -> Result<SecretState, Error> {
    let (secret_name, token_name) = (token.secret_name(), token.name_any());
    if let Some(cached) = ctx.secrets.get(namespace, secret_name) {
        // The cache holds only Secrets labelled as the operator's; another token's is foreign.
        return Ok(if cached.token_name == token_name {
            SecretState::Ours(cached)
        } else {
            SecretState::Foreign
        });
    }
    if !(plan::last_reason_is(status, plan::reason::SECRET_CONFLICT)
        || ctx.is_known_foreign(namespace, secret_name))
    {
        return Ok(SecretState::Absent);
    }
    let Some(read) = secrets().get_metadata_opt(secret_name).await? else {
        ctx.set_foreign_secret(namespace, secret_name, false);
        return Ok(SecretState::Absent);
    };
    let state = match OwnedSecret::from_meta(read.metadata) {
        Some(owned) if owned.token_name == token_name => SecretState::Ours(Arc::new(owned)),
        _ => SecretState::Foreign,
    };
    ctx.set_foreign_secret(
        namespace,
        secret_name,
        matches!(state, SecretState::Foreign),
    );
    Ok(state)
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

/// Writes the token Secret `secret`. Onto our own Secret (`existing`, its metadata): a
/// server-side apply, or, when it holds fields the operator no longer writes
/// ([`stale_fields`]), a merge patch that also removes them. When none was known, a create,
/// which never touches an existing Secret; when the create finds one, it is read: ours (the
/// cache was behind) is written as above, someone else's is left alone and `false` returned.
async fn write_secret(
    ctx: &Context,
    token: &AudienceToken,
    secrets: impl Fn() -> Api<Secret>,
    secret: Secret,
    existing: Option<&OwnedSecret>,
) -> Result<bool, Error> {
    let namespace = token.namespace().unwrap_or_default();
    let request = Request::new(Secret::url_path(&(), Some(&namespace)));
    let existing = match existing {
        Some(owned) => owned.metadata(),
        None => {
            let params = PostParams {
                field_manager: Some(MANAGER.to_string()),
                ..PostParams::default()
            };
            let body = serde_json::to_vec(&secret).map_err(kube::Error::SerdeError)?;
            match ctx.send_write(request.create(&params, body)).await {
                Ok(version) => {
                    ctx.secrets.remember_write(secret.metadata, version);
                    return Ok(true);
                }
                Err(kube::Error::Api(status)) if status.code == 409 => {}
                Err(error) => return Err(error.into()),
            }
            match secrets().get_metadata_opt(token.secret_name()).await? {
                Some(found) if is_owned_by(&found.metadata, &token.name_any()) => found.metadata,
                _ => return Ok(false),
            }
        }
    };
    let stale = stale_fields(&existing, &secret, &token.uid().unwrap_or_default());
    if stale.is_empty() {
        let apply = request.patch(
            token.secret_name(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(&secret),
        );
        let version = ctx.send_write(apply).await?;
        ctx.secrets.remember_write(secret.metadata, version);
    } else {
        debug!(
            namespace = token.namespace().unwrap_or_default(),
            secret = token.secret_name(),
            labels = ?stale.labels,
            annotations = ?stale.annotations,
            data_keys = ?stale.data,
            owner_reference_removed = stale.owner_references.is_some(),
            "removing fields the operator no longer writes"
        );
        let patch = stale
            .merge_patch(&secret, existing.resource_version.as_deref())
            .map_err(kube::Error::SerdeError)?;
        let merge = request.patch(
            token.secret_name(),
            &PatchParams::default(),
            &Patch::Merge(&patch),
        );
        let version = ctx.send_write(merge).await?;
        ctx.secrets.remember_write(secret.metadata, version);
    }
    Ok(true)
}

/// Carries out an outcome that writes no token: the Secret's metadata if the plan said so,
/// status, then Events, then the requeue.
async fn finish(
    ctx: &Context,
    token: &AudienceToken,
    previous: &AudienceTokenStatus,
    outcome: Outcome,
    metadata_update: Option<&MetadataUpdate>,
) -> Result<Action, Error> {
    if let Some(update) = metadata_update {
        match write_secret_metadata(ctx, token, update).await {
            Ok(()) => {}
            // The Secret changed since the cached view its ownerReferences were read from:
            // plan again once the cache has the newer one.
            Err(Error::Kube(kube::Error::Api(status))) if status.code == 409 => {
                debug!(
                    namespace = token.namespace().unwrap_or_default(),
                    secret = token.secret_name(),
                    "Secret metadata planned on a stale view; planning again"
                );
                return Ok(Action::requeue(STALE_VIEW_RETRY));
            }
            Err(e) => return Err(e),
        }
    }
    if write_status(ctx, token, previous, &outcome.status).await? == StatusWritten::Stale {
        // Planned on an older view of the AudienceToken: plan again once the cache has
        // the newer one.
        return Ok(Action::requeue(STALE_VIEW_RETRY));
    }
    publish_events(ctx, token, outcome.events).await;
    Ok(Action::requeue(outcome.requeue_after))
}

/// Writes a Secret's metadata alone (deletionPolicy's ownerReference, secretTemplate),
/// keeping the token it holds.
async fn write_secret_metadata(
    ctx: &Context,
    token: &AudienceToken,
    update: &MetadataUpdate,
) -> Result<(), Error> {
    let namespace = token.namespace().unwrap_or_default();
    debug!(
        namespace,
        secret = token.secret_name(),
        "bringing the Secret's ownerReference and template labels and annotations to the spec"
    );
    let request = Request::new(Secret::url_path(&(), Some(&namespace))).patch(
        token.secret_name(),
        &PatchParams::default(),
        &Patch::Merge(&update.patch),
    );
    let version = ctx.send_write(request).await?;
    let mut written = update.metadata.clone();
    written.namespace = Some(namespace);
    written.name = Some(token.secret_name().to_string());
    ctx.secrets.remember_write(written, version);
    Ok(())
}

/// How soon a reconcile that planned on a stale view runs again.
const STALE_VIEW_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

/// What became of a status write.
#[derive(Debug, PartialEq, Eq)]
enum StatusWritten {
    /// Written, or nothing to write.
    Done,
    /// Refused: the AudienceToken changed since the view the status was derived from.
    Stale,
}

async fn publish_events(ctx: &Context, token: &AudienceToken, events: Vec<plan::Event>) {
    for event in events {
        ctx.event(token, event.type_, event.reason, event.note)
            .await;
    }
}

/// Patches status as the plan says (fully, or only its derived fields), and only when it
/// changed; the token's metrics are updated either way.
async fn write_status(
    ctx: &Context,
    token: &AudienceToken,
    previous: &AudienceTokenStatus,
    write: &StatusWrite,
) -> Result<StatusWritten, Error> {
    let Some(next) = write.status() else {
        return Ok(StatusWritten::Done);
    };
    let namespace = token.namespace().unwrap_or_default();
    // The patch is built only for a status that changed: a restart reconciles every token
    // and most keep theirs as it is.
    if let Some((_, mut patch)) = (previous != next).then(|| write.patch()).flatten() {
        // A status derived from the caches alone (a kept token, a backoff) is written only
        // while the AudienceToken is the one the caches showed: a reconcile that ran on a
        // view older than the last status write must not put that write's conditions back.
        // A status after a token request carries new facts and is written as it is.
        let derived = matches!(patch, StatusPatch::Derived(_));
        if let StatusPatch::Derived(patch) = &mut patch {
            patch["metadata"] = serde_json::json!({ "resourceVersion": token.resource_version() });
        }
        let request = Request::new(AudienceToken::url_path(&(), Some(&namespace)))
            .patch_subresource(
                "status",
                &token.name_any(),
                &PatchParams::default(),
                &Patch::Merge(patch),
            );
        match ctx.send_unread(request).await {
            Ok(_) => {}
            Err(kube::Error::Api(status)) if derived && status.code == 409 => {
                debug!(
                    namespace,
                    name = token.name_any(),
                    "status planned on a stale view; planning again"
                );
                return Ok(StatusWritten::Stale);
            }
            Err(e) => return Err(e.into()),
        }
    }
    let expires_at = next.expires_at.as_ref().map(|t| t.0.as_second());
    ctx.metrics.token_state(
        &namespace,
        &token.name_any(),
        expires_at,
        plan::ready_is_true(next),
        next.failed_attempts > 0,
        plan::ready_reason(next),
    );
    Ok(StatusWritten::Done)
}
