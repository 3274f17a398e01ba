//! Kong 3.x core entities and auth credentials, defined in the schema
//! language with Kong's field order, defaults and checks.

use std::collections::BTreeMap;
use std::sync::{Arc, LazyLock};

use serde_json::{json, Map, Value};

use crate::schema::{matcher, EntityCheck, EntitySchema, Field, OnDelete, Record, Subschemas};

pub mod typedefs;
mod url;

pub use url::parse_url;

use typedefs as t;

/// Every entity, in dependency order (a parent before its children).
pub static ENTITIES: LazyLock<Vec<EntitySchema>> = LazyLock::new(|| {
    vec![
        certificates(),
        ca_certificates(),
        snis(),
        services(),
        routes(),
        consumers(),
        upstreams(),
        targets(),
        plugins(),
        keyauth_credentials(),
        basicauth_credentials(),
        hmacauth_credentials(),
        jwt_secrets(),
        acls(),
    ]
});

/// An entity schema by its name (`services`, `keyauth_credentials`).
pub fn entity(name: &str) -> Option<&'static EntitySchema> {
    ENTITIES.iter().find(|e| e.name == name)
}

/// An entity schema by its Admin API collection name (`key-auths`).
pub fn entity_by_admin_name(name: &str) -> Option<&'static EntitySchema> {
    ENTITIES.iter().find(|e| e.admin_api_name == name)
}

fn base(name: &'static str, record: Record) -> EntitySchema {
    EntitySchema {
        name,
        admin_api_name: name,
        admin_api_nested_name: None,
        endpoint_key: None,
        cache_key: Vec::new(),
        record,
        subschema_key: None,
        subschemas: None,
        ttl: false,
        on_write: None,
    }
}

fn nonzero_timeout() -> Field {
    Field::integer().between(1.0, 2147483646.0)
}

fn services() -> EntitySchema {
    let not_tls = || matcher().not_one_of(["https", "tls"]);
    let record = Record::new()
        .field("id", t::uuid())
        .field("created_at", t::auto_timestamp_s())
        .field("updated_at", t::auto_timestamp_s())
        .field("name", t::utf8_name())
        .field(
            "retries",
            Field::integer()
                .default(json!(5))
                .between(0.0, 32767.0)
                .description("The number of retries to execute upon failure to proxy."),
        )
        .field("protocol", t::protocol().required().default(json!("http")))
        .field("host", t::host().required())
        .field("port", t::port().required().default(json!(80)))
        .field("path", t::path())
        .field("connect_timeout", nonzero_timeout().default(json!(60000)))
        .field("write_timeout", nonzero_timeout().default(json!(60000)))
        .field("read_timeout", nonzero_timeout().default(json!(60000)))
        .field("tags", t::tags())
        .field("client_certificate", Field::foreign("certificates"))
        .field("tls_verify", Field::boolean())
        .field(
            "tls_verify_depth",
            Field::integer().default(Value::Null).between(0.0, 64.0),
        )
        .field("ca_certificates", Field::array(Field::string().uuid()))
        .field("enabled", Field::boolean().required().default(json!(true)))
        .check(EntityCheck::conditional(
            "protocol",
            matcher().one_of(["tcp", "tls", "udp", "grpc", "grpcs"]),
            "path",
            matcher().eq(Value::Null),
        ))
        .check(EntityCheck::conditional(
            "protocol",
            not_tls(),
            "client_certificate",
            matcher().eq(Value::Null),
        ))
        .check(EntityCheck::conditional(
            "protocol",
            not_tls(),
            "tls_verify",
            matcher().eq(Value::Null),
        ))
        .check(EntityCheck::conditional(
            "protocol",
            not_tls(),
            "tls_verify_depth",
            matcher().eq(Value::Null),
        ))
        .check(EntityCheck::conditional(
            "protocol",
            not_tls(),
            "ca_certificates",
            matcher().eq(Value::Null),
        ))
        .shorthand("url", Field::string(), expand_service_url);
    EntitySchema {
        endpoint_key: Some("name"),
        ..base("services", record)
    }
}

fn expand_service_url(v: &Value) -> Option<Map<String, Value>> {
    let parsed = parse_url(v.as_str()?);
    let port_num: Option<i64> = parsed.port.as_deref().and_then(|p| p.parse().ok());
    let implied = match port_num {
        Some(80) => Some("http"),
        Some(443) => Some("https"),
        _ => None,
    };
    let protocol = parsed
        .scheme
        .clone()
        .or(implied.map(str::to_owned))
        .unwrap_or_else(|| "http".to_owned());
    let port = match port_num {
        Some(p) => json!(p),
        None => match (&parsed.port, protocol.as_str()) {
            (Some(p), _) => json!(p),
            (None, "https") => json!(443),
            _ => json!(80),
        },
    };
    let mut m = Map::new();
    m.insert("protocol".into(), json!(protocol));
    m.insert(
        "host".into(),
        parsed.host.map(Value::String).unwrap_or(Value::Null),
    );
    m.insert("port".into(), port);
    m.insert(
        "path".into(),
        parsed.path.map(Value::String).unwrap_or(Value::Null),
    );
    Some(m)
}

fn router_path() -> Field {
    Field::string()
        .match_any(
            &[("^/", "^/"), ("^~/", "^~/")],
            "should start with: / (fixed path) or ~/ (regex path)",
        )
        .match_none("//", "//", "must not have empty segments")
        .custom(validate_router_path)
}

fn validate_router_path(v: &Value) -> Result<(), String> {
    let path = v.as_str().unwrap_or("");
    if let Some(re) = path.strip_prefix('~') {
        t::check_percent_encoding(re)?;
        return regex::Regex::new(re).map(|_| ()).map_err(|e| {
            format!(
                "invalid regex: '{re}' (PCRE returned: {})",
                first_line(&e.to_string())
            )
        });
    }
    t::validate_path(v)?;
    let normalized = crate::uri::normalize(path);
    if normalized != path {
        return Err(format!(
            "non-normalized path, consider use '{normalized}' instead"
        ));
    }
    Ok(())
}

fn first_line(s: &str) -> String {
    let last = s.lines().last().unwrap_or(s).trim();
    last.strip_prefix("error: ").unwrap_or(last).to_owned()
}

fn source_dest() -> Field {
    Field::set(Field::record(
        Record::new()
            .field("ip", t::ip_or_cidr())
            .field("port", t::port())
            .check(EntityCheck::AtLeastOneOf(vec!["ip", "port"])),
    ))
}

struct RouteSubschemas {
    http: Arc<Record>,
    stream: Arc<Record>,
    grpc: Arc<Record>,
}

impl Subschemas for RouteSubschemas {
    fn get(&self, key: &str) -> Option<Arc<Record>> {
        match key {
            "http" | "https" => Some(self.http.clone()),
            "tcp" | "tls" | "udp" | "tls_passthrough" => Some(self.stream.clone()),
            "grpc" | "grpcs" => Some(self.grpc.clone()),
            _ => None,
        }
    }
}

fn forbidden(base: Field, err: &str) -> Field {
    base.eq(Value::Null).err(err)
}

fn route_subschemas() -> RouteSubschemas {
    let http = Record::new()
        .field(
            "sources",
            forbidden(
                source_dest(),
                "cannot set 'sources' when 'protocols' is 'http' or 'https'",
            ),
        )
        .field(
            "destinations",
            forbidden(
                source_dest(),
                "cannot set 'destinations' when 'protocols' is 'http' or 'https'",
            ),
        )
        .check(EntityCheck::ConditionalAtLeastOneOf {
            if_field: "protocols",
            if_match: Box::new(matcher().contains(json!("https"))),
            then_at_least_one_of: vec!["methods", "hosts", "headers", "paths", "snis"],
            then_err: Some("must set one of %s when 'protocols' is 'https'"),
            else_match: Some(Box::new(matcher().contains(json!("http")))),
            else_then_at_least_one_of: vec!["methods", "hosts", "headers", "paths"],
            else_then_err: Some("must set one of %s when 'protocols' is 'http'"),
        });
    let stream_err = "when 'protocols' is 'tcp', 'tls', 'tls_passthrough' or 'udp'";
    let stream = Record::new()
        .field(
            "methods",
            forbidden(methods(), &format!("cannot set 'methods' {stream_err}")),
        )
        .field(
            "hosts",
            forbidden(t::hosts(), &format!("cannot set 'hosts' {stream_err}")),
        )
        .field(
            "paths",
            forbidden(
                Field::array(router_path()),
                &format!("cannot set 'paths' {stream_err}"),
            ),
        )
        .field(
            "headers",
            forbidden(
                route_headers(),
                &format!("cannot set 'headers' {stream_err}"),
            ),
        )
        .check(EntityCheck::ConditionalAtLeastOneOf {
            if_field: "protocols",
            if_match: Box::new(matcher_elements_one_of(&["tcp", "tls", "udp"])),
            then_at_least_one_of: vec!["sources", "destinations", "snis"],
            then_err: Some("must set one of %s when 'protocols' is 'tcp', 'tls' or 'udp'"),
            else_match: None,
            else_then_at_least_one_of: vec![],
            else_then_err: None,
        })
        .check(EntityCheck::ConditionalAtLeastOneOf {
            if_field: "protocols",
            if_match: Box::new(matcher_elements_one_of(&["tls_passthrough"])),
            then_at_least_one_of: vec!["snis"],
            then_err: Some("must set snis when 'protocols' is 'tls_passthrough'"),
            else_match: None,
            else_then_at_least_one_of: vec![],
            else_then_err: None,
        });
    let grpc = Record::new()
        .field(
            "strip_path",
            Field::boolean()
                .required()
                .default(json!(false))
                .ne(json!(true))
                .err("cannot set 'strip_path' when 'protocols' is 'grpc' or 'grpcs'"),
        )
        .field(
            "methods",
            forbidden(
                methods(),
                "cannot set 'methods' when 'protocols' is 'grpc' or 'grpcs'",
            ),
        )
        .field(
            "sources",
            forbidden(
                source_dest(),
                "cannot set 'sources' when 'protocols' is 'grpc' or 'grpcs'",
            ),
        )
        .field(
            "destinations",
            forbidden(
                source_dest(),
                "cannot set 'destinations' when 'protocols' is 'grpc' or 'grpcs'",
            ),
        )
        .check(EntityCheck::ConditionalAtLeastOneOf {
            if_field: "protocols",
            if_match: Box::new(matcher().contains(json!("grpcs"))),
            then_at_least_one_of: vec!["hosts", "headers", "paths", "snis"],
            then_err: Some("must set one of %s when 'protocols' is 'grpcs'"),
            else_match: Some(Box::new(matcher().contains(json!("grpc")))),
            else_then_at_least_one_of: vec!["hosts", "headers", "paths"],
            else_then_err: Some("must set one of %s when 'protocols' is 'grpc'"),
        });
    RouteSubschemas {
        http: Arc::new(http),
        stream: Arc::new(stream),
        grpc: Arc::new(grpc),
    }
}

/// A matcher on a set whose every element must be one of `options`.
fn matcher_elements_one_of(options: &[&'static str]) -> Field {
    Field::set(Field::string().one_of(options.iter().copied()))
}

fn methods() -> Field {
    Field::set(t::http_method())
}

fn route_headers() -> Field {
    Field::map(
        t::header_name().match_none(
            "^[Hh][Oo][Ss][Tt]$",
            "^[Hh][Oo][Ss][Tt]$",
            "cannot contain 'host' header, which must be specified in the 'hosts' attribute",
        ),
        Field::array(Field::string()),
    )
}

fn routes() -> EntitySchema {
    let record = Record::new()
        .field("id", t::uuid())
        .field("created_at", t::auto_timestamp_s())
        .field("updated_at", t::auto_timestamp_s())
        .field("name", t::utf8_name())
        .field(
            "protocols",
            Field::set(t::protocol())
                .len_min(1)
                .required()
                .mutually_exclusive_subsets(vec![
                    vec!["http", "https"],
                    vec!["tcp", "tls", "udp"],
                    vec!["tls_passthrough"],
                    vec!["grpc", "grpcs"],
                ])
                .default(json!(["http", "https"]))
                .description("An array of the protocols this Route should allow."),
        )
        .field(
            "https_redirect_status_code",
            Field::integer()
                .one_of([426, 301, 302, 307, 308])
                .default(json!(426))
                .required(),
        )
        .field("strip_path", Field::boolean().required().default(json!(true)))
        .field("preserve_host", Field::boolean().required().default(json!(false)))
        .field("request_buffering", Field::boolean().required().default(json!(true)))
        .field("response_buffering", Field::boolean().required().default(json!(true)))
        .field("tags", t::tags())
        .field("service", Field::foreign("services"))
        .field("snis", Field::set(t::wildcard_host()))
        .field("sources", source_dest())
        .field("destinations", source_dest())
        .field("methods", methods())
        .field("hosts", t::hosts())
        .field("paths", Field::array(router_path()))
        .field("headers", route_headers())
        .field("regex_priority", Field::integer().default(json!(0)))
        .field(
            "path_handling",
            Field::string().default(json!("v0")).one_of(["v0", "v1"]),
        )
        .check(EntityCheck::Conditional {
            if_field: "protocols",
            if_match: Box::new(Field::set(
                Field::string().not_one_of(["grpcs", "https", "tls", "tls_passthrough"]),
            )),
            then_field: "snis",
            then_match: Box::new(matcher().len_eq(0)),
            then_err: Some(
                "'snis' can only be set when 'protocols' is 'grpcs', 'https', 'tls' or 'tls_passthrough'",
            ),
        });
    EntitySchema {
        endpoint_key: Some("name"),
        subschema_key: Some("protocols"),
        subschemas: Some(Box::new(route_subschemas())),
        ..base("routes", record)
    }
}

fn consumers() -> EntitySchema {
    let record = Record::new()
        .field("id", t::uuid())
        .field("created_at", t::auto_timestamp_s())
        .field("updated_at", t::auto_timestamp_s())
        .field("username", Field::string().unique())
        .field("custom_id", Field::string().unique())
        .field("tags", t::tags())
        .check(EntityCheck::AtLeastOneOf(vec!["custom_id", "username"]));
    EntitySchema {
        endpoint_key: Some("username"),
        ..base("consumers", record)
    }
}

struct PluginSubschemas;

impl Subschemas for PluginSubschemas {
    fn get(&self, key: &str) -> Option<Arc<Record>> {
        crate::plugins::subschema(key)
    }
    fn unknown_error(&self) -> &str {
        "plugin '%s' not enabled; add it to the 'plugins' configuration property"
    }
}

fn plugins() -> EntitySchema {
    let record = Record::new()
        .field("id", t::uuid())
        .field("name", Field::string().required())
        .field("instance_name", t::utf8_name())
        .field("created_at", t::auto_timestamp_s())
        .field("updated_at", t::auto_timestamp_s())
        .field(
            "route",
            Field::foreign("routes")
                .default(Value::Null)
                .on_delete(OnDelete::Cascade),
        )
        .field(
            "service",
            Field::foreign("services")
                .default(Value::Null)
                .on_delete(OnDelete::Cascade),
        )
        .field(
            "consumer",
            Field::foreign("consumers")
                .default(Value::Null)
                .on_delete(OnDelete::Cascade),
        )
        .field("config", Field::record(Record::new()))
        .field("protocols", t::protocols())
        .field("enabled", Field::boolean().required().default(json!(true)))
        .field("tags", t::tags());
    EntitySchema {
        endpoint_key: Some("instance_name"),
        cache_key: vec!["name", "route", "service", "consumer"],
        subschema_key: Some("name"),
        subschemas: Some(Box::new(PluginSubschemas)),
        ..base("plugins", record)
    }
}

fn validate_upstream_name(v: &Value) -> Result<(), String> {
    let name = v.as_str().unwrap_or("");
    let prefix = format!("Invalid name ('{name}')");
    match typedefs::normalize_ip(name) {
        Err(_) => Err(format!("{prefix}; must be a valid hostname")),
        Ok(h) if h.kind != typedefs::HostKind::Name => {
            Err(format!("{prefix}; no ip addresses allowed"))
        }
        Ok(h) if h.port.is_some() => Err(format!("{prefix}; no port allowed")),
        Ok(_) => Ok(()),
    }
}

/// A nested record whose default is its own defaults, as Kong's
/// `healthchecks` schema builds them: leaving out `passive` gives the
/// default passive checks, not `null`.
fn defaulted(record: Record) -> Field {
    let defaults = record
        .process_auto_fields(Map::new(), crate::schema::Context::Insert)
        .map(Value::Object)
        .unwrap_or(Value::Null);
    Field::record(record).default(defaults)
}

fn healthchecks() -> Field {
    let seconds = || Field::number().between(0.0, 65535.0);
    let one_byte = || Field::integer().between(0.0, 255.0);
    let statuses = || Field::array(Field::integer().between(100.0, 999.0));
    let check_type = || {
        Field::string()
            .one_of(["tcp", "http", "https", "grpc", "grpcs"])
            .default(json!("http"))
    };
    let active_healthy = Record::new()
        .field("interval", seconds().default(json!(0)))
        .field("http_statuses", statuses().default(json!([200, 302])))
        .field("successes", one_byte().default(json!(0)));
    let active_unhealthy = Record::new()
        .field("interval", seconds().default(json!(0)))
        .field(
            "http_statuses",
            statuses().default(json!([429, 404, 500, 501, 502, 503, 504, 505])),
        )
        .field("tcp_failures", one_byte().default(json!(0)))
        .field("timeouts", one_byte().default(json!(0)))
        .field("http_failures", one_byte().default(json!(0)));
    let active = Record::new()
        .field("type", check_type())
        .field("timeout", seconds().default(json!(1)))
        .field(
            "concurrency",
            Field::integer()
                .between(1.0, 2147483648.0)
                .default(json!(10)),
        )
        .field("http_path", t::path().default(json!("/")))
        .field("https_sni", t::sni())
        .field(
            "https_verify_certificate",
            Field::boolean().required().default(json!(true)),
        )
        .field("headers", t::headers())
        .field("healthy", defaulted(active_healthy))
        .field("unhealthy", defaulted(active_unhealthy));
    let passive_healthy = Record::new()
        .field(
            "http_statuses",
            statuses().default(json!([
                200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304, 305,
                306, 307, 308
            ])),
        )
        .field("successes", one_byte().default(json!(0)));
    let passive_unhealthy = Record::new()
        .field("http_statuses", statuses().default(json!([429, 500, 503])))
        .field("tcp_failures", one_byte().default(json!(0)))
        .field("timeouts", one_byte().default(json!(0)))
        .field("http_failures", one_byte().default(json!(0)));
    let passive = Record::new()
        .field("type", check_type())
        .field("healthy", defaulted(passive_healthy))
        .field("unhealthy", defaulted(passive_unhealthy));
    let defaults = json!({
        "active": {
            "type": "http", "timeout": 1, "concurrency": 10, "http_path": "/",
            "https_verify_certificate": true, "https_sni": null, "headers": null,
            "healthy": {"interval": 0, "http_statuses": [200, 302], "successes": 0},
            "unhealthy": {"interval": 0, "http_statuses": [429, 404, 500, 501, 502, 503, 504, 505],
                          "tcp_failures": 0, "timeouts": 0, "http_failures": 0},
        },
        "passive": {
            "type": "http",
            "healthy": {"http_statuses": [200, 201, 202, 203, 204, 205, 206, 207, 208, 226,
                                          300, 301, 302, 303, 304, 305, 306, 307, 308],
                        "successes": 0},
            "unhealthy": {"http_statuses": [429, 500, 503], "tcp_failures": 0, "timeouts": 0,
                          "http_failures": 0},
        },
        "threshold": 0,
    });
    Field::record(
        Record::new()
            .field("active", defaulted(active))
            .field("passive", defaulted(passive))
            .field(
                "threshold",
                Field::number().default(json!(0)).between(0.0, 100.0),
            ),
    )
    .default(defaults)
}

fn upstreams() -> EntitySchema {
    let hash_on = || {
        Field::string().default(json!("none")).one_of([
            "none",
            "consumer",
            "ip",
            "header",
            "cookie",
            "path",
            "query_arg",
            "uri_capture",
        ])
    };
    let simple = || Field::string().len_min(1);
    let is = |v: &'static str| matcher().matches(v, &format!("^{}$", &v[1..v.len() - 1]));
    let cond = |f: &'static str, value: &'static str, then: &'static str, m: Field| {
        EntityCheck::conditional(f, is(value), then, m)
    };
    let record = Record::new()
        .field("id", t::uuid())
        .field("created_at", t::auto_timestamp_s())
        .field(
            "name",
            Field::string()
                .required()
                .unique()
                .custom(validate_upstream_name),
        )
        .field("updated_at", t::auto_timestamp_s())
        .field(
            "algorithm",
            Field::string().default(json!("round-robin")).one_of([
                "consistent-hashing",
                "least-connections",
                "round-robin",
                "latency",
            ]),
        )
        .field("hash_on", hash_on())
        .field("hash_fallback", hash_on())
        .field("hash_on_header", t::header_name())
        .field("hash_fallback_header", t::header_name())
        .field("hash_on_cookie", t::cookie_name())
        .field("hash_on_cookie_path", t::path().default(json!("/")))
        .field("hash_on_query_arg", simple())
        .field("hash_fallback_query_arg", simple())
        .field("hash_on_uri_capture", simple())
        .field("hash_fallback_uri_capture", simple())
        .field(
            "slots",
            Field::integer()
                .default(json!(10000))
                .between(10.0, 65536.0),
        )
        .field("healthchecks", healthchecks())
        .field("tags", t::tags())
        .field("host_header", t::host_with_optional_port())
        .field("client_certificate", Field::foreign("certificates"))
        .field("use_srv_name", Field::boolean().default(json!(false)))
        .check(cond(
            "hash_on",
            "^header$",
            "hash_on_header",
            matcher().required(),
        ))
        .check(cond(
            "hash_fallback",
            "^header$",
            "hash_fallback_header",
            matcher().required(),
        ))
        .check(cond(
            "hash_on",
            "^cookie$",
            "hash_on_cookie",
            matcher().required(),
        ))
        .check(cond(
            "hash_fallback",
            "^cookie$",
            "hash_on_cookie",
            matcher().required(),
        ))
        .check(cond(
            "hash_on",
            "^none$",
            "hash_fallback",
            matcher().one_of(["none"]),
        ))
        .check(cond(
            "hash_on",
            "^cookie$",
            "hash_fallback",
            matcher().one_of(["none"]),
        ))
        .check(cond(
            "hash_on",
            "^consumer$",
            "hash_fallback",
            matcher().one_of([
                "none",
                "ip",
                "header",
                "cookie",
                "path",
                "query_arg",
                "uri_capture",
            ]),
        ))
        .check(cond(
            "hash_on",
            "^ip$",
            "hash_fallback",
            matcher().one_of([
                "none",
                "consumer",
                "header",
                "cookie",
                "path",
                "query_arg",
                "uri_capture",
            ]),
        ))
        .check(cond(
            "hash_on",
            "^path$",
            "hash_fallback",
            matcher().one_of([
                "none",
                "consumer",
                "header",
                "cookie",
                "query_arg",
                "ip",
                "uri_capture",
            ]),
        ))
        .check(EntityCheck::Distinct(vec![
            "hash_on_header",
            "hash_fallback_header",
        ]))
        .check(cond(
            "hash_on",
            "^query_arg$",
            "hash_on_query_arg",
            matcher().required(),
        ))
        .check(cond(
            "hash_fallback",
            "^query_arg$",
            "hash_fallback_query_arg",
            matcher().required(),
        ))
        .check(EntityCheck::Distinct(vec![
            "hash_on_query_arg",
            "hash_fallback_query_arg",
        ]))
        .check(cond(
            "hash_on",
            "^uri_capture$",
            "hash_on_uri_capture",
            matcher().required(),
        ))
        .check(cond(
            "hash_fallback",
            "^uri_capture$",
            "hash_fallback_uri_capture",
            matcher().required(),
        ))
        .check(EntityCheck::Distinct(vec![
            "hash_on_uri_capture",
            "hash_fallback_uri_capture",
        ]))
        .shorthand("algorithm", Field::string(), |v| {
            let mut m = Map::new();
            let s = v.as_str()?;
            m.insert("algorithm".into(), json!(s));
            if s == "least-connections" || s == "latency" {
                m.insert("hash_on".into(), Value::Null);
            }
            Some(m)
        })
        .shorthand("hash_on", Field::string(), |v| {
            let mut m = Map::new();
            match v.as_str() {
                None => {
                    m.insert("hash_on".into(), json!("none"));
                }
                Some("none") => {
                    m.insert("hash_on".into(), json!("none"));
                    m.insert("algorithm".into(), json!("round-robin"));
                }
                Some(s) => {
                    m.insert("hash_on".into(), json!(s));
                    m.insert("algorithm".into(), json!("consistent-hashing"));
                }
            }
            Some(m)
        });
    EntitySchema {
        endpoint_key: Some("name"),
        ..base("upstreams", record)
    }
}

fn validate_target(v: &Value) -> Result<(), String> {
    let target = v.as_str().unwrap_or("");
    match typedefs::normalize_ip(target) {
        Ok(_) => Ok(()),
        Err(_) => Err(format!(
            "Invalid target ('{target}'); not a valid hostname or ip address"
        )),
    }
}

/// Kong's target normal form: `host:port`, `[v6]:port`, with port 8000
/// when none is given.
pub fn format_target(target: &str) -> Option<String> {
    let p = typedefs::normalize_ip(target).ok()?;
    let port = p.port.unwrap_or(8000);
    Some(match p.kind {
        typedefs::HostKind::Ipv6 => {
            let addr: std::net::Ipv6Addr = p.host.parse().ok()?;
            format!("[{addr}]:{port}")
        }
        _ => format!("{}:{port}", p.host),
    })
}

fn targets() -> EntitySchema {
    let record = Record::new()
        .field("id", t::uuid())
        .field("created_at", t::auto_timestamp_ms())
        .field("updated_at", t::auto_timestamp_ms())
        .field(
            "upstream",
            Field::foreign("upstreams")
                .required()
                .on_delete(OnDelete::Cascade),
        )
        .field("target", Field::string().required().custom(validate_target))
        .field(
            "weight",
            Field::integer().default(json!(100)).between(0.0, 65535.0),
        )
        .field("tags", t::tags());
    EntitySchema {
        endpoint_key: Some("target"),
        cache_key: vec!["upstream", "target"],
        on_write: Some(|entity, input| {
            if input.contains_key("target") {
                if let Some(t) = entity.get("target").and_then(Value::as_str) {
                    let formatted = format_target(t).ok_or_else(|| {
                        "Invalid target; not a valid hostname or ip address".to_owned()
                    })?;
                    entity.insert("target".into(), json!(formatted));
                }
            }
            Ok(())
        }),
        ..base("targets", record)
    }
}

fn check_cert_key(e: &Map<String, Value>) -> Result<(), String> {
    crate::pem::check_pair(
        e.get("cert"),
        e.get("key"),
        "certificate does not match key",
    )
}

fn check_cert_key_alt(e: &Map<String, Value>) -> Result<(), String> {
    crate::pem::check_pair(
        e.get("cert_alt"),
        e.get("key_alt"),
        "alternative certificate does not match key",
    )
}

fn certificates() -> EntitySchema {
    let record = Record::new()
        .field("id", t::uuid())
        .field("created_at", t::auto_timestamp_s())
        .field("updated_at", t::auto_timestamp_s())
        .field("cert", t::certificate().required().referenceable())
        .field("key", t::key().required().referenceable().encrypted())
        .field("cert_alt", t::certificate().referenceable())
        .field("key_alt", t::key().referenceable().encrypted())
        .field("tags", t::tags())
        .field("snis", Field::array(t::wildcard_host()).transient())
        .check(EntityCheck::MutuallyRequired(vec!["cert_alt", "key_alt"]))
        .check(EntityCheck::Custom {
            field_sources: vec!["cert", "key"],
            run_with_missing_fields: false,
            check: check_cert_key,
        })
        .check(EntityCheck::Custom {
            field_sources: vec!["cert_alt", "key_alt"],
            run_with_missing_fields: false,
            check: check_cert_key_alt,
        });
    base("certificates", record)
}

fn snis() -> EntitySchema {
    let record = Record::new()
        .field("id", t::uuid())
        .field("name", t::wildcard_host().required().unique())
        .field("created_at", t::auto_timestamp_s())
        .field("updated_at", t::auto_timestamp_s())
        .field("tags", t::tags())
        .field("certificate", Field::foreign("certificates").required());
    EntitySchema {
        endpoint_key: Some("name"),
        ..base("snis", record)
    }
}

fn check_ca_certificate(e: &Map<String, Value>) -> Result<(), String> {
    let cert = e.get("cert").and_then(Value::as_str).unwrap_or("");
    if crate::pem::count_certificates(cert) > 1 {
        return Err("please submit only one certificate at a time".into());
    }
    let info =
        crate::pem::parse_certificate(cert).map_err(|e| format!("invalid certificate: {e}"))?;
    let now = crate::schema::validate_now_s() as i64;
    if info.not_after < now {
        return Err("certificate expired, \"Not After\" time is in the past".into());
    }
    if !info.is_ca {
        return Err(
            "certificate does not appear to be a CA because it is missing the \"CA\" basic constraint"
                .into(),
        );
    }
    Ok(())
}

fn ca_certificates() -> EntitySchema {
    let record = Record::new()
        .field("id", t::uuid())
        .field("created_at", t::auto_timestamp_s())
        .field("updated_at", t::auto_timestamp_s())
        .field("cert", t::certificate().required())
        .field("cert_digest", Field::string().unique())
        .field("tags", t::tags())
        .check(EntityCheck::Custom {
            field_sources: vec!["cert"],
            run_with_missing_fields: false,
            check: check_ca_certificate,
        });
    EntitySchema {
        on_write: Some(|entity, _input| {
            let cert = entity.get("cert").and_then(Value::as_str).unwrap_or("");
            let info = crate::pem::parse_certificate(cert)
                .map_err(|_| "cannot create digest value of certificate".to_owned())?;
            entity.insert("cert_digest".into(), json!(crate::pem::digest_hex(&info)));
            Ok(())
        }),
        ..base("ca_certificates", record)
    }
}

fn consumer_ref() -> Field {
    Field::foreign("consumers")
        .required()
        .on_delete(OnDelete::Cascade)
}

fn credential(
    name: &'static str,
    admin: &'static str,
    nested: &'static str,
    record: Record,
) -> EntitySchema {
    EntitySchema {
        admin_api_name: admin,
        admin_api_nested_name: Some(nested),
        ..base(name, record)
    }
}

fn keyauth_credentials() -> EntitySchema {
    let record = Record::new()
        .field("id", t::uuid())
        .field("created_at", t::auto_timestamp_s())
        .field("consumer", consumer_ref())
        .field("key", Field::string().unique().auto())
        .field("tags", t::tags());
    EntitySchema {
        endpoint_key: Some("key"),
        cache_key: vec!["key"],
        ttl: true,
        ..credential("keyauth_credentials", "key-auths", "key-auth", record)
    }
}

/// Kong's basic-auth hash: hex SHA-1 of the password followed by the
/// consumer id.
pub fn basic_auth_hash(consumer_id: &str, password: &str) -> String {
    use sha1::Digest;
    let mut h = sha1::Sha1::new();
    h.update(password.as_bytes());
    h.update(consumer_id.as_bytes());
    hex::encode(h.finalize())
}

fn basicauth_credentials() -> EntitySchema {
    let record = Record::new()
        .field("id", t::uuid())
        .field("created_at", t::auto_timestamp_s())
        .field("consumer", consumer_ref())
        .field("username", Field::string().required().unique())
        .field("password", Field::string().required().encrypted())
        .field("tags", t::tags());
    EntitySchema {
        endpoint_key: Some("username"),
        cache_key: vec!["username"],
        on_write: Some(|entity, input| {
            if let Some(Value::String(pw)) = input.get("password") {
                let consumer_id = entity
                    .get("consumer")
                    .and_then(|c| c.get("id"))
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned();
                let hashed = basic_auth_hash(&consumer_id, pw);
                entity.insert("password".into(), json!(hashed));
            }
            Ok(())
        }),
        ..credential("basicauth_credentials", "basic-auths", "basic-auth", record)
    }
}

fn hmacauth_credentials() -> EntitySchema {
    let record = Record::new()
        .field("id", t::uuid())
        .field("created_at", t::auto_timestamp_s())
        .field("consumer", consumer_ref())
        .field("username", Field::string().required().unique())
        .field("secret", Field::string().auto())
        .field("tags", t::tags());
    EntitySchema {
        endpoint_key: Some("username"),
        cache_key: vec!["username"],
        ..credential("hmacauth_credentials", "hmac-auths", "hmac-auth", record)
    }
}

fn validate_rsa_key(v: &Value) -> Result<(), String> {
    let s = v.as_str().unwrap_or("");
    if s.contains("-----BEGIN") && s.contains("KEY-----") {
        Ok(())
    } else {
        Err("invalid key".into())
    }
}

fn jwt_secrets() -> EntitySchema {
    let record = Record::new()
        .field("id", t::uuid())
        .field("created_at", t::auto_timestamp_s())
        .field("consumer", consumer_ref())
        .field("key", Field::string().unique().auto())
        .field("secret", Field::string().auto())
        .field("rsa_public_key", Field::string())
        .field(
            "algorithm",
            Field::string().default(json!("HS256")).one_of([
                "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "ES512",
                "PS256", "PS384", "PS512", "EdDSA",
            ]),
        )
        .field("tags", t::tags())
        .check(EntityCheck::conditional(
            "algorithm",
            matcher().match_any(
                &[
                    ("^RS256$", "^RS256$"),
                    ("^RS384$", "^RS384$"),
                    ("^RS512$", "^RS512$"),
                    ("^PS256$", "^PS256$"),
                    ("^PS384$", "^PS384$"),
                    ("^PS512$", "^PS512$"),
                    ("^EdDSA$", "^EdDSA$"),
                ],
                "",
            ),
            "rsa_public_key",
            matcher().required().custom(validate_rsa_key),
        ));
    EntitySchema {
        endpoint_key: Some("key"),
        cache_key: vec!["key"],
        ..credential("jwt_secrets", "jwts", "jwt", record)
    }
}

fn acls() -> EntitySchema {
    let record = Record::new()
        .field("id", t::uuid())
        .field("created_at", t::auto_timestamp_s())
        .field("consumer", consumer_ref())
        .field("group", Field::string().required())
        .field("tags", t::tags());
    EntitySchema {
        cache_key: vec!["consumer", "group"],
        ..credential("acls", "acls", "acls", record)
    }
}

/// Entities that reference `parent` through a foreign key, with the field.
pub fn children_of(parent: &str) -> Vec<(&'static EntitySchema, &'static str)> {
    let mut out = Vec::new();
    for e in ENTITIES.iter() {
        for (field, _, reference) in e.foreign_fields() {
            if reference == parent {
                out.push((e, field));
            }
        }
    }
    out
}

/// Entity names for `/endpoints`-style listings, sorted.
pub fn names() -> BTreeMap<&'static str, &'static EntitySchema> {
    ENTITIES.iter().map(|e| (e.name, e)).collect()
}
