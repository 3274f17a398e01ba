//! Transformation and caching plugins (request-transformer,
//! response-transformer, correlation-id, proxy-cache) through a real proxy.
//! The expectations come from Kong 3.9's `kong/plugins/<name>/*.lua`, not
//! from our implementation.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::time::Duration;

use serde_json::{json, Value};

use crate::plugins::{Answer, Setup};

/// A loopback HTTP/1.1 upstream that keeps what the echo upstream drops:
/// every request header line, repeats included, in order. It answers with
/// the response the request asks for: each `x-reply-<name>: <value>`
/// request header becomes a `<name>: <value>` response header, and
/// `x-reply-body` replaces the JSON echo as the body (typed
/// application/json unless `x-reply-content-type` says otherwise).
fn mirror() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            std::thread::spawn(move || {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(30)));
                let mut reader = BufReader::new(stream);
                while let Some(request) = read_request(&mut reader) {
                    let (method, path, headers, body) = request;
                    let mut reply_headers = Vec::new();
                    let mut reply_body = None;
                    for (name, value) in &headers {
                        match name.strip_prefix("x-reply-") {
                            Some("body") => reply_body = Some(value.clone()),
                            Some(name) => reply_headers.push((name.to_owned(), value.clone())),
                            None => {}
                        }
                    }
                    if !reply_headers.iter().any(|(n, _)| n == "content-type") {
                        reply_headers.push(("content-type".into(), "application/json".into()));
                    }
                    let body = reply_body.unwrap_or_else(|| {
                        json!({"method": method, "path": path, "headers": headers,
                               "body": String::from_utf8_lossy(&body)})
                        .to_string()
                    });
                    let mut out = String::from("HTTP/1.1 200 OK\r\n");
                    for (name, value) in reply_headers {
                        out.push_str(&format!("{name}: {value}\r\n"));
                    }
                    out.push_str(&format!("content-length: {}\r\n\r\n{body}", body.len()));
                    let writer = reader.get_mut();
                    if writer.write_all(out.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

type Request = (String, String, Vec<(String, String)>, Vec<u8>);

fn read_request<R: BufRead>(reader: &mut R) -> Option<Request> {
    let mut line = String::new();
    if reader.read_line(&mut line).ok()? == 0 {
        return None;
    }
    let mut parts = line.split_whitespace();
    let method = parts.next()?.to_owned();
    let path = parts.next()?.to_owned();
    let mut headers = Vec::new();
    let (mut length, mut chunked) = (0usize, false);
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).ok()? == 0 {
            return None;
        }
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let Some((name, value)) = h.split_once(':') else {
            continue;
        };
        let (name, value) = (name.trim().to_ascii_lowercase(), value.trim().to_owned());
        if name == "content-length" {
            length = value.parse().ok()?;
        }
        if name == "transfer-encoding" && value.eq_ignore_ascii_case("chunked") {
            chunked = true;
        }
        headers.push((name, value));
    }
    let body = if chunked {
        read_chunked(reader)?
    } else {
        let mut body = vec![0; length];
        reader.read_exact(&mut body).ok()?;
        body
    };
    Some((method, path, headers, body))
}

fn read_chunked<R: BufRead>(reader: &mut R) -> Option<Vec<u8>> {
    let mut body = Vec::new();
    loop {
        let mut size = String::new();
        reader.read_line(&mut size).ok()?;
        let size = usize::from_str_radix(size.trim().split(';').next()?, 16).ok()?;
        if size == 0 {
            loop {
                let mut trailer = String::new();
                reader.read_line(&mut trailer).ok()?;
                if trailer.trim_end().is_empty() {
                    return Some(body);
                }
            }
        }
        let start = body.len();
        body.resize(start + size, 0);
        reader.read_exact(&mut body[start..]).ok()?;
        let mut crlf = [0u8; 2];
        reader.read_exact(&mut crlf).ok()?;
    }
}

/// Every value of a request header as the mirror upstream saw it, in order.
fn seen(a: &Answer, name: &str) -> Vec<String> {
    a.json()["headers"]
        .as_array()
        .expect("mirror headers")
        .iter()
        .filter(|pair| pair[0] == name)
        .map(|pair| pair[1].as_str().expect("value").to_owned())
        .collect()
}

/// Every value of a response header, in order.
fn all(a: &Answer, name: &str) -> Vec<String> {
    a.headers
        .get_all(name)
        .iter()
        .map(|v| v.to_str().expect("ascii").to_owned())
        .collect()
}

/// A service pointing at `upstream` with one route on `paths`; the route id.
async fn route_to(s: &Setup, name: &str, paths: &[&str], upstream: SocketAddr) -> String {
    s.post(
        "/services",
        json!({"name": name, "url": format!("http://{upstream}")}),
    )
    .await;
    let r = s
        .post(
            &format!("/services/{name}/routes"),
            json!({"name": name, "paths": paths}),
        )
        .await;
    r["id"].as_str().expect("id").to_owned()
}

/// A form body as sorted (name, value) pairs.
fn form_pairs(body: &str) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = body
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (k.to_owned(), v.to_owned())
        })
        .collect();
    pairs.sort();
    pairs
}

/// POST with `Transfer-Encoding: chunked` over a raw connection, the chunks
/// written apart; the status and the (de-chunked) body.
fn post_chunked(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    chunks: &[&str],
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: {content_type}\r\nTransfer-Encoding: chunked\r\n\r\n"
    );
    s.write_all(head.as_bytes()).expect("head");
    for chunk in chunks {
        s.write_all(format!("{:x}\r\n{chunk}\r\n", chunk.len()).as_bytes())
            .expect("chunk");
        s.flush().expect("flush");
        std::thread::sleep(Duration::from_millis(50));
    }
    s.write_all(b"0\r\n\r\n").expect("last chunk");
    let (status, _, body) = read_response(&mut BufReader::new(s));
    (status, String::from_utf8(body).expect("utf-8"))
}

/// Reads one response: the status, the header lines (lower-case names)
/// and the body, by its length or its chunks.
fn read_response<R: BufRead>(reader: &mut R) -> (u16, Vec<(String, String)>, Vec<u8>) {
    let mut status_line = String::new();
    reader.read_line(&mut status_line).expect("status line");
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("status");
    let mut headers = Vec::new();
    loop {
        let mut h = String::new();
        reader.read_line(&mut h).expect("header");
        let h = h.trim_end();
        if h.is_empty() {
            break;
        }
        let (name, value) = h.split_once(':').expect("header line");
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let header = |name: &str| {
        headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.clone())
    };
    let body = if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        read_chunked(reader).expect("chunked body")
    } else if let Some(n) = header("content-length") {
        let mut body = vec![0; n.parse().expect("length")];
        reader.read_exact(&mut body).expect("body");
        body
    } else {
        let mut body = Vec::new();
        reader.read_to_end(&mut body).expect("body");
        body
    };
    (status, headers, body)
}

/// `GET path` `n` times on one keep-alive connection; each response's
/// headers.
fn gets_on_one_connection(addr: SocketAddr, path: &str, n: usize) -> Vec<Vec<(String, String)>> {
    let s = TcpStream::connect(addr).expect("connect");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut reader = BufReader::new(s);
    (0..n)
        .map(|_| {
            let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n");
            reader
                .get_mut()
                .write_all(request.as_bytes())
                .expect("request");
            let (status, headers, _) = read_response(&mut reader);
            assert_eq!(status, 200);
            headers
        })
        .collect()
}

#[tokio::test]
async fn request_transformer_rewrites_headers_query_body_method_and_uri() {
    let mut s = Setup::start();
    let mirror = mirror();
    route_to(&s, "rt-h", &["/rt-h"], mirror).await;
    s.service_route("rt-b", &["/rt-b"]).await;
    s.service_route("rt-m", &["/rt-m"]).await;
    s.service_route("rt-u", &[r"~/rt-u/(?<user>[a-z]+)$"]).await;
    s.post(
        "/routes/rt-h/plugins",
        json!({"name": "request-transformer", "config": {
            "remove": {"headers": ["x-remove"], "querystring": ["qr"]},
            "rename": {"headers": ["x-old:x-new"], "querystring": ["qo:qn"]},
            "replace": {"headers": ["x-rep:replaced", "x-absent:nope", "host:rewritten.test"],
                        "querystring": ["qp:new", "qabsent:nope"]},
            "add": {"headers": ["x-add:added", "x-keep:ignored",
                                "x-tpl:$(headers[\"x-src\"])-$(query_params.qs)",
                                "x-was:$(headers['x-remove'])", "x-host:$(headers.host)"],
                    "querystring": ["qa:1", "qk:ignored", "qt:$(headers.x_src)"]},
            "append": {"headers": ["x-app:one", "x-app:two", "x-keep:more"],
                       "querystring": ["qapp:1", "qapp:2:3"]}
        }}),
    )
    .await;
    s.post(
        "/routes/rt-b/plugins",
        json!({"name": "request-transformer", "config": {
            "remove": {"body": ["secret"]},
            "rename": {"body": ["old:new"]},
            "replace": {"body": ["rep:replaced", "absent:nope"]},
            "add": {"body": ["added:yes", "keep:ignored"]},
            "append": {"body": ["list:x"]}
        }}),
    )
    .await;
    s.post(
        "/routes/rt-m/plugins",
        json!({"name": "request-transformer", "config": {"http_method": "GET"}}),
    )
    .await;
    s.post(
        "/routes/rt-u/plugins",
        json!({"name": "request-transformer", "config": {
            "replace": {"uri": "/users/$(uri_captures.user)/profile"},
            "add": {"querystring": ["id:$(uri_captures[1])"]}
        }}),
    )
    .await;
    s.synced().await;

    // Headers and query string: request-transformer/access.lua
    // transform_headers and transform_querystrings (remove, rename,
    // replace, add, append), templates rendered from the client's request.
    let a = s
        .get(
            "/rt-h?qr=1&qo=2&qp=3&qk=4&qs=q%20s&z=a%2Fb",
            &[
                ("x-remove", "gone"),
                ("x-old", "o"),
                ("x-rep", "r"),
                ("x-keep", "mine"),
                ("x-app", "zero"),
                ("x-src", "S"),
            ],
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    // kong.service.request.set_query: sorted by name, ngx.encode_args escaping.
    assert_eq!(
        a.json()["path"],
        "/?qa=1&qapp=1&qapp=2%3A3&qk=4&qn=2&qp=new&qs=q%20s&qt=S&z=a%2Fb"
    );
    let none: Vec<String> = Vec::new();
    assert_eq!(seen(&a, "x-remove"), none);
    assert_eq!(seen(&a, "x-old"), none);
    assert_eq!(seen(&a, "x-new"), ["o"]);
    assert_eq!(seen(&a, "x-rep"), ["replaced"]);
    assert_eq!(seen(&a, "x-absent"), none);
    assert_eq!(seen(&a, "x-add"), ["added"]);
    assert_eq!(seen(&a, "x-keep"), ["mine", "more"]);
    assert_eq!(seen(&a, "x-app"), ["zero", "one", "two"]);
    assert_eq!(seen(&a, "x-tpl"), ["S-q s"]);
    assert_eq!(seen(&a, "x-was"), ["gone"], "templates see the original");
    let proxy_host = s.g.proxy.trim_start_matches("http://").to_owned();
    assert_eq!(
        seen(&a, "x-host"),
        [proxy_host],
        "templates see the original"
    );
    // Host is replaced even though it is not "present" (transform_headers
    // drops it from the table first, then lets replace set it).
    assert_eq!(seen(&a, "host"), ["rewritten.test"]);
    // Templates render nothing for what the request lacks (pl.template's
    // `tostring(x or '')`); the query string is decoded and re-encoded.
    let plain = s.get("/rt-h?b=2&a=%2f", &[]).await;
    assert_eq!(plain.status, 200, "{}", plain.body);
    assert_eq!(
        plain.json()["path"],
        "/?a=%2F&b=2&qa=1&qapp=1&qapp=2%3A3&qk=ignored&qt="
    );
    assert_eq!(seen(&plain, "x-tpl"), ["-"]);
    assert_eq!(seen(&plain, "x-keep"), ["ignored", "more"]);

    // JSON body: transform_json_body.
    let a = s
        .send(
            "POST",
            "/rt-b",
            &[],
            Some((
                "application/json",
                r#"{"secret":"s","old":"o","rep":"r","keep":"mine","n":1,"list":"a","empty":[],"obj":{"k":"v"}}"#,
            )),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let echo = a.json();
    let sent: Value = serde_json::from_str(echo["body"].as_str().expect("body")).expect("json");
    assert_eq!(
        sent,
        json!({"new": "o", "rep": "replaced", "keep": "mine", "n": 1, "list": ["a", "x"],
               "empty": [], "obj": {"k": "v"}, "added": "yes"})
    );
    assert_eq!(
        a.upstream_header("content-length"),
        Some(echo["body_len"].to_string())
    );
    // Empty: only add and append apply.
    let a = s
        .send("POST", "/rt-b", &[], Some(("application/json", "")))
        .await;
    let sent: Value = serde_json::from_str(a.json()["body"].as_str().expect("body")).expect("json");
    assert_eq!(
        sent,
        json!({"added": "yes", "keep": "ignored", "list": ["x"]})
    );
    // Malformed JSON and other content types go untouched.
    let a = s
        .send("POST", "/rt-b", &[], Some(("application/json", "{oops")))
        .await;
    assert_eq!(a.json()["body"], "{oops");
    let a = s
        .send("POST", "/rt-b", &[], Some(("text/plain", "secret=s&old=o")))
        .await;
    assert_eq!(a.json()["body"], "secret=s&old=o");
    // Form body: transform_url_encoded_body.
    let a = s
        .send(
            "POST",
            "/rt-b",
            &[],
            Some((
                "application/x-www-form-urlencoded",
                "secret=s&old=o&rep=r&keep=mine&list=a",
            )),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    let echo = a.json();
    let body = echo["body"].as_str().expect("body");
    let expected: Vec<(String, String)> = [
        ("added", "yes"),
        ("keep", "mine"),
        ("list", "a"),
        ("list", "x"),
        ("new", "o"),
        ("rep", "replaced"),
    ]
    .iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    assert_eq!(form_pairs(body), expected, "{body}");
    assert_eq!(
        a.upstream_header("content-length"),
        Some(body.len().to_string())
    );

    // A chunked request body is read whole, transformed and sent with its
    // length.
    let addr = s.g.proxy_addr;
    let (status, body) = tokio::task::spawn_blocking(move || {
        post_chunked(
            addr,
            "/rt-b",
            "application/json",
            &[r#"{"secret":"s","#, r#""old":"o"}"#],
        )
    })
    .await
    .expect("chunked request");
    assert_eq!(status, 200, "{body}");
    let echo: Value = serde_json::from_str(&body).expect("echo");
    let sent: Value = serde_json::from_str(echo["body"].as_str().expect("body")).expect("json");
    assert_eq!(
        sent,
        json!({"new": "o", "added": "yes", "keep": "ignored", "list": ["x"]})
    );
    assert_eq!(
        echo["headers"]["content-length"],
        echo["body_len"].to_string()
    );
    assert_eq!(echo["headers"]["transfer-encoding"], Value::Null);

    // http_method: a form body moves into the query string for GET.
    let a = s
        .send(
            "POST",
            "/rt-m?hello=world",
            &[],
            Some(("application/x-www-form-urlencoded", "name=marco")),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["method"], "GET");
    assert_eq!(a.json()["path"], "/?hello=world&name=marco");

    // replace.uri with the route's captures, named and numbered.
    let a = s.get("/rt-u/bob?x=1", &[]).await;
    assert_eq!(a.status, 200, "{}", a.body);
    assert_eq!(a.json()["path"], "/users/bob/profile?id=bob&x=1");
}

fn is_uuid(v: &str) -> bool {
    let groups: Vec<&str> = v.split('-').collect();
    groups.iter().map(|g| g.len()).eq([8, 4, 4, 4, 12])
        && v.chars()
            .all(|c| c == '-' || c.is_ascii_digit() || ('a'..='f').contains(&c))
}

#[tokio::test]
async fn response_transformer_and_correlation_id_shape_what_goes_back() {
    let mut s = Setup::start();
    let mirror = mirror();
    route_to(&s, "rs", &["/rs"], mirror).await;
    for name in ["cid-uuid", "cid-counter", "cid-tracker"] {
        s.service_route(name, &[&format!("/{name}")]).await;
    }
    s.post(
        "/routes/rs/plugins",
        json!({"name": "response-transformer", "config": {
            "remove": {"headers": ["x-drop"], "json": ["secret"]},
            "rename": {"headers": ["x-old:x-new"], "json": ["old:new"]},
            "replace": {"headers": ["x-rep:replaced", "x-absent:nope"],
                        "json": ["rep:replaced", "absent:nope", "num:42"],
                        "json_types": ["string", "string", "number"]},
            "add": {"headers": ["x-add:added", "x-keep:ignored"],
                    "json": ["added:yes", "keep:ignored", "flag:true", "count:7", "path:/a/b"],
                    "json_types": ["string", "string", "boolean", "number", "string"]},
            "append": {"headers": ["x-multi:two", "x-new-multi:one"],
                       "json": ["list:b", "fresh:1"], "json_types": ["string", "number"]}
        }}),
    )
    .await;
    s.post(
        "/routes/cid-uuid/plugins",
        json!({"name": "correlation-id", "config": {"generator": "uuid"}}),
    )
    .await;
    s.post(
        "/routes/cid-counter/plugins",
        json!({"name": "correlation-id", "config": {"echo_downstream": true}}),
    )
    .await;
    s.post(
        "/routes/cid-tracker/plugins",
        json!({"name": "correlation-id", "config": {"generator": "tracker",
               "header_name": "X-Trace", "echo_downstream": true}}),
    )
    .await;
    s.synced().await;

    // response-transformer: header_transformer.lua and body_transformer.lua.
    let upstream_body =
        r#"{"secret":"s","old":"o","rep":"r","num":1,"keep":"mine","list":"a","obj":{"k":"v"}}"#;
    let reply = |content_type: &'static str, body: &'static str| {
        [
            ("x-reply-content-type", content_type),
            ("x-reply-body", body),
            ("x-reply-x-drop", "d"),
            ("x-reply-x-old", "o"),
            ("x-reply-x-rep", "r"),
            ("x-reply-x-keep", "mine"),
            ("x-reply-x-multi", "one"),
        ]
    };
    let check_headers = |a: &Answer| {
        assert_eq!(a.status, 200, "{}", a.body);
        let none: Vec<String> = Vec::new();
        assert_eq!(all(a, "x-drop"), none);
        assert_eq!(all(a, "x-old"), none);
        assert_eq!(all(a, "x-new"), ["o"]);
        assert_eq!(all(a, "x-rep"), ["replaced"]);
        assert_eq!(all(a, "x-absent"), none);
        assert_eq!(all(a, "x-add"), ["added"]);
        assert_eq!(all(a, "x-keep"), ["mine"]);
        assert_eq!(all(a, "x-multi"), ["one", "two"]);
        assert_eq!(all(a, "x-new-multi"), ["one"]);
        if let Some(length) = a.header("content-length") {
            assert_eq!(length, a.body.len().to_string());
        }
    };
    let transformed = json!({"new": "o", "rep": "replaced", "num": 42, "keep": "mine",
        "list": ["a", "b"], "obj": {"k": "v"}, "added": "yes", "flag": true, "count": 7,
        "path": "/a/b", "fresh": [1]});
    for content_type in [
        "application/json",
        "application/json; charset=utf-8",
        "application/problem+json",
    ] {
        let a = s.get("/rs", &reply(content_type, upstream_body)).await;
        check_headers(&a);
        assert_eq!(a.json(), transformed, "{content_type}");
    }
    // Not JSON: the headers change, the body does not.
    let a = s.get("/rs", &reply("text/plain", upstream_body)).await;
    check_headers(&a);
    assert_eq!(a.body, upstream_body);
    assert_eq!(a.header("content-type"), Some("text/plain"));
    // JSON that does not parse is left alone.
    let a = s.get("/rs", &reply("application/json", "not json")).await;
    check_headers(&a);
    assert_eq!(a.body, "not json");

    // correlation-id: correlation-id/handler.lua. uuid, upstream only.
    let first = s.get("/cid-uuid", &[]).await;
    let second = s.get("/cid-uuid", &[]).await;
    let ids: Vec<String> = [&first, &second]
        .iter()
        .map(|a| a.upstream_header("kong-request-id").expect("generated"))
        .collect();
    assert!(ids.iter().all(|id| is_uuid(id)), "{ids:?}");
    assert_ne!(ids[0], ids[1]);
    assert_eq!(first.header("kong-request-id"), None, "not echoed");
    let kept = s.get("/cid-uuid", &[("kong-request-id", "mine")]).await;
    assert_eq!(
        kept.upstream_header("kong-request-id").as_deref(),
        Some("mine")
    );
    let empty = s.get("/cid-uuid", &[("kong-request-id", "")]).await;
    let id = empty.upstream_header("kong-request-id").expect("id");
    assert!(is_uuid(&id), "an empty id is replaced: {id:?}");

    // uuid#counter (the default), echoed downstream.
    let mut counters = Vec::new();
    for _ in 0..2 {
        let a = s.get("/cid-counter", &[]).await;
        let id = a.upstream_header("kong-request-id").expect("id");
        assert_eq!(a.header("kong-request-id"), Some(&*id));
        let (uuid, n) = id.split_once('#').expect("uuid#counter");
        assert!(is_uuid(uuid), "{id}");
        counters.push((uuid.to_owned(), n.parse::<u64>().expect("counter")));
    }
    assert_eq!(counters[0].0, counters[1].0, "one uuid per worker");
    assert_eq!(counters[1].1, counters[0].1 + 1);
    let kept = s.get("/cid-counter", &[("kong-request-id", "mine")]).await;
    assert_eq!(
        kept.upstream_header("kong-request-id").as_deref(),
        Some("mine")
    );
    assert_eq!(kept.header("kong-request-id"), Some("mine"));

    // tracker: server_addr-server_port-pid-connection-connection_requests-now,
    // nginx's $connection (the connection's serial number) and
    // $connection_requests (requests made on it so far); two requests on
    // one keep-alive connection.
    let addr = s.g.proxy_addr;
    let answers =
        tokio::task::spawn_blocking(move || gets_on_one_connection(addr, "/cid-tracker", 2))
            .await
            .expect("requests");
    let mut traces = Vec::new();
    for headers in answers {
        let id = headers
            .iter()
            .find(|(n, _)| n == "x-trace")
            .map(|(_, v)| v.clone())
            .expect("x-trace echoed downstream");
        let parts: Vec<String> = id.split('-').map(str::to_owned).collect();
        assert_eq!(parts.len(), 6, "{id}");
        assert_eq!(parts[0], "127.0.0.1");
        assert_eq!(parts[1], s.g.proxy_addr.port().to_string());
        assert_eq!(parts[2], s.g.pid().to_string());
        let (secs, millis) = parts[5].split_once('.').expect("%0.3f");
        assert_eq!(millis.len(), 3, "{id}");
        let secs: u64 = secs.parse().expect("seconds");
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_secs();
        assert!(secs.abs_diff(now) < 60, "{id}");
        traces.push((
            parts[3].parse::<u64>().expect("connection"),
            parts[4].parse::<u64>().expect("connection_requests"),
        ));
    }
    assert_eq!(
        traces[0].0, traces[1].0,
        "one connection, one serial: {traces:?}"
    );
    assert_eq!([traces[0].1, traces[1].1], [1, 2], "{traces:?}");
    // Upstream, the same value; $server_addr is the listening socket's
    // address, whatever the Host header says.
    let a = s.get("/cid-tracker", &[("host", "10.9.8.7")]).await;
    let id = a.upstream_header("x-trace").expect("x-trace");
    assert_eq!(a.header("x-trace"), Some(&*id));
    assert!(id.starts_with("127.0.0.1-"), "{id}");
}

fn sha256_hex(text: &str) -> String {
    use sha2::Digest as _;
    format!("{:x}", sha2::Sha256::digest(text.as_bytes()))
}

fn cache_status(a: &Answer) -> Option<&str> {
    a.header("x-cache-status")
}

#[tokio::test]
async fn proxy_cache_hits_misses_and_bypasses_as_kong_does() {
    let mut s = Setup::start();
    let mirror = mirror();
    let memory = |extra: Value| {
        let mut config = json!({"strategy": "memory"});
        for (k, v) in extra.as_object().expect("object") {
            config[k] = v.clone();
        }
        json!({"name": "proxy-cache", "config": config})
    };
    let mut ids = std::collections::HashMap::new();
    for name in [
        "pc", "pc-vary", "pc-ct", "pc-quiet", "pc-case", "pc-ttl", "pc-stale",
    ] {
        let (_, route) = s.service_route(name, &[&format!("/{name}")]).await;
        ids.insert(name, route);
    }
    route_to(&s, "pc-cc", &["/pc-cc"], mirror).await;
    s.post("/routes/pc/plugins", memory(json!({}))).await;
    s.post(
        "/routes/pc-vary/plugins",
        memory(json!({"vary_query_params": ["a"], "vary_headers": ["x-v"]})),
    )
    .await;
    s.post(
        "/routes/pc-ct/plugins",
        memory(json!({"content_type": ["text/html"]})),
    )
    .await;
    s.post(
        "/routes/pc-quiet/plugins",
        memory(
            json!({"response_headers": {"age": false, "X-Cache-Status": false,
                                           "X-Cache-Key": false}}),
        ),
    )
    .await;
    s.post(
        "/routes/pc-case/plugins",
        memory(json!({"ignore_uri_case": true})),
    )
    .await;
    s.post("/routes/pc-ttl/plugins", memory(json!({"cache_ttl": 1})))
        .await;
    s.post(
        "/routes/pc-stale/plugins",
        memory(json!({"cache_ttl": 1, "storage_ttl": 60})),
    )
    .await;
    s.post(
        "/routes/pc-cc/plugins",
        memory(json!({"cache_control": true})),
    )
    .await;
    s.synced().await;
    let max_age = [("x-reply-cache-control", "max-age=60")];

    // Entries that expire: stored first, checked last.
    for path in ["/pc-ttl", "/pc-stale"] {
        assert_eq!(cache_status(&s.get(path, &[]).await), Some("Miss"));
        assert_eq!(cache_status(&s.get(path, &[]).await), Some("Hit"));
    }
    assert_eq!(cache_status(&s.get("/pc-cc", &max_age).await), Some("Miss"));
    assert_eq!(cache_status(&s.get("/pc-cc", &max_age).await), Some("Hit"));
    let stored = std::time::Instant::now();

    // proxy-cache/handler.lua: the key is sha256(prefix|method|uri|params|
    // headers), uri being `$request` up to a `?` (the whole request line
    // when there is no query string), cache_key.lua.
    let key = |route: &str, rest: &str| sha256_hex(&format!("{}|{rest}", ids[route]));
    let miss = s.get("/pc", &[("x-n", "1")]).await;
    assert_eq!(miss.status, 200);
    assert_eq!(cache_status(&miss), Some("Miss"));
    let pc_key = key("pc", "GET|GET /pc HTTP/1.1||");
    assert_eq!(miss.header("x-cache-key"), Some(&*pc_key));
    assert_eq!(miss.header("age"), None);
    let hit = s.get("/pc", &[("x-n", "2")]).await;
    assert_eq!(hit.status, 200);
    assert_eq!(cache_status(&hit), Some("Hit"));
    assert_eq!(hit.header("x-cache-key"), Some(&*pc_key));
    assert_eq!(hit.body, miss.body, "served from the cache");
    assert_eq!(hit.upstream_header("x-n").as_deref(), Some("1"));
    assert_eq!(hit.header("content-type"), Some("application/json"));
    let age: u64 = hit.header("age").expect("age").parse().expect("seconds");
    assert!(age <= 1, "{age}");
    // Query arguments are sorted into the key; repeated ones joined.
    let a = s.get("/pc?b=2&a=1", &[]).await;
    assert_eq!(cache_status(&a), Some("Miss"));
    let query_key = key("pc", "GET|GET /pc|a=1:b=2|");
    assert_eq!(a.header("x-cache-key"), Some(&*query_key));
    let a = s.get("/pc?a=1&b=2", &[]).await;
    assert_eq!(cache_status(&a), Some("Hit"));
    assert_eq!(a.header("x-cache-key"), Some(&*query_key));
    let a = s.get("/pc?flag&a=2&a=1", &[]).await;
    assert_eq!(cache_status(&a), Some("Miss"));
    assert_eq!(
        a.header("x-cache-key"),
        Some(&*key("pc", "GET|GET /pc|a=1,2:flag|"))
    );
    // Not a cacheable method: Bypass before any key.
    let post = s.send("POST", "/pc", &[], Some(("text/plain", "x"))).await;
    assert_eq!(post.status, 200);
    assert_eq!(cache_status(&post), Some("Bypass"));
    assert_eq!(post.header("x-cache-key"), None);
    assert_eq!(post.json()["method"], "POST");
    // Not a cacheable content type: decided on the response.
    for _ in 0..2 {
        let a = s.get("/pc-ct", &[]).await;
        assert_eq!(cache_status(&a), Some("Bypass"));
        assert_eq!(
            a.header("x-cache-key"),
            Some(&*key("pc-ct", "GET|GET /pc-ct HTTP/1.1||"))
        );
    }

    // vary_query_params and vary_headers.
    let a = s.get("/pc-vary?a=1&b=1", &[]).await;
    assert_eq!(cache_status(&a), Some("Miss"));
    assert_eq!(
        a.header("x-cache-key"),
        Some(&*key("pc-vary", "GET|GET /pc-vary|a=1|"))
    );
    assert_eq!(
        cache_status(&s.get("/pc-vary?b=2&a=1", &[]).await),
        Some("Hit")
    );
    assert_eq!(
        cache_status(&s.get("/pc-vary?a=2", &[]).await),
        Some("Miss")
    );
    let a = s.get("/pc-vary?a=1", &[("x-v", "h")]).await;
    assert_eq!(cache_status(&a), Some("Miss"));
    assert_eq!(
        a.header("x-cache-key"),
        Some(&*key("pc-vary", "GET|GET /pc-vary|a=1|x-v=h"))
    );
    assert_eq!(
        cache_status(&s.get("/pc-vary?a=1", &[("x-v", "h")]).await),
        Some("Hit")
    );

    // response_headers off: nothing shown unless the client sends Kong-Debug.
    for _ in 0..2 {
        let a = s.get("/pc-quiet", &[]).await;
        assert_eq!(a.status, 200);
        assert_eq!(cache_status(&a), None);
        assert_eq!(a.header("x-cache-key"), None);
        assert_eq!(a.header("age"), None);
    }
    let debug = s.get("/pc-quiet", &[("kong-debug", "1")]).await;
    assert_eq!(cache_status(&debug), Some("Hit"));
    assert!(debug.header("age").is_some());
    assert!(debug.header("x-cache-key").is_some());

    // ignore_uri_case.
    assert_eq!(
        cache_status(&s.get("/pc-case/ABC", &[]).await),
        Some("Miss")
    );
    assert_eq!(cache_status(&s.get("/pc-case/abc", &[]).await), Some("Hit"));

    // cache_control = true: the request's and the response's directives.
    for directive in ["no-cache", "no-store"] {
        let a = s
            .get("/pc-cc", &[("cache-control", directive), max_age[0]])
            .await;
        assert_eq!(a.status, 200);
        assert_eq!(cache_status(&a), Some("Bypass"), "{directive}");
        assert_eq!(a.header("x-cache-key"), None);
    }
    // Responses that may not be stored, or have no freshness at all.
    for (path, response_cc) in [
        ("/pc-cc/private", Some("private, max-age=60")),
        ("/pc-cc/no-store", Some("no-store")),
        ("/pc-cc/zero", Some("max-age=0")),
        ("/pc-cc/none", None),
    ] {
        for _ in 0..2 {
            let headers: Vec<(&str, &str)> = response_cc
                .map(|cc| ("x-reply-cache-control", cc))
                .into_iter()
                .collect();
            let a = s.get(path, &headers).await;
            assert_eq!(a.status, 200);
            assert_eq!(cache_status(&a), Some("Bypass"), "{path}");
        }
    }
    // s-maxage counts as freshness too.
    let shared = [("x-reply-cache-control", "s-maxage=60")];
    assert_eq!(
        cache_status(&s.get("/pc-cc/shared", &shared).await),
        Some("Miss")
    );
    assert_eq!(
        cache_status(&s.get("/pc-cc/shared", &shared).await),
        Some("Hit")
    );
    // handler.lua checks `ngx.var.authorization`, a variable nginx does
    // not define: credentials do not prevent caching.
    let authorized = [
        ("authorization", "Basic dTpw"),
        ("x-reply-cache-control", "max-age=60"),
    ];
    assert_eq!(
        cache_status(&s.get("/pc-cc/authorized", &authorized).await),
        Some("Miss")
    );
    assert_eq!(
        cache_status(&s.get("/pc-cc/authorized", &authorized).await),
        Some("Hit")
    );
    // only-if-cached and nothing cached: 504.
    let a = s
        .get("/pc-cc/never", &[("cache-control", "only-if-cached")])
        .await;
    assert_eq!(a.status, 504, "{}", a.body);

    // Expiry. ngx.time() has whole seconds: wait until every stored entry
    // is at least two of them old.
    let wait = Duration::from_millis(2100).saturating_sub(stored.elapsed());
    tokio::time::sleep(wait).await;
    // cache_ttl 1, no storage_ttl: gone from storage, a plain Miss.
    assert_eq!(cache_status(&s.get("/pc-ttl", &[]).await), Some("Miss"));
    assert_eq!(cache_status(&s.get("/pc-ttl", &[]).await), Some("Hit"));
    // storage_ttl keeps it: stale, refreshed.
    assert_eq!(
        cache_status(&s.get("/pc-stale", &[]).await),
        Some("Refresh")
    );
    assert_eq!(cache_status(&s.get("/pc-stale", &[]).await), Some("Hit"));
    // The client's max-age is older than the entry.
    let mut headers = vec![("cache-control", "max-age=0")];
    headers.extend(max_age);
    assert_eq!(
        cache_status(&s.get("/pc-cc", &headers).await),
        Some("Refresh")
    );
    let a = s.get("/pc-cc", &max_age).await;
    assert_eq!(cache_status(&a), Some("Hit"));
    let age: u64 = a.header("age").expect("age").parse().expect("seconds");
    assert!(age <= 1, "stored again by the refresh: {age}");
}
