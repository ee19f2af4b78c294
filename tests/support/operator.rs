//! The operator binary as a child process, the way a user runs it locally: `run` with a
//! kubeconfig. Used against the Kubernetes API double and, in `tests/e2e`, a real cluster.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use tokio::process::{Child, Command};

/// How to run the operator beyond the defaults.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// `--leader-elect` with this Lease duration, and this identity (POD_NAME).
    pub leader_elect: Option<(Duration, String)>,
    /// `--log-format json`.
    pub json_logs: bool,
    /// More `run` arguments, after the others.
    pub extra_args: Vec<String>,
}

/// A running `audience-token-operator run`. Its logs go to a file, printed when a test fails.
pub struct OperatorProcess {
    child: Option<Child>,
    kubeconfig: PathBuf,
    namespace: String,
    log: PathBuf,
    starts: u32,
    options: Options,
    /// `/metrics`, `/healthz` and `/readyz` (one loopback port).
    http_addr: String,
    /// `RUST_LOG` for the process; `None`: the tests' default (debug for the operator).
    log_filter: Option<String>,
    /// Run under `ATO_OPERATOR_WRAPPER`: the child is the wrapper, in its own process
    /// group, and signals go to that group so the operator under it gets them too.
    wrapped: bool,
}

/// Sends `signal` to `pid`, or to its whole process group.
fn send_signal(pid: u32, signal: &str, group: bool) -> std::process::Command {
    let target = if group {
        format!("-{pid}")
    } else {
        pid.to_string()
    };
    let mut command = std::process::Command::new("kill");
    command.args([signal, "--", &target]);
    command
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl OperatorProcess {
    /// Starts the operator watching `namespace`, with its ClusterTokenIssuer Secrets there too.
    pub fn start(kubeconfig: &Path, namespace: &str) -> Self {
        Self::start_with(kubeconfig, namespace, Options::default())
    }

    /// Like [`OperatorProcess::start`], with options. Several operators may watch one
    /// namespace when their leader-election identities differ (each logs to its own file).
    pub fn start_with(kubeconfig: &Path, namespace: &str, options: Options) -> Self {
        Self::start_with_log_filter(kubeconfig, namespace, options, None)
    }

    /// Like [`OperatorProcess::start_with`], with `RUST_LOG` set to `log_filter` (kept across
    /// restarts) instead of the tests' debug-level default, e.g. the binary's own default
    /// `info,kube=warn` for a benchmark.
    pub fn start_with_log_filter(
        kubeconfig: &Path,
        namespace: &str,
        options: Options,
        log_filter: Option<&str>,
    ) -> Self {
        let dir = std::env::temp_dir().join(format!("ato-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let suffix = options
            .leader_elect
            .as_ref()
            .map(|(_, id)| format!("-{id}"))
            .unwrap_or_default();
        let mut operator = OperatorProcess {
            child: None,
            kubeconfig: kubeconfig.to_path_buf(),
            namespace: namespace.to_string(),
            log: dir.join(format!("operator-{namespace}{suffix}.log")),
            starts: 0,
            options,
            http_addr: String::new(),
            log_filter: log_filter.map(str::to_string),
            wrapped: false,
        };
        operator.spawn();
        operator
    }

    /// GET a path of the operator's HTTP endpoints: (status, body); status 0 when nothing
    /// answers.
    pub async fn http_get(&self, path: &str) -> (u16, String) {
        match reqwest::get(format!("http://{}{path}", self.http_addr)).await {
            Ok(response) => {
                let status = response.status().as_u16();
                (status, response.text().await.unwrap_or_default())
            }
            Err(_) => (0, String::new()),
        }
    }

    /// The value of a metric line (name with labels, exactly as exposed), if present.
    pub async fn metric(&self, series: &str) -> Option<f64> {
        let (_, body) = self.http_get("/metrics").await;
        body.lines().find_map(|line| {
            line.strip_prefix(series)
                .and_then(|rest| rest.strip_prefix(' '))
                .and_then(|value| value.trim().parse().ok())
        })
    }

    /// The process id of the running operator (`None` once it was stopped or killed).
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().and_then(Child::id)
    }

    /// Whether the process has exited, and how.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Kills the process at once (SIGKILL), as a node failure would: nothing is released.
    pub async fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let (true, Some(pid)) = (self.wrapped, child.id()) {
                let _ = send_signal(pid, "-KILL", true).status();
            }
            let _ = child.kill().await;
        }
    }

    fn spawn(&mut self) {
        self.starts += 1;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("operator log file");
        self.http_addr = format!("127.0.0.1:{}", free_port());
        let binary = env!("CARGO_BIN_EXE_audience-token-operator");
        // `ATO_OPERATOR_WRAPPER="heaptrack -o /tmp/ato"` runs the operator under a profiler.
        let wrapper = std::env::var("ATO_OPERATOR_WRAPPER").unwrap_or_default();
        let mut wrapper = wrapper.split_whitespace();
        let mut command = match wrapper.next() {
            Some(program) => {
                let mut command = Command::new(program);
                command.args(wrapper).arg(binary).process_group(0);
                command
            }
            None => Command::new(binary),
        };
        self.wrapped = !std::env::var("ATO_OPERATOR_WRAPPER")
            .unwrap_or_default()
            .trim()
            .is_empty();
        command.args([
            "run",
            "--namespace",
            &self.namespace,
            "--cluster-resource-namespace",
            &self.namespace,
            "--metrics-addr",
            &self.http_addr,
            "--health-addr",
            &self.http_addr,
        ]);
        if let Some((duration, identity)) = &self.options.leader_elect {
            command
                .arg("--leader-elect")
                .arg(format!(
                    "--leader-elect-lease-duration={}s",
                    duration.as_secs()
                ))
                .env("POD_NAME", identity);
        }
        if self.options.json_logs {
            command.args(["--log-format", "json"]);
        }
        command.args(&self.options.extra_args);
        let child = command
            .env("KUBECONFIG", &self.kubeconfig)
            .env(
                "RUST_LOG",
                self.log_filter
                    .as_deref()
                    .unwrap_or("info,audience_token_operator=debug,kube=warn"),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .kill_on_drop(true)
            .spawn()
            .expect("start the operator binary");
        self.child = Some(child);
    }

    /// Stops the operator with SIGTERM (waits at most 10 s, then kills it) and returns how
    /// it exited (`None` when it had to be killed).
    pub async fn stop(&mut self) -> Option<std::process::ExitStatus> {
        let mut child = self.child.take()?;
        if let Some(pid) = child.id() {
            let _ = Command::from(send_signal(pid, "-TERM", self.wrapped))
                .status()
                .await;
        }
        match tokio::time::timeout(Duration::from_secs(10), child.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                if let (true, Some(pid)) = (self.wrapped, child.id()) {
                    let _ = send_signal(pid, "-KILL", true).status();
                }
                let _ = child.kill().await;
                None
            }
        }
    }

    /// Starts the operator again after [`kill`](Self::kill) or [`stop`](Self::stop).
    pub fn start_again(&mut self) {
        if self.child.is_none() {
            self.spawn();
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
            if let (true, Some(pid)) = (self.wrapped, child.id()) {
                let _ = send_signal(pid, "-KILL", true).status();
            }
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_file(&self.log);
    }
}
