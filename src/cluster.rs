//! `gatehouse cp` and `gatehouse dp`: the two roles of a cluster. The
//! control plane owns the database and the Admin API and serves the sync
//! stream on `cluster_listen`; a data plane has no database, connects to
//! `cluster_control_plane`, applies what it receives off the request path,
//! answers Ack or Nack, caches the last good configuration under its
//! prefix, and starts from that cache when the control plane is away.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use gatehouse_control_plane::admin::{AdminState, NodeInfo};
use gatehouse_control_plane::cluster::{Cluster, SyncService, HEARTBEAT};
use gatehouse_control_plane::{store, Dao};
use gatehouse_data_plane::DataPlane;
use gatehouse_model::snapshot::ConfigSnapshot;
use gatehouse_proto::v1::config_sync_client::ConfigSyncClient;
use gatehouse_proto::v1::config_sync_server::ConfigSyncServer;
use gatehouse_proto::v1::{
    cp_message, dp_message, Ack, CpMessage, DpMessage, Heartbeat, Hello, Nack,
};
use serde::Deserialize;
use tokio::sync::{mpsc, watch};
use tonic::codec::CompressionEncoding;
use tracing::{info, warn};

use crate::config::{parse_listen, Config};
use crate::standalone::{
    bind, bind_admin, bind_proxies, proxy_config, run_until_signal, spawn_admin, spawn_proxies,
};

/// Snapshots travel in parts of about 64 KiB, but a delta is one message,
/// and one change can be a whole declarative file: over tonic's 4 MiB default.
const MAX_MESSAGE: usize = 512 * 1024 * 1024;

pub(crate) fn run_cp(cfg: Config) -> anyhow::Result<()> {
    crate::standalone::runtime(&cfg)?.block_on(serve_cp(cfg))
}

pub(crate) fn run_dp(cfg: Config) -> anyhow::Result<()> {
    crate::standalone::runtime(&cfg)?.block_on(serve_dp(cfg))
}

/// This machine's name, for `GET /` and data planes' Hello.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".to_owned())
}

async fn serve_cp(cfg: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.prefix)
        .with_context(|| format!("cannot create prefix {}", cfg.prefix.display()))?;
    let admin_listeners = bind_admin(&cfg).await?;
    let cluster_addr = parse_listen("cluster_listen", &cfg.cluster_listen)?
        .first()
        .map(|l| l.addr)
        .context("cluster_listen is off: a control plane needs it")?;
    let tls = crate::cluster_tls::load(&cfg, None)?;
    let cluster_listener = bind(cluster_addr, "cluster_listen").await?;

    let url = cfg.database_url();
    let backend = store::open(&url)
        .await
        .with_context(|| format!("cannot open the database {}", store::redact(&url)))?;
    let dao = Dao::load(backend)
        .await
        .context("cannot load the configuration")?;
    info!(config_version = dao.version(), "Configuration loaded.");
    let cluster = Cluster::new(&dao);

    let (shutdown_tx, shutdown_rx) = watch::channel(());
    let grace = Duration::from_secs(cfg.shutdown_grace_seconds);
    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(Arc::clone(&cluster).follow(dao.clone(), shutdown_rx.clone()));
    tasks.spawn(Arc::clone(&cluster).persist(dao.clone(), shutdown_rx.clone()));
    tasks.spawn(dao.clone().expire(shutdown_rx.clone()));

    let node = NodeInfo {
        node_id: uuid::Uuid::new_v4().to_string(),
        hostname: hostname(),
        configuration: cfg.public_json(),
    };
    let state = AdminState::with_cluster(
        dao.clone(),
        node,
        cfg.admin_access_log != "off",
        Arc::clone(&cluster),
    );
    spawn_admin(&mut tasks, admin_listeners, &state, None, &shutdown_rx)?;

    info!(addr = %cluster_listener.local_addr()?, "Cluster listener for data planes.");
    let service = ConfigSyncServer::new(SyncService { cluster })
        .send_compressed(CompressionEncoding::Gzip)
        .accept_compressed(CompressionEncoding::Gzip)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE);
    let mut rx = shutdown_rx.clone();
    let incoming = tls_incoming(
        cluster_listener,
        Arc::clone(&tls.server),
        shutdown_rx.clone(),
    );
    tasks.spawn(async move {
        let served = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(HEARTBEAT))
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = rx.changed().await;
            })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "Cluster listener failed.");
        }
    });
    run_until_signal(tasks, shutdown_tx, grace).await;
    Ok(())
}

/// Accepted cluster connections after their mutual TLS handshake. Each
/// handshake runs on its own task (bounded by a timeout), so a slow or
/// refused peer never holds up the others.
fn tls_incoming(
    listener: tokio::net::TcpListener,
    config: Arc<rustls::ServerConfig>,
    mut shutdown: watch::Receiver<()>,
) -> impl futures_util::Stream<
    Item = Result<tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::io::Error>,
> {
    let (tx, rx) = mpsc::channel(16);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    tokio::spawn(async move {
        loop {
            let accepted = tokio::select! {
                accepted = listener.accept() => accepted,
                _ = shutdown.changed() => return,
            };
            let (stream, remote) = match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    warn!(%error, "Cannot accept a cluster connection.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = stream.set_nodelay(true);
            let acceptor = acceptor.clone();
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(stream)).await {
                    Ok(Ok(tls)) => {
                        let _ = tx.send(Ok(tls)).await;
                    }
                    Ok(Err(error)) => {
                        warn!(%remote, %error, "Refused a cluster connection: TLS handshake failed.");
                    }
                    Err(_) => {
                        warn!(%remote, "Refused a cluster connection: TLS handshake timed out.")
                    }
                }
            });
        }
    });
    futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    })
}

/// The configuration a data plane applied last, as cached under its prefix.
struct Cached {
    hash: String,
    snapshot: ConfigSnapshot,
}

const CACHE_FILE: &str = "dp-config.json";

/// The cache file: `{"hash": …, "version": …, "entities": {name: [document,
/// …]}}`, documents embedded as they are (no escaping on write, no
/// re-serializing on read), so their text, which the hash covers, survives.
#[derive(Deserialize)]
struct CacheFile<'a> {
    hash: String,
    version: u64,
    #[serde(borrow)]
    entities: std::collections::BTreeMap<String, Vec<&'a serde_json::value::RawValue>>,
}

fn load_cache(prefix: &Path) -> Option<Cached> {
    let text = std::fs::read(prefix.join(CACHE_FILE)).ok()?;
    let file = match serde_json::from_slice::<CacheFile<'_>>(&text) {
        Ok(file) => file,
        Err(error) => {
            warn!(%error, "The cached configuration does not parse; ignoring it.");
            return None;
        }
    };
    let entities = file
        .entities
        .into_iter()
        .map(|(name, docs)| {
            (
                name,
                docs.into_iter().map(|doc| Arc::from(doc.get())).collect(),
            )
        })
        .collect();
    let snapshot = ConfigSnapshot::new(file.version, entities);
    if snapshot.hash() != file.hash {
        warn!("The cached configuration does not match its hash; ignoring it.");
        return None;
    }
    Some(Cached {
        hash: file.hash,
        snapshot,
    })
}

/// Kong's `plugin_set_incompatible`: a configuration using a plugin this
/// node does not run would silently not apply it, so it is refused.
fn check_plugins(
    enabled: &[String],
    docs: &[gatehouse_model::snapshot::EntityDoc],
) -> Result<(), String> {
    #[derive(Deserialize)]
    struct Name<'a> {
        #[serde(borrow)]
        name: std::borrow::Cow<'a, str>,
    }
    for doc in docs {
        let name = serde_json::from_str::<Name<'_>>(doc)
            .map(|n| n.name)
            .unwrap_or_default();
        if !enabled.iter().any(|e| *e == name) {
            return Err(format!(
                "plugin {name:?} is not enabled on this data plane (plugins setting)"
            ));
        }
    }
    Ok(())
}

/// The shortest time between two writes of the cache.
const CACHE_EVERY: Duration = Duration::from_secs(1);

/// Writes the newest applied configuration to the cache, after the Ack
/// went out: serializing 30,000 entities is not on the propagation path.
/// Versions that arrive during a write are coalesced into the next one.
async fn write_caches(
    prefix: PathBuf,
    mut applied: watch::Receiver<Option<(String, Arc<ConfigSnapshot>)>>,
) {
    let mut last_write: Option<std::time::Instant> = None;
    while applied.changed().await.is_ok() {
        // At most one write per CACHE_EVERY: under a stream of changes
        // only some versions reach the disk, the newest always does.
        if let Some(wait) = last_write.and_then(|at| CACHE_EVERY.checked_sub(at.elapsed())) {
            tokio::time::sleep(wait).await;
        }
        last_write = Some(std::time::Instant::now());
        let Some((hash, snapshot)) = applied.borrow_and_update().clone() else {
            continue;
        };
        let prefix = prefix.clone();
        let written =
            tokio::task::spawn_blocking(move || write_cache(&prefix, &hash, &snapshot)).await;
        match written {
            Ok(Ok(())) => {}
            Ok(Err(error)) => warn!(%error, "Cannot write the configuration cache."),
            Err(error) => warn!(%error, "The cache writer failed."),
        }
    }
}

/// Writes the cache atomically: a crash leaves the old file or the new one.
fn write_cache(prefix: &Path, hash: &str, snapshot: &ConfigSnapshot) -> std::io::Result<()> {
    let mut body = Vec::with_capacity(1 << 20);
    body.extend_from_slice(b"{\"hash\":");
    serde_json::to_writer(&mut body, hash).map_err(std::io::Error::other)?;
    body.extend_from_slice(format!(",\"version\":{},\"entities\":{{", snapshot.version).as_bytes());
    for (i, (name, docs)) in snapshot.entities().enumerate() {
        if i > 0 {
            body.push(b',');
        }
        serde_json::to_writer(&mut body, name).map_err(std::io::Error::other)?;
        body.extend_from_slice(b":[");
        for (j, doc) in docs.iter().enumerate() {
            if j > 0 {
                body.push(b',');
            }
            body.extend_from_slice(doc.as_bytes());
        }
        body.push(b']');
    }
    body.extend_from_slice(b"}}");
    let tmp = prefix.join(format!("{CACHE_FILE}.tmp"));
    std::fs::write(&tmp, body)?;
    std::fs::rename(&tmp, prefix.join(CACHE_FILE))
}

/// The node id, kept under the prefix so that it survives restarts.
fn node_id(prefix: &Path) -> anyhow::Result<String> {
    let path = prefix.join("node_id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if uuid::Uuid::parse_str(id).is_ok() {
            return Ok(id.to_owned());
        }
    }
    let id = uuid::Uuid::new_v4().to_string();
    std::fs::write(&path, &id).with_context(|| format!("cannot write {}", path.display()))?;
    Ok(id)
}

async fn serve_dp(cfg: Config) -> anyhow::Result<()> {
    let control_plane = cfg.cluster_control_plane.clone().context(
        "cluster_control_plane is not set: a data plane needs the control plane's host:port",
    )?;
    std::fs::create_dir_all(&cfg.prefix)
        .with_context(|| format!("cannot create prefix {}", cfg.prefix.display()))?;
    let status_listeners = crate::status::bind_status(&cfg).await?;
    let (proxy_listeners, default_certificate) = bind_proxies(&cfg).await?;
    let dp = DataPlane::new(proxy_config(&cfg, default_certificate));
    let mut held = (0, String::new());
    let mut current = None;
    let plugins = cfg.enabled_plugins();
    if let Some(cached) = load_cache(&cfg.prefix) {
        let applied = check_plugins(&plugins, cached.snapshot.docs("plugins")).and_then(|()| {
            dp.apply(&cached.snapshot)
                .map_err(|e| crate::error_chain(&e))
        });
        match applied {
            Ok(()) => {
                info!(
                    config_version = cached.snapshot.version,
                    "Serving the cached configuration."
                );
                held = (cached.snapshot.version, cached.hash);
                current = Some(Arc::new(cached.snapshot));
            }
            Err(error) => {
                warn!(%error, "The cached configuration does not apply here; starting empty.")
            }
        }
    }
    let id = node_id(&cfg.prefix)?;
    let tls = crate::cluster_tls::load(&cfg, Some(&control_plane))?;

    let (shutdown_tx, shutdown_rx) = watch::channel(());
    let grace = Duration::from_secs(cfg.shutdown_grace_seconds);
    let mut tasks = tokio::task::JoinSet::new();
    crate::status::spawn_status(&mut tasks, status_listeners, &dp, &shutdown_rx)?;
    spawn_proxies(&mut tasks, proxy_listeners, &dp, &shutdown_rx, grace)?;
    // Ends after writing the last version, once the sync task drops its
    // sender at shutdown.
    let (cache_tx, cache_rx) = watch::channel(None);
    tasks.spawn(write_caches(cfg.prefix.clone(), cache_rx));
    let sync = Sync {
        labels: cfg.dp_labels()?.into_iter().collect(),
        plugins,
        tls,
        endpoint: control_plane,
        node_id: id,
        applier: Applier::Proxy {
            dp: Arc::clone(&dp),
            cache: cache_tx,
        },
        held,
        current,
        parts: Vec::new(),
    };
    tasks.spawn(sync.run(shutdown_rx.clone()));
    run_until_signal(tasks, shutdown_tx, grace).await;
    Ok(())
}

/// What a stream client does with a configuration it verified.
enum Applier {
    /// A data plane: builds the runtime and swaps it in, then has the
    /// configuration cached.
    Proxy {
        dp: Arc<DataPlane>,
        /// To the cache writer: the configuration applied last.
        cache: watch::Sender<Option<(String, Arc<ConfigSnapshot>)>>,
    },
    /// One of `bench/sync`'s light clients: holds and verifies the
    /// configuration (hash, plugins) as a data plane does, builds no
    /// proxy, and reports each Ack on stdout.
    Light { index: usize },
}

/// `gatehouse cluster bench-clients`: `count` light stream clients in this
/// process, for `bench/sync`'s many-data-plane case. Each has its own node
/// id and stream and does all a data plane does with a configuration but
/// build a proxy; one line per Ack on stdout: `ack <client> <version>
/// <unix time in ns>`. Runs until SIGTERM.
pub(crate) fn run_bench_clients(cfg: Config, count: usize) -> anyhow::Result<()> {
    crate::standalone::runtime(&cfg)?.block_on(async move {
        let control_plane = cfg
            .cluster_control_plane
            .clone()
            .context("cluster_control_plane is not set")?;
        let tls = crate::cluster_tls::load(&cfg, Some(&control_plane))?;
        let (shutdown_tx, shutdown_rx) = watch::channel(());
        let mut tasks = tokio::task::JoinSet::new();
        for index in 0..count {
            let sync = Sync {
                labels: Default::default(),
                plugins: cfg.enabled_plugins(),
                tls: tls.clone(),
                endpoint: control_plane.clone(),
                node_id: uuid::Uuid::new_v4().to_string(),
                applier: Applier::Light { index },
                held: (0, String::new()),
                current: None,
                parts: Vec::new(),
            };
            tasks.spawn(sync.run(shutdown_rx.clone()));
        }
        run_until_signal(tasks, shutdown_tx, Duration::from_secs(1)).await;
        Ok(())
    })
}

struct Sync {
    /// `cluster_dp_labels`, reported in Hello.
    labels: std::collections::HashMap<String, String>,
    /// The plugins this data plane runs (Kong's `plugins` setting).
    plugins: Vec<String>,
    tls: crate::cluster_tls::ClusterTls,
    endpoint: String,
    node_id: String,
    applier: Applier,
    /// The version and hash served now.
    held: (u64, String),
    /// The configuration served now, which deltas apply to.
    current: Option<Arc<ConfigSnapshot>>,
    /// The parts of a snapshot received so far.
    parts: Vec<gatehouse_proto::v1::Snapshot>,
}

impl Sync {
    /// Keeps a stream to the control plane open, reconnecting with
    /// jittered exponential backoff (0.5 s to 30 s) after any end.
    async fn run(mut self, mut shutdown: watch::Receiver<()>) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let started = std::time::Instant::now();
            tokio::select! {
                result = self.session() => match result {
                    Ok(()) => info!("The control plane closed the sync stream; reconnecting."),
                    Err(error) => warn!(error = %crate::error_chain(error.as_ref()), "Sync with the control plane failed; retrying."),
                },
                _ = shutdown.changed() => return,
            }
            // A stream that lived a while resets the backoff.
            if started.elapsed() > Duration::from_secs(30) {
                backoff = Duration::from_millis(500);
            }
            let jitter: f64 = rand::random();
            let wait = backoff.mul_f64(0.5 + jitter);
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                _ = shutdown.changed() => return,
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// One stream: Hello, then apply what arrives and answer it.
    async fn session(&mut self) -> anyhow::Result<()> {
        self.parts.clear();
        let mut http = hyper_util::client::legacy::connect::HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(Duration::from_secs(5)));
        let connector = AlwaysTls(
            hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config((*self.tls.client).clone())
                .https_only()
                .with_server_name_resolver(hyper_rustls::FixedServerNameResolver::new(
                    self.tls.server_name.clone(),
                ))
                .enable_http2()
                .wrap_connector(http),
        );
        // tonic refuses an https URI without its own TLS settings; the
        // connector does the (mutual) TLS whatever the URI says.
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", self.endpoint))
            .context("invalid cluster_control_plane")?
            .connect_timeout(Duration::from_secs(5))
            .http2_keep_alive_interval(HEARTBEAT)
            .connect_with_connector(connector)
            .await
            .with_context(|| format!("cannot connect to the control plane at {}", self.endpoint))?;
        let mut client = ConfigSyncClient::new(channel)
            .send_compressed(CompressionEncoding::Gzip)
            .accept_compressed(CompressionEncoding::Gzip)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE);
        let (tx, rx) = mpsc::channel::<DpMessage>(8);
        tx.send(DpMessage {
            kind: Some(dp_message::Kind::Hello(Hello {
                node_id: self.node_id.clone(),
                hostname: hostname(),
                version: env!("CARGO_PKG_VERSION").to_owned(),
                plugins: self.plugins.clone(),
                config_version: self.held.0,
                config_hash: self.held.1.clone(),
                labels: self.labels.clone(),
            })),
        })
        .await
        .context("the outbound stream closed")?;
        let outbound = futures_util::stream::unfold(rx, |mut rx| async move {
            rx.recv().await.map(|message| (message, rx))
        });
        let mut inbound = client.sync(outbound).await?.into_inner();
        info!(endpoint = %self.endpoint, "Connected to the control plane.");
        let mut heartbeat = tokio::time::interval(HEARTBEAT);
        loop {
            tokio::select! {
                message = inbound.message() => {
                    let Some(message) = message? else { return Ok(()) };
                    if let Some(answer) = self.handle(message).await {
                        tx.send(answer).await.context("the outbound stream closed")?;
                    }
                }
                _ = heartbeat.tick() => {
                    let beat = DpMessage {
                        kind: Some(dp_message::Kind::Heartbeat(Heartbeat {
                            config_version: self.held.0,
                            config_hash: self.held.1.clone(),
                        })),
                    };
                    tx.send(beat).await.context("the outbound stream closed")?;
                }
            }
        }
    }

    async fn handle(&mut self, message: CpMessage) -> Option<DpMessage> {
        enum Received {
            Snapshot(Vec<gatehouse_proto::v1::Snapshot>),
            Delta(gatehouse_proto::v1::Delta),
        }
        let (received, nonce, version, expected) = match message.kind? {
            cp_message::Kind::Snapshot(part) => {
                // A part of another snapshot than the one being gathered
                // (the control plane gave up on that one) starts anew.
                if self
                    .parts
                    .first()
                    .is_some_and(|first| first.nonce != part.nonce)
                {
                    self.parts.clear();
                }
                let more = part.more;
                let head = (part.nonce.clone(), part.version, part.hash.clone());
                self.parts.push(part);
                if more {
                    return None;
                }
                let parts = std::mem::take(&mut self.parts);
                (Received::Snapshot(parts), head.0, head.1, head.2)
            }
            cp_message::Kind::Delta(delta) => {
                let head = (delta.nonce.clone(), delta.version, delta.hash.clone());
                (Received::Delta(delta), head.0, head.1, head.2)
            }
            cp_message::Kind::Heartbeat(_) => return None,
        };
        let base = self.current.clone();
        let held = self.held.clone();
        let plugins = self.plugins.clone();
        let dp = match &self.applier {
            Applier::Proxy { dp, .. } => Some(Arc::clone(dp)),
            Applier::Light { .. } => None,
        };
        // Built off the request path; the runtime in use keeps serving.
        let applied = tokio::task::spawn_blocking(move || {
            // `Some` for a delta: its plugin documents.
            let mut new_plugins = None;
            let snapshot = match received {
                Received::Snapshot(parts) => gatehouse_proto::snapshot_from_parts(parts),
                Received::Delta(message) => {
                    // The content hash names the base; a version number
                    // can differ for the same content.
                    let base = base.filter(|_| held.1 == message.from_hash).ok_or_else(|| {
                        format!(
                            "delta from version {} ({}) does not apply to version {} ({}) held here",
                            message.from_version, message.from_hash, held.0, held.1
                        )
                    })?;
                    let delta = gatehouse_proto::delta_from_message(message);
                    new_plugins = Some(delta.upserted.get("plugins").cloned().unwrap_or_default());
                    base.apply_delta(version, &delta)
                }
            };
            let hash = snapshot.hash();
            if hash != expected {
                return Err(format!(
                    "hash mismatch: received {expected}, computed {hash}"
                ));
            }
            // The held configuration passed this check: a delta's new
            // plugin documents are all there is to look at.
            match &new_plugins {
                Some(docs) => check_plugins(&plugins, docs)?,
                None => check_plugins(&plugins, snapshot.docs("plugins"))?,
            }
            if let Some(dp) = dp {
                dp.apply(&snapshot)
                    .map_err(|error| crate::error_chain(&error))?;
            }
            Ok((hash, Arc::new(snapshot)))
        })
        .await
        .unwrap_or_else(|error| Err(format!("the build task failed: {error}")));
        Some(DpMessage {
            kind: Some(match applied {
                Ok((hash, snapshot)) => {
                    info!(
                        config_version = version,
                        "Applied the configuration from the control plane."
                    );
                    self.held = (version, hash.clone());
                    match &self.applier {
                        Applier::Proxy { cache, .. } => {
                            cache.send_replace(Some((hash.clone(), Arc::clone(&snapshot))));
                        }
                        Applier::Light { index } => {
                            let at = std::time::SystemTime::now()
                                .duration_since(std::time::UNIX_EPOCH)
                                .unwrap_or_default()
                                .as_nanos();
                            println!("ack {index} {version} {at}");
                        }
                    }
                    self.current = Some(snapshot);
                    dp_message::Kind::Ack(Ack {
                        nonce,
                        version,
                        hash,
                    })
                }
                Err(error) => {
                    warn!(config_version = version, %error, "Refused a configuration; the last good one keeps serving.");
                    dp_message::Kind::Nack(Nack {
                        nonce,
                        version,
                        error,
                    })
                }
            }),
        })
    }
}

type Https = hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>;

/// The cluster connector: TLS on every connection.
#[derive(Clone)]
struct AlwaysTls(Https);

impl tower::Service<http::Uri> for AlwaysTls {
    type Response = <Https as tower::Service<http::Uri>>::Response;
    type Error = <Https as tower::Service<http::Uri>>::Error;
    type Future = <Https as tower::Service<http::Uri>>::Future;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        let mut parts = uri.clone().into_parts();
        parts.scheme = Some(http::uri::Scheme::HTTPS);
        let uri = http::Uri::from_parts(parts).unwrap_or(uri);
        self.0.call(uri)
    }
}
