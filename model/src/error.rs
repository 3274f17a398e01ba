//! Kong's database errors (`kong/db/errors.lua`): a numeric `code`, a
//! `name`, a human `message` and the offending `fields`, with the HTTP status
//! the Admin API maps each code to.

use serde_json::{json, Map, Value};

use crate::schema::Errors;

#[derive(Debug, Clone, thiserror::Error)]
pub enum DbError {
    #[error("{}", schema_violation_message(.0))]
    SchemaViolation(Errors),
    #[error("invalid primary key")]
    InvalidPrimaryKey(Map<String, Value>),
    #[error("the foreign key '{}' does not reference an existing '{parent}' entity.", lua_pretty(&Value::Object(.key.clone()), None))]
    ForeignKeyViolation {
        field: String,
        key: Map<String, Value>,
        parent: String,
    },
    #[error("an existing '{child}' entity references this '{parent}' entity")]
    ForeignKeyRestricted { parent: String, child: String },
    #[error("UNIQUE violation detected on '{}'", lua_pretty(&Value::Object(.0.clone()), None))]
    UniqueViolation(Map<String, Value>),
    #[error("{}", foreign_keys_unresolved_message(.0))]
    ForeignKeysUnresolved(Errors),
    #[error("not found")]
    NotFound,
    #[error("'{offset}' is not a valid offset: {reason}")]
    InvalidOffset { offset: String, reason: String },
    #[error("{0}")]
    InvalidSize(String),
    #[error("{}", invalid_options_message(.0))]
    InvalidOptions(Map<String, Value>),
    #[error("{0}")]
    Database(String),
}

impl DbError {
    pub fn code(&self) -> u16 {
        match self {
            DbError::InvalidPrimaryKey(_) => 1,
            DbError::SchemaViolation(_) => 2,
            DbError::ForeignKeyViolation { .. } | DbError::ForeignKeyRestricted { .. } => 4,
            DbError::UniqueViolation(_) => 5,
            DbError::NotFound => 6,
            DbError::InvalidOffset { .. } => 7,
            DbError::Database(_) => 8,
            DbError::InvalidSize(_) => 9,
            DbError::InvalidOptions(_) => 11,
            DbError::ForeignKeysUnresolved(_) => 13,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            DbError::InvalidPrimaryKey(_) => "invalid primary key",
            DbError::SchemaViolation(_) => "schema violation",
            DbError::ForeignKeyViolation { .. } | DbError::ForeignKeyRestricted { .. } => {
                "foreign key violation"
            }
            DbError::UniqueViolation(_) => "unique constraint violation",
            DbError::NotFound => "not found",
            DbError::InvalidOffset { .. } => "invalid offset",
            DbError::Database(_) => "database error",
            DbError::InvalidSize(_) => "invalid size",
            DbError::InvalidOptions(_) => "invalid options",
            DbError::ForeignKeysUnresolved(_) => "foreign keys unresolved",
        }
    }

    /// The Admin API status for this error (`kong/api/endpoints.lua`).
    pub fn http_status(&self) -> u16 {
        match self {
            DbError::UniqueViolation(_) => 409,
            DbError::NotFound => 404,
            DbError::Database(_) => 500,
            _ => 400,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self, DbError::NotFound)
    }

    /// The response body, in Kong's shape.
    pub fn to_json(&self) -> Value {
        if let DbError::Database(_) = self {
            return json!({"message": "An unexpected error occurred"});
        }
        if let DbError::NotFound = self {
            return json!({"message": "Not found"});
        }
        let mut body = json!({
            "code": self.code(),
            "name": self.name(),
            "message": self.to_string(),
        });
        match self {
            DbError::SchemaViolation(e)
            | DbError::ForeignKeysUnresolved(e)
            | DbError::UniqueViolation(e)
            | DbError::InvalidPrimaryKey(e) => body["fields"] = Value::Object(e.clone()),
            DbError::ForeignKeyViolation { field, key, .. } => {
                body["fields"] = json!({ field.clone(): key })
            }
            DbError::ForeignKeyRestricted { child, .. } => {
                body["fields"] = json!({ "@referenced_by": child })
            }
            DbError::InvalidOptions(o) => body["options"] = Value::Object(o.clone()),
            _ => {}
        }
        body
    }

    pub fn schema(field: &str, message: &str) -> DbError {
        let mut e = Errors::new();
        e.insert(field.to_owned(), Value::String(message.to_owned()));
        DbError::SchemaViolation(e)
    }
}

fn flatten(errors: &Errors, with_entity: bool) -> Vec<String> {
    let mut buf = Vec::new();
    if with_entity {
        if let Some(Value::Array(list)) = errors.get("@entity") {
            buf.extend(list.iter().map(lua_tostring));
        }
    }
    let mut keys: Vec<&String> = errors.keys().filter(|k| *k != "@entity").collect();
    keys.sort();
    for k in keys {
        match &errors[k.as_str()] {
            Value::Array(items) => {
                for (i, v) in items.iter().enumerate() {
                    if !v.is_null() {
                        buf.push(format!("{k}.{}: {}", i + 1, sub_value(v)));
                    }
                }
            }
            Value::Object(sub) => {
                let mut sk: Vec<&String> = sub.keys().collect();
                sk.sort();
                for s in sk {
                    buf.push(format!("{k}.{s}: {}", sub_value(&sub[s.as_str()])));
                }
            }
            v => buf.push(format!("{k}: {}", lua_tostring(v))),
        }
    }
    buf
}

fn sub_value(v: &Value) -> String {
    match v {
        Value::Array(_) | Value::Object(_) => lua_pretty(v, Some("  ")),
        other => lua_tostring(other),
    }
}

fn lua_tostring(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub fn schema_violation_message(errors: &Errors) -> String {
    let buf = flatten(errors, true);
    if buf.len() == 1 {
        format!("schema violation ({})", buf[0])
    } else {
        format!("{} schema violations ({})", buf.len(), buf.join("; "))
    }
}

fn foreign_keys_unresolved_message(errors: &Errors) -> String {
    let buf = flatten(errors, false);
    if buf.len() == 1 {
        format!("foreign key unresolved ({})", buf[0])
    } else {
        format!("{} foreign keys unresolved ({})", buf.len(), buf.join("; "))
    }
}

fn invalid_options_message(options: &Map<String, Value>) -> String {
    let buf = flatten(options, false);
    if buf.len() == 1 {
        format!("invalid option ({})", buf[0])
    } else {
        format!("{} option violations ({})", buf.len(), buf.join("; "))
    }
}

/// Penlight's `pretty.write`, which Kong uses to print keys in messages.
/// `indent` `None` is the compact form (`pretty.write(t, "")`).
pub fn lua_pretty(v: &Value, indent: Option<&str>) -> String {
    let mut out = String::new();
    write_pretty(v, indent, 0, &mut out);
    out
}

fn write_pretty(v: &Value, indent: Option<&str>, depth: usize, out: &mut String) {
    let is_ident = |k: &str| {
        let mut c = k.chars();
        c.next()
            .is_some_and(|f| f.is_ascii_alphabetic() || f == '_')
            && c.all(|ch| ch.is_ascii_alphanumeric() || ch == '_')
    };
    let items: Vec<(Option<String>, &Value)> = match v {
        Value::Array(a) => a.iter().map(|x| (None, x)).collect(),
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort();
            keys.into_iter()
                .map(|k| {
                    let key = if is_ident(k) {
                        k.clone()
                    } else {
                        format!("[\"{k}\"]")
                    };
                    (Some(key), &o[k.as_str()])
                })
                .collect()
        }
        Value::String(s) => {
            out.push('"');
            out.push_str(s);
            out.push('"');
            return;
        }
        Value::Null => {
            out.push_str("null");
            return;
        }
        other => {
            out.push_str(&other.to_string());
            return;
        }
    };
    out.push('{');
    let n = items.len();
    for (i, (key, val)) in items.into_iter().enumerate() {
        if let Some(ind) = indent {
            out.push('\n');
            out.push_str(&ind.repeat(depth + 1));
        }
        if let Some(k) = key {
            out.push_str(&k);
            out.push_str(if indent.is_some() { " = " } else { "=" });
        }
        write_pretty(val, indent, depth + 1, out);
        if i + 1 < n {
            out.push(',');
        }
    }
    if let Some(ind) = indent {
        if n > 0 {
            out.push('\n');
            out.push_str(&ind.repeat(depth));
        }
    }
    out.push('}');
}
