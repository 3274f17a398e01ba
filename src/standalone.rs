//! `gatehouse standalone`: the control plane's Admin API and a data plane
//! in one process. The local data plane follows the configuration version
//! exactly as a remote one will: each new version becomes a snapshot that is
//! built into a runtime off the request path and swapped in.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use gatehouse_control_plane::admin::{self, AdminState, HealthView, NodeInfo};
use gatehouse_control_plane::{store, Dao};
use gatehouse_data_plane::{DataPlane, ProxyConfig};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::config::{parse_listen, Config};

pub(crate) fn run(cfg: Config) -> anyhow::Result<()> {
    runtime(&cfg)?.block_on(serve(cfg))
}

/// Tracing and the async runtime for `cfg`.
pub(crate) fn runtime(cfg: &Config) -> anyhow::Result<tokio::runtime::Runtime> {
    init_tracing(cfg);
    // With one worker the current-thread scheduler does the same work
    // without cross-thread wake-ups; builds still run on the blocking pool.
    let mut rt = match cfg.worker_threads {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    };
    rt.enable_all();
    if let Some(n) = cfg.worker_threads.filter(|n| *n > 1) {
        rt.worker_threads(n);
    }
    rt.build().context("cannot start the async runtime")
}

fn init_tracing(cfg: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_new(&cfg.log_level)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cfg.log_format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

pub(crate) async fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr} ({what})"))
}

/// The data plane's settings from the process configuration.
pub(crate) fn proxy_config(
    cfg: &Config,
    default_certificate: Option<gatehouse_data_plane::DefaultCertificate>,
) -> ProxyConfig {
    let buffers = &cfg.nginx_http_large_client_header_buffers;
    ProxyConfig {
        access_log: cfg.proxy_access_log != "off",
        max_body_bytes: Some(cfg.nginx_http_client_max_body_size.bytes()).filter(|n| *n > 0),
        header_read_timeout: cfg.nginx_http_client_header_timeout.duration(),
        keepalive_timeout: cfg.nginx_http_keepalive_timeout.duration(),
        max_header_line_bytes: usize::try_from(buffers.size.bytes()).unwrap_or(usize::MAX),
        max_header_bytes: usize::try_from(buffers.total_bytes()).unwrap_or(usize::MAX),
        max_connections: cfg.proxy_max_connections,
        default_certificate,
        latency_headers: true,
    }
}

/// Binds the proxy listeners (and loads the default certificate when one
/// is `ssl`).
pub(crate) async fn bind_proxies(
    cfg: &Config,
) -> anyhow::Result<(
    Vec<(TcpListener, bool)>,
    Option<gatehouse_data_plane::DefaultCertificate>,
)> {
    let proxy_listen = parse_listen("proxy_listen", &cfg.proxy_listen)?;
    let default_certificate = if proxy_listen.iter().any(|l| l.ssl) {
        Some(crate::tls::default_certificate(cfg)?)
    } else {
        None
    };
    let mut listeners = Vec::new();
    for l in proxy_listen {
        listeners.push((bind(l.addr, "proxy_listen").await?, l.ssl));
    }
    Ok((listeners, default_certificate))
}

/// Serves the proxy on `listeners` until `shutdown`.
pub(crate) fn spawn_proxies(
    tasks: &mut tokio::task::JoinSet<()>,
    listeners: Vec<(TcpListener, bool)>,
    dp: &Arc<DataPlane>,
    shutdown: &watch::Receiver<()>,
    grace: Duration,
) -> anyhow::Result<()> {
    for (listener, ssl) in listeners {
        info!(addr = %listener.local_addr()?, ssl, "Proxy listening.");
        if ssl {
            tasks.spawn(gatehouse_data_plane::serve_tls(
                listener,
                dp.clone(),
                shutdown.clone(),
                grace,
            ));
        } else {
            tasks.spawn(gatehouse_data_plane::serve(
                listener,
                dp.clone(),
                shutdown.clone(),
                grace,
            ));
        }
    }
    Ok(())
}

/// Serves the Admin API on `listeners` until `shutdown`.
pub(crate) fn spawn_admin(
    tasks: &mut tokio::task::JoinSet<()>,
    listeners: Vec<TcpListener>,
    state: &Arc<AdminState>,
    dp: Option<&Arc<DataPlane>>,
    shutdown: &watch::Receiver<()>,
) -> anyhow::Result<()> {
    for listener in listeners {
        info!(addr = %listener.local_addr()?, "Admin API listening.");
        let mut app = admin::router(state.clone());
        // Kong serves the prometheus metrics on the Admin API too, where
        // the node proxies.
        if let Some(dp) = dp {
            app = app.route(
                "/metrics",
                axum::routing::get(crate::status::metrics).with_state(Arc::clone(dp)),
            );
        }
        spawn_router(tasks, listener, app, shutdown, "Admin API");
    }
    Ok(())
}

/// Serves `app` on `listener` until `shutdown` (the Admin and status APIs).
pub(crate) fn spawn_router(
    tasks: &mut tokio::task::JoinSet<()>,
    listener: TcpListener,
    app: axum::Router,
    shutdown: &watch::Receiver<()>,
    what: &'static str,
) {
    let mut rx = shutdown.clone();
    tasks.spawn(async move {
        let res = axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let _ = rx.changed().await;
            })
            .await;
        if let Err(e) = res {
            error!(error = %e, server = what, "Server failed.");
        }
    });
}

/// Binds the Admin API listeners (TLS ones are skipped with a warning).
pub(crate) async fn bind_admin(cfg: &Config) -> anyhow::Result<Vec<TcpListener>> {
    let mut admin_listeners = Vec::new();
    for l in parse_listen("admin_listen", &cfg.admin_listen)? {
        if l.ssl {
            warn!(addr = %l.addr, "TLS on the Admin API is not supported yet; skipping this listener.");
            continue;
        }
        admin_listeners.push(bind(l.addr, "admin_listen").await?);
    }
    Ok(admin_listeners)
}

/// Waits for SIGTERM or Ctrl-C, then for `tasks` to drain within `grace`.
pub(crate) async fn run_until_signal(
    mut tasks: tokio::task::JoinSet<()>,
    shutdown_tx: watch::Sender<()>,
    grace: Duration,
) {
    wait_for_signal().await;
    info!("Shutting down: no new connections, draining in-flight requests.");
    drop(shutdown_tx);
    let drained = tokio::time::timeout(grace + Duration::from_secs(1), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        warn!("Grace period over; closing remaining connections.");
    }
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.prefix)
        .with_context(|| format!("cannot create prefix {}", cfg.prefix.display()))?;

    // Bind every listener before touching the database, so a busy port
    // fails fast with a clear message.
    let admin_listeners = bind_admin(&cfg).await?;
    let status_listeners = crate::status::bind_status(&cfg).await?;
    let (proxy_listeners, default_certificate) = bind_proxies(&cfg).await?;

    let url = cfg.database_url();
    let backend = store::open(&url)
        .await
        .with_context(|| format!("cannot open the database {}", store::redact(&url)))?;
    let kind = backend.kind();
    let dao = Dao::load(backend)
        .await
        .context("cannot load the configuration")?;
    info!(
        database = kind,
        config_version = dao.version(),
        "Configuration loaded."
    );

    let dp = DataPlane::new(proxy_config(&cfg, default_certificate));
    let first = dao.read(|s| s.snapshot());
    dp.apply(&first)
        .context("cannot build the proxy from the stored configuration")?;

    let pid_file = cfg.prefix.join("gatehouse.pid");
    let _ = std::fs::write(&pid_file, std::process::id().to_string());

    let (shutdown_tx, shutdown_rx) = watch::channel(());
    let grace = Duration::from_secs(cfg.shutdown_grace_seconds);
    let mut tasks = tokio::task::JoinSet::new();

    tasks.spawn(follow_versions(
        dao.clone(),
        dp.clone(),
        shutdown_rx.clone(),
    ));
    tasks.spawn(dao.clone().expire(shutdown_rx.clone()));

    let node = NodeInfo {
        node_id: uuid::Uuid::new_v4().to_string(),
        hostname: crate::cluster::hostname(),
        configuration: cfg.public_json(),
    };
    let state = AdminState::with_health(
        dao.clone(),
        node,
        cfg.admin_access_log != "off",
        Some(Arc::new(DataPlaneHealth(dp.clone()))),
    );
    spawn_admin(&mut tasks, admin_listeners, &state, Some(&dp), &shutdown_rx)?;
    crate::status::spawn_status(&mut tasks, status_listeners, &dp, &shutdown_rx)?;
    spawn_proxies(&mut tasks, proxy_listeners, &dp, &shutdown_rx, grace)?;
    run_until_signal(tasks, shutdown_tx, grace).await;
    let _ = std::fs::remove_file(pid_file);
    Ok(())
}

/// Rebuild the data plane whenever the configuration version moves. The
/// watch channel coalesces bursts of writes: a build always starts from
/// the newest version, and at most one build runs at a time.
async fn follow_versions(dao: Arc<Dao>, dp: Arc<DataPlane>, mut shutdown: watch::Receiver<()>) {
    let mut versions = dao.subscribe();
    loop {
        tokio::select! {
            changed = versions.changed() => if changed.is_err() { return },
            _ = shutdown.changed() => return,
        }
        let dao = dao.clone();
        let dp = dp.clone();
        let res = tokio::task::spawn_blocking(move || {
            let snapshot = dao.read(|s| s.snapshot());
            dp.apply(&snapshot).map(|()| snapshot.version)
        })
        .await;
        match res {
            Ok(Ok(version)) => {
                tracing::debug!(config_version = version, "Proxy configuration applied.")
            }
            Ok(Err(e)) => {
                error!(error = %e, "Proxy kept its previous configuration: the new one does not build.")
            }
            Err(e) => error!(error = %e, "Proxy build task failed."),
        }
    }
}

/// The Admin API's view of the local data plane's balancers: in
/// standalone, `/upstreams/{u}/health` reports the health the proxy acts on.
struct DataPlaneHealth(Arc<DataPlane>);

impl HealthView for DataPlaneHealth {
    fn upstream_health(&self, upstream_id: &str) -> Option<admin::UpstreamHealth> {
        self.0.upstream_health(upstream_id)
    }

    fn set_target_health(
        &self,
        upstream_id: &str,
        upstream_name: &str,
        target: &str,
        address: Option<SocketAddr>,
        healthy: bool,
    ) -> Result<(), String> {
        self.0
            .set_target_health(upstream_id, upstream_name, target, address, healthy)
            .map_err(|error| error.to_string())
    }
}

pub(crate) async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}
