//! Upstream TLS: a rustls client config from a service's TLS settings.

use std::fmt;
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, OtherError, RootCertStore,
    SignatureScheme,
};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use super::{parse_chain, parse_key, provider, TlsError};

/// What decides an upstream client config: services with equal settings
/// share one config and one connection pool. Certificates are compared by
/// content, so editing a `ca_certificates` entity yields a new config.
#[derive(Clone, Default, PartialEq, Eq)]
pub(crate) struct UpstreamTls {
    /// Kong's `tls_verify`. Off unless the service turns it on, as Kong's
    /// `proxy_ssl_verify` is off by default.
    pub(crate) verify: bool,
    /// Kong's `tls_verify_depth`: how many intermediates the upstream may
    /// present. `None`: no limit.
    pub(crate) verify_depth: Option<u8>,
    /// PEM of the service's `ca_certificates`; empty means the bundled
    /// Mozilla roots.
    pub(crate) trusted: Vec<Arc<str>>,
    /// PEM certificate chain and key of the service's `client_certificate`.
    pub(crate) client_certificate: Option<(Arc<str>, Arc<str>)>,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("verify", &self.verify)
            .field("verify_depth", &self.verify_depth)
            .field("trusted", &self.trusted.len())
            .field("client_certificate", &self.client_certificate.is_some())
            .finish()
    }
}

/// Builds the client config for `tls`; only at runtime build time.
pub(crate) fn client_config(tls: &UpstreamTls) -> Result<ClientConfig, TlsError> {
    let provider = provider();
    let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Config {
            side: "client",
            source,
        })?;
    let verifier: Arc<dyn ServerCertVerifier> = if tls.verify {
        let roots = if tls.trusted.is_empty() {
            web_pki_roots()
        } else {
            let mut roots = RootCertStore::empty();
            for pem in &tls.trusted {
                for der in parse_chain(pem)? {
                    roots
                        .add(der)
                        .map_err(|source| TlsError::CaCertificate { source })?;
                }
            }
            Arc::new(roots)
        };
        let web_pki = WebPkiServerVerifier::builder_with_provider(roots, Arc::clone(&provider))
            .build()
            .map_err(|source| TlsError::Verifier { source })?;
        match tls.verify_depth {
            Some(depth) => Arc::new(DepthLimited {
                inner: web_pki,
                max_intermediates: usize::from(depth),
            }),
            None => web_pki,
        }
    } else {
        Arc::new(Unverified { provider })
    };
    let builder = builder
        .dangerous()
        .with_custom_certificate_verifier(verifier);
    match &tls.client_certificate {
        Some((cert, key)) => builder
            .with_client_auth_cert(parse_chain(cert)?, parse_key(key)?)
            .map_err(|source| TlsError::Key { source }),
        None => Ok(builder.with_no_client_auth()),
    }
}

fn web_pki_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    Arc::clone(ROOTS.get_or_init(|| {
        Arc::new(RootCertStore {
            roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
        })
    }))
}

/// `tls_verify = false`: any certificate is accepted, but the handshake
/// signatures are still checked against the certificate presented.
#[derive(Debug)]
struct Unverified {
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Unverified {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// `tls_verify_depth`: web PKI verification that also refuses chains with
/// more intermediates than allowed. rustls does not expose the path it
/// built, so this counts the intermediates the upstream presents (nginx
/// counts those of the verified path).
#[derive(Debug)]
struct DepthLimited {
    inner: Arc<WebPkiServerVerifier>,
    max_intermediates: usize,
}

#[derive(Debug, thiserror::Error)]
#[error("the upstream presented {presented} intermediate certificates; tls_verify_depth allows {allowed}")]
struct ChainTooDeep {
    presented: usize,
    allowed: usize,
}

impl ServerCertVerifier for DepthLimited {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if intermediates.len() > self.max_intermediates {
            return Err(rustls::Error::InvalidCertificate(CertificateError::Other(
                OtherError(Arc::new(ChainTooDeep {
                    presented: intermediates.len(),
                    allowed: self.max_intermediates,
                })),
            )));
        }
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}
