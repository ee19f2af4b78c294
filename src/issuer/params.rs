//! Pure mappings from an issuer's settings ([`crate::api::IssuerSpec`]) to token-client
//! parameters ([`crate::oauth`]), shared by the controller and the `token` debugging command
//! so both send the same request for the same issuer.

use std::time::Duration;

use url::Url;

use crate::api::{AssertionAudience, AudienceParameter, AuthorizationDetailsIn};
use crate::oauth::authorization_details::DetailsError;
use crate::oauth::{AudienceParam, AuthorizationDetails, DetailsLocation};

/// Timeout of one discovery or token request when the issuer sets no `requestTimeout`.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Lifetime assumed when a token response has neither `expires_in` nor a JWT `exp` and the
/// issuer sets no `defaultTokenLifetime`.
pub const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(300);

/// How a token request names the one API the token is for: `resource=<resource>`,
/// `audience=<expected audience>`, or nothing (the scopes select the API).
pub fn audience_param(
    parameter: AudienceParameter,
    resource: &str,
    expected_audience: &str,
) -> AudienceParam {
    match parameter {
        AudienceParameter::Resource => AudienceParam::Resource(resource.to_string()),
        AudienceParameter::Audience => AudienceParam::Audience(expected_audience.to_string()),
        AudienceParameter::ScopeOnly => AudienceParam::ScopeOnly,
    }
}

/// An AudienceToken's `authorizationDetails` for a token request, sent where the issuer's
/// `authorizationDetailsIn` says. The error says why the client would not send them.
pub fn authorization_details(
    location: AuthorizationDetailsIn,
    details: &[serde_json::Value],
) -> Result<AuthorizationDetails, DetailsError> {
    let location = match location {
        AuthorizationDetailsIn::TokenRequest => DetailsLocation::TokenRequest,
        AuthorizationDetailsIn::ClientAssertion => DetailsLocation::ClientAssertion,
    };
    AuthorizationDetails::new(details.to_vec(), location)
}

/// The `aud` of a PrivateKeyJWT client assertion: with `assertionAudience: Issuer` the issuer
/// identifier (as discovery declared it, else `issuerURL`, passed as `issuer`), with
/// `TokenEndpoint` the token endpoint URL. The error says what to change.
pub fn assertion_audience(
    choice: AssertionAudience,
    issuer: Option<&str>,
    token_endpoint: &Url,
) -> Result<String, &'static str> {
    match choice {
        AssertionAudience::TokenEndpoint => Ok(token_endpoint.to_string()),
        AssertionAudience::Issuer => issuer.map(str::to_string).ok_or(
            "assertionAudience Issuer needs the issuer identifier, but only tokenEndpoint is \
             set; set issuerURL, or set assertionAudience: TokenEndpoint",
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assertion_audience_is_the_issuer_or_the_token_endpoint() {
        let endpoint = Url::parse("https://idp.example.com/connect/token").unwrap();
        assert_eq!(
            assertion_audience(
                AssertionAudience::Issuer,
                Some("https://idp.example.com"),
                &endpoint
            ),
            Ok("https://idp.example.com".to_string())
        );
        assert_eq!(
            assertion_audience(AssertionAudience::TokenEndpoint, None, &endpoint),
            Ok("https://idp.example.com/connect/token".to_string())
        );
        assert!(assertion_audience(AssertionAudience::Issuer, None, &endpoint).is_err());
    }

    #[test]
    fn authorization_details_go_where_the_issuer_says() {
        let details = [serde_json::json!({"type": "helseid_authorization"})];
        let sent = authorization_details(AuthorizationDetailsIn::TokenRequest, &details).unwrap();
        assert_eq!(sent.location(), DetailsLocation::TokenRequest);
        assert_eq!(sent.details(), &details);
        let sent =
            authorization_details(AuthorizationDetailsIn::ClientAssertion, &details).unwrap();
        assert_eq!(sent.location(), DetailsLocation::ClientAssertion);
        let huge = [serde_json::json!({"type": "t", "x": "a".repeat(9000)})];
        let err = authorization_details(AuthorizationDetailsIn::TokenRequest, &huge).unwrap_err();
        assert!(err.to_string().contains("at most 8192"), "{err}");
    }

    #[test]
    fn each_parameter_style() {
        let (resource, audience) = ("https://orders.example.com", "orders-api");
        assert_eq!(
            audience_param(AudienceParameter::Resource, resource, audience),
            AudienceParam::Resource(resource.into())
        );
        assert_eq!(
            audience_param(AudienceParameter::Audience, resource, audience),
            AudienceParam::Audience(audience.into())
        );
        assert_eq!(
            audience_param(AudienceParameter::ScopeOnly, resource, audience),
            AudienceParam::ScopeOnly
        );
    }
}
