//! Client certificates (RFC 8705) change under the operator: cert-manager renews them in
//! their `kubernetes.io/tls` Secrets. This watch notices a change of a Secret an issuer's
//! `tlsClientCertificate` names, drops the cached certificate, and signals the issuer's
//! status and its AudienceTokens, whose plan then replaces tokens bound to the old
//! certificate at once (and retries failures the old certificate may explain).
//!
//! The watch is metadata-only, selected by the Secret type, and keeps no cache: only the
//! `resourceVersion` of the Secrets issuers name.

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

/// How often each named certificate Secret changed while this process ran.
#[derive(Default)]
pub struct CertificateEpochs {
    /// The last `resourceVersion` seen, and the number of changes since the start.
    seen: Mutex<HashMap<SecretKey, (Option<String>, u64)>>,
}

impl CertificateEpochs {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<SecretKey, (Option<String>, u64)>> {
        self.seen
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Changes of the issuer's certificate Secret seen since the start (0 without one): part
    /// of the issuer's revision, so a renewed certificate waives a failed token's backoff.
    pub fn epoch(&self, spec: &IssuerSpec, secret_namespace: &str) -> u64 {
        let Some(configured) = &spec.tls_client_certificate else {
            return 0;
        };
        let key = (
            secret_namespace.to_string(),
            configured.secret_ref.name.clone(),
        );
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

/// Where the watch finds the issuers, and what it tells when a certificate changed.
pub(super) struct Watch<F> {
    /// TokenIssuers.
    pub issuers: Store<TokenIssuer>,
    /// ClusterTokenIssuers.
    pub cluster_issuers: Store<ClusterTokenIssuer>,
    /// Where ClusterTokenIssuers' Secrets live.
    pub cluster_resource_namespace: String,
    /// The record of changes (the issuers' revisions read it).
    pub epochs: Arc<CertificateEpochs>,
    /// Called with the Secret's namespace and name and the issuers naming it.
    pub changed: F,
}

impl<F> Watch<F> {
    /// The issuers whose `tlsClientCertificate` is the Secret `namespace/name`.
    fn issuers_using(&self, namespace: &str, name: &str) -> Vec<ObjectReference> {
        let names = |spec: &IssuerSpec| {
            spec.tls_client_certificate
                .as_ref()
                .is_some_and(|c| c.secret_ref.name == name)
        };
        let mut found: Vec<ObjectReference> = self
            .issuers
            .state()
            .iter()
            .filter(|i| i.namespace().as_deref() == Some(namespace) && names(&i.spec.issuer))
            .map(|i| i.object_ref(&()))
            .collect();
        if namespace == self.cluster_resource_namespace {
            found.extend(
                self.cluster_issuers
                    .state()
                    .iter()
                    .filter(|i| names(&i.spec.issuer))
                    .map(|i| i.object_ref(&())),
            );
        }
        found
    }
}

/// Watches `kubernetes.io/tls` Secrets (metadata only) until the task is aborted.
pub(super) fn spawn_watch<F>(
    watch: Watch<F>,
    api: Api<PartialObjectMeta<Secret>>,
) -> tokio::task::JoinHandle<()>
where
    F: Fn(&str, &str, &[ObjectReference]) + Send + 'static,
{
    let config = watcher::Config::default().fields(&format!("type={TLS_SECRET_TYPE}"));
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
                    warn!(error = %e, "watch of kubernetes.io/tls Secrets failed; retrying");
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
                "client certificate Secret changed; re-issuing tokens bound to it"
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
        let epochs = CertificateEpochs::default();
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
