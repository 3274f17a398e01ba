//! TLS on both sides of the proxy, with rustls and its ring provider.
//!
//! Downstream, a listener flagged `ssl` terminates TLS with one rustls
//! server config whose certificate resolver reads the runtime in use: the
//! SNI index of `certificates` and `snis` entities is built with the runtime
//! (off the handshake path) and published with it, so a certificate change
//! reaches the next handshake without a restart and without a lock. Names
//! are matched with Kong's rules (exact, then `*.example.com`, then
//! `example.*`, then the SNI `*`); a client that sends no SNI, or one that
//! matches nothing, gets the default certificate (`ssl_cert`, or the one
//! generated under the prefix).
//!
//! Upstream, a service with `protocol = "https"` gets a rustls client
//! config from its `tls_verify`, `tls_verify_depth`, `ca_certificates` and
//! `client_certificate`. Services with equal settings share a config and
//! its connection pool, which outlives config versions like every pool.

mod client;
mod server;

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use serde::Deserialize;

pub use server::DefaultCertificate;

pub(crate) use client::{client_config, UpstreamTls};
#[cfg(test)]
use server::SniIndex;
pub(crate) use server::{server_config, CertificateIndex, ServedCertificate};

/// Why a certificate, key or trust store could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("invalid PEM {what}")]
    Pem {
        what: &'static str,
        #[source]
        source: rustls_pki_types::pem::Error,
    },
    #[error("no certificate in the PEM data")]
    NoCertificate,
    #[error("unusable private key")]
    Key {
        #[source]
        source: rustls::Error,
    },
    #[error("invalid CA certificate")]
    CaCertificate {
        #[source]
        source: rustls::Error,
    },
    #[error("cannot build the certificate verifier")]
    Verifier {
        #[source]
        source: rustls::client::VerifierBuilderError,
    },
    #[error("cannot build the {side} TLS configuration")]
    Config {
        side: &'static str,
        #[source]
        source: rustls::Error,
    },
    #[error("certificate {certificate_id} is unusable")]
    Certificate {
        certificate_id: Box<str>,
        #[source]
        source: Box<TlsError>,
    },
    #[error("certificate {certificate_id} does not exist")]
    UnknownCertificate { certificate_id: Box<str> },
    #[error("{name:?} is not a valid TLS server name")]
    ServerName { name: Box<str> },
    #[error("CA certificate {ca_certificate_id} does not exist")]
    UnknownCaCertificate { ca_certificate_id: Box<str> },
}

/// The one crypto provider every TLS config names, so a second provider
/// compiled into the process cannot change which one is used.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| Arc::new(rustls::crypto::ring::default_provider())))
}

/// Every certificate of a PEM bundle, leaf first.
pub(crate) fn parse_chain(pem: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let chain = CertificateDer::pem_slice_iter(pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem {
            what: "certificate",
            source,
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate);
    }
    Ok(chain)
}

pub(crate) fn parse_key(pem: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem.as_bytes()).map_err(|source| TlsError::Pem {
        what: "private key",
        source,
    })
}

/// The TLS entities of a snapshot, in the fields the data plane reads.
#[derive(Deserialize)]
pub(crate) struct CertificateEntity {
    pub(crate) id: String,
    pub(crate) cert: String,
    pub(crate) key: String,
    pub(crate) cert_alt: Option<String>,
    pub(crate) key_alt: Option<String>,
}

#[derive(Deserialize)]
pub(crate) struct SniEntity {
    pub(crate) name: String,
    pub(crate) certificate: gatehouse_model::snapshot::ForeignRef,
}

#[derive(Deserialize)]
pub(crate) struct CaCertificateEntity {
    pub(crate) id: String,
    pub(crate) cert: String,
}

/// The TLS fields of a service that `gatehouse_model::snapshot::Service`
/// does not carry.
#[derive(Deserialize)]
pub(crate) struct ServiceTlsFields {
    pub(crate) id: String,
    pub(crate) tls_verify_depth: Option<u8>,
    pub(crate) ca_certificates: Option<Vec<String>>,
    pub(crate) client_certificate: Option<gatehouse_model::snapshot::ForeignRef>,
}

#[cfg(test)]
mod tests;
