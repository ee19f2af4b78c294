//! From an AudienceToken's `issuerRef` to the issuer it may use: the issuer from the cache
//! and the tenancy rules of ClusterTokenIssuers. What the issuer then needs for a token
//! request comes from the issuer layer ([`crate::issuer`]).

use k8s_openapi::api::core::v1::ObjectReference;
use kube::runtime::reflector::ObjectRef;
use kube::{Resource, ResourceExt};

use super::context::Context;
use crate::api::{AudienceToken, ClusterTokenIssuer, IssuerKind, IssuerSpec, TokenIssuer};
use crate::failure::{Failure, reason};
use crate::issuer::IssuerTarget;
use crate::issuer::tenancy::check_tenancy;

/// An issuer found and allowed for one AudienceToken.
#[derive(Clone, Debug)]
pub struct ResolvedIssuer {
    /// `TokenIssuer/<ns>/<name>` or `ClusterTokenIssuer/<name>`, for logs and caches.
    pub key: String,
    /// The issuer's spec.
    pub spec: IssuerSpec,
    /// Where the issuer's Secrets live.
    pub secret_namespace: String,
    /// The issuer's `metadata.generation`: a change waives the retry backoff.
    pub generation: i64,
    /// The issuer's name (state Secrets are named after it).
    pub name: String,
    /// The issuer object, for Events and owner references.
    pub object: ObjectReference,
}

impl ResolvedIssuer {
    /// What may fix a failed request when it changes: the generation, the refresh chain's
    /// bootstrap epoch, and the client certificate's epoch.
    pub fn revision(&self, ctx: &Context) -> super::context::IssuerRevision {
        let certificate_epoch = ctx.certificates.epoch(&self.spec, &self.secret_namespace);
        ctx.issuer_revision(&self.key, self.generation, certificate_epoch)
    }

    /// The issuer as the issuer layer takes it.
    pub fn target(&self) -> IssuerTarget<'_> {
        IssuerTarget {
            key: &self.key,
            spec: &self.spec,
            secret_namespace: &self.secret_namespace,
        }
    }
}

/// The issuer as logs and metrics name it: `TokenIssuer/<namespace>/<name>` or
/// `ClusterTokenIssuer/<name>`.
pub fn issuer_key(token: &AudienceToken) -> String {
    let issuer = &token.spec.issuer_ref;
    match issuer.kind {
        IssuerKind::TokenIssuer => format!(
            "TokenIssuer/{}/{}",
            token.namespace().unwrap_or_default(),
            issuer.name
        ),
        IssuerKind::ClusterTokenIssuer => format!("ClusterTokenIssuer/{}", issuer.name),
    }
}

/// Finds the issuer in the cache and applies the tenancy rules. No API call.
pub fn resolve(ctx: &Context, token: &AudienceToken) -> Result<ResolvedIssuer, Failure> {
    let namespace = token.namespace().unwrap_or_default();
    let issuer_ref = &token.spec.issuer_ref;
    match issuer_ref.kind {
        IssuerKind::TokenIssuer => {
            let found = ctx
                .issuers
                .get(&ObjectRef::<TokenIssuer>::new(&issuer_ref.name).within(&namespace))
                .ok_or_else(|| Failure {
                    reason: reason::ISSUER_NOT_READY,
                    message: format!("TokenIssuer {namespace}/{} not found", issuer_ref.name),
                    retry_after: None,
                })?;
            Ok(ResolvedIssuer {
                key: issuer_key(token),
                spec: found.spec.issuer.clone(),
                secret_namespace: namespace,
                generation: found.meta().generation.unwrap_or_default(),
                name: issuer_ref.name.clone(),
                object: found.object_ref(&()),
            })
        }
        IssuerKind::ClusterTokenIssuer => {
            let found = ctx
                .cluster_issuers
                .get(&ObjectRef::<ClusterTokenIssuer>::new(&issuer_ref.name))
                .ok_or_else(|| Failure {
                    reason: reason::ISSUER_NOT_READY,
                    message: format!("ClusterTokenIssuer {} not found", issuer_ref.name),
                    retry_after: None,
                })?;
            let labels = ctx
                .namespaces
                .get(&ObjectRef::new(&namespace))
                .map(|ns| ns.labels().clone())
                .unwrap_or_default();
            check_tenancy(&found, &namespace, &labels, &token.spec.resource)?;
            Ok(ResolvedIssuer {
                key: issuer_key(token),
                spec: found.spec.issuer.clone(),
                secret_namespace: ctx.settings.cluster_resource_namespace.clone(),
                generation: found.meta().generation.unwrap_or_default(),
                name: issuer_ref.name.clone(),
                object: found.object_ref(&()),
            })
        }
    }
}

/// For log fields: the kind and name of an AudienceToken's issuer.
pub fn issuer_label(token: &AudienceToken) -> String {
    let kind = match token.spec.issuer_ref.kind {
        IssuerKind::TokenIssuer => TokenIssuer::kind(&()),
        IssuerKind::ClusterTokenIssuer => ClusterTokenIssuer::kind(&()),
    };
    format!("{kind}/{}", token.spec.issuer_ref.name)
}
