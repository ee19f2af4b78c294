//! The cache of the Secrets the operator owns: a metadata-only watch selected by the
//! managed-by label, kept as compact entries of what reconcile reads.
//!
//! Whole metadata cost about 2.5 KiB a Secret (two 544-byte map nodes for the labels and
//! annotations, a dozen strings, the ownerReference); an entry here is a few hundred bytes.
//! Metadata that the compact form cannot say exactly (a `secretTemplate` record, other
//! owners, incomplete annotations) is kept whole.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, RwLock};

use futures::StreamExt;
use futures::channel::mpsc;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::Api;
use kube::core::PartialObjectMeta;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::{WatchStreamExt, watcher};
use kube::{Resource, ResourceExt};
use tracing::warn;

use super::watches::Tasks;
use crate::api::{AudienceToken, RENEW_REQUESTED_AT_ANNOTATION};
use crate::secret::{
    CERTIFICATE_THUMBPRINT_ANNOTATION, DPOP_JKT_ANNOTATION, EXPIRES_AT_ANNOTATION,
    ISSUED_AT_ANNOTATION, MANAGED_BY_LABEL, MANAGER, NAME_LABEL, PublishedToken,
    SPEC_HASH_ANNOTATION, TEMPLATE_KEYS_ANNOTATION, managed_selector, published_token, rfc3339,
};

/// What the operator knows about one Secret it owns.
#[derive(Clone, Debug, PartialEq)]
pub struct OwnedSecret {
    /// The AudienceToken its `audiencetoken.io/name` label names.
    pub token_name: String,
    /// The token it holds, if its annotations are complete.
    pub published: Option<PublishedToken>,
    resource_version: Option<String>,
    /// The uid of its ownerReference, when that is its only one and an AudienceToken's.
    controller_uid: Option<String>,
    /// The whole metadata, when the compact form above cannot say it exactly.
    whole: Option<Box<ObjectMeta>>,
}

impl OwnedSecret {
    /// The entry for a Secret with this metadata; `None` unless it carries the operator's
    /// managed-by label and names an AudienceToken.
    pub fn from_meta(mut meta: ObjectMeta) -> Option<OwnedSecret> {
        let labels = meta.labels.as_ref()?;
        if labels.get(MANAGED_BY_LABEL).map(String::as_str) != Some(MANAGER) {
            return None;
        }
        let token_name = labels.get(NAME_LABEL)?.clone();
        let published = published_token(&meta);
        let owners = meta.owner_references.as_deref().unwrap_or_default();
        let controller_uid = match owners {
            [owner] if is_token_controller(owner, &token_name) => Some(owner.uid.clone()),
            _ => None,
        };
        let compact = published.is_some()
            && (owners.is_empty() || controller_uid.is_some())
            && !meta
                .annotations
                .as_ref()
                .is_some_and(|a| a.contains_key(TEMPLATE_KEYS_ANNOTATION));
        let resource_version = meta.resource_version.take();
        let whole = (!compact).then(|| {
            meta.managed_fields = None;
            Box::new(meta)
        });
        Some(OwnedSecret {
            token_name,
            published,
            resource_version,
            controller_uid,
            whole,
        })
    }

    /// The metadata as far as the operator wrote it: what [`crate::secret::stale_fields`]
    /// and [`crate::secret::metadata_update`] look at (labels, annotations and
    /// ownerReferences of the operator's, the resourceVersion); [`OwnedSecret::from_meta`]
    /// of it is this entry again.
    pub fn metadata(&self) -> ObjectMeta {
        if let Some(whole) = &self.whole {
            let mut meta = (**whole).clone();
            meta.resource_version.clone_from(&self.resource_version);
            return meta;
        }
        let mut annotations = BTreeMap::new();
        if let Some(published) = &self.published {
            annotations.insert(
                EXPIRES_AT_ANNOTATION.to_string(),
                rfc3339(published.expires_at),
            );
            annotations.insert(
                ISSUED_AT_ANNOTATION.to_string(),
                rfc3339(published.issued_at),
            );
            annotations.insert(
                SPEC_HASH_ANNOTATION.to_string(),
                published.spec_hash.clone(),
            );
            if let Some(requested) = &published.renew_requested_at {
                annotations.insert(RENEW_REQUESTED_AT_ANNOTATION.to_string(), requested.clone());
            }
            if let Some(jkt) = &published.dpop_jkt {
                annotations.insert(DPOP_JKT_ANNOTATION.to_string(), jkt.clone());
            }
            if let Some(thumbprint) = &published.certificate_thumbprint {
                annotations.insert(
                    CERTIFICATE_THUMBPRINT_ANNOTATION.to_string(),
                    thumbprint.clone(),
                );
            }
        }
        ObjectMeta {
            labels: Some(BTreeMap::from([
                (MANAGED_BY_LABEL.to_string(), MANAGER.to_string()),
                (NAME_LABEL.to_string(), self.token_name.clone()),
            ])),
            annotations: Some(annotations),
            owner_references: self.controller_uid.as_ref().map(|uid| {
                vec![OwnerReference {
                    api_version: AudienceToken::api_version(&()).into_owned(),
                    kind: AudienceToken::kind(&()).into_owned(),
                    name: self.token_name.clone(),
                    uid: uid.clone(),
                    controller: Some(true),
                    block_owner_deletion: None,
                }]
            }),
            resource_version: self.resource_version.clone(),
            ..ObjectMeta::default()
        }
    }
}

fn is_token_controller(owner: &OwnerReference, token_name: &str) -> bool {
    owner.kind == AudienceToken::kind(&())
        && owner.api_version == AudienceToken::api_version(&())
        && owner.name == token_name
        && owner.controller == Some(true)
        && owner.block_owner_deletion.is_none()
}

/// `namespace/name`: one allocation per entry.
fn key(namespace: &str, name: &str) -> String {
    format!("{namespace}/{name}")
}

/// The Secrets the operator owns, by namespace and name.
#[derive(Default)]
pub struct OwnedSecrets {
    entries: RwLock<HashMap<String, Arc<OwnedSecret>>>,
    ready: tokio::sync::watch::Sender<bool>,
}

impl OwnedSecrets {
    /// The entry of Secret `namespace/name`, if the operator owns it.
    pub fn get(&self, namespace: &str, name: &str) -> Option<Arc<OwnedSecret>> {
        self.read().get(&key(namespace, name)).cloned()
    }

    /// How many Secrets are cached.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether none is.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }

    /// Records what the operator just wrote to Secret `namespace/name` (its metadata as
    /// written, and the resourceVersion the API server answered), so the next reconcile
    /// plans on it even before the watch event arrives: a reconcile woken in between (an
    /// issuer became Ready) would otherwise see the previous token and request another.
    /// The watch event replaces it, a deletion removes it.
    pub fn remember_write(&self, mut meta: ObjectMeta, resource_version: Option<String>) {
        let key = key(
            meta.namespace.as_deref().unwrap_or_default(),
            meta.name.as_deref().unwrap_or_default(),
        );
        meta.resource_version = resource_version;
        if let Some(owned) = OwnedSecret::from_meta(meta) {
            self.write().insert(key, Arc::new(owned));
        }
    }

    /// Resolves once the first list is in.
    pub async fn wait_until_ready(&self) {
        let mut ready = self.ready.subscribe();
        // The sender lives as long as `self`: an error cannot happen while we wait.
        let _ = ready.wait_for(|ready| *ready).await;
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Arc<OwnedSecret>>> {
        self.entries
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Arc<OwnedSecret>>> {
        self.entries
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Applies one watch event; a deleted Secret's AudienceToken is returned (to reconcile).
    fn apply(
        &self,
        pending: &mut Option<HashMap<String, Arc<OwnedSecret>>>,
        event: watcher::Event<PartialObjectMeta<Secret>>,
    ) -> Option<ObjectRef<AudienceToken>> {
        let entry = |secret: PartialObjectMeta<Secret>| {
            let namespace = secret.namespace().unwrap_or_default();
            let key = key(&namespace, &secret.name_any());
            (
                key,
                namespace,
                OwnedSecret::from_meta(secret.metadata).map(Arc::new),
            )
        };
        match event {
            watcher::Event::Init => *pending = Some(HashMap::new()),
            watcher::Event::InitApply(secret) => {
                if let (key, _, Some(owned)) = entry(secret) {
                    pending.get_or_insert_default().insert(key, owned);
                }
            }
            watcher::Event::InitDone => {
                if let Some(listed) = pending.take() {
                    *self.write() = listed;
                }
                self.ready.send_replace(true);
            }
            watcher::Event::Apply(secret) => {
                let (key, _, owned) = entry(secret);
                match owned {
                    Some(owned) => self.write().insert(key, owned),
                    // The label was taken off: no longer ours.
                    None => self.write().remove(&key),
                };
            }
            watcher::Event::Delete(secret) => {
                let (key, namespace, owned) = entry(secret);
                self.write().remove(&key);
                return owned.map(|o| ObjectRef::new(&o.token_name).within(&namespace));
            }
        }
        None
    }
}

/// Starts the watch of owned Secrets; the AudienceTokens whose Secrets are deleted come out
/// of the returned stream.
pub(super) fn spawn(
    tasks: &mut Tasks,
    api: Api<PartialObjectMeta<Secret>>,
) -> (
    Arc<OwnedSecrets>,
    mpsc::UnboundedReceiver<ObjectRef<AudienceToken>>,
) {
    let cache = Arc::new(OwnedSecrets::default());
    let (deleted_tx, deleted_rx) = mpsc::unbounded();
    let config = watcher::Config::default().labels(&managed_selector());
    // `Api<PartialObjectMeta<_>>`: metadata-only lists and watches (never `data`).
    let stream = watcher::watcher(api, config).default_backoff();
    tasks.0.push(tokio::spawn({
        let cache = cache.clone();
        async move {
            let mut stream = std::pin::pin!(stream);
            let mut pending = None;
            while let Some(event) = stream.next().await {
                match event {
                    Ok(event) => {
                        if let Some(token) = cache.apply(&mut pending, event) {
                            // The controller may have stopped; then nobody needs it.
                            let _ = deleted_tx.unbounded_send(token);
                        }
                    }
                    Err(e) => warn!(error = %e, "watch of owned Secrets failed; retrying"),
                }
            }
        }
    }));
    (cache, deleted_rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AudienceTokenSpec, DeletionPolicy, SecretTemplate};
    use crate::oauth::IssuedToken;
    use crate::oauth::dpop::{DpopAlgorithm, DpopKey};
    use crate::redact::SecretString;
    use crate::secret::{desired_secret, metadata_update, spec_hash, stale_fields};
    use jiff::Timestamp;

    /// [`desired_secret`] with the spec hash computed here, as reconcile does.
    fn desired(at: &AudienceToken, token: &IssuedToken, dpop: Option<&DpopKey>) -> Secret {
        desired_secret(at, &spec_hash(&at.spec), token, dpop)
    }

    fn token_resource(policy: DeletionPolicy, template: bool) -> AudienceToken {
        let mut at = AudienceToken::new(
            "orders",
            AudienceTokenSpec {
                resource: "https://orders.example.com".into(),
                secret_template: template.then(|| SecretTemplate {
                    labels: BTreeMap::from([("team".into(), "shop".into())]),
                    annotations: BTreeMap::new(),
                }),
                deletion_policy: policy,
                ..AudienceTokenSpec::default()
            },
        );
        at.metadata.namespace = Some("shop".into());
        at.metadata.uid = Some("uid-1".into());
        at
    }

    fn issued(thumbprint: Option<&str>) -> IssuedToken {
        IssuedToken {
            access_token: SecretString::new("the-token"),
            token_type: "Bearer".into(),
            issued_at: Timestamp::from_second(1_800_000_000).unwrap(),
            expires_at: Timestamp::from_second(1_800_003_600).unwrap(),
            audience: vec!["https://orders.example.com".into()],
            scopes: vec![],
            refresh_token: None,
            certificate_thumbprint: thumbprint.map(str::to_string),
            authorization_details: Vec::new(),
        }
    }

    /// The metadata the API server would show for `secret` as written.
    fn as_stored(secret: &Secret) -> ObjectMeta {
        ObjectMeta {
            resource_version: Some("7".into()),
            uid: Some("secret-uid".into()),
            ..secret.metadata.clone()
        }
    }

    #[test]
    fn the_compact_entry_finds_what_the_whole_metadata_finds_stale() {
        let key = DpopKey::generate(DpopAlgorithm::ES256).unwrap();
        let bearer = issued(None);
        let bound = issued(Some("thumb"));
        let shapes = [
            desired(
                &token_resource(DeletionPolicy::Delete, false),
                &bearer,
                None,
            ),
            desired(
                &token_resource(DeletionPolicy::Retain, false),
                &bearer,
                None,
            ),
            desired(
                &token_resource(DeletionPolicy::Delete, false),
                &bound,
                Some(&key),
            ),
            desired(
                &token_resource(DeletionPolicy::Delete, true),
                &bearer,
                Some(&key),
            ),
        ];
        let mut compact = 0;
        for before in &shapes {
            let stored = as_stored(before);
            let owned = OwnedSecret::from_meta(stored.clone()).expect("ours");
            compact += usize::from(owned.whole.is_none());
            assert_eq!(owned.token_name, "orders");
            assert_eq!(owned.metadata().resource_version.as_deref(), Some("7"));
            assert_eq!(
                OwnedSecret::from_meta(owned.metadata()).as_ref(),
                Some(&owned),
                "its metadata is the entry again"
            );
            for after in &shapes {
                assert_eq!(
                    stale_fields(&owned.metadata(), after, "uid-1"),
                    stale_fields(&stored, after, "uid-1"),
                    "from {:?} to {:?}",
                    before.metadata,
                    after.metadata
                );
            }
            for policy in [DeletionPolicy::Delete, DeletionPolicy::Retain] {
                for template in [false, true] {
                    let spec_now = token_resource(policy, template);
                    let patch =
                        |meta: &ObjectMeta| metadata_update(meta, &spec_now).map(|u| u.patch);
                    assert_eq!(
                        patch(&owned.metadata()),
                        patch(&stored),
                        "from {:?} to {policy:?}, template {template}",
                        before.metadata
                    );
                }
            }
        }
        assert_eq!(compact, 3, "only the templated Secret is kept whole");
    }

    #[test]
    fn secrets_not_labelled_as_ours_are_not_entries_and_odd_ones_are_kept_whole() {
        let secret = desired(
            &token_resource(DeletionPolicy::Delete, false),
            &issued(None),
            None,
        );
        let mut foreign = as_stored(&secret);
        foreign
            .labels
            .as_mut()
            .unwrap()
            .insert(MANAGED_BY_LABEL.into(), "helm".into());
        assert!(OwnedSecret::from_meta(foreign).is_none());

        let mut two_owners = as_stored(&secret);
        two_owners
            .owner_references
            .as_mut()
            .unwrap()
            .push(OwnerReference {
                uid: "other".into(),
                ..OwnerReference::default()
            });
        let owned = OwnedSecret::from_meta(two_owners.clone()).unwrap();
        assert_eq!(
            owned.metadata().owner_references,
            two_owners.owner_references
        );

        let mut incomplete = as_stored(&secret);
        incomplete.annotations.as_mut().unwrap().clear();
        let owned = OwnedSecret::from_meta(incomplete).unwrap();
        assert!(owned.published.is_none());
        assert!(owned.whole.is_some());
    }

    #[test]
    fn watch_events_fill_replace_and_empty_the_cache() {
        let cache = OwnedSecrets::default();
        let secret = |name: &str, token: &str| {
            let mut at = token_resource(DeletionPolicy::Delete, false);
            at.metadata.name = Some(token.into());
            at.spec.secret_name = Some(name.into());
            PartialObjectMeta::<Secret> {
                metadata: as_stored(&desired(&at, &issued(None), None)),
                ..Default::default()
            }
        };
        let mut pending = None;
        for event in [
            watcher::Event::Init,
            watcher::Event::InitApply(secret("a", "ta")),
            watcher::Event::InitApply(secret("b", "tb")),
        ] {
            assert!(cache.apply(&mut pending, event).is_none());
        }
        assert!(cache.is_empty(), "nothing before the list is done");
        cache.apply(&mut pending, watcher::Event::InitDone);
        assert_eq!(cache.len(), 2);
        assert_eq!(cache.get("shop", "a").unwrap().token_name, "ta");
        let deleted = cache.apply(&mut pending, watcher::Event::Delete(secret("a", "ta")));
        assert_eq!(deleted, Some(ObjectRef::new("ta").within("shop")));
        assert!(cache.get("shop", "a").is_none());
        // A relist replaces everything: what it does not list is gone.
        cache.apply(&mut pending, watcher::Event::Init);
        cache.apply(&mut pending, watcher::Event::InitApply(secret("c", "tc")));
        cache.apply(&mut pending, watcher::Event::InitDone);
        assert_eq!(cache.len(), 1);
        assert!(cache.get("shop", "b").is_none());
        // What the operator wrote is known before its watch event; the event replaces it.
        let mut written = secret("d", "td");
        written.metadata.resource_version = None;
        cache.remember_write(written.metadata.clone(), Some("9".into()));
        let remembered = cache.get("shop", "d").expect("remembered");
        assert_eq!(remembered.metadata().resource_version.as_deref(), Some("9"));
        cache.apply(&mut pending, watcher::Event::Delete(secret("d", "td")));
        assert!(cache.get("shop", "d").is_none(), "a deletion removes it");
        // The label taken off: no longer ours.
        let mut relabelled = secret("c", "tc");
        relabelled.metadata.labels = None;
        cache.apply(&mut pending, watcher::Event::Apply(relabelled));
        assert!(cache.is_empty());
    }
}
