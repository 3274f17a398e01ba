//! Process configuration. Sources, later ones winning: built-in defaults,
//! then `gatehouse.toml` (path from `--conf` or `GATEHOUSE_CONF`), then
//! `GATEHOUSE_*` environment variables. Key names follow `kong.conf`.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

mod nginx;

pub(crate) use nginx::{HeaderBuffers, Size, Time};

/// Every key, so that unrelated `GATEHOUSE_*` variables in the environment
/// (such as `GATEHOUSE_BIN` in benchmark scripts) are not read as settings.
const KEYS: &[&str] = &[
    "prefix",
    "admin_listen",
    "proxy_listen",
    "status_listen",
    "cluster_listen",
    "cluster_control_plane",
    "cluster_mtls",
    "cluster_cert",
    "cluster_cert_key",
    "cluster_ca_cert",
    "database_url",
    "worker_threads",
    "log_level",
    "log_format",
    "proxy_access_log",
    "admin_access_log",
    "shutdown_grace_seconds",
    "ssl_cert",
    "ssl_cert_key",
    "nginx_http_client_max_body_size",
    "nginx_http_client_header_timeout",
    "nginx_http_keepalive_timeout",
    "nginx_http_large_client_header_buffers",
    "proxy_max_connections",
    "plugins",
    "cluster_dp_labels",
];

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct Config {
    /// Working directory: SQLite file, pid file, caches. Default `./gatehouse`.
    pub prefix: PathBuf,
    /// Admin API listeners. Default `127.0.0.1:8001`.
    pub admin_listen: String,
    /// Proxy listeners. Default `0.0.0.0:8000, 0.0.0.0:8443 ssl`.
    pub proxy_listen: String,
    /// Status listener of a data plane. Default `off` in standalone.
    pub status_listen: String,
    /// Control-plane endpoint for data planes. Default `0.0.0.0:8005`.
    pub cluster_listen: String,
    /// The control plane a data plane connects to. No default.
    pub cluster_control_plane: Option<String>,
    /// `shared` or `pki`. Default `shared`.
    pub cluster_mtls: String,
    pub cluster_cert: Option<PathBuf>,
    pub cluster_cert_key: Option<PathBuf>,
    pub cluster_ca_cert: Option<PathBuf>,
    /// `sqlite://…` or `postgres://…`. Default `sqlite://$prefix/gatehouse.db`.
    pub database_url: Option<String>,
    /// Tokio worker threads. Default: the number of cores.
    pub worker_threads: Option<usize>,
    /// A tracing filter. Default `info`.
    pub log_level: String,
    /// `human` or `json`. Default `human`.
    pub log_format: String,
    /// `off` or a destination (`stdout`). Default `off`.
    pub proxy_access_log: String,
    /// `off` or `stdout`. Default `off`.
    pub admin_access_log: String,
    /// How long in-flight requests may finish after SIGTERM. Default 10.
    pub shutdown_grace_seconds: u64,
    /// PEM certificate chain served on `ssl` proxy listeners when no SNI
    /// matches. Default: none, and a self-signed certificate is generated
    /// under `$prefix/ssl/` at the first start.
    pub ssl_cert: Option<PathBuf>,
    /// PEM private key of `ssl_cert`. Default: none.
    pub ssl_cert_key: Option<PathBuf>,
    /// Largest request body; `0` means unlimited. Default `0`.
    pub nginx_http_client_max_body_size: Size,
    /// Time a client has to send a request head (and to finish a TLS
    /// handshake). Default `60s`.
    pub nginx_http_client_header_timeout: Time,
    /// Time a proxy connection may stay idle between requests. Default `60s`.
    pub nginx_http_keepalive_timeout: Time,
    /// Request head limits: one buffer bounds a line, all of them the head.
    /// Default `4 8k`.
    pub nginx_http_large_client_header_buffers: HeaderBuffers,
    /// Most proxy connections open at once; more wait in the listen
    /// backlog. Default 16384.
    pub proxy_max_connections: usize,
    /// Kong's `plugins`: `bundled` (every plugin Gatehouse has), `off`, or
    /// a comma-separated list of names. A data plane refuses (Nacks) a
    /// configuration that uses a plugin outside it. Default `bundled`.
    pub plugins: String,
    /// Kong's `cluster_dp_labels`: `key:value` pairs, comma-separated, that
    /// a data plane reports to the control plane. Default none.
    pub cluster_dp_labels: String,
}

impl Default for Config {
    fn default() -> Config {
        Config {
            prefix: PathBuf::from("./gatehouse"),
            admin_listen: "127.0.0.1:8001".into(),
            proxy_listen: "0.0.0.0:8000, 0.0.0.0:8443 ssl".into(),
            status_listen: "off".into(),
            cluster_listen: "0.0.0.0:8005".into(),
            cluster_control_plane: None,
            cluster_mtls: "shared".into(),
            cluster_cert: None,
            cluster_cert_key: None,
            cluster_ca_cert: None,
            database_url: None,
            worker_threads: None,
            log_level: "info".into(),
            log_format: "human".into(),
            proxy_access_log: "off".into(),
            admin_access_log: "off".into(),
            shutdown_grace_seconds: 10,
            ssl_cert: None,
            ssl_cert_key: None,
            nginx_http_client_max_body_size: Size::parse("0").expect("0 is a valid size"),
            nginx_http_client_header_timeout: Time::parse("60s").expect("60s is a valid time"),
            nginx_http_keepalive_timeout: Time::parse("60s").expect("60s is a valid time"),
            nginx_http_large_client_header_buffers: HeaderBuffers::parse("4 8k")
                .expect("4 8k is a valid buffer setting"),
            proxy_max_connections: 16384,
            plugins: "bundled".into(),
            cluster_dp_labels: String::new(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("invalid configuration")]
    Figment(#[from] Box<figment::Error>),
    #[error("invalid {key} {value:?}: {reason}")]
    Invalid {
        key: &'static str,
        value: String,
        reason: String,
    },
}

/// One `*_listen` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Listen {
    pub addr: SocketAddr,
    pub ssl: bool,
    pub http2: bool,
}

impl Config {
    /// Build the figment: defaults → TOML file → environment.
    pub(crate) fn figment(conf: Option<&Path>) -> Figment {
        let conf = conf
            .map(Path::to_path_buf)
            .or_else(|| std::env::var_os("GATEHOUSE_CONF").map(PathBuf::from));
        let mut f = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = conf {
            f = f.merge(Toml::file_exact(path));
        }
        f.merge(Env::prefixed("GATEHOUSE_").only(KEYS))
    }

    pub(crate) fn load(conf: Option<&Path>) -> Result<Config, ConfigError> {
        let cfg: Config = Config::figment(conf).extract().map_err(Box::new)?;
        cfg.check()?;
        Ok(cfg)
    }

    fn check(&self) -> Result<(), ConfigError> {
        parse_listen("admin_listen", &self.admin_listen)?;
        parse_listen("proxy_listen", &self.proxy_listen)?;
        parse_listen("status_listen", &self.status_listen)?;
        parse_listen("cluster_listen", &self.cluster_listen)?;
        self.dp_labels()?;
        if !matches!(self.log_format.as_str(), "human" | "json") {
            return Err(ConfigError::Invalid {
                key: "log_format",
                value: self.log_format.clone(),
                reason: "expected human or json".into(),
            });
        }
        if !matches!(self.cluster_mtls.as_str(), "shared" | "pki") {
            return Err(ConfigError::Invalid {
                key: "cluster_mtls",
                value: self.cluster_mtls.clone(),
                reason: "expected shared or pki".into(),
            });
        }
        if self.worker_threads == Some(0) {
            return Err(ConfigError::Invalid {
                key: "worker_threads",
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        if let Err(e) = tracing_subscriber::EnvFilter::try_new(&self.log_level) {
            return Err(ConfigError::Invalid {
                key: "log_level",
                value: self.log_level.clone(),
                reason: e.to_string(),
            });
        }
        if self.ssl_cert.is_some() != self.ssl_cert_key.is_some() {
            return Err(ConfigError::Invalid {
                key: if self.ssl_cert.is_some() {
                    "ssl_cert_key"
                } else {
                    "ssl_cert"
                },
                value: String::new(),
                reason: "ssl_cert and ssl_cert_key go together".into(),
            });
        }
        if self.nginx_http_client_header_timeout.duration().is_zero() {
            return Err(ConfigError::Invalid {
                key: "nginx_http_client_header_timeout",
                value: self.nginx_http_client_header_timeout.to_string(),
                reason: "must be more than 0".into(),
            });
        }
        if self.proxy_max_connections == 0 {
            return Err(ConfigError::Invalid {
                key: "proxy_max_connections",
                value: "0".into(),
                reason: "must be at least 1".into(),
            });
        }
        if let Some(url) = &self.database_url {
            if !(url.starts_with("sqlite:")
                || url.starts_with("postgres://")
                || url.starts_with("postgresql://"))
            {
                return Err(ConfigError::Invalid {
                    key: "database_url",
                    value: url.clone(),
                    reason: "expected sqlite://… or postgres://…".into(),
                });
            }
        }
        Ok(())
    }

    pub(crate) fn database_url(&self) -> String {
        self.database_url
            .clone()
            .unwrap_or_else(|| format!("sqlite://{}", self.prefix.join("gatehouse.db").display()))
    }

    /// `cluster_dp_labels` as pairs. Kong's rule: keys and values of 1 to
    /// 63 characters from letters, digits, `.`, `-`, `_`, `~`, and `:`
    /// only as the separator.
    pub(crate) fn dp_labels(&self) -> Result<Vec<(String, String)>, ConfigError> {
        let valid = |part: &str| {
            (1..=63).contains(&part.len())
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '~'))
        };
        let mut labels = Vec::new();
        for item in self
            .cluster_dp_labels
            .split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            match item.split_once(':') {
                Some((key, value)) if valid(key) && valid(value) => {
                    labels.push((key.to_owned(), value.to_owned()));
                }
                _ => return Err(ConfigError::Invalid {
                    key: "cluster_dp_labels",
                    value: item.to_owned(),
                    reason:
                        "expected key:value, each 1 to 63 of letters, digits, '.', '-', '_', '~'"
                            .into(),
                }),
            }
        }
        Ok(labels)
    }

    /// The plugin names the `plugins` setting enables.
    pub(crate) fn enabled_plugins(&self) -> Vec<String> {
        let mut names = Vec::new();
        for item in self
            .plugins
            .split(',')
            .map(str::trim)
            .filter(|i| !i.is_empty())
        {
            match item {
                "bundled" => names.extend(
                    gatehouse_model::plugins::names()
                        .into_iter()
                        .map(str::to_owned),
                ),
                "off" => {}
                name => names.push(name.to_owned()),
            }
        }
        names.sort();
        names.dedup();
        names
    }

    /// The configuration as `GET /` shows it, secrets removed.
    pub(crate) fn public_json(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).unwrap_or_default();
        if let Some(url) = &self.database_url {
            v["database_url"] = serde_json::json!(gatehouse_control_plane::store::redact(url));
        }
        v["database"] = serde_json::json!(if self.database_url().starts_with("postgres") {
            "postgres"
        } else {
            "sqlite"
        });
        v["router_flavor"] = serde_json::json!("traditional_compatible");
        v["role"] = serde_json::json!("traditional");
        v
    }
}

/// Parse a Kong-style listen list: `127.0.0.1:8000, 0.0.0.0:8443 ssl`,
/// or `off`.
pub(crate) fn parse_listen(key: &'static str, value: &str) -> Result<Vec<Listen>, ConfigError> {
    let value = value.trim();
    if value.is_empty() || value == "off" {
        return Ok(Vec::new());
    }
    value
        .split(',')
        .map(|entry| {
            let mut words = entry.split_whitespace();
            let addr_s = words.next().unwrap_or("");
            let addr: SocketAddr =
                addr_s
                    .replace("localhost:", "127.0.0.1:")
                    .parse()
                    .map_err(|_| ConfigError::Invalid {
                        key,
                        value: entry.trim().to_owned(),
                        reason: "expected ip:port (e.g. 127.0.0.1:8001 or [::1]:8001)".into(),
                    })?;
            let mut listen = Listen {
                addr,
                ssl: false,
                http2: false,
            };
            for flag in words {
                match flag {
                    "ssl" => listen.ssl = true,
                    "http2" => listen.http2 = true,
                    "reuseport" | "deferred" | "bind" | "proxy_protocol" => {}
                    other => {
                        return Err(ConfigError::Invalid {
                            key,
                            value: entry.trim().to_owned(),
                            reason: format!("unknown flag {other:?}"),
                        })
                    }
                }
            }
            Ok(listen)
        })
        .collect()
}

#[cfg(test)]
#[expect(
    clippy::result_large_err,
    reason = "figment::Jail's closure returns figment::Error, which we do not choose"
)]
mod tests {
    use super::*;

    #[test]
    fn layers_defaults_file_env() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "g.toml",
                "admin_listen = \"127.0.0.1:9001\"\nlog_level = \"debug\"",
            )?;
            jail.set_env("GATEHOUSE_LOG_LEVEL", "warn");
            jail.set_env("GATEHOUSE_BIN", "/not/a/setting");
            let cfg = Config::load(Some(Path::new("g.toml"))).expect("valid config");
            assert_eq!(cfg.admin_listen, "127.0.0.1:9001");
            assert_eq!(cfg.log_level, "warn");
            assert_eq!(cfg.proxy_listen, "0.0.0.0:8000, 0.0.0.0:8443 ssl");
            Ok(())
        });
    }

    #[test]
    fn rejects_unknown_keys_and_bad_values() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("bad.toml", "no_such_key = 1")?;
            assert!(Config::load(Some(Path::new("bad.toml"))).is_err());
            jail.create_file("bad2.toml", "admin_listen = \"nowhere\"")?;
            let err = Config::load(Some(Path::new("bad2.toml"))).expect_err("bad listen");
            assert!(err.to_string().contains("admin_listen"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn data_plane_labels_follow_kongs_rules() {
        let with = |labels: &str| Config {
            cluster_dp_labels: labels.into(),
            ..Config::default()
        };
        assert_eq!(
            with("region:eu-west, tier:edge")
                .dp_labels()
                .expect("valid"),
            vec![
                ("region".to_owned(), "eu-west".to_owned()),
                ("tier".to_owned(), "edge".to_owned())
            ]
        );
        assert!(with("").dp_labels().expect("none").is_empty());
        for bad in ["region", "region:", ":x", "a b:c", "k:v:w"] {
            assert!(with(bad).dp_labels().is_err(), "{bad}");
        }
    }

    #[test]
    fn nginx_values_from_file_and_env() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "g.toml",
                "nginx_http_client_max_body_size = \"10m\"\nnginx_http_keepalive_timeout = 5",
            )?;
            jail.set_env("GATEHOUSE_NGINX_HTTP_CLIENT_HEADER_TIMEOUT", "1m30s");
            jail.set_env("GATEHOUSE_NGINX_HTTP_LARGE_CLIENT_HEADER_BUFFERS", "2 16k");
            let cfg = Config::load(Some(Path::new("g.toml"))).expect("valid config");
            assert_eq!(cfg.nginx_http_client_max_body_size.bytes(), 10 << 20);
            assert_eq!(cfg.nginx_http_keepalive_timeout.duration().as_secs(), 5);
            assert_eq!(
                cfg.nginx_http_client_header_timeout.duration().as_secs(),
                90
            );
            assert_eq!(
                cfg.nginx_http_large_client_header_buffers.total_bytes(),
                32 << 10
            );
            assert_eq!(cfg.public_json()["nginx_http_client_max_body_size"], "10m");

            jail.set_env("GATEHOUSE_NGINX_HTTP_CLIENT_MAX_BODY_SIZE", "10x");
            let err = Config::load(None).expect_err("bad size");
            assert!(
                format!("{err:?}").contains("nginx_http_client_max_body_size"),
                "{err:?}"
            );
            jail.set_env("GATEHOUSE_NGINX_HTTP_CLIENT_MAX_BODY_SIZE", "0");
            jail.set_env("GATEHOUSE_SSL_CERT", "/some/cert.pem");
            let err = Config::load(None).expect_err("cert without key");
            assert!(err.to_string().contains("ssl_cert_key"), "{err}");
            Ok(())
        });
    }

    #[test]
    fn parses_listen_lists() {
        let l = parse_listen("proxy_listen", "0.0.0.0:8000, [::1]:8443 ssl http2").expect("valid");
        assert_eq!(l.len(), 2);
        assert!(!l[0].ssl);
        assert!(l[1].ssl && l[1].http2);
        assert!(parse_listen("proxy_listen", "off").expect("off").is_empty());
        assert!(parse_listen("proxy_listen", "1.2.3.4:80 bogus").is_err());
    }
}
