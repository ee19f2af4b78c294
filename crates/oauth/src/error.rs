use std::time::Duration;

/// Why a token (or discovery) request did not produce a usable token. Messages carry the
/// server's error code and description, never a token or credential.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    /// The server answered with an OAuth error (RFC 6749 §5.2) or an HTTP error status.
    #[error("{}", server_message(*.status, .error, .description.as_deref()))]
    Server {
        /// HTTP status code.
        status: u16,
        /// The `error` code, e.g. `invalid_target`, or `http_<status>` when the body had none.
        error: String,
        /// The `error_description`, if any.
        description: Option<String>,
        /// The `Retry-After` delay, on 429 and 503.
        retry_after: Option<Duration>,
    },
    /// The request did not reach the server or no complete answer came back.
    #[error("request to {url} failed: {source}")]
    Transport {
        /// The URL that was called (without credentials).
        url: String,
        /// The underlying error.
        #[source]
        source: reqwest::Error,
    },
    /// The server answered 200 but the body is not a usable token response.
    #[error("invalid token response: {0}")]
    InvalidResponse(String),
    /// The token's `aud` is not exactly the one expected audience.
    #[error(
        "token audience {actual:?} is not exactly [{expected:?}]; refusing a token that is not single-audience"
    )]
    AudienceMismatch {
        /// The audience the AudienceToken asked for.
        expected: String,
        /// The `aud` the token carries.
        actual: Vec<String>,
    },
    /// A DPoP key was used but the token is not bound to it (RFC 9449 §5): `token_type` is
    /// not `DPoP`, or the JWT's `cnf.jkt` is missing or another key's thumbprint.
    #[error("{}", dpop_message(.expected_jkt, .token_type, .actual_jkt.as_deref()))]
    DpopBindingMismatch {
        /// The thumbprint of the DPoP key the request was made with.
        expected_jkt: String,
        /// The `token_type` the server answered.
        token_type: String,
        /// The JWT's `cnf.jkt`, if any (`None` also for opaque tokens).
        actual_jkt: Option<String>,
    },
    /// The JWT says it is bound to a client certificate (RFC 8705 §3.1, `cnf.x5t#S256`)
    /// other than the one the request was made with.
    #[error(
        "the token's cnf.x5t#S256 {actual:?} is not the thumbprint of the client certificate the operator presented ({expected:?}); refusing a token bound to another certificate"
    )]
    CertificateBindingMismatch {
        /// The `x5t#S256` of the certificate presented.
        expected: String,
        /// The token's `cnf.x5t#S256`.
        actual: String,
    },
    /// A token exchange (RFC 8693) answered another `issued_token_type` than the one asked
    /// for, or none.
    #[error("{}", issued_type_message(.requested.as_deref(), .issued.as_deref()))]
    IssuedTokenTypeMismatch {
        /// The `requested_token_type` sent, if any.
        requested: Option<String>,
        /// The `issued_token_type` received, if any.
        issued: Option<String>,
    },
    /// The JWT access token's signature could not be verified against the issuer's JWKS
    /// (only with `verifyAccessTokenSignature`). The message never contains the token.
    #[error("access token signature check failed: {0}")]
    SignatureInvalid(String),
    /// The issuer configuration cannot be used as it is.
    #[error("{0}")]
    Config(String),
    /// Discovery failed or returned unusable metadata.
    #[error("discovery for issuer {url} failed: {reason}")]
    Discovery {
        /// The issuer whose metadata was looked for (the URLs tried are in `reason`).
        url: String,
        /// What went wrong.
        reason: String,
    },
}

impl TokenError {
    /// The OAuth error code, when the server sent one.
    pub fn oauth_error(&self) -> Option<&str> {
        match self {
            TokenError::Server { error, .. } => Some(error),
            _ => None,
        }
    }

    /// The server's requested wait before retrying, if any.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            TokenError::Server { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether the client's credentials were refused, so cached credentials should be
    /// re-read before the next attempt.
    pub fn is_client_auth_failure(&self) -> bool {
        matches!(self, TokenError::Server { error, status, .. } if error == "invalid_client" || *status == 401)
    }
}

fn server_message(status: u16, error: &str, description: Option<&str>) -> String {
    match description {
        Some(d) if !d.is_empty() => format!("token endpoint answered {status} {error}: {d}"),
        _ => format!("token endpoint answered {status} {error}"),
    }
}

fn issued_type_message(requested: Option<&str>, issued: Option<&str>) -> String {
    let asked = match requested {
        Some(requested) => format!("asked for {requested}"),
        None => "asked for an access token (no requested_token_type)".to_string(),
    };
    match issued {
        Some(issued) => format!(
            "the token exchange {asked} but the server issued {issued}; refusing a token of another type"
        ),
        None => format!(
            "the token exchange {asked} but the response has no issued_token_type (RFC 8693 §2.2.1 requires it)"
        ),
    }
}

fn dpop_message(expected_jkt: &str, token_type: &str, actual_jkt: Option<&str>) -> String {
    if !token_type.eq_ignore_ascii_case("dpop") {
        format!(
            "the token endpoint answered token_type {token_type:?} to a DPoP request (expected \"DPoP\"); refusing a token that is not bound to the DPoP key {expected_jkt}"
        )
    } else {
        match actual_jkt {
            Some(actual) => format!(
                "the token's cnf.jkt {actual:?} is not the thumbprint of the DPoP key ({expected_jkt:?}); refusing a token bound to another key"
            ),
            None => format!(
                "the token has no cnf.jkt; refusing a token that is not shown to be bound to the DPoP key {expected_jkt}"
            ),
        }
    }
}

/// An error and its causes on one line, leaving out causes whose text the message already
/// holds. reqwest's own message hides why a connection failed (a certificate, DNS, a
/// refused connection, a TLS alert): that is in its sources.
pub fn error_chain(error: &dyn std::error::Error) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !message.contains(&text) {
            message.push_str(": ");
            message.push_str(&text);
        }
        source = cause.source();
    }
    message
}
