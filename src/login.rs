//! `audience-token-operator login`: a person's login (authorization code + PKCE, PAR when the
//! server has it, every resource of the chain and `offline_access`) that bootstraps an
//! issuer's refresh-token chain, as the seeds describe. The refresh token goes into the
//! issuer's bootstrap Secret (server-side apply through the current kubeconfig), labelled so
//! the operator adopts it within seconds, or into a file. Nothing secret is printed.
//!
//! The client authenticates as for the `token` command (a secret or key from a file or the
//! environment), through the same issuer layer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, Patch, PatchParams};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use url::Url;

use crate::api::{GrantType, IssuerKind, RefreshTokenGrant};
use crate::controller::refresh_chain::{
    BOOTSTRAP_HASH_ANNOTATION, CHAIN_LOST_ANNOTATION, bootstrap_hash, state_secret_name,
};
use crate::controller::secret_watch::BOOTSTRAP_LABEL;
use crate::debug_token::{CredentialSources, ManifestIssuer, parse_manifest, read_manifest};
use crate::issuer::{IssuerEndpoints, IssuerTarget};
use crate::oauth::authorize::{
    AuthorizationRequest, CallbackError, Pkce, authorization_url, parse_callback,
    pushed_authorization_url, random_token,
};
use crate::oauth::jwt::decode_claims;
use crate::oauth::{Grant, TokenClient, TokenError, TokenRequest};
use crate::redact::SecretString;

/// The field manager of the bootstrap Secret's value.
pub const FIELD_MANAGER: &str = "audience-token-operator-login";
/// The path of the loopback redirect URI.
pub const CALLBACK_PATH: &str = "/callback";
/// How long one connection to the redirect listener may take to send its request line and
/// headers.
const REQUEST_HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// What to do.
#[derive(Clone, Debug)]
pub struct Options {
    /// The issuer manifest (`-` for stdin).
    pub manifest: PathBuf,
    /// Scopes to ask for besides `offline_access` (and `openid`).
    pub scopes: Vec<String>,
    /// The loopback port of the redirect URI; 0 for an ephemeral one.
    pub redirect_port: u16,
    /// Use PAR even when discovery does not name a PAR endpoint as required.
    pub par: bool,
    /// Try to open a browser with the URL.
    pub open_browser: bool,
    /// How long to wait for the browser's answer.
    pub timeout: Duration,
    /// Write the refresh token to this file (mode 0600) instead of the bootstrap Secret.
    pub output: Option<PathBuf>,
    /// The namespace of the bootstrap Secret: default the TokenIssuer's, else the
    /// kubeconfig context's; needed for a ClusterTokenIssuer (its cluster resource
    /// namespace).
    pub namespace: Option<String>,
    /// RFC 9396 `authorization_details` (a JSON array) for the authorization request.
    pub authorization_details: Option<PathBuf>,
    /// Where the client credential comes from.
    pub credentials: CredentialSources,
}

/// Why a login did not produce a refresh token, in words a person can act on.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    /// The manifest, a file or the issuer's settings cannot be used.
    #[error("{0}")]
    Setup(String),
    /// The authorization server refused or failed a request.
    #[error("{0}")]
    Server(String),
    /// The browser brought no usable answer.
    #[error(transparent)]
    Callback(#[from] CallbackError),
    /// Nobody answered in time.
    #[error(
        "no answer from the browser within {0:?}: finish the login in the browser, or run again with a longer --timeout. If the browser shows an error about the redirect URI, register {1} for the client (any port on 127.0.0.1, RFC 8252 §7.3) or use --redirect-port with the one registered"
    )]
    Timeout(Duration, String),
    /// The code was redeemed but no refresh token came back.
    #[error(
        "the server issued no refresh token: offline_access was not granted (is the client allowed the refresh_token grant and offline_access, and did the consent include it?)"
    )]
    NoRefreshToken,
    /// The refresh token could not be written.
    #[error("{0}")]
    Write(String),
}

/// What happened, without anything secret.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Report {
    /// `TokenIssuer ns/name`.
    pub issuer: String,
    /// The person's `sub` (from the ID token, else the access token), if known.
    pub subject: Option<String>,
    /// The scopes the server granted the token the code was redeemed for (the first
    /// resource's; the refresh token covers every resource of the grant).
    pub scopes: Vec<String>,
    /// The resources the grant was asked for.
    pub resources: Vec<String>,
    /// When the refresh token expires, when it says so itself (a JWT refresh token's `exp`;
    /// opaque refresh tokens do not).
    pub refresh_token_expires_at: Option<Timestamp>,
    /// Whether the request went through PAR.
    pub pushed: bool,
    /// Where the refresh token went (`Secret ns/name key k`, `file …`).
    pub written_to: String,
    /// What the write does to a running chain.
    pub chain_note: Option<String>,
}

impl Report {
    /// The report as JSON.
    pub fn to_json(&self) -> Value {
        json!({
            "issuer": self.issuer,
            "subject": self.subject,
            "scopes": self.scopes,
            "resources": self.resources,
            "refresh_token_expires_at": self.refresh_token_expires_at.map(|t| t.to_string()),
            "pushed_authorization_request": self.pushed,
            "written_to": self.written_to,
            "chain": self.chain_note,
        })
    }

    /// The report for a terminal.
    pub fn to_text(&self) -> String {
        let none = || "(unknown)".to_string();
        let mut lines = vec![
            format!("issuer:          {}", self.issuer),
            format!(
                "user (sub):      {}",
                self.subject.clone().unwrap_or_else(none)
            ),
            format!(
                "granted scope:   {} (the first resource's token)",
                self.scopes.join(" ")
            ),
            format!("resources:       {}", self.resources.join(" ")),
            format!(
                "refresh expires: {}",
                self.refresh_token_expires_at
                    .map(|t| t.to_string())
                    .unwrap_or_else(none)
            ),
            format!(
                "request:         {}",
                if self.pushed {
                    "pushed (PAR, RFC 9126)"
                } else {
                    "in the URL"
                }
            ),
            format!("written to:      {}", self.written_to),
        ];
        if let Some(note) = &self.chain_note {
            lines.push(format!("chain:           {note}"));
        }
        lines.join("\n") + "\n"
    }
}

/// Runs a login; `say` gets what the person must see while it runs (the URL to open,
/// warnings), on stderr in the command.
pub async fn run(options: &Options, say: &mut dyn FnMut(&str)) -> Result<Report, LoginError> {
    let setup = |e: &dyn std::fmt::Display| LoginError::Setup(e.to_string());
    let issuer = parse_manifest(&read_manifest(&options.manifest).map_err(|e| setup(&e))?)
        .map_err(|e| setup(&e))?;
    let grant = refresh_grant(&issuer)?;
    if issuer.spec.issuer_url.is_none() {
        return Err(LoginError::Setup(format!(
            "{}: login needs issuerURL, whose discovery document names the authorization endpoint",
            issuer.label()
        )));
    }
    let authorization_details = match &options.authorization_details {
        Some(path) => Some(read_authorization_details(path)?),
        None => None,
    };
    let label = issuer.label();
    let target = IssuerTarget {
        key: &label,
        spec: &issuer.spec,
        secret_namespace: "",
    };
    let layer = IssuerEndpoints::new(
        TokenClient::new().map_err(|e| setup(&e))?,
        options.credentials.clone(),
    );
    let ready = layer
        .endpoint(target)
        .await
        .map_err(|f| LoginError::Setup(f.message))?;
    let certificate = layer
        .client_certificate(target)
        .await
        .map_err(|f| LoginError::Setup(f.message))?;
    let metadata = layer
        .server_metadata(
            target,
            certificate.as_ref().map(|c| &*c.certificate),
            ready.endpoint.timeout,
        )
        .await
        .map_err(|f| LoginError::Setup(f.message))?;
    let authorization_endpoint = metadata.authorization_endpoint.clone().ok_or_else(|| {
        LoginError::Setup(format!(
            "the discovery document of {} names no authorization_endpoint: this server has no login for people",
            metadata.issuer
        ))
    })?;

    let listener = TcpListener::bind(("127.0.0.1", options.redirect_port))
        .await
        .map_err(|e| {
            LoginError::Setup(format!(
                "cannot listen on 127.0.0.1:{} for the redirect: {e}",
                options.redirect_port
            ))
        })?;
    let port = listener
        .local_addr()
        .map_err(|e| LoginError::Setup(format!("cannot read the listener's port: {e}")))?
        .port();
    let redirect_uri = format!("http://127.0.0.1:{port}{CALLBACK_PATH}");
    let scopes = login_scopes(&options.scopes, metadata.openid_provider);
    let state = random_token();
    let pkce = Pkce::generate();
    let request = AuthorizationRequest {
        client_id: &issuer.spec.client_id,
        redirect_uri: &redirect_uri,
        scopes: &scopes,
        resources: &grant.resources,
        state: &state,
        code_challenge: &pkce.challenge,
        prompt: Some("consent"),
        authorization_details: authorization_details.as_deref(),
    };
    let par_endpoint = metadata.pushed_authorization_request_endpoint.clone();
    let pushed = par_endpoint.is_some() || metadata.require_pushed_authorization_requests;
    if options.par && par_endpoint.is_none() {
        return Err(LoginError::Setup(format!(
            "--par: the discovery document of {} names no pushed_authorization_request_endpoint",
            metadata.issuer
        )));
    }
    let url = match (&par_endpoint, pushed) {
        (Some(par), true) => {
            let answer = layer
                .tokens()
                .push_authorization_request(par, &ready.endpoint, &request.params())
                .await
                .map_err(|e| {
                    server_error(
                        "the pushed authorization request",
                        "the PAR endpoint",
                        &e,
                        &redirect_uri,
                    )
                })?;
            pushed_authorization_url(
                &authorization_endpoint,
                &issuer.spec.client_id,
                &answer.request_uri,
            )
        }
        (None, true) => {
            return Err(LoginError::Setup(format!(
                "{} requires pushed authorization requests but names no pushed_authorization_request_endpoint",
                metadata.issuer
            )));
        }
        (_, false) => authorization_url(&authorization_endpoint, &request.params()),
    };

    say(&format!(
        "Open this URL in a browser and log in (waiting up to {}s for the answer at {redirect_uri}):\n\n  {url}\n",
        options.timeout.as_secs()
    ));
    if options.open_browser {
        open_browser(url.as_str());
    }
    let query = tokio::time::timeout(options.timeout, wait_for_callback(&listener))
        .await
        .map_err(|_| LoginError::Timeout(options.timeout, redirect_uri.clone()))?
        .map_err(|e| LoginError::Setup(format!("the redirect listener failed: {e}")))?;
    drop(listener);
    let code = parse_callback(&query, &state, Some(&metadata.issuer))?;

    // Seed 000: the code is redeemed for the first resource; the refresh token covers all.
    let first = grant.resources.first().map(String::as_str);
    let audience = match first {
        Some(resource) => ready.audience_for(resource, resource),
        None => crate::oauth::AudienceParam::ScopeOnly,
    };
    let redeem = TokenRequest {
        grant: Grant::AuthorizationCode {
            code,
            redirect_uri: redirect_uri.clone(),
            code_verifier: pkce.verifier,
        },
        scopes: Vec::new(),
        audience,
        dpop: None,
        // Details of a login travel in the authorization request (`--authorization-details`).
        authorization_details: None,
    };
    let (response, id_token) = layer
        .tokens()
        .request_with_id_token(&ready.endpoint, &redeem)
        .await
        .map_err(|e| {
            server_error(
                "redeeming the code",
                "the token endpoint",
                &e,
                &redirect_uri,
            )
        })?;
    let refresh_token = response
        .refresh_token
        .clone()
        .ok_or(LoginError::NoRefreshToken)?;
    let subject = id_token
        .as_ref()
        .and_then(|t| decode_claims(t.expose()))
        .or_else(|| decode_claims(response.access_token.expose()))
        .and_then(|claims| {
            claims
                .raw
                .get("sub")
                .and_then(Value::as_str)
                .map(str::to_string)
        });
    let refresh_token_expires_at = decode_claims(refresh_token.expose())
        .and_then(|c| c.exp)
        .and_then(|exp| Timestamp::from_second(exp).ok());
    let scopes = response
        .scope
        .as_deref()
        .map(|s| s.split_whitespace().map(str::to_string).collect())
        .unwrap_or_default();

    let (written_to, chain_note) = match &options.output {
        Some(path) => (write_file(path, &refresh_token)?, None),
        None => write_bootstrap(&issuer, grant, options, &refresh_token, say).await?,
    };
    Ok(Report {
        issuer: label,
        subject,
        scopes,
        resources: grant.resources.clone(),
        refresh_token_expires_at,
        pushed: par_endpoint.is_some(),
        written_to,
        chain_note,
    })
}

fn refresh_grant(issuer: &ManifestIssuer) -> Result<&RefreshTokenGrant, LoginError> {
    match (&issuer.spec.grant.type_, &issuer.spec.grant.refresh_token) {
        (GrantType::RefreshToken, Some(grant)) => Ok(grant),
        _ => Err(LoginError::Setup(format!(
            "{} does not use the RefreshToken grant: login bootstraps a refresh-token chain (grant.type: RefreshToken, grant.refreshToken.bootstrapSecretRef and resources)",
            issuer.label()
        ))),
    }
}

/// The user's scopes, then `offline_access` (a refresh token) and, at an OpenID provider,
/// `openid` (an ID token names the user); no duplicates.
pub fn login_scopes(asked: &[String], openid_provider: bool) -> Vec<String> {
    let mut scopes: Vec<String> = Vec::new();
    let wanted = asked
        .iter()
        .flat_map(|s| s.split_whitespace())
        .map(str::to_string)
        .chain(openid_provider.then(|| "openid".to_string()))
        .chain(std::iter::once("offline_access".to_string()));
    for scope in wanted {
        if !scopes.contains(&scope) {
            scopes.push(scope);
        }
    }
    scopes
}

fn read_authorization_details(path: &Path) -> Result<String, LoginError> {
    let details =
        crate::debug_token::read_authorization_details(path).map_err(LoginError::Setup)?;
    Ok(Value::Array(details).to_string())
}

/// A server error, with what the person can do about the common ones. `endpoint` names
/// who answered (`the PAR endpoint`, `the token endpoint`).
fn server_error(
    during: &str,
    endpoint: &str,
    error: &TokenError,
    redirect_uri: &str,
) -> LoginError {
    let register = format!(
        " (register {redirect_uri} for the client: any port on 127.0.0.1, RFC 8252 §7.3; or use --redirect-port with the one registered)"
    );
    let text = match error {
        TokenError::Server {
            status,
            error,
            description,
            ..
        } => match description {
            Some(d) if !d.is_empty() => format!("{endpoint} answered {status} {error}: {d}"),
            _ => format!("{endpoint} answered {status} {error}"),
        },
        other => crate::oauth::error_chain(other),
    };
    let hint = match error.oauth_error() {
        Some("invalid_target") => {
            " (the server does not support resource indicators, RFC 8707, or does not know one of grant.refreshToken.resources)"
                .to_string()
        }
        Some("invalid_redirect_uri") => register,
        Some("invalid_request") if text.contains("redirect_uri") => register,
        Some("invalid_request" | "unauthorized_client") if text.contains("response_type") => {
            " (the client is not allowed the authorization code flow: allow the response type code and the grant types authorization_code and refresh_token)"
                .to_string()
        }
        Some("invalid_client") => " (check the client credential)".to_string(),
        _ => String::new(),
    };
    LoginError::Server(format!("{during} failed: {text}{hint}"))
}

/// Accepts connections on the loopback listener until one asks for the callback path;
/// answers it with a page the person can close, and returns its query.
async fn wait_for_callback(listener: &TcpListener) -> std::io::Result<String> {
    loop {
        let (mut stream, _) = listener.accept().await?;
        // A browser may open a connection ahead and send nothing on it: never let one such
        // connection hold up the one that brings the answer.
        let mut buffer = vec![0u8; 16 * 1024];
        let head = tokio::time::timeout(REQUEST_HEAD_TIMEOUT, async {
            let mut read = 0;
            while read < buffer.len() {
                let n = stream.read(&mut buffer[read..]).await?;
                if n == 0 {
                    break;
                }
                read += n;
                if buffer[..read].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            Ok::<usize, std::io::Error>(read)
        })
        .await;
        let read = match head {
            Ok(Ok(read)) => read,
            // Silent or broken: not the answer.
            Ok(Err(_)) | Err(_) => continue,
        };
        let head = String::from_utf8_lossy(&buffer[..read]);
        let target = head
            .lines()
            .next()
            .and_then(|line| line.split_whitespace().nth(1))
            .unwrap_or("/");
        let (path, query) = target.split_once('?').unwrap_or((target, ""));
        if path != CALLBACK_PATH {
            let _ = stream
                .write_all(
                    b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                )
                .await;
            continue;
        }
        let body = "<!doctype html><title>audience-token-operator login</title>\
                    <p>The login has reached audience-token-operator. You can close this window \
                    and return to the terminal.</p>";
        let answer = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n{body}",
            body.len()
        );
        let _ = stream.write_all(answer.as_bytes()).await;
        let _ = stream.shutdown().await;
        return Ok(query.to_string());
    }
}

/// Opens `url` in the person's browser if one is at hand (`$BROWSER`, `xdg-open`, `open`);
/// a failure is not an error, the URL is printed anyway.
fn open_browser(url: &str) {
    let candidates: Vec<String> = std::env::var("BROWSER")
        .ok()
        .filter(|b| !b.is_empty())
        .into_iter()
        .chain(["xdg-open".to_string(), "open".to_string()])
        .collect();
    for program in candidates {
        let started = std::process::Command::new(&program)
            .arg(url)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
        if started.is_ok() {
            return;
        }
    }
}

fn write_file(path: &Path, refresh_token: &SecretString) -> Result<String, LoginError> {
    use std::io::Write as _;
    let mut open = std::fs::OpenOptions::new();
    open.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        open.mode(0o600);
    }
    let mut file = open
        .open(path)
        .map_err(|e| LoginError::Write(format!("cannot write {}: {e}", path.display())))?;
    // An existing file keeps its mode through `open`: make it 0600 as well.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        file.set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(|e| LoginError::Write(format!("cannot chmod {}: {e}", path.display())))?;
    }
    file.write_all(refresh_token.expose().as_bytes())
        .map_err(|e| LoginError::Write(format!("cannot write {}: {e}", path.display())))?;
    Ok(format!("file {} (mode 0600)", path.display()))
}

/// Applies the refresh token to the issuer's bootstrap Secret, after saying what that does
/// to the chain running from it.
async fn write_bootstrap(
    issuer: &ManifestIssuer,
    grant: &RefreshTokenGrant,
    options: &Options,
    refresh_token: &SecretString,
    say: &mut dyn FnMut(&str),
) -> Result<(String, Option<String>), LoginError> {
    let write = |e: &dyn std::fmt::Display| LoginError::Write(e.to_string());
    let client = kube::Client::try_default().await.map_err(|e| {
        write(&format!(
            "cannot reach the cluster through the current kubeconfig ({e}); use --output FILE to write the refresh token to a file instead"
        ))
    })?;
    let namespace = match (&options.namespace, issuer.kind, &issuer.namespace) {
        (Some(namespace), _, _) => namespace.clone(),
        (None, IssuerKind::TokenIssuer, Some(namespace)) => namespace.clone(),
        (None, IssuerKind::TokenIssuer, None) => client.default_namespace().to_string(),
        (None, IssuerKind::ClusterTokenIssuer, _) => {
            return Err(LoginError::Setup(
                "a ClusterTokenIssuer's bootstrap Secret is in the operator's cluster resource namespace: give it with --namespace".into(),
            ));
        }
    };
    let issuer_name = issuer.object_name.clone().unwrap_or_default();
    let secrets: Api<Secret> = Api::namespaced(client, &namespace);
    let selector = &grant.bootstrap_secret_ref;
    let place = format!("Secret {namespace}/{} key {}", selector.name, selector.key);
    let note = chain_note(&secrets, &issuer_name, selector, &place).await;
    if let Some(note) = &note {
        say(&format!("Note: {note}"));
    }
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(selector.name.clone()),
            namespace: Some(namespace.clone()),
            labels: Some(BTreeMap::from([(
                BOOTSTRAP_LABEL.to_string(),
                issuer_name.clone(),
            )])),
            annotations: Some(BTreeMap::from([(
                "audiencetoken.io/login-at".to_string(),
                crate::secret::rfc3339(Timestamp::now()),
            )])),
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(BTreeMap::from([(
            selector.key.clone(),
            ByteString(refresh_token.expose().as_bytes().to_vec()),
        )])),
        ..Secret::default()
    };
    secrets
        .patch(
            &selector.name,
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(&secret),
        )
        .await
        .map_err(|e| write(&format!("cannot write {place}: {e}")))?;
    Ok((place, note))
}

/// What writing a new value does to the chain: nothing to say for a first value; a lost
/// chain starts again; a running chain that adopted the current value is abandoned for a
/// new one. A chain state the person may not read is not an error: the write says what it
/// does either way.
async fn chain_note(
    secrets: &Api<Secret>,
    issuer_name: &str,
    selector: &crate::api::SecretKeySelector,
    place: &str,
) -> Option<String> {
    let state = secrets
        .get_opt(&state_secret_name(issuer_name))
        .await
        .ok()
        .flatten()?;
    let annotations = state.metadata.annotations.unwrap_or_default();
    if let Some(why) = annotations.get(CHAIN_LOST_ANNOTATION) {
        return Some(format!(
            "the chain of {issuer_name} is lost ({why}); this login starts a new one"
        ));
    }
    let current = secrets
        .get_opt(&selector.name)
        .await
        .ok()
        .flatten()
        .and_then(|s| s.data)
        .and_then(|data| data.get(&selector.key).cloned())
        .and_then(|bytes| String::from_utf8(bytes.0).ok())
        .map(|text| SecretString::new(crate::issuer::credentials::trim_line_end(&text)));
    let adopted = annotations.get(BOOTSTRAP_HASH_ANNOTATION);
    match current {
        Some(value) if adopted == Some(&bootstrap_hash(&value)) => Some(format!(
            "the running chain of {issuer_name} started from the value in {place}; writing a new one starts a new chain (the operator adopts it within seconds and stops using the old one)"
        )),
        _ => Some(format!(
            "{issuer_name} has a running chain; writing {place} starts a new one"
        )),
    }
}

/// The URL a redirect would carry, for tests of the listener.
pub fn callback_url(port: u16, query: &str) -> Result<Url, url::ParseError> {
    Url::parse(&format!("http://127.0.0.1:{port}{CALLBACK_PATH}?{query}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes_add_offline_access_and_openid_once() {
        let asked = vec![
            "orders/read payments/read".to_string(),
            "openid".to_string(),
        ];
        assert_eq!(
            login_scopes(&asked, true),
            ["orders/read", "payments/read", "openid", "offline_access"]
        );
        assert_eq!(login_scopes(&[], false), ["offline_access"]);
    }

    #[tokio::test]
    async fn the_listener_answers_the_callback_and_ignores_other_paths() {
        let listener = TcpListener::bind(("127.0.0.1", 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let waiting = tokio::spawn(async move { wait_for_callback(&listener).await.unwrap() });
        // A connection that never sends a request (a browser's preconnect) holds nothing up.
        let _silent = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        // A hung listener fails the test instead of hanging it.
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(20))
            .build()
            .unwrap();
        let favicon = http
            .get(format!("http://127.0.0.1:{port}/favicon.ico"))
            .send()
            .await
            .unwrap();
        assert_eq!(favicon.status().as_u16(), 404);
        let page = http
            .get(callback_url(port, "code=c&state=s").unwrap())
            .send()
            .await
            .unwrap();
        assert_eq!(page.status().as_u16(), 200);
        assert!(page.text().await.unwrap().contains("close this window"));
        let query = tokio::time::timeout(Duration::from_secs(20), waiting)
            .await
            .expect("the silent connection does not hold up the answer")
            .unwrap();
        assert_eq!(query, "code=c&state=s");
    }

    #[test]
    fn authorization_details_must_be_an_array_of_typed_objects() {
        let dir = std::env::temp_dir().join(format!("ato-login-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("details.json");
        std::fs::write(&file, r#"[{"type":"helseid_authorization","x":1}]"#).unwrap();
        assert_eq!(
            read_authorization_details(&file).unwrap(),
            r#"[{"type":"helseid_authorization","x":1}]"#
        );
        std::fs::write(&file, r#"{"type":"a"}"#).unwrap();
        assert!(read_authorization_details(&file).is_err());
        std::fs::write(&file, r#"[{"x":1}]"#).unwrap();
        assert!(read_authorization_details(&file).is_err());
    }

    #[test]
    fn the_file_is_private() {
        let dir = std::env::temp_dir().join(format!("ato-login-file-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("refresh-token");
        std::fs::write(&path, "old").unwrap();
        write_file(&path, &SecretString::new("new-value")).unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "new-value");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
    }
}
