//! gRPC through the proxy: a real tonic server (the standard health
//! service) behind `grpc` and `grpcs` services, a real tonic client over
//! h2c and over TLS with ALPN, unary calls, server streaming, statuses in
//! trailers, and Kong's answers to requests that do not fit a gRPC route.

use std::net::SocketAddr;
use std::time::Duration;

use gatehouse_test_support::tls::{Pem, TestCa};
use gatehouse_test_support::Gatehouse;
use serde_json::{json, Value};
use tokio_stream::StreamExt;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, Server, ServerTlsConfig};
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::server::HealthReporter;

use crate::{client, BIN};

async fn post(url: String, body: Value) -> Value {
    let response = client().post(url).json(&body).send().await.expect("post");
    let status = response.status();
    let body: Value = response.json().await.expect("json");
    assert!(status.is_success(), "{status}: {body}");
    body
}

/// A tonic health server on a loopback port, plaintext or TLS.
async fn health_server(tls: Option<&Pem>) -> (SocketAddr, HealthReporter) {
    let (reporter, service) = tonic_health::server::health_reporter();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let mut builder = Server::builder();
    if let Some(pem) = tls {
        builder = builder
            .tls_config(ServerTlsConfig::new().identity(Identity::from_pem(&pem.cert, &pem.key)))
            .expect("server TLS");
    }
    let router = builder.add_service(service);
    tokio::spawn(async move {
        router
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener))
            .await
            .expect("gRPC server");
    });
    (addr, reporter)
}

fn check(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_owned(),
    }
}

/// A client over h2c (prior knowledge) whose requests carry `authority`.
async fn h2c_client(proxy: SocketAddr, authority: &str) -> HealthClient<Channel> {
    let channel = Channel::from_shared(format!("http://{proxy}"))
        .expect("uri")
        .origin(format!("http://{authority}").parse().expect("origin"))
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("h2c connection to the proxy");
    HealthClient::new(channel)
}

/// Waits until the route answers through the proxy.
async fn until_routed(client: &mut HealthClient<Channel>, g: &Gatehouse) {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        match client.check(check("")).await {
            Ok(_) => return,
            Err(status) if std::time::Instant::now() > deadline => {
                panic!(
                    "the gRPC route never answered: {status:?}\n{}",
                    g.log_text()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test]
async fn grpc_calls_stream_through_the_proxy_with_trailers() {
    let (upstream, reporter) = health_server(None).await;
    reporter
        .set_service_status("orders", tonic_health::ServingStatus::Serving)
        .await;
    let g = Gatehouse::start(BIN, &[]);
    let a = g.admin.clone();
    post(
        format!("{a}/services"),
        json!({"name": "health", "url": format!("grpc://{upstream}")}),
    )
    .await;
    post(
        format!("{a}/services/health/routes"),
        json!({"protocols": ["grpc"], "hosts": ["health.test"], "paths": ["/grpc.health.v1.Health/"]}),
    )
    .await;

    let mut health = h2c_client(g.proxy_addr, "health.test").await;
    until_routed(&mut health, &g).await;

    // Unary: the answer is in the body, the status in trailers.
    let reply = health.check(check("orders")).await.expect("check");
    assert_eq!(reply.get_ref().status, ServingStatus::Serving as i32);
    // An error status from the upstream (trailers-only response) reaches
    // the client as it was sent.
    let missing = health.check(check("nope")).await.expect_err("unknown");
    assert_eq!(missing.code(), Code::NotFound, "{missing:?}");

    // Server streaming: each change arrives while the call stays open.
    let mut watch = health
        .watch(check("orders"))
        .await
        .expect("watch")
        .into_inner();
    let first = watch.next().await.expect("first").expect("message");
    assert_eq!(first.status, ServingStatus::Serving as i32);
    reporter
        .set_service_status("orders", tonic_health::ServingStatus::NotServing)
        .await;
    let second = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .expect("the change streams through without buffering")
        .expect("second")
        .expect("message");
    assert_eq!(second.status, ServingStatus::NotServing as i32);

    // No route: Kong's 404, as the gRPC status NotFound.
    let mut unrouted = h2c_client(g.proxy_addr, "nothing.test").await;
    let status = unrouted.check(check("")).await.expect_err("no route");
    assert_eq!(status.code(), Code::NotFound, "{status:?}");
    assert_eq!(status.message(), "NotFound");

    // A plain HTTP/1.1 request to the gRPC route: 415, as Kong.
    let url = format!("{}/grpc.health.v1.Health/Check", g.proxy);
    let response = client()
        .post(&url)
        .header("host", "health.test")
        .send()
        .await
        .expect("HTTP/1.1 request");
    assert_eq!(response.status(), 415);
    let body: Value = response.json().await.expect("json");
    assert_eq!(body["message"], "Non-gRPC request matched gRPC route");
    // gRPC content over HTTP/1.1: 426 with Kong's upgrade headers, and
    // the status as gRPC headers.
    let response = client()
        .post(&url)
        .header("host", "health.test")
        .header("content-type", "application/grpc")
        .send()
        .await
        .expect("HTTP/1.1 request");
    assert_eq!(response.status(), 426);
    let headers = response.headers();
    assert_eq!(headers["upgrade"], "HTTP/2");
    assert_eq!(headers["grpc-status"], "3");
    assert_eq!(headers["grpc-message"], "InvalidArgument");
}

#[tokio::test]
async fn grpcs_upstreams_and_tls_clients_speak_h2_by_alpn() {
    let ca = TestCa::new("gRPC test CA");
    // Kong's schema keeps tls_verify to https services: a grpcs upstream
    // is encrypted but not verified.
    let upstream_cert = ca.leaf(&["upstream.test"]);
    let (upstream, _reporter) = health_server(Some(&upstream_cert)).await;
    let g = Gatehouse::start(BIN, &[]);
    let a = g.admin.clone();
    let served = ca.leaf(&["grpc.test"]);
    post(
        format!("{a}/certificates"),
        json!({"cert": served.cert, "key": served.key, "snis": ["grpc.test"]}),
    )
    .await;
    post(
        format!("{a}/services"),
        json!({
            "name": "secure",
            "url": format!("grpcs://{upstream}"),
        }),
    )
    .await;
    post(
        format!("{a}/services/secure/routes"),
        json!({"protocols": ["grpcs"], "paths": ["/grpc.health.v1.Health/"]}),
    )
    .await;

    // TLS to the proxy, h2 by ALPN, certificate by SNI.
    let channel = Channel::from_shared(format!("https://{}", g.proxy_tls_addr))
        .expect("uri")
        .tls_config(
            ClientTlsConfig::new()
                .ca_certificate(Certificate::from_pem(&ca.cert))
                .domain_name("grpc.test"),
        )
        .expect("client TLS")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .expect("TLS connection to the proxy");
    let mut health = HealthClient::new(channel);
    until_routed(&mut health, &g).await;
    let reply = health.check(check("")).await.expect("check over grpcs");
    assert_eq!(reply.get_ref().status, ServingStatus::Serving as i32);

    // A grpcs-only route reached in plaintext: Kong's 200 with
    // grpc-status 1.
    let mut plain = h2c_client(g.proxy_addr, "grpc.test").await;
    let refused = plain.check(check("")).await.expect_err("plaintext");
    assert_eq!(refused.code(), Code::Cancelled, "{refused:?}");
    assert_eq!(refused.message(), "gRPC request matched gRPCs route");
}
