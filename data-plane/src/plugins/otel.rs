//! `opentelemetry` (`kong/plugins/opentelemetry/`, Kong 3.9): tracing
//! headers extracted from the request and injected into the upstream
//! request, and each request's spans sent to an OTLP/HTTP collector.
//!
//! Kong makes spans only when `tracing_instrumentations` is on in
//! kong.conf; this plugin behaves as Kong with the `request` and
//! `balancer` instrumentations:
//!
//! * `kong`, the SERVER span of the request, from its start to the end of
//!   the response, with Kong's `http.*` and `net.peer.ip` attributes;
//! * `kong.balancer`, the CLIENT span of the call to the upstream, child
//!   of `kong`, from the moment the request was sent upstream (the log
//!   entry's `latencies.kong`) to the end of the response, as Kong ends it.
//!   It is the span the upstream sees as its parent in the injected
//!   headers. A request answered without the upstream has none.
//!
//! Phases: `access` extracts the incoming context (the formats of
//! `propagation.extract`, or of the legacy `header_type`), makes the
//! sampling decision (`sampling_rate`, and never when the caller's sampled
//! flag is off), clears `propagation.clear` and injects `propagation.inject`.
//! `response` adds `http_response_header_for_traceid`. `log` turns the
//! request's trace and Kong's log entry into spans, and puts them in a
//! bounded queue: a background task sends them in batches of up to
//! `queue.max_batch_size` after at most `queue.max_coalescing_delay`, and
//! retries a failed batch as Kong's queue does. A slow or absent collector
//! never holds a request.
//!
//! The `log` phase only sees the log entry, so the trace made in `access`
//! is found again through the tracing header it injected (the entry keeps
//! the upstream request's headers): traces in flight are kept by that
//! header's value while their request lives, and the request's [`Ctx`]
//! removes its own when it ends.
//!
//! The queue belongs to the plugin instance: when a new configuration
//! replaces it, the queue closes, the task tries once to send what it
//! still holds (no retries) and ends, dropping its exporter; nothing waits
//! on it.
//!
//! Left out: `logs_endpoint` (OTLP logs), the `http.flavor` and
//! `kong.request.id` attributes (neither is known to the log phase), the
//! other instrumentations (`kong.router`, per-plugin, DNS, database
//! spans), the trace ids Kong adds to the log entry, and the balancer's
//! peer address when the service names a host (only an IP literal is
//! reported as `net.peer.ip`, a name as `net.peer.name`).

use std::collections::hash_map::RandomState;
use std::collections::{BTreeMap, HashMap};
use std::hash::BuildHasher;
use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwapOption;
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::trace::{IdGenerator, RandomIdGenerator, SpanData, SpanExporter};
use opentelemetry_sdk::Resource;
use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;

use super::{typed, BuildContext, Ctx, Flow, Needs, Plugin, PluginRequest};

/// The Kong version the resource's `service.version` reports.
const KONG_VERSION: &str = "3.9.0";

/// kong.conf's `tracing_sampling_rate` default, which Kong applies when the
/// plugin has no `sampling_rate`.
const DEFAULT_SAMPLING_RATE: f64 = 0.01;

// ---------------------------------------------------------------------------
// Configuration

#[derive(Deserialize)]
struct Config {
    #[serde(default)]
    traces_endpoint: Option<String>,
    #[serde(default)]
    logs_endpoint: Option<String>,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    resource_attributes: Option<BTreeMap<String, String>>,
    #[serde(default)]
    queue: QueueConfig,
    #[serde(default)]
    batch_span_count: Option<f64>,
    #[serde(default)]
    batch_flush_delay: Option<f64>,
    #[serde(default = "default_connect_timeout")]
    connect_timeout: f64,
    #[serde(default = "default_io_timeout")]
    send_timeout: f64,
    #[serde(default = "default_io_timeout")]
    read_timeout: f64,
    #[serde(default)]
    http_response_header_for_traceid: Option<String>,
    #[serde(default)]
    header_type: Option<String>,
    #[serde(default)]
    sampling_rate: Option<f64>,
    #[serde(default)]
    propagation: Option<PropagationConfig>,
}

fn default_connect_timeout() -> f64 {
    1000.0
}

fn default_io_timeout() -> f64 {
    5000.0
}

#[derive(Deserialize)]
#[serde(default)]
struct QueueConfig {
    max_batch_size: f64,
    max_coalescing_delay: f64,
    max_entries: f64,
    max_retry_time: f64,
    initial_retry_delay: f64,
    max_retry_delay: f64,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            max_batch_size: 200.0,
            max_coalescing_delay: 1.0,
            max_entries: 10_000.0,
            max_retry_time: 60.0,
            initial_retry_delay: 0.01,
            max_retry_delay: 60.0,
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(default)]
struct PropagationConfig {
    extract: Option<Vec<String>>,
    clear: Option<Vec<String>>,
    inject: Option<Vec<String>>,
    default_format: Option<String>,
}

/// A tracing header format (`kong/observability/tracing/propagation`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    W3c,
    B3,
    B3Single,
    Jaeger,
    Ot,
    Datadog,
    Aws,
    Gcp,
    Instana,
}

impl FromStr for Format {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "w3c" => Format::W3c,
            "b3" => Format::B3,
            "b3-single" => Format::B3Single,
            "jaeger" => Format::Jaeger,
            "ot" => Format::Ot,
            "datadog" => Format::Datadog,
            "aws" => Format::Aws,
            "gcp" => Format::Gcp,
            "instana" => Format::Instana,
            other => return Err(format!("unknown tracing header format {other:?}")),
        })
    }
}

/// An injector: a format, or `preserve` (the format extracted, else the
/// default one).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Inject {
    Preserve,
    Format(Format),
}

/// Kong's propagation settings once legacy `header_type` is folded in
/// (`propagation.get_plugin_params`).
#[derive(Debug, PartialEq, Eq)]
struct Propagation {
    extract: Vec<Format>,
    clear: Vec<HeaderName>,
    inject: Vec<Inject>,
    default_format: Format,
}

/// The extraction order legacy `header_type` values use.
const LEGACY_EXTRACT: [Format; 7] = [
    Format::B3,
    Format::W3c,
    Format::Jaeger,
    Format::Ot,
    Format::Datadog,
    Format::Aws,
    Format::Gcp,
];

impl Propagation {
    fn from_config(config: &Config) -> Result<Propagation, String> {
        let empty = PropagationConfig::default();
        let prop = config.propagation.as_ref().unwrap_or(&empty);
        let default_format = prop.default_format.as_deref().unwrap_or("w3c").parse()?;
        let formats = |list: &[String]| -> Result<Vec<Format>, String> {
            list.iter().map(|f| f.parse()).collect()
        };
        let explicit = prop.extract.is_some() || prop.clear.is_some() || prop.inject.is_some();
        let (extract, inject) = if explicit {
            let inject = prop
                .inject
                .iter()
                .flatten()
                .map(|f| match f.as_str() {
                    "preserve" => Ok(Inject::Preserve),
                    f => f.parse().map(Inject::Format),
                })
                .collect::<Result<Vec<_>, String>>()?;
            (
                formats(prop.extract.as_deref().unwrap_or_default())?,
                inject,
            )
        } else {
            match config.header_type.as_deref().unwrap_or("preserve") {
                "preserve" => (LEGACY_EXTRACT.to_vec(), vec![Inject::Preserve]),
                "ignore" => (Vec::new(), vec![Inject::Format(default_format)]),
                other => (
                    LEGACY_EXTRACT.to_vec(),
                    vec![Inject::Preserve, Inject::Format(other.parse()?)],
                ),
            }
        };
        let clear = prop
            .clear
            .iter()
            .flatten()
            .map(|h| HeaderName::from_bytes(h.as_bytes()).map_err(|e| format!("{h}: {e}")))
            .collect::<Result<Vec<_>, String>>()?;
        Ok(Propagation {
            extract,
            clear,
            inject,
            default_format,
        })
    }
}

// ---------------------------------------------------------------------------
// Extraction

/// The context a tracing header carried. Ids are kept as Kong keeps them:
/// trace ids 16 bytes, span ids 8 (shorter ones padded with zeros in
/// front), with the trace id's original size for the injectors that can
/// keep it.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
struct Extracted {
    trace_id: Option<[u8; 16]>,
    trace_id_size: usize,
    span_id: Option<[u8; 8]>,
    parent_id: Option<[u8; 8]>,
    sampled: Option<bool>,
    /// b3's debug flag (`x-b3-flags: 1`, or `d` in the single header).
    debug: bool,
    /// The b3 context came from the single header.
    single_header: bool,
    /// W3C `tracestate`, kept on our spans.
    trace_state: Option<String>,
}

impl Extracted {
    /// Whether the extractor found anything. Kong counts any b3 header
    /// (even a lone W3C `tracestate`) as a b3 context; an extraction that
    /// found no id and no sampling decision lets the next format try.
    fn found(&self) -> bool {
        self.trace_id.is_some() || self.sampled.is_some() || self.debug
    }
}

/// The single value of a header: none when absent or repeated, as Kong's
/// extractors ignore a header that comes as a table.
fn single<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    if values.next().is_some() {
        return None;
    }
    first.to_str().ok()
}

fn is_hex(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Kong's `from_hex`: an odd length gets a leading zero.
fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !is_hex(s) {
        return None;
    }
    let padded;
    let s = if s.len() % 2 == 1 {
        padded = format!("0{s}");
        padded.as_str()
    } else {
        s
    };
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).ok())
        .collect()
}

/// A decimal id as the smallest big-endian byte string (OpenSSL's
/// `BN_bn2bin`).
fn from_dec(s: &str) -> Option<Vec<u8>> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u128 = s.parse().ok()?;
    let bytes = n.to_be_bytes();
    let skip = bytes.iter().take_while(|b| **b == 0).count();
    Some(bytes[skip..].to_vec())
}

/// Kong's `to_id_size`: the last `N` bytes, or zeros in front.
fn sized<const N: usize>(id: &[u8]) -> [u8; N] {
    let mut out = [0u8; N];
    if id.len() >= N {
        out.copy_from_slice(&id[id.len() - N..]);
    } else {
        out[N - id.len()..].copy_from_slice(id);
    }
    out
}

fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write as _;
    bytes
        .iter()
        .fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
            let _ = write!(s, "{b:02x}");
            s
        })
}

fn to_dec(bytes: &[u8]) -> String {
    u128::from_be_bytes(sized::<16>(bytes)).to_string()
}

impl Extracted {
    fn with_ids(trace: Option<Vec<u8>>, span: Option<Vec<u8>>, parent: Option<Vec<u8>>) -> Self {
        Extracted {
            trace_id_size: trace.as_ref().map_or(0, Vec::len),
            trace_id: trace.as_deref().map(sized::<16>),
            span_id: span.as_deref().map(sized::<8>),
            parent_id: parent.as_deref().map(sized::<8>),
            ..Extracted::default()
        }
    }
}

fn extract(format: Format, headers: &HeaderMap) -> Option<Extracted> {
    match format {
        Format::W3c => extract_w3c(headers),
        Format::B3 | Format::B3Single => extract_b3(headers),
        Format::Jaeger => extract_jaeger(headers),
        Format::Ot => extract_ot(headers),
        Format::Datadog => extract_datadog(headers),
        Format::Aws => extract_aws(headers),
        Format::Gcp => extract_gcp(headers),
        Format::Instana => extract_instana(headers),
    }
}

fn extract_w3c(headers: &HeaderMap) -> Option<Extracted> {
    let traceparent = single(headers, "traceparent")?;
    let mut parts = traceparent.split('-');
    let (version, trace, parent, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || ![version, trace, parent, flags].iter().all(|p| is_hex(p)) {
        tracing::debug!("invalid W3C traceparent header; ignoring.");
        return None;
    }
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    if version != "00"
        || trace.len() != 32
        || zero(trace)
        || parent.len() != 16
        || zero(parent)
        || flags.len() != 2
    {
        tracing::debug!("invalid W3C trace context; ignoring.");
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let mut ctx = Extracted::with_ids(from_hex(trace), from_hex(parent), None);
    ctx.sampled = Some(flags & 1 == 1);
    ctx.trace_state = single(headers, "tracestate")
        .filter(|s| !s.is_empty())
        .map(str::to_owned);
    Some(ctx)
}

fn b3_sampled(value: &str) -> Option<Option<bool>> {
    match value {
        "1" | "true" => Some(Some(true)),
        "0" | "false" => Some(Some(false)),
        _ => None,
    }
}

fn extract_b3(headers: &HeaderMap) -> Option<Extracted> {
    let mut ctx = Extracted::default();
    let mut ids: Option<(String, String, Option<String>)> = None;
    // The single header, or a `b3=` member of tracestate.
    let single_value = single(headers, "b3").map(str::to_owned).or_else(|| {
        headers
            .get_all("tracestate")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|v| v.strip_prefix("b3=").map(str::to_owned))
    });
    if let Some(value) = single_value {
        ctx.single_header = true;
        match value.as_str() {
            "1" => ctx.sampled = Some(true),
            "d" => {
                ctx.sampled = Some(true);
                ctx.debug = true;
            }
            "0" => ctx.sampled = Some(false),
            value => {
                let mut parts = value.splitn(4, '-');
                let trace = parts.next().unwrap_or("");
                let span = parts.next().unwrap_or("");
                let sampled = parts.next().unwrap_or("");
                let parent = parts.next().unwrap_or("");
                let valid = is_hex(trace)
                    && (trace.len() == 16 || trace.len() == 32)
                    && span.len() == 16
                    && is_hex(span)
                    && matches!(sampled, "" | "0" | "1" | "d")
                    && (parent.is_empty() || (parent.len() == 16 && is_hex(parent)));
                if valid {
                    match sampled {
                        "1" => ctx.sampled = Some(true),
                        "d" => {
                            ctx.sampled = Some(true);
                            ctx.debug = true;
                        }
                        "0" => ctx.sampled = Some(false),
                        _ => {}
                    }
                    let parent = (!parent.is_empty()).then(|| parent.to_owned());
                    ids = Some((trace.to_owned(), span.to_owned(), parent));
                } else {
                    tracing::debug!("b3 single header invalid; ignoring.");
                }
            }
        }
    }
    // The multiple headers complete what the single one did not say.
    if ctx.sampled.is_none() {
        if let Some(value) = single(headers, "x-b3-sampled") {
            ctx.sampled = b3_sampled(value).flatten();
        }
    }
    if single(headers, "x-b3-flags") == Some("1") {
        ctx.sampled = Some(true);
        ctx.debug = true;
    }
    if ids.is_none() {
        let get = |name: &str, lengths: &[usize]| -> Result<Option<String>, ()> {
            match single(headers, name) {
                None => Ok(None),
                Some(v) if lengths.contains(&v.len()) && is_hex(v) => Ok(Some(v.to_owned())),
                Some(_) => Err(()),
            }
        };
        if let (Ok(Some(trace)), Ok(span), Ok(parent)) = (
            get("x-b3-traceid", &[16, 32]),
            get("x-b3-spanid", &[16]),
            get("x-b3-parentspanid", &[16]),
        ) {
            ids = Some((trace, span.unwrap_or_default(), parent));
        }
    }
    if let Some((trace, span, parent)) = ids {
        let span = (!span.is_empty()).then_some(span);
        let with = Extracted::with_ids(
            from_hex(&trace),
            span.as_deref().and_then(from_hex),
            parent.as_deref().and_then(from_hex),
        );
        ctx = Extracted {
            sampled: ctx.sampled,
            debug: ctx.debug,
            single_header: ctx.single_header,
            ..with
        };
    }
    Some(ctx)
}

fn extract_jaeger(headers: &HeaderMap) -> Option<Extracted> {
    let value = single(headers, "uber-trace-id")?;
    let mut parts = value.split(':');
    let (trace, span, parent, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || ![trace, span, parent, flags].iter().all(|p| is_hex(p)) {
        return None;
    }
    let zero = |s: &str| s.bytes().all(|b| b == b'0');
    if trace.len() > 32 || zero(trace) || span.len() > 16 || zero(span) {
        return None;
    }
    if flags.len() != 1 && flags.len() != 2 {
        return None;
    }
    let flags = u8::from_str_radix(flags, 16).ok()?;
    let mut ctx = Extracted::with_ids(from_hex(trace), from_hex(span), from_hex(parent));
    ctx.sampled = Some(flags & 1 == 1);
    Some(ctx)
}

fn extract_ot(headers: &HeaderMap) -> Option<Extracted> {
    let sampled = single(headers, "ot-tracer-sampled");
    let trace = single(headers, "ot-tracer-traceid");
    let span = single(headers, "ot-tracer-spanid");
    if sampled.is_none() && trace.is_none() && span.is_none() {
        return None;
    }
    let trace_ok = trace.is_none_or(|t| (t.len() == 16 || t.len() == 32) && is_hex(t));
    let span_ok = span.is_none_or(|s| s.len() == 16 && is_hex(s));
    let mut ctx = if trace.is_some() && trace_ok && span_ok {
        Extracted::with_ids(trace.and_then(from_hex), span.and_then(from_hex), None)
    } else {
        Extracted::default()
    };
    ctx.sampled = sampled.and_then(b3_sampled).flatten();
    Some(ctx)
}

fn extract_datadog(headers: &HeaderMap) -> Option<Extracted> {
    let priority = single(headers, "x-datadog-sampling-priority");
    let trace = single(headers, "x-datadog-trace-id");
    let parent = single(headers, "x-datadog-parent-id");
    if priority.is_none() && trace.is_none() && parent.is_none() {
        return None;
    }
    let sampled = match priority {
        None => None,
        Some("1" | "2") => Some(true),
        Some("0" | "-1") => Some(false),
        Some(_) => return None,
    };
    let trace = trace.and_then(|t| from_dec(t.trim()));
    let parent = trace.as_ref().and(parent).and_then(|p| from_dec(p.trim()));
    let mut ctx = Extracted::with_ids(trace, parent, None);
    ctx.sampled = sampled;
    Some(ctx)
}

fn extract_aws(headers: &HeaderMap) -> Option<Extracted> {
    let value = single(headers, "x-amzn-trace-id")?;
    let (mut trace, mut parent, mut sampled) = (None, None, None);
    for pair in value.split(';') {
        let (key, val) = pair.split_once('=').unwrap_or((pair, ""));
        let (key, val) = (key.trim(), val.trim());
        match key {
            "Root" => {
                let mut parts = val.split('-');
                let (version, time, unique) = (parts.next()?, parts.next()?, parts.next()?);
                if val.len() != 35 || version != "1" || time.len() != 8 || unique.len() != 24 {
                    return None;
                }
                trace = Some(from_hex(&format!("{time}{unique}"))?);
            }
            "Parent" => {
                if val.len() != 16 {
                    return None;
                }
                parent = Some(from_hex(val)?);
            }
            "Sampled" => match val {
                "0" => sampled = Some(false),
                "1" => sampled = Some(true),
                _ => return None,
            },
            _ => {}
        }
    }
    let mut ctx = Extracted::with_ids(trace, parent, None);
    ctx.sampled = sampled;
    Some(ctx)
}

fn extract_gcp(headers: &HeaderMap) -> Option<Extracted> {
    let value = single(headers, "x-cloud-trace-context")?;
    let (trace, rest) = value.split_once('/')?;
    let (span, flags) = match rest.split_once(";o=") {
        Some((span, flags)) => (span, Some(flags)),
        None => (rest, None),
    };
    let lower_hex = trace
        .bytes()
        .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    if trace.len() != 32 || !lower_hex || span.is_empty() || span.len() > 20 {
        return None;
    }
    if flags.is_some_and(|f| f.len() != 1 || !f.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    let mut ctx = Extracted::with_ids(from_hex(trace), Some(from_dec(span)?), None);
    ctx.sampled = Some(flags == Some("1"));
    Some(ctx)
}

fn extract_instana(headers: &HeaderMap) -> Option<Extracted> {
    let trace = single(headers, "x-instana-t")?;
    let span = single(headers, "x-instana-s")?;
    let leading_hex =
        |s: &str| -> String { s.chars().take_while(char::is_ascii_hexdigit).collect() };
    let (trace, span) = (leading_hex(trace), leading_hex(span));
    let level = single(headers, "x-instana-l").and_then(|l| l.get(..1));
    let mut ctx = Extracted::with_ids(from_hex(&trace), from_hex(&span), None);
    ctx.sampled = Some(level == Some("1"));
    Some(ctx)
}

// ---------------------------------------------------------------------------
// Injection

/// What the injectors write: Kong's inject context.
struct Outgoing {
    trace_id: [u8; 16],
    /// The original size of an extracted trace id (0: none).
    trace_id_size: usize,
    /// The span the upstream sees as its parent (`kong.balancer`).
    span_id: [u8; 8],
    /// Its parent (the `kong` span).
    parent_id: [u8; 8],
    sampled: bool,
    debug: bool,
}

impl Outgoing {
    /// The trace id in the size the injector takes: the original one when
    /// allowed, else the first allowed.
    fn trace_id(&self, allowed: &[usize]) -> Vec<u8> {
        let size = if allowed.contains(&self.trace_id_size) {
            self.trace_id_size
        } else {
            allowed[0]
        };
        self.trace_id[16 - size..].to_vec()
    }
}

/// The headers a format sets, the first one being the header that
/// identifies this request's trace (it carries our span id).
fn inject_headers(format: Format, out: &Outgoing) -> Vec<(&'static str, String)> {
    let sampled = if out.sampled { "1" } else { "0" };
    match format {
        Format::W3c => {
            // An incoming tracestate goes on as it came.
            vec![(
                "traceparent",
                format!(
                    "00-{}-{}-{}",
                    hex(&out.trace_id(&[16])),
                    hex(&out.span_id),
                    if out.sampled { "01" } else { "00" }
                ),
            )]
        }
        Format::B3 => {
            let mut headers = vec![
                ("x-b3-spanid", hex(&out.span_id)),
                ("x-b3-traceid", hex(&out.trace_id(&[16, 8]))),
                ("x-b3-parentspanid", hex(&out.parent_id)),
            ];
            if out.debug {
                headers.push(("x-b3-flags", "1".to_owned()));
            } else {
                headers.push(("x-b3-sampled", sampled.to_owned()));
            }
            headers
        }
        Format::B3Single => {
            let flag = if out.debug { "d" } else { sampled };
            vec![(
                "b3",
                format!(
                    "{}-{}-{flag}-{}",
                    hex(&out.trace_id(&[16, 8])),
                    hex(&out.span_id),
                    hex(&out.parent_id)
                ),
            )]
        }
        Format::Jaeger => vec![(
            "uber-trace-id",
            format!(
                "{}:{}:{}:{}",
                hex(&out.trace_id(&[16, 8])),
                hex(&out.span_id),
                hex(&out.parent_id),
                if out.sampled { "01" } else { "00" }
            ),
        )],
        Format::Ot => vec![
            ("ot-tracer-spanid", hex(&out.span_id)),
            ("ot-tracer-traceid", hex(&out.trace_id(&[8, 16]))),
            ("ot-tracer-sampled", sampled.to_owned()),
        ],
        Format::Datadog => vec![
            ("x-datadog-parent-id", to_dec(&out.span_id)),
            ("x-datadog-trace-id", to_dec(&out.trace_id(&[8]))),
            ("x-datadog-sampling-priority", sampled.to_owned()),
        ],
        Format::Aws => {
            let trace = hex(&out.trace_id(&[16]));
            vec![(
                "x-amzn-trace-id",
                format!(
                    "Root=1-{}-{};Parent={};Sampled={sampled}",
                    &trace[..8],
                    &trace[8..],
                    hex(&out.span_id)
                ),
            )]
        }
        Format::Gcp => vec![(
            "x-cloud-trace-context",
            format!(
                "{}/{};o={sampled}",
                hex(&out.trace_id(&[16])),
                to_dec(&out.span_id)
            ),
        )],
        Format::Instana => vec![
            ("x-instana-s", hex(&out.span_id)),
            ("x-instana-t", hex(&out.trace_id(&[16, 8]))),
            ("x-instana-l", sampled.to_owned()),
        ],
    }
}

/// The headers whose value identifies a trace we injected, in the order
/// the log phase looks for them.
const KEY_HEADERS: [&str; 9] = [
    "traceparent",
    "x-b3-spanid",
    "b3",
    "uber-trace-id",
    "ot-tracer-spanid",
    "x-datadog-parent-id",
    "x-amzn-trace-id",
    "x-cloud-trace-context",
    "x-instana-s",
];

// ---------------------------------------------------------------------------
// Sampling

/// Kong's trace-id-based sampler: the first 8 bytes of the trace id, read
/// as the machine reads them (little-endian here), below `rate` × 2^64.
fn sample(trace_id: &[u8; 16], rate: f64) -> bool {
    if rate >= 1.0 {
        return true;
    }
    if rate <= 0.0 {
        return false;
    }
    let head = u64::from_le_bytes(sized::<8>(&trace_id[..8]));
    (head as f64) < rate * 18_446_744_073_709_551_616.0
}

// ---------------------------------------------------------------------------
// Per-request trace

/// One request's trace, decided in `access` (or when first needed).
#[derive(Debug)]
struct Trace {
    trace_id: [u8; 16],
    /// The `kong` span.
    root_span_id: [u8; 8],
    /// The caller's span, from the incoming headers.
    remote_parent: Option<[u8; 8]>,
    /// The `kong.balancer` span, the upstream's parent.
    upstream_span_id: [u8; 8],
    sampled: bool,
    trace_state: Option<String>,
    /// The value of the header that identifies the trace in the log entry.
    key: Option<Box<str>>,
}

impl Trace {
    fn fresh(rate: f64) -> Trace {
        let ids = RandomIdGenerator::default();
        let trace_id = ids.new_trace_id().to_bytes();
        Trace {
            trace_id,
            root_span_id: ids.new_span_id().to_bytes(),
            remote_parent: None,
            upstream_span_id: ids.new_span_id().to_bytes(),
            sampled: sample(&trace_id, rate),
            trace_state: None,
            key: None,
        }
    }
}

/// Traces in flight, by the value of the header that identifies them: a
/// fixed table of slots without locks. A trace takes the first free slot
/// of a short probe from its key's hash and leaves it when its request
/// ends; when every probed slot is taken (more requests in flight than
/// the table holds), `log` starts a new trace for that request.
struct Registry {
    slots: Box<[ArcSwapOption<Trace>]>,
    hasher: RandomState,
}

const SLOTS: usize = 1 << 14;
const PROBES: usize = 32;

impl Registry {
    fn new() -> Registry {
        Registry {
            slots: (0..SLOTS).map(|_| ArcSwapOption::empty()).collect(),
            hasher: RandomState::new(),
        }
    }

    fn probe(&self, key: &str) -> impl Iterator<Item = usize> {
        let start = self.hasher.hash_one(key) as usize;
        (0..PROBES).map(move |i| start.wrapping_add(i) & (SLOTS - 1))
    }

    /// The slot the trace took, if any.
    fn insert(&self, trace: &Arc<Trace>) -> Option<usize> {
        let key = trace.key.as_deref()?;
        self.probe(key).find(|&i| {
            let slot = &self.slots[i];
            slot.load().is_none() && {
                let previous = slot.compare_and_swap(&None::<Arc<Trace>>, Some(Arc::clone(trace)));
                previous.is_none()
            }
        })
    }

    fn get(&self, key: &str) -> Option<Arc<Trace>> {
        self.probe(key).find_map(|i| {
            let slot = self.slots[i].load();
            slot.as_ref()
                .filter(|trace| trace.key.as_deref() == Some(key))
                .map(Arc::clone)
        })
    }

    fn remove(&self, slot: usize, trace: &Arc<Trace>) {
        self.slots[slot].compare_and_swap(Arc::as_ptr(trace), None);
    }
}

/// The trace of a request, kept in its [`Ctx`]; dropping it (when the
/// request ends) frees its slot.
pub(crate) struct RequestTrace {
    trace: Arc<Trace>,
    slot: Option<(usize, Arc<Registry>)>,
}

impl RequestTrace {
    fn new(trace: Trace, registry: &Arc<Registry>) -> RequestTrace {
        let trace = Arc::new(trace);
        let slot = registry
            .insert(&trace)
            .map(|slot| (slot, Arc::clone(registry)));
        if slot.is_none() && trace.key.is_some() {
            tracing::debug!("opentelemetry: too many traces in flight; this one is not kept.");
        }
        RequestTrace { trace, slot }
    }
}

impl Drop for RequestTrace {
    fn drop(&mut self) {
        if let Some((slot, registry)) = &self.slot {
            registry.remove(*slot, &self.trace);
        }
    }
}

// ---------------------------------------------------------------------------
// Export

/// Kong's queue parameters for the span queue.
struct QueueSettings {
    batch: usize,
    delay: Duration,
    max_retry_time: Duration,
    initial_retry_delay: Duration,
    max_retry_delay: Duration,
}

fn seconds(s: f64) -> Duration {
    Duration::try_from_secs_f64(s.max(0.0)).unwrap_or(Duration::MAX)
}

fn millis(ms: f64) -> Duration {
    seconds(ms / 1000.0)
}

/// Sends batches of spans until the queue closes.
async fn send_spans(
    mut exporter: opentelemetry_otlp::SpanExporter,
    mut receiver: mpsc::Receiver<SpanData>,
    queue: QueueSettings,
    endpoint: String,
) {
    while let Some(first) = receiver.recv().await {
        let mut batch = vec![first];
        let deadline = tokio::time::Instant::now() + queue.delay;
        while batch.len() < queue.batch {
            match tokio::time::timeout_at(deadline, receiver.recv()).await {
                Ok(Some(span)) => batch.push(span),
                _ => break,
            }
        }
        let started = tokio::time::Instant::now();
        let mut retries = 0;
        loop {
            let count = batch.len();
            match exporter.export(batch.clone()).await {
                Ok(()) => {
                    tracing::debug!(spans = count, %endpoint, "opentelemetry sent spans.");
                    break;
                }
                Err(error) => {
                    tracing::warn!(%error, %endpoint, "opentelemetry could not send spans.");
                }
            }
            if started.elapsed() > queue.max_retry_time {
                tracing::error!(
                    spans = count,
                    %endpoint,
                    "opentelemetry could not send spans before max_retry_time; they are lost."
                );
                break;
            }
            // A replaced configuration's queue tries what it holds once:
            // old queues do not pile up behind an unreachable collector.
            if receiver.is_closed() {
                tracing::error!(
                    spans = count,
                    %endpoint,
                    "opentelemetry configuration replaced; unsent spans are lost."
                );
                break;
            }
            let backoff = queue
                .initial_retry_delay
                .saturating_mul(2u32.saturating_pow(retries))
                .min(queue.max_retry_delay);
            tokio::time::sleep(backoff).await;
            retries = retries.saturating_add(1);
        }
    }
    let _ = exporter.shutdown();
}

/// A process-wide id for `service.instance.id` (Kong's node id).
fn instance_id() -> &'static str {
    static ID: OnceLock<String> = OnceLock::new();
    ID.get_or_init(|| uuid::Uuid::new_v4().to_string())
}

fn scope() -> InstrumentationScope {
    InstrumentationScope::builder("kong-internal")
        .with_version("0.1.0")
        .build()
}

/// The OTLP/HTTP exporter for `config`, with Kong's default resource.
fn exporter(config: &Config, endpoint: &str) -> Result<opentelemetry_otlp::SpanExporter, String> {
    // Headers the exporter sets itself go through it; the others are the
    // client's defaults, sent as configured (the exporter would decode
    // percent escapes in them).
    let mut own = HashMap::new();
    let mut defaults = HeaderMap::new();
    for (name, value) in config.headers.iter().flatten() {
        let header = HeaderName::from_bytes(name.as_bytes()).map_err(|e| format!("{name}: {e}"))?;
        if header == http::header::CONTENT_TYPE || header == http::header::USER_AGENT {
            own.insert(name.clone(), value.clone());
        } else {
            let value = HeaderValue::from_str(value).map_err(|e| format!("{name}: {e}"))?;
            defaults.insert(header, value);
        }
    }
    let tls = crate::https_client_config(true).map_err(|e| e.to_string())?;
    let io_timeout = millis(config.send_timeout) + millis(config.read_timeout);
    let client = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .no_proxy()
        .connect_timeout(millis(config.connect_timeout))
        .timeout(io_timeout)
        .default_headers(defaults)
        .build()
        .map_err(|e| format!("cannot build the OTLP client: {e}"))?;
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_http_client(client)
        .with_endpoint(endpoint)
        .with_timeout(io_timeout);
    if !own.is_empty() {
        builder = builder.with_headers(own);
    }
    let mut exporter = builder
        .build()
        .map_err(|e| format!("invalid traces_endpoint: {e}"))?;
    let mut attributes: BTreeMap<String, String> = BTreeMap::from([
        ("service.name".to_owned(), "kong".to_owned()),
        ("service.instance.id".to_owned(), instance_id().to_owned()),
        ("service.version".to_owned(), KONG_VERSION.to_owned()),
    ]);
    attributes.extend(config.resource_attributes.clone().unwrap_or_default());
    let resource = Resource::builder_empty()
        .with_attributes(attributes.into_iter().map(|(k, v)| KeyValue::new(k, v)))
        .build();
    exporter.set_resource(&resource);
    Ok(exporter)
}

// ---------------------------------------------------------------------------
// The plugin

/// `opentelemetry`: traces only (`logs_endpoint` is not supported).
pub(crate) struct OpenTelemetry {
    /// `None` without `traces_endpoint`: the plugin does nothing.
    spans: Option<mpsc::Sender<SpanData>>,
    propagation: Propagation,
    sampling_rate: f64,
    trace_id_header: Option<HeaderName>,
    registry: Arc<Registry>,
    scope: InstrumentationScope,
}

impl OpenTelemetry {
    pub(crate) fn new(config: &Value, _cx: &BuildContext<'_>) -> Result<Self, String> {
        let config: Config = typed(config)?;
        let propagation = Propagation::from_config(&config)?;
        let trace_id_header = config
            .http_response_header_for_traceid
            .as_deref()
            .map(|h| HeaderName::from_bytes(h.as_bytes()).map_err(|e| format!("{h}: {e}")))
            .transpose()?;
        if config.logs_endpoint.is_some() {
            tracing::warn!("opentelemetry: logs_endpoint is not supported; no logs are sent.");
        }
        let spans = match config.traces_endpoint.as_deref() {
            None => None,
            Some(endpoint) => {
                let handle = tokio::runtime::Handle::try_current()
                    .map_err(|_| "opentelemetry needs the proxy's runtime".to_owned())?;
                let exporter = exporter(&config, endpoint)?;
                let mut batch = config.queue.max_batch_size;
                let mut delay = config.queue.max_coalescing_delay;
                // Kong's legacy parameters win when set to something else
                // than their old defaults.
                if let Some(count) = config.batch_span_count.filter(|c| *c != 200.0) {
                    batch = count;
                }
                if let Some(flush) = config.batch_flush_delay.filter(|d| *d != 3.0) {
                    delay = flush;
                }
                let queue = QueueSettings {
                    batch: (batch.max(1.0) as usize).max(1),
                    delay: seconds(delay),
                    max_retry_time: seconds(config.queue.max_retry_time),
                    initial_retry_delay: seconds(config.queue.initial_retry_delay),
                    max_retry_delay: seconds(config.queue.max_retry_delay),
                };
                let capacity = (config.queue.max_entries.max(1.0) as usize).max(1);
                let (sender, receiver) = mpsc::channel(capacity);
                handle.spawn(send_spans(exporter, receiver, queue, endpoint.to_owned()));
                Some(sender)
            }
        };
        Ok(OpenTelemetry {
            spans,
            propagation,
            sampling_rate: config.sampling_rate.unwrap_or(DEFAULT_SAMPLING_RATE),
            trace_id_header,
            registry: Arc::new(Registry::new()),
            scope: scope(),
        })
    }

    /// Kong's `propagation.propagate` with the plugin's `get_inject_ctx`:
    /// the request's trace, with the key it can be found by.
    fn propagate(&self, headers: &mut HeaderMap) -> Trace {
        let found = self.propagation.extract.iter().find_map(|format| {
            extract(*format, headers)
                .filter(Extracted::found)
                .map(|c| (*format, c))
        });
        let (from, incoming) = match found {
            Some((format, ctx)) => (Some(format), ctx),
            None => (None, Extracted::default()),
        };
        let mut trace = Trace::fresh(self.sampling_rate);
        if let Some(trace_id) = incoming.trace_id {
            trace.trace_id = trace_id;
        }
        trace.remote_parent = incoming.span_id.or(incoming.parent_id);
        trace.sampled =
            incoming.sampled != Some(false) && sample(&trace.trace_id, self.sampling_rate);
        trace.trace_state = incoming.trace_state.clone();

        for name in &self.propagation.clear {
            headers.remove(name);
        }
        let out = Outgoing {
            trace_id: trace.trace_id,
            trace_id_size: incoming.trace_id.map_or(0, |_| incoming.trace_id_size),
            span_id: trace.upstream_span_id,
            parent_id: trace.root_span_id,
            sampled: trace.sampled,
            debug: incoming.debug,
        };
        let mut key = None;
        for inject in &self.propagation.inject {
            let format = match inject {
                Inject::Format(format) => *format,
                Inject::Preserve => match from.unwrap_or(self.propagation.default_format) {
                    Format::B3 if incoming.single_header => Format::B3Single,
                    format => format,
                },
            };
            for (name, value) in inject_headers(format, &out) {
                let Ok(value) = HeaderValue::from_str(&value) else {
                    continue;
                };
                if key.is_none() {
                    key = value.to_str().ok().map(Box::from);
                }
                headers.insert(HeaderName::from_static(name), value);
            }
        }
        trace.key = key;
        trace
    }

    /// The trace `access` (or `response`) made for the request of `entry`.
    fn find(&self, entry: &Value) -> Option<Arc<Trace>> {
        let request_headers = entry.pointer("/request/headers");
        let mut candidates = KEY_HEADERS
            .iter()
            .filter_map(|name| request_headers.and_then(|h| h.get(*name)))
            .collect::<Vec<_>>();
        if let Some(name) = &self.trace_id_header {
            if let Some(value) = entry
                .pointer("/response/headers")
                .and_then(|h| h.get(name.as_str()))
            {
                candidates.push(value);
            }
        }
        candidates.into_iter().find_map(|value| match value {
            Value::String(s) => self.registry.get(s),
            Value::Array(list) => list
                .iter()
                .filter_map(Value::as_str)
                .find_map(|s| self.registry.get(s)),
            _ => None,
        })
    }

    /// The spans of a finished request.
    fn spans(&self, trace: &Trace, entry: &Value) -> Vec<SpanData> {
        let text = |pointer: &str| entry.pointer(pointer).and_then(Value::as_str).unwrap_or("");
        let number = |pointer: &str| entry.pointer(pointer).and_then(Value::as_f64);
        let started_ms = number("/started_at").unwrap_or(0.0).max(0.0);
        let start = UNIX_EPOCH + Duration::from_millis(started_ms as u64);
        let end = SystemTime::now().max(start);
        let scheme = if text("/request/url").starts_with("https://") {
            "https"
        } else {
            "http"
        };
        let host_header = match entry.pointer("/request/headers/host") {
            Some(Value::String(s)) => s.as_str(),
            Some(Value::Array(list)) => list.first().and_then(Value::as_str).unwrap_or(""),
            _ => "",
        };
        let host = host_of(host_header);
        let client_ip = text("/client_ip").to_owned();
        let status = number("/response/status").unwrap_or(0.0) as i64;
        let route_path = entry
            .pointer("/route/paths/0")
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let trace_id = TraceId::from_bytes(trace.trace_id);
        let trace_state = trace
            .trace_state
            .as_deref()
            .and_then(|s| TraceState::from_str(s).ok())
            .unwrap_or_default();
        let context = |span_id: [u8; 8]| {
            SpanContext::new(
                trace_id,
                SpanId::from_bytes(span_id),
                TraceFlags::SAMPLED,
                false,
                trace_state.clone(),
            )
        };
        let span = |name: &'static str,
                    kind: SpanKind,
                    id: [u8; 8],
                    parent: SpanId,
                    start: SystemTime,
                    attributes: Vec<KeyValue>| SpanData {
            span_context: context(id),
            parent_span_id: parent,
            span_kind: kind,
            name: name.into(),
            start_time: start,
            end_time: end,
            attributes,
            dropped_attributes_count: 0,
            events: Default::default(),
            links: Default::default(),
            status: Status::Unset,
            instrumentation_scope: self.scope.clone(),
        };
        let root_attributes = vec![
            KeyValue::new("http.method", text("/request/method").to_owned()),
            KeyValue::new(
                "http.url",
                format!("{scheme}://{host}{}", text("/request/uri")),
            ),
            KeyValue::new("http.host", host.clone()),
            KeyValue::new("http.scheme", scheme),
            KeyValue::new("http.client_ip", client_ip.clone()),
            KeyValue::new("net.peer.ip", client_ip),
            KeyValue::new("http.status_code", status),
            KeyValue::new("http.route", route_path),
        ];
        let mut spans = vec![span(
            "kong",
            SpanKind::Server,
            trace.root_span_id,
            trace
                .remote_parent
                .map_or(SpanId::INVALID, SpanId::from_bytes),
            start,
            root_attributes,
        )];
        // Proxied: the upstream call, from when Kong sent it.
        if number("/latencies/proxy").is_some_and(|p| p >= 0.0) {
            let kong_ms = number("/latencies/kong").unwrap_or(0.0).max(0.0);
            let sent = (start + Duration::from_millis(kong_ms as u64)).min(end);
            // Lua numbers: Kong sends these as doubles.
            let mut attributes = vec![KeyValue::new("try_count", 1.0)];
            let service_host = text("/service/host");
            if let Ok(ip) = service_host
                .trim_matches(['[', ']'])
                .parse::<std::net::IpAddr>()
            {
                attributes.push(KeyValue::new("net.peer.ip", ip.to_string()));
                if let Some(port) = number("/service/port") {
                    attributes.push(KeyValue::new("net.peer.port", port));
                }
            } else if !service_host.is_empty() {
                attributes.push(KeyValue::new("net.peer.name", service_host.to_owned()));
            }
            spans.push(span(
                "kong.balancer",
                SpanKind::Client,
                trace.upstream_span_id,
                SpanId::from_bytes(trace.root_span_id),
                sent,
                attributes,
            ));
        }
        spans
    }
}

/// nginx's `$host`: the Host header without its port, lower-cased.
fn host_of(header: &str) -> String {
    let host = if let Some(rest) = header.strip_prefix('[') {
        rest.split_once(']')
            .map_or(header, |(inner, _)| &header[..inner.len() + 2])
    } else {
        header.rsplit_once(':').map_or(header, |(host, _)| host)
    };
    host.to_ascii_lowercase()
}

impl Plugin for OpenTelemetry {
    fn needs(&self) -> Needs {
        Needs {
            log: self.spans.is_some(),
            ..Needs::default()
        }
    }

    fn access(&self, req: &mut PluginRequest<'_>, ctx: &mut Ctx<'_>) -> Flow {
        if self.spans.is_none() {
            return Flow::Continue;
        }
        let trace = self.propagate(req.headers.map_mut());
        ctx.otel = Some(RequestTrace::new(trace, &self.registry));
        Flow::Continue
    }

    fn response(&self, ctx: &mut Ctx<'_>, _status: StatusCode, headers: &mut HeaderMap) {
        let Some(name) = &self.trace_id_header else {
            return;
        };
        if self.spans.is_none() {
            return;
        }
        let trace_id = match &ctx.otel {
            Some(request) => hex(&request.trace.trace_id),
            None => {
                // A plugin answered before ours ran: the trace starts here,
                // found again in `log` by this header.
                let mut trace = Trace::fresh(self.sampling_rate);
                let id = hex(&trace.trace_id);
                trace.key = Some(id.as_str().into());
                ctx.otel = Some(RequestTrace::new(trace, &self.registry));
                id
            }
        };
        if let Ok(value) = HeaderValue::from_str(&trace_id) {
            headers.append(name.clone(), value);
        }
    }

    fn log(&self, entry: &Value) {
        let Some(sender) = &self.spans else {
            return;
        };
        let trace = self
            .find(entry)
            .unwrap_or_else(|| Arc::new(Trace::fresh(self.sampling_rate)));
        if !trace.sampled {
            return;
        }
        for span in self.spans(&trace, entry) {
            if sender.try_send(span).is_err() {
                tracing::warn!("opentelemetry span queue is full; a span was dropped.");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        map
    }

    fn plugin(config: Value) -> OpenTelemetry {
        let config: Config = typed(&config).unwrap();
        OpenTelemetry {
            spans: None,
            propagation: Propagation::from_config(&config).unwrap(),
            sampling_rate: config.sampling_rate.unwrap_or(DEFAULT_SAMPLING_RATE),
            trace_id_header: None,
            registry: Arc::new(Registry::new()),
            scope: scope(),
        }
    }

    const TRACE: &str = "0af7651916cd43dd8448eb211c80319c";
    const PARENT: &str = "b7ad6b7169203331";

    #[test]
    fn w3c_is_extracted_and_injected_with_our_span_as_parent() {
        let p = plugin(json!({"sampling_rate": 1, "propagation": {"default_format": "w3c"}}));
        let mut h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("tracestate", "vendor=x"),
        ]);
        let trace = p.propagate(&mut h);
        let key = trace.key.clone();
        assert_eq!(hex(&trace.trace_id), TRACE);
        assert_eq!(
            trace.remote_parent.map(|p| hex(&p)).as_deref(),
            Some(PARENT)
        );
        assert!(trace.sampled);
        let traceparent = h.get("traceparent").unwrap().to_str().unwrap();
        assert_eq!(
            traceparent,
            format!("00-{TRACE}-{}-01", hex(&trace.upstream_span_id))
        );
        assert_eq!(key.as_deref(), Some(traceparent));
        assert_eq!(h.get("tracestate").unwrap(), "vendor=x");
        assert_eq!(trace.trace_state.as_deref(), Some("vendor=x"));
    }

    #[test]
    fn an_unsampled_caller_is_not_sampled_and_invalid_headers_start_a_trace() {
        let p = plugin(json!({"sampling_rate": 1}));
        let mut h = headers(&[("traceparent", &format!("00-{TRACE}-{PARENT}-00"))]);
        let trace = p.propagate(&mut h);
        assert!(!trace.sampled);
        assert!(h
            .get("traceparent")
            .unwrap()
            .to_str()
            .unwrap()
            .ends_with("-00"));

        for bad in [
            format!("01-{TRACE}-{PARENT}-01"),
            format!("00-{}-{PARENT}-01", "0".repeat(32)),
            format!("00-{TRACE}-{}-01", "0".repeat(16)),
            format!("00-{TRACE}-{PARENT}-1"),
            "garbage".to_owned(),
        ] {
            let mut h = headers(&[("traceparent", &bad)]);
            let trace = p.propagate(&mut h);
            assert_ne!(hex(&trace.trace_id), TRACE, "{bad}");
            assert_eq!(trace.remote_parent, None, "{bad}");
            assert!(trace.sampled);
        }
    }

    #[test]
    fn b3_is_preserved_and_a_lone_tracestate_does_not_hide_traceparent() {
        let p = plugin(json!({"sampling_rate": 1}));
        let mut h = headers(&[
            ("x-b3-traceid", "463ac35c9f6413ad"),
            ("x-b3-spanid", PARENT),
            ("x-b3-sampled", "1"),
        ]);
        let trace = p.propagate(&mut h);
        let key = trace.key.clone();
        assert_eq!(
            hex(&trace.trace_id),
            format!("{}463ac35c9f6413ad", "0".repeat(16))
        );
        // 64-bit trace ids keep their size.
        assert_eq!(h.get("x-b3-traceid").unwrap(), "463ac35c9f6413ad");
        assert_eq!(
            h.get("x-b3-spanid").unwrap().to_str().unwrap(),
            hex(&trace.upstream_span_id)
        );
        assert_eq!(
            h.get("x-b3-parentspanid").unwrap().to_str().unwrap(),
            hex(&trace.root_span_id)
        );
        assert_eq!(h.get("x-b3-sampled").unwrap(), "1");
        assert_eq!(key.as_deref(), Some(hex(&trace.upstream_span_id).as_str()));
        assert!(h.get("traceparent").is_none());

        let mut h = headers(&[("b3", &format!("{TRACE}-{PARENT}-d"))]);
        let trace = p.propagate(&mut h);
        assert_eq!(
            h.get("b3").unwrap().to_str().unwrap(),
            format!(
                "{TRACE}-{}-d-{}",
                hex(&trace.upstream_span_id),
                hex(&trace.root_span_id)
            )
        );

        let mut h = headers(&[
            ("traceparent", &format!("00-{TRACE}-{PARENT}-01")),
            ("tracestate", "vendor=x"),
        ]);
        let trace = p.propagate(&mut h);
        assert_eq!(hex(&trace.trace_id), TRACE);
        assert!(h.get("x-b3-traceid").is_none());
    }

    #[test]
    fn other_formats_round_trip() {
        for (format, incoming) in [
            (
                "jaeger",
                vec![("uber-trace-id", format!("{TRACE}:{PARENT}:0:1"))],
            ),
            (
                "ot",
                vec![
                    ("ot-tracer-traceid", TRACE.to_owned()),
                    ("ot-tracer-spanid", PARENT.to_owned()),
                    ("ot-tracer-sampled", "1".to_owned()),
                ],
            ),
            (
                "aws",
                vec![(
                    "x-amzn-trace-id",
                    format!(
                        "Root=1-{}-{};Parent={PARENT};Sampled=1",
                        &TRACE[..8],
                        &TRACE[8..]
                    ),
                )],
            ),
            (
                "gcp",
                vec![(
                    "x-cloud-trace-context",
                    format!("{TRACE}/{};o=1", u64::from_str_radix(PARENT, 16).unwrap()),
                )],
            ),
        ] {
            let p = plugin(json!({"sampling_rate": 1, "propagation": {
                "extract": [format], "inject": ["preserve"], "default_format": "w3c"}}));
            let pairs: Vec<(&str, &str)> = incoming.iter().map(|(n, v)| (*n, v.as_str())).collect();
            let mut h = headers(&pairs);
            let trace = p.propagate(&mut h);
            let key = trace.key.clone();
            assert_eq!(hex(&trace.trace_id), TRACE, "{format}");
            assert_eq!(
                trace.remote_parent.map(|p| hex(&p)).as_deref(),
                Some(PARENT),
                "{format}"
            );
            let key = key.expect(format);
            assert!(
                key.contains(&hex(&trace.upstream_span_id))
                    || key.contains(&to_dec(&trace.upstream_span_id)),
                "{format}: {key}"
            );
        }

        let p = plugin(json!({"sampling_rate": 1, "propagation": {
            "extract": ["datadog"], "inject": ["datadog", "w3c"], "default_format": "w3c"}}));
        let mut h = headers(&[
            ("x-datadog-trace-id", "1234"),
            ("x-datadog-parent-id", "5678"),
            ("x-datadog-sampling-priority", "1"),
        ]);
        let trace = p.propagate(&mut h);
        assert_eq!(to_dec(&trace.trace_id), "1234");
        assert_eq!(
            trace.remote_parent.map(|p| to_dec(&p)).as_deref(),
            Some("5678")
        );
        assert_eq!(h.get("x-datadog-trace-id").unwrap(), "1234");
        assert_eq!(
            h.get("traceparent").unwrap().to_str().unwrap(),
            format!(
                "00-{}{:016x}-{}-01",
                "0".repeat(16),
                1234,
                hex(&trace.upstream_span_id)
            )
        );
    }

    #[test]
    fn legacy_header_type_and_clear() {
        let config: Config = typed(&json!({"header_type": "ignore"})).unwrap();
        let prop = Propagation::from_config(&config).unwrap();
        assert!(prop.extract.is_empty());
        assert_eq!(prop.inject, vec![Inject::Format(Format::W3c)]);
        let config: Config = typed(&json!({"header_type": "jaeger"})).unwrap();
        let prop = Propagation::from_config(&config).unwrap();
        assert_eq!(
            prop.inject,
            vec![Inject::Preserve, Inject::Format(Format::Jaeger)]
        );

        let p = plugin(json!({"sampling_rate": 1, "propagation": {
            "extract": ["b3"], "clear": ["x-b3-traceid", "x-b3-spanid", "x-b3-sampled"],
            "inject": ["w3c"], "default_format": "w3c"}}));
        let mut h = headers(&[
            ("x-b3-traceid", TRACE),
            ("x-b3-spanid", PARENT),
            ("x-b3-sampled", "1"),
        ]);
        let trace = p.propagate(&mut h);
        assert_eq!(hex(&trace.trace_id), TRACE);
        assert!(h.get("x-b3-traceid").is_none());
        assert!(h.get("traceparent").is_some());
    }

    #[test]
    fn sampler_reads_the_trace_id_as_kong_does() {
        let mut id = [0u8; 16];
        assert!(sample(&id, 0.5));
        id[7] = 0xff;
        assert!(!sample(&id, 0.5));
        assert!(sample(&id, 1.0));
        assert!(!sample(&[0; 16], 0.0));
    }

    #[test]
    fn spans_follow_kongs_names_and_attributes() {
        let p = plugin(json!({"sampling_rate": 1}));
        let mut h = headers(&[("traceparent", &format!("00-{TRACE}-{PARENT}-01"))]);
        let trace = p.propagate(&mut h);
        let key = trace.key.clone().unwrap().to_string();
        let handle = RequestTrace::new(trace, &p.registry);
        let trace = Arc::clone(&handle.trace);
        let entry = json!({
            "request": {"method": "GET", "uri": "/a?b=1", "url": "http://example.com:8000/a?b=1",
                        "headers": {"host": "Example.com:8000", "traceparent": key}},
            "response": {"status": 201, "headers": {}},
            "latencies": {"kong": 2, "proxy": 5, "request": 8},
            "route": {"paths": ["/a", "/b"]},
            "service": {"host": "127.0.0.1", "port": 9000},
            "client_ip": "10.0.0.1",
            "started_at": 1_700_000_000_000u64,
        });
        let found = p.find(&entry).expect("trace found by its traceparent");
        assert!(Arc::ptr_eq(&found, &trace));
        let spans = p.spans(&found, &entry);
        assert_eq!(spans.len(), 2);
        let root = &spans[0];
        assert_eq!(root.name, "kong");
        assert_eq!(root.span_kind, SpanKind::Server);
        assert_eq!(root.parent_span_id, SpanId::from_hex(PARENT).unwrap());
        assert_eq!(
            root.span_context.trace_id(),
            TraceId::from_hex(TRACE).unwrap()
        );
        let attr = |span: &SpanData, key: &str| {
            span.attributes
                .iter()
                .find(|kv| kv.key.as_str() == key)
                .map(|kv| kv.value.clone())
        };
        assert_eq!(attr(root, "http.status_code"), Some(201i64.into()));
        assert_eq!(
            attr(root, "http.url"),
            Some("http://example.com/a?b=1".into())
        );
        assert_eq!(attr(root, "http.host"), Some("example.com".into()));
        assert_eq!(attr(root, "http.route"), Some("/a".into()));
        assert_eq!(attr(root, "net.peer.ip"), Some("10.0.0.1".into()));
        let balancer = &spans[1];
        assert_eq!(balancer.name, "kong.balancer");
        assert_eq!(balancer.span_kind, SpanKind::Client);
        assert_eq!(balancer.parent_span_id, root.span_context.span_id());
        assert_eq!(
            balancer.span_context.span_id(),
            SpanId::from_bytes(trace.upstream_span_id)
        );
        assert_eq!(
            balancer.start_time,
            UNIX_EPOCH + Duration::from_millis(1_700_000_000_002)
        );
        assert_eq!(attr(balancer, "net.peer.ip"), Some("127.0.0.1".into()));

        drop(handle);
        assert!(
            p.find(&entry).is_none(),
            "a finished request forgets its trace"
        );

        let unproxied = json!({"latencies": {"kong": 1, "proxy": -1}, "response": {"status": 401}});
        assert_eq!(p.spans(&trace, &unproxied).len(), 1);
    }

    #[test]
    fn host_of_strips_the_port() {
        assert_eq!(host_of("Example.COM:8000"), "example.com");
        assert_eq!(host_of("[::1]:8000"), "[::1]");
        assert_eq!(host_of("[::1]"), "[::1]");
        assert_eq!(host_of("h"), "h");
    }
}
