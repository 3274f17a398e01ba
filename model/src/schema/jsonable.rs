//! Kong's `schema_to_jsonable`: the `/schemas/...` documents.

use serde_json::{json, Map, Value};

use super::{EntityCheck, Field, FieldType, Record};

pub(super) fn record_to_json(record: &Record) -> Value {
    json!({
        "fields": fields_to_json(&record.fields),
        "entity_checks": record.entity_checks.iter().map(check_to_json).collect::<Vec<_>>(),
    })
}

fn fields_to_json(fields: &[(&'static str, Field)]) -> Value {
    Value::Array(
        fields
            .iter()
            .map(|(name, f)| {
                let mut m = Map::new();
                m.insert((*name).to_owned(), field_to_json(f));
                Value::Object(m)
            })
            .collect(),
    )
}

pub(super) fn field_to_json(f: &Field) -> Value {
    let mut m = Map::new();
    if f.description != Some(super::MATCHER_MARK) {
        m.insert("type".into(), json!(f.ty.name()));
    }
    match &f.ty {
        FieldType::Array(el) | FieldType::Set(el) => {
            m.insert("elements".into(), field_to_json(el));
        }
        FieldType::Map { keys, values } => {
            m.insert("keys".into(), field_to_json(keys));
            m.insert("values".into(), field_to_json(values));
        }
        FieldType::Record(r) => {
            m.insert("fields".into(), fields_to_json(&r.fields));
            if !r.entity_checks.is_empty() {
                m.insert(
                    "entity_checks".into(),
                    Value::Array(r.entity_checks.iter().map(check_to_json).collect()),
                );
            }
        }
        FieldType::Foreign(reference) => {
            m.insert("reference".into(), json!(reference));
        }
        _ => {}
    }
    let flags = [
        ("required", f.required),
        ("auto", f.auto),
        ("uuid", f.uuid),
        ("unique", f.unique),
        ("timestamp", f.timestamp),
        ("immutable", f.immutable),
        ("encrypted", f.encrypted),
        ("referenceable", f.referenceable),
        ("transient", f.transient),
        ("is_regex", f.is_regex),
    ];
    for (k, on) in flags {
        if on {
            m.insert(k.into(), json!(true));
        }
    }
    if let Some(d) = &f.default {
        m.insert("default".into(), d.clone());
    }
    let opt = |m: &mut Map<String, Value>, k: &str, v: Option<Value>| {
        if let Some(v) = v {
            m.insert(k.into(), v);
        }
    };
    opt(&mut m, "eq", f.eq.clone());
    opt(&mut m, "ne", f.ne.clone());
    opt(&mut m, "one_of", f.one_of.clone().map(Value::Array));
    opt(&mut m, "not_one_of", f.not_one_of.clone().map(Value::Array));
    opt(&mut m, "gt", f.gt.map(num));
    opt(
        &mut m,
        "between",
        f.between.map(|(a, b)| json!([num(a), num(b)])),
    );
    opt(&mut m, "len_eq", f.len_eq.map(|n| json!(n)));
    opt(&mut m, "len_min", f.len_min.map(|n| json!(n)));
    opt(&mut m, "len_max", f.len_max.map(|n| json!(n)));
    opt(&mut m, "starts_with", f.starts_with.map(|s| json!(s)));
    opt(&mut m, "match", f.match_.as_ref().map(|p| json!(p.display)));
    opt(
        &mut m,
        "not_match",
        f.not_match.as_ref().map(|p| json!(p.display)),
    );
    if !f.match_none.is_empty() {
        let v: Vec<Value> = f
            .match_none
            .iter()
            .map(|p| json!({"pattern": p.display, "err": p.err}))
            .collect();
        m.insert("match_none".into(), Value::Array(v));
    }
    if !f.match_all.is_empty() {
        let v: Vec<Value> = f
            .match_all
            .iter()
            .map(|p| json!({"pattern": p.display, "err": p.err}))
            .collect();
        m.insert("match_all".into(), Value::Array(v));
    }
    if let Some((patterns, err)) = &f.match_any {
        let p: Vec<&str> = patterns.iter().map(|p| p.display).collect();
        m.insert("match_any".into(), json!({"patterns": p, "err": err}));
    }
    opt(&mut m, "contains", f.contains.clone());
    opt(
        &mut m,
        "mutually_exclusive_subsets",
        f.mutually_exclusive_subsets.as_ref().map(|s| json!(s)),
    );
    opt(&mut m, "err", f.err.as_ref().map(|e| json!(e)));
    opt(
        &mut m,
        "on_delete",
        f.on_delete.map(|o| {
            json!(match o {
                super::OnDelete::Cascade => "cascade",
                super::OnDelete::Restrict => "restrict",
            })
        }),
    );
    if let Some(d) = f.description.filter(|d| *d != super::MATCHER_MARK) {
        m.insert("description".into(), json!(d));
    }
    Value::Object(m)
}

fn num(f: f64) -> Value {
    if f.fract() == 0.0 && f.abs() < 9e15 {
        json!(f as i64)
    } else {
        json!(f)
    }
}

fn check_to_json(c: &EntityCheck) -> Value {
    use EntityCheck as C;
    match c {
        C::AtLeastOneOf(f) => json!({"at_least_one_of": f}),
        C::OnlyOneOf(f) => json!({"only_one_of": f}),
        C::Distinct(f) => json!({"distinct": f}),
        C::MutuallyRequired(f) => json!({"mutually_required": f}),
        C::MutuallyExclusive(f) => json!({"mutually_exclusive": f}),
        C::MutuallyExclusiveSets { set1, set2 } => {
            json!({"mutually_exclusive_sets": {"set1": set1, "set2": set2}})
        }
        C::Conditional {
            if_field,
            if_match,
            then_field,
            then_match,
            then_err,
        } => {
            let mut inner = json!({
                "if_field": if_field, "if_match": field_to_json(if_match),
                "then_field": then_field, "then_match": field_to_json(then_match),
            });
            if let Some(e) = then_err {
                inner["then_err"] = json!(e);
            }
            json!({ "conditional": inner })
        }
        C::ConditionalAtLeastOneOf {
            if_field,
            if_match,
            then_at_least_one_of,
            then_err,
            else_match,
            else_then_at_least_one_of,
            else_then_err,
        } => {
            let mut inner = json!({
                "if_field": if_field, "if_match": field_to_json(if_match),
                "then_at_least_one_of": then_at_least_one_of,
            });
            if let Some(e) = then_err {
                inner["then_err"] = json!(e);
            }
            if let Some(m) = else_match {
                inner["else_match"] = field_to_json(m);
                inner["else_then_at_least_one_of"] = json!(else_then_at_least_one_of);
            }
            if let Some(e) = else_then_err {
                inner["else_then_err"] = json!(e);
            }
            json!({ "conditional_at_least_one_of": inner })
        }
        C::Custom { field_sources, .. } => {
            json!({"custom_entity_check": {"field_sources": field_sources}})
        }
    }
}
