//! The custom resources of `audiencetoken.io/v1alpha1`: what users write and what
//! `kubectl explain` shows. The doc comments on every field are the user documentation.
//!
//! CEL rules (`x-kubernetes-validations`) reject at admission what can be rejected there;
//! `tests/crd_cel.rs` evaluates each one against valid and invalid objects.

mod audience_token;
mod common;
mod duration;
mod issuer;

pub use audience_token::*;
pub use common::*;
pub use duration::{DurationError, parse_duration};
pub use issuer::*;

use kube::CustomResourceExt;

/// The API group of every resource the operator defines.
pub const GROUP: &str = "audiencetoken.io";

/// All CRDs the operator needs, in the order `kubectl apply -f crds/` should see them.
pub fn crds()
-> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    vec![
        AudienceToken::crd(),
        TokenIssuer::crd(),
        ClusterTokenIssuer::crd(),
    ]
}

/// The CRDs as one multi-document YAML stream, exactly what `crds/` holds.
pub fn crds_yaml() -> Result<String, serde_yaml::Error> {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml::to_string(&crd)?);
    }
    Ok(out)
}
