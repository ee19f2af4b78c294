//! The `dpop-proof` command: a DPoP proof (RFC 9449 §4) for one API call, made from a
//! mounted token Secret (`token` and `dpop-private-key`), so a shell workload can call its
//! API with `curl -H "Authorization: DPoP $(cat token)" -H "DPoP: $(audience-token-operator
//! dpop-proof …)"`, and teams can test their own proof code against it.

use std::path::Path;

use crate::oauth::dpop::DpopKey;
use crate::secret::keys;

/// Why no proof could be made. Never holds the key or the token.
#[derive(Debug, thiserror::Error)]
pub enum DpopProofError {
    /// A file of the Secret could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The key or the request cannot be used.
    #[error("{0}")]
    Invalid(String),
}

fn read(dir: &Path, key: &str) -> Result<String, DpopProofError> {
    let path = dir.join(key);
    std::fs::read_to_string(&path).map_err(|source| DpopProofError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// A proof for `method` `url` (and `nonce`, when the API asked for one) from the key in
/// `secret_dir`, with `ath` the hash of the token there.
pub fn proof_from_secret_dir(
    secret_dir: &Path,
    method: &str,
    url: &str,
    nonce: Option<&str>,
) -> Result<String, DpopProofError> {
    let jwk = read(secret_dir, keys::DPOP_PRIVATE_KEY)?;
    let token = read(secret_dir, keys::TOKEN)?;
    let key = DpopKey::from_private_jwk(jwk.trim()).map_err(|e| {
        DpopProofError::Invalid(format!(
            "{} is not a DPoP key: {e}",
            secret_dir.join(keys::DPOP_PRIVATE_KEY).display()
        ))
    })?;
    let method = method.to_ascii_uppercase();
    key.proof(&method, url, nonce, Some(token.trim()))
        .map_err(|e| DpopProofError::Invalid(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::oauth::dpop::{DpopAlgorithm, access_token_hash};
    use base64::Engine;

    fn claims(proof: &str) -> serde_json::Value {
        let payload = proof.split('.').nth(1).unwrap();
        let json = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap();
        serde_json::from_slice(&json).unwrap()
    }

    #[test]
    fn a_proof_for_the_call_from_the_mounted_secret() {
        let dir = std::env::temp_dir().join(format!("ato-dpop-proof-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let key = DpopKey::generate(DpopAlgorithm::ES256).unwrap();
        std::fs::write(dir.join(keys::DPOP_PRIVATE_KEY), key.private_jwk().expose()).unwrap();
        std::fs::write(dir.join(keys::TOKEN), "the.access.token").unwrap();
        let proof =
            proof_from_secret_dir(&dir, "get", "https://api.example.com/v1/x?q=1", Some("n1"))
                .unwrap();
        let c = claims(&proof);
        assert_eq!(c["htm"], "GET");
        assert_eq!(c["htu"], "https://api.example.com/v1/x");
        assert_eq!(c["nonce"], "n1");
        assert_eq!(c["ath"], access_token_hash("the.access.token"));

        std::fs::write(dir.join(keys::DPOP_PRIVATE_KEY), "not a key").unwrap();
        let err = proof_from_secret_dir(&dir, "GET", "https://api.example.com/", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("is not a DPoP key"), "{err}");
        assert!(!err.contains("not a key\""), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        let err = proof_from_secret_dir(&dir, "GET", "https://api.example.com/", None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot read"), "{err}");
    }
}
