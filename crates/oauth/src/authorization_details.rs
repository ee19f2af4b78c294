//! Rich authorization requests (RFC 9396): the authorization details a token request carries
//! and where it carries them. Pure, no I/O.
//!
//! Details go either in the `authorization_details` form parameter of the token request
//! (RFC 9396 §6, a JSON-encoded array) or, as HelseID's multi-tenant clients send the
//! organisation they act for, in an `assertion_details` claim of the `private_key_jwt` client
//! assertion (the same array). The details the server granted come back in the token
//! response (RFC 9396 §7), see [`crate::TokenResponse::authorization_details`].

use std::fmt;

use serde_json::Value;

/// The token request's form parameter (RFC 9396 §6) and the token response's member (§7).
pub const AUTHORIZATION_DETAILS_PARAMETER: &str = "authorization_details";

/// The client-assertion claim that carries the details when they go in the assertion.
pub const ASSERTION_DETAILS_CLAIM: &str = "assertion_details";

/// The most bytes the JSON array may take, serialised: a form field or a JWT claim, not a
/// document.
pub const MAX_AUTHORIZATION_DETAILS_BYTES: usize = 8 * 1024;

/// Where a token request sends its authorization details.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DetailsLocation {
    /// The `authorization_details` form parameter (RFC 9396 §6).
    TokenRequest,
    /// An `assertion_details` claim inside the `private_key_jwt` client assertion (HelseID);
    /// needs [`crate::ClientCredentials::PrivateKeyJwt`].
    ClientAssertion,
}

impl fmt::Display for DetailsLocation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DetailsLocation::TokenRequest => "the authorization_details form parameter",
            DetailsLocation::ClientAssertion => {
                "the assertion_details claim of the client assertion"
            }
        })
    }
}

/// Why a list of authorization details cannot be sent. The message names the problem and
/// the index of the offending detail; details are not secret, but the message does not
/// repeat them.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DetailsError(String);

/// The authorization details of one token request (RFC 9396 §2): a non-empty JSON array of
/// objects, each with a non-empty string `type`, at most
/// [`MAX_AUTHORIZATION_DETAILS_BYTES`] serialised, and where they go.
#[derive(Clone, Debug, PartialEq)]
pub struct AuthorizationDetails {
    details: Vec<Value>,
    json: String,
    location: DetailsLocation,
}

impl AuthorizationDetails {
    /// Checks `details` and serialises them once.
    pub fn new(details: Vec<Value>, location: DetailsLocation) -> Result<Self, DetailsError> {
        if details.is_empty() {
            return Err(DetailsError(
                "authorization details must not be an empty list; send none instead".into(),
            ));
        }
        for (i, detail) in details.iter().enumerate() {
            let Some(object) = detail.as_object() else {
                return Err(DetailsError(format!(
                    "authorization detail {i} is not a JSON object"
                )));
            };
            match object.get("type") {
                Some(Value::String(t)) if !t.is_empty() => {}
                _ => {
                    return Err(DetailsError(format!(
                        "authorization detail {i} has no non-empty string `type` (RFC 9396 §2)"
                    )));
                }
            }
        }
        let json = Value::Array(details.clone()).to_string();
        if json.len() > MAX_AUTHORIZATION_DETAILS_BYTES {
            return Err(DetailsError(format!(
                "the authorization details take {} bytes as JSON; at most {MAX_AUTHORIZATION_DETAILS_BYTES} are sent",
                json.len()
            )));
        }
        Ok(Self {
            details,
            json,
            location,
        })
    }

    /// The details, as given.
    pub fn details(&self) -> &[Value] {
        &self.details
    }

    /// The details as one JSON array, as sent in the form parameter.
    pub fn json(&self) -> &str {
        &self.json
    }

    /// Where they go.
    pub fn location(&self) -> DetailsLocation {
        self.location
    }
}

/// The `authorization_details` of a token response: the array's members when it is an array
/// of JSON objects; anything else (absent, `null`, a string, an array holding non-objects)
/// is no details. What the server granted is shown to users, not relied on; a malformed
/// member does not cost the token.
pub(crate) fn granted(value: Option<Value>) -> Vec<Value> {
    match value {
        Some(Value::Array(members)) if members.iter().all(Value::is_object) => members,
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn helseid(value: &str) -> Value {
        json!({
            "type": "helseid_authorization",
            "practitioner_role": {"organization": {"identifier": {
                "system": "urn:oid:1.0.6523", "type": "ENH", "value": value
            }}}
        })
    }

    #[test]
    fn details_are_serialised_once_as_one_array() {
        let details = AuthorizationDetails::new(
            vec![helseid("NO:ORGNR:1:2"), json!({"type": "b", "n": [1, 2]})],
            DetailsLocation::TokenRequest,
        )
        .unwrap();
        let parsed: Value = serde_json::from_str(details.json()).unwrap();
        assert_eq!(
            parsed,
            json!([helseid("NO:ORGNR:1:2"), {"type": "b", "n": [1, 2]}])
        );
        assert_eq!(details.details().len(), 2);
        assert_eq!(details.location(), DetailsLocation::TokenRequest);
    }

    #[test]
    fn each_detail_is_an_object_with_a_string_type() {
        let refused = |details: Vec<Value>| {
            AuthorizationDetails::new(details, DetailsLocation::TokenRequest)
                .unwrap_err()
                .to_string()
        };
        assert!(refused(vec![]).contains("empty list"));
        assert!(refused(vec![json!("helseid_authorization")]).contains("detail 0 is not"));
        assert!(refused(vec![helseid("x"), json!({"type": ""})]).contains("detail 1 has no"));
        assert!(refused(vec![json!({"type": 7})]).contains("detail 0 has no"));
        assert!(refused(vec![json!({"kind": "a"})]).contains("`type`"));
    }

    #[test]
    fn at_most_8_kib_are_sent() {
        // `[{"type":"t","x":"…"}]` is 21 bytes around the padding.
        let sized = |bytes: usize| vec![json!({"type": "t", "x": "a".repeat(bytes - 21)})];
        let at_limit = AuthorizationDetails::new(
            sized(MAX_AUTHORIZATION_DETAILS_BYTES),
            DetailsLocation::ClientAssertion,
        )
        .unwrap();
        assert_eq!(at_limit.json().len(), MAX_AUTHORIZATION_DETAILS_BYTES);
        let err = AuthorizationDetails::new(
            sized(MAX_AUTHORIZATION_DETAILS_BYTES + 1),
            DetailsLocation::ClientAssertion,
        )
        .unwrap_err();
        assert!(err.to_string().contains("8193 bytes"), "{err}");
    }

    #[test]
    fn granted_details_are_an_array_of_objects_or_nothing() {
        assert_eq!(granted(Some(json!([helseid("a")]))), vec![helseid("a")]);
        for nothing in [
            None,
            Some(Value::Null),
            Some(json!("[]")),
            Some(json!({"type": "a"})),
            Some(json!([{"type": "a"}, "b"])),
        ] {
            assert_eq!(granted(nothing.clone()), Vec::<Value>::new(), "{nothing:?}");
        }
    }
}
