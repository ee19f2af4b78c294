//! Reading the claims of a JWT access token without verifying it, and the single-audience
//! check. Pure, no I/O.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;

use super::TokenError;

/// The claims the operator looks at.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claims {
    /// `aud`, as a list whether the token carried a string or an array.
    pub aud: Vec<String>,
    /// `exp`, seconds since the epoch.
    pub exp: Option<i64>,
    /// `iat`, seconds since the epoch.
    pub iat: Option<i64>,
    /// `scope` (space separated) or `scp` (array), as a list.
    pub scopes: Option<Vec<String>>,
    /// The whole payload, for the `token` debugging command.
    pub raw: serde_json::Map<String, serde_json::Value>,
}

#[derive(Deserialize)]
struct Header {
    alg: Option<String>,
}

/// The claims of a JWS compact-serialised token, or `None` when the token is opaque (not
/// three base64url JSON segments). Encrypted JWTs (five segments) count as opaque.
pub fn decode_claims(token: &str) -> Option<Claims> {
    let mut parts = token.split('.');
    let (header, payload, _signature) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() {
        return None;
    }
    let header: Header = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).ok()?).ok()?;
    header.alg?;
    let raw: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
    let aud = match raw.get("aud") {
        Some(serde_json::Value::String(s)) => vec![s.clone()],
        Some(serde_json::Value::Array(values)) => values
            .iter()
            .map(|v| {
                v.as_str()
                    .map(str::to_string)
                    .unwrap_or_else(|| v.to_string())
            })
            .collect(),
        _ => Vec::new(),
    };
    let scopes = match (raw.get("scope"), raw.get("scp")) {
        (Some(serde_json::Value::String(s)), _) => {
            Some(s.split_whitespace().map(str::to_string).collect())
        }
        (_, Some(serde_json::Value::Array(values))) => Some(
            values
                .iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect(),
        ),
        (_, Some(serde_json::Value::String(s))) => {
            Some(s.split_whitespace().map(str::to_string).collect())
        }
        _ => None,
    };
    Some(Claims {
        aud,
        exp: raw.get("exp").and_then(as_seconds),
        iat: raw.get("iat").and_then(as_seconds),
        scopes,
        raw,
    })
}

fn as_seconds(value: &serde_json::Value) -> Option<i64> {
    value.as_i64().or_else(|| value.as_f64().map(|f| f as i64))
}

/// The token must be for exactly one audience, the expected one: `aud` is that string, or
/// an array holding only it. A JWT without `aud` is refused too: nothing shows it is narrow.
pub fn check_audience(claims: &Claims, expected: &str) -> Result<(), TokenError> {
    if claims.aud.len() == 1 && claims.aud[0] == expected {
        Ok(())
    } else {
        Err(TokenError::AudienceMismatch {
            expected: expected.to_string(),
            actual: claims.aud.clone(),
        })
    }
}

/// The JWT's `cnf.jkt` (RFC 9449 §6.1), when it has one.
pub fn confirmation_jkt(claims: &Claims) -> Option<&str> {
    claims.raw.get("cnf")?.get("jkt")?.as_str()
}

/// A token asked for with a DPoP key must be bound to it (RFC 9449 §5): `token_type` is
/// `DPoP` (any case) and a JWT's `cnf.jkt` is `expected_jkt`. Opaque tokens (`claims` is
/// `None`) can only be checked for their `token_type`.
pub fn check_dpop_binding(
    claims: Option<&Claims>,
    token_type: &str,
    expected_jkt: &str,
) -> Result<(), TokenError> {
    let actual_jkt = claims.and_then(confirmation_jkt);
    let bound = token_type.eq_ignore_ascii_case("dpop")
        && match claims {
            Some(_) => actual_jkt == Some(expected_jkt),
            None => true,
        };
    if bound {
        Ok(())
    } else {
        Err(TokenError::DpopBindingMismatch {
            expected_jkt: expected_jkt.to_string(),
            token_type: token_type.to_string(),
            actual_jkt: actual_jkt.map(str::to_string),
        })
    }
}

/// The JWT's `cnf.x5t#S256` (RFC 8705 §3.1), when it has one.
pub fn confirmation_x5t(claims: &Claims) -> Option<&str> {
    claims.raw.get("cnf")?.get("x5t#S256")?.as_str()
}

/// What a token asked for with a client certificate is bound to: a JWT that names a
/// certificate (`cnf.x5t#S256`) must name the one presented; an opaque token cannot be
/// checked and counts as bound to it; a JWT without the claim is not certificate-bound
/// (`None`).
pub fn check_certificate_binding(
    claims: Option<&Claims>,
    presented: &str,
) -> Result<Option<String>, TokenError> {
    let Some(claims) = claims else {
        return Ok(Some(presented.to_string()));
    };
    match confirmation_x5t(claims) {
        None => Ok(None),
        Some(actual) if actual == presented => Ok(Some(presented.to_string())),
        Some(actual) => Err(TokenError::CertificateBindingMismatch {
            expected: presented.to_string(),
            actual: actual.to_string(),
        }),
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// An unsigned-but-well-formed JWS with the given payload, for tests.
    pub(crate) fn jwt(payload: serde_json::Value) -> String {
        let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"at+jwt"}"#);
        let payload = URL_SAFE_NO_PAD.encode(payload.to_string());
        format!("{header}.{payload}.c2ln")
    }

    #[test]
    fn reads_string_and_array_audiences() {
        let claims = decode_claims(&jwt(
            serde_json::json!({"aud":"https://a","exp":100,"iat":40,"scope":"x y"}),
        ))
        .unwrap();
        assert_eq!(claims.aud, vec!["https://a"]);
        assert_eq!((claims.exp, claims.iat), (Some(100), Some(40)));
        assert_eq!(claims.scopes, Some(vec!["x".to_string(), "y".to_string()]));
        let claims = decode_claims(&jwt(
            serde_json::json!({"aud":["https://a","https://b"],"scp":["x"]}),
        ))
        .unwrap();
        assert_eq!(claims.aud, vec!["https://a", "https://b"]);
        assert_eq!(claims.scopes, Some(vec!["x".to_string()]));
    }

    #[test]
    fn opaque_tokens_have_no_claims() {
        for token in [
            "abc",
            "a.b",
            "a.b.c",
            "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln",
            "a.b.c.d.e",
            "",
        ] {
            assert!(decode_claims(token).is_none(), "{token}");
        }
    }

    #[test]
    fn audience_must_be_exactly_the_one_expected() {
        let check = |aud: serde_json::Value| {
            let claims = decode_claims(&jwt(serde_json::json!({ "aud": aud }))).unwrap();
            check_audience(&claims, "https://orders.example.com")
        };
        assert!(check(serde_json::json!("https://orders.example.com")).is_ok());
        assert!(check(serde_json::json!(["https://orders.example.com"])).is_ok());
        assert!(
            check(serde_json::json!([
                "https://orders.example.com",
                "https://payments.example.com"
            ]))
            .is_err()
        );
        assert!(check(serde_json::json!("https://orders.example.com/")).is_err());
        assert!(check(serde_json::json!("https://payments.example.com")).is_err());
        assert!(check(serde_json::json!([])).is_err());
        let no_aud = decode_claims(&jwt(serde_json::json!({"sub":"x"}))).unwrap();
        let err = check_audience(&no_aud, "urn:a").unwrap_err();
        assert!(err.to_string().contains("not exactly"), "{err}");
    }

    #[test]
    fn a_dpop_token_must_be_bound_to_the_key() {
        let claims = |payload| decode_claims(&jwt(payload)).unwrap();
        let bound = claims(serde_json::json!({"aud": "a", "cnf": {"jkt": "jkt-1"}}));
        assert!(check_dpop_binding(Some(&bound), "DPoP", "jkt-1").is_ok());
        assert!(check_dpop_binding(Some(&bound), "dpop", "jkt-1").is_ok());
        let err = check_dpop_binding(Some(&bound), "Bearer", "jkt-1").unwrap_err();
        assert!(err.to_string().contains("token_type \"Bearer\""), "{err}");
        let err = check_dpop_binding(Some(&bound), "DPoP", "jkt-2").unwrap_err();
        assert!(
            err.to_string().contains("cnf.jkt \"jkt-1\" is not"),
            "{err}"
        );
        let unbound = claims(serde_json::json!({"aud": "a"}));
        let err = check_dpop_binding(Some(&unbound), "DPoP", "jkt-1").unwrap_err();
        assert!(err.to_string().contains("no cnf.jkt"), "{err}");
        assert!(matches!(err, TokenError::DpopBindingMismatch { .. }));
        // Opaque: only the token_type can be checked.
        assert!(check_dpop_binding(None, "DPoP", "jkt-1").is_ok());
        assert!(check_dpop_binding(None, "Bearer", "jkt-1").is_err());
    }
}
