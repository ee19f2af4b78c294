//! Parsing token endpoint responses (RFC 6749 §5.1 and §5.2): pure, no I/O.

use std::time::Duration;

use jiff::Timestamp;
use serde::Deserialize;

use super::TokenError;
use crate::redact::SecretString;

/// A successful token response. `Debug` redacts the tokens.
#[derive(Clone, Debug)]
pub struct TokenResponse {
    /// The access token.
    pub access_token: SecretString,
    /// The token type, normalised so `bearer` reads `Bearer`.
    pub token_type: String,
    /// `expires_in`, when the server sent a usable one.
    pub expires_in: Option<Duration>,
    /// The granted scopes, space separated, when the server sent them.
    pub scope: Option<String>,
    /// A refresh token, when the server sent one.
    pub refresh_token: Option<SecretString>,
    /// The authorization details granted (RFC 9396 §7): the response's
    /// `authorization_details` when it is an array of objects, else empty.
    pub authorization_details: Vec<serde_json::Value>,
    /// `issued_token_type`, in the answer to a token exchange (RFC 8693 §2.2.1).
    pub issued_token_type: Option<String>,
}

#[derive(Deserialize)]
struct RawSuccess {
    access_token: Option<String>,
    token_type: Option<String>,
    #[serde(default)]
    expires_in: Option<serde_json::Value>,
    scope: Option<String>,
    refresh_token: Option<String>,
    #[serde(default)]
    authorization_details: Option<serde_json::Value>,
    #[serde(default)]
    issued_token_type: Option<String>,
}

#[derive(Deserialize)]
struct RawError {
    error: Option<String>,
    error_description: Option<String>,
}

/// Parses a token endpoint answer. `retry_after` is the raw `Retry-After` header; `now` is
/// used to turn an HTTP-date into a delay.
pub fn parse_token_response(
    status: u16,
    retry_after: Option<&str>,
    body: &[u8],
    now: Timestamp,
) -> Result<TokenResponse, TokenError> {
    if !(200..300).contains(&status) {
        return Err(parse_error(status, retry_after, body, now));
    }
    let raw: RawSuccess = serde_json::from_slice(body).map_err(|e| {
        TokenError::InvalidResponse(format!("body is not a JSON token response ({e})"))
    })?;
    let access_token = match raw.access_token {
        Some(token) if !token.is_empty() => SecretString::new(token),
        _ => {
            return Err(TokenError::InvalidResponse(
                "no access_token in the response".into(),
            ));
        }
    };
    let token_type = match raw.token_type.as_deref() {
        None | Some("") => "Bearer".to_string(),
        Some(t) if t.eq_ignore_ascii_case("bearer") => "Bearer".to_string(),
        Some(t) if t.eq_ignore_ascii_case("dpop") => "DPoP".to_string(),
        Some(t) => t.to_string(),
    };
    Ok(TokenResponse {
        access_token,
        token_type,
        expires_in: raw.expires_in.as_ref().and_then(expires_in_from_json),
        scope: raw.scope.filter(|s| !s.trim().is_empty()),
        refresh_token: raw
            .refresh_token
            .filter(|t| !t.is_empty())
            .map(SecretString::new),
        authorization_details: crate::authorization_details::granted(raw.authorization_details),
        issued_token_type: raw.issued_token_type.filter(|t| !t.is_empty()),
    })
}

/// `expires_in` is a number of seconds, but some servers send it as a string or a float.
/// Zero or negative values are ignored (the JWT `exp` or the default lifetime applies).
fn expires_in_from_json(value: &serde_json::Value) -> Option<Duration> {
    let seconds = match value {
        serde_json::Value::Number(n) => n.as_f64()?,
        serde_json::Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (seconds.is_finite() && seconds >= 1.0).then(|| Duration::from_secs(seconds as u64))
}

fn parse_error(status: u16, retry_after: Option<&str>, body: &[u8], now: Timestamp) -> TokenError {
    let (error, description) = match serde_json::from_slice::<RawError>(body) {
        Ok(RawError {
            error: Some(error),
            error_description,
        }) => (error, error_description),
        _ => (format!("http_{status}"), printable_excerpt(body)),
    };
    let retry_after = if status == 429 || status == 503 {
        retry_after.and_then(|value| parse_retry_after(value, now))
    } else {
        None
    };
    TokenError::Server {
        status,
        error: sanitize(&error, 64),
        description: description.map(|d| sanitize(&d, 300)),
        retry_after,
    }
}

/// A short printable excerpt of a non-OAuth error body (an HTML error page, say).
fn printable_excerpt(body: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(body);
    let text = text.trim();
    (!text.is_empty()).then(|| text.to_string())
}

/// Bounds length and strips control characters, so a hostile body cannot flood status.
fn sanitize(text: &str, max_chars: usize) -> String {
    let mut out: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .take(max_chars)
        .collect();
    if text.chars().count() > max_chars {
        out.push('…');
    }
    out
}

/// `Retry-After`: delta-seconds or an HTTP-date (RFC 9110 §10.2.3).
pub fn parse_retry_after(value: &str, now: Timestamp) -> Option<Duration> {
    let value = value.trim();
    if let Ok(seconds) = value.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = jiff::fmt::rfc2822::parse(value).ok()?.timestamp();
    Some(at.duration_since(now).try_into().unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Timestamp {
        Timestamp::from_second(1_800_000_000).unwrap()
    }

    #[test]
    fn parses_a_full_response() {
        let body =
            br#"{"access_token":"abc","token_type":"bearer","expires_in":3600,"scope":"a b"}"#;
        let r = parse_token_response(200, None, body, now()).unwrap();
        assert_eq!(r.access_token.expose(), "abc");
        assert_eq!(r.token_type, "Bearer");
        assert_eq!(r.expires_in, Some(Duration::from_secs(3600)));
        assert_eq!(r.scope.as_deref(), Some("a b"));
        assert!(r.refresh_token.is_none());
    }

    #[test]
    fn granted_authorization_details_are_kept() {
        let body = br#"{"access_token":"abc","token_type":"Bearer","authorization_details":[{"type":"helseid_authorization","practitioner_role":{"organization":{"identifier":{"value":"NO:ORGNR:1:2"}}}}]}"#;
        let r = parse_token_response(200, None, body, now()).unwrap();
        assert_eq!(
            r.authorization_details,
            vec![serde_json::json!({
                "type": "helseid_authorization",
                "practitioner_role": {"organization": {"identifier": {"value": "NO:ORGNR:1:2"}}}
            })]
        );
        let r = parse_token_response(200, None, br#"{"access_token":"abc"}"#, now()).unwrap();
        assert!(r.authorization_details.is_empty());
        let malformed =
            br#"{"access_token":"abc","authorization_details":"helseid_authorization"}"#;
        let r = parse_token_response(200, None, malformed, now()).unwrap();
        assert!(
            r.authorization_details.is_empty(),
            "a malformed member does not cost the token"
        );
    }

    #[test]
    fn expires_in_may_be_a_string_a_float_or_absent() {
        for (expires, want) in [
            (r#""expires_in":"300","#, Some(300)),
            (r#""expires_in":299.9,"#, Some(299)),
            (r#""expires_in":" 60 ","#, Some(60)),
            (r#""expires_in":0,"#, None),
            (r#""expires_in":"soon","#, None),
            (r#""expires_in":null,"#, None),
            ("", None),
        ] {
            let body = format!(r#"{{{expires}"access_token":"t","token_type":"Bearer"}}"#);
            let r = parse_token_response(200, None, body.as_bytes(), now()).unwrap();
            assert_eq!(r.expires_in, want.map(Duration::from_secs), "{expires}");
        }
    }

    #[test]
    fn missing_access_token_is_invalid() {
        let err =
            parse_token_response(200, None, br#"{"token_type":"Bearer"}"#, now()).unwrap_err();
        assert!(matches!(err, TokenError::InvalidResponse(_)), "{err}");
        let err = parse_token_response(200, None, b"<html>", now()).unwrap_err();
        assert!(matches!(err, TokenError::InvalidResponse(_)), "{err}");
    }

    #[test]
    fn oauth_errors_keep_code_and_description() {
        let body = br#"{"error":"invalid_target","error_description":"resource indicator is missing, or unknown"}"#;
        let err = parse_token_response(400, None, body, now()).unwrap_err();
        assert_eq!(err.oauth_error(), Some("invalid_target"));
        assert_eq!(
            err.to_string(),
            "token endpoint answered 400 invalid_target: resource indicator is missing, or unknown"
        );
    }

    #[test]
    fn non_oauth_error_bodies_are_bounded_and_printable() {
        let body = format!("<html>\n{}</html>", "x".repeat(1000));
        let err = parse_token_response(502, None, body.as_bytes(), now()).unwrap_err();
        assert_eq!(err.oauth_error(), Some("http_502"));
        let message = err.to_string();
        assert!(!message.contains('\n'));
        assert!(message.len() < 400, "{}", message.len());
    }

    #[test]
    fn retry_after_on_429_and_503_only() {
        let body = br#"{"error":"slow_down"}"#;
        let err = parse_token_response(429, Some("120"), body, now()).unwrap_err();
        assert_eq!(err.retry_after(), Some(Duration::from_secs(120)));
        let err = parse_token_response(400, Some("120"), body, now()).unwrap_err();
        assert_eq!(err.retry_after(), None);
        let date = "Fri, 15 Jan 2027 08:00:30 GMT";
        let at = jiff::fmt::rfc2822::parse(date).unwrap().timestamp();
        let err = parse_token_response(
            503,
            Some(date),
            body,
            at - jiff::SignedDuration::from_secs(30),
        )
        .unwrap_err();
        assert_eq!(err.retry_after(), Some(Duration::from_secs(30)));
    }
}
