//! Request and response transformation plugins, gRPC bridges and the
//! serverless functions.

use serde_json::{json, Value};

use super::{check_header_name, config, nested, no_consumer};
use crate::entities::typedefs as t;
use crate::schema::{EntityCheck, Field, Record};

/// Lua's `pair:match("^([^:]+):*(.-)$")`: the name before the first colon
/// (at least one character) and the value after the colons that follow it.
fn split_pair(pair: &str) -> Option<(&str, &str)> {
    let colon = pair.find(':').unwrap_or(pair.len());
    if colon == 0 {
        return None;
    }
    let (name, rest) = pair.split_at(colon);
    Some((name, rest.trim_start_matches(':')))
}

fn validate_headers(pair: &str, validate_value: bool) -> Result<(), String> {
    let Some((name, value)) = split_pair(pair) else {
        return Err("'nil' is not a valid header".into());
    };
    if check_header_name(name).is_err() {
        return Err(format!("'{name}' is not a valid header"));
    }
    if validate_value && check_header_name(value).is_err() {
        return Err(format!("'{value}' is not a valid header"));
    }
    Ok(())
}

fn validate_header_pair(v: &Value) -> Result<(), String> {
    validate_headers(v.as_str().unwrap_or(""), false)
}

fn validate_colon_headers(v: &Value) -> Result<(), String> {
    validate_headers(v.as_str().unwrap_or(""), true)
}

/// Entries must be `key:value` with a non-empty value. Kong also compiles
/// the value as a Penlight template (Lua code inside `$(...)`), which we
/// cannot do; any value is accepted.
fn check_for_value(v: &Value) -> Result<(), String> {
    let entry = v.as_str().unwrap_or("");
    match split_pair(entry) {
        Some((_, value)) if !value.is_empty() => Ok(()),
        Some((name, _)) => Err(format!("key '{name}' has no value")),
        None => Err("key '' has no value".into()),
    }
}

fn array_of(el: Field) -> Field {
    Field::array(el).default(json!([])).required()
}

fn colon_entry() -> Field {
    Field::string().matches("^[^:]+:.*$", "^[^:]+:.*$")
}

pub(super) fn request_transformer() -> Record {
    let strings = || array_of(Field::string());
    let colon_strings = || array_of(Field::string().custom(check_for_value));
    let colon_header_values = || array_of(colon_entry().custom(validate_header_pair));
    let colon_strings_record = || {
        Record::new()
            .field("body", colon_strings())
            .field("headers", colon_header_values())
            .field("querystring", colon_strings())
    };
    let remove = Record::new()
        .field("body", strings())
        .field(
            "headers",
            array_of(Field::string().custom(validate_header_pair)),
        )
        .field("querystring", strings());
    let rename = Record::new()
        .field("body", colon_strings())
        .field(
            "headers",
            array_of(colon_entry().custom(validate_colon_headers)),
        )
        .field("querystring", colon_strings());
    let replace = colon_strings_record().field("uri", Field::string());
    Record::new().field("protocols", t::protocols()).field(
        "config",
        config(
            Record::new()
                .field("http_method", t::http_method())
                .field("remove", nested(remove))
                .field("rename", nested(rename))
                .field("replace", nested(replace))
                .field("add", nested(colon_strings_record()))
                .field("append", nested(colon_strings_record())),
        ),
    )
}

pub(super) fn response_transformer() -> Record {
    let strings = || array_of(Field::string());
    let colon_strings = || array_of(colon_entry());
    let colon_record = || {
        Record::new()
            .field("json", colon_strings())
            .field(
                "json_types",
                array_of(Field::string().one_of(["boolean", "number", "string"])),
            )
            .field("headers", colon_strings())
    };
    let remove = Record::new()
        .field("json", strings())
        .field("headers", strings());
    let rename = Record::new().field("json", colon_strings()).field(
        "headers",
        array_of(colon_entry().custom(validate_colon_headers)),
    );
    Record::new().field("protocols", t::protocols_http()).field(
        "config",
        config(
            Record::new()
                .field("remove", nested(remove))
                .field("rename", nested(rename))
                .field("replace", nested(colon_record()))
                .field("add", nested(colon_record()))
                .field("append", nested(colon_record())),
        ),
    )
}

pub(super) fn correlation_id() -> Record {
    Record::new().field("protocols", t::protocols_http()).field(
        "config",
        config(
            Record::new()
                .field(
                    "header_name",
                    Field::string().default(json!("Kong-Request-ID")),
                )
                .field(
                    "generator",
                    Field::string()
                        .default(json!("uuid#counter"))
                        .required()
                        .one_of(["uuid", "uuid#counter", "tracker"]),
                )
                .field(
                    "echo_downstream",
                    Field::boolean().required().default(json!(false)),
                ),
        ),
    )
}

pub(super) fn grpc_web() -> Record {
    Record::new().field("protocols", t::protocols()).field(
        "config",
        config(
            Record::new()
                .field("proto", Field::string())
                .field("pass_stripped_path", Field::boolean())
                .field("allow_origin_header", Field::string().default(json!("*"))),
        ),
    )
}

pub(super) fn grpc_gateway() -> Record {
    Record::new().field("protocols", t::protocols()).field(
        "config",
        config(Record::new().field("proto", Field::string())),
    )
}

/// pre-function and post-function. Kong compiles each function with
/// `loadstring` ("error parsing <plugin>: ..."); we cannot compile Lua, so
/// any string is accepted.
fn serverless() -> Record {
    const PHASES: [&str; 6] = [
        "certificate",
        "rewrite",
        "access",
        "header_filter",
        "body_filter",
        "log",
    ];
    let mut cfg = Record::new();
    for phase in PHASES {
        cfg = cfg.field(
            phase,
            Field::array(Field::string()).required().default(json!([])),
        );
    }
    Record::new()
        .field("consumer", no_consumer())
        .field("protocols", t::protocols())
        .field("config", config(cfg))
        .check(EntityCheck::AtLeastOneOf(vec![
            "config.certificate",
            "config.rewrite",
            "config.access",
            "config.header_filter",
            "config.body_filter",
            "config.log",
        ]))
}

pub(super) fn pre_function() -> Record {
    serverless()
}

pub(super) fn post_function() -> Record {
    serverless()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_pairs_like_lua() {
        assert_eq!(split_pair("a:b"), Some(("a", "b")));
        assert_eq!(split_pair("a::b:c"), Some(("a", "b:c")));
        assert_eq!(split_pair("a"), Some(("a", "")));
        assert_eq!(split_pair(":b"), None);
    }
}
