//! The default certificate of `ssl` proxy listeners: `ssl_cert` and
//! `ssl_cert_key` when set; otherwise a self-signed certificate that the
//! first start generates under `$prefix/ssl/`, as Kong does, and later
//! starts reuse.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use gatehouse_data_plane::DefaultCertificate;

use crate::config::Config;

const CERT_FILE: &str = "gatehouse-default.crt";
const KEY_FILE: &str = "gatehouse-default.key";

pub(crate) fn default_certificate(cfg: &Config) -> anyhow::Result<DefaultCertificate> {
    let (cert_path, key_path) = match (&cfg.ssl_cert, &cfg.ssl_cert_key) {
        (Some(cert), Some(key)) => (cert.clone(), key.clone()),
        _ => generated(&cfg.prefix.join("ssl"))?,
    };
    let cert = read(&cert_path)?;
    let key = read(&key_path)?;
    DefaultCertificate::from_pem(&cert, &key).with_context(|| {
        format!(
            "cannot use {} and {} as the default certificate",
            cert_path.display(),
            key_path.display()
        )
    })
}

fn read(path: &Path) -> anyhow::Result<String> {
    std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))
}

/// The generated pair's paths, generating it when either file is missing.
fn generated(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf)> {
    let cert_path = dir.join(CERT_FILE);
    let key_path = dir.join(KEY_FILE);
    if cert_path.exists() && key_path.exists() {
        return Ok((cert_path, key_path));
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (cert, key) = self_signed().context("cannot generate the default certificate")?;
    // The key first and each file renamed into place, so a crash never
    // leaves a certificate without its key or a half-written file.
    write_new(&key_path, key.as_bytes(), 0o600)?;
    write_new(&cert_path, cert.as_bytes(), 0o644)?;
    tracing::info!(path = %cert_path.display(), "Generated the default TLS certificate.");
    Ok((cert_path, key_path))
}

/// ECDSA P-256, `CN=localhost`, valid for about ten years.
fn self_signed() -> Result<(String, String), rcgen::Error> {
    let key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()])?;
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "localhost");
    params
        .distinguished_name
        .push(rcgen::DnType::OrganizationName, "Gatehouse");
    let now = std::time::SystemTime::now();
    params.not_before = (now - std::time::Duration::from_secs(86_400)).into();
    params.not_after = (now + std::time::Duration::from_secs(10 * 365 * 86_400)).into();
    let cert = params.self_signed(&key)?;
    Ok((cert.pem(), key.serialize_pem()))
}

fn write_new(path: &Path, contents: &[u8], mode: u32) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, mode);
    #[cfg(not(unix))]
    let _ = mode;
    let mut file = options
        .open(&tmp)
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    file.write_all(contents)
        .and_then(|()| file.sync_all())
        .with_context(|| format!("cannot write {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("cannot write {}", path.display()))
}
