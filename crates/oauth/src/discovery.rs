//! Authorization server metadata: RFC 8414 first, then OpenID Connect discovery.

use serde::Deserialize;
use url::Url;

/// The parts of the server metadata the operator uses.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerMetadata {
    /// The `issuer` the document declares.
    pub issuer: String,
    /// The token endpoint.
    pub token_endpoint: Url,
    /// Where the server publishes its signing keys (JWKS), if it says.
    pub jwks_uri: Option<Url>,
    /// The token endpoint for clients that authenticate or bind tokens with a client
    /// certificate, from `mtls_endpoint_aliases` (RFC 8705 §5), if the server has one.
    pub mtls_token_endpoint: Option<Url>,
    /// The authorization endpoint (for a person's login), if the server has one.
    pub authorization_endpoint: Option<Url>,
    /// The pushed authorization request endpoint (RFC 9126 §5), if any.
    pub pushed_authorization_request_endpoint: Option<Url>,
    /// Whether the server accepts authorization requests only through PAR.
    pub require_pushed_authorization_requests: bool,
    /// Whether the server says it is an OpenID provider (`openid` among `scopes_supported`,
    /// or an `id_token_signing_alg_values_supported`).
    pub openid_provider: bool,
    /// Whether authorization answers carry `iss` (RFC 9207).
    pub authorization_response_iss_parameter_supported: bool,
}

impl ServerMetadata {
    /// The token endpoint to use: the mTLS alias when the client presents a certificate and
    /// the server names one, else `token_endpoint`.
    pub fn token_endpoint_for(&self, presents_certificate: bool) -> &Url {
        match &self.mtls_token_endpoint {
            Some(alias) if presents_certificate => alias,
            _ => &self.token_endpoint,
        }
    }
}

#[derive(Deserialize)]
struct RawMetadata {
    issuer: Option<String>,
    token_endpoint: Option<String>,
    jwks_uri: Option<String>,
    #[serde(default)]
    mtls_endpoint_aliases: Option<MtlsAliases>,
    authorization_endpoint: Option<String>,
    pushed_authorization_request_endpoint: Option<String>,
    #[serde(default)]
    require_pushed_authorization_requests: bool,
    #[serde(default)]
    scopes_supported: Vec<serde_json::Value>,
    id_token_signing_alg_values_supported: Option<serde_json::Value>,
    #[serde(default)]
    authorization_response_iss_parameter_supported: bool,
}

#[derive(Deserialize)]
struct MtlsAliases {
    token_endpoint: Option<String>,
}

/// The metadata URLs to try, in order: RFC 8414 §3 inserts
/// `/.well-known/oauth-authorization-server` between the host and the issuer's path; OpenID
/// Connect Discovery appends `/.well-known/openid-configuration` to the issuer.
pub fn metadata_urls(issuer: &Url) -> Vec<Url> {
    let path = issuer.path().trim_end_matches('/');
    let mut rfc8414 = issuer.clone();
    rfc8414.set_path(&format!("/.well-known/oauth-authorization-server{path}"));
    let mut oidc = issuer.clone();
    oidc.set_path(&format!("{path}/.well-known/openid-configuration"));
    vec![rfc8414, oidc]
}

/// Reads a metadata document and checks that it belongs to `expected_issuer` (RFC 8414 §3.3;
/// a trailing `/` difference is tolerated because users copy issuers both ways).
pub fn parse_metadata(body: &[u8], expected_issuer: &str) -> Result<ServerMetadata, String> {
    let raw: RawMetadata =
        serde_json::from_slice(body).map_err(|e| format!("not a JSON metadata document ({e})"))?;
    let issuer = raw.issuer.ok_or("the document has no issuer")?;
    if issuer.trim_end_matches('/') != expected_issuer.trim_end_matches('/') {
        return Err(format!(
            "the document is for issuer {issuer:?}, not {expected_issuer:?}"
        ));
    }
    let token_endpoint = raw
        .token_endpoint
        .ok_or("the document has no token_endpoint")?;
    let token_endpoint = Url::parse(&token_endpoint)
        .map_err(|e| format!("token_endpoint {token_endpoint:?} is not a URL ({e})"))?;
    // Only signature checks use it: an unusable jwks_uri must not break token requests.
    let jwks_uri = raw.jwks_uri.and_then(|uri| Url::parse(&uri).ok());
    // Like jwks_uri: an unusable alias must not break clients that do not use it.
    let mtls_token_endpoint = raw
        .mtls_endpoint_aliases
        .and_then(|a| a.token_endpoint)
        .and_then(|alias| Url::parse(&alias).ok());
    let url = |value: Option<String>| value.and_then(|v| Url::parse(&v).ok());
    let openid_provider = raw
        .scopes_supported
        .iter()
        .any(|s| s.as_str() == Some("openid"))
        || raw.id_token_signing_alg_values_supported.is_some();
    Ok(ServerMetadata {
        issuer,
        token_endpoint,
        jwks_uri,
        mtls_token_endpoint,
        authorization_endpoint: url(raw.authorization_endpoint),
        pushed_authorization_request_endpoint: url(raw.pushed_authorization_request_endpoint),
        require_pushed_authorization_requests: raw.require_pushed_authorization_requests,
        openid_provider,
        authorization_response_iss_parameter_supported: raw
            .authorization_response_iss_parameter_supported,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn urls(issuer: &str) -> Vec<String> {
        metadata_urls(&Url::parse(issuer).unwrap())
            .into_iter()
            .map(String::from)
            .collect()
    }

    #[test]
    fn metadata_urls_follow_rfc8414_and_oidc() {
        assert_eq!(
            urls("https://idp.example.com"),
            vec![
                "https://idp.example.com/.well-known/oauth-authorization-server",
                "https://idp.example.com/.well-known/openid-configuration"
            ]
        );
        assert_eq!(
            urls("https://login.example.com/tenant1/v2.0/"),
            vec![
                "https://login.example.com/.well-known/oauth-authorization-server/tenant1/v2.0",
                "https://login.example.com/tenant1/v2.0/.well-known/openid-configuration"
            ]
        );
    }

    #[test]
    fn metadata_must_name_the_same_issuer() {
        let body = br#"{"issuer":"https://idp.example.com/","token_endpoint":"https://idp.example.com/connect/token"}"#;
        let meta = parse_metadata(body, "https://idp.example.com").unwrap();
        assert_eq!(
            meta.token_endpoint.as_str(),
            "https://idp.example.com/connect/token"
        );
        assert_eq!(meta.jwks_uri, None);
        assert!(
            parse_metadata(body, "https://evil.example.com")
                .unwrap_err()
                .contains("not")
        );
        assert!(
            parse_metadata(
                br#"{"issuer":"https://idp.example.com"}"#,
                "https://idp.example.com"
            )
            .is_err()
        );
        assert!(parse_metadata(b"<html>", "https://idp.example.com").is_err());
    }

    #[test]
    fn metadata_carries_the_jwks_uri() {
        let body = br#"{"issuer":"https://idp.example.com","token_endpoint":"https://idp.example.com/token","jwks_uri":"https://idp.example.com/jwks"}"#;
        let meta = parse_metadata(body, "https://idp.example.com").unwrap();
        assert_eq!(
            meta.jwks_uri.map(String::from).as_deref(),
            Some("https://idp.example.com/jwks")
        );
        let bad = br#"{"issuer":"https://idp.example.com","token_endpoint":"https://idp.example.com/token","jwks_uri":"/jwks"}"#;
        let meta = parse_metadata(bad, "https://idp.example.com").unwrap();
        assert_eq!(meta.jwks_uri, None, "a relative jwks_uri is ignored");
    }

    #[test]
    fn the_mtls_alias_is_used_only_with_a_client_certificate() {
        let body = br#"{"issuer":"https://idp.example.com","token_endpoint":"https://idp.example.com/token","mtls_endpoint_aliases":{"token_endpoint":"https://mtls.idp.example.com/token"}}"#;
        let meta = parse_metadata(body, "https://idp.example.com").unwrap();
        assert_eq!(
            meta.token_endpoint_for(true).as_str(),
            "https://mtls.idp.example.com/token"
        );
        assert_eq!(
            meta.token_endpoint_for(false).as_str(),
            "https://idp.example.com/token"
        );
        let plain = br#"{"issuer":"https://idp.example.com","token_endpoint":"https://idp.example.com/token","mtls_endpoint_aliases":{}}"#;
        let meta = parse_metadata(plain, "https://idp.example.com").unwrap();
        assert_eq!(
            meta.token_endpoint_for(true).as_str(),
            "https://idp.example.com/token"
        );
        let bad = br#"{"issuer":"https://idp.example.com","token_endpoint":"https://idp.example.com/token","mtls_endpoint_aliases":{"token_endpoint":"/token"}}"#;
        let meta = parse_metadata(bad, "https://idp.example.com").unwrap();
        assert_eq!(
            meta.mtls_token_endpoint, None,
            "a relative alias is ignored"
        );
    }

    #[test]
    fn metadata_for_a_login() {
        let body = br#"{"issuer":"https://idp.example.com","token_endpoint":"https://idp.example.com/token","authorization_endpoint":"https://idp.example.com/auth","pushed_authorization_request_endpoint":"https://idp.example.com/par","require_pushed_authorization_requests":true,"scopes_supported":["openid","offline_access"],"authorization_response_iss_parameter_supported":true}"#;
        let meta = parse_metadata(body, "https://idp.example.com").unwrap();
        assert_eq!(
            meta.authorization_endpoint.map(String::from).as_deref(),
            Some("https://idp.example.com/auth")
        );
        assert!(meta.pushed_authorization_request_endpoint.is_some());
        assert!(meta.require_pushed_authorization_requests);
        assert!(meta.openid_provider);
        assert!(meta.authorization_response_iss_parameter_supported);
        let plain = br#"{"issuer":"https://idp.example.com","token_endpoint":"https://idp.example.com/token","scopes_supported":["offline_access"]}"#;
        let meta = parse_metadata(plain, "https://idp.example.com").unwrap();
        assert!(!meta.openid_provider);
        assert_eq!(meta.authorization_endpoint, None);
        assert!(!meta.require_pushed_authorization_requests);
    }
}
