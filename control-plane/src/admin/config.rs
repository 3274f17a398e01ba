//! `POST /config` and `GET /config`: a whole declarative configuration in
//! and out (Kong's DB-less endpoint, `kong/api/routes/config.lua`), here on
//! any store. A `POST` replaces the configuration atomically: one
//! transaction, one config version, one delta to data planes. `GET`
//! exports the configuration as a decK 3.0 file, with the configuration
//! hash in `ETag`; a `POST` with `If-Match` applies only over that hash,
//! so two writers cannot silently overwrite each other.

use bytes::Bytes;
use gatehouse_model::declarative::{self, Declarative, DeclarativeError};
use gatehouse_model::entities::ENTITIES;
use gatehouse_model::error::lua_pretty;
use gatehouse_model::DbError;
use http::{header, HeaderMap, StatusCode};
use http_body_util::BodyExt;
use serde_json::{json, Map, Value};

use super::{message, reply, AdminState, Reply};
use crate::dao::{DeclarativeLoadError, LoadOptions};

/// Declarative files are larger than entity bodies: 20,000 consumers with
/// credentials are a few MB.
const MAX_CONFIG_BYTES: usize = 256 * 1024 * 1024;

/// Kong's `DECLARATIVE_CONFIG` error code.
const CODE: u16 = 14;

fn truthy(value: &str) -> bool {
    matches!(
        value.to_ascii_lowercase().as_str(),
        "true" | "1" | "on" | "yes"
    )
}

/// Kong's 400 for a file that does not load, with the flattened list when
/// asked for (`flatten_errors`).
fn invalid(fields: Value, flattened: Option<Vec<Value>>) -> Reply {
    let mut body = json!({
        "code": CODE,
        "name": "invalid declarative configuration",
        "message": format!("declarative config is invalid: {}", lua_pretty(&fields, None)),
        "fields": fields,
    });
    if let Some(list) = flattened {
        body["flattened_errors"] = Value::Array(list);
    }
    reply(StatusCode::BAD_REQUEST, body)
}

/// The file a request carries: a JSON body that is the file, or holds it
/// as `config` (text or object); a form's `config`; or the raw YAML/JSON
/// body. Options may come in the body too.
fn config_from_request(
    headers: &HeaderMap,
    bytes: &[u8],
    options: &mut Vec<(String, String)>,
) -> Result<Value, Reply> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    let expected = || {
        message(
            StatusCode::BAD_REQUEST,
            "expected a declarative configuration",
        )
    };
    let text = if content_type.starts_with("application/json") {
        let Ok(Value::Object(mut body)) = serde_json::from_slice::<Value>(bytes) else {
            return Err(message(StatusCode::BAD_REQUEST, "Cannot parse JSON body"));
        };
        if body.contains_key("_format_version") {
            return Ok(Value::Object(body));
        }
        for option in ["flatten_errors", "check_hash"] {
            if let Some(v) = body.remove(option) {
                let v = match v {
                    Value::String(s) => s,
                    other => other.to_string(),
                };
                options.push((option.to_owned(), v));
            }
        }
        match body.remove("config") {
            Some(Value::String(text)) => text,
            Some(object @ Value::Object(_)) => return Ok(object),
            _ => return Err(expected()),
        }
    } else if content_type.starts_with("application/x-www-form-urlencoded") {
        let mut text = None;
        for (k, v) in form_urlencoded::parse(bytes) {
            if k == "config" {
                text = Some(v.into_owned());
            } else {
                options.push((k.into_owned(), v.into_owned()));
            }
        }
        text.ok_or_else(expected)?
    } else {
        String::from_utf8_lossy(bytes).into_owned()
    };
    if text.trim().is_empty() {
        return Err(expected());
    }
    declarative::parse_text(&text).map_err(|error| parse_error(&error))
}

fn parse_error(error: &DeclarativeError) -> Reply {
    match error {
        DeclarativeError::Parse(text) => invalid(json!({ "error": text }), None),
        DeclarativeError::Invalid(fields) => invalid(fields.clone(), None),
    }
}

pub(super) async fn post(
    st: &AdminState,
    headers: &HeaderMap,
    body: axum::body::Body,
    query: &[(String, String)],
) -> Reply {
    let bytes: Bytes = match http_body_util::Limited::new(body, MAX_CONFIG_BYTES)
        .collect()
        .await
    {
        Ok(collected) => collected.to_bytes(),
        Err(_) => return message(StatusCode::PAYLOAD_TOO_LARGE, "Request size limit exceeded"),
    };
    let mut options = query.to_vec();
    let input = match config_from_request(headers, &bytes, &mut options) {
        Ok(input) => input,
        Err(reply) => return reply,
    };
    let option = |name: &str| options.iter().any(|(k, v)| k == name && truthy(v));
    let flatten_errors = option("flatten_errors");
    let check_hash = options.iter().any(|(k, v)| k == "check_hash" && v == "1");
    let decl = match declarative::flatten(input) {
        Ok(decl) => decl,
        Err(error) => return parse_error(&error),
    };
    let expected = headers
        .get(header::IF_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.trim()
                .trim_start_matches("W/")
                .trim_matches('"')
                .to_owned()
        });
    let dry_run = option("dry_run");
    // `select_tags=a,b`, or the file's own `_info.select_tags` (decK
    // writes them into dumps).
    let mut select_tags: Vec<String> = options
        .iter()
        .filter(|(k, _)| k == "select_tags")
        .flat_map(|(_, v)| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(str::to_owned)
        .collect();
    if select_tags.is_empty() {
        select_tags = decl.input["_info"]["select_tags"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|t| t.as_str().map(str::to_owned))
            .collect();
    }
    let load = LoadOptions {
        expected_hash: expected,
        dry_run,
        select_tags,
    };
    match st.dao.load_declarative(&decl, &load).await {
        // Ours: what a load would change, committing nothing (the CLI's
        // `diff`, and `sync`'s plan, which it then applies with If-Match).
        Ok(loaded) if dry_run => reply(
            StatusCode::OK,
            json!({"changes": loaded.plan, "hash": loaded.base_hash}),
        ),
        Ok(loaded) if loaded.changes == 0 && check_hash => reply_status(StatusCode::NOT_MODIFIED),
        Ok(loaded) => reply(StatusCode::CREATED, loaded.entities),
        Err(DeclarativeLoadError::Entities(errors)) => entity_errors(&decl, errors, flatten_errors),
        Err(DeclarativeLoadError::Precondition { current }) => reply(
            StatusCode::PRECONDITION_FAILED,
            json!({
                "message": format!(
                    "the configuration changed: its hash is {current}, not the one in If-Match"
                ),
            }),
        ),
        Err(DeclarativeLoadError::Dao(error)) => {
            tracing::error!(error = %error, "Loading a declarative configuration failed.");
            message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "An unexpected error occurred",
            )
        }
    }
}

fn reply_status(status: StatusCode) -> Reply {
    Reply {
        status,
        body: None,
        allow: None,
        etag: None,
    }
}

/// Field → message pairs of a validation error, as Kong's
/// `categorize_errors` walks it: keys in sorted order, nested records and
/// array elements joined with dots (`config.paths.1`, 1-based), `@entity`
/// messages apart (no field).
fn field_errors(prefix: &str, errors: &Value, out: &mut Vec<(Option<String>, String)>) {
    let join = |key: &str| {
        if prefix.is_empty() {
            key.to_owned()
        } else {
            format!("{prefix}.{key}")
        }
    };
    match errors {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            for key in keys {
                let error = &map[key];
                if key == "@entity" {
                    let messages: Vec<&Value> = match error {
                        Value::Array(list) => list.iter().collect(),
                        other => vec![other],
                    };
                    out.extend(
                        messages
                            .into_iter()
                            .filter_map(|m| Some((None, m.as_str()?.to_owned()))),
                    );
                } else {
                    field_errors(&join(key), error, out);
                }
            }
        }
        Value::Array(list) => {
            for (i, error) in list.iter().enumerate() {
                field_errors(&join(&(i + 1).to_string()), error, out);
            }
        }
        Value::String(message) => out.push((Some(prefix.to_owned()), message.clone())),
        _ => {}
    }
}

/// The error fields Kong shows for one entity that does not validate.
fn entity_error_fields(error: &DbError) -> Map<String, Value> {
    match error.to_json().get("fields") {
        Some(Value::Object(fields))
            if matches!(
                error,
                DbError::SchemaViolation(_) | DbError::ForeignKeysUnresolved(_)
            ) =>
        {
            fields.clone()
        }
        _ => {
            let mut one = Map::new();
            one.insert("@entity".into(), json!([error.to_string()]));
            one
        }
    }
}

fn entity_errors(decl: &Declarative, errors: Vec<(usize, DbError)>, flatten: bool) -> Reply {
    let mut fields = Value::Object(Map::new());
    let mut flattened = Vec::new();
    for (index, error) in errors {
        let Some(item) = decl.items.get(index) else {
            continue;
        };
        let entity_fields = entity_error_fields(&error);
        place(
            &mut fields,
            &item.path,
            Value::Object(entity_fields.clone()),
        );
        if flatten {
            let mut pairs = Vec::new();
            field_errors("", &Value::Object(entity_fields.clone()), &mut pairs);
            let entity = decl.input_at(&item.path).cloned().unwrap_or(Value::Null);
            let mut entry = json!({
                "entity_type": item.entity.strip_suffix('s').unwrap_or(item.entity),
                "entity": entity,
                "errors": pairs.into_iter().map(|(field, message)| match field {
                    Some(field) => json!({"type": "field", "field": field, "message": message}),
                    None => json!({"type": "entity", "message": message}),
                }).collect::<Vec<_>>(),
            });
            for (key, source) in [
                ("entity_id", "id"),
                ("entity_name", "name"),
                ("entity_tags", "tags"),
            ] {
                if let Some(v) = item.fields.get(source).filter(|v| !v.is_null()) {
                    entry[key] = v.clone();
                }
            }
            flattened.push(entry);
        }
    }
    invalid(fields, flatten.then_some(flattened))
}

/// Puts `errors` at `path` in Kong's nested error table.
fn place(node: &mut Value, path: &[(&'static str, usize)], errors: Value) {
    let Some(((entity, index), rest)) = path.split_first() else {
        return;
    };
    let Value::Object(map) = node else { return };
    let list = map
        .entry(entity.to_string())
        .or_insert_with(|| Value::Array(Vec::new()));
    let Value::Array(items) = list else { return };
    while items.len() <= *index {
        items.push(Value::Null);
    }
    if rest.is_empty() {
        match (&mut items[*index], errors) {
            (Value::Object(existing), Value::Object(new)) => existing.extend(new),
            (slot, errors) => *slot = errors,
        }
        return;
    }
    if !items[*index].is_object() {
        items[*index] = Value::Object(Map::new());
    }
    place(&mut items[*index], rest, errors);
}

/// `GET /config`: Kong's export (`kong/db/declarative/export.lua`): a
/// `_format_version` "3.0" file with `_transform: false`, every entity at
/// the top level and foreign keys as plain ids, as YAML in `config`.
pub(super) fn get(st: &AdminState) -> (Reply, String) {
    let (file, hash) = st.dao.read(|state| {
        let mut file = Map::new();
        file.insert("_format_version".into(), json!("3.0"));
        file.insert("_transform".into(), json!(false));
        for schema in ENTITIES.iter() {
            let mut list = Vec::new();
            for mut entity in state.iter(schema.name) {
                for (field, _, _) in schema.foreign_fields() {
                    if let Some(Value::Object(reference)) = entity.get(field) {
                        let id = reference.get("id").cloned().unwrap_or(Value::Null);
                        entity.insert(field.to_owned(), id);
                    }
                }
                list.push(Value::Object(entity));
            }
            if !list.is_empty() {
                file.insert(schema.name.to_owned(), Value::Array(list));
            }
        }
        (Value::Object(file), state.hash())
    });
    let text = declarative::to_yaml(&file);
    (reply(StatusCode::OK, json!({ "config": text })), hash)
}
