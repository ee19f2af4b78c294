//! `audience-token-operator token`: the real binary against the test authorization server
//! (`tests/oidc-server`, oidc-provider), with an issuer manifest on disk or stdin and the
//! client secret from a file or the environment (a ServiceAccount token minted by the
//! Kubernetes API double, for the secretless issuers).
//!
//! Needs Node.js and `npm ci --prefix tests/oidc-server`.

mod support;

use std::path::PathBuf;
use std::process::Stdio;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::Value;
use support::oidc::*;
use tokio::io::AsyncWriteExt as _;
use tokio::process::Command;

const BINARY: &str = env!("CARGO_BIN_EXE_audience-token-operator");

struct Output {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl std::fmt::Display for Output {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {:?}\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// Runs `audience-token-operator token ARGS` with only the given credential variables set.
async fn token_command(args: &[&str], env: &[(&str, &str)], stdin: Option<&str>) -> Output {
    let mut command = Command::new(BINARY);
    command
        .arg("token")
        .args(args)
        .env_remove("ATO_CLIENT_SECRET")
        .env_remove("ATO_PRIVATE_KEY")
        .env_remove("ATO_SERVICE_ACCOUNT_TOKEN")
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .env("NO_PROXY", "127.0.0.1,localhost")
        .envs(env.iter().copied())
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command.spawn().expect("start the binary");
    if let Some(text) = stdin {
        let mut pipe = child.stdin.take().expect("piped stdin");
        pipe.write_all(text.as_bytes()).await.expect("write stdin");
        drop(pipe);
    }
    let output = tokio::time::timeout(std::time::Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the command finishes within 60 s")
        .expect("wait for the binary");
    Output {
        code: output.status.code(),
        stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
    }
}

/// A fresh directory for one test's files.
fn temp_dir(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("token_command-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

fn write(dir: &std::path::Path, name: &str, contents: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, contents).expect("write temp file");
    path.to_str().expect("UTF-8 path").to_string()
}

/// A TokenIssuer using discovery from the test server's issuer URL.
fn discovery_issuer(idp: &OidcServer, client: TestClient, method: &str) -> String {
    format!(
        "apiVersion: audiencetoken.io/v1alpha1
kind: TokenIssuer
metadata:
  name: test-idp
  namespace: shop
spec:
  issuerURL: {issuer}
  clientID: {id}
  clientAuth:
    method: {method}
    clientSecretRef:
      name: idp-client
      key: client-secret
",
        issuer = idp.issuer,
        id = client.id
    )
}

/// The JWS compact tokens in `text`: three base64url segments whose first decodes to a JSON
/// object with `alg`.
fn jwts_in(text: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.'))
        .filter(|word| {
            let parts: Vec<&str> = word.split('.').collect();
            parts.len() == 3
                && parts.iter().all(|p| !p.is_empty())
                && URL_SAFE_NO_PAD
                    .decode(parts[0])
                    .ok()
                    .and_then(|h| serde_json::from_slice::<Value>(&h).ok())
                    .is_some_and(|h| h.get("alg").is_some())
        })
        .map(str::to_string)
        .collect()
}

fn claims_of(jwt: &str) -> Value {
    let payload = jwt.split('.').nth(1).expect("payload");
    serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).expect("base64url")).expect("JSON")
}

#[tokio::test]
async fn secret_from_a_file_discovery_and_a_single_audience_token_pass() {
    let idp = OidcServer::start().await;
    let dir = temp_dir("pass");
    let manifest = write(
        &dir,
        "issuer.yaml",
        &discovery_issuer(&idp, M2M_BASIC, "ClientSecretBasic"),
    );
    // As `echo secret > file` writes it; the file wins over a wrong environment value.
    let secret_file = write(&dir, "client-secret", &format!("{}\n", M2M_BASIC.secret));
    let args = [
        "-f",
        &manifest,
        "--resource",
        ORDERS,
        "--scope",
        "orders/read",
        "--client-secret-file",
        &secret_file,
    ];
    let out = token_command(&args, &[("ATO_CLIENT_SECRET", "wrong-secret")], None).await;
    assert_eq!(out.code, Some(0), "{out}");
    for expected in [
        "PASS",
        &format!("aud is exactly \"{ORDERS}\""),
        &format!("\"aud\": \"{ORDERS}\""),
        "orders/read",
        "Bearer",
        &idp.token_endpoint(),
        "discovery from issuerURL",
        "TokenIssuer shop/test-idp",
        "\"typ\": \"at+jwt\"",
        "--show-token",
    ] {
        assert!(out.stdout.contains(expected), "missing {expected:?}: {out}");
    }
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("expires_in:") && l.ends_with(" 3600s")),
        "{out}"
    );
    assert!(jwts_in(&out.stdout).is_empty(), "token printed: {out}");
    assert!(!out.stdout.contains(M2M_BASIC.secret), "{out}");
    assert!(!out.stderr.contains(M2M_BASIC.secret), "{out}");

    let mut shown = args.to_vec();
    shown.push("--show-token");
    let out = token_command(&shown, &[], None).await;
    assert_eq!(out.code, Some(0), "{out}");
    let tokens = jwts_in(&out.stdout);
    assert_eq!(tokens.len(), 1, "one token with --show-token: {out}");
    assert_eq!(claims_of(&tokens[0])["aud"], ORDERS);
    assert!(!out.stdout.contains(M2M_BASIC.secret), "{out}");
}

#[tokio::test]
async fn secret_from_the_environment_manifest_on_stdin_json_output() {
    let idp = OidcServer::start().await;
    // A multi-document stream: the first issuer document is used.
    let manifest = format!(
        "apiVersion: v1
kind: Secret
metadata: {{name: idp-client}}
---
{{\"apiVersion\": \"audiencetoken.io/v1alpha1\", \"kind\": \"ClusterTokenIssuer\",
  \"metadata\": {{\"name\": \"corp\"}},
  \"spec\": {{\"tokenEndpoint\": \"{endpoint}\", \"clientID\": \"{id}\",
            \"clientAuth\": {{\"method\": \"ClientSecretPost\",
                            \"clientSecretRef\": {{\"name\": \"idp-client\", \"key\": \"s\"}}}},
            \"allowedResources\": [\"https://*.example.test\"]}}}}
",
        endpoint = idp.token_endpoint(),
        id = M2M_POST.id
    );
    let out = token_command(
        &[
            "-f",
            "-",
            "--resource",
            ORDERS,
            "--scope",
            "orders/read orders/write",
            "--output",
            "json",
        ],
        &[("ATO_CLIENT_SECRET", M2M_POST.secret)],
        Some(&manifest),
    )
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    let report: Value = serde_json::from_str(&out.stdout).expect("one JSON object");
    assert_eq!(report["ok"], true, "{out}");
    assert_eq!(report["issuer"], "ClusterTokenIssuer corp");
    assert_eq!(report["token_endpoint"], idp.token_endpoint());
    assert_eq!(report["token_endpoint_source"], "tokenEndpoint");
    assert_eq!(report["credential_source"], "env ATO_CLIENT_SECRET");
    assert_eq!(report["client_auth"], "ClientSecretPost");
    assert_eq!(report["audience_check"]["result"], "PASS");
    assert_eq!(
        report["audience_check"]["actual"],
        serde_json::json!([ORDERS])
    );
    assert_eq!(report["claims"]["aud"], ORDERS);
    assert_eq!(report["claims"]["client_id"], M2M_POST.id);
    assert_eq!(report["expires_in"], 3600);
    let mut scopes: Vec<&str> = report["scopes"]
        .as_array()
        .expect("scopes")
        .iter()
        .filter_map(Value::as_str)
        .collect();
    scopes.sort_unstable();
    assert_eq!(scopes, ["orders/read", "orders/write"]);
    assert!(report.get("access_token").is_none(), "{out}");
    assert!(jwts_in(&out.stdout).is_empty(), "token printed: {out}");
    assert!(!out.stdout.contains(M2M_POST.secret), "{out}");
}

#[tokio::test]
async fn a_multi_audience_token_fails_the_check() {
    let idp = OidcServer::start().await;
    let dir = temp_dir("multi");
    let manifest = write(
        &dir,
        "issuer.yaml",
        &discovery_issuer(&idp, M2M_BASIC, "ClientSecretBasic"),
    );
    let out = token_command(
        &["-f", &manifest, "--resource", MULTI_AUDIENCE],
        &[("ATO_CLIENT_SECRET", M2M_BASIC.secret)],
        None,
    )
    .await;
    assert_eq!(out.code, Some(3), "{out}");
    assert!(out.stdout.contains("FAIL"), "{out}");
    assert!(out.stdout.contains(MULTI_AUDIENCE_OTHER), "{out}");
    assert!(!out.stdout.contains("PASS"), "{out}");
    assert!(jwts_in(&out.stdout).is_empty(), "token printed: {out}");
}

#[tokio::test]
async fn an_opaque_token_is_reported_without_claims() {
    let idp = OidcServer::start().await;
    let dir = temp_dir("opaque");
    let manifest = write(
        &dir,
        "issuer.yaml",
        &discovery_issuer(&idp, M2M_BASIC, "ClientSecretBasic"),
    );
    let out = token_command(
        &["-f", &manifest, "--resource", OPAQUE],
        &[("ATO_CLIENT_SECRET", M2M_BASIC.secret)],
        None,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("opaque"), "{out}");
    assert!(out.stdout.contains("SKIPPED"), "{out}");
    assert!(!out.stdout.contains("JWT claims"), "{out}");
}

#[tokio::test]
async fn an_oauth_error_shows_the_server_error_and_exits_1() {
    let idp = OidcServer::start().await;
    let dir = temp_dir("invalid-target");
    let manifest = write(
        &dir,
        "issuer.yaml",
        &discovery_issuer(&idp, M2M_BASIC, "ClientSecretBasic"),
    );
    let args = ["-f", manifest.as_str(), "--resource", UNKNOWN_RESOURCE];
    let env = [("ATO_CLIENT_SECRET", M2M_BASIC.secret)];
    let out = token_command(&args, &env, None).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("400 invalid_target"), "{out}");
    assert!(out.stderr.contains(&idp.token_endpoint()), "{out}");
    assert!(!out.stderr.contains(M2M_BASIC.secret), "{out}");

    let mut json_args = args.to_vec();
    json_args.extend(["--output", "json"]);
    let out = token_command(&json_args, &env, None).await;
    assert_eq!(out.code, Some(1), "{out}");
    let error: Value = serde_json::from_str(&out.stdout).expect("one JSON object");
    assert_eq!(error["ok"], false);
    assert_eq!(error["error"], "invalid_target");
    assert_eq!(error["http_status"], 400);
    assert!(error["error_description"].is_string(), "{out}");
}

#[tokio::test]
async fn missing_credentials_are_a_clear_error_before_any_request() {
    let idp = OidcServer::start().await;
    let dir = temp_dir("no-credentials");
    let manifest = write(
        &dir,
        "issuer.yaml",
        &discovery_issuer(&idp, M2M_BASIC, "ClientSecretBasic"),
    );
    idp.reset_counts().await;
    let out = token_command(&["-f", &manifest, "--resource", ORDERS], &[], None).await;
    assert_eq!(out.code, Some(1), "{out}");
    for expected in [
        "ClientSecretBasic needs a client secret",
        "Secret idp-client, key client-secret",
        "--client-secret-file",
        "ATO_CLIENT_SECRET",
    ] {
        assert!(out.stderr.contains(expected), "missing {expected:?}: {out}");
    }
    assert_eq!(idp.token_requests().await.total, 0);

    let not_an_issuer = write(&dir, "secret.yaml", "apiVersion: v1\nkind: Secret\n");
    let out = token_command(&["-f", &not_an_issuer, "--resource", ORDERS], &[], None).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(
        out.stderr.contains("no TokenIssuer or ClusterTokenIssuer"),
        "{out}"
    );
}

#[tokio::test]
async fn private_key_jwt_with_a_key_file_or_a_jwk_in_the_environment() {
    let idp = OidcServer::start().await;
    let dir = temp_dir("private-key-jwt");

    // RS256, PKCS#8 PEM from a file; discovery; the assertion's aud is the issuer.
    let rsa = idp.client_private_key(M2M_JWT_RS256.id).await;
    let key_file = write(&dir, "client-key.pem", &rsa.pem);
    let manifest = write(
        &dir,
        "rs256.yaml",
        &format!(
            "apiVersion: audiencetoken.io/v1alpha1
kind: TokenIssuer
metadata: {{name: jwt-idp, namespace: shop}}
spec:
  issuerURL: {issuer}
  clientID: {id}
  clientAuth:
    method: PrivateKeyJWT
    privateKeyRef: {{name: idp-key, key: key.pem}}
    keyID: {kid}
",
            issuer = idp.issuer,
            id = M2M_JWT_RS256.id,
            kid = rsa.kid
        ),
    );
    let out = token_command(
        &[
            "-f",
            &manifest,
            "--resource",
            ORDERS,
            "--private-key-file",
            &key_file,
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("PASS"), "{out}");
    assert!(
        out.stdout.contains(&format!(
            "PrivateKeyJWT, RS256, kid {}, assertion aud {}",
            rsa.kid, idp.issuer
        )),
        "{out}"
    );
    assert!(out.stdout.contains("credential from file"), "{out}");
    assert!(jwts_in(&out.stdout).is_empty(), "token printed: {out}");
    assert!(!out.stdout.contains("PRIVATE KEY"), "{out}");

    // ES256, a private JWK from ATO_PRIVATE_KEY; tokenEndpoint; aud is the token endpoint.
    let ec = idp.client_private_key(M2M_JWT_ES256.id).await;
    let manifest = write(
        &dir,
        "es256.yaml",
        &format!(
            "apiVersion: audiencetoken.io/v1alpha1
kind: ClusterTokenIssuer
metadata: {{name: jwt-idp}}
spec:
  tokenEndpoint: {endpoint}
  clientID: {id}
  clientAuth:
    method: PrivateKeyJWT
    privateKeyRef: {{name: idp-key, key: key.json}}
    assertionAudience: TokenEndpoint
",
            endpoint = idp.token_endpoint(),
            id = M2M_JWT_ES256.id
        ),
    );
    let jwk = ec.jwk.to_string();
    let out = token_command(
        &["-f", &manifest, "--resource", PAYMENTS, "--output", "json"],
        &[("ATO_PRIVATE_KEY", jwk.as_str())],
        None,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    let report: Value = serde_json::from_str(&out.stdout).expect("one JSON object");
    assert_eq!(report["audience_check"]["result"], "PASS", "{out}");
    assert_eq!(report["claims"]["client_id"], M2M_JWT_ES256.id);
    assert_eq!(report["credential_source"], "env ATO_PRIVATE_KEY");
    assert_eq!(
        report["client_auth"],
        format!(
            "PrivateKeyJWT, ES256, kid {}, assertion aud {}",
            ec.kid,
            idp.token_endpoint()
        )
    );

    // No key at all.
    let out = token_command(&["-f", &manifest, "--resource", PAYMENTS], &[], None).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("--private-key-file"), "{out}");
    assert!(out.stderr.contains("ATO_PRIVATE_KEY"), "{out}");
}

/// `--dpop ES256`: the command asks for a DPoP-bound token with a new key and shows the
/// key's thumbprint beside the token's `cnf`; the check passes only when they match.
#[tokio::test]
async fn dpop_shows_the_key_thumbprint_and_the_tokens_cnf() {
    let idp = OidcServer::start().await;
    let dir = temp_dir("dpop");
    let manifest = write(
        &dir,
        "issuer.yaml",
        &discovery_issuer(&idp, M2M_DPOP, "ClientSecretBasic"),
    );
    let out = token_command(
        &[
            "-f",
            &manifest,
            "--resource",
            ORDERS,
            "--dpop",
            "ES256",
            "--output",
            "json",
        ],
        &[("ATO_CLIENT_SECRET", M2M_DPOP.secret)],
        None,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    let report: Value = serde_json::from_str(&out.stdout).expect("one JSON object");
    assert_eq!(report["ok"], true, "{out}");
    assert_eq!(report["token_type"], "DPoP");
    let jkt = report["dpop_jkt"].as_str().expect("dpop_jkt");
    assert_eq!(report["cnf"]["jkt"], jkt, "{out}");
    assert_eq!(report["claims"]["cnf"]["jkt"], jkt);

    // Without --dpop the same client is refused: its tokens must be DPoP-bound.
    let out = token_command(
        &["-f", &manifest, "--resource", ORDERS],
        &[("ATO_CLIENT_SECRET", M2M_DPOP.secret)],
        None,
    )
    .await;
    assert_eq!(out.code, Some(1), "{out}");

    // none/HMAC are refused before any request.
    let out = token_command(
        &["-f", &manifest, "--resource", ORDERS, "--dpop", "HS256"],
        &[("ATO_CLIENT_SECRET", M2M_DPOP.secret)],
        None,
    )
    .await;
    assert_eq!(out.code, Some(2), "{out}");
    assert!(out.stderr.contains("asymmetric"), "{out}");
}

/// An issuer with `tlsClientCertificate`: the command presents the certificate from
/// `--client-certificate-file`/`--client-key-file`, uses the server's mTLS alias, and shows
/// the certificate's thumbprint beside the token's `cnf`. Without the files it says which
/// flags to give, before any request.
#[tokio::test]
async fn mutual_tls_shows_the_certificate_thumbprint_and_the_tokens_cnf() {
    let pki = support::certs::TestPki::generate();
    let self_signed = support::certs::self_signed("m2m-self-signed");
    let idp = OidcServer::start_mtls(&pki, &self_signed).await;
    let dir = temp_dir("mtls");
    let certificate = pki.client("m2m-tls");
    let cert_file = write(&dir, "tls.crt", &certificate.cert_pem);
    let key_file = write(&dir, "tls.key", &certificate.key_pem);
    let ca = pki
        .ca_pem
        .lines()
        .map(|l| format!("    {l}"))
        .collect::<Vec<_>>()
        .join("\n");
    let manifest = write(
        &dir,
        "issuer.yaml",
        &format!(
            "apiVersion: audiencetoken.io/v1alpha1
kind: TokenIssuer
metadata:
  name: mtls-idp
  namespace: shop
spec:
  issuerURL: {issuer}
  clientID: {id}
  caBundle: |
{ca}
  clientAuth:
    method: TLSClientAuth
  tlsClientCertificate:
    secretRef:
      name: m2m-tls-cert
",
            issuer = idp.issuer,
            id = M2M_TLS.id
        ),
    );
    let out = token_command(
        &[
            "-f",
            &manifest,
            "--resource",
            ORDERS,
            "--client-certificate-file",
            &cert_file,
            "--client-key-file",
            &key_file,
            "--output",
            "json",
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    let report: Value = serde_json::from_str(&out.stdout).expect("one JSON object");
    assert_eq!(report["ok"], true, "{out}");
    assert_eq!(
        report["token_endpoint"].as_str(),
        idp.mtls_token_endpoint.as_deref(),
        "the mTLS alias: {out}"
    );
    assert_eq!(
        report["client_certificate_thumbprint"], certificate.thumbprint,
        "{out}"
    );
    assert_eq!(report["cnf"]["x5t#S256"], certificate.thumbprint, "{out}");
    assert!(
        !out.stdout
            .contains(certificate.key_pem.lines().nth(1).unwrap()),
        "the key is never printed"
    );

    // The text report names the certificate and the cnf.
    let out = token_command(
        &[
            "-f",
            &manifest,
            "--resource",
            ORDERS,
            "--client-certificate-file",
            &cert_file,
            "--client-key-file",
            &key_file,
        ],
        &[],
        None,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains(&certificate.thumbprint), "{out}");
    assert!(out.stdout.contains("x5t#S256"), "{out}");

    // No certificate files: a clear error before any request.
    idp.reset_counts().await;
    let out = token_command(&["-f", &manifest, "--resource", ORDERS], &[], None).await;
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("--client-certificate-file"), "{out}");
    assert_eq!(idp.token_requests().await.total, 0);
}

/// `--authorization-details FILE`: the details go into the token request (the issuer's
/// `authorizationDetailsIn`, here the default TokenRequest) and the report shows what the
/// server granted; a file that is not an array of typed objects is refused before any
/// request.
#[tokio::test]
async fn authorization_details_are_sent_and_the_grant_is_shown() {
    let idp = OidcServer::start().await;
    let dir = temp_dir("rar");
    let manifest = write(
        &dir,
        "issuer.yaml",
        &discovery_issuer(&idp, M2M_BASIC, "ClientSecretBasic"),
    );
    let wanted = serde_json::json!([support::scenarios::authorization_details::helseid(
        "999977775",
        "999977776"
    )]);
    let details = write(&dir, "details.json", &wanted.to_string());
    let out = token_command(
        &[
            "-f",
            &manifest,
            "--resource",
            ORDERS,
            "--authorization-details",
            &details,
            "-o",
            "json",
        ],
        &[("ATO_CLIENT_SECRET", M2M_BASIC.secret)],
        None,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    let report: Value = serde_json::from_str(&out.stdout).expect("one JSON object");
    assert_eq!(report["authorization_details"], wanted, "{out}");

    let bad = write(&dir, "bad.json", r#"{"type":"helseid_authorization"}"#);
    idp.reset_counts().await;
    let out = token_command(
        &[
            "-f",
            &manifest,
            "--resource",
            ORDERS,
            "--authorization-details",
            &bad,
        ],
        &[("ATO_CLIENT_SECRET", M2M_BASIC.secret)],
        None,
    )
    .await;
    assert_ne!(out.code, Some(0), "{out}");
    assert!(out.stderr.contains("JSON array"), "{out}");
    assert_eq!(idp.token_requests().await.total, 0);
}

/// A ServiceAccount token of `account` in `namespace`, minted by `double` for `audience`.
async fn mint(
    double: &support::kube_double::KubeApiDouble,
    namespace: &str,
    account: &str,
    audience: &str,
) -> String {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    use kube::api::{Api, PostParams};
    let accounts: Api<ServiceAccount> = Api::namespaced(double.client(), namespace);
    let mut sa = ServiceAccount::default();
    sa.metadata.name = Some(account.into());
    accounts
        .create(&PostParams::default(), &sa)
        .await
        .expect("create ServiceAccount");
    let request = TokenRequest {
        spec: TokenRequestSpec {
            audiences: vec![audience.into()],
            expiration_seconds: Some(600),
            bound_object_ref: None,
        },
        ..TokenRequest::default()
    };
    accounts
        .create_token_request(account, &PostParams::default(), &request)
        .await
        .expect("mint")
        .status
        .expect("a token")
        .token
}

/// Secretless issuers: a ServiceAccount token (what `kubectl create token` prints) as the
/// client assertion, from a file, and as a token exchange's subject token, from the
/// environment. Without one the command says how to make it.
#[tokio::test]
async fn service_account_tokens_from_a_file_or_the_environment() {
    let double = support::kube_double::KubeApiDouble::start().await;
    let namespace = "tokencmd";
    let idp = OidcServer::start_federated(&Federation {
        issuer: support::kube_double::KubeApiDouble::SERVICE_ACCOUNT_ISSUER.into(),
        keys: FederationKeys::Uri(double.service_account_jwks_uri()),
        namespace: namespace.into(),
    })
    .await;
    let dir = temp_dir("service-account");
    let federated = write(
        &dir,
        "federated.yaml",
        &format!(
            "apiVersion: audiencetoken.io/v1alpha1
kind: TokenIssuer
metadata: {{name: federated, namespace: {namespace}}}
spec:
  issuerURL: {issuer}
  clientID: {id}
  clientAuth:
    method: ServiceAccountToken
    serviceAccountRef: {{name: {FEDERATED_SERVICE_ACCOUNT}}}
",
            issuer = idp.issuer,
            id = M2M_FEDERATED.id
        ),
    );
    let args = [
        "-f",
        &federated,
        "--resource",
        ORDERS,
        "--scope",
        "orders/read",
    ];
    let out = token_command(&args, &[], None).await;
    assert_eq!(out.code, Some(1), "{out}");
    let hint = format!(
        "kubectl create token {FEDERATED_SERVICE_ACCOUNT} -n {namespace} --audience {} --duration 10m",
        idp.issuer
    );
    assert!(out.stderr.contains(&hint), "missing {hint:?}: {out}");
    assert_eq!(idp.token_requests().await.total, 0);

    let sa_token = mint(&double, namespace, FEDERATED_SERVICE_ACCOUNT, &idp.issuer).await;
    let file = write(&dir, "sa.jwt", &format!("{sa_token}\n"));
    let mut with_file = args.to_vec();
    with_file.extend(["--service-account-token-file", &file]);
    let out = token_command(&with_file, &[], None).await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(out.stdout.contains("ServiceAccountToken"), "{out}");
    assert!(out.stdout.contains(&format!("file {file}")), "{out}");
    assert!(!out.stdout.contains(&sa_token) && !out.stderr.contains(&sa_token));
    assert_eq!(
        idp.secrets_seen().await.service_account_tokens,
        vec![sa_token.clone()],
        "the file's token was the assertion"
    );

    let exchange = write(
        &dir,
        "exchange.yaml",
        &format!(
            "apiVersion: audiencetoken.io/v1alpha1
kind: TokenIssuer
metadata: {{name: exchange, namespace: {namespace}}}
spec:
  issuerURL: {issuer}
  clientID: {id}
  clientAuth: {{method: None}}
  grant:
    type: TokenExchange
    tokenExchange:
      serviceAccountRef: {{name: {EXCHANGE_SERVICE_ACCOUNT}}}
      requestedTokenType: {TOKEN_TYPE_JWT}
",
            issuer = idp.issuer,
            id = M2M_EXCHANGE.id
        ),
    );
    let subject = mint(&double, namespace, EXCHANGE_SERVICE_ACCOUNT, &idp.issuer).await;
    let out = token_command(
        &["-f", &exchange, "--resource", PAYMENTS, "-o", "json"],
        &[("ATO_SERVICE_ACCOUNT_TOKEN", &subject)],
        None,
    )
    .await;
    assert_eq!(out.code, Some(0), "{out}");
    assert!(
        out.stdout.contains("token exchange (RFC 8693)")
            && out.stdout.contains("env ATO_SERVICE_ACCOUNT_TOKEN"),
        "{out}"
    );
    assert!(!out.stdout.contains(&subject), "{out}");
    let report: Value = serde_json::from_str(&out.stdout).expect("JSON report");
    let claims = &report["claims"];
    assert_eq!(claims["aud"], PAYMENTS, "{report}");
    assert_eq!(
        claims["sub"],
        format!("system:serviceaccount:{namespace}:{EXCHANGE_SERVICE_ACCOUNT}").as_str(),
        "{report}"
    );
}
