//! DPoP (RFC 9449): a key pair that a token is bound to, and the proofs that show
//! possession of it. Proofs are signed with the same code as client assertions
//! ([`ClientKey`]); keys are generated with aws-lc-rs.
//!
//! A [`DpopKey`] is stored as a private JWK with `alg` (RFC 7517), is identified by its
//! RFC 7638 SHA-256 thumbprint (`jkt`, which a bound token carries as `cnf.jkt`), and makes
//! proofs with [`DpopKey::proof`].

use std::fmt;

use aws_lc_rs::digest::{SHA256, digest};
use aws_lc_rs::encoding::{AsBigEndian, AsDer, EcPrivateKeyBin, Pkcs8V1Der};
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair, KeyPair,
    RsaKeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jiff::Timestamp;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::assertion::{ClientKey, SigningAlg, der, new_jti};
use crate::redact::SecretString;

/// The JOSE `typ` of a DPoP proof (RFC 9449 §4.2).
pub const PROOF_TYPE: &str = "dpop+jwt";

/// The algorithms a DPoP key may use. Only asymmetric ones exist here, so `none` and HMAC
/// cannot be chosen.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DpopAlgorithm {
    /// ECDSA P-256 with SHA-256 (the default).
    #[default]
    ES256,
    /// ECDSA P-384 with SHA-384.
    ES384,
    /// RSASSA-PSS with SHA-256, RSA 2048.
    PS256,
    /// RSASSA-PKCS1-v1_5 with SHA-256, RSA 2048.
    RS256,
}

impl DpopAlgorithm {
    /// The JOSE name, e.g. `ES256`.
    pub fn as_str(self) -> &'static str {
        self.signing().as_str()
    }

    /// Parses a JOSE name. `none`, HMAC (`HS*`) and everything else but the four
    /// algorithms are refused with a message saying so.
    pub fn from_name(name: &str) -> Result<Self, DpopError> {
        match name {
            "ES256" => Ok(DpopAlgorithm::ES256),
            "ES384" => Ok(DpopAlgorithm::ES384),
            "PS256" => Ok(DpopAlgorithm::PS256),
            "RS256" => Ok(DpopAlgorithm::RS256),
            "none" => Err(dpop_error(
                "DPoP algorithm \"none\" is refused: a proof must be signed (use ES256, ES384, PS256 or RS256)",
            )),
            hmac if hmac.starts_with("HS") => Err(dpop_error(format!(
                "DPoP algorithm {hmac:?} is refused: a proof needs an asymmetric key (use ES256, ES384, PS256 or RS256)"
            ))),
            other => Err(dpop_error(format!(
                "DPoP algorithm {other:?} is not supported (ES256, ES384, PS256, RS256)"
            ))),
        }
    }

    fn signing(self) -> SigningAlg {
        match self {
            DpopAlgorithm::ES256 => SigningAlg::ES256,
            DpopAlgorithm::ES384 => SigningAlg::ES384,
            DpopAlgorithm::PS256 => SigningAlg::PS256,
            DpopAlgorithm::RS256 => SigningAlg::RS256,
        }
    }
}

impl fmt::Display for DpopAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a DPoP key cannot be made, read or used. Never contains key material.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct DpopError(String);

fn dpop_error(message: impl Into<String>) -> DpopError {
    DpopError(message.into())
}

/// A DPoP private key and its algorithm. `Debug` shows the algorithm and thumbprint,
/// never the key.
#[derive(Clone)]
pub struct DpopKey {
    algorithm: DpopAlgorithm,
    signer: ClientKey,
    private_jwk: SecretString,
    public_jwk: Map<String, Value>,
    jkt: String,
}

impl fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DpopKey")
            .field("algorithm", &self.algorithm)
            .field("jkt", &self.jkt)
            .field("key", &"[redacted]")
            .finish()
    }
}

/// The claims of a DPoP proof (RFC 9449 §4.2).
#[derive(Serialize)]
struct ProofClaims<'a> {
    jti: &'a str,
    htm: &'a str,
    htu: &'a str,
    iat: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    nonce: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ath: Option<String>,
}

/// Public members of an EC JWK, in RFC 7638 order; then its private one.
const EC_PUBLIC: [&str; 4] = ["crv", "kty", "x", "y"];
const EC_PRIVATE: [&str; 1] = ["d"];
/// Public members of an RSA JWK, in RFC 7638 order; then its private ones.
const RSA_PUBLIC: [&str; 3] = ["e", "kty", "n"];
const RSA_PRIVATE: [&str; 6] = ["d", "p", "q", "dp", "dq", "qi"];

impl DpopKey {
    /// A new key pair for `algorithm`: P-256 for ES256, P-384 for ES384, RSA 2048 for
    /// PS256 and RS256.
    pub fn generate(algorithm: DpopAlgorithm) -> Result<DpopKey, DpopError> {
        let failed = || dpop_error(format!("cannot generate a {algorithm} DPoP key"));
        let mut jwk = Map::new();
        match algorithm {
            DpopAlgorithm::ES256 | DpopAlgorithm::ES384 => {
                let (curve, crv) = if algorithm == DpopAlgorithm::ES256 {
                    (&ECDSA_P256_SHA256_FIXED_SIGNING, "P-256")
                } else {
                    (&ECDSA_P384_SHA384_FIXED_SIGNING, "P-384")
                };
                let pair = EcdsaKeyPair::generate(curve).map_err(|_| failed())?;
                let d = AsBigEndian::<EcPrivateKeyBin>::as_be_bytes(&pair.private_key())
                    .map_err(|_| failed())?;
                let point = pair.public_key().as_ref();
                let size = point.len().saturating_sub(1) / 2;
                let (x, y) = point.get(1..).ok_or_else(failed)?.split_at(size);
                jwk.insert("kty".into(), "EC".into());
                jwk.insert("crv".into(), crv.into());
                jwk.insert("x".into(), b64(x).into());
                jwk.insert("y".into(), b64(y).into());
                jwk.insert("d".into(), b64(d.as_ref()).into());
            }
            DpopAlgorithm::PS256 | DpopAlgorithm::RS256 => {
                let pair = RsaKeyPair::generate(KeySize::Rsa2048).map_err(|_| failed())?;
                let pkcs8 = AsDer::<Pkcs8V1Der>::as_der(&pair).map_err(|_| failed())?;
                let values = rsa_integers(pkcs8.as_ref()).ok_or_else(failed)?;
                jwk.insert("kty".into(), "RSA".into());
                // RSAPrivateKey: version, n, e, d, p, q, dp, dq, qi.
                for (name, value) in ["n", "e", "d", "p", "q", "dp", "dq", "qi"]
                    .into_iter()
                    .zip(values.iter().skip(1))
                {
                    jwk.insert(name.into(), b64(value).into());
                }
            }
        }
        jwk.insert("alg".into(), algorithm.as_str().into());
        let text = SecretString::new(Value::Object(jwk).to_string());
        DpopKey::from_private_jwk(text.expose())
    }

    /// Reads a key from its private JWK (as [`DpopKey::private_jwk`] writes it): `kty`, the
    /// key parameters and `alg`, which is required and must be one of [`DpopAlgorithm`]'s.
    pub fn from_private_jwk(text: &str) -> Result<DpopKey, DpopError> {
        // serde_json errors quote input; only their position is reported.
        let value: Value = serde_json::from_str(text.trim()).map_err(|e| {
            dpop_error(format!(
                "the DPoP key is not a JSON JWK (line {}, column {})",
                e.line(),
                e.column()
            ))
        })?;
        let Value::Object(jwk) = value else {
            return Err(dpop_error("the DPoP key is not a JSON object (a JWK)"));
        };
        let algorithm = match jwk.get("alg") {
            Some(Value::String(alg)) => DpopAlgorithm::from_name(alg)?,
            Some(_) => return Err(dpop_error("the DPoP key's alg is not a string")),
            None => return Err(dpop_error("the DPoP key's JWK has no alg")),
        };
        let (public, private, size): (&[&str], &[&str], Option<usize>) = match algorithm {
            DpopAlgorithm::ES256 => (&EC_PUBLIC, &EC_PRIVATE, Some(32)),
            DpopAlgorithm::ES384 => (&EC_PUBLIC, &EC_PRIVATE, Some(48)),
            DpopAlgorithm::PS256 | DpopAlgorithm::RS256 => (&RSA_PUBLIC, &RSA_PRIVATE, None),
        };
        // The key itself (kty, curve, consistency, RSA size) is checked by the signer.
        let signer = ClientKey::parse(text, Some(algorithm.signing()), None)
            .map_err(|e| dpop_error(format!("the DPoP key cannot be used: {e}")))?;
        let mut public_jwk = Map::new();
        for name in public {
            let value = string_member(&jwk, name)?;
            let value = match (*name, size) {
                ("kty" | "crv", _) => value.to_string(),
                ("x" | "y", Some(size)) => canonical(value, name, Some(size))?,
                _ => canonical(value, name, None)?,
            };
            public_jwk.insert((*name).into(), value.into());
        }
        let mut private_jwk = public_jwk.clone();
        for name in private {
            private_jwk.insert((*name).into(), string_member(&jwk, name)?.into());
        }
        private_jwk.insert("alg".into(), algorithm.as_str().into());
        let jkt = jwk_thumbprint(&public_jwk)?;
        Ok(DpopKey {
            algorithm,
            signer,
            private_jwk: SecretString::new(Value::Object(private_jwk).to_string()),
            public_jwk,
            jkt,
        })
    }

    /// The algorithm proofs are signed with.
    pub fn algorithm(&self) -> DpopAlgorithm {
        self.algorithm
    }

    /// The private key as a JWK with `kty`, the key parameters and `alg` (JSON text).
    pub fn private_jwk(&self) -> &SecretString {
        &self.private_jwk
    }

    /// The public key as a JWK: only the members RFC 7638 requires for its `kty`.
    pub fn public_jwk(&self) -> &Map<String, Value> {
        &self.public_jwk
    }

    /// The RFC 7638 SHA-256 thumbprint of the public key, base64url without padding: the
    /// `jkt` a token bound to this key carries as `cnf.jkt`.
    pub fn thumbprint(&self) -> &str {
        &self.jkt
    }

    /// A DPoP proof for one HTTP request, `iat` now and a new random `jti`: header `typ:
    /// dpop+jwt`, `alg`, `jwk`; claims `jti`, `htm` = `method`, `htu` = `url` without query
    /// and fragment, `iat`, `nonce` when given, and `ath` (the base64url SHA-256 of
    /// `access_token`) when given.
    pub fn proof(
        &self,
        method: &str,
        url: &str,
        nonce: Option<&str>,
        access_token: Option<&str>,
    ) -> Result<String, DpopError> {
        self.proof_at(
            method,
            url,
            nonce,
            access_token,
            Timestamp::now(),
            &new_jti(),
        )
    }

    /// [`DpopKey::proof`] with `iat` and `jti` given.
    pub fn proof_at(
        &self,
        method: &str,
        url: &str,
        nonce: Option<&str>,
        access_token: Option<&str>,
        now: Timestamp,
        jti: &str,
    ) -> Result<String, DpopError> {
        if method.is_empty() || !method.bytes().all(|b| b.is_ascii_alphabetic()) {
            return Err(dpop_error(format!(
                "{method:?} is not an HTTP method for a DPoP proof"
            )));
        }
        let htu = htu(url)?;
        let mut header = Map::new();
        header.insert("typ".into(), PROOF_TYPE.into());
        header.insert("jwk".into(), Value::Object(self.public_jwk.clone()));
        let claims = ProofClaims {
            jti,
            htm: method,
            htu: &htu,
            iat: now.as_second(),
            nonce,
            ath: access_token.map(access_token_hash),
        };
        self.signer
            .sign_compact(header, &claims)
            .map_err(|e| dpop_error(format!("cannot sign the DPoP proof: {e}")))
    }
}

/// The `htu` of a request to `url`: the URL without query and fragment (RFC 9449 §4.2).
pub fn htu(url: &str) -> Result<String, DpopError> {
    let mut url = url::Url::parse(url)
        .map_err(|e| dpop_error(format!("the DPoP proof's URL is not a valid URL: {e}")))?;
    url.set_query(None);
    url.set_fragment(None);
    Ok(url.to_string())
}

/// `ath`: the base64url SHA-256 of an access token (RFC 9449 §4.2).
pub fn access_token_hash(access_token: &str) -> String {
    b64(digest(&SHA256, access_token.as_bytes()).as_ref())
}

/// The RFC 7638 SHA-256 thumbprint of a public (or private) EC or RSA JWK: the required
/// members only (`crv`, `kty`, `x`, `y` or `e`, `kty`, `n`), in that order, no whitespace;
/// base64url without padding.
pub fn jwk_thumbprint(jwk: &Map<String, Value>) -> Result<String, DpopError> {
    let members: &[&str] = match jwk.get("kty").and_then(Value::as_str) {
        Some("EC") => &EC_PUBLIC,
        Some("RSA") => &RSA_PUBLIC,
        Some(other) => {
            return Err(dpop_error(format!(
                "no thumbprint for a JWK of kty {other:?} (EC, RSA)"
            )));
        }
        None => return Err(dpop_error("the JWK has no kty")),
    };
    let mut canonical = String::from("{");
    for (i, name) in members.iter().enumerate() {
        let value = string_member(jwk, name)?;
        if i > 0 {
            canonical.push(',');
        }
        let quoted = serde_json::to_string(value)
            .map_err(|_| dpop_error(format!("the JWK's {name:?} cannot be serialised")))?;
        canonical.push_str(&format!("\"{name}\":{quoted}"));
    }
    canonical.push('}');
    Ok(b64(digest(&SHA256, canonical.as_bytes()).as_ref()))
}

fn string_member<'a>(jwk: &'a Map<String, Value>, name: &str) -> Result<&'a str, DpopError> {
    match jwk.get(name) {
        Some(Value::String(value)) => Ok(value),
        Some(_) => Err(dpop_error(format!("the JWK's {name:?} is not a string"))),
        None => Err(dpop_error(format!("the JWK has no {name:?}"))),
    }
}

/// A base64url member in its canonical form: unpadded; EC coordinates left-padded to the
/// curve size, RSA integers without leading zero bytes (RFC 7518 §6.2.1, §6.3.1).
fn canonical(value: &str, name: &str, size: Option<usize>) -> Result<String, DpopError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('=').as_bytes())
        .map_err(|_| dpop_error(format!("the JWK's {name:?} is not base64url")))?;
    let bytes = match size {
        Some(size) if bytes.len() <= size => {
            let mut padded = vec![0; size - bytes.len()];
            padded.extend(bytes);
            padded
        }
        Some(_) => return Err(dpop_error(format!("the JWK's {name:?} is too long"))),
        None => {
            let start = bytes
                .iter()
                .position(|b| *b != 0)
                .unwrap_or(bytes.len().saturating_sub(1));
            bytes[start..].to_vec()
        }
    };
    Ok(b64(&bytes))
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// The nine INTEGERs of the RSAPrivateKey inside a PKCS#8 `PrivateKeyInfo`, unsigned.
fn rsa_integers(pkcs8: &[u8]) -> Option<Vec<Vec<u8>>> {
    let (info, _) = der::expect(pkcs8, der::SEQUENCE)?;
    let (_, rest) = der::expect(info, der::INTEGER)?;
    let (_, rest) = der::expect(rest, der::SEQUENCE)?;
    let (pkcs1, _) = der::expect(rest, der::OCTET_STRING)?;
    let (mut fields, _) = der::expect(pkcs1, der::SEQUENCE)?;
    let mut values = Vec::with_capacity(9);
    for _ in 0..9 {
        let (value, rest) = der::expect(fields, der::INTEGER)?;
        let value = match value {
            [0, tail @ ..] if !tail.is_empty() => tail,
            other => other,
        };
        values.push(value.to_vec());
        fields = rest;
    }
    Some(values)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use jsonwebtoken::jwk::Jwk;
    use jsonwebtoken::{Algorithm, DecodingKey, Validation, decode, decode_header};

    use super::*;

    const ALL: [DpopAlgorithm; 4] = [
        DpopAlgorithm::ES256,
        DpopAlgorithm::ES384,
        DpopAlgorithm::PS256,
        DpopAlgorithm::RS256,
    ];

    fn jws(alg: DpopAlgorithm) -> Algorithm {
        match alg {
            DpopAlgorithm::ES256 => Algorithm::ES256,
            DpopAlgorithm::ES384 => Algorithm::ES384,
            DpopAlgorithm::PS256 => Algorithm::PS256,
            DpopAlgorithm::RS256 => Algorithm::RS256,
        }
    }

    /// Verifies a proof with the `jwk` in its own header; returns header JSON and claims.
    fn verify(proof: &str, alg: DpopAlgorithm) -> (Value, Value) {
        let header = decode_header(proof).unwrap();
        assert_eq!(header.alg, jws(alg));
        assert_eq!(header.typ.as_deref(), Some(PROOF_TYPE));
        let jwk: &Jwk = header.jwk.as_ref().expect("jwk in the header");
        let key = DecodingKey::from_jwk(jwk).unwrap();
        let mut validation = Validation::new(jws(alg));
        validation.validate_exp = false;
        validation.set_required_spec_claims::<&str>(&[]);
        let claims = decode::<Value>(proof, &key, &validation)
            .unwrap_or_else(|e| panic!("{alg} proof does not verify: {e}"))
            .claims;
        let raw_header = proof.split('.').next().unwrap();
        let raw_header: Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(raw_header).unwrap()).unwrap();
        (raw_header, claims)
    }

    #[test]
    fn rfc7638_example_thumbprint() {
        // RFC 7638 §3.1.
        let jwk = serde_json::json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        let Value::Object(jwk) = jwk else { panic!() };
        assert_eq!(
            jwk_thumbprint(&jwk).unwrap(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
    }

    #[test]
    fn ec_thumbprint_uses_crv_kty_x_y_in_order() {
        // RFC 7517 appendix A.1's EC key; extra members must not change the thumbprint.
        let x = "MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4";
        let y = "4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM";
        let jwk = serde_json::json!({"y": y, "use": "enc", "x": x, "kid": "1", "kty": "EC", "crv": "P-256"});
        let Value::Object(jwk) = jwk else { panic!() };
        let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
        let expected = b64(digest(&SHA256, canonical.as_bytes()).as_ref());
        assert_eq!(jwk_thumbprint(&jwk).unwrap(), expected);
        // Computed independently with jose's calculateJwkThumbprint.
        assert_eq!(expected, "cn-I_WNMClehiVp51i_0VpOENW1upEerA8sEam5hn-s");
    }

    #[test]
    fn every_algorithm_generates_exports_and_imports() {
        for alg in ALL {
            let key = DpopKey::generate(alg).unwrap();
            assert_eq!(key.algorithm(), alg);
            let private: Value = serde_json::from_str(key.private_jwk().expose()).unwrap();
            assert_eq!(private["alg"], alg.as_str());
            assert!(private["d"].is_string(), "{alg}");
            let public = key.public_jwk();
            assert!(!public.contains_key("d"), "{alg}");
            let expected_kty = if alg.as_str().starts_with("ES") {
                "EC"
            } else {
                "RSA"
            };
            assert_eq!(public["kty"], expected_kty);
            assert_eq!(key.thumbprint(), jwk_thumbprint(public).unwrap());
            assert_eq!(key.thumbprint().len(), 43);
            let again = DpopKey::from_private_jwk(key.private_jwk().expose()).unwrap();
            assert_eq!(again.thumbprint(), key.thumbprint(), "{alg}");
            assert_eq!(again.private_jwk(), key.private_jwk(), "{alg}");
            // A proof of the imported key verifies with the original's public key.
            let (header, _) = verify(
                &again
                    .proof("POST", "https://idp.example/token", None, None)
                    .unwrap(),
                alg,
            );
            assert_eq!(header["jwk"], Value::Object(public.clone()));
        }
    }

    #[test]
    fn proofs_carry_exactly_the_rfc9449_claims() {
        for alg in ALL {
            let key = DpopKey::generate(alg).unwrap();
            let now = Timestamp::from_second(1_700_000_000).unwrap();
            let proof = key
                .proof_at(
                    "GET",
                    "https://api.example/orders/1?expand=all#top",
                    Some("n-1"),
                    Some("access-token-value"),
                    now,
                    "jti-1",
                )
                .unwrap();
            let (header, claims) = verify(&proof, alg);
            let mut names: Vec<&String> = header.as_object().unwrap().keys().collect();
            names.sort();
            assert_eq!(names, ["alg", "jwk", "typ"], "{alg}");
            assert_eq!(
                claims,
                serde_json::json!({
                    "jti": "jti-1", "htm": "GET", "htu": "https://api.example/orders/1",
                    "iat": 1_700_000_000, "nonce": "n-1",
                    "ath": access_token_hash("access-token-value"),
                })
            );
        }
    }

    #[test]
    fn ath_is_the_base64url_sha256_of_the_token() {
        // SHA-256("abc"), RFC 6234 / FIPS 180-2 test vector, as base64url.
        assert_eq!(
            access_token_hash("abc"),
            "ungWv48Bz-pBQUDeXa4iI7ADYaOWF3qctBD_YfIAFa0"
        );
    }

    #[test]
    fn proofs_without_nonce_and_token_omit_them_and_are_unique() {
        let key = DpopKey::generate(DpopAlgorithm::default()).unwrap();
        assert_eq!(key.algorithm(), DpopAlgorithm::ES256);
        let mut jtis = HashSet::new();
        for _ in 0..20 {
            let proof = key
                .proof("POST", "https://idp.example/token", None, None)
                .unwrap();
            let (_, claims) = verify(&proof, DpopAlgorithm::ES256);
            assert!(claims.get("nonce").is_none() && claims.get("ath").is_none());
            let now = Timestamp::now().as_second();
            let iat = claims["iat"].as_i64().unwrap();
            assert!((now - 5..=now).contains(&iat));
            jtis.insert(claims["jti"].as_str().unwrap().to_string());
        }
        assert_eq!(jtis.len(), 20);
        assert!(key.proof("", "https://x.example/", None, None).is_err());
        assert!(key.proof("GET", "not a url", None, None).is_err());
    }

    #[test]
    fn none_hmac_and_mismatched_keys_are_refused() {
        for name in ["none", "HS256", "HS512", "EdDSA", "es256"] {
            let err = DpopAlgorithm::from_name(name).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
        }
        let ec = DpopKey::generate(DpopAlgorithm::ES256).unwrap();
        let mut jwk: Value = serde_json::from_str(ec.private_jwk().expose()).unwrap();
        for (alg, expected) in [
            ("HS256", "refused"),
            ("none", "refused"),
            ("ES384", "cannot be used"),
            ("RS256", "cannot be used"),
        ] {
            jwk["alg"] = alg.into();
            let err = DpopKey::from_private_jwk(&jwk.to_string()).unwrap_err();
            assert!(err.to_string().contains(expected), "{alg}: {err}");
        }
        jwk.as_object_mut().unwrap().remove("alg");
        let err = DpopKey::from_private_jwk(&jwk.to_string()).unwrap_err();
        assert!(err.to_string().contains("no alg"), "{err}");
    }

    #[test]
    fn debug_and_errors_never_show_the_private_key() {
        let key = DpopKey::generate(DpopAlgorithm::ES256).unwrap();
        let jwk: Value = serde_json::from_str(key.private_jwk().expose()).unwrap();
        let d = jwk["d"].as_str().unwrap().to_string();
        let printed = format!("{key:?} {:?}", key.private_jwk());
        assert!(!printed.contains(&d), "{printed}");
        assert!(printed.contains("[redacted]") && printed.contains(key.thumbprint()));
        let truncated = &key.private_jwk().expose()[..60];
        let err = DpopKey::from_private_jwk(truncated)
            .unwrap_err()
            .to_string();
        assert!(!err.contains(&d[..10]), "{err}");
    }
}
