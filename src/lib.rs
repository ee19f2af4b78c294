//! audience-token-operator: turns `AudienceToken` resources into Secrets holding one
//! single-audience OAuth 2.0 access token each, and renews them before they expire.
//!
//! Where things are:
//! - [`api`]: the CRDs (the user-facing contract).
//! - [`oauth`]: the token client (discovery, request building, client authentication,
//!   response parsing, the audience check), and [`redact`], the secret string type it
//!   uses. Both are crate `audience-token-oauth` (`crates/oauth`), re-exported here; it
//!   knows nothing of Kubernetes and depends on no Kubernetes crate.
//! - [`renewal`]: pure time maths: when to renew, how long to back off.
//! - [`secret`]: the desired Secret for an issued token, and reading one back.
//! - [`controller`]: the reconcile loop and its wiring.
//! - [`debug_token`]: the `token` debugging command (one request, no cluster).
//! - [`login`]: the `login` command (a person's login bootstraps a refresh-token chain).
//! - [`telemetry`], [`server`]: metrics, `/metrics`, `/healthz`, `/readyz`.
//! - [`leader`]: leader election on a Lease; [`rbac`]: the permissions the operator uses.
#![warn(missing_docs)]

pub mod api;
pub mod controller;
pub mod debug_token;
pub mod dpop_proof;
pub mod failure;
pub mod issuer;
pub mod leader;
pub mod login;
pub mod plugin;
pub mod rate_limit;
pub mod rbac;
pub mod renewal;
pub mod secret;
pub mod server;
pub mod telemetry;

/// The OAuth 2.0 token client: crate `audience-token-oauth` (`crates/oauth`).
pub use audience_token_oauth as oauth;
/// Secret values that never print: `audience_token_oauth::redact`.
pub use audience_token_oauth::redact;
