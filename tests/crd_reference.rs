//! `docs/reference.md`, the CRD field reference, is rendered from `crds/*.yaml`, and this
//! test fails when the committed page differs from what the CRDs give. `crds/` is itself
//! checked against the code by `tests/crds_fresh.rs`, so the page cannot drift from the Rust
//! doc comments either: a changed doc comment fails `crds_fresh`, and once `crds/` is
//! refreshed it fails here.
//!
//! `UPDATE_DOCS=1 cargo test --test crd_reference` rewrites `docs/reference.md` instead of
//! comparing.

use std::fmt::Write as _;
use std::path::PathBuf;

use serde_json::Value;

/// The CRD files in the order a user meets the kinds, and the page's section names.
const CRD_FILES: [&str; 3] = [
    "audiencetokens.yaml",
    "tokenissuers.yaml",
    "clustertokenissuers.yaml",
];

const STALE: &str = "docs/reference.md is stale: run `UPDATE_DOCS=1 cargo test --test crd_reference` \
     (after `UPDATE_CRDS=1 cargo test --test crds_fresh` if the CRDs changed)";

/// Schema keywords the renderer shows (or deliberately leaves out: `nullable`, `title`).
/// Any other keyword fails the render, so that a new constraint never goes missing from the
/// page without anyone noticing.
const KNOWN_KEYWORDS: &[&str] = &[
    "description",
    "type",
    "format",
    "properties",
    "required",
    "items",
    "additionalProperties",
    "default",
    "enum",
    "nullable",
    "title",
    "maxLength",
    "minLength",
    "maxItems",
    "minItems",
    "maximum",
    "minimum",
    "pattern",
    "x-kubernetes-validations",
    "x-kubernetes-preserve-unknown-fields",
];

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The CRDs as committed, parsed into JSON values.
fn load_crds() -> Vec<Value> {
    CRD_FILES
        .iter()
        .map(|name| {
            let path = root().join("crds").join(name);
            let text = std::fs::read_to_string(&path)
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            serde_yaml::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        })
        .collect()
}

/// Text for a Markdown table cell: one line, `|` escaped, and `<`/`>` outside code spans
/// escaped so that GitHub does not take `<issuer>` for an HTML tag.
fn cell(text: &str) -> String {
    let one_line = text.split_whitespace().collect::<Vec<_>>().join(" ");
    let mut out = String::new();
    let mut in_code = false;
    for c in one_line.chars() {
        match c {
            '`' => {
                in_code = !in_code;
                out.push(c);
            }
            '|' => out.push_str("\\|"),
            '<' if !in_code => out.push_str("&lt;"),
            '>' if !in_code => out.push_str("&gt;"),
            _ => out.push(c),
        }
    }
    out
}

/// A JSON value as inline code: strings bare, everything else as compact JSON.
fn code(value: &Value) -> String {
    let text = match value {
        Value::String(s) if s.is_empty() => "\"\"".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    format!("`{}`", text.replace('|', "\\|"))
}

fn obj(node: &Value) -> &serde_json::Map<String, Value> {
    node.as_object()
        .unwrap_or_else(|| panic!("schema node is not an object: {node}"))
}

/// The type column: `string (date-time)`, `[]string`, `map[string]string`, and the enum's
/// values when there is one.
fn type_of(node: &Value) -> String {
    let o = obj(node);
    let preserve = o.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    let base = match o.get("type").and_then(Value::as_str) {
        Some("array") => format!("[]{}", type_of(&o["items"])),
        Some("object") => match o.get("additionalProperties") {
            Some(values @ Value::Object(_)) => format!("map[string]{}", type_of(values)),
            _ if preserve && o.contains_key("properties") => "object (more members allowed)".into(),
            _ if preserve => "object (any members)".into(),
            _ => "object".into(),
        },
        Some(ty) => match o.get("format").and_then(Value::as_str) {
            Some(format) => format!("{ty} ({format})"),
            None => ty.to_string(),
        },
        None if preserve => "any".into(),
        None => panic!("schema node without a type: {node}"),
    };
    match o.get("enum").and_then(Value::as_array) {
        Some(values) => format!(
            "{base}, one of {}",
            values.iter().map(code).collect::<Vec<_>>().join(", ")
        ),
        None => base,
    }
}

/// Limits and admission rules of one node, as sentences.
fn constraints(node: &Value) -> Vec<String> {
    let o = obj(node);
    let mut out = Vec::new();
    let num = |key: &str| o.get(key).map(Value::to_string);
    if let Some(n) = num("minLength") {
        out.push(format!("At least {n} characters."));
    }
    if let Some(n) = num("maxLength") {
        out.push(format!("At most {n} characters."));
    }
    if let Some(n) = num("minItems") {
        out.push(format!("At least {n} items."));
    }
    if let Some(n) = num("maxItems") {
        out.push(format!("At most {n} items."));
    }
    if let Some(n) = num("minimum") {
        out.push(format!("Minimum {n}."));
    }
    if let Some(n) = num("maximum") {
        out.push(format!("Maximum {n}."));
    }
    if let Some(pattern) = o.get("pattern") {
        out.push(format!("Matches {}.", code(pattern)));
    }
    let messages: Vec<String> = o
        .get("x-kubernetes-validations")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|rule| {
            let message = rule
                .get("message")
                .and_then(Value::as_str)
                .unwrap_or_else(|| panic!("a validation rule without a message: {rule}"));
            format!("“{message}”")
        })
        .collect();
    if !messages.is_empty() {
        out.push(format!("Admission refuses: {}.", messages.join("; ")));
    }
    out
}

/// The description column: the schema's description, its limits and rules, and those of an
/// array's items or a map's values (which have no row of their own).
fn describe(node: &Value) -> String {
    let o = obj(node);
    let mut parts: Vec<String> = Vec::new();
    if let Some(d) = o.get("description").and_then(Value::as_str) {
        parts.push(d.to_string());
    }
    parts.extend(constraints(node));
    for (key, label) in [
        ("items", "Each item"),
        ("additionalProperties", "Each value"),
    ] {
        if let Some(inner @ Value::Object(_)) = o.get(key) {
            let mut inner_parts: Vec<String> = Vec::new();
            if let Some(d) = inner.get("description").and_then(Value::as_str) {
                inner_parts.push(d.to_string());
            }
            inner_parts.extend(constraints(inner));
            if !inner_parts.is_empty() {
                parts.push(format!("{label}: {}", inner_parts.join(" ")));
            }
        }
    }
    cell(&parts.join(" "))
}

/// Schema keywords this renderer does not know, with where they are.
fn unknown_keywords(node: &Value, path: &str, problems: &mut Vec<String>) {
    let o = obj(node);
    for key in o.keys() {
        if !KNOWN_KEYWORDS.contains(&key.as_str()) {
            problems.push(format!("{path}: schema keyword `{key}`"));
        }
    }
    if let Some(props) = o.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            unknown_keywords(child, &format!("{path}.{name}"), problems);
        }
    }
    for key in ["items", "additionalProperties"] {
        if let Some(inner @ Value::Object(_)) = o.get(key) {
            unknown_keywords(inner, &format!("{path}[]"), problems);
        }
    }
}

/// One table row per field, depth first, fields in alphabetical order; an array's item
/// fields are `path[].field`.
fn rows(node: &Value, path: &str, required: bool, out: &mut String) {
    let o = obj(node);
    let default = o.get("default").map(code).unwrap_or_default();
    let req = if required { "yes" } else { "" };
    writeln!(
        out,
        "| `{path}` | {} | {req} | {default} | {} |",
        cell(&type_of(node)),
        describe(node)
    )
    .expect("writing to a String");
    children(node, path, out);
}

fn children(node: &Value, path: &str, out: &mut String) {
    let o = obj(node);
    let required: Vec<&str> = o
        .get("required")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    if let Some(props) = o.get("properties").and_then(Value::as_object) {
        let mut names: Vec<&String> = props.keys().collect();
        names.sort();
        for name in names {
            rows(
                &props[name],
                &format!("{path}.{name}"),
                required.contains(&name.as_str()),
                out,
            );
        }
    }
    if let Some(items @ Value::Object(_)) = o.get("items") {
        children(items, &format!("{path}[]"), out);
    }
}

const TABLE_HEAD: &str =
    "| field | type | required | default | description |\n| --- | --- | --- | --- | --- |\n";

/// The whole page, from the three CRDs. Fails on schema keywords it cannot show.
fn render(crds: &[Value]) -> Result<String, String> {
    let mut problems = Vec::new();
    let mut out = String::from(
        "# CRD field reference\n\n\
         <!-- Generated by tests/crd_reference.rs from crds/*.yaml; do not edit by hand. -->\n\n\
         This page answers, for every field of the three custom resources, what type it has, \
         whether it is required, its default and allowed values, what it means, and which \
         limits and admission rules apply. It is generated from the CRDs in `crds/`, whose \
         descriptions are the doc comments of the Rust types in `src/api/` (what `kubectl \
         explain` shows), and a test fails when it differs from them, so it cannot drift. \
         After changing the API types, regenerate both:\n\n\
         ```sh\n\
         UPDATE_CRDS=1 cargo test --test crds_fresh      # crds/ from the code\n\
         UPDATE_DOCS=1 cargo test --test crd_reference   # this page from crds/\n\
         ```\n\n\
         A field marked required must be set whenever the object that holds it is set; \
         `x[].y` is the field `y` of each item of the list `x`. \
         What the resources are for, and how they work together, is in \
         [Concepts](concepts.md#resources); the Secret the operator writes is described in \
         [The Secret](concepts.md#the-secret).\n\n",
    );
    let kinds: Vec<String> = crds
        .iter()
        .map(|crd| {
            crd["spec"]["names"]["kind"]
                .as_str()
                .expect("a CRD names its kind")
                .to_string()
        })
        .collect();
    let toc: Vec<String> = kinds
        .iter()
        .map(|k| format!("[{k}](#{})", k.to_lowercase()))
        .collect();
    writeln!(out, "Kinds: {}.", toc.join(" · ")).expect("writing to a String");
    for (crd, kind) in crds.iter().zip(&kinds) {
        let spec = &crd["spec"];
        let versions = spec["versions"].as_array().expect("a CRD has versions");
        for version in versions {
            let schema = &version["schema"]["openAPIV3Schema"];
            unknown_keywords(schema, kind, &mut problems);
            let group = spec["group"].as_str().unwrap_or_default();
            let name = version["name"].as_str().unwrap_or_default();
            let scope = match spec["scope"].as_str() {
                Some("Namespaced") => "namespaced",
                Some("Cluster") => "cluster-scoped",
                _ => "of unknown scope",
            };
            writeln!(out, "\n## {kind}\n").expect("writing to a String");
            let mut facts = vec![format!("`{group}/{name}`, {scope}")];
            let names = &spec["names"];
            let list = |v: &Value| -> Vec<String> {
                v.as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(Value::as_str)
                    .map(|s| format!("`{s}`"))
                    .collect()
            };
            facts.push(format!(
                "plural `{}`",
                names["plural"].as_str().unwrap_or("")
            ));
            let shorts = list(&names["shortNames"]);
            if !shorts.is_empty() {
                facts.push(format!("short name {}", shorts.join(", ")));
            }
            let categories = list(&names["categories"]);
            if !categories.is_empty() {
                facts.push(format!("category {}", categories.join(", ")));
            }
            let columns: Vec<String> = version["additionalPrinterColumns"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| {
                    format!(
                        "{} (`{}`)",
                        c["name"].as_str().unwrap_or(""),
                        c["jsonPath"].as_str().unwrap_or("")
                    )
                })
                .collect();
            if !columns.is_empty() {
                facts.push(format!("printer columns {}", columns.join(", ")));
            }
            writeln!(out, "{}.", cell(&facts.join("; "))).expect("writing to a String");
            if let Some(d) = schema.get("description").and_then(Value::as_str) {
                writeln!(out, "\n{}", cell(d)).expect("writing to a String");
            }
            let required: Vec<&str> = schema["required"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            for part in ["spec", "status"] {
                let Some(node) = schema["properties"].get(part) else {
                    continue;
                };
                write!(out, "\n### {kind} {part}\n\n{TABLE_HEAD}").expect("writing to a String");
                rows(node, part, required.contains(&part), &mut out);
            }
        }
    }
    if problems.is_empty() {
        Ok(out)
    } else {
        Err(format!(
            "the reference renderer does not know these schema keywords; teach it \
             (tests/crd_reference.rs) so that the page shows them:\n  {}",
            problems.join("\n  ")
        ))
    }
}

#[test]
fn reference_page_is_fresh() {
    let rendered = render(&load_crds()).expect("the CRDs render");
    let path = root().join("docs/reference.md");
    if std::env::var_os("UPDATE_DOCS").is_some_and(|v| v == "1") {
        if std::fs::read_to_string(&path).ok().as_deref() == Some(rendered.as_str()) {
            println!("unchanged {}", path.display());
        } else {
            std::fs::write(&path, &rendered).expect("docs/reference.md is writable");
            println!("wrote {}", path.display());
        }
        return;
    }
    let on_disk = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{STALE}\n({}: {e})", path.display()));
    if on_disk != rendered {
        let first = on_disk
            .lines()
            .zip(rendered.lines())
            .position(|(a, b)| a != b)
            .unwrap_or_else(|| on_disk.lines().count().min(rendered.lines().count()));
        panic!(
            "{STALE}\nfirst difference at line {}:\n  committed: {}\n  generated: {}",
            first + 1,
            on_disk.lines().nth(first).unwrap_or("<end of file>"),
            rendered.lines().nth(first).unwrap_or("<end of file>"),
        );
    }
}

/// Every field path of the schemas, `spec.grant.refreshToken.bootstrapSecretRef.name` style.
fn field_paths(node: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(props) = node.get("properties").and_then(Value::as_object) {
        for (name, child) in props {
            let p = format!("{path}.{name}");
            out.push(p.clone());
            field_paths(child, &p, out);
        }
    }
    if let Some(items @ Value::Object(_)) = node.get("items") {
        field_paths(items, &format!("{path}[]"), out);
    }
}

#[test]
fn every_field_has_a_row_with_its_description() {
    let crds = load_crds();
    let page = render(&crds).unwrap();
    for crd in &crds {
        let kind = crd["spec"]["names"]["kind"].as_str().unwrap();
        let schema = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"];
        let section = page
            .split(&format!("\n## {kind}\n"))
            .nth(1)
            .unwrap_or_else(|| panic!("no section for {kind}"))
            .split("\n## ")
            .next()
            .unwrap();
        for part in ["spec", "status"] {
            let mut paths = vec![part.to_string()];
            field_paths(&schema["properties"][part], part, &mut paths);
            for path in paths {
                let row = section
                    .lines()
                    .find(|l| l.starts_with(&format!("| `{path}` |")))
                    .unwrap_or_else(|| panic!("{kind}: no row for {path}"));
                // The description (first words) is in the row.
                let mut node = &schema["properties"][part];
                for segment in path.split('.').skip(1) {
                    node = if let Some(field) = segment.strip_suffix("[]") {
                        &node["properties"][field]["items"]
                    } else {
                        &node["properties"][segment]
                    };
                }
                assert!(node.is_object(), "{kind} {path}: not found in the schema");
                let description = node["description"].as_str().unwrap_or_default();
                let first_words = cell(description)
                    .split(' ')
                    .take(4)
                    .collect::<Vec<_>>()
                    .join(" ");
                assert!(
                    row.contains(&first_words),
                    "{kind} {path}: row lacks its description {first_words:?}:\n{row}"
                );
            }
        }
    }
    // The example the brief names: a deep path, with its requiredness.
    assert!(
        page.contains("| `spec.grant.refreshToken.bootstrapSecretRef.name` | string | yes |"),
        "deep paths are rendered with their requiredness"
    );
}

/// The AudienceToken's `spec.<field>` schema in a copy of the CRDs.
fn audience_token_spec_field<'a>(crds: &'a mut [Value], field: &str) -> &'a mut Value {
    &mut crds[0]["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["properties"]
        [field]
}

#[test]
fn a_changed_description_default_or_rule_changes_the_page() {
    let crds = load_crds();
    let before = render(&crds).unwrap();

    let mut changed = crds.clone();
    audience_token_spec_field(&mut changed, "resource")["description"] =
        Value::from("A different description.");
    let after = render(&changed).unwrap();
    assert_ne!(before, after);
    assert!(after.contains("A different description."));

    let mut changed = crds.clone();
    audience_token_spec_field(&mut changed, "deletionPolicy")["default"] = Value::from("Retain");
    assert_ne!(before, render(&changed).unwrap());

    let mut changed = crds.clone();
    audience_token_spec_field(&mut changed, "resource")["x-kubernetes-validations"][0]["message"] =
        Value::from("a new rule message");
    assert!(render(&changed).unwrap().contains("a new rule message"));

    // A keyword the page cannot show yet fails the render instead of vanishing.
    let mut changed = crds;
    audience_token_spec_field(&mut changed, "resource")["x-kubernetes-list-type"] =
        Value::from("atomic");
    let err = render(&changed).unwrap_err();
    assert!(
        err.contains("AudienceToken.spec.resource: schema keyword `x-kubernetes-list-type`"),
        "{err}"
    );
}

#[test]
fn cells_escape_what_would_break_a_table_row() {
    assert_eq!(cell("a | b"), "a \\| b");
    assert_eq!(
        cell("<issuer>-refresh-state"),
        "&lt;issuer&gt;-refresh-state"
    );
    assert_eq!(cell("`<issuer>`\n  and\nmore"), "`<issuer>` and more");
}
