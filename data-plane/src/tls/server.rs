//! Downstream TLS: the SNI index built with each runtime and the resolver
//! that reads it during handshakes.

use std::collections::HashMap;
use std::fmt;
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{ServerConfig, SignatureScheme};

use super::{parse_chain, parse_key, provider, CertificateEntity, SniEntity, TlsError};
use crate::DataPlane;

/// The certificate served when no `snis` entity matches the client's name,
/// or when the client sends none: Kong's `ssl_cert`, or the certificate
/// generated under the prefix.
#[derive(Clone, Debug)]
pub struct DefaultCertificate(Arc<ServedCertificate>);

impl DefaultCertificate {
    /// Loads a PEM certificate chain (leaf first) and its private key
    /// (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem(cert: &str, key: &str) -> Result<DefaultCertificate, TlsError> {
        Ok(DefaultCertificate(Arc::new(ServedCertificate {
            main: certified_key(cert, key)?,
            alt: None,
        })))
    }

    /// DER of the leaf certificate, to tell certificates apart.
    pub fn leaf_der(&self) -> &[u8] {
        self.0.main.cert.first().map_or(&[], |der| der.as_ref())
    }
}

/// A certificate ready for handshakes: the main chain and key, and Kong's
/// alternate pair (`cert_alt`/`key_alt`, usually ECDSA beside RSA).
#[derive(Debug)]
pub(crate) struct ServedCertificate {
    main: Arc<CertifiedKey>,
    alt: Option<Arc<CertifiedKey>>,
}

impl ServedCertificate {
    pub(crate) fn from_entity(entity: &CertificateEntity) -> Result<ServedCertificate, TlsError> {
        let main = certified_key(&entity.cert, &entity.key)?;
        let alt = match (&entity.cert_alt, &entity.key_alt) {
            (Some(cert), Some(key)) => Some(certified_key(cert, key)?),
            _ => None,
        };
        Ok(ServedCertificate { main, alt })
    }

    /// The main pair, unless the client cannot verify its signatures and
    /// can verify the alternate's.
    fn choose(&self, offered: &[SignatureScheme]) -> Arc<CertifiedKey> {
        if let Some(alt) = &self.alt {
            if self.main.key.choose_scheme(offered).is_none()
                && alt.key.choose_scheme(offered).is_some()
            {
                return Arc::clone(alt);
            }
        }
        Arc::clone(&self.main)
    }
}

fn certified_key(cert: &str, key: &str) -> Result<Arc<CertifiedKey>, TlsError> {
    let chain = parse_chain(cert)?;
    let key = parse_key(key)?;
    CertifiedKey::from_der(chain, key, &provider())
        .map(Arc::new)
        .map_err(|source| TlsError::Key { source })
}

/// The certificates of a runtime by server name.
pub(crate) type CertificateIndex = SniIndex<Arc<ServedCertificate>>;

/// Values by server name, with Kong's precedence: the exact name, then a
/// leading wildcard (`*.example.com` for `a.example.com`), then a trailing
/// one (`example.*` for `example.com`), then the SNI `*`.
pub(crate) struct SniIndex<T> {
    exact: HashMap<Box<str>, T>,
    /// `*.example.com`, keyed by `example.com`.
    leading: HashMap<Box<str>, T>,
    /// `example.*`, keyed by `example`.
    trailing: HashMap<Box<str>, T>,
    /// The SNI `*`.
    catch_all: Option<T>,
}

impl<T> Default for SniIndex<T> {
    fn default() -> Self {
        SniIndex {
            exact: HashMap::new(),
            leading: HashMap::new(),
            trailing: HashMap::new(),
            catch_all: None,
        }
    }
}

impl CertificateIndex {
    /// Indexes `snis` over the certificates that loaded. An SNI whose
    /// certificate is missing or did not load is left out, so its clients
    /// get the default certificate.
    pub(crate) fn from_snis(
        snis: &[SniEntity],
        certificates: &HashMap<&str, Arc<ServedCertificate>>,
    ) -> CertificateIndex {
        SniIndex::build(snis.iter().filter_map(|sni| {
            let certificate = certificates.get(sni.certificate.id.as_str())?;
            Some((sni.name.as_str(), Arc::clone(certificate)))
        }))
    }
}

impl<T> SniIndex<T> {
    pub(crate) fn build<'n>(entries: impl IntoIterator<Item = (&'n str, T)>) -> SniIndex<T> {
        let mut index = SniIndex::default();
        for (name, certificate) in entries {
            let name = name.trim_end_matches('.').to_ascii_lowercase();
            if name == "*" {
                index.catch_all = Some(certificate);
            } else if let Some(suffix) = name.strip_prefix("*.") {
                index.leading.insert(suffix.into(), certificate);
            } else if let Some(prefix) = name.strip_suffix(".*") {
                index.trailing.insert(prefix.into(), certificate);
            } else {
                index.exact.insert(name.into(), certificate);
            }
        }
        index
    }

    /// The value for a client's server name; `None` means the default.
    pub(crate) fn find(&self, server_name: Option<&str>) -> Option<&T> {
        // Kong serves the default certificate to clients without SNI,
        // whatever the SNI `*` says.
        let name = server_name?.trim_end_matches('.');
        let lowered;
        let name = if name.bytes().any(|b| b.is_ascii_uppercase()) {
            lowered = name.to_ascii_lowercase();
            lowered.as_str()
        } else {
            name
        };
        if let Some(found) = self.exact.get(name) {
            return Some(found);
        }
        // Kong's `*.` lookup replaces the first label and needs two more.
        if let Some((_, rest)) = name.split_once('.') {
            if rest.contains('.') {
                if let Some(found) = self.leading.get(rest) {
                    return Some(found);
                }
            }
        }
        // Its `.*` lookup replaces the last label.
        if let Some((rest, _)) = name.rsplit_once('.') {
            if let Some(found) = self.trailing.get(rest) {
                return Some(found);
            }
        }
        self.catch_all.as_ref()
    }

    pub(crate) fn len(&self) -> usize {
        self.exact.len()
            + self.leading.len()
            + self.trailing.len()
            + usize::from(self.catch_all.is_some())
    }
}

/// The server config of every TLS proxy listener of `dp`. ALPN offers h2
/// and http/1.1.
pub(crate) fn server_config(dp: &Arc<DataPlane>) -> Result<Arc<ServerConfig>, TlsError> {
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Config {
            side: "server",
            source,
        })?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { dp: Arc::clone(dp) }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // Kong's `ssl_session_tickets = on`; without a ticketer the session
    // cache still resumes sessions.
    if let Ok(ticketer) = rustls::crypto::ring::Ticketer::new() {
        config.ticketer = ticketer;
    }
    Ok(Arc::new(config))
}

/// Picks the certificate from the runtime in use: one atomic load, no lock.
struct SniResolver {
    dp: Arc<DataPlane>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver").finish_non_exhaustive()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let runtime = self.dp.runtime.load();
        let served = match runtime.certificates.find(client_hello.server_name()) {
            Some(served) => served,
            None => &self.dp.cfg.default_certificate.as_ref()?.0,
        };
        Some(served.choose(client_hello.signature_schemes()))
    }
}
