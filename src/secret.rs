//! The Secret an AudienceToken writes: its layout (labels, annotations, data keys), and how
//! the operator reads back what it published from the Secret's metadata alone.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use jiff::Timestamp;
use k8s_openapi::ByteString;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::{Resource, ResourceExt};
use sha2::{Digest, Sha256};

use crate::api::{
    AudienceToken, AudienceTokenSpec, DeletionPolicy, RENEW_REQUESTED_AT_ANNOTATION, SecretTemplate,
};
use crate::oauth::IssuedToken;
use crate::oauth::dpop::DpopKey;

/// The field manager and `app.kubernetes.io/managed-by` value of everything the operator writes.
pub const MANAGER: &str = "audience-token-operator";
/// Label marking Secrets the operator owns; the operator watches only Secrets with it.
pub const MANAGED_BY_LABEL: &str = "app.kubernetes.io/managed-by";
/// Label naming the AudienceToken a Secret belongs to.
pub const NAME_LABEL: &str = "audiencetoken.io/name";
/// Annotation: when the token in the Secret expires (RFC 3339).
pub const EXPIRES_AT_ANNOTATION: &str = "audiencetoken.io/expires-at";
/// Annotation: when the token in the Secret was issued (RFC 3339).
pub const ISSUED_AT_ANNOTATION: &str = "audiencetoken.io/issued-at";
/// Annotation: hash of the spec fields the token was issued for.
pub const SPEC_HASH_ANNOTATION: &str = "audiencetoken.io/spec-hash";

/// Keys of the Secret's `data`.
pub mod keys {
    /// The access token, raw.
    pub const TOKEN: &str = "token";
    /// The token type, e.g. `Bearer`.
    pub const TOKEN_TYPE: &str = "token-type";
    /// Expiry, RFC 3339.
    pub const EXPIRES_AT: &str = "expires-at";
    /// The audience the token is for.
    pub const AUDIENCE: &str = "audience";
    /// Granted scopes, space separated.
    pub const SCOPE: &str = "scope";
    /// The DPoP private key (a JWK with `alg`), for DPoP-bound tokens only.
    pub const DPOP_PRIVATE_KEY: &str = "dpop-private-key";
    /// The RFC 7638 thumbprint of the DPoP key (the token's `cnf.jkt`).
    pub const DPOP_JKT: &str = "dpop-jkt";
    /// The `x5t#S256` of the client certificate a certificate-bound token is bound to
    /// (RFC 8705 §3.1): which certificate the workload must present with it.
    pub const CERTIFICATE_THUMBPRINT: &str = "certificate-thumbprint";
}

/// Annotation: the `x5t#S256` of the client certificate the token is bound to, so the
/// operator sees from the Secret's metadata alone that the issuer's certificate changed.
pub const CERTIFICATE_THUMBPRINT_ANNOTATION: &str = "audiencetoken.io/certificate-thumbprint";

/// Annotation: the thumbprint of the DPoP key in the Secret, so the operator knows from the
/// Secret's metadata alone which key a DPoP-bound token is bound to.
pub const DPOP_JKT_ANNOTATION: &str = "audiencetoken.io/dpop-jkt";

/// Annotation: the `secretTemplate` label and annotation keys written to the Secret (JSON,
/// `{"labels":[…],"annotations":[…]}`, only while the template has any), so a key later
/// dropped from the template is removed from the Secret: see [`stale_fields`].
pub const TEMPLATE_KEYS_ANNOTATION: &str = "audiencetoken.io/template-keys";

/// The label selector that finds every Secret the operator owns.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGER}")
}

/// A hash of the spec fields that decide which token is wanted. A token published under
/// another hash is replaced at once. Scopes are a set: order and duplicates do not matter.
///
/// What is hashed is compact JSON with the members in key order: `audience`,
/// `authorizationDetails` (only when set), `dpop` (its algorithm, only when set),
/// `issuerKind`, `issuerName`, `resource`, `scopes` (sorted, without duplicates). It must not
/// change: a new hash re-issues every token at an upgrade. It is written straight from the
/// spec (every reconcile hashes its token's spec); the tests check it against the same JSON
/// built as a `serde_json::Value`, whose maps sort their keys.
pub fn spec_hash(spec: &AudienceTokenSpec) -> String {
    #[derive(serde::Serialize)]
    #[serde(rename_all = "camelCase")]
    struct Canonical<'a> {
        audience: &'a Option<String>,
        // JSON values from the manifest: their maps are sorted already (serde_json's map
        // without `preserve_order`), so the order the manifest wrote members in does not
        // matter; the order of the list does.
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        authorization_details: &'a [serde_json::Value],
        #[serde(skip_serializing_if = "Option::is_none")]
        dpop: Option<&'a crate::api::DpopAlgorithmName>,
        issuer_kind: &'a crate::api::IssuerKind,
        issuer_name: &'a str,
        resource: &'a str,
        scopes: Vec<&'a str>,
    }
    let mut scopes: Vec<&str> = spec.scopes.iter().map(String::as_str).collect();
    scopes.sort_unstable();
    scopes.dedup();
    let canonical = Canonical {
        audience: &spec.audience,
        authorization_details: &spec.authorization_details,
        dpop: spec.dpop.as_ref().map(|dpop| &dpop.algorithm),
        issuer_kind: &spec.issuer_ref.kind,
        issuer_name: &spec.issuer_ref.name,
        resource: &spec.resource,
        scopes,
    };
    // Serializing these types cannot fail (no maps with non-string keys).
    short_sha256(&serde_json::to_vec(&canonical).unwrap_or_default())
}

/// The first 8 bytes of the SHA-256 of `bytes`, as 16 lowercase hex digits: the short
/// hashes the operator records in annotations (spec hash, bootstrap hash).
pub fn short_sha256(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    let mut hex = String::with_capacity(16);
    for byte in &digest[..8] {
        // Writing to a String cannot fail.
        let _ = write!(hex, "{byte:02x}");
    }
    hex
}

/// RFC 3339 with whole seconds, as written to annotations and status.
pub fn rfc3339(at: Timestamp) -> String {
    Timestamp::from_second(at.as_second())
        .unwrap_or(at)
        .to_string()
}

/// The Secret to server-side apply for a freshly issued token (with the DPoP key it is bound
/// to, if any). `spec_hash` is [`spec_hash`] of the AudienceToken's spec, which the caller
/// has computed already to plan.
pub fn desired_secret(
    token_resource: &AudienceToken,
    spec_hash: &str,
    token: &IssuedToken,
    dpop: Option<&DpopKey>,
) -> Secret {
    let name = token_resource.metadata.name.clone().unwrap_or_default();
    let template = token_resource
        .spec
        .secret_template
        .clone()
        .unwrap_or_default();

    let template_keys = template_record(&template);
    let mut labels = template.labels;
    labels.insert(MANAGED_BY_LABEL.into(), MANAGER.into());
    labels.insert(NAME_LABEL.into(), name);

    let expires_at = rfc3339(token.expires_at);
    let mut annotations = template.annotations;
    annotations.insert(EXPIRES_AT_ANNOTATION.into(), expires_at.clone());
    annotations.insert(ISSUED_AT_ANNOTATION.into(), rfc3339(token.issued_at));
    annotations.insert(SPEC_HASH_ANNOTATION.into(), spec_hash.to_string());
    if let Some(keys) = template_keys {
        annotations.insert(TEMPLATE_KEYS_ANNOTATION.into(), keys);
    }
    // Any token issued after a forced-renewal request satisfies it; recorded here too so a
    // lost status does not repeat the renewal. The operator's cache drops a request once
    // status shows it acted on, so the status's record stands in for it then.
    if let Some(requested) = token_resource
        .annotations()
        .get(RENEW_REQUESTED_AT_ANNOTATION)
        .or_else(|| {
            token_resource
                .status
                .as_ref()
                .and_then(|status| status.last_renew_requested_at.as_ref())
        })
    {
        annotations.insert(RENEW_REQUESTED_AT_ANNOTATION.into(), requested.clone());
    }

    let owner_references = match token_resource.spec.deletion_policy {
        DeletionPolicy::Delete => owner_reference(token_resource).map(|r| vec![r]),
        DeletionPolicy::Retain => None,
    };

    if let Some(key) = dpop {
        annotations.insert(DPOP_JKT_ANNOTATION.into(), key.thumbprint().to_string());
    }
    if let Some(thumbprint) = &token.certificate_thumbprint {
        annotations.insert(CERTIFICATE_THUMBPRINT_ANNOTATION.into(), thumbprint.clone());
    }

    let bytes = |s: &str| ByteString(s.as_bytes().to_vec());
    let mut data = BTreeMap::from([
        (keys::TOKEN.to_string(), bytes(token.access_token.expose())),
        (keys::TOKEN_TYPE.to_string(), bytes(&token.token_type)),
        (keys::EXPIRES_AT.to_string(), bytes(&expires_at)),
        (
            keys::AUDIENCE.to_string(),
            bytes(token_resource.expected_audience()),
        ),
        (keys::SCOPE.to_string(), bytes(&token.scopes.join(" "))),
    ]);
    if let Some(key) = dpop {
        data.insert(
            keys::DPOP_PRIVATE_KEY.to_string(),
            bytes(key.private_jwk().expose()),
        );
        data.insert(keys::DPOP_JKT.to_string(), bytes(key.thumbprint()));
    }
    if let Some(thumbprint) = &token.certificate_thumbprint {
        data.insert(keys::CERTIFICATE_THUMBPRINT.to_string(), bytes(thumbprint));
    }

    Secret {
        metadata: ObjectMeta {
            name: Some(token_resource.secret_name().to_string()),
            namespace: token_resource.metadata.namespace.clone(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references,
            ..ObjectMeta::default()
        },
        type_: Some("Opaque".into()),
        data: Some(data),
        ..Secret::default()
    }
}

/// The AudienceToken as the Secret's controlling owner. `blockOwnerDeletion` is left unset:
/// it would need `update` on `audiencetokens/finalizers` and buys nothing here.
fn owner_reference(token_resource: &AudienceToken) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: AudienceToken::api_version(&()).into_owned(),
        kind: AudienceToken::kind(&()).into_owned(),
        name: token_resource.metadata.name.clone()?,
        uid: token_resource.metadata.uid.clone()?,
        controller: Some(true),
        block_owner_deletion: None,
    })
}

/// What a Secret's annotations say about the token it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PublishedToken {
    /// When it was issued.
    pub issued_at: Timestamp,
    /// When it expires.
    pub expires_at: Timestamp,
    /// The spec hash it was issued for.
    pub spec_hash: String,
    /// The `renew-requested-at` value in force when it was issued.
    pub renew_requested_at: Option<String>,
    /// The thumbprint of the DPoP key a DPoP-bound token is bound to.
    pub dpop_jkt: Option<String>,
    /// The `x5t#S256` of the client certificate a certificate-bound token is bound to.
    pub certificate_thumbprint: Option<String>,
}

/// Reads the published token from a Secret's metadata, if the annotations are complete.
pub fn published_token(meta: &ObjectMeta) -> Option<PublishedToken> {
    let annotations = meta.annotations.as_ref()?;
    let time = |key: &str| annotations.get(key)?.parse::<Timestamp>().ok();
    Some(PublishedToken {
        issued_at: time(ISSUED_AT_ANNOTATION)?,
        expires_at: time(EXPIRES_AT_ANNOTATION)?,
        spec_hash: annotations.get(SPEC_HASH_ANNOTATION)?.clone(),
        renew_requested_at: annotations.get(RENEW_REQUESTED_AT_ANNOTATION).cloned(),
        dpop_jkt: annotations.get(DPOP_JKT_ANNOTATION).cloned(),
        certificate_thumbprint: annotations.get(CERTIFICATE_THUMBPRINT_ANNOTATION).cloned(),
    })
}

/// Whether a Secret belongs to the named AudienceToken: only then may the operator write it.
pub fn is_owned_by(meta: &ObjectMeta, token_name: &str) -> bool {
    let Some(labels) = meta.labels.as_ref() else {
        return false;
    };
    labels.get(MANAGED_BY_LABEL).map(String::as_str) == Some(MANAGER)
        && labels.get(NAME_LABEL).map(String::as_str) == Some(token_name)
}

/// What a Secret of ours holds that the operator once wrote and does not write now: keys of
/// a dropped `secretTemplate` entry, the DPoP key after `dpop` is dropped, the certificate
/// thumbprint of a token no longer certificate-bound, and our ownerReference after
/// `deletionPolicy: Retain`.
///
/// Server-side apply would prune these only if its own Apply owned them; a Secret the
/// operator made with a create is owned by an Update of the same field manager, which no
/// apply prunes. So they are found from the Secret's metadata and removed explicitly, which
/// holds however the Secret was made. Labels and annotations someone else added are never
/// touched: only keys the operator names or recorded in [`TEMPLATE_KEYS_ANNOTATION`].
#[derive(Clone, Debug, Default, PartialEq)]
pub struct StaleFields {
    /// Label keys to remove.
    pub labels: Vec<String>,
    /// Annotation keys to remove.
    pub annotations: Vec<String>,
    /// `data` keys to remove.
    pub data: Vec<String>,
    /// The ownerReferences to keep, when ours must go.
    pub owner_references: Option<Vec<OwnerReference>>,
}

/// Annotations of the operator's that come and go with the token, and the `data` keys that
/// go with each.
const CONDITIONAL_ANNOTATIONS: [(&str, &[&str]); 2] = [
    (
        DPOP_JKT_ANNOTATION,
        &[keys::DPOP_PRIVATE_KEY, keys::DPOP_JKT],
    ),
    (
        CERTIFICATE_THUMBPRINT_ANNOTATION,
        &[keys::CERTIFICATE_THUMBPRINT],
    ),
];

/// The [`StaleFields`] of a Secret whose metadata is `current`, about to be written as
/// `desired` for the AudienceToken with uid `owner_uid`.
pub fn stale_fields(current: &ObjectMeta, desired: &Secret, owner_uid: &str) -> StaleFields {
    let empty = BTreeMap::new();
    let current_labels = current.labels.as_ref().unwrap_or(&empty);
    let current_annotations = current.annotations.as_ref().unwrap_or(&empty);
    let desired_labels = desired.metadata.labels.as_ref().unwrap_or(&empty);
    let desired_annotations = desired.metadata.annotations.as_ref().unwrap_or(&empty);

    let mut stale = StaleFields::default();
    for (annotation, data_keys) in CONDITIONAL_ANNOTATIONS {
        if current_annotations.contains_key(annotation)
            && !desired_annotations.contains_key(annotation)
        {
            stale.annotations.push(annotation.to_string());
            stale.data.extend(data_keys.iter().map(|k| k.to_string()));
        }
    }
    if let Some(recorded) = current_annotations.get(TEMPLATE_KEYS_ANNOTATION) {
        if !desired_annotations.contains_key(TEMPLATE_KEYS_ANNOTATION) {
            stale.annotations.push(TEMPLATE_KEYS_ANNOTATION.to_string());
        }
        let keys_of = |kind: &str| recorded_template_keys(recorded, kind);
        stale.labels = keys_of("labels")
            .into_iter()
            .filter(|k| current_labels.contains_key(k) && !desired_labels.contains_key(k))
            .collect();
        stale
            .annotations
            .extend(keys_of("annotations").into_iter().filter(|k| {
                current_annotations.contains_key(k) && !desired_annotations.contains_key(k)
            }));
    }
    let current_owners = current.owner_references.as_deref().unwrap_or_default();
    let desired_owners = desired
        .metadata
        .owner_references
        .as_deref()
        .unwrap_or_default();
    let ours = |r: &OwnerReference| r.uid == owner_uid;
    if current_owners.iter().any(ours) && !desired_owners.iter().any(ours) {
        stale.owner_references = Some(
            current_owners
                .iter()
                .filter(|r| !ours(r))
                .cloned()
                .collect(),
        );
    }
    stale
}

/// The `audiencetoken.io/template-keys` record of a `secretTemplate`: which label and
/// annotation keys it put on the Secret, so that a key dropped from it later is known to
/// be the operator's to remove. `None` for an empty template.
fn template_record(template: &SecretTemplate) -> Option<String> {
    (!template.labels.is_empty() || !template.annotations.is_empty()).then(|| {
        serde_json::json!({
            "labels": template.labels.keys().collect::<Vec<_>>(),
            "annotations": template.annotations.keys().collect::<Vec<_>>(),
        })
        .to_string()
    })
}

/// The `kind` ("labels" or "annotations") keys of a template record. An unreadable record
/// (edited by hand) names none: nothing is known to be ours, nothing is removed.
fn recorded_template_keys(record: &str, kind: &str) -> Vec<String> {
    let record: serde_json::Value = serde_json::from_str(record).unwrap_or_default();
    record[kind]
        .as_array()
        .map(|keys| {
            keys.iter()
                .filter_map(|k| k.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Label and annotation keys the operator writes for itself (over a template's value of
/// the same key, in [`desired_secret`]), which a template therefore neither sets nor
/// removes.
fn reserved_key(key: &str) -> bool {
    [
        MANAGED_BY_LABEL,
        NAME_LABEL,
        EXPIRES_AT_ANNOTATION,
        ISSUED_AT_ANNOTATION,
        SPEC_HASH_ANNOTATION,
        TEMPLATE_KEYS_ANNOTATION,
        RENEW_REQUESTED_AT_ANNOTATION,
        DPOP_JKT_ANNOTATION,
        CERTIFICATE_THUMBPRINT_ANNOTATION,
    ]
    .contains(&key)
}

/// A change to a Secret's metadata alone: the metadata after it, and the JSON merge patch
/// (RFC 7386) that makes it.
#[derive(Clone, Debug, PartialEq)]
pub struct MetadataUpdate {
    /// The metadata once the patch is applied.
    pub metadata: ObjectMeta,
    /// The merge patch.
    pub patch: serde_json::Value,
}

/// What the metadata of the Secret holding `token_resource`'s token (`current`) must change
/// for the spec as it is now, where that needs no new token: the ownerReference that
/// `deletionPolicy` asks for, and the `secretTemplate`'s labels and annotations (with their
/// record, and without the keys a dropped entry put there). `None` when nothing differs.
///
/// Without it a change of these reached the Secret only with the next token: a Secret
/// switched to `Retain` and its AudienceToken deleted before the renewal was still
/// garbage-collected. A changed ownerReferences list is replaced whole, under `current`'s
/// resourceVersion.
pub fn metadata_update(
    current: &ObjectMeta,
    token_resource: &AudienceToken,
) -> Option<MetadataUpdate> {
    let template = token_resource
        .spec
        .secret_template
        .clone()
        .unwrap_or_default();
    let mut after = current.clone();
    let labels = after.labels.get_or_insert_with(BTreeMap::new);
    let annotations = after.annotations.get_or_insert_with(BTreeMap::new);
    let mut label_patch = serde_json::Map::new();
    let mut annotation_patch = serde_json::Map::new();

    let record = annotations.get(TEMPLATE_KEYS_ANNOTATION).cloned();
    let dropped = |kind: &str, wanted: &BTreeMap<String, String>| -> Vec<String> {
        record
            .as_deref()
            .map(|record| recorded_template_keys(record, kind))
            .unwrap_or_default()
            .into_iter()
            .filter(|key| !wanted.contains_key(key) && !reserved_key(key))
            .collect()
    };
    for key in dropped("labels", &template.labels) {
        if labels.remove(&key).is_some() {
            label_patch.insert(key, serde_json::Value::Null);
        }
    }
    for key in dropped("annotations", &template.annotations) {
        if annotations.remove(&key).is_some() {
            annotation_patch.insert(key, serde_json::Value::Null);
        }
    }
    for (key, value) in template.labels.iter().filter(|(k, _)| !reserved_key(k)) {
        if labels.get(key) != Some(value) {
            labels.insert(key.clone(), value.clone());
            label_patch.insert(key.clone(), value.clone().into());
        }
    }
    for (key, value) in template
        .annotations
        .iter()
        .filter(|(k, _)| !reserved_key(k))
    {
        if annotations.get(key) != Some(value) {
            annotations.insert(key.clone(), value.clone());
            annotation_patch.insert(key.clone(), value.clone().into());
        }
    }
    let wanted_record = template_record(&template);
    if record != wanted_record {
        match &wanted_record {
            Some(value) => {
                annotations.insert(TEMPLATE_KEYS_ANNOTATION.into(), value.clone());
            }
            None => {
                annotations.remove(TEMPLATE_KEYS_ANNOTATION);
            }
        }
        annotation_patch.insert(
            TEMPLATE_KEYS_ANNOTATION.into(),
            wanted_record.map_or(serde_json::Value::Null, Into::into),
        );
    }

    let uid = token_resource.metadata.uid.as_deref().unwrap_or_default();
    let owners = current.owner_references.clone().unwrap_or_default();
    let ours = owners.iter().any(|r| r.uid == uid);
    let owners_after = match (&token_resource.spec.deletion_policy, ours) {
        (DeletionPolicy::Delete, false) => owner_reference(token_resource).map(|reference| {
            let mut owners = owners.clone();
            owners.push(reference);
            owners
        }),
        (DeletionPolicy::Retain, true) => {
            Some(owners.iter().filter(|r| r.uid != uid).cloned().collect())
        }
        _ => None,
    };

    if label_patch.is_empty() && annotation_patch.is_empty() && owners_after.is_none() {
        return None;
    }
    let mut metadata = serde_json::Map::new();
    if !label_patch.is_empty() {
        metadata.insert("labels".into(), label_patch.into());
    }
    if !annotation_patch.is_empty() {
        metadata.insert("annotations".into(), annotation_patch.into());
    }
    if let Some(owners) = owners_after {
        metadata.insert(
            "ownerReferences".into(),
            serde_json::to_value(&owners).unwrap_or_default(),
        );
        if let Some(version) = &current.resource_version {
            metadata.insert("resourceVersion".into(), version.clone().into());
        }
        after.owner_references = (!owners.is_empty()).then_some(owners);
    }
    Some(MetadataUpdate {
        metadata: after,
        patch: serde_json::json!({ "metadata": metadata }),
    })
}

impl StaleFields {
    /// Whether nothing is stale.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
            && self.annotations.is_empty()
            && self.data.is_empty()
            && self.owner_references.is_none()
    }

    /// A JSON merge patch (RFC 7386) that writes `desired` and removes the stale fields.
    /// When the ownerReferences change, the list is replaced as a whole, so the patch is
    /// conditional on `resource_version` (the one the list was read at).
    pub fn merge_patch(
        &self,
        desired: &Secret,
        resource_version: Option<&str>,
    ) -> Result<serde_json::Value, serde_json::Error> {
        let mut patch = serde_json::to_value(desired)?;
        let metadata = &mut patch["metadata"];
        for key in &self.labels {
            metadata["labels"][key] = serde_json::Value::Null;
        }
        for key in &self.annotations {
            metadata["annotations"][key] = serde_json::Value::Null;
        }
        for key in &self.data {
            patch["data"][key] = serde_json::Value::Null;
        }
        if let Some(owners) = &self.owner_references {
            patch["metadata"]["ownerReferences"] = serde_json::to_value(owners)?;
            if let Some(version) = resource_version {
                patch["metadata"]["resourceVersion"] = version.into();
            }
        }
        Ok(patch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{AudienceTokenSpec, IssuerRef, SecretTemplate};
    use crate::redact::SecretString;

    /// [`desired_secret`] with the spec hash computed here, as reconcile does.
    fn desired(at: &AudienceToken, token: &IssuedToken, dpop: Option<&DpopKey>) -> Secret {
        desired_secret(at, &spec_hash(&at.spec), token, dpop)
    }

    fn token_resource(policy: DeletionPolicy) -> AudienceToken {
        let mut at = AudienceToken::new(
            "orders",
            AudienceTokenSpec {
                issuer_ref: IssuerRef {
                    name: "corp-idp".into(),
                    ..IssuerRef::default()
                },
                resource: "https://orders.example.com".into(),
                scopes: vec!["orders/read".into(), "orders/write".into()],
                secret_name: Some("orders-api-token".into()),
                secret_template: Some(SecretTemplate {
                    labels: BTreeMap::from([
                        ("team".into(), "shop".into()),
                        (MANAGED_BY_LABEL.into(), "someone-else".into()),
                    ]),
                    annotations: BTreeMap::from([("note".into(), "hi".into())]),
                }),
                deletion_policy: policy,
                ..AudienceTokenSpec::default()
            },
        );
        at.metadata.namespace = Some("shop".into());
        at.metadata.uid = Some("uid-1".into());
        at
    }

    fn issued() -> IssuedToken {
        IssuedToken {
            access_token: SecretString::new("the-token"),
            token_type: "Bearer".into(),
            issued_at: Timestamp::from_second(1_800_000_000).unwrap(),
            expires_at: Timestamp::from_second(1_800_003_600).unwrap(),
            audience: vec!["https://orders.example.com".into()],
            scopes: vec!["orders/read".into()],
            refresh_token: Some(SecretString::new("must-not-be-written")),
            certificate_thumbprint: None,
            authorization_details: Vec::new(),
        }
    }

    fn data(secret: &Secret, key: &str) -> String {
        String::from_utf8(secret.data.as_ref().unwrap()[key].0.clone()).unwrap()
    }

    #[test]
    fn renders_the_documented_layout() {
        let secret = desired(&token_resource(DeletionPolicy::Delete), &issued(), None);
        assert_eq!(secret.metadata.name.as_deref(), Some("orders-api-token"));
        assert_eq!(secret.metadata.namespace.as_deref(), Some("shop"));
        assert_eq!(secret.type_.as_deref(), Some("Opaque"));
        let labels = secret.metadata.labels.as_ref().unwrap();
        assert_eq!(
            labels[MANAGED_BY_LABEL], MANAGER,
            "template cannot override ownership labels"
        );
        assert_eq!(labels[NAME_LABEL], "orders");
        assert_eq!(labels["team"], "shop");
        let annotations = secret.metadata.annotations.as_ref().unwrap();
        assert_eq!(annotations[EXPIRES_AT_ANNOTATION], "2027-01-15T09:00:00Z");
        assert_eq!(annotations[ISSUED_AT_ANNOTATION], "2027-01-15T08:00:00Z");
        assert_eq!(annotations["note"], "hi");
        assert_eq!(data(&secret, keys::TOKEN), "the-token");
        assert_eq!(data(&secret, keys::TOKEN_TYPE), "Bearer");
        assert_eq!(data(&secret, keys::EXPIRES_AT), "2027-01-15T09:00:00Z");
        assert_eq!(data(&secret, keys::AUDIENCE), "https://orders.example.com");
        assert_eq!(data(&secret, keys::SCOPE), "orders/read");
        assert_eq!(
            secret.data.as_ref().unwrap().len(),
            5,
            "no refresh token or anything else"
        );
        let owner = &secret.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.uid.as_str(), owner.controller),
            ("AudienceToken", "uid-1", Some(true))
        );
        let json = serde_json::to_value(&secret).unwrap();
        assert_eq!(json["apiVersion"], "v1");
        assert_eq!(json["kind"], "Secret");
    }

    /// The metadata a Secret written as `secret` has, plus what someone else added.
    fn written(secret: &Secret) -> ObjectMeta {
        let mut meta = secret.metadata.clone();
        meta.labels
            .get_or_insert_default()
            .insert("added-by-hand".into(), "x".into());
        meta.annotations
            .get_or_insert_default()
            .insert("reloader/match".into(), "true".into());
        meta.owner_references
            .get_or_insert_default()
            .push(OwnerReference {
                uid: "another-owner".into(),
                ..OwnerReference::default()
            });
        meta
    }

    #[test]
    fn an_unchanged_shape_has_nothing_stale() {
        let at = token_resource(DeletionPolicy::Delete);
        let first = desired(&at, &issued(), None);
        let renewed = desired(&at, &issued(), None);
        let stale = stale_fields(&written(&first), &renewed, "uid-1");
        assert!(stale.is_empty(), "{stale:?}");
    }

    #[test]
    fn dropped_template_keys_dpop_and_owner_are_stale_and_nothing_else() {
        let key = DpopKey::generate(crate::oauth::dpop::DpopAlgorithm::ES256).unwrap();
        let bound = IssuedToken {
            certificate_thumbprint: Some("thumb".into()),
            ..issued()
        };
        let first = desired(&token_resource(DeletionPolicy::Delete), &bound, Some(&key));
        assert!(
            first.metadata.annotations.as_ref().unwrap()[TEMPLATE_KEYS_ANNOTATION].contains("team")
        );
        let mut at = token_resource(DeletionPolicy::Retain);
        at.spec.secret_template = Some(SecretTemplate {
            labels: BTreeMap::new(),
            annotations: BTreeMap::from([("note".into(), "hi".into())]),
        });
        let next = desired(&at, &issued(), None);
        let stale = stale_fields(&written(&first), &next, "uid-1");
        assert_eq!(stale.labels, ["team"]);
        let mut annotations = stale.annotations.clone();
        annotations.sort();
        assert_eq!(
            annotations,
            [CERTIFICATE_THUMBPRINT_ANNOTATION, DPOP_JKT_ANNOTATION]
        );
        let mut data_keys = stale.data.clone();
        data_keys.sort();
        assert_eq!(
            data_keys,
            [
                keys::CERTIFICATE_THUMBPRINT,
                keys::DPOP_JKT,
                keys::DPOP_PRIVATE_KEY
            ]
        );
        let kept = stale.owner_references.as_ref().expect("ours goes");
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].uid, "another-owner");

        let patch = stale.merge_patch(&next, Some("42")).unwrap();
        assert_eq!(patch["metadata"]["labels"]["team"], serde_json::Value::Null);
        assert!(patch["metadata"]["labels"].get("added-by-hand").is_none());
        assert_eq!(
            patch["data"][keys::DPOP_PRIVATE_KEY],
            serde_json::Value::Null
        );
        assert_eq!(patch["data"][keys::TOKEN], "dGhlLXRva2Vu");
        assert_eq!(
            patch["metadata"]["ownerReferences"][0]["uid"],
            "another-owner"
        );
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
    }

    #[test]
    fn an_emptied_template_drops_its_record_too() {
        let first = desired(&token_resource(DeletionPolicy::Delete), &issued(), None);
        let mut at = token_resource(DeletionPolicy::Delete);
        at.spec.secret_template = None;
        let next = desired(&at, &issued(), None);
        assert!(
            !next
                .metadata
                .annotations
                .as_ref()
                .unwrap()
                .contains_key(TEMPLATE_KEYS_ANNOTATION)
        );
        let stale = stale_fields(&written(&first), &next, "uid-1");
        assert_eq!(stale.labels, ["team"]);
        let mut annotations = stale.annotations.clone();
        annotations.sort();
        assert_eq!(annotations, [TEMPLATE_KEYS_ANNOTATION, "note"]);
        assert!(stale.owner_references.is_none());
        // Without a record (a Secret written before it existed, or one edited by hand),
        // nothing of the template's is known to be ours.
        let mut unrecorded = written(&first);
        unrecorded
            .annotations
            .as_mut()
            .unwrap()
            .insert(TEMPLATE_KEYS_ANNOTATION.into(), "not json".into());
        let stale = stale_fields(&unrecorded, &next, "uid-1");
        assert!(stale.labels.is_empty());
        assert_eq!(stale.annotations, [TEMPLATE_KEYS_ANNOTATION]);
    }

    #[test]
    fn retain_policy_has_no_owner_reference() {
        let secret = desired(&token_resource(DeletionPolicy::Retain), &issued(), None);
        assert!(secret.metadata.owner_references.is_none());
    }

    #[test]
    fn published_token_reads_back_what_was_written() {
        let at = token_resource(DeletionPolicy::Delete);
        let secret = desired(&at, &issued(), None);
        let published = published_token(&secret.metadata).unwrap();
        assert_eq!(published.issued_at, issued().issued_at);
        assert_eq!(published.expires_at, issued().expires_at);
        assert_eq!(published.spec_hash, spec_hash(&at.spec));
        assert!(is_owned_by(&secret.metadata, "orders"));
        assert!(!is_owned_by(&secret.metadata, "payments"));
        assert!(!is_owned_by(&ObjectMeta::default(), "orders"));
        assert_eq!(published.certificate_thumbprint, None);
    }

    #[test]
    fn a_certificate_bound_token_names_its_certificate() {
        let at = token_resource(DeletionPolicy::Delete);
        let bound = IssuedToken {
            certificate_thumbprint: Some("x5t-of-the-cert".into()),
            ..issued()
        };
        let secret = desired(&at, &bound, None);
        assert_eq!(
            data(&secret, keys::CERTIFICATE_THUMBPRINT),
            "x5t-of-the-cert"
        );
        let published = published_token(&secret.metadata).unwrap();
        assert_eq!(
            published.certificate_thumbprint.as_deref(),
            Some("x5t-of-the-cert"),
            "readable from the metadata alone"
        );
    }

    #[test]
    fn spec_hash_tracks_token_relevant_fields_only() {
        let base = token_resource(DeletionPolicy::Delete).spec;
        let hash = spec_hash(&base);
        let mut reordered = base.clone();
        reordered.scopes.reverse();
        assert_eq!(spec_hash(&reordered), hash, "scope order does not matter");
        let mut renamed_secret = base.clone();
        renamed_secret.renew_before = Some("10m".into());
        assert_eq!(
            spec_hash(&renamed_secret),
            hash,
            "renewal settings do not need a new token"
        );
        for change in [
            |s: &mut AudienceTokenSpec| s.resource = "https://payments.example.com".into(),
            |s: &mut AudienceTokenSpec| s.audience = Some("orders-api".into()),
            |s: &mut AudienceTokenSpec| s.scopes.push("orders/admin".into()),
            |s: &mut AudienceTokenSpec| s.issuer_ref.name = "other-idp".into(),
            |s: &mut AudienceTokenSpec| {
                s.issuer_ref.kind = crate::api::IssuerKind::ClusterTokenIssuer
            },
        ] {
            let mut changed = base.clone();
            change(&mut changed);
            assert_ne!(spec_hash(&changed), hash);
        }
    }

    fn helseid(org: &str) -> serde_json::Value {
        serde_json::json!({
            "type": "helseid_authorization",
            "practitioner_role": {"organization": {"identifier": {
                "system": "urn:oid:1.0.6523", "type": "ENH", "value": org
            }}}
        })
    }

    #[test]
    fn spec_hash_without_authorization_details_is_what_it_was() {
        // Pinned: a spec without authorizationDetails (every token from before they existed)
        // hashes as before, so an upgrade re-issues nothing.
        let base = token_resource(DeletionPolicy::Delete).spec;
        assert_eq!(spec_hash(&base), "69e7c8cd5af75db1");
    }

    #[test]
    fn spec_hash_tracks_authorization_details() {
        let base = token_resource(DeletionPolicy::Delete).spec;
        let with = |details: Vec<serde_json::Value>| AudienceTokenSpec {
            authorization_details: details,
            ..base.clone()
        };
        let one = spec_hash(&with(vec![helseid("NO:ORGNR:1:2")]));
        assert_ne!(one, spec_hash(&base), "asking for details is another token");
        assert_ne!(
            one,
            spec_hash(&with(vec![helseid("NO:ORGNR:1:3")])),
            "another organisation is another token"
        );
        let reordered: serde_json::Value = serde_json::from_str(
            r#"{"practitioner_role":{"organization":{"identifier":{"value":"NO:ORGNR:1:2","type":"ENH","system":"urn:oid:1.0.6523"}}},"type":"helseid_authorization"}"#,
        )
        .unwrap();
        assert_eq!(
            one,
            spec_hash(&with(vec![reordered])),
            "the order of an object's members does not matter"
        );
        let two = with(vec![helseid("a"), helseid("b")]);
        let swapped = with(vec![helseid("b"), helseid("a")]);
        assert_ne!(
            spec_hash(&two),
            spec_hash(&swapped),
            "the list's order does"
        );
    }

    /// The canonical JSON as it was first defined: a `serde_json::Value` (its maps sorted),
    /// printed compactly. [`spec_hash`] writes the same bytes without building it.
    fn spec_hash_as_first_defined(spec: &AudienceTokenSpec) -> String {
        let mut scopes: Vec<&str> = spec.scopes.iter().map(String::as_str).collect();
        scopes.sort_unstable();
        scopes.dedup();
        let mut canonical = serde_json::json!({
            "issuerKind": spec.issuer_ref.kind,
            "issuerName": spec.issuer_ref.name,
            "resource": spec.resource,
            "audience": spec.audience,
            "scopes": scopes,
        });
        if let Some(dpop) = &spec.dpop {
            canonical["dpop"] = serde_json::json!(dpop.algorithm);
        }
        if !spec.authorization_details.is_empty() {
            canonical["authorizationDetails"] = serde_json::json!(spec.authorization_details);
        }
        let digest = Sha256::digest(canonical.to_string().as_bytes());
        digest[..8].iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn spec_hash_is_the_hash_of_the_canonical_json_as_first_defined() {
        let base = token_resource(DeletionPolicy::Delete).spec;
        let variants = [
            base.clone(),
            AudienceTokenSpec {
                audience: Some("orders-api".into()),
                scopes: vec!["b".into(), "a".into(), "b".into()],
                ..base.clone()
            },
            AudienceTokenSpec {
                scopes: Vec::new(),
                issuer_ref: IssuerRef {
                    kind: crate::api::IssuerKind::ClusterTokenIssuer,
                    name: "shared \"idp\"".into(),
                },
                ..base.clone()
            },
            AudienceTokenSpec {
                dpop: Some(
                    serde_json::from_value(serde_json::json!({"algorithm": "RS256"})).unwrap(),
                ),
                authorization_details: vec![helseid("NO:ORGNR:1:2"), helseid("x")],
                ..base.clone()
            },
            AudienceTokenSpec {
                dpop: Some(serde_json::from_value(serde_json::json!({})).unwrap()),
                ..base
            },
        ];
        for spec in &variants {
            assert_eq!(
                spec_hash(spec),
                spec_hash_as_first_defined(spec),
                "{spec:?}"
            );
        }
    }

    #[test]
    fn authorization_details_are_not_written_into_the_secret() {
        let mut at = token_resource(DeletionPolicy::Delete);
        at.spec.authorization_details = vec![helseid("NO:ORGNR:1:2")];
        let granted = IssuedToken {
            authorization_details: vec![helseid("NO:ORGNR:1:2")],
            ..issued()
        };
        let secret = desired(&at, &granted, None);
        assert_eq!(
            secret.data.as_ref().unwrap().len(),
            5,
            "the usual keys only"
        );
        let written = serde_json::to_string(&secret).unwrap();
        assert!(!written.contains("NO:ORGNR"), "{written}");
        assert_eq!(
            published_token(&secret.metadata).unwrap().spec_hash,
            spec_hash(&at.spec)
        );
    }

    /// The metadata the API server keeps for `secret` as written.
    fn stored(secret: &Secret) -> ObjectMeta {
        ObjectMeta {
            resource_version: Some("41".into()),
            ..secret.metadata.clone()
        }
    }

    #[test]
    fn deletion_policy_reaches_the_secret_without_a_new_token() {
        let delete = token_resource(DeletionPolicy::Delete);
        let retain = token_resource(DeletionPolicy::Retain);
        let written_for_delete = stored(&desired(&delete, &issued(), None));
        assert_eq!(metadata_update(&written_for_delete, &delete), None);

        let update = metadata_update(&written_for_delete, &retain).expect("ours goes");
        assert_eq!(
            update.patch,
            serde_json::json!({"metadata": {"ownerReferences": [], "resourceVersion": "41"}})
        );
        assert_eq!(update.metadata.owner_references, None);
        assert_eq!(
            metadata_update(&update.metadata, &retain),
            None,
            "done once"
        );

        let back = metadata_update(&update.metadata, &delete).expect("ours comes back");
        let owners = &back.patch["metadata"]["ownerReferences"];
        assert_eq!(owners[0]["uid"], "uid-1");
        assert_eq!(owners[0]["controller"], true);
        assert_eq!(back.patch["metadata"]["resourceVersion"], "41");
        assert_eq!(metadata_update(&back.metadata, &delete), None);
        // The published token's annotations stay as they are.
        assert_eq!(
            published_token(&back.metadata),
            published_token(&written_for_delete)
        );
    }

    #[test]
    fn secret_template_changes_reach_the_secret_without_a_new_token() {
        let mut token = token_resource(DeletionPolicy::Delete);
        let written = stored(&desired(&token, &issued(), None));
        token.spec.secret_template = Some(SecretTemplate {
            labels: BTreeMap::from([
                ("team".into(), "web".into()),
                ("tier".into(), "gold".into()),
                (NAME_LABEL.into(), "not-this".into()),
            ]),
            annotations: BTreeMap::from([
                ("audiencetoken.io/owner-team".into(), "web".into()),
                (SPEC_HASH_ANNOTATION.into(), "not-this".into()),
            ]),
        });
        let update = metadata_update(&written, &token).expect("labels changed");
        let patch = &update.patch["metadata"];
        assert_eq!(patch["labels"]["team"], "web");
        assert_eq!(patch["labels"]["tier"], "gold");
        assert!(
            patch["labels"].get(NAME_LABEL).is_none(),
            "the operator's own"
        );
        assert_eq!(patch["annotations"]["note"], serde_json::Value::Null);
        assert_eq!(patch["annotations"]["audiencetoken.io/owner-team"], "web");
        assert!(
            patch["annotations"].get(SPEC_HASH_ANNOTATION).is_none(),
            "the operator's own"
        );
        assert!(
            patch["annotations"][TEMPLATE_KEYS_ANNOTATION]
                .as_str()
                .is_some_and(|record| record.contains("tier") && !record.contains("note"))
        );
        assert!(patch.get("ownerReferences").is_none());
        assert!(
            patch.get("resourceVersion").is_none(),
            "labels merge; no list replaced"
        );
        assert_eq!(metadata_update(&update.metadata, &token), None);

        // No template at all: what the last one put there goes, with its record; what
        // someone else added stays.
        let mut with_extra = update.metadata.clone();
        with_extra
            .labels
            .get_or_insert_with(BTreeMap::new)
            .insert("added-by-hand".into(), "x".into());
        token.spec.secret_template = None;
        let cleared = metadata_update(&with_extra, &token).expect("template dropped");
        let patch = &cleared.patch["metadata"];
        assert_eq!(patch["labels"]["team"], serde_json::Value::Null);
        assert_eq!(patch["labels"]["tier"], serde_json::Value::Null);
        assert_eq!(
            patch["annotations"]["audiencetoken.io/owner-team"],
            serde_json::Value::Null
        );
        assert!(patch["annotations"].get(SPEC_HASH_ANNOTATION).is_none());
        assert!(patch["labels"].get("added-by-hand").is_none());
        assert_eq!(
            patch["annotations"][TEMPLATE_KEYS_ANNOTATION],
            serde_json::Value::Null
        );
        let labels = cleared.metadata.labels.unwrap();
        assert!(labels.contains_key("added-by-hand") && labels.contains_key(NAME_LABEL));
        assert!(!labels.contains_key("team"));
    }

    #[test]
    fn a_renewal_request_acted_on_stays_recorded_on_later_tokens() {
        let mut token = token_resource(DeletionPolicy::Delete);
        token.status = Some(crate::api::AudienceTokenStatus {
            last_renew_requested_at: Some("2026-12-01T10:00:00Z".into()),
            ..Default::default()
        });
        // As the operator caches it once the request is acted on: without the annotation.
        let secret = desired(&token, &issued(), None);
        assert_eq!(
            published_token(&secret.metadata).and_then(|p| p.renew_requested_at),
            Some("2026-12-01T10:00:00Z".to_string())
        );
    }
}
