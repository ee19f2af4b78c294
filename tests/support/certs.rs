//! X.509 certificates for mutual-TLS tests (RFC 8705), generated when the test runs: a test
//! CA, a server certificate for `127.0.0.1`/`localhost`, CA-signed client certificates and
//! self-signed ones. Nothing is read from or written to the repository; keys are ECDSA P-256.
//!
//! ```ignore
//! mod support;
//! use support::certs::{TestPki, self_signed};
//! let pki = TestPki::generate();
//! let client = pki.client("m2m-tls");      // subject CN=m2m-tls, signed by the CA
//! let renewed = pki.client("m2m-tls");     // same subject, new key and certificate
//! let lone = self_signed("m2m-self-signed");
//! ```

use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose,
};
use sha2::{Digest as _, Sha256};

/// How long before "now" certificates become valid (tolerates clock skew between the test
/// and the server, which run on one machine anyway).
const BACKDATE_SECS: i64 = 3600;
/// How long after "now" certificates stay valid.
const VALID_SECS: i64 = 2 * 24 * 3600;

/// A test certificate authority and a server certificate it signed.
pub struct TestPki {
    /// The CA certificate (PEM): the trust anchor for both the server and client certificates.
    pub ca_pem: String,
    /// The server's certificate (PEM), SANs IP `127.0.0.1` and DNS `localhost`, EKU serverAuth.
    pub server_cert_pem: String,
    /// The server certificate's private key (PKCS#8 PEM).
    pub server_key_pem: String,
    ca: Issuer<'static, KeyPair>,
}

/// A client certificate with its key, as a client presents it in a TLS handshake.
#[derive(Debug, Clone)]
pub struct ClientCert {
    /// The leaf certificate (PEM).
    pub cert_pem: String,
    /// Its private key (PKCS#8 PEM, `-----BEGIN PRIVATE KEY-----`).
    pub key_pem: String,
    /// RFC 8705 §3.1 `x5t#S256`: base64url (no padding) of the SHA-256 of the leaf's DER.
    pub thumbprint: String,
}

impl ClientCert {
    /// Certificate and key in one PEM text, as `reqwest::Identity::from_pem` takes them.
    pub fn identity_pem(&self) -> String {
        format!("{}{}", self.cert_pem, self.key_pem)
    }
}

impl TestPki {
    /// A new CA (`CN=audience-token-operator test CA`) and a server certificate signed by it.
    pub fn generate() -> TestPki {
        let ca_key = KeyPair::generate().expect("CA key");
        let mut ca_params = params("audience-token-operator test CA", Vec::new());
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca_params.self_signed(&ca_key).expect("CA certificate");
        let ca = Issuer::new(ca_params, ca_key);

        let server_key = KeyPair::generate().expect("server key");
        let mut server_params = params(
            "127.0.0.1",
            vec!["127.0.0.1".to_owned(), "localhost".to_owned()],
        );
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_cert = server_params
            .signed_by(&server_key, &ca)
            .expect("server certificate");

        TestPki {
            ca_pem: ca_cert.pem(),
            server_cert_pem: server_cert.pem(),
            server_key_pem: server_key.serialize_pem(),
            ca,
        }
    }

    /// A client certificate (EKU clientAuth) for subject `CN=<common_name>`, signed by the CA.
    /// Every call makes a new key and certificate: two calls with one name are a certificate
    /// and its renewal (as cert-manager would issue them), with different thumbprints.
    pub fn client(&self, common_name: &str) -> ClientCert {
        let key = KeyPair::generate().expect("client key");
        let cert = client_params(common_name)
            .signed_by(&key, &self.ca)
            .expect("client certificate");
        client_cert(&cert, &key)
    }
}

/// A self-signed client certificate (EKU clientAuth) for subject `CN=<common_name>`, for
/// RFC 8705 §2.2 `self_signed_tls_client_auth`. A new key and certificate at every call.
pub fn self_signed(common_name: &str) -> ClientCert {
    let key = KeyPair::generate().expect("client key");
    let cert = client_params(common_name)
        .self_signed(&key)
        .expect("self-signed client certificate");
    client_cert(&cert, &key)
}

fn client_params(common_name: &str) -> CertificateParams {
    let mut params = params(common_name, Vec::new());
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    params
}

fn client_cert(cert: &rcgen::Certificate, key: &KeyPair) -> ClientCert {
    ClientCert {
        cert_pem: cert.pem(),
        key_pem: key.serialize_pem(),
        thumbprint: URL_SAFE_NO_PAD.encode(Sha256::digest(cert.der())),
    }
}

/// Parameters with subject `CN=<common_name>`, the given SANs, valid from an hour ago for
/// two days. The serial number is derived from the public key (rcgen's default), so every
/// new key gives a new serial.
fn params(common_name: &str, subject_alt_names: Vec<String>) -> CertificateParams {
    let mut params = CertificateParams::new(subject_alt_names).expect("subject alt names");
    let mut subject = DistinguishedName::new();
    subject.push(DnType::CommonName, common_name);
    params.distinguished_name = subject;
    let now = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs(),
    )
    .expect("time fits");
    params.not_before = time::OffsetDateTime::from_unix_timestamp(now - BACKDATE_SECS)
        .expect("not_before in range");
    params.not_after =
        time::OffsetDateTime::from_unix_timestamp(now + VALID_SECS).expect("not_after in range");
    params
}
