//! `audience-token-operator login` (the seeds' first half): a person logs in once, for every
//! resource of a refresh-token chain, and the operator runs the chain from the refresh token
//! the command wrote. The test drives the test server's login and consent pages over HTTP as
//! a browser would (oidc-provider's own pages; login name [`LOGIN_ACCOUNT`], any password).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use audience_token_operator::api::TokenIssuer;
use kube::api::PostParams;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

use super::super::oidc;
use super::{READY_TIMEOUT, TestEnv, claims, data, eventually};

/// The account the test server's login page knows.
pub const LOGIN_ACCOUNT: &str = "test-account";
/// The login client's secret (see `tests/oidc-server/server.mjs`).
pub const LOGIN_CLIENT_SECRET: &str = "login-client-secret";
/// How long the login may take once the browser has answered.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(60);

/// What one run of `login` printed.
pub struct LoginRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// A browser, as far as a login needs one: follows redirects by hand, keeps cookies, and
/// submits oidc-provider's login and consent forms.
pub struct Browser {
    http: reqwest::Client,
    cookies: BTreeMap<String, String>,
}

impl Browser {
    pub fn new() -> Self {
        Self {
            http: reqwest::Client::builder()
                .redirect(reqwest::redirect::Policy::none())
                .no_proxy()
                .timeout(Duration::from_secs(10))
                .build()
                .expect("client"),
            cookies: BTreeMap::new(),
        }
    }

    fn keep_cookies(&mut self, response: &reqwest::Response) {
        for value in response.headers().get_all(reqwest::header::SET_COOKIE) {
            let Ok(text) = value.to_str() else { continue };
            let pair = text.split(';').next().unwrap_or_default();
            if let Some((name, value)) = pair.split_once('=') {
                self.cookies.insert(name.trim().into(), value.trim().into());
            }
        }
    }

    fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// Opens `url` and goes on until a page that is not a redirect or a form of the login
    /// flow: the callback's answer, or an error page. Returns its URL, status and body.
    pub async fn log_in(&mut self, url: &str) -> (String, u16, String) {
        let mut next = Some((reqwest::Method::GET, url.to_string(), Vec::new()));
        for _ in 0..20 {
            let (method, url, form) = next.take().expect("a next step");
            let mut request = self
                .http
                .request(method, &url)
                .header(reqwest::header::COOKIE, self.cookie_header());
            if !form.is_empty() {
                request = request.form(&form);
            }
            let response = request.send().await.expect("browser request");
            self.keep_cookies(&response);
            let status = response.status().as_u16();
            if let Some(location) = response.headers().get(reqwest::header::LOCATION) {
                let location = location.to_str().expect("ASCII Location");
                let target = url::Url::parse(&url)
                    .and_then(|base| base.join(location))
                    .expect("a Location URL");
                next = Some((reqwest::Method::GET, target.to_string(), Vec::new()));
                continue;
            }
            let body = response.text().await.unwrap_or_default();
            let action = body
                .split("action=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .map(|a| a.replace("&amp;", "&"));
            let form = if body.contains(r#"name="prompt" value="login""#) {
                vec![
                    ("prompt".to_string(), "login".to_string()),
                    ("login".to_string(), LOGIN_ACCOUNT.to_string()),
                    ("password".to_string(), "any".to_string()),
                ]
            } else if body.contains(r#"name="prompt" value="consent""#) {
                vec![("prompt".to_string(), "consent".to_string())]
            } else {
                return (url, status, body);
            };
            let action = action.expect("the form has an action");
            let target = url::Url::parse(&url)
                .and_then(|base| base.join(&action))
                .expect("a form action URL");
            next = Some((reqwest::Method::POST, target.to_string(), form));
        }
        panic!("the login did not end within 20 steps")
    }
}

impl TestEnv {
    /// Writes a manifest of TokenIssuer `name` (the test server's `login-client`, a
    /// RefreshToken grant for `resources` bootstrapped from Secret `<name>-bootstrap`),
    /// creates it, and returns the manifest's path for `login -f`.
    pub async fn create_login_issuer(&self, name: &str, resources: &[&str]) -> PathBuf {
        let secret_name = format!("{name}-client");
        self.put_client_secret(&secret_name, LOGIN_CLIENT_SECRET)
            .await;
        let manifest = json!({
            "apiVersion": "audiencetoken.io/v1alpha1",
            "kind": "TokenIssuer",
            "metadata": {"name": name, "namespace": self.namespace},
            "spec": {
                "issuerURL": self.idp.issuer,
                "clientID": "login-client",
                "clientAuth": {
                    "method": "ClientSecretBasic",
                    "clientSecretRef": {"name": secret_name, "key": "client-secret"}
                },
                "grant": {
                    "type": "RefreshToken",
                    "refreshToken": {
                        "bootstrapSecretRef": {"name": format!("{name}-bootstrap"), "key": "refresh-token"},
                        "resources": resources
                    }
                }
            }
        });
        let issuer: TokenIssuer = serde_json::from_value(manifest.clone()).expect("TokenIssuer");
        self.issuers()
            .create(&PostParams::default(), &issuer)
            .await
            .expect("create TokenIssuer");
        let path = std::env::temp_dir().join(format!(
            "ato-login-{}-{}-{name}.yaml",
            std::process::id(),
            self.namespace
        ));
        std::fs::write(
            &path,
            serde_yaml::to_string(&manifest).expect("YAML manifest"),
        )
        .expect("write manifest");
        path
    }

    /// Runs `login -f manifest` with the client secret in the environment and `kubeconfig`,
    /// logs in at the URL it prints as a browser would, and returns what it printed.
    pub async fn run_login(&self, manifest: &Path, kubeconfig: &Path, args: &[&str]) -> LoginRun {
        let kubeconfig = kubeconfig.to_str().expect("UTF-8 path");
        login_command(
            manifest,
            args,
            &[
                ("ATO_CLIENT_SECRET", LOGIN_CLIENT_SECRET),
                ("KUBECONFIG", kubeconfig),
            ],
            true,
        )
        .await
    }
}

/// Runs `audience-token-operator login -f manifest --no-browser -o json ARGS` with `env`.
/// With `browse`, logs in at the URL it prints as a browser would (and requires that the
/// browser ends at the command's redirect URI); without, only waits for it to end.
pub async fn login_command(
    manifest: &Path,
    args: &[&str],
    env: &[(&str, &str)],
    browse: bool,
) -> LoginRun {
    let mut child = Command::new(env!("CARGO_BIN_EXE_audience-token-operator"))
        .arg("login")
        .arg("-f")
        .arg(manifest)
        .args(["--no-browser", "-o", "json"])
        .args(args)
        .env_remove("ATO_CLIENT_SECRET")
        .env_remove("ATO_PRIVATE_KEY")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .envs(env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start login");
    let mut stderr = BufReader::new(child.stderr.take().expect("stderr")).lines();
    let mut said = String::new();
    if browse {
        let url = tokio::time::timeout(LOGIN_TIMEOUT, async {
            while let Some(line) = stderr.next_line().await.expect("read stderr") {
                said.push_str(&line);
                said.push('\n');
                let trimmed = line.trim();
                if trimmed.starts_with("http://") || trimmed.starts_with("https://") {
                    return Some(trimmed.to_string());
                }
            }
            None
        })
        .await
        .expect("login prints the URL to open")
        .unwrap_or_else(|| panic!("login printed no URL:\n{said}"));
        let (last_url, status, body) = Browser::new().log_in(&url).await;
        assert!(
            last_url.contains("/callback?"),
            "the browser ended at the redirect URI, not {last_url} ({status}): {body}"
        );
        assert_eq!(status, 200, "the command's page: {body}");
    }
    let output = tokio::time::timeout(LOGIN_TIMEOUT, child.wait_with_output())
        .await
        .expect("login ends")
        .expect("wait for login");
    while let Ok(Some(line)) = stderr.next_line().await {
        said.push_str(&line);
        said.push('\n');
    }
    LoginRun {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: said,
    }
}

/// A chain bootstrapped by `login`: PAR, every resource, `offline_access`; the refresh token
/// goes into the labelled bootstrap Secret and nowhere else; two AudienceTokens waiting on
/// the chain are issued from it at once, each for its one resource; a second login while
/// the chain runs says that it starts a new chain, and the operator adopts the new value
/// within seconds.
pub async fn login_bootstraps_a_refresh_token_chain(env: &TestEnv, kubeconfig: &Path) {
    let manifest = env
        .create_login_issuer("login-idp", &[oidc::ORDERS, oidc::PAYMENTS])
        .await;
    env.create_token(
        "login-orders",
        "login-idp",
        oidc::ORDERS,
        &["orders/read"],
        None,
    )
    .await;
    env.create_token(
        "login-payments",
        "login-idp",
        oidc::PAYMENTS,
        &["payments/read"],
        None,
    )
    .await;
    env.wait_issuer("login-idp", "False", "NotReady").await;

    let run = env
        .run_login(
            &manifest,
            kubeconfig,
            &["--scope", "orders/read payments/read"],
        )
        .await;
    assert_eq!(
        run.code,
        Some(0),
        "login failed:\n{}\n{}",
        run.stdout,
        run.stderr
    );
    let report: Value = serde_json::from_str(&run.stdout).expect("a JSON report");
    assert_eq!(report["subject"], LOGIN_ACCOUNT, "{report}");
    assert_eq!(report["pushed_authorization_request"], true, "{report}");
    assert_eq!(report["resources"], json!([oidc::ORDERS, oidc::PAYMENTS]));
    // The scopes of the token the code was redeemed for: the first resource's.
    assert_eq!(report["scopes"], json!(["orders/read"]), "{report}");

    let bootstrap = env
        .secrets()
        .get("login-idp-bootstrap")
        .await
        .expect("bootstrap Secret");
    let refresh_token = data(&bootstrap, "refresh-token");
    assert!(!refresh_token.is_empty());
    assert_eq!(
        bootstrap
            .metadata
            .labels
            .unwrap_or_default()
            .get("audiencetoken.io/bootstrap"),
        Some(&"login-idp".to_string()),
        "labelled, so the operator watches it"
    );
    assert!(
        !run.stdout.contains(&refresh_token) && !run.stderr.contains(&refresh_token),
        "the refresh token is never printed"
    );

    for (name, resource) in [
        ("login-orders", oidc::ORDERS),
        ("login-payments", oidc::PAYMENTS),
    ] {
        env.wait_condition(name, "True", "Issued", READY_TIMEOUT)
            .await;
        let token = env.token_in(name).await;
        assert_eq!(
            claims(&token)["aud"],
            json!(resource),
            "{name} is for its one resource"
        );
        assert_eq!(claims(&token)["sub"], json!(LOGIN_ACCOUNT));
    }

    // A second login while the chain runs: the command says what the write does, and the
    // operator adopts the new value within seconds (not at its 5-minute re-read).
    let adopted_before = env.state_annotations("login-idp").await;
    let second = env.run_login(&manifest, kubeconfig, &[]).await;
    assert_eq!(
        second.code,
        Some(0),
        "second login:\n{}\n{}",
        second.stdout,
        second.stderr
    );
    assert!(
        second.stderr.contains("starts a new chain"),
        "the command says it starts a new chain: {}",
        second.stderr
    );
    let before = adopted_before
        .get("audiencetoken.io/bootstrap-hash")
        .cloned();
    eventually(
        "the chain adopts the second login's refresh token",
        Duration::from_secs(15),
        || async {
            let now = env.state_annotations("login-idp").await;
            let hash = now.get("audiencetoken.io/bootstrap-hash").cloned();
            if hash.is_some() && hash != before {
                Ok(())
            } else {
                Err(format!("bootstrap-hash {hash:?}"))
            }
        },
    )
    .await;
    // The new chain serves renewals.
    env.force_renewal(&["login-orders"], "after-second-login")
        .await;
    env.wait_forced("login-orders", "after-second-login", READY_TIMEOUT)
        .await;
}
