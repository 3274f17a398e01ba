//! The configuration snapshot: every entity at one config version, as the
//! control plane hands it to data planes, plus typed views of the entities
//! the data plane builds its runtime from.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// All entities at `version`, keyed by entity name (`services`, `routes`,
/// …), each list ordered by id. Entities are validated JSON objects in
/// Kong's shapes.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct ConfigSnapshot {
    pub version: u64,
    pub entities: BTreeMap<String, Vec<Value>>,
}

impl ConfigSnapshot {
    pub fn list(&self, entity: &str) -> &[Value] {
        self.entities.get(entity).map(Vec::as_slice).unwrap_or(&[])
    }

    /// Typed entities of one kind; entries that do not deserialize are
    /// returned as errors so the caller can refuse the whole snapshot.
    pub fn typed<T: for<'de> Deserialize<'de>>(
        &self,
        entity: &str,
    ) -> Result<Vec<T>, SnapshotError> {
        self.list(entity)
            .iter()
            .map(|v| {
                T::deserialize(v).map_err(|e| SnapshotError::Entity {
                    entity: entity.to_owned(),
                    id: v
                        .get("id")
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_owned(),
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
            for v in list {
                h.entity(v);
            }
        }
        h.finish()
    }
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

    pub fn entity<T: Serialize>(&mut self, v: &T) {
        let bytes = serde_json::to_vec(v).unwrap_or_default();
        self.inner.update(&bytes);
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
        a.entities
            .insert("services".into(), vec![json!({"id": "1", "host": "a"})]);
        let mut b = a.clone();
        b.version = 7;
        assert_eq!(a.hash(), b.hash());
        b.entities
            .insert("services".into(), vec![json!({"id": "1", "host": "b"})]);
        assert_ne!(a.hash(), b.hash());
        let mut h = ContentHasher::default();
        h.list("services");
        h.entity(&json!({"id": "1", "host": "a"}));
        assert_eq!(h.finish(), a.hash());
    }
}
