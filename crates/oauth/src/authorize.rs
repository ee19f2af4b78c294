//! The authorization-code flow for a person at a browser (RFC 6749 §4.1), as the `login`
//! command runs it: PKCE (RFC 7636), one `resource` per API (RFC 8707 §2.1), pushed
//! authorization requests (RFC 9126), and the checks on the answer at the redirect URI
//! (`state`, and `iss` per RFC 9207). Pure, no I/O; the PAR request itself is
//! [`TokenClient::push_authorization_request`](crate::TokenClient::push_authorization_request).

use std::time::Duration;

use aws_lc_rs::digest::{SHA256, digest};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde::Deserialize;
use url::Url;

use crate::TokenError;
use crate::redact::SecretString;

/// A PKCE pair (RFC 7636): the verifier stays with the client until the code is redeemed;
/// the S256 challenge goes into the authorization request.
#[derive(Clone, Debug)]
pub struct Pkce {
    /// `code_verifier`: 32 random bytes, base64url (43 characters).
    pub verifier: SecretString,
    /// `code_challenge`: base64url(SHA-256(verifier)), method S256.
    pub challenge: String,
}

impl Pkce {
    /// A new random pair.
    pub fn generate() -> Self {
        Self::from_verifier(SecretString::new(random_token()))
    }

    /// The pair for a given verifier.
    pub fn from_verifier(verifier: SecretString) -> Self {
        let challenge = URL_SAFE_NO_PAD.encode(digest(&SHA256, verifier.expose().as_bytes()));
        Self {
            verifier,
            challenge,
        }
    }
}

/// 32 random bytes, base64url: a PKCE verifier or a `state` value.
pub fn random_token() -> String {
    let bytes: [u8; 32] = rand::random();
    URL_SAFE_NO_PAD.encode(bytes)
}

/// What a person is asked to authorize.
#[derive(Clone, Debug)]
pub struct AuthorizationRequest<'a> {
    /// The OAuth client.
    pub client_id: &'a str,
    /// Where the browser brings the answer (a loopback URI, RFC 8252 §7.3).
    pub redirect_uri: &'a str,
    /// The scopes, `offline_access` (and `openid`) included.
    pub scopes: &'a [String],
    /// One `resource` parameter each (RFC 8707 §2.1).
    pub resources: &'a [String],
    /// The `state` the answer must carry back.
    pub state: &'a str,
    /// The PKCE challenge (S256).
    pub code_challenge: &'a str,
    /// `prompt`: `consent` when `offline_access` is asked for (OpenID Connect Core §11).
    pub prompt: Option<&'a str>,
    /// RFC 9396 `authorization_details`, a JSON array, if any.
    pub authorization_details: Option<&'a str>,
}

impl AuthorizationRequest<'_> {
    /// The request's parameters, in order: for the query of the authorization URL, or the
    /// body of a pushed authorization request.
    pub fn params(&self) -> Vec<(&'static str, String)> {
        let mut params = vec![
            ("response_type", "code".to_string()),
            ("client_id", self.client_id.to_string()),
            ("redirect_uri", self.redirect_uri.to_string()),
            ("scope", self.scopes.join(" ")),
            ("state", self.state.to_string()),
            ("code_challenge", self.code_challenge.to_string()),
            ("code_challenge_method", "S256".to_string()),
        ];
        for resource in self.resources {
            params.push(("resource", resource.clone()));
        }
        if let Some(prompt) = self.prompt {
            params.push(("prompt", prompt.to_string()));
        }
        if let Some(details) = self.authorization_details {
            params.push(("authorization_details", details.to_string()));
        }
        params
    }
}

/// The URL to open: the authorization endpoint with `params` added to its query.
pub fn authorization_url(authorization_endpoint: &Url, params: &[(&str, String)]) -> Url {
    let mut url = authorization_endpoint.clone();
    {
        let mut query = url.query_pairs_mut();
        for (name, value) in params {
            query.append_pair(name, value);
        }
    }
    url
}

/// The URL to open after a pushed authorization request (RFC 9126 §4): only `client_id`
/// and the `request_uri` the server gave.
pub fn pushed_authorization_url(
    authorization_endpoint: &Url,
    client_id: &str,
    request_uri: &str,
) -> Url {
    authorization_url(
        authorization_endpoint,
        &[
            ("client_id", client_id.to_string()),
            ("request_uri", request_uri.to_string()),
        ],
    )
}

/// The answer to a pushed authorization request (RFC 9126 §2.2).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PushedRequest {
    /// The `request_uri` to send the browser with.
    pub request_uri: String,
    /// How long it stays valid.
    pub expires_in: Option<Duration>,
}

#[derive(Deserialize)]
struct RawPushed {
    request_uri: Option<String>,
    expires_in: Option<u64>,
}

/// Parses a PAR endpoint's successful (201) body.
pub fn parse_pushed_request(body: &[u8]) -> Result<PushedRequest, TokenError> {
    let raw: RawPushed = serde_json::from_slice(body)
        .map_err(|e| TokenError::InvalidResponse(format!("the PAR answer is not JSON ({e})")))?;
    let request_uri = raw
        .request_uri
        .filter(|u| !u.is_empty())
        .ok_or_else(|| TokenError::InvalidResponse("the PAR answer has no request_uri".into()))?;
    Ok(PushedRequest {
        request_uri,
        expires_in: raw.expires_in.map(Duration::from_secs),
    })
}

/// Why the answer at the redirect URI gives no code.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CallbackError {
    /// The server (or the person) refused: `error` and `error_description` (RFC 6749
    /// §4.1.2.1).
    #[error("{}", refusal_message(.error, .description.as_deref()))]
    Refused {
        /// The `error` code, e.g. `access_denied`, `invalid_target`.
        error: String,
        /// The `error_description`, if any.
        description: Option<String>,
    },
    /// `state` is missing or not this login's: the answer belongs to another request.
    #[error(
        "the answer's state does not match this login (an answer to another login, or a forged one); run the command again"
    )]
    StateMismatch,
    /// `iss` (RFC 9207) names another server: a mix-up.
    #[error(
        "the answer comes from issuer {actual:?}, not {expected:?} (RFC 9207 mix-up); refusing it"
    )]
    IssuerMismatch {
        /// The issuer the login is for.
        expected: String,
        /// The `iss` the answer carried.
        actual: String,
    },
    /// Neither a code nor an error.
    #[error("the answer has neither a code nor an error")]
    NoCode,
}

fn refusal_message(error: &str, description: Option<&str>) -> String {
    let detail = description
        .filter(|d| !d.is_empty())
        .map(|d| format!(": {d}"))
        .unwrap_or_default();
    let hint = match error {
        "invalid_target" => {
            "; the server does not support resource indicators (RFC 8707), or does not know one of the resources"
        }
        "access_denied" => "; the login or the consent was refused",
        "invalid_scope" => "; a scope is unknown or not allowed for this client",
        _ => "",
    };
    format!("the authorization server answered {error}{detail}{hint}")
}

/// Reads the query of the redirect (`code`, `state`, `iss`, or `error`): the code, when the
/// answer is this login's (`state` equal) from this server (`iss`, when the answer has one,
/// equal to `issuer`; a trailing `/` difference is tolerated).
pub fn parse_callback(
    query: &str,
    expected_state: &str,
    issuer: Option<&str>,
) -> Result<SecretString, CallbackError> {
    let mut code = None;
    let mut state = None;
    let mut iss = None;
    let mut error = None;
    let mut description = None;
    for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
        match name.as_ref() {
            "code" => code = Some(value.into_owned()),
            "state" => state = Some(value.into_owned()),
            "iss" => iss = Some(value.into_owned()),
            "error" => error = Some(value.into_owned()),
            "error_description" => description = Some(value.into_owned()),
            _ => {}
        }
    }
    if state.as_deref() != Some(expected_state) {
        return Err(CallbackError::StateMismatch);
    }
    if let (Some(expected), Some(actual)) = (issuer, &iss)
        && expected.trim_end_matches('/') != actual.trim_end_matches('/')
    {
        return Err(CallbackError::IssuerMismatch {
            expected: expected.to_string(),
            actual: actual.clone(),
        });
    }
    if let Some(error) = error {
        return Err(CallbackError::Refused { error, description });
    }
    code.filter(|c| !c.is_empty())
        .map(SecretString::new)
        .ok_or(CallbackError::NoCode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pkce_s256_matches_rfc_7636_appendix_b() {
        let pair = Pkce::from_verifier(SecretString::new(
            "dBjftJeZ4CVP-mB92K27uhbUJU1p1r_wW1gFWFOEjXk",
        ));
        assert_eq!(
            pair.challenge,
            "E9Melhoa2OwvFrEMTJguCHaoeK1t8URWbuGJSstw-cM"
        );
        let fresh = Pkce::generate();
        assert_eq!(fresh.verifier.expose().len(), 43);
        assert_ne!(fresh.verifier.expose(), Pkce::generate().verifier.expose());
        assert!(!format!("{fresh:?}").contains(fresh.verifier.expose()));
    }

    #[test]
    fn the_request_has_one_resource_per_api_and_pkce() {
        let scopes = vec!["openid".to_string(), "offline_access".to_string()];
        let resources = vec!["https://a.example".to_string(), "urn:b".to_string()];
        let request = AuthorizationRequest {
            client_id: "c",
            redirect_uri: "http://127.0.0.1:5000/callback",
            scopes: &scopes,
            resources: &resources,
            state: "s",
            code_challenge: "ch",
            prompt: Some("consent"),
            authorization_details: None,
        };
        let url = authorization_url(
            &Url::parse("https://idp.example/authorize?tenant=x").unwrap(),
            &request.params(),
        );
        let pairs: Vec<(String, String)> = url.query_pairs().into_owned().collect();
        let get = |name: &str| -> Vec<&str> {
            pairs
                .iter()
                .filter(|(n, _)| n == name)
                .map(|(_, v)| v.as_str())
                .collect()
        };
        assert_eq!(get("tenant"), ["x"], "the endpoint's own query is kept");
        assert_eq!(get("resource"), ["https://a.example", "urn:b"]);
        assert_eq!(get("scope"), ["openid offline_access"]);
        assert_eq!(get("code_challenge_method"), ["S256"]);
        assert_eq!(get("response_type"), ["code"]);
        assert_eq!(get("prompt"), ["consent"]);
        assert!(get("authorization_details").is_empty());
        let pushed = pushed_authorization_url(
            &Url::parse("https://idp.example/authorize").unwrap(),
            "c",
            "urn:ietf:params:oauth:request_uri:abc",
        );
        assert_eq!(
            pushed.as_str(),
            "https://idp.example/authorize?client_id=c&request_uri=urn%3Aietf%3Aparams%3Aoauth%3Arequest_uri%3Aabc"
        );
    }

    #[test]
    fn the_answer_must_be_this_logins_from_this_server() {
        let issuer = Some("https://idp.example");
        assert_eq!(
            parse_callback(
                "code=c1&state=s&iss=https%3A%2F%2Fidp.example%2F",
                "s",
                issuer
            )
            .unwrap()
            .expose(),
            "c1"
        );
        assert_eq!(
            parse_callback("code=c1&state=other", "s", issuer),
            Err(CallbackError::StateMismatch)
        );
        assert_eq!(
            parse_callback("code=c1", "s", issuer),
            Err(CallbackError::StateMismatch)
        );
        assert!(matches!(
            parse_callback(
                "code=c1&state=s&iss=https%3A%2F%2Fevil.example",
                "s",
                issuer
            ),
            Err(CallbackError::IssuerMismatch { .. })
        ));
        let refused = parse_callback(
            "error=invalid_target&error_description=unknown+resource&state=s",
            "s",
            issuer,
        )
        .unwrap_err();
        assert!(
            refused.to_string().contains("resource indicators"),
            "{refused}"
        );
        assert!(
            refused.to_string().contains("unknown resource"),
            "{refused}"
        );
        assert_eq!(
            parse_callback("state=s", "s", issuer),
            Err(CallbackError::NoCode)
        );
    }

    #[test]
    fn a_pushed_request_answer_needs_a_request_uri() {
        let ok = parse_pushed_request(br#"{"request_uri":"urn:x","expires_in":60}"#).unwrap();
        assert_eq!(ok.request_uri, "urn:x");
        assert_eq!(ok.expires_in, Some(Duration::from_secs(60)));
        assert!(parse_pushed_request(br#"{"expires_in":60}"#).is_err());
        assert!(parse_pushed_request(b"<html>").is_err());
    }
}
