//! Who may use a ClusterTokenIssuer: `allowedNamespaces` (a label selector; absent: nobody)
//! and `allowedResources` (glob patterns; absent: any).

use std::collections::BTreeMap;

use kube::ResourceExt;
use kube::core::{Selector, SelectorExt};

use crate::api::ClusterTokenIssuer;
use crate::failure::{Failure, reason};

/// A ClusterTokenIssuer serves a namespace only when `allowedNamespaces` selects it (absent:
/// nobody), and a resource only when it matches `allowedResources` (absent: any).
pub fn check_tenancy(
    issuer: &ClusterTokenIssuer,
    namespace: &str,
    namespace_labels: &BTreeMap<String, String>,
    resource: &str,
) -> Result<(), Failure> {
    let name = issuer.name_any();
    let not_allowed = |message: String| Failure {
        reason: reason::NOT_ALLOWED,
        message,
        retry_after: None,
    };
    let selector = issuer.spec.allowed_namespaces.clone().ok_or_else(|| {
        not_allowed(format!(
            "ClusterTokenIssuer {name} has no allowedNamespaces, so no namespace may use it"
        ))
    })?;
    let selector = Selector::try_from(selector).map_err(|e| {
        not_allowed(format!(
            "ClusterTokenIssuer {name} has an invalid allowedNamespaces: {e}"
        ))
    })?;
    if !selector.matches(namespace_labels) {
        return Err(not_allowed(format!(
            "ClusterTokenIssuer {name} does not allow namespace {namespace}"
        )));
    }
    if let Some(patterns) = &issuer.spec.allowed_resources
        && !patterns.iter().any(|p| glob_match(p, resource))
    {
        return Err(not_allowed(format!(
            "ClusterTokenIssuer {name} does not allow resource {resource}"
        )));
    }
    Ok(())
}

/// `*` matches any run of characters (including `/`); everything else matches itself.
pub fn glob_match(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let (first, last) = (parts[0], parts[parts.len() - 1]);
    if !text.starts_with(first)
        || !text[first.len()..].ends_with(last)
        || text.len() < first.len() + last.len()
    {
        return false;
    }
    let mut rest = &text[first.len()..text.len() - last.len()];
    for middle in &parts[1..parts.len() - 1] {
        match rest.find(middle) {
            Some(at) => rest = &rest[at + middle.len()..],
            None => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::ClusterTokenIssuerSpec;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

    #[test]
    fn glob_patterns() {
        assert!(glob_match(
            "https://*.example.com",
            "https://orders.example.com"
        ));
        assert!(glob_match(
            "https://*.example.com",
            "https://a.b.example.com"
        ));
        assert!(!glob_match(
            "https://*.example.com",
            "https://example.com.evil.org"
        ));
        assert!(glob_match("*", "urn:anything"));
        assert!(glob_match("urn:api:*", "urn:api:orders"));
        assert!(!glob_match("urn:api:*", "urn:apx:orders"));
        assert!(glob_match("https://*/v1/*", "https://x/v1/y"));
        assert!(!glob_match("a*a", "a"));
        assert!(glob_match("exact", "exact"));
        assert!(!glob_match("exact", "exactly"));
    }

    fn cluster_issuer(
        allowed: Option<LabelSelector>,
        resources: Option<Vec<&str>>,
    ) -> ClusterTokenIssuer {
        ClusterTokenIssuer::new(
            "corp",
            ClusterTokenIssuerSpec {
                allowed_namespaces: allowed,
                allowed_resources: resources.map(|r| r.into_iter().map(String::from).collect()),
                ..ClusterTokenIssuerSpec::default()
            },
        )
    }

    #[test]
    fn tenancy_denies_by_default() {
        let labels = BTreeMap::from([("team".to_string(), "shop".to_string())]);
        let deny = cluster_issuer(None, None);
        assert_eq!(
            check_tenancy(&deny, "shop", &labels, "urn:a")
                .unwrap_err()
                .reason,
            reason::NOT_ALLOWED
        );
        let everyone = cluster_issuer(Some(LabelSelector::default()), None);
        assert!(check_tenancy(&everyone, "shop", &BTreeMap::new(), "urn:a").is_ok());
        let shop_only = cluster_issuer(
            Some(LabelSelector {
                match_labels: Some(labels.clone()),
                ..LabelSelector::default()
            }),
            Some(vec!["https://*.example.com"]),
        );
        assert!(check_tenancy(&shop_only, "shop", &labels, "https://orders.example.com").is_ok());
        assert!(
            check_tenancy(
                &shop_only,
                "other",
                &BTreeMap::new(),
                "https://orders.example.com"
            )
            .is_err()
        );
        let err =
            check_tenancy(&shop_only, "shop", &labels, "https://orders.evil.org").unwrap_err();
        assert!(
            err.message.contains("does not allow resource"),
            "{}",
            err.message
        );
    }
}
