//! The downstream connection below hyper: the limits nginx applies before a
//! request exists, and lingering close.
//!
//! [`DownstreamIo`] wraps the client's stream (TCP, or TLS after the
//! handshake) and watches the bytes hyper reads. Between requests it knows
//! which phase the connection is in:
//!
//! ```text
//!  Idle ──first byte──► Head ──blank line──► Busy ──response body dropped──► Idle
//!   │ keepalive_timeout   │ client_header_timeout → 408
//!   │ (header timeout     │ line > buffer size → 414 / 431
//!   ▼  before the first)  │ head > all buffers → 431
//!  close                  ▼
//!                      Reject: write the JSON answer, FIN, linger, EOF to hyper
//! ```
//!
//! The HTTP/2 connection preface switches the connection to `H2`, where only
//! the idle rule applies (no stream open for `keepalive_timeout`). The
//! service counts requests through [`Activity`]: a request is finished when
//! hyper drops its response body, so a long response never looks idle.
//!
//! A pipelined request (sent before the previous response ended) may be
//! read by hyper while this layer thinks a body is flowing; such heads are
//! only bounded by hyper's buffer limit, and the scan restarts at the next
//! idle point.
//!
//! Answering 408/414/431 here, rather than in hyper, is what gives those
//! answers Kong's JSON bodies, and keeps a client that never sends a
//! complete head from holding a connection past `client_header_timeout`.
//! hyper's own header timeout is off; its buffer limit stays as a backstop.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// nginx's `lingering_timeout`: how long a closing connection waits for
/// more bytes to discard.
pub(crate) const LINGER_IDLE: Duration = Duration::from_secs(5);
/// nginx's `lingering_time`: the most a closing connection spends
/// discarding what the client still sends.
pub(crate) const LINGER_TOTAL: Duration = Duration::from_secs(30);

/// The first line of the HTTP/2 connection preface.
const H2_PREFACE_LINE: &[u8] = b"PRI * HTTP/2.0";

/// Timeouts and sizes that apply to every downstream connection.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Limits {
    /// nginx's `client_header_timeout`: from the accept (first request) or
    /// the first byte of a head (later ones) to its blank line.
    pub(crate) header_timeout: Duration,
    /// nginx's `keepalive_timeout`: how long a connection may sit with no
    /// request in flight.
    pub(crate) keepalive_timeout: Duration,
    /// One buffer of nginx's `large_client_header_buffers`: the longest
    /// request line (414 past it) or header line (431 past it).
    pub(crate) max_line: usize,
    /// All the buffers: the largest request head (431 past it).
    pub(crate) max_head: usize,
}

/// The requests of one connection, shared by its [`DownstreamIo`] and the
/// service that hyper calls. Lock-free: counters and a waker.
#[derive(Default)]
pub(crate) struct Activity {
    started: AtomicU64,
    finished: AtomicU64,
    linger: AtomicBool,
    /// Woken when a request finishes, so the IO can start the idle clock
    /// even when hyper is not reading.
    reader: AtomicWaker,
}

impl Activity {
    /// Marks a request as started; it finishes when the guard drops.
    pub(crate) fn start(self: &Arc<Self>) -> RequestGuard {
        self.started.fetch_add(1, Ordering::AcqRel);
        RequestGuard(Arc::clone(self))
    }

    /// Discard what the client still sends before closing, so that it reads
    /// the answer instead of a reset: set when the gateway answers without
    /// reading a request body (413).
    pub(crate) fn linger_on_close(&self) {
        self.linger.store(true, Ordering::Release);
    }

    fn in_flight(&self) -> u64 {
        let finished = self.finished.load(Ordering::Acquire);
        self.started
            .load(Ordering::Acquire)
            .saturating_sub(finished)
    }
}

/// A request in flight; dropping it finishes the request.
pub(crate) struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.finished.fetch_add(1, Ordering::AcqRel);
        self.0.reader.wake();
    }
}

/// A response body that keeps its request in flight until hyper drops it.
pub(crate) struct TrackedBody<B> {
    inner: B,
    _request: RequestGuard,
}

impl<B> TrackedBody<B> {
    pub(crate) fn new(inner: B, request: RequestGuard) -> Self {
        TrackedBody {
            inner,
            _request: request,
        }
    }
}

impl<B> Body for TrackedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        Pin::new(&mut self.get_mut().inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

enum Phase {
    /// No byte of a head yet. The clock is the header timeout from the
    /// accept on a new connection, the keep-alive timeout afterwards.
    Idle,
    /// Reading a head: the clock is the header timeout.
    Head(HeadScan),
    /// A head was read; waiting for every request to finish.
    Busy,
    /// HTTP/2. `idle_since` is the finished count when the idle clock was
    /// started.
    H2 { idle_since: Option<u64> },
    /// Writing the gateway's own answer, then shutting the write side.
    Reject {
        answer: Vec<u8>,
        written: usize,
        linger: bool,
    },
    /// Discarding what the client sends until EOF or the linger timeouts.
    Linger { until: Instant },
    /// Reads return EOF.
    Done,
}

/// Where a head is: its size, the current line's, how many lines ended.
#[derive(Default)]
pub(crate) struct HeadScan {
    bytes: usize,
    line: usize,
    lines: usize,
    /// The start of the request line, to recognise the HTTP/2 preface.
    first_line: [u8; 16],
}

pub(crate) enum Scanned {
    /// More bytes needed.
    Partial,
    /// The blank line that ends the head.
    Complete,
    /// The HTTP/2 connection preface.
    H2,
    Reject(Reject),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reject {
    /// 408: the head did not arrive in time.
    Timeout,
    /// 414: the request line is longer than one buffer.
    UriTooLong,
    /// 431: a header line is longer than one buffer, or the head than all.
    HeaderTooLarge,
}

impl Reject {
    pub(crate) fn answer(self) -> Vec<u8> {
        let (status, message) = match self {
            Reject::Timeout => ("408 Request Timeout", "Request timeout"),
            Reject::UriTooLong => ("414 URI Too Long", "URI too long"),
            Reject::HeaderTooLarge => (
                "431 Request Header Fields Too Large",
                "Request header or cookie too large",
            ),
        };
        let body = format!("{{\"message\":\"{message}\"}}");
        format!(
            "HTTP/1.1 {status}\r\nContent-Type: application/json; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\nServer: {}\r\n\r\n{body}",
            body.len(),
            concat!("gatehouse/", env!("CARGO_PKG_VERSION")),
        )
        .into_bytes()
    }

    /// Whether the client may still be sending the rest of its request.
    pub(crate) fn lingers(self) -> bool {
        self != Reject::Timeout
    }
}

impl HeadScan {
    pub(crate) fn scan(&mut self, bytes: &[u8], limits: &Limits) -> (Scanned, usize) {
        let mut at = 0;
        while at < bytes.len() {
            // A line at a time (memchr), rather than a byte at a time: heads
            // are scanned on every request.
            let rest = &bytes[at..];
            let (segment, ends_line) = match memchr::memchr(b'\n', rest) {
                Some(end) => (&rest[..end], true),
                None => (rest, false),
            };
            // CRs do not count towards a line's length.
            let content = segment.iter().filter(|&&byte| byte != b'\r').count();
            if self.lines == 0 && self.line < self.first_line.len() {
                let mut filled = self.line;
                for &byte in segment {
                    if byte == b'\r' {
                        continue;
                    }
                    if filled >= self.first_line.len() {
                        break;
                    }
                    self.first_line[filled] = byte;
                    filled += 1;
                }
            }
            if self.line + content > limits.max_line {
                let reject = if self.lines == 0 {
                    Reject::UriTooLong
                } else {
                    Reject::HeaderTooLarge
                };
                return (Scanned::Reject(reject), at + segment.len());
            }
            self.line += content;
            let consumed = segment.len() + usize::from(ends_line);
            self.bytes += consumed;
            if self.bytes > limits.max_head {
                return (Scanned::Reject(Reject::HeaderTooLarge), at + consumed);
            }
            at += consumed;
            if !ends_line {
                break;
            }
            if self.line == 0 && self.lines > 0 {
                return (Scanned::Complete, at);
            }
            if self.lines == 0 && self.line > 0 {
                let len = self.line.min(self.first_line.len());
                if self.first_line[..len] == *H2_PREFACE_LINE {
                    return (Scanned::H2, at);
                }
            }
            // Empty lines before the request line are skipped, as RFC 9112
            // §2.2 allows.
            if self.line > 0 {
                self.lines += 1;
            }
            self.line = 0;
        }
        (Scanned::Partial, bytes.len())
    }
}

/// The client's stream with the limits above; see the module docs.
pub(crate) struct DownstreamIo<S> {
    inner: S,
    limits: Limits,
    activity: Arc<Activity>,
    phase: Phase,
    /// The one clock of the current phase.
    clock: Pin<Box<Sleep>>,
    /// Heads seen complete; `Busy` ends once as many requests finished.
    heads: u64,
    write_closed: bool,
}

impl<S> DownstreamIo<S> {
    /// `h2`: the connection speaks HTTP/2 from the start (ALPN `h2`).
    pub(crate) fn new(inner: S, limits: Limits, activity: Arc<Activity>, h2: bool) -> Self {
        let phase = if h2 {
            Phase::H2 { idle_since: None }
        } else {
            Phase::Idle
        };
        DownstreamIo {
            inner,
            limits,
            activity,
            phase,
            clock: Box::pin(tokio::time::sleep(limits.header_timeout)),
            heads: 0,
            write_closed: false,
        }
    }

    fn restart_clock(&mut self, after: Duration) {
        self.clock.as_mut().reset(Instant::now() + after);
    }

    fn reject(&mut self, reject: Reject) {
        self.phase = Phase::Reject {
            answer: reject.answer(),
            written: 0,
            linger: reject.lingers(),
        };
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> DownstreamIo<S> {
    /// Writes the answer, shuts the write side and lingers; ready when the
    /// connection can close.
    fn poll_reject(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            match &mut self.phase {
                Phase::Reject {
                    answer,
                    written,
                    linger,
                } => {
                    while *written < answer.len() {
                        let n =
                            ready!(Pin::new(&mut self.inner).poll_write(cx, &answer[*written..]))?;
                        if n == 0 {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                        }
                        *written += n;
                    }
                    let linger = *linger;
                    ready!(self.poll_close_write(cx))?;
                    if linger {
                        self.start_linger();
                    } else {
                        self.phase = Phase::Done;
                    }
                }
                Phase::Linger { .. } => {
                    ready!(self.poll_linger(cx));
                    self.phase = Phase::Done;
                }
                _ => return Poll::Ready(Ok(())),
            }
        }
    }

    fn poll_close_write(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            ready!(Pin::new(&mut self.inner).poll_flush(cx))?;
            ready!(Pin::new(&mut self.inner).poll_shutdown(cx))?;
            self.write_closed = true;
        }
        Poll::Ready(Ok(()))
    }

    fn start_linger(&mut self) {
        self.phase = Phase::Linger {
            until: Instant::now() + LINGER_TOTAL,
        };
        self.restart_clock(LINGER_IDLE);
    }

    /// Discards input until EOF, an error, `LINGER_IDLE` without a byte, or
    /// `LINGER_TOTAL` in all.
    fn poll_linger(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Phase::Linger { until } = self.phase else {
            return Poll::Ready(());
        };
        let mut scratch = [0u8; 8192];
        loop {
            if Instant::now() >= until {
                return Poll::Ready(());
            }
            let mut buf = ReadBuf::new(&mut scratch);
            match Pin::new(&mut self.inner).poll_read(cx, &mut buf) {
                Poll::Ready(Ok(())) if !buf.filled().is_empty() => {
                    let next = (Instant::now() + LINGER_IDLE).min(until);
                    self.clock.as_mut().reset(next);
                }
                Poll::Ready(_) => return Poll::Ready(()),
                Poll::Pending => {
                    ready!(self.clock.as_mut().poll(cx));
                    return Poll::Ready(());
                }
            }
        }
    }

    fn requests_done(&self) -> bool {
        let finished = self.activity.finished.load(Ordering::Acquire);
        self.activity.in_flight() == 0 && finished >= self.heads
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for DownstreamIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.phase {
                Phase::Done => return Poll::Ready(Ok(())),
                Phase::Reject { .. } | Phase::Linger { .. } => {
                    ready!(this.poll_reject(cx))?;
                    this.phase = Phase::Done;
                }
                Phase::Busy => {
                    if this.requests_done() {
                        if this.activity.linger.load(Ordering::Acquire) {
                            // The proxy answered without reading the body:
                            // what follows is body, not a head. hyper gets
                            // EOF and shuts down, which lingers.
                            this.phase = Phase::Done;
                            continue;
                        }
                        this.phase = Phase::Idle;
                        this.restart_clock(this.limits.keepalive_timeout);
                        continue;
                    }
                    this.activity.reader.register(cx.waker());
                    return Pin::new(&mut this.inner).poll_read(cx, buf);
                }
                Phase::H2 { idle_since } => {
                    let idle_since = *idle_since;
                    let read = Pin::new(&mut this.inner).poll_read(cx, buf);
                    if read.is_ready() {
                        return read;
                    }
                    this.activity.reader.register(cx.waker());
                    if this.activity.in_flight() > 0 {
                        this.phase = Phase::H2 { idle_since: None };
                        return Poll::Pending;
                    }
                    let finished = this.activity.finished.load(Ordering::Acquire);
                    if idle_since != Some(finished) {
                        this.phase = Phase::H2 {
                            idle_since: Some(finished),
                        };
                        this.restart_clock(this.limits.keepalive_timeout);
                    }
                    ready!(this.clock.as_mut().poll(cx));
                    this.phase = Phase::Done;
                    return Poll::Ready(Ok(()));
                }
                Phase::Idle | Phase::Head(_) => {
                    // A request hyper parsed on its own (pipelined, or a
                    // head this scan has not finished) is in flight.
                    let started = this.activity.started.load(Ordering::Acquire);
                    if started > this.heads {
                        this.heads = started;
                        this.phase = Phase::Busy;
                        continue;
                    }
                    let before = buf.filled().len();
                    match Pin::new(&mut this.inner).poll_read(cx, buf) {
                        Poll::Ready(Ok(())) => {}
                        Poll::Ready(Err(error)) => return Poll::Ready(Err(error)),
                        Poll::Pending => {
                            ready!(this.clock.as_mut().poll(cx));
                            match this.phase {
                                // Nothing of a request was sent: close
                                // quietly, as nginx does.
                                Phase::Idle => this.phase = Phase::Done,
                                _ => this.reject(Reject::Timeout),
                            }
                            continue;
                        }
                    }
                    let read = &buf.filled()[before..];
                    if read.is_empty() {
                        return Poll::Ready(Ok(()));
                    }
                    if let Phase::Idle = this.phase {
                        // The first head keeps the clock that started at
                        // the accept; later heads start it at their first
                        // byte.
                        if this.heads > 0 {
                            this.restart_clock(this.limits.header_timeout);
                        }
                        this.phase = Phase::Head(HeadScan::default());
                    }
                    let Phase::Head(scan) = &mut this.phase else {
                        return Poll::Ready(Ok(()));
                    };
                    match scan.scan(read, &this.limits).0 {
                        Scanned::Partial => {}
                        Scanned::Complete => {
                            this.heads += 1;
                            this.phase = Phase::Busy;
                        }
                        Scanned::H2 => this.phase = Phase::H2 { idle_since: None },
                        Scanned::Reject(reject) => {
                            // hyper never sees the bytes past the limit.
                            buf.set_filled(before);
                            this.reject(reject);
                            continue;
                        }
                    }
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for DownstreamIo<S> {
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

    /// Shuts the write side, then lingers if the proxy answered without
    /// reading a request body.
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_close_write(cx))?;
        if this.activity.linger.swap(false, Ordering::AcqRel) {
            this.start_linger();
        }
        if let Phase::Linger { .. } = this.phase {
            ready!(this.poll_linger(cx));
            this.phase = Phase::Done;
        }
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests;
