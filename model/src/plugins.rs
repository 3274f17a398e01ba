//! Plugin configuration schemas (placeholder until the plugin module lands).

use std::sync::Arc;

use crate::schema::Record;

pub fn subschema(_name: &str) -> Option<Arc<Record>> {
    None
}

pub fn names() -> Vec<&'static str> {
    Vec::new()
}
