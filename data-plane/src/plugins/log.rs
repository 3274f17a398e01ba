//! Kong's log serializer (`kong.log.serialize()` in `kong/pdk/log.lua`):
//! the JSON document log plugins send. The request part is taken when the
//! access phase ends, the response part in `header_filter`, and the rest
//! when the response is done; the document is built once per request and
//! shared by every log plugin of the chain.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::{HeaderMap, StatusCode};
use serde_json::{json, Map, Value};

use super::{Ctx, PluginRequest};

/// The route and service documents of a chain, parsed at build time.
#[derive(Default)]
pub(crate) struct Entities {
    pub(crate) route: Value,
    pub(crate) service: Value,
}

/// What the proxy knows once the response is done.
#[derive(Default)]
pub(crate) struct Facts<'f> {
    pub(crate) upstream_uri: Option<&'f str>,
    pub(crate) upstream_status: Option<u16>,
    /// From the start of the request to sending it upstream.
    pub(crate) proxy_latency: Option<Duration>,
    /// From sending the request upstream to its response head.
    pub(crate) upstream_latency: Option<Duration>,
    pub(crate) total: Duration,
    pub(crate) response_size: u64,
}

/// The request as it was when the access phase ended.
pub(crate) struct Record {
    request: Map<String, Value>,
    client_ip: String,
    started_at: u64,
    status: u16,
    response_headers: Value,
}

/// Header fields as Kong's `get_headers()` returns them: lower-case names,
/// repeated fields as arrays.
pub(crate) fn headers_json(headers: &HeaderMap) -> Map<String, Value> {
    let mut out = Map::new();
    for (name, value) in headers {
        let value = Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned());
        match out.get_mut(name.as_str()) {
            Some(Value::Array(list)) => list.push(value),
            Some(first) => {
                let first = first.take();
                *out.get_mut(name.as_str()).unwrap_or(&mut Value::Null) = json!([first, value]);
            }
            None => {
                out.insert(name.as_str().to_owned(), value);
            }
        }
    }
    out
}

/// The query as Kong's `get_query()` returns it: an argument without `=`
/// is `true`, repeated ones are arrays.
pub(crate) fn query_json(query: Option<&str>) -> Map<String, Value> {
    let mut out = Map::new();
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = match pair.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (pair, None),
        };
        let decode = |text: &str| {
            form_urlencoded::parse(format!("k={text}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default()
        };
        let key = decode(key);
        let value = value.map_or(Value::Bool(true), |v| Value::String(decode(v)));
        match out.get_mut(&key) {
            Some(Value::Array(list)) => list.push(value),
            Some(first) => {
                let first = first.take();
                out.insert(key, json!([first, value]));
            }
            None => {
                out.insert(key, value);
            }
        }
    }
    out
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl Record {
    pub(crate) fn new(req: &PluginRequest<'_>, started: SystemTime) -> Record {
        let mut headers = headers_json(req.headers.map());
        for secret in ["authorization", "proxy-authorization"] {
            if let Some(value) = headers.get_mut(secret) {
                *value = Value::String("REDACTED".into());
            }
        }
        let host = req
            .header("host")
            .map(|h| h.rsplit_once(':').map_or(h, |(host, _)| host))
            .unwrap_or("")
            .to_ascii_lowercase();
        let scheme = if req.https { "https" } else { "http" };
        let size = req
            .headers
            .map()
            .iter()
            .map(|(n, v)| n.as_str().len() + v.len() + 4)
            .sum::<usize>()
            + req.target.len()
            + req.body.as_ref().map_or(0, |b| b.len());
        let mut request = Map::new();
        request.insert("id".into(), Value::String(String::new()));
        request.insert("uri".into(), Value::String(req.target.to_owned()));
        request.insert(
            "url".into(),
            Value::String(format!(
                "{scheme}://{host}:{}{}",
                req.local_port, req.target
            )),
        );
        let query = req.target.split_once('?').map(|(_, q)| q);
        request.insert("querystring".into(), Value::Object(query_json(query)));
        request.insert(
            "method".into(),
            Value::String(req.method.as_str().to_owned()),
        );
        request.insert("headers".into(), Value::Object(headers));
        request.insert("size".into(), json!(size));
        Record {
            request,
            client_ip: req.client_ip.to_string(),
            started_at: started.duration_since(UNIX_EPOCH).map_or(0, millis),
            status: 0,
            response_headers: Value::Object(Map::new()),
        }
    }

    pub(crate) fn response(&mut self, status: StatusCode, headers: &HeaderMap) {
        self.status = status.as_u16();
        self.response_headers = Value::Object(headers_json(headers));
    }

    pub(crate) fn entry(
        self,
        ctx: &Ctx<'_>,
        entities: Option<&Entities>,
        facts: &Facts<'_>,
    ) -> Value {
        let proxied = facts.upstream_latency.is_some();
        let kong = facts
            .proxy_latency
            .map_or_else(|| millis(facts.total), millis);
        let consumer = ctx.consumer.as_ref().map(|c| {
            json!({"id": &*c.id, "username": c.username.as_deref(), "custom_id": c.custom_id.as_deref()})
        });
        let authenticated = ctx.credential.as_ref().map(|credential| {
            json!({
                "id": credential.id.to_str().unwrap_or_default(),
                "consumer_id": ctx.consumer.as_ref().map(|c| &*c.id),
            })
        });
        let mut entry = json!({
            "request": Value::Object(self.request),
            "upstream_uri": facts.upstream_uri.unwrap_or(""),
            "upstream_status": facts.upstream_status.map_or(String::new(), |s| s.to_string()),
            "response": {
                "status": self.status,
                "headers": self.response_headers,
                "size": facts.response_size,
            },
            "latencies": {
                "kong": kong,
                "proxy": facts.upstream_latency.map_or(-1, |d| millis(d) as i64),
                "request": millis(facts.total),
                "receive": 0,
            },
            "tries": [],
            "authenticated_entity": authenticated,
            "route": entities.map_or(Value::Null, |e| e.route.clone()),
            "service": entities.map_or(Value::Null, |e| e.service.clone()),
            "consumer": consumer,
            "client_ip": self.client_ip,
            "started_at": self.started_at,
            "source": if proxied { "upstream" } else { "kong" },
            "workspace_name": "default",
        });
        if let Some(id) = ctx.correlation_id.as_ref().and_then(|id| id.to_str().ok()) {
            entry["correlation_id"] = id.into();
        }
        entry
    }
}
