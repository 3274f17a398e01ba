//! Entity operations with Kong's DAO semantics (insert, update, upsert,
//! delete with cascades, unique and foreign-key checks, pagination, tags)
//! over an in-memory copy of the configuration that is written through to
//! the database.
//!
//! Writers are serialised by one async mutex: a write validates against the
//! in-memory state, commits its changes in one database transaction and only
//! then applies them in memory, so a failed commit leaves nothing behind.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use base64::Engine;
use gatehouse_model::declarative::Declarative;
use gatehouse_model::entities::{self, ENTITIES};
use gatehouse_model::schema::{is_uuid, Context, EntitySchema, Errors, FieldType, OnDelete};
use gatehouse_model::snapshot::{ConfigSnapshot, ContentHash, EntityDoc};
use gatehouse_model::DbError;
use serde_json::{json, Map, Value};
use tokio::sync::{watch, Mutex};

use crate::store::{Backend, Change, StoreError};

type Entity = Map<String, Value>;

/// One stored entity: its JSON document (shared with snapshots) and what
/// listings and constraint checks read without parsing it.
struct Row {
    doc: EntityDoc,
    /// Foreign-key field → referenced id.
    fks: Vec<(&'static str, String)>,
    tags: Vec<String>,
    /// Unique-index keys this row owns.
    index_keys: Vec<(&'static str, String)>,
    /// When an entity with Kong's `ttl` stops existing (unix seconds).
    expires: Option<u64>,
}

impl Row {
    fn fk(&self, field: &str) -> Option<&str> {
        self.fks
            .iter()
            .find(|(f, _)| *f == field)
            .map(|(_, id)| id.as_str())
    }

    fn parse(&self) -> Entity {
        serde_json::from_str(&self.doc).unwrap_or_default()
    }

    /// Kong hides an entity from the moment its `ttl` runs out, before
    /// its row is purged.
    fn live(&self, now: u64) -> bool {
        self.expires.is_none_or(|at| at > now)
    }
}

/// Now, in whole unix seconds, the unit of Kong's `ttl`.
fn now_secs() -> u64 {
    gatehouse_model::schema::validate_now_s() as u64
}

/// Entities of every kind at one version. Entities are kept as compact
/// JSON documents: a write parses the one entity it changes, and a snapshot
/// for data planes shares the documents instead of copying them.
#[derive(Default)]
pub struct State {
    pub version: u64,
    tables: HashMap<&'static str, BTreeMap<String, Row>>,
    /// `(entity, unique field)` → value key → id. Cache keys are indexed
    /// under the field name `#cache_key`.
    unique: HashMap<(&'static str, &'static str), HashMap<String, String>>,
    /// The content hash of every row, kept as rows come and go.
    content: ContentHash,
    /// Rows with a `ttl`, by when they expire.
    expiring: BTreeSet<(u64, &'static str, String)>,
}

const CACHE_KEY: &str = "#cache_key";

impl State {
    fn rows(&self, entity: &str) -> impl Iterator<Item = (&String, &Row)> {
        self.tables.get(entity).into_iter().flat_map(|t| t.iter())
    }

    fn row(&self, entity: &str, id: &str) -> Option<&Row> {
        self.tables.get(entity)?.get(id)
    }

    pub fn contains(&self, entity: &str, id: &str) -> bool {
        self.row(entity, id).is_some()
    }

    /// One entity, parsed.
    pub fn get(&self, entity: &str, id: &str) -> Option<Entity> {
        self.row(entity, id).map(Row::parse)
    }

    /// The id an entity's foreign key points to.
    pub fn fk(&self, entity: &str, id: &str, field: &str) -> Option<&str> {
        self.row(entity, id)?.fk(field)
    }

    /// Every entity of a kind, parsed, in id order; not those whose `ttl`
    /// has run out.
    pub fn iter(&self, entity: &str) -> impl Iterator<Item = Entity> + '_ {
        let now = now_secs();
        self.rows(entity)
            .filter(move |(_, r)| r.live(now))
            .map(|(_, r)| r.parse())
    }

    pub fn count(&self, entity: &str) -> usize {
        self.tables.get(entity).map_or(0, BTreeMap::len)
    }

    fn index_keys(schema: &EntitySchema, e: &Entity) -> Vec<(&'static str, String)> {
        let mut keys = Vec::new();
        for field in schema.unique_fields() {
            match e.get(field) {
                None | Some(Value::Null) => {}
                Some(v) => keys.push((field, value_key(v))),
            }
        }
        if !schema.cache_key.is_empty() {
            keys.push((CACHE_KEY, cache_key(schema, e)));
        }
        keys
    }

    fn put(&mut self, schema: &'static EntitySchema, id: String, e: Entity) {
        self.remove(schema, &id);
        let index_keys = Self::index_keys(schema, &e);
        for (field, key) in &index_keys {
            self.unique
                .entry((schema.name, field))
                .or_default()
                .insert(key.clone(), id.clone());
        }
        let fks = schema
            .foreign_fields()
            .filter_map(|(field, _, _)| foreign_id(&e, field).map(|fid| (field, fid)))
            .collect();
        let tags = e
            .get("tags")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|t| t.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        // Canonical text (keys sorted at every level): the document a write
        // produced and the one a reload reads back (PostgreSQL's jsonb
        // reorders keys) are the same bytes, so configuration hashes do
        // not change when the control plane restarts.
        let mut doc = Value::Object(e);
        sort_keys(&mut doc);
        let expires = if schema.ttl {
            doc.get("ttl").and_then(Value::as_u64)
        } else {
            None
        };
        if let Some(at) = expires {
            self.expiring.insert((at, schema.name, id.clone()));
        }
        let doc: EntityDoc = Arc::from(doc.to_string());
        self.content.add(schema.name, &doc);
        let row = Row {
            doc,
            fks,
            tags,
            index_keys,
            expires,
        };
        self.tables.entry(schema.name).or_default().insert(id, row);
    }

    fn remove(&mut self, schema: &'static EntitySchema, id: &str) {
        let Some(old) = self.tables.get_mut(schema.name).and_then(|t| t.remove(id)) else {
            return;
        };
        self.content.remove(schema.name, &old.doc);
        if let Some(at) = old.expires {
            self.expiring.remove(&(at, schema.name, id.to_owned()));
        }
        for (field, key) in old.index_keys {
            if let Some(idx) = self.unique.get_mut(&(schema.name, field)) {
                if idx.get(&key).is_some_and(|owner| owner == id) {
                    idx.remove(&key);
                }
            }
        }
    }

    fn lookup_unique(
        &self,
        entity: &'static str,
        field: &'static str,
        v: &Value,
    ) -> Option<&String> {
        self.unique.get(&(entity, field))?.get(&value_key(v))
    }

    /// Rows whose `ttl` has run out by `now`.
    fn expired(&self, now: u64) -> Vec<(&'static EntitySchema, String)> {
        self.expiring
            .iter()
            .take_while(|(at, _, _)| *at <= now)
            .filter_map(|(_, entity, id)| Some((entities::entity(entity)?, id.clone())))
            .collect()
    }

    /// When the next row expires.
    fn next_expiry(&self) -> Option<u64> {
        self.expiring.first().map(|(at, _, _)| *at)
    }

    /// The content hash of the configuration, equal to the hash of its
    /// snapshot.
    pub fn hash(&self) -> String {
        self.content.to_string()
    }

    /// The configuration as a snapshot for data planes; documents are
    /// shared, so this copies pointers, not entities.
    pub fn snapshot(&self) -> ConfigSnapshot {
        let mut entities = BTreeMap::new();
        for schema in ENTITIES.iter() {
            let list: Vec<EntityDoc> = self.rows(schema.name).map(|(_, r)| r.doc.clone()).collect();
            entities.insert(schema.name.to_owned(), list);
        }
        ConfigSnapshot::with_hash(self.version, entities, self.content)
    }
}

fn sort_keys(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.sort_keys();
            for nested in map.values_mut() {
                sort_keys(nested);
            }
        }
        Value::Array(items) => items.iter_mut().for_each(sort_keys),
        _ => {}
    }
}

fn value_key(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn cache_key(schema: &EntitySchema, e: &Entity) -> String {
    schema
        .cache_key
        .iter()
        .map(|f| match e.get(*f) {
            Some(Value::Object(o)) => o.get("id").map(value_key).unwrap_or_default(),
            Some(Value::Null) | None => String::new(),
            Some(v) => value_key(v),
        })
        .collect::<Vec<_>>()
        .join(":")
}

fn foreign_id(e: &Entity, field: &str) -> Option<String> {
    e.get(field)?.get("id")?.as_str().map(str::to_owned)
}

/// The parent of a nested request (`/services/{id}/routes`): the child's
/// foreign field and the parent's id.
#[derive(Clone, Debug)]
pub struct Parent {
    pub field: &'static str,
    pub id: String,
}

/// Filters for listing entities.
#[derive(Clone, Debug, Default)]
pub struct PageQuery {
    pub size: usize,
    pub offset: Option<String>,
    pub tags: Option<(Vec<String>, bool)>,
    pub parent: Option<Parent>,
}

pub struct Page {
    pub data: Vec<Value>,
    pub offset: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DaoError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("storage failed")]
    Store(#[from] StoreError),
}

pub struct Dao {
    state: RwLock<State>,
    writer: Mutex<()>,
    backend: Box<dyn Backend>,
    version_tx: watch::Sender<u64>,
}

impl Dao {
    /// Load every stored entity into memory.
    pub async fn load(backend: Box<dyn Backend>) -> Result<Arc<Dao>, StoreError> {
        let (rows, version) = backend.load().await?;
        let mut state = State {
            version,
            ..State::default()
        };
        for row in rows {
            let Some(schema) = entities::entity(&row.entity) else {
                tracing::warn!(entity = %row.entity, id = %row.id, "Skipping a stored entity of unknown kind.");
                continue;
            };
            let body: Entity =
                serde_json::from_str(&row.body).map_err(|source| StoreError::Corrupt {
                    entity: row.entity.clone(),
                    id: row.id.clone(),
                    source,
                })?;
            state.put(schema, row.id, body);
        }
        let (version_tx, _) = watch::channel(version);
        Ok(Arc::new(Dao {
            state: RwLock::new(state),
            writer: Mutex::new(()),
            backend,
            version_tx,
        }))
    }

    /// Saves data-plane records in one transaction (see `cluster`).
    pub async fn save_data_planes(
        &self,
        planes: &[(String, String, i64)],
    ) -> Result<(), StoreError> {
        self.backend.save_data_planes(planes).await
    }

    /// Data-plane records seen since `since` (unix seconds).
    pub async fn load_data_planes(&self, since: i64) -> Result<Vec<(String, String)>, StoreError> {
        self.backend.load_data_planes(since).await
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.version_tx.subscribe()
    }

    pub fn backend(&self) -> &dyn Backend {
        &*self.backend
    }

    /// Run `f` over a consistent read of the state.
    pub fn read<T>(&self, f: impl FnOnce(&State) -> T) -> T {
        let guard = self.state.read().unwrap_or_else(|p| p.into_inner());
        f(&guard)
    }

    pub fn version(&self) -> u64 {
        self.read(|s| s.version)
    }

    /// Find an entity by id or endpoint key, optionally under a parent.
    pub fn select(
        &self,
        schema: &'static EntitySchema,
        key: &str,
        parent: Option<&Parent>,
    ) -> Option<Value> {
        self.read(|s| {
            let id = resolve_key(s, schema, key, parent)?;
            let row = s.row(schema.name, &id)?;
            if !row.live(now_secs()) {
                return None;
            }
            if let Some(p) = parent {
                if row.fk(p.field) != Some(p.id.as_str()) {
                    return None;
                }
            }
            Some(render(s, schema, &row.parse()))
        })
    }

    pub fn page(&self, schema: &'static EntitySchema, q: &PageQuery) -> Result<Page, DbError> {
        let after = match &q.offset {
            None => None,
            Some(o) => Some(decode_offset(o)?),
        };
        let now = now_secs();
        Ok(self.read(|s| {
            let mut data = Vec::new();
            let mut last = None;
            let mut more = false;
            let table = s.tables.get(schema.name);
            let iter = table.into_iter().flat_map(|t| match &after {
                Some(a) => t.range::<String, _>((
                    std::ops::Bound::Excluded(a.clone()),
                    std::ops::Bound::Unbounded,
                )),
                None => t.range::<String, _>(..),
            });
            for (id, row) in iter {
                if !row.live(now) {
                    continue;
                }
                if let Some(p) = &q.parent {
                    if row.fk(p.field) != Some(p.id.as_str()) {
                        continue;
                    }
                }
                if let Some((tags, and)) = &q.tags {
                    let ok = if *and {
                        tags.iter().all(|t| row.tags.contains(t))
                    } else {
                        tags.iter().any(|t| row.tags.contains(t))
                    };
                    if !ok {
                        continue;
                    }
                }
                if data.len() == q.size {
                    more = true;
                    break;
                }
                data.push(render(s, schema, &row.parse()));
                last = Some(id.clone());
            }
            Page {
                data,
                offset: if more {
                    last.map(|l| encode_offset(&l))
                } else {
                    None
                },
            }
        }))
    }

    /// `POST`: create an entity.
    pub async fn insert(
        &self,
        schema: &'static EntitySchema,
        input: Entity,
        parent: Option<&Parent>,
    ) -> Result<Value, DaoError> {
        let _w = self.writer.lock().await;
        self.purge_expired().await?;
        let (id, entity, extra) = self.read(|s| prepare_insert(s, schema, input, parent))?;
        self.commit(schema, id, entity, extra).await
    }

    /// `PATCH`: merge `input` over an existing entity.
    pub async fn update(
        &self,
        schema: &'static EntitySchema,
        key: &str,
        input: Entity,
        parent: Option<&Parent>,
    ) -> Result<Value, DaoError> {
        let _w = self.writer.lock().await;
        self.purge_expired().await?;
        let (id, entity, extra) = self.read(|s| prepare_update(s, schema, key, input, parent))?;
        self.commit(schema, id, entity, extra).await
    }

    /// `PUT`: create or replace the entity named by `key`.
    pub async fn upsert(
        &self,
        schema: &'static EntitySchema,
        key: &str,
        input: Entity,
        parent: Option<&Parent>,
    ) -> Result<Value, DaoError> {
        let _w = self.writer.lock().await;
        self.purge_expired().await?;
        let (id, entity, extra) = self.read(|s| prepare_upsert(s, schema, key, input, parent))?;
        self.commit(schema, id, entity, extra).await
    }

    /// `DELETE`: remove an entity and what cascades from it. Deleting
    /// something absent is not an error.
    pub async fn delete(
        &self,
        schema: &'static EntitySchema,
        key: &str,
        parent: Option<&Parent>,
    ) -> Result<(), DaoError> {
        let _w = self.writer.lock().await;
        self.purge_expired().await?;
        let changes = self.read(
            |s| -> Result<Vec<(&'static EntitySchema, String)>, DbError> {
                let Some(id) = resolve_key(s, schema, key, parent) else {
                    // Kong's acl endpoint answers 404 for a group the
                    // consumer does not have.
                    if schema.name == "acls" && !is_uuid(key) {
                        return Err(DbError::NotFound);
                    }
                    return Ok(Vec::new());
                };
                let Some(row) = s.row(schema.name, &id) else {
                    return Ok(Vec::new());
                };
                if let Some(p) = parent {
                    if row.fk(p.field) != Some(p.id.as_str()) {
                        return Ok(Vec::new());
                    }
                }
                let mut out = Vec::new();
                collect_deletes(s, schema, &id, &mut out)?;
                Ok(out)
            },
        )?;
        self.commit_deletes(&changes).await
    }

    /// Removes `rows` in one transaction, as one version; nothing when
    /// there are none.
    async fn commit_deletes(
        &self,
        rows: &[(&'static EntitySchema, String)],
    ) -> Result<(), DaoError> {
        if rows.is_empty() {
            return Ok(());
        }
        let changes: Vec<Change> = rows
            .iter()
            .map(|(schema, id)| Change::Delete {
                entity: schema.name,
                id: id.clone(),
            })
            .collect();
        let version = self.backend.commit(&changes).await?;
        self.apply(version, |state| {
            for (schema, id) in rows {
                state.remove(schema, id);
            }
        });
        Ok(())
    }

    async fn commit(
        &self,
        schema: &'static EntitySchema,
        id: String,
        entity: Entity,
        extra: Vec<Pending>,
    ) -> Result<Value, DaoError> {
        let mut db_changes = vec![Change::Upsert {
            entity: schema.name,
            id: id.clone(),
            body: Value::Object(entity.clone()),
        }];
        for p in &extra {
            db_changes.push(match p {
                Pending::Put(sch, pid, e) => Change::Upsert {
                    entity: sch.name,
                    id: pid.clone(),
                    body: Value::Object(e.clone()),
                },
                Pending::Delete(sch, pid) => Change::Delete {
                    entity: sch.name,
                    id: pid.clone(),
                },
            });
        }
        let version = self.backend.commit(&db_changes).await?;
        Ok(self.apply(version, |state| {
            for p in extra {
                match p {
                    Pending::Delete(sch, pid) => state.remove(sch, &pid),
                    Pending::Put(sch, pid, e) => state.put(sch, pid, e),
                }
            }
            state.put(schema, id.clone(), entity);
            let e = state.get(schema.name, &id).unwrap_or_default();
            render(state, schema, &e)
        }))
    }

    /// Deletes the rows whose `ttl` has run out, as one version, so data
    /// planes drop them too. Called with the writer lock held: a write
    /// never trips over an expired row's unique key.
    async fn purge_expired(&self) -> Result<(), DaoError> {
        let expired = self.read(|s| s.expired(now_secs()));
        self.commit_deletes(&expired).await?;
        if !expired.is_empty() {
            tracing::debug!(count = expired.len(), "Purged entities whose ttl ran out.");
        }
        Ok(())
    }

    /// Purges expired rows as their `ttl` runs out, until `shutdown`
    /// changes. Reads already hide them; the purge is what tells data
    /// planes (which also check the time themselves).
    pub async fn expire(self: Arc<Self>, mut shutdown: watch::Receiver<()>) {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => return,
            }
            if self
                .read(State::next_expiry)
                .is_none_or(|at| at > now_secs())
            {
                continue;
            }
            let _w = self.writer.lock().await;
            if let Err(error) = self.purge_expired().await {
                tracing::warn!(%error, "Cannot purge expired entities; retrying.");
            }
        }
    }

    fn apply<T>(&self, version: u64, f: impl FnOnce(&mut State) -> T) -> T {
        let out = {
            let mut guard = self.state.write().unwrap_or_else(|p| p.into_inner());
            let out = f(&mut guard);
            guard.version = version;
            out
        };
        self.version_tx.send_replace(version);
        out
    }
}

/// Extra entity changes riding with a write (a certificate's SNIs).
enum Pending {
    Put(&'static EntitySchema, String, Entity),
    Delete(&'static EntitySchema, String),
}

fn encode_offset(id: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(json!([id]).to_string())
}

fn decode_offset(offset: &str) -> Result<String, DbError> {
    let bad = |reason: &str| DbError::InvalidOffset {
        offset: offset.to_owned(),
        reason: reason.to_owned(),
    };
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(offset)
        .map_err(|_| bad("bad base64 encoding"))?;
    let v: Value = serde_json::from_slice(&bytes).map_err(|_| bad("bad json encoding"))?;
    v.get(0)
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| bad("bad json encoding"))
}

/// Resolve a URL key (id or endpoint key) to an id.
fn resolve_key(
    s: &State,
    schema: &'static EntitySchema,
    key: &str,
    parent: Option<&Parent>,
) -> Option<String> {
    if is_uuid(key) {
        let id = key.to_ascii_lowercase();
        return s.contains(schema.name, &id).then_some(id);
    }
    if schema.name == "targets" {
        // Targets are named by `host:port` within their upstream.
        let up = parent?;
        return s
            .rows("targets")
            .filter(|(_, row)| row.fk(up.field) == Some(up.id.as_str()))
            .find(|(_, row)| row.parse().get("target").and_then(Value::as_str) == Some(key))
            .map(|(id, _)| id.clone());
    }
    if schema.name == "acls" {
        // `/consumers/{c}/acls/{group}` (`kong/plugins/acl/api.lua`).
        let consumer = parent?;
        return s
            .rows("acls")
            .filter(|(_, row)| row.fk(consumer.field) == Some(consumer.id.as_str()))
            .find(|(_, row)| row.parse().get("group").and_then(Value::as_str) == Some(key))
            .map(|(id, _)| id.clone());
    }
    if schema.name == "certificates" {
        // Kong lets a certificate be named by one of its SNIs.
        let sni_schema = entities::entity("snis")?;
        let sni_id = s.lookup_unique(sni_schema.name, "name", &json!(key))?;
        return s.fk("snis", sni_id, "certificate").map(str::to_owned);
    }
    let field = schema.endpoint_key?;
    s.lookup_unique(schema.name, field, &json!(key)).cloned()
}

/// The entity as the Admin API shows it.
fn render(s: &State, schema: &EntitySchema, e: &Entity) -> Value {
    let mut out = e.clone();
    if schema.ttl {
        // Stored as when it expires (as Kong exports it); shown as the
        // seconds left, or null.
        let now = gatehouse_model::schema::validate_now_s();
        let left = e
            .get("ttl")
            .and_then(Value::as_u64)
            .map(|at| (at as f64 - now).floor().max(0.0) as u64);
        out.insert("ttl".into(), json!(left));
    }
    if schema.name == "certificates" {
        let id = e.get("id").and_then(Value::as_str).unwrap_or("");
        let mut names: Vec<String> = s
            .rows("snis")
            .filter(|(_, row)| row.fk("certificate") == Some(id))
            .filter_map(|(_, row)| row.parse().get("name")?.as_str().map(str::to_owned))
            .collect();
        names.sort();
        out.insert("snis".into(), json!(names));
    }
    Value::Object(out)
}

fn schema_error(errors: Errors) -> DbError {
    DbError::SchemaViolation(errors)
}

/// Replace `{"name": …}`-style foreign references by `{"id": …}`.
fn resolve_foreign(s: &State, schema: &EntitySchema, input: &mut Entity) -> Result<(), DbError> {
    let mut unresolved = Errors::new();
    for (field, _, reference) in schema.foreign_fields() {
        let Some(Value::Object(r)) = input.get(field) else {
            continue;
        };
        if r.contains_key("id") {
            continue;
        }
        let Some(parent) = entities::entity(reference) else {
            continue;
        };
        let Some(ek) = parent.endpoint_key else {
            continue;
        };
        let Some(v) = r.get(ek).cloned() else {
            continue;
        };
        match s.lookup_unique(parent.name, ek, &v) {
            Some(id) => {
                input.insert(field.to_owned(), json!({ "id": id }));
            }
            None => {
                let key = lua_kv(ek, &v);
                let mut sub = Map::new();
                sub.insert(
                    ek.to_owned(),
                    json!(format!(
                        "the foreign key cannot be resolved with '{key}' for an existing '{reference}' entity"
                    )),
                );
                unresolved.insert(field.to_owned(), Value::Object(sub));
            }
        }
    }
    if unresolved.is_empty() {
        Ok(())
    } else {
        Err(DbError::ForeignKeysUnresolved(unresolved))
    }
}

fn lua_kv(k: &str, v: &Value) -> String {
    let mut m = Map::new();
    m.insert(k.to_owned(), v.clone());
    gatehouse_model::error::lua_pretty(&Value::Object(m), None)
}

/// Validate a processed entity; `full` demands required fields.
fn validate(schema: &EntitySchema, e: &Entity, full: bool) -> Result<(), DbError> {
    if let Some(key) = schema.subschema_key {
        // Kong checks the subschema key first and reports only it.
        if matches!(e.get(key), None | Some(Value::Null)) {
            return Err(DbError::schema(key, "required field missing"));
        }
        if let (Some(subs), Some(v)) = (&schema.subschemas, e.get(key)) {
            if !v.is_null() && schema.subschema_for(e).is_none() {
                let name = match v {
                    Value::String(s) => s.clone(),
                    Value::Array(a) => a.first().map(value_key).unwrap_or_default(),
                    other => other.to_string(),
                };
                return Err(DbError::schema(
                    key,
                    &subs.unknown_error().replace("%s", &name),
                ));
            }
        }
    }
    let sub = schema.subschema_for(e);
    schema
        .record
        .validate(e, full, sub.as_deref())
        .map_err(schema_error)
}

fn process(schema: &EntitySchema, input: Entity, ctx: Context) -> Result<Entity, DbError> {
    let sub = schema.subschema_for(&input);
    let now = gatehouse_model::schema::validate_now_s();
    schema
        .record
        .process_auto_fields_with(input, ctx, sub.as_deref(), now)
        .map_err(schema_error)
}

/// Check foreign keys exist and unique fields are free.
fn check_constraints(
    s: &State,
    schema: &'static EntitySchema,
    id: &str,
    e: &Entity,
) -> Result<(), DbError> {
    for (field, _, reference) in schema.foreign_fields() {
        if let Some(fid) = foreign_id(e, field) {
            if !s.contains(reference, &fid) {
                let mut key = Map::new();
                key.insert("id".into(), json!(fid));
                return Err(DbError::ForeignKeyViolation {
                    field: field.to_owned(),
                    key,
                    parent: reference.to_owned(),
                });
            }
        }
    }
    for (field, key) in State::index_keys(schema, e) {
        let owner = s
            .unique
            .get(&(schema.name, field))
            .and_then(|idx| idx.get(&key));
        if let Some(owner) = owner {
            if owner != id {
                let mut fields = Map::new();
                if field == CACHE_KEY {
                    for f in &schema.cache_key {
                        fields.insert((*f).to_owned(), e.get(*f).cloned().unwrap_or(Value::Null));
                    }
                } else {
                    fields.insert(
                        field.to_owned(),
                        e.get(field).cloned().unwrap_or(Value::Null),
                    );
                }
                return Err(DbError::UniqueViolation(fields));
            }
        }
    }
    Ok(())
}

fn set_parent(input: &mut Entity, parent: Option<&Parent>) {
    if let Some(p) = parent {
        input.insert(p.field.to_owned(), json!({ "id": p.id }));
    }
}

/// A certificate's `snis` are stored as SNI entities, not in the row.
fn take_snis(schema: &EntitySchema, e: &mut Entity) -> Option<Value> {
    if schema.name == "certificates" {
        e.remove("snis")
    } else {
        None
    }
}

fn sni_changes(
    s: &State,
    cert_id: &str,
    snis: Option<Value>,
    replace: bool,
) -> Result<Vec<Pending>, DbError> {
    let Some(sni_schema) = entities::entity("snis") else {
        return Ok(Vec::new());
    };
    let names: Vec<String> = match snis {
        None => return Ok(Vec::new()),
        Some(Value::Null) => Vec::new(),
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect(),
        Some(_) => return Err(DbError::schema("snis", "expected an array")),
    };
    let mut out = Vec::new();
    let existing: Vec<(String, String)> = s
        .rows("snis")
        .filter(|(_, row)| row.fk("certificate") == Some(cert_id))
        .filter_map(|(id, row)| Some((id.clone(), row.parse().get("name")?.as_str()?.to_owned())))
        .collect();
    let mut seen = Vec::new();
    for name in &names {
        if seen.contains(name) {
            return Err(DbError::schema(
                "snis",
                &format!("duplicate SNI in request: {name}"),
            ));
        }
        seen.push(name.clone());
        if let Some(owner) = s.lookup_unique("snis", "name", &json!(name)) {
            let owner_cert = s.fk("snis", owner, "certificate").map(str::to_owned);
            if owner_cert.as_deref() != Some(cert_id) {
                return Err(DbError::schema(
                    "snis",
                    &format!(
                        "{name} already associated with existing certificate '{}'",
                        owner_cert.unwrap_or_default()
                    ),
                ));
            }
        }
    }
    if replace {
        for (id, name) in &existing {
            if !names.contains(name) {
                out.push(Pending::Delete(sni_schema, id.clone()));
            }
        }
    }
    for name in names {
        if existing.iter().any(|(_, n)| *n == name) {
            continue;
        }
        let input = json!({"name": name, "certificate": {"id": cert_id}});
        let Value::Object(input) = input else {
            continue;
        };
        let e = process(sni_schema, input, Context::Insert)?;
        validate(sni_schema, &e, true)?;
        let id = e
            .get("id")
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_owned();
        out.push(Pending::Put(sni_schema, id, e));
    }
    Ok(out)
}

fn finish(
    s: &State,
    schema: &'static EntitySchema,
    mut e: Entity,
    raw: &Entity,
) -> Result<(String, Entity), DbError> {
    let id = e
        .get("id")
        .and_then(Value::as_str)
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    e.insert("id".into(), json!(id));
    check_constraints(s, schema, &id, &e)?;
    if let Some(on_write) = schema.on_write {
        on_write(&mut e, raw).map_err(|msg| {
            let mut errs = Errors::new();
            errs.insert("@entity".into(), json!([msg]));
            DbError::SchemaViolation(errs)
        })?;
        // Derived fields (such as cert_digest) are unique too.
        check_constraints(s, schema, &id, &e)?;
    }
    Ok((id, e))
}

/// Kong's largest `ttl` (`DAO_MAX_TTL`).
const MAX_TTL: u64 = 100_000_000;

/// The `ttl` option of an Admin API write, which Kong takes out of the
/// body (`extract_options`) for entities whose schema has one: seconds to
/// live, 0 (or null) for none. Other entities keep it in the body, where
/// it is an unknown field.
fn take_ttl(schema: &EntitySchema, input: &mut Entity) -> Result<Option<u64>, DbError> {
    if !schema.ttl {
        return Ok(None);
    }
    let seconds = match input.remove("ttl") {
        None => return Ok(None),
        Some(Value::Null) => Some(0.0),
        Some(Value::Number(n)) => n.as_f64(),
        // A form or query string carries it as text.
        Some(Value::String(text)) => text.trim().parse::<f64>().ok(),
        Some(_) => None,
    };
    match seconds {
        Some(s) if s.fract() == 0.0 && (0.0..=MAX_TTL as f64).contains(&s) => Ok(Some(s as u64)),
        _ => {
            let mut options = Map::new();
            options.insert(
                "ttl".into(),
                json!(format!("must be an integer between 0 and {MAX_TTL}")),
            );
            Err(DbError::InvalidOptions(options))
        }
    }
}

/// Stores when the entity expires: `ttl` seconds after `from`, or never
/// for 0.
fn set_expiry(e: &mut Entity, ttl: u64, from: u64) {
    if ttl == 0 {
        e.remove("ttl");
    } else {
        e.insert("ttl".into(), json!(from + ttl));
    }
}

fn created_at(e: &Entity) -> u64 {
    e.get("created_at")
        .and_then(Value::as_f64)
        .map_or_else(now_secs, |c| c as u64)
}

fn prepare_insert(
    s: &State,
    schema: &'static EntitySchema,
    mut input: Entity,
    parent: Option<&Parent>,
) -> Result<(String, Entity, Vec<Pending>), DbError> {
    set_parent(&mut input, parent);
    resolve_foreign(s, schema, &mut input)?;
    if let Some(Value::String(id)) = input.get("id") {
        if is_uuid(id) && s.contains(schema.name, &id.to_ascii_lowercase()) {
            let mut key = Map::new();
            key.insert("id".into(), json!(id));
            return Err(DbError::UniqueViolation(key));
        }
    }
    let ttl = take_ttl(schema, &mut input)?;
    let raw = input.clone();
    let mut e = process(schema, input, Context::Insert)?;
    validate(schema, &e, true)?;
    if let Some(ttl) = ttl {
        let from = created_at(&e);
        set_expiry(&mut e, ttl, from);
    }
    let snis = take_snis(schema, &mut e);
    let (id, e) = finish(s, schema, e, &raw)?;
    let extra = sni_changes(s, &id, snis, false)?;
    Ok((id, e, extra))
}

fn prepare_update(
    s: &State,
    schema: &'static EntitySchema,
    key: &str,
    mut input: Entity,
    parent: Option<&Parent>,
) -> Result<(String, Entity, Vec<Pending>), DbError> {
    let id = resolve_key(s, schema, key, parent).ok_or(DbError::NotFound)?;
    let mut existing = s.get(schema.name, &id).ok_or(DbError::NotFound)?;
    if let Some(p) = parent {
        if s.fk(schema.name, &id, p.field) != Some(p.id.as_str()) {
            return Err(DbError::NotFound);
        }
    }
    let ttl = take_ttl(schema, &mut input)?;
    // Not a schema field: kept aside while the entity is validated. A
    // PATCH without `ttl` keeps the expiry, as Kong's does.
    let expires = existing.remove("ttl");
    set_parent(&mut input, parent);
    resolve_foreign(s, schema, &mut input)?;
    let raw = input.clone();
    let snis = take_snis(schema, &mut input);
    let processed = process(schema, input, Context::Update)?;
    let mut merged = schema.record.merge_values(processed, &existing);
    merged.insert("id".into(), json!(id));
    // A changed subschema key (a plugin renamed) brings the new defaults.
    let mut merged = if schema.subschema_key.is_some() {
        let sub = schema.subschema_for(&merged);
        let now = gatehouse_model::schema::validate_now_s();
        schema
            .record
            .process_auto_fields_with(merged.clone(), Context::Update, sub.as_deref(), now)
            .map_err(schema_error)?
    } else {
        merged
    };
    validate(schema, &merged, false)?;
    match (ttl, expires) {
        // Kong counts from `updated_at`, which credentials do not have.
        (Some(ttl), _) => set_expiry(&mut merged, ttl, now_secs()),
        (None, Some(at)) => {
            merged.insert("ttl".into(), at);
        }
        (None, None) => {}
    }
    let (id, e) = finish(s, schema, merged, &raw)?;
    let extra = sni_changes(s, &id, snis, true)?;
    Ok((id, e, extra))
}

fn prepare_upsert(
    s: &State,
    schema: &'static EntitySchema,
    key: &str,
    mut input: Entity,
    parent: Option<&Parent>,
) -> Result<(String, Entity, Vec<Pending>), DbError> {
    let existing_id = resolve_key(s, schema, key, parent);
    if let Some(eid) = &existing_id {
        if let Some(p) = parent {
            if s.contains(schema.name, eid)
                && s.fk(schema.name, eid, p.field) != Some(p.id.as_str())
            {
                return Err(DbError::NotFound);
            }
        }
    }
    let id = if is_uuid(key) {
        key.to_ascii_lowercase()
    } else if let Some(eid) = existing_id.clone() {
        eid
    } else {
        uuid::Uuid::new_v4().to_string()
    };
    if !is_uuid(key) {
        match (schema.endpoint_key, schema.name) {
            (_, "certificates") => return Err(DbError::NotFound),
            // A PUT naming a group the consumer lacks creates it.
            (_, "acls") if parent.is_some() => {
                input.entry("group").or_insert_with(|| json!(key));
            }
            (Some(ek), _) => {
                input.insert(ek.to_owned(), json!(key));
            }
            (None, _) => return Err(DbError::NotFound),
        }
    }
    input.insert("id".into(), json!(id));
    set_parent(&mut input, parent);
    resolve_foreign(s, schema, &mut input)?;
    let created_at = existing_id
        .as_ref()
        .and_then(|eid| s.get(schema.name, eid))
        .and_then(|e| e.get("created_at").cloned());
    if let Some(c) = created_at {
        if schema.record.get("created_at").is_some() {
            input.entry("created_at").or_insert(c);
        }
    }
    // A PUT replaces the expiry too: without `ttl` there is none.
    let ttl = take_ttl(schema, &mut input)?;
    let raw = input.clone();
    let mut e = process(schema, input, Context::Upsert)?;
    validate(schema, &e, true)?;
    if let Some(ttl) = ttl {
        set_expiry(&mut e, ttl, now_secs());
    }
    let snis = take_snis(schema, &mut e);
    let (id, e) = finish(s, schema, e, &raw)?;
    let extra = sni_changes(s, &id, snis, true)?;
    Ok((id, e, extra))
}

/// Everything a delete removes, children first, or the restriction that
/// forbids it.
fn collect_deletes(
    s: &State,
    schema: &'static EntitySchema,
    id: &str,
    out: &mut Vec<(&'static EntitySchema, String)>,
) -> Result<(), DbError> {
    if out
        .iter()
        .any(|(sch, i)| sch.name == schema.name && i == id)
    {
        return Ok(());
    }
    for (child, field) in entities::children_of(schema.name) {
        let cascade = child
            .field(field)
            .and_then(|f| f.on_delete)
            .is_some_and(|o| o == OnDelete::Cascade)
            || (child.name == "snis" && schema.name == "certificates");
        let ids: Vec<String> = s
            .rows(child.name)
            .filter(|(_, row)| row.fk(field) == Some(id))
            .map(|(cid, _)| cid.clone())
            .collect();
        if ids.is_empty() {
            continue;
        }
        if !cascade {
            return Err(DbError::ForeignKeyRestricted {
                parent: schema.name.to_owned(),
                child: child.name.to_owned(),
            });
        }
        for cid in ids {
            collect_deletes(s, child, &cid, out)?;
        }
    }
    out.push((schema, id.to_owned()));
    Ok(())
}

/// Whether a field of `schema` is a foreign key to `parent`; the child's
/// field for nested endpoints.
pub fn parent_field(child: &EntitySchema, parent: &str) -> Option<&'static str> {
    child
        .record
        .fields
        .iter()
        .find(|(_, f)| matches!(f.ty, FieldType::Foreign(r) if r == parent))
        .map(|(n, _)| *n)
}

/// The outcome of loading a declarative configuration.
pub struct DeclarativeLoad {
    /// The version the load committed; unchanged when nothing changed.
    pub version: u64,
    /// Entities created, replaced or removed.
    pub changes: usize,
    /// Every loaded entity as the Admin API shows it, by entity name and
    /// id (the body of Kong's `POST /config`).
    pub entities: Value,
    /// For a dry run, each change: `{"action": "create"|"update"|"delete",
    /// "entity", "id", "name", "fields": {field: {"old", "new"}}
    /// (updates), "routes": [routes whose traffic it affects, "*" for
    /// all]}`; empty otherwise (and `entities` is empty for a dry run).
    pub plan: Vec<Value>,
    /// The configuration hash the plan was made against.
    pub base_hash: String,
}

/// How a declarative configuration is loaded.
#[derive(Debug, Default, Clone)]
pub struct LoadOptions {
    /// Load only over the configuration with this hash (`If-Match`).
    pub expected_hash: Option<String>,
    /// Plan, commit nothing.
    pub dry_run: bool,
    /// decK's select tags: the file manages only entities with all of
    /// these (and its entities get them); others are left as they are.
    pub select_tags: Vec<String>,
}

/// Why a declarative configuration was not loaded.
#[derive(Debug, thiserror::Error)]
pub enum DeclarativeLoadError {
    /// Entities that do not validate: the index of each in
    /// `Declarative::items`, and why.
    #[error("{} entities do not validate", .0.len())]
    Entities(Vec<(usize, DbError)>),
    /// `If-Match` named another configuration hash than the current one.
    #[error("the configuration hash is {current}")]
    Precondition { current: String },
    #[error(transparent)]
    Dao(#[from] DaoError),
}

/// The id of the entity `current` holds that `entity` (with a random id)
/// stands for: the owner of one of its unique values, or one with the same
/// content.
fn known_id(
    current: &State,
    schema: &'static EntitySchema,
    entity: &Entity,
    by_content: &mut HashMap<&'static str, HashMap<String, String>>,
) -> Option<String> {
    for field in schema.unique_fields().filter(|f| *f != "id") {
        if let Some(value) = entity.get(field).filter(|v| !v.is_null()) {
            if let Some(id) = current.lookup_unique(schema.name, field, value) {
                return Some(id.clone());
            }
        }
    }
    let index = by_content.entry(schema.name).or_insert_with(|| {
        current
            .iter(schema.name)
            .filter_map(|e| {
                let id = e.get("id")?.as_str()?.to_owned();
                Some((content_key(&e), id))
            })
            .collect()
    });
    index.get(&content_key(entity)).cloned()
}

/// An entity without its id and timestamps, as text.
fn content_key(entity: &Entity) -> String {
    let mut rest = entity.clone();
    rest.remove("id");
    for field in TIMESTAMPS {
        rest.remove(field);
    }
    let mut value = Value::Object(rest);
    sort_keys(&mut value);
    value.to_string()
}

/// One change of a declarative load, for people: what, which entity, the
/// fields that differ, and the routes whose traffic it affects.
/// Route labels (name, or id) by service id, in the configuration before
/// and after a load: built once per load, not once per change.
struct RoutesByService {
    by_service: HashMap<String, Vec<String>>,
}

impl RoutesByService {
    fn new(states: [&State; 2]) -> RoutesByService {
        let mut by_service: HashMap<String, Vec<String>> = HashMap::new();
        for state in states {
            for (rid, row) in state.rows("routes") {
                if let Some(sid) = row.fk("service") {
                    by_service
                        .entry(sid.to_owned())
                        .or_default()
                        .push(route_label(state, rid));
                }
            }
        }
        RoutesByService { by_service }
    }

    fn add(&self, sid: &str, routes: &mut std::collections::BTreeSet<String>) {
        routes.extend(self.by_service.get(sid).into_iter().flatten().cloned());
    }
}

fn route_label(state: &State, rid: &str) -> String {
    state
        .get("routes", rid)
        .and_then(|r| r.get("name").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| rid.to_owned())
}

fn describe(current: &State, next: &State, index: &RoutesByService, change: &Change) -> Value {
    let (action, entity, id) = match change {
        Change::Upsert { entity, id, .. } if current.contains(entity, id) => {
            ("update", *entity, id)
        }
        Change::Upsert { entity, id, .. } => ("create", *entity, id),
        Change::Delete { entity, id } => ("delete", *entity, id),
    };
    let state = if action == "delete" { current } else { next };
    let doc = state.get(entity, id).unwrap_or_default();
    // Plugins are known by their plugin name.
    let label = if entity == "plugins" {
        Some("name")
    } else {
        entities::entity(entity).and_then(|schema| schema.endpoint_key)
    };
    let name = label
        .and_then(|key| doc.get(key).cloned())
        .unwrap_or(Value::Null);
    let mut out = json!({"action": action, "entity": entity, "id": id, "name": name});
    if action == "update" {
        let old = current.get(entity, id).unwrap_or_default();
        let mut fields = Map::new();
        let keys: std::collections::BTreeSet<&String> = old.keys().chain(doc.keys()).collect();
        for key in keys {
            if TIMESTAMPS.contains(&key.as_str()) {
                continue;
            }
            let (a, b) = (old.get(key), doc.get(key));
            if a != b {
                fields.insert(key.clone(), json!({"old": a, "new": b}));
            }
        }
        out["fields"] = Value::Object(fields);
    }
    let mut routes = std::collections::BTreeSet::new();
    let routes_of_service =
        |sid: &str, routes: &mut std::collections::BTreeSet<String>| index.add(sid, routes);
    match entity {
        "routes" => {
            routes.insert(route_label(state, id));
        }
        "services" => routes_of_service(id, &mut routes),
        "plugins" => {
            for state in [current, next] {
                let Some(row) = state.row("plugins", id) else {
                    continue;
                };
                match (row.fk("route"), row.fk("service")) {
                    (Some(rid), _) => {
                        routes.insert(route_label(state, rid));
                    }
                    (None, Some(sid)) => routes_of_service(sid, &mut routes),
                    (None, None) => {
                        routes.insert("*".to_owned());
                    }
                }
            }
        }
        "upstreams" | "targets" => {
            for state in [current, next] {
                let upstream_id = if entity == "targets" {
                    state.fk("targets", id, "upstream").map(str::to_owned)
                } else {
                    Some(id.clone())
                };
                let Some(upstream) = upstream_id.and_then(|u| state.get("upstreams", &u)) else {
                    continue;
                };
                let Some(name) = upstream.get("name").and_then(Value::as_str) else {
                    continue;
                };
                for service in state.iter("services") {
                    if service.get("host").and_then(Value::as_str) == Some(name) {
                        if let Some(sid) = service.get("id").and_then(Value::as_str) {
                            routes_of_service(sid, &mut routes);
                        }
                    }
                }
            }
        }
        _ => {}
    }
    out["routes"] = json!(routes);
    out
}

/// Fields that record when an entity was written, not what it is.
const TIMESTAMPS: [&str; 2] = ["created_at", "updated_at"];

fn same_content(a: &Entity, b: &Entity) -> bool {
    a.len() == b.len()
        && a.iter()
            .all(|(k, v)| TIMESTAMPS.contains(&k.as_str()) || b.get(k) == Some(v))
}

impl Dao {
    /// Replaces the whole configuration with `decl` atomically (when
    /// `expected_hash` is given, only over that configuration): every
    /// entity is validated as the Admin API validates a `POST`, then the
    /// difference from the current configuration (unchanged entities keep
    /// their timestamps) is committed in one transaction, as one version.
    pub async fn load_declarative(
        &self,
        decl: &Declarative,
        options: &LoadOptions,
    ) -> Result<DeclarativeLoad, DeclarativeLoadError> {
        let (expected_hash, dry_run) = (options.expected_hash.as_deref(), options.dry_run);
        let select = &options.select_tags;
        let _w = self.writer.lock().await;
        if let Some(expected) = expected_hash {
            let current = self.read(|state| state.hash());
            if current != expected {
                return Err(DeclarativeLoadError::Precondition { current });
            }
        }
        let mut scratch = State::default();
        if !select.is_empty() {
            // decK's select tags: entities without all of them are not
            // this file's to change; they stay as they are.
            self.read(|current| {
                for schema in ENTITIES.iter() {
                    for (id, row) in current.rows(schema.name) {
                        if !select.iter().all(|tag| row.tags.contains(tag)) {
                            scratch.put(schema, id.clone(), row.parse());
                        }
                    }
                }
            });
        }
        let mut errors = Vec::new();
        let mut loaded: Vec<(&'static EntitySchema, String)> = Vec::new();
        // Random id given to an entity of the file → the id of the entity
        // the store already holds for it, so that loading a file again
        // does not churn ids (Kong would, for entities without a key).
        let mut remap: HashMap<String, String> = HashMap::new();
        let mut by_content: HashMap<&'static str, HashMap<String, String>> = HashMap::new();
        for (index, item) in decl.items.iter().enumerate() {
            let Some(schema) = entities::entity(item.entity) else {
                continue;
            };
            let mut fields = item.fields.clone();
            if !select.is_empty() {
                // Every entity of the file carries the select tags.
                let mut tags: Vec<Value> = match fields.get("tags") {
                    Some(Value::Array(tags)) => tags.clone(),
                    _ => Vec::new(),
                };
                for tag in select {
                    if !tags.iter().any(|t| t.as_str() == Some(tag.as_str())) {
                        tags.push(json!(tag));
                    }
                }
                fields.insert("tags".into(), Value::Array(tags));
            }
            for (field, _, _) in schema.foreign_fields() {
                if let Some(Value::Object(reference)) = fields.get_mut(field) {
                    if let Some(Value::String(id)) = reference.get("id") {
                        if let Some(existing) = remap.get(id) {
                            reference.insert("id".into(), json!(existing));
                        }
                    }
                }
            }
            let raw_password = (!decl.transform && schema.name == "basicauth_credentials")
                .then(|| fields.get("password").cloned())
                .flatten();
            // A file holds `ttl` as when the entity expires (unix
            // seconds), as Kong exports it; not as seconds to live.
            let expires = match schema.ttl.then(|| fields.remove("ttl")).flatten() {
                None | Some(Value::Null) => None,
                Some(at) => match at.as_f64() {
                    Some(at) if at >= 0.0 && at.fract() == 0.0 => Some(at as u64),
                    _ => {
                        errors.push((index, DbError::schema("ttl", "expected an integer")));
                        continue;
                    }
                },
            };
            let prepared =
                prepare_insert(&scratch, schema, fields, None).map(|(id, mut entity, extra)| {
                    if let Some(at) = expires {
                        entity.insert("ttl".into(), json!(at));
                    }
                    // `_transform: false`: the file holds passwords as
                    // stored (an export), not to be hashed again.
                    if let Some(password) = &raw_password {
                        entity.insert("password".into(), password.clone());
                    }
                    if !item.random_id {
                        return (id, entity, extra);
                    }
                    let existing =
                        self.read(|current| known_id(current, schema, &entity, &mut by_content));
                    match existing {
                        Some(existing) if !scratch.contains(schema.name, &existing) => {
                            entity.insert("id".into(), json!(existing));
                            remap.insert(id, existing.clone());
                            (existing, entity, extra)
                        }
                        _ => (id, entity, extra),
                    }
                });
            match prepared {
                Ok((id, entity, extra)) => {
                    for pending in extra {
                        if let Pending::Put(sch, pid, e) = pending {
                            scratch.put(sch, pid.clone(), e);
                            loaded.push((sch, pid));
                        }
                    }
                    scratch.put(schema, id.clone(), entity);
                    loaded.push((schema, id));
                }
                Err(error) => errors.push((index, error)),
            }
        }
        if !errors.is_empty() {
            return Err(DeclarativeLoadError::Entities(errors));
        }
        let now = gatehouse_model::schema::validate_now_s();
        let (changes, entities, plan, base_hash) = self.read(|current| {
            let mut changes = Vec::new();
            let mut shown: Map<String, Value> = Map::new();
            for (schema, id) in &loaded {
                let Some(mut entity) = scratch.get(schema.name, id) else {
                    continue;
                };
                match current.get(schema.name, id) {
                    Some(old) if same_content(&old, &entity) => entity = old,
                    Some(old) => {
                        if let Some(created) = old.get("created_at") {
                            entity.insert("created_at".into(), created.clone());
                        }
                        if entity.contains_key("updated_at") {
                            entity.insert("updated_at".into(), json!(now));
                        }
                        changes.push(Change::Upsert {
                            entity: schema.name,
                            id: id.clone(),
                            body: Value::Object(entity.clone()),
                        });
                    }
                    None => changes.push(Change::Upsert {
                        entity: schema.name,
                        id: id.clone(),
                        body: Value::Object(entity.clone()),
                    }),
                }
                // A dry run answers with the plan, a load with the
                // entities: each builds only its own answer.
                if dry_run {
                    continue;
                }
                let rendered = render(&scratch, schema, &entity);
                if let Value::Object(by_id) = shown
                    .entry(schema.name.to_owned())
                    .or_insert_with(|| Value::Object(Map::new()))
                {
                    by_id.insert(id.clone(), rendered);
                }
            }
            for schema in ENTITIES.iter() {
                for (id, _) in current.rows(schema.name) {
                    if !scratch.contains(schema.name, id) {
                        changes.push(Change::Delete {
                            entity: schema.name,
                            id: id.clone(),
                        });
                    }
                }
            }
            let plan = if dry_run {
                let index = RoutesByService::new([current, &scratch]);
                changes
                    .iter()
                    .map(|change| describe(current, &scratch, &index, change))
                    .collect::<Vec<_>>()
            } else {
                Vec::new()
            };
            (changes, Value::Object(shown), plan, current.hash())
        });
        if changes.is_empty() || dry_run {
            return Ok(DeclarativeLoad {
                version: self.version(),
                changes: changes.len(),
                entities,
                plan,
                base_hash,
            });
        }
        let version = self
            .backend
            .commit(&changes)
            .await
            .map_err(DaoError::from)?;
        let count = changes.len();
        self.apply(version, |state| {
            for change in changes {
                match change {
                    Change::Upsert { entity, id, body } => {
                        if let (Some(schema), Value::Object(body)) =
                            (entities::entity(entity), body)
                        {
                            state.put(schema, id, body);
                        }
                    }
                    Change::Delete { entity, id } => {
                        if let Some(schema) = entities::entity(entity) {
                            state.remove(schema, &id);
                        }
                    }
                }
            }
        });
        Ok(DeclarativeLoad {
            version,
            changes: count,
            entities,
            plan,
            base_hash,
        })
    }
}
