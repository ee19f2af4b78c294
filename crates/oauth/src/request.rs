//! Building token requests (RFC 6749 §4.4 and §6, RFC 8707): pure, no I/O.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use jiff::Timestamp;

use super::TokenError;
use super::assertion::{CLIENT_ASSERTION_TYPE, ClientKey, new_jti};
use super::authorization_details::{
    AUTHORIZATION_DETAILS_PARAMETER, AuthorizationDetails, DetailsLocation,
};
use super::client::Tls;
use super::dpop::DpopKey;
use super::tls::ClientCertificate;
use super::token_exchange;
use crate::redact::SecretString;

/// Where and how to ask for tokens: the resolved token endpoint and the client's identity.
#[derive(Clone, Debug)]
pub struct Endpoint {
    /// The token endpoint URL.
    pub token_endpoint: url::Url,
    /// The OAuth client ID.
    pub client_id: String,
    /// How the client authenticates.
    pub credentials: ClientCredentials,
    /// PEM CA bundle for TLS; `None` uses the system roots.
    pub ca_bundle: Option<String>,
    /// The client certificate presented on every connection (RFC 8705), if any.
    pub client_certificate: Option<Arc<ClientCertificate>>,
    /// Timeout of one request.
    pub timeout: Duration,
}

impl Endpoint {
    /// The TLS settings of connections to this endpoint.
    pub fn tls(&self) -> Tls<'_> {
        Tls {
            ca_bundle: self.ca_bundle.as_deref(),
            client_certificate: self.client_certificate.as_deref(),
        }
    }
}

/// Client authentication material (RFC 6749 §2.3).
#[derive(Clone, Debug)]
pub enum ClientCredentials {
    /// `client_secret_basic`: HTTP Basic with form-encoded ID and secret.
    Basic(SecretString),
    /// `client_secret_post`: `client_id` and `client_secret` in the body.
    Post(SecretString),
    /// No authentication, `client_id` in the body.
    None,
    /// `tls_client_auth` or `self_signed_tls_client_auth` (RFC 8705 §2): the client
    /// certificate on the connection authenticates; `client_id` in the body.
    TlsClientCertificate,
    /// A client assertion made elsewhere (RFC 7523 §2.2), such as a Kubernetes
    /// ServiceAccount token that the server trusts through workload identity federation
    /// (Entra ID, Keycloak): `client_id`, `client_assertion_type` jwt-bearer and this
    /// `client_assertion`, the same on every attempt.
    FederatedAssertion(SecretString),
    /// `private_key_jwt` (RFC 7523 §2.2): `client_id`, `client_assertion_type` and a new
    /// signed `client_assertion` in the body of every request.
    PrivateKeyJwt {
        /// The signing key, its algorithm and `kid`.
        key: Arc<ClientKey>,
        /// The assertion's `aud`: the issuer identifier or the token endpoint URL.
        audience: String,
    },
}

/// How the request names the one API the token is for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AudienceParam {
    /// `resource=` (RFC 8707).
    Resource(String),
    /// `audience=` (Auth0, Hydra).
    Audience(String),
    /// Nothing: the scopes select the API.
    ScopeOnly,
}

/// The grant to use.
#[derive(Clone, Debug)]
pub enum Grant {
    /// `grant_type=client_credentials`.
    ClientCredentials,
    /// `grant_type=refresh_token` with this refresh token.
    RefreshToken(SecretString),
    /// `grant_type=authorization_code` (RFC 6749 §4.1.3) with the PKCE verifier (RFC 7636
    /// §4.5): the `login` command's redemption of a person's login.
    AuthorizationCode {
        /// The code from the redirect.
        code: SecretString,
        /// The redirect URI the code was issued for.
        redirect_uri: String,
        /// The PKCE `code_verifier`.
        code_verifier: SecretString,
    },
    /// `grant_type=urn:ietf:params:oauth:grant-type:token-exchange` (RFC 8693 §2.1): a
    /// subject token (a Kubernetes ServiceAccount token) exchanged for an access token.
    /// The answer's `issued_token_type` is checked against `requested_token_type`.
    TokenExchange {
        /// The `subject_token`.
        subject_token: SecretString,
        /// Its `subject_token_type`, e.g. [`token_exchange::TOKEN_TYPE_JWT`].
        subject_token_type: String,
        /// The `requested_token_type`, if one is asked for.
        requested_token_type: Option<String>,
    },
}

/// One token request.
#[derive(Clone, Debug)]
pub struct TokenRequest {
    /// The grant.
    pub grant: Grant,
    /// Scopes to ask for; sent space-separated, omitted when empty.
    pub scopes: Vec<String>,
    /// The audience parameter.
    pub audience: AudienceParam,
    /// A DPoP key (RFC 9449): when set, every attempt of this request carries a new `DPoP`
    /// proof of it, and the token must come back bound to it.
    pub dpop: Option<Arc<DpopKey>>,
    /// RFC 9396 authorization details, sent where they say: the `authorization_details`
    /// form field, or the `assertion_details` claim of the client assertion.
    pub authorization_details: Option<AuthorizationDetails>,
}

/// The wire form of a token request: form fields and an optional `Authorization` header.
/// `Debug` shows field names only.
#[derive(Clone, PartialEq, Eq)]
pub struct PreparedRequest {
    /// `application/x-www-form-urlencoded` fields, in order.
    pub form: Vec<(&'static str, String)>,
    /// The `Authorization` header value, for client_secret_basic.
    pub authorization: Option<String>,
}

impl fmt::Debug for PreparedRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.form.iter().map(|(name, _)| *name).collect();
        f.debug_struct("PreparedRequest")
            .field("form_fields", &names)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "[redacted]"),
            )
            .finish()
    }
}

/// Builds the form body and headers of a token request, with a new client assertion (fresh
/// `jti`, `iat` now) when the client authenticates with `private_key_jwt`.
pub fn prepare(endpoint: &Endpoint, request: &TokenRequest) -> Result<PreparedRequest, TokenError> {
    // Only a private_key_jwt assertion carries the jti: the other methods skip making one.
    let jti = match endpoint.credentials {
        ClientCredentials::PrivateKeyJwt { .. } => new_jti(),
        _ => String::new(),
    };
    prepare_at(endpoint, request, Timestamp::now(), &jti)
}

/// [`prepare`] with the assertion's time and `jti` given (only `private_key_jwt` uses them).
pub fn prepare_at(
    endpoint: &Endpoint,
    request: &TokenRequest,
    now: Timestamp,
    jti: &str,
) -> Result<PreparedRequest, TokenError> {
    let mut form: Vec<(&'static str, String)> = Vec::with_capacity(6);
    match &request.grant {
        Grant::ClientCredentials => form.push(("grant_type", "client_credentials".into())),
        Grant::RefreshToken(token) => {
            form.push(("grant_type", "refresh_token".into()));
            form.push(("refresh_token", token.expose().to_string()));
        }
        Grant::AuthorizationCode {
            code,
            redirect_uri,
            code_verifier,
        } => {
            form.push(("grant_type", "authorization_code".into()));
            form.push(("code", code.expose().to_string()));
            form.push(("redirect_uri", redirect_uri.clone()));
            form.push(("code_verifier", code_verifier.expose().to_string()));
        }
        Grant::TokenExchange {
            subject_token,
            subject_token_type,
            requested_token_type,
        } => {
            form.push(("grant_type", token_exchange::GRANT_TYPE.into()));
            form.push(("subject_token", subject_token.expose().to_string()));
            form.push(("subject_token_type", subject_token_type.clone()));
            if let Some(requested) = requested_token_type {
                form.push(("requested_token_type", requested.clone()));
            }
        }
    }
    if !request.scopes.is_empty() {
        form.push(("scope", request.scopes.join(" ")));
    }
    match &request.audience {
        AudienceParam::Resource(resource) => form.push(("resource", resource.clone())),
        AudienceParam::Audience(audience) => form.push(("audience", audience.clone())),
        AudienceParam::ScopeOnly => {}
    }
    let details = request.authorization_details.as_ref();
    if let Some(details) = details.filter(|d| d.location() == DetailsLocation::TokenRequest) {
        form.push((AUTHORIZATION_DETAILS_PARAMETER, details.json().to_string()));
    }
    let assertion_details = details
        .filter(|d| d.location() == DetailsLocation::ClientAssertion)
        .map(AuthorizationDetails::details);
    if assertion_details.is_some()
        && !matches!(
            endpoint.credentials,
            ClientCredentials::PrivateKeyJwt { .. }
        )
    {
        return Err(TokenError::Config(
            "authorization details for the client assertion need private_key_jwt client \
             authentication"
                .into(),
        ));
    }
    let authorization = authenticate_with(endpoint, &mut form, now, jti, assertion_details)?;
    Ok(PreparedRequest {
        form,
        authorization,
    })
}

/// Adds the client's authentication to a request to the server (the token endpoint, or the
/// PAR endpoint): form fields, or the `Authorization` header value it returns.
pub fn authenticate(
    endpoint: &Endpoint,
    form: &mut Vec<(&'static str, String)>,
    now: Timestamp,
    jti: &str,
) -> Result<Option<String>, TokenError> {
    authenticate_with(endpoint, form, now, jti, None)
}

/// [`authenticate`], with RFC 9396 details for a private_key_jwt assertion's
/// `assertion_details` claim.
fn authenticate_with(
    endpoint: &Endpoint,
    form: &mut Vec<(&'static str, String)>,
    now: Timestamp,
    jti: &str,
    assertion_details: Option<&[serde_json::Value]>,
) -> Result<Option<String>, TokenError> {
    Ok(match &endpoint.credentials {
        ClientCredentials::Basic(secret) => Some(basic_authorization(&endpoint.client_id, secret)),
        ClientCredentials::Post(secret) => {
            form.push(("client_id", endpoint.client_id.clone()));
            form.push(("client_secret", secret.expose().to_string()));
            None
        }
        ClientCredentials::None | ClientCredentials::TlsClientCertificate => {
            form.push(("client_id", endpoint.client_id.clone()));
            None
        }
        ClientCredentials::FederatedAssertion(assertion) => {
            form.push(("client_id", endpoint.client_id.clone()));
            form.push(("client_assertion_type", CLIENT_ASSERTION_TYPE.into()));
            form.push(("client_assertion", assertion.expose().to_string()));
            None
        }
        ClientCredentials::PrivateKeyJwt { key, audience } => {
            let assertion = match assertion_details {
                Some(details) => key.sign_assertion_with_details(
                    &endpoint.client_id,
                    audience,
                    now,
                    jti,
                    details,
                ),
                None => key.sign_assertion(&endpoint.client_id, audience, now, jti),
            }
            .map_err(|e| TokenError::Config(e.to_string()))?;
            form.push(("client_id", endpoint.client_id.clone()));
            form.push(("client_assertion_type", CLIENT_ASSERTION_TYPE.into()));
            form.push(("client_assertion", assertion.expose().to_string()));
            None
        }
    })
}

/// `Basic base64(urlencode(id) ":" urlencode(secret))`, as RFC 6749 §2.3.1 requires; many
/// clients skip the form-encoding and break on secrets with `:`, `+` or `%`.
pub fn basic_authorization(client_id: &str, secret: &SecretString) -> String {
    let pair = format!(
        "{}:{}",
        form_encode(client_id),
        form_encode(secret.expose())
    );
    format!("Basic {}", STANDARD.encode(pair))
}

fn form_encode(value: &str) -> String {
    url::form_urlencoded::byte_serialize(value.as_bytes()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoint(credentials: ClientCredentials) -> Endpoint {
        Endpoint {
            token_endpoint: url::Url::parse("https://idp.example.com/connect/token").unwrap(),
            client_id: "shop-m2m".into(),
            credentials,
            ca_bundle: None,
            client_certificate: None,
            timeout: Duration::from_secs(10),
        }
    }

    fn request(audience: AudienceParam) -> TokenRequest {
        TokenRequest {
            grant: Grant::ClientCredentials,
            scopes: vec!["orders/read".into(), "orders/write".into()],
            audience,
            dpop: None,
            authorization_details: None,
        }
    }

    #[test]
    fn client_credentials_with_resource_and_basic_auth() {
        let prepared = prepare(
            &endpoint(ClientCredentials::Basic(SecretString::new("pw"))),
            &request(AudienceParam::Resource("https://orders.example.com".into())),
        )
        .unwrap();
        assert_eq!(
            prepared.form,
            vec![
                ("grant_type", "client_credentials".to_string()),
                ("scope", "orders/read orders/write".to_string()),
                ("resource", "https://orders.example.com".to_string()),
            ]
        );
        // base64("shop-m2m:pw")
        assert_eq!(
            prepared.authorization.as_deref(),
            Some("Basic c2hvcC1tMm06cHc=")
        );
    }

    #[test]
    fn token_exchange_with_a_federated_assertion() {
        let mut request = request(AudienceParam::Resource("https://orders.example.com".into()));
        request.grant = Grant::TokenExchange {
            subject_token: SecretString::new("subject.jwt"),
            subject_token_type: token_exchange::TOKEN_TYPE_JWT.into(),
            requested_token_type: Some(token_exchange::TOKEN_TYPE_ACCESS_TOKEN.into()),
        };
        let prepared = prepare(
            &endpoint(ClientCredentials::FederatedAssertion(SecretString::new(
                "sa.jwt",
            ))),
            &request,
        )
        .unwrap();
        assert_eq!(prepared.authorization, None);
        assert_eq!(
            prepared.form,
            vec![
                ("grant_type", token_exchange::GRANT_TYPE.to_string()),
                ("subject_token", "subject.jwt".to_string()),
                (
                    "subject_token_type",
                    token_exchange::TOKEN_TYPE_JWT.to_string()
                ),
                (
                    "requested_token_type",
                    token_exchange::TOKEN_TYPE_ACCESS_TOKEN.to_string()
                ),
                ("scope", "orders/read orders/write".to_string()),
                ("resource", "https://orders.example.com".to_string()),
                ("client_id", "shop-m2m".to_string()),
                ("client_assertion_type", CLIENT_ASSERTION_TYPE.to_string()),
                ("client_assertion", "sa.jwt".to_string()),
            ]
        );
        // The wire form's Debug names fields, never values.
        let debug = format!("{prepared:?}");
        assert!(
            !debug.contains("sa.jwt") && !debug.contains("subject.jwt"),
            "{debug}"
        );
    }

    #[test]
    fn client_secret_post_puts_credentials_in_body() {
        let prepared = prepare(
            &endpoint(ClientCredentials::Post(SecretString::new("pw"))),
            &request(AudienceParam::Audience("orders-api".into())),
        )
        .unwrap();
        assert!(prepared.authorization.is_none());
        assert!(
            prepared
                .form
                .contains(&("audience", "orders-api".to_string()))
        );
        assert!(
            prepared
                .form
                .contains(&("client_id", "shop-m2m".to_string()))
        );
        assert!(prepared.form.contains(&("client_secret", "pw".to_string())));
        assert!(!prepared.form.iter().any(|(k, _)| *k == "resource"));
    }

    #[test]
    fn scope_only_sends_no_audience_and_no_empty_scope() {
        let mut req = request(AudienceParam::ScopeOnly);
        req.scopes.clear();
        let prepared = prepare(&endpoint(ClientCredentials::None), &req).unwrap();
        assert_eq!(
            prepared.form,
            vec![
                ("grant_type", "client_credentials".to_string()),
                ("client_id", "shop-m2m".to_string())
            ]
        );
    }

    #[test]
    fn refresh_grant_carries_the_refresh_token() {
        let mut req = request(AudienceParam::Resource("urn:api".into()));
        req.grant = Grant::RefreshToken(SecretString::new("rt-1"));
        let prepared = prepare(&endpoint(ClientCredentials::None), &req).unwrap();
        assert_eq!(
            prepared.form[0],
            ("grant_type", "refresh_token".to_string())
        );
        assert_eq!(prepared.form[1], ("refresh_token", "rt-1".to_string()));
    }

    #[test]
    fn basic_credentials_are_form_encoded_first() {
        let header = basic_authorization(
            "m2m:special",
            &SecretString::new("s3cr3t/with+special&chars="),
        );
        let decoded = STANDARD
            .decode(header.trim_start_matches("Basic "))
            .unwrap();
        assert_eq!(
            String::from_utf8(decoded).unwrap(),
            "m2m%3Aspecial:s3cr3t%2Fwith%2Bspecial%26chars%3D"
        );
    }

    #[test]
    fn debug_hides_secrets() {
        let prepared = prepare(
            &endpoint(ClientCredentials::Post(SecretString::new("topsecret"))),
            &request(AudienceParam::ScopeOnly),
        )
        .unwrap();
        let printed = format!(
            "{prepared:?} {:?}",
            endpoint(ClientCredentials::Basic(SecretString::new("topsecret")))
        );
        assert!(!printed.contains("topsecret"), "{printed}");
        assert!(printed.contains("client_secret"));
    }

    fn private_key_jwt() -> (Endpoint, jsonwebtoken::DecodingKey) {
        let key = crate::assertion::test_keys::ec(crate::assertion::KeyKind::EcP256);
        let client_key = ClientKey::parse(&key.pkcs8_pem, None, Some("k1")).unwrap();
        let credentials = ClientCredentials::PrivateKeyJwt {
            key: Arc::new(client_key),
            audience: "https://idp.example.com".into(),
        };
        (endpoint(credentials), key.public)
    }

    fn assertion_claims(
        prepared: &PreparedRequest,
        public: &jsonwebtoken::DecodingKey,
    ) -> serde_json::Value {
        let assertion = &prepared
            .form
            .iter()
            .find(|(name, _)| *name == "client_assertion")
            .expect("client_assertion")
            .1;
        let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
        validation.validate_exp = false;
        validation.set_audience(&["https://idp.example.com"]);
        jsonwebtoken::decode::<serde_json::Value>(assertion, public, &validation)
            .unwrap()
            .claims
    }

    #[test]
    fn private_key_jwt_sends_a_signed_assertion_in_the_body() {
        let (endpoint, public) = private_key_jwt();
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let prepared = prepare_at(
            &endpoint,
            &request(AudienceParam::Resource("urn:api".into())),
            now,
            "jti-1",
        )
        .unwrap();
        assert!(prepared.authorization.is_none());
        let names: Vec<&str> = prepared.form.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names,
            [
                "grant_type",
                "scope",
                "resource",
                "client_id",
                "client_assertion_type",
                "client_assertion"
            ]
        );
        assert!(prepared.form.contains(&(
            "client_assertion_type",
            "urn:ietf:params:oauth:client-assertion-type:jwt-bearer".to_string()
        )));
        assert!(
            prepared
                .form
                .contains(&("client_id", "shop-m2m".to_string()))
        );
        let claims = assertion_claims(&prepared, &public);
        assert_eq!(claims["iss"], "shop-m2m");
        assert_eq!(claims["sub"], "shop-m2m");
        assert_eq!(claims["jti"], "jti-1");
        assert_eq!(claims["iat"], 1_700_000_000);
        assert_eq!(claims["exp"], 1_700_000_060);
        let printed = format!("{prepared:?}");
        assert!(!printed.contains(&prepared.form[5].1[..20]), "{printed}");
    }

    #[test]
    fn private_key_jwt_signs_a_new_assertion_for_every_request() {
        let (endpoint, public) = private_key_jwt();
        let req = request(AudienceParam::Resource("urn:api".into()));
        let first = prepare(&endpoint, &req).unwrap();
        let second = prepare(&endpoint, &req).unwrap();
        let (a, b) = (
            assertion_claims(&first, &public),
            assertion_claims(&second, &public),
        );
        assert_ne!(a["jti"], b["jti"]);
        let now = Timestamp::now().as_second();
        let iat = a["iat"].as_i64().unwrap();
        assert!((now - 5..=now).contains(&iat), "iat {iat}, now {now}");
        assert_eq!(a["exp"].as_i64().unwrap() - iat, 60);
    }

    fn helseid_details(location: DetailsLocation) -> AuthorizationDetails {
        AuthorizationDetails::new(
            vec![serde_json::json!({
                "type": "helseid_authorization",
                "practitioner_role": {"organization": {"identifier": {"value": "NO:ORGNR:1:2"}}}
            })],
            location,
        )
        .unwrap()
    }

    #[test]
    fn authorization_details_go_in_the_form_as_one_json_array() {
        let mut req = request(AudienceParam::Resource("urn:api".into()));
        req.authorization_details = Some(helseid_details(DetailsLocation::TokenRequest));
        let prepared = prepare(&endpoint(ClientCredentials::None), &req).unwrap();
        let names: Vec<&str> = prepared.form.iter().map(|(name, _)| *name).collect();
        assert_eq!(
            names,
            [
                "grant_type",
                "scope",
                "resource",
                "authorization_details",
                "client_id"
            ]
        );
        let sent: serde_json::Value = serde_json::from_str(&prepared.form[3].1).unwrap();
        assert_eq!(
            sent,
            serde_json::json!([{
                "type": "helseid_authorization",
                "practitioner_role": {"organization": {"identifier": {"value": "NO:ORGNR:1:2"}}}
            }])
        );
        // The refresh-token grant sends them the same way.
        req.grant = Grant::RefreshToken(SecretString::new("rt-1"));
        let prepared = prepare(&endpoint(ClientCredentials::None), &req).unwrap();
        assert!(prepared.form.iter().any(
            |(name, value)| *name == "authorization_details" && value.contains("NO:ORGNR:1:2")
        ));
    }

    #[test]
    fn authorization_details_for_the_assertion_go_in_its_claim_only() {
        let (endpoint, public) = private_key_jwt();
        let mut req = request(AudienceParam::Resource("urn:api".into()));
        req.authorization_details = Some(helseid_details(DetailsLocation::ClientAssertion));
        let now = Timestamp::from_second(1_700_000_000).unwrap();
        let prepared = prepare_at(&endpoint, &req, now, "jti-1").unwrap();
        assert!(
            !prepared
                .form
                .iter()
                .any(|(name, _)| *name == "authorization_details"),
            "not in the form"
        );
        let claims = assertion_claims(&prepared, &public);
        assert_eq!(
            claims["assertion_details"],
            serde_json::json!(helseid_details(DetailsLocation::ClientAssertion).details())
        );
        // Without details the assertion has no such claim.
        req.authorization_details = None;
        let claims = assertion_claims(&prepare_at(&endpoint, &req, now, "jti-2").unwrap(), &public);
        assert!(claims.get("assertion_details").is_none(), "{claims}");
    }

    #[test]
    fn authorization_details_for_the_assertion_need_private_key_jwt() {
        let mut req = request(AudienceParam::Resource("urn:api".into()));
        req.authorization_details = Some(helseid_details(DetailsLocation::ClientAssertion));
        let err = prepare(
            &endpoint(ClientCredentials::Basic(SecretString::new("pw"))),
            &req,
        )
        .unwrap_err();
        assert!(matches!(err, TokenError::Config(_)), "{err}");
        assert!(err.to_string().contains("private_key_jwt"), "{err}");
    }
}
