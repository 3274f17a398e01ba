//! The configuration snapshot: every entity at one config version, as the
//! control plane hands it to data planes, plus typed views of the entities
//! the data plane builds its runtime from.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};

/// One validated entity as compact JSON. Documents are shared, not copied,
/// between the control plane's state and every snapshot taken from it.
pub type EntityDoc = Arc<str>;

/// All entities at `version`, keyed by entity name (`services`, `routes`,
/// …), each list ordered by id. Entities are validated JSON documents in
/// Kong's shapes; consumers deserialize the typed views they need.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct ConfigSnapshot {
    pub version: u64,
    /// Lists are shared between a snapshot and the one a delta makes of
    /// it, except those the delta changes: applying a one-route change
    /// copies the routes list, not 30,000 pointers.
    entities: BTreeMap<String, Arc<Vec<EntityDoc>>>,
    /// The content hash, computed on first use or carried over from the
    /// snapshot a delta was applied to.
    #[serde(skip)]
    digest: OnceLock<ContentHash>,
}

fn shared(entities: BTreeMap<String, Vec<EntityDoc>>) -> BTreeMap<String, Arc<Vec<EntityDoc>>> {
    entities
        .into_iter()
        .map(|(name, list)| (name, Arc::new(list)))
        .collect()
}

/// Equal versions and documents; whether the hash was computed yet does
/// not count.
impl PartialEq for ConfigSnapshot {
    fn eq(&self, other: &ConfigSnapshot) -> bool {
        self.version == other.version && self.entities == other.entities
    }
}

impl ConfigSnapshot {
    /// A snapshot of `entities`, each list in id order.
    pub fn new(version: u64, entities: BTreeMap<String, Vec<EntityDoc>>) -> ConfigSnapshot {
        ConfigSnapshot {
            version,
            entities: shared(entities),
            digest: OnceLock::new(),
        }
    }

    /// A snapshot whose content hash the caller already knows (kept
    /// incrementally by the control plane's store).
    pub fn with_hash(
        version: u64,
        entities: BTreeMap<String, Vec<EntityDoc>>,
        hash: ContentHash,
    ) -> ConfigSnapshot {
        ConfigSnapshot {
            version,
            entities: shared(entities),
            digest: OnceLock::from(hash),
        }
    }

    /// A snapshot from JSON values (tests, declarative files).
    pub fn from_values(version: u64, entities: BTreeMap<String, Vec<Value>>) -> ConfigSnapshot {
        ConfigSnapshot::new(
            version,
            entities
                .into_iter()
                .map(|(name, list)| {
                    (
                        name,
                        list.iter().map(|v| Arc::from(v.to_string())).collect(),
                    )
                })
                .collect(),
        )
    }

    /// Add or replace one entity list from JSON values.
    pub fn insert_values(&mut self, entity: &str, list: Vec<Value>) {
        self.entities.insert(
            entity.to_owned(),
            Arc::new(list.iter().map(|v| Arc::from(v.to_string())).collect()),
        );
        self.digest = OnceLock::new();
    }

    /// Every entity list, in entity-name order.
    pub fn entities(&self) -> impl Iterator<Item = (&str, &[EntityDoc])> {
        self.entities
            .iter()
            .map(|(name, list)| (name.as_str(), list.as_slice()))
    }

    pub fn docs(&self, entity: &str) -> &[EntityDoc] {
        self.entities
            .get(entity)
            .map(|list| list.as_slice())
            .unwrap_or(&[])
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
            .map(|doc| parse_doc(entity, doc))
            .collect()
    }

    /// Hash of the content (not the version): equal configurations hash
    /// equally whatever path produced them. A full pass the first time; a
    /// snapshot made by [`ConfigSnapshot::apply_delta`] inherits it updated.
    pub fn content_hash(&self) -> ContentHash {
        *self.digest.get_or_init(|| {
            let mut sum = ContentHash::default();
            for (name, list) in &self.entities {
                for doc in list.iter() {
                    sum.add(name, doc);
                }
            }
            sum
        })
    }

    /// [`ConfigSnapshot::content_hash`] as it travels and is shown.
    pub fn hash(&self) -> String {
        self.content_hash().to_string()
    }
}

/// One document of kind `entity` as `T`; the error names the entity.
pub fn parse_doc<T: for<'de> Deserialize<'de>>(
    entity: &str,
    doc: &str,
) -> Result<T, SnapshotError> {
    serde_json::from_str::<T>(doc).map_err(|e| SnapshotError::Entity {
        entity: entity.to_owned(),
        id: doc_id(doc).unwrap_or_else(|| "?".to_owned()),
        reason: e.to_string(),
    })
}

#[derive(Deserialize)]
struct IdOnly {
    id: String,
}

/// The `id` of an entity document.
pub fn doc_id(doc: &str) -> Option<String> {
    serde_json::from_str::<IdOnly>(doc).ok().map(|only| only.id)
}

/// What changed between two snapshots: documents created or replaced, by
/// entity name (each list in id order), and `(entity, id)` of those removed.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct SnapshotDelta {
    pub upserted: BTreeMap<String, Vec<EntityDoc>>,
    pub deleted: Vec<(String, String)>,
}

impl SnapshotDelta {
    pub fn is_empty(&self) -> bool {
        self.upserted.values().all(Vec::is_empty) && self.deleted.is_empty()
    }

    /// This delta followed by `next`, as one delta.
    pub fn then(&self, next: &SnapshotDelta) -> SnapshotDelta {
        let mut changes: BTreeMap<(String, String), Option<EntityDoc>> = BTreeMap::new();
        for delta in [self, next] {
            for (entity, docs) in &delta.upserted {
                for doc in docs {
                    if let Some(id) = doc_id(doc) {
                        changes.insert((entity.clone(), id), Some(Arc::clone(doc)));
                    }
                }
            }
            for key in &delta.deleted {
                changes.insert(key.clone(), None);
            }
        }
        let mut out = SnapshotDelta::default();
        for ((entity, id), doc) in changes {
            match doc {
                Some(doc) => out.upserted.entry(entity).or_default().push(doc),
                None => out.deleted.push((entity, id)),
            }
        }
        out
    }
}

/// Where the document with `id` is, or would be, in an id-ordered list.
fn position(list: &[EntityDoc], id: &str) -> Result<usize, usize> {
    list.binary_search_by(|doc| doc_id(doc).unwrap_or_default().as_str().cmp(id))
}

impl ConfigSnapshot {
    /// The changes that turn `self` into `newer`. Documents the two share
    /// (the same allocation, as consecutive snapshots of one control plane
    /// do for unchanged entities) are not parsed, so the cost is in the
    /// size of the change, plus one pass over the pointers.
    pub fn diff(&self, newer: &ConfigSnapshot) -> SnapshotDelta {
        use std::collections::HashSet;
        let empty = Arc::new(Vec::new());
        let mut delta = SnapshotDelta::default();
        let names: std::collections::BTreeSet<&String> =
            self.entities.keys().chain(newer.entities.keys()).collect();
        for name in names {
            let old = self.entities.get(name).unwrap_or(&empty);
            let new = newer.entities.get(name).unwrap_or(&empty);
            if Arc::ptr_eq(old, new) {
                continue;
            }
            let old_ptrs: HashSet<*const u8> = old.iter().map(|doc| doc.as_ptr()).collect();
            let new_ptrs: HashSet<*const u8> = new.iter().map(|doc| doc.as_ptr()).collect();
            let upserted: Vec<EntityDoc> = new
                .iter()
                .filter(|doc| !old_ptrs.contains(&doc.as_ptr()) && !contains_text(old, doc))
                .cloned()
                .collect();
            let upserted_ids: HashSet<String> =
                upserted.iter().filter_map(|doc| doc_id(doc)).collect();
            for doc in old.iter().filter(|doc| !new_ptrs.contains(&doc.as_ptr())) {
                if let Some(id) = doc_id(doc) {
                    if !upserted_ids.contains(&id) && position(new, &id).is_err() {
                        delta.deleted.push((name.clone(), id));
                    }
                }
            }
            if !upserted.is_empty() {
                delta.upserted.insert(name.clone(), upserted);
            }
        }
        delta
    }

    /// The snapshot at `version` that `delta` makes of `self`; lists stay
    /// in id order. Costs a binary search (parsing a few ids) per change.
    pub fn apply_delta(&self, version: u64, delta: &SnapshotDelta) -> ConfigSnapshot {
        let mut sum = self.content_hash();
        let mut entities = self.entities.clone();
        for (entity, id) in &delta.deleted {
            if let Some(list) = entities.get_mut(entity) {
                if let Ok(at) = position(list, id) {
                    sum.remove(entity, &Arc::make_mut(list).remove(at));
                }
            }
        }
        for (entity, docs) in &delta.upserted {
            let list = Arc::make_mut(entities.entry(entity.clone()).or_default());
            for doc in docs {
                let Some(id) = doc_id(doc) else { continue };
                match position(list, &id) {
                    Ok(at) => {
                        sum.remove(entity, &list[at]);
                        list[at] = Arc::clone(doc);
                    }
                    Err(at) => list.insert(at, Arc::clone(doc)),
                }
                sum.add(entity, doc);
            }
        }
        ConfigSnapshot {
            version,
            entities,
            digest: OnceLock::from(sum),
        }
    }
}

/// Whether `list` holds a document with exactly this text (an unchanged
/// entity in a new allocation, as after a reload).
fn contains_text(list: &[EntityDoc], doc: &str) -> bool {
    match doc_id(doc) {
        Some(id) => position(list, &id).is_ok_and(|at| *list[at] == *doc),
        None => false,
    }
}

/// The content hash of a configuration: the sum, modulo 2^128, of a
/// 128-bit digest (SHA-256, truncated) of each entity's name and document.
/// A sum does not depend on order and updates in the size of a change (add
/// the new documents, subtract the old), so the control plane's store and
/// every data plane keep it without a pass over 30,000 entities per
/// version. It detects divergence between nodes that trust each other (the
/// stream is mutually authenticated); it is not a signature. The empty
/// configuration hashes to 32 zeros, Kong's empty `config_hash`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ContentHash(u128);

impl ContentHash {
    fn digest(entity: &str, doc: &str) -> u128 {
        let mut h = Sha256::new();
        h.update(entity.as_bytes());
        h.update([0]);
        h.update(doc.as_bytes());
        let full = h.finalize();
        let mut low = [0u8; 16];
        low.copy_from_slice(&full[..16]);
        u128::from_be_bytes(low)
    }

    /// Counts `doc`, an entity of kind `entity`, in.
    pub fn add(&mut self, entity: &str, doc: &str) {
        self.0 = self.0.wrapping_add(Self::digest(entity, doc));
    }

    /// Takes `doc`, counted in before, out.
    pub fn remove(&mut self, entity: &str, doc: &str) {
        self.0 = self.0.wrapping_sub(Self::digest(entity, doc));
    }
}

impl std::fmt::Display for ContentHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:032x}", self.0)
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

/// An upstream: a virtual host balanced over its targets. Optional fields
/// are `null` in Kong's shapes when unset; `hash_on` is also `null` after
/// the `least-connections` and `latency` shorthands.
#[derive(Clone, Debug, Deserialize)]
pub struct Upstream {
    pub id: String,
    pub name: String,
    pub algorithm: String,
    pub slots: u32,
    pub host_header: Option<String>,
    #[serde(default)]
    pub hash_on: Option<String>,
    #[serde(default)]
    pub hash_fallback: Option<String>,
    #[serde(default)]
    pub hash_on_header: Option<String>,
    #[serde(default)]
    pub hash_fallback_header: Option<String>,
    #[serde(default)]
    pub hash_on_cookie: Option<String>,
    #[serde(default)]
    pub hash_on_cookie_path: Option<String>,
    #[serde(default)]
    pub hash_on_query_arg: Option<String>,
    #[serde(default)]
    pub hash_fallback_query_arg: Option<String>,
    #[serde(default)]
    pub hash_on_uri_capture: Option<String>,
    #[serde(default)]
    pub hash_fallback_uri_capture: Option<String>,
    #[serde(default)]
    pub use_srv_name: Option<bool>,
    /// Kong's defaults when absent or `null`.
    #[serde(default)]
    pub healthchecks: Option<Healthchecks>,
}

/// `upstreams.healthchecks`, with Kong's defaults for missing fields and
/// for nested records that are `null` (as the Admin API stores records a
/// request left out).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(default)]
pub struct Healthchecks {
    #[serde(deserialize_with = "null_as_default")]
    pub active: ActiveChecks,
    #[serde(deserialize_with = "null_as_default")]
    pub passive: PassiveChecks,
    /// Percentage of the upstream's weight that must be healthy for the
    /// upstream to take traffic. Default 0.
    pub threshold: f64,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct ActiveChecks {
    /// `http`, `https`, `tcp`, `grpc` or `grpcs`. Default `http`.
    #[serde(rename = "type")]
    pub kind: String,
    /// Seconds. Default 1.
    pub timeout: f64,
    /// Probes in flight at once. Default 10.
    pub concurrency: u32,
    /// Default `/`.
    pub http_path: String,
    pub https_sni: Option<String>,
    /// Default true.
    pub https_verify_certificate: bool,
    pub headers: Option<BTreeMap<String, Vec<String>>>,
    #[serde(deserialize_with = "null_as_default")]
    pub healthy: ActiveHealthy,
    #[serde(deserialize_with = "null_as_default")]
    pub unhealthy: ActiveUnhealthy,
}

impl Default for ActiveChecks {
    fn default() -> Self {
        ActiveChecks {
            kind: "http".to_owned(),
            timeout: 1.0,
            concurrency: 10,
            http_path: "/".to_owned(),
            https_sni: None,
            https_verify_certificate: true,
            headers: None,
            healthy: ActiveHealthy::default(),
            unhealthy: ActiveUnhealthy::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct ActiveHealthy {
    /// Seconds between probes of healthy targets; 0 disables. Default 0.
    pub interval: f64,
    /// Default `[200, 302]`.
    pub http_statuses: Vec<u16>,
    /// Default 0 (never counted).
    pub successes: u8,
}

impl Default for ActiveHealthy {
    fn default() -> Self {
        ActiveHealthy {
            interval: 0.0,
            http_statuses: vec![200, 302],
            successes: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct ActiveUnhealthy {
    /// Seconds between probes of unhealthy targets; 0 disables. Default 0.
    pub interval: f64,
    /// Default `[429, 404, 500, 501, 502, 503, 504, 505]`.
    pub http_statuses: Vec<u16>,
    pub tcp_failures: u8,
    pub timeouts: u8,
    pub http_failures: u8,
}

impl Default for ActiveUnhealthy {
    fn default() -> Self {
        ActiveUnhealthy {
            interval: 0.0,
            http_statuses: vec![429, 404, 500, 501, 502, 503, 504, 505],
            tcp_failures: 0,
            timeouts: 0,
            http_failures: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct PassiveChecks {
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(deserialize_with = "null_as_default")]
    pub healthy: PassiveHealthy,
    #[serde(deserialize_with = "null_as_default")]
    pub unhealthy: PassiveUnhealthy,
}

impl Default for PassiveChecks {
    fn default() -> Self {
        PassiveChecks {
            kind: "http".to_owned(),
            healthy: PassiveHealthy::default(),
            unhealthy: PassiveUnhealthy::default(),
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct PassiveHealthy {
    /// Default: the 2xx and 3xx statuses Kong lists.
    pub http_statuses: Vec<u16>,
    pub successes: u8,
}

impl Default for PassiveHealthy {
    fn default() -> Self {
        PassiveHealthy {
            http_statuses: vec![
                200, 201, 202, 203, 204, 205, 206, 207, 208, 226, 300, 301, 302, 303, 304, 305,
                306, 307, 308,
            ],
            successes: 0,
        }
    }
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(default)]
pub struct PassiveUnhealthy {
    /// Default `[429, 500, 503]`.
    pub http_statuses: Vec<u16>,
    pub tcp_failures: u8,
    pub timeouts: u8,
    pub http_failures: u8,
}

impl Default for PassiveUnhealthy {
    fn default() -> Self {
        PassiveUnhealthy {
            http_statuses: vec![429, 500, 503],
            tcp_failures: 0,
            timeouts: 0,
            http_failures: 0,
        }
    }
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

/// `null` reads as the type's default, as a missing field does.
fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
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
        let mut sum = ContentHash::default();
        assert_eq!(sum.to_string(), "0".repeat(32), "Kong's empty hash");
        sum.add("services", r#"{"id":"1","host":"a"}"#);
        assert_eq!(sum.to_string(), a.hash());
        // The entity name counts: the same document as a route is other
        // content.
        let mut as_route = ContentHash::default();
        as_route.add("routes", r#"{"id":"1","host":"a"}"#);
        assert_ne!(as_route, sum);
        assert_eq!(a.list("services"), vec![json!({"id": "1", "host": "a"})]);
    }

    #[test]
    fn upstreams_read_with_kong_defaults() {
        let base = json!({
            "id": "u", "name": "backend", "algorithm": "least-connections", "slots": 10000,
            "host_header": null, "hash_on": null, "healthchecks": null,
        });
        let upstream: Upstream = serde_json::from_value(base).expect("upstream");
        assert_eq!(upstream.hash_on, None);
        assert_eq!(upstream.healthchecks, None);
        let defaults = Healthchecks::default();
        assert_eq!(defaults.active.kind, "http");
        assert_eq!(
            defaults.active.unhealthy.http_statuses,
            [429, 404, 500, 501, 502, 503, 504, 505]
        );
        assert_eq!(defaults.passive.unhealthy.http_statuses, [429, 500, 503]);

        // A partial record fills in the rest; nested records may be null.
        let partial = json!({
            "id": "u", "name": "backend", "algorithm": "round-robin", "slots": 100,
            "host_header": "api.example", "use_srv_name": true,
            "healthchecks": {
                "active": {"timeout": 0.5, "healthy": {"interval": 2}, "unhealthy": null},
                "passive": null,
                "threshold": 25,
            },
        });
        let upstream: Upstream = serde_json::from_value(partial).expect("upstream");
        let checks = upstream.healthchecks.expect("healthchecks");
        assert_eq!(checks.active.timeout, 0.5);
        assert_eq!(checks.active.healthy.interval, 2.0);
        assert_eq!(checks.active.healthy.http_statuses, [200, 302]);
        assert_eq!(checks.active.concurrency, 10);
        assert_eq!(checks.threshold, 25.0);
        assert_eq!(checks.passive, PassiveChecks::default());
        assert_eq!(checks.active.unhealthy, ActiveUnhealthy::default());
        assert_eq!(upstream.use_srv_name, Some(true));
    }
}

#[cfg(test)]
mod delta_tests {
    use super::*;
    use serde_json::json;

    fn snapshot(version: u64, services: &[(&str, &str)]) -> ConfigSnapshot {
        let mut entities = BTreeMap::new();
        entities.insert(
            "services".to_owned(),
            services
                .iter()
                .map(|(id, name)| json!({"id": id, "name": name}))
                .collect(),
        );
        entities.insert("routes".to_owned(), Vec::new());
        ConfigSnapshot::from_values(version, entities)
    }

    #[test]
    fn diff_then_apply_reproduces_the_newer_snapshot() {
        let old = snapshot(1, &[("a", "one"), ("b", "two"), ("c", "three")]);
        let new = snapshot(2, &[("a", "one"), ("b", "TWO"), ("d", "four")]);
        let delta = old.diff(&new);
        assert_eq!(delta.deleted, vec![("services".to_owned(), "c".to_owned())]);
        let upserted: Vec<&str> = delta.upserted["services"].iter().map(|d| &**d).collect();
        assert_eq!(
            upserted,
            vec![r#"{"id":"b","name":"TWO"}"#, r#"{"id":"d","name":"four"}"#]
        );
        let applied = old.apply_delta(2, &delta);
        assert_eq!(applied, new);
        assert_eq!(applied.hash(), new.hash());
    }

    #[test]
    fn shared_documents_are_not_changes_and_deltas_compose() {
        let one = snapshot(1, &[("a", "one"), ("b", "two")]);
        // The next version shares the unchanged document's allocation.
        let mut two = one.clone();
        two.version = 2;
        Arc::make_mut(two.entities.get_mut("services").expect("services"))[1] =
            Arc::from(r#"{"id":"b","name":"2"}"#);
        two.digest = OnceLock::new();
        let first = one.diff(&two);
        assert_eq!(first.upserted["services"].len(), 1);
        let three = snapshot(3, &[("b", "2"), ("e", "five")]);
        let second = two.diff(&three);
        let both = first.then(&second);
        let applied = one.apply_delta(3, &both);
        assert_eq!(applied, three);
        // The hash carried through the delta equals a full pass.
        assert_eq!(applied.hash(), three.hash());
        assert_ne!(applied.hash(), one.hash());
        assert!(three.diff(&three).is_empty());
    }
}
