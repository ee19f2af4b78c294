//! Types shared by the issuer and token resources.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::KubeSchema;
use serde::{Deserialize, Serialize};

/// A key in a Secret. For a TokenIssuer the Secret is in the issuer's namespace; for a
/// ClusterTokenIssuer it is in the operator's cluster resource namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("size(self.name) > 0").message("a Secret reference needs a name"))]
#[x_kube(validation = Rule::new("size(self.key) > 0").message("a Secret reference needs a key"))]
pub struct SecretKeySelector {
    /// Name of the Secret.
    #[schemars(length(max = 253))]
    pub name: String,
    /// Key inside the Secret's `data`.
    #[schemars(length(max = 253))]
    pub key: String,
}

/// A whole Secret, by name. For a TokenIssuer the Secret is in the issuer's namespace; for a
/// ClusterTokenIssuer it is in the operator's cluster resource namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("size(self.name) > 0").message("a Secret reference needs a name"))]
pub struct SecretReference {
    /// Name of the Secret.
    #[schemars(length(max = 253))]
    pub name: String,
}

/// A condition in the Kubernetes style (`type`, `status`, `reason`, `message`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type, e.g. `Ready`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// One CamelCase word saying why, e.g. `Issued` or `TokenRequestFailed`.
    pub reason: String,
    /// Human-readable detail. Never contains a token or a credential.
    #[serde(default)]
    pub message: String,
    /// When `status` last changed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<Time>,
    /// The `metadata.generation` this condition was computed for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// The condition type every resource of this operator reports.
pub const READY: &str = "Ready";
