//! PEM certificates and keys: enough X.509 to validate what the Admin API
//! accepts (parseable, CA flag, expiry, digest).

use sha2::{Digest, Sha256};
use x509_parser::pem::Pem;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PemError {
    #[error("PEM_read_bio_X509_AUX() failed")]
    NotPem,
    #[error("{0}")]
    BadDer(String),
}

/// What the Admin API needs to know about a certificate.
#[derive(Debug, Clone)]
pub struct CertInfo {
    pub der: Vec<u8>,
    pub is_ca: bool,
    pub not_after: i64,
    /// The DER of the SubjectPublicKeyInfo, to compare with a key.
    pub public_key: Vec<u8>,
}

fn first_pem(text: &str, want_label: impl Fn(&str) -> bool) -> Result<Pem, PemError> {
    for pem in Pem::iter_from_buffer(text.as_bytes()) {
        match pem {
            Ok(p) if want_label(&p.label) => return Ok(p),
            Ok(_) => continue,
            Err(_) => return Err(PemError::NotPem),
        }
    }
    Err(PemError::NotPem)
}

pub fn parse_certificate(text: &str) -> Result<CertInfo, PemError> {
    let pem = first_pem(text, |l| l == "CERTIFICATE")?;
    let (_, cert) = x509_parser::parse_x509_certificate(&pem.contents)
        .map_err(|e| PemError::BadDer(e.to_string()))?;
    let is_ca = cert
        .basic_constraints()
        .ok()
        .flatten()
        .is_some_and(|bc| bc.value.ca);
    Ok(CertInfo {
        is_ca,
        not_after: cert.validity().not_after.timestamp(),
        public_key: cert.public_key().raw.to_vec(),
        der: pem.contents.clone(),
    })
}

pub fn parse_private_key(text: &str) -> Result<Vec<u8>, PemError> {
    let pem = first_pem(text, |l| l.ends_with("PRIVATE KEY"))
        .map_err(|_| PemError::BadDer("PEM_read_bio_PrivateKey() failed".into()))?;
    // A key is a DER SEQUENCE; anything else cannot be loaded.
    if pem.contents.first() != Some(&0x30) {
        return Err(PemError::BadDer("PEM_read_bio_PrivateKey() failed".into()));
    }
    Ok(pem.contents)
}

/// Hex SHA-256 of the certificate's DER (Kong's `cert_digest`).
pub fn digest_hex(info: &CertInfo) -> String {
    hex::encode(Sha256::digest(&info.der))
}

/// How many certificates a PEM bundle holds.
pub fn count_certificates(text: &str) -> usize {
    text.matches("-----BEGIN CERTIFICATE-----").count()
}

/// Check that a certificate and a private key belong together, when both
/// are present and of a kind we can compare (RSA and EC keys).
pub fn check_pair(
    cert: Option<&serde_json::Value>,
    key: Option<&serde_json::Value>,
    err: &str,
) -> Result<(), String> {
    let (Some(cert), Some(key)) = (cert.and_then(|v| v.as_str()), key.and_then(|v| v.as_str()))
    else {
        return Ok(());
    };
    let (Ok(info), Ok(key_der)) = (parse_certificate(cert), parse_private_key(key)) else {
        return Ok(());
    };
    match key_public_part(&key_der) {
        Some(KeyPublic::Rsa(modulus)) => {
            let cert_modulus = cert_rsa_modulus(&info.public_key);
            match cert_modulus {
                Some(m) if strip_zeros(&m) == strip_zeros(&modulus) => Ok(()),
                _ => Err(err.to_owned()),
            }
        }
        Some(KeyPublic::Ec(point)) => {
            if spki_key_bits(&info.public_key).is_some_and(|bits| bits == point) {
                Ok(())
            } else {
                Err(err.to_owned())
            }
        }
        None => Ok(()),
    }
}

enum KeyPublic {
    Rsa(Vec<u8>),
    Ec(Vec<u8>),
}

fn strip_zeros(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|x| **x == 0).count();
    &b[n..]
}

use x509_parser::der_parser::ber::BerObjectContent;
use x509_parser::der_parser::der::parse_der;

fn seq<'a, 'b>(
    obj: &'b x509_parser::der_parser::der::DerObject<'a>,
) -> Option<&'b [x509_parser::der_parser::der::DerObject<'a>]> {
    match &obj.content {
        BerObjectContent::Sequence(items) => Some(items),
        _ => None,
    }
}

fn int_bytes(obj: &x509_parser::der_parser::der::DerObject<'_>) -> Option<Vec<u8>> {
    match &obj.content {
        BerObjectContent::Integer(b) => Some(b.to_vec()),
        _ => None,
    }
}

fn key_public_part(der: &[u8]) -> Option<KeyPublic> {
    let (_, top) = parse_der(der).ok()?;
    let items = seq(&top)?;
    // PKCS#8: version, algorithm, OCTET STRING(inner key).
    if items.len() >= 3 {
        if let BerObjectContent::OctetString(inner) = &items[2].content {
            return key_public_part(inner);
        }
    }
    // PKCS#1 RSAPrivateKey: version, n, e, d, ...
    if items.len() >= 9 {
        return int_bytes(&items[1]).map(KeyPublic::Rsa);
    }
    // SEC1 ECPrivateKey: version, d, [0] params, [1] public key.
    for item in items.iter().skip(2) {
        if item.header.tag().0 == 1 {
            let BerObjectContent::Unknown(any) = &item.content else {
                continue;
            };
            let (_, bits) = parse_der(any.data).ok()?;
            if let BerObjectContent::BitString(_, b) = bits.content {
                return Some(KeyPublic::Ec(b.data.to_vec()));
            }
        }
    }
    None
}

fn spki_key_bits(spki: &[u8]) -> Option<Vec<u8>> {
    let (_, top) = parse_der(spki).ok()?;
    let items = seq(&top)?;
    match &items.get(1)?.content {
        BerObjectContent::BitString(_, b) => Some(b.data.to_vec()),
        _ => None,
    }
}

fn cert_rsa_modulus(spki: &[u8]) -> Option<Vec<u8>> {
    let bits = spki_key_bits(spki)?;
    let (_, rsa) = parse_der(&bits).ok()?;
    let items = seq(&rsa)?;
    int_bytes(items.first()?)
}
