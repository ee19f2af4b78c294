//! The OAuth client (crate `audience-token-oauth`, `crates/oauth`) knows nothing of
//! Kubernetes: its resolved dependency graph holds no Kubernetes crate. The compiler then
//! refuses any `kube`/`k8s_openapi` path in it.

use std::collections::{BTreeSet, HashMap};
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
