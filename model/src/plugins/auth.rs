//! Authentication and session plugins.

use base64::Engine;
use rand::Rng;
use serde_json::{json, Map, Value};

use super::{config, header_name, no_consumer, ttl};
use crate::entities::typedefs as t;
use crate::schema::{matcher, EntityCheck, Field, Record};

/// The common head of an authentication plugin: never scoped to a
/// consumer, http protocols only.
fn auth_plugin(cfg: Record) -> Record {
    auth_head(config(cfg))
}

fn auth_head(config: Field) -> Record {
    Record::new()
        .field("consumer", no_consumer())
        .field("protocols", t::protocols_http())
        .field("config", config)
}

fn flag(default: bool) -> Field {
    Field::boolean().required().default(json!(default))
}

pub(super) fn key_auth() -> Record {
    auth_plugin(
        Record::new()
            .field(
                "key_names",
                Field::array(header_name())
                    .required()
                    .default(json!(["apikey"])),
            )
            .field("hide_credentials", flag(false))
            .field("anonymous", Field::string())
            .field("key_in_header", flag(true))
            .field("key_in_query", flag(true))
            .field("key_in_body", flag(false))
            .field("run_on_preflight", flag(true))
            .field("realm", Field::string()),
    )
}

pub(super) fn basic_auth() -> Record {
    auth_plugin(
        Record::new()
            .field("anonymous", Field::string())
            .field("hide_credentials", flag(false))
            .field(
                "realm",
                Field::string().required().default(json!("service")),
            ),
    )
}

pub(super) fn jwt() -> Record {
    auth_plugin(
        Record::new()
            .field(
                "uri_param_names",
                Field::set(Field::string()).default(json!(["jwt"])),
            )
            .field(
                "cookie_names",
                Field::set(Field::string()).default(json!([])),
            )
            .field("key_claim_name", Field::string().default(json!("iss")))
            .field("secret_is_base64", flag(false))
            .field(
                "claims_to_verify",
                Field::set(Field::string().one_of(["exp", "nbf"])),
            )
            .field("anonymous", Field::string())
            .field("run_on_preflight", flag(true))
            .field(
                "maximum_expiration",
                Field::number().default(json!(0)).between(0.0, 31_536_000.0),
            )
            .field(
                "header_names",
                Field::set(Field::string()).default(json!(["authorization"])),
            )
            .field("realm", Field::string()),
    )
    .check(EntityCheck::conditional(
        "config.maximum_expiration",
        matcher().gt(0.0),
        "config.claims_to_verify",
        matcher().contains(json!("exp")),
    ))
}

pub(super) fn acl() -> Record {
    auth_plugin(
        Record::new()
            .field("allow", Field::array(Field::string()))
            .field("deny", Field::array(Field::string()))
            .field("hide_groups_header", flag(false))
            .field("always_use_authenticated_groups", flag(false)),
    )
    .check(EntityCheck::OnlyOneOf(vec!["config.allow", "config.deny"]))
    .check(EntityCheck::AtLeastOneOf(vec![
        "config.allow",
        "config.deny",
    ]))
}

pub(super) fn hmac_auth() -> Record {
    const ALGORITHMS: [&str; 4] = ["hmac-sha1", "hmac-sha256", "hmac-sha384", "hmac-sha512"];
    auth_plugin(
        Record::new()
            .field("hide_credentials", flag(false))
            .field("clock_skew", Field::number().default(json!(300)).gt(0.0))
            .field("anonymous", Field::string())
            .field("validate_request_body", flag(false))
            .field(
                "enforce_headers",
                Field::array(Field::string()).default(json!([])),
            )
            .field(
                "algorithms",
                Field::array(Field::string().one_of(ALGORITHMS)).default(json!(ALGORITHMS)),
            )
            .field("realm", Field::string()),
    )
}

fn validate_flows(v: &Value) -> Result<(), String> {
    let truthy = |k: &str| {
        !matches!(
            v.get(k),
            None | Some(Value::Null) | Some(Value::Bool(false))
        )
    };
    if truthy("enable_authorization_code")
        || truthy("enable_implicit_grant")
        || truthy("enable_client_credentials")
        || truthy("enable_password_grant")
    {
        Ok(())
    } else {
        Err(
            "at least one of these fields must be true: enable_authorization_code, \
             enable_implicit_grant, enable_client_credentials, enable_password_grant"
                .into(),
        )
    }
}

pub(super) fn oauth2() -> Record {
    let cfg = Record::new()
        .field("scopes", Field::array(Field::string()))
        .field("mandatory_scope", flag(false))
        .field(
            "provision_key",
            Field::string().unique().auto().required().encrypted(),
        )
        .field(
            "token_expiration",
            Field::number().default(json!(7200)).required(),
        )
        .field("enable_authorization_code", flag(false))
        .field("enable_implicit_grant", flag(false))
        .field("enable_client_credentials", flag(false))
        .field("enable_password_grant", flag(false))
        .field("hide_credentials", flag(false))
        .field("accept_http_if_already_terminated", flag(false))
        .field("anonymous", Field::string())
        .field("global_credentials", flag(false))
        .field(
            "auth_header_name",
            Field::string().default(json!("authorization")),
        )
        .field(
            "refresh_token_ttl",
            ttl().default(json!(1_209_600)).required(),
        )
        .field("reuse_refresh_token", flag(false))
        .field(
            "pkce",
            Field::string()
                .default(json!("lax"))
                .one_of(["none", "lax", "strict"]),
        )
        .field("realm", Field::string())
        .check(EntityCheck::conditional(
            "mandatory_scope",
            matcher().eq(json!(true)),
            "scopes",
            matcher().required(),
        ));
    auth_head(config(cfg).custom(validate_flows))
}

/// Kong's session secret default: 32 random bytes in base64 where `/`, `+`
/// and `=` are each replaced by one random digit, upper- and lower-case
/// letter. Kong computes it once when the schema loads; so do we.
fn session_secret() -> String {
    let mut rng = rand::thread_rng();
    let bytes: [u8; 32] = rng.gen();
    let digit = char::from(rng.gen_range(b'0'..=b'9'));
    let upper = char::from(rng.gen_range(b'A'..=b'Z'));
    let lower = char::from(rng.gen_range(b'a'..=b'z'));
    base64::engine::general_purpose::STANDARD
        .encode(bytes)
        .replace('/', &digit.to_string())
        .replace('+', &upper.to_string())
        .replace('=', &lower.to_string())
}

fn single(key: &str, v: Value) -> Option<Map<String, Value>> {
    let mut m = Map::new();
    m.insert(key.to_owned(), v);
    Some(m)
}

pub(super) fn session() -> Record {
    let headers = || {
        Field::set(Field::string().one_of([
            "id",
            "audience",
            "subject",
            "timeout",
            "idling-timeout",
            "rolling-timeout",
            "absolute-timeout",
        ]))
    };
    let number = |d: i64| Field::number().default(json!(d));
    let string = |d: &str| Field::string().default(json!(d));
    let boolean = |d: bool| Field::boolean().default(json!(d));
    let cfg = Record::new()
        .field(
            "secret",
            Field::string()
                .default(json!(session_secret()))
                .encrypted()
                .referenceable(),
        )
        .field(
            "storage",
            Field::string()
                .one_of(["cookie", "kong"])
                .default(json!("cookie")),
        )
        .field("audience", string("default"))
        .field("idling_timeout", number(900))
        .field("rolling_timeout", number(3600))
        .field("absolute_timeout", number(86400))
        .field("stale_ttl", number(10))
        .field("cookie_name", string("session"))
        .field("cookie_path", string("/"))
        .field("cookie_domain", Field::string())
        .field(
            "cookie_same_site",
            Field::string()
                .default(json!("Strict"))
                .one_of(["Strict", "Lax", "None", "Default"]),
        )
        .field("cookie_http_only", boolean(true))
        .field("cookie_secure", boolean(true))
        .field("remember", boolean(false))
        .field("remember_cookie_name", string("remember"))
        .field("remember_rolling_timeout", number(604_800))
        .field("remember_absolute_timeout", number(2_592_000))
        .field("response_headers", headers())
        .field("request_headers", headers())
        .field("read_body_for_logout", boolean(false))
        .field(
            "logout_methods",
            Field::set(Field::string().one_of(["GET", "POST", "DELETE"]))
                .default(json!(["POST", "DELETE"])),
        )
        .field("logout_query_arg", string("session_logout"))
        .field("logout_post_arg", string("session_logout"))
        .field("hash_subject", boolean(false))
        .field("store_metadata", boolean(false))
        .shorthand("cookie_lifetime", Field::number(), |v| {
            single("rolling_timeout", v.clone())
        })
        .shorthand("cookie_idletime", Field::number(), |v| {
            let v = if v.is_null() { json!(0) } else { v.clone() };
            single("idling_timeout", v)
        })
        .shorthand("cookie_renew", Field::number(), |_| None)
        .shorthand("cookie_discard", Field::number(), |v| {
            single("stale_ttl", v.clone())
        })
        .shorthand("cookie_samesite", Field::string(), |v| {
            let v = if v.as_str() == Some("off") {
                json!("Lax")
            } else {
                v.clone()
            };
            single("cookie_same_site", v)
        })
        .shorthand("cookie_httponly", Field::boolean(), |v| {
            single("cookie_http_only", v.clone())
        })
        .shorthand("cookie_persistent", Field::boolean(), |v| {
            single("remember", v.clone())
        });
    Record::new()
        .field("consumer", no_consumer())
        .field("protocols", t::protocols())
        .field("config", config(cfg))
}
