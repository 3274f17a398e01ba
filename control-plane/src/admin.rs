//! Kong-compatible Admin API. One dispatcher maps paths onto entity
//! endpoints the way Kong generates them from schemas (collections, entities,
//! nested collections under a parent, a child's parent), so every entity
//! gets the same methods, errors and `Allow` lists.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::response::Response;
use axum::Router;
use bytes::Bytes;
use gatehouse_model::entities::{self, ENTITIES};
use gatehouse_model::schema::{Context, EntitySchema, FieldType};
use gatehouse_model::{plugins, DbError};
use http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use http_body_util::BodyExt;
use percent_encoding::percent_decode_str;
use serde_json::{json, Map, Value};

use crate::dao::{parent_field, Dao, DaoError, PageQuery, Parent};

mod args;
mod config;
mod health;

pub use health::{AddressHealth, HealthView, TargetHealth, UpstreamHealth, Weight};

/// Kong's Admin API body limit (nginx `client_max_body_size 10m`).
pub const MAX_BODY_BYTES: usize = 10 * 1024 * 1024;

/// The Kong release whose Admin API we answer as; clients such as decK
/// read it from `GET /`.
pub const KONG_VERSION: &str = "3.9.0";

/// What `GET /` reports about this node.
pub struct NodeInfo {
    pub node_id: String,
    pub hostname: String,
    /// The process configuration, secrets removed.
    pub configuration: Value,
}

pub struct AdminState {
    pub dao: Arc<Dao>,
    pub node: NodeInfo,
    /// Write one line per request to stdout (`admin_access_log = stdout`).
    pub access_log: bool,
    /// The health of this node's balancers, when it runs a data plane.
    pub health: Option<Arc<dyn HealthView>>,
    /// The data planes this node controls, when it runs as a control plane.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
    requests: AtomicU64,
}

impl AdminState {
    /// An Admin API without a data plane: upstream health reads
    /// `HEALTHCHECKS_OFF` and targets' health cannot be set.
    pub fn new(dao: Arc<Dao>, node: NodeInfo, access_log: bool) -> Arc<AdminState> {
        AdminState::with_health(dao, node, access_log, None)
    }

    /// An Admin API in the same process as a data plane, whose balancer
    /// health `health` reads and sets.
    pub fn with_health(
        dao: Arc<Dao>,
        node: NodeInfo,
        access_log: bool,
        health: Option<Arc<dyn HealthView>>,
    ) -> Arc<AdminState> {
        Arc::new(AdminState {
            dao,
            node,
            access_log,
            health,
            cluster: None,
            requests: AtomicU64::new(0),
        })
    }

    /// The Admin API of a control plane, which reports `cluster`'s data
    /// planes at `/clustering/data-planes`.
    pub fn with_cluster(
        dao: Arc<Dao>,
        node: NodeInfo,
        access_log: bool,
        cluster: Arc<crate::cluster::Cluster>,
    ) -> Arc<AdminState> {
        Arc::new(AdminState {
            dao,
            node,
            access_log,
            health: None,
            cluster: Some(cluster),
            requests: AtomicU64::new(0),
        })
    }
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new().fallback(handle).with_state(state)
}

const M_ROOT: &str = "GET, HEAD, OPTIONS";
const M_COLLECTION: &str = "GET, HEAD, OPTIONS, POST";
const M_ENTITY: &str = "DELETE, GET, HEAD, OPTIONS, PATCH, PUT";
const M_POST: &str = "OPTIONS, POST";
const M_TARGET_HEALTH: &str = "OPTIONS, POST, PUT";

/// What a path names.
enum Endpoint {
    Root,
    Status,
    Endpoints,
    PluginsEnabled,
    Schema(&'static EntitySchema),
    SchemaValidate(&'static EntitySchema),
    /// `/schemas/{name}` for a name that is no entity.
    NoSchema(String),
    PluginSchema(String),
    PluginSchemaValidate,
    Tags(Option<String>),
    DataPlanes,
    /// `/config`: the whole configuration, declaratively.
    Config,
    UpstreamHealth(String),
    TargetsAll(String),
    TargetHealth {
        upstream: String,
        target: String,
        address: Option<String>,
        healthy: bool,
    },
    Collection {
        schema: &'static EntitySchema,
        parent: Option<(&'static EntitySchema, String, &'static str)>,
    },
    Item {
        schema: &'static EntitySchema,
        key: String,
        parent: Option<(&'static EntitySchema, String, &'static str)>,
    },
    /// `/routes/{route}/service`: the entity a child points to.
    ParentOf {
        child: &'static EntitySchema,
        key: String,
        field: &'static str,
        parent: &'static EntitySchema,
    },
}

impl Endpoint {
    fn methods(&self) -> &'static str {
        match self {
            Endpoint::Root
            | Endpoint::Status
            | Endpoint::Endpoints
            | Endpoint::PluginsEnabled
            | Endpoint::Schema(_)
            | Endpoint::NoSchema(_)
            | Endpoint::PluginSchema(_)
            | Endpoint::Tags(_)
            | Endpoint::DataPlanes
            | Endpoint::UpstreamHealth(_)
            | Endpoint::TargetsAll(_) => M_ROOT,
            Endpoint::SchemaValidate(_) | Endpoint::PluginSchemaValidate => M_POST,
            Endpoint::Config => M_COLLECTION,
            Endpoint::TargetHealth { .. } => M_TARGET_HEALTH,
            Endpoint::Collection { .. } => M_COLLECTION,
            Endpoint::Item { .. } | Endpoint::ParentOf { .. } => M_ENTITY,
        }
    }
}

fn nested_child(
    parent: &EntitySchema,
    name: &str,
) -> Option<(&'static EntitySchema, &'static str)> {
    ENTITIES.iter().find_map(|e| {
        let named = e.admin_api_nested_name == Some(name) || e.admin_api_name == name;
        if !named {
            return None;
        }
        parent_field(e, parent.name).map(|f| (e, f))
    })
}

fn route(segs: &[String]) -> Option<Endpoint> {
    let s: Vec<&str> = segs.iter().map(String::as_str).collect();
    Some(match s.as_slice() {
        [] => Endpoint::Root,
        ["status"] => Endpoint::Status,
        ["endpoints"] => Endpoint::Endpoints,
        ["plugins", "enabled"] => Endpoint::PluginsEnabled,
        ["schemas", "plugins", "validate"] => Endpoint::PluginSchemaValidate,
        ["schemas", "plugins", name] => Endpoint::PluginSchema((*name).to_owned()),
        ["schemas", name] => match entities::entity(name) {
            Some(e) => Endpoint::Schema(e),
            None => Endpoint::NoSchema((*name).to_owned()),
        },
        ["schemas", name, "validate"] => match entities::entity(name) {
            Some(e) => Endpoint::SchemaValidate(e),
            None => Endpoint::NoSchema((*name).to_owned()),
        },
        ["clustering", "data-planes"] => Endpoint::DataPlanes,
        ["config"] => Endpoint::Config,
        ["tags"] => Endpoint::Tags(None),
        ["tags", tag] => Endpoint::Tags(Some((*tag).to_owned())),
        ["upstreams", u, "health"] => Endpoint::UpstreamHealth((*u).to_owned()),
        ["upstreams", u, "targets", "all"] => Endpoint::TargetsAll((*u).to_owned()),
        ["upstreams", u, "targets", t, health @ ("healthy" | "unhealthy")] => {
            Endpoint::TargetHealth {
                upstream: (*u).to_owned(),
                target: (*t).to_owned(),
                address: None,
                healthy: *health == "healthy",
            }
        }
        ["upstreams", u, "targets", t, a, health @ ("healthy" | "unhealthy")] => {
            Endpoint::TargetHealth {
                upstream: (*u).to_owned(),
                target: (*t).to_owned(),
                address: Some((*a).to_owned()),
                healthy: *health == "healthy",
            }
        }
        [coll] => Endpoint::Collection {
            schema: entities::entity_by_admin_name(coll)?,
            parent: None,
        },
        [coll, key] => Endpoint::Item {
            schema: entities::entity_by_admin_name(coll)?,
            key: (*key).to_owned(),
            parent: None,
        },
        [pcoll, pkey, child] => {
            let pschema = entities::entity_by_admin_name(pcoll)?;
            if let Some((cschema, field)) = nested_child(pschema, child) {
                Endpoint::Collection {
                    schema: cschema,
                    parent: Some((pschema, (*pkey).to_owned(), field)),
                }
            } else {
                let f = pschema.field(child)?;
                let FieldType::Foreign(reference) = f.ty else {
                    return None;
                };
                Endpoint::ParentOf {
                    child: pschema,
                    key: (*pkey).to_owned(),
                    field: pschema.record.fields.iter().find(|(n, _)| n == child)?.0,
                    parent: entities::entity(reference)?,
                }
            }
        }
        [pcoll, pkey, child, key] => {
            let pschema = entities::entity_by_admin_name(pcoll)?;
            let (cschema, field) = nested_child(pschema, child)?;
            Endpoint::Item {
                schema: cschema,
                key: (*key).to_owned(),
                parent: Some((pschema, (*pkey).to_owned(), field)),
            }
        }
        _ => return None,
    })
}

/// A finished response before CORS and content headers are added.
struct Reply {
    status: StatusCode,
    body: Option<Value>,
    allow: Option<&'static str>,
    /// `ETag` (`GET /config`: the configuration hash).
    etag: Option<String>,
}

fn reply(status: StatusCode, body: Value) -> Reply {
    Reply {
        status,
        body: Some(body),
        allow: None,
        etag: None,
    }
}

fn ok(body: Value) -> Reply {
    reply(StatusCode::OK, body)
}

fn message(status: StatusCode, msg: &str) -> Reply {
    reply(status, json!({ "message": msg }))
}

fn not_found() -> Reply {
    message(StatusCode::NOT_FOUND, "Not found")
}

fn from_db(e: DbError) -> Reply {
    let status = StatusCode::from_u16(e.http_status()).unwrap_or(StatusCode::BAD_REQUEST);
    reply(status, e.to_json())
}

fn from_dao(e: DaoError) -> Reply {
    match e {
        DaoError::Db(e) => from_db(e),
        DaoError::Store(err) => {
            tracing::error!(error = %err, source = ?std::error::Error::source(&err), "Database write failed.");
            message(
                StatusCode::INTERNAL_SERVER_ERROR,
                "An unexpected error occurred",
            )
        }
    }
}

fn decode_segments(path: &str) -> Option<Vec<String>> {
    path.split('/')
        .filter(|s| !s.is_empty())
        .map(|s| {
            percent_decode_str(s)
                .decode_utf8()
                .ok()
                .map(|c| c.into_owned())
        })
        .collect()
}

fn query_pairs(query: Option<&str>) -> Vec<(String, String)> {
    query
        .map(|q| form_urlencoded::parse(q.as_bytes()).into_owned().collect())
        .unwrap_or_default()
}

async fn handle(State(st): State<Arc<AdminState>>, req: Request) -> Response {
    st.requests.fetch_add(1, Ordering::Relaxed);
    let (parts, body) = req.into_parts();
    let origin = parts.headers.get(header::ORIGIN).cloned();
    let req_allow_headers = parts.headers.get("access-control-request-headers").cloned();
    let is_head = parts.method == Method::HEAD;
    let started = std::time::Instant::now();

    let mut r = dispatch(&st, &parts.method, &parts.uri, &parts.headers, body).await;
    if st.access_log {
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stdout().lock(),
            "admin {} {} {} {}ms",
            parts.method,
            parts.uri,
            r.status.as_u16(),
            started.elapsed().as_millis()
        );
    }

    let mut builder = Response::builder().status(r.status);
    let h = builder.headers_mut().expect("a fresh builder has headers");
    h.insert(
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        origin.unwrap_or_else(|| HeaderValue::from_static("*")),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
        HeaderValue::from_static("true"),
    );
    h.insert(
        header::SERVER,
        HeaderValue::from_static(concat!("gatehouse/", env!("CARGO_PKG_VERSION"))),
    );
    if let Some(etag) = r.etag.as_deref() {
        if let Ok(value) = HeaderValue::from_str(&format!("\"{etag}\"")) {
            h.insert(header::ETAG, value);
        }
    }
    if let Some(allow) = r.allow {
        h.insert(header::ALLOW, HeaderValue::from_static(allow));
        if r.status == StatusCode::NO_CONTENT {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_METHODS,
                HeaderValue::from_static(allow),
            );
            h.insert(
                header::ACCESS_CONTROL_ALLOW_HEADERS,
                req_allow_headers.unwrap_or_else(|| HeaderValue::from_static("Content-Type")),
            );
        }
    }
    let body = match r.body.take() {
        Some(v) => {
            h.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json; charset=utf-8"),
            );
            let bytes = serde_json::to_vec(&v).unwrap_or_default();
            if is_head {
                h.insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
                Body::empty()
            } else {
                Body::from(bytes)
            }
        }
        None => Body::empty(),
    };
    builder
        .body(body)
        .unwrap_or_else(|_| Response::new(Body::empty()))
}

/// The request body as a JSON object, or the reply Kong gives instead.
async fn read_body(
    headers: &HeaderMap,
    body: Body,
    schema: Option<&EntitySchema>,
) -> Result<Map<String, Value>, Reply> {
    let limited = http_body_util::Limited::new(body, MAX_BODY_BYTES);
    let bytes: Bytes = match limited.collect().await {
        Ok(c) => c.to_bytes(),
        Err(e) => {
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some()
            {
                return Err(message(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Request size limit exceeded",
                ));
            }
            return Err(message(StatusCode::BAD_REQUEST, "Bad request"));
        }
    };
    let content_types: Vec<&HeaderValue> = headers.get_all(header::CONTENT_TYPE).iter().collect();
    if content_types.len() > 1 {
        return Err(message(
            StatusCode::BAD_REQUEST,
            "Multiple Content-Type headers not allowed",
        ));
    }
    let ct = content_types
        .first()
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_ascii_lowercase();
    if bytes.iter().all(u8::is_ascii_whitespace) && !ct.starts_with("application/json") {
        return Ok(Map::new());
    }
    if ct.starts_with("application/json") {
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(Map::new());
        }
        return match serde_json::from_slice::<Value>(&bytes) {
            Ok(Value::Object(m)) => Ok(m),
            _ => Err(message(StatusCode::BAD_REQUEST, "Cannot parse JSON body")),
        };
    }
    if ct.starts_with("application/x-www-form-urlencoded") {
        let mut m = args::parse_form(&bytes);
        if let Some(s) = schema {
            args::infer_entity(s, &mut m);
        }
        return Ok(m);
    }
    if ct.is_empty() {
        // Kong needs a content type whenever a body is sent.
        return Err(message(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "Unsupported Media Type",
        ));
    }
    Err(message(
        StatusCode::UNSUPPORTED_MEDIA_TYPE,
        "Unsupported Media Type",
    ))
}

async fn dispatch(
    st: &AdminState,
    method: &Method,
    uri: &http::Uri,
    headers: &HeaderMap,
    body: Body,
) -> Reply {
    let Some(segs) = decode_segments(uri.path()) else {
        return not_found();
    };
    let Some(ep) = route(&segs) else {
        return not_found();
    };
    let allow = ep.methods();
    if method == Method::OPTIONS {
        return Reply {
            status: StatusCode::NO_CONTENT,
            body: None,
            allow: Some(allow),
            etag: None,
        };
    }
    let m = if method == Method::HEAD {
        "GET"
    } else {
        method.as_str()
    };
    if !allow.split(", ").any(|a| a == m) {
        let mut r = message(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed");
        r.allow = Some(allow);
        return r;
    }
    let query = query_pairs(uri.query());
    match ep {
        Endpoint::Root => ok(root_info(st)),
        Endpoint::Status => status_info(st, &query).await,
        Endpoint::Endpoints => ok(json!({"data": endpoint_list(), "next": null})),
        Endpoint::PluginsEnabled => ok(json!({ "enabled_plugins": plugins::names() })),
        Endpoint::Schema(s) => ok(s.to_json()),
        Endpoint::NoSchema(name) => {
            message(StatusCode::NOT_FOUND, &format!("No entity named '{name}'"))
        }
        Endpoint::PluginSchema(name) => match plugins::subschema(&name) {
            Some(r) => ok(r.to_json()),
            None => message(StatusCode::NOT_FOUND, &format!("No plugin named '{name}'")),
        },
        Endpoint::SchemaValidate(s) => validate_only(s, headers, body).await,
        Endpoint::PluginSchemaValidate => match entities::entity("plugins") {
            Some(s) => validate_only(s, headers, body).await,
            None => not_found(),
        },
        Endpoint::Tags(tag) => tags(st, tag.as_deref(), &query),
        Endpoint::DataPlanes => match &st.cluster {
            Some(cluster) => ok(cluster.data_planes()),
            // Kong's answer outside hybrid mode.
            None => message(
                StatusCode::BAD_REQUEST,
                "this endpoint is only available when Kong is configured to run as Control Plane for the cluster",
            ),
        },
        Endpoint::Config if m == "GET" => {
            let (mut reply, hash) = config::get(st);
            reply.etag = Some(hash);
            reply
        }
        Endpoint::Config => config::post(st, headers, body, &query).await,
        Endpoint::UpstreamHealth(u) => health::upstream_health(st, &u, &query),
        Endpoint::TargetsAll(u) => {
            let Some((_, parent)) = resolve_parent(st, "upstreams", &u, "upstream") else {
                return not_found();
            };
            let Some(schema) = entities::entity("targets") else {
                return not_found();
            };
            collection_get(st, schema, Some(parent), &query, "targets")
        }
        Endpoint::TargetHealth {
            upstream,
            target,
            address,
            healthy,
        } => health::set_target_health(st, &upstream, &target, address.as_deref(), healthy),
        Endpoint::Collection { schema, parent } => {
            let parent = match parent {
                None => None,
                Some((pschema, pkey, field)) => {
                    match resolve_parent(st, pschema.name, &pkey, field) {
                        Some((_, p)) => Some(p),
                        None => return not_found(),
                    }
                }
            };
            if m == "GET" {
                let path = uri.path().trim_end_matches('/').to_owned();
                if schema.name == "consumers" {
                    if let Some((_, custom_id)) = query.iter().find(|(k, _)| k == "custom_id") {
                        return consumers_by_custom_id(st, custom_id);
                    }
                }
                collection_get(st, schema, parent, &query, &path)
            } else {
                let input = match read_body(headers, body, Some(schema)).await {
                    Ok(i) => i,
                    Err(r) => return r,
                };
                match st.dao.insert(schema, input, parent.as_ref()).await {
                    Ok(v) => reply(StatusCode::CREATED, v),
                    Err(e) => from_dao(e),
                }
            }
        }
        Endpoint::Item {
            schema,
            key,
            parent,
        } => {
            let parent = match parent {
                None => None,
                Some((pschema, pkey, field)) => {
                    match resolve_parent(st, pschema.name, &pkey, field) {
                        Some((_, p)) => Some(p),
                        None => return not_found(),
                    }
                }
            };
            item(st, m, schema, &key, parent, headers, body).await
        }
        Endpoint::ParentOf {
            child,
            key,
            field,
            parent,
        } => {
            let Some(c) = st.dao.select(child, &key, None) else {
                return not_found();
            };
            let Some(pid) = c
                .get(field)
                .and_then(|f| f.get("id"))
                .and_then(Value::as_str)
            else {
                return not_found();
            };
            let pid = pid.to_owned();
            item(st, m, parent, &pid, None, headers, body).await
        }
    }
}

async fn item(
    st: &AdminState,
    method: &str,
    schema: &'static EntitySchema,
    key: &str,
    parent: Option<Parent>,
    headers: &HeaderMap,
    body: Body,
) -> Reply {
    match method {
        "GET" => match st.dao.select(schema, key, parent.as_ref()) {
            Some(v) => ok(v),
            None => not_found(),
        },
        "DELETE" => match st.dao.delete(schema, key, parent.as_ref()).await {
            Ok(()) => Reply {
                status: StatusCode::NO_CONTENT,
                body: None,
                allow: None,
                etag: None,
            },
            Err(e) => from_dao(e),
        },
        "PATCH" | "PUT" => {
            let input = match read_body(headers, body, Some(schema)).await {
                Ok(i) => i,
                Err(r) => return r,
            };
            let res = if method == "PATCH" {
                st.dao.update(schema, key, input, parent.as_ref()).await
            } else {
                st.dao.upsert(schema, key, input, parent.as_ref()).await
            };
            match res {
                Ok(v) => ok(v),
                Err(e) => from_dao(e),
            }
        }
        _ => message(StatusCode::METHOD_NOT_ALLOWED, "Method not allowed"),
    }
}

fn resolve_parent(
    st: &AdminState,
    pentity: &str,
    pkey: &str,
    field: &'static str,
) -> Option<(Value, Parent)> {
    let pschema = entities::entity(pentity)?;
    let p = st.dao.select(pschema, pkey, None)?;
    let id = p.get("id")?.as_str()?.to_owned();
    Some((p, Parent { field, id }))
}

/// Kong's tag filter syntax: `a,b` (and) or `a/b` (or).
fn parse_tags(raw: &str) -> Result<(Vec<String>, bool), DbError> {
    let invalid = |msg: &str| {
        let mut o = Map::new();
        o.insert("tags".into(), json!(msg));
        DbError::InvalidOptions(o)
    };
    if raw.is_empty() {
        return Err(invalid("cannot be null"));
    }
    let valid_byte = |c: char| !c.is_ascii() || (c >= ' ' && c != ',' && c != '/' && c != '\x7f');
    let has_comma = raw.contains(',');
    let has_slash = raw.contains('/');
    if has_comma && has_slash {
        return Err(invalid("invalid filter syntax"));
    }
    let sep = if has_slash { '/' } else { ',' };
    let tags: Vec<String> = raw.split(sep).map(str::to_owned).collect();
    if tags
        .iter()
        .any(|t| t.is_empty() || !t.chars().all(valid_byte))
    {
        return Err(invalid("invalid filter syntax"));
    }
    Ok((tags, !has_slash))
}

fn page_query(
    query: &[(String, String)],
    parent: Option<Parent>,
    tags_allowed: bool,
) -> Result<PageQuery, DbError> {
    let get = |k: &str| query.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let size = match get("size") {
        None => 100,
        Some(s) => {
            let n: f64 = s
                .parse()
                .map_err(|_| DbError::InvalidSize("size must be a number".into()))?;
            if !(1.0..=1000.0).contains(&n) || n.fract() != 0.0 {
                return Err(DbError::InvalidSize(
                    "size must be an integer between 1 and 1000".into(),
                ));
            }
            n as usize
        }
    };
    let tags = match get("tags") {
        Some(t) if tags_allowed => Some(parse_tags(t)?),
        _ => None,
    };
    Ok(PageQuery {
        size,
        offset: get("offset").map(str::to_owned),
        tags,
        parent,
    })
}

fn collection_get(
    st: &AdminState,
    schema: &'static EntitySchema,
    parent: Option<Parent>,
    query: &[(String, String)],
    path: &str,
) -> Reply {
    let q = match page_query(query, parent, schema.field("tags").is_some()) {
        Ok(q) => q,
        Err(e) => return from_db(e),
    };
    let page = match st.dao.page(schema, &q) {
        Ok(p) => p,
        Err(e) => return from_db(e),
    };
    let mut body = json!({ "data": page.data, "next": null });
    if let Some(offset) = page.offset {
        let mut next = format!(
            "{}?offset={}",
            path,
            percent_encoding::utf8_percent_encode(&offset, percent_encoding::NON_ALPHANUMERIC)
        );
        if let Some((_, t)) = query.iter().find(|(k, _)| k == "tags") {
            next.push_str("&tags=");
            next.extend(form_urlencoded::byte_serialize(t.as_bytes()));
        }
        if let Some((_, s)) = query.iter().find(|(k, _)| k == "size") {
            next.push_str("&size=");
            next.push_str(s);
        }
        body["next"] = json!(next);
        body["offset"] = json!(offset);
    }
    ok(body)
}

/// Kong's `GET /consumers?custom_id=…`: the consumer with that custom id,
/// as a one-element page.
fn consumers_by_custom_id(st: &AdminState, custom_id: &str) -> Reply {
    let data: Vec<Value> = st.dao.read(|s| {
        s.iter("consumers")
            .filter(|c| c.get("custom_id").and_then(Value::as_str) == Some(custom_id))
            .map(|c| Value::Object(c.clone()))
            .collect()
    });
    ok(json!({ "data": data, "next": null }))
}

async fn validate_only(schema: &'static EntitySchema, headers: &HeaderMap, body: Body) -> Reply {
    let input = match read_body(headers, body, Some(schema)).await {
        Ok(i) => i,
        Err(r) => return r,
    };
    let sub = schema.subschema_for(&input);
    if schema.subschema_key.is_some() && sub.is_none() {
        let key = schema.subschema_key.unwrap_or("name");
        let v = input.get(key).map(|v| v.as_str().unwrap_or("").to_owned());
        let msg = match (v, &schema.subschemas) {
            (Some(name), Some(subs)) => subs.unknown_error().replace("%s", &name),
            _ => "required field missing".to_owned(),
        };
        return from_db(DbError::schema(key, &msg));
    }
    let now = gatehouse_model::schema::validate_now_s();
    let processed =
        match schema
            .record
            .process_auto_fields_with(input, Context::Insert, sub.as_deref(), now)
        {
            Ok(p) => p,
            Err(e) => return from_db(DbError::SchemaViolation(e)),
        };
    match schema.record.validate(&processed, true, sub.as_deref()) {
        Ok(()) => ok(json!({"message": "schema validation successful"})),
        Err(e) => from_db(DbError::SchemaViolation(e)),
    }
}

fn tags(st: &AdminState, tag: Option<&str>, query: &[(String, String)]) -> Reply {
    let size = query
        .iter()
        .find(|(k, _)| k == "size")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(100)
        .clamp(1, 1000);
    let data: Vec<Value> = st.dao.read(|s| {
        let mut out = Vec::new();
        for schema in ENTITIES.iter() {
            for e in s.iter(schema.name) {
                let Some(list) = e.get("tags").and_then(Value::as_array) else {
                    continue;
                };
                for t in list.iter().filter_map(Value::as_str) {
                    if tag.is_none_or(|want| want == t) {
                        out.push(json!({
                            "entity_name": schema.name,
                            "entity_id": e.get("id"),
                            "tag": t,
                        }));
                    }
                }
            }
        }
        out
    });
    let data: Vec<Value> = data.into_iter().take(size).collect();
    ok(json!({ "data": data, "next": null }))
}

fn root_info(st: &AdminState) -> Value {
    let mut available = Map::new();
    for name in plugins::names() {
        available.insert(
            name.to_owned(),
            json!({"version": KONG_VERSION, "priority": plugins::priority(name)}),
        );
    }
    let enabled: Vec<String> = st.dao.read(|s| {
        let mut names: Vec<String> = s
            .iter("plugins")
            .filter_map(|p| p.get("name")?.as_str().map(str::to_owned))
            .collect();
        names.sort();
        names.dedup();
        names
    });
    json!({
        "tagline": "Welcome to kong",
        "version": KONG_VERSION,
        "edition": "community",
        "node_id": st.node.node_id,
        "hostname": st.node.hostname,
        "lua_version": "LuaJIT 2.1.0-20231117 (compatible; gatehouse)",
        "plugins": {
            "available_on_server": available,
            "enabled_in_cluster": enabled,
            "disabled_on_server": {},
        },
        "configuration": st.node.configuration,
        "pids": {"master": std::process::id(), "workers": [std::process::id()]},
        "timers": {"running": 0, "pending": 0},
        "gatehouse": {"version": env!("CARGO_PKG_VERSION")},
    })
}

fn rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

async fn status_info(st: &AdminState, query: &[(String, String)]) -> Reply {
    let unit = query
        .iter()
        .find(|(k, _)| k == "unit")
        .map(|(_, v)| v.clone())
        .unwrap_or_else(|| "m".to_owned());
    let scale = query
        .iter()
        .find(|(k, _)| k == "scale")
        .and_then(|(_, v)| v.parse::<usize>().ok())
        .unwrap_or(2);
    let (div, suffix) = match unit.as_str() {
        "b" | "B" => (1.0, ""),
        "k" | "K" => (1024.0, " KiB"),
        "m" | "M" => (1024.0 * 1024.0, " MiB"),
        "g" | "G" => (1024.0 * 1024.0 * 1024.0, " GiB"),
        other => {
            return message(
                StatusCode::BAD_REQUEST,
                &format!("invalid unit '{other}' (expected 'k/K', 'm/M', or 'g/G')"),
            )
        }
    };
    let fmt_mem = |bytes: u64| -> Value {
        if suffix.is_empty() {
            json!(bytes)
        } else {
            json!(format!("{:.*}{}", scale, bytes as f64 / div, suffix))
        }
    };
    let reachable = st.dao.backend().ping().await.is_ok();
    let rss = rss_bytes().unwrap_or(0);
    let hash = st.dao.read(|s| s.hash());
    ok(json!({
        "database": {"reachable": reachable},
        "memory": {
            "workers_lua_vms": [{"pid": std::process::id(), "http_allocated_gc": fmt_mem(rss)}],
            "lua_shared_dicts": {},
        },
        "server": {
            "total_requests": st.requests.load(Ordering::Relaxed),
        },
        "configuration_hash": hash,
    }))
}

fn endpoint_list() -> Vec<String> {
    let mut out = vec![
        "/".to_owned(),
        "/status".to_owned(),
        "/endpoints".to_owned(),
        "/plugins/enabled".to_owned(),
        "/config".to_owned(),
        "/schemas/{db_entity_name}".to_owned(),
        "/schemas/{db_entity_name}/validate".to_owned(),
        "/schemas/plugins/{name}".to_owned(),
        "/schemas/plugins/validate".to_owned(),
        "/tags".to_owned(),
        "/tags/{tags}".to_owned(),
        "/upstreams/{upstreams}/health".to_owned(),
        "/upstreams/{upstreams}/targets/all".to_owned(),
    ];
    for e in ENTITIES.iter() {
        let c = e.admin_api_name;
        out.push(format!("/{c}"));
        out.push(format!("/{c}/{{{}}}", e.name));
        for (field, _, reference) in e.foreign_fields() {
            out.push(format!("/{c}/{{{}}}/{field}", e.name));
            if let Some(parent) = entities::entity(reference) {
                let nested = e.admin_api_nested_name.unwrap_or(c);
                out.push(format!(
                    "/{}/{{{}}}/{nested}",
                    parent.admin_api_name, parent.name
                ));
                out.push(format!(
                    "/{}/{{{}}}/{nested}/{{{}}}",
                    parent.admin_api_name, parent.name, e.name
                ));
            }
        }
    }
    out.sort();
    out.dedup();
    out
}
