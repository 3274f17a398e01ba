//! Traffic plugins: who may pass and how often (`rate-limiting`,
//! `request-size-limiting`, `ip-restriction`, `bot-detection`, `cors`),
//! and `request-termination`.

use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dashmap::DashMap;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use ipnet::IpNet;
use regex::{Regex, RegexSet};
use serde::Deserialize;

use super::{
    error_message, exit_message, exit_raw, typed, BuildContext, Ctx, Flow, HeaderLine,
    HeaderPrefix, Needs, Plugin, PluginRequest, SetHeaders,
};
use crate::proxy::ResponseBody;

// ---------------------------------------------------------------------------
// rate-limiting

/// Rate-limiting counters (local policy), by plugin id, shared by
/// runtimes so that a configuration change does not reset them. A
/// configuration build looks its plugin's table up once; requests then
/// count with atomics, and take a shard's write lock only for a client
/// seen for the first time.
#[derive(Default)]
pub(crate) struct Counters {
    by_plugin: DashMap<Box<str>, Arc<PluginCounters>>,
}

impl Counters {
    fn for_plugin(&self, plugin: &str) -> Arc<PluginCounters> {
        Arc::clone(self.by_plugin.entry(plugin.into()).or_default().value())
    }
}

/// One plugin's counts: per client, one window per period.
#[derive(Default)]
struct PluginCounters {
    clients: DashMap<Box<str>, Windows, foldhash::fast::RandomState>,
    inserted: AtomicU64,
}

/// The current window of each period: its start and its count.
#[derive(Default)]
struct Windows([(AtomicI64, AtomicU64); 6]);

impl Windows {
    /// The count of the window starting at `start_ms`, resetting an
    /// older window.
    fn used(&self, period: Period, start_ms: i64) -> u64 {
        let (start, count) = &self.0[period as usize];
        let seen = start.load(Ordering::Acquire);
        if seen == start_ms {
            return count.load(Ordering::Acquire);
        }
        if seen < start_ms
            && start
                .compare_exchange(seen, start_ms, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            count.store(0, Ordering::Release);
        }
        if start.load(Ordering::Acquire) == start_ms {
            count.load(Ordering::Acquire)
        } else {
            0
        }
    }

    fn increment(&self, period: Period, start_ms: i64) {
        let (start, count) = &self.0[period as usize];
        if start.load(Ordering::Acquire) == start_ms {
            count.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl PluginCounters {
    /// Counts this request in every limit's window unless one is used up;
    /// the counts before it go to `used`.
    fn count(
        &self,
        identifier: &str,
        limits: &Limits,
        now: i64,
        used: &mut smallvec::SmallVec<[u64; 6]>,
    ) -> bool {
        let counted = |windows: &Windows, used: &mut smallvec::SmallVec<[u64; 6]>| {
            used.clear();
            for limit in &limits.limits {
                used.push(windows.used(limit.period, limit.period.start_ms(now)));
            }
            let stop = limits
                .limits
                .iter()
                .zip(used.iter())
                .any(|(limit, used)| *used >= limit.limit);
            if !stop {
                for limit in &limits.limits {
                    windows.increment(limit.period, limit.period.start_ms(now));
                }
            }
            stop
        };
        if let Some(windows) = self.clients.get(identifier) {
            return counted(&windows, used);
        }
        // Clients that stopped coming are dropped now and then, so the
        // table does not grow with every client ever seen.
        if self.inserted.fetch_add(1, Ordering::Relaxed) % 4096 == 4095 {
            let horizon = now - 2 * 31_536_000_000;
            self.clients.retain(|_, windows| {
                windows.0.iter().any(|(start, count)| {
                    start.load(Ordering::Relaxed) > horizon && count.load(Ordering::Relaxed) > 0
                })
            });
        }
        let windows = self.clients.entry(identifier.into()).or_default();
        counted(&windows, used)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Period {
    Second = 0,
    Minute,
    Hour,
    Day,
    Month,
    Year,
}

impl Period {
    const ALL: [Period; 6] = [
        Period::Second,
        Period::Minute,
        Period::Hour,
        Period::Day,
        Period::Month,
        Period::Year,
    ];

    /// Kong's `EXPIRATION` (`kong/plugins/rate-limiting/expiration.lua`).
    fn seconds(self) -> i64 {
        match self {
            Period::Second => 1,
            Period::Minute => 60,
            Period::Hour => 3600,
            Period::Day => 86400,
            Period::Month => 2_592_000,
            Period::Year => 31_536_000,
        }
    }

    /// The period as Kong's Redis keys name it.
    fn key_name(self) -> &'static str {
        match self {
            Period::Second => "second",
            Period::Minute => "minute",
            Period::Hour => "hour",
            Period::Day => "day",
            Period::Month => "month",
            Period::Year => "year",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Period::Second => "Second",
            Period::Minute => "Minute",
            Period::Hour => "Hour",
            Period::Day => "Day",
            Period::Month => "Month",
            Period::Year => "Year",
        }
    }

    /// The start of the UTC window holding `now_ms`, as Kong's
    /// `timestamp.get_timestamps` computes it.
    fn start_ms(self, now_ms: i64) -> i64 {
        let secs = now_ms.div_euclid(1000);
        let start = match self {
            Period::Second => secs,
            Period::Minute => secs - secs.rem_euclid(60),
            Period::Hour => secs - secs.rem_euclid(3600),
            Period::Day => secs - secs.rem_euclid(86400),
            Period::Month | Period::Year => {
                let days = secs.div_euclid(86400);
                let (year, month, _) = civil_from_days(days);
                let month = if self == Period::Year { 1 } else { month };
                days_from_civil(year, month, 1) * 86400
            }
        };
        start * 1000
    }
}

/// (year, month, day) of a count of days since 1970-01-01 (proleptic
/// Gregorian calendar).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

fn days_from_civil(year: i64, month: u32, day: u32) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let yoe = year.rem_euclid(400);
    let month = i64::from(month);
    let mp = if month > 2 { month - 3 } else { month + 9 };
    let doy = (153 * mp + 2) / 5 + i64::from(day) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[derive(Deserialize)]
struct RateLimitingConfig {
    second: Option<f64>,
    minute: Option<f64>,
    hour: Option<f64>,
    day: Option<f64>,
    month: Option<f64>,
    year: Option<f64>,
    limit_by: String,
    header_name: Option<String>,
    path: Option<String>,
    policy: String,
    fault_tolerant: bool,
    hide_client_headers: bool,
    error_code: f64,
    error_message: String,
    #[serde(default)]
    redis: Option<RedisConfig>,
}

#[derive(Deserialize)]
struct RedisConfig {
    host: Option<String>,
    port: Option<u16>,
    timeout: Option<f64>,
    username: Option<String>,
    password: Option<String>,
    database: Option<i64>,
    #[serde(default)]
    ssl: Option<bool>,
}

#[derive(Clone, Copy)]
enum LimitBy {
    Consumer,
    Credential,
    Ip,
    Service,
    Header,
    Path,
}

/// Redis connections by server, shared by every rate-limiting instance
/// and kept across configurations; looked up when a configuration is
/// built, never by a request.
#[derive(Default)]
pub(crate) struct RedisPool {
    servers: DashMap<String, Arc<tokio::sync::OnceCell<redis::aio::ConnectionManager>>>,
}

/// One Redis server as a rate-limiting configuration names it.
struct RedisTarget {
    info: redis::ConnectionInfo,
    timeout: std::time::Duration,
    connection: Arc<tokio::sync::OnceCell<redis::aio::ConnectionManager>>,
    /// Kong's key prefix parts: the plugin's route and service ids.
    scope: String,
}

impl RedisTarget {
    async fn connection(&self) -> redis::RedisResult<redis::aio::ConnectionManager> {
        self.connection
            .get_or_try_init(|| async {
                let client = redis::Client::open(self.info.clone())?;
                let config = redis::aio::ConnectionManagerConfig::new()
                    .set_connection_timeout(self.timeout)
                    .set_response_timeout(self.timeout)
                    .set_number_of_retries(1);
                redis::aio::ConnectionManager::new_with_config(client, config).await
            })
            .await
            .cloned()
    }
}

/// Kong's script: count this request and read what was there before, in
/// one round trip; the first count of a window sets its expiry.
static INCREMENT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(
        r"local n = redis.call('incr', KEYS[1])
if n == 1 then redis.call('expire', KEYS[1], ARGV[1]) end
return n - 1",
    )
});

/// One period's limit, with the header lines it shows made once.
struct Limit {
    period: Period,
    limit: u64,
    /// `x-ratelimit-limit-<period>: <limit>`
    limit_line: HeaderLine,
    /// `ratelimit-limit: <limit>`, when this period is the one reported.
    ratelimit_line: HeaderLine,
    /// `x-ratelimit-remaining-<period>: `
    remaining: HeaderPrefix,
}

/// What every request of one rate-limiting configuration shares.
struct Limits {
    limits: Vec<Limit>,
    limit_by: LimitBy,
    header_name: Option<HeaderName>,
    path: Option<String>,
    hide_client_headers: bool,
    fault_tolerant: bool,
    error_status: StatusCode,
    error_message: String,
}

/// `rate-limiting` (`kong/plugins/rate-limiting/handler.lua`). The local
/// policy counts on this node; the redis policy counts in Redis with
/// Kong's keys, so every data plane shares the counts.
pub(crate) struct RateLimiting {
    limits: Arc<Limits>,
    redis: Option<Arc<RedisTarget>>,
    counters: Arc<PluginCounters>,
}

const EMPTY_UUID: &str = "00000000-0000-0000-0000-000000000000";

impl RateLimiting {
    pub(crate) fn new(config: &serde_json::Value, cx: &BuildContext<'_>) -> Result<Self, String> {
        // Kong's keys: `ratelimit:<route id>:<service id>:…` of the
        // plugin's own scope.
        let plugin_doc_scope = format!(
            "{}:{}",
            cx.route_id.unwrap_or(EMPTY_UUID),
            cx.service_id.unwrap_or(EMPTY_UUID)
        );
        let config: RateLimitingConfig = typed(config)?;
        let values = [
            config.second,
            config.minute,
            config.hour,
            config.day,
            config.month,
            config.year,
        ];
        let limits = Period::ALL
            .iter()
            .zip(values)
            .filter_map(|(period, limit)| {
                let limit = limit?;
                let name = |prefix: &str| {
                    HeaderName::from_bytes(format!("{prefix}-{}", period.name()).as_bytes())
                        .map_err(|e| e.to_string())
                };
                let limit = limit.max(0.0) as u64;
                let value = HeaderValue::from(limit);
                Some((|| {
                    Ok(Limit {
                        period: *period,
                        limit,
                        limit_line: HeaderLine::new(&name("x-ratelimit-limit")?, &value),
                        ratelimit_line: HeaderLine::new(&RATELIMIT_LIMIT, &value),
                        remaining: HeaderPrefix::new(&name("x-ratelimit-remaining")?),
                    })
                })())
            })
            .collect::<Result<Vec<_>, String>>()?;
        let limit_by = match config.limit_by.as_str() {
            "consumer" => LimitBy::Consumer,
            "credential" => LimitBy::Credential,
            "service" => LimitBy::Service,
            "header" => LimitBy::Header,
            "path" => LimitBy::Path,
            _ => LimitBy::Ip,
        };
        let redis = match config.policy.as_str() {
            "redis" => {
                let r = config
                    .redis
                    .as_ref()
                    .ok_or("the redis policy needs config.redis")?;
                if r.ssl == Some(true) {
                    return Err("redis over TLS is not supported by this data plane yet".into());
                }
                let host = r
                    .host
                    .clone()
                    .ok_or("the redis policy needs config.redis.host")?;
                let port = r.port.unwrap_or(6379);
                let info = redis::ConnectionInfo {
                    addr: redis::ConnectionAddr::Tcp(host.clone(), port),
                    redis: redis::RedisConnectionInfo {
                        db: r.database.unwrap_or(0),
                        username: r.username.clone(),
                        password: r.password.clone(),
                        protocol: redis::ProtocolVersion::RESP2,
                    },
                };
                let server = format!(
                    "{host}:{port}/{}/{}/{}",
                    r.database.unwrap_or(0),
                    r.username.as_deref().unwrap_or(""),
                    r.password.as_deref().unwrap_or("")
                );
                let connection =
                    Arc::clone(cx.shared.redis.servers.entry(server).or_default().value());
                Some(Arc::new(RedisTarget {
                    info,
                    timeout: std::time::Duration::from_millis(
                        r.timeout.unwrap_or(2000.0).max(1.0) as u64
                    ),
                    connection,
                    scope: plugin_doc_scope,
                }))
            }
            // Kong's `cluster` policy counts in Kong's database, which data
            // planes do not have: count locally, as Kong's hybrid mode does.
            _ => None,
        };
        Ok(RateLimiting {
            limits: Arc::new(Limits {
                limits,
                limit_by,
                header_name: config
                    .header_name
                    .as_deref()
                    .map(|n| HeaderName::from_bytes(n.as_bytes()).map_err(|e| e.to_string()))
                    .transpose()?,
                path: config.path,
                hide_client_headers: config.hide_client_headers,
                fault_tolerant: config.fault_tolerant,
                error_status: StatusCode::from_u16(config.error_code as u16)
                    .map_err(|e| e.to_string())?,
                error_message: config.error_message,
            }),
            redis,
            counters: cx.shared.rate_limits.for_plugin(cx.plugin_id),
        })
    }
}

impl Limits {
    /// Kong's `get_identifier`: falls back to the client address.
    fn identifier<'r>(&'r self, req: &'r PluginRequest<'_>, ctx: &'r Ctx<'_>) -> Cow<'r, str> {
        let found: Option<Cow<'r, str>> = match self.limit_by {
            LimitBy::Service => ctx.service_id.map(Cow::Borrowed),
            LimitBy::Consumer => ctx
                .consumer
                .as_ref()
                .map(|c| Cow::Borrowed(&*c.id))
                .or_else(|| {
                    ctx.credential
                        .as_ref()
                        .and_then(|c| c.id.to_str().ok().map(Cow::Borrowed))
                }),
            LimitBy::Credential => ctx
                .credential
                .as_ref()
                .and_then(|c| c.id.to_str().ok().map(Cow::Borrowed)),
            LimitBy::Header => self
                .header_name
                .as_ref()
                .and_then(|name| req.headers.get_str(name))
                .map(Cow::Borrowed),
            LimitBy::Path => self
                .path
                .as_deref()
                .filter(|p| *p == req.path)
                .map(Cow::Borrowed),
            LimitBy::Ip => None,
        };
        found.unwrap_or(Cow::Borrowed(req.client_addr))
    }

    /// Kong's verdict from the counts before this request (`used`, one
    /// per limit): the period that stops the request, if any, and the
    /// headers for the client.
    fn verdict(&self, now: i64, used: &[u64], headers: &mut SetHeaders) -> bool {
        let remaining = |index: usize| self.limits[index].limit as i64 - used[index] as i64;
        let stop = (0..self.limits.len()).rev().find(|&i| remaining(i) <= 0);
        if self.hide_client_headers {
            return stop.is_some();
        }
        // RateLimit-* report one period: the fewest remaining, then the
        // longest window.
        let mut best: Option<(i64, i64, usize)> = None;
        let mut reset = 0;
        for (index, limit) in self.limits.iter().enumerate() {
            let period = limit.period;
            let mut left = remaining(index);
            if stop.is_none() || stop == Some(index) {
                left -= 1;
            }
            let left = left.max(0);
            let window = period.seconds();
            let better = best.is_none_or(|(best_left, best_window, _)| {
                left < best_left || (left == best_left && window > best_window)
            });
            if better {
                best = Some((left, window, index));
                reset = (window - (now - period.start_ms(now)) / 1000).max(1);
            }
            headers.push_line(&limit.limit_line);
            headers.push_number(&limit.remaining, left);
        }
        if let Some((left, _, index)) = best {
            static REMAINING: LazyLock<HeaderPrefix> =
                LazyLock::new(|| HeaderPrefix::new(&RATELIMIT_REMAINING));
            static RETRY_AFTER: LazyLock<HeaderPrefix> =
                LazyLock::new(|| HeaderPrefix::new(&http::header::RETRY_AFTER));
            static RESET: LazyLock<HeaderPrefix> =
                LazyLock::new(|| HeaderPrefix::new(&RATELIMIT_RESET));
            headers.push_line(&self.limits[index].ratelimit_line);
            headers.push_number(&REMAINING, left);
            if stop.is_some() {
                headers.push_number(&RETRY_AFTER, reset);
            }
            headers.push_number(&RESET, reset);
        }
        stop.is_some()
    }

    fn finish(&self, ctx: &mut Ctx<'_>, now: i64, used: &[u64]) -> Flow {
        if self.verdict(now, used, &mut ctx.response_headers) {
            Flow::Exit(error_message(self.error_status, &self.error_message))
        } else {
            Flow::Continue
        }
    }
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Plugin for RateLimiting {
    fn filters_response(&self) -> bool {
        // Its headers go out as `Ctx::response_headers`.
        false
    }

    fn access(&self, req: &mut PluginRequest<'_>, ctx: &mut Ctx<'_>) -> Flow {
        let now = now_ms();
        let limits = &self.limits;
        let identifier = limits.identifier(req, ctx);
        if let Some(redis) = &self.redis {
            let identifier = identifier.into_owned();
            let redis = Arc::clone(redis);
            let limits = Arc::clone(limits);
            return Flow::Wait(Box::pin(async move {
                let counted = async {
                    let mut connection = redis.connection().await?;
                    let mut used = Vec::with_capacity(limits.limits.len());
                    for Limit { period, .. } in &limits.limits {
                        let key = format!(
                            "ratelimit:{}:{}:{}:{}",
                            redis.scope,
                            identifier,
                            period.start_ms(now),
                            period.key_name()
                        );
                        let before: i64 = INCREMENT
                            .key(key)
                            .arg(period.seconds())
                            .invoke_async(&mut connection)
                            .await?;
                        used.push(before.max(0) as u64);
                    }
                    Ok::<_, redis::RedisError>(used)
                };
                let counted = tokio::time::timeout(redis.timeout * 2, counted).await;
                let resume: super::Resume = match counted {
                    Ok(Ok(used)) => {
                        Box::new(move |_req: &mut PluginRequest<'_>, ctx: &mut Ctx<'_>| {
                            limits.finish(ctx, now, &used)
                        })
                    }
                    failed => {
                        let error = match failed {
                            Ok(Err(error)) => error.to_string(),
                            _ => "timed out".to_owned(),
                        };
                        tracing::error!(%error, "rate-limiting: failed to get usage from Redis");
                        let tolerant = limits.fault_tolerant;
                        Box::new(move |_req: &mut PluginRequest<'_>, _ctx: &mut Ctx<'_>| {
                            if tolerant {
                                Flow::Continue
                            } else {
                                Flow::Exit(error_message(
                                    StatusCode::INTERNAL_SERVER_ERROR,
                                    "An unexpected error occurred",
                                ))
                            }
                        })
                    }
                };
                resume
            }));
        }
        let mut used = smallvec::SmallVec::<[u64; 6]>::new();
        self.counters.count(&identifier, limits, now, &mut used);
        limits.finish(ctx, now, &used)
    }
}

const RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
const RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
const RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

// ---------------------------------------------------------------------------
// request-size-limiting

#[derive(Deserialize)]
struct RequestSizeLimitingConfig {
    allowed_payload_size: f64,
    size_unit: String,
    require_content_length: bool,
}

/// `request-size-limiting` (`kong/plugins/request-size-limiting/handler.lua`).
pub(crate) struct RequestSizeLimiting {
    allowed_bytes: f64,
    require_content_length: bool,
}

impl RequestSizeLimiting {
    pub(crate) fn new(config: &serde_json::Value, _cx: &BuildContext<'_>) -> Result<Self, String> {
        let config: RequestSizeLimitingConfig = typed(config)?;
        let factor = match config.size_unit.as_str() {
            "bytes" => 1.0,
            "kilobytes" => 1024.0,
            _ => 1_048_576.0,
        };
        Ok(RequestSizeLimiting {
            allowed_bytes: config.allowed_payload_size * factor,
            require_content_length: config.require_content_length,
        })
    }

    fn check(&self, req: &PluginRequest<'_>, length: f64) -> Flow {
        if length <= self.allowed_bytes {
            return Flow::Continue;
        }
        let expect_continue = req
            .header("expect")
            .is_some_and(|v| v.trim().eq_ignore_ascii_case("100-continue"));
        let status = if expect_continue {
            StatusCode::EXPECTATION_FAILED
        } else {
            StatusCode::PAYLOAD_TOO_LARGE
        };
        Flow::Exit(error_message(status, "Request size limit exceeded"))
    }
}

impl Plugin for RequestSizeLimiting {
    fn filters_response(&self) -> bool {
        false
    }

    /// A body without Content-Length is measured as Kong measures it:
    /// read whole (`kong.request.get_raw_body()`).
    fn needs(&self) -> Needs {
        Needs {
            unsized_request_body: true,
            ..Needs::default()
        }
    }

    fn access(&self, req: &mut PluginRequest<'_>, _ctx: &mut Ctx<'_>) -> Flow {
        if let Some(length) = req
            .header("content-length")
            .and_then(|v| v.trim().parse::<f64>().ok())
        {
            return self.check(req, length);
        }
        let chunked = req
            .header("transfer-encoding")
            .is_some_and(|v| v.eq_ignore_ascii_case("chunked"));
        if self.require_content_length && !chunked {
            return Flow::Exit(error_message(
                StatusCode::LENGTH_REQUIRED,
                "A valid Content-Length header is required",
            ));
        }
        match &req.body {
            Some(body) => self.check(req, body.len() as f64),
            None => Flow::Continue,
        }
    }
}

// ---------------------------------------------------------------------------
// ip-restriction

#[derive(Deserialize)]
struct IpRestrictionConfig {
    allow: Option<Vec<String>>,
    deny: Option<Vec<String>>,
    status: Option<f64>,
    message: Option<String>,
}

/// `ip-restriction` (`kong/plugins/ip-restriction/handler.lua`).
pub(crate) struct IpRestriction {
    allow: Vec<IpNet>,
    deny: Vec<IpNet>,
    status: StatusCode,
    message: Option<String>,
}

fn parse_nets(list: Option<Vec<String>>) -> Result<Vec<IpNet>, String> {
    list.unwrap_or_default()
        .iter()
        .map(|entry| {
            entry
                .parse::<IpNet>()
                .or_else(|_| entry.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| format!("invalid ip or cidr range: {entry:?}"))
        })
        .collect()
}

impl IpRestriction {
    pub(crate) fn new(config: &serde_json::Value, _cx: &BuildContext<'_>) -> Result<Self, String> {
        let config: IpRestrictionConfig = typed(config)?;
        Ok(IpRestriction {
            allow: parse_nets(config.allow)?,
            deny: parse_nets(config.deny)?,
            status: match config.status {
                Some(status) => StatusCode::from_u16(status as u16).map_err(|e| e.to_string())?,
                None => StatusCode::FORBIDDEN,
            },
            message: config.message,
        })
    }
}

impl Plugin for IpRestriction {
    fn filters_response(&self) -> bool {
        false
    }

    fn access(&self, req: &mut PluginRequest<'_>, _ctx: &mut Ctx<'_>) -> Flow {
        let ip = req.client_ip;
        let denied = (!self.deny.is_empty() && self.deny.iter().any(|net| net.contains(&ip)))
            || (!self.allow.is_empty() && !self.allow.iter().any(|net| net.contains(&ip)));
        if !denied {
            return Flow::Continue;
        }
        let message = match &self.message {
            Some(message) => message.clone(),
            None => format!("IP address not allowed: {ip}"),
        };
        Flow::Exit(error_message(self.status, &message))
    }
}

// ---------------------------------------------------------------------------
// bot-detection

/// User agents of crawlers, monitors and HTTP client libraries that
/// bot-detection refuses by default. Our own list, covering the families
/// Kong's `rules.lua` does: search engine and social crawlers, uptime
/// monitors, cloud SDKs and programmatic HTTP clients, and agents that
/// call themselves a bot, spider, crawler, scraper, indexer or archiver.
static BOTS: LazyLock<RegexSet> = LazyLock::new(|| {
    RegexSet::new([
        r"(?i)(googlebot|adsbot-google|mediapartners-google|apis-google|feedfetcher-google|google.*/\+/web/snippet)",
        r"(?i)(bingbot|bingpreview|msnbot|slurp|duckduckbot|baiduspider|yandex\w*|sogou|exabot|seznambot|naverbot|yeti|ia_archiver|archive\.org_bot)",
        r"(facebookexternalhit|Twitterbot|LinkedInBot|Slackbot|Slack-ImgProxy|WhatsApp|TelegramBot|Discordbot|redditbot|Applebot|SemrushBot|AhrefsBot|MJ12bot|DotBot|PetalBot|Bytespider|WordPress|YahooSeeker|Yahoo! Slurp)",
        r"(Pingdom\.com_bot_version_\d+|UptimeRobot|GomezAgent|Catchpoint|YottaaMonitor| PTST/\d)",
        r"(?i)\b\w{0,30}favicon\w{0,30}\b",
        r"\b(Boto3?|JetS3t|aws-cli|aws-sdk-[a-z0-9-]+|s3fs)/\d+",
        r"(Google-HTTP-Java-Client|Apache-HttpClient|Go-http-client|scalaj-http|http%20client|Python-urllib|HttpMonitor|TLSProber|WinHTTP|JNLP|okhttp|aihttp|reqwest|axios|unirest-(java|python|ruby|nodejs|php|net))",
        r"(?i)(scrapy|heritrix|nutch|larbin|htdig|masscan|zgrab|webcrawler)",
        r"(?i)[a-z0-9_\-!\[\]:]{0,50}(archiver|indexer|scraper|bot|spider|crawl[a-z]{0,50})[/ ]v?\d+",
        // Kong's last rule reads "scrape" with only its first letter in
        // either case.
        r"(?i:spider|crawl)|[Ss]crape",
    ])
    .unwrap_or_else(|_| RegexSet::empty())
});

#[derive(Deserialize)]
struct BotDetectionConfig {
    #[serde(default)]
    allow: Vec<String>,
    #[serde(default)]
    deny: Vec<String>,
}

/// `bot-detection` (`kong/plugins/bot-detection/handler.lua`).
pub(crate) struct BotDetection {
    allow: Vec<Regex>,
    deny: Vec<Regex>,
}

impl BotDetection {
    pub(crate) fn new(config: &serde_json::Value, _cx: &BuildContext<'_>) -> Result<Self, String> {
        let config: BotDetectionConfig = typed(config)?;
        let compile = |list: &[String]| {
            list.iter()
                .map(|rule| Regex::new(rule).map_err(|e| format!("invalid rule {rule:?}: {e}")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(BotDetection {
            allow: compile(&config.allow)?,
            deny: compile(&config.deny)?,
        })
    }
}

impl Plugin for BotDetection {
    fn filters_response(&self) -> bool {
        false
    }

    fn access(&self, req: &mut PluginRequest<'_>, _ctx: &mut Ctx<'_>) -> Flow {
        let mut agents = req.headers.get_all(http::header::USER_AGENT);
        let Some(agent) = agents.next() else {
            return Flow::Continue;
        };
        if agents.next().is_some() {
            return Flow::Exit(error_message(
                StatusCode::BAD_REQUEST,
                "Only one User-Agent header allowed",
            ));
        }
        let agent = String::from_utf8_lossy(agent);
        let agent = agent.trim();
        if self.allow.iter().any(|rule| rule.is_match(agent)) {
            return Flow::Continue;
        }
        if self.deny.iter().any(|rule| rule.is_match(agent)) || BOTS.is_match(agent) {
            return Flow::Exit(error_message(StatusCode::FORBIDDEN, "Forbidden"));
        }
        Flow::Continue
    }
}

// ---------------------------------------------------------------------------
// cors

#[derive(Deserialize)]
struct CorsConfig {
    origins: Option<Vec<String>>,
    headers: Option<Vec<String>>,
    exposed_headers: Option<Vec<String>>,
    methods: Option<Vec<String>>,
    max_age: Option<f64>,
    credentials: bool,
    #[serde(default)]
    private_network: bool,
    preflight_continue: bool,
    #[serde(default)]
    allow_origin_absent: bool,
}

enum OriginRule {
    /// Compared with the request origin after normalization.
    Exact(String),
    /// A pattern, matched against the origin's host when the entry has
    /// no `:`, else against the normalized origin.
    Pattern { regex: Regex, by_host: bool },
}

/// `cors` (`kong/plugins/cors/handler.lua`).
pub(crate) struct Cors {
    config: CorsConfig,
    /// No origins, or only `*`.
    allow_all: bool,
    /// A single plain origin, sent as it is whatever the request says.
    single: Option<HeaderValue>,
    rules: Vec<OriginRule>,
    /// `*` among several origins.
    has_star: bool,
    allow_headers: Option<HeaderValue>,
    allow_methods: HeaderValue,
    exposed: Option<HeaderValue>,
}

/// The origin as Kong normalizes it: scheme, host and a non-default port.
fn normalize_origin(origin: &str) -> (String, String) {
    let Ok(url) = url_parts(origin) else {
        return (origin.to_owned(), origin.to_owned());
    };
    let (scheme, host, port) = url;
    let port = match (scheme.as_deref(), port.as_deref()) {
        (Some("http"), Some("80")) | (Some("https"), Some("443")) => None,
        (_, port) => port,
    };
    let mut domain = String::new();
    if let Some(scheme) = &scheme {
        domain.push_str(scheme);
        domain.push_str("://");
    }
    domain.push_str(&host);
    if let Some(port) = port {
        domain.push(':');
        domain.push_str(port);
    }
    (domain, host)
}

/// Scheme, host and port of an origin like `https://example.com:8443`.
fn url_parts(origin: &str) -> Result<(Option<String>, String, Option<String>), ()> {
    let (scheme, rest) = match origin.split_once("://") {
        Some((scheme, rest)) => (Some(scheme.to_ascii_lowercase()), rest),
        None => return Err(()),
    };
    let authority = rest.split(['/', '?', '#']).next().unwrap_or("");
    let authority = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    if authority.is_empty() {
        return Err(());
    }
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port))
            if !host.ends_with(']') || authority.starts_with('[') && !port.contains(']') =>
        {
            (host.to_owned(), Some(port.to_owned()))
        }
        _ => (authority.to_owned(), None),
    };
    Ok((scheme, host, port))
}

static PLAIN_ORIGIN: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z0-9.:/-]+$").unwrap_or_else(|_| unreachable!()));

impl Cors {
    pub(crate) fn new(config: &serde_json::Value, _cx: &BuildContext<'_>) -> Result<Self, String> {
        let config: CorsConfig = typed(config)?;
        let origins = config.origins.clone().unwrap_or_default();
        let allow_all = origins.is_empty() || (origins.len() == 1 && origins[0] == "*");
        let single = (origins.len() == 1 && PLAIN_ORIGIN.is_match(&origins[0]))
            .then(|| HeaderValue::from_str(&origins[0]).ok())
            .flatten();
        let mut rules = Vec::new();
        let mut has_star = false;
        for entry in &origins {
            if entry == "*" {
                has_star = true;
                continue;
            }
            let by_host = !entry.contains(':');
            if PLAIN_ORIGIN.is_match(entry) {
                let (domain, _) = normalize_origin(entry);
                rules.push(OriginRule::Exact(domain));
            } else {
                let mut pattern = entry.trim_start_matches('^').to_owned();
                if !pattern.ends_with('$') {
                    pattern.push('$');
                }
                // Kong anchors the pattern at the start (`a` option).
                let regex = Regex::new(&format!("^(?:{pattern})"))
                    .map_err(|e| format!("invalid origin {entry:?}: {e}"))?;
                rules.push(OriginRule::Pattern { regex, by_host });
            }
        }
        let join = |list: &Option<Vec<String>>| {
            list.as_ref()
                .filter(|l| !l.is_empty())
                .map(|l| HeaderValue::from_str(&l.join(",")).map_err(|e| e.to_string()))
                .transpose()
        };
        Ok(Cors {
            allow_headers: join(&config.headers)?,
            allow_methods: match &config.methods {
                Some(methods) => {
                    HeaderValue::from_str(&methods.join(",")).map_err(|e| e.to_string())?
                }
                None => {
                    HeaderValue::from_static("GET,HEAD,PUT,PATCH,POST,DELETE,OPTIONS,TRACE,CONNECT")
                }
            },
            exposed: join(&config.exposed_headers)?,
            allow_all,
            single,
            rules,
            has_star,
            config,
        })
    }

    /// Kong's `configure_origin` and `configure_credentials`: the headers
    /// to set (a `None` value removes), and whether Vary is added rather
    /// than set.
    fn origin_headers(
        &self,
        origin: Option<&str>,
        out: &mut Vec<(HeaderName, Option<HeaderValue>)>,
    ) {
        use http::header::{
            ACCESS_CONTROL_ALLOW_CREDENTIALS as CREDS, ACCESS_CONTROL_ALLOW_ORIGIN as ALLOW, VARY,
        };
        let origin = origin.filter(|o| !o.is_empty());
        let mut allow_all = self.allow_all;
        if allow_all {
            out.push((ALLOW, Some(HeaderValue::from_static("*"))));
        } else {
            out.push((VARY, Some(HeaderValue::from_static("Origin"))));
            if let Some(single) = &self.single {
                out.push((ALLOW, Some(single.clone())));
            } else if let Some(origin) = origin {
                if self.has_star {
                    out.push((ALLOW, Some(HeaderValue::from_static("*"))));
                    allow_all = true;
                } else {
                    let (domain, host) = normalize_origin(origin);
                    let found = self.rules.iter().any(|rule| match rule {
                        OriginRule::Exact(exact) => *exact == domain,
                        OriginRule::Pattern { regex, by_host } => {
                            regex.is_match(if *by_host { &host } else { &domain })
                        }
                    });
                    out.push((
                        ALLOW,
                        if found {
                            HeaderValue::from_str(&domain).ok()
                        } else {
                            None
                        },
                    ));
                }
            } else {
                out.push((ALLOW, None));
            }
        }
        if self.config.credentials {
            if !allow_all {
                out.push((CREDS, Some(HeaderValue::from_static("true"))));
            } else if let Some(origin) = origin.and_then(|o| HeaderValue::from_str(o).ok()) {
                out.push((VARY, Some(HeaderValue::from_static("Origin"))));
                out.push((ALLOW, Some(origin)));
                out.push((CREDS, Some(HeaderValue::from_static("true"))));
            }
        }
    }
}

fn apply(headers: &mut HeaderMap, ops: Vec<(HeaderName, Option<HeaderValue>)>, add_vary: bool) {
    for (name, value) in ops {
        match value {
            Some(value) if add_vary && name == http::header::VARY => {
                headers.append(name, value);
            }
            Some(value) => {
                headers.insert(name, value);
            }
            None => {
                headers.remove(name);
            }
        }
    }
}

impl Plugin for Cors {
    fn access(&self, req: &mut PluginRequest<'_>, ctx: &mut Ctx<'_>) -> Flow {
        use http::header::{
            ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS, ACCESS_CONTROL_MAX_AGE,
            ACCESS_CONTROL_REQUEST_HEADERS, ACCESS_CONTROL_REQUEST_METHOD,
        };
        let origin = req
            .header("origin")
            .filter(|o| !o.is_empty())
            .map(str::to_owned);
        let preflight = req.method == Method::OPTIONS
            && origin.is_some()
            && req.headers.contains(ACCESS_CONTROL_REQUEST_METHOD);
        if !preflight {
            self.without_access(req, ctx);
            return Flow::Continue;
        }
        if self.config.preflight_continue {
            return Flow::Continue;
        }
        let mut ops = Vec::new();
        self.origin_headers(origin.as_deref(), &mut ops);
        let allow_headers = match &self.allow_headers {
            Some(value) => Some(value.clone()),
            None => req
                .headers
                .get(ACCESS_CONTROL_REQUEST_HEADERS)
                .and_then(|v| HeaderValue::from_bytes(v).ok()),
        };
        ops.push((ACCESS_CONTROL_ALLOW_HEADERS, allow_headers));
        ops.push((
            ACCESS_CONTROL_ALLOW_METHODS,
            Some(self.allow_methods.clone()),
        ));
        if let Some(max_age) = self.config.max_age {
            ops.push((
                ACCESS_CONTROL_MAX_AGE,
                Some(HeaderValue::from(max_age as i64)),
            ));
        }
        if self.config.private_network
            && req.header("access-control-request-private-network") == Some("true")
        {
            ops.push((
                HeaderName::from_static("access-control-allow-private-network"),
                Some(HeaderValue::from_static("true")),
            ));
        }
        let mut response = exit_raw(StatusCode::OK, "", Bytes::new());
        response.headers_mut().remove(http::header::CONTENT_TYPE);
        apply(response.headers_mut(), ops, false);
        Flow::Exit(response)
    }

    /// header_filter's work depends only on the request: decided here.
    fn without_access(&self, req: &PluginRequest<'_>, ctx: &mut Ctx<'_>) {
        let origin = req.headers.get_str(http::header::ORIGIN);
        if origin.is_some_and(|o| !o.is_empty()) || self.config.allow_origin_absent {
            let mut ops = Vec::new();
            self.origin_headers(origin, &mut ops);
            if let Some(exposed) = &self.exposed {
                ops.push((
                    http::header::ACCESS_CONTROL_EXPOSE_HEADERS,
                    Some(exposed.clone()),
                ));
            }
            ctx.cors_headers = Some(ops);
        }
    }

    fn response(&self, ctx: &mut Ctx<'_>, _status: StatusCode, headers: &mut HeaderMap) {
        if let Some(ops) = ctx.cors_headers.take() {
            apply(headers, ops, true);
        }
    }
}

#[derive(Deserialize)]
struct RequestTerminationConfig {
    status_code: u16,
    message: Option<String>,
    body: Option<String>,
    content_type: Option<String>,
    #[serde(default)]
    trigger: Option<String>,
    #[serde(default)]
    echo: bool,
}

/// `request-termination` (`kong/plugins/request-termination/handler.lua`).
pub(crate) struct RequestTermination {
    config: RequestTerminationConfig,
    status: StatusCode,
    trigger_header: Option<String>,
}

impl RequestTermination {
    pub(crate) fn new(config: &serde_json::Value, _cx: &BuildContext<'_>) -> Result<Self, String> {
        let config: RequestTerminationConfig = typed(config)?;
        let status = StatusCode::from_u16(config.status_code).map_err(|e| e.to_string())?;
        Ok(RequestTermination {
            trigger_header: config.trigger.as_deref().map(super::auth::header_key),
            config,
            status,
        })
    }

    fn default_message(status: StatusCode) -> Option<&'static str> {
        Some(match status.as_u16() {
            401 => "Unauthorized",
            404 => "Not found",
            405 => "Method not allowed",
            500 => "An unexpected error occurred",
            502 => "Bad Gateway",
            503 => "Service unavailable",
            _ => return None,
        })
    }

    fn echo(&self, req: &PluginRequest<'_>, ctx: &Ctx<'_>) -> Response<ResponseBody> {
        let mut headers = serde_json::Map::new();
        for (name, value) in req.headers.map() {
            let value =
                serde_json::Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned());
            match headers.get_mut(name.as_str()) {
                Some(serde_json::Value::Array(list)) => list.push(value),
                Some(first) => {
                    let first = first.take();
                    headers.insert(name.as_str().to_owned(), serde_json::json!([first, value]));
                }
                None => {
                    headers.insert(name.as_str().to_owned(), value);
                }
            }
        }
        // kong.request.get_query(): repeated arguments as lists.
        let mut query = serde_json::Map::new();
        for (k, v) in req.query_args() {
            let value = serde_json::Value::String(v);
            match query.get_mut(&k) {
                Some(serde_json::Value::Array(list)) => list.push(value),
                Some(first) => {
                    let first = first.take();
                    query.insert(k, serde_json::json!([first, value]));
                }
                None => {
                    query.insert(k, value);
                }
            }
        }
        // kong.request.get_host(): nginx's $host, without the port.
        let host = req.header("host").map(|host| {
            let host = match host.rfind(':') {
                Some(colon) if !host[colon..].contains(']') => &host[..colon],
                _ => host,
            };
            host.to_ascii_lowercase()
        });
        let captures = ctx.uri_captures.as_ref().map_or_else(
            || serde_json::json!({ "named": {}, "unnamed": [] }),
            |captures| captures.to_json(),
        );
        let (route, service) = match ctx.entities {
            Some(entities) => (entities.route.clone(), entities.service.clone()),
            None => (
                serde_json::json!({ "id": ctx.route_id }),
                ctx.service_id.map_or(
                    serde_json::Value::Null,
                    |id| serde_json::json!({ "id": id }),
                ),
            ),
        };
        let mut request = serde_json::json!({
            "scheme": if req.https { "https" } else { "http" },
            "host": host,
            "port": req.local_port,
            "headers": headers,
            "query": query,
            "raw_body": req.body.as_ref().map_or(String::new(), |b| String::from_utf8_lossy(b).into_owned()),
            "method": req.method.as_str(),
            "path": req.path,
            "uri_captures": captures,
        });
        if let Some(body) = super::auth::body_args(req) {
            request["body"] = serde_json::Value::Object(body);
        }
        let mut body = serde_json::json!({
            "request": request,
            "matched_route": route,
            "matched_service": service,
        });
        // A nil message leaves no key in Kong's table.
        if let Some(message) = self
            .config
            .message
            .as_deref()
            .or(Self::default_message(self.status))
        {
            body["message"] = message.into();
        }
        exit_raw(
            self.status,
            "application/json; charset=utf-8",
            Bytes::from(body.to_string()),
        )
    }
}

impl Plugin for RequestTermination {
    fn filters_response(&self) -> bool {
        false
    }

    fn needs(&self) -> Needs {
        let echo = self.config.echo;
        Needs {
            request_body: echo,
            uri_captures: echo,
            entities: echo,
            ..Needs::default()
        }
    }

    fn access(&self, req: &mut PluginRequest<'_>, ctx: &mut Ctx<'_>) -> Flow {
        if let (Some(trigger), Some(header)) = (&self.config.trigger, &self.trigger_header) {
            let in_header = req.headers.contains(header.as_str());
            if !in_header && !req.query_args().iter().any(|(k, _)| k == trigger) {
                return Flow::Continue;
            }
        }
        if self.config.echo {
            return Flow::Exit(self.echo(req, ctx));
        }
        if let Some(body) = &self.config.body {
            let content_type = self
                .config
                .content_type
                .as_deref()
                .unwrap_or("application/json; charset=utf-8");
            return Flow::Exit(exit_raw(
                self.status,
                content_type,
                Bytes::from(body.clone()),
            ));
        }
        let message = self
            .config
            .message
            .as_deref()
            .or(Self::default_message(self.status));
        Flow::Exit(match message {
            Some(message) => exit_message(self.status, message),
            None => exit_raw(self.status, "", Bytes::new()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::BOTS;

    #[test]
    fn the_bot_list_compiles_and_knows_kongs_families() {
        // An empty set (a rule that does not compile) would block nothing.
        assert_eq!(BOTS.len(), 10);
        for agent in [
            "Boto3/1.26.0 Python/3.9",
            "aws-cli/2.0.1 Python/3.8",
            "aws-sdk-java/1.12.0",
            "s3fs/1.0",
            "Googlebot/2.1 (+http://www.google.com/bot.html)",
            "WordPress/6.1; https://example.test",
            "Mozilla/5.0 (compatible; YahooSeeker/1.2)",
            "FaviconFetcher",
            "http%20client/1.0",
            "Scrapy/2.8",
            "MyCrawler/1.0",
        ] {
            assert!(BOTS.is_match(agent), "{agent}");
        }
        // Kong lets these through.
        for agent in [
            "Wget/1.21.4",
            "curl/8.4.0",
            "Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 Chrome/119.0 Safari/537.36",
            "Google-Read-Aloud",
            "StatusCake",
            "SCRAPE",
            "PostmanRuntime/7.32.3",
        ] {
            assert!(!BOTS.is_match(agent), "{agent}");
        }
    }
}
