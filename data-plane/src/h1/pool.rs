//! Keep-alive connections to plaintext HTTP/1.1 upstreams, one pool per
//! worker thread keyed by peer address, so that taking and returning a
//! connection touches no lock and no other task. Kong's defaults apply:
//! `upstream_keepalive_pool_size` 512 per address,
//! `upstream_keepalive_max_requests` 10,000, and
//! `upstream_keepalive_idle_timeout` 60 s.
//!
//! An idle connection is not watched by a task. Its socket stays
//! registered with the reactor, so a close by the upstream marks it
//! readable; checking that readiness when the connection is taken is free,
//! and only a readable one costs a read to tell a close from stray bytes.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use std::time::Instant;
use tokio::net::TcpStream;

const MAX_IDLE_PER_ADDRESS: usize = 512;
const MAX_REQUESTS: u32 = 10_000;
const IDLE_TIMEOUT: Duration = Duration::from_secs(60);
/// How often a thread drops the expired idle connections of every address.
const SWEEP_EVERY: Duration = Duration::from_secs(10);
/// The read buffer an upstream connection starts with.
const READ_BUFFER: usize = 8 * 1024;

/// One connection to an upstream, with the buffer its responses are read
/// into.
pub(crate) struct UpstreamConn {
    pub(crate) stream: TcpStream,
    pub(crate) buf: BytesMut,
    /// Requests sent on this connection, the current one included.
    requests: u32,
    /// Taken from the pool rather than opened for this request: a failure
    /// before the first response byte may just be a close that raced the
    /// request.
    pub(crate) reused: bool,
}

struct Idle {
    conn: UpstreamConn,
    since: Instant,
}

#[derive(Default)]
struct Pool {
    /// Keyed by addresses the configuration names, looked up twice per
    /// request: a fast hash, as no client chooses the keys.
    idle: HashMap<Box<str>, Vec<Idle>, foldhash::fast::RandomState>,
    last_sweep: Option<Instant>,
}

thread_local! {
    static POOL: RefCell<Pool> = RefCell::new(Pool::default());
}

/// A live idle connection to `authority`, if this thread has one. `now`
/// is a recent instant the caller already read.
pub(crate) fn take(authority: &str, now: Instant) -> Option<UpstreamConn> {
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        let idle = pool.idle.get_mut(authority)?;
        // Most recently used first: it is the least likely to have been
        // closed by the upstream's own idle timeout.
        while let Some(Idle { mut conn, since }) = idle.pop() {
            if now.saturating_duration_since(since) < IDLE_TIMEOUT && is_quiet(&conn.stream) {
                conn.requests += 1;
                conn.reused = true;
                return Some(conn);
            }
        }
        None
    })
}

/// Returns a connection whose last response was read completely; `now` is
/// a recent instant the caller already read.
pub(crate) fn put(authority: &str, conn: UpstreamConn, now: Instant) {
    if conn.requests >= MAX_REQUESTS || !conn.buf.is_empty() {
        return;
    }
    POOL.with(|pool| {
        let mut pool = pool.borrow_mut();
        if pool
            .last_sweep
            .is_none_or(|last| now.saturating_duration_since(last) >= SWEEP_EVERY)
        {
            pool.last_sweep = Some(now);
            pool.idle.retain(|_, idle| {
                idle.retain(|entry| now.saturating_duration_since(entry.since) < IDLE_TIMEOUT);
                !idle.is_empty()
            });
        }
        let idle = match pool.idle.get_mut(authority) {
            Some(idle) => idle,
            None => pool.idle.entry(authority.into()).or_default(),
        };
        if idle.len() < MAX_IDLE_PER_ADDRESS {
            idle.push(Idle { conn, since: now });
        }
    });
}

/// Opens a connection to `authority` within `timeout`.
pub(crate) async fn connect(authority: &str, timeout: Duration) -> io::Result<UpstreamConn> {
    let connect = async {
        let stream = match authority.parse::<SocketAddr>() {
            Ok(addr) => TcpStream::connect(addr).await?,
            // Peers are resolved addresses; a name here is resolved by the
            // system, as a last resort.
            Err(_) => TcpStream::connect(authority).await?,
        };
        stream.set_nodelay(true)?;
        Ok::<_, io::Error>(stream)
    };
    let stream = tokio::time::timeout(timeout, connect)
        .await
        .map_err(|_elapsed| io::Error::new(io::ErrorKind::TimedOut, "connect timed out"))??;
    Ok(UpstreamConn {
        stream,
        buf: BytesMut::with_capacity(READ_BUFFER),
        requests: 1,
        reused: false,
    })
}

/// Whether an idle connection is still open with nothing to read. Only a
/// socket the reactor saw become readable is read from.
fn is_quiet(stream: &TcpStream) -> bool {
    let mut cx = Context::from_waker(Waker::noop());
    match stream.poll_read_ready(&mut cx) {
        Poll::Pending => true,
        Poll::Ready(Err(_)) => false,
        Poll::Ready(Ok(())) => {
            let mut probe = [0u8; 1];
            matches!(stream.try_read(&mut probe), Err(error) if error.kind() == io::ErrorKind::WouldBlock)
        }
    }
}
