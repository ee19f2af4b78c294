//! The TokenRequest subresource (`POST .../serviceaccounts/{name}/token`), the
//! service-account issuer's discovery documents, and the one authorization check the double
//! makes: RBAC for that subresource, evaluated at request time against the Roles and
//! bindings in the store.

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use rcgen::PublicKeyData;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

use super::KubeApiDouble;
use super::store::{ApiError, Gr, RBAC, Store, now};

const MIN_EXPIRATION_SECONDS: i64 = 600;
const MAX_EXPIRATION_SECONDS: i64 = 1 << 32;
const DEFAULT_EXPIRATION_SECONDS: i64 = 3600;

pub fn service_accounts() -> Gr {
    (String::new(), "serviceaccounts".to_string())
}

fn rbac(plural: &str) -> Gr {
    (RBAC.to_string(), plural.to_string())
}

/// The double's service-account token issuer: a P-256 key made at start.
pub struct Issuer {
    key: EncodingKey,
    /// As the API server names its keys: SHA-256 of the public key's DER
    /// (SubjectPublicKeyInfo), base64url.
    kid: String,
    /// The public point's coordinates, base64url without padding.
    x: String,
    y: String,
    jwks_uri: String,
}

impl Issuer {
    /// `base_url` is the double's URL, where the JWKS is served.
    pub fn generate(base_url: &str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
            .expect("generate a P-256 key");
        let key = EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes())
            .expect("jsonwebtoken reads rcgen's PKCS#8 key");
        // The uncompressed point: 0x04, then x and y (32 bytes each).
        let (x, y) = pair.public_key_raw()[1..].split_at(32);
        Issuer {
            key,
            kid: URL_SAFE_NO_PAD.encode(Sha256::digest(pair.subject_public_key_info())),
            x: URL_SAFE_NO_PAD.encode(x),
            y: URL_SAFE_NO_PAD.encode(y),
            jwks_uri: format!("{base_url}/openid/v1/jwks"),
        }
    }

    pub fn jwks_uri(&self) -> &str {
        &self.jwks_uri
    }

    /// `GET /.well-known/openid-configuration`
    pub fn discovery(&self) -> Value {
        json!({
            "issuer": KubeApiDouble::SERVICE_ACCOUNT_ISSUER,
            "jwks_uri": self.jwks_uri,
            "response_types_supported": ["id_token"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
        })
    }

    /// `GET /openid/v1/jwks`
    pub fn jwks(&self) -> Value {
        json!({"keys": [{"kty": "EC", "crv": "P-256", "x": self.x, "y": self.y,
                         "kid": self.kid, "alg": "ES256", "use": "sig"}]})
    }

    fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.typ = None; // the API server's tokens carry only alg and kid
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, claims, &self.key).expect("ES256 signing")
    }
}

fn invalid(field: &str, value: &Value, reason: &str) -> ApiError {
    let message = format!(
        "TokenRequest.authentication.k8s.io \"\" is invalid: {field}: \
         Invalid value: {value}: {reason}"
    );
    ApiError::new(422, "Invalid", message)
}

/// A random UUID (version 4), the form of the API server's `jti`.
fn uuid() -> String {
    let mut b = [0u8; 16];
    aws_lc_rs::rand::fill(&mut b).expect("random bytes");
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    let p = |r: std::ops::Range<usize>| &hex[r];
    format!(
        "{}-{}-{}-{}-{}",
        p(0..8),
        p(8..12),
        p(12..16),
        p(16..20),
        p(20..32)
    )
}

/// `POST /api/v1/namespaces/{namespace}/serviceaccounts/{name}/token`, checked in the real
/// server's order: authorization (only for a bearer token given to
/// [`KubeApiDouble::authenticate`]), the body's name and namespace, the ServiceAccount, the
/// expiration. Answers the TokenRequest with `status` set, and keeps the token.
pub fn create(
    s: &mut Store,
    issuer: &Issuer,
    namespace: &str,
    name: &str,
    bearer_token: Option<&str>,
    mut req: Value,
) -> Result<(u16, Value), ApiError> {
    if let Some(user) = bearer_token.and_then(|t| s.identities.get(t)) {
        authorize(s, user, namespace, name)?;
    }
    if !req.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    for (field, want) in [("name", name), ("namespace", namespace)] {
        let got = &req["metadata"][field];
        if got.as_str().is_some_and(|g| !g.is_empty() && g != want) {
            let message = format!("must match the service account {field} if specified");
            return Err(invalid(&format!("metadata.{field}"), got, &message));
        }
    }
    let key = (service_accounts(), namespace.to_string(), name.to_string());
    let sa = (s.objects.get(&key)).ok_or_else(|| ApiError::not_found(&key.0, name))?;
    let uid = sa["metadata"]["uid"].clone();

    let spec = &mut req["spec"];
    if spec["audiences"].as_array().is_none_or(Vec::is_empty) {
        spec["audiences"] = json!([KubeApiDouble::SERVICE_ACCOUNT_ISSUER]);
    }
    if spec["expirationSeconds"].is_null() {
        spec["expirationSeconds"] = json!(DEFAULT_EXPIRATION_SECONDS);
    }
    let seconds = &spec["expirationSeconds"];
    let field = "spec.expirationSeconds";
    match seconds.as_i64() {
        None => return Err(invalid(field, seconds, "must be an integer")),
        Some(n) if n < MIN_EXPIRATION_SECONDS => {
            let reason = "may not specify a duration less than 10 minutes";
            return Err(invalid(field, seconds, reason));
        }
        Some(n) if n > MAX_EXPIRATION_SECONDS => {
            let reason = "may not specify a duration larger than 2^32 seconds";
            return Err(invalid(field, seconds, reason));
        }
        Some(_) => {}
    }
    let issued = jiff::Timestamp::now().as_second();
    let exp = issued + seconds.as_i64().unwrap_or_default();
    let token = issuer.sign(&json!({
        "iss": KubeApiDouble::SERVICE_ACCOUNT_ISSUER,
        "sub": format!("system:serviceaccount:{namespace}:{name}"),
        "aud": spec["audiences"],
        "exp": exp,
        "iat": issued,
        "nbf": issued,
        "jti": uuid(),
        "kubernetes.io": {"namespace": namespace, "serviceaccount": {"name": name, "uid": uid}},
    }));
    s.minted.push(token.clone());

    req["apiVersion"] = json!("authentication.k8s.io/v1");
    req["kind"] = json!("TokenRequest");
    let metadata = &mut req["metadata"];
    metadata["name"] = json!(name);
    metadata["namespace"] = json!(namespace);
    metadata["creationTimestamp"] = json!(now());
    let expires = jiff::Timestamp::from_second(exp).expect("a valid time");
    req["status"] = json!({"token": token, "expirationTimestamp": expires.to_string()});
    Ok((201, req))
}

/// RBAC as the real authorizer evaluates it, for `create serviceaccounts/token` on `name`
/// only: a RoleBinding in `namespace` (to a Role there or a ClusterRole) or a
/// ClusterRoleBinding (to a ClusterRole), with `user` among its subjects and a rule allowing
/// the request. No Group subjects, no aggregated ClusterRoles.
fn authorize(s: &Store, user: &str, namespace: &str, name: &str) -> Result<(), ApiError> {
    let granted = s.objects.iter().any(|((gr, ns, _), binding)| {
        let binding_ns = match gr {
            gr if *gr == rbac("rolebindings") && ns == namespace => namespace,
            gr if *gr == rbac("clusterrolebindings") => "",
            _ => return false,
        };
        let mut subjects = binding["subjects"].as_array().into_iter().flatten();
        subjects.any(|sub| is_subject(sub, user, binding_ns))
            && role_of(s, binding, binding_ns).is_some_and(|role| grants(role, name))
    });
    if granted {
        return Ok(());
    }
    let message = format!(
        "serviceaccounts \"{name}\" is forbidden: User \"{user}\" cannot create resource \
         \"serviceaccounts/token\" in API group \"\" in the namespace \"{namespace}\""
    );
    Err(ApiError::new(403, "Forbidden", message))
}

/// A `User` subject names the user; a `ServiceAccount` subject (namespace defaulting to the
/// binding's) matches `system:serviceaccount:{namespace}:{name}`.
fn is_subject(subject: &Value, user: &str, binding_ns: &str) -> bool {
    let name = subject["name"].as_str().unwrap_or_default();
    match subject["kind"].as_str() {
        Some("User") => name == user,
        Some("ServiceAccount") => {
            let ns = (subject["namespace"].as_str())
                .filter(|n| !n.is_empty())
                .unwrap_or(binding_ns);
            !ns.is_empty() && user == format!("system:serviceaccount:{ns}:{name}")
        }
        _ => false,
    }
}

fn role_of<'a>(s: &'a Store, binding: &Value, binding_ns: &str) -> Option<&'a Value> {
    let role_ref = &binding["roleRef"];
    let name = role_ref["name"].as_str()?.to_string();
    let key = match role_ref["kind"].as_str()? {
        "Role" if !binding_ns.is_empty() => (rbac("roles"), binding_ns.to_string(), name),
        "ClusterRole" => (rbac("clusterroles"), String::new(), name),
        _ => return None,
    };
    s.objects.get(&key)
}

/// A rule of `role` allows `create` on `serviceaccounts/token` in the core group for the
/// ServiceAccount `name`.
fn grants(role: &Value, name: &str) -> bool {
    let any_of = |rule: &Value, field: &str, wanted: &[&str]| {
        (rule[field].as_array().into_iter().flatten())
            .any(|v| v.as_str().is_some_and(|v| wanted.contains(&v)))
    };
    (role["rules"].as_array().into_iter().flatten()).any(|rule| {
        any_of(rule, "apiGroups", &["", "*"])
            && any_of(
                rule,
                "resources",
                &["serviceaccounts/token", "*/token", "*"],
            )
            && any_of(rule, "verbs", &["create", "*"])
            && (rule["resourceNames"].as_array()).is_none_or(|names| {
                names.is_empty() || names.iter().any(|n| n.as_str() == Some(name))
            })
    })
}
