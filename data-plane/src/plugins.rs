//! The plugin runtime: Kong's bundled plugins run on the data plane with
//! Kong's phases, priorities and scoping.
//!
//! Everything that does not depend on the request is done when a runtime
//! is built: configurations are parsed into typed handlers, credentials
//! are indexed by the value a request presents, and each route gets its
//! [`Chain`]: the plugins that can apply to it, in Kong's priority order,
//! with the configuration already chosen where no consumer-scoped one
//! exists. A route without plugins has no chain and pays nothing.
//!
//! Phases as Kong runs them (`kong/runloop/plugins_iterator.lua`):
//! `rewrite` for global plugins only (Kong runs it before routing), then
//! `access` plugin by plugin in priority order, each configuration looked
//! up with the consumer known at that moment, so a consumer-scoped
//! configuration applies to plugins that run after authentication. The
//! plugins that ran in `access` are the ones whose `response` (Kong's
//! `header_filter`) and `response_body` (`body_filter`) run, also on an
//! answer a plugin made itself.

mod auth;
mod consumers;
mod headers;
pub(crate) mod log;
mod logging;
mod metrics;
mod otel;
mod traffic;
mod transform;

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use bytes::Bytes;
use gatehouse_model::plugins::scope::{Combos, Scope};
use gatehouse_model::snapshot::{ConfigSnapshot, Plugin as PluginEntity};
use http::header::CONTENT_TYPE;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use http_body_util::{Either, Full};
use smallvec::SmallVec;

pub(crate) use consumers::{Consumer, Consumers};
pub(crate) use headers::RequestHeaders;

use crate::proxy::ResponseBody;

/// A plugin configuration turned into its handler.
pub(crate) trait Plugin: Send + Sync {
    /// What the plugin reads beyond the request head and response head.
    fn needs(&self) -> Needs {
        Needs::default()
    }
    /// Kong's `rewrite`: runs for global configurations only.
    fn rewrite(&self, _req: &mut PluginRequest<'_>, _ctx: &mut Ctx<'_>) -> Flow {
        Flow::Continue
    }
    fn access(&self, req: &mut PluginRequest<'_>, ctx: &mut Ctx<'_>) -> Flow;
    /// Instead of `access`, for a request whose access phase never runs
    /// (no route matched): takes what `response` reads from the request,
    /// as Kong's header_filter reads it then.
    fn without_access(&self, _req: &PluginRequest<'_>, _ctx: &mut Ctx<'_>) {}
    /// Whether [`Plugin::response`] does anything: when no plugin of a
    /// chain does, the HTTP/1.1 engine copies the upstream's response
    /// head without building a header map. The default is the safe one.
    fn filters_response(&self) -> bool {
        true
    }
    /// Kong's `header_filter`, on the upstream's response or on an answer
    /// a plugin made.
    fn response(&self, _ctx: &mut Ctx<'_>, _status: StatusCode, _headers: &mut HeaderMap) {}
    /// Kong's `body_filter` on the whole body; called only when
    /// [`Needs::response_body`].
    fn response_body(
        &self,
        _ctx: &mut Ctx<'_>,
        _status: StatusCode,
        _headers: &mut HeaderMap,
        _body: &mut Bytes,
    ) {
    }
    /// Kong's `log`, after the response went out, with Kong's serialized
    /// request (`kong.log.serialize()`); called only when [`Needs::log`].
    /// Runs on the request's task: send the entry elsewhere, never block.
    fn log(&self, _entry: &serde_json::Value) {}
}

/// What a plugin needs the proxy to read whole before it runs.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Needs {
    pub(crate) request_body: bool,
    pub(crate) response_body: bool,
    /// The plugin has a `log` phase: the request is recorded for it.
    pub(crate) log: bool,
    /// The plugin reads the captures of the route's regex path.
    pub(crate) uri_captures: bool,
    /// The plugin reads the route and service entities
    /// (`kong.router.get_route()`).
    pub(crate) entities: bool,
    /// The plugin reads the request body when its length is not declared
    /// (a chunked body, which the HTTP/1.1 engine hands to hyper).
    pub(crate) unsized_request_body: bool,
}

/// Whether the request goes on or the plugin answered it.
pub(crate) enum Flow {
    Continue,
    Exit(Response<ResponseBody>),
    /// The plugin waits for I/O (a shared counter in Redis); what the
    /// future yields finishes its access phase.
    Wait(Pending),
}

/// What a waiting plugin does once its I/O is done.
pub(crate) type Resume = Box<dyn FnOnce(&mut PluginRequest<'_>, &mut Ctx<'_>) -> Flow + Send>;
pub(crate) type Pending = std::pin::Pin<Box<dyn std::future::Future<Output = Resume> + Send>>;

/// The upstream request as plugins see and change it.
pub(crate) struct PluginRequest<'a> {
    pub(crate) method: Method,
    /// The HTTP version the client spoke.
    pub(crate) version: http::Version,
    /// The path as the client sent it, without the query.
    pub(crate) path: &'a str,
    /// The query string as it goes upstream (plugins may replace it).
    pub(crate) query: Option<Cow<'a, str>>,
    /// The headers as they go upstream.
    pub(crate) headers: RequestHeaders<'a>,
    /// The whole body, when a plugin of the chain needs it.
    pub(crate) body: Option<Bytes>,
    pub(crate) client_ip: IpAddr,
    /// `client_ip` as text, made once per connection.
    pub(crate) client_addr: &'a str,
    pub(crate) https: bool,
    /// The request target as the client sent it (path and query).
    pub(crate) target: &'a str,
    /// The proxy port the request came to.
    pub(crate) local_port: u16,
    /// nginx's `$server_addr`, `$connection` and `$connection_requests`.
    pub(crate) connection: (IpAddr, u64, u64),
    /// Replaces the upstream path the route computed (request-transformer's
    /// `replace.uri`).
    pub(crate) upstream_path: Option<String>,
}

impl PluginRequest<'_> {
    /// The first value of a request header as text.
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get_str(name)
    }

    /// Decoded query arguments, in order.
    pub(crate) fn query_args(&self) -> Vec<(String, String)> {
        self.query.as_deref().map_or_else(Vec::new, |query| {
            form_urlencoded::parse(query.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        })
    }

    pub(crate) fn content_type(&self) -> &str {
        self.header("content-type").unwrap_or("")
    }
}

/// The credential a request authenticated with.
#[derive(Clone)]
pub(crate) struct Credential {
    pub(crate) id: HeaderValue,
}

/// What one request carries through the phases.
pub(crate) struct Ctx<'r> {
    pub(crate) consumers: &'r Consumers,
    pub(crate) route_id: &'r str,
    pub(crate) service_id: Option<&'r str>,
    pub(crate) consumer: Option<Arc<Consumer>>,
    pub(crate) credential: Option<Credential>,
    /// The instances that ran `access`, in order.
    collected: SmallVec<[&'r Arc<Instance>; 8]>,
    /// Headers a plugin set on the response in `access` (Kong's
    /// `kong.response.set_header` before the response exists, as
    /// rate-limiting does): they replace the upstream's of the same name
    /// before any `header_filter` runs.
    pub(crate) response_headers: SetHeaders,
    /// cors: response headers to set (`None` removes), decided in `access`
    /// from the request's Origin.
    pub(crate) cors_headers: Option<Vec<(HeaderName, Option<HeaderValue>)>>,
    /// proxy-cache: the key and what happened, for `response`.
    pub(crate) cache: Option<Box<transform::CacheState>>,
    /// correlation-id: the id sent upstream, for `echo_downstream` and
    /// log entries.
    pub(crate) correlation_id: Option<HeaderValue>,
    /// The captures of the route's regex path (Kong's `uri_captures`),
    /// for request-transformer's templates; set by the proxy.
    pub(crate) uri_captures: Option<Box<transform::UriCaptures>>,
    /// The matched route and service, for plugins that need them whole.
    pub(crate) entities: Option<&'r log::Entities>,
    /// What the log phase reports, when a plugin logs.
    log: Option<Box<log::Record>>,
    /// opentelemetry: the request's trace.
    otel: Option<otel::RequestTrace>,
    started: std::time::SystemTime,
}

impl<'r> Ctx<'r> {
    pub(crate) fn new(plugins: &'r Plugins, chain: &'r Chain) -> Ctx<'r> {
        Ctx {
            consumers: &plugins.consumers,
            route_id: &chain.route_id,
            service_id: chain.service_id.as_deref(),
            consumer: None,
            credential: None,
            collected: SmallVec::new(),
            response_headers: SetHeaders::default(),
            cors_headers: None,
            cache: None,
            correlation_id: None,
            uri_captures: None,
            entities: chain.entities.as_deref(),
            log: None,
            otel: None,
            // Only a log entry reads it: no clock read otherwise.
            started: if chain.needs.log {
                std::time::SystemTime::now()
            } else {
                std::time::UNIX_EPOCH
            },
        }
    }
}

/// Response headers decided before the response exists, kept as the
/// header lines the HTTP/1.1 engine sends, so that a plugin setting them
/// on every request (rate-limiting) makes neither header names nor values.
#[derive(Default)]
pub(crate) struct SetHeaders {
    /// `name: value\r\n` lines, names in lower case; only [`HeaderLine`]
    /// and [`HeaderPrefix`] write here, so every line is well formed.
    lines: Vec<u8>,
    /// Where each line's name and value are in `lines`: start, name
    /// length, end of the value.
    spans: SmallVec<[(u32, u32, u32); 6]>,
}

/// A whole header line, made when the configuration is built.
pub(crate) struct HeaderLine {
    line: Box<[u8]>,
    name_len: usize,
}

impl HeaderLine {
    pub(crate) fn new(name: &HeaderName, value: &HeaderValue) -> HeaderLine {
        let mut line = HeaderPrefix::new(name).prefix.into_vec();
        line.extend_from_slice(value.as_bytes());
        line.extend_from_slice(b"\r\n");
        HeaderLine {
            line: line.into_boxed_slice(),
            name_len: name.as_str().len(),
        }
    }
}

/// `name: `, for a value known only per request.
pub(crate) struct HeaderPrefix {
    prefix: Box<[u8]>,
}

impl HeaderPrefix {
    pub(crate) fn new(name: &HeaderName) -> HeaderPrefix {
        let mut prefix = Vec::with_capacity(name.as_str().len() + 2);
        prefix.extend_from_slice(name.as_str().as_bytes());
        prefix.extend_from_slice(b": ");
        HeaderPrefix {
            prefix: prefix.into_boxed_slice(),
        }
    }
}

impl SetHeaders {
    pub(crate) fn push_line(&mut self, line: &HeaderLine) {
        let start = self.start();
        self.lines.extend_from_slice(&line.line);
        self.end(start, line.name_len);
    }

    pub(crate) fn push_number(&mut self, prefix: &HeaderPrefix, value: i64) {
        let start = self.start();
        self.lines.extend_from_slice(&prefix.prefix);
        self.lines
            .extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
        self.lines.extend_from_slice(b"\r\n");
        self.end(start, prefix.prefix.len() - 2);
    }

    fn start(&mut self) -> usize {
        if self.lines.capacity() == 0 {
            self.lines.reserve(256);
        }
        self.lines.len()
    }

    fn end(&mut self, start: usize, name_len: usize) {
        // A few headers per request: far below 4 GiB.
        self.spans
            .push((start as u32, name_len as u32, (self.lines.len() - 2) as u32));
    }

    pub(crate) fn clear(&mut self) {
        self.lines.clear();
        self.spans.clear();
    }

    /// The lines as they go on the wire.
    pub(crate) fn lines(&self) -> &[u8] {
        &self.lines
    }

    /// Each header as name and value.
    pub(crate) fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.spans.iter().filter_map(|&(start, name_len, end)| {
            let (start, name_len, end) = (start as usize, name_len as usize, end as usize);
            Some((
                self.lines.get(start..start + name_len)?,
                self.lines.get(start + name_len + 2..end)?,
            ))
        })
    }

    /// Whether a header of this name (any case) is set here.
    pub(crate) fn sets(&self, name: &[u8]) -> bool {
        self.spans.iter().any(|&(start, name_len, _)| {
            name_len as usize == name.len()
                && self
                    .lines
                    .get(start as usize..start as usize + name.len())
                    .is_some_and(|set| set.eq_ignore_ascii_case(name))
        })
    }
}

/// One configured plugin.
pub(crate) struct Instance {
    /// Bit per protocol ([`Protocol`]).
    protocols: u8,
    global: bool,
    handler: Box<dyn Plugin>,
}

/// The protocol a request came with, as plugin `protocols` name them.
#[derive(Clone, Copy)]
pub(crate) enum Protocol {
    Http = 1,
    Https = 2,
    Grpc = 4,
    Grpcs = 8,
}

impl Protocol {
    pub(crate) fn of(https: bool, grpc: bool) -> Protocol {
        match (https, grpc) {
            (false, false) => Protocol::Http,
            (true, false) => Protocol::Https,
            (false, true) => Protocol::Grpc,
            (true, true) => Protocol::Grpcs,
        }
    }
}

fn protocol_bits(protocols: &[String]) -> u8 {
    protocols
        .iter()
        .map(|p| match p.as_str() {
            "http" => Protocol::Http as u8,
            "https" => Protocol::Https as u8,
            "grpc" => Protocol::Grpc as u8,
            "grpcs" => Protocol::Grpcs as u8,
            _ => 0,
        })
        .fold(0, |a, b| a | b)
}

/// The configurations of one plugin name by scope.
type PluginCombos = Combos<Arc<Instance>>;

/// A plugin of a route's chain.
enum Step {
    /// No configuration of this plugin names a consumer: chosen at build.
    Fixed(Arc<Instance>),
    /// Looked up when the plugin's turn comes, with the consumer known then.
    ByConsumer(Arc<Combos<Arc<Instance>>>),
}

/// The plugins that can run for one route, in priority order.
pub(crate) struct Chain {
    route_id: Box<str>,
    service_id: Option<Box<str>>,
    /// The route and service as log entries show them.
    entities: Option<Arc<log::Entities>>,
    steps: Vec<Step>,
    needs: Needs,
    has_global: bool,
    /// A plugin of the chain changes response heads, or one logs them.
    filters_response: bool,
    /// The route's regex paths, by index in `paths`, when a plugin reads
    /// their captures.
    path_regexes: Vec<Option<regex::Regex>>,
}

impl Chain {
    pub(crate) fn needs(&self) -> Needs {
        self.needs
    }

    pub(crate) fn filters_response(&self) -> bool {
        self.filters_response
    }

    /// Kong's `uri_captures` for plugins that read them: the captures of
    /// the regex path the router matched (`path_idx`) on the normalized
    /// path.
    pub(crate) fn capture(&self, ctx: &mut Ctx<'_>, path_idx: Option<usize>, path: &[u8]) {
        let Some(regex) = path_idx
            .and_then(|i| self.path_regexes.get(i))
            .and_then(Option::as_ref)
        else {
            return;
        };
        if let Ok(path) = std::str::from_utf8(path) {
            ctx.uri_captures = transform::UriCaptures::new(regex, path).map(Box::new);
        }
    }

    fn resolve<'c>(&'c self, step: &'c Step, consumer: Option<&str>) -> Option<&'c Arc<Instance>> {
        match step {
            Step::Fixed(instance) => Some(instance),
            Step::ByConsumer(combos) => {
                combos.lookup(Some(&self.route_id), self.service_id.as_deref(), consumer)
            }
        }
    }

    /// For an answer made before any plugin's access phase (no route
    /// matched): collects the plugins that apply, as Kong's
    /// `get_collected_iterator` falls back to the global ones, so that
    /// [`Chain::response`] and [`Chain::log`] run them.
    pub(crate) fn collect<'c>(
        &'c self,
        req: &PluginRequest<'_>,
        ctx: &mut Ctx<'c>,
        protocol: Protocol,
    ) {
        let bit = protocol as u8;
        for step in &self.steps {
            if let Some(instance) = self.resolve(step, None) {
                if instance.protocols & bit != 0 {
                    instance.handler.without_access(req, ctx);
                    ctx.collected.push(instance);
                }
            }
        }
        self.record(req, ctx);
    }

    /// Kong's `rewrite` (global plugins) and `access` phases. `Some` is the
    /// answer a plugin made; [`Chain::response`] has not run on it yet.
    pub(crate) async fn access<'c>(
        &'c self,
        req: &mut PluginRequest<'_>,
        ctx: &mut Ctx<'c>,
        protocol: Protocol,
    ) -> Option<Response<ResponseBody>> {
        let bit = protocol as u8;
        if self.has_global {
            for step in &self.steps {
                let Some(instance) = self.resolve(step, None) else {
                    continue;
                };
                if instance.global && instance.protocols & bit != 0 {
                    if let Some(mut response) =
                        settle(instance.handler.rewrite(req, ctx), req, ctx).await
                    {
                        finish_error(&mut response, req);
                        return Some(response);
                    }
                }
            }
        }
        let mut exit = None;
        for step in &self.steps {
            let consumer = ctx.consumer.as_ref().map(|c| &*c.id);
            let Some(instance) = self.resolve(step, consumer) else {
                continue;
            };
            if instance.protocols & bit == 0 {
                continue;
            }
            ctx.collected.push(instance);
            // After an answer, Kong still collects the plugins that follow
            // (their header_filter and log phases run on the answer), but
            // runs no more access handlers.
            if exit.is_none() {
                match instance.handler.access(req, ctx) {
                    Flow::Continue => {}
                    Flow::Exit(response) => exit = Some(response),
                    waiting @ Flow::Wait(_) => exit = settle(waiting, req, ctx).await,
                }
            }
        }
        self.record(req, ctx);
        exit.map(|mut response| {
            finish_error(&mut response, req);
            response
        })
    }

    fn record(&self, req: &PluginRequest<'_>, ctx: &mut Ctx<'_>) {
        if self.needs.log {
            ctx.log = Some(Box::new(log::Record::new(req, ctx.started)));
        }
    }

    /// Kong's `log` phase for the plugins that ran `access`.
    pub(crate) fn log(&self, ctx: &mut Ctx<'_>, facts: &log::Facts<'_>) {
        if let Some(deferred) = self.defer_log(ctx, facts) {
            deferred.run();
        }
    }

    /// The log phase, to run once the response body has gone (see
    /// [`DeferredLog::finish`]); `facts` are those known at the head.
    pub(crate) fn defer_log(
        &self,
        ctx: &mut Ctx<'_>,
        facts: &log::Facts<'_>,
    ) -> Option<DeferredLog> {
        let record = ctx.log.take()?;
        let entry = record.entry(ctx, self.entities.as_deref(), facts);
        Some(DeferredLog {
            entry,
            instances: ctx.collected.iter().map(|i| Arc::clone(i)).collect(),
        })
    }

    /// Kong's `header_filter` for the plugins that ran `access`.
    pub(crate) fn response(&self, ctx: &mut Ctx<'_>, status: StatusCode, headers: &mut HeaderMap) {
        for (name, value) in ctx.response_headers.fields() {
            if let (Ok(name), Ok(value)) =
                (HeaderName::from_bytes(name), HeaderValue::from_bytes(value))
            {
                headers.insert(name, value);
            }
        }
        ctx.response_headers.clear();
        let collected = std::mem::take(&mut ctx.collected);
        for instance in &collected {
            instance.handler.response(ctx, status, headers);
        }
        ctx.collected = collected;
        if let Some(record) = ctx.log.as_mut() {
            record.response(status, headers);
        }
    }

    /// Kong's `body_filter` for the plugins that ran `access`.
    pub(crate) fn response_body(
        &self,
        ctx: &mut Ctx<'_>,
        status: StatusCode,
        headers: &mut HeaderMap,
        body: &mut Bytes,
    ) {
        let collected = std::mem::take(&mut ctx.collected);
        for instance in &collected {
            instance.handler.response_body(ctx, status, headers, body);
        }
        ctx.collected = collected;
    }
}

/// Runs a plugin's flow to its end: waits as long as it waits.
async fn settle(
    mut flow: Flow,
    req: &mut PluginRequest<'_>,
    ctx: &mut Ctx<'_>,
) -> Option<Response<ResponseBody>> {
    loop {
        match flow {
            Flow::Continue => return None,
            Flow::Exit(response) => return Some(response),
            Flow::Wait(pending) => {
                let resume = pending.await;
                flow = resume(req, ctx);
            }
        }
    }
}

/// State that outlives a runtime: counters and caches keep counting when
/// the configuration changes.
#[derive(Default)]
pub(crate) struct Shared {
    pub(crate) rate_limits: traffic::Counters,
    /// Redis connections by server, kept across configurations.
    pub(crate) redis: traffic::RedisPool,
    /// What the prometheus plugin counts.
    pub(crate) metrics: metrics::Metrics,
    pub(crate) cache: transform::Store,
}

/// Every plugin of one config version.
pub(crate) struct Plugins {
    pub(crate) consumers: Consumers,
    /// By the router's `route_idx`.
    chains: Vec<Option<Chain>>,
    /// The global plugins, for requests no route matched.
    global: Option<Chain>,
}

impl Plugins {
    pub(crate) fn chain(&self, route_idx: usize) -> Option<&Chain> {
        self.chains.get(route_idx).and_then(Option::as_ref)
    }

    /// Kong runs the global plugins' header_filter and log phases on the
    /// 404 of a request no route matched.
    pub(crate) fn global(&self) -> Option<&Chain> {
        self.global.as_ref()
    }
}

/// A log entry waiting for its response body to be sent.
pub(crate) struct DeferredLog {
    entry: serde_json::Value,
    instances: SmallVec<[Arc<Instance>; 8]>,
}

impl DeferredLog {
    /// The body is done: `size` bytes went, `total` after the request came.
    pub(crate) fn finish(mut self, size: u64, total: std::time::Duration) {
        self.entry["response"]["size"] = size.into();
        self.entry["latencies"]["request"] = (total.as_millis() as u64).into();
        self.run();
    }

    fn run(self) {
        for instance in &self.instances {
            instance.handler.log(&self.entry);
        }
    }
}

/// Why a plugin configuration cannot run.
#[derive(Debug, thiserror::Error)]
#[error("plugin {name} ({id}) has an invalid configuration: {message}")]
pub struct PluginError {
    pub name: String,
    pub id: String,
    pub message: String,
}

/// What a handler constructor gets besides its configuration.
pub(crate) struct BuildContext<'b> {
    pub(crate) shared: &'b Arc<Shared>,
    pub(crate) consumers: &'b Consumers,
    pub(crate) plugin_id: &'b str,
    /// The route and service the configuration is attached to.
    pub(crate) route_id: Option<&'b str>,
    pub(crate) service_id: Option<&'b str>,
}

fn handler(
    name: &str,
    config: &serde_json::Value,
    cx: &BuildContext<'_>,
) -> Option<Result<Box<dyn Plugin>, String>> {
    fn boxed<P: Plugin + 'static>(result: Result<P, String>) -> Result<Box<dyn Plugin>, String> {
        result.map(|p| Box::new(p) as Box<dyn Plugin>)
    }
    Some(match name {
        "key-auth" => boxed(auth::KeyAuth::new(config, cx)),
        "basic-auth" => boxed(auth::BasicAuth::new(config, cx)),
        "acl" => boxed(auth::Acl::new(config, cx)),
        "jwt" => boxed(auth::Jwt::new(config, cx)),
        "hmac-auth" => boxed(auth::HmacAuth::new(config, cx)),
        "request-termination" => boxed(traffic::RequestTermination::new(config, cx)),
        "http-log" => boxed(logging::HttpLog::plugin(config, cx)),
        "prometheus" => boxed(metrics::Prometheus::new(config, cx)),
        "file-log" => boxed(logging::FileLog::plugin(config, cx)),
        "tcp-log" => boxed(logging::TcpLog::plugin(config, cx)),
        "udp-log" => boxed(logging::UdpLog::plugin(config, cx)),
        "rate-limiting" => boxed(traffic::RateLimiting::new(config, cx)),
        "request-size-limiting" => boxed(traffic::RequestSizeLimiting::new(config, cx)),
        "ip-restriction" => boxed(traffic::IpRestriction::new(config, cx)),
        "cors" => boxed(traffic::Cors::new(config, cx)),
        "bot-detection" => boxed(traffic::BotDetection::new(config, cx)),
        "opentelemetry" => boxed(otel::OpenTelemetry::new(config, cx)),
        "request-transformer" => boxed(transform::RequestTransformer::new(config, cx)),
        "response-transformer" => boxed(transform::ResponseTransformer::new(config, cx)),
        "correlation-id" => boxed(transform::CorrelationId::new(config, cx)),
        "proxy-cache" => boxed(transform::ProxyCache::new(config, cx)),
        _ => return None,
    })
}

/// Plugins this data plane does not run whose absence would let through
/// what they exist to stop, or change what a request does: requests
/// they apply to are refused (500) rather than served without them.
/// Other missing plugins (metrics and log sinks) are skipped with a
/// warning.
const FAIL_CLOSED: [&str; 8] = [
    "oauth2",
    "session",
    "pre-function",
    "post-function",
    "redirect",
    "response-ratelimiting",
    "grpc-gateway",
    "grpc-web",
];

/// Stands in for a [`FAIL_CLOSED`] plugin: refuses every request.
struct Unavailable;

impl Plugin for Unavailable {
    fn filters_response(&self) -> bool {
        false
    }

    fn access(&self, _req: &mut PluginRequest<'_>, _ctx: &mut Ctx<'_>) -> Flow {
        Flow::Exit(error_message(
            StatusCode::INTERNAL_SERVER_ERROR,
            "An unexpected error occurred",
        ))
    }
}

/// A typed configuration from a plugin's `config` document.
pub(crate) fn typed<T: serde::de::DeserializeOwned>(
    config: &serde_json::Value,
) -> Result<T, String> {
    T::deserialize(config).map_err(|e| e.to_string())
}

/// Builds the plugins of a snapshot: `routes` gives each router index's
/// route and service ids. `None` when no enabled plugin applies anywhere.
/// What a chain is built for: a route, its service, and their documents
/// (which log plugins report).
pub(crate) struct RouteInfo<'a> {
    pub(crate) id: &'a str,
    pub(crate) service_id: Option<&'a str>,
    pub(crate) doc: &'a str,
    pub(crate) service_doc: Option<&'a str>,
}

pub(crate) fn build(
    snapshot: &ConfigSnapshot,
    routes: &[RouteInfo<'_>],
    shared: &Arc<Shared>,
) -> Result<Option<Plugins>, PluginError> {
    let entities: Vec<PluginEntity> = snapshot.typed("plugins").map_err(|e| PluginError {
        name: "plugins".into(),
        id: String::new(),
        message: e.to_string(),
    })?;
    if !entities.iter().any(|p| p.enabled) {
        return Ok(None);
    }
    let consumers = Consumers::build(snapshot).map_err(|message| PluginError {
        name: "consumers".into(),
        id: String::new(),
        message,
    })?;
    let mut by_name: BTreeMap<String, Combos<Arc<Instance>>> = BTreeMap::new();
    for entity in entities.iter().filter(|p| p.enabled) {
        let cx = BuildContext {
            shared,
            consumers: &consumers,
            plugin_id: &entity.id,
            route_id: entity.route.as_ref().map(|r| r.id.as_str()),
            service_id: entity.service.as_ref().map(|r| r.id.as_str()),
        };
        let handler = match handler(&entity.name, &entity.config, &cx) {
            None if FAIL_CLOSED.contains(&entity.name.as_str()) => {
                tracing::error!(
                    plugin = %entity.name,
                    id = %entity.id,
                    "This data plane does not run this plugin yet; requests it applies to get 500."
                );
                Box::new(Unavailable) as Box<dyn Plugin>
            }
            None => {
                tracing::warn!(
                    plugin = %entity.name,
                    id = %entity.id,
                    "This data plane does not run this plugin yet; it is ignored."
                );
                continue;
            }
            Some(Err(message)) => {
                return Err(PluginError {
                    name: entity.name.clone(),
                    id: entity.id.clone(),
                    message,
                })
            }
            Some(Ok(handler)) => handler,
        };
        let scope = Scope {
            route: entity.route.as_ref().map(|r| r.id.as_str().into()),
            service: entity.service.as_ref().map(|s| s.id.as_str().into()),
            consumer: entity.consumer.as_ref().map(|c| c.id.as_str().into()),
        };
        let global = scope == Scope::default();
        let instance = Instance {
            protocols: protocol_bits(&entity.protocols),
            global,
            handler,
        };
        by_name
            .entry(entity.name.clone())
            .or_default()
            .insert(scope, Arc::new(instance));
    }
    // Kong sorts by priority, highest first; equal priorities by name.
    let mut ordered: Vec<(i32, String, Arc<PluginCombos>)> = by_name
        .into_iter()
        .map(|(name, combos)| {
            let priority = gatehouse_model::plugins::priority(&name).unwrap_or(0);
            (priority, name, Arc::new(combos))
        })
        .collect();
    ordered.sort_by(|a, b| b.0.cmp(&a.0).then(a.1.cmp(&b.1)));

    let chains = routes
        .iter()
        .map(|info| {
            let (route_id, service_id) = (info.id, info.service_id);
            let mut steps = Vec::new();
            let mut needs = Needs::default();
            let mut has_global = false;
            let mut filters_response = false;
            for (_, _, combos) in &ordered {
                let step = if combos.consumer_scoped() {
                    // Any consumer could bring a configuration; whether one
                    // can apply to this route at all is left to the lookup.
                    Step::ByConsumer(Arc::clone(combos))
                } else {
                    match combos.lookup(Some(route_id), service_id, None) {
                        Some(instance) => Step::Fixed(Arc::clone(instance)),
                        None => continue,
                    }
                };
                let mut visit = |instance: &Instance| {
                    let n = instance.handler.needs();
                    needs.request_body |= n.request_body;
                    needs.response_body |= n.response_body;
                    needs.log |= n.log;
                    needs.uri_captures |= n.uri_captures;
                    needs.entities |= n.entities;
                    needs.unsized_request_body |= n.unsized_request_body;
                    has_global |= instance.global;
                    filters_response |= n.log || instance.handler.filters_response();
                };
                match &step {
                    Step::Fixed(instance) => visit(instance),
                    Step::ByConsumer(combos) => combos.for_each(|i| visit(i)),
                }
                steps.push(step);
            }
            // As the router compiles them: `~regex` matches at the start.
            let path_regexes = if needs.uri_captures {
                serde_json::from_str::<serde_json::Value>(info.doc)
                    .ok()
                    .and_then(|doc| doc.get("paths").and_then(|p| p.as_array()).cloned())
                    .unwrap_or_default()
                    .iter()
                    .map(|path| {
                        path.as_str()
                            .and_then(|p| p.strip_prefix('~'))
                            .and_then(|regex| regex::Regex::new(&format!("^{regex}")).ok())
                    })
                    .collect()
            } else {
                Vec::new()
            };
            (!steps.is_empty()).then(|| Chain {
                path_regexes,
                route_id: route_id.into(),
                service_id: service_id.map(Into::into),
                entities: (needs.log || needs.entities).then(|| {
                    let parse = |doc: &str| serde_json::from_str(doc).unwrap_or_default();
                    Arc::new(log::Entities {
                        route: parse(info.doc),
                        service: info.service_doc.map(parse).unwrap_or_default(),
                    })
                }),
                steps,
                needs,
                has_global,
                filters_response,
            })
        })
        .collect();
    let global = global_chain(&ordered);
    Ok(Some(Plugins {
        consumers,
        chains,
        global,
    }))
}

/// The global configurations alone, in priority order.
fn global_chain(ordered: &[(i32, String, Arc<PluginCombos>)]) -> Option<Chain> {
    let mut needs = Needs::default();
    let mut filters_response = false;
    let steps: Vec<Step> = ordered
        .iter()
        .filter_map(|(_, _, combos)| combos.lookup(None, None, None))
        .map(|instance| {
            let n = instance.handler.needs();
            needs.log |= n.log;
            needs.response_body |= n.response_body;
            filters_response |= n.log || instance.handler.filters_response();
            Step::Fixed(Arc::clone(instance))
        })
        .collect();
    (!steps.is_empty()).then(|| Chain {
        path_regexes: Vec::new(),
        route_id: "".into(),
        service_id: None,
        entities: None,
        steps,
        needs,
        has_global: true,
        filters_response,
    })
}

/// An answer made by Kong's `kong.response.error`: its body is written
/// when the plugin chain hands it back ([`finish_error`]), in the format
/// the client accepts, with the request's id.
#[derive(Clone)]
struct KongError(Box<str>);

/// Kong's `kong.response.error(status, message)`.
pub(crate) fn error_message(status: StatusCode, message: &str) -> Response<ResponseBody> {
    let mut response = exit_raw(status, "application/json; charset=utf-8", Bytes::new());
    response.extensions_mut().insert(KongError(message.into()));
    response
}

/// The formats of Kong's error templates (`kong/tools/http.lua`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum ErrorFormat {
    Json,
    Html,
    Plain,
    Xml,
}

impl ErrorFormat {
    /// `get_response_type`: of the `Accept` values, the first with the
    /// highest quality; media types Kong has no template for give JSON.
    pub(crate) fn negotiate(accept: Option<&[u8]>) -> ErrorFormat {
        let Some(accept) = accept.and_then(|a| std::str::from_utf8(a).ok()) else {
            return ErrorFormat::Json;
        };
        let mut best = (0.0f64, ErrorFormat::Json);
        for value in accept.split(',') {
            let mut parts = value.split(';');
            let media = parts.next().unwrap_or("").trim().to_ascii_lowercase();
            let Some((kind, sub)) = media.split_once('/') else {
                continue;
            };
            if kind.is_empty() || sub.is_empty() {
                continue;
            }
            let q = parts
                .filter_map(|p| p.trim().strip_prefix("q="))
                .find_map(|q| q.trim().parse::<f64>().ok())
                .unwrap_or(1.0);
            if q > best.0 {
                let format = match (kind, sub) {
                    ("text", "html") => ErrorFormat::Html,
                    ("text", "plain") | ("text", "*") => ErrorFormat::Plain,
                    ("application", "xml") => ErrorFormat::Xml,
                    _ => ErrorFormat::Json,
                };
                best = (q, format);
            }
        }
        best.1
    }

    pub(crate) fn content_type(self) -> &'static str {
        match self {
            ErrorFormat::Json => "application/json; charset=utf-8",
            ErrorFormat::Html => "text/html; charset=utf-8",
            ErrorFormat::Plain => "text/plain; charset=utf-8",
            ErrorFormat::Xml => "application/xml; charset=utf-8",
        }
    }

    /// Kong's template, filled as `string.format` fills it: the message
    /// goes in as it is.
    pub(crate) fn body(self, message: &str, request_id: &str) -> String {
        match self {
            ErrorFormat::Json => {
                format!("{{\n  \"message\":\"{message}\",\n  \"request_id\":\"{request_id}\"\n}}")
            }
            ErrorFormat::Plain => format!("{message}\nrequest_id: {request_id}\n"),
            ErrorFormat::Html => format!(
                "<!doctype html>\n<html>\n  <head>\n    <meta charset=\"utf-8\">\n    <title>Error</title>\n  </head>\n  <body>\n    <h1>Error</h1>\n    <p>{message}.</p>\n    <p>request_id: {request_id}</p>\n  </body>\n</html>\n"
            ),
            ErrorFormat::Xml => format!(
                "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<error>\n  <message>{message}</message>\n  <requestid>{request_id}</requestid>\n</error>\n"
            ),
        }
    }
}

/// A request id as nginx's `$request_id` makes it: 32 hex digits.
pub(crate) fn new_request_id() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

/// Writes the body of an answer made by [`error_message`], for the
/// request that gets it.
pub(crate) fn finish_error(response: &mut Response<ResponseBody>, req: &PluginRequest<'_>) {
    let Some(KongError(message)) = response.extensions_mut().remove::<KongError>() else {
        return;
    };
    let format = ErrorFormat::negotiate(req.headers.get("accept"));
    let body = format.body(&message, &new_request_id());
    *response.body_mut() = Either::Right(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
}

/// The JSON answer Kong's `kong.response.exit(status, {message = …})`
/// makes.
pub(crate) fn exit_message(status: StatusCode, message: &str) -> Response<ResponseBody> {
    let body = serde_json::json!({ "message": message }).to_string();
    exit_raw(status, "application/json; charset=utf-8", Bytes::from(body))
}

/// An answer with the given body and content type.
pub(crate) fn exit_raw(
    status: StatusCode,
    content_type: &str,
    body: Bytes,
) -> Response<ResponseBody> {
    let mut response = Response::new(Either::Right(Full::new(body)));
    *response.status_mut() = status;
    if let Ok(value) = HeaderValue::from_str(content_type) {
        response.headers_mut().insert(CONTENT_TYPE, value);
    }
    // kong.response.exit adds the server token (`headers = server_tokens`).
    response
        .headers_mut()
        .insert(http::header::SERVER, crate::proxy::SERVER);
    response
}

/// Kong's `X-Consumer-*`, `X-Credential-Identifier` and
/// `X-Anonymous-Consumer` headers (`set_consumer` in each auth plugin's
/// handler), and the request's authenticated consumer.
pub(crate) fn set_consumer(
    req: &mut PluginRequest<'_>,
    ctx: &mut Ctx<'_>,
    consumer: Option<Arc<Consumer>>,
    credential: Option<Credential>,
) {
    const ID: HeaderName = HeaderName::from_static("x-consumer-id");
    const CUSTOM_ID: HeaderName = HeaderName::from_static("x-consumer-custom-id");
    const USERNAME: HeaderName = HeaderName::from_static("x-consumer-username");
    const CREDENTIAL: HeaderName = HeaderName::from_static("x-credential-identifier");
    const ANONYMOUS: HeaderName = HeaderName::from_static("x-anonymous-consumer");
    let headers = &mut req.headers;
    let mut set = |name: HeaderName, value: Option<HeaderValue>| match value {
        Some(value) => {
            headers.insert(name, value);
        }
        None => headers.remove(name),
    };
    set(ID, consumer.as_ref().map(|c| c.id_value.clone()));
    set(
        CUSTOM_ID,
        consumer.as_ref().and_then(|c| c.custom_id_value.clone()),
    );
    set(
        USERNAME,
        consumer.as_ref().and_then(|c| c.username_value.clone()),
    );
    set(CREDENTIAL, credential.as_ref().map(|c| c.id.clone()));
    set(
        ANONYMOUS,
        credential
            .is_none()
            .then(|| HeaderValue::from_static("true")),
    );
    ctx.consumer = consumer;
    ctx.credential = credential;
}
