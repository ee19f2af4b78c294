//! Client assertions for `private_key_jwt` client authentication (RFC 7523 §2.2 and §3,
//! OpenID Connect Core §9): the client's private key and the signed JWT it sends as
//! `client_assertion`. Pure: the caller passes the time and the `jti`.
//!
//! Keys come from a Secret as PEM (PKCS#1 `RSA PRIVATE KEY`, PKCS#8 `PRIVATE KEY` with an
//! RSA or EC key, SEC1 `EC PRIVATE KEY`) or as a private JWK (RSA with the CRT parameters;
//! EC P-256 or P-384). Every form is brought to the DER that `jsonwebtoken` signs with:
//! PKCS#1 for RSA, PKCS#8 for EC.

use std::fmt;

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, ECDSA_P384_SHA384_FIXED_SIGNING, EcdsaKeyPair,
    EcdsaSigningAlgorithm, RsaKeyPair,
};
use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use jiff::Timestamp;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde::{Deserialize, Serialize};

use crate::redact::SecretString;

/// `client_assertion_type` of a JWT client assertion (RFC 7523 §2.2).
pub const CLIENT_ASSERTION_TYPE: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";

/// Seconds from `iat` to `exp` of an assertion. Short, because a captured assertion can be
/// replayed until it expires (servers that track `jti` refuse a second use earlier).
pub const ASSERTION_LIFETIME_SECS: i64 = 60;

/// Smallest RSA modulus accepted, in bits (RFC 7518 §3.3).
const MIN_RSA_BITS: usize = 2048;

/// The JWS algorithms a client assertion may be signed with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum SigningAlg {
    /// RSASSA-PKCS1-v1_5 with SHA-256 (RSA keys).
    RS256,
    /// RSASSA-PSS with SHA-256 (RSA keys).
    PS256,
    /// ECDSA P-256 with SHA-256.
    ES256,
    /// ECDSA P-384 with SHA-384.
    ES384,
}

impl SigningAlg {
    /// The JOSE name, e.g. `RS256`.
    pub fn as_str(self) -> &'static str {
        match self {
            SigningAlg::RS256 => "RS256",
            SigningAlg::PS256 => "PS256",
            SigningAlg::ES256 => "ES256",
            SigningAlg::ES384 => "ES384",
        }
    }

    /// Parses a JOSE name; `None` for algorithms this client does not sign with.
    pub fn from_name(name: &str) -> Option<Self> {
        match name {
            "RS256" => Some(SigningAlg::RS256),
            "PS256" => Some(SigningAlg::PS256),
            "ES256" => Some(SigningAlg::ES256),
            "ES384" => Some(SigningAlg::ES384),
            _ => None,
        }
    }

    fn jws(self) -> Algorithm {
        match self {
            SigningAlg::RS256 => Algorithm::RS256,
            SigningAlg::PS256 => Algorithm::PS256,
            SigningAlg::ES256 => Algorithm::ES256,
            SigningAlg::ES384 => Algorithm::ES384,
        }
    }
}

impl fmt::Display for SigningAlg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What kind of key a [`ClientKey`] holds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// RSA with a modulus of this many bits.
    Rsa {
        /// Modulus size.
        bits: usize,
    },
    /// EC on P-256.
    EcP256,
    /// EC on P-384.
    EcP384,
}

impl KeyKind {
    /// The algorithm used when none is configured: RS256, ES256 or ES384.
    pub fn default_algorithm(self) -> SigningAlg {
        match self {
            KeyKind::Rsa { .. } => SigningAlg::RS256,
            KeyKind::EcP256 => SigningAlg::ES256,
            KeyKind::EcP384 => SigningAlg::ES384,
        }
    }

    fn allows(self, alg: SigningAlg) -> bool {
        matches!(
            (self, alg),
            (KeyKind::Rsa { .. }, SigningAlg::RS256 | SigningAlg::PS256)
                | (KeyKind::EcP256, SigningAlg::ES256)
                | (KeyKind::EcP384, SigningAlg::ES384)
        )
    }
}

impl fmt::Display for KeyKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyKind::Rsa { bits } => write!(f, "an RSA {bits}-bit key"),
            KeyKind::EcP256 => f.write_str("an EC P-256 key"),
            KeyKind::EcP384 => f.write_str("an EC P-384 key"),
        }
    }
}

/// Why a private key cannot be used. The message describes the problem (format, curve,
/// algorithm) and never contains key material.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

fn key_error(message: impl Into<String>) -> KeyError {
    KeyError(message.into())
}

/// A client's private key, ready to sign assertions with one algorithm and an optional
/// `kid`. `Debug` shows the key kind, algorithm and `kid`, never the key.
#[derive(Clone)]
pub struct ClientKey {
    encoding: EncodingKey,
    kind: KeyKind,
    algorithm: SigningAlg,
    key_id: Option<String>,
}

impl fmt::Debug for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientKey")
            .field("kind", &self.kind)
            .field("algorithm", &self.algorithm)
            .field("key_id", &self.key_id)
            .field("key", &"[redacted]")
            .finish()
    }
}

/// The claims of a client assertion (RFC 7523 §3), and the authorization details some
/// servers read from it (HelseID's `assertion_details`).
#[derive(Serialize)]
struct AssertionClaims<'a> {
    iss: &'a str,
    sub: &'a str,
    aud: &'a str,
    jti: &'a str,
    iat: i64,
    exp: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    assertion_details: Option<&'a [serde_json::Value]>,
}

impl ClientKey {
    /// Parses a private key (PEM or JWK, see the module docs). `algorithm` is the configured
    /// `signingAlgorithm`; without it the algorithm is the JWK's `alg`, else derived from the
    /// key (RSA → RS256, P-256 → ES256, P-384 → ES384). `key_id` is the configured `kid`;
    /// without it a JWK's own `kid` is used. An algorithm that does not fit the key is
    /// refused.
    pub fn parse(
        text: &str,
        algorithm: Option<SigningAlg>,
        key_id: Option<&str>,
    ) -> Result<ClientKey, KeyError> {
        let text = text.trim();
        let parsed = if text.starts_with('{') {
            parse_jwk(text)?
        } else if text.contains("-----BEGIN ") {
            parse_pem(text)?
        } else {
            return Err(key_error(
                "the private key is neither PEM (-----BEGIN ... PRIVATE KEY-----) nor a JWK (JSON)",
            ));
        };
        let algorithm = match (algorithm, parsed.jwk_alg) {
            (Some(configured), Some(declared)) if configured != declared => {
                return Err(key_error(format!(
                    "signingAlgorithm {configured} does not match the JWK's alg {declared}"
                )));
            }
            (Some(alg), _) | (None, Some(alg)) => alg,
            (None, None) => parsed.kind.default_algorithm(),
        };
        if !parsed.kind.allows(algorithm) {
            return Err(key_error(format!(
                "signingAlgorithm {algorithm} cannot be used with {}; use {}",
                parsed.kind,
                match parsed.kind {
                    KeyKind::Rsa { .. } => "RS256 or PS256",
                    KeyKind::EcP256 => "ES256",
                    KeyKind::EcP384 => "ES384",
                }
            )));
        }
        let key_id = key_id
            .filter(|k| !k.is_empty())
            .map(str::to_string)
            .or(parsed.jwk_kid);
        Ok(ClientKey {
            encoding: parsed.encoding,
            kind: parsed.kind,
            algorithm,
            key_id,
        })
    }

    /// The kind of key.
    pub fn kind(&self) -> KeyKind {
        self.kind
    }

    /// The algorithm assertions are signed with.
    pub fn algorithm(&self) -> SigningAlg {
        self.algorithm
    }

    /// The `kid` header, if any.
    pub fn key_id(&self) -> Option<&str> {
        self.key_id.as_deref()
    }

    /// Signs a client assertion: header `{alg, typ: "JWT", kid?}`, claims `iss` = `sub` =
    /// `client_id`, `aud` = `audience` (one string), `jti`, `iat` = `now`, `exp` = `iat` +
    /// [`ASSERTION_LIFETIME_SECS`]. Every request needs a new `jti` (see [`new_jti`]).
    pub fn sign_assertion(
        &self,
        client_id: &str,
        audience: &str,
        now: Timestamp,
        jti: &str,
    ) -> Result<SecretString, KeyError> {
        self.sign(client_id, audience, now, jti, None)
    }

    /// [`ClientKey::sign_assertion`] with one more claim, `assertion_details`: the
    /// authorization details (RFC 9396 §2) as a JSON array, as HelseID's multi-tenant
    /// clients say which organisation they act for.
    pub fn sign_assertion_with_details(
        &self,
        client_id: &str,
        audience: &str,
        now: Timestamp,
        jti: &str,
        details: &[serde_json::Value],
    ) -> Result<SecretString, KeyError> {
        self.sign(client_id, audience, now, jti, Some(details))
    }

    fn sign(
        &self,
        client_id: &str,
        audience: &str,
        now: Timestamp,
        jti: &str,
        assertion_details: Option<&[serde_json::Value]>,
    ) -> Result<SecretString, KeyError> {
        let mut header = Header::new(self.algorithm.jws());
        header.kid = self.key_id.clone();
        let iat = now.as_second();
        let claims = AssertionClaims {
            iss: client_id,
            sub: client_id,
            aud: audience,
            jti,
            iat,
            exp: iat + ASSERTION_LIFETIME_SECS,
            assertion_details,
        };
        jsonwebtoken::encode(&header, &claims, &self.encoding)
            .map(SecretString::new)
            .map_err(|e| {
                key_error(format!(
                    "cannot sign the client assertion with {}: {}",
                    self.algorithm,
                    kind_name(&e)
                ))
            })
    }
}

impl ClientKey {
    /// Signs a JWS compact token with this key and its algorithm: `header` gets `alg` set
    /// to [`ClientKey::algorithm`] (whatever it held), `claims` is serialised as it is. For
    /// other JWTs of this crate (DPoP proofs) that need header members `jsonwebtoken`'s
    /// `Header` cannot hold exactly.
    pub(crate) fn sign_compact(
        &self,
        mut header: serde_json::Map<String, serde_json::Value>,
        claims: &impl Serialize,
    ) -> Result<String, KeyError> {
        header.insert("alg".into(), self.algorithm.as_str().into());
        let not_json = |_| key_error("cannot serialise the JWT");
        let header = serde_json::to_vec(&header).map_err(not_json)?;
        let claims = serde_json::to_vec(claims).map_err(not_json)?;
        let message = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header),
            URL_SAFE_NO_PAD.encode(claims)
        );
        let signature =
            jsonwebtoken::crypto::sign(message.as_bytes(), &self.encoding, self.algorithm.jws())
                .map_err(|e| {
                    key_error(format!(
                        "cannot sign the JWT with {}: {}",
                        self.algorithm,
                        kind_name(&e)
                    ))
                })?;
        Ok(format!("{message}.{signature}"))
    }
}

/// A fresh `jti`: 128 random bits, hex.
pub fn new_jti() -> String {
    let bytes: [u8; 16] = rand::random();
    let mut jti = String::with_capacity(32);
    for byte in bytes {
        // Writing to a String cannot fail; one String, not one per byte (every token
        // request makes one).
        let _ = std::fmt::Write::write_fmt(&mut jti, format_args!("{byte:02x}"));
    }
    jti
}

/// A `jsonwebtoken` error by kind only: some kinds carry input text.
fn kind_name(error: &jsonwebtoken::errors::Error) -> &'static str {
    use jsonwebtoken::errors::ErrorKind;
    match error.kind() {
        ErrorKind::InvalidKeyFormat => "invalid key format",
        ErrorKind::InvalidAlgorithm => "the algorithm does not fit the key",
        ErrorKind::InvalidEcdsaKey => "invalid ECDSA key",
        ErrorKind::InvalidRsaKey(_) => "invalid RSA key",
        _ => "signing failed",
    }
}

/// A key in signing form plus what a JWK declared about it.
struct ParsedKey {
    encoding: EncodingKey,
    kind: KeyKind,
    jwk_alg: Option<SigningAlg>,
    jwk_kid: Option<String>,
}

impl ParsedKey {
    fn plain(encoding: EncodingKey, kind: KeyKind) -> Self {
        ParsedKey {
            encoding,
            kind,
            jwk_alg: None,
            jwk_kid: None,
        }
    }
}

// ---- PEM -----------------------------------------------------------------------------------

/// Finds the private key block (skipping e.g. the `EC PARAMETERS` block that `openssl ecparam
/// -genkey` writes first) and parses it by its label.
fn parse_pem(text: &str) -> Result<ParsedKey, KeyError> {
    let mut labels = Vec::new();
    let mut lines = text.lines().map(str::trim);
    while let Some(line) = lines.next() {
        let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|rest| rest.strip_suffix("-----"))
        else {
            continue;
        };
        let end = format!("-----END {label}-----");
        let mut body = String::new();
        let mut has_headers = false;
        let mut closed = false;
        for line in lines.by_ref() {
            if line == end {
                closed = true;
                break;
            }
            if line.contains(':') {
                has_headers = true;
            } else {
                body.push_str(line);
            }
        }
        if !closed {
            return Err(key_error(format!(
                "the PEM block {label:?} has no END line"
            )));
        }
        let der = || {
            STANDARD
                .decode(body.as_bytes())
                .map_err(|_| key_error(format!("the PEM block {label:?} is not valid base64")))
        };
        match label {
            "RSA PRIVATE KEY" | "EC PRIVATE KEY" if has_headers => {
                return Err(key_error(
                    "the PEM private key is encrypted; store it unencrypted in the Secret",
                ));
            }
            "ENCRYPTED PRIVATE KEY" => {
                return Err(key_error(
                    "the PKCS#8 private key is encrypted; store it unencrypted in the Secret",
                ));
            }
            "RSA PRIVATE KEY" => return rsa_from_pkcs1(&der()?),
            "EC PRIVATE KEY" => return ec_from_der(&der()?, "SEC1 EC PRIVATE KEY"),
            "PRIVATE KEY" => return from_pkcs8(&der()?),
            other => labels.push(other.to_string()),
        }
    }
    Err(key_error(if labels.is_empty() {
        "the PEM text has no -----BEGIN line".to_string()
    } else {
        format!(
            "the PEM text holds no private key (found {}); expected RSA PRIVATE KEY, PRIVATE KEY or EC PRIVATE KEY",
            labels.join(", ")
        )
    }))
}

const OID_RSA_ENCRYPTION: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01];
const OID_EC_PUBLIC_KEY: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x02, 0x01];

/// PKCS#8 `PrivateKeyInfo`: RSA keys are unwrapped to PKCS#1, EC keys kept as PKCS#8.
fn from_pkcs8(der: &[u8]) -> Result<ParsedKey, KeyError> {
    let invalid = || key_error("the PKCS#8 private key is not valid DER");
    let (info, _) = der::expect(der, der::SEQUENCE).ok_or_else(invalid)?;
    let (_version, rest) = der::expect(info, der::INTEGER).ok_or_else(invalid)?;
    let (algorithm, rest) = der::expect(rest, der::SEQUENCE).ok_or_else(invalid)?;
    let (oid, _) = der::expect(algorithm, der::OID).ok_or_else(invalid)?;
    let (private_key, _) = der::expect(rest, der::OCTET_STRING).ok_or_else(invalid)?;
    match oid {
        OID_RSA_ENCRYPTION => rsa_from_pkcs1(private_key),
        OID_EC_PUBLIC_KEY => ec_from_der(der, "PKCS#8 EC"),
        _ => Err(key_error(
            "the PKCS#8 private key is neither RSA nor EC (Ed25519 and others are not supported)",
        )),
    }
}

/// PKCS#1 `RSAPrivateKey` DER, checked by aws-lc (consistency and size).
fn rsa_from_pkcs1(der: &[u8]) -> Result<ParsedKey, KeyError> {
    let pair = RsaKeyPair::from_der(der)
        .map_err(|e| key_error(format!("the RSA private key is not usable: {e}")))?;
    let bits = pair.public_modulus_len() * 8;
    if bits < MIN_RSA_BITS {
        return Err(key_error(format!(
            "the RSA key has {bits} bits; at least {MIN_RSA_BITS} are required"
        )));
    }
    Ok(ParsedKey::plain(
        EncodingKey::from_rsa_der(der),
        KeyKind::Rsa { bits },
    ))
}

const CURVES: [(&EcdsaSigningAlgorithm, KeyKind); 2] = [
    (&ECDSA_P256_SHA256_FIXED_SIGNING, KeyKind::EcP256),
    (&ECDSA_P384_SHA384_FIXED_SIGNING, KeyKind::EcP384),
];

/// A PKCS#8 or SEC1 EC key on P-256 or P-384, re-encoded as PKCS#8.
fn ec_from_der(der: &[u8], form: &str) -> Result<ParsedKey, KeyError> {
    for (curve, kind) in CURVES {
        if let Ok(pair) = EcdsaKeyPair::from_private_key_der(curve, der) {
            return ec_pair(&pair, kind);
        }
    }
    Err(key_error(format!(
        "the {form} private key is not a valid key on P-256 or P-384"
    )))
}

fn ec_pair(pair: &EcdsaKeyPair, kind: KeyKind) -> Result<ParsedKey, KeyError> {
    let pkcs8 = pair
        .to_pkcs8v1()
        .map_err(|_| key_error("cannot re-encode the EC private key"))?;
    Ok(ParsedKey::plain(
        EncodingKey::from_ec_der(pkcs8.as_ref()),
        kind,
    ))
}

// ---- JWK -----------------------------------------------------------------------------------

/// The members of a private JWK this client reads (RFC 7517, RFC 7518 §6).
#[derive(Deserialize)]
struct Jwk {
    kty: Option<String>,
    alg: Option<String>,
    kid: Option<String>,
    // EC
    crv: Option<String>,
    x: Option<String>,
    y: Option<String>,
    // RSA
    n: Option<String>,
    e: Option<String>,
    p: Option<String>,
    q: Option<String>,
    dp: Option<String>,
    dq: Option<String>,
    qi: Option<String>,
    oth: Option<serde_json::Value>,
    // both
    d: Option<String>,
}

#[derive(Deserialize)]
struct JwkSet {
    keys: Vec<serde_json::Value>,
}

fn parse_jwk(text: &str) -> Result<ParsedKey, KeyError> {
    // serde_json errors quote input; only their position is reported.
    let not_json = |e: serde_json::Error| {
        key_error(format!(
            "the private key looks like JSON but is not a valid JWK (line {}, column {})",
            e.line(),
            e.column()
        ))
    };
    let value: serde_json::Value = serde_json::from_str(text).map_err(not_json)?;
    let value = if value.get("keys").is_some() {
        let set: JwkSet = serde_json::from_value(value).map_err(not_json)?;
        match <[serde_json::Value; 1]>::try_from(set.keys) {
            Ok([key]) => key,
            Err(keys) => {
                return Err(key_error(format!(
                    "the JWK Set holds {} keys; put exactly one private key in the Secret",
                    keys.len()
                )));
            }
        }
    } else {
        value
    };
    let jwk: Jwk = serde_json::from_value(value).map_err(not_json)?;
    let jwk_alg = match jwk.alg.as_deref() {
        None => None,
        Some(name) => Some(SigningAlg::from_name(name).ok_or_else(|| {
            key_error(format!(
                "the JWK's alg {name:?} is not supported (RS256, PS256, ES256, ES384)"
            ))
        })?),
    };
    if jwk.d.is_none() {
        return Err(key_error(
            "the JWK is a public key: it has no private part (\"d\")",
        ));
    }
    let mut parsed = match jwk.kty.as_deref() {
        Some("RSA") => rsa_from_jwk(&jwk)?,
        Some("EC") => ec_from_jwk(&jwk)?,
        Some(other) => {
            return Err(key_error(format!(
                "the JWK's kty {other:?} is not supported (RSA, EC)"
            )));
        }
        None => return Err(key_error("the JWK has no kty")),
    };
    parsed.jwk_alg = jwk_alg;
    parsed.jwk_kid = jwk.kid.filter(|k| !k.is_empty());
    Ok(parsed)
}

/// A base64url JWK member, decoded. Errors name the member, not its value.
fn member(value: Option<&String>, name: &str) -> Result<Vec<u8>, KeyError> {
    let value = value.ok_or_else(|| key_error(format!("the JWK has no {name:?}")))?;
    URL_SAFE_NO_PAD
        .decode(value.trim_end_matches('=').as_bytes())
        .map_err(|_| key_error(format!("the JWK's {name:?} is not base64url")))
}

/// RSA JWK → PKCS#1 `RSAPrivateKey`. The CRT parameters are required (RFC 7518 §6.3.2 says
/// they SHOULD be present; every common tool writes them).
fn rsa_from_jwk(jwk: &Jwk) -> Result<ParsedKey, KeyError> {
    if jwk.oth.is_some() {
        return Err(key_error(
            "multi-prime RSA JWKs (\"oth\") are not supported",
        ));
    }
    let members = [
        (&jwk.n, "n"),
        (&jwk.e, "e"),
        (&jwk.d, "d"),
        (&jwk.p, "p"),
        (&jwk.q, "q"),
        (&jwk.dp, "dp"),
        (&jwk.dq, "dq"),
        (&jwk.qi, "qi"),
    ];
    let mut body = der::integer(&[0]);
    for (value, name) in members {
        body.extend(der::integer(&member(value.as_ref(), name)?));
    }
    rsa_from_pkcs1(&der::tlv(der::SEQUENCE, &body))
}

fn ec_from_jwk(jwk: &Jwk) -> Result<ParsedKey, KeyError> {
    let (curve, kind, size) = match jwk.crv.as_deref() {
        Some("P-256") => (&ECDSA_P256_SHA256_FIXED_SIGNING, KeyKind::EcP256, 32),
        Some("P-384") => (&ECDSA_P384_SHA384_FIXED_SIGNING, KeyKind::EcP384, 48),
        Some(other) => {
            return Err(key_error(format!(
                "the JWK's crv {other:?} is not supported (P-256, P-384)"
            )));
        }
        None => return Err(key_error("the EC JWK has no crv")),
    };
    let padded = |bytes: Vec<u8>, name: &str| {
        if bytes.len() > size {
            return Err(key_error(format!(
                "the JWK's {name:?} is too long for {}",
                jwk.crv.as_deref().unwrap_or_default()
            )));
        }
        let mut out = vec![0; size - bytes.len()];
        out.extend(bytes);
        Ok(out)
    };
    let d = padded(member(jwk.d.as_ref(), "d")?, "d")?;
    let mut point = vec![0x04];
    point.extend(padded(member(jwk.x.as_ref(), "x")?, "x")?);
    point.extend(padded(member(jwk.y.as_ref(), "y")?, "y")?);
    let pair = EcdsaKeyPair::from_private_key_and_public_key(curve, &d, &point).map_err(|e| {
        key_error(format!(
            "the EC JWK is not a valid {} key pair: {e}",
            jwk.crv.as_deref().unwrap_or_default()
        ))
    })?;
    ec_pair(&pair, kind)
}

/// Just enough DER to unwrap PKCS#8 and to write PKCS#1.
pub(crate) mod der {
    pub const INTEGER: u8 = 0x02;
    pub const OCTET_STRING: u8 = 0x04;
    pub const OID: u8 = 0x06;
    pub const SEQUENCE: u8 = 0x30;

    /// Reads one element with tag `tag`: its contents and what follows it.
    pub fn expect(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
        let (&first, rest) = input.split_first()?;
        if first != tag {
            return None;
        }
        let (&len, rest) = rest.split_first()?;
        let (len, rest) = if len < 0x80 {
            (usize::from(len), rest)
        } else {
            let count = usize::from(len & 0x7f);
            if count == 0 || count > 4 || rest.len() < count {
                return None;
            }
            let (bytes, rest) = rest.split_at(count);
            let len = bytes
                .iter()
                .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
            (len, rest)
        };
        (rest.len() >= len).then(|| rest.split_at(len))
    }

    /// One element.
    pub fn tlv(tag: u8, contents: &[u8]) -> Vec<u8> {
        let mut out = vec![tag];
        let len = contents.len();
        if len < 0x80 {
            out.push(len as u8);
        } else {
            let bytes: Vec<u8> = len
                .to_be_bytes()
                .into_iter()
                .skip_while(|b| *b == 0)
                .collect();
            out.push(0x80 | bytes.len() as u8);
            out.extend(bytes);
        }
        out.extend_from_slice(contents);
        out
    }

    /// An unsigned big-endian integer as a DER INTEGER (minimal, non-negative).
    pub fn integer(unsigned: &[u8]) -> Vec<u8> {
        let trimmed: &[u8] = match unsigned.iter().position(|b| *b != 0) {
            Some(start) => &unsigned[start..],
            None => &[0],
        };
        let mut contents = Vec::with_capacity(trimmed.len() + 1);
        if trimmed[0] & 0x80 != 0 {
            contents.push(0);
        }
        contents.extend_from_slice(trimmed);
        tlv(INTEGER, &contents)
    }
}

/// Test keys, generated at run time (never stored): each in every form a Secret may hold.
/// For tests only: compiled for this crate's tests and, with the `test-keys` feature, for
/// the tests of crates that depend on it. Panics on failure.
#[cfg(any(test, feature = "test-keys"))]
pub mod test_keys {
    use aws_lc_rs::encoding::{AsBigEndian, AsDer};
    use aws_lc_rs::rsa::KeySize;
    use aws_lc_rs::signature::{EcdsaKeyPair, KeyPair, RsaKeyPair};
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    use jsonwebtoken::DecodingKey;

    use super::{CURVES, KeyKind, der};

    /// A private key in its forms, and its public key for verification.
    pub struct TestKey {
        /// `-----BEGIN PRIVATE KEY-----`.
        pub pkcs8_pem: String,
        /// PKCS#1 (RSA) or SEC1 (EC) PEM.
        pub traditional_pem: String,
        /// Private JWK (no `alg`, no `kid`).
        pub jwk: serde_json::Value,
        /// The public key.
        pub public: DecodingKey,
    }

    /// `der` as PEM with the given label (`PRIVATE KEY`, `EC PRIVATE KEY`, …).
    pub fn pem(label: &str, der: &[u8]) -> String {
        let b64 = STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }

    fn b64(bytes: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(bytes)
    }

    /// The unsigned value of a DER INTEGER's contents.
    fn unsigned(contents: &[u8]) -> &[u8] {
        match contents {
            [0, rest @ ..] if !rest.is_empty() => rest,
            other => other,
        }
    }

    /// A new RSA 2048 key.
    pub fn rsa() -> TestKey {
        let pair = RsaKeyPair::generate(KeySize::Rsa2048).unwrap();
        let pkcs8 = AsDer::<aws_lc_rs::encoding::Pkcs8V1Der>::as_der(&pair).unwrap();
        let pkcs8 = pkcs8.as_ref();
        // PrivateKeyInfo → privateKey OCTET STRING → RSAPrivateKey.
        let (info, _) = der::expect(pkcs8, der::SEQUENCE).unwrap();
        let (_, rest) = der::expect(info, der::INTEGER).unwrap();
        let (_, rest) = der::expect(rest, der::SEQUENCE).unwrap();
        let (pkcs1, _) = der::expect(rest, der::OCTET_STRING).unwrap();
        let (mut fields, _) = der::expect(pkcs1, der::SEQUENCE).unwrap();
        let mut values = Vec::new();
        for _ in 0..9 {
            let (value, rest) = der::expect(fields, der::INTEGER).unwrap();
            values.push(b64(unsigned(value)));
            fields = rest;
        }
        let jwk = serde_json::json!({
            "kty": "RSA", "n": values[1], "e": values[2], "d": values[3], "p": values[4],
            "q": values[5], "dp": values[6], "dq": values[7], "qi": values[8],
        });
        let public = DecodingKey::from_rsa_der(pair.public_key().as_ref());
        TestKey {
            pkcs8_pem: pem("PRIVATE KEY", pkcs8),
            traditional_pem: pem("RSA PRIVATE KEY", pkcs1),
            jwk,
            public,
        }
    }

    /// A new EC key on the curve of `kind` (P-256 or P-384).
    pub fn ec(kind: KeyKind) -> TestKey {
        let (curve, _) = CURVES.into_iter().find(|(_, k)| *k == kind).unwrap();
        let pair = EcdsaKeyPair::generate(curve).unwrap();
        let pkcs8 = pair.to_pkcs8v1().unwrap();
        let sec1 = pair.private_key().as_der().unwrap();
        let d =
            AsBigEndian::<aws_lc_rs::encoding::EcPrivateKeyBin>::as_be_bytes(&pair.private_key())
                .unwrap();
        let point = pair.public_key().as_ref().to_vec();
        let size = (point.len() - 1) / 2;
        let crv = if kind == KeyKind::EcP256 {
            "P-256"
        } else {
            "P-384"
        };
        let jwk = serde_json::json!({
            "kty": "EC", "crv": crv, "d": b64(d.as_ref()),
            "x": b64(&point[1..1 + size]), "y": b64(&point[1 + size..]),
        });
        TestKey {
            pkcs8_pem: pem("PRIVATE KEY", pkcs8.as_ref()),
            traditional_pem: pem("EC PRIVATE KEY", sec1.as_ref()),
            jwk,
            public: DecodingKey::from_ec_der(&point),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use jsonwebtoken::{DecodingKey, Validation, decode, decode_header};

    use super::test_keys::{TestKey, ec, pem, rsa};
    use super::*;

    const CLIENT: &str = "shop-m2m";
    const AUDIENCE: &str = "https://idp.example.com";

    fn now() -> Timestamp {
        Timestamp::from_second(1_700_000_000).unwrap()
    }

    /// Verifies the signature with the public key and returns the claims.
    fn verify(
        assertion: &SecretString,
        public: &DecodingKey,
        alg: SigningAlg,
    ) -> serde_json::Value {
        let mut validation = Validation::new(alg.jws());
        validation.validate_exp = false;
        validation.set_audience(&[AUDIENCE]);
        validation.set_required_spec_claims(&["exp", "aud", "iss", "sub"]);
        decode::<serde_json::Value>(assertion.expose(), public, &validation)
            .unwrap_or_else(|e| panic!("{alg} assertion does not verify: {e}"))
            .claims
    }

    fn forms(key: &TestKey) -> [(&'static str, String); 3] {
        [
            ("PKCS#8 PEM", key.pkcs8_pem.clone()),
            ("PKCS#1/SEC1 PEM", key.traditional_pem.clone()),
            ("JWK", key.jwk.to_string()),
        ]
    }

    fn check_all_forms(key: &TestKey, configured: Option<SigningAlg>, expected: SigningAlg) {
        for (form, text) in forms(key) {
            let client_key = ClientKey::parse(&text, configured, Some("kid-1"))
                .unwrap_or_else(|e| panic!("{form}: {e}"));
            assert_eq!(client_key.algorithm(), expected, "{form}");
            let assertion = client_key
                .sign_assertion(CLIENT, AUDIENCE, now(), "jti-1")
                .unwrap();
            let header = decode_header(assertion.expose()).unwrap();
            assert_eq!(header.alg, expected.jws(), "{form}");
            assert_eq!(header.typ.as_deref(), Some("JWT"));
            assert_eq!(header.kid.as_deref(), Some("kid-1"));
            let claims = verify(&assertion, &key.public, expected);
            assert_eq!(claims["iss"], CLIENT, "{form}");
            assert_eq!(claims["sub"], CLIENT);
            assert_eq!(claims["aud"], AUDIENCE);
            assert_eq!(claims["jti"], "jti-1");
        }
    }

    #[test]
    fn rsa_keys_sign_rs256_by_default_and_ps256_on_request() {
        let key = rsa();
        check_all_forms(&key, None, SigningAlg::RS256);
        check_all_forms(&key, Some(SigningAlg::RS256), SigningAlg::RS256);
        check_all_forms(&key, Some(SigningAlg::PS256), SigningAlg::PS256);
        let parsed = ClientKey::parse(&key.pkcs8_pem, None, None).unwrap();
        assert_eq!(parsed.kind(), KeyKind::Rsa { bits: 2048 });
    }

    #[test]
    fn ec_keys_sign_with_their_curve() {
        let p256 = ec(KeyKind::EcP256);
        check_all_forms(&p256, None, SigningAlg::ES256);
        check_all_forms(&p256, Some(SigningAlg::ES256), SigningAlg::ES256);
        let p384 = ec(KeyKind::EcP384);
        check_all_forms(&p384, None, SigningAlg::ES384);
        check_all_forms(&p384, Some(SigningAlg::ES384), SigningAlg::ES384);
    }

    #[test]
    fn claims_are_exactly_as_rfc7523_asks() {
        let key = ec(KeyKind::EcP256);
        let client_key = ClientKey::parse(&key.pkcs8_pem, None, None).unwrap();
        let assertion = client_key
            .sign_assertion(CLIENT, AUDIENCE, now(), "0123abcd")
            .unwrap();
        let header = decode_header(assertion.expose()).unwrap();
        assert_eq!(header.kid, None);
        let claims = verify(&assertion, &key.public, SigningAlg::ES256);
        assert_eq!(
            claims,
            serde_json::json!({
                "iss": CLIENT, "sub": CLIENT, "aud": AUDIENCE, "jti": "0123abcd",
                "iat": 1_700_000_000, "exp": 1_700_000_060,
            })
        );
    }

    #[test]
    fn authorization_details_ride_in_the_assertion_details_claim() {
        let key = rsa();
        let client_key = ClientKey::parse(&key.pkcs8_pem, None, None).unwrap();
        let details = vec![serde_json::json!({
            "type": "helseid_authorization",
            "practitioner_role": {"organization": {"identifier": {
                "system": "urn:oid:1.0.6523", "type": "ENH", "value": "NO:ORGNR:999977775:999977776"
            }}}
        })];
        let assertion = client_key
            .sign_assertion_with_details(CLIENT, AUDIENCE, now(), "jti-d", &details)
            .unwrap();
        let claims = verify(&assertion, &key.public, SigningAlg::RS256);
        assert_eq!(
            claims,
            serde_json::json!({
                "iss": CLIENT, "sub": CLIENT, "aud": AUDIENCE, "jti": "jti-d",
                "iat": 1_700_000_000, "exp": 1_700_000_060,
                "assertion_details": details,
            }),
            "the RFC 7523 claims, and the details as one array"
        );
        assert!(
            !format!("{assertion:?}").contains("helseid"),
            "Debug shows no part of the assertion"
        );
    }

    #[test]
    fn each_assertion_has_its_own_jti() {
        let key = ClientKey::parse(&rsa().pkcs8_pem, None, None).unwrap();
        let jtis: HashSet<String> = (0..100).map(|_| new_jti()).collect();
        assert_eq!(jtis.len(), 100);
        assert!(jtis.iter().all(|j| j.len() == 32));
        let a = key
            .sign_assertion(CLIENT, AUDIENCE, now(), &new_jti())
            .unwrap();
        let b = key
            .sign_assertion(CLIENT, AUDIENCE, now(), &new_jti())
            .unwrap();
        assert_ne!(a, b);
    }

    #[test]
    fn a_jwk_brings_its_alg_and_kid() {
        let key = rsa();
        let mut jwk = key.jwk.clone();
        jwk["alg"] = "PS256".into();
        jwk["kid"] = "from-jwk".into();
        let parsed = ClientKey::parse(&jwk.to_string(), None, None).unwrap();
        assert_eq!(parsed.algorithm(), SigningAlg::PS256);
        assert_eq!(parsed.key_id(), Some("from-jwk"));
        let configured = ClientKey::parse(&jwk.to_string(), None, Some("configured")).unwrap();
        assert_eq!(configured.key_id(), Some("configured"));
        let err = ClientKey::parse(&jwk.to_string(), Some(SigningAlg::RS256), None).unwrap_err();
        assert!(
            err.to_string()
                .contains("does not match the JWK's alg PS256"),
            "{err}"
        );
        // A JWK Set with one key is fine.
        let set = serde_json::json!({ "keys": [jwk] });
        assert!(ClientKey::parse(&set.to_string(), None, None).is_ok());
    }

    #[test]
    fn mismatched_algorithms_are_refused() {
        let cases = [
            (rsa().pkcs8_pem, SigningAlg::ES256, "RS256 or PS256"),
            (
                ec(KeyKind::EcP256).pkcs8_pem,
                SigningAlg::ES384,
                "use ES256",
            ),
            (
                ec(KeyKind::EcP256).pkcs8_pem,
                SigningAlg::RS256,
                "use ES256",
            ),
            (
                ec(KeyKind::EcP384).traditional_pem,
                SigningAlg::ES256,
                "use ES384",
            ),
        ];
        for (text, alg, hint) in cases {
            let err = ClientKey::parse(&text, Some(alg), None).unwrap_err();
            let message = err.to_string();
            assert!(
                message.contains(&format!("signingAlgorithm {alg} cannot be used")),
                "{message}"
            );
            assert!(message.contains(hint), "{message}");
        }
    }

    #[test]
    fn openssl_ecparam_output_with_a_parameters_block_parses() {
        let key = ec(KeyKind::EcP256);
        let text = format!(
            "-----BEGIN EC PARAMETERS-----\nBggqhkjOPQMBBw==\n-----END EC PARAMETERS-----\n{}",
            key.traditional_pem
        );
        assert_eq!(
            ClientKey::parse(&text, None, None).unwrap().kind(),
            KeyKind::EcP256
        );
    }

    #[test]
    fn garbage_is_refused_without_echoing_it() {
        let key = rsa();
        let secret_b64 = key.pkcs8_pem.lines().nth(3).unwrap().to_string();
        let mut broken_jwk = key.jwk.clone();
        broken_jwk["d"] = "not*base64".into();
        let mut wrong_d = ec(KeyKind::EcP256).jwk;
        wrong_d["d"] = ec(KeyKind::EcP256).jwk["d"].clone();
        let truncated = key.pkcs8_pem.replace(&secret_b64, "");
        let mut mixed_rsa = key.jwk.clone();
        mixed_rsa["d"] = rsa().jwk["d"].clone();
        let cases: Vec<(String, &str)> = vec![
            ("hunter2-not-a-key".into(), "neither PEM"),
            (
                format!("-----BEGIN PRIVATE KEY-----\n{secret_b64}\n-----END PRIVATE KEY-----"),
                "not valid DER",
            ),
            (truncated, "PKCS#8"),
            (
                pem("RSA PRIVATE KEY", secret_b64.as_bytes()),
                "RSA private key is not usable",
            ),
            (
                pem("PUBLIC KEY", b"whatever"),
                "holds no private key (found PUBLIC KEY)",
            ),
            (pem("ENCRYPTED PRIVATE KEY", b"whatever"), "encrypted"),
            ("-----BEGIN PRIVATE KEY-----\nMIIE".into(), "no END line"),
            (broken_jwk.to_string(), "\"d\" is not base64url"),
            (wrong_d.to_string(), "not a valid P-256 key pair"),
            (mixed_rsa.to_string(), "RSA private key is not usable"),
            (
                format!("{{\"kty\": \"RSA\", \"n\": \"{secret_b64}"),
                "not a valid JWK",
            ),
            (
                serde_json::json!({"kty": "EC", "crv": "P-256", "x": "AA", "y": "AA"}).to_string(),
                "no private part",
            ),
            (
                serde_json::json!({"kty": "OKP", "crv": "Ed25519", "d": "AA", "x": "AA"})
                    .to_string(),
                "kty \"OKP\"",
            ),
            (serde_json::json!({"keys": []}).to_string(), "holds 0 keys"),
        ];
        for (text, expected) in cases {
            let message = ClientKey::parse(&text, None, None).unwrap_err().to_string();
            assert!(
                message.contains(expected),
                "{expected:?} not in {message:?}"
            );
            for fragment in [secret_b64.as_str(), "hunter2", "not*base64"] {
                assert!(
                    !message.contains(&fragment[..fragment.len().min(12)]),
                    "{message}"
                );
            }
        }
    }

    #[test]
    fn debug_redacts_the_key() {
        let key = rsa();
        let parsed = ClientKey::parse(&key.pkcs8_pem, Some(SigningAlg::PS256), Some("k1")).unwrap();
        let printed = format!("{parsed:?}");
        assert!(
            printed.contains("[redacted]") && printed.contains("PS256"),
            "{printed}"
        );
        let line = key.pkcs8_pem.lines().nth(2).unwrap();
        assert!(!printed.contains(&line[..16]), "{printed}");
        let assertion = parsed.sign_assertion(CLIENT, AUDIENCE, now(), "j").unwrap();
        assert_eq!(format!("{assertion:?}"), "[redacted]");
    }

    #[test]
    fn der_integers_are_minimal_and_positive() {
        assert_eq!(der::integer(&[0, 0, 1]), vec![0x02, 0x01, 0x01]);
        assert_eq!(der::integer(&[0x80]), vec![0x02, 0x02, 0x00, 0x80]);
        assert_eq!(der::integer(&[]), vec![0x02, 0x01, 0x00]);
        let long = der::tlv(der::SEQUENCE, &[7; 300]);
        assert_eq!(&long[..4], &[0x30, 0x82, 0x01, 0x2c]);
        assert_eq!(der::expect(&long, der::SEQUENCE).unwrap().0.len(), 300);
    }
}
