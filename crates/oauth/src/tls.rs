//! Mutual TLS (RFC 8705): the client certificate the operator presents to an authorization
//! server, and its `x5t#S256` thumbprint, which certificate-bound tokens carry in
//! `cnf` (§3.1).

use std::fmt;

use aws_lc_rs::digest::{SHA256, digest};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};

use crate::redact::SecretString;

/// A client certificate with its private key, ready for TLS connections. `Debug` shows the
/// thumbprint only; the key is never printed.
#[derive(Clone)]
pub struct ClientCertificate {
    identity: reqwest::Identity,
    thumbprint: String,
}

impl ClientCertificate {
    /// Reads a certificate chain (PEM, leaf first, as cert-manager writes `tls.crt`) and its
    /// private key (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC, as in `tls.key`). Errors describe
    /// the input, never the key.
    pub fn from_pem(chain_pem: &str, key_pem: &SecretString) -> Result<Self, String> {
        let thumbprint = certificate_thumbprint(chain_pem)?;
        if !key_pem.expose().contains("PRIVATE KEY-----") {
            return Err("the private key is not a PEM private key".into());
        }
        if pem_blocks(key_pem.expose(), "CERTIFICATE").next().is_some() {
            return Err("the private key holds a certificate; swap the two?".into());
        }
        let mut combined = String::with_capacity(chain_pem.len() + key_pem.expose().len() + 1);
        combined.push_str(chain_pem);
        combined.push('\n');
        combined.push_str(key_pem.expose());
        let unusable = |e: reqwest::Error| {
            format!(
                "the certificate and key are not a usable TLS identity ({})",
                crate::error_chain(&e)
            )
        };
        let identity = reqwest::Identity::from_pem(combined.as_bytes()).map_err(unusable)?;
        // The key is only parsed when a client is built: do it now, so that a bad key is
        // reported where it is read, not at the first connection.
        reqwest::Client::builder()
            .identity(identity.clone())
            .build()
            .map_err(unusable)?;
        Ok(Self {
            identity,
            thumbprint,
        })
    }

    /// The leaf certificate's `x5t#S256`: base64url of the SHA-256 of its DER (RFC 8705
    /// §3.1).
    pub fn thumbprint(&self) -> &str {
        &self.thumbprint
    }

    pub(crate) fn identity(&self) -> reqwest::Identity {
        self.identity.clone()
    }
}

impl fmt::Debug for ClientCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCertificate")
            .field("x5t#S256", &self.thumbprint)
            .finish_non_exhaustive()
    }
}

/// The `x5t#S256` of the first certificate in a PEM chain.
pub fn certificate_thumbprint(chain_pem: &str) -> Result<String, String> {
    let leaf = pem_blocks(chain_pem, "CERTIFICATE")
        .next()
        .ok_or("no PEM CERTIFICATE block")??;
    Ok(URL_SAFE_NO_PAD.encode(digest(&SHA256, &leaf)))
}

/// The decoded contents of every `-----BEGIN <label>-----` block.
fn pem_blocks<'a>(
    pem: &'a str,
    label: &'a str,
) -> impl Iterator<Item = Result<Vec<u8>, String>> + 'a {
    let begin = format!("-----BEGIN {label}-----");
    let end = format!("-----END {label}-----");
    let mut rest = pem;
    std::iter::from_fn(move || {
        let start = rest.find(&begin)? + begin.len();
        let Some(length) = rest[start..].find(&end) else {
            rest = "";
            return Some(Err(format!("a {label} block has no END line")));
        };
        let body: String = rest[start..start + length]
            .chars()
            .filter(|c| !c.is_ascii_whitespace())
            .collect();
        rest = &rest[start + length + end.len()..];
        Some(
            STANDARD
                .decode(body)
                .map_err(|e| format!("a {label} block is not base64 ({e})")),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::assertion::test_keys::pem;

    #[test]
    fn the_thumbprint_is_of_the_leaf_certificate() {
        let leaf = vec![7u8; 300];
        let intermediate = vec![9u8; 200];
        let chain = format!(
            "{}{}",
            pem("CERTIFICATE", &leaf),
            pem("CERTIFICATE", &intermediate)
        );
        assert_eq!(
            certificate_thumbprint(&chain).unwrap(),
            URL_SAFE_NO_PAD.encode(digest(&SHA256, &leaf))
        );
        assert!(certificate_thumbprint("").is_err());
        assert!(certificate_thumbprint(&pem("PRIVATE KEY", &leaf)).is_err());
        assert!(
            certificate_thumbprint("-----BEGIN CERTIFICATE-----\n!!!\n-----END CERTIFICATE-----")
                .is_err()
        );
        assert!(certificate_thumbprint("-----BEGIN CERTIFICATE-----\nAAAA").is_err());
    }

    #[test]
    fn a_certificate_without_a_usable_key_is_refused_without_showing_the_key() {
        let chain = pem("CERTIFICATE", &[7u8; 300]);
        let not_pem = SecretString::new("s3cr3t-not-a-key");
        let err = ClientCertificate::from_pem(&chain, &not_pem).unwrap_err();
        assert!(!err.contains("s3cr3t"), "{err}");
        let swapped = SecretString::new(chain.clone());
        assert!(ClientCertificate::from_pem(&chain, &swapped).is_err());
        let garbage = SecretString::new(pem("PRIVATE KEY", b"s3cr3t-bytes"));
        let err = ClientCertificate::from_pem(&chain, &garbage).unwrap_err();
        assert!(err.contains("not a usable TLS identity"), "{err}");
    }
}
