//! RFC 8693 token exchange: the grant's identifiers and the check of what the server says
//! it issued. Pure, no I/O.

use super::TokenError;

/// `grant_type` of a token exchange (RFC 8693 §2.1).
pub const GRANT_TYPE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
/// A JWT, such as a Kubernetes ServiceAccount token (RFC 8693 §3).
pub const TOKEN_TYPE_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// An OAuth 2.0 access token (RFC 8693 §3).
pub const TOKEN_TYPE_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";

/// Checks the response's `issued_token_type` (RFC 8693 §2.2.1, required there) against the
/// request: when a type was asked for, exactly that one; otherwise one that is used as an
/// access token (`access_token` or `jwt`), since that is what the operator publishes.
pub fn check_issued_token_type(
    issued: Option<&str>,
    requested: Option<&str>,
) -> Result<(), TokenError> {
    let acceptable = match (issued, requested) {
        (Some(issued), Some(requested)) => issued == requested,
        (Some(issued), None) => issued == TOKEN_TYPE_ACCESS_TOKEN || issued == TOKEN_TYPE_JWT,
        (None, _) => false,
    };
    if acceptable {
        return Ok(());
    }
    Err(TokenError::IssuedTokenTypeMismatch {
        requested: requested.map(str::to_string),
        issued: issued.map(str::to_string),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_issued_type_must_be_the_one_asked_for() {
        assert!(check_issued_token_type(Some(TOKEN_TYPE_JWT), Some(TOKEN_TYPE_JWT)).is_ok());
        let err = check_issued_token_type(
            Some(TOKEN_TYPE_ACCESS_TOKEN),
            Some("urn:ietf:params:oauth:token-type:id_token"),
        )
        .unwrap_err();
        assert!(
            err.to_string()
                .contains("asked for urn:ietf:params:oauth:token-type:id_token")
                && err
                    .to_string()
                    .contains("issued urn:ietf:params:oauth:token-type:access_token"),
            "{err}"
        );
    }

    #[test]
    fn without_a_request_an_access_token_or_jwt_is_expected() {
        assert!(check_issued_token_type(Some(TOKEN_TYPE_ACCESS_TOKEN), None).is_ok());
        assert!(check_issued_token_type(Some(TOKEN_TYPE_JWT), None).is_ok());
        assert!(
            check_issued_token_type(Some("urn:ietf:params:oauth:token-type:refresh_token"), None)
                .is_err()
        );
        let err = check_issued_token_type(None, None).unwrap_err();
        assert!(err.to_string().contains("no issued_token_type"), "{err}");
    }
}
