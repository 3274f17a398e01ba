//! Per-address health, as lua-resty-healthcheck keeps it for Kong: four
//! states (healthy, mostly healthy, mostly unhealthy, unhealthy) and four
//! counters (successes, HTTP failures, TCP failures, timeouts) packed into
//! one atomic word, so that requests (passive checks), the active checker
//! and the Admin API update it with a compare-and-swap and no lock.
//!
//! A success clears the failure counters and a failure clears the success
//! counter; a counter reaching its configured limit moves the address to
//! healthy or unhealthy. A limit of 0 disables that counter. Only
//! `healthy` and `mostly healthy` addresses take traffic, as in Kong, where
//! the balancer follows the checker's `healthy`/`unhealthy` events only.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use gatehouse_model::snapshot::Healthchecks;

/// What one observation says about an address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Report {
    Success,
    HttpFailure,
    TcpFailure,
    Timeout,
}

impl Report {
    fn shift(self) -> u32 {
        match self {
            Report::Success => 0,
            Report::HttpFailure => 8,
            Report::TcpFailure => 16,
            Report::Timeout => 24,
        }
    }
}

/// lua-resty-healthcheck's internal health of a target.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum State {
    Healthy,
    MostlyHealthy,
    MostlyUnhealthy,
    Unhealthy,
}

impl State {
    pub(crate) fn is_available(self) -> bool {
        matches!(self, State::Healthy | State::MostlyHealthy)
    }

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            State::Healthy => "healthy",
            State::MostlyHealthy => "mostly_healthy",
            State::MostlyUnhealthy => "mostly_unhealthy",
            State::Unhealthy => "unhealthy",
        }
    }

    fn encode(self) -> u64 {
        match self {
            State::Healthy => 0,
            State::MostlyHealthy => 1,
            State::MostlyUnhealthy => 2,
            State::Unhealthy => 3,
        }
    }

    fn decode(word: u64) -> State {
        match (word >> STATE_SHIFT) & 0b11 {
            0 => State::Healthy,
            1 => State::MostlyHealthy,
            2 => State::MostlyUnhealthy,
            _ => State::Unhealthy,
        }
    }
}

const STATE_SHIFT: u32 = 32;
const COUNTERS: u64 = 0xffff_ffff;
const MASK_SUCCESS: u64 = 0x0000_00ff;
const MASK_FAILURE: u64 = 0xffff_ff00;

/// The health and load of one address, shared by every request, the
/// checkers and the Admin API. Outlives DNS refreshes and config versions
/// while the address stays in its upstream.
pub(crate) struct AddressHealth {
    /// Counters in the low 32 bits (one byte per [`Report`]), the
    /// [`State`] above them.
    word: AtomicU64,
    /// Requests sent to the address whose response has not ended
    /// (least-connections).
    pub(crate) in_flight: AtomicU32,
    /// Response-time EWMA in milliseconds, as `f64` bits (latency).
    ewma: AtomicU64,
    /// When the EWMA was last updated, in microseconds since [`epoch`];
    /// 0 when never.
    ewma_at: AtomicU64,
}

impl Default for AddressHealth {
    fn default() -> Self {
        AddressHealth {
            word: AtomicU64::new(State::Healthy.encode() << STATE_SHIFT),
            in_flight: AtomicU32::new(0),
            ewma: AtomicU64::new(0f64.to_bits()),
            ewma_at: AtomicU64::new(0),
        }
    }
}

impl AddressHealth {
    pub(crate) fn state(&self) -> State {
        State::decode(self.word.load(Ordering::Acquire))
    }

    pub(crate) fn is_available(&self) -> bool {
        self.state().is_available()
    }

    /// Counts `report` against `limit` and returns the new state when the
    /// report changed it. Reports that agree with a settled state (a
    /// success on a healthy address) are not counted, as in Kong.
    pub(crate) fn report(&self, report: Report, limit: u8) -> Option<State> {
        if limit == 0 {
            return None;
        }
        let mut changed = None;
        let _ = self
            .word
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |word| {
                changed = None;
                let state = State::decode(word);
                let target = if report == Report::Success {
                    State::Healthy
                } else {
                    State::Unhealthy
                };
                if state == target {
                    return None;
                }
                let shift = report.shift();
                let count = (((word >> shift) & 0xff) as u8).saturating_add(1);
                let mut counters =
                    (word & COUNTERS & !(0xff << shift)) | (u64::from(count) << shift);
                counters &= if report == Report::Success {
                    MASK_SUCCESS
                } else {
                    MASK_FAILURE
                };
                let next = if count >= limit {
                    target
                } else if state == State::Healthy && counters & MASK_FAILURE != 0 {
                    State::MostlyHealthy
                } else if state == State::Unhealthy && counters & MASK_SUCCESS != 0 {
                    State::MostlyUnhealthy
                } else {
                    state
                };
                changed = (next != state).then_some(next);
                Some((next.encode() << STATE_SHIFT) | counters)
            });
        changed
    }

    /// Forces the state and clears the counters (the Admin API's
    /// `healthy`/`unhealthy` endpoints). Returns the previous state.
    pub(crate) fn set(&self, healthy: bool) -> State {
        let state = if healthy {
            State::Healthy
        } else {
            State::Unhealthy
        };
        State::decode(
            self.word
                .swap(state.encode() << STATE_SHIFT, Ordering::AcqRel),
        )
    }

    /// The EWMA decayed to `now` without recording anything (Kong's
    /// `get_or_update_ewma(…, 0, false)`), in milliseconds.
    pub(crate) fn latency_score(&self, now: u64) -> f64 {
        let ewma = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        ewma * decay(self.ewma_at.load(Ordering::Relaxed), now)
    }

    /// Folds one response time into the EWMA. Concurrent updates may lose
    /// one sample to another, which an average tolerates.
    pub(crate) fn record_latency(&self, rtt: Duration, now: u64) {
        let weight = decay(self.ewma_at.load(Ordering::Relaxed), now);
        let ewma = f64::from_bits(self.ewma.load(Ordering::Relaxed));
        let rtt = rtt.as_secs_f64() * 1000.0;
        let next = ewma * weight + rtt * (1.0 - weight);
        self.ewma.store(next.to_bits(), Ordering::Relaxed);
        self.ewma_at.store(now.max(1), Ordering::Relaxed);
    }

    /// Whether the EWMA has ever been recorded or seeded.
    pub(crate) fn has_latency(&self) -> bool {
        self.ewma_at.load(Ordering::Relaxed) != 0
    }

    /// Starts a new address at `ewma` so that it is not flooded before it
    /// has a history (Kong's slow start).
    pub(crate) fn seed_latency(&self, ewma: f64, now: u64) {
        self.ewma.store(ewma.to_bits(), Ordering::Relaxed);
        self.ewma_at.store(now.max(1), Ordering::Relaxed);
    }
}

/// Kong's EWMA decay time.
const DECAY_SECONDS: f64 = 10.0;

/// The weight of the old EWMA after the time since `touched`; a value
/// never touched weighs nothing (Kong's last touch defaults to the epoch).
fn decay(touched: u64, now: u64) -> f64 {
    if touched == 0 {
        return 0.0;
    }
    let elapsed = now.saturating_sub(touched) as f64 / 1e6;
    (-elapsed / DECAY_SECONDS).exp()
}

/// Microseconds since the first call in this process: a cheap monotonic
/// clock that fits an atomic.
pub(crate) fn now_micros() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// HTTP statuses 100–999 as a bit set.
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct StatusSet([u64; 16]);

impl StatusSet {
    pub(crate) fn new(statuses: &[u16]) -> StatusSet {
        let mut bits = [0u64; 16];
        for &status in statuses.iter().filter(|status| **status < 1024) {
            bits[usize::from(status / 64)] |= 1 << (status % 64);
        }
        StatusSet(bits)
    }

    pub(crate) fn contains(&self, status: u16) -> bool {
        status < 1024 && self.0[usize::from(status / 64)] & (1 << (status % 64)) != 0
    }
}

/// How one kind of check (active or passive) judges what it sees.
#[derive(Clone)]
pub(crate) struct Verdicts {
    healthy_statuses: StatusSet,
    unhealthy_statuses: StatusSet,
    successes: u8,
    http_failures: u8,
    tcp_failures: u8,
    timeouts: u8,
}

impl Verdicts {
    /// The report an HTTP status makes and its limit; `None` for statuses
    /// in neither list. Status 0 (an unparsable response) is a failure.
    pub(crate) fn for_status(&self, status: u16) -> Option<(Report, u8)> {
        if self.healthy_statuses.contains(status) {
            Some((Report::Success, self.successes))
        } else if status == 0 || self.unhealthy_statuses.contains(status) {
            Some((Report::HttpFailure, self.http_failures))
        } else {
            None
        }
    }

    pub(crate) fn limit(&self, report: Report) -> u8 {
        match report {
            Report::Success => self.successes,
            Report::HttpFailure => self.http_failures,
            Report::TcpFailure => self.tcp_failures,
            Report::Timeout => self.timeouts,
        }
    }
}

/// What an active probe does once connected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ProbeKind {
    /// Connect, then close (`tcp`; also `grpc`/`grpcs` for now).
    Tcp,
    /// `GET http_path`, judged by the status line (`http`, and `https`
    /// after a TLS handshake when [`Active::tls`] is set).
    Http,
}

/// The TLS side of `https` probes: `https_verify_certificate` against the
/// bundled Mozilla roots, SNI from `https_sni` or the target's host name.
pub(crate) struct ProbeTls {
    pub(crate) config: Arc<rustls::ClientConfig>,
    pub(crate) sni: Option<Box<str>>,
}

/// `healthchecks.active`, resolved for the checker.
pub(crate) struct Active {
    pub(crate) kind: ProbeKind,
    /// Set for `https` probes. `Err` when the client config did not build:
    /// such probes fail.
    pub(crate) tls: Option<Result<ProbeTls, Arc<crate::tls::TlsError>>>,
    pub(crate) timeout: Duration,
    pub(crate) concurrency: usize,
    pub(crate) http_path: Box<str>,
    /// Extra request header lines, each ending in CRLF.
    pub(crate) headers: Box<str>,
    pub(crate) healthy_interval: Option<Duration>,
    pub(crate) unhealthy_interval: Option<Duration>,
    pub(crate) verdicts: Verdicts,
}

/// An upstream's `healthchecks`, resolved once per config version.
pub(crate) struct Checks {
    /// Kong's `is_upstream_using_healthcheck`: an active interval or a
    /// passive failure limit is set. Without it addresses are always
    /// available and reports are ignored.
    pub(crate) enabled: bool,
    pub(crate) active: Option<Active>,
    pub(crate) passive: Verdicts,
    /// Percentage of weight that must be available for the upstream to
    /// take traffic.
    pub(crate) threshold: f64,
}

impl Checks {
    pub(crate) fn new(config: &Healthchecks) -> Checks {
        let active = &config.active;
        let passive = &config.passive;
        let interval = |seconds: f64| {
            (seconds > 0.0 && seconds.is_finite()).then(|| Duration::from_secs_f64(seconds))
        };
        let healthy_interval = interval(active.healthy.interval);
        let unhealthy_interval = interval(active.unhealthy.interval);
        let enabled = healthy_interval.is_some()
            || unhealthy_interval.is_some()
            || passive.unhealthy.tcp_failures != 0
            || passive.unhealthy.timeouts != 0
            || passive.unhealthy.http_failures != 0;
        let kind = match active.kind.as_str() {
            "http" | "https" => ProbeKind::Http,
            _ => ProbeKind::Tcp,
        };
        let mut headers = String::new();
        for (name, values) in active.headers.iter().flatten() {
            for value in values {
                headers.push_str(name);
                headers.push_str(": ");
                headers.push_str(value);
                headers.push_str("\r\n");
            }
        }
        let tls = (active.kind == "https").then(|| {
            let upstream_tls = crate::tls::UpstreamTls {
                verify: active.https_verify_certificate,
                ..crate::tls::UpstreamTls::default()
            };
            crate::tls::client_config(&upstream_tls)
                .map(|config| ProbeTls {
                    config: Arc::new(config),
                    sni: active.https_sni.as_deref().map(Box::from),
                })
                .map_err(Arc::new)
        });
        let active = (healthy_interval.is_some() || unhealthy_interval.is_some()).then(|| Active {
            kind,
            tls,
            timeout: interval(active.timeout).unwrap_or(Duration::from_secs(1)),
            concurrency: usize::try_from(active.concurrency).unwrap_or(1).max(1),
            http_path: active.http_path.as_str().into(),
            headers: headers.into(),
            healthy_interval,
            unhealthy_interval,
            verdicts: Verdicts {
                healthy_statuses: StatusSet::new(&active.healthy.http_statuses),
                unhealthy_statuses: StatusSet::new(&active.unhealthy.http_statuses),
                successes: active.healthy.successes,
                http_failures: active.unhealthy.http_failures,
                tcp_failures: active.unhealthy.tcp_failures,
                timeouts: active.unhealthy.timeouts,
            },
        });
        Checks {
            enabled,
            active,
            passive: Verdicts {
                healthy_statuses: StatusSet::new(&passive.healthy.http_statuses),
                unhealthy_statuses: StatusSet::new(&passive.unhealthy.http_statuses),
                successes: passive.healthy.successes,
                http_failures: passive.unhealthy.http_failures,
                tcp_failures: passive.unhealthy.tcp_failures,
                timeouts: passive.unhealthy.timeouts,
            },
            threshold: config.threshold,
        }
    }
}

#[cfg(test)]
mod tests;
