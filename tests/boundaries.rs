//! The OAuth client (crate `audience-token-oauth`, `crates/oauth`) knows nothing of
//! Kubernetes: its resolved dependency graph holds no Kubernetes crate. The compiler then
//! refuses any `kube`/`k8s_openapi` path in it. And the operator's modules have no import
//! cycles: each layer uses the ones below it.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;
use std::process::Command;

use serde_json::Value;

const OAUTH: &str = "audience-token-oauth";
const OPERATOR: &str = "audience-token-operator";

fn is_kubernetes(name: &str) -> bool {
    name.starts_with("kube") || name.starts_with("k8s")
}

/// `cargo metadata` of this workspace, resolved for the host platform only: for every
/// platform, cargo would download the crates of all of them (`--locked` and a complete
/// Cargo.lock keep it offline once the build's crates are there).
fn metadata() -> Value {
    let cargo = env!("CARGO");
    let version = Command::new(cargo).arg("-vV").output().unwrap();
    let version = String::from_utf8(version.stdout).unwrap();
    let host = version
        .lines()
        .find_map(|line| line.strip_prefix("host: "))
        .unwrap_or_else(|| panic!("no host in `cargo -vV`: {version}"));
    let output = Command::new(cargo)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .args(["metadata", "--format-version", "1", "--locked"])
        .args(["--filter-platform", host])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap()
}

/// The names of every package in the resolved graph of workspace package `root`
/// (its normal, build and dev dependencies, transitively), without `root` itself.
fn dependency_names(metadata: &Value, root: &str) -> BTreeSet<String> {
    let name_of: HashMap<&str, &str> = metadata["packages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| (p["id"].as_str().unwrap(), p["name"].as_str().unwrap()))
        .collect();
    let deps_of: HashMap<&str, Vec<&str>> = metadata["resolve"]["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|node| {
            let deps = node["dependencies"].as_array().unwrap();
            let deps = deps.iter().map(|d| d.as_str().unwrap()).collect();
            (node["id"].as_str().unwrap(), deps)
        })
        .collect();
    let root_id = metadata["workspace_members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|id| id.as_str().unwrap())
        .find(|id| name_of[id] == root)
        .unwrap_or_else(|| panic!("{root} is not a workspace member"));

    let mut seen = BTreeSet::from([root_id]);
    let mut todo = vec![root_id];
    while let Some(id) = todo.pop() {
        for &dep in &deps_of[id] {
            if seen.insert(dep) {
                todo.push(dep);
            }
        }
    }
    seen.remove(root_id);
    seen.into_iter().map(|id| name_of[id].to_owned()).collect()
}

#[test]
fn the_oauth_crate_depends_on_no_kubernetes_crate() {
    let metadata = metadata();
    let oauth = dependency_names(&metadata, OAUTH);
    // The walk sees the graph: the crates the client is built on are in it...
    for expected in ["reqwest", "jsonwebtoken", "aws-lc-rs"] {
        assert!(oauth.contains(expected), "{expected} not in {oauth:?}");
    }
    // ...and the same walk finds Kubernetes crates where they are.
    let operator = dependency_names(&metadata, OPERATOR);
    assert!(operator.contains("kube") && operator.contains("k8s-openapi"));
    assert!(operator.contains(OAUTH));

    let offending: Vec<&String> = oauth.iter().filter(|n| is_kubernetes(n)).collect();
    assert!(
        offending.is_empty(),
        "{OAUTH} (crates/oauth) must know nothing of Kubernetes, but its dependency graph \
         holds: {offending:?}"
    );
}

// ---- Module cycles ----------------------------------------------------------------------

/// The operator's modules (`src/`) as paths (`controller::plan`), with the modules each one
/// names through `crate::…` or `super::…` outside comments and tests.
fn module_uses() -> BTreeMap<String, BTreeSet<String>> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    let mut dirs = vec![root.clone()];
    while let Some(dir) = dirs.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                dirs.push(path);
            } else if path.extension().is_some_and(|e| e == "rs") {
                files.push(path);
            }
        }
    }
    let module_of = |path: &Path| {
        let rel = path.strip_prefix(&root).unwrap().with_extension("");
        let mut parts: Vec<String> = rel
            .components()
            .map(|c| c.as_os_str().to_string_lossy().into_owned())
            .collect();
        if parts.last().is_some_and(|p| p == "mod") {
            parts.pop();
        }
        parts.join("::")
    };
    let modules: BTreeSet<String> = files.iter().map(|f| module_of(f)).collect();
    // The longest known module a path starts with.
    let known = |path: &str| {
        let mut parts: Vec<&str> = path.split("::").collect();
        while !parts.is_empty() {
            let candidate = parts.join("::");
            if modules.contains(&candidate) {
                return Some(candidate);
            }
            parts.pop();
        }
        None
    };
    let mut uses = BTreeMap::new();
    for file in &files {
        let module = module_of(file);
        let parent = module.rsplit_once("::").map_or("", |(p, _)| p).to_string();
        let text = std::fs::read_to_string(file).unwrap();
        let code = text.split("#[cfg(test)]").next().unwrap_or_default();
        let mut named = BTreeSet::new();
        for line in code.lines().filter(|l| !l.trim_start().starts_with("//")) {
            for (prefix, base) in [("crate::", String::new()), ("super::", parent.clone())] {
                for (at, _) in line.match_indices(prefix) {
                    let rest = &line[at + prefix.len()..];
                    let path: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_lowercase() || *c == '_' || *c == ':')
                        .collect();
                    let full = if base.is_empty() {
                        path
                    } else {
                        format!("{base}::{path}")
                    };
                    if let Some(target) = known(full.trim_end_matches(':'))
                        && target != module
                    {
                        named.insert(target);
                    }
                }
            }
        }
        uses.insert(module, named);
    }
    uses
}

/// At every level of the module tree (the top-level modules of `src/`, and the children of
/// each folder module such as `controller`), no chain of uses between siblings, counting
/// what their descendants use, leads back to where it started. A module may use its own
/// parent and children (the parent wires them).
#[test]
fn the_operator_modules_have_no_import_cycles() {
    let uses = module_uses();
    assert!(
        uses.contains_key("controller::reconcile"),
        "{:?}",
        uses.keys()
    );
    let parents: BTreeSet<String> = uses
        .keys()
        .filter_map(|m| m.rsplit_once("::").map(|(p, _)| p.to_string()))
        .chain([String::new()])
        .collect();
    let mut cycles = Vec::new();
    for parent in &parents {
        let prefix = if parent.is_empty() {
            String::new()
        } else {
            format!("{parent}::")
        };
        // The sibling a module belongs to at this level, if it is below `parent`.
        let sibling = |module: &str| -> Option<String> {
            let rest = module.strip_prefix(&prefix)?;
            (!rest.is_empty()).then(|| rest.split("::").next().unwrap_or(rest).to_string())
        };
        let mut graph: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for (module, named) in &uses {
            let Some(from) = sibling(module) else {
                continue;
            };
            for target in named {
                if let Some(to) = sibling(target)
                    && to != from
                {
                    graph.entry(from.clone()).or_default().insert(to);
                }
            }
        }
        for start in graph.keys() {
            let mut stack = vec![vec![start.clone()]];
            let mut seen = BTreeSet::new();
            while let Some(path) = stack.pop() {
                let at = path.last().cloned().unwrap_or_default();
                for next in graph.get(&at).into_iter().flatten() {
                    if next == start {
                        cycles.push(format!("{prefix}{{{} -> {start}}}", path.join(" -> ")));
                    } else if seen.insert(next.clone()) {
                        let mut longer = path.clone();
                        longer.push(next.clone());
                        stack.push(longer);
                    }
                }
            }
        }
    }
    assert!(
        cycles.is_empty(),
        "import cycles between modules: {cycles:#?}"
    );
}
