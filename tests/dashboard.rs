//! The Grafana dashboard the chart ships
//! (`charts/audience-token-operator/dashboards/audience-token-operator.json`) is valid JSON,
//! every query in it names only metrics the operator exports (with labels they carry), and
//! it shows what issue 14 asks for. A renamed metric or a typo in a query would otherwise
//! show up only as an empty panel in someone's Grafana.
//!
//! The exported names come from the operator's own registry
//! ([`audience_token_operator::telemetry::Metrics`]), not from a list kept here.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::time::Duration;

use audience_token_operator::telemetry::{GrantLabel, Metrics};
use serde_json::Value;

const DASHBOARD: &str = "charts/audience-token-operator/dashboards/audience-token-operator.json";

/// Labels Prometheus adds to every series from the target (a ServiceMonitor's `job`,
/// `instance`, `namespace`, `pod`, `service`, `container`, `endpoint`), which queries may
/// select or group on although the operator does not export them.
const TARGET_LABELS: &[&str] = &[
    "job",
    "instance",
    "namespace",
    "pod",
    "service",
    "container",
    "endpoint",
];

/// PromQL's aggregation operators: followed by `(` or by `by (...)`/`without (...)`.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "group",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "limitk",
    "limit_ratio",
];

/// PromQL's functions, so that a misspelt one (`rat(`) fails here rather than in Grafana.
const FUNCTIONS: &[&str] = &[
    "abs",
    "absent",
    "absent_over_time",
    "avg_over_time",
    "ceil",
    "changes",
    "clamp",
    "clamp_max",
    "clamp_min",
    "count_over_time",
    "day_of_month",
    "day_of_week",
    "day_of_year",
    "days_in_month",
    "delta",
    "deriv",
    "exp",
    "floor",
    "histogram_avg",
    "histogram_count",
    "histogram_fraction",
    "histogram_quantile",
    "histogram_sum",
    "hour",
    "idelta",
    "increase",
    "irate",
    "label_join",
    "label_replace",
    "last_over_time",
    "ln",
    "log10",
    "log2",
    "max_over_time",
    "min_over_time",
    "minute",
    "month",
    "predict_linear",
    "present_over_time",
    "quantile_over_time",
    "rate",
    "resets",
    "round",
    "scalar",
    "sgn",
    "sort",
    "sort_by_label",
    "sort_by_label_desc",
    "sort_desc",
    "sqrt",
    "stddev_over_time",
    "stdvar_over_time",
    "sum_over_time",
    "time",
    "timestamp",
    "vector",
    "year",
];

/// Keywords that are neither metrics nor functions. `by`, `without`, `on`, `ignoring`,
/// `group_left` and `group_right` may be followed by a list of label names.
const GROUPING: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
];
/// Binary operators and modifiers spelt as words, and the number literals `Inf` and `NaN`.
const KEYWORDS: &[&str] = &[
    "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan", "start", "end",
];

/// The dashboard, parsed: it must be valid JSON.
fn dashboard() -> Value {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(DASHBOARD);
    let text = std::fs::read_to_string(&path).expect("read the dashboard JSON");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{DASHBOARD} is not valid JSON: {e}"))
}

/// The operator's metrics with one series in every family. A labelled family with no
/// series yet is not encoded at all (no `# TYPE` line), so a fresh registry would list
/// only `leader` and the per-token gauges.
fn populated_metrics() -> String {
    let metrics = Metrics::new();
    let issuer = "TokenIssuer/team-a/idp";
    metrics.token_request(
        issuer,
        GrantLabel::ClientCredentials,
        "success",
        Duration::from_millis(30),
    );
    metrics.token_state(
        "team-a",
        "orders",
        Some(1_800_000_000),
        false,
        true,
        Some("TokenRequestFailed"),
    );
    metrics.reconciled(true);
    metrics.refresh_rotated(issuer);
    metrics.set_leader(true);
    metrics.encode().expect("encode the metrics")
}

/// Every exported series name and its label names. The names come from the `# TYPE`
/// lines (a counter `x` is queried as `x_total`, a histogram `x` as `x_bucket`, `x_sum`
/// and `x_count`); the labels from the series.
fn exported() -> BTreeMap<String, BTreeSet<String>> {
    let text = populated_metrics();
    let mut names: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (family, kind) = rest.split_once(' ').expect("# TYPE <name> <type>");
        let series: Vec<String> = match kind {
            "counter" => vec![format!("{family}_total")],
            "histogram" => ["bucket", "sum", "count"]
                .iter()
                .map(|suffix| format!("{family}_{suffix}"))
                .collect(),
            _ => vec![family.to_string()],
        };
        for name in series {
            names.entry(name).or_default();
        }
    }
    for line in text.lines().filter(|l| !l.starts_with('#')) {
        let series = line.split_once(' ').map_or(line, |(series, _)| series);
        let (name, matchers) = match series.split_once('{') {
            Some((name, rest)) => (name, rest.trim_end_matches('}')),
            None => (series, ""),
        };
        let labels = names
            .get_mut(name)
            .unwrap_or_else(|| panic!("series {name} has no # TYPE line:\n{text}"));
        // The values here are plain words and issuer keys: no `,` or `"` inside them.
        for pair in matchers.split(',').filter(|p| !p.is_empty()) {
            let (label, _) = pair.split_once('=').expect("label=\"value\"");
            labels.insert(label.to_string());
        }
    }
    assert!(
        names.len() >= 11,
        "the operator exports fewer series names than expected:\n{text}"
    );
    names
}

/// One PromQL expression of the dashboard and where it is (for messages).
#[derive(Debug)]
struct Query {
    place: String,
    expr: String,
}

/// Every panel target's `expr`, rows' nested panels included.
fn panel_queries(panels: &[Value], out: &mut Vec<Query>) {
    for panel in panels {
        let title = panel["title"].as_str().unwrap_or("(untitled)");
        if let Some(targets) = panel["targets"].as_array() {
            for target in targets {
                let expr = target["expr"].as_str().unwrap_or_else(|| {
                    panic!("panel {title:?}: a target without a PromQL expr: {target}")
                });
                out.push(Query {
                    place: format!("panel {title:?} target {}", target["refId"]),
                    expr: expr.to_string(),
                });
            }
        }
        if let Some(nested) = panel["panels"].as_array() {
            panel_queries(nested, out);
        }
    }
}

/// The PromQL in each query variable: `label_values(<selector>, <label>)` and
/// `query_result(<expr>)` as Grafana's Prometheus data source reads them. The query is a
/// string in older dashboards and an object with a `query` field in newer ones.
fn variable_queries(dashboard: &Value) -> Vec<Query> {
    let mut out = Vec::new();
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list");
    for variable in variables.iter().filter(|v| v["type"] == "query") {
        let name = variable["name"].as_str().expect("variable name");
        let query = match &variable["query"] {
            Value::String(query) => query.as_str(),
            query => query["query"].as_str().expect("variable query"),
        }
        .trim();
        let expr = if let Some(args) = query
            .strip_prefix("label_values(")
            .and_then(|q| q.strip_suffix(')'))
        {
            // Without a selector label_values asks for a label of every series there is.
            let (selector, _label) = args.rsplit_once(',').unwrap_or_else(|| {
                panic!("variable {name}: label_values without a metric: {query}")
            });
            selector.trim()
        } else if let Some(expr) = query
            .strip_prefix("query_result(")
            .and_then(|q| q.strip_suffix(')'))
        {
            expr
        } else {
            panic!("variable {name}: not label_values(...) or query_result(...): {query}")
        };
        out.push(Query {
            place: format!("variable {name}"),
            expr: expr.to_string(),
        });
    }
    out
}

/// A metric selector in an expression: the metric's name and the label names it matches on.
#[derive(Debug, PartialEq)]
struct Selector {
    metric: String,
    labels: Vec<String>,
}

/// What an expression refers to.
#[derive(Debug, Default, PartialEq)]
struct Refs {
    selectors: Vec<Selector>,
    /// Grafana variables (`$namespace`, `${issuer}`), without the `$`.
    variables: Vec<String>,
}

/// Reads the metric selectors out of a PromQL expression: enough of a lexer to tell metric
/// names from functions, keywords, label names, strings, numbers, durations and Grafana
/// variables. An unknown function or a malformed matcher is an error, not a guess.
fn references(expr: &str) -> Result<Refs, String> {
    let chars: Vec<char> = expr.chars().collect();
    let mut refs = Refs::default();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if matches!(c, '"' | '\'' | '`') {
            i = skip_string(&chars, i)?;
        } else if c == '[' {
            // A range or subquery: durations and Grafana's $__rate_interval.
            let end = find(&chars, i, ']')?;
            refs.variables.extend(variables_in(&chars[i..end]));
            i = end + 1;
        } else if c == '{' {
            return Err(format!("a selector without a metric name at {i}"));
        } else if c == '$' {
            let (name, end) = variable(&chars, i);
            refs.variables.push(name);
            i = end;
        } else if c.is_ascii_digit()
            || (c == '.' && chars.get(i + 1).is_some_and(char::is_ascii_digit))
        {
            // Numbers, durations (5m), hex and exponents (1e-3).
            i += 1;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric()
                    || chars[i] == '.'
                    || chars[i] == '_'
                    || (matches!(chars[i], '+' | '-') && matches!(chars[i - 1], 'e' | 'E')))
            {
                i += 1;
            }
        } else if c.is_ascii_alphabetic() || c == '_' || c == ':' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], '_' | ':'))
            {
                i += 1;
            }
            let ident: String = chars[start..i].iter().collect();
            let next = skip_whitespace(&chars, i);
            let lower = ident.to_ascii_lowercase();
            if GROUPING.contains(&lower.as_str()) {
                if chars.get(next) == Some(&'(') {
                    i = find(&chars, next, ')')? + 1;
                }
            } else if KEYWORDS.contains(&lower.as_str()) || AGGREGATIONS.contains(&ident.as_str()) {
                // Nothing to check.
            } else if chars.get(next) == Some(&'(') {
                if !FUNCTIONS.contains(&ident.as_str()) {
                    return Err(format!("unknown function {ident}()"));
                }
            } else {
                let mut labels = Vec::new();
                if chars.get(next) == Some(&'{') {
                    i = matchers(&chars, next, &mut labels, &mut refs.variables)?;
                }
                refs.selectors.push(Selector {
                    metric: ident,
                    labels,
                });
            }
        } else {
            // Operators, parentheses, commas, `@`.
            i += 1;
        }
    }
    Ok(refs)
}

fn skip_whitespace(chars: &[char], mut i: usize) -> usize {
    while chars.get(i).is_some_and(|c| c.is_whitespace()) {
        i += 1;
    }
    i
}

/// The index just past the string literal that starts at `start`.
fn skip_string(chars: &[char], start: usize) -> Result<usize, String> {
    let quote = chars[start];
    let mut i = start + 1;
    while i < chars.len() {
        if chars[i] == '\\' && quote != '`' {
            i += 2;
        } else if chars[i] == quote {
            return Ok(i + 1);
        } else {
            i += 1;
        }
    }
    Err(format!("unterminated string at {start}"))
}

/// The index of the first `close` after `start`, outside strings.
fn find(chars: &[char], start: usize, close: char) -> Result<usize, String> {
    let mut i = start + 1;
    while i < chars.len() {
        if matches!(chars[i], '"' | '\'' | '`') {
            i = skip_string(chars, i)?;
        } else if chars[i] == close {
            return Ok(i);
        } else {
            i += 1;
        }
    }
    Err(format!("no {close:?} after {start}"))
}

/// The Grafana variable at `start` (`$name`, `${name}`, `${name:format}`) and the index
/// just past it.
fn variable(chars: &[char], start: usize) -> (String, usize) {
    let mut i = start + 1;
    let braced = chars.get(i) == Some(&'{');
    if braced {
        i += 1;
    }
    let name_start = i;
    while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
        i += 1;
    }
    let name: String = chars[name_start..i].iter().collect();
    if braced {
        while i < chars.len() && chars[i] != '}' {
            i += 1;
        }
        i += 1;
    }
    (name, i)
}

/// The Grafana variables in a piece of text (a string literal or a range).
fn variables_in(chars: &[char]) -> Vec<String> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i] == '$' {
            let (name, end) = variable(chars, i);
            found.push(name);
            i = end;
        } else {
            i += 1;
        }
    }
    found
}

/// Reads the label matchers `{a="x", b=~"$var"}` that start at `open`; returns the index
/// just past the `}`.
fn matchers(
    chars: &[char],
    open: usize,
    labels: &mut Vec<String>,
    variables: &mut Vec<String>,
) -> Result<usize, String> {
    let mut i = open + 1;
    loop {
        i = skip_whitespace(chars, i);
        match chars.get(i) {
            Some('}') => return Ok(i + 1),
            Some(',') => {
                i += 1;
                continue;
            }
            Some(_) => {}
            None => return Err(format!("unterminated matchers at {open}")),
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        if i == start {
            return Err(format!("a label name expected at {i}"));
        }
        labels.push(chars[start..i].iter().collect());
        i = skip_whitespace(chars, i);
        let op: String = chars[i..chars.len().min(i + 2)].iter().collect();
        i += if op == "!=" || op == "=~" || op == "!~" {
            2
        } else if op.starts_with('=') {
            1
        } else {
            return Err(format!("a matcher operator expected at {i}"));
        };
        i = skip_whitespace(chars, i);
        if !matches!(chars.get(i), Some('"' | '\'' | '`')) {
            return Err(format!("a quoted label value expected at {i}"));
        }
        let end = skip_string(chars, i)?;
        variables.extend(variables_in(&chars[i..end]));
        i = end;
    }
}

/// Every query of the dashboard, panels first, then variables.
fn all_queries(dashboard: &Value) -> Vec<Query> {
    let mut queries = Vec::new();
    panel_queries(
        dashboard["panels"].as_array().expect("panels"),
        &mut queries,
    );
    queries.extend(variable_queries(dashboard));
    queries
}

#[test]
fn every_query_names_only_exported_metrics_and_their_labels() {
    let dashboard = dashboard();
    let exported = exported();
    let queries = all_queries(&dashboard);
    assert!(queries.len() >= 10, "too few queries: {queries:?}");

    let mut problems = Vec::new();
    for Query { place, expr } in &queries {
        let refs = match references(expr) {
            Ok(refs) => refs,
            Err(e) => {
                problems.push(format!("{place}: {e} in {expr}"));
                continue;
            }
        };
        if refs.selectors.is_empty() {
            problems.push(format!("{place}: no metric in {expr}"));
        }
        for Selector {
            metric,
            labels: used,
        } in &refs.selectors
        {
            let Some(known) = exported
                .get(metric)
                .filter(|_| metric.starts_with("audience_token_"))
            else {
                problems.push(format!(
                    "{place}: {metric} is not a metric the operator exports (in {expr})"
                ));
                continue;
            };
            for label in used {
                if !known.contains(label) && !TARGET_LABELS.contains(&label.as_str()) {
                    problems.push(format!(
                        "{place}: {metric} has no label {label} (it has {known:?}; in {expr})"
                    ));
                }
            }
        }
    }
    assert!(
        problems.is_empty(),
        "{DASHBOARD}:\n  {}\nexported: {:?}",
        problems.join("\n  "),
        exported.keys().collect::<Vec<_>>()
    );
}

#[test]
fn every_variable_a_query_uses_is_defined() {
    let dashboard = dashboard();
    let defined: BTreeSet<&str> = dashboard["templating"]["list"]
        .as_array()
        .expect("templating.list")
        .iter()
        .map(|v| v["name"].as_str().expect("variable name"))
        .collect();
    assert!(defined.contains("datasource"), "{defined:?}");
    for Query { place, expr } in all_queries(&dashboard) {
        for name in references(&expr).expect("parse").variables {
            // Grafana's own: $__rate_interval, $__range, ...
            if !name.starts_with("__") {
                assert!(
                    defined.contains(name.as_str()),
                    "{place}: ${name} is not a dashboard variable ({expr})"
                );
            }
        }
    }
}

/// Issue 14's panels: tokens by Ready state and reason, time to expiry (soonest first),
/// token requests and failures per issuer and result, request latency, refresh-chain
/// rotations, leader; and the counts and reconcile errors beside them.
#[test]
fn the_dashboard_shows_what_the_issue_asks_for() {
    let dashboard = dashboard();
    let queries = all_queries(&dashboard);
    let panels: Vec<&Query> = queries
        .iter()
        .filter(|q| q.place.starts_with("panel"))
        .collect();
    // (topic, a metric the query selects, text the query contains)
    let topics: &[(&str, &str, &[&str])] = &[
        (
            "tokens by Ready state and reason",
            "audience_token_conditions",
            &["by (ready, reason)"],
        ),
        ("Ready tokens", "audience_token_ready", &["== 1"]),
        ("not Ready tokens", "audience_token_ready", &["== 0"]),
        ("failing tokens", "audience_token_failing", &["count("]),
        (
            "time to expiry, soonest first",
            "audience_token_expiry_timestamp_seconds",
            &["- time()", "sort(", "by (namespace, name)"],
        ),
        (
            "token requests per issuer and result",
            "audience_token_requests_total",
            &["rate(", "by (issuer, result)"],
        ),
        (
            "failed token requests",
            "audience_token_requests_total",
            &["result!=\"success\"", "by (issuer, result)"],
        ),
        (
            "request latency p50",
            "audience_token_request_duration_seconds_bucket",
            &["histogram_quantile(0.5,", "by (le, issuer)"],
        ),
        (
            "request latency p95",
            "audience_token_request_duration_seconds_bucket",
            &["histogram_quantile(0.95,", "by (le, issuer)"],
        ),
        (
            "request latency p99",
            "audience_token_request_duration_seconds_bucket",
            &["histogram_quantile(0.99,", "by (le, issuer)"],
        ),
        (
            "refresh-chain rotations",
            "audience_token_refresh_rotations_total",
            &["increase(", "by (issuer)"],
        ),
        ("leader by replica", "audience_token_leader", &["by (pod"]),
        (
            "reconcile errors",
            "audience_token_reconcile_total",
            &["by (result)"],
        ),
    ];
    for (topic, metric, contains) in topics {
        let shown = panels.iter().any(|q| {
            let refs = references(&q.expr).expect("parse");
            refs.selectors.iter().any(|s| s.metric == *metric)
                && contains.iter().all(|c| q.expr.contains(c))
        });
        assert!(shown, "no panel shows {topic} ({metric} with {contains:?})");
    }

    // Soonest first also in the table itself, which sorts on its own once clicked.
    let table = flat_panels(dashboard["panels"].as_array().expect("panels"))
        .into_iter()
        .find(|p| {
            p["targets"][0]["expr"]
                .as_str()
                .is_some_and(|e| e.contains("audience_token_expiry_timestamp_seconds"))
        })
        .expect("the time-to-expiry panel");
    assert_eq!(table["type"], "table");
    assert_eq!(table["options"]["sortBy"][0]["desc"], false, "{table}");
}

/// Panels, rows' nested panels included.
fn flat_panels(panels: &[Value]) -> Vec<&Value> {
    let mut out = Vec::new();
    for panel in panels {
        out.push(panel);
        if let Some(nested) = panel["panels"].as_array() {
            out.extend(flat_panels(nested));
        }
    }
    out
}

#[test]
fn panel_ids_are_unique() {
    let dashboard = dashboard();
    let mut ids = BTreeSet::new();
    for panel in flat_panels(dashboard["panels"].as_array().expect("panels")) {
        let id = panel["id"].as_u64().expect("a panel id");
        assert!(ids.insert(id), "panel id {id} twice");
    }
}

/// The lexer itself: metric names apart from everything else PromQL has.
#[test]
fn references_tell_metrics_from_functions_labels_and_variables() {
    let refs = references(
        r#"histogram_quantile(0.95, sum by (le, issuer) (rate(audience_token_request_duration_seconds_bucket{issuer=~"$issuer", x!="a}b"}[$__rate_interval]))) or vector(0) > bool 1e-3 offset 5m"#,
    )
    .expect("parse");
    assert_eq!(
        refs.selectors,
        [Selector {
            metric: "audience_token_request_duration_seconds_bucket".into(),
            labels: vec!["issuer".into(), "x".into()],
        }]
    );
    assert_eq!(refs.variables, ["issuer", "__rate_interval"]);
    let refs = references(
        "count(audience_token_ready == 0) / on (namespace) group_left audience_token_failing",
    )
    .expect("parse");
    let metrics: Vec<&str> = refs.selectors.iter().map(|s| s.metric.as_str()).collect();
    assert_eq!(metrics, ["audience_token_ready", "audience_token_failing"]);
    assert!(references("rat(audience_token_leader[5m])").is_err());
    assert!(references(r#"{__name__="audience_token_leader"}"#).is_err());
    assert!(references(r#"audience_token_leader{pod="a""#).is_err());
}
