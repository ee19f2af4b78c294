//! `kubectl audtoken`, the kubectl plugin: the binary linked as `kubectl-audtoken` (it
//! dispatches on its name), run with a user's kubeconfig against the operator's tokens.
//! `status` of a healthy, a failing and an expired token with their exit codes, `renew
//! --wait` that waits for the new token (and reports a refused one), `inspect` that shows
//! claims and never the token, `list` sorted by expiry.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::process::Command;

use super::super::oidc;
use super::{READY_TIMEOUT, TestEnv};

/// The binary under the plugin's name, in a directory of its own (what a user puts on
/// PATH); removed when dropped.
pub struct Plugin {
    dir: PathBuf,
    kubeconfig: PathBuf,
}

/// What one run printed and how it exited.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Plugin {
    /// Links the operator binary as `kubectl-audtoken`, to run with `kubeconfig`.
    pub fn install(kubeconfig: &Path) -> Plugin {
        let dir = std::env::temp_dir().join(format!(
            "ato-plugin-{}-{}",
            std::process::id(),
            kubeconfig
                .file_name()
                .and_then(|f| f.to_str())
                .unwrap_or("kubeconfig")
        ));
        std::fs::create_dir_all(&dir).expect("plugin dir");
        let link = dir.join("kubectl-audtoken");
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(env!("CARGO_BIN_EXE_audience-token-operator"), &link)
            .expect("link kubectl-audtoken");
        Plugin {
            dir,
            kubeconfig: kubeconfig.to_path_buf(),
        }
    }

    /// Runs `kubectl-audtoken ARGS --kubeconfig … -n namespace`.
    pub async fn run(&self, namespace: &str, args: &[&str]) -> Run {
        let output = tokio::time::timeout(
            Duration::from_secs(120),
            Command::new(self.dir.join("kubectl-audtoken"))
                .args(args)
                .arg("--kubeconfig")
                .arg(&self.kubeconfig)
                .args(["-n", namespace])
                .kill_on_drop(true)
                .output(),
        )
        .await
        .expect("kubectl-audtoken finished in time")
        .expect("run kubectl-audtoken");
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// Runs with `-o json` and parses the output.
    pub async fn json(&self, namespace: &str, args: &[&str]) -> (i32, Value) {
        let mut with_output = args.to_vec();
        with_output.extend(["-o", "json"]);
        let run = self.run(namespace, &with_output).await;
        let value = serde_json::from_str(&run.stdout).unwrap_or_else(|e| {
            panic!("{args:?}: not JSON ({e}):\n{}\n{}", run.stdout, run.stderr)
        });
        (run.code, value)
    }
}

impl Drop for Plugin {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl std::fmt::Display for Run {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "exit {}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }
}

/// The whole tour, on its own issuers and tokens (`kubeconfig` is a user's, not the
/// operator's).
pub async fn kubectl_plugin(env: &TestEnv, kubeconfig: &Path) {
    let plugin = Plugin::install(kubeconfig);
    let ns = env.namespace.as_str();
    env.create_issuer("plugin-idp", &oidc::M2M_BASIC, oidc::M2M_BASIC.secret)
        .await;
    env.create_issuer("plugin-fragile", &oidc::M2M_POST, oidc::M2M_POST.secret)
        .await;
    env.issue_token(
        "plugin-healthy",
        "plugin-idp",
        oidc::ORDERS,
        &["orders/read"],
    )
    .await;
    env.issue_token(
        "plugin-kept",
        "plugin-fragile",
        oidc::ORDERS,
        &["orders/read"],
    )
    .await;
    env.issue_token(
        "plugin-expiring",
        "plugin-fragile",
        oidc::SHORT_LIVED,
        &["short/read"],
    )
    .await;

    // status of a healthy token: exit 0, and what cmctl would say.
    let status = plugin.run(ns, &["status", "plugin-healthy"]).await;
    assert_eq!(status.code, 0, "{status}");
    for part in [
        "Ready:        True (Issued)",
        "Issuer:       TokenIssuer plugin-idp: Ready True (Ready)",
        oidc::ORDERS,
        "requested orders/read; granted orders/read",
        "Token type:   Bearer",
        "Secret:       plugin-healthy",
        "Failures:     none since the last success",
    ] {
        assert!(status.stdout.contains(part), "{part:?} in\n{status}");
    }
    let expires = status
        .stdout
        .lines()
        .find(|l| l.starts_with("Expires:"))
        .unwrap_or_default();
    assert!(
        expires.contains("Z (in "),
        "absolute and relative: {expires}"
    );
    let issued_event = status
        .stdout
        .lines()
        .skip_while(|l| !l.starts_with("Events:"))
        .take_while(|l| !l.starts_with("Events of"))
        .any(|l| l.contains("Normal") && l.contains("Issued"));
    assert!(issued_event, "the Issued Event is listed:\n{status}");
    let (code, json) = plugin.json(ns, &["status", "plugin-healthy"]).await;
    assert_eq!(
        (code, json["health"].as_str()),
        (0, Some("healthy")),
        "{json}"
    );
    assert_eq!(json["audience"], oidc::ORDERS);
    assert_eq!(json["issuer"]["ready"]["status"], "True");

    // inspect: the claims, checked against the spec, never the token.
    let token = env.token_in("plugin-healthy").await;
    let inspect = plugin.run(ns, &["inspect", "plugin-healthy"]).await;
    assert_eq!(inspect.code, 0, "{inspect}");
    assert!(
        !inspect.stdout.contains(&token),
        "the token itself is printed:\n{inspect}"
    );
    let signature = token.rsplit('.').next().unwrap_or_default();
    assert!(
        !inspect.stdout.contains(signature) && !inspect.stderr.contains(signature),
        "part of the token is printed"
    );
    let aud = format!("\"aud\": \"{}\"", oidc::ORDERS);
    for part in [
        aud.as_str(),
        "\"scope\": \"orders/read\"",
        "[ok] audience",
        "[ok] scopes",
        "[ok] expiry",
        "[ok] issued for the current spec",
        "The token is what the AudienceToken asks for.",
    ] {
        assert!(inspect.stdout.contains(part), "{part:?} in\n{inspect}");
    }
    let (_, inspected) = plugin.json(ns, &["inspect", "plugin-healthy"]).await;
    assert_eq!(inspected["claims"]["aud"], oidc::ORDERS);
    assert_eq!(inspected["asAsked"], true);
    assert!(!inspected.to_string().contains(&token));

    // renew --wait: returns once the new token is published.
    let renew = plugin
        .run(
            ns,
            &["renew", "plugin-healthy", "--wait", "--timeout", "60s"],
        )
        .await;
    assert_eq!(renew.code, 0, "{renew}");
    assert!(renew.stdout.contains("renewed"), "{renew}");
    let renewed = env.token_in("plugin-healthy").await;
    assert_ne!(
        renewed, token,
        "renew --wait returned before a new token was published"
    );

    // The fragile issuer goes away: its tokens' renewals now fail.
    env.issuers()
        .delete("plugin-fragile", &Default::default())
        .await
        .expect("delete TokenIssuer plugin-fragile");
    // A refused renewal: renew --wait reports it (exit 3), the valid token is kept.
    let kept_token = env.token_in("plugin-kept").await;
    let refused = plugin
        .run(ns, &["renew", "plugin-kept", "--wait", "--timeout", "60s"])
        .await;
    assert_eq!(refused.code, 3, "{refused}");
    assert!(refused.stdout.contains("failed"), "{refused}");
    assert!(refused.stdout.contains("IssuerNotReady"), "{refused}");
    assert_eq!(env.token_in("plugin-kept").await, kept_token);
    let failing = plugin.run(ns, &["status", "plugin-kept"]).await;
    assert_eq!(failing.code, 3, "valid but failing: {failing}");
    for part in [
        "Ready:        True (IssuerNotReady)",
        "renewal failing",
        "Issuer:       TokenIssuer plugin-fragile: cannot read it",
        "Failures:     IssuerNotReady: ",
    ] {
        assert!(failing.stdout.contains(part), "{part:?} in\n{failing}");
    }
    let failed_event = failing
        .stdout
        .lines()
        .any(|l| l.contains("Warning") && l.contains("IssuerNotReady"));
    assert!(failed_event, "the Warning Event is listed:\n{failing}");

    // The short-lived token cannot be renewed either and expires (6 s).
    env.wait_condition(
        "plugin-expiring",
        "False",
        "Expired",
        READY_TIMEOUT + Duration::from_secs(30),
    )
    .await;
    let expired = plugin.run(ns, &["status", "plugin-expiring"]).await;
    assert_eq!(expired.code, 2, "not Ready: {expired}");
    assert!(
        expired.stdout.contains("Ready:        False (Expired)"),
        "{expired}"
    );
    let expires = expired
        .stdout
        .lines()
        .find(|l| l.starts_with("Expires:"))
        .unwrap_or_default();
    assert!(
        expires.contains(" ago)") || expires.contains("(now)"),
        "expired, not in the future: {expires}"
    );
    let inspect_expired = plugin.run(ns, &["inspect", "plugin-expiring"]).await;
    assert_eq!(inspect_expired.code, 4, "{inspect_expired}");
    assert!(
        inspect_expired.stdout.contains("[FAIL] expiry"),
        "{inspect_expired}"
    );

    // list: the columns, time left, soonest expiry first.
    let list = plugin.run(ns, &["list"]).await;
    assert_eq!(list.code, 0, "{list}");
    let header = list.stdout.lines().next().unwrap_or_default();
    for column in [
        "NAME",
        "READY",
        "REASON",
        "RESOURCE",
        "EXPIRES",
        "RENEWAL",
        "TIME LEFT",
        "AGE",
    ] {
        assert!(header.contains(column), "{column} in {header}");
    }
    let (_, rows) = plugin.json(ns, &["list"]).await;
    let names: Vec<&str> = rows
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|r| r["name"].as_str())
        .filter(|n| n.starts_with("plugin-"))
        .collect();
    assert_eq!(
        names.first(),
        Some(&"plugin-expiring"),
        "soonest (here: past) expiry first: {names:?}"
    );
    let lefts: Vec<i64> = rows
        .as_array()
        .expect("a list")
        .iter()
        .filter_map(|r| r["secondsLeft"].as_i64())
        .collect();
    assert!(
        lefts.windows(2).all(|w| w[0] <= w[1]),
        "sorted by expiry: {lefts:?}"
    );
    let all = plugin.run(ns, &["list", "-A", "--sort-by", "name"]).await;
    assert!(all.stdout.starts_with("NAMESPACE"), "{all}");
    assert!(all.stdout.contains(ns), "{all}");

    // Unknown names and bad arguments fail with a message and exit 1.
    let missing = plugin.run(ns, &["status", "no-such-token"]).await;
    assert_eq!(missing.code, 1, "{missing}");
    assert!(missing.stderr.contains("not found"), "{missing}");
    let usage = plugin.run(ns, &["renew"]).await;
    assert_eq!(usage.code, 1, "{usage}");

    // The fragile issuer back, for whatever runs next.
    env.create_issuer("plugin-fragile", &oidc::M2M_POST, oidc::M2M_POST.secret)
        .await;
}
