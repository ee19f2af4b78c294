//! An operator that runs on the real cluster with exactly its own RBAC: the test's
//! kubeconfig impersonates a ServiceAccount bound to `rbac::required_rules` (nothing more),
//! so a ServiceAccount token can be minted only where a namespace owner's Role allows it,
//! as in a Helm install. Also what the test OAuth server needs to trust the cluster's
//! ServiceAccount tokens: the service-account issuer and its JWKS, read through the API
//! (a real API server serves them to authenticated clients only).

use std::path::{Path, PathBuf};

use audience_token_operator::rbac::{self, Scope};
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{
    ClusterRole, ClusterRoleBinding, PolicyRule, Role, RoleBinding, RoleRef, Subject,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::Client;
use kube::api::{Api, DeleteParams, PostParams};
use kube::config::Kubeconfig;

use crate::support::oidc::{Federation, FederationKeys};
use crate::support::scenarios::secretless::OperatorIdentity;

/// The impersonated ServiceAccount, its grants and its kubeconfig.
pub struct LimitedOperator {
    pub identity: OperatorIdentity,
    pub kubeconfig: PathBuf,
    /// Cluster-scoped objects and objects outside the test namespace, removed at the end.
    cluster_name: String,
}

fn meta(name: &str, namespace: Option<&str>) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.into()),
        namespace: namespace.map(str::to_string),
        ..ObjectMeta::default()
    }
}

fn policy_rules(rules: &[&rbac::Rule]) -> Vec<PolicyRule> {
    rules
        .iter()
        .map(|r| PolicyRule {
            api_groups: Some(vec![r.api_group.to_string()]),
            resources: Some(vec![r.resource.to_string()]),
            verbs: r.verbs.iter().map(|v| v.to_string()).collect(),
            ..PolicyRule::default()
        })
        .collect()
}

impl LimitedOperator {
    /// Creates ServiceAccount `ato-e2e-operator` in `namespace`, grants it the operator's
    /// rules for watching `namespace` (its own and the cluster resource namespace), and
    /// writes a copy of `kubeconfig` that impersonates it.
    pub async fn install(client: &Client, kubeconfig: &Path, namespace: &str) -> Self {
        let identity = OperatorIdentity {
            namespace: namespace.to_string(),
            name: "ato-e2e-operator".into(),
        };
        let post = PostParams::default();
        Api::<ServiceAccount>::namespaced(client.clone(), namespace)
            .create(
                &post,
                &ServiceAccount {
                    metadata: meta(&identity.name, None),
                    ..ServiceAccount::default()
                },
            )
            .await
            .expect("create the operator's ServiceAccount");
        let subject = Subject {
            kind: "ServiceAccount".into(),
            name: identity.name.clone(),
            namespace: Some(namespace.to_string()),
            ..Subject::default()
        };
        let rules = rbac::required_rules(&Scope {
            watched: Some(namespace.to_string()),
            operator_namespace: namespace.to_string(),
            cluster_resource_namespace: namespace.to_string(),
            leader_elect: false,
        });
        let cluster_name = format!("ato-e2e-{namespace}");
        let cluster_rules: Vec<&rbac::Rule> =
            rules.iter().filter(|r| r.namespace.is_none()).collect();
        Api::<ClusterRole>::all(client.clone())
            .create(
                &post,
                &ClusterRole {
                    metadata: meta(&cluster_name, None),
                    rules: Some(policy_rules(&cluster_rules)),
                    ..ClusterRole::default()
                },
            )
            .await
            .expect("create ClusterRole");
        Api::<ClusterRoleBinding>::all(client.clone())
            .create(
                &post,
                &ClusterRoleBinding {
                    metadata: meta(&cluster_name, None),
                    role_ref: RoleRef {
                        api_group: "rbac.authorization.k8s.io".into(),
                        kind: "ClusterRole".into(),
                        name: cluster_name.clone(),
                    },
                    subjects: Some(vec![subject.clone()]),
                },
            )
            .await
            .expect("create ClusterRoleBinding");
        let mut namespaces: Vec<&str> = rules
            .iter()
            .filter_map(|r| r.namespace.as_deref())
            .collect();
        namespaces.sort();
        namespaces.dedup();
        for role_namespace in namespaces {
            let here: Vec<&rbac::Rule> = rules
                .iter()
                .filter(|r| r.namespace.as_deref() == Some(role_namespace))
                .collect();
            Api::<Role>::namespaced(client.clone(), role_namespace)
                .create(
                    &post,
                    &Role {
                        metadata: meta(&cluster_name, None),
                        rules: Some(policy_rules(&here)),
                    },
                )
                .await
                .expect("create Role");
            Api::<RoleBinding>::namespaced(client.clone(), role_namespace)
                .create(
                    &post,
                    &RoleBinding {
                        metadata: meta(&cluster_name, None),
                        role_ref: RoleRef {
                            api_group: "rbac.authorization.k8s.io".into(),
                            kind: "Role".into(),
                            name: cluster_name.clone(),
                        },
                        subjects: Some(vec![subject.clone()]),
                    },
                )
                .await
                .expect("create RoleBinding");
        }

        let mut config = Kubeconfig::read_from(kubeconfig).expect("read E2E_KUBECONFIG");
        let context_name = config.current_context.clone().expect("a current context");
        let user = config
            .contexts
            .iter()
            .find(|c| c.name == context_name)
            .and_then(|c| c.context.as_ref())
            .map(|c| c.user.clone())
            .expect("the current context names a user")
            .unwrap_or_default();
        for auth in &mut config.auth_infos {
            if auth.name == user
                && let Some(info) = auth.auth_info.as_mut()
            {
                info.impersonate = Some(identity.username());
            }
        }
        let path = std::env::temp_dir().join(format!("ato-e2e-kubeconfig-{namespace}"));
        std::fs::write(
            &path,
            serde_yaml::to_string(&config).expect("kubeconfig serializes"),
        )
        .expect("write the impersonating kubeconfig");
        LimitedOperator {
            identity,
            kubeconfig: path,
            cluster_name,
        }
    }

    /// Removes what the namespace's deletion does not.
    pub async fn remove(self, client: &Client) {
        let dp = DeleteParams::default();
        let _ = Api::<ClusterRoleBinding>::all(client.clone())
            .delete(&self.cluster_name, &dp)
            .await;
        let _ = Api::<ClusterRole>::all(client.clone())
            .delete(&self.cluster_name, &dp)
            .await;
        for namespace in ["default"] {
            let _ = Api::<RoleBinding>::namespaced(client.clone(), namespace)
                .delete(&self.cluster_name, &dp)
                .await;
            let _ = Api::<Role>::namespaced(client.clone(), namespace)
                .delete(&self.cluster_name, &dp)
                .await;
        }
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// The cluster's service-account issuer and JWKS, for ServiceAccounts in `namespace`.
pub async fn cluster_federation(client: &Client, namespace: &str) -> Federation {
    let get = |path: &str| {
        http::Request::get(path)
            .body(Vec::new())
            .expect("a GET request")
    };
    let discovery: serde_json::Value = client
        .request(get("/.well-known/openid-configuration"))
        .await
        .expect("the cluster's service-account issuer discovery document");
    let jwks = client
        .request_text(get("/openid/v1/jwks"))
        .await
        .expect("the cluster's service-account JWKS");
    Federation {
        issuer: discovery["issuer"]
            .as_str()
            .expect("discovery names the issuer")
            .to_string(),
        keys: FederationKeys::Document(jwks),
        namespace: namespace.to_string(),
    }
}
