//! The refresh-token grant (the seeds' pattern): one rotating refresh-token chain per
//! issuer, shared by every AudienceToken of that issuer and used strictly one request at a
//! time.
//!
//! The current refresh token lives in an operator-owned state Secret
//! (`<issuer>-refresh-state`, beside the issuer's other Secrets). What this process knows of
//! a chain is kept in memory behind the chain's lock and is the only thing a request decides
//! from: the state Secret is read once (at first use), and the bootstrap Secret is read fresh,
//! under the lock, when the chain needs one or at most every [`BOOTSTRAP_RECHECK`]. A
//! bootstrap value is adopted once per chain and value; a cache that lags our own writes is
//! never asked.
//!
//! Before a refresh request that may rotate the token, the state Secret records that a
//! rotation is in flight; the rotated token replaces that record as soon as the answer
//! arrives, before the access token is published. A crash between the two leaves the record,
//! and the next start retries once with the recorded token (servers with a reuse grace period
//! accept it; strict ones refuse it, and the chain shows as lost at once). `invalid_grant`
//! marks the chain lost until a new bootstrap value appears: no request is made for a lost
//! chain, and the issuer status looks for a new bootstrap value every few seconds.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{Api, PostParams};
use kube::runtime::events::EventType;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::context::Context;
use super::issuer::ResolvedIssuer;
use crate::api::RefreshTokenGrant;
use crate::failure::{Failure, reason};
use crate::issuer::CredentialKind;
use crate::issuer::ReadyEndpoint;
use crate::oauth::dpop::DpopKey;
use crate::oauth::{AuthorizationDetails, Grant, TokenRequest, TokenResponse};

use crate::redact::SecretString;
use crate::secret::{MANAGED_BY_LABEL, MANAGER, short_sha256};

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
/// Annotation: a refresh request with the stored token was sent and its answer is not yet
/// persisted (JSON: since, resource, audience, scopes; nothing secret).
pub const IN_FLIGHT_ANNOTATION: &str = "audiencetoken.io/refresh-in-flight";

/// How the issuer status starts its message while the chain has no refresh token.
pub const NO_CHAIN_YET: &str = "no refresh token yet";

/// A live chain re-reads its bootstrap Secret this often (a changed value starts a new chain).
pub const BOOTSTRAP_RECHECK: Duration = Duration::from_secs(300);

/// Every issuer's chain, each behind its own async lock.
#[derive(Default)]
pub struct RefreshChains {
    chains: Mutex<HashMap<String, Arc<Chain>>>,
}

struct Chain {
    state: tokio::sync::Mutex<ChainState>,
    /// Counts the bootstrap values this process saw the chain start from or wait on. Read
    /// without the lock: a token whose last failure happened at an older epoch retries at
    /// once instead of waiting out its backoff.
    bootstrap_epoch: AtomicU64,
    /// The bootstrap Secret changed (its watch said so): read it at the next use, whenever
    /// it was last read.
    bootstrap_changed: AtomicBool,
}

/// What this process knows of one chain (loaded from the state Secret on first use).
#[derive(Default)]
struct ChainState {
    loaded: bool,
    refresh_token: Option<SecretString>,
    /// resourceVersion of the state Secret as last read or written; `None` when absent.
    resource_version: Option<String>,
    /// Hash of the bootstrap value the chain was started from.
    bootstrap_hash: Option<String>,
    /// When the bootstrap Secret was last read (fresh, under the lock).
    bootstrap_read_at: Option<Instant>,
    lost: Option<String>,
    /// The in-flight record as the state Secret holds it.
    in_flight: Option<InFlight>,
    /// An in-flight record found at load: the last process stopped before persisting an
    /// answer. Cleared by the next answer.
    interrupted: bool,
    /// Whether the server rotated the refresh token last time; a server that does not needs
    /// no in-flight record (its token stays valid).
    rotates: Option<bool>,
    /// Memory differs from the state Secret (a bootstrap adopted, not yet written).
    dirty: bool,
}

/// The record of a refresh request whose answer is not persisted yet.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct InFlight {
    since: String,
    resource: String,
    audience: String,
    #[serde(default)]
    scopes: Vec<String>,
}

/// A chain as the issuer status shows it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ChainHealth {
    /// A refresh token is at hand.
    Alive,
    /// The server refused the chain; a new bootstrap value is needed.
    Lost(String),
    /// No chain yet and no usable bootstrap value.
    WaitingForBootstrap(String),
    /// The chain's state is not known yet: the state Secret could not be read, or the retry
    /// of a rotation interrupted by a stop has not been answered.
    Unknown(String),
}

/// What one AudienceToken asks of its issuer's chain.
pub struct ChainRequest<'a> {
    /// The scopes to ask for.
    pub scopes: &'a [String],
    /// The resource (RFC 8707).
    pub resource: &'a str,
    /// The `aud` the token must carry.
    pub audience: &'a str,
    /// The AudienceToken's DPoP key, for a DPoP-bound token.
    pub dpop: Option<Arc<DpopKey>>,
    /// The AudienceToken's authorization details (RFC 9396), sent where the issuer says.
    pub authorization_details: Option<AuthorizationDetails>,
}

/// The state Secret's name for an issuer.
pub fn state_secret_name(issuer_name: &str) -> String {
    format!("{issuer_name}{STATE_SECRET_SUFFIX}")
}

/// The hash of a bootstrap value that the state Secret records as the chain's start
/// ([`BOOTSTRAP_HASH_ANNOTATION`]); `login` compares it before it overwrites a value.
pub fn bootstrap_hash(value: &SecretString) -> String {
    short_sha256(value.expose().as_bytes())
}

impl ChainState {
    /// Whether the bootstrap Secret must be read now: the chain has no token (absent or
    /// lost), or the last read is older than [`BOOTSTRAP_RECHECK`].
    fn bootstrap_read_due(&self, now: Instant) -> bool {
        self.refresh_token.is_none()
            || self.lost.is_some()
            || self
                .bootstrap_read_at
                .is_none_or(|at| now.duration_since(at) >= BOOTSTRAP_RECHECK)
    }

    /// Takes a freshly read bootstrap value: a value the chain did not start from starts a
    /// new chain. Returns whether it was adopted.
    fn offer_bootstrap(&mut self, value: SecretString, now: Instant) -> bool {
        self.bootstrap_read_at = Some(now);
        let hash = bootstrap_hash(&value);
        if self.bootstrap_hash.as_deref() == Some(hash.as_str()) {
            return false;
        }
        self.bootstrap_hash = Some(hash);
        self.refresh_token = Some(value);
        self.lost = None;
        self.in_flight = None;
        self.interrupted = false;
        self.rotates = None;
        self.dirty = true;
        true
    }

    /// Whether a request with the current token needs an in-flight record first.
    fn needs_in_flight_record(&self) -> bool {
        self.in_flight.is_none() && self.rotates != Some(false)
    }

    /// The server answered with a token: the rotated refresh token (if any) replaces ours.
    fn answered(&mut self, rotated: Option<SecretString>) {
        self.rotates = Some(rotated.is_some());
        self.dirty |= rotated.is_some() || self.in_flight.is_some();
        if let Some(rotated) = rotated {
            self.refresh_token = Some(rotated);
        }
        self.in_flight = None;
        self.interrupted = false;
    }

    /// The server refused the refresh token: the chain is lost until a new bootstrap.
    fn refused(&mut self, why: String) {
        self.lost = Some(why);
        self.refresh_token = None;
        self.in_flight = None;
        self.interrupted = false;
        self.dirty = true;
    }
}

impl RefreshChains {
    fn chain(&self, key: &str) -> Arc<Chain> {
        let mut chains = self
            .chains
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        chains
            .entry(key.to_string())
            .or_insert_with(|| {
                Arc::new(Chain {
                    state: tokio::sync::Mutex::new(ChainState::default()),
                    bootstrap_epoch: AtomicU64::new(0),
                    bootstrap_changed: AtomicBool::new(false),
                })
            })
            .clone()
    }

    /// How many new bootstrap values this process saw for the issuer's chain (0 after a
    /// start). A failure recorded at an older epoch waives its backoff.
    pub fn bootstrap_epoch(&self, issuer_key: &str) -> u64 {
        let chains = self
            .chains
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        chains
            .get(issuer_key)
            .map_or(0, |c| c.bootstrap_epoch.load(Ordering::Relaxed))
    }

    /// The issuer's bootstrap Secret changed: its chain reads it at the next use (the issuer
    /// status, signalled with it, is that use). A chain this process has not used yet reads
    /// it anyway.
    pub fn bootstrap_changed(&self, issuer: &k8s_openapi::api::core::v1::ObjectReference) {
        let key = match (issuer.kind.as_deref(), &issuer.namespace, &issuer.name) {
            (Some("TokenIssuer"), Some(namespace), Some(name)) => {
                format!("TokenIssuer/{namespace}/{name}")
            }
            (Some("ClusterTokenIssuer"), _, Some(name)) => format!("ClusterTokenIssuer/{name}"),
            _ => return,
        };
        let chains = self
            .chains
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(chain) = chains.get(&key) {
            chain.bootstrap_changed.store(true, Ordering::Relaxed);
        }
    }

    /// One token request on the issuer's chain: refuses resources the grant does not cover
    /// and lost chains without asking the server; persists a rotated refresh token before
    /// returning the access token.
    pub async fn request(
        &self,
        ctx: &Context,
        issuer: &ResolvedIssuer,
        endpoint: &ReadyEndpoint,
        wanted: ChainRequest<'_>,
    ) -> Result<TokenResponse, Failure> {
        let ChainRequest {
            scopes,
            resource,
            audience,
            dpop,
            authorization_details,
        } = wanted;
        let grant = grant(issuer)?;
        if !grant.resources.iter().any(|r| r == resource) {
            return Err(Failure {
                reason: reason::NOT_ALLOWED,
                message: format!(
                    "resource {resource} is not among the resources the refresh-token grant of {} covers ({}); \
                     refused without asking the server, which could burn the refresh token",
                    issuer.key,
                    grant.resources.join(", ")
                ),
                retry_after: None,
            });
        }
        let chain = self.chain(&issuer.key);
        let mut state = chain.state.lock().await;
        let mut session = Session::new(ctx, issuer, grant, &chain);
        session.prepare(&mut state).await?;
        if let Some(why) = &state.lost {
            return Err(chain_lost_failure(issuer, grant, why));
        }
        let wanted = InFlight {
            since: crate::secret::rfc3339(jiff::Timestamp::now()),
            resource: resource.to_string(),
            audience: audience.to_string(),
            scopes: scopes.to_vec(),
        };
        session
            .send(&mut state, endpoint, wanted, dpop, authorization_details)
            .await
    }

    /// The chain as the issuer status shows it. Loads the chain if this process has not yet;
    /// after a start that found a rotation in flight, retries it once now (so a lost chain
    /// shows at once, not at the next renewal); and while the chain has no token, reads the
    /// bootstrap Secret, so a new value is noticed within one issuer recheck.
    pub async fn health(
        &self,
        ctx: &Context,
        issuer: &ResolvedIssuer,
        endpoint: &ReadyEndpoint,
    ) -> ChainHealth {
        let Ok(grant) = grant(issuer) else {
            return ChainHealth::WaitingForBootstrap("grant.refreshToken is missing".into());
        };
        let chain = self.chain(&issuer.key);
        let mut state = chain.state.lock().await;
        let mut session = Session::new(ctx, issuer, grant, &chain);
        if let Err(failure) = session.prepare(&mut state).await {
            return if state.loaded {
                ChainHealth::WaitingForBootstrap(format!("{NO_CHAIN_YET}: {}", failure.message))
            } else {
                ChainHealth::Unknown(failure.message)
            };
        }
        // A bootstrap value adopted here (a `login` while the chain was alive, say) is made
        // the chain's own in the state Secret now, not at the next renewal.
        if state.dirty
            && state.lost.is_none()
            && state.in_flight.is_none()
            && state.refresh_token.is_some()
            && let Err(failure) =
                persist(&session.secrets, issuer, &session.state_name, &mut state).await
        {
            warn!(issuer = issuer.key, error = %failure.message, "cannot persist the adopted bootstrap refresh token yet");
        }
        if state.interrupted
            && state.lost.is_none()
            && state.refresh_token.is_some()
            && let Some(recorded) = state.in_flight.clone()
        {
            info!(
                issuer = issuer.key,
                since = recorded.since,
                "a refresh request was in flight when the operator stopped; retrying it once"
            );
            let covered = grant.resources.contains(&recorded.resource);
            let retry = if covered {
                recorded
            } else {
                InFlight {
                    resource: grant.resources.first().cloned().unwrap_or_default(),
                    audience: grant.resources.first().cloned().unwrap_or_default(),
                    scopes: Vec::new(),
                    ..recorded
                }
            };
            // The AudienceToken's DPoP key and authorization details are not at hand here;
            // the answer is not published.
            if let Err(failure) = session.send(&mut state, endpoint, retry, None, None).await {
                warn!(issuer = issuer.key, error = %failure.message, "retry of the interrupted refresh request failed");
                if state.interrupted {
                    // No answer (the server is down, say): try again at the next recheck.
                    return ChainHealth::Unknown(format!(
                        "a refresh request was in flight when the operator stopped; its retry \
                         got no usable answer yet ({})",
                        failure.message
                    ));
                }
            }
        }
        match (&state.lost, &state.refresh_token) {
            (Some(why), _) => ChainHealth::Lost(chain_lost_failure(issuer, grant, why).message),
            (None, Some(_)) => ChainHealth::Alive,
            (None, None) => ChainHealth::WaitingForBootstrap(format!(
                "{NO_CHAIN_YET}: put one in Secret {}/{} (key {:?})",
                issuer.secret_namespace,
                grant.bootstrap_secret_ref.name,
                grant.bootstrap_secret_ref.key
            )),
        }
    }
}

fn grant(issuer: &ResolvedIssuer) -> Result<&RefreshTokenGrant, Failure> {
    issuer
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
            retry_after: None,
        })
}

/// One holder of a chain's lock: the API handles and what it needs to tell others.
struct Session<'a> {
    ctx: &'a Context,
    issuer: &'a ResolvedIssuer,
    grant: &'a RefreshTokenGrant,
    chain: &'a Chain,
    secrets: Api<Secret>,
    state_name: String,
}

impl<'a> Session<'a> {
    fn new(
        ctx: &'a Context,
        issuer: &'a ResolvedIssuer,
        grant: &'a RefreshTokenGrant,
        chain: &'a Chain,
    ) -> Self {
        Self {
            ctx,
            issuer,
            grant,
            chain,
            secrets: Api::namespaced(ctx.client.clone(), &issuer.secret_namespace),
            state_name: state_secret_name(&issuer.name),
        }
    }

    /// Loads the chain on first use and reads the bootstrap Secret when due. A new value is
    /// adopted here, once: the next holder of the lock sees it as the chain's own.
    async fn prepare(&mut self, state: &mut ChainState) -> Result<(), Failure> {
        if !state.loaded {
            load(&self.secrets, &self.state_name, state).await?;
        }
        let now = Instant::now();
        let changed = self.chain.bootstrap_changed.swap(false, Ordering::Relaxed);
        if !changed && !state.bootstrap_read_due(now) {
            return Ok(());
        }
        // Tokens wait (and back off) while the chain is lost or has no token yet.
        let was_waiting = state.lost.is_some() || state.refresh_token.is_none();
        let bootstrap = self
            .ctx
            .endpoints
            .read_fresh(
                self.issuer.target(),
                CredentialKind::BootstrapRefreshToken,
                &self.grant.bootstrap_secret_ref,
            )
            .await;
        match bootstrap {
            Ok(value) => {
                if state.offer_bootstrap(value, now) {
                    info!(
                        issuer = self.issuer.key,
                        "adopting the bootstrap refresh token"
                    );
                    self.chain.bootstrap_epoch.fetch_add(1, Ordering::Relaxed);
                    if was_waiting {
                        // Tokens backing off on the lost (or not yet started) chain retry
                        // now; the issuer's status reads the chain again.
                        self.ctx.signals.retry_tokens_of(&self.issuer.object);
                        self.ctx.signals.recheck_issuer(&self.issuer.object);
                    }
                }
                Ok(())
            }
            // Once adopted, the bootstrap Secret may be deleted; it only matters when it
            // changes.
            Err(_) if state.refresh_token.is_some() || state.lost.is_some() => {
                state.bootstrap_read_at = Some(now);
                Ok(())
            }
            Err(failure) => Err(failure),
        }
    }

    /// Sends one refresh request with the chain's token: records it as in flight first
    /// (when the server may rotate), persists the answer's refresh token before returning.
    async fn send(
        &mut self,
        state: &mut ChainState,
        endpoint: &ReadyEndpoint,
        wanted: InFlight,
        dpop: Option<Arc<DpopKey>>,
        authorization_details: Option<AuthorizationDetails>,
    ) -> Result<TokenResponse, Failure> {
        let issuer = self.issuer;
        let Some(current) = state.refresh_token.clone() else {
            return Err(Failure {
                reason: reason::TOKEN_REQUEST_FAILED,
                message: "no refresh token".into(),
                retry_after: None,
            });
        };
        let record_now = state.needs_in_flight_record();
        if record_now || state.dirty {
            // Nothing is sent unless the record is down: a crash after this point is seen
            // at the next start.
            if record_now {
                state.in_flight = Some(wanted.clone());
            }
            if let Err(failure) = persist(&self.secrets, issuer, &self.state_name, state).await {
                if record_now {
                    state.in_flight = None;
                }
                return Err(failure);
            }
        }
        let was_interrupted = state.interrupted;
        let request = TokenRequest {
            grant: Grant::RefreshToken(current),
            scopes: wanted.scopes.clone(),
            audience: endpoint.audience_for(&wanted.resource, &wanted.audience),
            dpop,
            authorization_details,
        };
        match self
            .ctx
            .token_request(&issuer.key, &endpoint.endpoint, &request)
            .await
        {
            Ok(mut response) => {
                let rotated = response.refresh_token.take();
                let rotated_now = rotated.is_some();
                state.answered(rotated);
                // Persist before the caller publishes the access token: the server may
                // already have invalidated the refresh token we used. If this write fails,
                // memory keeps the new token and the next request writes it first.
                if state.dirty {
                    persist(&self.secrets, issuer, &self.state_name, state).await?;
                }
                if rotated_now {
                    info!(
                        issuer = issuer.key,
                        resource = wanted.resource,
                        "refresh token rotated and persisted"
                    );
                    self.ctx.metrics.refresh_rotated(&issuer.key);
                    self.ctx
                        .issuer_event(
                            &issuer.object,
                            EventType::Normal,
                            reason::REFRESH_TOKEN_ROTATED,
                            format!(
                                "the server rotated the refresh token; the new one is kept in Secret {}/{}",
                                issuer.secret_namespace, self.state_name
                            ),
                        )
                        .await;
                }
                Ok(response)
            }
            Err(error) if error.oauth_error() == Some("invalid_grant") => {
                let why = if was_interrupted {
                    format!(
                        "the operator stopped while a refresh request was in flight (since {}), and the \
                         server refused the refresh token on the retry ({error}); the rotated token it \
                         issued then never reached the state Secret",
                        wanted.since
                    )
                } else {
                    format!("the refresh token was refused ({error})")
                };
                warn!(issuer = issuer.key, "refresh-token chain lost");
                state.refused(why.clone());
                if let Err(failure) = persist(&self.secrets, issuer, &self.state_name, state).await
                {
                    warn!(issuer = issuer.key, error = %failure.message, "cannot record the lost chain");
                }
                let failure = chain_lost_failure(issuer, self.grant, &why);
                self.ctx
                    .issuer_event(
                        &issuer.object,
                        EventType::Warning,
                        reason::REFRESH_CHAIN_LOST,
                        failure.message.clone(),
                    )
                    .await;
                self.ctx.signals.recheck_issuer(&issuer.object);
                Err(failure)
            }
            Err(error) => {
                // The server may or may not have used the token: the in-flight record stays.
                self.ctx.endpoints.invalidate(issuer.target(), &error);
                Err(Failure::from_token_error(&error))
            }
        }
    }
}

fn chain_lost_failure(issuer: &ResolvedIssuer, grant: &RefreshTokenGrant, why: &str) -> Failure {
    Failure {
        reason: reason::REFRESH_CHAIN_LOST,
        message: format!(
            "the refresh-token chain of {} is lost: {why}; put a new refresh token in Secret {}/{} (key {:?}) to start a new one",
            issuer.key,
            issuer.secret_namespace,
            grant.bootstrap_secret_ref.name,
            grant.bootstrap_secret_ref.key
        ),
        retry_after: None,
    }
}

fn kube_failure(what: &str, error: &kube::Error) -> Failure {
    Failure {
        reason: reason::TOKEN_REQUEST_FAILED,
        message: format!("{what}: {error}"),
        retry_after: None,
    }
}

async fn load(secrets: &Api<Secret>, name: &str, state: &mut ChainState) -> Result<(), Failure> {
    let found = secrets
        .get_opt(name)
        .await
        .map_err(|e| kube_failure("cannot read the refresh-token state", &e))?;
    if let Some(secret) = found {
        let annotations = secret.metadata.annotations.clone().unwrap_or_default();
        state.resource_version = secret.metadata.resource_version.clone();
        state.bootstrap_hash = annotations.get(BOOTSTRAP_HASH_ANNOTATION).cloned();
        state.lost = annotations.get(CHAIN_LOST_ANNOTATION).cloned();
        state.in_flight = annotations
            .get(IN_FLIGHT_ANNOTATION)
            .and_then(|v| serde_json::from_str(v).ok());
        state.interrupted = state.in_flight.is_some();
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
    if let Some(in_flight) = &state.in_flight
        && let Ok(json) = serde_json::to_string(in_flight)
    {
        annotations.insert(IN_FLIGHT_ANNOTATION.to_string(), json);
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
                state.dirty = false;
                return Ok(());
            }
            Err(kube::Error::Api(status))
                if attempt == 0 && (status.code == 409 || status.code == 404) =>
            {
                let current = secrets
                    .get_metadata_opt(name)
                    .await
                    .map_err(|e| kube_failure("cannot read the refresh-token state", &e))?;
                secret.metadata.resource_version =
                    current.and_then(|m| m.metadata.resource_version);
            }
            Err(error) => return Err(kube_failure(PERSIST_FAILED, &error)),
        }
    }
    Err(Failure {
        reason: reason::TOKEN_REQUEST_FAILED,
        message: PERSIST_FAILED.into(),
        retry_after: None,
    })
}

const PERSIST_FAILED: &str = "cannot write the refresh-token state Secret; no access token is published \
     (the chain's newest refresh token is kept in memory and written with the next request)";

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

#[cfg(test)]
mod tests {
    use super::*;

    fn live(token: &str) -> ChainState {
        let mut state = ChainState {
            loaded: true,
            ..ChainState::default()
        };
        assert!(state.offer_bootstrap(SecretString::new(token), Instant::now()));
        state
    }

    #[test]
    fn a_bootstrap_value_is_adopted_once() {
        let now = Instant::now();
        let mut state = live("boot-1");
        state.answered(Some(SecretString::new("rotated-1")));
        // The same value again (a cache that lags, a GitOps re-sync): the chain keeps its
        // rotated token.
        assert!(!state.offer_bootstrap(SecretString::new("boot-1"), now));
        assert_eq!(
            state.refresh_token.as_ref().map(SecretString::expose),
            Some("rotated-1")
        );
        // A new value starts a new chain and clears a loss.
        state.refused("refused".into());
        assert!(state.offer_bootstrap(SecretString::new("boot-2"), now));
        assert_eq!(state.lost, None);
        assert_eq!(
            state.refresh_token.as_ref().map(SecretString::expose),
            Some("boot-2")
        );
        assert!(!state.offer_bootstrap(SecretString::new("boot-2"), now));
    }

    #[test]
    fn bootstrap_is_read_when_the_chain_needs_it_or_the_recheck_is_due() {
        let now = Instant::now();
        let mut state = ChainState::default();
        assert!(state.bootstrap_read_due(now), "no chain yet");
        state = live("boot");
        let now = state.bootstrap_read_at.unwrap();
        assert!(!state.bootstrap_read_due(now), "just read");
        assert!(state.bootstrap_read_due(now + BOOTSTRAP_RECHECK));
        state.refused("refused".into());
        assert!(state.bootstrap_read_due(now), "lost: look for a new value");
    }

    #[test]
    fn in_flight_records_only_where_the_server_may_rotate() {
        let mut state = live("boot");
        assert!(state.needs_in_flight_record(), "unknown server");
        state.answered(Some(SecretString::new("r1")));
        assert!(state.needs_in_flight_record(), "a rotating server");
        state.answered(None);
        assert!(!state.needs_in_flight_record(), "the token stays valid");
        assert_eq!(
            state.refresh_token.as_ref().map(SecretString::expose),
            Some("r1")
        );
    }

    #[test]
    fn the_in_flight_record_holds_nothing_secret() {
        let record = InFlight {
            since: "2026-01-01T00:00:00Z".into(),
            resource: "urn:a".into(),
            audience: "urn:a".into(),
            scopes: vec!["read".into()],
        };
        let json = serde_json::to_string(&record).unwrap();
        assert_eq!(
            json,
            r#"{"since":"2026-01-01T00:00:00Z","resource":"urn:a","audience":"urn:a","scopes":["read"]}"#
        );
        let back: InFlight = serde_json::from_str(&json).unwrap();
        assert_eq!(back, record);
    }
}
