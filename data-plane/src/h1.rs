//! Gatehouse's own HTTP/1.1 engine for the common proxy case: a request
//! to a plaintext HTTP/1.1 upstream, handled on the client connection's
//! task from the first byte to the last, as nginx does it. The request
//! head is parsed in place (httparse), routed, rewritten straight into the
//! bytes sent upstream, and the response head is rewritten into the bytes
//! sent back; bodies are passed on as they arrive. Upstream connections
//! come from a per-thread keep-alive pool ([`pool`]), so a request takes no
//! lock and wakes no other task. Kong's `read_timeout` and `write_timeout`
//! apply to each read and write on the upstream connection.
//!
//! Anything else (HTTP/2, HTTP/1.0, upgrades, `Expect`, chunked request
//! bodies, absolute-form targets, heads httparse refuses, and requests
//! routed to https or gRPC services) is handed to hyper with the bytes
//! read so far, and the connection stays with hyper from then on. The
//! hand-off happens before anything of the request is answered or sent
//! upstream, so both engines see the same request.

mod chunked;
mod pool;

use std::borrow::Cow;
use std::io;
use std::mem::MaybeUninit;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::uri::Scheme;
use http::{Method, Response, StatusCode, Version};
use http_body::Body;
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::Sleep;

use self::chunked::ChunkScanner;
use self::pool::UpstreamConn;
use crate::balancer::{Failure, HashInput, Peer};
use crate::downstream::{HeadScan, Limits, Reject, Scanned, LINGER_IDLE, LINGER_TOTAL};
use crate::plugins::{
    log as plugin_log, Chain, Ctx, PluginRequest, Protocol, RequestHeaders, SetHeaders,
};
use crate::proxy::{
    grpc_error, is_gateway_json, log_access, prepare, route_request, Decision, Downstream, Facts,
    Prepared, ProxyError, RequestHead, ResponseBody, Routed,
};
use crate::runtime::Runtime;
use crate::DataPlane;

/// Request bodies up to this size are read whole before the request goes
/// upstream, so that a retry can send them again (Kong buffers request
/// bodies by default: `request_buffering`). Larger ones are streamed.
const BUFFERED_BODY: u64 = 64 * 1024;
/// nginx's `client_body_timeout`: between two reads of a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(60);
/// nginx's `send_timeout`: between two writes to the client.
const SEND_TIMEOUT: Duration = Duration::from_secs(60);
/// The most header fields a request or response may have here; more goes
/// to hyper (requests) or is an invalid response.
const MAX_HEADERS: usize = 100;
/// The largest upstream response head.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;

/// Room for parsed header fields, left uninitialised: httparse writes
/// only the fields it finds.
fn uninit_fields<'b>() -> [MaybeUninit<httparse::Header<'b>>; MAX_HEADERS] {
    [const { MaybeUninit::uninit() }; MAX_HEADERS]
}

/// Runs `fut` with `timeout`, starting the timer only if the first poll
/// does not finish it: most writes complete at once, and a timer costs a
/// clock read and a timer-wheel entry.
async fn timed<F: std::future::Future>(timeout: Duration, fut: F) -> io::Result<F::Output> {
    let mut fut = std::pin::pin!(fut);
    if let Poll::Ready(output) = std::future::poll_fn(|cx| Poll::Ready(fut.as_mut().poll(cx))).await
    {
        return Ok(output);
    }
    tokio::time::timeout(timeout, fut)
        .await
        .map_err(|_elapsed| io::Error::from(io::ErrorKind::TimedOut))
}

/// How a connection left the engine.
pub(crate) enum Ended<S> {
    Closed,
    /// hyper takes the connection; `buffered` was read but not handled.
    HandOff {
        io: S,
        buffered: BytesMut,
    },
}

/// What the connection does after a request.
enum Next {
    KeepAlive,
    Close,
    /// Close after discarding what the client still sends.
    Linger,
    HandOff,
}

enum HeadRead {
    Complete(usize),
    Closed,
    HandOff,
    Reject(Reject),
}

/// One client connection.
pub(crate) struct Engine<'c> {
    pub(crate) dp: &'c DataPlane,
    pub(crate) downstream: &'c Downstream,
    pub(crate) limits: Limits,
    /// Becomes true when the proxy drains: idle connections close, busy
    /// ones close after their response.
    pub(crate) drain: watch::Receiver<bool>,
}

impl Engine<'_> {
    pub(crate) async fn serve<S>(mut self, mut io: S) -> Ended<S>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let mut buf = BytesMut::with_capacity(4096);
        let mut out = Vec::with_capacity(4096);
        let clock = tokio::time::sleep(self.limits.header_timeout);
        tokio::pin!(clock);
        // One drain future for the connection's life: it stays registered,
        // rather than registering and leaving at every idle wait.
        let mut drain = self.drain.clone();
        let drained = drain.changed();
        tokio::pin!(drained);
        let mut first = true;
        loop {
            let head_len = match self
                .read_head(&mut io, &mut buf, first, clock.as_mut(), drained.as_mut())
                .await
            {
                HeadRead::Complete(len) => len,
                HeadRead::Closed => return Ended::Closed,
                HeadRead::HandOff => return Ended::HandOff { io, buffered: buf },
                HeadRead::Reject(reject) => {
                    if write_all(&mut io, &reject.answer()).await.is_ok() {
                        if reject.lingers() {
                            linger(&mut io).await;
                        } else {
                            let _ = io.shutdown().await;
                        }
                    }
                    return Ended::Closed;
                }
            };
            first = false;
            let head = buf.split_to(head_len).freeze();
            match self.exchange(&mut io, &head, &mut buf, &mut out).await {
                Next::KeepAlive => {}
                Next::Close => {
                    let _ = io.shutdown().await;
                    return Ended::Closed;
                }
                Next::Linger => {
                    linger(&mut io).await;
                    return Ended::Closed;
                }
                Next::HandOff => {
                    let mut buffered = BytesMut::with_capacity(head.len() + buf.len());
                    buffered.extend_from_slice(&head);
                    buffered.extend_from_slice(&buf);
                    return Ended::HandOff { io, buffered };
                }
            }
        }
    }

    /// Reads until `buf` holds a complete request head, applying nginx's
    /// limits: `client_header_timeout` (from the accept for the first
    /// request, from the first byte for later ones), `keepalive_timeout`
    /// while idle, and the header buffer sizes.
    async fn read_head<S, D>(
        &mut self,
        io: &mut S,
        buf: &mut BytesMut,
        first: bool,
        mut clock: Pin<&mut Sleep>,
        mut drained: Pin<&mut D>,
    ) -> HeadRead
    where
        S: AsyncRead + Unpin,
        D: std::future::Future,
    {
        let mut scan = HeadScan::default();
        let mut scanned = 0;
        let mut started = false;
        if !first {
            clock
                .as_mut()
                .reset(tokio::time::Instant::now() + self.limits.keepalive_timeout);
        }
        loop {
            if scanned < buf.len() {
                let (result, n) = scan.scan(&buf[scanned..], &self.limits);
                scanned += n;
                match result {
                    Scanned::Partial => {}
                    Scanned::Complete => return HeadRead::Complete(scanned),
                    Scanned::H2 => return HeadRead::HandOff,
                    Scanned::Reject(reject) => return HeadRead::Reject(reject),
                }
                // A head that did not arrive whole: from its first byte it
                // has the header timeout (the first one has had it since
                // the accept).
                if !started && !first {
                    clock
                        .as_mut()
                        .reset(tokio::time::Instant::now() + self.limits.header_timeout);
                }
                started = true;
            }
            if buf.capacity() - buf.len() < 1024 {
                buf.reserve(4096);
            }
            tokio::select! {
                biased;
                read = io.read_buf(buf) => match read {
                    Ok(0) | Err(_) => return HeadRead::Closed,
                    Ok(_) => {}
                },
                () = clock.as_mut() => {
                    // Nothing of a request was sent: close quietly, as
                    // nginx does.
                    return if started {
                        HeadRead::Reject(Reject::Timeout)
                    } else {
                        HeadRead::Closed
                    };
                }
                _ = drained.as_mut(), if !started => return HeadRead::Closed,
            }
        }
    }

    /// Handles one request whose head is `head`; `buf` holds what the
    /// client sent after it.
    async fn exchange<S>(
        &self,
        io: &mut S,
        head: &Bytes,
        buf: &mut BytesMut,
        out: &mut Vec<u8>,
    ) -> Next
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let started = Instant::now();
        self.downstream
            .requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let mut fields = uninit_fields();
        let mut request = httparse::Request::new(&mut []);
        if !matches!(
            request.parse_with_uninit_headers(head, &mut fields),
            Ok(httparse::Status::Complete(_))
        ) {
            return Next::HandOff;
        }
        let (Some(method), Some(target), Some(1)) = (request.method, request.path, request.version)
        else {
            return Next::HandOff;
        };
        if !target.starts_with('/') {
            return Next::HandOff;
        }
        let Ok(method) = Method::from_bytes(method.as_bytes()) else {
            return Next::HandOff;
        };
        let Some(info) = RequestInfo::read(request.headers) else {
            return Next::HandOff;
        };
        let runtime = self.dp.runtime.load_full();
        let header_map;
        let empty = HeaderMap::new();
        // The router or a balancer reads headers (gRPC routes read its
        // content type).
        let reads_headers = runtime.reads_headers || info.grpc;
        let headers = if reads_headers {
            header_map = match header_map_of(request.headers) {
                Some(map) => map,
                None => return Next::HandOff,
            };
            &header_map
        } else {
            &empty
        };
        let (raw_path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(query)),
            None => (target, None),
        };
        let view = RequestHead {
            method: &method,
            version: Version::HTTP_11,
            raw_host: info.host,
            raw_path,
            query,
            target,
            headers,
            content_length: info.content_length,
        };
        let mut exchange = Exchange {
            engine: self,
            runtime: &runtime,
            started,
            method: &method,
            path: raw_path,
            headers: request.headers,
            grpc: info.grpc,
            close: info.close || self.drain.has_changed().unwrap_or(true),
            sent: started,
            facts: Facts::default(),
        };
        let body_len = info.content_length.unwrap_or(0);
        let routed = match route_request(
            self.dp,
            &runtime,
            self.downstream,
            &view,
            &mut exchange.facts,
        ) {
            Ok(Decision::Forward(routed)) => routed,
            Ok(Decision::Answer(response)) => {
                return exchange
                    .answer(io, buf, body_len, response, None, out)
                    .await;
            }
            // Plugins that run without a service (the global ones on a
            // 404, a serviceless route's own) run on the hyper path.
            Err(error) if crate::proxy::unrouted_chain(&runtime, &error).is_some() => {
                return Next::HandOff;
            }
            Err(error) => {
                return exchange
                    .answer(io, buf, body_len, error.response(), Some(error), out)
                    .await;
            }
        };
        if routed.upstream.scheme != Scheme::HTTP || routed.upstream.h2 {
            return Next::HandOff;
        }
        // Plugins that read whole bodies run on the hyper path.
        let chain = runtime.chain(routed.found.route_idx);
        if chain.is_some_and(|(_, chain)| {
            let needs = chain.needs();
            needs.request_body || needs.response_body
        }) {
            return Next::HandOff;
        }
        let mut plugin_req = None;
        let mut plugin_ctx = None;
        if let Some((plugins, chain)) = chain {
            // Made where they stay: both live across awaits, and each move
            // inside this future copies them.
            let req = plugin_req.insert(PluginRequest {
                method: method.clone(),
                // This engine takes HTTP/1.1 only.
                version: Version::HTTP_11,
                path: raw_path,
                query: query.map(Cow::Borrowed),
                headers: RequestHeaders::parsed(request.headers),
                body: None,
                client_ip: self.downstream.remote.ip().to_canonical(),
                client_addr: self.downstream.client_ip.to_str().unwrap_or_default(),
                https: self.downstream.tls,
                target,
                local_port: self.downstream.local_port,
                connection: (
                    self.downstream.local_ip,
                    self.downstream.serial,
                    self.downstream
                        .requests
                        .load(std::sync::atomic::Ordering::Relaxed),
                ),
                upstream_path: None,
            });
            let (_, ctx) = plugin_ctx.insert((chain, Ctx::new(plugins, chain)));
            chain.capture(ctx, routed.found.path.map(|m| m.path_idx), &routed.path);
            let protocol = Protocol::of(self.downstream.tls, info.grpc);
            if let Some(mut response) = chain.access(req, ctx, protocol).await {
                chain.response(ctx, response.status(), response.headers_mut());
                let size = http_body::Body::size_hint(response.body()).exact();
                let next = exchange
                    .answer(io, buf, body_len, response, None, out)
                    .await;
                chain.log(
                    ctx,
                    &plugin_log::Facts {
                        total: started.elapsed(),
                        response_size: size.unwrap_or(0),
                        ..plugin_log::Facts::default()
                    },
                );
                return next;
            }
        }
        let plugin_view;
        let view = match &plugin_req {
            Some(req) => {
                plugin_view = RequestHead {
                    // Balancers hash on the headers as plugins left them.
                    headers: if reads_headers {
                        req.headers.map()
                    } else {
                        view.headers
                    },
                    query: req.query.as_deref(),
                    ..view
                };
                &plugin_view
            }
            None => &view,
        };
        let prepared = match prepare(&routed, self.downstream, view).await {
            Ok(prepared) => prepared,
            Err(error) => {
                let plugins = plugin_ctx.as_mut().map(|(chain, ctx)| (*chain, ctx));
                return exchange
                    .fail(io, buf, body_len, error, out, plugins, None)
                    .await;
            }
        };

        // The body: read whole when small, so that retries can resend it.
        let mut body = if body_len == 0 {
            RequestBody::Buffered(Bytes::new())
        } else if body_len <= BUFFERED_BODY {
            let len = body_len as usize;
            while buf.len() < len {
                buf.reserve(len - buf.len());
                match tokio::time::timeout(BODY_TIMEOUT, io.read_buf(buf)).await {
                    Ok(Ok(n)) if n > 0 => {}
                    // The client went away or stalled mid-body.
                    _ => return Next::Close,
                }
            }
            RequestBody::Buffered(buf.split_to(len).freeze())
        } else {
            RequestBody::Streamed {
                remaining: body_len,
            }
        };
        let upstream_head = match &plugin_req {
            Some(req) => UpstreamHead {
                method: req.method.as_str(),
                fields: Fields::Plugin(&req.headers),
                query: req.query.as_deref(),
            },
            None => UpstreamHead {
                method: request.method.unwrap_or("GET"),
                fields: Fields::Raw(request.headers),
                query,
            },
        };
        let mut prepared = prepared;
        if let Some(host) = plugin_req
            .as_ref()
            .and_then(|req| plugin_host(req, info.host))
        {
            prepared.host_header = host;
        }
        if let Some(path) = plugin_req
            .as_ref()
            .and_then(|req| req.upstream_path.as_deref())
        {
            prepared.path_and_query = match upstream_head.query {
                Some(query) => format!("{path}?{query}"),
                None => path.to_owned(),
            };
        }
        exchange
            .forward(
                io,
                buf,
                out,
                &routed,
                prepared,
                &upstream_head,
                &info,
                &mut body,
                plugin_ctx.as_mut().map(|(chain, ctx)| (*chain, ctx)),
            )
            .await
    }
}

enum RequestBody {
    Buffered(Bytes),
    /// Bytes still to copy from the client; sent once, never retried.
    Streamed {
        remaining: u64,
    },
}

/// How a response body ends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    None,
    Length(u64),
    Chunked,
    /// Until the upstream closes.
    Close,
}

/// What the engine needs from an upstream response head.
struct ResponseHead {
    len: usize,
    status: StatusCode,
    framing: Framing,
    /// The upstream keeps the connection open after this response.
    keep_alive: bool,
}

/// One request in progress.
struct Exchange<'e, 'r> {
    engine: &'e Engine<'e>,
    runtime: &'r Runtime,
    started: Instant,
    method: &'e Method,
    path: &'e str,
    /// The request's fields as parsed, for the gateway's error answers.
    headers: &'e [httparse::Header<'e>],
    grpc: bool,
    /// The connection closes after this response.
    close: bool,
    /// When the request went upstream.
    sent: Instant,
    facts: Facts<'r>,
}

impl<'r> Exchange<'_, 'r> {
    /// Answers an error met after the plugins' access phase. Kong's error
    /// pages keep the request's context, so plugins still run their
    /// header_filter and log phases: a log plugin records the 502 or 504
    /// of an upstream that failed, and rate-limiting's headers are there.
    #[allow(clippy::too_many_arguments)]
    async fn fail<S>(
        &mut self,
        io: &mut S,
        buf: &mut BytesMut,
        body_len: u64,
        error: ProxyError,
        out: &mut Vec<u8>,
        plugins: Option<(&Chain, &mut Ctx<'_>)>,
        upstream_uri: Option<&str>,
    ) -> Next
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Some((chain, ctx)) = plugins else {
            return self
                .answer(io, buf, body_len, error.response(), Some(error), out)
                .await;
        };
        let mut response = error.response();
        chain.response(ctx, response.status(), response.headers_mut());
        let upstream_status = error.upstream_status();
        let size = Body::size_hint(response.body()).exact().unwrap_or(0);
        let next = self
            .answer(io, buf, body_len, response, Some(error), out)
            .await;
        chain.log(
            ctx,
            &plugin_log::Facts {
                upstream_uri,
                upstream_status,
                proxy_latency: self.facts.proxy_latency,
                upstream_latency: None,
                total: self.started.elapsed(),
                response_size: size,
            },
        );
        next
    }

    /// Sends an answer the gateway makes itself. `body_len` bytes of request
    /// body follow the head: skipped when already read, else the
    /// connection closes after discarding them.
    async fn answer<S>(
        &mut self,
        io: &mut S,
        buf: &mut BytesMut,
        body_len: u64,
        mut response: Response<ResponseBody>,
        error: Option<ProxyError>,
        out: &mut Vec<u8>,
    ) -> Next
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        if self.grpc && (error.is_some() || is_gateway_json(&response)) {
            response = grpc_error(response);
        } else {
            let accept = self
                .headers
                .iter()
                .find(|field| field.name.eq_ignore_ascii_case("accept"))
                .map(|field| field.value);
            crate::proxy::negotiate_error(&mut response, accept);
        }
        let mut next = if self.close {
            Next::Close
        } else {
            Next::KeepAlive
        };
        let too_large = matches!(error, Some(ProxyError::BodyTooLarge { .. }));
        if too_large || body_len > buf.len() as u64 {
            // The body is not read: discard what the client still sends
            // so that it reads the answer rather than a reset.
            next = Next::Linger;
        } else {
            buf.advance(body_len as usize);
        }
        let status = response.status();
        let (parts, body) = response.into_parts();
        let body = ready_bytes(body);
        out.clear();
        push_status_line(out, status);
        for (name, value) in &parts.headers {
            push_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
        if self.engine.dp.cfg.latency_headers {
            push_latency(out, &self.facts, self.started);
        }
        // 1xx, 204 and 304 carry no body, so no length either.
        let bodiless = status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        if !bodiless && !parts.headers.contains_key(http::header::CONTENT_LENGTH) {
            push_header(out, b"Content-Length", body.len().to_string().as_bytes());
        }
        push_date(out);
        if !matches!(next, Next::KeepAlive) {
            push_header(out, b"Connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
        if self.method != Method::HEAD && !bodiless {
            out.extend_from_slice(&body);
        }
        self.log(status, error.as_ref());
        if write_all(io, out).await.is_err() {
            return Next::Close;
        }
        next
    }

    #[allow(clippy::too_many_arguments)]
    async fn forward<S>(
        &mut self,
        io: &mut S,
        buf: &mut BytesMut,
        out: &mut Vec<u8>,
        routed: &Routed<'r, '_>,
        prepared: Prepared<'_>,
        request: &UpstreamHead<'_>,
        info: &RequestInfo<'_>,
        body: &mut RequestBody,
        mut plugins: Option<(&Chain, &mut Ctx<'_>)>,
    ) -> Next
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let Routed {
            route,
            service,
            upstream,
            found,
            path,
            ..
        } = routed;
        let Prepared {
            mut peer,
            path_and_query,
            mut host_header,
            forwarded_host,
            forwarded_path,
            forwarded_prefix,
            via,
        } = prepared;
        let downstream = self.engine.downstream;
        let rewrites = Rewrites {
            forwarded_host,
            forwarded_path,
            forwarded_prefix: forwarded_prefix.as_ref(),
            via: &via,
        };
        // `out` holds the upstream request head until the response head
        // replaces it.
        out.clear();
        out.reserve(head_capacity(request));
        push_upstream_head(
            out,
            request,
            info,
            &path_and_query,
            &host_header,
            downstream,
            &rewrites,
        );
        let sent = Instant::now();
        self.sent = sent;
        self.facts.proxy_latency = Some(sent - self.started);
        let replayable = matches!(body, RequestBody::Buffered(_));
        let mut attempts_left = if replayable && upstream.peers.can_retry() {
            service.retries
        } else {
            0
        };
        let (mut conn, response) = loop {
            self.facts.peer = Some(peer.authority.clone());
            let error = match self.send(io, buf, &peer, routed, out, body).await {
                Ok(done) => break done,
                Err(error) => error,
            };
            let failure = match &error {
                ProxyError::UpstreamTimeout { .. } => Some(Failure::Timeout),
                ProxyError::UpstreamConnectIo { .. } | ProxyError::UpstreamIo { .. } => {
                    Some(Failure::Connection)
                }
                _ => None,
            };
            if let Some(failure) = failure {
                peer.failed(failure);
            }
            let retriable = matches!(
                error,
                ProxyError::UpstreamTimeout { .. } | ProxyError::UpstreamConnectIo { .. }
            );
            if !(retriable && attempts_left > 0) {
                if let ProxyError::ClientAborted = error {
                    self.log(StatusCode::BAD_REQUEST, Some(&error));
                    return Next::Close;
                }
                // Body bytes the client has not sent yet would otherwise be
                // read as the next request.
                let unread = match body {
                    RequestBody::Streamed { remaining } => *remaining,
                    RequestBody::Buffered(_) => 0,
                };
                return self
                    .fail(io, buf, unread, error, out, plugins, Some(&path_and_query))
                    .await;
            }
            attempts_left -= 1;
            let path_regex = found
                .path
                .and_then(|matched| route.path_regexes.get(matched.path_idx))
                .and_then(Option::as_ref);
            let headers_for_hash;
            let empty = HeaderMap::new();
            let headers = if upstream.peers.reads_headers() {
                headers_for_hash = request.fields.header_map();
                &headers_for_hash
            } else {
                &empty
            };
            peer = match upstream
                .peers
                .pick(&HashInput {
                    client_ip: downstream.client_ip.as_bytes(),
                    headers,
                    path: std::str::from_utf8(&path[..]).unwrap_or_default(),
                    query: request.query,
                    path_regex,
                })
                .await
            {
                Ok(peer) => peer,
                Err(source) => {
                    let error = ProxyError::NoPeer {
                        service_id: service.id.clone(),
                        source,
                    };
                    return self.fail(io, buf, 0, error, out, plugins, None).await;
                }
            };
            if !route.preserve_host && peer.host_header != host_header {
                host_header = peer.host_header.clone();
                out.clear();
                push_upstream_head(
                    out,
                    request,
                    info,
                    &path_and_query,
                    &host_header,
                    downstream,
                    &rewrites,
                );
            }
        };
        peer.responded(response.status);
        let responded_at = Instant::now();
        self.facts.upstream_latency = Some(responded_at - sent);

        // The response head, rewritten.
        let has_body = self.method != Method::HEAD && response.framing != Framing::None;
        if response.framing == Framing::Close && has_body {
            self.close = true;
        }
        out.clear();
        let mut set_headers = SetHeaders::default();
        let filters = match plugins.as_mut() {
            Some((chain, ctx)) if chain.filters_response() => Some((*chain, &mut **ctx)),
            Some((_, ctx)) => {
                set_headers = std::mem::take(&mut ctx.response_headers);
                None
            }
            None => None,
        };
        push_response_head(
            out,
            &conn.buf[..response.len],
            response.status,
            &mut peer,
            filters.map(|(chain, ctx)| (chain, ctx, response.framing)),
            &set_headers,
        );
        if self.engine.dp.cfg.latency_headers {
            push_latency(out, &self.facts, self.started);
        }
        if response.framing == Framing::Chunked {
            push_header(out, b"Transfer-Encoding", b"chunked");
        }
        if self.close {
            push_header(out, b"Connection", b"close");
        }
        out.extend_from_slice(b"\r\n");
        conn.buf.advance(response.len);
        let status = response.status;
        let relayed = if has_body {
            self.relay(io, &mut conn, response.framing, out, service.read_timeout)
                .await
        } else {
            write_all(io, out).await.map_err(|_| Relay::Downstream)
        };
        self.log(status, None);
        if let Some((chain, ctx)) = plugins {
            chain.log(
                ctx,
                &plugin_log::Facts {
                    upstream_uri: Some(&path_and_query),
                    upstream_status: Some(status.as_u16()),
                    proxy_latency: self.facts.proxy_latency,
                    upstream_latency: self.facts.upstream_latency,
                    total: self.started.elapsed(),
                    response_size: match response.framing {
                        Framing::Length(len) => len,
                        _ => 0,
                    },
                },
            );
        }
        drop(peer);
        match relayed {
            Ok(()) => {
                if response.keep_alive && response.framing != Framing::Close {
                    pool::put(
                        self.facts.peer.as_ref().map_or("", |p| p.as_str()),
                        conn,
                        responded_at,
                    );
                }
                if self.close {
                    Next::Close
                } else {
                    Next::KeepAlive
                }
            }
            Err(Relay::Upstream(error)) => {
                tracing::debug!(%error, "Upstream failed mid-response; closing the client connection.");
                Next::Close
            }
            Err(Relay::Downstream) => Next::Close,
        }
    }

    /// Sends the request on a pooled or new connection and reads the
    /// response head. A pooled connection that fails before the first
    /// response byte was probably closed by the upstream as the request
    /// went out: the request goes again on a new connection.
    async fn send<S>(
        &self,
        io: &mut S,
        buf: &mut BytesMut,
        peer: &Peer,
        routed: &Routed<'_, '_>,
        head: &[u8],
        body: &mut RequestBody,
    ) -> Result<(UpstreamConn, ResponseHead), ProxyError>
    where
        S: AsyncRead + Unpin,
    {
        let service = routed.service;
        let authority = peer.authority.as_str();
        let streamed = matches!(body, RequestBody::Streamed { .. });
        // A streamed body cannot be sent twice: it gets a new connection.
        let mut pooled = if streamed {
            None
        } else {
            pool::take(authority, self.sent)
        };
        loop {
            let mut conn = match pooled.take() {
                Some(conn) => conn,
                None => pool::connect(authority, service.connect_timeout)
                    .await
                    .map_err(|source| {
                        if source.kind() == io::ErrorKind::TimedOut {
                            ProxyError::UpstreamTimeout {
                                upstream: peer.authority.clone(),
                            }
                        } else {
                            ProxyError::UpstreamConnectIo {
                                upstream: peer.authority.clone(),
                                source,
                            }
                        }
                    })?,
            };
            let upstream_error = |source: io::Error| {
                if source.kind() == io::ErrorKind::TimedOut {
                    ProxyError::UpstreamTimeout {
                        upstream: peer.authority.clone(),
                    }
                } else {
                    ProxyError::UpstreamIo {
                        upstream: peer.authority.clone(),
                        source,
                    }
                }
            };
            let written = match body {
                RequestBody::Buffered(bytes) => {
                    write_upstream(&mut conn, [head, bytes], service.write_timeout).await
                }
                RequestBody::Streamed { remaining } => {
                    let result =
                        stream_body(io, buf, &mut conn, head, remaining, service.write_timeout)
                            .await;
                    match result {
                        Ok(()) => Ok(()),
                        Err(StreamError::Client) => {
                            return Err(ProxyError::ClientAborted);
                        }
                        Err(StreamError::Upstream(error)) => Err(error),
                    }
                }
            };
            let result = match written {
                Ok(()) => read_response_head(&mut conn, service.read_timeout).await,
                Err(error) => Err(error),
            };
            match result {
                Ok(response) => return Ok((conn, response)),
                Err(error) if conn.reused && conn.buf.is_empty() && is_closed_race(&error) => {
                    continue;
                }
                Err(error) => return Err(upstream_error(error)),
            }
        }
    }

    /// Writes `out` (the response head) with the body bytes already read,
    /// then passes the rest of the body on as it arrives.
    async fn relay<S>(
        &self,
        io: &mut S,
        conn: &mut UpstreamConn,
        framing: Framing,
        out: &mut Vec<u8>,
        read_timeout: Duration,
    ) -> Result<(), Relay>
    where
        S: AsyncWrite + Unpin,
    {
        let mut remaining = match framing {
            Framing::Length(len) => len,
            _ => u64::MAX,
        };
        let mut chunks = ChunkScanner::default();
        let mut first = true;
        loop {
            let (take, done) = match framing {
                Framing::None => (0, true),
                Framing::Length(_) => {
                    let take = conn
                        .buf
                        .len()
                        .min(usize::try_from(remaining).unwrap_or(usize::MAX));
                    remaining -= take as u64;
                    (take, remaining == 0)
                }
                Framing::Chunked => chunks.feed(&conn.buf).map_err(|error| {
                    Relay::Upstream(io::Error::new(io::ErrorKind::InvalidData, error))
                })?,
                Framing::Close => (conn.buf.len(), false),
            };
            if first {
                // The head and the first part of the body in one write.
                out.extend_from_slice(&conn.buf[..take]);
                write_all(io, out).await.map_err(|_| Relay::Downstream)?;
                first = false;
            } else if take > 0 {
                write_all(io, &conn.buf[..take])
                    .await
                    .map_err(|_| Relay::Downstream)?;
            }
            conn.buf.advance(take);
            if done {
                return Ok(());
            }
            if !conn.buf.is_empty() {
                // Bytes after the end of a chunked body that is not done
                // cannot happen: feed consumed everything it was given.
                return Err(Relay::Upstream(io::ErrorKind::InvalidData.into()));
            }
            conn.buf.reserve(16 * 1024);
            match read_with_timeout(&mut conn.stream, &mut conn.buf, read_timeout).await {
                Ok(0) if framing == Framing::Close => return Ok(()),
                Ok(0) => return Err(Relay::Upstream(io::ErrorKind::UnexpectedEof.into())),
                Ok(_) => {}
                Err(error) => return Err(Relay::Upstream(error)),
            }
        }
    }

    fn log(&self, status: StatusCode, error: Option<&ProxyError>) {
        if self.engine.dp.cfg.access_log {
            log_access(
                self.engine.downstream,
                self.runtime,
                self.method.as_str(),
                self.path,
                status,
                &self.facts,
                self.started,
                error,
            );
        }
    }
}

enum Relay {
    Upstream(io::Error),
    /// The client went away.
    Downstream,
}

enum StreamError {
    Client,
    Upstream(io::Error),
}

/// What the engine reads from the request's header fields.
struct RequestInfo<'h> {
    host: Option<&'h [u8]>,
    content_length: Option<u64>,
    /// `Connection: close`.
    close: bool,
    /// Other fields `Connection` names, which do not go upstream.
    listed: Vec<&'h [u8]>,
    grpc: bool,
}

impl<'h> RequestInfo<'h> {
    /// `None` for requests the engine leaves to hyper.
    fn read(fields: &[httparse::Header<'h>]) -> Option<RequestInfo<'h>> {
        let mut info = RequestInfo {
            host: None,
            content_length: None,
            close: false,
            listed: Vec::new(),
            grpc: false,
        };
        for field in fields {
            let name = field.name.as_bytes();
            if name.eq_ignore_ascii_case(b"host") {
                if info.host.is_some() {
                    return None;
                }
                info.host = Some(field.value);
            } else if name.eq_ignore_ascii_case(b"content-length") {
                let length = std::str::from_utf8(field.value).ok()?.trim().parse().ok()?;
                if info.content_length.is_some_and(|seen| seen != length) {
                    return None;
                }
                info.content_length = Some(length);
            } else if name.eq_ignore_ascii_case(b"connection") {
                for token in field.value.split(|&b| b == b',') {
                    let token = token.trim_ascii();
                    if token.eq_ignore_ascii_case(b"close") {
                        info.close = true;
                    } else if token.eq_ignore_ascii_case(b"upgrade") {
                        return None;
                    } else if !token.is_empty() && !token.eq_ignore_ascii_case(b"keep-alive") {
                        info.listed.push(token);
                    }
                }
            } else if name.eq_ignore_ascii_case(b"transfer-encoding")
                || name.eq_ignore_ascii_case(b"upgrade")
                || name.eq_ignore_ascii_case(b"expect")
            {
                return None;
            } else if name.eq_ignore_ascii_case(b"content-type") {
                info.grpc = field.value.starts_with(b"application/grpc");
            }
        }
        Some(info)
    }

    fn lists(&self, name: &[u8]) -> bool {
        self.listed
            .iter()
            .any(|listed| listed.eq_ignore_ascii_case(name))
    }
}

/// The Host a plugin set (request-transformer), which Kong sends
/// upstream instead of the one the route and service decide.
pub(crate) fn plugin_host(req: &PluginRequest<'_>, sent: Option<&[u8]>) -> Option<HeaderValue> {
    let host = req.headers.get(http::header::HOST)?;
    (Some(host) != sent)
        .then(|| HeaderValue::from_bytes(host).ok())
        .flatten()
}

/// The request's fields as a header map, for header routes and hashing.
fn header_map_of(fields: &[httparse::Header<'_>]) -> Option<HeaderMap> {
    let mut map = HeaderMap::with_capacity(fields.len());
    for field in fields {
        let name = HeaderName::from_bytes(field.name.as_bytes()).ok()?;
        let value = HeaderValue::from_bytes(field.value).ok()?;
        map.append(name, value);
    }
    Some(map)
}

/// How a request field is treated on the way upstream.
enum RequestField {
    Copy,
    Drop,
    /// Joined with the gateway's own value.
    ForwardedFor,
    Via,
}

fn request_field(name: &[u8]) -> RequestField {
    // By length first: most fields (User-Agent, Accept, …) match none.
    let candidates: &[&[u8]] = match name.len() {
        2 => &[b"te"],
        3 if name.eq_ignore_ascii_case(b"via") => return RequestField::Via,
        4 => &[b"host"],
        7 => &[b"trailer", b"upgrade"],
        9 => &[b"x-real-ip"],
        10 => &[b"connection", b"keep-alive"],
        15 if name.eq_ignore_ascii_case(b"x-forwarded-for") => return RequestField::ForwardedFor,
        16 => &[
            b"proxy-connection",
            b"x-forwarded-host",
            b"x-forwarded-port",
            b"x-forwarded-path",
        ],
        17 => &[b"transfer-encoding", b"x-forwarded-proto"],
        18 => &[b"proxy-authenticate", b"x-forwarded-prefix"],
        19 => &[b"proxy-authorization"],
        _ => &[],
    };
    if candidates
        .iter()
        .any(|candidate| candidate.eq_ignore_ascii_case(name))
    {
        RequestField::Drop
    } else {
        RequestField::Copy
    }
}

/// The values Kong sets on the upstream request besides Host.
struct Rewrites<'p> {
    forwarded_host: Option<&'p str>,
    forwarded_path: &'p str,
    forwarded_prefix: Option<&'p HeaderValue>,
    via: &'p HeaderValue,
}

/// The request head as it goes upstream: the client's, or the one the
/// plugins made.
struct UpstreamHead<'a> {
    method: &'a str,
    fields: Fields<'a>,
    query: Option<&'a str>,
}

/// Request header fields as the client sent them, or as plugins left them.
#[derive(Clone, Copy)]
enum Fields<'a> {
    Raw(&'a [httparse::Header<'a>]),
    Plugin(&'a RequestHeaders<'a>),
}

impl<'a> Fields<'a> {
    fn for_each(self, mut f: impl FnMut(&'a [u8], &'a [u8])) {
        match self {
            Fields::Raw(fields) => fields
                .iter()
                .for_each(|field| f(field.name.as_bytes(), field.value)),
            Fields::Plugin(headers) => headers.for_each(f),
        }
    }

    fn header_map(self) -> HeaderMap {
        match self {
            Fields::Raw(fields) => header_map_of(fields).unwrap_or_default(),
            Fields::Plugin(headers) => headers.map().clone(),
        }
    }
}

fn head_capacity(request: &UpstreamHead<'_>) -> usize {
    let mut len = 256;
    request
        .fields
        .for_each(|name, value| len += name.len() + value.len() + 4);
    len
}

/// The upstream request head: the client's fields without hop-by-hop ones,
/// then Host, Kong's `X-Forwarded-*`, `X-Real-IP` and `Via`.
fn push_upstream_head(
    out: &mut Vec<u8>,
    request: &UpstreamHead<'_>,
    info: &RequestInfo<'_>,
    path_and_query: &str,
    host: &HeaderValue,
    downstream: &Downstream,
    rewrites: &Rewrites<'_>,
) {
    out.extend_from_slice(request.method.as_bytes());
    out.push(b' ');
    out.extend_from_slice(path_and_query.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    push_header(out, b"Host", host.as_bytes());
    let mut forwarded_for: Vec<&[u8]> = Vec::new();
    let mut via: Vec<&[u8]> = Vec::new();
    request
        .fields
        .for_each(|name, value| match request_field(name) {
            RequestField::Copy if !info.lists(name) => push_header(out, name, value),
            RequestField::Copy | RequestField::Drop => {}
            RequestField::ForwardedFor => forwarded_for.push(value),
            RequestField::Via => via.push(value),
        });
    push_list(
        out,
        b"X-Forwarded-For",
        &forwarded_for,
        downstream.client_ip.as_bytes(),
    );
    push_header(
        out,
        b"X-Forwarded-Proto",
        downstream.forwarded_proto.as_bytes(),
    );
    if let Some(host) = rewrites.forwarded_host {
        push_header(out, b"X-Forwarded-Host", host.as_bytes());
    }
    push_header(
        out,
        b"X-Forwarded-Port",
        downstream.local_port_value.as_bytes(),
    );
    push_header(out, b"X-Forwarded-Path", rewrites.forwarded_path.as_bytes());
    if let Some(prefix) = rewrites.forwarded_prefix {
        push_header(out, b"X-Forwarded-Prefix", prefix.as_bytes());
    }
    push_header(out, b"X-Real-IP", downstream.client_ip.as_bytes());
    push_list(out, b"Via", &via, rewrites.via.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The response head for the client: the upstream's status and fields
/// without hop-by-hop ones, `Via` appended, the hash cookie if one was
/// made. Ends without the blank line.
fn push_response_head(
    out: &mut Vec<u8>,
    raw: &[u8],
    status: StatusCode,
    peer: &mut Peer,
    plugins: Option<(&Chain, &mut Ctx<'_>, Framing)>,
    set_headers: &SetHeaders,
) {
    push_status_line(out, status);
    let mut fields = uninit_fields();
    let mut response = httparse::Response::new(&mut []);
    // Parsed once already: this cannot fail.
    let _ = httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut response,
        raw,
        &mut fields,
    );
    let mut listed: Vec<&[u8]> = Vec::new();
    for field in response.headers.iter() {
        if field.name.eq_ignore_ascii_case("connection") {
            listed.extend(
                field
                    .value
                    .split(|&b| b == b',')
                    .map(<[u8]>::trim_ascii)
                    .filter(|token| !token.is_empty()),
            );
        }
    }
    let mut via: Vec<&[u8]> = Vec::new();
    let mut has_date = false;
    let mut filtered = plugins.as_ref().map(|_| HeaderMap::new());
    for field in response.headers.iter() {
        let name = field.name.as_bytes();
        match request_field(name) {
            RequestField::Via => via.push(field.value),
            // Hop-by-hop fields of a response are the same set.
            RequestField::Drop if is_hop_by_hop(name) => {}
            _ if listed.iter().any(|token| token.eq_ignore_ascii_case(name)) => {}
            // Replaced by a plugin's value.
            _ if set_headers.sets(name) => {}
            _ => {
                has_date |= name.eq_ignore_ascii_case(b"date");
                match &mut filtered {
                    Some(map) => {
                        if let (Ok(name), Ok(value)) = (
                            HeaderName::from_bytes(name),
                            HeaderValue::from_bytes(field.value),
                        ) {
                            map.append(name, value);
                        }
                    }
                    None => push_header(out, name, field.value),
                }
            }
        }
    }
    out.extend_from_slice(set_headers.lines());
    if let (Some(mut map), Some((chain, ctx, framing))) = (filtered, plugins) {
        chain.response(ctx, status, &mut map);
        // The body is relayed as the upstream framed it, whatever a plugin
        // did to the header (response-transformer may remove it).
        match framing {
            Framing::Length(len) => {
                map.insert(http::header::CONTENT_LENGTH, HeaderValue::from(len));
            }
            Framing::Chunked => {
                map.remove(http::header::CONTENT_LENGTH);
            }
            Framing::None | Framing::Close => {}
        }
        for (name, value) in &map {
            push_header(out, name.as_str().as_bytes(), value.as_bytes());
        }
    }
    push_list(out, b"Via", &via, crate::proxy::VIA_HTTP_11.as_bytes());
    if let Some(cookie) = peer.set_cookie.take() {
        push_header(out, b"Set-Cookie", cookie.as_bytes());
    }
    if !has_date {
        push_date(out);
    }
}

/// One of the hop-by-hop fields the hyper path strips too
/// (`proxy::HOP_BY_HOP`); header names there are lower case.
fn is_hop_by_hop(name: &[u8]) -> bool {
    crate::proxy::HOP_BY_HOP
        .iter()
        .any(|hop| hop.as_str().as_bytes().eq_ignore_ascii_case(name))
}

/// Kong's latency headers (see `proxy::latency_headers`), written without
/// building header values.
fn push_latency(out: &mut Vec<u8>, facts: &Facts<'_>, started: Instant) {
    let mut push = |name: &[u8], latency: Duration| {
        out.extend_from_slice(name);
        out.extend_from_slice(b": ");
        push_decimal(out, u64::try_from(latency.as_millis()).unwrap_or(u64::MAX));
        out.extend_from_slice(b"\r\n");
    };
    match (facts.proxy_latency, facts.upstream_latency) {
        (Some(proxy), Some(upstream)) => {
            push(b"X-Kong-Upstream-Latency", upstream);
            push(b"X-Kong-Proxy-Latency", proxy);
        }
        _ => push(b"X-Kong-Response-Latency", started.elapsed()),
    }
}

fn push_decimal(out: &mut Vec<u8>, mut value: u64) {
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (value % 10) as u8;
        value /= 10;
        if value == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

fn push_status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("Unknown").as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn push_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// `name: a, b, last`, or `name: last` when the list is empty.
fn push_list(out: &mut Vec<u8>, name: &[u8], values: &[&[u8]], last: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    for value in values {
        out.extend_from_slice(value);
        out.extend_from_slice(b", ");
    }
    out.extend_from_slice(last);
    out.extend_from_slice(b"\r\n");
}

/// The `Date` field, formatted once per second per thread.
fn push_date(out: &mut Vec<u8>) {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};
    thread_local! {
        static DATE: RefCell<(u64, String)> = const { RefCell::new((0, String::new())) };
    }
    let now = SystemTime::now();
    let second = now
        .duration_since(UNIX_EPOCH)
        .map_or(0, |since| since.as_secs());
    DATE.with(|date| {
        let mut date = date.borrow_mut();
        if date.0 != second || date.1.is_empty() {
            *date = (second, httpdate::fmt_http_date(now));
        }
        push_header(out, b"Date", date.1.as_bytes());
    });
}

/// The bytes of a body the gateway made (always complete at once).
fn ready_bytes(body: ResponseBody) -> Bytes {
    let mut body = body;
    let mut cx = Context::from_waker(Waker::noop());
    let mut bytes = BytesMut::new();
    while let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut body).poll_frame(&mut cx) {
        if let Ok(data) = frame.into_data() {
            bytes.extend_from_slice(&data);
        }
    }
    bytes.freeze()
}

async fn write_all<S: AsyncWrite + Unpin>(io: &mut S, bytes: &[u8]) -> io::Result<()> {
    timed(SEND_TIMEOUT, io.write_all(bytes)).await?
}

/// Writes all of `parts` to the upstream, each write within `timeout`.
async fn write_upstream(
    conn: &mut UpstreamConn,
    parts: [&[u8]; 2],
    timeout: Duration,
) -> io::Result<()> {
    let mut slices = [io::IoSlice::new(parts[0]), io::IoSlice::new(parts[1])];
    let mut slices = if parts[1].is_empty() {
        &mut slices[..1]
    } else {
        &mut slices[..]
    };
    while slices.iter().any(|slice| !slice.is_empty()) {
        let written = timed(timeout, conn.stream.write_vectored(slices)).await??;
        if written == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        io::IoSlice::advance_slices(&mut slices, written);
    }
    Ok(())
}

/// Sends the head and copies `remaining` body bytes from the client.
async fn stream_body<S: AsyncRead + Unpin>(
    io: &mut S,
    buf: &mut BytesMut,
    conn: &mut UpstreamConn,
    head: &[u8],
    remaining: &mut u64,
    timeout: Duration,
) -> Result<(), StreamError> {
    let take = buf
        .len()
        .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
    write_upstream(conn, [head, &buf[..take]], timeout)
        .await
        .map_err(StreamError::Upstream)?;
    buf.advance(take);
    *remaining -= take as u64;
    while *remaining > 0 {
        buf.reserve(16 * 1024);
        match tokio::time::timeout(BODY_TIMEOUT, io.read_buf(buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Err(StreamError::Client),
        }
        let take = buf
            .len()
            .min(usize::try_from(*remaining).unwrap_or(usize::MAX));
        write_upstream(conn, [&buf[..take], &[]], timeout)
            .await
            .map_err(StreamError::Upstream)?;
        buf.advance(take);
        *remaining -= take as u64;
    }
    Ok(())
}

async fn read_with_timeout<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut BytesMut,
    timeout: Duration,
) -> io::Result<usize> {
    tokio::time::timeout(timeout, stream.read_buf(buf))
        .await
        .map_err(|_elapsed| io::Error::from(io::ErrorKind::TimedOut))?
}

/// Reads until a final response head is complete, skipping interim (1xx)
/// ones; each read within `timeout` (Kong's `read_timeout`).
async fn read_response_head(
    conn: &mut UpstreamConn,
    timeout: Duration,
) -> io::Result<ResponseHead> {
    loop {
        if !conn.buf.is_empty() {
            let mut fields = uninit_fields();
            let mut response = httparse::Response::new(&mut []);
            match httparse::ParserConfig::default().parse_response_with_uninit_headers(
                &mut response,
                &conn.buf,
                &mut fields,
            ) {
                Ok(httparse::Status::Complete(len)) => {
                    let code = response.code.unwrap_or(0);
                    if (100..200).contains(&code) {
                        if code == 101 {
                            return Err(invalid("101 to a request that did not ask to upgrade"));
                        }
                        conn.buf.advance(len);
                        continue;
                    }
                    let status =
                        StatusCode::from_u16(code).map_err(|_| invalid("invalid status"))?;
                    return response_head(&response, len, status);
                }
                Ok(httparse::Status::Partial) if conn.buf.len() > MAX_RESPONSE_HEAD => {
                    return Err(invalid("response head too large"));
                }
                Ok(httparse::Status::Partial) => {}
                Err(error) => return Err(invalid(&error.to_string())),
            }
        }
        conn.buf.reserve(8 * 1024);
        if read_with_timeout(&mut conn.stream, &mut conn.buf, timeout).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

fn response_head(
    response: &httparse::Response<'_, '_>,
    len: usize,
    status: StatusCode,
) -> io::Result<ResponseHead> {
    let mut length = None;
    let mut chunked = false;
    let mut close = response.version != Some(1);
    for field in response.headers.iter() {
        let name = field.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let value: u64 = std::str::from_utf8(field.value)
                .ok()
                .and_then(|value| value.trim().parse().ok())
                .ok_or_else(|| invalid("invalid Content-Length"))?;
            if length.is_some_and(|seen| seen != value) {
                return Err(invalid("conflicting Content-Length"));
            }
            length = Some(value);
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            let last = field
                .value
                .rsplit(|&b| b == b',')
                .next()
                .unwrap_or_default();
            chunked = last.trim_ascii().eq_ignore_ascii_case(b"chunked");
            if !chunked {
                return Err(invalid("unsupported Transfer-Encoding"));
            }
        } else if name.eq_ignore_ascii_case(b"connection") {
            for token in field.value.split(|&b| b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && response.version == Some(0) {
                    close = false;
                }
            }
        }
    }
    let framing = if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Framing::None
    } else if chunked {
        Framing::Chunked
    } else if let Some(length) = length {
        if length == 0 {
            Framing::None
        } else {
            Framing::Length(length)
        }
    } else {
        Framing::Close
    };
    Ok(ResponseHead {
        len,
        status,
        framing,
        keep_alive: !close,
    })
}

fn invalid(message: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message.to_owned())
}

/// A failure that a close by the upstream racing the request explains.
fn is_closed_race(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::UnexpectedEof
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionAborted
    )
}

/// Discards what the client still sends, then closes (nginx's lingering
/// close), so that it reads the answer rather than a reset.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(io: &mut S) {
    let _ = io.shutdown().await;
    let until = tokio::time::Instant::now() + LINGER_TOTAL;
    let mut scratch = [0u8; 8192];
    loop {
        let idle = (tokio::time::Instant::now() + LINGER_IDLE).min(until);
        match tokio::time::timeout_at(idle, io.read(&mut scratch)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return,
        }
    }
}

/// A stream that first yields bytes already read from it: how hyper gets
/// a connection the engine handed off.
pub(crate) struct Prefixed<S> {
    prefix: Bytes,
    inner: S,
}

impl<S> Prefixed<S> {
    pub(crate) fn new(prefix: Bytes, inner: S) -> Prefixed<S> {
        Prefixed { prefix, inner }
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.prefix.is_empty() {
            let take = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix.split_to(take));
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimals() {
        for value in [0, 7, 10, 999, 1_000_000, u64::MAX] {
            let mut out = Vec::new();
            push_decimal(&mut out, value);
            assert_eq!(out, value.to_string().into_bytes());
        }
    }

    #[test]
    fn request_fields_kong_replaces_or_drops() {
        for name in [
            "Host",
            "te",
            "Connection",
            "KEEP-ALIVE",
            "Proxy-Connection",
            "Proxy-Authorization",
            "Proxy-Authenticate",
            "Transfer-Encoding",
            "Trailer",
            "Upgrade",
            "X-Real-IP",
            "X-Forwarded-Proto",
            "X-Forwarded-Host",
            "X-Forwarded-Port",
            "X-Forwarded-Path",
            "X-Forwarded-Prefix",
        ] {
            assert!(
                matches!(request_field(name.as_bytes()), RequestField::Drop),
                "{name}"
            );
        }
        assert!(matches!(
            request_field(b"X-Forwarded-For"),
            RequestField::ForwardedFor
        ));
        assert!(matches!(request_field(b"VIA"), RequestField::Via));
        for name in [
            "User-Agent",
            "Accept",
            "Cookie",
            "X-Forwarded-Fox",
            "Hosts",
            "tE2",
        ] {
            assert!(
                matches!(request_field(name.as_bytes()), RequestField::Copy),
                "{name}"
            );
        }
    }
}
