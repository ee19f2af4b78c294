//! The Kubernetes permissions the operator uses, and nothing more: the source of truth for
//! the Helm chart's RBAC (`audience-token-operator rbac`, checked against the rendered chart
//! in `tests/helm`) and for the controller test that logs every API call the operator makes.
//!
//! Not here, on purpose: `create` on `serviceaccounts/token`. An issuer with
//! `clientAuth.method: ServiceAccountToken` or `grant.type: TokenExchange` mints tokens of
//! one ServiceAccount, and the owner of that ServiceAccount's namespace grants exactly that
//! (a Role with `resourceNames`, bound to the operator), as for cert-manager's Vault issuer.

use serde::Serialize;

/// Where the operator runs and what it watches: decides which namespaces need grants.
#[derive(Clone, Debug)]
pub struct Scope {
    /// The single namespace watched (`--namespace`), or `None` for all namespaces.
    pub watched: Option<String>,
    /// The operator's own namespace (its Lease lives there).
    pub operator_namespace: String,
    /// Where ClusterTokenIssuers' Secrets live (`--cluster-resource-namespace`).
    pub cluster_resource_namespace: String,
    /// Whether leader election (a Lease) is used.
    pub leader_elect: bool,
}

/// One grant: verbs on a resource, cluster-wide or in one namespace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Rule {
    /// `None`: cluster-wide (a ClusterRole); otherwise a Role in this namespace.
    pub namespace: Option<String>,
    /// API group; empty for the core group.
    pub api_group: &'static str,
    /// Resource, with `/status` for the status subresource.
    pub resource: &'static str,
    /// Verbs used.
    pub verbs: Vec<&'static str>,
}

const GROUP: &str = "audiencetoken.io";
/// Reflectors list and watch; nothing is read with `get`.
const WATCH: &[&str] = &["list", "watch"];
const STATUS: &[&str] = &["patch"];
/// Owned Secrets: watched metadata-only, read (`get`: client secrets, refresh state, a
/// Secret of the right name that is not in the cache); `kubernetes.io/tls` Secrets are
/// watched metadata-only too (client certificates renewed under an issuer); created (refresh
/// state, a new token's Secret: a create never touches an existing one), replaced
/// with a resourceVersion precondition (refresh state) and server-side applied (tokens).
/// Never deleted: owner references let the garbage collector do that.
const SECRETS: &[&str] = &["get", "list", "watch", "create", "update", "patch"];
/// Secrets outside the watched namespace that ClusterTokenIssuers use.
const CLUSTER_RESOURCE_SECRETS: &[&str] = &["get", "create", "update"];
/// kube-runtime's recorder creates an Event, then patches its series when it repeats.
const EVENTS: &[&str] = &["create", "patch"];
/// kube-lease-manager reads, creates once, and patches the Lease.
const LEASES: &[&str] = &["get", "create", "patch"];

fn rule(
    namespace: Option<&str>,
    api_group: &'static str,
    resource: &'static str,
    verbs: &[&'static str],
) -> Rule {
    Rule {
        namespace: namespace.map(str::to_string),
        api_group,
        resource,
        verbs: verbs.to_vec(),
    }
}

/// The grants the operator needs in `scope`.
pub fn required_rules(scope: &Scope) -> Vec<Rule> {
    let mut rules = vec![
        rule(None, GROUP, "clustertokenissuers", WATCH),
        rule(None, GROUP, "clustertokenissuers/status", STATUS),
        rule(None, "", "namespaces", WATCH),
    ];
    let watched = scope.watched.as_deref();
    rules.extend([
        rule(watched, GROUP, "audiencetokens", WATCH),
        rule(watched, GROUP, "audiencetokens/status", STATUS),
        rule(watched, GROUP, "tokenissuers", WATCH),
        rule(watched, GROUP, "tokenissuers/status", STATUS),
        rule(watched, "", "secrets", SECRETS),
        rule(watched, "events.k8s.io", "events", EVENTS),
    ]);
    if let Some(watched) = watched {
        if scope.cluster_resource_namespace != watched {
            rules.push(rule(
                Some(&scope.cluster_resource_namespace),
                "",
                "secrets",
                CLUSTER_RESOURCE_SECRETS,
            ));
        }
        // kube-runtime puts Events about cluster-scoped objects in `default`.
        if watched != "default" {
            rules.push(rule(Some("default"), "events.k8s.io", "events", EVENTS));
        }
    }
    if scope.leader_elect {
        rules.push(rule(
            Some(&scope.operator_namespace),
            "coordination.k8s.io",
            "leases",
            LEASES,
        ));
    }
    rules
}

/// Whether `rules` allow `verb` on `resource` of `api_group` in `namespace` (`None`: a
/// cluster-scoped object or an all-namespaces request).
pub fn allows(
    rules: &[Rule],
    namespace: Option<&str>,
    api_group: &str,
    resource: &str,
    verb: &str,
) -> bool {
    rules.iter().any(|r| {
        r.api_group == api_group
            && r.resource == resource
            && r.verbs.contains(&verb)
            && (r.namespace.is_none() || r.namespace.as_deref() == namespace)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(watched: Option<&str>) -> Scope {
        Scope {
            watched: watched.map(str::to_string),
            operator_namespace: "ato-system".into(),
            cluster_resource_namespace: "ato-system".into(),
            leader_elect: true,
        }
    }

    #[test]
    fn cluster_wide_mode_grants_cluster_wide_except_the_lease() {
        let rules = required_rules(&scope(None));
        assert!(allows(&rules, Some("team-a"), "", "secrets", "patch"));
        assert!(allows(&rules, None, GROUP, "audiencetokens", "watch"));
        assert!(allows(
            &rules,
            Some("ato-system"),
            "coordination.k8s.io",
            "leases",
            "patch"
        ));
        assert!(!allows(
            &rules,
            Some("team-a"),
            "coordination.k8s.io",
            "leases",
            "patch"
        ));
        assert!(!allows(&rules, Some("team-a"), "", "secrets", "delete"));
    }

    #[test]
    fn single_namespace_mode_stays_in_its_namespaces() {
        let rules = required_rules(&scope(Some("team-a")));
        assert!(allows(&rules, Some("team-a"), "", "secrets", "patch"));
        assert!(!allows(&rules, Some("team-b"), "", "secrets", "get"));
        assert!(!allows(&rules, None, "", "secrets", "list"));
        // ClusterTokenIssuers' Secrets: read and refresh state, but never applied or listed.
        assert!(allows(&rules, Some("ato-system"), "", "secrets", "update"));
        assert!(!allows(&rules, Some("ato-system"), "", "secrets", "list"));
        assert!(allows(
            &rules,
            Some("default"),
            "events.k8s.io",
            "events",
            "create"
        ));
        assert!(allows(&rules, None, GROUP, "clustertokenissuers", "list"));
    }

    #[test]
    fn no_lease_without_leader_election() {
        let rules = required_rules(&Scope {
            leader_elect: false,
            ..scope(None)
        });
        assert!(rules.iter().all(|r| r.resource != "leases"));
    }

    /// Minting a ServiceAccount's tokens is granted per ServiceAccount by the owner of its
    /// namespace (a Role with resourceNames), never by the operator's own RBAC: a cluster
    /// role that could mint any ServiceAccount's token could act as any workload.
    #[test]
    fn no_rule_mints_service_account_tokens() {
        for watched in [None, Some("team-a")] {
            for leader_elect in [false, true] {
                let rules = required_rules(&Scope {
                    leader_elect,
                    ..scope(watched)
                });
                assert!(
                    rules
                        .iter()
                        .all(|r| !r.resource.starts_with("serviceaccounts")),
                    "{rules:?}"
                );
            }
        }
    }

    #[test]
    fn nothing_is_ever_deleted_and_nothing_is_a_wildcard() {
        for watched in [None, Some("team-a")] {
            for rule in required_rules(&scope(watched)) {
                assert!(!rule.verbs.iter().any(|v| v.contains("delete") || *v == "*"));
                assert!(rule.resource != "*" && rule.api_group != "*");
            }
        }
    }
}
