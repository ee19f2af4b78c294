//! DPoP-bound tokens (RFC 9449, `spec.dpop`): the operator keeps a key per AudienceToken,
//! proves possession at every token request, checks the binding, and writes the key and its
//! thumbprint beside the token, so the workload can make the proofs for its own calls. Needs
//! the test server's `m2m-dpop` client, whose tokens must be DPoP-bound.

use audience_token_operator::api::{AudienceTokenSpec, DpopAlgorithmName, DpopSpec};
use audience_token_operator::oauth::dpop::DpopKey;
use audience_token_operator::secret::keys;
use kube::ResourceExt;
use kube::api::{Patch, PatchParams};
use serde_json::json;

use super::super::oidc;
use super::super::operator::OperatorProcess;
use super::{READY_TIMEOUT, TestEnv, claims, data};

impl TestEnv {
    /// An AudienceToken for `resource` with `spec.dpop` of `algorithm`.
    pub async fn create_dpop_token(
        &self,
        name: &str,
        issuer: &str,
        resource: &str,
        algorithm: DpopAlgorithmName,
    ) {
        let spec = AudienceTokenSpec {
            dpop: Some(DpopSpec { algorithm }),
            ..Self::token_spec(issuer, resource, &[])
        };
        self.submit_token(name, spec).await;
    }

    /// The token, the DPoP key and its thumbprint in Secret `name`, checked against each
    /// other: the token is DPoP, bound to exactly that key, and accepted by the resource
    /// server with a proof from it.
    pub async fn checked_dpop_secret(&self, name: &str) -> (String, DpopKey) {
        let secret = self.secrets().get(name).await.expect("token Secret");
        assert_eq!(data(&secret, keys::TOKEN_TYPE), "DPoP");
        let token = data(&secret, keys::TOKEN);
        let key = DpopKey::from_private_jwk(&data(&secret, keys::DPOP_PRIVATE_KEY))
            .expect("the Secret's dpop-private-key is a private JWK with alg");
        assert_eq!(data(&secret, keys::DPOP_JKT), key.thumbprint());
        assert_eq!(
            claims(&token)["cnf"]["jkt"],
            json!(key.thumbprint()),
            "the token is bound to the Secret's key"
        );
        let url = self.idp.resource_url();
        let proof = key.proof("GET", &url, None, Some(&token)).expect("proof");
        let (status, body) = self.idp.call_resource(Some(&token), Some(&proof)).await;
        assert_eq!(
            status, 200,
            "the resource server accepts token + proof: {body}"
        );
        let (status, _) = self.idp.call_resource(Some(&token), None).await;
        assert_eq!(status, 401, "the token alone is refused");
        let stranger = DpopKey::generate(key.algorithm()).expect("another key");
        let proof = stranger
            .proof("GET", &url, None, Some(&token))
            .expect("proof");
        let (status, _) = self.idp.call_resource(Some(&token), Some(&proof)).await;
        assert_eq!(status, 401, "a proof from another key is refused");
        (token, key)
    }
}

/// A DPoP-bound token: the Secret holds the token (type DPoP), the key and its thumbprint;
/// a renewal keeps the key (the workload's key never changes under a token), an algorithm
/// change makes a new key, a restart makes no request and keeps using the stored key, and
/// the refresh-token grant binds its tokens too.
pub async fn dpop_bound_tokens(env: &TestEnv, operator: &mut OperatorProcess) {
    env.create_issuer("dpop-idp", &oidc::M2M_DPOP, oidc::M2M_DPOP.secret)
        .await;
    env.create_dpop_token(
        "dpop-orders",
        "dpop-idp",
        oidc::ORDERS,
        DpopAlgorithmName::ES256,
    )
    .await;
    let ready = env
        .wait_condition("dpop-orders", "True", "Issued", READY_TIMEOUT)
        .await;
    assert_eq!(
        ready.status.and_then(|s| s.token_type).as_deref(),
        Some("DPoP")
    );
    let (first, key) = env.checked_dpop_secret("dpop-orders").await;
    let secret = env.secrets().get("dpop-orders").await.expect("Secret");
    let annotations = secret.metadata.annotations.clone().unwrap_or_default();
    assert_eq!(
        annotations
            .get("audiencetoken.io/dpop-jkt")
            .map(String::as_str),
        Some(key.thumbprint()),
        "the thumbprint is in the metadata too"
    );

    // What a shell workload does: the dpop-proof command makes the proof for its API call
    // from the mounted files.
    let mounted = std::env::temp_dir().join(format!("ato-dpop-mount-{}", std::process::id()));
    std::fs::create_dir_all(&mounted).expect("mount dir");
    for file in [keys::TOKEN, keys::DPOP_PRIVATE_KEY] {
        std::fs::write(mounted.join(file), data(&secret, file)).expect("write mounted file");
    }
    let url = env.idp.resource_url();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_audience-token-operator"))
        .args(["dpop-proof", "--secret-dir"])
        .arg(&mounted)
        .args(["--method", "GET", "--url", &url])
        .output()
        .expect("run dpop-proof");
    std::fs::remove_dir_all(&mounted).expect("remove mount dir");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let proof = String::from_utf8(output.stdout).expect("UTF-8");
    let (status, body) = env
        .idp
        .call_resource(Some(&first), Some(proof.trim()))
        .await;
    assert_eq!(status, 200, "the command's proof is accepted: {body}");

    // A renewal is bound to the same key.
    env.force_renewal(&["dpop-orders"], "2026-12-01T13:00:00Z")
        .await;
    env.wait_forced("dpop-orders", "2026-12-01T13:00:00Z", READY_TIMEOUT)
        .await;
    let (renewed, renewed_key) = env.checked_dpop_secret("dpop-orders").await;
    assert_ne!(renewed, first, "a new token");
    assert_eq!(renewed_key.thumbprint(), key.thumbprint(), "the same key");

    // After a restart: no request, and the next renewal reads the key back from the Secret.
    let before = env.idp.token_requests().await.for_client(oidc::M2M_DPOP.id);
    operator.restart().await;
    env.force_renewal(&["dpop-orders"], "2026-12-01T13:10:00Z")
        .await;
    env.wait_forced("dpop-orders", "2026-12-01T13:10:00Z", READY_TIMEOUT)
        .await;
    assert_eq!(
        env.idp.token_requests().await.for_client(oidc::M2M_DPOP.id),
        before + 1,
        "the restart made no request, the renewal one"
    );
    let (_, after_restart) = env.checked_dpop_secret("dpop-orders").await;
    assert_eq!(
        after_restart.thumbprint(),
        key.thumbprint(),
        "the stored key"
    );

    // The refresh-token grant: the chain's request carries the AudienceToken's proof too.
    let bootstrap = env
        .idp
        .mint_refresh_token(oidc::M2M_REFRESH.id, &[oidc::ORDERS], None)
        .await;
    env.put_bootstrap("dpop-chain-bootstrap", &bootstrap).await;
    env.create_refresh_issuer("dpop-chain", "dpop-chain-bootstrap", &[oidc::ORDERS])
        .await;
    env.create_dpop_token(
        "dpop-chain-orders",
        "dpop-chain",
        oidc::ORDERS,
        DpopAlgorithmName::ES384,
    )
    .await;
    env.wait_condition("dpop-chain-orders", "True", "Issued", READY_TIMEOUT)
        .await;
    let (_, chain_key) = env.checked_dpop_secret("dpop-chain-orders").await;
    assert_eq!(chain_key.algorithm().as_str(), "ES384");

    // Another algorithm: a new key and a new token, at once.
    env.tokens()
        .patch(
            "dpop-orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"dpop": {"algorithm": "PS256"}}})),
        )
        .await
        .expect("patch algorithm");
    env.wait_secret("dpop-orders", "a PS256 key in the Secret", |s| {
        data(s, keys::DPOP_PRIVATE_KEY).contains("\"PS256\"")
    })
    .await;
    let (_, rsa) = env.checked_dpop_secret("dpop-orders").await;
    assert_eq!(rsa.algorithm().as_str(), "PS256");
    assert_ne!(rsa.thumbprint(), key.thumbprint());

    // `dpop` dropped: a Bearer token, and the key, its thumbprint and the annotation leave
    // the Secret (no private key stays behind a token that no longer needs it).
    env.tokens()
        .patch(
            "dpop-chain-orders",
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"dpop": null}})),
        )
        .await
        .expect("drop dpop");
    let bearer = env
        .wait_secret("dpop-chain-orders", "a Bearer token", |s| {
            data(s, keys::TOKEN_TYPE) == "Bearer"
        })
        .await;
    let left: Vec<&String> = bearer
        .data
        .as_ref()
        .map(|d| d.keys().collect())
        .unwrap_or_default();
    assert!(
        !left
            .iter()
            .any(|k| k.as_str() == keys::DPOP_PRIVATE_KEY || k.as_str() == keys::DPOP_JKT),
        "DPoP keys left in the Secret: {left:?}"
    );
    assert_eq!(bearer.annotations().get("audiencetoken.io/dpop-jkt"), None);
}
