//! `DownstreamIo` over an in-memory pipe: the test plays the client on one
//! end and hyper (a reader) on the other.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{duplex, AsyncReadExt, AsyncWriteExt, DuplexStream};

use super::{Activity, DownstreamIo, Limits};

const LIMITS: Limits = Limits {
    header_timeout: Duration::from_millis(300),
    keepalive_timeout: Duration::from_millis(150),
    max_line: 64,
    max_head: 256,
};

struct Pipe {
    client: DuplexStream,
    io: DownstreamIo<DuplexStream>,
    activity: Arc<Activity>,
}

fn pipe(h2: bool) -> Pipe {
    let (client, server) = duplex(1 << 16);
    let activity = Arc::new(Activity::default());
    Pipe {
        client,
        io: DownstreamIo::new(server, LIMITS, Arc::clone(&activity), h2),
        activity,
    }
}

/// Reads what hyper would see until EOF; errs if EOF does not come within
/// `within`.
async fn read_to_eof(io: &mut DownstreamIo<DuplexStream>, within: Duration) -> Result<Vec<u8>, ()> {
    let mut seen = Vec::new();
    tokio::time::timeout(within, io.read_to_end(&mut seen))
        .await
        .map_err(|_| ())?
        .map_err(|_| ())?;
    Ok(seen)
}

/// Sends `request` and stalls; checks the gateway's answer (none when
/// `expect_status` is `None`) and that hyper saw a prefix of the request no
/// longer than `hyper_sees_at_most` (all of it when the head timed out).
async fn check(request: &[u8], expect_status: Option<&str>, hyper_sees_at_most: usize) {
    let Pipe {
        mut client,
        mut io,
        activity: _activity,
    } = pipe(false);
    client.write_all(request).await.expect("pipe write");
    let hyper = tokio::spawn(async move { read_to_eof(&mut io, Duration::from_secs(3)).await });
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), client.read_to_end(&mut answer))
        .await
        .expect("the gateway closes the connection")
        .expect("pipe read");
    // The gateway lingers until the client is done sending.
    client.shutdown().await.expect("pipe shutdown");
    let seen = hyper.await.expect("reader task").expect("hyper sees EOF");
    let answer = String::from_utf8_lossy(&answer);
    match expect_status {
        None => assert_eq!(answer, "", "no answer for {request:?}"),
        Some(status) => {
            assert!(
                answer.starts_with(&format!("HTTP/1.1 {status}")),
                "{answer}"
            );
            assert!(answer.contains("Connection: close\r\n"), "{answer}");
            let body = answer.split("\r\n\r\n").nth(1).unwrap_or("");
            assert!(
                serde_json::from_str::<serde_json::Value>(body)
                    .is_ok_and(|v| v["message"].is_string()),
                "{answer}"
            );
        }
    }
    assert!(
        request.starts_with(&seen) && seen.len() <= hyper_sees_at_most,
        "hyper saw {:?}",
        String::from_utf8_lossy(&seen)
    );
    if matches!(expect_status, None | Some("408")) {
        assert_eq!(seen, request);
    }
}

#[tokio::test]
async fn heads_over_the_limits_get_json_answers() {
    let long_line = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(100));
    check(long_line.as_bytes(), Some("414"), LIMITS.max_line).await;

    let long_header = format!("GET / HTTP/1.1\r\nCookie: {}\r\n\r\n", "c".repeat(100));
    check(long_header.as_bytes(), Some("431"), LIMITS.max_head).await;

    let many_headers = format!("GET / HTTP/1.1\r\n{}\r\n", "X-A: 1234567890\r\n".repeat(20));
    check(many_headers.as_bytes(), Some("431"), LIMITS.max_head).await;
}

#[tokio::test]
async fn partial_heads_time_out_with_408() {
    check(b"GET / HTTP/1.1\r\nHost: a", Some("408"), usize::MAX).await;
}

#[tokio::test]
async fn silent_connections_close_without_an_answer() {
    check(b"", None, 0).await;
    // Empty lines before a request line are allowed, but they start the
    // header clock.
    check(b"\r\n\r\n", Some("408"), usize::MAX).await;
}

#[tokio::test]
async fn a_request_in_flight_never_times_out() {
    let Pipe {
        mut client,
        mut io,
        activity,
    } = pipe(false);
    client
        .write_all(b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n")
        .await
        .expect("pipe write");
    let mut buf = [0u8; 256];
    let n = io.read(&mut buf).await.expect("head");
    assert_eq!(&buf[..n], b"POST / HTTP/1.1\r\nContent-Length: 3\r\n\r\n");
    let request = activity.start();
    // Longer than both timeouts: the body may be slow, the upstream too.
    tokio::time::sleep(LIMITS.header_timeout * 2).await;
    client.write_all(b"abc").await.expect("pipe write");
    let n = io.read(&mut buf).await.expect("body");
    assert_eq!(&buf[..n], b"abc");
    drop(request);

    // Idle now: the keep-alive clock runs from the end of the response.
    let started = Instant::now();
    let rest = read_to_eof(&mut io, Duration::from_secs(2))
        .await
        .expect("closed when idle");
    assert!(rest.is_empty());
    let idle = started.elapsed();
    assert!(
        idle >= LIMITS.keepalive_timeout && idle < LIMITS.header_timeout,
        "{idle:?}"
    );
}

#[tokio::test]
async fn keep_alive_heads_get_their_own_clock() {
    let Pipe {
        mut client,
        mut io,
        activity,
    } = pipe(false);
    let mut buf = [0u8; 256];
    client
        .write_all(b"GET /1 HTTP/1.1\r\n\r\n")
        .await
        .expect("pipe write");
    let n = io.read(&mut buf).await.expect("first head");
    assert_eq!(&buf[..n], b"GET /1 HTTP/1.1\r\n\r\n");
    drop(activity.start());
    // The second head starts before the keep-alive timeout, then stalls.
    client
        .write_all(b"GET /2 HTTP/1.1\r\n")
        .await
        .expect("pipe write");
    let seen = read_to_eof(&mut io, Duration::from_secs(2))
        .await
        .expect("closed after the header timeout");
    assert_eq!(seen, b"GET /2 HTTP/1.1\r\n");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut answer))
        .await
        .expect("closed")
        .expect("pipe read");
    assert!(
        answer.starts_with(b"HTTP/1.1 408 "),
        "{}",
        String::from_utf8_lossy(&answer)
    );
}

#[tokio::test]
async fn http2_connections_close_only_when_idle() {
    let Pipe {
        mut client,
        mut io,
        activity,
    } = pipe(false);
    client
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .expect("pipe write");
    let mut buf = [0u8; 256];
    let n = io.read(&mut buf).await.expect("preface");
    assert_eq!(n, 24);
    let stream = activity.start();
    tokio::time::sleep(LIMITS.header_timeout * 2).await;
    client.write_all(b"frames").await.expect("pipe write");
    let n = io.read(&mut buf).await.expect("frames");
    assert_eq!(&buf[..n], b"frames");
    drop(stream);
    let rest = read_to_eof(&mut io, Duration::from_secs(2))
        .await
        .expect("closed when idle");
    assert!(rest.is_empty());
    // hyper drops the connection after EOF.
    drop(io);
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(2), client.read_to_end(&mut answer))
        .await
        .expect("closed")
        .expect("pipe read");
    assert!(answer.is_empty(), "no HTTP/1 answer on an h2 connection");

    // ALPN h2 starts in that mode.
    let Pipe {
        client: _client,
        mut io,
        ..
    } = pipe(true);
    let rest = read_to_eof(&mut io, Duration::from_secs(2))
        .await
        .expect("closed when idle");
    assert!(rest.is_empty());
}
