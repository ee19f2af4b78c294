//! Verifying JWT access tokens against the issuer's published signing keys (a JWKS,
//! RFC 7517) with `jsonwebtoken`. Pure, no I/O: [`TokenClient::fetch_jwks`] fetches the
//! set, the controller caches it.
//!
//! Only asymmetric algorithms are accepted ([`ALLOWED_ALGORITHMS`]): never `none`, never
//! HMAC (a shared secret is not something an authorization server publishes, and accepting
//! it invites key-confusion attacks). The audience is not checked here: [`super::issue`]
//! already requires it to be exactly the expected one.
//!
//! [`TokenClient::fetch_jwks`]: super::TokenClient::fetch_jwks

use std::collections::HashSet;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
pub use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::jwk::{
    AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm, KeyOperations, PublicKeyUse,
};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

use super::TokenError;

/// The signature algorithms a verified access token may use.
pub const ALLOWED_ALGORITHMS: [Algorithm; 9] = [
    Algorithm::RS256,
    Algorithm::RS384,
    Algorithm::RS512,
    Algorithm::PS256,
    Algorithm::PS384,
    Algorithm::PS512,
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
];

/// Clock skew tolerated on `exp` and `nbf`, in seconds.
pub const LEEWAY_SECONDS: u64 = 30;

/// Longest `kid` quoted in an error message (it comes from the token, so it is bounded).
const MAX_KID_SHOWN: usize = 64;

/// Reads a JWKS document. Keys that cannot be read (an unknown key type, a curve
/// jsonwebtoken does not know) are skipped rather than failing the whole set: servers publish
/// encryption keys and newer key types beside the signing keys.
pub fn parse_jwks(body: &[u8]) -> Result<JwkSet, String> {
    #[derive(Deserialize)]
    struct RawSet {
        keys: Vec<serde_json::Value>,
    }
    let raw: RawSet = serde_json::from_slice(body)
        .map_err(|e| format!("not a JWKS document (a JSON object with `keys`): {e}"))?;
    Ok(JwkSet {
        keys: raw
            .keys
            .into_iter()
            .filter_map(|key| serde_json::from_value::<Jwk>(key).ok())
            .collect(),
    })
}

/// The parts of the JOSE header looked at, read without trusting them.
#[derive(Deserialize)]
struct Header {
    alg: Option<String>,
    kid: Option<String>,
    crit: Option<serde_json::Value>,
}

fn invalid(message: impl Into<String>) -> TokenError {
    TokenError::SignatureInvalid(message.into())
}

fn read_header(token: &str) -> Result<Header, TokenError> {
    let segments: Vec<&str> = token.split('.').collect();
    if segments.len() != 3 {
        return Err(invalid(
            "the access token is not a signed JWT (JWS compact serialization)",
        ));
    }
    URL_SAFE_NO_PAD
        .decode(segments[0])
        .ok()
        .and_then(|bytes| serde_json::from_slice::<Header>(&bytes).ok())
        .ok_or_else(|| invalid("the access token's JOSE header is not base64url JSON"))
}

fn allowed_algorithm(alg: Option<&str>) -> Result<Algorithm, TokenError> {
    let Some(alg) = alg else {
        return Err(invalid("the access token's header has no alg"));
    };
    alg.parse::<Algorithm>()
        .ok()
        .filter(|parsed| ALLOWED_ALGORITHMS.contains(parsed))
        .ok_or_else(|| {
            invalid(format!(
                "alg {:?} is not allowed; only RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 and EdDSA are (never none or HMAC)",
                shorten(alg)
            ))
        })
}

fn shorten(text: &str) -> String {
    text.chars().take(MAX_KID_SHOWN).collect()
}

/// Why a key cannot be chosen.
enum KeyProblem {
    /// No key for the token: maybe the server rotated its keys since the set was fetched.
    Missing(String),
    /// A key is there but cannot be used, or the choice is ambiguous.
    Unusable(String),
}

impl KeyProblem {
    fn into_error(self) -> TokenError {
        match self {
            KeyProblem::Missing(m) | KeyProblem::Unusable(m) => invalid(m),
        }
    }
}

/// Whether `jwk` may verify a signature made with `alg`; the reason when not.
fn suitability(jwk: &Jwk, alg: Algorithm) -> Result<(), String> {
    match &jwk.common.public_key_use {
        None | Some(PublicKeyUse::Signature) => {}
        Some(other) => return Err(format!("its use is {other:?}, not sig")),
    }
    if let Some(ops) = &jwk.common.key_operations
        && !ops.contains(&KeyOperations::Verify)
    {
        return Err("its key_ops do not include verify".into());
    }
    if let Some(key_alg) = jwk.common.key_algorithm
        && key_alg != KeyAlgorithm::from(alg)
    {
        return Err(format!("it is for alg {key_alg}, not {alg:?}"));
    }
    let fits = match (&jwk.algorithm, alg) {
        (AlgorithmParameters::RSA(_), a) => matches!(
            a,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
        ),
        (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES256) => {
            ec.curve == EllipticCurve::P256
        }
        (AlgorithmParameters::EllipticCurve(ec), Algorithm::ES384) => {
            ec.curve == EllipticCurve::P384
        }
        (AlgorithmParameters::OctetKeyPair(okp), Algorithm::EdDSA) => {
            okp.curve == EllipticCurve::Ed25519
        }
        _ => false,
    };
    if fits {
        Ok(())
    } else {
        Err(format!("its key type does not fit alg {alg:?}"))
    }
}

/// Chooses the key: by `kid`; without a `kid`, the one key in the set that fits `alg`.
fn select_key<'a>(
    jwks: &'a JwkSet,
    kid: Option<&str>,
    alg: Algorithm,
) -> Result<&'a Jwk, KeyProblem> {
    match kid {
        Some(kid) => {
            let mut with_kid = jwks
                .keys
                .iter()
                .filter(|k| k.common.key_id.as_deref() == Some(kid))
                .peekable();
            if with_kid.peek().is_none() {
                return Err(KeyProblem::Missing(format!(
                    "the issuer's JWKS has no key with kid {:?}",
                    shorten(kid)
                )));
            }
            let mut reasons = Vec::new();
            for key in with_kid {
                match suitability(key, alg) {
                    Ok(()) => return Ok(key),
                    Err(reason) => reasons.push(reason),
                }
            }
            Err(KeyProblem::Unusable(format!(
                "the key with kid {:?} cannot verify this token: {}",
                shorten(kid),
                reasons.join("; ")
            )))
        }
        None => {
            let fitting: Vec<&Jwk> = jwks
                .keys
                .iter()
                .filter(|k| suitability(k, alg).is_ok())
                .collect();
            match fitting.as_slice() {
                [one] => Ok(one),
                [] => Err(KeyProblem::Missing(format!(
                    "the token has no kid and the issuer's JWKS has no key for alg {alg:?}"
                ))),
                many => Err(KeyProblem::Unusable(format!(
                    "the token has no kid and the issuer's JWKS has {} keys for alg {alg:?}; cannot choose",
                    many.len()
                ))),
            }
        }
    }
}

/// Whether the token names a key the set lacks (by `kid`, or, without one, no key of its
/// algorithm): the sign of a key rotation, after which the set is worth fetching again.
/// `false` for anything else, including tokens that are not JWTs.
pub fn key_missing(token: &str, jwks: &JwkSet) -> bool {
    let Ok(header) = read_header(token) else {
        return false;
    };
    let Ok(alg) = allowed_algorithm(header.alg.as_deref()) else {
        return false;
    };
    matches!(
        select_key(jwks, header.kid.as_deref(), alg),
        Err(KeyProblem::Missing(_))
    )
}

/// Verifies a JWS access token against `jwks`: the key by `kid` (or the only key fitting
/// the algorithm when the token has none), an allowed asymmetric `alg` that fits the key,
/// the signature, `exp` and `nbf` when present (with [`LEEWAY_SECONDS`] of skew), and `iss`
/// when `expected_issuer` is given (a trailing `/` difference is tolerated, as in discovery).
/// `aud` is not checked here.
pub fn verify_signature(
    token: &str,
    jwks: &JwkSet,
    expected_issuer: Option<&str>,
) -> Result<(), TokenError> {
    let header = read_header(token)?;
    let alg = allowed_algorithm(header.alg.as_deref())?;
    if header.crit.is_some() {
        return Err(invalid(
            "the token's header lists critical extensions (crit), which are not supported",
        ));
    }
    let jwk = select_key(jwks, header.kid.as_deref(), alg).map_err(KeyProblem::into_error)?;
    let key_name = match &header.kid {
        Some(kid) => format!("key {:?}", shorten(kid)),
        None => "the issuer's key".to_string(),
    };
    let key = DecodingKey::from_jwk(jwk).map_err(|e| {
        invalid(format!(
            "{key_name} in the issuer's JWKS is not usable: {e}"
        ))
    })?;
    let mut validation = Validation::new(alg);
    validation.validate_aud = false;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    validation.leeway = LEEWAY_SECONDS;
    // `exp` is optional here: without it the lifetime comes from `expires_in`.
    validation.required_spec_claims = HashSet::new();
    let data =
        jsonwebtoken::decode::<serde_json::Value>(token, &key, &validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind;
            invalid(match e.kind() {
                ErrorKind::InvalidSignature => {
                    format!("the signature does not verify with {key_name}")
                }
                ErrorKind::ExpiredSignature => "the token is expired (exp)".to_string(),
                ErrorKind::ImmatureSignature => "the token is not valid yet (nbf)".to_string(),
                ErrorKind::InvalidClaimFormat(claim) => format!("the {claim} claim is malformed"),
                ErrorKind::InvalidEcdsaKey
                | ErrorKind::InvalidEddsaKey
                | ErrorKind::InvalidRsaKey(_)
                | ErrorKind::InvalidKeyFormat => {
                    format!("{key_name} in the issuer's JWKS is not usable: {e}")
                }
                _ => format!("the token does not verify: {e}"),
            })
        })?;
    if let Some(expected) = expected_issuer {
        match data.claims.get("iss") {
            Some(serde_json::Value::String(iss))
                if iss.trim_end_matches('/') == expected.trim_end_matches('/') => {}
            Some(serde_json::Value::String(iss)) => {
                return Err(invalid(format!(
                    "the token's iss {:?} is not the issuer {expected:?}",
                    shorten(iss)
                )));
            }
            Some(_) => return Err(invalid("the token's iss is not a string")),
            None => {
                return Err(invalid(format!(
                    "the token has no iss; expected {expected:?}"
                )));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    use jsonwebtoken::{EncodingKey, Header as JwsHeader, encode};
    use serde_json::json;

    const ISSUER: &str = "https://idp.example.com";

    use crate::assertion::test_keys::pem;

    /// A signing key generated at run time, and its public JWK.
    struct TestKey {
        alg: Algorithm,
        kid: String,
        encoding: EncodingKey,
        jwk: Jwk,
    }

    impl TestKey {
        fn rsa(kid: &str) -> Self {
            let pair = aws_lc_rs::rsa::KeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)
                .expect("RSA key");
            let der = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).unwrap();
            let encoding =
                EncodingKey::from_rsa_pem(pem("PRIVATE KEY", der.as_ref()).as_bytes()).unwrap();
            Self::new(Algorithm::RS256, kid, encoding)
        }

        fn ec(kid: &str) -> Self {
            let pkcs8 = EcdsaKeyPair::generate_pkcs8(
                &ECDSA_P256_SHA256_FIXED_SIGNING,
                &SystemRandom::new(),
            )
            .expect("EC key");
            let encoding =
                EncodingKey::from_ec_pem(pem("PRIVATE KEY", pkcs8.as_ref()).as_bytes()).unwrap();
            Self::new(Algorithm::ES256, kid, encoding)
        }

        fn new(alg: Algorithm, kid: &str, encoding: EncodingKey) -> Self {
            let mut jwk = Jwk::from_encoding_key(&encoding, alg).unwrap();
            jwk.common.key_id = Some(kid.to_string());
            jwk.common.public_key_use = Some(PublicKeyUse::Signature);
            Self {
                alg,
                kid: kid.to_string(),
                encoding,
                jwk,
            }
        }

        fn sign(&self, claims: &serde_json::Value) -> String {
            let mut header = JwsHeader::new(self.alg);
            header.kid = Some(self.kid.clone());
            header.typ = Some("at+jwt".into());
            encode(&header, claims, &self.encoding).unwrap()
        }

        fn sign_without_kid(&self, claims: &serde_json::Value) -> String {
            encode(&JwsHeader::new(self.alg), claims, &self.encoding).unwrap()
        }
    }

    fn set(keys: &[&TestKey]) -> JwkSet {
        JwkSet {
            keys: keys.iter().map(|k| k.jwk.clone()).collect(),
        }
    }

    fn claims() -> serde_json::Value {
        let now = jiff::Timestamp::now().as_second();
        json!({"iss": ISSUER, "aud": "urn:a", "sub": "m2m", "iat": now, "exp": now + 300})
    }

    fn message(result: Result<(), TokenError>) -> String {
        match result {
            Err(TokenError::SignatureInvalid(m)) => m,
            other => panic!("expected SignatureInvalid, got {other:?}"),
        }
    }

    /// A token with any header, signed or not, for the refusal cases.
    fn forged(header: serde_json::Value, claims: &serde_json::Value, signature: &[u8]) -> String {
        format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string()),
            URL_SAFE_NO_PAD.encode(signature)
        )
    }

    #[test]
    fn valid_rs256_and_es256_signatures_pass() {
        let rsa = TestKey::rsa("rsa-1");
        let ec = TestKey::ec("ec-1");
        let jwks = set(&[&rsa, &ec]);
        for key in [&rsa, &ec] {
            let token = key.sign(&claims());
            verify_signature(&token, &jwks, Some(ISSUER)).unwrap();
            verify_signature(&token, &jwks, Some("https://idp.example.com/")).unwrap();
            verify_signature(&token, &jwks, None).unwrap();
            assert!(!key_missing(&token, &jwks));
        }
    }

    #[test]
    fn a_token_without_kid_uses_the_only_fitting_key() {
        let rsa = TestKey::rsa("rsa-1");
        let ec = TestKey::ec("ec-1");
        let token = ec.sign_without_kid(&claims());
        verify_signature(&token, &set(&[&rsa, &ec]), Some(ISSUER)).unwrap();
        let ec2 = TestKey::ec("ec-2");
        let m = message(verify_signature(&token, &set(&[&ec, &ec2]), None));
        assert!(m.contains("cannot choose"), "{m}");
        let m = message(verify_signature(&token, &set(&[&rsa]), None));
        assert!(m.contains("no key for alg ES256"), "{m}");
        assert!(key_missing(&token, &set(&[&rsa])));
    }

    #[test]
    fn a_signature_by_another_key_fails() {
        let signer = TestKey::rsa("k1");
        let published = TestKey::rsa("k1");
        let token = signer.sign(&claims());
        let m = message(verify_signature(&token, &set(&[&published]), Some(ISSUER)));
        assert!(m.contains("does not verify with key \"k1\""), "{m}");
        assert!(!key_missing(&token, &set(&[&published])));
        let ec_signer = TestKey::ec("e1");
        let ec_published = TestKey::ec("e1");
        let token = ec_signer.sign(&claims());
        message(verify_signature(&token, &set(&[&ec_published]), None));
    }

    #[test]
    fn an_unknown_kid_fails_and_asks_for_a_refresh() {
        let key = TestKey::rsa("new-key");
        let old = TestKey::rsa("old-key");
        let token = key.sign(&claims());
        let jwks = set(&[&old]);
        let m = message(verify_signature(&token, &jwks, Some(ISSUER)));
        assert!(m.contains("no key with kid \"new-key\""), "{m}");
        assert!(key_missing(&token, &jwks));
        assert!(!m.contains(&token), "messages never carry the token");
    }

    #[test]
    fn alg_none_and_hmac_are_refused() {
        let key = TestKey::rsa("k1");
        let jwks = set(&[&key]);
        let none = forged(json!({"alg": "none", "kid": "k1"}), &claims(), b"");
        let m = message(verify_signature(&none, &jwks, None));
        assert!(m.contains("alg \"none\" is not allowed"), "{m}");
        assert!(!key_missing(&none, &jwks));
        let none_no_sig = forged(json!({"alg": "none"}), &claims(), b"");
        message(verify_signature(&none_no_sig, &jwks, None));

        // HS256 signed with the RSA key's public modulus as the secret: the classic confusion.
        let secret = match &key.jwk.algorithm {
            AlgorithmParameters::RSA(rsa) => rsa.n.clone(),
            _ => unreachable!(),
        };
        let mut header = JwsHeader::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let hs256 = encode(
            &header,
            &claims(),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap();
        let m = message(verify_signature(&hs256, &jwks, None));
        assert!(m.contains("alg \"HS256\" is not allowed"), "{m}");

        // Even a JWKS that publishes a symmetric key does not make HMAC acceptable.
        let mut oct: Jwk = serde_json::from_value(
            json!({"kty": "oct", "k": URL_SAFE_NO_PAD.encode(b"0123456789abcdef0123456789abcdef"), "kid": "h1"}),
        )
        .unwrap();
        oct.common.key_id = Some("h1".into());
        let hs = encode(
            &JwsHeader {
                kid: Some("h1".into()),
                ..JwsHeader::new(Algorithm::HS256)
            },
            &claims(),
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        message(verify_signature(&hs, &JwkSet { keys: vec![oct] }, None));
    }

    #[test]
    fn alg_must_fit_the_key() {
        let rsa = TestKey::rsa("k1");
        let ec = TestKey::ec("k1-ec");
        // An ES256 header pointing at an RSA key.
        let token = ec.sign(&claims());
        let mut header: serde_json::Value = serde_json::from_slice(
            &URL_SAFE_NO_PAD
                .decode(token.split('.').next().unwrap())
                .unwrap(),
        )
        .unwrap();
        header["kid"] = json!("k1");
        let parts: Vec<&str> = token.split('.').collect();
        let swapped = format!(
            "{}.{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            parts[1],
            parts[2]
        );
        let m = message(verify_signature(&swapped, &set(&[&rsa]), None));
        assert!(m.contains("it is for alg RS256, not ES256"), "{m}");
        let mut no_alg = rsa.jwk.clone();
        no_alg.common.key_algorithm = None;
        let m = message(verify_signature(
            &swapped,
            &JwkSet { keys: vec![no_alg] },
            None,
        ));
        assert!(m.contains("does not fit alg ES256"), "{m}");
        // A key whose `alg` says RS512 cannot verify RS256.
        let mut pinned = rsa.jwk.clone();
        pinned.common.key_algorithm = Some(KeyAlgorithm::RS512);
        let m = message(verify_signature(
            &rsa.sign(&claims()),
            &JwkSet { keys: vec![pinned] },
            None,
        ));
        assert!(m.contains("for alg RS512"), "{m}");
        // An encryption key is not a signature key.
        let mut enc = rsa.jwk.clone();
        enc.common.public_key_use = Some(PublicKeyUse::Encryption);
        message(verify_signature(
            &rsa.sign(&claims()),
            &JwkSet { keys: vec![enc] },
            None,
        ));
    }

    #[test]
    fn a_wrong_or_missing_iss_fails() {
        let key = TestKey::ec("k1");
        let jwks = set(&[&key]);
        let mut other = claims();
        other["iss"] = json!("https://evil.example.com");
        let m = message(verify_signature(&key.sign(&other), &jwks, Some(ISSUER)));
        assert!(m.contains("is not the issuer"), "{m}");
        verify_signature(&key.sign(&other), &jwks, None).unwrap();
        let mut none = claims();
        none.as_object_mut().unwrap().remove("iss");
        let m = message(verify_signature(&key.sign(&none), &jwks, Some(ISSUER)));
        assert!(m.contains("no iss"), "{m}");
    }

    #[test]
    fn expiry_and_not_before_are_checked_with_leeway() {
        let key = TestKey::ec("k1");
        let jwks = set(&[&key]);
        let now = jiff::Timestamp::now().as_second();
        let mut expired = claims();
        expired["exp"] = json!(now - 120);
        let m = message(verify_signature(&key.sign(&expired), &jwks, None));
        assert!(m.contains("expired"), "{m}");
        let mut skewed = claims();
        skewed["exp"] = json!(now - 5);
        verify_signature(&key.sign(&skewed), &jwks, None).unwrap();
        let mut early = claims();
        early["nbf"] = json!(now + 600);
        let m = message(verify_signature(&key.sign(&early), &jwks, None));
        assert!(m.contains("not valid yet"), "{m}");
        let mut no_exp = claims();
        no_exp.as_object_mut().unwrap().remove("exp");
        verify_signature(&key.sign(&no_exp), &jwks, None).unwrap();
    }

    #[test]
    fn a_tampered_payload_fails() {
        let key = TestKey::rsa("k1");
        let token = key.sign(&claims());
        let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
        let mut payload: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(&parts[1]).unwrap()).unwrap();
        payload["aud"] = json!("urn:other");
        parts[1] = URL_SAFE_NO_PAD.encode(payload.to_string());
        message(verify_signature(&parts.join("."), &set(&[&key]), None));
    }

    #[test]
    fn opaque_and_malformed_tokens_are_refused_here() {
        let jwks = set(&[&TestKey::ec("k1")]);
        for token in ["opaque", "a.b", "a.b.c.d.e", "!!!.e30.c2ln"] {
            message(verify_signature(token, &jwks, None));
            assert!(!key_missing(token, &jwks));
        }
        let crit = forged(
            json!({"alg": "ES256", "kid": "k1", "crit": ["exp"]}),
            &claims(),
            b"sig",
        );
        assert!(message(verify_signature(&crit, &jwks, None)).contains("crit"));
    }

    #[test]
    fn jwks_documents_skip_keys_they_cannot_read() {
        let rsa = TestKey::rsa("r1");
        let body = json!({"keys": [
            serde_json::to_value(&rsa.jwk).unwrap(),
            {"kty": "EC", "crv": "secp256k1", "x": "AA", "y": "AA", "kid": "odd"},
            {"kty": "weird", "kid": "w"},
            "not an object"
        ]});
        let jwks = parse_jwks(body.to_string().as_bytes()).unwrap();
        assert!(jwks.find("r1").is_some());
        verify_signature(&rsa.sign(&claims()), &jwks, None).unwrap();
        assert!(parse_jwks(b"{}").is_err());
        assert!(parse_jwks(b"<html>").is_err());
    }
}
