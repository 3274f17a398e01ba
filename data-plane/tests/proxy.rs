//! The proxy over real sockets: a hyper echo server as the upstream, the
//! data plane serving on 127.0.0.1:0, and hyper clients.

mod common;
use common::kong_error;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse_data_plane::{serve, DataPlane, ProxyConfig};
use gatehouse_model::snapshot::ConfigSnapshot;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Either, Full};
use hyper::body::{Body, Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;

const SERVICE_ID: &str = "10000000-0000-4000-8000-000000000001";

// ---------------------------------------------------------------- upstream

/// An upstream that answers with what it received as JSON; with
/// `x-echo-stream` it streams the request body back instead, and with
/// `x-echo-delay-ms` it waits before answering.
async fn start_upstream() -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream address");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let connection = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service_fn(echo));
                // Clients that go away mid-request are part of some tests.
                let _ = connection.await;
            });
        }
    });
    addr
}

async fn echo(
    request: Request<Incoming>,
) -> Result<Response<Either<Incoming, Full<Bytes>>>, Infallible> {
    if let Some(delay) = request.headers().get("x-echo-delay-ms") {
        let millis = delay
            .to_str()
            .ok()
            .and_then(|ms| ms.parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(millis)).await;
    }
    if request.method() == Method::HEAD {
        // hyper drops the body of a HEAD response but announces its length.
        return Ok(Response::new(Either::Right(Full::new(Bytes::from_static(
            b"0123456789",
        )))));
    }
    if request.headers().contains_key("x-echo-stream") {
        let mut response = Response::new(Either::Left(request.into_body()));
        response
            .headers_mut()
            .insert("via", "1.0 origin".parse().expect("valid"));
        return Ok(response);
    }
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in request.headers() {
        headers
            .entry(name.as_str().to_owned())
            .or_default()
            .push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let method = request.method().to_string();
    let path = request.uri().to_string();
    let version = format!("{:?}", request.version());
    let body_len = match request.into_body().collect().await {
        Ok(body) => body.to_bytes().len(),
        Err(_) => 0,
    };
    let body = json!({
        "method": method,
        "path": path,
        "version": version,
        "headers": headers,
        "body_len": body_len,
    });
    let mut response = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
    let response_headers = response.headers_mut();
    response_headers.insert("content-type", "application/json".parse().expect("valid"));
    response_headers.insert("via", "1.0 origin".parse().expect("valid"));
    response_headers.insert("keep-alive", "timeout=5".parse().expect("valid"));
    Ok(response)
}

/// A port nothing listens on.
async fn closed_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    listener.local_addr().expect("address").port()
}

// ----------------------------------------------------------------- gateway

struct Gateway {
    addr: SocketAddr,
    dp: Arc<DataPlane>,
    shutdown: Option<watch::Sender<()>>,
    server: JoinHandle<()>,
}

impl Gateway {
    async fn start(cfg: ProxyConfig, snapshot: Option<ConfigSnapshot>) -> Gateway {
        let dp = DataPlane::new(cfg);
        if let Some(snapshot) = snapshot {
            dp.apply(&snapshot).expect("snapshot applies");
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (shutdown, shutdown_rx) = watch::channel(());
        let server = tokio::spawn(serve(
            listener,
            Arc::clone(&dp),
            shutdown_rx,
            Duration::from_secs(5),
        ));
        Gateway {
            addr,
            dp,
            shutdown: Some(shutdown),
            server,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

fn config() -> ProxyConfig {
    ProxyConfig {
        header_read_timeout: Duration::from_secs(5),
        ..ProxyConfig::default()
    }
}

fn service(id: &str, port: u16, fields: Value) -> Value {
    let mut service = json!({
        "id": id,
        "name": format!("service-{port}"),
        "protocol": "http",
        "host": "127.0.0.1",
        "port": port,
        "path": null,
        "retries": 5,
        "connect_timeout": 2000,
        "read_timeout": 5000,
        "write_timeout": 5000,
        "enabled": true,
    });
    merge(&mut service, fields);
    service
}

fn route(id: u32, service_id: Option<&str>, fields: Value) -> Value {
    let mut route = json!({
        "id": format!("20000000-0000-4000-8000-{id:012}"),
        "name": format!("route-{id}"),
        "protocols": ["http", "https"],
        "https_redirect_status_code": 426,
        "strip_path": true,
        "preserve_host": false,
        "path_handling": "v0",
        "regex_priority": 0,
        "created_at": 1_700_000_000 + i64::from(id),
        "service": service_id.map(|id| json!({"id": id})),
    });
    merge(&mut route, fields);
    route
}

fn merge(target: &mut Value, fields: Value) {
    if let (Value::Object(target), Value::Object(fields)) = (target, fields) {
        target.extend(fields);
    }
}

fn snapshot(version: u64, services: Vec<Value>, routes: Vec<Value>) -> ConfigSnapshot {
    let mut entities = BTreeMap::new();
    entities.insert("services".to_owned(), services);
    entities.insert("routes".to_owned(), routes);
    ConfigSnapshot::from_values(version, entities)
}

/// One service on `upstream` with routes `/echo` (strip_path) and `/keep`.
fn echo_snapshot(version: u64, upstream: SocketAddr) -> ConfigSnapshot {
    snapshot(
        version,
        vec![service(SERVICE_ID, upstream.port(), json!({}))],
        vec![
            route(1, Some(SERVICE_ID), json!({"paths": ["/echo"]})),
            route(
                2,
                Some(SERVICE_ID),
                json!({"paths": ["/keep"], "strip_path": false}),
            ),
        ],
    )
}

// ------------------------------------------------------------------ client

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: Bytes,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).expect("JSON body")
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(name)
            .map(|value| value.to_str().expect("ASCII header"))
    }
}

fn client<B>() -> Client<HttpConnector, B>
where
    B: Body + Send + Unpin + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    Client::builder(TokioExecutor::new()).build_http()
}

async fn send(request: Request<Full<Bytes>>) -> Reply {
    let response = client().request(request).await.expect("the proxy answers");
    let (parts, body) = response.into_parts();
    let body = body.collect().await.expect("the body arrives").to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

async fn get(url: &str, headers: &[(&str, &str)]) -> Reply {
    let mut request = Request::get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    send(
        request
            .body(Full::new(Bytes::new()))
            .expect("valid request"),
    )
    .await
}

/// The upstream's view of the request's header `name` (values joined).
fn upstream_header(echo: &Value, name: &str) -> Option<String> {
    echo["headers"][name].as_array().map(|values| {
        values
            .iter()
            .map(|value| value.as_str().expect("string"))
            .collect::<Vec<_>>()
            .join(", ")
    })
}

/// A request body fed chunk by chunk from a channel.
struct ChannelBody(mpsc::Receiver<Bytes>);

impl Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.0
            .poll_recv(cx)
            .map(|chunk| chunk.map(|chunk| Ok(Frame::data(chunk))))
    }
}

// ------------------------------------------------------------------- tests

#[tokio::test]
async fn proxies_with_strip_path_and_forwarded_headers() {
    let upstream = start_upstream().await;
    let gateway = Gateway::start(config(), Some(echo_snapshot(1, upstream))).await;

    let reply = get(
        &gateway.url("/echo/hello?x=1&y"),
        &[
            ("host", "Gateway.Test:1234"),
            ("x-forwarded-for", "10.0.0.1"),
            ("x-forwarded-host", "spoofed.test"),
            ("connection", "keep-alive, x-hop"),
            ("x-hop", "secret"),
            ("proxy-authorization", "Basic eDp5"),
            ("x-custom", "kept"),
        ],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
    let echo = reply.json();
    assert_eq!(echo["method"], "GET");
    assert_eq!(echo["path"], "/hello?x=1&y");
    assert_eq!(echo["version"], "HTTP/1.1");
    let header = |name| upstream_header(&echo, name);
    assert_eq!(
        header("host"),
        Some(format!("127.0.0.1:{}", upstream.port()))
    );
    assert_eq!(
        header("x-forwarded-for").as_deref(),
        Some("10.0.0.1, 127.0.0.1")
    );
    assert_eq!(header("x-forwarded-proto").as_deref(), Some("http"));
    assert_eq!(header("x-forwarded-host").as_deref(), Some("gateway.test"));
    assert_eq!(
        header("x-forwarded-port"),
        Some(gateway.addr.port().to_string())
    );
    assert_eq!(header("x-forwarded-path").as_deref(), Some("/echo/hello"));
    assert_eq!(header("x-forwarded-prefix").as_deref(), Some("/echo"));
    assert_eq!(header("x-real-ip").as_deref(), Some("127.0.0.1"));
    assert_eq!(
        header("via"),
        Some(format!("1.1 gatehouse/{}", env!("CARGO_PKG_VERSION")))
    );
    assert_eq!(header("x-custom").as_deref(), Some("kept"));
    assert_eq!(header("x-hop"), None);
    assert_eq!(header("proxy-authorization"), None);
    assert_eq!(header("connection"), None);

    assert_eq!(
        reply.header("via"),
        Some(&*format!(
            "1.0 origin, 1.1 gatehouse/{}",
            env!("CARGO_PKG_VERSION")
        ))
    );
    assert_eq!(reply.header("keep-alive"), None);
    assert!(reply.header("x-kong-upstream-latency").is_some());
    assert!(reply.header("x-kong-proxy-latency").is_some());

    // strip_path false keeps the path; no prefix is forwarded, even a
    // client's.
    let reply = get(
        &gateway.url("/keep/a"),
        &[("x-forwarded-prefix", "/spoofed")],
    )
    .await;
    assert_eq!(reply.status, StatusCode::OK);
    let echo = reply.json();
    assert_eq!(echo["path"], "/keep/a");
    assert_eq!(upstream_header(&echo, "x-forwarded-prefix"), None);
    assert_eq!(
        upstream_header(&echo, "x-forwarded-for").as_deref(),
        Some("127.0.0.1")
    );

    // The prefix alone strips to the service path.
    let reply = get(&gateway.url("/echo"), &[]).await;
    assert_eq!(reply.json()["path"], "/");
}

#[tokio::test]
async fn service_path_and_preserve_host() {
    let upstream = start_upstream().await;
    let snapshot = snapshot(
        1,
        vec![service(
            SERVICE_ID,
            upstream.port(),
            json!({"path": "/base"}),
        )],
        vec![
            route(1, Some(SERVICE_ID), json!({"paths": ["/svc"]})),
            route(
                2,
                Some(SERVICE_ID),
                json!({"hosts": ["preserved.test"], "preserve_host": true}),
            ),
            route(
                3,
                Some(SERVICE_ID),
                json!({"paths": ["/v1"], "path_handling": "v1"}),
            ),
        ],
    );
    let gateway = Gateway::start(config(), Some(snapshot)).await;

    let echo = get(&gateway.url("/svc/x"), &[]).await.json();
    assert_eq!(echo["path"], "/base/x");

    // traditional_compatible joins paths as v0 whatever path_handling says.
    let echo = get(&gateway.url("/v1x"), &[]).await.json();
    assert_eq!(echo["path"], "/base/x");

    let echo = get(&gateway.url("/anything"), &[("host", "preserved.test")])
        .await
        .json();
    assert_eq!(echo["path"], "/base/anything");
    assert_eq!(
        upstream_header(&echo, "host").as_deref(),
        Some("preserved.test")
    );
}

#[tokio::test]
async fn gateway_errors_use_kong_bodies() {
    let upstream = start_upstream().await;
    let closed = closed_port().await;
    let slow_service = "10000000-0000-4000-8000-000000000002";
    let closed_service = "10000000-0000-4000-8000-000000000003";
    let snapshot = snapshot(
        1,
        vec![
            service(slow_service, upstream.port(), json!({"read_timeout": 200})),
            service(closed_service, closed, json!({})),
        ],
        vec![
            route(1, Some(slow_service), json!({"paths": ["/slow"]})),
            route(2, Some(closed_service), json!({"paths": ["/closed"]})),
            route(3, None, json!({"paths": ["/serviceless"]})),
            route(
                4,
                Some(slow_service),
                json!({"paths": ["/secure"], "protocols": ["https"]}),
            ),
        ],
    );
    let gateway = Gateway::start(config(), Some(snapshot)).await;

    let check = |reply: &Reply, status: StatusCode, message: &str| {
        assert_eq!(reply.status, status);
        assert_eq!(kong_error(&reply.body), message);
        assert_eq!(
            reply.header("content-type"),
            Some("application/json; charset=utf-8")
        );
        assert_eq!(
            reply.header("server"),
            Some(&*format!("gatehouse/{}", env!("CARGO_PKG_VERSION")))
        );
        assert!(reply.header("x-kong-response-latency").is_some());
    };

    let reply = get(&gateway.url("/nothing/here"), &[]).await;
    check(
        &reply,
        StatusCode::NOT_FOUND,
        "no Route matched with those values",
    );

    let reply = get(&gateway.url("/closed"), &[]).await;
    check(
        &reply,
        StatusCode::BAD_GATEWAY,
        "An invalid response was received from the upstream server",
    );

    let started = Instant::now();
    let reply = get(&gateway.url("/slow"), &[("x-echo-delay-ms", "3000")]).await;
    check(
        &reply,
        StatusCode::GATEWAY_TIMEOUT,
        "The upstream server is timing out",
    );
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "read_timeout applies"
    );

    let reply = get(&gateway.url("/serviceless"), &[]).await;
    check(
        &reply,
        StatusCode::SERVICE_UNAVAILABLE,
        "no Service found with those values",
    );

    let reply = get(&gateway.url("/secure"), &[]).await;
    check(
        &reply,
        StatusCode::UPGRADE_REQUIRED,
        "Please use HTTPS protocol",
    );
}

#[tokio::test]
async fn empty_runtime_answers_404() {
    let gateway = Gateway::start(config(), None).await;
    assert_eq!(gateway.dp.version(), 0);
    let reply = get(&gateway.url("/"), &[]).await;
    assert_eq!(reply.status, StatusCode::NOT_FOUND);
    assert_eq!(
        kong_error(&reply.body),
        "no Route matched with those values"
    );
}

#[tokio::test]
async fn body_limit() {
    let upstream = start_upstream().await;
    let mut cfg = config();
    cfg.max_body_bytes = Some(1024);
    let gateway = Gateway::start(cfg, Some(echo_snapshot(1, upstream))).await;

    let request = Request::post(gateway.url("/echo"))
        .body(Full::new(Bytes::from(vec![b'a'; 1024])))
        .expect("valid request");
    let reply = send(request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["body_len"], 1024);

    let request = Request::post(gateway.url("/echo"))
        .body(Full::new(Bytes::from(vec![b'a'; 1025])))
        .expect("valid request");
    let reply = send(request).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE);
    assert_eq!(kong_error(&reply.body), "Request size limit exceeded");

    // Without Content-Length the limit applies while streaming.
    let (chunks, receiver) = mpsc::channel(4);
    for _ in 0..3 {
        chunks
            .send(Bytes::from(vec![b'b'; 600]))
            .await
            .expect("queued");
    }
    drop(chunks);
    let request = Request::post(gateway.url("/echo"))
        .body(ChannelBody(receiver))
        .expect("valid request");
    let response = client().request(request).await.expect("the proxy answers");
    assert_eq!(response.status(), StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn large_bodies_stream_intact() {
    let upstream = start_upstream().await;
    let gateway = Gateway::start(config(), Some(echo_snapshot(1, upstream))).await;

    let chunk_count = 128;
    let chunk_len = 64 * 1024;
    let (chunks, receiver) = mpsc::channel(4);
    let sender = tokio::spawn(async move {
        for chunk_idx in 0..chunk_count {
            let chunk: Vec<u8> = (0..chunk_len)
                .map(|byte_idx| ((chunk_idx * 7 + byte_idx) % 251) as u8)
                .collect();
            chunks
                .send(Bytes::from(chunk))
                .await
                .expect("the proxy reads the body");
        }
    });
    let request = Request::post(gateway.url("/echo/upload"))
        .header("x-echo-stream", "1")
        .body(ChannelBody(receiver))
        .expect("valid request");
    let response = client().request(request).await.expect("the proxy answers");
    assert_eq!(response.status(), StatusCode::OK);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("the body arrives")
        .to_bytes();
    sender.await.expect("sender finished");
    assert_eq!(body.len(), chunk_count * chunk_len);
    for (byte_idx, byte) in body.iter().enumerate() {
        let expected = (((byte_idx / chunk_len) * 7 + byte_idx % chunk_len) % 251) as u8;
        assert_eq!(*byte, expected, "byte {byte_idx}");
    }
}

#[tokio::test]
async fn bodies_stream_both_ways_without_buffering() {
    let upstream = start_upstream().await;
    let gateway = Gateway::start(config(), Some(echo_snapshot(1, upstream))).await;

    let (chunks, receiver) = mpsc::channel(1);
    let request = Request::post(gateway.url("/echo/duplex"))
        .header("x-echo-stream", "1")
        .body(ChannelBody(receiver))
        .expect("valid request");
    chunks
        .send(Bytes::from_static(b"ping-1"))
        .await
        .expect("queued");
    let response = tokio::time::timeout(Duration::from_secs(5), client().request(request))
        .await
        .expect("the response head comes before the request body ends")
        .expect("the proxy answers");
    let mut body = response.into_body();
    for round in 1..=3 {
        let frame = tokio::time::timeout(Duration::from_secs(5), body.frame())
            .await
            .expect("each chunk comes back before the next is sent")
            .expect("a frame")
            .expect("no error");
        assert_eq!(frame.into_data().expect("data"), format!("ping-{round}"));
        if round < 3 {
            chunks
                .send(Bytes::from(format!("ping-{}", round + 1)))
                .await
                .expect("queued");
        }
    }
    drop(chunks);
    let rest = body.collect().await.expect("the body ends").to_bytes();
    assert!(rest.is_empty());
}

#[tokio::test]
async fn h2c_clients() {
    let upstream = start_upstream().await;
    let gateway = Gateway::start(config(), Some(echo_snapshot(1, upstream))).await;
    let client: Client<HttpConnector, Full<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build_http();
    let response = client
        .request(
            Request::get(gateway.url("/echo/h2"))
                .body(Full::new(Bytes::new()))
                .expect("valid request"),
        )
        .await
        .expect("the proxy speaks h2c");
    assert_eq!(response.version(), http::Version::HTTP_2);
    assert_eq!(response.status(), StatusCode::OK);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("the body arrives")
        .to_bytes();
    let echo: Value = serde_json::from_slice(&body).expect("JSON body");
    assert_eq!(echo["path"], "/h2");
    assert_eq!(echo["version"], "HTTP/1.1");
    assert_eq!(
        upstream_header(&echo, "x-forwarded-host").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        upstream_header(&echo, "via"),
        Some(format!("2 gatehouse/{}", env!("CARGO_PKG_VERSION")))
    );
}

#[tokio::test]
async fn applying_a_snapshot_changes_routing() {
    let upstream = start_upstream().await;
    let gateway = Gateway::start(config(), Some(echo_snapshot(1, upstream))).await;
    assert_eq!(gateway.dp.version(), 1);
    assert_eq!(get(&gateway.url("/echo"), &[]).await.status, StatusCode::OK);

    let next = snapshot(
        2,
        vec![service(SERVICE_ID, upstream.port(), json!({}))],
        vec![route(
            3,
            Some(SERVICE_ID),
            json!({"paths": ["/v2"], "methods": ["POST"]}),
        )],
    );
    gateway.dp.apply(&next).expect("snapshot applies");
    assert_eq!(gateway.dp.version(), 2);
    assert_eq!(
        get(&gateway.url("/echo"), &[]).await.status,
        StatusCode::NOT_FOUND
    );
    assert_eq!(
        get(&gateway.url("/v2"), &[]).await.status,
        StatusCode::NOT_FOUND
    );
    let request = Request::post(gateway.url("/v2/x"))
        .body(Full::new(Bytes::from_static(b"data")))
        .expect("valid request");
    let reply = send(request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.json()["method"], "POST");

    // A snapshot that cannot be built leaves the runtime in use.
    let broken = snapshot(
        3,
        vec![],
        vec![route(
            4,
            Some("10000000-0000-4000-8000-0000000000ff"),
            json!({"paths": ["/"]}),
        )],
    );
    let error = gateway.dp.apply(&broken).expect_err("unknown service");
    assert!(
        error
            .to_string()
            .contains("10000000-0000-4000-8000-0000000000ff"),
        "{error}"
    );
    let invalid = snapshot(3, vec![json!({"id": "not-a-service"})], vec![]);
    assert!(gateway.dp.apply(&invalid).is_err());
    assert_eq!(gateway.dp.version(), 2);
    let request = Request::post(gateway.url("/v2/x"))
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    assert_eq!(send(request).await.status, StatusCode::OK);
}

#[tokio::test]
async fn graceful_shutdown_drains_in_flight_requests() {
    let upstream = start_upstream().await;
    let mut gateway = Gateway::start(config(), Some(echo_snapshot(1, upstream))).await;
    // An idle keep-alive connection must not hold the drain up.
    let idle = TcpStream::connect(gateway.addr).await.expect("connect");

    let url = gateway.url("/echo/slow");
    let in_flight = tokio::spawn(async move { get(&url, &[("x-echo-delay-ms", "300")]).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    let started = Instant::now();
    drop(gateway.shutdown.take());

    let reply = in_flight.await.expect("request task");
    assert_eq!(reply.status, StatusCode::OK);
    tokio::time::timeout(Duration::from_secs(3), &mut gateway.server)
        .await
        .expect("serve returns once drained")
        .expect("serve does not panic");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(
        TcpStream::connect(gateway.addr).await.is_err(),
        "the listener is closed"
    );
    drop(idle);
}

#[tokio::test]
async fn head_responses_keep_the_upstream_length() {
    let upstream = start_upstream().await;
    let gateway = Gateway::start(config(), Some(echo_snapshot(1, upstream))).await;
    let request = Request::head(gateway.url("/echo/x"))
        .body(Full::new(Bytes::new()))
        .expect("valid request");
    let reply = send(request).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert!(reply.body.is_empty());
    assert_eq!(reply.header("content-length"), Some("10"));
}

#[tokio::test]
async fn connections_over_the_budget_wait_for_a_slot() {
    let upstream = start_upstream().await;
    let cfg = ProxyConfig {
        max_connections: 1,
        ..config()
    };
    let gateway = Gateway::start(cfg, Some(echo_snapshot(1, upstream))).await;
    // Takes the only slot, then the next connection waits in the backlog.
    let held = TcpStream::connect(gateway.addr).await.expect("connect");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let url = gateway.url("/echo");
    let waiting = tokio::spawn(async move { get(&url, &[]).await.status });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!waiting.is_finished(), "served over the budget");
    drop(held);
    let status = tokio::time::timeout(Duration::from_secs(5), waiting)
        .await
        .expect("served once a slot frees")
        .expect("request task");
    assert_eq!(status, StatusCode::OK);
}

#[tokio::test]
async fn early_413_is_read_by_the_client_and_closes_the_connection() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let upstream = start_upstream().await;
    let cfg = ProxyConfig {
        max_body_bytes: Some(1024),
        ..config()
    };
    let gateway = Gateway::start(cfg, Some(echo_snapshot(1, upstream))).await;
    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    stream
        .write_all(b"POST /echo HTTP/1.1\r\nHost: a\r\nContent-Length: 1000000\r\n\r\n")
        .await
        .expect("head");
    // More body than the limit, none of which the gateway reads.
    stream.write_all(&[b'a'; 64 * 1024]).await.expect("body");
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            let n = stream.read(&mut buf).await.expect("read");
            answer.extend_from_slice(&buf[..n]);
            if n == 0 || answer.ends_with(b"}") {
                break;
            }
        }
    })
    .await
    .expect("answered");
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413 "), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    let (_, body) = answer.split_once("\r\n\r\n").expect("a head and a body");
    assert_eq!(kong_error(body.as_bytes()), "Request size limit exceeded");
}

#[tokio::test]
async fn tls_listeners_speak_h2_by_alpn() {
    use gatehouse_data_plane::{serve_tls, DefaultCertificate};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    // A CA the client trusts and the gateway's certificate for localhost.
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca_cert = ca_params.self_signed(&ca_key).expect("CA");
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let leaf_key = rcgen::KeyPair::generate().expect("key");
    let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
        .expect("params")
        .signed_by(&leaf_key, &issuer)
        .expect("leaf");

    let upstream = start_upstream().await;
    let cfg = ProxyConfig {
        default_certificate: Some(
            DefaultCertificate::from_pem(&leaf.pem(), &leaf_key.serialize_pem())
                .expect("certificate loads"),
        ),
        ..config()
    };
    let dp = DataPlane::new(cfg);
    dp.apply(&echo_snapshot(1, upstream))
        .expect("snapshot applies");
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let (_shutdown, shutdown_rx) = watch::channel(());
    tokio::spawn(serve_tls(listener, dp, shutdown_rx, Duration::from_secs(1)));

    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca_cert.pem().as_bytes()).expect("PEM"))
        .expect("root");
    let mut client_config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    client_config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(client_config))
        .connect(ServerName::try_from("localhost").expect("name"), tcp)
        .await
        .expect("the certificate verifies for localhost");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(b"h2".as_slice()));

    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
            .await
            .expect("h2 handshake");
    tokio::spawn(connection);
    let request = Request::get("https://localhost/echo/h2")
        .body(Full::new(Bytes::new()))
        .expect("request");
    let response = sender.send_request(request).await.expect("response");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.version(), http::Version::HTTP_2);
    let body = response
        .into_body()
        .collect()
        .await
        .expect("body")
        .to_bytes();
    let echo: Value = serde_json::from_slice(&body).expect("echo json");
    assert_eq!(echo["path"], "/h2");
    assert_eq!(echo["headers"]["x-forwarded-proto"][0], "https");
}

#[tokio::test]
async fn idle_keep_alive_connections_close_after_the_keepalive_timeout() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    let upstream = start_upstream().await;
    let cfg = ProxyConfig {
        keepalive_timeout: Duration::from_millis(300),
        header_read_timeout: Duration::from_secs(5),
        ..config()
    };
    let gateway = Gateway::start(cfg, Some(echo_snapshot(1, upstream))).await;
    let mut stream = TcpStream::connect(gateway.addr).await.expect("connect");
    let mut buf = vec![0u8; 64 * 1024];
    for _ in 0..2 {
        // Each request comes well within the keep-alive timeout.
        tokio::time::sleep(Duration::from_millis(100)).await;
        stream
            .write_all(b"GET /echo HTTP/1.1\r\nHost: a\r\n\r\n")
            .await
            .expect("request");
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("answered")
            .expect("read");
        assert!(buf[..n].starts_with(b"HTTP/1.1 200 "));
    }
    let idle = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("closed when idle")
        .expect("read");
    assert_eq!(n, 0, "closed without an answer");
    assert!(
        idle.elapsed() >= Duration::from_millis(250),
        "{:?}",
        idle.elapsed()
    );
}

/// An upstream that accepts one protocol upgrade per connection and then
/// echoes raw bytes, as a WebSocket server does after its handshake.
async fn start_upgrade_upstream() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if stream.read(&mut byte).await.unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if !head.contains("upgrade: websocket") || !head.contains("connection: upgrade") {
                    let _ = stream
                        .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let _ = stream
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
                    .await;
                let mut buf = [0u8; 1024];
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => {
                            if stream.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
            });
        }
    });
    addr
}

#[tokio::test]
async fn websocket_upgrades_become_tunnels() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = start_upgrade_upstream().await;
    let gateway = Gateway::start(config(), Some(echo_snapshot(1, upstream))).await;
    let mut client = tokio::net::TcpStream::connect(gateway.addr)
        .await
        .expect("connect");
    client
        .write_all(
            b"GET /echo/socket HTTP/1.1\r\nHost: ws.test\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n",
        )
        .await
        .expect("send handshake");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut byte))
            .await
            .expect("handshake answer in time")
            .expect("read");
        assert!(n > 0, "gateway closed during the handshake: {head:?}");
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");

    // Bytes now flow both ways through the tunnel, several times.
    for message in [&b"ping"[..], b"second frame", b"\x81\x05hello"] {
        client.write_all(message).await.expect("write");
        let mut echoed = vec![0u8; message.len()];
        tokio::time::timeout(Duration::from_secs(5), client.read_exact(&mut echoed))
            .await
            .expect("echo in time")
            .expect("read echo");
        assert_eq!(echoed, message);
    }

    // Plain requests keep working beside the tunnel.
    let reply = get(&gateway.url("/keep/x"), &[]).await;
    assert_eq!(
        reply.status,
        StatusCode::BAD_REQUEST,
        "the upgrade upstream refuses plain requests"
    );
}

// ------------------------------------------------- HTTP/1.1 engine details

/// An upstream speaking raw HTTP/1.1: `answer` gets each accepted
/// connection and its number (from 1).
async fn raw_upstream<F, Fut>(answer: F) -> SocketAddr
where
    F: Fn(TcpStream, usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind upstream");
    let addr = listener.local_addr().expect("upstream address");
    tokio::spawn(async move {
        let mut accepted = 0;
        while let Ok((stream, _)) = listener.accept().await {
            accepted += 1;
            tokio::spawn(answer(stream, accepted));
        }
    });
    addr
}

/// Reads one request head (and no body) from `stream`.
async fn read_request_head(stream: &mut TcpStream) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await.ok()? == 0 {
            return None;
        }
        head.push(byte[0]);
    }
    Some(head)
}

/// Sends raw request bytes on a new connection and reads until the proxy
/// closes it or `expect` responses have fully arrived.
async fn raw_exchange(addr: SocketAddr, request: &[u8], deadline: Duration) -> Vec<u8> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("request");
    let mut received = Vec::new();
    let _ = tokio::time::timeout(deadline, stream.read_to_end(&mut received)).await;
    received
}

fn one_route(upstream: SocketAddr, fields: Value) -> ConfigSnapshot {
    snapshot(
        1,
        vec![service(SERVICE_ID, upstream.port(), fields)],
        vec![route(1, Some(SERVICE_ID), json!({"paths": ["/"]}))],
    )
}

#[tokio::test]
async fn upstream_connections_are_kept_alive_and_reused() {
    let connections = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = Arc::clone(&connections);
    let upstream = raw_upstream(move |mut stream, _| {
        seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        async move {
            use tokio::io::AsyncWriteExt;
            while read_request_head(&mut stream).await.is_some() {
                let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                if stream.write_all(answer).await.is_err() {
                    return;
                }
            }
        }
    })
    .await;
    let gateway = Gateway::start(config(), Some(one_route(upstream, json!({})))).await;
    for _ in 0..20 {
        let reply = get(&gateway.url("/"), &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(&reply.body[..], b"ok");
    }
    assert_eq!(
        connections.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "sequential requests share one upstream connection"
    );
}

#[tokio::test]
async fn a_pooled_connection_the_upstream_closed_is_replaced() {
    // Each connection answers one request, announcing keep-alive, then
    // closes shortly after, as an upstream with a short idle timeout does.
    let upstream = raw_upstream(|mut stream, n| async move {
        use tokio::io::AsyncWriteExt;
        if read_request_head(&mut stream).await.is_some() {
            let answer = format!("HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\n{}", n % 10);
            let _ = stream.write_all(answer.as_bytes()).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    let gateway = Gateway::start(config(), Some(one_route(upstream, json!({})))).await;
    for _ in 0..3 {
        let reply = get(&gateway.url("/"), &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    // Without the pause the close may race the next request: the request
    // goes again on a new connection rather than failing.
    for _ in 0..5 {
        let reply = get(&gateway.url("/"), &[]).await;
        assert_eq!(reply.status, StatusCode::OK, "{:?}", reply.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// An upstream that sends a response head, then the body in `parts`, each
/// after `gap`.
async fn trickling_upstream(gap: Duration, parts: usize) -> SocketAddr {
    raw_upstream(move |mut stream, _| async move {
        use tokio::io::AsyncWriteExt;
        if read_request_head(&mut stream).await.is_none() {
            return;
        }
        let head = format!("HTTP/1.1 200 OK\r\nContent-Length: {parts}\r\n\r\n");
        if stream.write_all(head.as_bytes()).await.is_err() {
            return;
        }
        for _ in 0..parts {
            tokio::time::sleep(gap).await;
            if stream.write_all(b"x").await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test]
async fn read_timeout_bounds_each_read_not_the_whole_response() {
    // Four gaps of 200 ms: 800 ms in all, over a 500 ms read_timeout.
    let slow = trickling_upstream(Duration::from_millis(200), 4).await;
    let gateway = Gateway::start(
        config(),
        Some(one_route(slow, json!({"read_timeout": 500}))),
    )
    .await;
    let started = Instant::now();
    let reply = get(&gateway.url("/"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body[..], b"xxxx");
    assert!(started.elapsed() >= Duration::from_millis(700));

    // One gap longer than read_timeout: the response is cut there.
    let stalled = trickling_upstream(Duration::from_millis(900), 2).await;
    let gateway = Gateway::start(
        config(),
        Some(one_route(stalled, json!({"read_timeout": 300}))),
    )
    .await;
    let received = raw_exchange(
        gateway.addr,
        b"GET / HTTP/1.1\r\nHost: a\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&received);
    assert!(text.starts_with("HTTP/1.1 200 "), "{text}");
    assert!(!text.ends_with('x'), "the body was cut: {text}");

    // No response head within read_timeout: Kong's 504.
    let silent = raw_upstream(|mut stream, _| async move {
        let _ = read_request_head(&mut stream).await;
        tokio::time::sleep(Duration::from_secs(3)).await;
    })
    .await;
    let gateway = Gateway::start(
        config(),
        Some(one_route(silent, json!({"read_timeout": 300}))),
    )
    .await;
    let reply = get(&gateway.url("/"), &[]).await;
    assert_eq!(reply.status, StatusCode::GATEWAY_TIMEOUT);
    assert_eq!(reply.json()["message"], "The upstream server is timing out");
}

#[tokio::test]
async fn chunked_and_close_delimited_responses_pass_through() {
    let upstream = raw_upstream(|mut stream, _| async move {
        use tokio::io::AsyncWriteExt;
        while let Some(head) = read_request_head(&mut stream).await {
            if head.starts_with(b"GET /chunked") {
                let answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n7\r\n, world\r\n0\r\nX-Checksum: 42\r\n\r\n";
                if stream.write_all(answer).await.is_err() {
                    return;
                }
            } else {
                let _ = stream
                    .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
                    .await;
                return;
            }
        }
    })
    .await;
    let gateway = Gateway::start(config(), Some(one_route(upstream, json!({})))).await;
    for _ in 0..2 {
        let reply = get(&gateway.url("/chunked"), &[]).await;
        assert_eq!(reply.status, StatusCode::OK);
        assert_eq!(&reply.body[..], b"hello, world");
    }
    let received = raw_exchange(
        gateway.addr,
        b"GET /chunked HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&received);
    assert!(text.contains("Transfer-Encoding: chunked"), "{text}");
    assert!(
        text.ends_with("0\r\nX-Checksum: 42\r\n\r\n"),
        "trailers pass: {text}"
    );

    let reply = get(&gateway.url("/close"), &[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(&reply.body[..], b"until the end");
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let upstream = start_upstream().await;
    let gateway = Gateway::start(config(), Some(echo_snapshot(1, upstream))).await;
    let received = raw_exchange(
        gateway.addr,
        b"GET /echo/one HTTP/1.1\r\nHost: a\r\n\r\nPOST /echo/two HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabcGET /nowhere HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        Duration::from_secs(5),
    )
    .await;
    let text = String::from_utf8_lossy(&received);
    let one = text.find(r#""path":"/one""#).expect("first answered");
    let two = text.find(r#""path":"/two""#).expect("second answered");
    let three = text.find("no Route matched").expect("third answered");
    assert!(one < two && two < three, "{text}");
    assert!(text.contains(r#""body_len":3"#), "{text}");
    assert_eq!(text.matches("HTTP/1.1 ").count(), 3, "{text}");
}
