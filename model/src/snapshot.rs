//! The configuration snapshot: every entity at one config version, as the
//! control plane hands it to data planes, plus typed views of the entities
//! the data plane builds its runtime from.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// One validated entity as compact JSON. Documents are shared, not copied,
/// between the control plane's state and every snapshot taken from it.
pub type EntityDoc = Arc<str>;

/// All entities at `version`, keyed by entity name (`services`, `routes`,
/// …), each list ordered by id. Entities are validated JSON documents in
/// Kong's shapes; consumers deserialize the typed views they need.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ConfigSnapshot {
    pub version: u64,
    pub entities: BTreeMap<String, Vec<EntityDoc>>,
}

impl ConfigSnapshot {
    /// A snapshot from JSON values (tests, declarative files).
    pub fn from_values(version: u64, entities: BTreeMap<String, Vec<Value>>) -> ConfigSnapshot {
        ConfigSnapshot {
            version,
            entities: entities
                .into_iter()
                .map(|(name, list)| {
                    (
                        name,
                        list.iter().map(|v| Arc::from(v.to_string())).collect(),
                    )
                })
                .collect(),
        }
    }

    /// Add or replace one entity list from JSON values.
    pub fn insert_values(&mut self, entity: &str, list: Vec<Value>) {
        self.entities.insert(
            entity.to_owned(),
            list.iter().map(|v| Arc::from(v.to_string())).collect(),
        );
    }

    pub fn docs(&self, entity: &str) -> &[EntityDoc] {
        self.entities.get(entity).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The entities of one kind as JSON values.
    pub fn list(&self, entity: &str) -> Vec<Value> {
        self.docs(entity)
            .iter()
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect()
    }

    /// Typed entities of one kind; entries that do not deserialize are
    /// returned as errors so the caller can refuse the whole snapshot.
    pub fn typed<T: for<'de> Deserialize<'de>>(
        &self,
        entity: &str,
    ) -> Result<Vec<T>, SnapshotError> {
        self.docs(entity)
            .iter()
            .map(|doc| {
                serde_json::from_str::<T>(doc).map_err(|e| SnapshotError::Entity {
                    entity: entity.to_owned(),
                    id: serde_json::from_str::<IdOnly>(doc)
                        .map(|i| i.id)
                        .unwrap_or_else(|_| "?".to_owned()),
                    reason: e.to_string(),
                })
            })
            .collect()
    }

    /// Hash of the content (not the version): equal configurations hash
    /// equally whatever path produced them.
    pub fn hash(&self) -> String {
        let mut h = ContentHasher::default();
        for (name, list) in &self.entities {
            h.list(name);
            for doc in list {
                h.doc(doc);
            }
        }
        h.finish()
    }
}

#[derive(Deserialize)]
struct IdOnly {
    id: String,
}

/// The content hash of a configuration, fed list by list (in entity-name
/// order) and entity by entity (in id order), so that holders of the same
/// configuration in other shapes compute the same value without building a
/// snapshot.
#[derive(Default)]
pub struct ContentHasher {
    inner: Sha256,
}

impl ContentHasher {
    pub fn list(&mut self, name: &str) {
        self.inner.update(name.as_bytes());
        self.inner.update([0]);
    }

    /// One entity, as its compact JSON document.
    pub fn doc(&mut self, doc: &str) {
        self.inner.update(doc.as_bytes());
        self.inner.update([0]);
    }

    pub fn finish(self) -> String {
        hex::encode(&self.inner.finalize()[..16])
    }
}

#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum SnapshotError {
    #[error("invalid {entity} entity {id}: {reason}")]
    Entity {
        entity: String,
        id: String,
        reason: String,
    },
}

/// A `{"id": …}` foreign reference.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct ForeignRef {
    pub id: String,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Service {
    pub id: String,
    pub name: Option<String>,
    pub protocol: String,
    pub host: String,
    pub port: u16,
    pub path: Option<String>,
    pub retries: u32,
    pub connect_timeout: u64,
    pub read_timeout: u64,
    pub write_timeout: u64,
    #[serde(default = "yes")]
    pub enabled: bool,
    pub tls_verify: Option<bool>,
}

fn yes() -> bool {
    true
}

#[derive(Clone, Debug, Deserialize)]
pub struct Route {
    pub id: String,
    pub name: Option<String>,
    pub protocols: Vec<String>,
    pub methods: Option<Vec<String>>,
    pub hosts: Option<Vec<String>>,
    pub paths: Option<Vec<String>>,
    pub headers: Option<BTreeMap<String, Vec<String>>>,
    pub snis: Option<Vec<String>>,
    pub https_redirect_status_code: u16,
    #[serde(default)]
    pub regex_priority: i64,
    pub strip_path: bool,
    pub preserve_host: bool,
    #[serde(default = "v0")]
    pub path_handling: String,
    pub service: Option<ForeignRef>,
    pub created_at: Option<i64>,
}

fn v0() -> String {
    "v0".to_owned()
}

#[derive(Clone, Debug, Deserialize)]
pub struct Upstream {
    pub id: String,
    pub name: String,
    pub algorithm: String,
    pub slots: u32,
    pub host_header: Option<String>,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Target {
    pub id: String,
    pub upstream: ForeignRef,
    pub target: String,
    pub weight: u32,
}

#[derive(Clone, Debug, Deserialize)]
pub struct Plugin {
    pub id: String,
    pub name: String,
    pub enabled: bool,
    pub config: Value,
    pub route: Option<ForeignRef>,
    pub service: Option<ForeignRef>,
    pub consumer: Option<ForeignRef>,
    pub protocols: Vec<String>,
}

/// A snapshot shared between threads without copying.
pub type SharedSnapshot = Arc<ConfigSnapshot>;

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn hash_depends_on_content_not_version() {
        let mut a = ConfigSnapshot::default();
        a.insert_values("services", vec![json!({"id": "1", "host": "a"})]);
        let mut b = a.clone();
        b.version = 7;
        assert_eq!(a.hash(), b.hash());
        b.insert_values("services", vec![json!({"id": "1", "host": "b"})]);
        assert_ne!(a.hash(), b.hash());
        let mut h = ContentHasher::default();
        h.list("services");
        h.doc(r#"{"id":"1","host":"a"}"#);
        assert_eq!(h.finish(), a.hash());
        assert_eq!(a.list("services"), vec![json!({"id": "1", "host": "a"})]);
    }
}
