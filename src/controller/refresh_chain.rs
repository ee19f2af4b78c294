//! The refresh-token grant (the seeds' pattern): one rotating refresh-token chain per
//! issuer, shared by every AudienceToken of that issuer and used strictly one request at a
//! time.
//!
//! The current refresh token lives in an operator-owned state Secret
//! (`<issuer>-refresh-state`, beside the issuer's other Secrets). The bootstrap Secret is
//! adopted only when there is no state yet or when its value changed. A rotated refresh token
//! is written (with a resourceVersion precondition) before the access token it came with is
//! published, so a crash never loses the chain. `invalid_grant` marks the chain lost until a
//! new bootstrap value appears: no request is made for a lost chain.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, PostParams};
use kube::runtime::events::EventType;
use sha2::{Digest, Sha256};
use tracing::{info, warn};

use super::Context;
use super::issuer::{ResolvedIssuer, cached_secret_key, read_secret_key};
use super::plan::{Failure, reason};
use crate::oauth::{AudienceParam, Endpoint, Grant, TokenRequest, TokenResponse};

use crate::redact::SecretString;
use crate::secret::{MANAGED_BY_LABEL, MANAGER};

/// Suffix of the state Secret's name: `<issuer>-refresh-state`.
pub const STATE_SECRET_SUFFIX: &str = "-refresh-state";
/// Key of the current refresh token in the state Secret.
pub const REFRESH_TOKEN_KEY: &str = "refresh-token";
/// Label naming the issuer a state Secret belongs to.
pub const CHAIN_LABEL: &str = "audiencetoken.io/refresh-chain";
/// Annotation: hash of the bootstrap value the chain started from.
pub const BOOTSTRAP_HASH_ANNOTATION: &str = "audiencetoken.io/bootstrap-hash";
/// Annotation: why the chain is lost (absent while it is alive).
pub const CHAIN_LOST_ANNOTATION: &str = "audiencetoken.io/chain-lost";

/// Every issuer's chain, each behind its own async lock.
#[derive(Default)]
pub struct RefreshChains {
    chains: Mutex<HashMap<String, Arc<tokio::sync::Mutex<ChainState>>>>,
}

/// What this process knows of one chain (loaded from the state Secret on first use).
#[derive(Default)]
struct ChainState {
    loaded: bool,
    refresh_token: Option<SecretString>,
    /// resourceVersion of the state Secret as last read or written; `None` when absent.
    resource_version: Option<String>,
    bootstrap_hash: Option<String>,
    lost: Option<String>,
}

/// The state Secret's name for an issuer.
pub fn state_secret_name(issuer_name: &str) -> String {
    format!("{issuer_name}{STATE_SECRET_SUFFIX}")
}

fn bootstrap_hash(value: &SecretString) -> String {
    let digest = Sha256::digest(value.expose().as_bytes());
    digest[..8].iter().map(|b| format!("{b:02x}")).collect()
}

impl RefreshChains {
    fn chain(&self, key: &str) -> Arc<tokio::sync::Mutex<ChainState>> {
        let mut chains = self
            .chains
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        chains.entry(key.to_string()).or_default().clone()
    }

    /// Whether this process saw the chain of `issuer_key` lost, and why.
    pub async fn lost(&self, issuer_key: &str) -> Option<String> {
        let chain = self.chain(issuer_key);
        let state = chain.lock().await;
        state.lost.clone()
    }

    /// One token request on the issuer's chain: refuses resources the grant does not cover
    /// and lost chains without asking the server; persists a rotated refresh token before
    /// returning the access token.
    pub async fn request(
        &self,
        ctx: &Context,
        issuer: &ResolvedIssuer,
        endpoint: &Endpoint,
        scopes: &[String],
        audience: AudienceParam,
        resource: &str,
    ) -> Result<TokenResponse, Failure> {
        let grant = issuer
            .spec
            .grant
            .refresh_token
            .as_ref()
            .ok_or_else(|| Failure {
                reason: reason::ISSUER_NOT_READY,
                message: format!(
                    "{}: grant type RefreshToken needs grant.refreshToken",
                    issuer.key
                ),
            })?;
        if !grant.resources.iter().any(|r| r == resource) {
            return Err(Failure {
                reason: reason::NOT_ALLOWED,
                message: format!(
                    "resource {resource} is not among the resources the refresh-token grant of {} covers ({}); \
                     refused without asking the server, which could burn the refresh token",
                    issuer.key,
                    grant.resources.join(", ")
                ),
            });
        }

        let chain = self.chain(&issuer.key);
        let mut state = chain.lock().await;
        let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &issuer.secret_namespace);
        let state_name = state_secret_name(&issuer.name);
        if !state.loaded {
            load(&secrets, &state_name, &mut state).await?;
        }

        // The bootstrap Secret may be deleted once adopted; it only matters when it changes.
        // A live chain reads it through the 5-minute credential cache (a changed value is
        // adopted within that time); a lost or absent chain reads it fresh each attempt, so a
        // new bootstrap value is seen at the next retry.
        let bootstrap_read = if state.lost.is_some() || state.refresh_token.is_none() {
            read_secret_key(ctx, &issuer.secret_namespace, &grant.bootstrap_secret_ref).await
        } else {
            cached_secret_key(ctx, &issuer.secret_namespace, &grant.bootstrap_secret_ref).await
        };
        let bootstrap = match bootstrap_read {
            Ok(value) => Some(value),
            Err(_) if state.refresh_token.is_some() || state.lost.is_some() => None,
            Err(failure) => return Err(failure),
        };
        let adopting = match &bootstrap {
            Some(value) => state.bootstrap_hash.as_deref() != Some(bootstrap_hash(value).as_str()),
            None => false,
        };
        let was_lost = state.lost.is_some();
        if let (true, Some(value)) = (adopting, bootstrap) {
            info!(issuer = issuer.key, "adopting the bootstrap refresh token");
            state.bootstrap_hash = Some(bootstrap_hash(&value));
            state.refresh_token = Some(value);
            state.lost = None;
        } else if let Some(why) = &state.lost {
            return Err(chain_lost_failure(issuer, grant, why));
        }
        let Some(current) = state.refresh_token.clone() else {
            return Err(Failure {
                reason: reason::TOKEN_REQUEST_FAILED,
                message: "no refresh token".into(),
            });
        };

        let request = TokenRequest {
            grant: Grant::RefreshToken(current),
            scopes: scopes.to_vec(),
            audience,
        };
        match ctx.token_request(&issuer.key, endpoint, &request).await {
            Ok(mut response) => {
                let rotated = response.refresh_token.take();
                if let Some(rotated) = rotated.clone() {
                    state.refresh_token = Some(rotated);
                }
                // Persist before the caller publishes the access token: the server may
                // already have invalidated the refresh token we used.
                if adopting || rotated.is_some() {
                    persist(&secrets, issuer, &state_name, &mut state).await?;
                    if rotated.is_some() {
                        info!(
                            issuer = issuer.key,
                            resource, "refresh token rotated and persisted"
                        );
                        ctx.metrics.refresh_rotated(&issuer.key);
                    }
                }
                // Other requests on this chain need not wait for the Event or status.
                drop(state);
                if rotated.is_some() {
                    ctx.issuer_event(
                        &issuer.object,
                        EventType::Normal,
                        reason::REFRESH_TOKEN_ROTATED,
                        format!(
                            "the server rotated the refresh token; the new one is kept in Secret {}/{state_name}",
                            issuer.secret_namespace
                        ),
                    )
                    .await;
                }
                if was_lost && adopting {
                    super::issuer_status::refresh(ctx, &issuer.object).await;
                }
                Ok(response)
            }
            Err(error) if error.oauth_error() == Some("invalid_grant") => {
                let why = format!("the refresh token was refused ({error})");
                warn!(issuer = issuer.key, "refresh-token chain lost");
                state.lost = Some(why.clone());
                state.refresh_token = None;
                if let Err(failure) = persist(&secrets, issuer, &state_name, &mut state).await {
                    warn!(issuer = issuer.key, error = %failure.message, "cannot record the lost chain");
                }
                ctx.issuer_event(
                    &issuer.object,
                    EventType::Warning,
                    reason::REFRESH_CHAIN_LOST,
                    chain_lost_failure(issuer, grant, &why).message,
                )
                .await;
                // The issuer's status reads the chain state: release the chain first.
                drop(state);
                super::issuer_status::refresh(ctx, &issuer.object).await;
                Err(chain_lost_failure(issuer, grant, &why))
            }
            Err(error) => {
                ctx.issuer_caches.invalidate(issuer, &error);
                Err(Failure {
                    reason: reason::TOKEN_REQUEST_FAILED,
                    message: error.to_string(),
                })
            }
        }
    }
}

fn chain_lost_failure(
    issuer: &ResolvedIssuer,
    grant: &crate::api::RefreshTokenGrant,
    why: &str,
) -> Failure {
    Failure {
        reason: reason::REFRESH_CHAIN_LOST,
        message: format!(
            "the refresh-token chain of {} is lost: {why}; put a new refresh token in Secret {}/{} (key {:?}) to start a new one",
            issuer.key,
            issuer.secret_namespace,
            grant.bootstrap_secret_ref.name,
            grant.bootstrap_secret_ref.key
        ),
    }
}

fn kube_failure(what: &str, error: kube::Error) -> Failure {
    Failure {
        reason: reason::TOKEN_REQUEST_FAILED,
        message: format!("{what}: {error}"),
    }
}

async fn load(secrets: &Api<Secret>, name: &str, state: &mut ChainState) -> Result<(), Failure> {
    let found = secrets
        .get_opt(name)
        .await
        .map_err(|e| kube_failure("cannot read the refresh-token state", e))?;
    if let Some(secret) = found {
        let annotations = secret.metadata.annotations.clone().unwrap_or_default();
        state.resource_version = secret.metadata.resource_version.clone();
        state.bootstrap_hash = annotations.get(BOOTSTRAP_HASH_ANNOTATION).cloned();
        state.lost = annotations.get(CHAIN_LOST_ANNOTATION).cloned();
        state.refresh_token = secret
            .data
            .as_ref()
            .and_then(|d| d.get(REFRESH_TOKEN_KEY))
            .and_then(|b| String::from_utf8(b.0.clone()).ok())
            .filter(|t| !t.is_empty())
            .map(SecretString::new);
    }
    state.loaded = true;
    Ok(())
}

/// Writes the state Secret: create when absent, else replace with the known
/// resourceVersion as a precondition. On a conflict (another writer, or a stale version)
/// the version is re-read and the write tried once more: the refresh token this process
/// holds is the newest, since the chain is used one request at a time.
async fn persist(
    secrets: &Api<Secret>,
    issuer: &ResolvedIssuer,
    name: &str,
    state: &mut ChainState,
) -> Result<(), Failure> {
    let mut annotations = BTreeMap::new();
    if let Some(hash) = &state.bootstrap_hash {
        annotations.insert(BOOTSTRAP_HASH_ANNOTATION.to_string(), hash.clone());
    }
    if let Some(lost) = &state.lost {
        annotations.insert(CHAIN_LOST_ANNOTATION.to_string(), lost.clone());
    }
    let data = state.refresh_token.as_ref().map(|t| {
        BTreeMap::from([(
            REFRESH_TOKEN_KEY.to_string(),
            ByteString(t.expose().as_bytes().to_vec()),
        )])
    });
    let mut secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: Some(issuer.secret_namespace.clone()),
            resource_version: state.resource_version.clone(),
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), MANAGER.to_string()),
                (CHAIN_LABEL.to_string(), issuer.name.clone()),
            ])),
            annotations: Some(annotations),
            owner_references: owner_reference(issuer).map(|r| vec![r]),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data.unwrap_or_default()),
        ..Secret::default()
    };
    for attempt in 0..2 {
        let written = match &secret.metadata.resource_version {
            Some(_) => secrets.replace(name, &PostParams::default(), &secret).await,
            None => secrets.create(&PostParams::default(), &secret).await,
        };
        match written {
            Ok(written) => {
                state.resource_version = written.metadata.resource_version;
                return Ok(());
            }
            Err(kube::Error::Api(status))
                if attempt == 0 && (status.code == 409 || status.code == 404) =>
            {
                let current = secrets
                    .get_metadata_opt(name)
                    .await
                    .map_err(|e| kube_failure("cannot read the refresh-token state", e))?;
                secret.metadata.resource_version =
                    current.and_then(|m| m.metadata.resource_version);
            }
            Err(error) => return Err(kube_failure(PERSIST_FAILED, error)),
        }
    }
    Err(Failure {
        reason: reason::TOKEN_REQUEST_FAILED,
        message: PERSIST_FAILED.into(),
    })
}

const PERSIST_FAILED: &str =
    "cannot persist the rotated refresh token; the access token is not published";

/// The issuer owns its state Secret, so deleting the issuer removes the chain.
fn owner_reference(issuer: &ResolvedIssuer) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: issuer.object.api_version.clone()?,
        kind: issuer.object.kind.clone()?,
        name: issuer.object.name.clone()?,
        uid: issuer.object.uid.clone()?,
        controller: Some(true),
        block_owner_deletion: None,
    })
}
