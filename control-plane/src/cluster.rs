//! The control plane's side of the sync contract (`gatehouse-proto`): it
//! publishes each committed configuration version once (snapshot, hash and
//! wire message built off the request path), and serves one `Sync` stream
//! per data plane. Each stream has its own task that sends the newest
//! published version whenever it changes, so a slow data plane only delays
//! itself, and intermediate versions are skipped rather than queued.
//!
//! A data plane that holds the previous version gets a delta: the change
//! from the version it holds, composed from a window of the last
//! [`WINDOW`] deltas. One that holds nothing, fell out of the window, or
//! refused something gets a snapshot.

use std::collections::{BTreeMap, VecDeque};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use gatehouse_model::snapshot::{ConfigSnapshot, SnapshotDelta};
use gatehouse_proto::v1::config_sync_server::ConfigSync;
use gatehouse_proto::v1::{cp_message, dp_message, CpMessage, DpMessage, Heartbeat};
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

use crate::dao::Dao;

/// How often each side sends a heartbeat.
pub const HEARTBEAT: Duration = Duration::from_secs(5);
/// How many recent version-to-version deltas the control plane keeps.
pub const WINDOW: usize = 64;
/// How long a data plane may take to answer a configuration before its
/// stream is closed (it reconnects and resyncs).
const ANSWER_TIMEOUT: Duration = Duration::from_secs(120);
/// How long a new stream may take to say Hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// One configuration version as data planes receive it.
pub struct Published {
    pub version: u64,
    pub hash: String,
    /// Shares its documents with the store; the wire form is made only
    /// for a stream that needs a whole snapshot, which is rare, rather than
    /// for every version.
    snapshot: Arc<ConfigSnapshot>,
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
    snapshots_sent: u64,
    deltas_sent: u64,
    /// Set when the control plane refuses the data plane (Kong's
    /// `sync_status` values).
    refused: Option<&'static str>,
}

/// The change from one published version to the next.
struct DeltaEntry {
    from_version: u64,
    from_hash: String,
    hash: String,
    delta: SnapshotDelta,
}

impl PlaneStatus {
    /// Kong's fields, plus ours.
    fn to_json(&self) -> Value {
        json!({
            "id": self.id,
            "hostname": self.hostname,
            "ip": self.ip,
            "version": self.version,
            "sync_status": match self.refused {
                Some(status) => status,
                None if self.config_hash.is_empty() => "unknown",
                None => "normal",
            },
            "config_hash": if self.config_hash.is_empty() {
                "00000000000000000000000000000000".to_owned()
            } else {
                self.config_hash.clone()
            },
            "last_seen": self.last_seen,
            "labels": self.labels,
            "created_at": self.last_seen,
            "updated_at": self.last_seen,
            "ttl": PURGE_AFTER_SECS,
            "config_version": self.config_version,
            "connected": self.connected,
            "last_nack_error": self.last_nack,
            "last_propagation_ms": self.propagation_ms,
            "snapshots_sent": self.snapshots_sent,
            "deltas_sent": self.deltas_sent,
        })
    }

    /// A saved record, as a data plane that is not connected (yet).
    fn from_json(value: &Value) -> Option<PlaneStatus> {
        let text = |key: &str| value[key].as_str().unwrap_or_default().to_owned();
        Some(PlaneStatus {
            id: value["id"].as_str()?.to_owned(),
            hostname: text("hostname"),
            ip: text("ip"),
            version: text("version"),
            labels: serde_json::from_value(value["labels"].clone()).unwrap_or_default(),
            config_hash: match value["config_hash"].as_str() {
                Some("00000000000000000000000000000000") | None => String::new(),
                Some(hash) => hash.to_owned(),
            },
            config_version: value["config_version"].as_u64().unwrap_or(0),
            last_seen: value["last_seen"].as_u64().unwrap_or(0),
            connected: false,
            last_nack: value["last_nack_error"].as_str().map(str::to_owned),
            propagation_ms: value["last_propagation_ms"].as_f64(),
            snapshots_sent: 0,
            deltas_sent: 0,
            refused: None,
        })
    }
}

/// Published versions and the data planes' status.
pub struct Cluster {
    current: watch::Sender<Arc<Published>>,
    /// The last [`WINDOW`] deltas, oldest first.
    window: Mutex<VecDeque<Arc<DeltaEntry>>>,
    planes: Mutex<BTreeMap<String, PlaneStatus>>,
    /// Some status changed since the last save to the database.
    dirty: AtomicBool,
    /// Snapshots being sent and not yet answered, at most
    /// [`SNAPSHOTS_AT_ONCE`].
    snapshot_slots: Arc<tokio::sync::Semaphore>,
}

/// How many data planes receive a whole snapshot at the same time.
const SNAPSHOTS_AT_ONCE: usize = 4;

/// How often changed data-plane status is written to the database, in one
/// transaction for all of them.
pub const PERSIST_EVERY: Duration = Duration::from_secs(5);
/// Kong's `cluster_data_plane_purge_delay`: data planes not seen for this
/// long are forgotten.
const PURGE_AFTER_SECS: u64 = 14 * 24 * 3600;

impl Cluster {
    /// Publishes the configuration `dao` holds now.
    pub fn new(dao: &Dao) -> Arc<Cluster> {
        let published = publish(dao);
        let (current, _) = watch::channel(Arc::new(published));
        Arc::new(Cluster {
            current,
            window: Mutex::new(VecDeque::with_capacity(WINDOW)),
            planes: Mutex::new(BTreeMap::new()),
            dirty: AtomicBool::new(false),
            snapshot_slots: Arc::new(tokio::sync::Semaphore::new(SNAPSHOTS_AT_ONCE)),
        })
    }

    /// Loads the data planes a previous run saw (shown as disconnected
    /// until they reconnect), then saves changed status every
    /// [`PERSIST_EVERY`] in one transaction, and once more at shutdown.
    pub async fn persist(self: Arc<Self>, dao: Arc<Dao>, mut shutdown: watch::Receiver<()>) {
        let since = now_secs().saturating_sub(PURGE_AFTER_SECS);
        match dao
            .load_data_planes(i64::try_from(since).unwrap_or(0))
            .await
        {
            Ok(rows) => {
                if let Ok(mut planes) = self.planes.lock() {
                    for (id, body) in rows {
                        let parsed = serde_json::from_str::<Value>(&body)
                            .ok()
                            .and_then(|value| PlaneStatus::from_json(&value));
                        if let Some(plane) = parsed {
                            planes.entry(id).or_insert(plane);
                        }
                    }
                }
            }
            Err(error) => tracing::warn!(%error, "Cannot load the known data planes."),
        }
        let mut tick = tokio::time::interval(PERSIST_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let stop = tokio::select! {
                _ = tick.tick() => false,
                _ = shutdown.changed() => true,
            };
            if self.dirty.swap(false, Ordering::AcqRel) {
                let rows: Vec<(String, String, i64)> = match self.planes.lock() {
                    Ok(planes) => planes
                        .values()
                        .map(|plane| {
                            (
                                plane.id.clone(),
                                plane.to_json().to_string(),
                                i64::try_from(plane.last_seen).unwrap_or(i64::MAX),
                            )
                        })
                        .collect(),
                    Err(_) => Vec::new(),
                };
                if let Err(error) = dao.save_data_planes(&rows).await {
                    tracing::warn!(%error, "Cannot save data-plane status; retrying later.");
                    self.dirty.store(true, Ordering::Release);
                }
            }
            if stop {
                return;
            }
        }
    }

    /// Publishes every new version until `shutdown` changes. Bursts of
    /// writes coalesce: a build always starts from the newest version.
    pub async fn follow(self: Arc<Self>, dao: Arc<Dao>, mut shutdown: watch::Receiver<()>) {
        let mut versions = dao.subscribe();
        let mut last = Arc::clone(&self.current().snapshot);
        loop {
            tokio::select! {
                changed = versions.changed() => if changed.is_err() { return },
                _ = shutdown.changed() => return,
            }
            let dao = Arc::clone(&dao);
            let previous = Arc::clone(&last);
            let previous_hash = self.current().hash.clone();
            let built = tokio::task::spawn_blocking(move || {
                let published = publish(&dao);
                let delta = previous.diff(&published.snapshot);
                (published, delta)
            })
            .await;
            match built {
                Ok((published, delta)) => {
                    if published.hash == previous_hash {
                        continue;
                    }
                    tracing::debug!(
                        config_version = published.version,
                        "Configuration published to data planes."
                    );
                    let entry = Arc::new(DeltaEntry {
                        from_version: last.version,
                        from_hash: previous_hash,
                        hash: published.hash.clone(),
                        delta,
                    });
                    if let Ok(mut window) = self.window.lock() {
                        if window.len() == WINDOW {
                            window.pop_front();
                        }
                        window.push_back(entry);
                    }
                    last = Arc::clone(&published.snapshot);
                    self.current.send_replace(Arc::new(published));
                }
                Err(error) => tracing::error!(%error, "Publishing a configuration failed."),
            }
        }
    }

    /// The change from `from_hash` to `to`, composed from the window; `None`
    /// when the window does not reach back to `from_hash`.
    fn delta_since(&self, from_hash: &str, to: &Published) -> Option<(u64, SnapshotDelta)> {
        if from_hash.is_empty() {
            return None;
        }
        let window = self.window.lock().ok()?;
        let start = window
            .iter()
            .position(|entry| entry.from_hash == from_hash)?;
        let chain: Vec<&Arc<DeltaEntry>> = window.iter().skip(start).collect();
        if chain.last()?.hash != to.hash {
            return None;
        }
        let from_version = chain.first()?.from_version;
        let mut delta = SnapshotDelta::default();
        for entry in chain {
            delta = if delta.is_empty() {
                entry.delta.clone()
            } else {
                delta.then(&entry.delta)
            };
        }
        Some((from_version, delta))
    }

    pub fn current(&self) -> Arc<Published> {
        Arc::clone(&self.current.borrow())
    }

    /// `GET /clustering/data-planes`: Kong's fields, plus ours.
    pub fn data_planes(&self) -> Value {
        let planes = self.planes.lock().map(|p| p.clone()).unwrap_or_default();
        let data: Vec<Value> = planes.values().map(PlaneStatus::to_json).collect();
        json!({ "data": data, "next": null })
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut PlaneStatus)) {
        if let Ok(mut planes) = self.planes.lock() {
            if let Some(plane) = planes.get_mut(id) {
                plane.last_seen = now_secs();
                f(plane);
                self.dirty.store(true, Ordering::Release);
            }
        }
    }
}

/// The store's configuration now; its hash is kept by the store, so this
/// copies pointers and nothing else.
fn publish(dao: &Dao) -> Published {
    let snapshot = dao.read(|state| state.snapshot());
    Published {
        version: snapshot.version,
        hash: snapshot.hash(),
        snapshot: Arc::new(snapshot),
        at: Instant::now(),
    }
}

/// Kong's rule (`kong/clustering/compat`): same major version, and a data
/// plane's minor version no newer than the control plane's.
pub fn version_compatible(dp: &str, cp: &str) -> bool {
    let major_minor = |version: &str| -> Option<(u64, u64)> {
        let mut parts = version.split(['.', '-', '+']);
        Some((parts.next()?.parse().ok()?, parts.next()?.parse().ok()?))
    };
    match (major_minor(dp), major_minor(cp)) {
        (Some((dp_major, dp_minor)), Some((cp_major, cp_minor))) => {
            dp_major == cp_major && dp_minor <= cp_minor
        }
        _ => false,
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
        let refused = (!version_compatible(&hello.version, env!("CARGO_PKG_VERSION")))
            .then_some("kong_version_incompatible");
        tracing::info!(node_id = %id, hostname = %hello.hostname, %ip, version = %hello.version, "Data plane connected.");
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
                    snapshots_sent: 0,
                    deltas_sent: 0,
                    refused,
                },
            );
            self.cluster.dirty.store(true, Ordering::Release);
        }
        if refused.is_some() {
            tracing::warn!(node_id = %id, version = %hello.version, "Refusing a data plane whose version this control plane does not serve.");
            return Err(Status::failed_precondition(format!(
                "data plane version {} is incompatible with control plane version {}: the major versions must match and the data plane's minor version must not be newer",
                hello.version,
                env!("CARGO_PKG_VERSION")
            )));
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
    // Sending is paced by answers: while the data plane applies one
    // version, newer ones wait here and go as one delta to the newest,
    // rather than queueing a rebuild per version on the data plane.
    let mut awaiting: Option<Instant> = None;
    // Held from building a snapshot until the data plane answers it.
    let mut snapshot_slot: Option<tokio::sync::OwnedSemaphorePermit> = None;
    let mut heartbeat = tokio::time::interval(HEARTBEAT);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if awaiting.is_some_and(|since| since.elapsed() > ANSWER_TIMEOUT) {
            tracing::warn!(node_id = %id, "Data plane did not answer a configuration; closing its stream.");
            break;
        }
        let current = Arc::clone(&versions.borrow_and_update());
        if awaiting.is_none() && current.hash != sent_hash {
            nonce += 1;
            let messages = match cluster.delta_since(&sent_hash, &current) {
                Some((from_version, delta)) => {
                    vec![cp_message::Kind::Delta(gatehouse_proto::delta_message(
                        (from_version, &sent_hash),
                        (current.version, &current.hash),
                        &delta,
                        nonce.to_string(),
                    ))]
                }
                None => {
                    // Until a snapshot's parts are encoded and sent, they
                    // are a copy of the whole configuration: a hundred
                    // data planes connecting at once take turns rather
                    // than hold a hundred copies.
                    match Arc::clone(&cluster.snapshot_slots).acquire_owned().await {
                        Ok(permit) => drop(snapshot_slot.replace(permit)),
                        Err(_) => break,
                    }
                    // Copying every document is a few milliseconds at
                    // 30,000 entities: not on a runtime worker that serves
                    // other streams.
                    let (snapshot, hash, nonce) = (
                        Arc::clone(&current.snapshot),
                        current.hash.clone(),
                        nonce.to_string(),
                    );
                    match tokio::task::spawn_blocking(move || {
                        gatehouse_proto::snapshot_parts(
                            &snapshot,
                            &hash,
                            &nonce,
                            gatehouse_proto::SNAPSHOT_PART_BYTES,
                        )
                    })
                    .await
                    {
                        Ok(parts) => parts.into_iter().map(cp_message::Kind::Snapshot).collect(),
                        Err(_) => break,
                    }
                }
            };
            let is_delta = matches!(messages.first(), Some(cp_message::Kind::Delta(_)));
            let mut sent = true;
            for kind in messages {
                if outbound.send(CpMessage { kind: Some(kind) }).await.is_err() {
                    sent = false;
                    break;
                }
            }
            if !sent {
                break;
            }
            cluster.update(&id, |plane| {
                if is_delta {
                    plane.deltas_sent += 1;
                } else {
                    plane.snapshots_sent += 1;
                }
            });
            sent_hash.clone_from(&current.hash);
            awaiting = Some(Instant::now());
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
                Ok(Some(message)) => {
                    let answer = record(&cluster, &id, message, &current);
                    if answer.is_some() {
                        awaiting = None;
                        drop(snapshot_slot.take());
                    }
                    if answer == Some(false) {
                        // A refused delta or snapshot: send the whole
                        // current configuration.
                        sent_hash.clear();
                    }
                }
                Ok(None) | Err(_) => break,
            },
        }
    }
    cluster.update(&id, |plane| plane.connected = false);
    tracing::info!(node_id = %id, "Data plane disconnected.");
}

/// Records what a data plane reports: `Some(true)` for an Ack,
/// `Some(false)` for a Nack, `None` for anything else.
fn record(cluster: &Cluster, id: &str, message: DpMessage, current: &Published) -> Option<bool> {
    let answer = match message.kind {
        Some(dp_message::Kind::Ack(_)) => Some(true),
        Some(dp_message::Kind::Nack(_)) => Some(false),
        _ => None,
    };
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
    answer
}

#[cfg(test)]
mod tests {
    use super::version_compatible;

    #[test]
    fn versions_follow_kongs_rule() {
        assert!(version_compatible("0.1.0", "0.1.0"));
        assert!(version_compatible("3.4.2", "3.9.0"));
        assert!(version_compatible("3.9.1-rc1", "3.9.0"));
        assert!(!version_compatible("3.10.0", "3.9.0"));
        assert!(!version_compatible("2.8.0", "3.0.0"));
        assert!(!version_compatible("garbage", "3.0.0"));
    }
}
