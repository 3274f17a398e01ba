//! Routes for unit tests, written as Kong Admin API JSON.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::RouteSpec;

/// The fields of a Kong route the router reads, owned.
#[derive(Clone, Debug, Deserialize)]
pub(crate) struct TestRoute {
    pub(crate) id: String,
    pub(crate) name: Option<String>,
    #[serde(default)]
    pub(crate) methods: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) hosts: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) paths: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) headers: Option<BTreeMap<String, Vec<String>>>,
    #[serde(default)]
    pub(crate) snis: Option<Vec<String>>,
    #[serde(default)]
    pub(crate) regex_priority: i64,
}

impl TestRoute {
    pub(crate) fn spec(&self) -> RouteSpec<'_> {
        RouteSpec {
            id: &self.id,
            methods: self.methods.as_deref().unwrap_or(&[]),
            hosts: self.hosts.as_deref().unwrap_or(&[]),
            paths: self.paths.as_deref().unwrap_or(&[]),
            headers: self
                .headers
                .iter()
                .flatten()
                .map(|(name, values)| (name.as_str(), values.as_slice()))
                .collect(),
            snis: self.snis.as_deref().unwrap_or(&[]),
            regex_priority: self.regex_priority,
        }
    }
}

/// Routes from JSON objects; route `n` gets the id
/// `00000000-0000-4000-8000-00000000000n` unless it says otherwise.
pub(crate) fn routes(json: Value) -> Vec<TestRoute> {
    let Value::Array(list) = json else {
        panic!("routes must be a JSON array")
    };
    list.into_iter()
        .enumerate()
        .map(|(route_idx, fields)| {
            let mut route = json!({
                "id": format!("00000000-0000-4000-8000-{route_idx:012}"),
            });
            let (Value::Object(route_map), Value::Object(fields)) = (&mut route, fields) else {
                panic!("each route must be a JSON object")
            };
            route_map.extend(fields);
            serde_json::from_value(route).expect("route JSON matches TestRoute")
        })
        .collect()
}
