//! The HTTP side of the token client: discovery and token requests over one keep-alive
//! connection pool (plus one per custom CA bundle and client certificate).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use jiff::Timestamp;
use url::Url;

use super::assertion::new_jti;
use super::authorize::{PushedRequest, parse_pushed_request};
use super::discovery::{ServerMetadata, metadata_urls, parse_metadata};
use super::dpop::htu;
use super::jwks::{JwkSet, parse_jwks};
use super::request::{Endpoint, Grant, TokenRequest, authenticate, prepare};
use super::response::parse_token_response;
use super::tls::ClientCertificate;
use super::token_exchange;
use super::{TokenError, TokenResponse};
use crate::redact::SecretString;

const USER_AGENT: &str = concat!("audience-token-operator/", env!("CARGO_PKG_VERSION"));
/// Largest response body read; token and metadata documents are a few KiB.
const MAX_BODY_BYTES: usize = 256 * 1024;

/// How to make TLS connections to one server: whom to trust, and which client certificate
/// to present when the server asks for one (RFC 8705).
#[derive(Clone, Copy, Debug, Default)]
pub struct Tls<'a> {
    /// PEM CA bundle; `None` trusts the system roots.
    pub ca_bundle: Option<&'a str>,
    /// The client certificate, if any.
    pub client_certificate: Option<&'a ClientCertificate>,
}

/// A client certificate's connection pool not used for this long is dropped when another
/// one is built: certificates rotate, and the old pools must not pile up.
const IDLE_IDENTITY_POOL: Duration = Duration::from_secs(30 * 60);

/// Which pool a connection comes from: the CA bundle text and the client certificate's
/// thumbprint (the key is the certificate's).
type PoolKey = (String, Option<String>);

/// Makes discovery and token requests. Cheap to share: clone the `Arc` it lives in.
pub struct TokenClient {
    system_roots: reqwest::Client,
    /// Clients for issuers with their own `caBundle` or a client certificate, with when
    /// each was last used.
    custom: Mutex<HashMap<PoolKey, (reqwest::Client, Instant)>>,
    /// The newest DPoP nonce (RFC 9449 §8) each token endpoint gave, keyed by its `htu`.
    dpop_nonces: Mutex<HashMap<String, String>>,
}

impl TokenClient {
    /// A client trusting the system roots.
    pub fn new() -> Result<Self, TokenError> {
        Ok(Self {
            system_roots: build_http(Tls::default())?,
            custom: Mutex::new(HashMap::new()),
            dpop_nonces: Mutex::new(HashMap::new()),
        })
    }

    fn http(&self, tls: Tls<'_>) -> Result<reqwest::Client, TokenError> {
        let tls = Tls {
            ca_bundle: tls.ca_bundle.filter(|b| !b.trim().is_empty()),
            ..tls
        };
        if tls.ca_bundle.is_none() && tls.client_certificate.is_none() {
            return Ok(self.system_roots.clone());
        }
        let key: PoolKey = (
            tls.ca_bundle.unwrap_or_default().to_string(),
            tls.client_certificate.map(|c| c.thumbprint().to_string()),
        );
        let mut clients = self
            .custom
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let now = Instant::now();
        if let Some((client, used)) = clients.get_mut(&key) {
            *used = now;
            return Ok(client.clone());
        }
        let client = build_http(tls)?;
        clients.retain(|(_, certificate), (_, used)| {
            certificate.is_none() || now.duration_since(*used) < IDLE_IDENTITY_POOL
        });
        clients.insert(key, (client.clone(), now));
        Ok(client)
    }

    /// Fetches the server metadata for `issuer`: RFC 8414 first, then OpenID discovery.
    pub async fn discover(
        &self,
        issuer: &Url,
        tls: Tls<'_>,
        timeout: Duration,
        allow_insecure_http: bool,
    ) -> Result<ServerMetadata, TokenError> {
        check_transport_security(issuer, allow_insecure_http)?;
        let http = self.http(tls)?;
        let mut failures = Vec::new();
        for url in metadata_urls(issuer) {
            match fetch_metadata(&http, &url, issuer.as_str(), timeout).await {
                Ok(metadata) => {
                    check_transport_security(&metadata.token_endpoint, allow_insecure_http)?;
                    if let Some(alias) = &metadata.mtls_token_endpoint {
                        check_transport_security(alias, allow_insecure_http)?;
                    }
                    return Ok(metadata);
                }
                Err(reason) => failures.push(format!("{url}: {reason}")),
            }
        }
        Err(TokenError::Discovery {
            url: issuer.to_string(),
            reason: failures.join("; "),
        })
    }

    /// Fetches and parses the server's signing keys (JWKS). Keys decide which tokens are
    /// trusted, so the same transport rule as for credentials applies.
    pub async fn fetch_jwks(
        &self,
        url: &Url,
        tls: Tls<'_>,
        timeout: Duration,
        allow_insecure_http: bool,
    ) -> Result<JwkSet, TokenError> {
        check_transport_security(url, allow_insecure_http)?;
        let http = self.http(tls)?;
        let failed = |reason: String| {
            TokenError::SignatureInvalid(format!("cannot fetch the JWKS from {url}: {reason}"))
        };
        let failed_to_send = |e: reqwest::Error| failed(super::error_chain(&e));
        let response = http
            .get(url.clone())
            .timeout(timeout)
            .header(
                reqwest::header::ACCEPT,
                "application/json, application/jwk-set+json",
            )
            .send()
            .await
            .map_err(failed_to_send)?;
        let status = response.status();
        if !status.is_success() {
            return Err(failed(format!("HTTP {}", status.as_u16())));
        }
        let body = read_body(response).await.map_err(failed_to_send)?;
        parse_jwks(&body).map_err(failed)
    }

    /// Sends one token request and parses the answer.
    ///
    /// With a DPoP key on the request, each attempt carries a new `DPoP` proof (`htm`
    /// POST, `htu` the token endpoint) with the newest nonce this endpoint gave, if any. An
    /// answer `use_dpop_nonce` (400 or 401) with a `DPoP-Nonce` header is retried once,
    /// with that nonce, a new proof and a new client assertion; a second refusal is
    /// returned as it is. A `DPoP-Nonce` on any answer replaces the stored nonce.
    pub async fn request(
        &self,
        endpoint: &Endpoint,
        request: &TokenRequest,
    ) -> Result<TokenResponse, TokenError> {
        Ok(self.request_with_id_token(endpoint, request).await?.0)
    }

    /// [`TokenClient::request`], also returning the OpenID Connect `id_token` of the answer,
    /// if any (the `login` command reads the person's `sub` from it).
    pub async fn request_with_id_token(
        &self,
        endpoint: &Endpoint,
        request: &TokenRequest,
    ) -> Result<(TokenResponse, Option<SecretString>), TokenError> {
        let http = self.http(endpoint.tls())?;
        let htu = match &request.dpop {
            Some(_) => Some(
                htu(endpoint.token_endpoint.as_str())
                    .map_err(|e| TokenError::Config(e.to_string()))?,
            ),
            None => None,
        };
        let mut retried = false;
        loop {
            let answer = self
                .send_token_request(&http, endpoint, request, htu.as_deref())
                .await?;
            let nonce_challenge = answer.nonce_challenge();
            if let (Some(htu), Some(nonce)) = (&htu, answer.dpop_nonce) {
                self.nonces().insert(htu.clone(), nonce);
            }
            match answer.result {
                // RFC 9449 §8: the server wants (another) nonce, which it just sent.
                Err(_) if nonce_challenge && !retried => retried = true,
                result => {
                    let response = result?;
                    if let Grant::TokenExchange {
                        requested_token_type,
                        ..
                    } = &request.grant
                    {
                        token_exchange::check_issued_token_type(
                            response.issued_token_type.as_deref(),
                            requested_token_type.as_deref(),
                        )?;
                    }
                    return Ok((response, answer.id_token));
                }
            }
        }
    }

    /// One POST to the token endpoint: a newly prepared request (new client assertion) and,
    /// with `htu`, a new DPoP proof with the stored nonce.
    async fn send_token_request(
        &self,
        http: &reqwest::Client,
        endpoint: &Endpoint,
        request: &TokenRequest,
        htu: Option<&str>,
    ) -> Result<TokenAnswer, TokenError> {
        let prepared = prepare(endpoint, request)?;
        let url = endpoint.token_endpoint.clone();
        let mut builder = http
            .post(url.clone())
            .timeout(endpoint.timeout)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&prepared.form);
        if let Some(authorization) = &prepared.authorization {
            builder = builder.header(reqwest::header::AUTHORIZATION, authorization);
        }
        if let (Some(key), Some(htu)) = (&request.dpop, htu) {
            let nonce = self.nonces().get(htu).cloned();
            let proof = key
                .proof("POST", htu, nonce.as_deref(), None)
                .map_err(|e| TokenError::Config(e.to_string()))?;
            builder = builder.header(DPOP, proof);
        }
        let transport = |source| TokenError::Transport {
            url: url.to_string(),
            source,
        };
        let response = builder.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        let header = |name| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let retry_after = header(reqwest::header::RETRY_AFTER.as_str());
        let dpop_nonce = header(DPOP_NONCE).filter(|n| !n.is_empty());
        let www_authenticate = header(reqwest::header::WWW_AUTHENTICATE.as_str());
        let body = read_body(response).await.map_err(transport)?;
        #[derive(serde::Deserialize)]
        struct IdToken {
            id_token: Option<String>,
        }
        let id_token = serde_json::from_slice::<IdToken>(&body)
            .ok()
            .and_then(|t| t.id_token)
            .map(SecretString::new);
        Ok(TokenAnswer {
            status,
            dpop_nonce,
            www_authenticate,
            id_token,
            result: parse_token_response(status, retry_after.as_deref(), &body, Timestamp::now()),
        })
    }

    /// Pushes an authorization request (RFC 9126 §2.1): its parameters and the client's
    /// authentication, POSTed to the PAR endpoint. Errors are the server's (RFC 6749 §5.2
    /// form, as at the token endpoint).
    pub async fn push_authorization_request(
        &self,
        par_endpoint: &Url,
        endpoint: &Endpoint,
        params: &[(&'static str, String)],
    ) -> Result<PushedRequest, TokenError> {
        let http = self.http(endpoint.tls())?;
        // The client's authentication adds `client_id` where its method needs it; HTTP
        // Basic does not, and then the body names the client itself.
        let mut form: Vec<(&'static str, String)> = params
            .iter()
            .filter(|(name, _)| *name != "client_id")
            .cloned()
            .collect();
        let authorization = authenticate(endpoint, &mut form, Timestamp::now(), &new_jti())?;
        if !form.iter().any(|(name, _)| *name == "client_id") {
            form.push(("client_id", endpoint.client_id.clone()));
        }
        let mut builder = http
            .post(par_endpoint.clone())
            .timeout(endpoint.timeout)
            .header(reqwest::header::ACCEPT, "application/json")
            .form(&form);
        if let Some(authorization) = &authorization {
            builder = builder.header(reqwest::header::AUTHORIZATION, authorization);
        }
        let transport = |source| TokenError::Transport {
            url: par_endpoint.to_string(),
            source,
        };
        let response = builder.send().await.map_err(transport)?;
        let status = response.status().as_u16();
        let body = read_body(response).await.map_err(transport)?;
        if !(200..300).contains(&status) {
            return Err(parse_token_response(status, None, &body, Timestamp::now())
                .err()
                .unwrap_or_else(|| {
                    TokenError::InvalidResponse(format!("the PAR endpoint answered {status}"))
                }));
        }
        parse_pushed_request(&body)
    }

    fn nonces(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.dpop_nonces
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The DPoP nonce stored for a token endpoint, if any (for tests and diagnostics).
    pub fn dpop_nonce(&self, token_endpoint: &Url) -> Option<String> {
        let htu = htu(token_endpoint.as_str()).ok()?;
        self.nonces().get(&htu).cloned()
    }
}

/// The `DPoP` request header (RFC 9449 §4.1).
const DPOP: &str = "dpop";
/// The `DPoP-Nonce` response header (RFC 9449 §8).
const DPOP_NONCE: &str = "dpop-nonce";

/// One token endpoint answer, with what the DPoP nonce handling needs besides the result.
struct TokenAnswer {
    status: u16,
    dpop_nonce: Option<String>,
    www_authenticate: Option<String>,
    id_token: Option<SecretString>,
    result: Result<TokenResponse, TokenError>,
}

impl TokenAnswer {
    /// Whether the server asks for a DPoP nonce it sent along: `use_dpop_nonce` in the body
    /// or the `WWW-Authenticate` challenge of a 400 or 401 with a `DPoP-Nonce` header.
    fn nonce_challenge(&self) -> bool {
        let asked = matches!(&self.result, Err(e) if e.oauth_error() == Some("use_dpop_nonce"))
            || self
                .www_authenticate
                .as_deref()
                .is_some_and(|w| w.contains("use_dpop_nonce"));
        matches!(self.status, 400 | 401) && asked && self.dpop_nonce.is_some()
    }
}

async fn fetch_metadata(
    http: &reqwest::Client,
    url: &Url,
    issuer: &str,
    timeout: Duration,
) -> Result<ServerMetadata, String> {
    let response = http
        .get(url.clone())
        .timeout(timeout)
        .header(reqwest::header::ACCEPT, "application/json")
        .send()
        .await
        .map_err(|e| super::error_chain(&e))?;
    let status = response.status();
    if !status.is_success() {
        return Err(format!("HTTP {}", status.as_u16()));
    }
    let body = read_body(response)
        .await
        .map_err(|e| super::error_chain(&e))?;
    parse_metadata(&body, issuer)
}

async fn read_body(mut response: reqwest::Response) -> Result<Vec<u8>, reqwest::Error> {
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        let room = MAX_BODY_BYTES.saturating_sub(body.len());
        body.extend_from_slice(&chunk[..chunk.len().min(room)]);
        if room <= chunk.len() {
            break;
        }
    }
    Ok(body)
}

fn build_http(tls: Tls<'_>) -> Result<reqwest::Client, TokenError> {
    let mut builder = reqwest::Client::builder()
        .user_agent(USER_AGENT)
        // A token endpoint that redirects would make us re-send credentials elsewhere.
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(Duration::from_secs(10))
        .pool_idle_timeout(Duration::from_secs(90));
    if let Some(certificate) = tls.client_certificate {
        builder = builder.identity(certificate.identity());
    }
    if let Some(bundle) = tls.ca_bundle {
        let certs = reqwest::Certificate::from_pem_bundle(bundle.as_bytes())
            .map_err(|e| TokenError::Config(format!("caBundle is not valid PEM: {e}")))?;
        if certs.is_empty() {
            return Err(TokenError::Config("caBundle holds no certificate".into()));
        }
        builder = builder.tls_certs_only(certs);
    }
    builder
        .build()
        .map_err(|e| TokenError::Config(format!("cannot build the HTTP client: {e}")))
}

/// Credentials only travel over TLS, except to loopback addresses (local development and
/// tests) or when the issuer explicitly sets `allowInsecureHTTP`.
pub fn check_transport_security(url: &Url, allow_insecure_http: bool) -> Result<(), TokenError> {
    match url.scheme() {
        "https" => Ok(()),
        "http" if allow_insecure_http || is_loopback(url) => Ok(()),
        "http" => Err(TokenError::Config(format!(
            "{url} is plain http and not on a loopback address; use https or set allowInsecureHTTP"
        ))),
        other => Err(TokenError::Config(format!(
            "{url}: unsupported scheme {other:?}"
        ))),
    }
}

fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(domain)) => domain.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(url::Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_only_on_loopback_unless_allowed() {
        let ok = |u: &str, allow| check_transport_security(&Url::parse(u).unwrap(), allow).is_ok();
        assert!(ok("https://idp.example.com/token", false));
        assert!(ok("http://127.0.0.1:8080/token", false));
        assert!(ok("http://localhost/token", false));
        assert!(ok("http://[::1]:9/token", false));
        assert!(!ok("http://idp.example.com/token", false));
        assert!(!ok("http://10.0.0.1/token", false));
        assert!(ok("http://idp.example.com/token", true));
        assert!(!ok("ftp://idp.example.com/token", true));
    }

    #[test]
    fn a_bad_ca_bundle_is_a_config_error() {
        let client = TokenClient::new().unwrap();
        let err = client
            .http(Tls {
                ca_bundle: Some("not pem"),
                client_certificate: None,
            })
            .unwrap_err();
        assert!(matches!(err, TokenError::Config(_)), "{err}");
    }
}
