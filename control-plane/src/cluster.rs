//! The control plane's side of the sync contract (`gatehouse-proto`): it
//! publishes each committed configuration version once (snapshot, hash and
//! wire message built off the request path), and serves one `Sync` stream
//! per data plane. Each stream has its own task that sends the newest
//! published version whenever it changes, so a slow data plane only delays
//! itself, and intermediate versions are skipped rather than queued.
//!
//! This first version sends snapshots only; deltas come next.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gatehouse_proto::v1::config_sync_server::ConfigSync;
use gatehouse_proto::v1::{cp_message, dp_message, CpMessage, DpMessage, Heartbeat};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::dao::Dao;

/// How often each side sends a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// One configuration version as data planes receive it.
pub struct Published {
    pub version: u64,
    pub hash: String,
    /// The wire form, nonce left empty; built once per version.
    message: gatehouse_proto::v1::Snapshot,
    at: Instant,
}

/// What the control plane knows of one data plane (Kong's
/// `clustering_data_planes` row, plus our fields).
#[derive(Clone, Debug)]
struct PlaneStatus {
    id: String,
    hostname: String,
    ip: String,
    version: String,
    labels: BTreeMap<String, String>,
    config_hash: String,
    config_version: u64,
    last_seen: u64,
    connected: bool,
    last_nack: Option<String>,
    propagation_ms: Option<f64>,
}

/// Published versions and the data planes' status.
pub struct Cluster {
    current: watch::Sender<Arc<Published>>,
    planes: Mutex<BTreeMap<String, PlaneStatus>>,
}

impl Cluster {
    /// Publishes the configuration `dao` holds now.
    pub fn new(dao: &Dao) -> Arc<Cluster> {
        let (current, _) = watch::channel(Arc::new(publish(dao)));
        Arc::new(Cluster {
            current,
            planes: Mutex::new(BTreeMap::new()),
        })
    }

    /// Publishes every new version until `shutdown` changes. Bursts of
    /// writes coalesce: a build always starts from the newest version.
    pub async fn follow(self: Arc<Self>, dao: Arc<Dao>, mut shutdown: watch::Receiver<()>) {
        let mut versions = dao.subscribe();
        loop {
            tokio::select! {
                changed = versions.changed() => if changed.is_err() { return },
                _ = shutdown.changed() => return,
            }
            let dao = Arc::clone(&dao);
            match tokio::task::spawn_blocking(move || publish(&dao)).await {
                Ok(published) => {
                    tracing::debug!(
                        config_version = published.version,
                        "Configuration published to data planes."
                    );
                    self.current.send_replace(Arc::new(published));
                }
                Err(error) => tracing::error!(%error, "Publishing a configuration failed."),
            }
        }
    }

    pub fn current(&self) -> Arc<Published> {
        Arc::clone(&self.current.borrow())
    }

    /// `GET /clustering/data-planes`: Kong's fields, plus ours.
    pub fn data_planes(&self) -> Value {
        let planes = self.planes.lock().map(|p| p.clone()).unwrap_or_default();
        let data: Vec<Value> = planes
            .values()
            .map(|plane| {
                json!({
                    "id": plane.id,
                    "hostname": plane.hostname,
                    "ip": plane.ip,
                    "version": plane.version,
                    "sync_status": if plane.config_hash.is_empty() { "unknown" } else { "normal" },
                    "config_hash": if plane.config_hash.is_empty() {
                        "00000000000000000000000000000000".to_owned()
                    } else {
                        plane.config_hash.clone()
                    },
                    "last_seen": plane.last_seen,
                    "labels": plane.labels,
                    "created_at": plane.last_seen,
                    "updated_at": plane.last_seen,
                    "ttl": 1_209_600,
                    "config_version": plane.config_version,
                    "connected": plane.connected,
                    "last_nack_error": plane.last_nack,
                    "last_propagation_ms": plane.propagation_ms,
                })
            })
            .collect();
        json!({ "data": data, "next": null })
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut PlaneStatus)) {
        if let Ok(mut planes) = self.planes.lock() {
            if let Some(plane) = planes.get_mut(id) {
                plane.last_seen = now_secs();
                f(plane);
            }
        }
    }
}

fn publish(dao: &Dao) -> Published {
    let snapshot = dao.read(|state| state.snapshot());
    let hash = snapshot.hash();
    let message = gatehouse_proto::snapshot_message(&snapshot, &hash, String::new());
    Published {
        version: snapshot.version,
        hash,
        message,
        at: Instant::now(),
    }
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs())
}

/// The tonic service.
pub struct SyncService {
    pub cluster: Arc<Cluster>,
}

type CpStream = Pin<Box<dyn futures_util::Stream<Item = Result<CpMessage, Status>> + Send>>;

#[tonic::async_trait]
impl ConfigSync for SyncService {
    type SyncStream = CpStream;

    async fn sync(
        &self,
        request: Request<Streaming<DpMessage>>,
    ) -> Result<Response<CpStream>, Status> {
        let ip = request
            .remote_addr()
            .map(|addr: SocketAddr| addr.ip().to_canonical().to_string())
            .unwrap_or_default();
        let mut inbound = request.into_inner();
        let first = tokio::time::timeout(HELLO_TIMEOUT, inbound.message())
            .await
            .map_err(|_| Status::deadline_exceeded("no Hello"))??;
        let Some(DpMessage {
            kind: Some(dp_message::Kind::Hello(hello)),
        }) = first
        else {
            return Err(Status::invalid_argument("the first message must be Hello"));
        };
        if hello.node_id.is_empty() {
            return Err(Status::invalid_argument("Hello without node_id"));
        }
        let id = hello.node_id.clone();
        tracing::info!(node_id = %id, hostname = %hello.hostname, %ip, "Data plane connected.");
        if let Ok(mut planes) = self.cluster.planes.lock() {
            planes.insert(
                id.clone(),
                PlaneStatus {
                    id: id.clone(),
                    hostname: hello.hostname.clone(),
                    ip,
                    version: hello.version.clone(),
                    labels: hello.labels.clone().into_iter().collect(),
                    config_hash: hello.config_hash.clone(),
                    config_version: hello.config_version,
                    last_seen: now_secs(),
                    connected: true,
                    last_nack: None,
                    propagation_ms: None,
                },
            );
        }
        let (outbound, stream) = mpsc::channel(4);
        let cluster = Arc::clone(&self.cluster);
        tokio::spawn(serve_plane(
            cluster,
            id,
            hello.config_hash,
            inbound,
            outbound,
        ));
        let stream = futures_util::stream::unfold(stream, |mut rx| async move {
            rx.recv().await.map(|message| (Ok(message), rx))
        });
        Ok(Response::new(Box::pin(stream)))
    }
}

/// One data plane's stream: sends the newest version when it changes (and
/// at once when the plane holds another hash), heartbeats, and records
/// what the plane reports.
async fn serve_plane(
    cluster: Arc<Cluster>,
    id: String,
    held_hash: String,
    mut inbound: Streaming<DpMessage>,
    outbound: mpsc::Sender<CpMessage>,
) {
    let mut versions = cluster.current.subscribe();
    let mut nonce = 0u64;
    let mut sent_hash = held_hash;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let current = Arc::clone(&versions.borrow_and_update());
        if current.hash != sent_hash {
            nonce += 1;
            let mut message = current.message.clone();
            message.nonce = nonce.to_string();
            let sent = outbound
                .send(CpMessage {
                    kind: Some(cp_message::Kind::Snapshot(message)),
                })
                .await;
            if sent.is_err() {
                break;
            }
            sent_hash.clone_from(&current.hash);
        }
        tokio::select! {
            changed = versions.changed() => if changed.is_err() { break },
            _ = heartbeat.tick() => {
                let beat = CpMessage {
                    kind: Some(cp_message::Kind::Heartbeat(Heartbeat {
                        config_version: current.version,
                        config_hash: current.hash.clone(),
                    })),
                };
                if outbound.send(beat).await.is_err() {
                    break;
                }
            }
            message = inbound.message() => match message {
                Ok(Some(message)) => record(&cluster, &id, message, &current),
                Ok(None) | Err(_) => break,
            },
        }
    }
    cluster.update(&id, |plane| plane.connected = false);
    tracing::info!(node_id = %id, "Data plane disconnected.");
}

fn record(cluster: &Cluster, id: &str, message: DpMessage, current: &Published) {
    match message.kind {
        Some(dp_message::Kind::Ack(ack)) => cluster.update(id, |plane| {
            plane.config_hash = ack.hash.clone();
            plane.config_version = ack.version;
            plane.last_nack = None;
            if ack.hash == current.hash {
                plane.propagation_ms = Some(current.at.elapsed().as_secs_f64() * 1000.0);
            }
        }),
        Some(dp_message::Kind::Nack(nack)) => {
            tracing::warn!(node_id = id, config_version = nack.version, error = %nack.error, "Data plane refused a configuration.");
            cluster.update(id, |plane| plane.last_nack = Some(nack.error.clone()));
        }
        Some(dp_message::Kind::Heartbeat(beat)) => cluster.update(id, |plane| {
            plane.config_hash = beat.config_hash.clone();
            plane.config_version = beat.config_version;
        }),
        Some(dp_message::Kind::Hello(_)) | None => {}
    }
}
