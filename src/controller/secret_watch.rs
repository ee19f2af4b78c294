//! Secrets that issuers name change under the operator, and some changes must act at once:
//!
//! - client certificates (RFC 8705), which cert-manager renews in their `kubernetes.io/tls`
//!   Secrets: the cached certificate goes, and tokens bound to the old one are replaced
//!   (and failures the old certificate may explain are retried);
//! - bootstrap refresh tokens that `login` writes (labelled [`BOOTSTRAP_LABEL`]): the chain
//!   adopts the new value within seconds, not at its next 5-minute read.
//!
//! Each watch is metadata-only, selected by the Secret type or a label (never every Secret
//! of the cluster), and keeps no cache: only the `resourceVersion` of the Secrets issuers
//! name.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::core::v1::{ObjectReference, Secret};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::Store;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tracing::{info, warn};

use crate::api::{ClusterTokenIssuer, IssuerSpec, TokenIssuer};
use crate::issuer::credentials::TLS_SECRET_TYPE;

/// A Secret by namespace and name.
type SecretKey = (String, String);

/// Label on a bootstrap Secret (value: the issuer's name) that the operator watches for
/// changes; `login` sets it. Without it, a new value is read within 5 minutes (at once
/// while the chain is lost or has no token).
pub const BOOTSTRAP_LABEL: &str = "audiencetoken.io/bootstrap";

/// How often each watched Secret that an issuer names changed while this process ran.
#[derive(Default)]
pub struct SecretChanges {
    /// The last `resourceVersion` seen, and the number of changes since the start.
    seen: Mutex<HashMap<SecretKey, (Option<String>, u64)>>,
}

impl SecretChanges {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SecretKey, (Option<String>, u64)>> {
        self.seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Changes of the issuer's certificate Secret seen since the start (0 without one): part
    /// of the issuer's revision, so a renewed certificate waives a failed token's backoff.
    pub fn epoch(&self, spec: &IssuerSpec, secret_namespace: &str) -> u64 {
        let Some(name) = certificate_secret(spec) else {
            return 0;
        };
        let key = (secret_namespace.to_string(), name.to_string());
        self.lock().get(&key).map_or(0, |(_, epoch)| *epoch)
    }

    /// Records a Secret's `resourceVersion`; whether it is a change. A deletion counts; the
    /// first sighting counts unless it is from the initial list (an issuer may have come to
    /// name a Secret after it was listed, so its first event is then a change).
    fn observe(&self, key: SecretKey, resource_version: Option<String>, initial: bool) -> bool {
        let mut seen = self.lock();
        match seen.get_mut(&key) {
            Some((last, _)) if *last == resource_version => false,
            Some((last, epoch)) => {
                *last = resource_version;
                *epoch += 1;
                true
            }
            None => {
                let epoch = u64::from(!initial);
                seen.insert(key, (resource_version, epoch));
                !initial
            }
        }
    }
}

/// The Secret an issuer's `tlsClientCertificate` names.
pub fn certificate_secret(spec: &IssuerSpec) -> Option<&str> {
    spec.tls_client_certificate
        .as_ref()
        .map(|c| c.secret_ref.name.as_str())
}

/// The Secret an issuer's refresh-token chain bootstraps from.
pub fn bootstrap_secret(spec: &IssuerSpec) -> Option<&str> {
    spec.grant
        .refresh_token
        .as_ref()
        .map(|g| g.bootstrap_secret_ref.name.as_str())
}

/// Where a watch finds the issuers.
pub(super) struct IssuerStores {
    /// TokenIssuers.
    pub issuers: Store<TokenIssuer>,
    /// ClusterTokenIssuers.
    pub cluster_issuers: Store<ClusterTokenIssuer>,
    /// Where ClusterTokenIssuers' Secrets live.
    pub cluster_resource_namespace: String,
}

/// Which Secrets of the issuers a watch follows.
#[derive(Clone, Copy, Debug)]
pub(super) enum Followed {
    /// `tlsClientCertificate`, selected by `type=kubernetes.io/tls`.
    Certificates,
    /// `grant.refreshToken.bootstrapSecretRef`, selected by [`BOOTSTRAP_LABEL`].
    Bootstraps,
}

impl Followed {
    fn config(self) -> watcher::Config {
        match self {
            Followed::Certificates => {
                watcher::Config::default().fields(&format!("type={TLS_SECRET_TYPE}"))
            }
            Followed::Bootstraps => watcher::Config::default().labels(BOOTSTRAP_LABEL),
        }
    }

    fn secret_of(self, spec: &IssuerSpec) -> Option<&str> {
        match self {
            Followed::Certificates => certificate_secret(spec),
            Followed::Bootstraps => bootstrap_secret(spec),
        }
    }
}

/// One watch: what it follows, where the issuers are, its record, and what it tells when
/// a followed Secret changed.
struct Watch<F> {
    followed: Followed,
    stores: IssuerStores,
    epochs: Arc<SecretChanges>,
    changed: F,
}

impl<F> Watch<F> {
    /// The issuers whose `tlsClientCertificate` is the Secret `namespace/name`.
    fn issuers_using(&self, namespace: &str, name: &str) -> Vec<ObjectReference> {
        let names = |spec: &IssuerSpec| self.followed.secret_of(spec) == Some(name);
        let mut found: Vec<ObjectReference> = self
            .stores
            .issuers
            .state()
            .iter()
            .filter(|i| i.namespace().as_deref() == Some(namespace) && names(&i.spec.issuer))
            .map(|i| i.object_ref(&()))
            .collect();
        if namespace == self.stores.cluster_resource_namespace {
            found.extend(
                self.stores
                    .cluster_issuers
                    .state()
                    .iter()
                    .filter(|i| names(&i.spec.issuer))
                    .map(|i| i.object_ref(&())),
            );
        }
        found
    }
}

/// Watches the `followed` Secrets (metadata only) until the task is aborted; `changed`
/// gets the namespace and name of one that changed and the issuers that name it.
pub(super) fn spawn_watch<F>(
    followed: Followed,
    stores: IssuerStores,
    epochs: Arc<SecretChanges>,
    api: Api<PartialObjectMeta<Secret>>,
    changed: F,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(&str, &str, &[ObjectReference]) + Send + 'static,
{
    let watch = Watch {
        followed,
        stores,
        epochs,
        changed,
    };
    let config = followed.config();
    tokio::spawn(async move {
        let stream = watcher(api, config).default_backoff();
        let mut stream = std::pin::pin!(stream);
        while let Some(event) = stream.next().await {
            let (secret, deleted, initial) = match event {
                Ok(watcher::Event::InitApply(s)) => (s, false, true),
                Ok(watcher::Event::Apply(s)) => (s, false, false),
                Ok(watcher::Event::Delete(s)) => (s, true, false),
                Ok(_) => continue,
                Err(e) => {
                    warn!(error = %e, "watch of issuers' Secrets failed; retrying");
                    continue;
                }
            };
            let (namespace, name) = (secret.namespace().unwrap_or_default(), secret.name_any());
            let issuers = watch.issuers_using(&namespace, &name);
            if issuers.is_empty() {
                continue;
            }
            let version = if deleted {
                None
            } else {
                secret.resource_version()
            };
            if !watch
                .epochs
                .observe((namespace.clone(), name.clone()), version, initial)
            {
                continue;
            }
            info!(
                namespace,
                name,
                issuers = issuers.len(),
                "a Secret issuers name changed"
            );
            (watch.changed)(&namespace, &name, &issuers);
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_resource_version_is_a_change_and_the_first_is_not() {
        let epochs = SecretChanges::default();
        let key = || ("shop".to_string(), "client-cert".to_string());
        assert!(
            !epochs.observe(key(), Some("1".into()), true),
            "listed at the start"
        );
        assert!(!epochs.observe(key(), Some("1".into()), true), "a relist");
        assert!(epochs.observe(key(), Some("2".into()), false), "renewed");
        assert!(epochs.observe(key(), None, false), "deleted");
        assert!(
            epochs.observe(key(), Some("3".into()), false),
            "created again"
        );
        let later = || ("shop".to_string(), "named-later".to_string());
        assert!(
            epochs.observe(later(), Some("9".into()), false),
            "first seen on a change: the issuer named it after the list"
        );

        let mut spec = IssuerSpec::default();
        assert_eq!(epochs.epoch(&spec, "shop"), 0, "no certificate");
        spec.tls_client_certificate = Some(crate::api::TlsClientCertificate {
            secret_ref: crate::api::SecretReference {
                name: "client-cert".into(),
            },
        });
        assert_eq!(epochs.epoch(&spec, "shop"), 3);
        assert_eq!(epochs.epoch(&spec, "other"), 0);
    }
}
