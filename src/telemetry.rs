//! Prometheus metrics (prefix `audience_token_`), served at `/metrics` by [`crate::server`].
//!
//! Labels carry names only (issuer keys, namespaces, AudienceToken names, fixed result
//! words), never a token, credential or server message. Per-token series are removed when
//! the AudienceToken goes, so 10,000 tokens cost 20,000 series and no more.

use std::time::Duration;

use std::collections::BTreeMap;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

use crate::oauth::TokenError;

/// Labels of `requests_total`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    issuer: String,
    grant: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct IssuerLabels {
    issuer: String,
}

/// An AudienceToken's series: one entry per token, the namespace's name shared.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct TokenState {
    expires_at: Option<i64>,
    ready: bool,
    failing: bool,
    /// The Ready condition's reason, one of [`crate::failure::reason::READY_REASONS`] or
    /// `Other`; `""` before the first status.
    reason: &'static str,
}

/// The per-AudienceToken series (`expiry_timestamp_seconds`, `ready`, `failing`), encoded
/// from one map at scrape time. Three label families of their own would hold 10,000 tokens
/// as 20,000 series with two label strings and a gauge allocation each (about 4 MiB); this
/// holds a name and three values per token.
#[derive(Debug, Default)]
struct TokenStates(std::sync::RwLock<BTreeMap<String, BTreeMap<String, TokenState>>>);

const EXPIRY_HELP: &str = "When the token in an AudienceToken's Secret expires (Unix time)";
const READY_HELP: &str = "1 when an AudienceToken's Ready condition is True, else 0";
const CONDITIONS_HELP: &str =
    "AudienceTokens by their Ready condition: its status (True, False) and reason";
const FAILING_HELP: &str = "1 while an AudienceToken's last attempt to issue or renew failed (Ready may still be True: a valid token is kept); no series otherwise";

impl TokenStates {
    fn write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, BTreeMap<String, BTreeMap<String, TokenState>>> {
        self.0
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn set(&self, namespace: &str, name: &str, state: TokenState) {
        let mut states = self.write();
        let tokens = match states.get_mut(namespace) {
            Some(tokens) => tokens,
            None => states.entry(namespace.to_string()).or_default(),
        };
        match tokens.get_mut(name) {
            Some(current) => *current = state,
            None => {
                tokens.insert(name.to_string(), state);
            }
        }
    }

    fn remove(&self, namespace: &str, name: &str) {
        let mut states = self.write();
        if let Some(tokens) = states.get_mut(namespace) {
            tokens.remove(name);
            if tokens.is_empty() {
                states.remove(namespace);
            }
        }
    }

    /// `conditions{ready, reason}`: how many tokens are in each state, counted at scrape
    /// time (a few series, whatever N is).
    fn encode_conditions(&self, encoder: &mut DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut counts: BTreeMap<(&str, &str), i64> = BTreeMap::new();
        {
            let states = self
                .0
                .read()
                .unwrap_or_else(|poisoned| poisoned.into_inner());
            for state in states.values().flat_map(BTreeMap::values) {
                if !state.reason.is_empty() {
                    let ready = if state.ready { "True" } else { "False" };
                    *counts.entry((ready, state.reason)).or_default() += 1;
                }
            }
        }
        let mut family =
            encoder.encode_descriptor("conditions", CONDITIONS_HELP, None, MetricType::Gauge)?;
        for ((ready, reason), count) in counts {
            let labels = [("ready", ready), ("reason", reason)];
            family.encode_family(&labels)?.encode_gauge(&count)?;
        }
        Ok(())
    }

    /// One gauge family: `value` of each token that has one.
    fn encode_family<V: prometheus_client::encoding::EncodeGaugeValue>(
        &self,
        encoder: &mut DescriptorEncoder,
        name: &str,
        help: &str,
        value: impl Fn(&TokenState) -> Option<V>,
    ) -> Result<(), std::fmt::Error> {
        let states = self
            .0
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (namespace, tokens) in states.iter() {
            for (token, state) in tokens {
                if let Some(value) = value(state) {
                    let labels = [("namespace", namespace.as_str()), ("name", token.as_str())];
                    family.encode_family(&labels)?.encode_gauge(&value)?;
                }
            }
        }
        Ok(())
    }
}

impl Collector for TokenStates {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        // Unix seconds fit an f64 exactly.
        #[allow(clippy::cast_precision_loss)]
        self.encode_family(&mut encoder, "expiry_timestamp_seconds", EXPIRY_HELP, |s| {
            s.expires_at.map(|at| at as f64)
        })?;
        self.encode_family(&mut encoder, "ready", READY_HELP, |s| {
            Some(i64::from(s.ready))
        })?;
        self.encode_family(&mut encoder, "failing", FAILING_HELP, |s| {
            s.failing.then_some(1_i64)
        })?;
        self.encode_conditions(&mut encoder)
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

/// The grant a token request used (the `grant` label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GrantLabel {
    /// `client_credentials`.
    ClientCredentials,
    /// `refresh_token`.
    RefreshToken,
    /// `authorization_code` (only the `login` command redeems codes; listed for completeness).
    AuthorizationCode,
    /// `token_exchange` (RFC 8693).
    TokenExchange,
}

impl GrantLabel {
    fn as_str(self) -> &'static str {
        match self {
            GrantLabel::ClientCredentials => "client_credentials",
            GrantLabel::RefreshToken => "refresh_token",
            GrantLabel::AuthorizationCode => "authorization_code",
            GrantLabel::TokenExchange => "token_exchange",
        }
    }
}

/// The `result` label of `requests_total`: a fixed word, never the server's text.
pub fn request_result(outcome: Result<(), &TokenError>) -> &'static str {
    match outcome {
        Ok(()) => "success",
        Err(TokenError::Server { .. }) => "error",
        Err(TokenError::Transport { .. }) => "unreachable",
        Err(_) => "invalid_response",
    }
}

/// The operator's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    request_duration: Family<IssuerLabels, Histogram>,
    tokens: Arc<TokenStates>,
    reconciles: Family<ResultLabels, Counter>,
    refresh_rotations: Family<IssuerLabels, Counter>,
    leader: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics").finish_non_exhaustive()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

fn duration_histogram() -> Histogram {
    // 10 ms to about 20 s: token endpoints answer in tens of milliseconds; timeouts are 10 s.
    Histogram::new([0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0])
}

impl Metrics {
    /// Registers every metric, all at zero.
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("audience_token");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Token requests sent to token endpoints, by issuer, grant and result (success, error: the server refused, unreachable, invalid_response)",
            requests.clone(),
        );
        let request_duration = Family::<IssuerLabels, Histogram>::new_with_constructor(
            duration_histogram as fn() -> Histogram,
        );
        registry.register_with_unit(
            "request_duration",
            "Duration of token requests, by issuer",
            Unit::Seconds,
            request_duration.clone(),
        );
        let tokens = Arc::new(TokenStates::default());
        registry.register_collector(Box::new(tokens.clone()));
        let reconciles = Family::<ResultLabels, Counter>::default();
        registry.register(
            "reconcile",
            "AudienceToken reconciles, by result (success, or error: a Kubernetes API call failed and the reconcile is retried)",
            reconciles.clone(),
        );
        let refresh_rotations = Family::<IssuerLabels, Counter>::default();
        registry.register(
            "refresh_rotations",
            "Refresh tokens rotated by the server and persisted, by issuer",
            refresh_rotations.clone(),
        );
        let leader = Gauge::default();
        registry.register(
            "leader",
            "1 while this replica holds the leader Lease (or runs without leader election), else 0",
            leader.clone(),
        );
        Metrics {
            registry,
            requests,
            request_duration,
            tokens,
            reconciles,
            refresh_rotations,
            leader,
        }
    }

    /// Counts one token request and its duration.
    pub fn token_request(
        &self,
        issuer: &str,
        grant: GrantLabel,
        result: &'static str,
        took: Duration,
    ) {
        self.requests
            .get_or_create(&RequestLabels {
                issuer: issuer.to_string(),
                grant: grant.as_str(),
                result,
            })
            .inc();
        self.request_duration
            .get_or_create(&IssuerLabels {
                issuer: issuer.to_string(),
            })
            .observe(took.as_secs_f64());
    }

    /// Records an AudienceToken's state: when its token expires (if it has one), whether it
    /// is Ready, and whether its last attempt failed (a series only while it did, so 10,000
    /// healthy tokens cost no third series each).
    pub fn token_state(
        &self,
        namespace: &str,
        name: &str,
        expires_at: Option<i64>,
        ready: bool,
        failing: bool,
        reason: Option<&str>,
    ) {
        let state = TokenState {
            expires_at,
            ready,
            failing,
            reason: reason.map_or("", crate::failure::reason::known),
        };
        self.tokens.set(namespace, name, state);
    }

    /// Drops an AudienceToken's series (it was deleted).
    pub fn forget_token(&self, namespace: &str, name: &str) {
        self.tokens.remove(namespace, name);
    }

    /// Counts a reconcile: `Ok` or a Kubernetes API error.
    pub fn reconciled(&self, ok: bool) {
        let result = if ok { "success" } else { "error" };
        self.reconciles
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// Counts a persisted refresh-token rotation.
    pub fn refresh_rotated(&self, issuer: &str) {
        self.refresh_rotations
            .get_or_create(&IssuerLabels {
                issuer: issuer.to_string(),
            })
            .inc();
    }

    /// Records whether this replica leads.
    pub fn set_leader(&self, leader: bool) {
        self.leader.set(i64::from(leader));
    }

    /// The metrics in the text exposition format (OpenMetrics 1.0, which Prometheus
    /// scrapes as it does its own text format).
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_of_the_design_is_exposed_with_its_labels() {
        let metrics = Metrics::new();
        metrics.token_request(
            "TokenIssuer/team-a/idp",
            GrantLabel::ClientCredentials,
            "success",
            Duration::from_millis(30),
        );
        metrics.token_state(
            "team-a",
            "orders",
            Some(1_800_000_000),
            true,
            false,
            Some("Issued"),
        );
        metrics.reconciled(true);
        metrics.refresh_rotated("TokenIssuer/team-a/idp");
        metrics.set_leader(true);
        let text = metrics.encode().unwrap();
        for line in [
            r#"audience_token_requests_total{issuer="TokenIssuer/team-a/idp",grant="client_credentials",result="success"} 1"#,
            r#"audience_token_request_duration_seconds_count{issuer="TokenIssuer/team-a/idp"} 1"#,
            r#"audience_token_expiry_timestamp_seconds{namespace="team-a",name="orders"} 1800000000.0"#,
            r#"audience_token_ready{namespace="team-a",name="orders"} 1"#,
            r#"audience_token_conditions{ready="True",reason="Issued"} 1"#,
            r#"audience_token_reconcile_total{result="success"} 1"#,
            r#"audience_token_refresh_rotations_total{issuer="TokenIssuer/team-a/idp"} 1"#,
            "audience_token_leader 1",
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
    }

    #[test]
    fn a_deleted_token_leaves_no_series() {
        let metrics = Metrics::new();
        metrics.token_state(
            "team-a",
            "orders",
            Some(1_800_000_000),
            true,
            false,
            Some("Issued"),
        );
        metrics.forget_token("team-a", "orders");
        let text = metrics.encode().unwrap();
        assert!(!text.contains(r#"name="orders""#), "{text}");
    }

    #[test]
    fn a_token_without_expiry_has_no_expiry_series_but_a_ready_one() {
        let metrics = Metrics::new();
        metrics.token_state(
            "team-a",
            "orders",
            Some(1_800_000_000),
            true,
            false,
            Some("Issued"),
        );
        metrics.token_state(
            "team-a",
            "orders",
            None,
            false,
            true,
            Some("TokenRequestFailed"),
        );
        let text = metrics.encode().unwrap();
        assert!(!text.contains("expiry_timestamp_seconds{"), "{text}");
        assert!(text.contains(r#"audience_token_ready{namespace="team-a",name="orders"} 0"#));
        assert!(text.contains(r#"audience_token_failing{namespace="team-a",name="orders"} 1"#));
        metrics.token_state(
            "team-a",
            "orders",
            Some(1_800_000_000),
            true,
            false,
            Some("Issued"),
        );
        let text = metrics.encode().unwrap();
        assert!(!text.contains("audience_token_failing{"), "{text}");
    }

    #[test]
    fn tokens_are_counted_by_ready_status_and_reason_with_fixed_words() {
        let metrics = Metrics::new();
        metrics.token_state("a", "one", Some(1), true, false, Some("Issued"));
        metrics.token_state("a", "two", Some(1), true, true, Some("AudienceMismatch"));
        metrics.token_state("b", "three", None, false, true, Some("AudienceMismatch"));
        metrics.token_state("b", "four", None, false, true, Some("edited by hand"));
        metrics.token_state("b", "five", None, false, false, None);
        let text = metrics.encode().unwrap();
        for line in [
            r#"audience_token_conditions{ready="True",reason="Issued"} 1"#,
            r#"audience_token_conditions{ready="True",reason="AudienceMismatch"} 1"#,
            r#"audience_token_conditions{ready="False",reason="AudienceMismatch"} 1"#,
            r#"audience_token_conditions{ready="False",reason="Other"} 1"#,
        ] {
            assert!(text.lines().any(|l| l == line), "missing {line} in\n{text}");
        }
        assert_eq!(
            text.matches("audience_token_conditions{").count(),
            4,
            "{text}"
        );
        metrics.forget_token("a", "one");
        let text = metrics.encode().unwrap();
        assert!(!text.contains(r#"reason="Issued""#), "{text}");
    }

    #[test]
    fn results_are_fixed_words() {
        let server = TokenError::Server {
            status: 400,
            error: "invalid_target".into(),
            description: Some("secret-ish text".into()),
            retry_after: None,
        };
        assert_eq!(request_result(Err(&server)), "error");
        assert_eq!(
            request_result(Err(&TokenError::InvalidResponse("x".into()))),
            "invalid_response"
        );
        assert_eq!(request_result(Ok(())), "success");
    }
}
