//! The proxy: a hyper server (HTTP/1.1 with keep-alive, h2 over TLS by
//! ALPN, and h2c) that routes each request with the runtime it loaded when
//! it started, rewrites it as Kong does, and streams it to the upstream
//! through a pooled client, then streams the response back. Responses the
//! gateway produces itself carry Kong's JSON bodies.

use std::borrow::Cow;
use std::convert::Infallible;
use std::error::Error as StdError;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use gatehouse_router::{normalize_path, push_upstream_path, request_host, RequestView, RouteMatch};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{self, Authority, PathAndQuery, Scheme, Uri};
use http::{Request, Response, StatusCode, Version};
use http_body_util::{BodyExt, Either, Full, LengthLimitError, Limited};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_rustls::TlsAcceptor;

use crate::balancer::{Failure, HashInput, Peer, PeerError, Tracked};
use crate::downstream::{Activity, DownstreamIo, Limits, TrackedBody};
use crate::h1::{Ended, Engine, Prefixed};
use crate::plugins::{log as plugin_log, Chain, Ctx, PluginRequest, Protocol, RequestHeaders};
use crate::runtime::{HttpUpstream, RouteTarget, Runtime, ServiceTarget, Upstream};
use crate::tls::TlsError;
use crate::{DataPlane, ProxyConfig};

/// Serves the proxy on `listener` until `shutdown` changes or its sender is
/// dropped, then stops accepting, asks every connection to finish its
/// in-flight requests (HTTP/1 closes idle keep-alive connections, HTTP/2
/// sends GOAWAY) and waits at most `grace` for them before closing the rest.
///
/// Cancel safety: dropping the future closes the listener and aborts every
/// connection at once, without draining.
pub async fn serve(
    listener: TcpListener,
    dp: Arc<DataPlane>,
    shutdown: watch::Receiver<()>,
    grace: Duration,
) {
    serve_listener(listener, dp, shutdown, grace, None).await;
}

/// [`serve`] for a listener flagged `ssl`: each connection starts with a TLS
/// handshake (bounded by the header timeout) whose certificate is chosen by
/// SNI from the runtime in use, then speaks h2 or HTTP/1.1 as ALPN decided.
///
/// Cancel safety: as [`serve`].
pub async fn serve_tls(
    listener: TcpListener,
    dp: Arc<DataPlane>,
    shutdown: watch::Receiver<()>,
    grace: Duration,
) {
    let config = match crate::tls::server_config(&dp) {
        Ok(config) => config,
        Err(error) => {
            tracing::error!(error = %ErrorChain(&error), "Cannot build the TLS server configuration; this listener does not serve.");
            return;
        }
    };
    serve_listener(
        listener,
        dp,
        shutdown,
        grace,
        Some(TlsAcceptor::from(config)),
    )
    .await;
}

async fn serve_listener(
    listener: TcpListener,
    dp: Arc<DataPlane>,
    mut shutdown: watch::Receiver<()>,
    grace: Duration,
    tls: Option<TlsAcceptor>,
) {
    let local_port = listener.local_addr().map_or(0, |addr| addr.port());
    // nginx's `$server_addr`: the listener's address, or the connection's
    // own when the listener takes any.
    let listen_ip = listener.local_addr().ok().map(|addr| addr.ip());
    let builder = Arc::new(http_builder(&dp.cfg));
    let limits = Limits {
        header_timeout: dp.cfg.header_read_timeout,
        keepalive_timeout: dp.cfg.keepalive_timeout,
        max_line: dp.cfg.max_header_line_bytes,
        max_head: dp.cfg.max_header_bytes,
    };
    let graceful = GracefulShutdown::new();
    // Connections on the HTTP/1.1 engine drain on this; hyper's on
    // `graceful`.
    let (drain, draining) = watch::channel(false);
    let mut connections = JoinSet::new();

    loop {
        tokio::select! {
            _ = shutdown.changed() => break,
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
            accepted = accept(&listener, &dp.connections) => {
                let (permit, stream, remote) = match accepted {
                    Ok(accepted) => accepted,
                    Err(error) => {
                        // Out of file descriptors and the like: back off
                        // instead of spinning on a listener that stays ready.
                        tracing::warn!(%error, "Failed to accept a proxy connection.");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                if let Err(error) = stream.set_nodelay(true) {
                    tracing::trace!(%error, "Failed to set TCP_NODELAY.");
                }
                let local_ip = match listen_ip {
                    Some(ip) if !ip.is_unspecified() => ip,
                    _ => stream.local_addr().map_or(listen_ip.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into()), |a| a.ip()),
                };
                let connection = Connection {
                    dp: Arc::clone(&dp),
                    builder: Arc::clone(&builder),
                    watcher: graceful.watcher(),
                    drain: draining.clone(),
                    limits,
                    remote,
                    local_ip,
                    local_port,
                    _permit: permit,
                };
                match &tls {
                    None => connections.spawn(connection.serve(stream, None)),
                    Some(acceptor) => connections.spawn(connection.serve_tls(acceptor.clone(), stream)),
                };
            }
        }
    }

    drop(listener);
    let open = connections.len();
    tracing::info!(open, "Proxy stopped accepting; draining connections.");
    let _ = drain.send(true);
    let drained = async {
        graceful.shutdown().await;
        while connections.join_next().await.is_some() {}
    };
    tokio::select! {
        () = drained => tracing::info!("Proxy connections drained."),
        () = tokio::time::sleep(grace) => {
            tracing::warn!(open = connections.len(), "Grace period over; closing the remaining proxy connections.");
        }
    }
    connections.shutdown().await;
}

fn http_builder(cfg: &ProxyConfig) -> auto::Builder<TokioExecutor> {
    /// hyper's default read buffer limit, which also bounds a request head.
    const HYPER_MAX_BUF: usize = 8192 + 4096 * 100;
    let mut builder = auto::Builder::new(TokioExecutor::new());
    let mut http1 = builder.http1();
    // DownstreamIo enforces the header timeout with Kong's 408; hyper's
    // would close silently, and would also cut idle keep-alive connections
    // at the header timeout instead of the keep-alive one.
    http1.timer(TokioTimer::new()).header_read_timeout(None);
    if cfg.max_header_bytes + 8192 > HYPER_MAX_BUF {
        http1.max_buf_size(cfg.max_header_bytes + 8192);
    }
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(cfg.max_header_bytes).unwrap_or(u32::MAX));
    builder
}

/// Waits for a connection slot, then for a connection. Cancel safe: both
/// waits are, and a slot taken before a cancelled accept goes back.
async fn accept(
    listener: &TcpListener,
    slots: &Arc<Semaphore>,
) -> io::Result<(OwnedSemaphorePermit, TcpStream, SocketAddr)> {
    let permit = Arc::clone(slots)
        .acquire_owned()
        .await
        .map_err(|_closed| io::Error::other("the connection budget was closed"))?;
    let (stream, remote) = listener.accept().await?;
    Ok((permit, stream, remote))
}

/// One accepted connection, with everything its task needs.
struct Connection {
    dp: Arc<DataPlane>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    watcher: Watcher,
    drain: watch::Receiver<bool>,
    limits: Limits,
    remote: SocketAddr,
    local_ip: std::net::IpAddr,
    local_port: u16,
    /// Held until the connection closes.
    _permit: OwnedSemaphorePermit,
}

/// What the TLS handshake decided.
struct TlsSession {
    sni: Option<Box<str>>,
    h2: bool,
}

impl Connection {
    async fn serve_tls(self, acceptor: TlsAcceptor, stream: TcpStream) {
        let handshake =
            tokio::time::timeout(self.limits.header_timeout, acceptor.accept(stream)).await;
        let stream = match handshake {
            Ok(Ok(stream)) => stream,
            Ok(Err(error)) => {
                tracing::trace!(%error, remote = %self.remote, "TLS handshake failed.");
                return;
            }
            Err(_elapsed) => {
                tracing::trace!(remote = %self.remote, "TLS handshake timed out.");
                return;
            }
        };
        let (_, session) = stream.get_ref();
        let session = TlsSession {
            sni: session.server_name().map(Box::from),
            h2: session.alpn_protocol() == Some(b"h2".as_slice()),
        };
        self.serve(stream, Some(session)).await;
    }

    async fn serve<S>(self, stream: S, tls: Option<TlsSession>)
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let activity = Arc::new(Activity::default());
        let h2 = tls.as_ref().is_some_and(|session| session.h2);
        let downstream = Arc::new(Downstream::new(
            self.remote,
            self.local_ip,
            self.local_port,
            tls,
            Arc::clone(&activity),
        ));
        // HTTP/1.1 starts on the engine; hyper takes what it leaves.
        let (stream, buffered) = if h2 {
            (stream, Bytes::new())
        } else {
            let engine = Engine {
                dp: &self.dp,
                downstream: &downstream,
                limits: self.limits,
                drain: self.drain.clone(),
            };
            match engine.serve(stream).await {
                Ended::Closed => return,
                Ended::HandOff { io, buffered } => (io, buffered.freeze()),
            }
        };
        let io = DownstreamIo::new(Prefixed::new(buffered, stream), self.limits, activity, h2);
        let dp = self.dp;
        let service = service_fn(move |request| {
            let dp = Arc::clone(&dp);
            let downstream = Arc::clone(&downstream);
            let in_flight = downstream.activity.start();
            async move {
                let response = handle(&dp, &downstream, request).await;
                Ok::<_, Infallible>(response.map(|body| TrackedBody::new(body, in_flight)))
            }
        });
        // With upgrades, a 101 from the upstream hands the client
        // connection to a tunnel (WebSocket).
        let connection = self
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service)
            .into_owned();
        if let Err(error) = self.watcher.watch(connection).await {
            tracing::trace!(error = %error, "Proxy connection ended with an error.");
        }
    }
}

pub(crate) type ResponseBody = Either<Tracked<Incoming>, Full<Bytes>>;

/// Per-connection facts, turned into header values once per connection.
pub(crate) struct Downstream {
    pub(crate) remote: SocketAddr,
    /// `X-Real-IP`, and the last hop of `X-Forwarded-For`.
    pub(crate) client_ip: HeaderValue,
    /// The port the proxy listens on (`X-Forwarded-Port`, `host:port` routes).
    pub(crate) local_port: u16,
    pub(crate) local_port_value: HeaderValue,
    /// The connection is TLS: `X-Forwarded-Proto: https`, and https-only
    /// routes are served rather than redirected.
    pub(crate) tls: bool,
    pub(crate) forwarded_proto: HeaderValue,
    /// The server name the client sent in its TLS handshake, which routes'
    /// `snis` match.
    pub(crate) sni: Option<Box<str>>,
    pub(crate) activity: Arc<Activity>,
    /// nginx's `$server_addr`, `$connection` and `$connection_requests`
    /// (correlation-id's tracker).
    pub(crate) local_ip: std::net::IpAddr,
    pub(crate) serial: u64,
    pub(crate) requests: std::sync::atomic::AtomicU64,
}

/// Connections accepted so far by this process.
static CONNECTIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

impl Downstream {
    fn new(
        remote: SocketAddr,
        local_ip: std::net::IpAddr,
        local_port: u16,
        tls: Option<TlsSession>,
        activity: Arc<Activity>,
    ) -> Downstream {
        let ip = remote.ip().to_canonical();
        Downstream {
            remote,
            // An IP address always renders as a valid header value.
            client_ip: HeaderValue::from_str(&ip.to_string())
                .unwrap_or(HeaderValue::from_static("unknown")),
            local_port,
            local_port_value: HeaderValue::from(local_port),
            forwarded_proto: if tls.is_some() { HTTPS } else { HTTP },
            tls: tls.is_some(),
            sni: tls.and_then(|session| session.sni),
            activity,
            local_ip,
            serial: CONNECTIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1,
            requests: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

/// Why the gateway answered instead of the upstream.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ProxyError {
    #[error("no route matched")]
    NoRoute,
    #[error("route {route_id} has no service")]
    NoService {
        route_id: Box<str>,
        route_idx: usize,
    },
    #[error("request body exceeds {limit} bytes")]
    BodyTooLarge { limit: u64 },
    #[error("service {service_id} uses protocol {protocol}, which is not supported yet")]
    UnsupportedProtocol {
        service_id: Box<str>,
        protocol: Box<str>,
    },
    #[error("service {service_id} has upstream TLS settings that do not load")]
    UpstreamTlsUnavailable {
        service_id: Box<str>,
        #[source]
        source: Arc<TlsError>,
    },
    #[error("service {service_id} has no peer to send the request to")]
    NoPeer {
        service_id: Box<str>,
        #[source]
        source: PeerError,
    },
    #[error("could not build the upstream request")]
    InvalidUpstreamRequest {
        #[source]
        source: http::Error,
    },
    #[error("upstream {upstream} timed out")]
    UpstreamTimeout { upstream: Authority },
    #[error("could not connect to upstream {upstream}")]
    UpstreamConnect {
        upstream: Authority,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("request to upstream {upstream} failed")]
    Upstream {
        upstream: Authority,
        #[source]
        source: hyper_util::client::legacy::Error,
    },
    #[error("could not connect to upstream {upstream}")]
    UpstreamConnectIo {
        upstream: Authority,
        #[source]
        source: io::Error,
    },
    #[error("request to upstream {upstream} failed")]
    UpstreamIo {
        upstream: Authority,
        #[source]
        source: io::Error,
    },
    #[error("the client stopped sending the request body")]
    ClientAborted,
}

/// Who caused a [`ProxyError`]; decides 4xx against 5xx.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Side {
    Downstream,
    Upstream,
    Internal,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Downstream => "downstream",
            Side::Upstream => "upstream",
            Side::Internal => "internal",
        }
    }
}

impl ProxyError {
    pub(crate) fn side(&self) -> Side {
        match self {
            ProxyError::NoRoute | ProxyError::BodyTooLarge { .. } | ProxyError::ClientAborted => {
                Side::Downstream
            }
            ProxyError::NoService { .. }
            | ProxyError::UnsupportedProtocol { .. }
            | ProxyError::UpstreamTlsUnavailable { .. }
            | ProxyError::InvalidUpstreamRequest { .. } => Side::Internal,
            ProxyError::NoPeer { .. }
            | ProxyError::UpstreamTimeout { .. }
            | ProxyError::UpstreamConnect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::UpstreamConnectIo { .. }
            | ProxyError::UpstreamIo { .. } => Side::Upstream,
        }
    }

    /// Kong's status and body for the error.
    /// What nginx's `$upstream_status` holds when the upstream failed, on
    /// either engine.
    pub(crate) fn upstream_status(&self) -> Option<u16> {
        match self {
            ProxyError::UpstreamTimeout { .. } => Some(504),
            ProxyError::UpstreamConnect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::UpstreamConnectIo { .. }
            | ProxyError::UpstreamIo { .. } => Some(502),
            _ => None,
        }
    }

    pub(crate) fn response(&self) -> Response<ResponseBody> {
        let (status, body) = match self {
            ProxyError::NoRoute => (StatusCode::NOT_FOUND, body::NO_ROUTE),
            ProxyError::NoService { .. } => (StatusCode::SERVICE_UNAVAILABLE, body::NO_SERVICE),
            ProxyError::NoPeer {
                source: PeerError::NoPeer { .. },
                ..
            } => (StatusCode::SERVICE_UNAVAILABLE, body::NO_PEER),
            ProxyError::NoPeer {
                source: PeerError::Dns(_),
                ..
            } => (StatusCode::SERVICE_UNAVAILABLE, body::NAME_RESOLUTION),
            ProxyError::BodyTooLarge { .. } => (StatusCode::PAYLOAD_TOO_LARGE, body::TOO_LARGE),
            ProxyError::InvalidUpstreamRequest { .. }
            | ProxyError::UpstreamTlsUnavailable { .. } => {
                (StatusCode::INTERNAL_SERVER_ERROR, body::INTERNAL)
            }
            ProxyError::UpstreamTimeout { .. } => {
                (StatusCode::GATEWAY_TIMEOUT, body::GATEWAY_TIMEOUT)
            }
            ProxyError::UnsupportedProtocol { .. }
            | ProxyError::UpstreamConnect { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::UpstreamConnectIo { .. }
            | ProxyError::UpstreamIo { .. } => (StatusCode::BAD_GATEWAY, body::BAD_GATEWAY),
            ProxyError::ClientAborted => (StatusCode::BAD_REQUEST, body::BAD_REQUEST),
        };
        gateway_response(status, body)
    }

    fn from_client(
        error: hyper_util::client::legacy::Error,
        upstream: &Authority,
        limit: Option<u64>,
    ) -> ProxyError {
        if let Some(limit) = limit.filter(|_| has_source::<LengthLimitError>(&error)) {
            return ProxyError::BodyTooLarge { limit };
        }
        let upstream = upstream.clone();
        let timed_out = source_chain(&error).any(|cause| {
            cause
                .downcast_ref::<io::Error>()
                .is_some_and(|io| io.kind() == io::ErrorKind::TimedOut)
        });
        if timed_out {
            ProxyError::UpstreamTimeout { upstream }
        } else if error.is_connect() {
            ProxyError::UpstreamConnect {
                upstream,
                source: error,
            }
        } else {
            // TODO(dp): tell a client that went away mid-body (downstream)
            // from an upstream that failed.
            ProxyError::Upstream {
                upstream,
                source: error,
            }
        }
    }
}

/// Kong's bodies for responses the gateway generates.
/// The messages of Kong's own error answers.
mod body {
    pub(super) const NO_ROUTE: &str = "no Route matched with those values";
    pub(super) const NO_SERVICE: &str = "no Service found with those values";
    pub(super) const NO_PEER: &str = "failure to get a peer from the ring-balancer";
    pub(super) const NAME_RESOLUTION: &str = "name resolution failed";
    pub(super) const TOO_LARGE: &str = "Request size limit exceeded";
    pub(super) const BAD_GATEWAY: &str =
        "An invalid response was received from the upstream server";
    pub(super) const GATEWAY_TIMEOUT: &str = "The upstream server is timing out";
    pub(super) const INTERNAL: &str = "An unexpected error occurred";
    pub(super) const BAD_REQUEST: &str = "Bad request";
    pub(super) const HTTPS_REQUIRED: &str = "Please use HTTPS protocol";
    pub(super) const HTTP2_REQUIRED: &str = "Please use HTTP2 protocol";
    pub(super) const NON_GRPC: &str = "Non-gRPC request matched gRPC route";
}

pub(crate) const SERVER: HeaderValue =
    HeaderValue::from_static(concat!("gatehouse/", env!("CARGO_PKG_VERSION")));
const JSON_UTF8: HeaderValue = HeaderValue::from_static("application/json; charset=utf-8");
/// Kong's `Via` names the protocol version of the hop it describes: the
/// client's on the upstream request, the upstream's (always 1.1 here) on the
/// response.
const VIA_HTTP_10: HeaderValue =
    HeaderValue::from_static(concat!("1.0 gatehouse/", env!("CARGO_PKG_VERSION")));
pub(crate) const VIA_HTTP_11: HeaderValue =
    HeaderValue::from_static(concat!("1.1 gatehouse/", env!("CARGO_PKG_VERSION")));
const VIA_HTTP_2: HeaderValue =
    HeaderValue::from_static(concat!("2 gatehouse/", env!("CARGO_PKG_VERSION")));
const HTTP: HeaderValue = HeaderValue::from_static("http");
const HTTPS: HeaderValue = HeaderValue::from_static("https");
const CLOSE: HeaderValue = HeaderValue::from_static("close");
const TRAILERS: HeaderValue = HeaderValue::from_static("trailers");
const APPLICATION_GRPC: HeaderValue = HeaderValue::from_static("application/grpc");
const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
const X_FORWARDED_PATH: HeaderName = HeaderName::from_static("x-forwarded-path");
const X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");
const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
const X_KONG_PROXY_LATENCY: HeaderName = HeaderName::from_static("x-kong-proxy-latency");
const X_KONG_UPSTREAM_LATENCY: HeaderName = HeaderName::from_static("x-kong-upstream-latency");
const X_KONG_RESPONSE_LATENCY: HeaderName = HeaderName::from_static("x-kong-response-latency");

/// RFC 9110 §7.6.1 connection-specific headers, plus the non-standard
/// `Keep-Alive` and `Proxy-Connection`, and the `Proxy-*` credentials meant
/// for this hop.
pub(crate) const HOP_BY_HOP: [HeaderName; 9] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// What the access log reports about a request.
#[derive(Default)]
pub(crate) struct Facts<'r> {
    pub(crate) route: Option<&'r RouteTarget>,
    pub(crate) service: Option<&'r ServiceTarget>,
    /// The address the request went to.
    pub(crate) peer: Option<Authority>,
    /// From the start of the request to sending it upstream.
    pub(crate) proxy_latency: Option<Duration>,
    /// From sending the request upstream to its response head.
    pub(crate) upstream_latency: Option<Duration>,
}

/// Kong's latency headers: proxy and upstream latency for a proxied
/// request, response latency for an answer the gateway made.
pub(crate) fn latency_headers(
    facts: &Facts<'_>,
    started: Instant,
) -> impl Iterator<Item = (HeaderName, HeaderValue)> {
    let (first, second) = match (facts.proxy_latency, facts.upstream_latency) {
        (Some(proxy), Some(upstream)) => (
            (X_KONG_PROXY_LATENCY, millis(proxy)),
            Some((X_KONG_UPSTREAM_LATENCY, millis(upstream))),
        ),
        _ => ((X_KONG_RESPONSE_LATENCY, millis(started.elapsed())), None),
    };
    std::iter::once(first).chain(second)
}

/// One line of the access log.
#[allow(clippy::too_many_arguments)]
pub(crate) fn log_access(
    downstream: &Downstream,
    runtime: &Runtime,
    method: &str,
    path: &str,
    status: StatusCode,
    facts: &Facts<'_>,
    started: Instant,
    error: Option<&ProxyError>,
) {
    let upstream = facts.service.and_then(|service| match &service.upstream {
        Upstream::Http(http) => Some(http.authority.as_str()),
        Upstream::Unsupported { .. } | Upstream::TlsUnavailable { .. } => None,
    });
    tracing::info!(
        target: "gatehouse::access",
        client_ip = %downstream.remote.ip(),
        method,
        sni = downstream.sni.as_deref(),
        path,
        status = status.as_u16(),
        config_version = runtime.version,
        route_id = facts.route.map(|route| &*route.id),
        service_id = facts.service.map(|service| &*service.id),
        upstream,
        peer = facts.peer.as_ref().map(Authority::as_str),
        latency_ms = started.elapsed().as_millis() as u64,
        upstream_latency_ms = facts.upstream_latency.map(|latency| latency.as_millis() as u64),
        fault = error.map(|error| error.side().as_str()),
        error = error.map(|error| tracing::field::display(ErrorChain(error))),
        "Request completed."
    );
}

async fn handle(
    dp: &DataPlane,
    downstream: &Downstream,
    request: Request<Incoming>,
) -> Response<ResponseBody> {
    let started = Instant::now();
    downstream
        .requests
        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let runtime = dp.runtime.load_full();
    // Cheap clones (reference counts): only taken when the log is on.
    let logged = dp
        .cfg
        .access_log
        .then(|| (request.method().clone(), request.uri().clone()));
    let version = request.version();
    let grpc_request = is_grpc(request.headers());
    // For the gateway's own error answers (a reference-count copy).
    let accept = request.headers().get(header::ACCEPT).cloned();
    let mut facts = Facts::default();
    let (mut response, error) =
        match forward(dp, &runtime, downstream, request, started, &mut facts).await {
            Ok(response) => (response, None),
            Err(Failed { error, answer }) => {
                (answer.unwrap_or_else(|| error.response()), Some(error))
            }
        };
    if grpc_request && (error.is_some() || is_gateway_json(&response)) {
        response = grpc_error(response);
    } else {
        negotiate_error(&mut response, accept.as_ref().map(HeaderValue::as_bytes));
    }
    if let Some(ProxyError::BodyTooLarge { .. }) = error {
        // The rest of the body is not read: close the connection, after
        // discarding what the client still sends so that it reads the 413
        // rather than a reset.
        downstream.activity.linger_on_close();
        if version < Version::HTTP_2 {
            response.headers_mut().insert(header::CONNECTION, CLOSE);
        }
    }

    if dp.cfg.latency_headers {
        let headers = response.headers_mut();
        for (name, value) in latency_headers(&facts, started) {
            headers.insert(name, value);
        }
    }

    if let Some((method, uri)) = logged {
        log_access(
            downstream,
            &runtime,
            method.as_str(),
            uri.path(),
            response.status(),
            &facts,
            started,
            error.as_ref(),
        );
    }
    response
}

/// The parts of a request head that routing and rewriting read, whichever
/// HTTP engine parsed it.
pub(crate) struct RequestHead<'a> {
    pub(crate) method: &'a http::Method,
    pub(crate) version: Version,
    /// The Host header, else the request target's authority (HTTP/2).
    pub(crate) raw_host: Option<&'a [u8]>,
    /// The path as sent, without the query; `/` when empty.
    pub(crate) raw_path: &'a str,
    pub(crate) query: Option<&'a str>,
    /// The path and query as sent, for redirects.
    pub(crate) target: &'a str,
    /// The request's headers; may be empty when neither the router nor
    /// any balancer reads headers (see [`Runtime::reads_headers`]).
    pub(crate) headers: &'a HeaderMap,
    pub(crate) content_length: Option<u64>,
}

/// A request routed to a service that can take it.
pub(crate) struct Routed<'r, 'h> {
    pub(crate) route: &'r RouteTarget,
    pub(crate) service: &'r ServiceTarget,
    pub(crate) upstream: &'r HttpUpstream,
    pub(crate) found: RouteMatch,
    /// The normalized path the router matched.
    pub(crate) path: Cow<'h, [u8]>,
    /// nginx's `$host`: lower case, without the port.
    pub(crate) host: Cow<'h, str>,
}

/// What routing decided: forward, or the gateway's own answer.
pub(crate) enum Decision<'r, 'h> {
    Forward(Routed<'r, 'h>),
    Answer(Response<ResponseBody>),
}

/// Routes a request and applies Kong's checks before anything is sent.
pub(crate) fn route_request<'r, 'h>(
    dp: &DataPlane,
    runtime: &'r Runtime,
    downstream: &Downstream,
    head: &RequestHead<'h>,
    facts: &mut Facts<'r>,
) -> Result<Decision<'r, 'h>, ProxyError> {
    // Kong routes by the Host header as sent; nginx's `$host` (lower case,
    // no port) goes into X-Forwarded-Host and redirects.
    let raw_host = head
        .raw_host
        .and_then(|host| std::str::from_utf8(host).ok())
        .unwrap_or("");
    let host = request_host(raw_host);
    let path = normalize_path(head.raw_path);
    let found = runtime
        .router
        .find(&RequestView {
            method: head.method,
            host: head.raw_host,
            port: downstream.local_port,
            path: &path,
            headers: head.headers,
            https: downstream.tls,
            sni: downstream.sni.as_deref(),
        })
        .ok_or(ProxyError::NoRoute)?;
    let route = &runtime.routes[found.route_idx];
    facts.route = Some(route);
    if let Some(status) = route.https_only.filter(|_| !downstream.tls) {
        return Ok(Decision::Answer(https_required(status, &host, head.target)));
    }
    if let Some(grpc) = route.grpc {
        // Kong's checks for gRPC routes (`kong/runloop/handler.lua`).
        if !is_grpc(head.headers) {
            return Ok(Decision::Answer(gateway_response(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                body::NON_GRPC,
            )));
        }
        if head.version != Version::HTTP_2 {
            let mut response = gateway_response(StatusCode::UPGRADE_REQUIRED, body::HTTP2_REQUIRED);
            let headers = response.headers_mut();
            headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
            headers.insert(header::UPGRADE, HeaderValue::from_static("HTTP/2"));
            return Ok(Decision::Answer(response));
        }
        if !grpc.plaintext && !downstream.tls {
            return Ok(Decision::Answer(grpc_response(
                StatusCode::OK,
                1,
                "gRPC request matched gRPCs route",
            )));
        }
    }
    let service = route
        .service
        .as_deref()
        .ok_or_else(|| ProxyError::NoService {
            route_id: route.id.clone(),
            route_idx: found.route_idx,
        })?;
    facts.service = Some(service);
    let upstream = match &service.upstream {
        Upstream::Http(upstream) => upstream,
        Upstream::Unsupported { protocol } => {
            return Err(ProxyError::UnsupportedProtocol {
                service_id: service.id.clone(),
                protocol: protocol.clone(),
            })
        }
        Upstream::TlsUnavailable { error } => {
            return Err(ProxyError::UpstreamTlsUnavailable {
                service_id: service.id.clone(),
                source: Arc::clone(error),
            })
        }
    };
    if let Some(limit) = dp.cfg.max_body_bytes {
        if head.content_length.is_some_and(|length| length > limit) {
            return Err(ProxyError::BodyTooLarge { limit });
        }
    }
    Ok(Decision::Forward(Routed {
        route,
        service,
        upstream,
        found,
        path,
        host,
    }))
}

/// Where a routed request goes and the values Kong rewrites on the way.
pub(crate) struct Prepared<'h> {
    pub(crate) peer: Peer,
    /// The upstream request target.
    pub(crate) path_and_query: String,
    pub(crate) host_header: HeaderValue,
    /// `X-Forwarded-Host`, when the request named a host.
    pub(crate) forwarded_host: Option<&'h str>,
    /// `X-Forwarded-Path`: the path as sent.
    pub(crate) forwarded_path: &'h str,
    pub(crate) forwarded_prefix: Option<HeaderValue>,
    pub(crate) via: HeaderValue,
}

/// Picks the peer and computes the upstream path and Kong's headers.
pub(crate) async fn prepare<'h>(
    routed: &'h Routed<'_, 'h>,
    downstream: &Downstream,
    head: &RequestHead<'h>,
) -> Result<Prepared<'h>, ProxyError> {
    let Routed {
        route,
        service,
        upstream,
        found,
        path,
        host,
    } = routed;
    let path_regex = found
        .path
        .and_then(|matched| route.path_regexes.get(matched.path_idx))
        .and_then(Option::as_ref);
    let peer = upstream
        .peers
        .pick(&HashInput {
            client_ip: downstream.client_ip.as_bytes(),
            headers: head.headers,
            // A matched path is UTF-8: the router refuses other paths.
            path: std::str::from_utf8(path).unwrap_or_default(),
            query: head.query,
            path_regex,
        })
        .await
        .map_err(|source| ProxyError::NoPeer {
            service_id: service.id.clone(),
            source,
        })?;
    let mut path_and_query = String::with_capacity(
        service.path.len() + path.len() + head.query.map_or(0, |query| query.len() + 1),
    );
    push_upstream_path(
        &mut path_and_query,
        route.rewrite(service),
        path,
        found.path.map(|matched| matched.len),
    );
    if let Some(query) = head.query {
        path_and_query.push('?');
        path_and_query.push_str(query);
    }
    // Kong sends the stripped prefix, unless it is "/"
    // (`kong/runloop/handler.lua`, `match_t.prefix ~= "/"`).
    let forwarded_prefix = match found.path {
        Some(matched) if route.strip_path && path.get(..matched.len) != Some(b"/") => {
            match route.forwarded_prefixes.get(matched.path_idx) {
                Some(Some(prefix)) => Some(prefix.clone()),
                _ => path
                    .get(..matched.len)
                    .and_then(|prefix| HeaderValue::from_bytes(prefix).ok()),
            }
        }
        _ => None,
    };
    let host_header = if route.preserve_host {
        head.raw_host
            .and_then(|host| HeaderValue::from_bytes(host).ok())
            .unwrap_or_else(|| peer.host_header.clone())
    } else {
        peer.host_header.clone()
    };
    let via = match head.version {
        Version::HTTP_10 | Version::HTTP_09 => VIA_HTTP_10,
        Version::HTTP_2 | Version::HTTP_3 => VIA_HTTP_2,
        _ => VIA_HTTP_11,
    };
    Ok(Prepared {
        peer,
        path_and_query,
        host_header,
        forwarded_host: (!host.is_empty()).then_some(&**host),
        forwarded_path: head.raw_path,
        forwarded_prefix,
        via,
    })
}

/// The plugins' view of a request on the hyper path.
fn plugin_request<'a>(
    head: &RequestHead<'a>,
    parts: &http::request::Parts,
    downstream: &'a Downstream,
) -> PluginRequest<'a> {
    PluginRequest {
        method: parts.method.clone(),
        version: parts.version,
        path: head.raw_path,
        query: head.query.map(Cow::Borrowed),
        headers: RequestHeaders::from_map(parts.headers.clone()),
        body: None,
        client_ip: downstream.remote.ip().to_canonical(),
        client_addr: downstream.client_ip.to_str().unwrap_or_default(),
        https: downstream.tls,
        target: head.target,
        local_port: downstream.local_port,
        connection: (
            downstream.local_ip,
            downstream.serial,
            downstream
                .requests
                .load(std::sync::atomic::Ordering::Relaxed),
        ),
        upstream_path: None,
    }
}

/// The plugins that run on a request without a service to go to: the
/// global ones when no route matched (their header_filter and log phases,
/// on the 404), the route's own when it has no service (all phases, as
/// Kong runs access before it answers 503).
pub(crate) fn unrouted_chain<'r>(
    runtime: &'r Runtime,
    error: &ProxyError,
) -> Option<(&'r crate::plugins::Plugins, &'r Chain)> {
    match error {
        ProxyError::NoRoute => {
            let plugins = runtime.plugins.as_ref()?;
            Some((plugins, plugins.global()?))
        }
        ProxyError::NoService { route_idx, .. } => runtime.chain(*route_idx),
        _ => None,
    }
}

/// Answers a request no service can take, with the plugins that apply
/// (see [`unrouted_chain`]). The body is not read: Kong's plugins that
/// read it do not run on these requests.
async fn unrouted(
    runtime: &Runtime,
    downstream: &Downstream,
    head: &RequestHead<'_>,
    parts: &http::request::Parts,
    error: ProxyError,
    started: Instant,
) -> Result<Response<ResponseBody>, Failed> {
    let Some((plugins, chain)) = unrouted_chain(runtime, &error) else {
        return Err(error.into());
    };
    let mut req = plugin_request(head, parts, downstream);
    let mut ctx = Ctx::new(plugins, chain);
    let protocol = Protocol::of(downstream.tls, is_grpc(&parts.headers));
    let answered = match error {
        ProxyError::NoService { .. } => chain.access(&mut req, &mut ctx, protocol).await,
        _ => {
            chain.collect(&req, &mut ctx, protocol);
            None
        }
    };
    let (mut response, error) = match answered {
        Some(response) => (response, None),
        None => (error.response(), Some(error)),
    };
    finish_answer(
        chain,
        &mut ctx,
        &mut response,
        plugin_log::Facts {
            total: started.elapsed(),
            ..plugin_log::Facts::default()
        },
    );
    match error {
        Some(error) => Err(Failed {
            error,
            answer: Some(response),
        }),
        None => Ok(response),
    }
}

/// A request that failed, with the answer the plugins made of the error
/// when they ran on it.
struct Failed {
    error: ProxyError,
    answer: Option<Response<ResponseBody>>,
}

impl From<ProxyError> for Failed {
    fn from(error: ProxyError) -> Failed {
        Failed {
            error,
            answer: None,
        }
    }
}

/// An error met after the plugins' access phase. Kong's error pages keep
/// the request's context, so plugins still run header_filter and log on
/// the answer: a log plugin records an upstream's 502 or 504, and
/// rate-limiting's headers are on it.
fn after_access(
    error: ProxyError,
    plugins: Option<&mut (&Chain, Ctx<'_>)>,
    proxy_latency: Option<Duration>,
    started: Instant,
) -> Failed {
    let Some((chain, ctx)) = plugins else {
        return error.into();
    };
    let mut answer = error.response();
    let upstream_status = error.upstream_status();
    finish_answer(
        chain,
        ctx,
        &mut answer,
        plugin_log::Facts {
            upstream_status,
            proxy_latency,
            total: started.elapsed(),
            ..plugin_log::Facts::default()
        },
    );
    Failed {
        error,
        answer: Some(answer),
    }
}

/// Kong's header_filter, body_filter and log phases on an answer a plugin
/// or the gateway made; `facts` without the size, which is the answer's.
fn finish_answer(
    chain: &Chain,
    ctx: &mut Ctx<'_>,
    answer: &mut Response<ResponseBody>,
    facts: plugin_log::Facts<'_>,
) {
    chain.response(ctx, answer.status(), answer.headers_mut());
    filter_answer_body(chain, ctx, answer);
    let response_size = http_body::Body::size_hint(answer.body())
        .exact()
        .unwrap_or(0);
    chain.log(
        ctx,
        &plugin_log::Facts {
            response_size,
            ..facts
        },
    );
}

/// Kong runs body_filter on the answers plugins and error pages make too
/// (a response-transformer adds its JSON fields to a key-auth 401). Those
/// bodies are in memory already.
fn filter_answer_body(chain: &Chain, ctx: &mut Ctx<'_>, answer: &mut Response<ResponseBody>) {
    if !chain.needs().response_body || matches!(answer.body(), Either::Left(_)) {
        return;
    }
    let Either::Right(full) = std::mem::replace(answer.body_mut(), Either::Right(Full::default()))
    else {
        return;
    };
    let Some(Ok(collected)) = futures_util::FutureExt::now_or_never(full.collect()) else {
        return;
    };
    let mut bytes = collected.to_bytes();
    let status = answer.status();
    chain.response_body(ctx, status, answer.headers_mut(), &mut bytes);
    answer
        .headers_mut()
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    *answer.body_mut() = Either::Right(Full::new(bytes));
}

/// Routes a request, runs the plugins, forwards it and relays the answer.
async fn forward<'r>(
    dp: &DataPlane,
    runtime: &'r Runtime,
    downstream: &Downstream,
    request: Request<Incoming>,
    started: Instant,
    facts: &mut Facts<'r>,
) -> Result<Response<ResponseBody>, Failed> {
    let (mut parts, body) = request.into_parts();
    let raw_host = match parts.headers.get(header::HOST) {
        Some(host) => Some(host.as_bytes()),
        None => parts
            .uri
            .authority()
            .map(|authority| authority.as_str().as_bytes()),
    };
    let head = RequestHead {
        method: &parts.method,
        version: parts.version,
        raw_host,
        raw_path: match parts.uri.path() {
            "" => "/",
            path => path,
        },
        query: parts.uri.query(),
        target: parts.uri.path_and_query().map_or("/", PathAndQuery::as_str),
        headers: &parts.headers,
        content_length: content_length(&parts.headers),
    };
    let routed = match route_request(dp, runtime, downstream, &head, facts) {
        Ok(Decision::Forward(routed)) => routed,
        Ok(Decision::Answer(response)) => return Ok(response),
        Err(error @ (ProxyError::NoRoute | ProxyError::NoService { .. })) => {
            return unrouted(runtime, downstream, &head, &parts, error, started).await;
        }
        Err(error) => return Err(error.into()),
    };
    let limit = dp.cfg.max_body_bytes;
    let chain = runtime.chain(routed.found.route_idx);
    let mut body = Some(body);
    let mut plugin_req = None;
    let mut plugin_ctx = None;
    if let Some((plugins, chain)) = chain {
        let mut req = plugin_request(&head, &parts, downstream);
        let needs = chain.needs();
        if needs.request_body || (needs.unsized_request_body && head.content_length.is_none()) {
            let incoming = body.take().unwrap_or_else(|| unreachable!("taken once"));
            let cap = limit.map_or(PLUGIN_BODY_LIMIT, |l| {
                usize::try_from(l).unwrap_or(usize::MAX)
            });
            req.body = Some(
                Limited::new(incoming, cap)
                    .collect()
                    .await
                    .map_err(|source| {
                        if source.downcast_ref::<LengthLimitError>().is_some() {
                            ProxyError::BodyTooLarge { limit: cap as u64 }
                        } else {
                            ProxyError::ClientAborted
                        }
                    })?
                    .to_bytes(),
            );
        }
        let mut ctx = Ctx::new(plugins, chain);
        chain.capture(
            &mut ctx,
            routed.found.path.map(|m| m.path_idx),
            &routed.path,
        );
        let protocol = Protocol::of(downstream.tls, is_grpc(&parts.headers));
        if let Some(mut response) = chain.access(&mut req, &mut ctx, protocol).await {
            finish_answer(
                chain,
                &mut ctx,
                &mut response,
                plugin_log::Facts {
                    total: started.elapsed(),
                    ..plugin_log::Facts::default()
                },
            );
            return Ok(response);
        }
        plugin_req = Some(req);
        plugin_ctx = Some((chain, ctx));
    }
    let plugin_head;
    let head = match &plugin_req {
        Some(req) => {
            plugin_head = RequestHead {
                headers: req.headers.map(),
                query: req.query.as_deref(),
                ..head
            };
            &plugin_head
        }
        None => &head,
    };
    let Prepared {
        mut peer,
        mut path_and_query,
        host_header,
        forwarded_host,
        forwarded_path,
        forwarded_prefix,
        via,
    } = prepare(&routed, downstream, head)
        .await
        .map_err(|error| after_access(error, plugin_ctx.as_mut(), None, started))?;
    let mut host_header = host_header;
    if let Some(req) = &plugin_req {
        if let Some(host) = crate::h1::plugin_host(req, head.raw_host) {
            host_header = host;
        }
        if let Some(path) = &req.upstream_path {
            path_and_query = match &req.query {
                Some(query) => format!("{path}?{query}"),
                None => path.clone(),
            };
        }
    }
    let forwarded_host = forwarded_host.and_then(|host| HeaderValue::from_str(host).ok());
    let forwarded_path = HeaderValue::from_str(forwarded_path).ok();
    let Routed {
        route,
        service,
        upstream,
        found,
        path,
        ..
    } = routed;
    let path = path.into_owned();
    let query = head.query.map(str::to_owned);
    let mut replaced_body = None;
    if let Some(PluginRequest {
        headers,
        method,
        body: new_body,
        ..
    }) = plugin_req
    {
        parts.headers = headers.into_map();
        parts.method = method;
        if let Some(bytes) = new_body {
            parts.headers.remove(header::TRANSFER_ENCODING);
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
            replaced_body = Some(bytes);
        }
    }
    facts.peer = Some(peer.authority.clone());
    let path_regex = found
        .path
        .and_then(|matched| route.path_regexes.get(matched.path_idx))
        .and_then(Option::as_ref);
    let upstream_target = plugin_ctx
        .as_ref()
        .filter(|(chain, _)| chain.needs().log)
        .map(|_| path_and_query.clone());
    let uri = upstream_uri(&upstream.scheme, &peer.authority, path_and_query)?;

    // An HTTP/1.1 protocol upgrade (WebSocket) keeps its Upgrade and
    // Connection headers; the connection becomes a tunnel after a 101.
    // A request without a body can be sent again to another peer after a
    // failure to connect or a timeout, as Kong's balancer retries do; one
    // with a body has handed it to the first attempt.
    let body: crate::runtime::RequestBody = match (replaced_body, body) {
        (Some(bytes), _) => Either::Right(Full::new(bytes)),
        (None, Some(incoming)) => Either::Left(Limited::new(
            incoming,
            limit.map_or(usize::MAX, |limit| {
                usize::try_from(limit).unwrap_or(usize::MAX)
            }),
        )),
        (None, None) => Either::Right(Full::new(Bytes::new())),
    };
    let mut attempts_left = if http_body::Body::is_end_stream(&body) && upstream.peers.can_retry() {
        service.retries
    } else {
        0
    };
    let retry_target =
        (attempts_left > 0).then(|| (String::from_utf8_lossy(&path).into_owned(), query));
    let upgrade = if upstream.h2 {
        None
    } else {
        upgrade_request(&mut parts)
    };
    let headers = &mut parts.headers;
    strip_hop_by_hop(headers);
    if upstream.h2 {
        // gRPC servers expect it; HTTP/2 allows no other TE value.
        headers.insert(header::TE, TRAILERS);
    }
    if let Some((protocol, _)) = &upgrade {
        headers.insert(header::UPGRADE, protocol.clone());
        headers.insert(header::CONNECTION, UPGRADE_TOKEN);
    }
    headers.insert(header::HOST, host_header);
    let forwarded_for = append_to_list(headers, &X_FORWARDED_FOR, &downstream.client_ip);
    headers.insert(X_FORWARDED_FOR, forwarded_for);
    headers.insert(X_FORWARDED_PROTO, downstream.forwarded_proto.clone());
    set_or_remove(headers, X_FORWARDED_HOST, forwarded_host);
    headers.insert(X_FORWARDED_PORT, downstream.local_port_value.clone());
    set_or_remove(headers, X_FORWARDED_PATH, forwarded_path);
    set_or_remove(headers, X_FORWARDED_PREFIX, forwarded_prefix);
    headers.insert(X_REAL_IP, downstream.client_ip.clone());
    let via = append_to_list(headers, &header::VIA, &via);
    headers.insert(header::VIA, via);
    let template = retry_target.map(|(path, query)| Retry {
        method: parts.method.clone(),
        path_and_query: uri.path_and_query().cloned(),
        headers: parts.headers.clone(),
        path,
        query,
    });
    parts.uri = uri;
    let upstream_version = if upstream.h2 {
        Version::HTTP_2
    } else {
        Version::HTTP_11
    };
    parts.version = upstream_version;

    let mut upstream_request = Request::from_parts(parts, body);
    let sent = Instant::now();
    facts.proxy_latency = Some(sent - started);
    // TODO(dp): Kong's read_timeout runs between two reads and starts once
    // the request is sent; here it bounds connect + send + response head,
    // and the body is not timed. write_timeout is not applied.
    let response = loop {
        let error = match tokio::time::timeout(
            service.read_timeout,
            upstream.client.request(upstream_request),
        )
        .await
        {
            Ok(Ok(response)) => {
                peer.responded(response.status());
                break response;
            }
            Err(_elapsed) => {
                peer.failed(Failure::Timeout);
                ProxyError::UpstreamTimeout {
                    upstream: peer.authority.clone(),
                }
            }
            Ok(Err(error)) => {
                let error = ProxyError::from_client(error, &peer.authority, limit);
                match error {
                    ProxyError::UpstreamTimeout { .. } => peer.failed(Failure::Timeout),
                    ProxyError::UpstreamConnect { .. } | ProxyError::Upstream { .. } => {
                        peer.failed(Failure::Connection)
                    }
                    _ => {}
                }
                error
            }
        };
        let retriable = matches!(
            error,
            ProxyError::UpstreamTimeout { .. } | ProxyError::UpstreamConnect { .. }
        );
        let Some(retry) = template.as_ref().filter(|_| retriable && attempts_left > 0) else {
            return Err(after_access(
                error,
                plugin_ctx.as_mut(),
                facts.proxy_latency,
                started,
            ));
        };
        attempts_left -= 1;
        peer = upstream
            .peers
            .pick(&HashInput {
                client_ip: downstream.client_ip.as_bytes(),
                headers: &retry.headers,
                path: &retry.path,
                query: retry.query.as_deref(),
                path_regex,
            })
            .await
            .map_err(|source| {
                let error = ProxyError::NoPeer {
                    service_id: service.id.clone(),
                    source,
                };
                after_access(error, plugin_ctx.as_mut(), facts.proxy_latency, started)
            })?;
        facts.peer = Some(peer.authority.clone());
        let mut uri_parts = uri::Parts::default();
        uri_parts.scheme = Some(upstream.scheme.clone());
        uri_parts.authority = Some(peer.authority.clone());
        uri_parts.path_and_query = retry.path_and_query.clone();
        let uri =
            Uri::from_parts(uri_parts).map_err(|error| ProxyError::InvalidUpstreamRequest {
                source: error.into(),
            })?;
        let mut headers = retry.headers.clone();
        if !route.preserve_host {
            headers.insert(header::HOST, peer.host_header.clone());
        }
        let mut request = Request::new(Either::Right(Full::new(Bytes::new())));
        *request.method_mut() = retry.method.clone();
        *request.uri_mut() = uri;
        *request.version_mut() = upstream_version;
        *request.headers_mut() = headers;
        upstream_request = request;
    };
    facts.upstream_latency = Some(sent.elapsed());

    if let Some((_, downstream_upgrade)) = upgrade {
        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            return Ok(tunnel(response, downstream_upgrade));
        }
    }
    let (mut parts, body) = response.into_parts();
    strip_hop_by_hop(&mut parts.headers);
    let hop = if upstream.h2 { VIA_HTTP_2 } else { VIA_HTTP_11 };
    let via = append_to_list(&parts.headers, &header::VIA, &hop);
    parts.headers.insert(header::VIA, via);
    if let Some(cookie) = peer.set_cookie.take() {
        parts.headers.append(header::SET_COOKIE, cookie);
    }
    let mut body = peer.track(body);
    let Some((chain, mut ctx)) = plugin_ctx else {
        return Ok(Response::from_parts(parts, Either::Left(body)));
    };
    chain.response(&mut ctx, parts.status, &mut parts.headers);
    let log_facts = |size: u64| plugin_log::Facts {
        upstream_uri: upstream_target.as_deref(),
        upstream_status: Some(parts.status.as_u16()),
        proxy_latency: facts.proxy_latency,
        upstream_latency: facts.upstream_latency,
        total: started.elapsed(),
        response_size: size,
    };
    if !chain.needs().response_body {
        // The body streams on; the log phase runs once it has gone.
        if let Some(deferred) = chain.defer_log(&mut ctx, &log_facts(0)) {
            body.on_end(Box::new(move |size| {
                deferred.finish(size, started.elapsed())
            }));
        }
        return Ok(Response::from_parts(parts, Either::Left(body)));
    }
    let mut bytes = body
        .collect()
        .await
        .map_err(|source| ProxyError::UpstreamIo {
            upstream: peer.authority.clone(),
            source: io::Error::other(source),
        })?
        .to_bytes();
    chain.response_body(&mut ctx, parts.status, &mut parts.headers, &mut bytes);
    parts.headers.remove(header::TRANSFER_ENCODING);
    parts
        .headers
        .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
    chain.log(&mut ctx, &log_facts(bytes.len() as u64));
    Ok(Response::from_parts(parts, Either::Right(Full::new(bytes))))
}

/// The largest body a plugin reads whole when `max_body_bytes` is unset.
const PLUGIN_BODY_LIMIT: usize = 16 * 1024 * 1024;

/// What a bodiless request needs to be sent again to another peer.
struct Retry {
    method: http::Method,
    path_and_query: Option<PathAndQuery>,
    headers: HeaderMap,
    path: String,
    query: Option<String>,
}

const UPGRADE_TOKEN: HeaderValue = HeaderValue::from_static("upgrade");

/// The protocol an HTTP/1.1 request asks to upgrade to, with the hook that
/// yields the client connection once the upgrade is accepted.
fn upgrade_request(parts: &mut http::request::Parts) -> Option<(HeaderValue, OnUpgrade)> {
    if parts.version != Version::HTTP_11 {
        return None;
    }
    let wants_upgrade = parts
        .headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .any(|token| token.trim().eq_ignore_ascii_case("upgrade"));
    if !wants_upgrade {
        return None;
    }
    let protocol = parts.headers.get(header::UPGRADE)?.clone();
    let on_upgrade = parts.extensions.remove::<OnUpgrade>()?;
    Some((protocol, on_upgrade))
}

/// Answer a 101 from the upstream and join the two upgraded connections.
/// The tunnel lives on its own task until either side closes.
fn tunnel(mut response: Response<Incoming>, downstream: OnUpgrade) -> Response<ResponseBody> {
    let upstream = hyper::upgrade::on(&mut response);
    tokio::spawn(async move {
        let (downstream, upstream) = match tokio::try_join!(downstream, upstream) {
            Ok(both) => both,
            Err(error) => {
                tracing::debug!(%error, "Protocol upgrade did not complete.");
                return;
            }
        };
        let mut downstream = TokioIo::new(downstream);
        let mut upstream = TokioIo::new(upstream);
        if let Err(error) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
            tracing::debug!(%error, "Upgraded connection ended with an error.");
        }
    });
    let (mut parts, _body) = response.into_parts();
    let via = append_to_list(&parts.headers, &header::VIA, &VIA_HTTP_11);
    parts.headers.insert(header::VIA, via);
    Response::from_parts(parts, Either::Right(Full::new(Bytes::new())))
}

fn upstream_uri(
    scheme: &Scheme,
    peer: &Authority,
    path_and_query: String,
) -> Result<Uri, ProxyError> {
    let invalid = |source: http::Error| ProxyError::InvalidUpstreamRequest { source };
    let mut parts = uri::Parts::default();
    parts.scheme = Some(scheme.clone());
    parts.authority = Some(peer.clone());
    parts.path_and_query =
        Some(PathAndQuery::try_from(path_and_query).map_err(|error| invalid(error.into()))?);
    Uri::from_parts(parts).map_err(|error| invalid(error.into()))
}

/// Kong's answer to a plaintext request on an https-only route: 426, or a
/// redirect to the same URL over https.
fn https_required(status: StatusCode, host: &str, target: &str) -> Response<ResponseBody> {
    if status == StatusCode::UPGRADE_REQUIRED {
        let mut response = gateway_response(status, body::HTTPS_REQUIRED);
        let headers = response.headers_mut();
        headers.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        headers.insert(
            header::UPGRADE,
            HeaderValue::from_static("TLS/1.2, HTTP/1.1"),
        );
        return response;
    }
    let location = format!("https://{host}{target}");
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::SERVER, SERVER);
    if let Ok(location) = HeaderValue::from_str(&location) {
        headers.insert(header::LOCATION, location);
    }
    response
}

/// A request whose `Content-Type` starts with `application/grpc`.
fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/grpc"))
}

pub(crate) fn is_gateway_json(response: &Response<ResponseBody>) -> bool {
    matches!(response.body(), Either::Right(_))
        && response.headers().get(header::CONTENT_TYPE) == Some(&JSON_UTF8)
}

/// A bodiless gRPC response carrying its status in headers.
fn grpc_response(
    status: StatusCode,
    grpc_status: u8,
    message: &'static str,
) -> Response<ResponseBody> {
    let mut response = Response::new(Either::Right(Full::new(Bytes::new())));
    *response.status_mut() = status;
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, APPLICATION_GRPC);
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    headers.insert(GRPC_STATUS, HeaderValue::from(u16::from(grpc_status)));
    headers.insert(GRPC_MESSAGE, HeaderValue::from_static(message));
    headers.insert(header::SERVER, SERVER);
    response
}

/// Kong's answer to a gRPC client instead of a JSON error
/// (`kong/pdk/response.lua`): the same HTTP status, no body, and the
/// status's gRPC code and name in `grpc-status` and `grpc-message`.
pub(crate) fn grpc_error(response: Response<ResponseBody>) -> Response<ResponseBody> {
    let status = response.status();
    let exact = match status.as_u16() {
        400 => Some(3),
        401 => Some(16),
        403 => Some(7),
        404 => Some(5),
        409 => Some(6),
        429 => Some(8),
        499 => Some(1),
        501 => Some(12),
        503 => Some(14),
        504 => Some(4),
        _ => None,
    };
    let code = exact.unwrap_or(if status.is_server_error() {
        13
    } else if status.is_client_error() {
        3
    } else if status.is_success() {
        0
    } else {
        2
    });
    const NAMES: [&str; 17] = [
        "OK",
        "Canceled",
        "Unknown",
        "InvalidArgument",
        "DeadlineExceeded",
        "NotFound",
        "AlreadyExists",
        "PermissionDenied",
        "ResourceExhausted",
        "FailedPrecondition",
        "Aborted",
        "OutOfRange",
        "Unimplemented",
        "Internal",
        "Unavailable",
        "DataLoss",
        "Unauthenticated",
    ];
    let mut grpc = grpc_response(status, code, NAMES[usize::from(code)]);
    // Headers the error carried (Connection, Upgrade, Location) stay.
    for (name, value) in response.headers() {
        if name != header::CONTENT_TYPE && name != header::CONTENT_LENGTH {
            grpc.headers_mut().insert(name.clone(), value.clone());
        }
    }
    grpc
}

/// Kong's error page (`kong/error_handlers.lua`, `kong.response.error`):
/// the JSON template with the message and a request id.
fn gateway_response(status: StatusCode, message: &'static str) -> Response<ResponseBody> {
    let body = crate::plugins::ErrorFormat::Json.body(message, &crate::plugins::new_request_id());
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body))));
    *response.status_mut() = status;
    response.extensions_mut().insert(GatewayError(message));
    let headers = response.headers_mut();
    headers.insert(header::CONTENT_TYPE, JSON_UTF8);
    headers.insert(header::SERVER, SERVER);
    response
}

/// The message of an error answer the gateway made, for
/// [`negotiate_error`].
#[derive(Clone, Copy)]
struct GatewayError(&'static str);

/// Kong's error pages pick their template by the request's `Accept`
/// (`kong/error_handlers.lua`): the gateway's JSON answer is written again
/// as text, HTML or XML when the client prefers one of those.
pub(crate) fn negotiate_error(response: &mut Response<ResponseBody>, accept: Option<&[u8]>) {
    let Some(&GatewayError(message)) = response.extensions().get::<GatewayError>() else {
        return;
    };
    let format = crate::plugins::ErrorFormat::negotiate(accept);
    if format == crate::plugins::ErrorFormat::Json {
        return;
    }
    let body = format.body(message, &crate::plugins::new_request_id());
    *response.body_mut() = Either::Right(Full::new(Bytes::from(body)));
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static(format.content_type()),
    );
    response.headers_mut().remove(header::CONTENT_LENGTH);
}

/// Removes connection-specific headers and those the `Connection` header
/// names. Allocates only when `Connection` lists extra headers.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let listed: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(str::trim)
        .filter(|token| {
            !token.is_empty()
                && !token.eq_ignore_ascii_case("keep-alive")
                && !token.eq_ignore_ascii_case("close")
                && !token.eq_ignore_ascii_case("upgrade")
        })
        .filter_map(|token| HeaderName::from_bytes(token.as_bytes()).ok())
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in &HOP_BY_HOP {
        headers.remove(name);
    }
}

/// Every value of the list header `name`, joined with `", "`, followed by
/// `last`; just `last` when the header is absent.
fn append_to_list(headers: &HeaderMap, name: &HeaderName, last: &HeaderValue) -> HeaderValue {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else {
        return last.clone();
    };
    let mut joined = BytesMut::with_capacity(first.len() + 2 + last.len());
    joined.extend_from_slice(first.as_bytes());
    for value in values.chain(std::iter::once(last)) {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(value.as_bytes());
    }
    // Joining valid values with ", " keeps them valid.
    HeaderValue::from_maybe_shared(joined.freeze()).unwrap_or_else(|_| last.clone())
}

fn set_or_remove(headers: &mut HeaderMap, name: HeaderName, value: Option<HeaderValue>) {
    match value {
        Some(value) => {
            headers.insert(name, value);
        }
        None => {
            headers.remove(name);
        }
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn millis(duration: Duration) -> HeaderValue {
    HeaderValue::from(u64::try_from(duration.as_millis()).unwrap_or(u64::MAX))
}

fn source_chain<'e>(
    error: &'e (dyn StdError + 'static),
) -> impl Iterator<Item = &'e (dyn StdError + 'static)> {
    std::iter::successors(Some(error), |&error| error.source())
}

fn has_source<E: StdError + 'static>(error: &(dyn StdError + 'static)) -> bool {
    source_chain(error).any(|cause| cause.is::<E>())
}

/// Displays an error with its sources: `a: b: c`.
pub(crate) struct ErrorChain<'e>(pub(crate) &'e (dyn StdError + 'static));

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut first = true;
        for cause in source_chain(self.0) {
            if !first {
                f.write_str(": ")?;
            }
            first = false;
            write!(f, "{cause}")?;
        }
        Ok(())
    }
}
