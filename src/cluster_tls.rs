//! Mutual TLS on the cluster stream, as Kong's `cluster_mtls`:
//!
//! * `shared`: every node has the same certificate and key
//!   (`cluster_cert`, `cluster_cert_key`; `gatehouse cluster gen-cert`
//!   makes a pair). Each side accepts only a peer presenting exactly that
//!   certificate.
//! * `pki`: each node has its own certificate, issued by the CA in
//!   `cluster_ca_cert`; each side verifies the other's chain against it,
//!   and the data plane checks the control plane's name.

use std::path::Path;
use std::sync::Arc;

use anyhow::Context as _;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};

use crate::config::Config;

/// The name a `shared` certificate carries, as Kong's.
pub(crate) const SHARED_NAME: &str = "kong_clustering";

#[derive(Clone)]
pub(crate) struct ClusterTls {
    pub(crate) server: Arc<ServerConfig>,
    pub(crate) client: Arc<ClientConfig>,
    /// The name the data plane expects the control plane's certificate to
    /// carry.
    pub(crate) server_name: ServerName<'static>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read_chain(path: &Path) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let chain: Vec<_> = CertificateDer::pem_file_iter(path)
        .with_context(|| format!("cannot read {}", path.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("{} holds no valid PEM certificate", path.display()))?;
    anyhow::ensure!(!chain.is_empty(), "{} holds no certificate", path.display());
    Ok(chain)
}

fn read_key(path: &Path) -> anyhow::Result<PrivateKeyDer<'static>> {
    PrivateKeyDer::from_pem_file(path)
        .with_context(|| format!("cannot read a private key from {}", path.display()))
}

/// The TLS settings of a cluster node from `cfg`. `control_plane` is the
/// data plane's `cluster_control_plane`, whose host `pki` mode verifies.
pub(crate) fn load(cfg: &Config, control_plane: Option<&str>) -> anyhow::Result<ClusterTls> {
    let cert_path = cfg
        .cluster_cert
        .as_deref()
        .context("cluster_cert is not set: cluster nodes authenticate each other with it (gatehouse cluster gen-cert makes one)")?;
    let key_path = cfg
        .cluster_cert_key
        .as_deref()
        .context("cluster_cert_key is not set")?;
    let chain = read_chain(cert_path)?;
    let key = read_key(key_path)?;
    let provider = provider();
    let (client_verifier, server_verifier, server_name): (
        Arc<dyn ClientCertVerifier>,
        Arc<dyn ServerCertVerifier>,
        ServerName<'static>,
    ) = match cfg.cluster_mtls.as_str() {
        "shared" => {
            let pinned = Arc::new(Pinned {
                certificate: chain[0].clone(),
                provider: Arc::clone(&provider),
            });
            (
                Arc::clone(&pinned) as Arc<dyn ClientCertVerifier>,
                pinned,
                ServerName::try_from(SHARED_NAME).context("invalid name")?,
            )
        }
        "pki" => {
            let ca_path = cfg
                .cluster_ca_cert
                .as_deref()
                .context("cluster_mtls = pki needs cluster_ca_cert")?;
            let mut roots = RootCertStore::empty();
            for ca in read_chain(ca_path)? {
                roots.add(ca).context("invalid cluster_ca_cert")?;
            }
            let roots = Arc::new(roots);
            let client = WebPkiClientVerifier::builder_with_provider(
                Arc::clone(&roots),
                Arc::clone(&provider),
            )
            .build()
            .context("cannot build the client certificate verifier")?;
            let server = rustls::client::WebPkiServerVerifier::builder_with_provider(
                roots,
                Arc::clone(&provider),
            )
            .build()
            .context("cannot build the server certificate verifier")?;
            let host = control_plane
                .and_then(|cp| cp.rsplit_once(':').map(|(host, _)| host))
                .unwrap_or(SHARED_NAME)
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned();
            let name = ServerName::try_from(host).context("invalid cluster_control_plane host")?;
            (client, server, name)
        }
        other => anyhow::bail!("cluster_mtls must be shared or pki, not {other:?}"),
    };
    let mut server = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .with_client_cert_verifier(client_verifier)
        .with_single_cert(chain.clone(), key.clone_key())
        .context("cluster_cert and cluster_cert_key do not match")?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    // ALPN (h2) is set by the HTTPS connector the data plane builds.
    let client = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS versions")?
        .dangerous()
        .with_custom_certificate_verifier(server_verifier)
        .with_client_auth_cert(chain, key)
        .context("cluster_cert and cluster_cert_key do not match")?;
    Ok(ClusterTls {
        server: Arc::new(server),
        client: Arc::new(client),
        server_name,
    })
}

/// `shared` mode: the peer must present exactly our certificate.
#[derive(Debug)]
struct Pinned {
    certificate: CertificateDer<'static>,
    provider: Arc<CryptoProvider>,
}

/// Handshake signatures are checked the same way on both sides.
impl Pinned {
    fn tls12(
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

    fn tls13(
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

    fn schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }

    fn check(&self, presented: &CertificateDer<'_>) -> Result<(), rustls::Error> {
        if presented.as_ref() == self.certificate.as_ref() {
            Ok(())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }
}

impl ServerCertVerifier for Pinned {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for Pinned {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.check(end_entity)
            .map(|()| ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.schemes()
    }
}

/// `gatehouse cluster gen-cert`: a self-signed pair for `shared` mode,
/// valid `days` days, the key readable by its owner only.
pub(crate) fn gen_cert(cert: &Path, key: &Path, days: u32) -> anyhow::Result<()> {
    anyhow::ensure!(
        !cert.exists() && !key.exists(),
        "{} or {} already exists; not overwriting",
        cert.display(),
        key.display()
    );
    let key_pair = rcgen::KeyPair::generate().context("cannot generate a key")?;
    let mut params = rcgen::CertificateParams::new(vec![SHARED_NAME.to_owned()])
        .context("invalid certificate name")?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, SHARED_NAME);
    let now = std::time::SystemTime::now();
    params.not_before = now.into();
    params.not_after = (now + std::time::Duration::from_secs(u64::from(days) * 86_400)).into();
    let certificate = params
        .self_signed(&key_pair)
        .context("cannot sign the certificate")?;
    std::fs::write(cert, certificate.pem())
        .with_context(|| format!("cannot write {}", cert.display()))?;
    write_private(key, &key_pair.serialize_pem())
}

#[cfg(unix)]
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    file.write_all(text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

#[cfg(not(unix))]
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    std::fs::write(path, text).with_context(|| format!("cannot write {}", path.display()))
}
