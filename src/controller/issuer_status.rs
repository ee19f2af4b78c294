//! Status of TokenIssuers and ClusterTokenIssuers: `Ready` when the token endpoint is known
//! (configured or discovered) and the credentials can be read; `RefreshChainLost` when the
//! issuer's refresh-token chain was refused. `status.tokenEndpoint` shows the resolved URL.

use std::sync::Arc;
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::api::core::v1::ObjectReference;
use kube::api::{Api, Patch, PatchParams};
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};
use tracing::warn;

use super::context::{Context, Error};
use super::issuer::ResolvedIssuer;
use super::plan::{Failure, set_ready};
use super::refresh_chain::{ChainHealth, NO_CHAIN_YET};
use crate::api::{ClusterTokenIssuer, GrantType, IssuerSpec, IssuerStatus, TokenIssuer};
use crate::issuer::ReadyEndpoint;
use crate::issuer::credentials::MINT_NOT_ALLOWED;

/// Condition reasons on issuers.
pub mod reason {
    /// Token endpoint known and credentials readable.
    pub const READY: &str = "Ready";
    /// Discovery failed, a Secret is missing, or the configuration cannot be used.
    pub const NOT_READY: &str = "NotReady";
    /// The refresh-token chain was refused; a new bootstrap refresh token is needed.
    pub const REFRESH_CHAIN_LOST: &str = "RefreshChainLost";
}

/// How often a Ready issuer is checked again (discovery documents and credentials change).
const RECHECK_READY: Duration = Duration::from_secs(600);
/// How often a failing issuer is checked again.
const RECHECK_FAILING: Duration = Duration::from_secs(30);
/// How often an issuer that may not mint its ServiceAccount's tokens is checked again: the
/// grant is given by someone else (a Role and RoleBinding), which the operator cannot watch.
const RECHECK_GRANT: Duration = Duration::from_secs(5);
/// How often an issuer whose refresh-token chain waits for a (new) bootstrap value looks
/// for one: after a lost chain, a new login must take effect within seconds.
const RECHECK_BOOTSTRAP: Duration = Duration::from_secs(3);

/// Whether the issuer waits for a bootstrap refresh token (lost chain, or none yet).
fn waits_for_bootstrap(ready: &crate::api::Condition) -> bool {
    ready.reason == reason::REFRESH_CHAIN_LOST || ready.message.starts_with(NO_CHAIN_YET)
}

fn resolved(
    key: String,
    spec: &IssuerSpec,
    secret_namespace: String,
    name: String,
    object: ObjectReference,
    generation: Option<i64>,
) -> ResolvedIssuer {
    ResolvedIssuer {
        key,
        spec: spec.clone(),
        secret_namespace,
        generation: generation.unwrap_or_default(),
        name,
        object,
    }
}

/// Reconciles a TokenIssuer's status.
pub async fn reconcile_token_issuer(
    issuer: Arc<TokenIssuer>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    update_token_issuer(&ctx, &issuer).await
}

/// Reconciles a ClusterTokenIssuer's status.
pub async fn reconcile_cluster_issuer(
    issuer: Arc<ClusterTokenIssuer>,
    ctx: Arc<Context>,
) -> Result<Action, Error> {
    update_cluster_issuer(&ctx, &issuer).await
}

async fn update_token_issuer(ctx: &Context, issuer: &TokenIssuer) -> Result<Action, Error> {
    let namespace = issuer
        .namespace()
        .ok_or(Error::MissingField("metadata.namespace"))?;
    let name = issuer.name_any();
    let target = resolved(
        format!("TokenIssuer/{namespace}/{name}"),
        &issuer.spec.issuer,
        namespace.clone(),
        name.clone(),
        issuer.object_ref(&()),
        issuer.meta().generation,
    );
    let next = desired_status(
        ctx,
        &target,
        issuer.status.as_ref(),
        issuer.meta().generation,
    )
    .await;
    let api: Api<TokenIssuer> = Api::namespaced(ctx.client.clone(), &namespace);
    write(ctx, &target, &api, issuer.status.as_ref(), &next).await
}

async fn update_cluster_issuer(
    ctx: &Context,
    issuer: &ClusterTokenIssuer,
) -> Result<Action, Error> {
    let name = issuer.name_any();
    let target = resolved(
        format!("ClusterTokenIssuer/{name}"),
        &issuer.spec.issuer,
        ctx.settings.cluster_resource_namespace.clone(),
        name.clone(),
        issuer.object_ref(&()),
        issuer.meta().generation,
    );
    let next = desired_status(
        ctx,
        &target,
        issuer.status.as_ref(),
        issuer.meta().generation,
    )
    .await;
    let api: Api<ClusterTokenIssuer> = Api::all(ctx.client.clone());
    write(ctx, &target, &api, issuer.status.as_ref(), &next).await
}

async fn desired_status(
    ctx: &Context,
    issuer: &ResolvedIssuer,
    previous: Option<&IssuerStatus>,
    generation: Option<i64>,
) -> IssuerStatus {
    let mut status = previous.cloned().unwrap_or_default();
    status.observed_generation = generation;
    let now = Timestamp::now();
    let outcome = match ctx.endpoints.endpoint(issuer.target()).await {
        Ok(request) => {
            status.token_endpoint = Some(request.endpoint.token_endpoint.to_string());
            match chain_health(ctx, issuer, &request).await {
                ChainHealth::Lost(why) => Err((reason::REFRESH_CHAIN_LOST, why)),
                ChainHealth::WaitingForBootstrap(why) | ChainHealth::Unknown(why) => {
                    Err((reason::NOT_READY, why))
                }
                ChainHealth::Alive => Ok(format!(
                    "token endpoint {}",
                    request.endpoint.token_endpoint
                )),
            }
        }
        Err(Failure { message, .. }) => Err((reason::NOT_READY, message)),
    };
    match outcome {
        Ok(message) => set_ready(
            &mut status.conditions,
            true,
            reason::READY,
            message,
            generation,
            now,
        ),
        Err((why, message)) => {
            set_ready(&mut status.conditions, false, why, message, generation, now)
        }
    }
    status
}

/// The refresh-token chain's health; always alive for other grants.
async fn chain_health(
    ctx: &Context,
    issuer: &ResolvedIssuer,
    endpoint: &ReadyEndpoint,
) -> ChainHealth {
    if issuer.spec.grant.type_ != GrantType::RefreshToken {
        return ChainHealth::Alive;
    }
    ctx.refresh_chains.health(ctx, issuer, endpoint).await
}

fn ready_condition(status: Option<&IssuerStatus>) -> Option<&crate::api::Condition> {
    status?
        .conditions
        .iter()
        .find(|c| c.type_ == crate::api::READY)
}

/// Writes a changed status; when the issuer just became Ready, its tokens that failed
/// meanwhile try again at once (their backoff waived).
async fn write<K>(
    ctx: &Context,
    issuer: &ResolvedIssuer,
    api: &Api<K>,
    previous: Option<&IssuerStatus>,
    next: &IssuerStatus,
) -> Result<Action, Error>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let is_ready = |c: Option<&crate::api::Condition>| c.is_some_and(|c| c.status == "True");
    let ready = ready_condition(Some(next));
    if previous != Some(next) {
        let patch = serde_json::json!({ "status": next });
        api.patch_status(&issuer.name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
        if is_ready(ready) && !is_ready(ready_condition(previous)) {
            ctx.issuer_became_ready(&issuer.key);
            ctx.signals.retry_tokens_of(&issuer.object);
        }
    }
    Ok(Action::requeue(match ready {
        Some(c) if c.status == "True" => RECHECK_READY,
        Some(c) if waits_for_bootstrap(c) => RECHECK_BOOTSTRAP,
        Some(c) if c.message.contains(MINT_NOT_ALLOWED) => RECHECK_GRANT,
        _ => RECHECK_FAILING,
    }))
}

/// Issuer status failures are retried soon; they never block token work.
pub fn error_policy<K: ResourceExt>(issuer: Arc<K>, error: &Error, _ctx: Arc<Context>) -> Action {
    warn!(issuer = issuer.name_any(), error = %error, "issuer status update failed; retrying");
    Action::requeue(Duration::from_secs(10))
}
