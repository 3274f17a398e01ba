//! Where a request goes: the peer (`ip:port` and Host header) of its
//! service. A service whose `host` names an `upstreams` entity is balanced
//! over that upstream's targets with the upstream's algorithm, health
//! checks and threshold; any other host name is resolved by DNS; an IP is
//! used as is. This is Kong's `kong/runloop/balancer`, rebuilt so that the
//! request path only reads:
//!
//! * balancers are built with the runtime, off the request path, and an
//!   upstream whose definition and targets did not change keeps its
//!   balancer, health state and background tasks across config versions;
//! * the addresses of an upstream ([`ring::Ring`]) are replaced with one
//!   `ArcSwap::store` when DNS answers change them;
//! * health, in-flight counts and latencies are atomics per address
//!   ([`health::AddressHealth`]), shared by requests (passive checks), the
//!   active checker and the Admin API;
//! * DNS refreshes and active probes run in tasks owned by the balancer
//!   (or the cached name) that started them, stopped through a `watch`
//!   channel when it goes away.

mod checker;
mod dns;
mod hash;
mod health;
mod ring;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Instant;

use arc_swap::ArcSwap;
use gatehouse_model::snapshot::{
    ConfigSnapshot, Healthchecks, Service, SnapshotError, Target, Upstream,
};
use http::uri::Authority;
use http::{HeaderValue, StatusCode};
use http_body::{Body, Frame, SizeHint};
use tokio::sync::{watch, Notify};
use tokio::task::JoinHandle;
use tracing::Instrument as _;

pub(crate) use dns::DnsError;
pub(crate) use hash::HashInput;

use dns::{Answer, Dns, NameCache, NameLookup, NameState, RecordKind};
use hash::HashSpec;
use health::{Checks, Report, State};
use ring::{Address, Algorithm, Ring};

/// The balancers and resolved names of a data plane. They outlive
/// runtimes: a new config version reuses what did not change.
pub(crate) struct Balancers {
    dns: Dns,
    names: NameCache,
    /// By upstream id.
    upstreams: ArcSwap<HashMap<Box<str>, Arc<UpstreamBalancer>>>,
}

impl Default for Balancers {
    fn default() -> Self {
        Balancers {
            dns: Dns::from_system(),
            names: NameCache::default(),
            upstreams: ArcSwap::from_pointee(HashMap::new()),
        }
    }
}

/// How a service reaches its upstream.
pub(crate) enum Peers {
    /// The service host is an IP address.
    Fixed {
        authority: Authority,
        host_header: HeaderValue,
    },
    /// The service host is a name resolved by DNS.
    Name {
        name: Arc<NameState>,
        host_header: HeaderValue,
    },
    /// The service host names an upstream.
    Balancer {
        balancer: Arc<UpstreamBalancer>,
        /// The service speaks TLS, whose default port (443) the Host header
        /// leaves out.
        tls: bool,
    },
}

/// Why no peer could be chosen.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PeerError {
    #[error("upstream {upstream} has no healthy target")]
    NoPeer { upstream: Box<str> },
    #[error(transparent)]
    Dns(#[from] DnsError),
}

impl Peers {
    /// Chooses the peer of one request. Waits only for the first DNS
    /// answer of a name nobody has resolved yet. Cancel safe.
    /// Whether another attempt can land on another address: only an
    /// upstream's balancer has several to choose from.
    pub(crate) fn can_retry(&self) -> bool {
        matches!(self, Peers::Balancer { .. })
    }

    pub(crate) async fn pick(&self, input: &HashInput<'_>) -> Result<Peer, PeerError> {
        match self {
            Peers::Fixed {
                authority,
                host_header,
            } => Ok(Peer::untracked(authority.clone(), host_header.clone())),
            Peers::Name { name, host_header } => {
                Ok(Peer::untracked(name.pick().await?, host_header.clone()))
            }
            Peers::Balancer { balancer, tls } => balancer.pick(input, *tls).await,
        }
    }

    /// Whether picking a peer reads the request's headers.
    pub(crate) fn reads_headers(&self) -> bool {
        match self {
            Peers::Balancer { balancer, .. } => balancer
                .spec
                .hashing
                .as_ref()
                .is_some_and(HashSpec::reads_headers),
            _ => false,
        }
    }

    /// Whether routes to this service must keep their path regexes for
    /// `uri_capture` hashing.
    pub(crate) fn uses_uri_captures(&self) -> bool {
        match self {
            Peers::Balancer { balancer, .. } => balancer
                .spec
                .hashing
                .as_ref()
                .is_some_and(HashSpec::uses_uri_captures),
            _ => false,
        }
    }
}

/// The peer chosen for one request. Reports what happened to it (passive
/// health checks, connection counts, latency) and releases it when the
/// response ends.
pub(crate) struct Peer {
    pub(crate) authority: Authority,
    pub(crate) host_header: HeaderValue,
    /// `Set-Cookie` for the response when consistent hashing created the
    /// hash cookie.
    pub(crate) set_cookie: Option<HeaderValue>,
    tracker: Option<Tracker>,
}

/// Why a request to a peer failed, for passive health checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Failure {
    Timeout,
    /// Connecting, sending or receiving failed.
    Connection,
}

impl Peer {
    fn untracked(authority: Authority, host_header: HeaderValue) -> Peer {
        Peer {
            authority,
            host_header,
            set_cookie: None,
            tracker: None,
        }
    }

    /// Passive check of the response status.
    pub(crate) fn responded(&mut self, status: StatusCode) {
        if let Some(tracker) = &mut self.tracker {
            tracker.responded = true;
            let shared = &tracker.shared;
            if let Some((report, limit)) = shared.checks.passive.for_status(status.as_u16()) {
                shared.report(&tracker.address, report, limit, "passive");
            }
        }
    }

    /// Passive check of a failed request.
    pub(crate) fn failed(&mut self, failure: Failure) {
        if let Some(tracker) = &self.tracker {
            let report = match failure {
                Failure::Timeout => Report::Timeout,
                Failure::Connection => Report::TcpFailure,
            };
            let shared = &tracker.shared;
            shared.report(
                &tracker.address,
                report,
                shared.checks.passive.limit(report),
                "passive",
            );
        }
    }

    /// Keeps the peer counted as busy until `body` ends or is dropped.
    pub(crate) fn track<B>(&mut self, body: B) -> Tracked<B> {
        Tracked {
            inner: body,
            tracker: self.tracker.take(),
            on_end: None,
            sent: 0,
        }
    }
}

/// A request in flight to a balanced address.
struct Tracker {
    address: Arc<Address>,
    shared: Arc<Shared>,
    sent: Instant,
    responded: bool,
}

impl Tracker {
    fn new(address: Arc<Address>, shared: Arc<Shared>) -> Tracker {
        address.health.in_flight.fetch_add(1, Ordering::Relaxed);
        Tracker {
            address,
            shared,
            sent: Instant::now(),
            responded: false,
        }
    }
}

impl Drop for Tracker {
    fn drop(&mut self) {
        self.address
            .health
            .in_flight
            .fetch_sub(1, Ordering::Relaxed);
        if self.responded && self.shared.algorithm == Algorithm::Latency {
            self.address
                .health
                .record_latency(self.sent.elapsed(), health::now_micros());
        }
    }
}

/// What runs once a response body has been relayed (or abandoned), with
/// the bytes of body relayed: the plugins' log phase.
pub(crate) type OnEnd = Box<dyn FnOnce(u64) + Send>;

/// A response body that releases its peer when it ends.
pub(crate) struct Tracked<B> {
    inner: B,
    tracker: Option<Tracker>,
    on_end: Option<OnEnd>,
    /// Body bytes relayed so far, counted only for `on_end`.
    sent: u64,
}

impl<B> Tracked<B> {
    /// Runs `hook` when the body ends or is dropped.
    pub(crate) fn on_end(&mut self, hook: OnEnd) {
        self.on_end = Some(hook);
    }

    fn ended(&mut self) {
        self.tracker = None;
        if let Some(hook) = self.on_end.take() {
            hook(self.sent);
        }
    }
}

impl<B> Drop for Tracked<B> {
    fn drop(&mut self) {
        // A client that went away mid-body is still logged, as in Kong.
        if let Some(hook) = self.on_end.take() {
            hook(self.sent);
        }
    }
}

impl<B: Body + Unpin> Body for Tracked<B>
where
    B::Data: bytes::Buf,
{
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if this.on_end.is_some() {
            if let Poll::Ready(Some(Ok(frame))) = &polled {
                if let Some(data) = frame.data_ref() {
                    this.sent += bytes::Buf::remaining(data) as u64;
                }
            }
        }
        // Release the peer with the last frame: the server may not poll
        // again once the body says it has ended.
        if matches!(polled, Poll::Ready(None) | Poll::Ready(Some(Err(_))))
            || this.inner.is_end_stream()
        {
            this.ended();
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The balancer of one upstream at one definition (entity and targets).
pub(crate) struct UpstreamBalancer {
    spec: Spec,
    shared: Arc<Shared>,
    tasks: Tasks,
}

/// What a balancer is built from; an upstream whose spec is unchanged in
/// a new config version keeps its balancer.
#[derive(PartialEq)]
struct Spec {
    name: String,
    algorithm: Algorithm,
    hashing: Option<HashSpec>,
    host_header: Option<String>,
    use_srv_name: bool,
    healthchecks: Healthchecks,
    /// `(target, weight)`, sorted.
    targets: Vec<(String, u32)>,
}

/// The state of a balancer its background tasks share.
struct Shared {
    name: Box<str>,
    algorithm: Algorithm,
    checks: Checks,
    targets: Box<[TargetState]>,
    ring: ArcSwap<Ring>,
    /// Upstream `host_header`.
    host_header: Option<Box<str>>,
    use_srv_name: bool,
    /// Every name target has had a first DNS answer (or error).
    resolved: AtomicBool,
    resolved_notify: Notify,
}

struct TargetState {
    /// `host:port`, as the entity has it.
    target: Box<str>,
    /// A name, or an IP address as written in the target (IPv6 in
    /// brackets).
    host: Box<str>,
    port: u16,
    weight: u32,
    ip: Option<IpAddr>,
    resolution: ArcSwap<Resolution>,
}

#[derive(Clone)]
struct Resolution {
    dns: DnsStatus,
    addresses: Box<[Arc<Address>]>,
    /// The last good answer, to tell whether a new one changes anything.
    answer: Option<Answer>,
    /// When to query again; `None` for IP targets.
    refresh_at: Option<Instant>,
}

#[derive(Clone, Debug)]
enum DnsStatus {
    Pending,
    Records(RecordKind),
    Error(Box<str>),
}

impl DnsStatus {
    fn as_str(&self) -> &str {
        match self {
            DnsStatus::Pending => "unknown",
            DnsStatus::Records(kind) => kind.as_str(),
            DnsStatus::Error(error) => error,
        }
    }
}

impl UpstreamBalancer {
    fn new(
        upstream: &Upstream,
        spec: Spec,
        previous: Option<&UpstreamBalancer>,
    ) -> UpstreamBalancer {
        let checks = Checks::new(&spec.healthchecks);
        let targets: Box<[TargetState]> = spec
            .targets
            .iter()
            .filter_map(|(target, weight)| TargetState::new(target, *weight))
            .collect();
        let shared = Arc::new(Shared {
            name: upstream.name.as_str().into(),
            algorithm: spec.algorithm,
            checks,
            targets,
            ring: ArcSwap::from_pointee(Ring::build(spec.algorithm, Vec::new(), &[])),
            host_header: spec.host_header.as_deref().map(Into::into),
            use_srv_name: spec.use_srv_name,
            resolved: AtomicBool::new(false),
            resolved_notify: Notify::new(),
        });
        let mut all_resolved = true;
        for (idx, target) in shared.targets.iter().enumerate() {
            let old = previous.and_then(|previous| {
                previous
                    .shared
                    .targets
                    .iter()
                    .find(|old| old.target == target.target)
                    .map(|old| old.resolution.load_full())
            });
            let old_addresses = old.as_ref().map_or(&[][..], |old| &old.addresses[..]);
            let resolution = if let Some(ip) = target.ip {
                let kind = if ip.is_ipv4() {
                    RecordKind::A
                } else {
                    RecordKind::Aaaa
                };
                Resolution {
                    dns: DnsStatus::Records(kind),
                    addresses: shared
                        .address(idx, ip, target.port, target.weight, None, old_addresses)
                        .into_iter()
                        .collect(),
                    answer: None,
                    refresh_at: None,
                }
            } else if let Some(answer) = old.as_ref().and_then(|old| old.answer.clone()) {
                // The name was resolved for the previous definition: keep
                // the answer (and the health of its addresses) until the
                // refresh the TTL calls for.
                Resolution {
                    dns: DnsStatus::Records(answer.kind),
                    addresses: shared.addresses_from(idx, &answer, old_addresses),
                    refresh_at: old.as_ref().and_then(|old| old.refresh_at),
                    answer: Some(answer),
                }
            } else {
                all_resolved = false;
                Resolution {
                    dns: DnsStatus::Pending,
                    addresses: Box::new([]),
                    answer: None,
                    refresh_at: None,
                }
            };
            target.resolution.store(Arc::new(resolution));
        }
        shared.resolved.store(all_resolved, Ordering::Release);
        shared.rebuild_ring();
        UpstreamBalancer {
            spec,
            shared,
            tasks: Tasks::default(),
        }
    }

    async fn pick(&self, input: &HashInput<'_>, tls: bool) -> Result<Peer, PeerError> {
        let hashed = self.spec.hashing.as_ref().map(|spec| spec.hash(input));
        let point = hashed.as_ref().map_or(0, |hashed| hashed.point);
        let shared = &self.shared;
        let mut waited = false;
        loop {
            if let Some(address) = shared.pick(point) {
                return Ok(Peer {
                    authority: address.authority.clone(),
                    host_header: address.host_headers[usize::from(tls)].clone(),
                    set_cookie: hashed.and_then(|hashed| hashed.set_cookie),
                    tracker: Some(Tracker::new(address, Arc::clone(shared))),
                });
            }
            // Targets that are names may still be resolving for the first
            // time: wait for that once, as Kong resolves on first use. The
            // waiter is registered before the flag is read again, so the
            // wake-up cannot be missed.
            if waited || shared.resolved.load(Ordering::Acquire) {
                return Err(PeerError::NoPeer {
                    upstream: shared.name.clone(),
                });
            }
            waited = true;
            let resolved = shared.resolved_notify.notified();
            tokio::pin!(resolved);
            resolved.as_mut().enable();
            if !shared.resolved.load(Ordering::Acquire) {
                let _ = tokio::time::timeout(dns::FIRST_ANSWER_WAIT, resolved).await;
            }
        }
    }

    fn start(&self, dns: &Dns, runtime: Option<&tokio::runtime::Handle>) {
        let span = tracing::info_span!("balancer", upstream = %self.shared.name);
        let mut tasks: Vec<Pin<Box<dyn Future<Output = ()> + Send>>> = Vec::new();
        if self.shared.targets.iter().any(|target| target.ip.is_none()) {
            tasks.push(Box::pin(
                Arc::clone(&self.shared)
                    .refresh_names(dns.clone(), self.tasks.subscribe())
                    .instrument(span.clone()),
            ));
        }
        tasks.extend(checker::tasks(&self.shared, &self.tasks, &span));
        self.tasks.start(runtime, tasks);
    }
}

impl Spec {
    fn new(upstream: &Upstream, targets: &[&Target]) -> Spec {
        let algorithm = Algorithm::new(&upstream.algorithm, upstream.slots);
        let mut targets: Vec<(String, u32)> = targets
            .iter()
            .map(|target| (target.target.clone(), target.weight))
            .collect();
        targets.sort();
        Spec {
            name: upstream.name.clone(),
            algorithm,
            hashing: matches!(algorithm, Algorithm::ConsistentHashing { .. })
                .then(|| HashSpec::new(upstream)),
            host_header: upstream.host_header.clone(),
            use_srv_name: upstream.use_srv_name.unwrap_or(false),
            healthchecks: upstream.healthchecks.clone().unwrap_or_default(),
            targets,
        }
    }
}

impl TargetState {
    fn new(target: &str, weight: u32) -> Option<TargetState> {
        let (host, port) = target.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        let ip = match host
            .strip_prefix('[')
            .and_then(|host| host.strip_suffix(']'))
        {
            Some(v6) => Some(IpAddr::V6(v6.parse().ok()?)),
            None => host.parse::<IpAddr>().ok(),
        };
        Some(TargetState {
            target: target.into(),
            host: host.into(),
            port,
            weight,
            ip,
            resolution: ArcSwap::from_pointee(Resolution {
                dns: DnsStatus::Pending,
                addresses: Box::new([]),
                answer: None,
                refresh_at: None,
            }),
        })
    }
}

impl Shared {
    fn pick(&self, point: u32) -> Option<Arc<Address>> {
        let ring = self.ring.load();
        if self.checks.threshold > 0.0 {
            // Kong's balancer health: the available share of the weight
            // must exceed the threshold.
            let total = ring.total_weight as f64;
            if total == 0.0
                || ring.available_weight() as f64 * 100.0 / total <= self.checks.threshold
            {
                return None;
            }
        }
        ring.pick(point).cloned()
    }

    fn rebuild_ring(&self) {
        let addresses: Vec<Arc<Address>> = self
            .targets
            .iter()
            .flat_map(|target| target.resolution.load().addresses.to_vec())
            .collect();
        let keys: Vec<(&str, u16)> = self
            .targets
            .iter()
            .map(|target| (&*target.host, target.port))
            .collect();
        self.ring
            .store(Arc::new(Ring::build(self.algorithm, addresses, &keys)));
    }

    /// The address `ip:port` of target `target_idx`, keeping the health of
    /// the same address in `previous`.
    fn address(
        &self,
        target_idx: usize,
        ip: IpAddr,
        port: u16,
        weight: u32,
        srv_name: Option<&str>,
        previous: &[Arc<Address>],
    ) -> Option<Arc<Address>> {
        let target = &self.targets[target_idx];
        // Kong: the upstream's host_header, else the target's name (the
        // SRV target's with use_srv_name), else the IP as written.
        let host = match (&self.host_header, srv_name) {
            (Some(host), _) => host,
            (None, Some(name)) if self.use_srv_name => name,
            (None, _) => &*target.host,
        };
        let with_port = |default: u16| {
            if port == default {
                HeaderValue::try_from(host)
            } else {
                HeaderValue::try_from(format!("{host}:{port}"))
            }
        };
        let health = previous
            .iter()
            .find(|old| old.ip == ip && old.port == port)
            .map_or_else(Default::default, |old| Arc::clone(&old.health));
        Some(Arc::new(Address {
            ip,
            port,
            weight,
            target_idx,
            authority: dns::authority(ip, port)?,
            host_headers: [with_port(80).ok()?, with_port(443).ok()?],
            probe_host: self.host_header.as_deref().unwrap_or(&target.host).into(),
            health,
        }))
    }

    fn addresses_from(
        &self,
        target_idx: usize,
        answer: &Answer,
        previous: &[Arc<Address>],
    ) -> Box<[Arc<Address>]> {
        let target = &self.targets[target_idx];
        answer
            .records
            .iter()
            .filter_map(|record| {
                let port = if record.port == 0 {
                    target.port
                } else {
                    record.port
                };
                // SRV weights replace the target's, but a target of weight
                // 0 stays out.
                let weight = match record.weight {
                    Some(weight) if target.weight > 0 => u32::from(weight),
                    _ => target.weight,
                };
                self.address(
                    target_idx,
                    record.ip,
                    port,
                    weight,
                    record.name.as_deref(),
                    previous,
                )
            })
            .collect()
    }

    /// Counts a health report and logs the change it makes.
    fn report(&self, address: &Address, report: Report, limit: u8, check: &'static str) {
        if !self.checks.enabled {
            return;
        }
        if let Some(state) = address.health.report(report, limit) {
            self.log_change(address, state, check);
        }
    }

    fn log_change(&self, address: &Address, state: State, check: &'static str) {
        let target = self
            .targets
            .get(address.target_idx)
            .map_or("", |target| &*target.target);
        tracing::warn!(
            upstream = %self.name,
            target,
            address = %address.authority,
            health = state.as_str(),
            check,
            "Target health changed."
        );
    }

    /// Resolves the name targets when their answers expire, until
    /// `shutdown`. Cancel safe.
    async fn refresh_names(self: Arc<Self>, dns: Dns, mut shutdown: watch::Receiver<()>) {
        loop {
            let now = Instant::now();
            let due: Vec<usize> = self
                .targets
                .iter()
                .enumerate()
                .filter(|(_, target)| {
                    target.ip.is_none()
                        && target
                            .resolution
                            .load()
                            .refresh_at
                            .is_none_or(|at| at <= now)
                })
                .map(|(idx, _)| idx)
                .collect();
            let lookups = due.iter().map(|idx| dns.resolve(&self.targets[*idx].host));
            let answers = tokio::select! {
                _ = shutdown.changed() => return,
                answers = futures_util::future::join_all(lookups) => answers,
            };
            let mut changed = false;
            for (idx, answer) in due.into_iter().zip(answers) {
                changed |= self.apply_answer(idx, answer, now);
            }
            if changed {
                self.rebuild_ring();
            }
            if !self.resolved.swap(true, Ordering::AcqRel) {
                self.resolved_notify.notify_waiters();
            }
            let next = self
                .targets
                .iter()
                .filter_map(|target| target.resolution.load().refresh_at)
                .min()
                .unwrap_or(now + dns::REQUERY);
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep_until(next.into()) => {}
            }
        }
    }

    /// Stores a DNS answer for target `idx`; true when its addresses
    /// changed.
    fn apply_answer(&self, idx: usize, answer: Result<Answer, DnsError>, now: Instant) -> bool {
        let target = &self.targets[idx];
        let current = target.resolution.load_full();
        match answer {
            Ok(answer) => {
                let refresh_at = Some(dns::next_refresh(answer.valid_until, now));
                let same = current
                    .answer
                    .as_ref()
                    .is_some_and(|old| old.kind == answer.kind && old.records == answer.records);
                if same {
                    target.resolution.store(Arc::new(Resolution {
                        refresh_at,
                        ..Resolution::clone(&current)
                    }));
                    return false;
                }
                let addresses = self.addresses_from(idx, &answer, &current.addresses);
                tracing::info!(upstream = %self.name, target = %target.target, addresses = addresses.len(), record = answer.kind.as_str(), "Target resolved.");
                target.resolution.store(Arc::new(Resolution {
                    dns: DnsStatus::Records(answer.kind),
                    addresses,
                    answer: Some(answer),
                    refresh_at,
                }));
                true
            }
            Err(error) => {
                let refresh_at = Some(now + dns::REQUERY);
                if current.answer.is_some() {
                    tracing::warn!(upstream = %self.name, target = %target.target, %error, "Target does not resolve any more; keeping its last addresses.");
                    target.resolution.store(Arc::new(Resolution {
                        refresh_at,
                        ..Resolution::clone(&current)
                    }));
                    return false;
                }
                tracing::warn!(upstream = %self.name, target = %target.target, %error, "Target does not resolve.");
                target.resolution.store(Arc::new(Resolution {
                    dns: DnsStatus::Error(error.to_string().into()),
                    addresses: Box::new([]),
                    answer: None,
                    refresh_at,
                }));
                !current.addresses.is_empty()
            }
        }
    }
}

/// Background tasks and the signal that stops them. Dropping it stops and
/// aborts them.
pub(crate) struct Tasks {
    shutdown: watch::Sender<()>,
    handles: OnceLock<Box<[JoinHandle<()>]>>,
}

impl Default for Tasks {
    fn default() -> Self {
        Tasks {
            shutdown: watch::channel(()).0,
            handles: OnceLock::new(),
        }
    }
}

impl Tasks {
    /// A shutdown receiver for a task of this owner: `changed()` returns
    /// when the owner stops or goes away.
    pub(crate) fn subscribe(&self) -> watch::Receiver<()> {
        self.shutdown.subscribe()
    }

    /// Spawns `tasks` on `runtime`; without one (a build outside tokio)
    /// nothing runs in the background.
    pub(crate) fn start(
        &self,
        runtime: Option<&tokio::runtime::Handle>,
        tasks: Vec<Pin<Box<dyn Future<Output = ()> + Send>>>,
    ) {
        if tasks.is_empty() {
            return;
        }
        let Some(runtime) = runtime else {
            tracing::warn!("No async runtime: DNS refreshes and active health checks do not run.");
            return;
        };
        let handles = tasks.into_iter().map(|task| runtime.spawn(task)).collect();
        let _ = self.handles.set(handles);
    }

    pub(crate) fn stop(&self) {
        self.shutdown.send_replace(());
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        self.stop();
        for handle in self.handles.get().into_iter().flatten() {
            handle.abort();
        }
    }
}

/// The balancers and names one runtime build uses. Publishing (after the
/// build succeeded) starts what is new and stops what is gone; dropping it
/// instead leaves the running ones untouched.
pub(crate) struct BalancerLookup<'b> {
    balancers: &'b Balancers,
    names: NameLookup<'b>,
    previous: Arc<HashMap<Box<str>, Arc<UpstreamBalancer>>>,
    used: HashMap<Box<str>, Arc<UpstreamBalancer>>,
    by_name: HashMap<String, Arc<UpstreamBalancer>>,
}

impl<'b> BalancerLookup<'b> {
    pub(crate) fn new(
        balancers: &'b Balancers,
        snapshot: &ConfigSnapshot,
    ) -> Result<Self, SnapshotError> {
        let upstreams: Vec<Upstream> = snapshot.typed("upstreams")?;
        let targets: Vec<Target> = snapshot.typed("targets")?;
        let mut targets_by_upstream: HashMap<&str, Vec<&Target>> = HashMap::new();
        for target in &targets {
            targets_by_upstream
                .entry(target.upstream.id.as_str())
                .or_default()
                .push(target);
        }
        let previous = balancers.upstreams.load_full();
        let mut used = HashMap::with_capacity(upstreams.len());
        let mut by_name = HashMap::with_capacity(upstreams.len());
        for upstream in &upstreams {
            let spec = Spec::new(
                upstream,
                targets_by_upstream
                    .get(upstream.id.as_str())
                    .map_or(&[][..], Vec::as_slice),
            );
            let old = previous.get(upstream.id.as_str());
            let balancer = match old {
                Some(old) if old.spec == spec => Arc::clone(old),
                _ => Arc::new(UpstreamBalancer::new(upstream, spec, old.map(|old| &**old))),
            };
            by_name.insert(upstream.name.clone(), Arc::clone(&balancer));
            used.insert(upstream.id.as_str().into(), balancer);
        }
        Ok(BalancerLookup {
            balancers,
            names: NameLookup::new(&balancers.names),
            previous,
            used,
            by_name,
        })
    }

    /// How `service` reaches its upstream. `authority` and `host_header`
    /// are the service's own, used when its host is no upstream.
    pub(crate) fn peers(
        &mut self,
        service: &Service,
        authority: &Authority,
        host_header: HeaderValue,
    ) -> Peers {
        if let Some(balancer) = self.by_name.get(&service.host) {
            return Peers::Balancer {
                balancer: Arc::clone(balancer),
                tls: matches!(service.protocol.as_str(), "https" | "grpcs" | "tls"),
            };
        }
        let host = service.host.trim_start_matches('[').trim_end_matches(']');
        if host.parse::<IpAddr>().is_ok() {
            Peers::Fixed {
                authority: authority.clone(),
                host_header,
            }
        } else {
            Peers::Name {
                name: self.names.get(&service.host, service.port),
                host_header,
            }
        }
    }

    /// Keeps what `peers`, built by the previous runtime, resolve through;
    /// false when that is gone (the service must be built anew). Every
    /// upstream's balancer is kept by [`BalancerLookup::new`] already.
    pub(crate) fn keep(&mut self, peers: &Peers) -> bool {
        match peers {
            Peers::Fixed { .. } => true,
            Peers::Name { name, .. } => self.names.keep(name),
            Peers::Balancer { balancer, .. } => self
                .by_name
                .get(&balancer.spec.name)
                .is_some_and(|current| Arc::ptr_eq(current, balancer)),
        }
    }

    pub(crate) fn publish(self) {
        let runtime = tokio::runtime::Handle::try_current().ok();
        for (id, balancer) in &self.used {
            let reused = self
                .previous
                .get(id)
                .is_some_and(|old| Arc::ptr_eq(old, balancer));
            if !reused {
                balancer.start(&self.balancers.dns, runtime.as_ref());
            }
        }
        for (id, old) in self.previous.iter() {
            let kept = self
                .used
                .get(id)
                .is_some_and(|balancer| Arc::ptr_eq(old, balancer));
            if !kept {
                old.tasks.stop();
            }
        }
        self.names.publish(&self.balancers.dns, runtime.as_ref());
        self.balancers.upstreams.store(Arc::new(self.used));
    }
}

use gatehouse_model::health::{AddressHealth, TargetHealth, UpstreamHealth, Weight};

/// Why a target's health could not be set.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SetHealthError {
    #[error("Upstream {upstream} has no balancer")]
    NoBalancer { upstream: String },
    #[error("no healthchecker found for {upstream}")]
    ChecksOff { upstream: String },
}

impl Balancers {
    pub(crate) fn health(&self, upstream_id: &str) -> Option<UpstreamHealth> {
        let upstreams = self.upstreams.load();
        let shared = &upstreams.get(upstream_id)?.shared;
        let mut weight = Weight::default();
        let targets = shared
            .targets
            .iter()
            .map(|target| {
                let resolution = target.resolution.load();
                let mut target_weight = Weight::default();
                let addresses = resolution
                    .addresses
                    .iter()
                    .map(|address| {
                        let available = address.health.is_available();
                        target_weight.add(address.weight, available);
                        weight.add(address.weight, available);
                        AddressHealth {
                            ip: address.ip.to_string(),
                            port: address.port,
                            weight: address.weight,
                            healthy: available,
                        }
                    })
                    .collect();
                TargetHealth {
                    target: target.target.to_string(),
                    host: target.host.to_string(),
                    port: target.port,
                    dns: resolution.dns.as_str().to_owned(),
                    node_weight: target.weight,
                    weight: target_weight,
                    addresses,
                }
            })
            .collect();
        let healthy = weight.total > 0
            && weight.available as f64 * 100.0 / weight.total as f64 > shared.checks.threshold;
        Some(UpstreamHealth {
            healthchecks: shared.checks.enabled,
            healthy,
            weight,
            targets,
        })
    }

    /// Forces the health of the addresses of `target` (`host:port`) in an
    /// upstream, or of one of them. An unknown target or address changes
    /// nothing, as in Kong.
    pub(crate) fn set_health(
        &self,
        upstream_id: &str,
        upstream_name: &str,
        target: &str,
        address: Option<SocketAddr>,
        healthy: bool,
    ) -> Result<(), SetHealthError> {
        let upstreams = self.upstreams.load();
        let Some(balancer) = upstreams.get(upstream_id) else {
            return Err(SetHealthError::NoBalancer {
                upstream: upstream_name.to_owned(),
            });
        };
        let shared = &balancer.shared;
        if !shared.checks.enabled {
            return Err(SetHealthError::ChecksOff {
                upstream: shared.name.to_string(),
            });
        }
        let Some(state) = shared.targets.iter().find(|state| &*state.target == target) else {
            return Ok(());
        };
        for found in state
            .resolution
            .load()
            .addresses
            .iter()
            .filter(|found| address.is_none_or(|address| found.socket_addr() == address))
        {
            let before = found.health.set(healthy);
            let after = found.health.state();
            if before != after {
                shared.log_change(found, after, "manual");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests;
