//! The OAuth 2.0 token client. It knows nothing of Kubernetes: it turns an [`Endpoint`]
//! and a [`TokenRequest`] into an [`IssuedToken`] or a [`TokenError`].
//!
//! Pure parts (request building, response parsing, JWT claims, the audience check,
//! discovery URL rules) are separate from the HTTP calls in [`client`].
//!
//! This is crate `audience-token-oauth` (`crates/oauth`), apart from audience-token-operator
//! so that the compiler holds it to that: it depends on no Kubernetes crate (the operator's
//! `tests/boundaries.rs` checks its dependency graph). The operator re-exports it as
//! `audience_token_operator::oauth`. Secrets (tokens, client secrets, keys) are
//! [`redact::SecretString`]s, which never print their value.
#![warn(missing_docs)]

pub mod assertion;
pub mod authorization_details;
pub mod authorize;
pub mod client;
pub mod discovery;
pub mod dpop;
mod error;
pub mod jwks;
pub mod jwt;
pub mod redact;
pub mod request;
pub mod response;
pub mod tls;
mod token;
pub mod token_exchange;

pub use authorization_details::{AuthorizationDetails, DetailsLocation};
pub use client::{Tls, TokenClient};
pub use dpop::{DpopAlgorithm, DpopKey};
pub use error::{TokenError, error_chain};
pub use request::{AudienceParam, ClientCredentials, Endpoint, Grant, TokenRequest};
pub use response::TokenResponse;
pub use tls::ClientCertificate;
pub use token::{Binding, IssuedToken, expiry, granted_scopes, issue};
