//! Name resolution for service hosts and upstream targets, with
//! hickory-resolver on the tokio runtime. Answers are kept per name and
//! refreshed by a background task when their TTL runs out, so a request
//! reads the last answer from an `ArcSwap`; only the first request for a
//! new name waits for its first answer. A failed refresh keeps the last
//! good answer (Kong's resolver serves stale records the same way) and
//! retries every 30 seconds.
//!
//! A name resolves to A records, else AAAA, else SRV (only the records of
//! the best priority, each target name resolved to its first address).

use std::collections::HashMap;
use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::{ArcSwap, ArcSwapOption};
use hickory_resolver::config::{LookupIpStrategy, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::TokioResolver;
use http::uri::Authority;
use tokio::sync::{watch, Notify};
use tracing::Instrument as _;

use super::Tasks;

/// How often a failed name is queried again (Kong's `requeryInterval`).
pub(crate) const REQUERY: Duration = Duration::from_secs(30);
/// Shortest time between two queries of a name, whatever its TTL.
const MIN_REFRESH: Duration = Duration::from_secs(1);
/// How long a request waits for the first answer for a new name.
pub(crate) const FIRST_ANSWER_WAIT: Duration = Duration::from_secs(5);

/// A shared resolver: system configuration (`/etc/resolv.conf`, the hosts
/// file) with its own cache.
#[derive(Clone)]
pub(crate) struct Dns {
    resolver: Arc<TokioResolver>,
}

/// What a name resolved to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Answer {
    pub(crate) kind: RecordKind,
    /// Sorted, so that equal answers compare equal.
    pub(crate) records: Vec<Record>,
    pub(crate) valid_until: Instant,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RecordKind {
    A,
    Aaaa,
    Srv,
}

impl RecordKind {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            RecordKind::A => "A",
            RecordKind::Aaaa => "AAAA",
            RecordKind::Srv => "SRV",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Record {
    pub(crate) ip: IpAddr,
    /// The SRV port; 0 for A/AAAA records and SRV records without one,
    /// meaning the port of the target or service.
    pub(crate) port: u16,
    /// The SRV weight, 0 replaced by 1 as Kong does; `None` for A/AAAA.
    pub(crate) weight: Option<u16>,
    /// The SRV target name (the Host header with `use_srv_name`).
    pub(crate) name: Option<Box<str>>,
}

#[derive(Clone, Debug, thiserror::Error)]
#[error("name resolution failed for {name}: {reason}")]
pub(crate) struct DnsError {
    pub(crate) name: Box<str>,
    pub(crate) reason: Box<str>,
}

impl Dns {
    /// The system's resolver configuration; without one (no
    /// `resolv.conf`), only the hosts file answers.
    pub(crate) fn from_system() -> Dns {
        let mut builder = match TokioResolver::builder_tokio() {
            Ok(builder) => builder,
            Err(error) => {
                tracing::warn!(%error, "Cannot read the system DNS configuration; resolving from the hosts file only.");
                TokioResolver::builder_with_config(
                    ResolverConfig::new(),
                    TokioConnectionProvider::default(),
                )
            }
        };
        let options: &mut ResolverOpts = builder.options_mut();
        options.ip_strategy = LookupIpStrategy::Ipv4thenIpv6;
        options.cache_size = 1024;
        options.timeout = Duration::from_secs(2);
        options.attempts = 2;
        Dns {
            resolver: Arc::new(builder.build()),
        }
    }

    /// Resolves `name`. Cancel safe.
    pub(crate) async fn resolve(&self, name: &str) -> Result<Answer, DnsError> {
        let error = |reason: &dyn std::fmt::Display| DnsError {
            name: name.into(),
            reason: reason.to_string().into(),
        };
        let ip_error = match self.resolver.lookup_ip(name).await {
            Ok(lookup) => {
                let mut records: Vec<Record> = lookup
                    .iter()
                    .map(|ip| Record {
                        ip,
                        port: 0,
                        weight: None,
                        name: None,
                    })
                    .collect();
                if let Some(first) = records.first() {
                    let kind = if first.ip.is_ipv4() {
                        RecordKind::A
                    } else {
                        RecordKind::Aaaa
                    };
                    records.retain(|record| record.ip.is_ipv4() == (kind == RecordKind::A));
                    records.sort();
                    records.dedup();
                    return Ok(Answer {
                        kind,
                        records,
                        valid_until: lookup.valid_until(),
                    });
                }
                error(&"empty answer")
            }
            Err(lookup_error)
                if lookup_error.is_no_records_found() || lookup_error.is_nx_domain() =>
            {
                error(&lookup_error)
            }
            Err(lookup_error) => return Err(error(&lookup_error)),
        };
        let srv = match self.resolver.srv_lookup(name).await {
            Ok(srv) => srv,
            // The name has neither addresses nor services: report the
            // address lookup's error, the more telling one.
            Err(_) => return Err(ip_error),
        };
        let best = srv.iter().map(|record| record.priority()).min();
        let mut records = Vec::new();
        for record in srv.iter().filter(|record| Some(record.priority()) == best) {
            let target = record.target().to_utf8();
            let target = target.trim_end_matches('.');
            let ip = match target.parse::<IpAddr>() {
                Ok(ip) => ip,
                Err(_) => match self.resolver.lookup_ip(target).await {
                    Ok(lookup) => match lookup.iter().next() {
                        Some(ip) => ip,
                        None => continue,
                    },
                    Err(lookup_error) => {
                        tracing::debug!(name, target, error = %lookup_error, "SRV target does not resolve.");
                        continue;
                    }
                },
            };
            records.push(Record {
                ip,
                port: record.port(),
                weight: Some(record.weight().max(1)),
                name: Some(target.into()),
            });
        }
        if records.is_empty() {
            return Err(error(&"no SRV target resolves"));
        }
        records.sort();
        Ok(Answer {
            kind: RecordKind::Srv,
            records,
            valid_until: srv.as_lookup().valid_until(),
        })
    }
}

/// When to query a name again after an answer valid until `valid_until`.
pub(crate) fn next_refresh(valid_until: Instant, now: Instant) -> Instant {
    valid_until.max(now + MIN_REFRESH)
}

/// Resolved service hosts, by `host:port`, carried over from one config
/// version to the next while a service still uses them.
#[derive(Default)]
pub(crate) struct NameCache {
    names: ArcSwap<HashMap<Box<str>, Arc<CachedName>>>,
}

/// The addresses of one service host and port, refreshed in the
/// background.
pub(crate) struct CachedName {
    pub(crate) state: Arc<NameState>,
    tasks: Tasks,
}

pub(crate) struct NameState {
    host: Box<str>,
    port: u16,
    /// `None` until the first answer.
    answer: ArcSwapOption<NameAnswer>,
    answered: Notify,
    next: AtomicUsize,
}

type NameAnswer = Result<Box<[Authority]>, DnsError>;

impl NameState {
    /// The next address for a request, round-robin over the answer. Only
    /// the first requests for a new name wait (for at most
    /// [`FIRST_ANSWER_WAIT`]). Cancel safe.
    pub(crate) async fn pick(&self) -> Result<Authority, DnsError> {
        if let Some(picked) = self.pick_now() {
            return picked;
        }
        // No answer yet: register as a waiter, then look again, so that an
        // answer stored in between is not missed.
        let answered = self.answered.notified();
        tokio::pin!(answered);
        answered.as_mut().enable();
        if let Some(picked) = self.pick_now() {
            return picked;
        }
        let _ = tokio::time::timeout(FIRST_ANSWER_WAIT, answered).await;
        self.pick_now().unwrap_or_else(|| {
            Err(DnsError {
                name: self.host.clone(),
                reason: "timed out waiting for the first answer".into(),
            })
        })
    }

    /// The next address from the current answer; `None` before the first.
    fn pick_now(&self) -> Option<Result<Authority, DnsError>> {
        let answer = self.answer.load();
        Some(match answer.as_deref()? {
            Ok(addresses) if !addresses.is_empty() => {
                let idx = self.next.fetch_add(1, Ordering::Relaxed) % addresses.len();
                Ok(addresses[idx].clone())
            }
            Ok(_) => Err(DnsError {
                name: self.host.clone(),
                reason: "empty answer".into(),
            }),
            Err(error) => Err(error.clone()),
        })
    }

    async fn refresh(self: Arc<Self>, dns: Dns, mut shutdown: watch::Receiver<()>) {
        loop {
            let now = Instant::now();
            let next = tokio::select! {
                _ = shutdown.changed() => return,
                answer = dns.resolve(&self.host) => match answer {
                    Ok(answer) => {
                        let addresses: Box<[Authority]> = answer
                            .records
                            .iter()
                            .filter_map(|record| {
                                let port = if record.port == 0 { self.port } else { record.port };
                                authority(record.ip, port)
                            })
                            .collect();
                        self.answer.store(Some(Arc::new(Ok(addresses))));
                        next_refresh(answer.valid_until, now)
                    }
                    Err(error) => {
                        let stale = matches!(self.answer.load().as_deref(), Some(Ok(_)));
                        tracing::warn!(host = %self.host, %error, stale, "Service host does not resolve.");
                        if !stale {
                            self.answer.store(Some(Arc::new(Err(error))));
                        }
                        now + REQUERY
                    }
                },
            };
            self.answered.notify_waiters();
            tokio::select! {
                _ = shutdown.changed() => return,
                () = tokio::time::sleep_until(next.into()) => {}
            }
        }
    }
}

/// `ip:port` as an authority (brackets around IPv6).
pub(crate) fn authority(ip: IpAddr, port: u16) -> Option<Authority> {
    let text = match ip {
        IpAddr::V4(ip) => format!("{ip}:{port}"),
        IpAddr::V6(ip) => format!("[{ip}]:{port}"),
    };
    Authority::try_from(text).ok()
}

/// The names one build uses: reused from the cache or created. Publishing
/// starts the new ones and stops those no service uses any more.
pub(crate) struct NameLookup<'c> {
    cache: &'c NameCache,
    previous: Arc<HashMap<Box<str>, Arc<CachedName>>>,
    used: HashMap<Box<str>, Arc<CachedName>>,
}

impl<'c> NameLookup<'c> {
    pub(crate) fn new(cache: &'c NameCache) -> Self {
        NameLookup {
            cache,
            previous: cache.names.load_full(),
            used: HashMap::new(),
        }
    }

    pub(crate) fn get(&mut self, host: &str, port: u16) -> Arc<NameState> {
        let key: Box<str> = format!("{host}:{port}").into();
        if let Some(name) = self.used.get(&key).or_else(|| self.previous.get(&key)) {
            let name = Arc::clone(name);
            self.used.insert(key, Arc::clone(&name));
            return Arc::clone(&name.state);
        }
        let name = Arc::new(CachedName {
            state: Arc::new(NameState {
                host: host.into(),
                port,
                answer: ArcSwapOption::empty(),
                answered: Notify::new(),
                next: AtomicUsize::new(0),
            }),
            tasks: Tasks::default(),
        });
        let state = Arc::clone(&name.state);
        self.used.insert(key, name);
        state
    }

    /// Keeps `state`, which a service reused from the previous runtime
    /// resolves through; false when it is no longer the cached one (the
    /// service must then be built anew).
    pub(crate) fn keep(&mut self, state: &Arc<NameState>) -> bool {
        let key: Box<str> = format!("{}:{}", state.host, state.port).into();
        match self.used.get(&key).or_else(|| self.previous.get(&key)) {
            Some(name) if Arc::ptr_eq(&name.state, state) => {
                let name = Arc::clone(name);
                self.used.insert(key, name);
                true
            }
            _ => false,
        }
    }

    pub(crate) fn publish(self, dns: &Dns, runtime: Option<&tokio::runtime::Handle>) {
        for (key, name) in &self.used {
            if self.previous.contains_key(key) {
                continue;
            }
            let task: Pin<Box<dyn Future<Output = ()> + Send>> = Box::pin(
                Arc::clone(&name.state)
                    .refresh(dns.clone(), name.tasks.subscribe())
                    .instrument(tracing::info_span!("dns", host = %name.state.host)),
            );
            name.tasks.start(runtime, vec![task]);
        }
        for (key, name) in self.previous.iter() {
            if !self.used.contains_key(key) {
                name.tasks.stop();
            }
        }
        self.cache.names.store(Arc::new(self.used));
    }
}

#[cfg(test)]
mod tests;
