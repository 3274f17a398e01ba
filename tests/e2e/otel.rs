//! The opentelemetry plugin through a real proxy: W3C trace context in and
//! out, and the spans as an OTLP/HTTP collector on loopback receives and
//! decodes them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as Any;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use prost::Message;
use serde_json::json;

use crate::plugins::Setup;

/// What the collector received: each export request's headers and body.
#[derive(Clone, Default)]
struct Collector {
    received: Arc<Mutex<Vec<(HeaderMap, ExportTraceServiceRequest)>>>,
}

/// A span with the resource and scope it came with.
#[derive(Clone, Debug)]
struct Received {
    span: Span,
    resource: Vec<KeyValue>,
    scope: String,
    headers: HeaderMap,
}

async fn export(State(collector): State<Collector>, headers: HeaderMap, body: Bytes) -> StatusCode {
    match ExportTraceServiceRequest::decode(body) {
        Ok(request) => {
            collector.received.lock().unwrap().push((headers, request));
            StatusCode::OK
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}

impl Collector {
    async fn start() -> (Collector, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind collector");
        let addr = listener.local_addr().expect("addr");
        let collector = Collector::default();
        let app = axum::Router::new()
            .route("/v1/traces", axum::routing::post(export))
            .with_state(collector.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        (collector, format!("http://{addr}/v1/traces"))
    }

    fn spans(&self) -> Vec<Received> {
        let received = self.received.lock().unwrap();
        let mut out = Vec::new();
        for (headers, request) in received.iter() {
            for resource_spans in &request.resource_spans {
                let resource = resource_spans
                    .resource
                    .as_ref()
                    .map(|r| r.attributes.clone())
                    .unwrap_or_default();
                for scope_spans in &resource_spans.scope_spans {
                    let scope = scope_spans
                        .scope
                        .as_ref()
                        .map(|s| s.name.clone())
                        .unwrap_or_default();
                    for span in &scope_spans.spans {
                        out.push(Received {
                            span: span.clone(),
                            resource: resource.clone(),
                            scope: scope.clone(),
                            headers: headers.clone(),
                        });
                    }
                }
            }
        }
        out
    }

    /// The spans of `trace_id` once `count` of them arrived.
    async fn wait_for(&self, trace_id: &str, count: usize) -> Vec<Received> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let spans: Vec<Received> = self
                .spans()
                .into_iter()
                .filter(|r| hex(&r.span.trace_id) == trace_id)
                .collect();
            if spans.len() >= count {
                return spans;
            }
            assert!(
                Instant::now() < deadline,
                "{count} spans of trace {trace_id} never arrived; got {:#?}",
                self.spans()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a Any> {
    attributes
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn string_attr(attributes: &[KeyValue], key: &str) -> Option<String> {
    match attr(attributes, key) {
        Some(Any::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

/// `(trace id, parent id, flags)` of a traceparent.
fn parse_traceparent(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "traceparent {value}");
    assert_eq!(parts[0], "00", "traceparent {value}");
    assert_eq!(parts[1].len(), 32, "traceparent {value}");
    assert_eq!(parts[2].len(), 16, "traceparent {value}");
    (parts[1].into(), parts[2].into(), parts[3].into())
}

fn named<'a>(spans: &'a [Received], name: &str) -> &'a Received {
    spans
        .iter()
        .find(|r| r.span.name == name)
        .unwrap_or_else(|| panic!("no span {name} in {spans:#?}"))
}

#[tokio::test]
async fn opentelemetry_propagates_w3c_context_and_exports_kong_spans() {
    let (collector, endpoint) = Collector::start().await;
    let mut s = Setup::start();
    s.service_route("otel", &["/otel"]).await;
    s.service_route("otel-exit", &["/otel-exit"]).await;
    let otel = json!({
        "name": "opentelemetry",
        "config": {
            "traces_endpoint": endpoint,
            "sampling_rate": 1,
            "headers": {"x-collector-token": "s3cret"},
            "resource_attributes": {"deployment.environment": "e2e"},
            "queue": {"max_batch_size": 50, "max_coalescing_delay": 0.1},
        },
    });
    s.post("/routes/otel/plugins", otel.clone()).await;
    s.post("/routes/otel-exit/plugins", otel).await;
    s.post(
        "/routes/otel-exit/plugins",
        json!({"name": "request-termination", "config": {"status_code": 418, "message": "teapot"}}),
    )
    .await;
    s.synced().await;

    // A sampled caller: our span is its child, the upstream's parent is ours.
    let trace1 = "4bf92f3577b34da6a3ce929d0e0e4736";
    let parent1 = "00f067aa0ba902b7";
    let sampled = s
        .get(
            "/otel",
            &[
                ("traceparent", &format!("00-{trace1}-{parent1}-01")),
                ("tracestate", "vendor=abc"),
            ],
        )
        .await;
    assert_eq!(sampled.status, 200, "{}", sampled.body);
    let upstream = sampled
        .upstream_header("traceparent")
        .expect("traceparent upstream");
    let (up_trace, up_parent, up_flags) = parse_traceparent(&upstream);
    assert_eq!(up_trace, trace1);
    assert_ne!(up_parent, parent1);
    assert_eq!(up_flags, "01");
    assert_eq!(
        sampled.upstream_header("tracestate").as_deref(),
        Some("vendor=abc")
    );

    // A caller that does not sample: the decision goes on, nothing is sent.
    let trace2 = "5bf92f3577b34da6a3ce929d0e0e4737";
    let unsampled = s
        .get(
            "/otel",
            &[("traceparent", &format!("00-{trace2}-00f067aa0ba902b8-00"))],
        )
        .await;
    assert_eq!(unsampled.status, 200);
    let (trace, _, flags) = parse_traceparent(&unsampled.upstream_header("traceparent").unwrap());
    assert_eq!((trace.as_str(), flags.as_str()), (trace2, "00"));

    // An answer a plugin made: one span, with its status.
    let trace3 = "6bf92f3577b34da6a3ce929d0e0e4738";
    let parent3 = "00f067aa0ba902b9";
    let teapot = s
        .get(
            "/otel-exit",
            &[("traceparent", &format!("00-{trace3}-{parent3}-01"))],
        )
        .await;
    assert_eq!(teapot.status, 418, "{}", teapot.body);

    // No incoming context: a new trace.
    let fresh = s.get("/otel", &[]).await;
    assert_eq!(fresh.status, 200);
    let (trace4, fresh_parent, fresh_flags) =
        parse_traceparent(&fresh.upstream_header("traceparent").unwrap());
    assert_ne!(trace4, "0".repeat(32));
    assert_eq!(fresh_flags, "01");

    let spans1 = collector.wait_for(trace1, 2).await;
    let root = named(&spans1, "kong");
    let balancer = named(&spans1, "kong.balancer");
    assert_eq!(root.span.kind, SpanKind::Server as i32);
    assert_eq!(hex(&root.span.parent_span_id), parent1);
    assert_eq!(root.span.trace_state, "vendor=abc");
    let a = &root.span.attributes;
    assert!(
        matches!(attr(a, "http.status_code"), Some(Any::IntValue(200))),
        "{a:?}"
    );
    assert_eq!(string_attr(a, "http.method").as_deref(), Some("GET"));
    assert_eq!(string_attr(a, "http.scheme").as_deref(), Some("http"));
    assert_eq!(string_attr(a, "http.route").as_deref(), Some("/otel"));
    assert_eq!(string_attr(a, "net.peer.ip").as_deref(), Some("127.0.0.1"));
    let host = string_attr(a, "http.host").expect("http.host");
    assert_eq!(
        string_attr(a, "http.url"),
        Some(format!("http://{host}/otel"))
    );
    assert_eq!(balancer.span.kind, SpanKind::Client as i32);
    assert_eq!(hex(&balancer.span.span_id), up_parent);
    assert_eq!(balancer.span.parent_span_id, root.span.span_id);
    assert!(balancer.span.start_time_unix_nano >= root.span.start_time_unix_nano);
    assert!(root.span.end_time_unix_nano >= root.span.start_time_unix_nano);
    // Kong's resource and scope, and the configured collector headers.
    assert_eq!(
        string_attr(&root.resource, "service.name").as_deref(),
        Some("kong")
    );
    assert_eq!(
        string_attr(&root.resource, "deployment.environment").as_deref(),
        Some("e2e")
    );
    assert!(string_attr(&root.resource, "service.instance.id").is_some());
    assert_eq!(root.scope, "kong-internal");
    assert_eq!(
        root.headers
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/x-protobuf")
    );
    assert_eq!(
        root.headers
            .get("x-collector-token")
            .and_then(|v| v.to_str().ok()),
        Some("s3cret")
    );

    let spans3 = collector.wait_for(trace3, 1).await;
    let root3 = named(&spans3, "kong");
    assert_eq!(hex(&root3.span.parent_span_id), parent3);
    assert!(
        matches!(
            attr(&root3.span.attributes, "http.status_code"),
            Some(Any::IntValue(418))
        ),
        "{:?}",
        root3.span.attributes
    );

    let spans4 = collector.wait_for(&trace4, 2).await;
    let root4 = named(&spans4, "kong");
    assert!(root4.span.parent_span_id.is_empty());
    assert_eq!(
        hex(&named(&spans4, "kong.balancer").span.span_id),
        fresh_parent
    );

    // Everything sent before the last request has arrived: the teapot has
    // no upstream span, and the unsampled trace no span at all.
    let all = collector.spans();
    assert_eq!(
        all.iter()
            .filter(|r| hex(&r.span.trace_id) == trace3)
            .count(),
        1
    );
    assert!(
        all.iter().all(|r| hex(&r.span.trace_id) != trace2),
        "an unsampled trace was exported"
    );
}
