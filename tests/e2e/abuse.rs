//! Abusive clients and upstreams against a real `gatehouse` process: huge
//! heads and bodies, slowloris connections, an upstream that resets
//! mid-response. The gateway answers with Kong's JSON, keeps its memory
//! bounded and keeps serving everyone else.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gatehouse_test_support::{assert_eventually, raw_request, EchoUpstream, Gatehouse};
use serde_json::{json, Value};

use crate::{client, BIN};

async fn echo_route(g: &Gatehouse, up: SocketAddr) {
    let c = client();
    let r = c
        .post(format!("{}/services", g.admin))
        .json(&json!({"name": "echo", "url": format!("http://{up}")}))
        .send()
        .await
        .expect("post service");
    assert_eq!(r.status(), 201);
    let r = c
        .post(format!("{}/services/echo/routes", g.admin))
        .json(&json!({"paths": ["/echo"]}))
        .send()
        .await
        .expect("post route");
    assert_eq!(r.status(), 201);
    assert_eventually!(
        matches!(
            raw_request(g.proxy_addr, "GET", "/echo", &[], b""),
            Ok((200, _))
        ),
        "route never became active:\n{}",
        g.log_text()
    );
}

/// Status and body of a raw HTTP/1 answer.
fn parse(raw: &[u8]) -> (u16, Vec<u8>) {
    let text = String::from_utf8_lossy(raw);
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let body = match raw.windows(4).position(|w| w == b"\r\n\r\n") {
        Some(i) => raw[i + 4..].to_vec(),
        None => Vec::new(),
    };
    (status, body)
}

/// Sends `head` then `total` body bytes (chunked when `chunked`), while
/// reading the answer; stops sending once the answer is in.
fn upload(addr: SocketAddr, head: &str, total: usize, chunked: bool) -> (u16, Vec<u8>) {
    let stream = TcpStream::connect(addr).expect("connect");
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut writer = stream.try_clone().expect("clone");
    let done = Arc::new(AtomicBool::new(false));
    let sending = {
        let done = Arc::clone(&done);
        let head = head.to_owned();
        std::thread::spawn(move || {
            if writer.write_all(head.as_bytes()).is_err() {
                return;
            }
            let chunk = vec![b'a'; 64 * 1024];
            let mut sent = 0;
            while sent < total && !done.load(Ordering::Acquire) {
                let n = chunk.len().min(total - sent);
                let ok = if chunked {
                    writer
                        .write_all(format!("{n:x}\r\n").as_bytes())
                        .and_then(|()| writer.write_all(&chunk[..n]))
                        .and_then(|()| writer.write_all(b"\r\n"))
                } else {
                    writer.write_all(&chunk[..n])
                };
                if ok.is_err() {
                    return;
                }
                sent += n;
            }
            if chunked {
                let _ = writer.write_all(b"0\r\n\r\n");
            }
        })
    };
    let mut reader = stream;
    let mut raw = Vec::new();
    let mut buf = [0u8; 4096];
    // The answer is small and ends with the connection.
    loop {
        match reader.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => raw.extend_from_slice(&buf[..n]),
        }
        if raw.windows(4).any(|w| w == b"\r\n\r\n") && raw.ends_with(b"}") {
            break;
        }
    }
    done.store(true, Ordering::Release);
    drop(reader);
    let _ = sending.join();
    parse(&raw)
}

fn message(body: &[u8]) -> String {
    let v: Value = serde_json::from_slice(body)
        .unwrap_or_else(|_| panic!("JSON body, got {:?}", String::from_utf8_lossy(body)));
    v["message"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test]
async fn oversized_heads_and_bodies_get_kong_errors_in_bounded_memory() {
    let up = EchoUpstream::start();
    let mut g = Gatehouse::start(BIN, &[("GATEHOUSE_NGINX_HTTP_CLIENT_MAX_BODY_SIZE", "10m")]);
    echo_route(&g, up.addr).await;
    let proxy = g.proxy_addr;

    // A 64 KB header against nginx's 4 × 8k buffers.
    let head = format!(
        "GET /echo HTTP/1.1\r\nHost: a\r\nX-Big: {}\r\n\r\n",
        "b".repeat(64 * 1024)
    );
    let (status, body) = upload(proxy, &head, 0, false);
    assert_eq!(status, 431);
    assert_eq!(message(&body), "Request header or cookie too large");

    let before = g.peak_rss_kib();
    let hundred_mb = 100 * 1024 * 1024;
    let head = format!("POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: {hundred_mb}\r\n\r\n");
    let (status, body) = upload(proxy, &head, hundred_mb, false);
    assert_eq!(status, 413);
    assert_eq!(message(&body), "Request size limit exceeded");
    // Without a length the body streams upstream until the limit.
    let head = "POST /echo HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
    let (status, body) = upload(proxy, head, hundred_mb, true);
    assert_eq!(status, 413);
    assert_eq!(message(&body), "Request size limit exceeded");
    let grown_kib = g.peak_rss_kib().saturating_sub(before);
    assert!(
        grown_kib < 32 * 1024,
        "peak RSS grew by {grown_kib} KiB for 100 MB bodies"
    );

    // Bodies under the limit still pass, and the process is fine.
    let (status, body) = upload(
        proxy,
        "POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1048576\r\nConnection: close\r\n\r\n",
        1024 * 1024,
        false,
    );
    assert_eq!(status, 200);
    let seen: Value = serde_json::from_slice(&body).expect("echo json");
    assert_eq!(seen["body_len"], 1024 * 1024);
    assert!(g.is_running());
}

#[tokio::test]
async fn slowloris_connections_time_out_while_others_are_served() {
    let up = EchoUpstream::start();
    let mut g = Gatehouse::start(BIN, &[("GATEHOUSE_NGINX_HTTP_CLIENT_HEADER_TIMEOUT", "2s")]);
    echo_route(&g, up.addr).await;
    let proxy = g.proxy_addr;

    let mut slow = Vec::with_capacity(1000);
    for _ in 0..1000 {
        let mut stream = TcpStream::connect(proxy).expect("connect");
        stream
            .write_all(b"GET /echo HTTP/1.1\r\nHost: a\r\nX-Slow: ")
            .expect("partial head");
        slow.push(stream);
    }
    for _ in 0..20 {
        let (status, _) = raw_request(proxy, "GET", "/echo", &[], b"").expect("request");
        assert_eq!(status, 200, "normal clients are served meanwhile");
    }
    for stream in &mut slow {
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .expect("closed after the header timeout");
        let (status, body) = parse(&answer);
        assert_eq!(status, 408);
        assert_eq!(message(&body), "Request timeout");
    }
    let (status, _) = raw_request(proxy, "GET", "/echo", &[], b"").expect("request");
    assert_eq!(status, 200);
    assert!(g.is_running());
}

/// An upstream that reads a request head, answers with `answer` and
/// closes without reading the request body, which resets the connection.
fn resetting_upstream(answer: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let mut reader = BufReader::new(stream);
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let _ = reader.get_mut().write_all(answer);
        }
    });
    addr
}

#[tokio::test]
async fn upstream_resets_mid_response_do_not_hurt_the_gateway() {
    let up = EchoUpstream::start();
    let mut g = Gatehouse::start(BIN, &[]);
    echo_route(&g, up.addr).await;
    let c = client();
    for (name, answer) in [
        ("before-head", &b""[..]),
        (
            "mid-body",
            &b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\npartial"[..],
        ),
    ] {
        let addr = resetting_upstream(answer);
        c.post(format!("{}/services", g.admin))
            .json(&json!({"name": name, "url": format!("http://{addr}")}))
            .send()
            .await
            .expect("post service");
        c.post(format!("{}/services/{name}/routes", g.admin))
            .json(&json!({"paths": [format!("/{name}")]}))
            .send()
            .await
            .expect("post route");
    }
    let body = vec![b'x'; 256 * 1024];
    assert_eventually!(
        matches!(
            raw_request(g.proxy_addr, "POST", "/before-head", &[], &body),
            Ok((502, _))
        ),
        "a reset before the response head must give 502:\n{}",
        g.log_text()
    );
    // The head went out already: the client gets it and a cut body.
    for _ in 0..3 {
        match raw_request(g.proxy_addr, "POST", "/mid-body", &[], &body) {
            Ok((status, received)) => {
                // A 502, a 200 with a cut body, or (when the reset beat
                // the first body byte, and hyper had not flushed the head)
                // a connection closed without a byte.
                let closed_empty = status == 0 && received.is_empty();
                assert!(
                    status == 502 || (status == 200 && received.len() < 1_000_000) || closed_empty,
                    "{status} with {} body bytes",
                    received.len()
                );
            }
            // A reset reaching the client is a fine outcome too.
            Err(error) => assert_ne!(error.kind(), std::io::ErrorKind::WouldBlock),
        }
    }
    let (status, _) = raw_request(g.proxy_addr, "GET", "/echo", &[], b"").expect("request");
    assert_eq!(status, 200);
    assert!(g.is_running());
}
