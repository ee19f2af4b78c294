//! The operator binary as a child process, the way a user runs it locally: `run` with a
//! kubeconfig. Used against the Kubernetes API double and, in `tests/e2e`, a real cluster.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// A running `audience-token-operator run`. Its logs go to a file, printed when a test fails.
pub struct OperatorProcess {
    child: Option<Child>,
    kubeconfig: PathBuf,
    namespace: String,
    log: PathBuf,
    starts: u32,
}

impl OperatorProcess {
    /// Starts the operator watching `namespace`, with its ClusterTokenIssuer Secrets there too.
    pub fn start(kubeconfig: &Path, namespace: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ato-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let mut operator = OperatorProcess {
            child: None,
            kubeconfig: kubeconfig.to_path_buf(),
            namespace: namespace.to_string(),
            log: dir.join(format!("operator-{namespace}.log")),
            starts: 0,
        };
        operator.spawn();
        operator
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("operator log file");
        let child = Command::new(env!("CARGO_BIN_EXE_audience-token-operator"))
            .args([
                "run",
                "--namespace",
                &self.namespace,
                "--cluster-resource-namespace",
                &self.namespace,
            ])
            .env("KUBECONFIG", &self.kubeconfig)
            .env("RUST_LOG", "info,audience_token_operator=debug,kube=warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start the operator binary");
        self.child = Some(child);
    }

    /// Stops the operator with SIGTERM (waits at most 10 s, then kills it).
    pub async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Some(pid) = child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        if tokio::time::timeout(Duration::from_secs(10), child.wait())
            .await
            .is_err()
        {
            let _ = child.kill().await;
        }
    }

    /// Stops and starts the operator again, as a rollout or a crash would.
    pub async fn restart(&mut self) {
        self.stop().await;
        self.spawn();
    }

    /// Everything the operator logged so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for OperatorProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "---- operator log ({}) ----\n{}\n---- end of operator log ----",
                self.log.display(),
                self.logs()
            );
        }
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
