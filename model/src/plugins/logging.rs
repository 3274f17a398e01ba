//! Logging, metrics and tracing plugins.

use serde_json::{json, Map, Value};

use super::{
    config, header_name, lua_code, nested, propagation, queue, queue_record, url, url_has_userinfo,
};
use crate::entities::typedefs as t;
use crate::schema::{matcher, EntityCheck, Field, Record};

/// The head shared by logging plugins that accept every protocol.
fn any_protocol(cfg: Field) -> Record {
    Record::new()
        .field("protocols", t::protocols())
        .field("config", cfg)
}

pub(super) fn file_log() -> Record {
    any_protocol(config(
        Record::new()
            .field(
                "path",
                Field::string()
                    .required()
                    .matches(
                        r"^[^%s*&%%\`][^*&%%\`]*[^%s*&%%\`]$",
                        "^[^ \\t\\n\\x0B\\x0C\\r*&%\\\\`][^*&%\\\\`]*[^ \\t\\n\\x0B\\x0C\\r*&%\\\\`]$",
                    )
                    .err("not a valid filename"),
            )
            .field(
                "reopen",
                Field::boolean().required().default(json!(false)),
            )
            .field("custom_fields_by_lua", lua_code()),
    ))
}

/// An Authorization header and user info in the endpoint would both set
/// the credentials.
fn validate_http_log(v: &Value) -> Result<(), String> {
    let endpoint = v.get("http_endpoint").and_then(Value::as_str).unwrap_or("");
    if !url_has_userinfo(endpoint) {
        return Ok(());
    }
    if let Some(Value::Object(headers)) = v.get("headers") {
        if headers
            .keys()
            .any(|k| k.eq_ignore_ascii_case("authorization"))
        {
            return Err(
                "specifying both an 'Authorization' header and user info in 'http_endpoint' is not allowed"
                    .into(),
            );
        }
    }
    Ok(())
}

pub(super) fn http_log() -> Record {
    let header_key = header_name()
        .match_none(
            "^[Hh][Oo][Ss][Tt]$",
            "^[Hh][Oo][Ss][Tt]$",
            "cannot contain 'Host' header",
        )
        .match_none(
            // Kong's pattern has `[nn]` where `[Nn]` was meant.
            "^[Cc][Oo][Nn][Tt][Ee][Nn][Tt]%-[Ll][Ee][nn][Gg][Tt][Hh]$",
            "^[Cc][Oo][Nn][Tt][Ee][Nn][Tt]-[Ll][Ee][n][Gg][Tt][Hh]$",
            "cannot contain 'Content-Length' header",
        )
        .match_none(
            "^[Cc][Oo][Nn][Tt][Ee][Nn][Tt]%-[Tt][Yy][Pp][Ee]$",
            "^[Cc][Oo][Nn][Tt][Ee][Nn][Tt]-[Tt][Yy][Pp][Ee]$",
            "cannot contain 'Content-Type' header",
        );
    let cfg = Record::new()
        .field(
            "http_endpoint",
            url().required().encrypted().referenceable(),
        )
        .field(
            "method",
            Field::string()
                .default(json!("POST"))
                .one_of(["POST", "PUT", "PATCH"]),
        )
        .field(
            "content_type",
            Field::string()
                .default(json!("application/json"))
                .one_of(["application/json", "application/json; charset=utf-8"]),
        )
        .field("timeout", Field::number().default(json!(10000)))
        .field("keepalive", Field::number().default(json!(60000)))
        .field("retry_count", Field::integer())
        .field("queue_size", Field::integer())
        .field("flush_timeout", Field::number())
        .field(
            "headers",
            Field::map(header_key, Field::string().referenceable()),
        )
        .field("queue", queue())
        .field("custom_fields_by_lua", lua_code());
    any_protocol(config(cfg).custom(validate_http_log))
}

pub(super) fn tcp_log() -> Record {
    any_protocol(config(
        Record::new()
            .field("host", t::host().required())
            .field("port", t::port().required())
            .field("timeout", Field::number().default(json!(10000)))
            .field("keepalive", Field::number().default(json!(60000)))
            .field("tls", Field::boolean().required().default(json!(false)))
            .field("tls_sni", Field::string())
            .field("custom_fields_by_lua", lua_code()),
    ))
}

pub(super) fn udp_log() -> Record {
    any_protocol(config(
        Record::new()
            .field("host", t::host().required())
            .field("port", t::port().required())
            .field("timeout", Field::number().default(json!(10000)))
            .field("custom_fields_by_lua", lua_code()),
    ))
}

pub(super) fn syslog() -> Record {
    let severity = || {
        Field::string().default(json!("info")).required().one_of([
            "debug", "info", "notice", "warning", "err", "crit", "alert", "emerg",
        ])
    };
    let facility = Field::string().default(json!("user")).required().one_of([
        "auth", "authpriv", "cron", "daemon", "ftp", "kern", "lpr", "mail", "news", "syslog",
        "user", "uucp", "local0", "local1", "local2", "local3", "local4", "local5", "local6",
        "local7",
    ]);
    any_protocol(config(
        Record::new()
            .field("log_level", severity())
            .field("successful_severity", severity())
            .field("client_errors_severity", severity())
            .field("server_errors_severity", severity())
            .field("custom_fields_by_lua", lua_code())
            .field("facility", facility),
    ))
}

/// Counters and gauges are sampled, so they need a sample rate.
fn sample_rate_check() -> EntityCheck {
    EntityCheck::conditional(
        "stat_type",
        matcher().one_of(["counter", "gauge"]),
        "sample_rate",
        matcher().required(),
    )
}

pub(super) fn statsd() -> Record {
    const CONSUMER_IDENTIFIERS: [&str; 3] = ["consumer_id", "custom_id", "username"];
    const SERVICE_IDENTIFIERS: [&str; 4] = [
        "service_id",
        "service_name",
        "service_host",
        "service_name_or_host",
    ];
    const WORKSPACE_IDENTIFIERS: [&str; 2] = ["workspace_id", "workspace_name"];
    let metric = Record::new()
        .field(
            "name",
            Field::string().required().one_of([
                "kong_latency",
                "latency",
                "request_count",
                "request_per_user",
                "request_size",
                "response_size",
                "status_count",
                "status_count_per_user",
                "unique_users",
                "upstream_latency",
                "status_count_per_workspace",
                "status_count_per_user_per_route",
                "shdict_usage",
            ]),
        )
        .field(
            "stat_type",
            Field::string().required().one_of([
                "counter",
                "gauge",
                "histogram",
                "meter",
                "set",
                "timer",
            ]),
        )
        .field("sample_rate", Field::number().gt(0.0))
        .field(
            "consumer_identifier",
            Field::string().one_of(CONSUMER_IDENTIFIERS),
        )
        .field(
            "service_identifier",
            Field::string().one_of(SERVICE_IDENTIFIERS),
        )
        .field(
            "workspace_identifier",
            Field::string().one_of(WORKSPACE_IDENTIFIERS),
        )
        .check(sample_rate_check());
    let default_metrics = json!([
        {"name": "request_count", "stat_type": "counter", "sample_rate": 1},
        {"name": "latency", "stat_type": "timer"},
        {"name": "request_size", "stat_type": "counter", "sample_rate": 1},
        {"name": "status_count", "stat_type": "counter", "sample_rate": 1},
        {"name": "response_size", "stat_type": "counter", "sample_rate": 1},
        {"name": "unique_users", "stat_type": "set"},
        {"name": "request_per_user", "stat_type": "counter", "sample_rate": 1},
        {"name": "upstream_latency", "stat_type": "timer"},
        {"name": "kong_latency", "stat_type": "timer"},
        {"name": "status_count_per_user", "stat_type": "counter", "sample_rate": 1},
        {"name": "status_count_per_workspace", "stat_type": "counter", "sample_rate": 1},
        {"name": "status_count_per_user_per_route", "stat_type": "counter", "sample_rate": 1},
        {"name": "shdict_usage", "stat_type": "gauge", "sample_rate": 1},
    ]);
    let cfg = Record::new()
        .field("host", t::host().default(json!("localhost")))
        .field("port", t::port().default(json!(8125)))
        .field("prefix", Field::string().default(json!("kong")))
        .field(
            "metrics",
            Field::array(Field::record(metric)).default(default_metrics),
        )
        .field(
            "allow_status_codes",
            Field::array(Field::string().matches("^[0-9]+-[0-9]+$", "^[0-9]+-[0-9]+$")),
        )
        .field(
            "udp_packet_size",
            Field::number().between(0.0, 65507.0).default(json!(0)),
        )
        .field("use_tcp", Field::boolean().default(json!(false)))
        .field("hostname_in_prefix", Field::boolean().default(json!(false)))
        .field(
            "consumer_identifier_default",
            Field::string()
                .required()
                .default(json!("custom_id"))
                .one_of(CONSUMER_IDENTIFIERS),
        )
        .field(
            "service_identifier_default",
            Field::string()
                .required()
                .default(json!("service_name_or_host"))
                .one_of(SERVICE_IDENTIFIERS),
        )
        .field(
            "workspace_identifier_default",
            Field::string()
                .required()
                .default(json!("workspace_id"))
                .one_of(WORKSPACE_IDENTIFIERS),
        )
        .field("retry_count", Field::integer())
        .field("queue_size", Field::integer())
        .field("flush_timeout", Field::number())
        .field(
            "tag_style",
            Field::string().one_of(["dogstatsd", "influxdb", "librato", "signalfx"]),
        )
        .field("queue", queue());
    any_protocol(config(cfg))
}

pub(super) fn datadog() -> Record {
    let metric = Record::new()
        .field(
            "name",
            Field::string().required().one_of([
                "kong_latency",
                "latency",
                "request_count",
                "request_size",
                "response_size",
                "upstream_latency",
            ]),
        )
        .field(
            "stat_type",
            Field::string().required().one_of([
                "counter",
                "gauge",
                "histogram",
                "meter",
                "set",
                "timer",
                "distribution",
            ]),
        )
        .field(
            "tags",
            Field::array(Field::string().matches("^.*[^:]$", "^.*[^:]$")),
        )
        .field("sample_rate", Field::number().between(0.0, 1.0))
        .field(
            "consumer_identifier",
            Field::string().one_of(["consumer_id", "custom_id", "username"]),
        )
        .check(sample_rate_check());
    let m = |name: &str, stat_type: &str| json!({"name": name, "stat_type": stat_type, "tags": ["app:kong"], "consumer_identifier": "custom_id"});
    let default_metrics = json!([
        {"name": "request_count", "stat_type": "counter", "sample_rate": 1,
         "tags": ["app:kong"], "consumer_identifier": "custom_id"},
        m("latency", "timer"),
        m("request_size", "timer"),
        m("response_size", "timer"),
        m("upstream_latency", "timer"),
        m("kong_latency", "timer"),
    ]);
    let cfg = Record::new()
        .field(
            "host",
            t::host().referenceable().default(json!("localhost")),
        )
        .field("port", t::port().default(json!(8125)))
        .field("prefix", Field::string().default(json!("kong")))
        .field("service_name_tag", Field::string().default(json!("name")))
        .field("status_tag", Field::string().default(json!("status")))
        .field("consumer_tag", Field::string().default(json!("consumer")))
        .field("retry_count", Field::integer())
        .field("queue_size", Field::integer())
        .field("flush_timeout", Field::number())
        .field("queue", queue())
        .field(
            "metrics",
            Field::array(Field::record(metric))
                .required()
                .default(default_metrics),
        );
    any_protocol(config(cfg))
}

pub(super) fn prometheus() -> Record {
    let off = || Field::boolean().default(json!(false));
    any_protocol(config(
        Record::new()
            .field("per_consumer", off())
            .field("status_code_metrics", off())
            .field("ai_metrics", off())
            .field("latency_metrics", off())
            .field("bandwidth_metrics", off())
            .field("upstream_health_metrics", off())
            .field("wasm_metrics", off()),
    ))
}

/// Tags that the zipkin plugin sets itself.
const PROTECTED_TAGS: [&str; 13] = [
    "error",
    "http.method",
    "http.path",
    "http.status_code",
    "kong.balancer.state",
    "kong.balancer.try",
    "kong.consumer",
    "kong.credential",
    "kong.node.id",
    "kong.route",
    "kong.service",
    "lc",
    "peer.hostname",
];

fn validate_static_tags(v: &Value) -> Result<(), String> {
    let Some(tags) = v.as_array() else {
        return Ok(());
    };
    let mut seen: Vec<&str> = Vec::new();
    for name in tags.iter().filter_map(|t| t.get("name")?.as_str()) {
        if seen.contains(&name) {
            return Err(format!("repeated tags are not allowed: {name}"));
        }
        seen.push(name);
    }
    Ok(())
}

const HEADER_TYPES: [&str; 9] = [
    "b3",
    "b3-single",
    "w3c",
    "jaeger",
    "ot",
    "aws",
    "datadog",
    "gcp",
    "instana",
];

pub(super) fn zipkin() -> Record {
    let static_tag = Record::new()
        .field(
            "name",
            Field::string().required().not_one_of(PROTECTED_TAGS),
        )
        .field("value", Field::string().required());
    let cfg = Record::new()
        .field(
            "local_service_name",
            Field::string().required().default(json!("kong")),
        )
        .field("http_endpoint", url())
        .field(
            "sample_ratio",
            Field::number().default(json!(0.001)).between(0.0, 1.0),
        )
        .field("default_service_name", Field::string())
        .field(
            "include_credential",
            Field::boolean().required().default(json!(true)),
        )
        .field(
            "traceid_byte_count",
            Field::integer()
                .required()
                .default(json!(16))
                .one_of([8, 16]),
        )
        .field(
            "header_type",
            Field::string()
                .required()
                .default(json!("preserve"))
                .one_of([
                    "preserve",
                    "ignore",
                    "b3",
                    "b3-single",
                    "w3c",
                    "jaeger",
                    "ot",
                    "aws",
                    "datadog",
                    "gcp",
                    "instana",
                ]),
        )
        .field(
            "default_header_type",
            Field::string()
                .required()
                .default(json!("b3"))
                .one_of(HEADER_TYPES),
        )
        .field(
            "tags_header",
            Field::string().required().default(json!("Zipkin-Tags")),
        )
        .field(
            "static_tags",
            Field::array(Field::record(static_tag)).custom(validate_static_tags),
        )
        .field(
            "http_span_name",
            Field::string()
                .required()
                .default(json!("method"))
                .one_of(["method", "method_path"]),
        )
        .field("connect_timeout", t::timeout().default(json!(2000)))
        .field("send_timeout", t::timeout().default(json!(5000)))
        .field("read_timeout", t::timeout().default(json!(5000)))
        .field("http_response_header_for_traceid", Field::string())
        .field(
            "phase_duration_flavor",
            Field::string()
                .required()
                .default(json!("annotations"))
                .one_of(["annotations", "tags"]),
        )
        .field("queue", queue())
        .field("propagation", propagation("b3"));
    any_protocol(config(cfg))
}

/// Resource attribute values must be non-empty scalars.
fn validate_resource_attributes(v: &Value) -> Result<(), String> {
    let Some(attributes) = v.as_object() else {
        return Ok(());
    };
    for value in attributes.values() {
        match value {
            Value::String(s) if s.is_empty() => return Err("required field missing".into()),
            Value::String(_) | Value::Number(_) | Value::Bool(_) => {}
            Value::Null => return Err("invalid type of value: userdata".into()),
            _ => return Err("invalid type of value: table".into()),
        }
    }
    Ok(())
}

fn traces_endpoint(v: &Value) -> Option<Map<String, Value>> {
    let mut m = Map::new();
    m.insert("traces_endpoint".into(), v.clone());
    Some(m)
}

pub(super) fn opentelemetry() -> Record {
    let cfg = Record::new()
        .field("traces_endpoint", url().referenceable())
        .field("logs_endpoint", url().referenceable())
        .field(
            "headers",
            Field::map(header_name(), Field::string().referenceable()),
        )
        .field(
            "resource_attributes",
            Field::map(Field::string().required(), Field::string().required())
                .custom(validate_resource_attributes),
        )
        .field(
            "queue",
            nested(queue_record()).default(json!({ "max_batch_size": 200 })),
        )
        .field("batch_span_count", Field::integer())
        .field("batch_flush_delay", Field::integer())
        .field("connect_timeout", t::timeout().default(json!(1000)))
        .field("send_timeout", t::timeout().default(json!(5000)))
        .field("read_timeout", t::timeout().default(json!(5000)))
        .field("http_response_header_for_traceid", Field::string())
        .field(
            "header_type",
            Field::string().default(json!("preserve")).one_of([
                "preserve",
                "ignore",
                "b3",
                "b3-single",
                "w3c",
                "jaeger",
                "ot",
                "aws",
                "gcp",
                "datadog",
                "instana",
            ]),
        )
        .field("sampling_rate", Field::number().between(0.0, 1.0))
        .field("propagation", propagation("w3c"))
        .check(EntityCheck::AtLeastOneOf(vec![
            "traces_endpoint",
            "logs_endpoint",
        ]))
        .shorthand("endpoint", url().referenceable(), traces_endpoint);
    Record::new()
        .field("protocols", t::protocols_http())
        .field("config", config(cfg))
}
