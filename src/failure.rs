//! The one domain failure: why a token could not be had, or why none was asked for. The
//! plan, the issuer layer, refresh chains and signature checks all speak it; Kubernetes API
//! failures are the controllers' own `Error`s instead.

use std::time::Duration;

use crate::oauth::TokenError;

/// Condition reasons (DESIGN.md).
pub mod reason {
    /// A first token was issued.
    pub const ISSUED: &str = "Issued";
    /// A token was replaced by a newer one.
    pub const RENEWED: &str = "Renewed";
    /// The issuer is missing, or its credentials or metadata cannot be read.
    pub const ISSUER_NOT_READY: &str = "IssuerNotReady";
    /// The authorization server refused or failed the token request.
    pub const TOKEN_REQUEST_FAILED: &str = "TokenRequestFailed";
    /// The token's `aud` is not exactly the expected audience.
    pub const AUDIENCE_MISMATCH: &str = "AudienceMismatch";
    /// A DPoP token request got a token that is not bound to the key (`token_type` is not
    /// `DPoP`, or `cnf.jkt` is another key's).
    pub const DPOP_BINDING_MISMATCH: &str = "DPoPBindingMismatch";
    /// A certificate-bound token names another client certificate (`cnf.x5t#S256`) than the
    /// one presented.
    pub const CERTIFICATE_BINDING_MISMATCH: &str = "CertificateBindingMismatch";
    /// A Secret of that name exists and is not ours.
    pub const SECRET_CONFLICT: &str = "SecretConflict";
    /// The last token expired and no new one could be obtained.
    pub const EXPIRED: &str = "Expired";
    /// The ClusterTokenIssuer does not allow this namespace or resource, or the
    /// refresh-token grant does not cover the resource.
    pub const NOT_ALLOWED: &str = "NotAllowed";
    /// The issuer's refresh-token chain was refused (`invalid_grant`); a new bootstrap
    /// refresh token is needed.
    pub const REFRESH_CHAIN_LOST: &str = "RefreshChainLost";
    /// Event on an issuer: the server rotated the refresh token and the new one is persisted.
    pub const REFRESH_TOKEN_ROTATED: &str = "RefreshTokenRotated";

    /// Every reason an AudienceToken's Ready condition can have.
    pub const READY_REASONS: [&str; 11] = [
        ISSUED,
        RENEWED,
        ISSUER_NOT_READY,
        TOKEN_REQUEST_FAILED,
        AUDIENCE_MISMATCH,
        DPOP_BINDING_MISMATCH,
        CERTIFICATE_BINDING_MISMATCH,
        SECRET_CONFLICT,
        EXPIRED,
        NOT_ALLOWED,
        REFRESH_CHAIN_LOST,
    ];

    /// `reason` as one of [`READY_REASONS`], or `Other` (a metric label takes only fixed
    /// words: a status edited by hand must not make a series of its own).
    pub fn known(reason: &str) -> &'static str {
        READY_REASONS
            .into_iter()
            .find(|known| *known == reason)
            .unwrap_or("Other")
    }
}

/// A failed attempt (or a reason not to attempt), for status and Events.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Failure {
    /// Condition reason, from [`reason`].
    pub reason: &'static str,
    /// Human-readable detail, never a secret.
    pub message: String,
    /// How long the server asked us to wait (`Retry-After` on 429/503).
    pub retry_after: Option<Duration>,
}

impl Failure {
    /// A failure with this reason and message.
    pub fn new(reason: &'static str, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            retry_after: None,
        }
    }

    /// The issuer cannot be used as it is (missing, unreadable credentials, bad settings).
    pub fn issuer_not_ready(message: impl Into<String>) -> Self {
        Self::new(reason::ISSUER_NOT_READY, message)
    }

    /// The one mapping of the token client's errors to reasons.
    pub fn from_token_error(error: &TokenError) -> Self {
        let reason = match error {
            TokenError::AudienceMismatch { .. } => reason::AUDIENCE_MISMATCH,
            TokenError::DpopBindingMismatch { .. } => reason::DPOP_BINDING_MISMATCH,
            TokenError::CertificateBindingMismatch { .. } => reason::CERTIFICATE_BINDING_MISMATCH,
            TokenError::Config(_) | TokenError::Discovery { .. } => reason::ISSUER_NOT_READY,
            _ => reason::TOKEN_REQUEST_FAILED,
        };
        Self {
            reason,
            // With the causes: a transport error's own text does not say why it failed.
            message: crate::oauth::error_chain(error),
            retry_after: error.retry_after(),
        }
    }
}

impl From<TokenError> for Failure {
    fn from(error: TokenError) -> Self {
        Self::from_token_error(&error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_errors_map_to_reasons_and_keep_retry_after() {
        let busy = TokenError::Server {
            status: 503,
            error: "http_503".into(),
            description: None,
            retry_after: Some(Duration::from_secs(7)),
        };
        let failure = Failure::from_token_error(&busy);
        assert_eq!(failure.reason, reason::TOKEN_REQUEST_FAILED);
        assert_eq!(failure.retry_after, Some(Duration::from_secs(7)));
        let mismatch = TokenError::AudienceMismatch {
            expected: "urn:a".into(),
            actual: vec!["urn:a".into(), "urn:b".into()],
        };
        assert_eq!(Failure::from(mismatch).reason, reason::AUDIENCE_MISMATCH);
        assert_eq!(
            Failure::from(TokenError::Config("bad".into())).reason,
            reason::ISSUER_NOT_READY
        );
    }
}
