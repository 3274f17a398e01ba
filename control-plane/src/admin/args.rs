//! Request bodies as Kong's Admin API reads them: JSON as is, and
//! form-urlencoded with nested keys (`config.key_names[1]=apikey`) whose
//! string values are converted to the types the schema expects.

use gatehouse_model::schema::{EntitySchema, Field, FieldType, Record};
use serde_json::{Map, Value};

/// One step of a form key: a record field or an array position (`None` for
/// `[]`, which appends).
enum Step {
    Key(String),
    Index(Option<usize>),
}

fn key_to_path(key: &str, path: &mut Vec<Step>) {
    if let Some(open) = key.rfind('[') {
        if key.ends_with(']') && open > 0 {
            let inner = &key[open + 1..key.len() - 1];
            if inner.bytes().all(|b| b.is_ascii_digit()) {
                key_to_path(&key[..open], path);
                path.push(Step::Index(inner.parse().ok()));
                return;
            }
        }
    }
    if let Some(dot) = key.find('.') {
        if dot > 0 && dot + 1 < key.len() {
            key_to_path(&key[..dot], path);
            key_to_path(&key[dot + 1..], path);
            return;
        }
    }
    path.push(Step::Key(key.to_owned()));
}

fn insert_path(node: &mut Value, path: &[Step], value: Value) {
    let Some((first, rest)) = path.split_first() else {
        *node = value;
        return;
    };
    match first {
        Step::Key(k) => {
            if !node.is_object() {
                *node = Value::Object(Map::new());
            }
            if let Value::Object(m) = node {
                let slot = m.entry(k.clone()).or_insert(Value::Null);
                if rest.is_empty() {
                    *slot = value;
                } else {
                    insert_path(slot, rest, value);
                }
            }
        }
        Step::Index(i) => {
            if !node.is_array() {
                *node = Value::Array(Vec::new());
            }
            if let Value::Array(a) = node {
                // Kong's indexes are 1-based.
                let idx = match i {
                    Some(n) if *n >= 1 => n - 1,
                    Some(_) => 0,
                    None => a.len(),
                };
                if idx > 10_000 {
                    return;
                }
                if a.len() <= idx {
                    a.resize(idx + 1, Value::Null);
                }
                insert_path(&mut a[idx], rest, value);
            }
        }
    }
}

/// Parse `application/x-www-form-urlencoded` into nested JSON of strings.
pub(super) fn parse_form(body: &[u8]) -> Map<String, Value> {
    let mut root = Value::Object(Map::new());
    for (k, v) in form_urlencoded::parse(body) {
        let mut path = Vec::new();
        key_to_path(&k, &mut path);
        let value = Value::String(v.into_owned());
        // A repeated plain key (`tags=a&tags=b`) collects into an array.
        if let [Step::Key(single)] = path.as_slice() {
            if let Value::Object(m) = &mut root {
                match m.get_mut(single) {
                    Some(Value::Array(a)) => a.push(value),
                    Some(existing) => {
                        let prev = existing.take();
                        *existing = Value::Array(vec![prev, value]);
                    }
                    None => {
                        m.insert(single.clone(), value);
                    }
                }
            }
            continue;
        }
        insert_path(&mut root, &path, value);
    }
    match root {
        Value::Object(m) => m,
        _ => Map::new(),
    }
}

/// Convert form strings to the schema's types (Kong's `arguments.infer`).
pub(super) fn infer_entity(schema: &EntitySchema, input: &mut Map<String, Value>) {
    let sub = schema.subschema_for(input);
    for (k, v) in input.iter_mut() {
        let field = sub
            .as_ref()
            .and_then(|s| s.get(k))
            .or_else(|| schema.record.get(k));
        if let Some(f) = field {
            infer(f, v);
        }
    }
}

fn infer_record(record: &Record, m: &mut Map<String, Value>) {
    for (k, v) in m.iter_mut() {
        if let Some(f) = record.get(k) {
            infer(f, v);
        }
    }
}

fn infer(field: &Field, v: &mut Value) {
    if let Value::String(s) = v {
        if s.is_empty() && !matches!(field.ty, FieldType::String) {
            *v = Value::Null;
            return;
        }
    }
    match (&field.ty, &mut *v) {
        (FieldType::Integer | FieldType::Number, Value::String(s)) => {
            if let Ok(i) = s.parse::<i64>() {
                *v = Value::from(i);
            } else if let Ok(f) = s.parse::<f64>() {
                if let Some(n) = serde_json::Number::from_f64(f) {
                    *v = Value::Number(n);
                }
            }
        }
        (FieldType::Boolean, Value::String(s)) => match s.as_str() {
            "true" => *v = Value::Bool(true),
            "false" => *v = Value::Bool(false),
            _ => {}
        },
        (FieldType::Array(el) | FieldType::Set(el), _) => {
            if let Value::String(_) = v {
                *v = Value::Array(vec![v.take()]);
            }
            if let Value::Array(items) = v {
                items.retain(|i| !i.is_null());
                for item in items.iter_mut() {
                    infer(el, item);
                }
            }
        }
        (FieldType::Map { values, .. }, Value::Object(m)) => {
            for item in m.values_mut() {
                infer(values, item);
            }
        }
        (FieldType::Record(r), Value::Object(m)) => infer_record(r, m),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn check(body: &str, expect: Value) {
        assert_eq!(Value::Object(parse_form(body.as_bytes())), expect, "{body}");
    }

    #[test]
    fn nested_form_keys() {
        check(
            "username=a&custom_id=b",
            json!({"username": "a", "custom_id": "b"}),
        );
        check("config.key_names=x", json!({"config": {"key_names": "x"}}));
        check(
            "config.key_names[]=x&config.key_names[]=y",
            json!({"config": {"key_names": ["x", "y"]}}),
        );
        check("tags[1]=a&tags[2]=b", json!({"tags": ["a", "b"]}));
        check("tags=a&tags=b", json!({"tags": ["a", "b"]}));
        check("service.id=abc", json!({"service": {"id": "abc"}}));
    }

    #[test]
    fn infers_schema_types() {
        let schema = gatehouse_model::entities::entity("services").expect("services exist");
        let mut m = parse_form(b"port=8080&retries=x&enabled=false&tags=a&name=n");
        infer_entity(schema, &mut m);
        assert_eq!(
            Value::Object(m),
            json!({"port": 8080, "retries": "x", "enabled": false, "tags": ["a"], "name": "n"})
        );
    }
}
