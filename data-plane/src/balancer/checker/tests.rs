use std::time::Duration;

use gatehouse_model::snapshot::Healthchecks;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpListener;

use super::*;
use crate::balancer::health::Checks;

/// Probes a loopback server that answers `reply` (`None`: nothing listens;
/// `Some("")`: accept and stay silent) with an `kind` check, and compares
/// the outcome. Also checks the request the server saw.
async fn check(kind: &str, reply: Option<&'static str>, expect: Outcome) {
    let mut config = Healthchecks::default();
    config.active.kind = kind.to_owned();
    config.active.timeout = 0.2;
    config.active.http_path = "/status".to_owned();
    config.active.healthy.interval = 1.0;
    config.active.headers = Some([("x-probe".to_owned(), vec!["1".to_owned()])].into());
    let checks = Checks::new(&config);
    let active = checks.active.as_ref().expect("active checks");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("address");
    let server = match reply {
        None => {
            drop(listener);
            None
        }
        Some(reply) => Some(tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.expect("accept");
            let mut seen = Vec::new();
            let mut buf = [0u8; 512];
            while !seen.ends_with(b"\r\n\r\n") {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => seen.extend_from_slice(&buf[..n]),
                }
            }
            if reply.is_empty() {
                tokio::time::sleep(Duration::from_secs(1)).await;
            } else {
                let _ = stream.write_all(reply.as_bytes()).await;
            }
            String::from_utf8_lossy(&seen).into_owned()
        })),
    };
    let outcome = probe(address, active, "example.test").await;
    assert_eq!(outcome, expect, "{kind} {reply:?}");
    if let (Some(server), "http", Some(reply)) = (server, kind, reply) {
        if !reply.is_empty() {
            let seen = server.await.expect("server");
            assert_eq!(
                seen,
                "GET /status HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\nx-probe: 1\r\n\r\n"
            );
        }
    }
}

#[tokio::test]
async fn probes() {
    let cases = [
        (
            "http",
            Some("HTTP/1.1 200 OK\r\n\r\n"),
            Outcome::Status(200),
        ),
        (
            "http",
            Some("HTTP/1.0 503 Busy\r\n\r\n"),
            Outcome::Status(503),
        ),
        ("http", Some("garbage\r\n\r\n"), Outcome::Status(0)),
        ("http", None, Outcome::Failed(Report::TcpFailure)),
        ("http", Some(""), Outcome::Failed(Report::Timeout)),
        ("tcp", Some("x"), Outcome::Connected),
        ("tcp", None, Outcome::Failed(Report::TcpFailure)),
    ];
    for (kind, reply, expect) in cases {
        check(kind, reply, expect).await;
    }
}

#[test]
fn status_lines() {
    for (line, expect) in [
        ("HTTP/1.1 204 No Content\r\n", 204),
        ("http/1.0  302\r\n", 302),
        ("HTTP/2 200\r\n", 0),
        ("HTTP/1.1\r\n", 0),
        ("", 0),
    ] {
        assert_eq!(status_code(line.as_bytes()), expect, "{line:?}");
    }
}
