//! Proves the Kubernetes API test double (`tests/support/kube_double`) against the real kube
//! client, watchers and reflector.

mod support;

use std::collections::BTreeMap;
use std::future::Future;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use k8s_openapi::ByteString;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, ServiceAccount};
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{
    ApiResource, DeleteParams, DynamicObject, GroupVersionKind, ListParams, Patch, PatchParams,
    PostParams, WatchEvent, WatchParams,
};
use kube::core::PartialObjectMeta;
use kube::runtime::{reflector, watcher};
use kube::{Api, Client, Error, ResourceExt};
use serde_json::{Value, json};
use support::kube_double::{KubeApiDouble, ResourceKey};

const WAIT: Duration = Duration::from_secs(10);
const META_LIST: &str = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1";
const META: &str = "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1";

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(WAIT, fut)
        .await
        .unwrap_or_else(|_| panic!("timed out waiting for {what}"))
}

fn secret(name: &str, labels: &[(&str, &str)]) -> Secret {
    Secret {
        metadata: ObjectMeta {
            name: Some(name.into()),
            labels: Some(
                labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
            ..Default::default()
        },
        data: Some(BTreeMap::from([(
            "token".to_string(),
            ByteString(b"s3cret-value".to_vec()),
        )])),
        ..Default::default()
    }
}

fn api_status(result: Result<impl std::fmt::Debug, Error>) -> Box<kube::core::Status> {
    match result {
        Err(Error::Api(status)) => status,
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn audience_tokens() -> ApiResource {
    let gvk = GroupVersionKind::gvk("audiencetoken.io", "v1alpha1", "AudienceToken");
    ApiResource::from_gvk_with_plural(&gvk, "audiencetokens")
}

fn no_data_anywhere(v: &Value) -> bool {
    match v {
        Value::Object(m) => !m.contains_key("data") && m.values().all(no_data_anywhere),
        Value::Array(a) => a.iter().all(no_data_anywhere),
        _ => true,
    }
}

#[tokio::test]
async fn create_get_list_conflicts_and_not_found() {
    let double = KubeApiDouble::start().await;
    let secrets: Api<Secret> = Api::namespaced(double.client(), "ns1");
    let pp = PostParams::default();

    let created = secrets
        .create(&pp, &secret("a", &[("app", "x")]))
        .await
        .unwrap();
    assert!(created.metadata.uid.is_some());
    assert!(created.metadata.creation_timestamp.is_some());
    assert_eq!(created.metadata.generation, Some(1));
    let rv1 = created.resource_version().unwrap();

    let got = secrets.get("a").await.unwrap();
    assert_eq!(got.data, secret("a", &[]).data);
    assert_eq!(
        secrets
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .len(),
        1
    );
    assert_eq!(
        secrets
            .list(&ListParams::default().labels("app=y"))
            .await
            .unwrap()
            .items
            .len(),
        0
    );
    let other_ns: Api<Secret> = Api::namespaced(double.client(), "ns2");
    assert!(
        other_ns
            .list(&ListParams::default())
            .await
            .unwrap()
            .items
            .is_empty()
    );
    let all: Api<Secret> = Api::all(double.client());
    let listed = all
        .list(&ListParams::default().fields("metadata.name=a"))
        .await
        .unwrap();
    assert_eq!(listed.items.len(), 1);
    assert_eq!(
        listed.metadata.resource_version.as_deref(),
        Some(rv1.as_str())
    );

    let dup = api_status(secrets.create(&pp, &secret("a", &[])).await);
    assert_eq!((dup.code, dup.reason.as_str()), (409, "AlreadyExists"));
    assert!(secrets.get_opt("absent").await.unwrap().is_none());
    assert!(api_status(secrets.get("absent").await).is_not_found());

    // replace with the current resourceVersion succeeds; with the old one it is a Conflict
    let mut changed = got.clone();
    changed.string_data = None;
    changed
        .data
        .as_mut()
        .unwrap()
        .insert("extra".into(), ByteString(b"1".to_vec()));
    let replaced = secrets.replace("a", &pp, &changed).await.unwrap();
    assert_ne!(replaced.resource_version(), Some(rv1.clone()));
    let stale = api_status(secrets.replace("a", &pp, &changed).await);
    assert_eq!((stale.code, stale.reason.as_str()), (409, "Conflict"));

    // a write that changes nothing is not persisted
    let same = secrets.replace("a", &pp, &replaced).await.unwrap();
    assert_eq!(same.resource_version(), replaced.resource_version());

    let verbs: Vec<String> = double.requests().into_iter().map(|r| r.verb).collect();
    for verb in ["create", "get", "list", "update"] {
        assert!(verbs.iter().any(|v| v == verb), "{verb} not in {verbs:?}");
    }
    double.shutdown().await;
}

#[tokio::test]
async fn server_side_apply_creates_then_merges_and_records_the_field_manager() {
    let double = KubeApiDouble::start().await;
    let cms: Api<ConfigMap> = Api::namespaced(double.client(), "default");
    let pp = PatchParams::apply("ssa-test");

    let first = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"a": "1"}});
    let cm = cms.patch("cm", &pp, &Patch::Apply(&first)).await.unwrap();
    assert_eq!(cm.data.unwrap()["a"], "1");
    let second = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm"}, "data": {"b": "2"}});
    let cm = cms.patch("cm", &pp, &Patch::Apply(&second)).await.unwrap();
    let data = cm.data.unwrap();
    assert_eq!(
        (data["a"].as_str(), data["b"].as_str()),
        ("1", "2"),
        "apply is a merge here"
    );

    let stale = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "cm", "resourceVersion": "1"}});
    assert_eq!(
        api_status(cms.patch("cm", &pp, &Patch::Apply(&stale)).await).code,
        409
    );

    let applies: Vec<_> = double
        .requests()
        .into_iter()
        .filter(|r| r.verb == "patch")
        .collect();
    assert_eq!(applies.len(), 3);
    for r in &applies {
        assert_eq!(r.field_manager.as_deref(), Some("ssa-test"));
        assert_eq!(
            r.content_type.as_deref(),
            Some("application/apply-patch+yaml")
        );
        assert_eq!(
            (r.plural.as_str(), r.name.as_deref()),
            ("configmaps", Some("cm"))
        );
    }

    // raw HTTP: a YAML body is accepted; apply without fieldManager is refused
    let http = reqwest::Client::new();
    let url = format!(
        "{}/api/v1/namespaces/default/configmaps/yaml-cm",
        double.url()
    );
    let yaml = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: yaml-cm\ndata:\n  k: v\n";
    let send = |url: String| {
        http.patch(url)
            .header("content-type", "application/apply-patch+yaml")
            .body(yaml)
            .send()
    };
    let created = send(format!("{url}?fieldManager=raw")).await.unwrap();
    assert_eq!(created.status().as_u16(), 201);
    let stored = double
        .get(&ResourceKey::configmaps(), Some("default"), "yaml-cm")
        .unwrap();
    assert_eq!(stored["data"]["k"], "v");
    let refused = send(url).await.unwrap();
    assert_eq!(refused.status().as_u16(), 422);
    let status: Value = refused.json().await.unwrap();
    assert_eq!(status["kind"], "Status");
    double.shutdown().await;
}

#[tokio::test]
async fn status_subresource_and_generation() {
    let double = KubeApiDouble::start().await;
    let ar = audience_tokens();
    let tokens: Api<DynamicObject> = Api::namespaced_with(double.client(), "default", &ar);
    let obj = DynamicObject::new("tok", &ar)
        .data(json!({"spec": {"audience": "a"}, "status": {"phase": "SetOnCreate"}}));

    let created = tokens.create(&PostParams::default(), &obj).await.unwrap();
    assert_eq!(created.metadata.generation, Some(1));
    assert!(
        created.data.get("status").is_none(),
        "create cannot set status"
    );

    let status_patch = json!({"status": {"phase": "Ready"}, "spec": {"audience": "ignored"}});
    let patched = tokens
        .patch_status("tok", &PatchParams::default(), &Patch::Merge(&status_patch))
        .await
        .unwrap();
    assert_eq!(patched.data["status"]["phase"], "Ready");
    assert_eq!(
        patched.data["spec"]["audience"], "a",
        "a /status write changes only status"
    );
    assert_eq!(patched.metadata.generation, Some(1));
    assert_ne!(patched.resource_version(), created.resource_version());

    let main_patch = json!({"spec": {"audience": "b"}, "status": {"phase": "Ignored"}});
    let patched = tokens
        .patch("tok", &PatchParams::default(), &Patch::Merge(&main_patch))
        .await
        .unwrap();
    assert_eq!(patched.data["spec"]["audience"], "b");
    assert_eq!(
        patched.data["status"]["phase"], "Ready",
        "main resource writes keep the status"
    );
    assert_eq!(patched.metadata.generation, Some(2));

    let label_patch = json!({"metadata": {"labels": {"l": "v"}}});
    let labelled = tokens
        .patch("tok", &PatchParams::default(), &Patch::Merge(&label_patch))
        .await
        .unwrap();
    assert_eq!(
        labelled.metadata.generation,
        Some(2),
        "metadata changes keep the generation"
    );

    let apply = json!({"apiVersion": "audiencetoken.io/v1alpha1", "kind": "AudienceToken",
                       "status": {"observedGeneration": 2}});
    let applied = tokens
        .patch_status("tok", &PatchParams::apply("ctrl"), &Patch::Apply(&apply))
        .await
        .unwrap();
    assert_eq!(
        applied.data["status"],
        json!({"phase": "Ready", "observedGeneration": 2})
    );
    assert_eq!(
        tokens.get_status("tok").await.unwrap().data["status"]["observedGeneration"],
        2
    );

    let failing_test: Patch<()> = Patch::Json(
        serde_json::from_value(json!([{"op": "test", "path": "/spec/audience", "value": "x"}]))
            .unwrap(),
    );
    assert_eq!(
        api_status(
            tokens
                .patch("tok", &PatchParams::default(), &failing_test)
                .await
        )
        .code,
        422
    );
    let replace: Patch<()> = Patch::Json(
        serde_json::from_value(json!([
            {"op": "test", "path": "/spec/audience", "value": "b"},
            {"op": "replace", "path": "/spec/audience", "value": "c"}
        ]))
        .unwrap(),
    );
    let replaced = tokens
        .patch("tok", &PatchParams::default(), &replace)
        .await
        .unwrap();
    assert_eq!(
        (
            replaced.data["spec"]["audience"].as_str(),
            replaced.metadata.generation
        ),
        (Some("c"), Some(3))
    );

    let status_writes = double
        .requests()
        .into_iter()
        .filter(|r| r.subresource.as_deref() == Some("status"))
        .count();
    assert_eq!(status_writes, 3);
    double.shutdown().await;
}

#[tokio::test]
async fn label_selected_metadata_watch_sees_only_labelled_secrets_and_never_data() {
    let double = KubeApiDouble::start().await;
    let secrets: Api<Secret> = Api::namespaced(double.client(), "ns1");
    let pp = PostParams::default();
    secrets
        .create(&pp, &secret("labelled", &[("app", "x")]))
        .await
        .unwrap();
    secrets.create(&pp, &secret("plain", &[])).await.unwrap();

    let meta: Api<PartialObjectMeta<Secret>> = Api::namespaced(double.client(), "ns1");
    let mut events = watcher(meta, watcher::Config::default().labels("app=x")).boxed();
    let mut next = async || {
        within("a watcher event", events.try_next())
            .await
            .unwrap()
            .unwrap()
    };
    assert!(matches!(next().await, watcher::Event::Init));
    match next().await {
        watcher::Event::InitApply(m) => {
            assert_eq!(m.name_any(), "labelled");
            assert_eq!(m.types.unwrap().kind, "PartialObjectMetadata");
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(matches!(next().await, watcher::Event::InitDone));

    // unlabelled writes are not seen; gaining the label is an ADDED, losing it a DELETED
    secrets.create(&pp, &secret("plain2", &[])).await.unwrap();
    let relabel = |v: Value| Patch::Merge(json!({"metadata": {"labels": {"app": v}}}));
    secrets
        .patch("plain", &PatchParams::default(), &relabel(json!("x")))
        .await
        .unwrap();
    assert!(matches!(next().await, watcher::Event::Apply(m) if m.name_any() == "plain"));
    secrets
        .patch("labelled", &PatchParams::default(), &relabel(Value::Null))
        .await
        .unwrap();
    assert!(matches!(next().await, watcher::Event::Delete(m) if m.name_any() == "labelled"));
    secrets
        .delete("plain", &DeleteParams::default())
        .await
        .unwrap();
    assert!(matches!(next().await, watcher::Event::Delete(m) if m.name_any() == "plain"));

    let metadata_requests: Vec<_> = double
        .requests()
        .into_iter()
        .filter(|r| r.verb == "list" || r.verb == "watch")
        .collect();
    assert!(
        metadata_requests
            .iter()
            .any(|r| r.verb == "list" && r.accept.as_deref() == Some(META_LIST))
    );
    assert!(
        metadata_requests
            .iter()
            .any(|r| r.verb == "watch" && r.accept.as_deref() == Some(META))
    );

    // the raw wire format: metadata only
    secrets
        .create(&pp, &secret("raw", &[("app", "x")]))
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let base = format!("{}/api/v1/namespaces/ns1/secrets", double.url());
    let list: Value = (http
        .get(format!("{base}?labelSelector=app%3Dx"))
        .header("accept", META_LIST)
        .send()
        .await)
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(list["kind"], "PartialObjectMetadataList");
    assert_eq!(list["items"][0]["kind"], "PartialObjectMetadata");
    assert_eq!(list["items"][0]["metadata"]["name"], "raw");
    assert!(no_data_anywhere(&list), "{list}");
    let watch_url =
        format!("{base}?watch=true&resourceVersion=0&timeoutSeconds=1&labelSelector=app%3Dx");
    let body = within("a 1 s watch", async {
        http.get(watch_url)
            .header("accept", META)
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap()
    })
    .await;
    let lines: Vec<Value> = body
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{body}");
    assert_eq!(
        (
            lines[0]["type"].as_str(),
            lines[0]["object"]["metadata"]["name"].as_str()
        ),
        (Some("ADDED"), Some("raw"))
    );
    assert!(lines.iter().all(no_data_anywhere), "{body}");
    // As the API server writes it: the type first, so a client need not buffer the object.
    assert!(body.starts_with(r#"{"type":"ADDED","object":{"#), "{body}");
    double.shutdown().await;
}

#[tokio::test]
async fn watcher_and_reflector_see_added_modified_deleted_in_order() {
    let double = KubeApiDouble::start().await;
    let cms = ResourceKey::configmaps();
    double.put(
        &cms,
        json!({"metadata": {"name": "pre", "namespace": "ns1"}, "data": {"x": "1"}}),
    );
    let api: Api<ConfigMap> = Api::namespaced(double.client(), "ns1");
    let (reader, writer) = reflector::store();
    let mut events = reflector(writer, watcher(api.clone(), watcher::Config::default())).boxed();
    let mut next = async || {
        within("a watcher event", events.try_next())
            .await
            .unwrap()
            .unwrap()
    };
    assert!(matches!(next().await, watcher::Event::Init));
    assert!(matches!(next().await, watcher::Event::InitApply(cm) if cm.name_any() == "pre"));
    assert!(matches!(next().await, watcher::Event::InitDone));

    double.put(
        &cms,
        json!({"metadata": {"name": "elsewhere", "namespace": "ns2"}}),
    );
    let cm = ConfigMap {
        metadata: ObjectMeta {
            name: Some("new".into()),
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&PostParams::default(), &cm).await.unwrap();
    assert!(
        matches!(next().await, watcher::Event::Apply(cm) if cm.name_any() == "new" && cm.data.is_none())
    );
    let patch = Patch::Merge(json!({"data": {"k": "v"}}));
    api.patch("new", &PatchParams::default(), &patch)
        .await
        .unwrap();
    assert!(
        matches!(next().await, watcher::Event::Apply(cm) if cm.data.as_ref().is_some_and(|d| d["k"] == "v"))
    );
    api.delete("new", &DeleteParams::default()).await.unwrap();
    assert!(matches!(next().await, watcher::Event::Delete(cm) if cm.name_any() == "new"));
    // direct writes are watch events too
    double.delete(&cms, Some("ns1"), "pre");
    assert!(matches!(next().await, watcher::Event::Delete(cm) if cm.name_any() == "pre"));
    assert!(reader.state().is_empty());
    double.shutdown().await;
}

#[tokio::test]
async fn watch_resumes_from_a_resource_version_and_expired_versions_get_410() {
    let double = KubeApiDouble::start().await;
    let api: Api<ConfigMap> = Api::namespaced(double.client(), "default");
    let pp = PostParams::default();
    let cm = |name: &str| ConfigMap {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    let rv_a = api
        .create(&pp, &cm("a"))
        .await
        .unwrap()
        .resource_version()
        .unwrap();
    api.create(&pp, &cm("b")).await.unwrap();
    api.patch(
        "a",
        &PatchParams::default(),
        &Patch::Merge(json!({"data": {"k": "v"}})),
    )
    .await
    .unwrap();
    api.delete("b", &DeleteParams::default()).await.unwrap();

    let stream = api
        .watch(&WatchParams::default().timeout(1), &rv_a)
        .await
        .unwrap();
    let events: Vec<_> = within("a 1 s watch", stream.try_collect::<Vec<_>>())
        .await
        .unwrap();
    let seen: Vec<(String, String)> = events
        .into_iter()
        .filter_map(|e| match e {
            WatchEvent::Added(o) => Some(("ADDED".into(), o.name_any())),
            WatchEvent::Modified(o) => Some(("MODIFIED".into(), o.name_any())),
            WatchEvent::Deleted(o) => Some(("DELETED".into(), o.name_any())),
            _ => None,
        })
        .collect();
    let expected = [("ADDED", "b"), ("MODIFIED", "a"), ("DELETED", "b")]
        .map(|(t, n)| (t.to_string(), n.to_string()));
    assert_eq!(seen, expected);

    double.compact_history();
    let mut stream = api
        .watch(&WatchParams::default().timeout(1), &rv_a)
        .await
        .unwrap()
        .boxed();
    match within("the 410 event", stream.try_next()).await.unwrap() {
        Some(WatchEvent::Error(status)) => assert_eq!(status.code, 410),
        other => panic!("expected a 410 ERROR event, got {other:?}"),
    }
    double.shutdown().await;
}

#[tokio::test]
async fn deleting_an_owner_cascades_and_finalizers_hold_deletion() {
    let double = KubeApiDouble::start().await;
    let ar = audience_tokens();
    let tokens: Api<DynamicObject> = Api::namespaced_with(double.client(), "default", &ar);
    let secrets: Api<Secret> = Api::namespaced(double.client(), "default");
    let pp = PostParams::default();
    let owned_secret = |name: &str, owner: &DynamicObject| {
        let mut s = secret(name, &[]);
        s.metadata.owner_references = Some(vec![OwnerReference {
            api_version: "audiencetoken.io/v1alpha1".into(),
            kind: "AudienceToken".into(),
            name: owner.name_any(),
            uid: owner.uid().unwrap(),
            controller: Some(true),
            block_owner_deletion: Some(true),
        }]);
        s
    };

    let owner = tokens
        .create(
            &pp,
            &DynamicObject::new("plain", &ar).data(json!({"spec": {}})),
        )
        .await
        .unwrap();
    secrets
        .create(&pp, &owned_secret("plain-secret", &owner))
        .await
        .unwrap();
    tokens
        .delete("plain", &DeleteParams::default())
        .await
        .unwrap();
    assert!(tokens.get_opt("plain").await.unwrap().is_none());
    assert!(
        secrets.get_opt("plain-secret").await.unwrap().is_none(),
        "the owned Secret is collected"
    );

    let mut held = DynamicObject::new("held", &ar).data(json!({"spec": {}}));
    held.metadata.finalizers = Some(vec!["audiencetoken.io/cleanup".into()]);
    let owner = tokens.create(&pp, &held).await.unwrap();
    secrets
        .create(&pp, &owned_secret("held-secret", &owner))
        .await
        .unwrap();
    tokens
        .delete("held", &DeleteParams::default())
        .await
        .unwrap();
    let terminating = tokens.get("held").await.unwrap();
    assert!(terminating.metadata.deletion_timestamp.is_some());
    assert_eq!(terminating.metadata.generation, Some(2));
    assert!(secrets.get_opt("held-secret").await.unwrap().is_some());

    let release = Patch::Merge(json!({"metadata": {"finalizers": null}}));
    tokens
        .patch("held", &PatchParams::default(), &release)
        .await
        .unwrap();
    assert!(tokens.get_opt("held").await.unwrap().is_none());
    assert!(secrets.get_opt("held-secret").await.unwrap().is_none());
    double.shutdown().await;
}

#[tokio::test]
async fn kubeconfig_points_at_the_double() {
    let double = KubeApiDouble::start().await;
    double.put(
        &ResourceKey::namespaces(),
        json!({"metadata": {"name": "team-a"}}),
    );
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&double.kubeconfig_yaml()).unwrap();
    let options = kube::config::KubeConfigOptions::default();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .unwrap();
    assert_eq!(config.default_namespace, "default");
    let client = Client::try_from(config).unwrap();
    assert_eq!(client.apiserver_version().await.unwrap().minor, "33");
    let namespaces = Api::<Namespace>::all(client)
        .list(&ListParams::default())
        .await
        .unwrap();
    assert_eq!(
        namespaces
            .items
            .iter()
            .map(|n| n.name_any())
            .collect::<Vec<_>>(),
        ["team-a"]
    );
    assert_eq!(double.list(&ResourceKey::namespaces(), None).len(), 1);
}

// ---- TokenRequest and the service-account issuer -----------------------------------------

const ISSUER: &str = KubeApiDouble::SERVICE_ACCOUNT_ISSUER;

fn token_request(audiences: &[&str], expiration_seconds: Option<i64>) -> TokenRequest {
    TokenRequest {
        spec: TokenRequestSpec {
            audiences: audiences.iter().map(|a| a.to_string()).collect(),
            expiration_seconds,
            ..Default::default()
        },
        ..Default::default()
    }
}

async fn create_service_account(api: &Api<ServiceAccount>, name: &str) -> ServiceAccount {
    let sa = ServiceAccount {
        metadata: ObjectMeta {
            name: Some(name.into()),
            ..Default::default()
        },
        ..Default::default()
    };
    api.create(&PostParams::default(), &sa).await.unwrap()
}

async fn get_json(url: &str) -> (Option<String>, Value) {
    let response = reqwest::get(url).await.unwrap();
    assert_eq!(response.status().as_u16(), 200, "GET {url}");
    let content_type = response
        .headers()
        .get("content-type")
        .map(|v| v.to_str().unwrap().to_string());
    (content_type, response.json().await.unwrap())
}

/// Verifies `token` with the key the double serves at its JWKS URI (by `kid`): ES256, issuer,
/// `audience`, `exp`. Returns the claims.
async fn verify(double: &KubeApiDouble, token: &str, audience: &str) -> Value {
    let (_, jwks) = get_json(&double.service_account_jwks_uri()).await;
    let jwks: jsonwebtoken::jwk::JwkSet = serde_json::from_value(jwks).unwrap();
    let header = jsonwebtoken::decode_header(token).unwrap();
    assert_eq!(header.alg, jsonwebtoken::Algorithm::ES256);
    let jwk = jwks
        .find(header.kid.as_deref().unwrap())
        .expect("the kid is in the JWKS");
    let key = jsonwebtoken::DecodingKey::from_jwk(jwk).unwrap();
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_audience(&[audience]);
    validation.set_issuer(&[ISSUER]);
    jsonwebtoken::decode::<Value>(token, &key, &validation)
        .unwrap()
        .claims
}

#[tokio::test]
async fn token_request_mints_a_token_that_the_served_jwks_verifies() {
    let double = KubeApiDouble::start().await;
    let sas: Api<ServiceAccount> = Api::namespaced(double.client(), "team-a");
    let sa = create_service_account(&sas, "app").await;
    let pp = PostParams::default();

    let asked = token_request(&["https://idp.example"], Some(1200));
    let answered = sas.create_token_request("app", &pp, &asked).await.unwrap();
    assert_eq!(answered.spec.audiences, ["https://idp.example"]);
    assert_eq!(answered.metadata.name.as_deref(), Some("app"));
    assert_eq!(answered.metadata.namespace.as_deref(), Some("team-a"));
    let status = answered.status.unwrap();
    let claims = verify(&double, &status.token, "https://idp.example").await;
    assert_eq!(claims["iss"], ISSUER);
    assert_eq!(claims["sub"], "system:serviceaccount:team-a:app");
    assert_eq!(claims["aud"], json!(["https://idp.example"]));
    assert_eq!(claims["kubernetes.io"]["namespace"], "team-a");
    assert_eq!(
        claims["kubernetes.io"]["serviceaccount"],
        json!({"name": "app", "uid": sa.metadata.uid})
    );
    assert!(claims["jti"].as_str().is_some_and(|j| j.len() == 36));
    let (iat, exp) = (
        claims["iat"].as_i64().unwrap(),
        claims["exp"].as_i64().unwrap(),
    );
    assert_eq!(exp - iat, 1200);
    assert_eq!(claims["nbf"].as_i64(), Some(iat));
    assert_eq!(status.expiration_timestamp.0.as_second(), exp);

    // No audiences: the issuer; no expiration: an hour.
    let default = token_request(&[], None);
    let answered = sas
        .create_token_request("app", &pp, &default)
        .await
        .unwrap();
    assert_eq!(answered.spec.expiration_seconds, Some(3600));
    let second = answered.status.unwrap().token;
    let claims = verify(&double, &second, ISSUER).await;
    assert_eq!(claims["aud"], json!([ISSUER]));
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        3600
    );
    assert_ne!(second, status.token);
    assert_eq!(double.minted_tokens(), [status.token, second]);
    assert_eq!(double.minted_count(), 2);

    let logged: Vec<_> = (double.requests().into_iter())
        .filter(|r| r.subresource.as_deref() == Some("token"))
        .map(|r| (r.verb, r.plural, r.namespace, r.name))
        .collect();
    let one = (
        "create".to_string(),
        "serviceaccounts".to_string(),
        Some("team-a".to_string()),
        Some("app".to_string()),
    );
    assert_eq!(logged, [one.clone(), one]);
    double.shutdown().await;
}

#[tokio::test]
async fn the_issuer_discovery_documents_are_served_as_the_api_server_serves_them() {
    let double = KubeApiDouble::start().await;
    let (_, discovery) = get_json(&format!(
        "{}/.well-known/openid-configuration",
        double.url()
    ))
    .await;
    assert_eq!(
        discovery,
        json!({
            "issuer": ISSUER,
            "jwks_uri": format!("{}/openid/v1/jwks", double.url()),
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
        })
    );
    assert_eq!(double.service_account_jwks_uri(), discovery["jwks_uri"]);
    let (content_type, jwks) = get_json(&double.service_account_jwks_uri()).await;
    assert_eq!(content_type.as_deref(), Some("application/jwk-set+json"));
    let keys = jwks["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    let key = &keys[0];
    for (field, want) in [
        ("kty", "EC"),
        ("crv", "P-256"),
        ("alg", "ES256"),
        ("use", "sig"),
    ] {
        assert_eq!(key[field], want, "{field}");
    }
    for field in ["x", "y", "kid"] {
        let value = key[field].as_str().unwrap();
        assert!(
            !value.contains(['=', '+', '/']),
            "{field} is base64url without padding"
        );
    }
    assert_eq!(key["x"].as_str().unwrap().len(), 43, "32 bytes");
    // Another double, another key.
    let other = KubeApiDouble::start().await;
    let (_, other_jwks) = get_json(&other.service_account_jwks_uri()).await;
    assert_ne!(other_jwks["keys"][0]["kid"], key["kid"]);
    other.shutdown().await;
    double.shutdown().await;
}

#[tokio::test]
async fn token_request_refuses_a_missing_service_account_and_short_expirations() {
    let double = KubeApiDouble::start().await;
    let sas: Api<ServiceAccount> = Api::namespaced(double.client(), "team-a");
    let pp = PostParams::default();
    let hour = token_request(&["aud"], Some(3600));

    let missing = api_status(sas.create_token_request("app", &pp, &hour).await);
    assert_eq!((missing.code, missing.reason.as_str()), (404, "NotFound"));
    assert_eq!(missing.message, r#"serviceaccounts "app" not found"#);

    create_service_account(&sas, "app").await;
    let short = token_request(&["aud"], Some(599));
    let invalid = api_status(sas.create_token_request("app", &pp, &short).await);
    assert_eq!((invalid.code, invalid.reason.as_str()), (422, "Invalid"));
    assert!(
        invalid.message.ends_with(
            "spec.expirationSeconds: Invalid value: 599: \
             may not specify a duration less than 10 minutes"
        ),
        "{}",
        invalid.message
    );
    let mut elsewhere = token_request(&["aud"], Some(3600));
    elsewhere.metadata.namespace = Some("team-b".into());
    let mismatch = api_status(sas.create_token_request("app", &pp, &elsewhere).await);
    assert_eq!((mismatch.code, mismatch.reason.as_str()), (422, "Invalid"));
    let ten_minutes = token_request(&["aud"], Some(600));
    sas.create_token_request("app", &pp, &ten_minutes)
        .await
        .unwrap();
    assert_eq!(double.minted_count(), 1, "refused requests mint nothing");

    // The ServiceAccount of another namespace is another one.
    let other: Api<ServiceAccount> = Api::namespaced(double.client(), "team-b");
    assert_eq!(
        api_status(other.create_token_request("app", &pp, &hour).await).code,
        404
    );
    double.shutdown().await;
}

/// A kube client of the double that sends `token` as its bearer token.
async fn client_with_token(double: &KubeApiDouble, token: &str) -> Client {
    let yaml = double.kubeconfig_yaml_with_token(token);
    let kubeconfig = kube::config::Kubeconfig::from_yaml(&yaml).unwrap();
    let options = kube::config::KubeConfigOptions::default();
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &options)
        .await
        .unwrap();
    Client::try_from(config).unwrap()
}

/// A Role or ClusterRole allowing `create serviceaccounts/token`, on `resource_names` only
/// when given.
fn token_minter<K: serde::de::DeserializeOwned>(name: &str, resource_names: Option<&[&str]>) -> K {
    let mut rule =
        json!({"apiGroups": [""], "resources": ["serviceaccounts/token"], "verbs": ["create"]});
    if let Some(names) = resource_names {
        rule["resourceNames"] = json!(names);
    }
    serde_json::from_value(json!({"metadata": {"name": name}, "rules": [rule]})).unwrap()
}

fn binding<K: serde::de::DeserializeOwned>(
    name: &str,
    subject: Value,
    role_kind: &str,
    role: &str,
) -> K {
    let role_ref =
        json!({"apiGroup": "rbac.authorization.k8s.io", "kind": role_kind, "name": role});
    serde_json::from_value(
        json!({"metadata": {"name": name}, "subjects": [subject], "roleRef": role_ref}),
    )
    .unwrap()
}

#[tokio::test]
async fn a_token_request_from_an_authenticated_identity_needs_an_rbac_grant() {
    const OPERATOR: &str = "system:serviceaccount:operators:audience-token-operator";
    let double = KubeApiDouble::start().await;
    let pp = PostParams::default();
    let admin = double.client();
    let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), "team-a");
    for name in ["app", "other"] {
        create_service_account(&sas, name).await;
    }
    double.authenticate("operator-token", OPERATOR);
    let operator = client_with_token(&double, "operator-token").await;
    let as_operator: Api<ServiceAccount> = Api::namespaced(operator.clone(), "team-a");
    let hour = token_request(&["https://idp.example"], Some(3600));

    let refused = api_status(as_operator.create_token_request("app", &pp, &hour).await);
    assert_eq!((refused.code, refused.reason.as_str()), (403, "Forbidden"));
    assert_eq!(
        refused.message,
        format!(
            "serviceaccounts \"app\" is forbidden: User \"{OPERATOR}\" cannot create resource \
             \"serviceaccounts/token\" in API group \"\" in the namespace \"team-a\""
        )
    );
    // Authorization comes first, as on the real server: no hint whether it exists.
    assert_eq!(
        api_status(as_operator.create_token_request("ghost", &pp, &hour).await).code,
        403
    );

    // A Role for `app` only, bound to the operator's ServiceAccount: takes effect at once.
    let roles: Api<Role> = Api::namespaced(admin.clone(), "team-a");
    roles
        .create(&pp, &token_minter::<Role>("mint-app", Some(&["app"])))
        .await
        .unwrap();
    let operator_sa = json!({"kind": "ServiceAccount", "name": "audience-token-operator",
                             "namespace": "operators"});
    let bindings: Api<RoleBinding> = Api::namespaced(admin.clone(), "team-a");
    let bound = binding(
        "operator-mints-app",
        operator_sa.clone(),
        "Role",
        "mint-app",
    );
    bindings.create(&pp, &bound).await.unwrap();
    // Ordinary objects in the store.
    let stored = double.get(
        &ResourceKey::rolebindings(),
        Some("team-a"),
        "operator-mints-app",
    );
    assert_eq!(stored.unwrap()["roleRef"]["name"], "mint-app");
    assert_eq!(double.list(&ResourceKey::roles(), Some("team-a")).len(), 1);
    let answered = as_operator
        .create_token_request("app", &pp, &hour)
        .await
        .unwrap();
    let token = answered.status.unwrap().token;
    let claims = verify(&double, &token, "https://idp.example").await;
    assert_eq!(claims["sub"], "system:serviceaccount:team-a:app");

    // resourceNames names `app`: no grant for `other`, nor for `app` in another namespace.
    let other = api_status(as_operator.create_token_request("other", &pp, &hour).await);
    assert_eq!((other.code, other.reason.as_str()), (403, "Forbidden"));
    assert!(
        other
            .message
            .starts_with(r#"serviceaccounts "other" is forbidden"#)
    );
    let team_b: Api<ServiceAccount> = Api::namespaced(admin.clone(), "team-b");
    create_service_account(&team_b, "app").await;
    let as_operator_b: Api<ServiceAccount> = Api::namespaced(operator, "team-b");
    assert_eq!(
        api_status(as_operator_b.create_token_request("app", &pp, &hour).await).code,
        403
    );

    // A ClusterRole bound cluster-wide to a User, with no resourceNames: anywhere, any name.
    double.authenticate("alice-token", "alice");
    let as_alice: Api<ServiceAccount> =
        Api::namespaced(client_with_token(&double, "alice-token").await, "team-b");
    assert_eq!(
        api_status(as_alice.create_token_request("app", &pp, &hour).await).code,
        403
    );
    let minter: ClusterRole = token_minter("minter", None);
    Api::<ClusterRole>::all(admin.clone())
        .create(&pp, &minter)
        .await
        .unwrap();
    let alice = json!({"kind": "User", "apiGroup": "rbac.authorization.k8s.io", "name": "alice"});
    let cluster_binding: ClusterRoleBinding =
        binding("alice-mints", alice, "ClusterRole", "minter");
    Api::<ClusterRoleBinding>::all(admin.clone())
        .create(&pp, &cluster_binding)
        .await
        .unwrap();
    as_alice
        .create_token_request("app", &pp, &hour)
        .await
        .unwrap();
    assert_eq!(
        api_status(as_operator_b.create_token_request("app", &pp, &hour).await).code,
        403,
        "alice's grant is hers"
    );

    // Deleting the RoleBinding takes the grant away at once.
    bindings
        .delete("operator-mints-app", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(
        api_status(as_operator.create_token_request("app", &pp, &hour).await).code,
        403
    );

    // No bearer token, or one never authenticated: not checked.
    sas.create_token_request("other", &pp, &hour).await.unwrap();
    let stranger = client_with_token(&double, "unknown-token").await;
    Api::<ServiceAccount>::namespaced(stranger, "team-a")
        .create_token_request("other", &pp, &hour)
        .await
        .unwrap();

    assert_eq!(double.minted_count(), 4, "refused requests mint nothing");
    assert_eq!(double.minted_tokens()[0], token);
    double.shutdown().await;
}

mod controller {
    use super::*;
    use kube::Resource;
    use kube::runtime::Controller;
    use kube::runtime::controller::Action;
    use std::sync::Arc;
    use tokio::sync::mpsc::UnboundedSender;

    struct Ctx {
        secrets: Api<Secret>,
        reconciled: UnboundedSender<String>,
    }

    /// Applies an owned Secret for each ConfigMap (always the same content).
    async fn reconcile(cm: Arc<ConfigMap>, ctx: Arc<Ctx>) -> Result<Action, Error> {
        let name = format!("{}-secret", cm.name_any());
        let secret = json!({"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "ownerReferences": [cm.controller_owner_ref(&()).unwrap()]},
            "data": {"token": "czNjcmV0"}});
        let pp = PatchParams::apply("test-controller").force();
        ctx.secrets
            .patch(&name, &pp, &Patch::Apply(&secret))
            .await?;
        ctx.reconciled.send(cm.name_any()).unwrap();
        Ok(Action::await_change())
    }

    fn error_policy(_: Arc<ConfigMap>, _: &Error, _: Arc<Ctx>) -> Action {
        Action::requeue(Duration::from_secs(1))
    }

    #[tokio::test]
    async fn a_controller_reconciles_and_settles_because_no_op_writes_emit_nothing() {
        let double = KubeApiDouble::start().await;
        let cms: Api<ConfigMap> = Api::namespaced(double.client(), "default");
        let secrets: Api<Secret> = Api::namespaced(double.client(), "default");
        let (reconciled, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let ctx = Arc::new(Ctx {
            secrets: secrets.clone(),
            reconciled,
        });
        let controller = Controller::new(cms.clone(), watcher::Config::default())
            .owns(secrets.clone(), watcher::Config::default())
            .run(reconcile, error_policy, ctx)
            .for_each(|_| async {});
        let task = tokio::spawn(controller);

        let cm = ConfigMap {
            metadata: ObjectMeta {
                name: Some("app".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let cm = cms.create(&PostParams::default(), &cm).await.unwrap();
        assert_eq!(
            within("the first reconcile", rx.recv()).await.unwrap(),
            "app"
        );
        let owned = secrets.get("app-secret").await.unwrap();
        assert_eq!(owned.owner_references()[0].uid, cm.uid().unwrap());

        // The Secret's ADDED event maps back to the ConfigMap: a reconcile whose apply changes
        // nothing, so no further event. Without that rule this would loop forever.
        let mut extra = 0;
        while let Ok(Some(_)) = tokio::time::timeout(Duration::from_millis(750), rx.recv()).await {
            extra += 1;
            assert!(extra <= 2, "the controller does not settle");
        }
        let applies = double
            .requests()
            .into_iter()
            .filter(|r| r.field_manager.as_deref() == Some("test-controller"));
        assert_eq!(applies.count(), 1 + extra);

        cms.patch(
            "app",
            &PatchParams::default(),
            &Patch::Merge(json!({"data": {"k": "v"}})),
        )
        .await
        .unwrap();
        assert_eq!(
            within("a reconcile after a change", rx.recv())
                .await
                .unwrap(),
            "app"
        );
        task.abort();
        double.shutdown().await;
    }
}
