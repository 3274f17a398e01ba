//! A declarative schema language with Kong's semantics.
//!
//! Kong describes every entity and every plugin configuration with the same
//! small vocabulary (typed fields, validators, entity checks, defaults) and
//! derives from it the Admin API's validation errors, the defaults filled on
//! insert and the `/schemas` documents that clients such as decK read. We do
//! the same so that the Admin API, the declarative loader and the data plane
//! reject the same inputs with the same messages.

use std::sync::Arc;

use regex::Regex;
use serde_json::{json, Map, Value};

mod jsonable;
mod validate;

pub use validate::{is_uuid, random_string, Context, Errors};

/// Seconds since the epoch, as Kong's `ngx.time()`.
pub fn validate_now_s() -> f64 {
    validate::now_s()
}

/// A custom validator: `Err(message)` on failure.
pub type CustomValidator = fn(&Value) -> Result<(), String>;

/// A check over a whole record (Kong's `custom_entity_check`).
pub type EntityCheckFn = fn(&Map<String, Value>) -> Result<(), String>;

/// A transformation run on a validated entity before it is stored; it gets
/// the entity and the raw input of the write.
pub type OnWrite = fn(&mut Map<String, Value>, &Map<String, Value>) -> Result<(), String>;

/// A shorthand field expands one input key into several (Kong's
/// `shorthand_fields`, e.g. a service's `url`).
pub type ShorthandFn = fn(&Value) -> Option<Map<String, Value>>;

#[derive(Clone, Debug)]
pub enum FieldType {
    String,
    Integer,
    Number,
    Boolean,
    Array(Box<Field>),
    Set(Box<Field>),
    Map {
        keys: Box<Field>,
        values: Box<Field>,
    },
    Record(Arc<Record>),
    /// A reference to another entity by primary key, `{"id": …}` on the wire.
    Foreign(&'static str),
}

impl FieldType {
    pub fn name(&self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Integer => "integer",
            FieldType::Number => "number",
            FieldType::Boolean => "boolean",
            FieldType::Array(_) => "array",
            FieldType::Set(_) => "set",
            FieldType::Map { .. } => "map",
            FieldType::Record(_) => "record",
            FieldType::Foreign(_) => "foreign",
        }
    }
}

/// A regular-expression validator. `display` is what `/schemas` shows (Kong
/// shows Lua patterns); `regex` is what we run.
#[derive(Clone, Debug)]
pub struct Pattern {
    pub display: &'static str,
    pub regex: Regex,
    pub err: Option<String>,
}

impl Pattern {
    pub fn new(display: &'static str, regex: &str, err: Option<&str>) -> Pattern {
        Pattern {
            display,
            regex: Regex::new(regex).expect("schema patterns are literals checked by tests"),
            err: err.map(str::to_owned),
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnDelete {
    Restrict,
    Cascade,
}

#[derive(Clone, Debug)]
pub struct Field {
    pub ty: FieldType,
    pub required: bool,
    /// `Some(Value::Null)` is an explicit `default = null`.
    pub default: Option<Value>,
    pub auto: bool,
    pub uuid: bool,
    pub unique: bool,
    pub timestamp: bool,
    pub immutable: bool,
    pub encrypted: bool,
    pub referenceable: bool,
    pub transient: bool,
    pub eq: Option<Value>,
    pub ne: Option<Value>,
    pub one_of: Option<Vec<Value>>,
    pub not_one_of: Option<Vec<Value>>,
    pub gt: Option<f64>,
    pub between: Option<(f64, f64)>,
    pub len_eq: Option<usize>,
    pub len_min: Option<usize>,
    pub len_max: Option<usize>,
    pub starts_with: Option<&'static str>,
    pub match_: Option<Pattern>,
    pub not_match: Option<Pattern>,
    pub match_none: Vec<Pattern>,
    pub match_all: Vec<Pattern>,
    pub match_any: Option<(Vec<Pattern>, String)>,
    pub contains: Option<Value>,
    pub is_regex: bool,
    pub mutually_exclusive_subsets: Option<Vec<Vec<&'static str>>>,
    pub custom: Option<CustomValidator>,
    pub err: Option<String>,
    pub on_delete: Option<OnDelete>,
    pub description: Option<&'static str>,
}

impl Field {
    pub fn of(ty: FieldType) -> Field {
        Field {
            ty,
            required: false,
            default: None,
            auto: false,
            uuid: false,
            unique: false,
            timestamp: false,
            immutable: false,
            encrypted: false,
            referenceable: false,
            transient: false,
            eq: None,
            ne: None,
            one_of: None,
            not_one_of: None,
            gt: None,
            between: None,
            len_eq: None,
            len_min: None,
            len_max: None,
            starts_with: None,
            match_: None,
            not_match: None,
            match_none: Vec::new(),
            match_all: Vec::new(),
            match_any: None,
            contains: None,
            is_regex: false,
            mutually_exclusive_subsets: None,
            custom: None,
            err: None,
            on_delete: None,
            description: None,
        }
    }
    pub fn string() -> Field {
        Field::of(FieldType::String)
    }
    pub fn integer() -> Field {
        Field::of(FieldType::Integer)
    }
    pub fn number() -> Field {
        Field::of(FieldType::Number)
    }
    pub fn boolean() -> Field {
        Field::of(FieldType::Boolean)
    }
    pub fn array(elements: Field) -> Field {
        Field::of(FieldType::Array(Box::new(elements)))
    }
    pub fn set(elements: Field) -> Field {
        Field::of(FieldType::Set(Box::new(elements)))
    }
    pub fn map(keys: Field, values: Field) -> Field {
        Field::of(FieldType::Map {
            keys: Box::new(keys),
            values: Box::new(values),
        })
    }
    pub fn record(record: Record) -> Field {
        Field::of(FieldType::Record(Arc::new(record)))
    }
    pub fn foreign(reference: &'static str) -> Field {
        Field::of(FieldType::Foreign(reference))
    }

    pub fn required(mut self) -> Field {
        self.required = true;
        self
    }
    pub fn optional(mut self) -> Field {
        self.required = false;
        self
    }
    pub fn default(mut self, v: Value) -> Field {
        self.default = Some(v);
        self
    }
    pub fn auto(mut self) -> Field {
        self.auto = true;
        self
    }
    pub fn uuid(mut self) -> Field {
        self.uuid = true;
        self
    }
    pub fn unique(mut self) -> Field {
        self.unique = true;
        self
    }
    pub fn timestamp(mut self) -> Field {
        self.timestamp = true;
        self
    }
    pub fn immutable(mut self) -> Field {
        self.immutable = true;
        self
    }
    pub fn encrypted(mut self) -> Field {
        self.encrypted = true;
        self
    }
    pub fn referenceable(mut self) -> Field {
        self.referenceable = true;
        self
    }
    pub fn transient(mut self) -> Field {
        self.transient = true;
        self
    }
    pub fn eq(mut self, v: Value) -> Field {
        self.eq = Some(v);
        self
    }
    pub fn ne(mut self, v: Value) -> Field {
        self.ne = Some(v);
        self
    }
    pub fn one_of<I: IntoIterator<Item = V>, V: Into<Value>>(mut self, options: I) -> Field {
        self.one_of = Some(options.into_iter().map(Into::into).collect());
        self
    }
    pub fn not_one_of<I: IntoIterator<Item = V>, V: Into<Value>>(mut self, options: I) -> Field {
        self.not_one_of = Some(options.into_iter().map(Into::into).collect());
        self
    }
    pub fn gt(mut self, v: f64) -> Field {
        self.gt = Some(v);
        self
    }
    pub fn between(mut self, lo: f64, hi: f64) -> Field {
        self.between = Some((lo, hi));
        self
    }
    pub fn len_eq(mut self, n: usize) -> Field {
        self.len_eq = Some(n);
        self
    }
    pub fn len_min(mut self, n: usize) -> Field {
        self.len_min = Some(n);
        self
    }
    pub fn len_max(mut self, n: usize) -> Field {
        self.len_max = Some(n);
        self
    }
    pub fn starts_with(mut self, s: &'static str) -> Field {
        self.starts_with = Some(s);
        self
    }
    pub fn matches(mut self, display: &'static str, regex: &str) -> Field {
        self.match_ = Some(Pattern::new(display, regex, None));
        self
    }
    pub fn not_matches(mut self, display: &'static str, regex: &str) -> Field {
        self.not_match = Some(Pattern::new(display, regex, None));
        self
    }
    pub fn match_none(mut self, display: &'static str, regex: &str, err: &str) -> Field {
        self.match_none
            .push(Pattern::new(display, regex, Some(err)));
        self
    }
    pub fn match_all(mut self, display: &'static str, regex: &str, err: &str) -> Field {
        self.match_all.push(Pattern::new(display, regex, Some(err)));
        self
    }
    pub fn match_any(mut self, patterns: &[(&'static str, &str)], err: &str) -> Field {
        let patterns = patterns
            .iter()
            .map(|(d, r)| Pattern::new(d, r, None))
            .collect();
        self.match_any = Some((patterns, err.to_owned()));
        self
    }
    pub fn contains(mut self, v: Value) -> Field {
        self.contains = Some(v);
        self
    }
    pub fn is_regex(mut self) -> Field {
        self.is_regex = true;
        self
    }
    pub fn mutually_exclusive_subsets(mut self, subsets: Vec<Vec<&'static str>>) -> Field {
        self.mutually_exclusive_subsets = Some(subsets);
        self
    }
    pub fn custom(mut self, f: CustomValidator) -> Field {
        self.custom = Some(f);
        self
    }
    pub fn err(mut self, e: &str) -> Field {
        self.err = Some(e.to_owned());
        self
    }
    pub fn on_delete(mut self, o: OnDelete) -> Field {
        self.on_delete = Some(o);
        self
    }
    pub fn description(mut self, d: &'static str) -> Field {
        self.description = Some(d);
        self
    }

    /// The nested record, when this field is one.
    pub fn as_record(&self) -> Option<&Record> {
        match &self.ty {
            FieldType::Record(r) => Some(r),
            _ => None,
        }
    }
}

/// Cross-field checks (Kong's `entity_checks`).
#[derive(Clone, Debug)]
pub enum EntityCheck {
    AtLeastOneOf(Vec<&'static str>),
    OnlyOneOf(Vec<&'static str>),
    Distinct(Vec<&'static str>),
    MutuallyRequired(Vec<&'static str>),
    MutuallyExclusive(Vec<&'static str>),
    MutuallyExclusiveSets {
        set1: Vec<&'static str>,
        set2: Vec<&'static str>,
    },
    Conditional {
        if_field: &'static str,
        if_match: Box<Field>,
        then_field: &'static str,
        then_match: Box<Field>,
        then_err: Option<&'static str>,
    },
    ConditionalAtLeastOneOf {
        if_field: &'static str,
        if_match: Box<Field>,
        then_at_least_one_of: Vec<&'static str>,
        then_err: Option<&'static str>,
        else_match: Option<Box<Field>>,
        else_then_at_least_one_of: Vec<&'static str>,
        else_then_err: Option<&'static str>,
    },
    Custom {
        field_sources: Vec<&'static str>,
        run_with_missing_fields: bool,
        check: EntityCheckFn,
    },
}

impl EntityCheck {
    /// A `conditional` check whose matchers are written as partial fields:
    /// a matcher inherits the type of the field it tests, as in Kong.
    pub fn conditional(
        if_field: &'static str,
        if_match: Field,
        then_field: &'static str,
        then_match: Field,
    ) -> EntityCheck {
        EntityCheck::Conditional {
            if_field,
            if_match: Box::new(if_match),
            then_field,
            then_match: Box::new(then_match),
            then_err: None,
        }
    }
}

/// A matcher used inside conditional checks; its type is taken from the
/// tested field at validation time.
pub fn matcher() -> Field {
    Field::of(FieldType::String).description(MATCHER_MARK)
}

/// Marks a matcher whose type is inherited from the tested field.
pub(crate) const MATCHER_MARK: &str = "\u{0}matcher";

#[derive(Clone, Debug, Default)]
pub struct Record {
    pub fields: Vec<(&'static str, Field)>,
    pub entity_checks: Vec<EntityCheck>,
    pub shorthands: Vec<(&'static str, Field, ShorthandFn)>,
}

impl Record {
    pub fn new() -> Record {
        Record::default()
    }
    pub fn field(mut self, name: &'static str, f: Field) -> Record {
        self.fields.push((name, f));
        self
    }
    pub fn check(mut self, c: EntityCheck) -> Record {
        self.entity_checks.push(c);
        self
    }
    pub fn shorthand(mut self, name: &'static str, f: Field, expand: ShorthandFn) -> Record {
        self.shorthands.push((name, f, expand));
        self
    }
    pub fn get(&self, name: &str) -> Option<&Field> {
        self.fields.iter().find(|(n, _)| *n == name).map(|(_, f)| f)
    }
    /// Field lookup through dotted paths (`config.second`).
    pub fn get_path(&self, path: &str) -> Option<&Field> {
        match path.split_once('.') {
            None => self.get(path),
            Some((head, tail)) => self.get(head)?.as_record()?.get_path(tail),
        }
    }

    /// Kong's `/schemas` JSON for this record.
    pub fn to_json(&self) -> Value {
        jsonable::record_to_json(self)
    }
}

/// Specialisations of an entity selected by the value of a key field
/// (route protocols, plugin names).
pub trait Subschemas: Send + Sync {
    /// The subschema for `key`, with its extra/overriding fields and checks.
    fn get(&self, key: &str) -> Option<Arc<Record>>;
    /// Message when no subschema matches (`%s` is replaced by the key).
    fn unknown_error(&self) -> &str {
        "unknown type: %s"
    }
}

/// Kong entity schema.
pub struct EntitySchema {
    pub name: &'static str,
    /// Path segment on the Admin API (`key-auths` for keyauth_credentials).
    pub admin_api_name: &'static str,
    /// Path segment under a parent (`/consumers/{c}/key-auth`).
    pub admin_api_nested_name: Option<&'static str>,
    pub endpoint_key: Option<&'static str>,
    pub cache_key: Vec<&'static str>,
    pub record: Record,
    pub subschema_key: Option<&'static str>,
    pub subschemas: Option<Box<dyn Subschemas>>,
    /// Whether the entity accepts a `ttl` (key-auth credentials).
    pub ttl: bool,
    /// Rewrites applied to a validated entity before it is stored (Kong's
    /// `transformations`, such as hashing basic-auth passwords).
    pub on_write: Option<OnWrite>,
}

impl EntitySchema {
    pub fn field(&self, name: &str) -> Option<&Field> {
        self.record.get(name)
    }

    /// Foreign-key fields and the entity each references.
    pub fn foreign_fields(&self) -> impl Iterator<Item = (&'static str, &Field, &'static str)> {
        self.record.fields.iter().filter_map(|(n, f)| match f.ty {
            FieldType::Foreign(r) => Some((*n, f, r)),
            _ => None,
        })
    }

    pub fn unique_fields(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.record
            .fields
            .iter()
            .filter(|(_, f)| f.unique)
            .map(|(n, _)| *n)
    }

    /// The subschema selected by an entity's key value.
    pub fn subschema_for(&self, entity: &Map<String, Value>) -> Option<Arc<Record>> {
        let key = self.subschema_key?;
        let subs = self.subschemas.as_ref()?;
        match entity.get(key)? {
            Value::String(s) => subs.get(s),
            Value::Array(items) => items
                .iter()
                .filter_map(Value::as_str)
                .find_map(|s| subs.get(s)),
            _ => None,
        }
    }

    /// `/schemas/{entity}`.
    pub fn to_json(&self) -> Value {
        let mut doc = self.record.to_json();
        if let Some(k) = self.endpoint_key {
            doc["endpoint_key"] = json!(k);
        }
        doc["primary_key"] = json!(["id"]);
        if !self.cache_key.is_empty() {
            doc["cache_key"] = json!(self.cache_key);
        }
        if let Some(k) = self.subschema_key {
            doc["subschema_key"] = json!(k);
        }
        doc
    }
}

#[cfg(test)]
mod tests;
