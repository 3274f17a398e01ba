//! Upstreams, targets and health checks over real sockets: hyper origins
//! on loopback that can fail or die, the data plane serving on
//! 127.0.0.1:0, and a hyper client.

mod common;
use common::kong_error;

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gatehouse_data_plane::{serve, DataPlane, ProxyConfig, UpstreamHealth};
use gatehouse_model::snapshot::ConfigSnapshot;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::{json, Value};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::{JoinHandle, JoinSet};

const UPSTREAM_ID: &str = "30000000-0000-4000-8000-000000000001";
const SERVICE_ID: &str = "10000000-0000-4000-8000-000000000001";

// ----------------------------------------------------------------- origins

/// An origin that answers with its name; `sick` makes it answer 500, and
/// it can be killed (listener and connections closed) and revived on the
/// same port. `x-delay-ms` delays the answer.
struct Origin {
    name: &'static str,
    addr: SocketAddr,
    sick: Arc<AtomicBool>,
    server: Option<JoinHandle<()>>,
}

impl Origin {
    async fn start(name: &'static str) -> Origin {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind origin");
        let addr = listener.local_addr().expect("origin address");
        let sick = Arc::new(AtomicBool::new(false));
        let server = Some(tokio::spawn(run_origin(listener, name, Arc::clone(&sick))));
        Origin {
            name,
            addr,
            sick,
            server,
        }
    }

    fn target(&self) -> String {
        self.addr.to_string()
    }

    fn kill(&mut self) {
        if let Some(server) = self.server.take() {
            server.abort();
        }
    }

    async fn revive(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(5);
        let listener = loop {
            match TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(error) if Instant::now() < deadline => {
                    let _ = error;
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => panic!("cannot rebind {}: {error}", self.addr),
            }
        };
        self.server = Some(tokio::spawn(run_origin(
            listener,
            self.name,
            Arc::clone(&self.sick),
        )));
    }
}

impl Drop for Origin {
    fn drop(&mut self) {
        self.kill();
    }
}

async fn run_origin(listener: TcpListener, name: &'static str, sick: Arc<AtomicBool>) {
    // Connections live in this set: aborting the task closes them all.
    let mut connections = JoinSet::new();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            return;
        };
        let sick = Arc::clone(&sick);
        connections.spawn(async move {
            let service = service_fn(move |request: Request<Incoming>| {
                let sick = sick.load(Ordering::SeqCst);
                async move {
                    if let Some(delay) = request.headers().get("x-delay-ms") {
                        let millis = delay
                            .to_str()
                            .ok()
                            .and_then(|ms| ms.parse().ok())
                            .unwrap_or(0);
                        tokio::time::sleep(Duration::from_millis(millis)).await;
                    }
                    let host = request
                        .headers()
                        .get("host")
                        .map(|host| String::from_utf8_lossy(host.as_bytes()).into_owned())
                        .unwrap_or_default();
                    let body_len = match request.into_body().collect().await {
                        Ok(body) => body.to_bytes().len(),
                        Err(_) => 0,
                    };
                    let mut response = Response::new(Full::new(Bytes::from(name)));
                    response.headers_mut().insert("x-body-len", body_len.into());
                    if sick {
                        *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    response
                        .headers_mut()
                        .insert("x-seen-host", host.parse().expect("header value"));
                    Ok::<_, Infallible>(response)
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

// ----------------------------------------------------------------- gateway

struct Gateway {
    addr: SocketAddr,
    dp: Arc<DataPlane>,
    _shutdown: watch::Sender<()>,
}

impl Gateway {
    async fn start(snapshot: &ConfigSnapshot) -> Gateway {
        let dp = DataPlane::new(ProxyConfig {
            access_log: false,
            header_read_timeout: Duration::from_secs(5),
            latency_headers: false,
            ..ProxyConfig::default()
        });
        dp.apply(snapshot).expect("snapshot applies");
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let addr = listener.local_addr().expect("proxy address");
        let (shutdown, shutdown_rx) = watch::channel(());
        tokio::spawn(serve(
            listener,
            Arc::clone(&dp),
            shutdown_rx,
            Duration::from_secs(1),
        ));
        Gateway {
            addr,
            dp,
            _shutdown: shutdown,
        }
    }

    async fn get(&self, headers: &[(&str, &str)]) -> Reply {
        let mut request = Request::get(format!("http://{}/", self.addr));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
        let response = client
            .request(request.body(Full::new(Bytes::new())).expect("request"))
            .await
            .expect("the proxy answers");
        let (parts, body) = response.into_parts();
        Reply {
            status: parts.status,
            headers: parts.headers,
            body: String::from_utf8_lossy(&body.collect().await.expect("body").to_bytes())
                .into_owned(),
        }
    }

    /// Who answers `n` requests: counts per origin name, and per status
    /// for the gateway's own answers.
    async fn spread(&self, n: usize, headers: &[(&str, &str)]) -> BTreeMap<String, usize> {
        let mut counts = BTreeMap::new();
        for _ in 0..n {
            let reply = self.get(headers).await;
            let key = if reply.status == StatusCode::OK {
                reply.body
            } else {
                reply.status.as_u16().to_string()
            };
            *counts.entry(key).or_default() += 1;
        }
        counts
    }

    fn health(&self) -> UpstreamHealth {
        self.dp.upstream_health(UPSTREAM_ID).expect("a balancer")
    }

    /// Health per target as `target=HEALTHY|UNHEALTHY` for each address.
    fn target_health(&self) -> BTreeMap<String, bool> {
        self.health()
            .targets
            .iter()
            .flat_map(|target| {
                target
                    .addresses
                    .iter()
                    .map(move |address| (target.target.clone(), address.healthy))
            })
            .collect()
    }
}

struct Reply {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

/// Retries `cond` until it holds or 10 s pass.
async fn eventually<F, Fut>(what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(10);
    while !cond().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------- config

/// One service on upstream `backend` and a catch-all route; `upstream`
/// fields override the defaults, targets are `(target, weight)`.
fn snapshot(version: u64, upstream: Value, targets: &[(&str, u32)]) -> ConfigSnapshot {
    let mut up = json!({
        "id": UPSTREAM_ID,
        "name": "backend",
        "algorithm": "round-robin",
        "slots": 10000,
        "hash_on": "none",
        "hash_fallback": "none",
        "hash_on_cookie_path": "/",
        "host_header": null,
        "use_srv_name": false,
        "healthchecks": null,
    });
    if let (Value::Object(up), Value::Object(fields)) = (&mut up, upstream) {
        up.extend(fields);
    }
    let targets: Vec<Value> = targets
        .iter()
        .enumerate()
        .map(|(idx, (target, weight))| {
            json!({
                "id": format!("40000000-0000-4000-8000-{idx:012}"),
                "upstream": {"id": UPSTREAM_ID},
                "target": target,
                "weight": weight,
            })
        })
        .collect();
    let mut entities = BTreeMap::new();
    entities.insert(
        "services".to_owned(),
        vec![json!({
            "id": SERVICE_ID, "name": "svc", "protocol": "http", "host": "backend",
            "port": 80, "path": null, "retries": 5, "connect_timeout": 2000,
            "read_timeout": 5000, "write_timeout": 5000, "enabled": true,
        })],
    );
    entities.insert(
        "routes".to_owned(),
        vec![json!({
            "id": "20000000-0000-4000-8000-000000000001", "name": "all",
            "protocols": ["http"], "paths": ["/"], "https_redirect_status_code": 426,
            "strip_path": false, "preserve_host": false, "path_handling": "v0",
            "regex_priority": 0, "created_at": 1_700_000_000,
            "service": {"id": SERVICE_ID},
        })],
    );
    entities.insert("upstreams".to_owned(), vec![up]);
    entities.insert("targets".to_owned(), targets);
    ConfigSnapshot::from_values(version, entities)
}

/// Health checks: active probes of `/` every 50 ms for healthy and
/// unhealthy targets, one failure or success to change state; passive
/// checks off unless `passive` is set.
fn checks(active: bool, passive: bool) -> Value {
    let interval = if active { 0.05 } else { 0.0 };
    let limit = |on: bool| if on { 1 } else { 0 };
    json!({"healthchecks": {
        "active": {
            "type": "http", "timeout": 0.5, "concurrency": 10, "http_path": "/",
            "healthy": {"interval": interval, "successes": limit(active), "http_statuses": [200]},
            "unhealthy": {"interval": interval, "tcp_failures": limit(active),
                          "http_failures": limit(active), "timeouts": limit(active),
                          "http_statuses": [500]},
        },
        "passive": {
            "type": "http",
            "healthy": {"successes": 0},
            "unhealthy": {"tcp_failures": limit(passive), "http_failures": limit(passive),
                          "timeouts": limit(passive), "http_statuses": [500]},
        },
        "threshold": 0,
    }})
}

// ------------------------------------------------------------------- tests

#[tokio::test]
async fn round_robin_follows_weights() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let c = Origin::start("c").await;
    let gateway = Gateway::start(&snapshot(
        1,
        json!({}),
        &[(&a.target(), 100), (&b.target(), 50), (&c.target(), 0)],
    ))
    .await;
    let counts = gateway.spread(60, &[]).await;
    assert_eq!(counts, BTreeMap::from([("a".into(), 40), ("b".into(), 20)]));

    // The Host header is the target's address with its port (no
    // host_header on the upstream).
    let reply = gateway.get(&[]).await;
    let seen = reply.headers["x-seen-host"].to_str().expect("ascii");
    assert!(seen == a.target() || seen == b.target(), "{seen}");
}

#[tokio::test]
async fn upstream_host_header_wins() {
    let a = Origin::start("a").await;
    let gateway = Gateway::start(&snapshot(
        1,
        json!({"host_header": "api.example"}),
        &[(&a.target(), 100)],
    ))
    .await;
    let reply = gateway.get(&[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(
        reply.headers["x-seen-host"],
        format!("api.example:{}", a.addr.port()).as_str()
    );
}

#[tokio::test]
async fn consistent_hashing_sticks_by_header_cookie_and_ip() {
    let origins = [
        Origin::start("a").await,
        Origin::start("b").await,
        Origin::start("c").await,
    ];
    let targets: Vec<(String, u32)> = origins.iter().map(|o| (o.target(), 100)).collect();
    let targets: Vec<(&str, u32)> = targets.iter().map(|(t, w)| (t.as_str(), *w)).collect();

    // By header: each user always lands on the same origin, and users
    // spread over several origins.
    let gateway = Gateway::start(&snapshot(
        1,
        json!({"algorithm": "consistent-hashing", "hash_on": "header", "hash_on_header": "x-user"}),
        &targets,
    ))
    .await;
    let mut used = BTreeMap::new();
    for user in 0..30 {
        let user = format!("user-{user}");
        let counts = gateway.spread(4, &[("x-user", &user)]).await;
        assert_eq!(counts.len(), 1, "{user} moved: {counts:?}");
        *used
            .entry(counts.into_keys().next().expect("one"))
            .or_insert(0) += 1;
    }
    assert!(used.len() >= 2, "users all on one origin: {used:?}");

    // By cookie: the first response sets the cookie, and requests that
    // carry it stick.
    gateway
        .dp
        .apply(&snapshot(
            2,
            json!({"algorithm": "consistent-hashing", "hash_on": "cookie",
                   "hash_on_cookie": "sticky", "hash_on_cookie_path": "/app"}),
            &targets,
        ))
        .expect("applies");
    let first = gateway.get(&[]).await;
    let set_cookie = first.headers["set-cookie"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert!(
        set_cookie.starts_with("sticky=")
            && set_cookie.ends_with("; Path=/app; Same-Site=Lax; HttpOnly"),
        "{set_cookie}"
    );
    let cookie = set_cookie.split(';').next().expect("pair").to_owned();
    let counts = gateway.spread(10, &[("cookie", &cookie)]).await;
    assert_eq!(counts, BTreeMap::from([(first.body.clone(), 10)]));
    let again = gateway.get(&[("cookie", &cookie)]).await;
    assert!(!again.headers.contains_key("set-cookie"));

    // By IP: one client, one origin.
    gateway
        .dp
        .apply(&snapshot(
            3,
            json!({"algorithm": "consistent-hashing", "hash_on": "ip"}),
            &targets,
        ))
        .expect("applies");
    let counts = gateway.spread(12, &[]).await;
    assert_eq!(counts.len(), 1, "{counts:?}");
}

#[tokio::test]
async fn least_connections_prefers_idle_targets() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let gateway = Arc::new(
        Gateway::start(&snapshot(
            1,
            json!({"algorithm": "least-connections", "hash_on": null}),
            &[(&a.target(), 100), (&b.target(), 100)],
        ))
        .await,
    );
    // A slow request holds one origin...
    let slow = {
        let gateway = Arc::clone(&gateway);
        tokio::spawn(async move { gateway.get(&[("x-delay-ms", "1500")]).await.body })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    // ...so every request meanwhile goes to the other.
    let counts = gateway.spread(10, &[]).await;
    let busy = slow.await.expect("slow request");
    assert_eq!(counts.len(), 1, "{counts:?}");
    assert_ne!(counts.keys().next(), Some(&busy), "{counts:?}, busy {busy}");
}

#[tokio::test]
async fn latency_prefers_the_faster_target() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let gateway = Gateway::start(&snapshot(
        1,
        json!({"algorithm": "latency", "hash_on": null}),
        &[(&a.target(), 100), (&b.target(), 100)],
    ))
    .await;
    // Make whichever answers first slow once; the other then wins.
    let slow = gateway.get(&[("x-delay-ms", "300")]).await.body;
    let counts = gateway.spread(10, &[]).await;
    assert!(!counts.contains_key(&slow), "{counts:?}, slow {slow}");
}

#[tokio::test]
async fn active_checks_take_out_a_dead_target_and_bring_it_back() {
    let a = Origin::start("a").await;
    let mut b = Origin::start("b").await;
    let gateway = Gateway::start(&snapshot(
        1,
        checks(true, false),
        &[(&a.target(), 100), (&b.target(), 100)],
    ))
    .await;
    assert!(gateway.health().healthchecks);
    assert_eq!(gateway.spread(10, &[]).await.len(), 2);

    b.kill();
    eventually("b marked unhealthy", || async {
        gateway.target_health().get(&b.target()) == Some(&false)
    })
    .await;
    assert_eq!(
        gateway.spread(10, &[]).await,
        BTreeMap::from([("a".into(), 10)])
    );

    b.revive().await;
    eventually("b healthy again", || async {
        gateway.target_health().get(&b.target()) == Some(&true)
    })
    .await;
    assert_eq!(gateway.spread(10, &[]).await.get("b"), Some(&5));

    // A target answering errors to the probe is taken out too.
    a.sick.store(true, Ordering::SeqCst);
    eventually("a marked unhealthy", || async {
        gateway.target_health().get(&a.target()) == Some(&false)
    })
    .await;
    a.sick.store(false, Ordering::SeqCst);
    eventually("a healthy again", || async {
        gateway.target_health().get(&a.target()) == Some(&true)
    })
    .await;
}

#[tokio::test]
async fn passive_checks_take_out_failing_targets() {
    let a = Origin::start("a").await;
    let mut b = Origin::start("b").await;
    let gateway = Gateway::start(&snapshot(
        1,
        checks(false, true),
        &[(&a.target(), 100), (&b.target(), 100)],
    ))
    .await;

    // One 500 takes b out (http_failures = 1); the client still gets it.
    b.sick.store(true, Ordering::SeqCst);
    let counts = gateway.spread(4, &[]).await;
    assert_eq!(counts.get("500"), Some(&1), "{counts:?}");
    assert_eq!(gateway.target_health().get(&b.target()), Some(&false));
    assert_eq!(
        gateway.spread(10, &[]).await,
        BTreeMap::from([("a".into(), 10)])
    );

    // Passive checks never bring a target back: the Admin API does.
    b.sick.store(false, Ordering::SeqCst);
    gateway
        .dp
        .set_target_health(UPSTREAM_ID, "backend", &b.target(), None, true)
        .expect("set healthy");
    assert_eq!(gateway.spread(10, &[]).await.get("b"), Some(&5));

    // A dead target is out after one failed attempt (tcp_failures = 1);
    // that request is retried on the other target (`retries`), so no
    // client sees the failure.
    b.kill();
    let counts = gateway.spread(4, &[]).await;
    assert_eq!(counts, BTreeMap::from([("a".into(), 4)]), "{counts:?}");
    assert_eq!(gateway.target_health().get(&b.target()), Some(&false));
    assert_eq!(
        gateway.spread(10, &[]).await,
        BTreeMap::from([("a".into(), 10)])
    );
}

#[tokio::test]
async fn retries_send_bodiless_requests_to_another_target() {
    let a = Origin::start("a").await;
    let mut b = Origin::start("b").await;
    b.kill();
    // No health checks: only retries keep the dead target from failing
    // requests.
    let with_retries = snapshot(1, json!({}), &[(&a.target(), 100), (&b.target(), 100)]);
    let gateway = Gateway::start(&with_retries).await;
    assert_eq!(
        gateway.spread(10, &[]).await,
        BTreeMap::from([("a".into(), 10)])
    );

    // With `retries: 0` every request the balancer sends to b fails.
    let mut no_retries = with_retries.clone();
    no_retries.version = 2;
    set_service_field(&mut no_retries, "retries", json!(0));
    gateway.dp.apply(&no_retries).expect("applies");
    let counts = gateway.spread(10, &[]).await;
    assert_eq!(counts.get("502"), Some(&5), "{counts:?}");
    assert_eq!(counts.get("a"), Some(&5), "{counts:?}");
}

#[tokio::test]
async fn retries_resend_buffered_request_bodies() {
    let a = Origin::start("a").await;
    let mut b = Origin::start("b").await;
    b.kill();
    let gateway = Gateway::start(&snapshot(
        1,
        json!({}),
        &[(&a.target(), 100), (&b.target(), 100)],
    ))
    .await;
    let client = Client::builder(TokioExecutor::new()).build_http::<Full<Bytes>>();
    for _ in 0..10 {
        let request = Request::post(format!("http://{}/", gateway.addr))
            .body(Full::new(Bytes::from(vec![b'x'; 20_000])))
            .expect("request");
        let response = client.request(request).await.expect("the proxy answers");
        assert_eq!(response.status(), StatusCode::OK);
        assert_eq!(response.headers()["x-body-len"], "20000");
        let body = response
            .into_body()
            .collect()
            .await
            .expect("body")
            .to_bytes();
        assert_eq!(&body[..], b"a", "every attempt on b went on to a");
    }
}

#[tokio::test]
async fn no_healthy_target_answers_503() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let gateway = Gateway::start(&snapshot(
        1,
        checks(false, true),
        &[(&a.target(), 100), (&b.target(), 100)],
    ))
    .await;
    for origin in [&a, &b] {
        gateway
            .dp
            .set_target_health(UPSTREAM_ID, "backend", &origin.target(), None, false)
            .expect("set unhealthy");
    }
    let reply = gateway.get(&[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        kong_error(reply.body.as_bytes()),
        "failure to get a peer from the ring-balancer"
    );
    assert!(!gateway.health().healthy);

    // An upstream without targets answers the same.
    gateway
        .dp
        .apply(&snapshot(2, json!({}), &[]))
        .expect("applies");
    assert_eq!(
        gateway.get(&[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );

    // The threshold takes the whole upstream out below its share.
    gateway
        .dp
        .apply(&snapshot(
            3,
            json!({"healthchecks": {"passive": {"unhealthy": {"tcp_failures": 1}}, "threshold": 50}}),
            &[(&a.target(), 100), (&b.target(), 100)],
        ))
        .expect("applies");
    assert_eq!(gateway.get(&[]).await.status, StatusCode::OK);
    gateway
        .dp
        .set_target_health(UPSTREAM_ID, "backend", &a.target(), None, false)
        .expect("set unhealthy");
    assert_eq!(
        gateway.get(&[]).await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn health_and_balancers_carry_over_config_versions() {
    let a = Origin::start("a").await;
    let b = Origin::start("b").await;
    let targets = [(a.target(), 100), (b.target(), 100)];
    let targets: Vec<(&str, u32)> = targets.iter().map(|(t, w)| (t.as_str(), *w)).collect();
    let gateway = Gateway::start(&snapshot(1, checks(false, true), &targets)).await;
    gateway
        .dp
        .set_target_health(UPSTREAM_ID, "backend", &b.target(), None, false)
        .expect("set unhealthy");

    // Same upstream: same balancer. Changed weights: a new balancer that
    // keeps the health of the addresses it still has.
    gateway
        .dp
        .apply(&snapshot(2, checks(false, true), &targets))
        .expect("applies");
    assert_eq!(gateway.target_health().get(&b.target()), Some(&false));
    gateway
        .dp
        .apply(&snapshot(
            3,
            checks(false, true),
            &[(&a.target(), 100), (&b.target(), 50)],
        ))
        .expect("applies");
    assert_eq!(gateway.target_health().get(&b.target()), Some(&false));
    assert_eq!(
        gateway.spread(6, &[]).await,
        BTreeMap::from([("a".into(), 6)])
    );

    // Without health checks, the Admin API cannot set health.
    gateway
        .dp
        .apply(&snapshot(4, json!({}), &targets))
        .expect("applies");
    let error = gateway
        .dp
        .set_target_health(UPSTREAM_ID, "backend", &a.target(), None, false)
        .expect_err("checks are off");
    assert_eq!(error.to_string(), "no healthchecker found for backend");
    assert!(!gateway.health().healthchecks);

    // A removed upstream has no balancer.
    let empty = ConfigSnapshot::new(5, Default::default());
    gateway.dp.apply(&empty).expect("applies");
    assert!(gateway.dp.upstream_health(UPSTREAM_ID).is_none());
}

#[tokio::test]
async fn targets_and_services_resolve_names() {
    let a = Origin::start("a").await;
    let target = format!("localhost:{}", a.addr.port());
    let gateway = Gateway::start(&snapshot(1, json!({}), &[(&target, 100)])).await;
    let reply = gateway.get(&[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.body, "a");
    assert_eq!(reply.headers["x-seen-host"], target.as_str());
    let health = gateway.health();
    assert_eq!(health.targets[0].dns, "A");
    assert_eq!(health.targets[0].addresses[0].ip, "127.0.0.1");

    // A service host that is no upstream is resolved by DNS.
    let mut direct = snapshot(2, json!({}), &[]);
    set_service_field(&mut direct, "host", json!("localhost"));
    set_service_field(&mut direct, "port", json!(a.addr.port()));
    gateway.dp.apply(&direct).expect("applies");
    let reply = gateway.get(&[]).await;
    assert_eq!(reply.status, StatusCode::OK);
    assert_eq!(reply.headers["x-seen-host"], target.as_str());

    // A name that does not resolve answers 503.
    direct.version = 3;
    set_service_field(&mut direct, "host", json!("nothing.invalid"));
    gateway.dp.apply(&direct).expect("applies");
    let reply = gateway.get(&[]).await;
    assert_eq!(reply.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(kong_error(reply.body.as_bytes()), "name resolution failed");
}

/// Change one field of the snapshot's only service.
fn set_service_field(snapshot: &mut ConfigSnapshot, field: &str, value: Value) {
    let mut services = snapshot.list("services");
    services[0][field] = value;
    snapshot.insert_values("services", services);
}

/// An origin that answers 200 (500 when `sick`) over TLS with a
/// self-signed certificate for 127.0.0.1.
async fn start_tls_origin(sick: Arc<AtomicBool>) -> SocketAddr {
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
        .expect("params")
        .self_signed(&key)
        .expect("certificate");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_no_client_auth()
    .with_single_cert(
        vec![cert.der().clone()],
        rustls_pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
    )
    .expect("server config");
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            let sick = Arc::clone(&sick);
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = service_fn(move |_request: Request<Incoming>| {
                    let status = if sick.load(Ordering::SeqCst) {
                        StatusCode::INTERNAL_SERVER_ERROR
                    } else {
                        StatusCode::OK
                    };
                    async move {
                        let mut response = Response::new(Full::new(Bytes::from_static(b"tls")));
                        *response.status_mut() = status;
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

#[tokio::test]
async fn https_active_checks_probe_over_tls() {
    let sick = Arc::new(AtomicBool::new(false));
    let origin = start_tls_origin(Arc::clone(&sick)).await;
    let target = origin.to_string();
    let https = |verify: bool| {
        let mut checks = checks(true, false);
        checks["healthchecks"]["active"]["type"] = json!("https");
        checks["healthchecks"]["active"]["https_verify_certificate"] = json!(verify);
        checks
    };
    // Not verifying: the self-signed origin is probed over TLS and healthy.
    let gateway = Gateway::start(&snapshot(1, https(false), &[(&target, 100)])).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(gateway.target_health().get(&target), Some(&true));
    // The probe reads the status over TLS: a 500 takes the target out.
    sick.store(true, Ordering::SeqCst);
    eventually("unhealthy on 500 over TLS", || async {
        gateway.target_health().get(&target) == Some(&false)
    })
    .await;
    sick.store(false, Ordering::SeqCst);
    eventually("healthy again", || async {
        gateway.target_health().get(&target) == Some(&true)
    })
    .await;

    // Verifying: the self-signed certificate fails the handshake.
    gateway
        .dp
        .apply(&snapshot(2, https(true), &[(&target, 100)]))
        .expect("applies");
    eventually("unhealthy when verification fails", || async {
        gateway.target_health().get(&target) == Some(&false)
    })
    .await;

    // A plain-HTTP probe of a TLS origin gets no status line either.
    let gateway = Gateway::start(&snapshot(1, checks(true, false), &[(&target, 100)])).await;
    eventually("unhealthy over plain HTTP", || async {
        gateway.target_health().get(&target) == Some(&false)
    })
    .await;
}
