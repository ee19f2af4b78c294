//! From a token response to a token the operator may publish: lifetime, granted scopes,
//! and the single-audience check. Pure, no I/O.

use std::time::Duration;

use jiff::{SignedDuration, Timestamp};

use super::jwt::{
    Claims, check_audience, check_certificate_binding, check_dpop_binding, decode_claims,
};
use super::{TokenError, TokenResponse};
use crate::redact::SecretString;

/// A token that passed every check and may be written to a Secret. `Debug` redacts it.
#[derive(Clone, Debug)]
pub struct IssuedToken {
    /// The access token.
    pub access_token: SecretString,
    /// `Bearer`, usually.
    pub token_type: String,
    /// When the operator received it.
    pub issued_at: Timestamp,
    /// When it expires: `expires_in`, else the JWT `exp`, else the default lifetime; the
    /// earlier of the first two when both are present.
    pub expires_at: Timestamp,
    /// The JWT `aud` (empty for opaque tokens).
    pub audience: Vec<String>,
    /// The granted scopes: the response's `scope`, else the JWT's, else those requested.
    pub scopes: Vec<String>,
    /// A refresh token, if the server sent one (only kept for the refresh-token grant).
    pub refresh_token: Option<SecretString>,
    /// The `x5t#S256` of the client certificate the token is bound to (RFC 8705 §3): the
    /// JWT's `cnf.x5t#S256`, which is the certificate presented; for an opaque token asked
    /// for with a certificate, that certificate. `None` when not certificate-bound.
    pub certificate_thumbprint: Option<String>,
    /// The authorization details the server granted (RFC 9396 §7), as its response listed
    /// them; empty when it listed none.
    pub authorization_details: Vec<serde_json::Value>,
}

/// What a token request was sender-constrained with, which the token must then be bound to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Binding<'a> {
    /// The RFC 7638 thumbprint of the DPoP key the request carried proofs of.
    pub dpop_jkt: Option<&'a str>,
    /// The `x5t#S256` of the client certificate presented on the connection.
    pub certificate_thumbprint: Option<&'a str>,
}

impl Binding<'_> {
    /// A bearer request: nothing to check.
    pub const NONE: Binding<'static> = Binding {
        dpop_jkt: None,
        certificate_thumbprint: None,
    };
}

/// Checks a token response and works out its lifetime and scopes.
///
/// JWT access tokens must carry exactly `expected_audience`; opaque tokens cannot be
/// checked and pass. With a DPoP key in `binding` the token must be DPoP-bound to it (see
/// [`check_dpop_binding`]); with a client certificate, a JWT that names a certificate must
/// name that one (see [`check_certificate_binding`]).
pub fn issue(
    response: TokenResponse,
    now: Timestamp,
    default_lifetime: Duration,
    expected_audience: &str,
    requested_scopes: &[String],
    binding: Binding<'_>,
) -> Result<IssuedToken, TokenError> {
    let claims = decode_claims(response.access_token.expose());
    if let Some(claims) = &claims {
        check_audience(claims, expected_audience)?;
    }
    if let Some(expected_jkt) = binding.dpop_jkt {
        check_dpop_binding(claims.as_ref(), &response.token_type, expected_jkt)?;
    }
    let certificate_thumbprint = match binding.certificate_thumbprint {
        Some(presented) => check_certificate_binding(claims.as_ref(), presented)?,
        None => None,
    };
    let expires_at = expiry(&response, claims.as_ref(), now, default_lifetime);
    if expires_at <= now {
        return Err(TokenError::InvalidResponse(
            "the token is already expired".into(),
        ));
    }
    let scopes = granted_scopes(&response, claims.as_ref(), requested_scopes);
    Ok(IssuedToken {
        access_token: response.access_token,
        token_type: response.token_type,
        issued_at: now,
        expires_at,
        audience: claims.map(|c| c.aud).unwrap_or_default(),
        scopes,
        refresh_token: response.refresh_token,
        certificate_thumbprint,
        authorization_details: response.authorization_details,
    })
}

/// When a token expires: `expires_in` from `now`, else the JWT `exp`, else
/// `default_lifetime` from `now`; the earlier of the first two when both are present.
pub fn expiry(
    response: &TokenResponse,
    claims: Option<&Claims>,
    now: Timestamp,
    default_lifetime: Duration,
) -> Timestamp {
    let from_expires_in = response.expires_in.and_then(|d| add(now, d));
    let from_exp = claims
        .and_then(|c| c.exp)
        .and_then(|exp| Timestamp::from_second(exp).ok());
    match (from_expires_in, from_exp) {
        (Some(a), Some(b)) => a.min(b),
        (Some(a), None) | (None, Some(a)) => a,
        (None, None) => add(now, default_lifetime).unwrap_or(now),
    }
}

/// The granted scopes: the response's `scope`, else the JWT's, else those requested.
pub fn granted_scopes(
    response: &TokenResponse,
    claims: Option<&Claims>,
    requested: &[String],
) -> Vec<String> {
    match (&response.scope, claims.and_then(|c| c.scopes.clone())) {
        (Some(scope), _) => scope.split_whitespace().map(str::to_string).collect(),
        (None, Some(scopes)) => scopes,
        (None, None) => requested.to_vec(),
    }
}

fn add(at: Timestamp, duration: Duration) -> Option<Timestamp> {
    at.checked_add(SignedDuration::try_from(duration).ok()?)
        .ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jwt::tests::jwt;

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    fn response(token: String, expires_in: Option<u64>, scope: Option<&str>) -> TokenResponse {
        TokenResponse {
            access_token: SecretString::new(token),
            token_type: "Bearer".into(),
            expires_in: expires_in.map(Duration::from_secs),
            scope: scope.map(str::to_string),
            refresh_token: None,
            authorization_details: Vec::new(),
            issued_token_type: None,
        }
    }

    const FIVE_MIN: Duration = Duration::from_secs(300);

    #[test]
    fn lifetime_prefers_expires_in_then_exp_then_default() {
        let token = jwt(serde_json::json!({"aud":"urn:a","exp": 1_800_000_000 + 1000}));
        let issued = issue(
            response(token.clone(), Some(600), None),
            now(),
            FIVE_MIN,
            "urn:a",
            &[],
            Binding::NONE,
        )
        .unwrap();
        assert_eq!(issued.expires_at.as_second(), 1_800_000_600);
        let issued = issue(
            response(token.clone(), Some(5000), None),
            now(),
            FIVE_MIN,
            "urn:a",
            &[],
            Binding::NONE,
        )
        .unwrap();
        assert_eq!(
            issued.expires_at.as_second(),
            1_800_001_000,
            "the earlier of expires_in and exp wins"
        );
        let issued = issue(
            response(token, None, None),
            now(),
            FIVE_MIN,
            "urn:a",
            &[],
            Binding::NONE,
        )
        .unwrap();
        assert_eq!(issued.expires_at.as_second(), 1_800_001_000);
        let issued = issue(
            response("opaque".into(), None, None),
            now(),
            FIVE_MIN,
            "urn:a",
            &[],
            Binding::NONE,
        )
        .unwrap();
        assert_eq!(issued.expires_at.as_second(), 1_800_000_300);
    }

    #[test]
    fn multi_audience_jwt_is_refused_and_opaque_passes() {
        let token = jwt(serde_json::json!({"aud":["urn:a","urn:b"]}));
        let err = issue(
            response(token, Some(60), None),
            now(),
            FIVE_MIN,
            "urn:a",
            &[],
            Binding::NONE,
        )
        .unwrap_err();
        assert!(matches!(err, TokenError::AudienceMismatch { .. }), "{err}");
        let issued = issue(
            response("opaque".into(), Some(60), None),
            now(),
            FIVE_MIN,
            "urn:a",
            &[],
            Binding::NONE,
        )
        .unwrap();
        assert!(issued.audience.is_empty());
    }

    #[test]
    fn granted_authorization_details_are_carried_to_the_token() {
        let granted = vec![serde_json::json!({"type": "helseid_authorization", "n": 1})];
        let issued = issue(
            TokenResponse {
                authorization_details: granted.clone(),
                ..response("opaque".into(), Some(60), None)
            },
            now(),
            FIVE_MIN,
            "urn:a",
            &[],
            Binding::NONE,
        )
        .unwrap();
        assert_eq!(issued.authorization_details, granted);
        assert!(
            !format!("{issued:?}").contains("opaque"),
            "Debug still hides the token"
        );
    }

    #[test]
    fn scopes_from_response_then_jwt_then_request() {
        let requested = vec!["r".to_string()];
        let token = jwt(serde_json::json!({"aud":"urn:a","scope":"j1 j2"}));
        let s = issue(
            response(token.clone(), Some(60), Some("s1")),
            now(),
            FIVE_MIN,
            "urn:a",
            &requested,
            Binding::NONE,
        )
        .unwrap();
        assert_eq!(s.scopes, vec!["s1"]);
        let s = issue(
            response(token, Some(60), None),
            now(),
            FIVE_MIN,
            "urn:a",
            &requested,
            Binding::NONE,
        )
        .unwrap();
        assert_eq!(s.scopes, vec!["j1", "j2"]);
        let s = issue(
            response("opaque".into(), Some(60), None),
            now(),
            FIVE_MIN,
            "urn:a",
            &requested,
            Binding::NONE,
        )
        .unwrap();
        assert_eq!(s.scopes, vec!["r"]);
    }

    #[test]
    fn an_already_expired_token_is_refused() {
        let token = jwt(serde_json::json!({"aud":"urn:a","exp": 1_800_000_000 - 5}));
        assert!(
            issue(
                response(token, None, None),
                now(),
                FIVE_MIN,
                "urn:a",
                &[],
                Binding::NONE
            )
            .is_err()
        );
    }

    #[test]
    fn a_certificate_bound_token_must_name_the_presented_certificate() {
        let presented = Binding {
            certificate_thumbprint: Some("thumb-A"),
            ..Binding::NONE
        };
        let ask = |token: String| {
            issue(
                response(token, Some(60), None),
                now(),
                FIVE_MIN,
                "urn:a",
                &[],
                presented,
            )
        };
        let bound = ask(jwt(
            serde_json::json!({"aud":"urn:a","cnf":{"x5t#S256":"thumb-A"}}),
        ))
        .unwrap();
        assert_eq!(bound.certificate_thumbprint.as_deref(), Some("thumb-A"));
        let err = ask(jwt(
            serde_json::json!({"aud":"urn:a","cnf":{"x5t#S256":"thumb-B"}}),
        ))
        .unwrap_err();
        assert!(
            matches!(err, TokenError::CertificateBindingMismatch { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("thumb-B"), "{err}");
        let unbound = ask(jwt(serde_json::json!({"aud":"urn:a"}))).unwrap();
        assert_eq!(
            unbound.certificate_thumbprint, None,
            "a JWT without cnf is not bound"
        );
        let opaque = ask("opaque".into()).unwrap();
        assert_eq!(opaque.certificate_thumbprint.as_deref(), Some("thumb-A"));
        // Without a certificate nothing is checked or recorded.
        let plain = issue(
            response(
                jwt(serde_json::json!({"aud":"urn:a","cnf":{"x5t#S256":"thumb-B"}})),
                Some(60),
                None,
            ),
            now(),
            FIVE_MIN,
            "urn:a",
            &[],
            Binding::NONE,
        )
        .unwrap();
        assert_eq!(plain.certificate_thumbprint, None);
    }
}
