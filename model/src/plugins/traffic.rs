//! Traffic control plugins: rate limiting, CORS, termination, restrictions,
//! caching and redirects.

use serde_json::{json, Map, Value};

use super::{
    check_periods_order, config, header_name, is_pcre_regex, is_present, nested, no_consumer,
    redis_record, required_if_eq, url, PERIODS, SHARED_DICTS,
};
use crate::entities::typedefs as t;
use crate::schema::{EntityCheck, Field, Record};

fn flag(default: bool) -> Field {
    Field::boolean().required().default(json!(default))
}

fn wrap(key: &str, inner_key: &str, v: &Value) -> Option<Map<String, Value>> {
    let mut inner = Map::new();
    inner.insert(inner_key.to_owned(), v.clone());
    let mut m = Map::new();
    m.insert(key.to_owned(), Value::Object(inner));
    Some(m)
}

/// The deprecated flat `redis_*` options, moved into the `redis` record.
fn with_redis_shorthands(r: Record) -> Record {
    r.shorthand("redis_host", Field::string(), |v| wrap("redis", "host", v))
        .shorthand("redis_port", Field::integer(), |v| wrap("redis", "port", v))
        .shorthand("redis_password", Field::string().len_min(0), |v| {
            wrap("redis", "password", v)
        })
        .shorthand("redis_username", Field::string(), |v| {
            wrap("redis", "username", v)
        })
        .shorthand("redis_ssl", Field::boolean(), |v| wrap("redis", "ssl", v))
        .shorthand("redis_ssl_verify", Field::boolean(), |v| {
            wrap("redis", "ssl_verify", v)
        })
        .shorthand("redis_server_name", Field::string(), |v| {
            wrap("redis", "server_name", v)
        })
        .shorthand("redis_timeout", Field::integer(), |v| {
            wrap("redis", "timeout", v)
        })
        .shorthand("redis_database", Field::integer(), |v| {
            wrap("redis", "database", v)
        })
}

/// The redis policy needs a host, a port and a timeout.
fn redis_policy_checks(r: Record) -> Record {
    r.check(required_if_eq(
        "config.policy",
        json!("redis"),
        "config.redis.host",
    ))
    .check(required_if_eq(
        "config.policy",
        json!("redis"),
        "config.redis.port",
    ))
    .check(required_if_eq(
        "config.policy",
        json!("redis"),
        "config.redis.timeout",
    ))
}

/// The policies of a database-backed Kong (DB-less nodes and hybrid
/// control planes drop `cluster`).
const POLICIES: [&str; 3] = ["local", "cluster", "redis"];

fn validate_rate_limiting(v: &Value) -> Result<(), String> {
    let Some(cfg) = v.as_object() else {
        return Ok(());
    };
    check_periods_order(cfg, true)?;
    let redis = cfg.get("policy").and_then(Value::as_str) == Some("redis");
    let sync_rate = cfg.get("sync_rate").and_then(Value::as_f64);
    if !redis && sync_rate != Some(-1.0) {
        return Err("sync_rate can only be used with the redis policy".into());
    }
    if redis {
        if let Some(rate) = sync_rate {
            if rate != -1.0 && rate < 0.02 {
                return Err("sync_rate must be greater than 0.02, or -1 to disable".into());
            }
        }
    }
    Ok(())
}

pub(super) fn rate_limiting() -> Record {
    let period = || Field::number().gt(0.0);
    let cfg = Record::new()
        .field("second", period())
        .field("minute", period())
        .field("hour", period())
        .field("day", period())
        .field("month", period())
        .field("year", period())
        .field(
            "limit_by",
            Field::string().default(json!("consumer")).one_of([
                "consumer",
                "credential",
                "ip",
                "service",
                "header",
                "path",
            ]),
        )
        .field("header_name", header_name())
        .field("path", t::path())
        .field(
            "policy",
            Field::string()
                .default(json!("local"))
                .len_min(0)
                .one_of(POLICIES),
        )
        .field("fault_tolerant", flag(true))
        .field("redis", nested(redis_record()))
        .field("hide_client_headers", flag(false))
        .field("error_code", Field::number().default(json!(429)).gt(0.0))
        .field(
            "error_message",
            Field::string().default(json!("API rate limit exceeded")),
        )
        .field("sync_rate", Field::number().required().default(json!(-1)));
    let r = Record::new()
        .field("protocols", t::protocols_http())
        .field(
            "config",
            config(with_redis_shorthands(cfg)).custom(validate_rate_limiting),
        )
        .check(EntityCheck::AtLeastOneOf(vec![
            "config.second",
            "config.minute",
            "config.hour",
            "config.day",
            "config.month",
            "config.year",
        ]));
    redis_policy_checks(r)
        .check(required_if_eq(
            "config.limit_by",
            json!("header"),
            "config.header_name",
        ))
        .check(required_if_eq(
            "config.limit_by",
            json!("path"),
            "config.path",
        ))
}

fn validate_limit(v: &Value) -> Result<(), String> {
    match v.as_object() {
        Some(limits) => check_periods_order(limits, false),
        None => Ok(()),
    }
}

pub(super) fn response_ratelimiting() -> Record {
    let period = || Field::number().gt(0.0);
    let limit = Record::new()
        .field("second", period())
        .field("minute", period())
        .field("hour", period())
        .field("day", period())
        .field("month", period())
        .field("year", period())
        .check(EntityCheck::AtLeastOneOf(PERIODS.to_vec()));
    let cfg = Record::new()
        .field(
            "header_name",
            Field::string().default(json!("x-kong-limit")),
        )
        .field(
            "limit_by",
            Field::string()
                .default(json!("consumer"))
                .one_of(["consumer", "credential", "ip"]),
        )
        .field(
            "policy",
            Field::string().default(json!("local")).one_of(POLICIES),
        )
        .field("fault_tolerant", flag(true))
        .field("redis", nested(redis_record()))
        .field("block_on_first_violation", flag(false))
        .field("hide_client_headers", flag(false))
        .field(
            "limits",
            Field::map(
                Field::string(),
                Field::record(limit).required().custom(validate_limit),
            )
            .required()
            .len_min(1),
        );
    redis_policy_checks(
        Record::new()
            .field("protocols", t::protocols_http())
            .field("config", config(with_redis_shorthands(cfg))),
    )
}

const CORS_METHODS: [&str; 9] = [
    "GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE", "CONNECT",
];

fn validate_asterisk_or_regex(v: &Value) -> Result<(), String> {
    let s = v.as_str().unwrap_or("");
    if s == "*" || is_pcre_regex(s) {
        Ok(())
    } else {
        Err(format!("'{s}' is not a valid regex"))
    }
}

pub(super) fn cors() -> Record {
    Record::new()
        .field("consumer", no_consumer())
        .field("protocols", t::protocols_http())
        .field(
            "config",
            config(
                Record::new()
                    .field(
                        "origins",
                        Field::array(Field::string().custom(validate_asterisk_or_regex)),
                    )
                    .field("headers", Field::array(Field::string()))
                    .field("exposed_headers", Field::array(Field::string()))
                    .field(
                        "methods",
                        Field::array(Field::string().one_of(CORS_METHODS))
                            .default(json!(CORS_METHODS)),
                    )
                    .field("max_age", Field::number())
                    .field("credentials", flag(false))
                    .field("private_network", flag(false))
                    .field("preflight_continue", flag(false))
                    .field("allow_origin_absent", flag(true)),
            ),
        )
}

fn validate_request_termination(v: &Value) -> Result<(), String> {
    let message = is_present(v.get("message"));
    let content_type = is_present(v.get("content_type"));
    let body = is_present(v.get("body"));
    let echo = !matches!(
        v.get("echo"),
        None | Some(Value::Null) | Some(Value::Bool(false))
    );
    if message && (content_type || body) {
        return Err("message cannot be used with content_type or body".into());
    }
    if content_type && !body {
        return Err("content_type requires a body".into());
    }
    if echo && (content_type || body) {
        return Err("echo cannot be used with content_type and body".into());
    }
    Ok(())
}

pub(super) fn request_termination() -> Record {
    let cfg = Record::new()
        .field(
            "status_code",
            Field::integer()
                .required()
                .default(json!(503))
                .between(100.0, 599.0),
        )
        .field("message", Field::string())
        .field("content_type", Field::string())
        .field("body", Field::string())
        .field("echo", flag(false))
        .field("trigger", header_name());
    Record::new()
        .field("protocols", t::protocols_http())
        .field("config", config(cfg).custom(validate_request_termination))
}

pub(super) fn ip_restriction() -> Record {
    Record::new()
        .field(
            "protocols",
            t::protocols().default(json!(["http", "https", "tcp", "tls", "grpc", "grpcs"])),
        )
        .field(
            "config",
            config(
                Record::new()
                    .field("allow", Field::array(t::ip_or_cidr()))
                    .field("deny", Field::array(t::ip_or_cidr()))
                    .field("status", Field::number())
                    .field("message", Field::string()),
            ),
        )
        .check(EntityCheck::AtLeastOneOf(vec![
            "config.allow",
            "config.deny",
        ]))
}

pub(super) fn request_size_limiting() -> Record {
    Record::new().field("protocols", t::protocols_http()).field(
        "config",
        config(
            Record::new()
                .field("allowed_payload_size", Field::integer().default(json!(128)))
                .field(
                    "size_unit",
                    Field::string()
                        .required()
                        .default(json!("megabytes"))
                        .one_of(["megabytes", "kilobytes", "bytes"]),
                )
                .field("require_content_length", flag(false)),
        ),
    )
}

pub(super) fn bot_detection() -> Record {
    Record::new()
        .field("consumer", no_consumer())
        .field("protocols", t::protocols_http())
        .field(
            "config",
            config(
                Record::new()
                    .field(
                        "allow",
                        Field::array(Field::string().is_regex()).default(json!([])),
                    )
                    .field(
                        "deny",
                        Field::array(Field::string().is_regex()).default(json!([])),
                    ),
            ),
        )
}

fn check_proxy_cache(entity: &Map<String, Value>) -> Result<(), String> {
    let Some(cfg) = entity.get("config") else {
        return Ok(());
    };
    if cfg.get("strategy").and_then(Value::as_str) != Some("memory") {
        return Ok(());
    }
    let name = cfg
        .get("memory")
        .and_then(|m| m.get("dictionary_name"))
        .and_then(Value::as_str)
        .unwrap_or("");
    if SHARED_DICTS.contains(&name) {
        Ok(())
    } else {
        Err(format!("missing shared dict '{name}'"))
    }
}

pub(super) fn proxy_cache() -> Record {
    let cfg = Record::new()
        .field(
            "response_code",
            Field::array(Field::integer().between(100.0, 900.0))
                .default(json!([200, 301, 404]))
                .len_min(1)
                .required(),
        )
        .field(
            "request_method",
            Field::array(Field::string().one_of(["HEAD", "GET", "POST", "PATCH", "PUT"]))
                .default(json!(["GET", "HEAD"]))
                .required(),
        )
        .field(
            "content_type",
            Field::array(Field::string())
                .default(json!(["text/plain", "application/json"]))
                .required(),
        )
        .field("cache_ttl", Field::integer().default(json!(300)).gt(0.0))
        .field("strategy", Field::string().one_of(["memory"]).required())
        .field("cache_control", flag(false))
        .field("ignore_uri_case", Field::boolean().default(json!(false)))
        .field("storage_ttl", Field::integer())
        .field(
            "memory",
            nested(Record::new().field(
                "dictionary_name",
                Field::string().required().default(json!("kong_db_cache")),
            )),
        )
        .field("vary_query_params", Field::array(Field::string()))
        .field("vary_headers", Field::array(Field::string()))
        .field(
            "response_headers",
            nested(
                Record::new()
                    .field("age", Field::boolean().default(json!(true)))
                    .field("X-Cache-Status", Field::boolean().default(json!(true)))
                    .field("X-Cache-Key", Field::boolean().default(json!(true))),
            ),
        );
    Record::new()
        .field("protocols", t::protocols())
        .field("config", config(cfg))
        .check(EntityCheck::Custom {
            field_sources: vec!["config"],
            run_with_missing_fields: false,
            check: check_proxy_cache,
        })
}

pub(super) fn redirect() -> Record {
    Record::new().field("protocols", t::protocols_http()).field(
        "config",
        config(
            Record::new()
                .field(
                    "status_code",
                    Field::integer()
                        .required()
                        .default(json!(301))
                        .between(100.0, 599.0),
                )
                .field("location", url().required())
                .field("keep_incoming_path", Field::boolean().default(json!(false))),
        ),
    )
}
