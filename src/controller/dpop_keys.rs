//! The DPoP key of each AudienceToken with `spec.dpop`.
//!
//! Key lifecycle: one key per AudienceToken and algorithm, kept for as long as both stay the
//! same. Every renewal is bound to the key already in the Secret, so a workload that reads
//! the mounted `token` and `dpop-private-key` at any moment gets a pair that belongs
//! together, whichever side of a kubelet update it reads them on. A new key is made only
//! when there is none (first token, Secret deleted) or the algorithm changed; then the new
//! token and the new key arrive in the same Secret update, and a reader can tell a torn read
//! by comparing the token's `cnf.jkt` with `dpop-jkt`. After a restart the key is read back
//! from the Secret once, at the token's next request (restarts make no token request).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use k8s_openapi::api::core::v1::Secret;
use kube::api::Api;
use kube::runtime::reflector::ObjectRef;

use crate::api::{AudienceToken, DpopAlgorithmName};
use crate::failure::{Failure, reason};
use crate::oauth::dpop::{DpopAlgorithm, DpopKey};
use crate::secret::keys;

/// DPoP keys in memory, by AudienceToken.
#[derive(Default)]
pub struct DpopKeys {
    keys: Mutex<HashMap<ObjectRef<AudienceToken>, Arc<DpopKey>>>,
}

/// The API's algorithm name as the OAuth client's algorithm.
pub fn algorithm(name: DpopAlgorithmName) -> DpopAlgorithm {
    match name {
        DpopAlgorithmName::ES256 => DpopAlgorithm::ES256,
        DpopAlgorithmName::ES384 => DpopAlgorithm::ES384,
        DpopAlgorithmName::PS256 => DpopAlgorithm::PS256,
        DpopAlgorithmName::RS256 => DpopAlgorithm::RS256,
    }
}

/// Whether a key read from the Secret may sign the next request: the key the published
/// token is bound to, with the algorithm wanted. (A key in memory is the one this process
/// publishes, so only its algorithm matters.)
fn reusable(stored: &DpopKey, wanted: DpopAlgorithm, published_jkt: &str) -> bool {
    stored.algorithm() == wanted && stored.thumbprint() == published_jkt
}

impl DpopKeys {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<ObjectRef<AudienceToken>, Arc<DpopKey>>> {
        self.keys
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The key for the AudienceToken's next request: the one in memory, else the one in its
    /// Secret (`published_jkt` says a DPoP-bound token is published), else a new one.
    pub async fn key_for(
        &self,
        secrets: &Api<Secret>,
        token: &AudienceToken,
        wanted: DpopAlgorithmName,
        published_jkt: Option<&str>,
    ) -> Result<Arc<DpopKey>, Failure> {
        let wanted = algorithm(wanted);
        let id = ObjectRef::from_obj(token);
        if let Some(key) = self.lock().get(&id)
            && key.algorithm() == wanted
        {
            return Ok(key.clone());
        }
        let stored = match published_jkt {
            Some(jkt) => read_stored(secrets, token.secret_name())
                .await?
                .filter(|key| reusable(key, wanted, jkt)),
            None => None,
        };
        let key = match stored {
            Some(key) => Arc::new(key),
            // An RSA key takes tens of milliseconds of CPU: off the async workers, which
            // the other tokens' reconciles share.
            _ => Arc::new(
                tokio::task::spawn_blocking(move || DpopKey::generate(wanted))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|generated| generated.map_err(|e| e.to_string()))
                    .map_err(|e| {
                        Failure::new(
                            reason::TOKEN_REQUEST_FAILED,
                            format!("cannot make a DPoP key: {e}"),
                        )
                    })?,
            ),
        };
        self.lock().insert(id, key.clone());
        Ok(key)
    }

    /// Forgets the key of a deleted AudienceToken.
    pub fn forget(&self, token: &ObjectRef<AudienceToken>) {
        self.lock().remove(token);
    }
}

/// The DPoP key in a Secret the operator wrote, if it holds a usable one.
async fn read_stored(secrets: &Api<Secret>, name: &str) -> Result<Option<DpopKey>, Failure> {
    let secret = secrets.get_opt(name).await.map_err(|e| {
        Failure::new(
            reason::TOKEN_REQUEST_FAILED,
            format!("cannot read Secret {name} for its DPoP key: {e}"),
        )
    })?;
    let text = secret
        .and_then(|s| s.data)
        .and_then(|data| data.get(keys::DPOP_PRIVATE_KEY).cloned())
        .and_then(|bytes| String::from_utf8(bytes.0).ok());
    // An unreadable key is replaced by a new one (and a new token), not an error.
    Ok(text.and_then(|t| DpopKey::from_private_jwk(&t).ok()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stored_key_is_kept_while_the_algorithm_and_the_published_key_stay() {
        let key = DpopKey::generate(DpopAlgorithm::ES256).unwrap();
        assert!(reusable(&key, DpopAlgorithm::ES256, key.thumbprint()));
        assert!(
            !reusable(&key, DpopAlgorithm::ES384, key.thumbprint()),
            "new algorithm"
        );
        assert!(
            !reusable(&key, DpopAlgorithm::ES256, "another-key"),
            "the published token is bound to another key"
        );
    }

    #[test]
    fn admission_offers_exactly_the_four_algorithms() {
        let crd = serde_json::to_value(<AudienceToken as kube::CustomResourceExt>::crd()).unwrap();
        let algorithm = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]
            ["properties"]["dpop"]["properties"]["algorithm"];
        assert_eq!(
            algorithm["enum"],
            serde_json::json!(["ES256", "ES384", "PS256", "RS256"]),
            "none and HMAC are refused at admission: {algorithm}"
        );
        for name in ["ES256", "ES384", "PS256", "RS256"] {
            let api: DpopAlgorithmName = serde_json::from_value(serde_json::json!(name)).unwrap();
            assert_eq!(super::algorithm(api).as_str(), name);
        }
    }
}
