//! The data plane: it turns a configuration snapshot into an immutable
//! runtime (a compiled router plus resolved services) and proxies HTTP
//! traffic with it. Kong rebuilds its router in the worker that serves
//! requests and reads its database on the way; here a snapshot is built off
//! the request path and published with one atomic swap, so a config change
//! never stalls or half-applies to a request. The crate holds no database
//! connection and takes no lock on the request path.
//!
//! The life of a request:
//!
//! ```text
//!  accept (at most max_connections open; more wait in the backlog)
//!   └─► TLS handshake on `ssl` listeners: certificate by SNI from the runtime in use
//!        └─► DownstreamIo: header timeout (408), head size (414/431), keep-alive timeout
//!             └─► hyper (HTTP/1.1 keep-alive, h2 by ALPN or h2c)
//!                  └─► runtime = DataPlane::runtime.load_full()  one config version per request
//!                       └─► router.find(method, host, path, headers)  404 when nothing matches
//!                            └─► route's service                  503 when the route has none
//!                                 └─► body limit (413); peer: upstream balancer,
//!                                     DNS answer or the service IP (503 when no
//!                                     target is healthy or the name does not resolve)
//!                                      └─► rewrite path (strip_path, path_handling), Host,
//!                                          X-Forwarded-*, Via; drop hop-by-hop headers
//!                                           └─► pooled client (TLS for https services)
//!                                               ─► peer   502 / 504 on failure
//!                                               (passive health check of the outcome)
//!                                                └─► response streamed back with Via; the
//!                                                    peer is released when it ends
//! ```
//!
//! **Invariant:** a request sees exactly one config version, the one it
//! loaded when it started; `apply` never blocks requests.

mod balancer;
mod downstream;
mod h1;
mod plugins;
mod proxy;
mod runtime;
mod tls;

use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use gatehouse_model::snapshot::ConfigSnapshot;
use tokio::sync::Semaphore;

pub use balancer::SetHealthError;
pub use gatehouse_model::health::{AddressHealth, TargetHealth, UpstreamHealth, Weight};
pub use proxy::{serve, serve_tls};
pub use runtime::BuildError;
pub use tls::{DefaultCertificate, TlsError};

/// A TLS client config as the proxy builds for https upstreams: Mozilla's
/// roots when `verify`, no verification otherwise. For the `gatehouse
/// config` CLI talking to an Admin API over https (`--tls-skip-verify`
/// for a self-signed one).
pub fn https_client_config(verify: bool) -> Result<rustls::ClientConfig, TlsError> {
    tls::client_config(&tls::UpstreamTls {
        verify,
        ..tls::UpstreamTls::default()
    })
}

use balancer::Balancers;
use runtime::{ClientCache, ParseCache, Runtime};

/// Process-level proxy settings (not entity configuration).
#[derive(Clone, Debug)]
pub struct ProxyConfig {
    /// Emit one `gatehouse::access` INFO event per request. Default: `true`.
    pub access_log: bool,
    /// Largest accepted request body; `None` means unlimited. Default: `None`
    /// (nginx's `client_max_body_size 0`).
    pub max_body_bytes: Option<u64>,
    /// Time a client has to send a request head on HTTP/1, from the accept
    /// for the first request and from the head's first byte for later ones;
    /// also bounds TLS handshakes. Default: 60 s (nginx's
    /// `client_header_timeout`).
    pub header_read_timeout: Duration,
    /// Time a connection may stay open with no request in flight. Default:
    /// 60 s (nginx's `keepalive_timeout` in Kong).
    pub keepalive_timeout: Duration,
    /// Longest request line (414 past it) or header line (431 past it).
    /// Default: 8 KiB (one buffer of nginx's `large_client_header_buffers
    /// 4 8k`).
    pub max_header_line_bytes: usize,
    /// Largest request head (431 past it). Default: 32 KiB (all four
    /// buffers).
    pub max_header_bytes: usize,
    /// Most downstream connections open at once over every listener of
    /// this data plane; further clients wait in the listen backlog until
    /// one closes. Default: 16384.
    pub max_connections: usize,
    /// Served on TLS listeners when no SNI matches or the client sends
    /// none. `None`: such handshakes fail. Default: `None`.
    pub default_certificate: Option<DefaultCertificate>,
    /// Add Kong's `X-Kong-Proxy-Latency`, `X-Kong-Upstream-Latency` and
    /// `X-Kong-Response-Latency` headers. Default: `true`.
    pub latency_headers: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            access_log: true,
            max_body_bytes: None,
            header_read_timeout: Duration::from_secs(60),
            keepalive_timeout: Duration::from_secs(60),
            max_header_line_bytes: 8 * 1024,
            max_header_bytes: 32 * 1024,
            max_connections: 16384,
            default_certificate: None,
            latency_headers: true,
        }
    }
}

/// The proxy's state: the runtime in use, and what outlives runtimes: the
/// upstream connection pools, the balancers with their health state and
/// background tasks, the DNS cache; and the downstream connection budget.
pub struct DataPlane {
    runtime: ArcSwap<Runtime>,
    clients: ClientCache,
    balancers: Balancers,
    /// Taken by `apply` for the build and put back after; a concurrent
    /// `apply` would find none and parse everything, which is only slower.
    parsed: arc_swap::ArcSwapOption<ParseCache>,
    connections: Arc<Semaphore>,
    /// Plugin state that outlives config versions (counters, caches).
    plugin_state: Arc<plugins::Shared>,
    cfg: ProxyConfig,
}

impl DataPlane {
    /// A data plane with an empty runtime (version 0) that answers every
    /// request with 404 until the first `apply`.
    pub fn new(cfg: ProxyConfig) -> Arc<DataPlane> {
        Arc::new(DataPlane {
            runtime: ArcSwap::from_pointee(Runtime::empty()),
            clients: ClientCache::default(),
            connections: Arc::new(Semaphore::new(
                cfg.max_connections.clamp(1, Semaphore::MAX_PERMITS),
            )),
            balancers: Balancers::default(),
            parsed: arc_swap::ArcSwapOption::empty(),
            plugin_state: Arc::default(),
            cfg,
        })
    }

    /// Builds a runtime from `snapshot` and publishes it with one store.
    /// Requests already running finish on the runtime they loaded. On error
    /// the runtime in use stays. The build is synchronous and CPU bound: call
    /// it from `spawn_blocking` for large configurations. Callers apply
    /// snapshots one at a time, in version order.
    pub fn apply(&self, snapshot: &ConfigSnapshot) -> Result<(), BuildError> {
        let mut parsed = self
            .parsed
            .swap(None)
            .and_then(|cache| Arc::try_unwrap(cache).ok())
            .unwrap_or_default();
        let built = Runtime::build(
            snapshot,
            &self.clients,
            &self.balancers,
            &mut parsed,
            &self.plugin_state,
        );
        self.parsed.store(Some(Arc::new(parsed)));
        let runtime = built?;
        let n_snis = runtime.certificates.len();
        self.runtime.store(Arc::new(runtime));
        tracing::info!(
            config_version = snapshot.version,
            n_snis,
            "Applied configuration."
        );
        Ok(())
    }

    /// The prometheus plugin's metrics in Prometheus' text format, with
    /// Kong's names (`kong_http_requests_total`, …).
    pub fn metrics(&self) -> String {
        self.plugin_state.metrics.render(self.version())
    }

    /// Version of the configuration in use (0 before the first `apply`).
    pub fn version(&self) -> u64 {
        self.runtime.load().version
    }

    /// Health of the targets of upstream `upstream_id` on this data plane;
    /// `None` when it has no balancer for it (not applied yet).
    pub fn upstream_health(&self, upstream_id: &str) -> Option<UpstreamHealth> {
        self.balancers.health(upstream_id)
    }

    /// Forces the health of target `target` (`host:port`) of an upstream
    /// on this data plane: all its addresses, or only `address`. Kong's
    /// `PUT /upstreams/{u}/targets/{t}/healthy|unhealthy`.
    pub fn set_target_health(
        &self,
        upstream_id: &str,
        upstream_name: &str,
        target: &str,
        address: Option<std::net::SocketAddr>,
        healthy: bool,
    ) -> Result<(), SetHealthError> {
        self.balancers
            .set_health(upstream_id, upstream_name, target, address, healthy)
    }
}
