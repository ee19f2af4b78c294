//! Secretless issuers: ServiceAccount tokens minted through the TokenRequest API, as the
//! client assertion of a client-credentials request (Entra ID workload identity, Keycloak
//! federated client authentication) and as the subject token of an RFC 8693 token
//! exchange. The operator's own RBAC cannot mint them: each scenario grants it for one
//! ServiceAccount, as the namespace's owner would. The test server trusts the cluster's
//! service-account issuer and keys (the API double's, or a real cluster's).

use audience_token_operator::api::{
    ClientAuth, ClientAuthMethod, ClusterTokenIssuer, ClusterTokenIssuerSpec, Grant, GrantType,
    IssuerKind, IssuerSpec, ServiceAccountRef, SubjectTokenSource, TokenExchangeGrant, TokenIssuer,
    TokenIssuerSpec,
};
use audience_token_operator::secret::keys;
use k8s_openapi::api::core::v1::ServiceAccount;
use k8s_openapi::api::rbac::v1::{PolicyRule, Role, RoleBinding, RoleRef, Subject};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use kube::api::{Api, DeleteParams, PostParams};
use serde_json::Value;

use super::{READY_TIMEOUT, TestEnv, claims, data};
use crate::support::oidc::{self, TestClient};

/// The ServiceAccount the operator runs as: the subject of the grants.
#[derive(Clone, Debug)]
pub struct OperatorIdentity {
    pub namespace: String,
    pub name: String,
}

impl OperatorIdentity {
    /// Its user name at the API server.
    pub fn username(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }
}

/// The Role (and RoleBinding) that lets the operator mint `account`'s tokens.
fn grant_name(account: &str) -> String {
    format!("audiencetoken-mint-{account}")
}

impl TestEnv {
    /// Creates ServiceAccount `name`.
    pub async fn create_service_account(&self, name: &str) {
        let accounts: Api<ServiceAccount> = Api::namespaced(self.client.clone(), &self.namespace);
        let account = ServiceAccount {
            metadata: ObjectMeta {
                name: Some(name.into()),
                ..ObjectMeta::default()
            },
            ..ServiceAccount::default()
        };
        accounts
            .create(&PostParams::default(), &account)
            .await
            .expect("create ServiceAccount");
    }

    /// What a namespace owner does: a Role allowing `create` on `serviceaccounts/token` for
    /// `account` only, bound to the operator.
    pub async fn grant_minting(&self, account: &str, operator: &OperatorIdentity) {
        let name = grant_name(account);
        let role = Role {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            rules: Some(vec![PolicyRule {
                api_groups: Some(vec![String::new()]),
                resources: Some(vec!["serviceaccounts/token".into()]),
                verbs: vec!["create".into()],
                resource_names: Some(vec![account.into()]),
                ..PolicyRule::default()
            }]),
        };
        let binding = RoleBinding {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                ..ObjectMeta::default()
            },
            role_ref: RoleRef {
                api_group: "rbac.authorization.k8s.io".into(),
                kind: "Role".into(),
                name,
            },
            subjects: Some(vec![Subject {
                kind: "ServiceAccount".into(),
                name: operator.name.clone(),
                namespace: Some(operator.namespace.clone()),
                ..Subject::default()
            }]),
        };
        Api::<Role>::namespaced(self.client.clone(), &self.namespace)
            .create(&PostParams::default(), &role)
            .await
            .expect("create Role");
        Api::<RoleBinding>::namespaced(self.client.clone(), &self.namespace)
            .create(&PostParams::default(), &binding)
            .await
            .expect("create RoleBinding");
    }

    /// Takes the grant of [`TestEnv::grant_minting`] away again (the RoleBinding).
    pub async fn revoke_minting(&self, account: &str) {
        Api::<RoleBinding>::namespaced(self.client.clone(), &self.namespace)
            .delete(&grant_name(account), &DeleteParams::default())
            .await
            .expect("delete RoleBinding");
    }

    /// TokenIssuer `name` for `client`, authenticating with tokens of `account` (audience
    /// `audience`, default the issuer identifier). It names no Secret.
    pub async fn create_federated_issuer(
        &self,
        name: &str,
        client: &TestClient,
        account: &str,
        audience: Option<&str>,
    ) {
        let issuer = IssuerSpec {
            issuer_url: Some(self.idp.issuer.clone()),
            client_id: client.id.into(),
            client_auth: ClientAuth {
                method: ClientAuthMethod::ServiceAccountToken,
                service_account_ref: Some(ServiceAccountRef {
                    name: account.into(),
                    audience: audience.map(str::to_string),
                }),
                ..ClientAuth::default()
            },
            ..IssuerSpec::default()
        };
        self.submit_issuer(&TokenIssuer::new(name, TokenIssuerSpec { issuer }))
            .await;
    }

    /// TokenIssuer `name` for the public client [`oidc::M2M_EXCHANGE`]: a token exchange of
    /// `account`'s tokens, asking for `requested` when given.
    pub async fn create_exchange_issuer(&self, name: &str, account: &str, requested: Option<&str>) {
        let issuer = IssuerSpec {
            issuer_url: Some(self.idp.issuer.clone()),
            client_id: oidc::M2M_EXCHANGE.id.into(),
            client_auth: ClientAuth {
                method: ClientAuthMethod::NoAuth,
                ..ClientAuth::default()
            },
            grant: Grant {
                type_: GrantType::TokenExchange,
                token_exchange: Some(TokenExchangeGrant {
                    subject_token_source: SubjectTokenSource::ServiceAccount,
                    service_account_ref: ServiceAccountRef {
                        name: account.into(),
                        audience: None,
                    },
                    requested_token_type: requested.map(str::to_string),
                }),
                ..Grant::default()
            },
            ..IssuerSpec::default()
        };
        self.submit_issuer(&TokenIssuer::new(name, TokenIssuerSpec { issuer }))
            .await;
    }

    /// The ServiceAccount tokens the test server received so far, decoded, of `account`.
    async fn service_account_tokens_of(&self, account: &str) -> Vec<Value> {
        let subject = format!("system:serviceaccount:{}:{account}", self.namespace);
        let seen = self.idp.secrets_seen().await.service_account_tokens;
        seen.iter()
            .map(|token| claims(token))
            .filter(|c| c["sub"] == subject.as_str())
            .collect()
    }
}

/// Checks what the API server minted: for `account`, with `audience`, for 600 s.
fn assert_minted(token: &Value, namespace: &str, account: &str, audience: &str) {
    assert_eq!(
        token["sub"],
        format!("system:serviceaccount:{namespace}:{account}").as_str()
    );
    assert_eq!(token["aud"], serde_json::json!([audience]), "{token}");
    let lifetime = token["exp"].as_i64().unwrap_or_default() - token["iat"].as_i64().unwrap_or(0);
    assert_eq!(
        lifetime, 600,
        "minted for the API's minimum, 10 minutes: {token}"
    );
}

/// Without a grant the issuer says who may not mint what, and how to grant it; its token
/// waits. Once a namespace owner grants it, both become Ready by themselves, no restart.
/// (Entra ID's audience, `api://AzureADTokenExchange`, instead of the issuer identifier.)
pub async fn missing_grant_is_reported_then_fixed(env: &TestEnv, operator: &OperatorIdentity) {
    let account = oidc::FEDERATED_ENTRA_SERVICE_ACCOUNT;
    env.create_service_account(account).await;
    env.create_federated_issuer(
        "entra-like",
        &oidc::M2M_FEDERATED_ENTRA,
        account,
        Some(oidc::ENTRA_AUDIENCE),
    )
    .await;
    env.create_token(
        "entra-orders",
        "entra-like",
        oidc::ORDERS,
        &["orders/read"],
        None,
    )
    .await;
    let issuer = env.wait_issuer("entra-like", "False", "NotReady").await;
    let ready = issuer
        .status
        .and_then(|s| s.conditions.into_iter().find(|c| c.type_ == "Ready"))
        .expect("a Ready condition");
    let ns = &env.namespace;
    let role = format!("audiencetoken-mint-{account}");
    for part in [
        format!("may not mint tokens of ServiceAccount {ns}/{account}"),
        format!(
            "kubectl -n {ns} create role {role} --verb=create --resource=serviceaccounts/token --resource-name={account}"
        ),
        format!(
            "kubectl -n {ns} create rolebinding {role} --role={role} --serviceaccount={}:{}",
            operator.namespace, operator.name
        ),
    ] {
        assert!(
            ready.message.contains(&part),
            "{part}\nin: {}",
            ready.message
        );
    }
    let waiting = env
        .wait_condition("entra-orders", "False", "IssuerNotReady", READY_TIMEOUT)
        .await;
    let message = waiting.status.unwrap_or_default().conditions[0]
        .message
        .clone();
    assert!(message.contains("may not mint tokens"), "{message}");

    env.grant_minting(account, operator).await;
    env.wait_issuer("entra-like", "True", "Ready").await;
    env.wait_condition("entra-orders", "True", "Issued", READY_TIMEOUT)
        .await;
    let secret = env.secrets().get("entra-orders").await.expect("Secret");
    assert_eq!(claims(&data(&secret, keys::TOKEN))["aud"], oidc::ORDERS);
    let minted = env.service_account_tokens_of(account).await;
    assert!(!minted.is_empty(), "the test server saw the assertion");
    for token in &minted {
        assert_minted(token, ns, account, oidc::ENTRA_AUDIENCE);
    }
}

/// Client credentials authenticated by a ServiceAccount token alone (no Secret names a
/// credential): two tokens for two APIs, each exactly for its API, a third through a
/// ClusterTokenIssuer, and one minted token serves all (it is reused while more than half
/// of its 10 minutes is left).
pub async fn federated_client_credentials(env: &TestEnv, operator: &OperatorIdentity) {
    let account = oidc::FEDERATED_SERVICE_ACCOUNT;
    env.create_service_account(account).await;
    env.grant_minting(account, operator).await;
    env.create_federated_issuer("federated", &oidc::M2M_FEDERATED, account, None)
        .await;
    env.wait_issuer("federated", "True", "Ready").await;
    env.issue_token("fed-orders", "federated", oidc::ORDERS, &["orders/read"])
        .await;
    env.issue_token("fed-payments", "federated", oidc::PAYMENTS, &[])
        .await;
    for (secret, resource) in [
        ("fed-orders", oidc::ORDERS),
        ("fed-payments", oidc::PAYMENTS),
    ] {
        let secret = env.secrets().get(secret).await.expect("Secret");
        let token = claims(&data(&secret, keys::TOKEN));
        assert_eq!(token["aud"], resource, "{token}");
        assert_eq!(token["client_id"], oidc::M2M_FEDERATED.id, "{token}");
    }
    let issuer = env.issuers().get("federated").await.expect("TokenIssuer");
    let auth = &issuer.spec.issuer.client_auth;
    assert!(auth.client_secret_ref.is_none() && auth.private_key_ref.is_none());
    assert!(issuer.spec.issuer.tls_client_certificate.is_none());

    // A ClusterTokenIssuer mints a ServiceAccount of the cluster resource namespace (here
    // the test namespace), for the namespaces it allows; the same minted token serves it.
    let cluster_issuer = format!("federated-{}", env.namespace);
    let mut spec = env
        .issuers()
        .get("federated")
        .await
        .expect("TokenIssuer")
        .spec
        .issuer;
    spec.client_id = oidc::M2M_FEDERATED.id.into();
    let cluster = ClusterTokenIssuer::new(
        &cluster_issuer,
        ClusterTokenIssuerSpec {
            issuer: spec,
            allowed_namespaces: Some(LabelSelector {
                match_labels: Some([("team".to_string(), "test".to_string())].into()),
                ..LabelSelector::default()
            }),
            allowed_resources: None,
        },
    );
    let cluster_issuers: Api<ClusterTokenIssuer> = Api::all(env.client.clone());
    cluster_issuers
        .create(&PostParams::default(), &cluster)
        .await
        .expect("create ClusterTokenIssuer");
    let mut token = TestEnv::token_spec(&cluster_issuer, oidc::ORDERS, &["orders/read"]);
    token.issuer_ref.kind = IssuerKind::ClusterTokenIssuer;
    env.submit_token("fed-cluster-orders", token).await;
    env.wait_condition("fed-cluster-orders", "True", "Issued", READY_TIMEOUT)
        .await;
    let secret = env
        .secrets()
        .get("fed-cluster-orders")
        .await
        .expect("Secret");
    assert_eq!(claims(&data(&secret, keys::TOKEN))["aud"], oidc::ORDERS);
    cluster_issuers
        .delete(&cluster_issuer, &DeleteParams::default())
        .await
        .expect("delete ClusterTokenIssuer");

    let minted = env.service_account_tokens_of(account).await;
    let distinct: std::collections::BTreeSet<String> =
        minted.iter().map(|c| c["jti"].to_string()).collect();
    assert_eq!(
        distinct.len(),
        1,
        "the token requests (and issuer checks) share one minted token: {minted:?}"
    );
    assert_minted(&minted[0], &env.namespace, account, &env.idp.issuer);
}

/// An RFC 8693 exchange by a public client: the ServiceAccount token is the subject
/// token, the access token is for the one API; `issued_token_type` is checked against
/// `requestedTokenType` (the test server answers an access token to an id_token request).
pub async fn token_exchange(env: &TestEnv, operator: &OperatorIdentity) {
    let account = oidc::EXCHANGE_SERVICE_ACCOUNT;
    env.create_service_account(account).await;
    env.grant_minting(account, operator).await;
    env.create_exchange_issuer("exchange", account, None).await;
    env.issue_token(
        "exchanged-orders",
        "exchange",
        oidc::ORDERS,
        &["orders/read"],
    )
    .await;
    let secret = env.secrets().get("exchanged-orders").await.expect("Secret");
    let token = claims(&data(&secret, keys::TOKEN));
    assert_eq!(token["aud"], oidc::ORDERS, "{token}");
    assert_eq!(
        token["sub"],
        format!("system:serviceaccount:{}:{account}", env.namespace).as_str(),
        "the exchanged identity: {token}"
    );
    let minted = env.service_account_tokens_of(account).await;
    assert!(!minted.is_empty(), "the server saw the subject token");
    assert_minted(&minted[0], &env.namespace, account, &env.idp.issuer);

    env.create_exchange_issuer("exchange-jwt", account, Some(oidc::TOKEN_TYPE_JWT))
        .await;
    env.issue_token("exchanged-jwt", "exchange-jwt", oidc::PAYMENTS, &[])
        .await;

    let id_token = "urn:ietf:params:oauth:token-type:id_token";
    env.create_exchange_issuer("exchange-id-token", account, Some(id_token))
        .await;
    env.create_token(
        "exchanged-wrong-type",
        "exchange-id-token",
        oidc::ORDERS,
        &[],
        None,
    )
    .await;
    let refused = env
        .wait_condition(
            "exchanged-wrong-type",
            "False",
            "TokenRequestFailed",
            READY_TIMEOUT,
        )
        .await;
    let message = refused.status.unwrap_or_default().conditions[0]
        .message
        .clone();
    assert!(
        message.contains(&format!("asked for {id_token}"))
            && message.contains(&format!("issued {}", oidc::TOKEN_TYPE_ACCESS_TOKEN)),
        "{message}"
    );
    assert!(
        env.secrets()
            .get_opt("exchanged-wrong-type")
            .await
            .expect("read Secret")
            .is_none(),
        "a token of another type is not written"
    );
}

/// A ServiceAccount of another namespace cannot be named: the name is a DNS subdomain, so
/// `other-team/idp-client` (or a `system:serviceaccount:…` user name) is refused at
/// admission. Only on a real API server: the API double does no admission (the rule itself
/// is in `tests/crd_cel.rs`).
pub async fn other_namespaces_are_refused_at_admission(env: &TestEnv) {
    for name in [
        "other-team/idp-client",
        "system:serviceaccount:other-team:idp-client",
    ] {
        let issuer = IssuerSpec {
            issuer_url: Some(env.idp.issuer.clone()),
            client_id: oidc::M2M_FEDERATED.id.into(),
            client_auth: ClientAuth {
                method: ClientAuthMethod::ServiceAccountToken,
                service_account_ref: Some(ServiceAccountRef {
                    name: name.into(),
                    audience: None,
                }),
                ..ClientAuth::default()
            },
            ..IssuerSpec::default()
        };
        let refused = env
            .issuers()
            .create(
                &PostParams::default(),
                &TokenIssuer::new("other-namespace", TokenIssuerSpec { issuer }),
            )
            .await
            .expect_err("a ServiceAccount of another namespace is refused at admission");
        let message = refused.to_string();
        assert!(
            message.contains("no other namespace can be named"),
            "{name}: {message}"
        );
    }
}
