//! The addresses of one upstream and the structure its algorithm picks
//! from, built whenever the address set changes (config version, DNS
//! answer) and never mutated after: health, connection counts and
//! latencies live in atomics beside it, so a pick reads and never locks.
//!
//! * round-robin: a wheel holding each address in proportion to its weight,
//!   interleaved smoothly (stride scheduling: the k-th slot of an address
//!   with weight w sits at (k + ½)/w of the cycle), walked by an atomic
//!   counter; unavailable slots are skipped.
//! * consistent-hashing: Kong's continuum (`slots` points, at least 1000;
//!   160 entries per target at equal weights, placed by xxHash32 of
//!   `ip::port i` in lexical order of targets and addresses), walked
//!   counter-clockwise from the request's point to the first available
//!   address. The same target set always builds the same ring.
//! * least-connections: the available address with the smallest
//!   `(in_flight + 1) / weight`.
//! * latency: the available address with the smallest decayed response
//!   time EWMA divided by its weight.
//!
//! Ties in the last two rotate, so idle targets share the first requests.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use http::uri::Authority;
use http::HeaderValue;

use super::hash::xxh32;
use super::health::{now_micros, AddressHealth};

/// One `ip:port` a target resolved to.
pub(crate) struct Address {
    pub(crate) ip: IpAddr,
    pub(crate) port: u16,
    /// 0 takes no traffic.
    pub(crate) weight: u32,
    /// Index of the target in its upstream.
    pub(crate) target_idx: usize,
    pub(crate) authority: Authority,
    /// Host header for plain (`[0]`) and TLS (`[1]`) schemes: the port is
    /// left out when it is the scheme's default.
    pub(crate) host_headers: [HeaderValue; 2],
    /// Host header of active probes (Kong sends no port).
    pub(crate) probe_host: Box<str>,
    pub(crate) health: Arc<AddressHealth>,
}

impl Address {
    pub(crate) fn socket_addr(&self) -> SocketAddr {
        SocketAddr::new(self.ip, self.port)
    }

    /// Kong's textual address (`ip:port`, brackets around IPv6), the
    /// ring's sort key.
    fn key(&self) -> String {
        match self.ip {
            IpAddr::V4(ip) => format!("{ip}:{}", self.port),
            IpAddr::V6(ip) => format!("[{ip}]:{}", self.port),
        }
    }

    fn host_text(&self) -> String {
        match self.ip {
            IpAddr::V4(ip) => ip.to_string(),
            IpAddr::V6(ip) => format!("[{ip}]"),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Algorithm {
    RoundRobin,
    ConsistentHashing { points: u32 },
    LeastConnections,
    Latency,
}

impl Algorithm {
    pub(crate) fn new(name: &str, slots: u32) -> Algorithm {
        match name {
            // Kong's continuum size: `slots` within [1000, 2^32], else 1000.
            "consistent-hashing" => Algorithm::ConsistentHashing {
                points: if slots >= MIN_POINTS {
                    slots
                } else {
                    MIN_POINTS
                },
            },
            "least-connections" => Algorithm::LeastConnections,
            "latency" => Algorithm::Latency,
            _ => Algorithm::RoundRobin,
        }
    }
}

const MIN_POINTS: u32 = 1000;
/// Continuum entries per target when all weights are equal.
const SERVER_POINTS: f64 = 160.0;
/// The round-robin wheel is scaled down past this many slots.
const MAX_WHEEL: u64 = 1 << 20;
const EMPTY: u32 = u32::MAX;

/// The addresses of an upstream and its algorithm's structure.
pub(crate) struct Ring {
    /// Sorted by target (host, then port), then by `ip:port`.
    pub(crate) addresses: Box<[Arc<Address>]>,
    /// Sum of the address weights.
    pub(crate) total_weight: u64,
    picker: Picker,
}

enum Picker {
    RoundRobin {
        wheel: Box<[u32]>,
        next: AtomicUsize,
    },
    ConsistentHashing {
        continuum: Box<[u32]>,
    },
    /// Least-connections and latency: a scan, starting at a rotating index.
    Scan {
        latency: bool,
        next: AtomicUsize,
    },
}

impl Ring {
    /// `targets` gives each address's target `(host, port)` for sorting;
    /// `n_targets` is the number of targets of the upstream.
    pub(crate) fn build(
        algorithm: Algorithm,
        mut addresses: Vec<Arc<Address>>,
        targets: &[(&str, u16)],
    ) -> Ring {
        addresses.sort_by_cached_key(|address| {
            let (host, port) = targets.get(address.target_idx).copied().unwrap_or(("", 0));
            (host.to_owned(), port, address.key())
        });
        let total_weight = addresses
            .iter()
            .map(|address| u64::from(address.weight))
            .sum();
        let start = random_start();
        let picker = match algorithm {
            Algorithm::RoundRobin => Picker::RoundRobin {
                wheel: wheel(&addresses),
                next: AtomicUsize::new(start),
            },
            Algorithm::ConsistentHashing { points } => Picker::ConsistentHashing {
                continuum: continuum(&addresses, total_weight, targets.len(), points),
            },
            Algorithm::LeastConnections => Picker::Scan {
                latency: false,
                next: AtomicUsize::new(start),
            },
            Algorithm::Latency => {
                slow_start(&addresses);
                Picker::Scan {
                    latency: true,
                    next: AtomicUsize::new(start),
                }
            }
        };
        Ring {
            addresses: addresses.into(),
            total_weight,
            picker,
        }
    }

    /// Weight of the available addresses.
    pub(crate) fn available_weight(&self) -> u64 {
        self.addresses
            .iter()
            .filter(|address| address.health.is_available())
            .map(|address| u64::from(address.weight))
            .sum()
    }

    /// The address for a request; `point` is the request's hash for
    /// consistent hashing. `None` when no address with weight is available.
    pub(crate) fn pick(&self, point: u32) -> Option<&Arc<Address>> {
        let usable = |address: &Arc<Address>| address.weight > 0 && address.health.is_available();
        match &self.picker {
            Picker::RoundRobin { wheel, next } => {
                if wheel.is_empty() {
                    return None;
                }
                // Skipped slots advance the shared counter too, as Kong's
                // pointer does, so an unavailable address's share spreads
                // over the others instead of going to its neighbour.
                (0..wheel.len())
                    .map(|_| {
                        let slot = next.fetch_add(1, Ordering::Relaxed) % wheel.len();
                        &self.addresses[wheel[slot] as usize]
                    })
                    .find(|address| usable(address))
            }
            Picker::ConsistentHashing { continuum } => {
                let len = continuum.len();
                if len == 0 {
                    return None;
                }
                let start = point as usize % len;
                (0..len)
                    .map(|step| continuum[(start + len - step) % len])
                    .filter(|idx| *idx != EMPTY)
                    .map(|idx| &self.addresses[idx as usize])
                    .find(|address| usable(address))
            }
            Picker::Scan { latency, next } => {
                let len = self.addresses.len();
                if len == 0 {
                    return None;
                }
                let start = next.fetch_add(1, Ordering::Relaxed) % len;
                let now = if *latency { now_micros() } else { 0 };
                let mut best: Option<(&Arc<Address>, f64)> = None;
                for offset in 0..len {
                    let address = &self.addresses[(start + offset) % len];
                    if !usable(address) {
                        continue;
                    }
                    let load = if *latency {
                        address.health.latency_score(now)
                    } else {
                        f64::from(address.health.in_flight.load(Ordering::Relaxed)) + 1.0
                    };
                    let score = load / f64::from(address.weight);
                    if best.is_none_or(|(_, best_score)| score < best_score) {
                        best = Some((address, score));
                    }
                }
                best.map(|(address, _)| address)
            }
        }
    }
}

/// Where rotating counters start, so that gateways started together do
/// not all send their first request to the same address.
fn random_start() -> usize {
    let bytes = uuid::Uuid::new_v4().into_bytes();
    usize::from(u16::from_le_bytes([bytes[0], bytes[1]]))
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// Round-robin slots: weights divided by their greatest common divisor
/// (scaled down past [`MAX_WHEEL`]), interleaved by stride scheduling.
fn wheel(addresses: &[Arc<Address>]) -> Box<[u32]> {
    let divisor = addresses
        .iter()
        .map(|address| u64::from(address.weight))
        .fold(0, gcd);
    if divisor == 0 {
        return Box::new([]);
    }
    let mut slots: Vec<u64> = addresses
        .iter()
        .map(|address| u64::from(address.weight) / divisor)
        .collect();
    let total: u64 = slots.iter().sum();
    if total > MAX_WHEEL {
        for (slot, address) in slots.iter_mut().zip(addresses) {
            if address.weight > 0 {
                *slot = (u64::from(address.weight) * MAX_WHEEL / (total * divisor)).max(1);
            }
        }
    }
    let mut entries: Vec<(f64, u32)> = Vec::with_capacity(slots.iter().sum::<u64>() as usize);
    for (idx, &count) in slots.iter().enumerate() {
        for k in 0..count {
            entries.push(((k as f64 + 0.5) / count as f64, idx as u32));
        }
    }
    entries.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    entries.into_iter().map(|(_, idx)| idx).collect()
}

/// Kong's consistent-hashing continuum; entries are address indexes.
fn continuum(
    addresses: &[Arc<Address>],
    total_weight: u64,
    n_targets: usize,
    points: u32,
) -> Box<[u32]> {
    let mut continuum = vec![EMPTY; points as usize];
    if total_weight == 0 {
        return continuum.into();
    }
    for (idx, address) in addresses.iter().enumerate() {
        let share = f64::from(address.weight) / total_weight as f64;
        let mut entries = (share * n_targets as f64 * SERVER_POINTS).floor() as u64;
        if address.weight > 0 && entries == 0 {
            entries = 1;
        }
        // Kong's key: `ip .. ":" .. ":port" .. " " .. i`.
        let prefix = format!("{}::{} ", address.host_text(), address.port);
        let mut i: u64 = 1;
        while i <= entries {
            let key = format!("{prefix}{i}");
            let point = xxh32(key.as_bytes()) % points;
            let slot = &mut continuum[point as usize];
            if *slot == EMPTY {
                *slot = idx as u32;
            } else {
                // Collisions move the problem forward, as in Kong.
                entries += 1;
            }
            i += 1;
            if i > u64::from(points) {
                tracing::error!(points, "Consistent-hashing ring too small for its targets; raise the upstream's slots.");
                break;
            }
        }
    }
    continuum.into()
}

/// New addresses start at the average EWMA of the others (Kong's slow
/// start), so the first requests do not all go to the newcomer.
fn slow_start(addresses: &[Arc<Address>]) {
    let now = now_micros();
    let known: Vec<f64> = addresses
        .iter()
        .filter(|address| address.health.has_latency())
        .map(|address| address.health.latency_score(now))
        .collect();
    if known.is_empty() {
        return;
    }
    let average = known.iter().sum::<f64>() / known.len() as f64;
    for address in addresses
        .iter()
        .filter(|address| !address.health.has_latency())
    {
        address.health.seed_latency(average, now);
    }
}

#[cfg(test)]
mod tests;
