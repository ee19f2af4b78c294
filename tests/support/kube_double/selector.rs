//! `labelSelector` and `fieldSelector` query parameters, evaluated against JSON objects.

use serde_json::Value;

#[derive(Debug, Clone)]
enum Req {
    Eq(String, String),
    Ne(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// Field selectors the double accepts. The real server has a per-kind list; every kind accepts
/// `metadata.name` and `metadata.namespace`, Secrets also `type`. Anything else is a 400.
const FIELDS: [&str; 3] = ["metadata.name", "metadata.namespace", "type"];

/// events.k8s.io Events also take these (the API server maps them to the core Event's
/// `involvedObject.*` fields).
const EVENT_FIELDS: [&str; 6] = [
    "regarding.uid",
    "regarding.name",
    "regarding.namespace",
    "regarding.kind",
    "reason",
    "reportingController",
];

/// A parsed label selector and field selector (all requirements ANDed).
#[derive(Debug, Clone, Default)]
pub struct Selector {
    labels: Vec<Req>,
    fields: Vec<(String, bool, String)>, // (path, equal?, value)
}

impl Selector {
    /// The selectors of a request for `plural` in API group `group`.
    pub fn parse(
        labels: Option<&str>,
        fields: Option<&str>,
        (group, plural): (&str, &str),
    ) -> Result<Self, String> {
        let events = group == "events.k8s.io" && plural == "events";
        let mut sel = Selector::default();
        for part in split_top(labels.unwrap_or("")) {
            sel.labels.push(parse_label(part)?);
        }
        for part in split_top(fields.unwrap_or("")) {
            let (path, eq, value) = if let Some((k, v)) = part.split_once("!=") {
                (k, false, v)
            } else if let Some((k, v)) = part.split_once("==").or_else(|| part.split_once('=')) {
                (k, true, v)
            } else {
                return Err(format!("invalid field selector requirement {part:?}"));
            };
            let path = path.trim();
            if !(FIELDS.contains(&path) || events && EVENT_FIELDS.contains(&path)) {
                return Err(format!("field label not supported: {path}"));
            }
            sel.fields
                .push((path.to_string(), eq, value.trim().to_string()));
        }
        Ok(sel)
    }

    pub fn matches(&self, obj: &Value) -> bool {
        let labels = &obj["metadata"]["labels"];
        let label = |k: &str| labels.get(k).and_then(Value::as_str);
        let labels_ok = self.labels.iter().all(|r| match r {
            Req::Eq(k, v) => label(k) == Some(v.as_str()),
            Req::Ne(k, v) => label(k) != Some(v.as_str()),
            Req::In(k, vs) => label(k).is_some_and(|l| vs.iter().any(|v| v == l)),
            Req::NotIn(k, vs) => label(k).is_none_or(|l| vs.iter().all(|v| v != l)),
            Req::Exists(k) => label(k).is_some(),
            Req::NotExists(k) => label(k).is_none(),
        });
        labels_ok
            && self.fields.iter().all(|(path, eq, value)| {
                let actual = path
                    .split('.')
                    .try_fold(obj, |v, seg| v.get(seg))
                    .and_then(Value::as_str)
                    .unwrap_or("");
                (actual == value) == *eq
            })
    }
}

/// Splits on commas that are not inside parentheses; drops empty parts.
fn split_top(s: &str) -> Vec<&str> {
    let (mut parts, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth == 0 => {
                parts.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
        .into_iter()
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .collect()
}

fn parse_label(s: &str) -> Result<Req, String> {
    let bad = || format!("invalid label selector requirement {s:?}");
    let key = |k: &str| {
        let k = k.trim();
        if k.is_empty() || k.contains(char::is_whitespace) {
            Err(bad())
        } else {
            Ok(k.to_string())
        }
    };
    if let Some(k) = s.strip_prefix('!') {
        return Ok(Req::NotExists(key(k)?));
    }
    if let Some(open) = s.find('(') {
        let inner = s[open + 1..].strip_suffix(')').ok_or_else(bad)?;
        let values = inner
            .split(',')
            .map(|v| v.trim().to_string())
            .filter(|v| !v.is_empty());
        let mut head = s[..open].split_whitespace();
        let (k, op) = (head.next().ok_or_else(bad)?, head.next().ok_or_else(bad)?);
        return match op {
            "in" => Ok(Req::In(key(k)?, values.collect())),
            "notin" => Ok(Req::NotIn(key(k)?, values.collect())),
            _ => Err(bad()),
        };
    }
    if let Some((k, v)) = s.split_once("!=") {
        Ok(Req::Ne(key(k)?, v.trim().to_string()))
    } else if let Some((k, v)) = s.split_once("==").or_else(|| s.split_once('=')) {
        Ok(Req::Eq(key(k)?, v.trim().to_string()))
    } else {
        Ok(Req::Exists(key(s)?))
    }
}
