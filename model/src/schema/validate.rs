//! Field validation, entity checks, defaults and auto fields, following the
//! order and the messages of Kong's `kong/db/schema/init.lua`.

use std::collections::HashSet;

use serde_json::{Map, Value};

use super::{EntityCheck, Field, FieldType, Record};

/// Errors as Kong accumulates them: field name to a message, to an array of
/// per-element errors (holes are `null`), or to a nested map for records;
/// `@entity` holds the messages of entity checks.
pub type Errors = Map<String, Value>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Context {
    Insert,
    Update,
    Upsert,
}

const REQUIRED: &str = "required field missing";
const UNKNOWN: &str = "unknown field";

/// Kong's "non-empty": not missing, not null, not an empty string or table.
pub(crate) fn is_nonempty(v: Option<&Value>) -> bool {
    match v {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(Value::Array(a)) => !a.is_empty(),
        Some(Value::Object(o)) => !o.is_empty(),
        Some(_) => true,
    }
}

pub(crate) fn get_path<'a>(entity: &'a Map<String, Value>, path: &str) -> Option<&'a Value> {
    match path.split_once('.') {
        None => entity.get(path),
        Some((head, tail)) => match entity.get(head)? {
            Value::Object(o) => get_path(o, tail),
            _ => None,
        },
    }
}

fn set_path(errors: &mut Errors, path: &str, v: Value) {
    match path.split_once('.') {
        None => {
            errors.insert(path.to_owned(), v);
        }
        Some((head, tail)) => {
            let slot = errors
                .entry(head.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if !slot.is_object() {
                *slot = Value::Object(Map::new());
            }
            if let Value::Object(o) = slot {
                set_path(o, tail, v);
            }
        }
    }
}

fn quoted_list(words: &[&str]) -> String {
    words
        .iter()
        .map(|w| format!("'{w}'"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How Lua's `tostring` prints a JSON scalar inside an error message.
fn lua_str(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "null".to_owned(),
        Value::Number(n) => {
            if let Some(i) = n.as_i64() {
                i.to_string()
            } else {
                let f = n.as_f64().unwrap_or(0.0);
                if f.fract() == 0.0 && f.abs() < 1e15 {
                    format!("{}", f as i64)
                } else {
                    f.to_string()
                }
            }
        }
        other => other.to_string(),
    }
}

fn as_f64(v: &Value) -> Option<f64> {
    v.as_f64()
}

fn len_of(v: &Value) -> usize {
    match v {
        Value::String(s) => s.len(),
        Value::Array(a) => a.len(),
        Value::Object(o) => o.len(),
        _ => 0,
    }
}

/// Merge a conditional matcher over the field it tests: unset attributes of
/// the matcher come from the field (Kong uses a metatable `__index`).
fn inherit(matcher: &Field, base: Option<&Field>) -> Field {
    let Some(base) = base else {
        return matcher.clone();
    };
    let mut f = base.clone();
    if !matches!(matcher.ty, FieldType::String) || matcher_declares_type(matcher) {
        f.ty = matcher.ty.clone();
    }
    macro_rules! take {
        ($($name:ident),*) => {$( if matcher.$name.is_some() { f.$name = matcher.$name.clone(); } )*};
    }
    take!(
        eq,
        ne,
        one_of,
        not_one_of,
        gt,
        between,
        len_eq,
        len_min,
        len_max,
        starts_with,
        match_,
        not_match,
        match_any,
        contains,
        mutually_exclusive_subsets,
        custom,
        err
    );
    if !matcher.match_none.is_empty() {
        f.match_none = matcher.match_none.clone();
    }
    if !matcher.match_all.is_empty() {
        f.match_all = matcher.match_all.clone();
    }
    if matcher.required {
        f.required = true;
    }
    f
}

/// Matchers built with `Field::string()` explicitly (rather than
/// `schema::matcher()`) carry a description marker; see `matcher()`.
fn matcher_declares_type(m: &Field) -> bool {
    m.description != Some(super::MATCHER_MARK)
}

impl Field {
    /// Validate one value (which may be `null`). On failure the error is a
    /// message, an array of element errors, or a map of record errors.
    pub fn validate(&self, value: &Value) -> Result<(), Value> {
        if value.is_null() {
            if matches!(self.ne, Some(Value::Null)) {
                return Err(Value::String(
                    self.err
                        .clone()
                        .unwrap_or_else(|| "value must not be null".into()),
                ));
            }
            if let Some(eq) = &self.eq {
                if !eq.is_null() {
                    return Err(Value::String(format!("value must be {}", lua_str(eq))));
                }
            }
            if self.required {
                return Err(Value::String(REQUIRED.into()));
            }
            return Ok(());
        }
        if matches!(self.eq, Some(Value::Null)) {
            return Err(Value::String(
                self.err
                    .clone()
                    .unwrap_or_else(|| "value must be null".into()),
            ));
        }

        match &self.ty {
            FieldType::Array(elements) | FieldType::Set(elements) => {
                let Value::Array(items) = value else {
                    let msg = if matches!(self.ty, FieldType::Set(_)) {
                        "expected a set"
                    } else {
                        "expected an array"
                    };
                    return Err(Value::String(msg.into()));
                };
                let mut el = (**elements).clone();
                el.required = true;
                let mut errs: Vec<Value> = Vec::new();
                for (i, item) in items.iter().enumerate() {
                    if let Err(e) = el.validate(item) {
                        errs.resize(i, Value::Null);
                        errs.push(e);
                    }
                }
                if !errs.is_empty() {
                    return Err(Value::Array(errs));
                }
            }
            FieldType::Map { keys, values } => {
                let Value::Object(map) = value else {
                    return Err(Value::String("expected a map".into()));
                };
                let mut k = (**keys).clone();
                k.required = true;
                let mut v = (**values).clone();
                v.required = true;
                for (key, val) in map {
                    k.validate(&Value::String(key.clone()))?;
                    v.validate(val)?;
                }
            }
            FieldType::Record(record) => {
                let Value::Object(map) = value else {
                    return Err(Value::String("expected a record".into()));
                };
                let copy = record
                    .process_auto_fields(map.clone(), Context::Insert)
                    .map_err(Value::Object)?;
                record.validate(&copy, true, None).map_err(Value::Object)?;
            }
            FieldType::Foreign(_) => {
                let Value::Object(map) = value else {
                    return Err(Value::String("expected a record".into()));
                };
                match map.get("id") {
                    None | Some(Value::Null) => {
                        // A reference by endpoint key ({"name": …}) is
                        // resolved by the store before validation; what is
                        // left here has no usable primary key.
                        let mut e = Map::new();
                        e.insert("id".into(), Value::String(REQUIRED.into()));
                        return Err(Value::Object(e));
                    }
                    Some(Value::String(s)) if is_uuid(s) => {}
                    Some(Value::String(_)) => {
                        let mut e = Map::new();
                        e.insert("id".into(), Value::String("expected a valid UUID".into()));
                        return Err(Value::Object(e));
                    }
                    Some(_) => {
                        let mut e = Map::new();
                        e.insert("id".into(), Value::String("expected a string".into()));
                        return Err(Value::Object(e));
                    }
                }
            }
            FieldType::Integer => {
                let ok = value
                    .as_f64()
                    .map(|f| f.is_finite() && f.fract() == 0.0)
                    .unwrap_or(false);
                if !ok {
                    return Err(Value::String("expected an integer".into()));
                }
            }
            FieldType::Number => {
                if !value.is_number() {
                    return Err(Value::String("expected a number".into()));
                }
            }
            FieldType::Boolean => {
                if !value.is_boolean() {
                    return Err(Value::String("expected a boolean".into()));
                }
            }
            FieldType::String => {
                if !value.is_string() {
                    return Err(Value::String("expected a string".into()));
                }
            }
        }

        self.run_validators(value)
            .map_err(|e| Value::String(self.err.clone().unwrap_or(e)))
    }

    fn run_validators(&self, value: &Value) -> Result<(), String> {
        if let Some(eq) = &self.eq {
            if !json_eq(value, eq) {
                return Err(format!("value must be {}", lua_str(eq)));
            }
        }
        if let Some(ne) = &self.ne {
            if json_eq(value, ne) {
                return Err(format!("value must not be {}", lua_str(value)));
            }
        }
        if let Some(options) = &self.not_one_of {
            if options.iter().any(|o| json_eq(o, value)) {
                return Err(format!("must not be one of: {}", join(options)));
            }
        }
        if let Some(options) = &self.one_of {
            if !options.iter().any(|o| json_eq(o, value)) {
                return Err(format!("expected one of: {}", join(options)));
            }
        }
        if let Some(limit) = self.gt {
            if as_f64(value).is_some_and(|v| v <= limit) {
                return Err(format!(
                    "value must be greater than {}",
                    lua_str(&limit.into())
                ));
            }
        }
        if self.timestamp && as_f64(value).is_some_and(|v| v <= 0.0) {
            return Err("expected a valid timestamp".into());
        }
        if self.uuid {
            if let Some(s) = value.as_str() {
                if !is_uuid(s) {
                    return Err("expected a valid UUID".into());
                }
            }
        }
        if self.is_regex {
            if let Some(s) = value.as_str() {
                if regex::Regex::new(s).is_err() {
                    return Err(format!("not a valid regex: {s}"));
                }
            }
        }
        if let Some((lo, hi)) = self.between {
            if as_f64(value).is_some_and(|v| v < lo || v > hi) {
                return Err(format!(
                    "value should be between {} and {}",
                    lo as i64, hi as i64
                ));
            }
        }
        // Strings default to a minimum length of one, as in Kong.
        let len_min = match (&self.ty, self.len_min) {
            (_, Some(n)) => Some(n),
            (FieldType::String, None) => Some(1),
            _ => None,
        };
        if let Some(n) = self.len_eq {
            if len_of(value) != n {
                return Err(format!("length must be {n}"));
            }
        }
        if let Some(n) = len_min {
            if len_of(value) < n {
                return Err(format!("length must be at least {n}"));
            }
        }
        if let Some(n) = self.len_max {
            if len_of(value) > n {
                return Err(format!("length must be at most {n}"));
            }
        }
        if let Some(s) = value.as_str() {
            if let Some(prefix) = self.starts_with {
                if !s.starts_with(prefix) {
                    return Err(format!("should start with: {prefix}"));
                }
            }
            if let Some(p) = &self.not_match {
                if p.regex.is_match(s) {
                    return Err(format!("invalid value: {s}"));
                }
            }
            for p in &self.match_none {
                if p.regex.is_match(s) {
                    return Err(p
                        .err
                        .clone()
                        .unwrap_or_else(|| format!("invalid value: {s}")));
                }
            }
            if let Some(p) = &self.match_ {
                if !p.regex.is_match(s) {
                    return Err(format!("invalid value: {s}"));
                }
            }
            for p in &self.match_all {
                if !p.regex.is_match(s) {
                    return Err(p
                        .err
                        .clone()
                        .unwrap_or_else(|| format!("invalid value: {s}")));
                }
            }
            if let Some((patterns, err)) = &self.match_any {
                if !patterns.iter().any(|p| p.regex.is_match(s)) {
                    return Err(err.clone());
                }
            }
        }
        if let Some(wanted) = &self.contains {
            if let Value::Array(items) = value {
                if !items.iter().any(|i| json_eq(i, wanted)) {
                    return Err(format!("expected to contain: {}", lua_str(wanted)));
                }
            }
        }
        if let Some(custom) = self.custom {
            custom(value)?;
        }
        if let (Some(subsets), Value::Array(items)) = (&self.mutually_exclusive_subsets, value) {
            let mut member_of: Vec<&Vec<&str>> = Vec::new();
            for item in items.iter().filter_map(Value::as_str) {
                if let Some(subset) = subsets.iter().find(|s| s.contains(&item)) {
                    if !member_of.iter().any(|m| std::ptr::eq(*m, subset)) {
                        member_of.push(subset);
                    }
                }
            }
            if member_of.len() > 1 {
                let list = member_of
                    .iter()
                    .map(|s| format!("({})", quoted_list(s)))
                    .collect::<Vec<_>>()
                    .join(", ");
                return Err(format!("these sets are mutually exclusive: {list}"));
            }
        }
        Ok(())
    }

    fn handle_missing(&self) -> Option<Value> {
        if let Some(d) = &self.default {
            return Some(d.clone());
        }
        if !self.required {
            return Some(Value::Null);
        }
        if let FieldType::Record(r) = &self.ty {
            return r
                .process_auto_fields(Map::new(), Context::Insert)
                .ok()
                .map(Value::Object);
        }
        None
    }

    fn adjust(&self, value: Option<Value>, ctx: Context) -> Result<Option<Value>, Value> {
        let value = match (&self.ty, value) {
            (FieldType::Record(r), v) => {
                let recurse = match (&v, ctx) {
                    (None | Some(Value::Null), Context::Update) => false,
                    (Some(Value::Null), _) => false,
                    (None, _) => self.required,
                    _ => true,
                };
                if recurse {
                    let v = match v {
                        Some(v) => Some(v),
                        None => self.handle_missing(),
                    };
                    match v {
                        Some(Value::Object(o)) => {
                            return r
                                .process_auto_fields(o, ctx)
                                .map(|o| Some(Value::Object(o)))
                                .map_err(Value::Object)
                        }
                        other => other,
                    }
                } else {
                    v
                }
            }
            (FieldType::Set(el), Some(Value::Array(items))) => {
                let mut seen: Vec<Value> = Vec::with_capacity(items.len());
                for item in items {
                    if !seen.contains(&item) {
                        seen.push(item);
                    }
                }
                Some(Value::Array(adjust_elements(el, seen, ctx)?))
            }
            (FieldType::Array(el), Some(Value::Array(items))) => {
                Some(Value::Array(adjust_elements(el, items, ctx)?))
            }
            (_, v) => v,
        };
        if value.is_none() && ctx != Context::Update {
            return Ok(self.handle_missing());
        }
        Ok(value)
    }
}

fn adjust_elements(el: &Field, items: Vec<Value>, ctx: Context) -> Result<Vec<Value>, Value> {
    if !matches!(el.ty, FieldType::Record(_)) {
        return Ok(items);
    }
    items
        .into_iter()
        .map(|item| Ok(el.adjust(Some(item), ctx)?.unwrap_or(Value::Null)))
        .collect()
}

/// Equality as Lua sees it: numbers compare by value (`1.0 == 1`).
fn json_eq(a: &Value, b: &Value) -> bool {
    match (a, b) {
        (Value::Number(x), Value::Number(y)) => x.as_f64() == y.as_f64(),
        _ => a == b,
    }
}

fn join(options: &[Value]) -> String {
    options.iter().map(lua_str).collect::<Vec<_>>().join(", ")
}

pub fn is_uuid(s: &str) -> bool {
    s.len() == 36
        && s.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            _ => b.is_ascii_hexdigit(),
        })
}

impl Record {
    /// The field definition for `name`, preferring a subschema's override.
    fn resolve<'a>(&'a self, name: &str, sub: Option<&'a Record>) -> Option<&'a Field> {
        sub.and_then(|s| s.get(name)).or_else(|| self.get(name))
    }

    /// Fill defaults and auto fields, expand shorthands, dedupe sets (Kong's
    /// `process_auto_fields` for insert, update and upsert).
    pub fn process_auto_fields(
        &self,
        data: Map<String, Value>,
        ctx: Context,
    ) -> Result<Map<String, Value>, Errors> {
        self.process_auto_fields_with(data, ctx, None, now_s())
    }

    pub fn process_auto_fields_with(
        &self,
        mut data: Map<String, Value>,
        ctx: Context,
        sub: Option<&Record>,
        now: f64,
    ) -> Result<Map<String, Value>, Errors> {
        let mut errs = Errors::new();
        for (name, field, expand) in &self.shorthands {
            let Some(value) = data.get(*name).cloned() else {
                continue;
            };
            if let Err(e) = field.validate(&value) {
                errs.insert((*name).to_owned(), e);
                continue;
            }
            data.remove(*name);
            if let Some(new_values) = expand(&value) {
                for (k, v) in new_values {
                    match (v, data.get_mut(&k)) {
                        (Value::Object(new), Some(Value::Object(existing))) => {
                            for (nk, nv) in new {
                                existing.insert(nk, nv);
                            }
                        }
                        (v, _) => {
                            data.insert(k, v);
                        }
                    }
                }
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }

        let insertish = matches!(ctx, Context::Insert | Context::Upsert);
        let names: Vec<&'static str> = self
            .fields
            .iter()
            .map(|(n, _)| *n)
            .chain(
                sub.into_iter()
                    .flat_map(|s| s.fields.iter().map(|(n, _)| *n)),
            )
            .collect();
        // Rebuild the map in schema order so responses list fields as Kong
        // does; keys the schema does not know stay, for validation to report.
        let mut out = Map::with_capacity(data.len());
        let mut done = HashSet::new();
        for name in names {
            if !done.insert(name) {
                continue;
            }
            let Some(field) = self.resolve(name, sub) else {
                continue;
            };
            let mut value = data.remove(name);
            if field.auto {
                if field.uuid {
                    if insertish && value.is_none() {
                        value = Some(Value::String(uuid::Uuid::new_v4().to_string()));
                    }
                } else if matches!(field.ty, FieldType::String) {
                    if insertish && value.is_none() {
                        value = Some(Value::String(random_string()));
                    }
                } else if (name == "created_at"
                    && insertish
                    && matches!(value, None | Some(Value::Null)))
                    || (name == "updated_at")
                {
                    value = Some(match field.ty {
                        FieldType::Number => serde_json::json!(now),
                        _ => serde_json::json!(now as i64),
                    });
                }
            }
            match field.adjust(value, ctx) {
                Ok(Some(v)) => {
                    out.insert(name.to_owned(), v);
                }
                Ok(None) => {}
                Err(e) => {
                    errs.insert(name.to_owned(), e);
                }
            }
        }
        if !errs.is_empty() {
            return Err(errs);
        }
        out.extend(data);
        Ok(out)
    }

    /// Kong's `merge_values`: `top` over `bottom`, records merged deeply.
    pub fn merge_values(
        &self,
        top: Map<String, Value>,
        bottom: &Map<String, Value>,
    ) -> Map<String, Value> {
        let mut out = bottom.clone();
        for (k, v) in top {
            let merged = match (self.get(&k).map(|f| &f.ty), &v, bottom.get(&k)) {
                (Some(FieldType::Record(r)), Value::Object(t), Some(Value::Object(b))) => {
                    Value::Object(r.merge_values(t.clone(), b))
                }
                _ => v,
            };
            out.insert(k, merged);
        }
        out
    }

    /// Validate a record. `full_check` demands required fields (insert,
    /// upsert); updates pass `false`.
    pub fn validate(
        &self,
        input: &Map<String, Value>,
        full_check: bool,
        sub: Option<&Record>,
    ) -> Result<(), Errors> {
        let mut errors = Errors::new();
        for (k, v) in input {
            match self.resolve(k, sub) {
                Some(field) => {
                    if let Err(e) = field.validate(v) {
                        errors.insert(k.clone(), e);
                    }
                }
                None => {
                    errors.insert(k.clone(), Value::String(UNKNOWN.into()));
                }
            }
        }
        for (name, field) in &self.fields {
            if field.required {
                let missing = match input.get(*name) {
                    Some(Value::Null) => true,
                    None => full_check,
                    _ => false,
                };
                if missing {
                    errors.insert((*name).to_owned(), Value::String(REQUIRED.into()));
                }
            }
        }
        self.run_checks(&self.entity_checks, input, full_check, sub, &mut errors);
        if let Some(s) = sub {
            self.run_checks(&s.entity_checks, input, full_check, Some(s), &mut errors);
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors)
        }
    }

    fn run_checks(
        &self,
        checks: &[EntityCheck],
        input: &Map<String, Value>,
        full_check: bool,
        sub: Option<&Record>,
        errors: &mut Errors,
    ) {
        for check in checks {
            self.run_check(check, input, full_check, sub, errors);
        }
    }

    fn field_path<'a>(&'a self, path: &str, sub: Option<&'a Record>) -> Option<&'a Field> {
        match path.split_once('.') {
            None => self.resolve(path, sub),
            Some((head, tail)) => self.resolve(head, sub)?.as_record()?.get_path(tail),
        }
    }

    fn run_check(
        &self,
        check: &EntityCheck,
        input: &Map<String, Value>,
        full_check: bool,
        sub: Option<&Record>,
        errors: &mut Errors,
    ) {
        use EntityCheck as C;
        let updating = !full_check;
        // (fields, required fields, run_with_missing, run_with_invalid)
        let (fields, required, with_missing, with_invalid): (Vec<&str>, Vec<&str>, bool, bool) =
            match check {
                C::AtLeastOneOf(f) => (f.clone(), f.clone(), true, true),
                C::OnlyOneOf(f) => (f.clone(), f.clone(), false, true),
                C::Distinct(f) => (f.clone(), f.clone(), false, true),
                C::MutuallyRequired(f) | C::MutuallyExclusive(f) => {
                    (f.clone(), f.clone(), true, false)
                }
                C::MutuallyExclusiveSets { set1, set2 } => {
                    let all: Vec<&str> = set1.iter().chain(set2).copied().collect();
                    (all.clone(), all, true, false)
                }
                C::Conditional {
                    if_field,
                    then_field,
                    ..
                } => (vec![*if_field, *then_field], vec![*if_field], false, true),
                C::ConditionalAtLeastOneOf {
                    if_field,
                    then_at_least_one_of,
                    else_then_at_least_one_of,
                    ..
                } => {
                    let mut f = vec![*if_field];
                    f.extend(then_at_least_one_of);
                    f.extend(else_then_at_least_one_of);
                    (f, vec![*if_field], true, true)
                }
                C::Custom {
                    field_sources,
                    run_with_missing_fields,
                    ..
                } => (
                    field_sources.clone(),
                    field_sources.clone(),
                    *run_with_missing_fields,
                    false,
                ),
            };

        let mut missing = Vec::new();
        let mut all_nil = true;
        let mut all_ok = true;
        for name in &fields {
            let value = get_path(input, name);
            if value.is_none() {
                if !with_missing && required.contains(name) {
                    missing.push(*name);
                }
            } else {
                all_nil = false;
            }
            if get_path(errors, name).is_some() {
                all_ok = false;
            }
        }
        if !all_ok && !with_invalid {
            return;
        }
        if all_nil && !(with_missing && full_check) {
            return;
        }
        if !missing.is_empty() {
            let msg = if updating {
                "field required for entity check when updating"
            } else {
                "field required for entity check"
            };
            for m in missing {
                set_path(errors, m, Value::String(msg.into()));
            }
            return;
        }

        let nonempty = |name: &str| is_nonempty(get_path(input, name));
        let prefix = if updating { "when updating, " } else { "" };
        let result: Result<(), String> = match check {
            C::AtLeastOneOf(f) => {
                if f.iter().any(|n| nonempty(n)) {
                    Ok(())
                } else {
                    Err(format!(
                        "{prefix}at least one of these fields must be non-empty: {}",
                        quoted_list(f)
                    ))
                }
            }
            C::OnlyOneOf(f) => {
                if f.iter().filter(|n| nonempty(n)).count() == 1 {
                    Ok(())
                } else {
                    Err(format!(
                        "exactly one of these fields must be non-empty: {}",
                        quoted_list(f)
                    ))
                }
            }
            C::Distinct(f) => {
                let mut seen: Vec<&Value> = Vec::new();
                let mut dup = false;
                for n in f {
                    if let Some(v) = get_path(input, n).filter(|v| is_nonempty(Some(v))) {
                        if seen.contains(&v) {
                            dup = true;
                        }
                        seen.push(v);
                    }
                }
                if dup {
                    Err(format!(
                        "values of these fields must be distinct: {}",
                        quoted_list(f)
                    ))
                } else {
                    Ok(())
                }
            }
            C::MutuallyRequired(f) => {
                let n = f.iter().filter(|n| nonempty(n)).count();
                if n == 0 || n == f.len() {
                    Ok(())
                } else {
                    Err(format!(
                        "all or none of these fields must be set: {}",
                        quoted_list(f)
                    ))
                }
            }
            C::MutuallyExclusive(f) => {
                if f.iter().filter(|n| nonempty(n)).count() <= 1 {
                    Ok(())
                } else {
                    Err(format!(
                        "only one or none of these fields must be set: {}",
                        quoted_list(f)
                    ))
                }
            }
            C::MutuallyExclusiveSets { set1, set2 } => {
                let a: Vec<&str> = set1.iter().copied().filter(|n| nonempty(n)).collect();
                let b: Vec<&str> = set2.iter().copied().filter(|n| nonempty(n)).collect();
                if !a.is_empty() && !b.is_empty() {
                    Err(format!(
                        "these sets are mutually exclusive: ({}), ({})",
                        quoted_list(&a),
                        quoted_list(&b)
                    ))
                } else {
                    Ok(())
                }
            }
            C::Conditional {
                if_field,
                if_match,
                then_field,
                then_match,
                then_err,
            } => {
                let if_value = get_path(input, if_field).cloned().unwrap_or(Value::Null);
                let then_value = get_path(input, then_field).cloned().unwrap_or(Value::Null);
                let if_m = inherit(if_match, self.field_path(if_field, sub));
                if if_m.validate(&if_value).is_err() {
                    Ok(())
                } else if then_match.required && then_value.is_null() {
                    set_path(errors, then_field, Value::String(REQUIRED.into()));
                    Err(format!(
                        "failed conditional validation given value of field '{if_field}'"
                    ))
                } else {
                    let then_m = inherit(then_match, self.field_path(then_field, sub));
                    match then_m.validate(&then_value) {
                        Ok(()) => Ok(()),
                        Err(e) => {
                            set_path(errors, then_field, e);
                            Err(match then_err {
                                Some(t) => t.replace("%s", if_field),
                                None => format!(
                                    "failed conditional validation given value of field '{if_field}'"
                                ),
                            })
                        }
                    }
                }
            }
            C::ConditionalAtLeastOneOf {
                if_field,
                if_match,
                then_at_least_one_of,
                then_err,
                else_match,
                else_then_at_least_one_of,
                else_then_err,
            } => match get_path(input, if_field) {
                None => Ok(()),
                Some(if_value) => {
                    let base = self.field_path(if_field, sub);
                    let check_names = |names: &[&str], err: &Option<&str>| {
                        if names.iter().any(|n| nonempty(n)) {
                            Ok(())
                        } else {
                            let list = quoted_list(names);
                            Err(match err {
                                    Some(e) => format!("{prefix}{}", e.replace("%s", &list)),
                                    None => format!(
                                        "{prefix}at least one of these fields must be non-empty: {list}"
                                    ),
                                })
                        }
                    };
                    if inherit(if_match, base).validate(if_value).is_ok() {
                        check_names(then_at_least_one_of, then_err)
                    } else {
                        match else_match {
                            Some(m) if inherit(m, base).validate(if_value).is_ok() => {
                                check_names(else_then_at_least_one_of, else_then_err)
                            }
                            _ => Ok(()),
                        }
                    }
                }
            },
            C::Custom { check, .. } => check(input),
        };
        if let Err(msg) = result {
            let slot = errors
                .entry("@entity")
                .or_insert_with(|| Value::Array(Vec::new()));
            if let Value::Array(a) = slot {
                a.push(Value::String(msg));
            }
        }
    }
}

pub(crate) fn now_s() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

/// Kong's `random_string`: 32 hex characters of randomness.
pub fn random_string() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}
