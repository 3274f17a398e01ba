//! The ACME (Let's Encrypt) certificate plugin. It runs globally only.

use serde_json::{json, Map, Value};

use super::{
    config, nested, no_consumer, no_route, no_service, redis_record, required_if_eq, url,
    SHARED_DICTS,
};
use crate::entities::typedefs as t;
use crate::schema::{matcher, EntityCheck, Field, Record};

/// Key prefixes the plugin uses in its storage.
const RESERVED_WORDS: [&str; 3] = [
    "kong_acme:renew_config:",
    "kong_acme:renew_last_run",
    "kong_acme:cert_key:",
];

fn validate_namespace(v: &Value) -> Result<(), String> {
    let namespace = v.as_str().unwrap_or("");
    if namespace.is_empty() {
        return Ok(());
    }
    match RESERVED_WORDS.iter().find(|w| namespace.starts_with(*w)) {
        Some(w) => Err(format!(
            "namespace can't be prefixed with reserved word: {w}"
        )),
        None => Ok(()),
    }
}

/// Kong's check is `ngx.shared[name]`, which fails without a message.
fn validate_shm_name(v: &Value) -> Result<(), String> {
    let name = v.as_str().unwrap_or("");
    if SHARED_DICTS.contains(&name) {
        Ok(())
    } else {
        Err(format!("failed validating: {name}"))
    }
}

/// Kong rejects the `kong` storage on DB-less nodes and `shm` on hybrid
/// control planes. Gatehouse's model does not know the node's role, so this
/// check accepts every storage, as a database-backed Kong does.
fn check_storage_for_role(_entity: &Map<String, Value>) -> Result<(), String> {
    Ok(())
}

fn put(key: &str, v: &Value) -> Option<Map<String, Value>> {
    let mut m = Map::new();
    m.insert(key.to_owned(), v.clone());
    Some(m)
}

fn put_extra(key: &str, v: &Value) -> Option<Map<String, Value>> {
    let mut inner = Map::new();
    inner.insert(key.to_owned(), v.clone());
    let mut m = Map::new();
    m.insert("extra_options".into(), Value::Object(inner));
    Some(m)
}

/// The shared redis fields, the ACME-specific options and the deprecated
/// names of both.
fn redis_storage() -> Record {
    redis_record()
        .field(
            "extra_options",
            nested(
                Record::new()
                    .field(
                        "namespace",
                        Field::string()
                            .required()
                            .default(json!(""))
                            .len_min(0)
                            .custom(validate_namespace),
                    )
                    .field("scan_count", Field::number().default(json!(10))),
            ),
        )
        .shorthand("auth", Field::string().len_min(0), |v| put("password", v))
        .shorthand("ssl_server_name", Field::string(), |v| {
            put("server_name", v)
        })
        .shorthand("namespace", Field::string().len_min(0), |v| {
            put_extra("namespace", v)
        })
        .shorthand("scan_count", Field::integer(), |v| {
            put_extra("scan_count", v)
        })
}

fn consul_storage() -> Record {
    Record::new()
        .field("https", Field::boolean().default(json!(false)))
        .field("host", t::host())
        .field("port", t::port())
        .field("kv_path", Field::string())
        .field("timeout", Field::number())
        .field("token", Field::string().referenceable())
}

fn vault_storage() -> Record {
    Record::new()
        .field("https", Field::boolean().default(json!(false)))
        .field("host", t::host())
        .field("port", t::port())
        .field("kv_path", Field::string())
        .field("timeout", Field::number())
        .field("token", Field::string().referenceable())
        .field("tls_verify", Field::boolean().default(json!(true)))
        .field("tls_server_name", Field::string())
        .field(
            "auth_method",
            Field::string()
                .default(json!("token"))
                .one_of(["token", "kubernetes"]),
        )
        .field("auth_path", Field::string())
        .field("auth_role", Field::string())
        .field("jwt_path", Field::string())
}

pub(super) fn acme() -> Record {
    let storage_config = Record::new()
        .field(
            "shm",
            nested(
                Record::new().field(
                    "shm_name",
                    Field::string()
                        .default(json!("kong"))
                        .custom(validate_shm_name),
                ),
            ),
        )
        .field("kong", nested(Record::new()))
        .field("redis", nested(redis_storage()))
        .field("consul", nested(consul_storage()))
        .field("vault", nested(vault_storage()));
    let account_key = Record::new()
        .field("key_id", Field::string().required())
        .field("key_set", Field::string());
    let cfg = Record::new()
        .field(
            "account_email",
            Field::string()
                .matches(
                    "%w*%p*@+%w*%.?%w*",
                    r"[[:alnum:]]*[[:punct:]]*@+[[:alnum:]]*\.?[[:alnum:]]*",
                )
                .required()
                .encrypted()
                .referenceable(),
        )
        .field("account_key", Field::record(account_key))
        .field(
            "api_uri",
            url().default(json!("https://acme-v02.api.letsencrypt.org/directory")),
        )
        .field("tos_accepted", Field::boolean().default(json!(false)))
        .field("eab_kid", Field::string().encrypted().referenceable())
        .field("eab_hmac_key", Field::string().encrypted().referenceable())
        .field(
            "cert_type",
            Field::string().default(json!("rsa")).one_of(["rsa", "ecc"]),
        )
        .field(
            "rsa_key_size",
            Field::number()
                .default(json!(4096))
                .one_of([2048, 3072, 4096]),
        )
        .field("renew_threshold_days", Field::number().default(json!(14)))
        .field("domains", t::hosts())
        .field("allow_any_domain", Field::boolean().default(json!(false)))
        .field("fail_backoff_minutes", Field::number().default(json!(5)))
        .field(
            "storage",
            Field::string()
                .default(json!("shm"))
                .one_of(["kong", "shm", "redis", "consul", "vault"]),
        )
        .field("storage_config", nested(storage_config))
        .field("preferred_chain", Field::string())
        .field(
            "enable_ipv4_common_name",
            Field::boolean().default(json!(true)),
        );
    Record::new()
        .field("consumer", no_consumer())
        .field("service", no_service())
        .field("route", no_route())
        .field("protocols", t::protocols_http())
        .field("config", config(cfg))
        .check(EntityCheck::Conditional {
            if_field: "config.api_uri",
            if_match: Box::new(matcher().one_of([
                "https://acme-v02.api.letsencrypt.org",
                "https://acme-staging-v02.api.letsencrypt.org",
            ])),
            then_field: "config.tos_accepted",
            then_match: Box::new(matcher().eq(json!(true))),
            then_err: Some(
                "terms of service must be accepted, see https://letsencrypt.org/repository/",
            ),
        })
        .check(required_if_eq(
            "config.storage",
            json!("redis"),
            "config.storage_config.redis.host",
        ))
        .check(required_if_eq(
            "config.storage",
            json!("redis"),
            "config.storage_config.redis.port",
        ))
        .check(EntityCheck::Custom {
            field_sources: vec!["config.storage"],
            run_with_missing_fields: false,
            check: check_storage_for_role,
        })
}
