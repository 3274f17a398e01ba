//! Plugin configuration schemas: the subschemas of the `plugins` entity,
//! one per bundled Kong 3.x plugin, with Kong's field names, order, types,
//! defaults, validators and entity checks, and each handler's priority.
//!
//! A plugin subschema overrides some top-level plugin fields (`consumer`,
//! `service`, `route`, `protocols`) and always defines `config`, a required
//! record. As Kong does for entity subschemas, records nested in `config`
//! are required unless the plugin explicitly says otherwise, so inserting a
//! plugin without configuration expands every nested default.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use serde_json::{json, Value};

use crate::entities::{parse_url, typedefs as t};
use crate::schema::{matcher, EntityCheck, Field, Record};

mod acme;
mod auth;
mod logging;
pub mod scope;
mod traffic;
mod transform;

#[cfg(test)]
mod tests;

/// Builds a plugin's subschema.
type Builder = fn() -> Record;

/// Every bundled plugin: name, handler priority and schema builder.
const PLUGINS: &[(&str, i32, Builder)] = &[
    ("acl", 950, auth::acl),
    ("acme", 1705, acme::acme),
    ("basic-auth", 1100, auth::basic_auth),
    ("bot-detection", 2500, traffic::bot_detection),
    ("correlation-id", 100001, transform::correlation_id),
    ("cors", 2000, traffic::cors),
    ("datadog", 10, logging::datadog),
    ("file-log", 9, logging::file_log),
    ("grpc-gateway", 998, transform::grpc_gateway),
    ("grpc-web", 3, transform::grpc_web),
    ("hmac-auth", 1030, auth::hmac_auth),
    ("http-log", 12, logging::http_log),
    ("ip-restriction", 990, traffic::ip_restriction),
    ("jwt", 1450, auth::jwt),
    ("key-auth", 1250, auth::key_auth),
    ("oauth2", 1400, auth::oauth2),
    ("opentelemetry", 14, logging::opentelemetry),
    ("post-function", -1000, transform::post_function),
    ("pre-function", 1000000, transform::pre_function),
    ("prometheus", 13, logging::prometheus),
    ("proxy-cache", 100, traffic::proxy_cache),
    ("rate-limiting", 910, traffic::rate_limiting),
    ("redirect", 779, traffic::redirect),
    ("request-size-limiting", 951, traffic::request_size_limiting),
    ("request-termination", 2, traffic::request_termination),
    ("request-transformer", 801, transform::request_transformer),
    ("response-ratelimiting", 900, traffic::response_ratelimiting),
    ("response-transformer", 800, transform::response_transformer),
    ("session", 1900, auth::session),
    ("statsd", 11, logging::statsd),
    ("syslog", 4, logging::syslog),
    ("tcp-log", 7, logging::tcp_log),
    ("udp-log", 8, logging::udp_log),
    ("zipkin", 100000, logging::zipkin),
];

static REGISTRY: LazyLock<BTreeMap<&'static str, (i32, Arc<Record>)>> = LazyLock::new(|| {
    PLUGINS
        .iter()
        .map(|(name, priority, build)| (*name, (*priority, Arc::new(build()))))
        .collect()
});

/// The plugin's subschema: a Record with the plugin-level field overrides
/// (`consumer`, `route`, `service`, `protocols` when the Kong schema overrides them) and the
/// `config` field (a required record with the plugin's fields and defaults),
/// plus the plugin schema's top-level entity_checks.
pub fn subschema(name: &str) -> Option<Arc<Record>> {
    REGISTRY.get(name).map(|(_, r)| Arc::clone(r))
}

/// Names of all plugins we have schemas for, sorted alphabetically.
pub fn names() -> Vec<&'static str> {
    REGISTRY.keys().copied().collect()
}

/// Kong's PRIORITY of the plugin handler (used later for execution order), e.g. key-auth 1250.
pub fn priority(name: &str) -> Option<i32> {
    REGISTRY.get(name).map(|(p, _)| *p)
}

// ---------------------------------------------------------------------------
// Shared building blocks (plugin-specific typedefs).

/// The `config` field of a plugin subschema.
fn config(record: Record) -> Field {
    Field::record(record).required()
}

/// A record nested inside `config`: Kong makes records of entity subschemas
/// required unless they say `required = false`, so their defaults expand.
fn nested(record: Record) -> Field {
    Field::record(record).required()
}

/// Kong's `typedefs.no_consumer`.
fn no_consumer() -> Field {
    Field::foreign("consumers").eq(Value::Null)
}

/// Kong's `typedefs.no_service`.
fn no_service() -> Field {
    Field::foreign("services").eq(Value::Null)
}

/// Kong's `typedefs.no_route`.
fn no_route() -> Field {
    Field::foreign("routes").eq(Value::Null)
}

/// `conditional`: when `if_field` equals `value`, `then_field` is required.
fn required_if_eq(if_field: &'static str, value: Value, then_field: &'static str) -> EntityCheck {
    EntityCheck::conditional(
        if_field,
        matcher().eq(value),
        then_field,
        matcher().required(),
    )
}

/// Kong's `kong.tools.http.validate_header_name` on a plain string.
fn check_header_name(name: &str) -> Result<(), String> {
    t::validate_header_name(&Value::String(name.to_owned()))
}

fn header_name() -> Field {
    t::header_name()
}

/// Kong's `validate_url` (`typedefs.url`): LuaSocket never fails to parse,
/// but the URL needs a host and a scheme.
fn validate_url(v: &Value) -> Result<(), String> {
    let parsed = parse_url(v.as_str().unwrap_or(""));
    if parsed.host.is_none() {
        return Err("missing host in url".into());
    }
    if parsed.scheme.is_none() {
        return Err("missing scheme in url".into());
    }
    Ok(())
}

/// Kong's `typedefs.url`.
fn url() -> Field {
    Field::string().custom(validate_url)
}

/// Whether a URL carries user info (`user:pass@` before the host), as
/// LuaSocket's `url.parse` reports it.
fn url_has_userinfo(url: &str) -> bool {
    let rest = url.split_once('#').map_or(url, |(before, _)| before);
    let rest = match rest.find(':') {
        Some(colon)
            if rest[..colon]
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric())
                && rest[..colon]
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.')) =>
        {
            &rest[colon + 1..]
        }
        _ => rest,
    };
    let Some(after) = rest.strip_prefix("//") else {
        return false;
    };
    let authority = &after[..after.find('/').unwrap_or(after.len())];
    let authority = authority.split_once('?').map_or(authority, |(a, _)| a);
    authority.contains('@')
}

/// Kong's `typedefs.lua_code`. The values are Lua chunks that Kong compiles
/// in its sandbox; we cannot compile Lua, so any non-empty string passes.
fn lua_code() -> Field {
    Field::map(Field::string().len_min(1), Field::string().len_min(1))
}

/// Kong's `typedefs.ttl`.
fn ttl() -> Field {
    Field::number().between(0.0, 1e8)
}

/// Kong's `kong.tools.queue_schema` (`typedefs.queue`).
fn queue_record() -> Record {
    Record::new()
        .field(
            "max_batch_size",
            Field::integer().default(json!(1)).between(1.0, 1_000_000.0),
        )
        .field(
            "max_coalescing_delay",
            Field::number().default(json!(1)).between(0.0, 3600.0),
        )
        .field(
            "max_entries",
            Field::integer()
                .default(json!(10000))
                .between(1.0, 1_000_000.0),
        )
        .field("max_bytes", Field::integer())
        .field("max_retry_time", Field::number().default(json!(60)))
        .field(
            "initial_retry_delay",
            Field::number()
                .default(json!(0.01))
                .between(0.001, 1_000_000.0),
        )
        .field(
            "max_retry_delay",
            Field::number()
                .default(json!(60))
                .between(0.001, 1_000_000.0),
        )
        .field(
            "concurrency_limit",
            Field::integer().default(json!(1)).one_of([-1, 1]),
        )
}

fn queue() -> Field {
    nested(queue_record())
}

/// The fields of Kong's shared redis configuration
/// (`kong.tools.redis.schema`).
fn redis_record() -> Record {
    Record::new()
        .field("host", t::host())
        .field("port", t::port().default(json!(6379)))
        .field("timeout", t::timeout().default(json!(2000)))
        .field("username", Field::string().referenceable())
        .field(
            "password",
            Field::string().encrypted().referenceable().len_min(0),
        )
        .field("database", Field::integer().default(json!(0)))
        .field("ssl", Field::boolean().default(json!(false)))
        .field("ssl_verify", Field::boolean().default(json!(false)))
        .field("server_name", t::sni())
}

/// The tracing header formats (`kong.observability.tracing.propagation`).
const TRACING_FORMATS: [&str; 9] = [
    "w3c",
    "b3",
    "b3-single",
    "jaeger",
    "ot",
    "datadog",
    "aws",
    "gcp",
    "instana",
];

/// Kong's `typedefs.propagation`, with the plugin's default format.
fn propagation(default_format: &str) -> Field {
    let extractors: Vec<&str> = TRACING_FORMATS
        .iter()
        .copied()
        .filter(|f| *f != "b3-single")
        .collect();
    let injectors: Vec<&str> = std::iter::once("preserve")
        .chain(TRACING_FORMATS.iter().copied())
        .collect();
    nested(
        Record::new()
            .field("extract", Field::array(Field::string().one_of(extractors)))
            .field("clear", Field::array(header_name()))
            .field("inject", Field::array(Field::string().one_of(injectors)))
            .field(
                "default_format",
                Field::string().one_of(TRACING_FORMATS).required(),
            ),
    )
    .default(json!({ "default_format": default_format }))
}

/// Kong's `is_regex` validator runs PCRE; we compile with the `regex` crate
/// and give the benefit of the doubt to PCRE-only constructs that it
/// does not support (look-around, back-references, atomic groups).
fn is_pcre_regex(s: &str) -> bool {
    if regex::Regex::new(s).is_ok() {
        return true;
    }
    const PCRE_ONLY: [&str; 7] = ["(?=", "(?!", "(?<=", "(?<!", "(?>", "\\g", "\\k"];
    let backreference = s
        .as_bytes()
        .windows(2)
        .any(|w| w[0] == b'\\' && (b'1'..=b'9').contains(&w[1]));
    backreference || PCRE_ONLY.iter().any(|p| s.contains(p))
}

/// The shared dictionaries of Kong's default nginx configuration. Kong
/// checks some names against `ngx.shared` (proxy-cache's memory dictionary,
/// acme's shm storage); we check them against this list.
const SHARED_DICTS: [&str; 12] = [
    "kong",
    "kong_locks",
    "kong_healthchecks",
    "kong_cluster_events",
    "kong_rate_limiting_counters",
    "kong_core_db_cache",
    "kong_core_db_cache_miss",
    "kong_db_cache",
    "kong_db_cache_miss",
    "kong_secrets",
    "kong_dns_cache",
    "prometheus_metrics",
];

/// Lua's `%.1f`.
fn fmt_1f(v: f64) -> String {
    format!("{v:.1}")
}

/// The six rate-limiting periods, shortest first.
const PERIODS: [&str; 6] = ["second", "minute", "hour", "day", "month", "year"];

/// Longer periods may not have lower limits than shorter ones. `capital`
/// selects the rate-limiting ("The limit") or response-ratelimiting ("the
/// limit") wording.
fn check_periods_order(
    limits: &serde_json::Map<String, Value>,
    capital: bool,
) -> Result<(), String> {
    for (i, lower) in PERIODS.iter().enumerate() {
        let Some(v1) = limits.get(*lower).and_then(Value::as_f64) else {
            continue;
        };
        for upper in &PERIODS[i + 1..] {
            if let Some(v2) = limits.get(*upper).and_then(Value::as_f64) {
                if v2 < v1 {
                    let the = if capital { "The" } else { "the" };
                    return Err(format!(
                        "{the} limit for {upper}({}) cannot be lower than the limit for {lower}({})",
                        fmt_1f(v2),
                        fmt_1f(v1)
                    ));
                }
            }
        }
    }
    Ok(())
}

/// A string is "present" in Kong's request-termination sense.
fn is_present(v: Option<&Value>) -> bool {
    matches!(v, Some(Value::String(s)) if !s.is_empty())
}
