//! Kong/decK declarative configuration files (`_format_version` "3.0",
//! and "1.1"/"2.1" read with Kong's rules): YAML or JSON text into a flat
//! list of entities in dependency order, as `kong/db/schema/others/
//! declarative_config.lua` flattens them. Nested entities (routes under a
//! service, credentials under a consumer, targets under an upstream, or
//! any entity under one it references) get their parent's foreign key;
//! references by name become references by id; entities without an id get
//! Kong's deterministic one (a UUID v5 of their cache key or endpoint key)
//! so that loading the same file again does not churn ids. Validation of
//! each entity against its schema is the store's job, with the same code
//! as the Admin API; this module reports what is wrong with the file's
//! shape, keyed by where in the file it is.

use serde_json::{json, Map, Value};
use uuid::Uuid;

use crate::entities::{self, ENTITIES};
use crate::schema::{is_uuid, EntitySchema, OnDelete};

type Entity = Map<String, Value>;

/// Versions whose files load; `1.1` and `2.1` files have Kong 2.x shapes
/// that 3.x reads too (regex paths without `~` are the one difference Kong
/// migrates, see [`Declarative::legacy_paths`]).
const FORMAT_VERSIONS: [&str; 3] = ["1.1", "2.1", "3.0"];

/// Kong's namespace for declarative ids (`uuid_generators._entities`).
const ENTITIES_NAMESPACE: Uuid = Uuid::from_u128(0xfd02801f_0957_4a15_a55a_c8d9606f30b5);

/// Where an entity is in the file: `(entity name, index)` from the top,
/// indexes from 0.
pub type FilePath = Vec<(&'static str, usize)>;

/// One entity of the file, flattened.
#[derive(Clone, Debug, PartialEq)]
pub struct Item {
    pub entity: &'static str,
    /// The entity's fields without nested children; foreign keys are
    /// `{"id": …}`.
    pub fields: Entity,
    pub path: FilePath,
    /// The file gave no id and Kong's rules derive none: the id is random,
    /// and a store may instead give the entity the id of the one it
    /// already holds (same unique field, or same content).
    pub random_id: bool,
}

/// A parsed file.
#[derive(Clone, Debug, Default)]
pub struct Declarative {
    pub format_version: String,
    /// `_transform` (default true): whether fields are transformed on
    /// load, as basic-auth passwords are hashed.
    pub transform: bool,
    /// Every entity, in dependency order (the order of `ENTITIES`), each
    /// kind in file order.
    pub items: Vec<Item>,
    /// The file as parsed (for Kong's flattened errors, which quote the
    /// entity as written).
    pub input: Value,
}

/// What is wrong with a file, before entities are validated.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum DeclarativeError {
    /// Neither JSON nor YAML, or not a mapping at the top.
    #[error("{0}")]
    Parse(String),
    /// Kong's error table, in the file's shape: `{"services": [{"name":
    /// "..."}]}`.
    #[error("declarative config is invalid")]
    Invalid(Value),
}

/// Reads YAML or JSON text (JSON is tried first: YAML parsing of a large
/// JSON file is slower, and JSON is YAML anyway).
pub fn parse_text(text: &str) -> Result<Value, DeclarativeError> {
    if let Ok(value) = serde_json::from_str::<Value>(text) {
        return Ok(value);
    }
    let value: Value = serde_yaml_ng::from_str(text).map_err(|e| {
        DeclarativeError::Parse(format!("failed parsing declarative configuration: {e}"))
    })?;
    Ok(value)
}

/// A file as YAML text (`GET /config`, Kong's export format).
pub fn to_yaml(file: &Value) -> String {
    serde_yaml_ng::to_string(file).unwrap_or_default()
}

/// Error tables, collected while walking the file.
#[derive(Default)]
struct Errors {
    top: Map<String, Value>,
}

impl Errors {
    /// Records `error` (a map of field → message) for the entity at `path`.
    fn at(&mut self, path: &[(&'static str, usize)], field: &str, message: Value) {
        let mut node = &mut self.top;
        for (depth, (entity, index)) in path.iter().enumerate() {
            let list = node
                .entry(entity.to_string())
                .or_insert_with(|| Value::Array(Vec::new()));
            let Value::Array(items) = list else { return };
            while items.len() <= *index {
                items.push(Value::Null);
            }
            if !items[*index].is_object() {
                items[*index] = Value::Object(Map::new());
            }
            let Value::Object(next) = &mut items[*index] else {
                return;
            };
            node = next;
            if depth + 1 == path.len() {
                node.insert(field.to_owned(), message);
                return;
            }
        }
    }

    fn top(&mut self, field: &str, message: &str) {
        self.top.insert(field.to_owned(), json!(message));
    }
}

/// Flattens a parsed file. `Invalid` names every problem found.
pub fn flatten(input: Value) -> Result<Declarative, DeclarativeError> {
    let Value::Object(top) = &input else {
        return Err(DeclarativeError::Parse(
            "expected an object as declaration".to_owned(),
        ));
    };
    let mut errors = Errors::default();
    let format_version = match top.get("_format_version") {
        Some(Value::String(v)) if FORMAT_VERSIONS.contains(&v.as_str()) => v.clone(),
        Some(Value::String(_)) => {
            errors.top("_format_version", "expected one of: 1.1, 2.1, 3.0");
            String::new()
        }
        Some(_) => {
            errors.top("_format_version", "expected a string");
            String::new()
        }
        None => {
            errors.top("_format_version", "required field missing");
            String::new()
        }
    };
    let transform = match top.get("_transform") {
        None | Some(Value::Null) => true,
        Some(Value::Bool(b)) => *b,
        Some(_) => {
            errors.top("_transform", "expected a boolean");
            true
        }
    };
    for (key, value) in top {
        match key.as_str() {
            "_format_version" | "_transform" => {}
            // decK's metadata; Kong never sees it.
            "_info" | "_workspace" | "_konnect" => {}
            "_comment" | "_ignore" => {
                if let Some(message) = annotation_error(key, value) {
                    errors.top(key, message);
                }
            }
            _ if entities::entity(key).is_none() => errors.top(key, "unknown field"),
            _ => {}
        }
    }

    let mut walk = Walk {
        items: Vec::new(),
        errors,
    };
    for schema in ENTITIES.iter() {
        if let Some(list) = top.get(schema.name) {
            walk.list(schema, list, &[], None);
        }
    }
    let Walk {
        mut items,
        mut errors,
    } = walk;
    if format_version == "1.1" || format_version == "2.1" {
        for item in items.iter_mut().filter(|item| item.entity == "routes") {
            if let Some(Value::Array(paths)) = item.fields.get_mut("paths") {
                for path in paths.iter_mut() {
                    if let Value::String(text) = path {
                        *text = migrate_path(text);
                    }
                }
            }
        }
    }
    // Parents come before children whatever the nesting: the order of
    // `ENTITIES` is one in which references point backwards.
    let rank = |entity: &str| {
        ENTITIES
            .iter()
            .position(|e| e.name == entity)
            .unwrap_or(usize::MAX)
    };
    items.sort_by_key(|item| rank(item.entity));
    resolve_references(&mut items, &mut errors);
    if !errors.top.is_empty() {
        return Err(DeclarativeError::Invalid(Value::Object(errors.top)));
    }
    Ok(Declarative {
        format_version,
        transform,
        items,
        input,
    })
}

struct Walk {
    items: Vec<Item>,
    errors: Errors,
}

/// The entity a nested item hangs under: its kind, its id, and the
/// child's field that references it.
struct Parent<'a> {
    id: &'a str,
    field: &'static str,
}

impl Walk {
    fn list(
        &mut self,
        schema: &'static EntitySchema,
        list: &Value,
        path: &[(&'static str, usize)],
        parent: Option<&Parent<'_>>,
    ) {
        let Value::Array(list) = list else {
            let mut at = path.to_vec();
            if let Some(last) = at.pop() {
                self.errors
                    .at(&[last], schema.name, json!("expected an array"));
            } else {
                self.errors.top(schema.name, "expected an array");
            }
            return;
        };
        for (index, item) in list.iter().enumerate() {
            let mut here = path.to_vec();
            here.push((schema.name, index));
            let Value::Object(item) = item else {
                self.errors
                    .at(&here, "@entity", json!(["expected a record"]));
                continue;
            };
            self.item(schema, item, here, parent);
        }
    }

    fn item(
        &mut self,
        schema: &'static EntitySchema,
        item: &Entity,
        path: FilePath,
        parent: Option<&Parent<'_>>,
    ) {
        let mut fields = Entity::new();
        let mut children = Vec::new();
        for (key, value) in item {
            // Kong's annotations: checked, then dropped.
            if key == "_comment" || key == "_ignore" {
                if let Some(message) = annotation_error(key, value) {
                    self.errors.at(&path, key, json!(message));
                }
                continue;
            }
            match child_schema(schema, key) {
                Some((child, field)) => children.push((child, field, value)),
                None => {
                    fields.insert(key.clone(), value.clone());
                }
            }
        }
        if let Some(parent) = parent {
            match fields.get(parent.field) {
                None | Some(Value::Null) => {
                    fields.insert(parent.field.to_owned(), json!({ "id": parent.id }));
                }
                // Kong refuses a nested entity that names another parent.
                Some(_) => {
                    self.errors.at(
                        &path,
                        parent.field,
                        json!(format!(
                            "value must be null (the entity is nested under its {})",
                            parent.field
                        )),
                    );
                }
            }
        }
        if !fields.contains_key("id") {
            if let Some(id) = generated_id(schema, &fields, parent) {
                fields.insert("id".to_owned(), json!(id));
            }
        }
        let mut random_id = false;
        let id = match fields.get("id") {
            Some(Value::String(id)) => id.clone(),
            // Children need their parent's id: one it will get later
            // (random, as Kong gives entities without a key) is made now.
            _ => {
                random_id = true;
                let id = Uuid::new_v4().to_string();
                fields.insert("id".to_owned(), json!(id));
                id
            }
        };
        for (child, field, value) in children {
            let parent = Parent { id: &id, field };
            self.list(child, value, &path, Some(&parent));
        }
        self.items.push(Item {
            entity: schema.name,
            fields,
            path,
            random_id,
        });
    }
}

/// What is wrong with a `_comment` (a string) or `_ignore` (an array).
fn annotation_error(key: &str, value: &Value) -> Option<&'static str> {
    match (key, value) {
        ("_comment", Value::String(_)) | ("_ignore", Value::Array(_)) => None,
        ("_comment", _) => Some("expected a string"),
        _ => Some("expected an array"),
    }
}

/// Kong's migration of a 2.x route path (`kong/db/migrations/
/// migrate_path_280_300.lua`, applied to 1.1 and 2.1 files): a path of
/// plain characters is normalized (slashes merged); anything else was a
/// regex, which 3.x marks with `~`, its percent-escapes decoded (regex
/// metacharacters escaped, reserved characters kept encoded).
fn migrate_path(path: &str) -> String {
    let plain = path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-~/%".contains(&b));
    if plain {
        let mut merged = String::with_capacity(path.len());
        for ch in crate::uri::normalize(path).chars() {
            if !(ch == '/' && merged.ends_with('/')) {
                merged.push(ch);
            }
        }
        return merged;
    }
    let mut out = String::from("~");
    let mut i = 0;
    while i < path.len() {
        let escape = (path.as_bytes()[i] == b'%')
            .then(|| path.get(i + 1..i + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escape {
            Some(b) if b"!#$%&'()*+,/:;=?@[]".contains(&b) => {
                out.push_str(&path[i..i + 3].to_ascii_uppercase());
                i += 3;
            }
            Some(b) if b".^-{}\\|".contains(&b) => {
                out.push('\\');
                out.push(b as char);
                i += 3;
            }
            Some(b) if b.is_ascii() => {
                out.push(b as char);
                i += 3;
            }
            _ => {
                let ch = path[i..].chars().next().unwrap_or('\u{fffd}');
                out.push(ch);
                i += ch.len_utf8();
            }
        }
    }
    out
}

/// The entity kind nested under `schema` as `key`, and the child's field
/// that references `schema` (Kong's `nest_foreign_relationships`).
fn child_schema(schema: &EntitySchema, key: &str) -> Option<(&'static EntitySchema, &'static str)> {
    let child = entities::entity(key)?;
    let (field, _, _) = child
        .foreign_fields()
        .find(|(_, _, reference)| *reference == schema.name)?;
    Some((child, field))
}

/// Kong's deterministic id (`get_key_for_uuid_gen`): from the cache key
/// for entities that have one, else from the endpoint key (composed with
/// the parent's id when it is unique only within the parent, as targets'
/// `target`); none otherwise.
fn generated_id(
    schema: &EntitySchema,
    item: &Entity,
    parent: Option<&Parent<'_>>,
) -> Option<String> {
    schema.field("id")?;
    let key = if !schema.cache_key.is_empty() {
        let mut parts = vec![schema.name.to_owned(), "*".to_owned()];
        for k in &schema.cache_key {
            let field = schema.field(k)?;
            if field.auto {
                return None;
            }
            match item.get(*k) {
                Some(Value::String(s)) => parts.push(s.clone()),
                None | Some(Value::Null) => match parent {
                    // A nested item's foreign key is set after this in
                    // Kong: the parent's id stands for it.
                    Some(p) if p.field == *k => parts.push(p.id.to_owned()),
                    _ if field.required => return None,
                    _ => parts.push(String::new()),
                },
                // A reference written as a record is left out, as Kong
                // does.
                Some(Value::Object(reference)) => match (parent, reference.get("id")) {
                    (Some(p), Some(Value::String(id))) if p.field == *k && id == p.id => {
                        parts.push(p.id.to_owned())
                    }
                    _ => {}
                },
                Some(_) => {}
            }
        }
        parts.join(":")
    } else {
        let endpoint_key = schema.endpoint_key?;
        let Some(Value::String(value)) = item.get(endpoint_key) else {
            return None;
        };
        let mut key = value.clone();
        let unique = schema.field(endpoint_key).is_some_and(|f| f.unique);
        if !unique {
            for (field, f, _) in schema.foreign_fields() {
                if matches!(f.on_delete, Some(OnDelete::Cascade)) {
                    match (parent, item.get(field)) {
                        (Some(p), _) if p.field == field => {
                            key.push(':');
                            key.push_str(p.id);
                        }
                        (_, Some(Value::String(id))) => {
                            key.push(':');
                            key.push_str(id);
                        }
                        (_, Some(Value::Object(r))) => {
                            if let Some(Value::String(id)) = r.get("id") {
                                key.push(':');
                                key.push_str(id);
                            }
                        }
                        _ => {}
                    }
                }
            }
            key.push_str(":*");
        }
        key
    };
    let namespace = Uuid::new_v5(&ENTITIES_NAMESPACE, schema.name.as_bytes());
    Some(Uuid::new_v5(&namespace, key.as_bytes()).to_string())
}

/// Turns references by endpoint key (`service: my-service`, `{"name":
/// "my-service"}`) or by id into `{"id": …}` of an entity in the file.
fn resolve_references(items: &mut [Item], errors: &mut Errors) {
    use std::collections::HashMap;
    // (entity, endpoint key value or id) → id
    let mut keys: HashMap<(&'static str, String), String> = HashMap::new();
    for item in items.iter() {
        let Some(Value::String(id)) = item.fields.get("id") else {
            continue;
        };
        keys.insert((item.entity, id.clone()), id.clone());
        if let Some(schema) = entities::entity(item.entity) {
            if let Some(ek) = schema.endpoint_key {
                if let Some(Value::String(value)) = item.fields.get(ek) {
                    keys.insert((item.entity, value.clone()), id.clone());
                }
            }
        }
    }
    for item in items.iter_mut() {
        let Some(schema) = entities::entity(item.entity) else {
            continue;
        };
        for (field, _, reference) in schema.foreign_fields() {
            let wanted = match item.fields.get(field) {
                Some(Value::String(key)) => Some(key.clone()),
                Some(Value::Object(r)) => {
                    let by = r.get("id").or_else(|| {
                        entities::entity(reference)?
                            .endpoint_key
                            .and_then(|ek| r.get(ek))
                    });
                    match by {
                        Some(Value::String(key)) => Some(key.clone()),
                        _ => None,
                    }
                }
                _ => None,
            };
            let Some(wanted) = wanted else { continue };
            match keys.get(&(reference, wanted.clone())) {
                Some(id) => {
                    item.fields.insert(field.to_owned(), json!({ "id": id }));
                }
                None if is_uuid(&wanted) => {
                    // Kong reports an id that the file does not hold.
                    errors.at(
                        &item.path,
                        field,
                        json!(format!(
                            "invalid reference '{field}: {{id=\"{wanted}\"}}' (no such entry in '{reference}')"
                        )),
                    );
                }
                None => {
                    errors.at(
                        &item.path,
                        field,
                        json!(format!(
                            "invalid reference '{field}: {wanted}' (no such entry in '{reference}')"
                        )),
                    );
                }
            }
        }
    }
}

impl Declarative {
    /// Reads and flattens a file's text.
    pub fn from_text(text: &str) -> Result<Declarative, DeclarativeError> {
        flatten(parse_text(text)?)
    }

    /// The entity as written in the file at `path` (children included),
    /// for Kong's flattened errors.
    pub fn input_at(&self, path: &[(&'static str, usize)]) -> Option<&Value> {
        let mut node = &self.input;
        for (entity, index) in path {
            node = node.get(*entity)?.get(*index)?;
        }
        Some(node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn items(text: &str) -> Vec<Item> {
        Declarative::from_text(text).expect("loads").items
    }

    fn of<'a>(items: &'a [Item], entity: &str) -> Vec<&'a Entity> {
        items
            .iter()
            .filter(|i| i.entity == entity)
            .map(|i| &i.fields)
            .collect()
    }

    #[test]
    fn nested_entities_get_their_parent_and_a_stable_id() {
        let text = r#"
_format_version: "3.0"
services:
- name: example-service
  url: http://example.com
  routes:
  - name: example-route
    paths: [/mock]
    plugins:
    - name: key-auth
consumers:
- username: alice
  keyauth_credentials:
  - key: secret
upstreams:
- name: up
  targets:
  - target: 10.0.0.1:80
"#;
        let first = items(text);
        let again = items(text);
        // Kong gives no stable id to entities whose key is generated
        // (a key-auth credential's cache key is its `key`, an auto field).
        let stable = |items: &[Item]| -> Vec<Item> {
            items
                .iter()
                .filter(|i| i.entity != "keyauth_credentials")
                .cloned()
                .collect()
        };
        assert_eq!(
            stable(&first),
            stable(&again),
            "loading twice gives the same ids"
        );
        let services = of(&first, "services");
        let routes = of(&first, "routes");
        let plugins = of(&first, "plugins");
        assert_eq!(routes[0]["service"], json!({"id": services[0]["id"]}));
        assert_eq!(plugins[0]["route"], json!({"id": routes[0]["id"]}));
        let creds = of(&first, "keyauth_credentials");
        assert_eq!(
            creds[0]["consumer"],
            json!({"id": of(&first, "consumers")[0]["id"]})
        );
        let targets = of(&first, "targets");
        assert_eq!(
            targets[0]["upstream"],
            json!({"id": of(&first, "upstreams")[0]["id"]})
        );
        // Kong's v5 ids: services by name.
        let ns = Uuid::new_v5(&ENTITIES_NAMESPACE, b"services");
        assert_eq!(
            services[0]["id"],
            json!(Uuid::new_v5(&ns, b"example-service").to_string())
        );
        // Dependency order: services before routes before plugins.
        let order: Vec<&str> = first.iter().map(|i| i.entity).collect();
        let pos = |e: &str| order.iter().position(|x| *x == e).expect("present");
        assert!(pos("services") < pos("routes") && pos("routes") < pos("plugins"));
    }

    #[test]
    fn references_by_name_resolve_and_unknown_ones_are_reported() {
        let loaded = items(
            r#"{"_format_version": "3.0",
                "services": [{"name": "s", "host": "example.com"}],
                "routes": [{"name": "r", "paths": ["/"], "service": "s"},
                           {"name": "r2", "paths": ["/2"], "service": {"name": "s"}}]}"#,
        );
        let id = of(&loaded, "services")[0]["id"].clone();
        for route in of(&loaded, "routes") {
            assert_eq!(route["service"], json!({ "id": id }));
        }
        let error = Declarative::from_text(
            r#"{"_format_version": "3.0", "routes": [{"paths": ["/"], "service": "nope"}]}"#,
        )
        .expect_err("unknown service");
        assert_eq!(
            error,
            DeclarativeError::Invalid(json!({"routes": [{
                "service": "invalid reference 'service: nope' (no such entry in 'services')"
            }]}))
        );
    }

    #[test]
    fn the_format_version_is_required_and_checked() {
        for (text, message) in [
            ("services: []", "required field missing"),
            ("_format_version: \"4.0\"", "expected one of: 1.1, 2.1, 3.0"),
        ] {
            assert_eq!(
                Declarative::from_text(text).expect_err("refused"),
                DeclarativeError::Invalid(json!({ "_format_version": message }))
            );
        }
        assert!(matches!(
            Declarative::from_text("- just a list"),
            Err(DeclarativeError::Parse(_))
        ));
        assert!(matches!(
            Declarative::from_text("a: [unclosed"),
            Err(DeclarativeError::Parse(_))
        ));
    }

    #[test]
    fn legacy_files_mark_regex_paths_as_kong_migrates_them() {
        let loaded = items(
            r#"{"_format_version": "2.1", "routes": [{"name": "r", "paths":
                ["/plain//path", "/users/\\d+", "/caf%C3%A9", "/a%2Eb(x)"]}]}"#,
        );
        assert_eq!(
            loaded[0].fields["paths"],
            json!(["/plain/path", "~/users/\\d+", "/caf%C3%A9", "~/a\\.b(x)"])
        );
        // 3.0 files are taken as they are.
        let loaded = items(r#"{"_format_version": "3.0", "routes": [{"paths": ["/users/\\d+"]}]}"#);
        assert_eq!(loaded[0].fields["paths"], json!(["/users/\\d+"]));
    }

    #[test]
    fn errors_point_into_nested_entities() {
        let error = Declarative::from_text(
            r#"{"_format_version": "3.0", "services": [
                {"name": "a", "host": "h"},
                {"name": "b", "host": "h", "routes": [{"paths": ["/"], "service": "a"}]}]}"#,
        )
        .expect_err("a nested route names another service");
        assert_eq!(
            error,
            DeclarativeError::Invalid(json!({"services": [null, {"routes": [{
                "service": "value must be null (the entity is nested under its service)"
            }]}]}))
        );
    }
}
