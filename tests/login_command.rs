//! `audience-token-operator login` without a cluster (`--output FILE`), against the test
//! authorization server, whose login and consent pages the test fills in as a browser
//! would: the file it writes, and the errors a person can act on. The chain it bootstraps
//! in a cluster is `tests/support/scenarios/login.rs` (in `tests/controller.rs` and e2e).
//!
//! Needs Node.js and `npm ci --prefix tests/oidc-server`.

mod support;

use std::path::PathBuf;

use serde_json::{Value, json};
use support::oidc::{self, OidcServer};
use support::scenarios::authorization_details::helseid;
use support::scenarios::claims;
use support::scenarios::login::{LOGIN_ACCOUNT, LOGIN_CLIENT_SECRET, login_command};

/// A fresh directory for one test's files.
fn temp_dir(test: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("login_command-{}-{test}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("create temp dir");
    dir
}

/// A RefreshToken TokenIssuer manifest for `client_id` at the test server.
fn manifest(
    idp: &OidcServer,
    dir: &std::path::Path,
    client_id: &str,
    resources: &[&str],
) -> PathBuf {
    let text = serde_yaml::to_string(&json!({
        "apiVersion": "audiencetoken.io/v1alpha1",
        "kind": "TokenIssuer",
        "metadata": {"name": "idp", "namespace": "shop"},
        "spec": {
            "issuerURL": idp.issuer,
            "clientID": client_id,
            "clientAuth": {"method": "ClientSecretBasic", "clientSecretRef": {"name": "c", "key": "k"}},
            "grant": {"type": "RefreshToken", "refreshToken": {
                "bootstrapSecretRef": {"name": "idp-bootstrap", "key": "refresh-token"},
                "resources": resources
            }}
        }
    }))
    .expect("YAML");
    let path = dir.join(format!("{client_id}.yaml"));
    std::fs::write(&path, text).expect("write manifest");
    path
}

/// `--output FILE`: the refresh token goes into a 0600 file, covers every resource of the
/// chain, and is never printed; the report names the user and what was granted.
#[tokio::test]
async fn login_writes_a_private_file_for_every_resource() {
    let idp = OidcServer::start().await;
    let dir = temp_dir("file");
    let manifest = manifest(&idp, &dir, "login-client", &[oidc::ORDERS, oidc::PAYMENTS]);
    let file = dir.join("refresh-token");
    // RFC 9396 details for the organisation, in the pushed authorization request.
    let details = dir.join("details.json");
    let organisation = json!([helseid("999999999", "888888888")]);
    std::fs::write(&details, organisation.to_string()).unwrap();
    let run = login_command(
        &manifest,
        &[
            "--output",
            file.to_str().unwrap(),
            "--scope",
            "orders/read payments/read",
            "--authorization-details",
            details.to_str().unwrap(),
        ],
        &[("ATO_CLIENT_SECRET", LOGIN_CLIENT_SECRET)],
        true,
    )
    .await;
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let report: Value = serde_json::from_str(&run.stdout).expect("JSON report");
    assert_eq!(report["subject"], LOGIN_ACCOUNT);
    assert!(report["written_to"].as_str().unwrap().contains("mode 0600"));
    let refresh_token = std::fs::read_to_string(&file).expect("the file");
    assert!(!run.stdout.contains(&refresh_token) && !run.stderr.contains(&refresh_token));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(&file).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    // The grant covers both resources: the second one's token comes from the same chain.
    let login_client = oidc::TestClient {
        id: "login-client",
        secret: LOGIN_CLIENT_SECRET,
        method: oidc::AuthMethod::ClientSecretBasic,
    };
    let (status, answer) = idp
        .spend_refresh_token(&login_client, &refresh_token, oidc::PAYMENTS)
        .await;
    assert_eq!(status, 200, "{answer}");
    let access = answer["access_token"].as_str().expect("access token");
    assert_eq!(claims(access)["aud"], json!(oidc::PAYMENTS));
    assert_eq!(
        answer["authorization_details"], organisation,
        "the grant carries the login's authorization details"
    );
}

/// A PrivateKeyJWT client (as HelseID's): a new assertion at the PAR endpoint and at the
/// token endpoint, the key from `ATO_PRIVATE_KEY`.
#[tokio::test]
async fn login_with_private_key_jwt_at_the_par_and_token_endpoints() {
    let idp = OidcServer::start().await;
    let dir = temp_dir("jwt");
    let text = serde_yaml::to_string(&json!({
        "apiVersion": "audiencetoken.io/v1alpha1",
        "kind": "TokenIssuer",
        "metadata": {"name": "idp", "namespace": "shop"},
        "spec": {
            "issuerURL": idp.issuer,
            "clientID": "login-jwt",
            "clientAuth": {"method": "PrivateKeyJWT", "privateKeyRef": {"name": "k", "key": "k"}},
            "grant": {"type": "RefreshToken", "refreshToken": {
                "bootstrapSecretRef": {"name": "idp-bootstrap", "key": "refresh-token"},
                "resources": [oidc::ORDERS, oidc::PAYMENTS]
            }}
        }
    }))
    .expect("YAML");
    let manifest = dir.join("login-jwt.yaml");
    std::fs::write(&manifest, text).unwrap();
    let key = idp.client_private_key("login-jwt").await;
    let file = dir.join("refresh-token");
    idp.reset_counts().await;
    let run = login_command(
        &manifest,
        &["--output", file.to_str().unwrap()],
        &[("ATO_PRIVATE_KEY", key.pem.as_str())],
        true,
    )
    .await;
    assert_eq!(run.code, Some(0), "{}\n{}", run.stdout, run.stderr);
    let report: Value = serde_json::from_str(&run.stdout).expect("JSON report");
    assert_eq!(report["pushed_authorization_request"], true);
    assert_eq!(report["subject"], LOGIN_ACCOUNT);
    // The PAR endpoint authenticates the client too (oidc-provider refuses a pushed request
    // without it), so `pushed` means the assertion there was accepted; the test server
    // records the one it received at the token endpoint.
    let seen = idp.secrets_seen().await;
    assert_eq!(
        seen.client_assertions.len(),
        1,
        "the code redemption's assertion"
    );
    assert!(!std::fs::read_to_string(&file).unwrap().is_empty());
}

/// What a person can fix, said before or instead of a silent failure: no browser answer in
/// time, a resource the server does not know, a redirect URI the client did not register, a
/// client that gets no refresh token, an issuer that does not use the RefreshToken grant.
#[tokio::test]
async fn login_explains_what_a_person_can_fix() {
    let idp = OidcServer::start().await;
    let dir = temp_dir("errors");
    let secret = [("ATO_CLIENT_SECRET", LOGIN_CLIENT_SECRET)];
    let file = dir.join("refresh-token");
    let output = ["--output", file.to_str().unwrap()];

    let login = manifest(&idp, &dir, "login-client", &[oidc::ORDERS]);
    let timeout: Vec<&str> = output.iter().copied().chain(["--timeout", "1s"]).collect();
    let run = login_command(&login, &timeout, &secret, false).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("no answer from the browser within"),
        "{}",
        run.stderr
    );

    let unknown = manifest(&idp, &dir, "login-client", &[oidc::UNKNOWN_RESOURCE]);
    let run = login_command(&unknown, &output, &secret, false).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("invalid_target"), "{}", run.stderr);
    assert!(run.stderr.contains("resource indicators"), "{}", run.stderr);

    // login-web registers only a web redirect URI.
    let unregistered = manifest(&idp, &dir, "login-web", &[oidc::ORDERS]);
    let run = login_command(
        &unregistered,
        &output,
        &[("ATO_CLIENT_SECRET", "login-web-secret")],
        false,
    )
    .await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("the PAR endpoint answered"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("register http://127.0.0.1:"),
        "{}",
        run.stderr
    );

    // m2m-refresh may not use the authorization code flow at all.
    let machine = manifest(&idp, &dir, oidc::M2M_REFRESH.id, &[oidc::ORDERS]);
    let run = login_command(
        &machine,
        &output,
        &[("ATO_CLIENT_SECRET", oidc::M2M_REFRESH.secret)],
        false,
    )
    .await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("not allowed the authorization code flow"),
        "{}",
        run.stderr
    );

    // Details the server refuses: the PAR answer says why.
    let details = dir.join("bad-details.json");
    std::fs::write(&details, r#"[{"type":"helseid_authorization"}]"#).unwrap();
    let with_details: Vec<&str> = output
        .iter()
        .copied()
        .chain(["--authorization-details", details.to_str().unwrap()])
        .collect();
    let run = login_command(&login, &with_details, &secret, false).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("invalid_authorization_details"),
        "{}",
        run.stderr
    );

    let no_offline = manifest(&idp, &dir, "login-no-offline", &[oidc::ORDERS]);
    let run = login_command(
        &no_offline,
        &output,
        &[("ATO_CLIENT_SECRET", "login-no-offline-secret")],
        true,
    )
    .await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("no refresh token"), "{}", run.stderr);
    assert!(!file.exists(), "nothing written");

    let client_credentials = dir.join("cc.yaml");
    std::fs::write(
        &client_credentials,
        format!(
            "apiVersion: audiencetoken.io/v1alpha1\nkind: TokenIssuer\nmetadata: {{name: cc}}\nspec:\n  issuerURL: {}\n  clientID: m2m-basic\n  clientAuth: {{method: None}}\n",
            idp.issuer
        ),
    )
    .unwrap();
    idp.reset_counts().await;
    let run = login_command(&client_credentials, &output, &[], false).await;
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(run.stderr.contains("RefreshToken grant"), "{}", run.stderr);
    assert_eq!(idp.token_requests().await.total, 0);
}
