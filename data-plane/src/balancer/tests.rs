use gatehouse_model::snapshot::Upstream;
use serde_json::{json, Value};

use super::*;

/// Builds the balancer of an upstream with `fields` and `targets`
/// (`host:port/weight`), and compares its addresses as
/// `authority weight plain-host tls-host` lines, in ring order.
fn check(fields: Value, targets: &[&str], expect: &str) {
    let mut upstream = json!({
        "id": "u1", "name": "backend", "algorithm": "round-robin", "slots": 10000,
        "host_header": null,
    });
    if let (Value::Object(upstream), Value::Object(fields)) = (&mut upstream, fields.clone()) {
        upstream.extend(fields);
    }
    let upstream: Upstream = serde_json::from_value(upstream).expect("upstream");
    let targets: Vec<Target> = targets
        .iter()
        .enumerate()
        .map(|(idx, spec)| {
            let (target, weight) = spec.split_once('/').unwrap_or((spec, "100"));
            serde_json::from_value(json!({
                "id": format!("t{idx}"), "upstream": {"id": "u1"},
                "target": target, "weight": weight.parse::<u32>().expect("weight"),
            }))
            .expect("target")
        })
        .collect();
    let refs: Vec<&Target> = targets.iter().collect();
    let balancer = UpstreamBalancer::new(&upstream, Spec::new(&upstream, &refs), None);
    let ring = balancer.shared.ring.load();
    let got: Vec<String> = ring
        .addresses
        .iter()
        .map(|address| {
            format!(
                "{} {} {} {}",
                address.authority,
                address.weight,
                address.host_headers[0].to_str().expect("ascii"),
                address.host_headers[1].to_str().expect("ascii"),
            )
        })
        .collect();
    let expect: Vec<&str> = expect
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect();
    assert_eq!(got, expect, "{fields} {targets:?}");
}

#[test]
fn addresses_and_host_headers() {
    let cases: Vec<(Value, Vec<&str>, &str)> = vec![
        // The Host header is the target's host, with the port unless it
        // is the scheme's default.
        (
            json!({}),
            vec!["10.0.0.2:8000/50", "10.0.0.1:80", "10.0.0.3:443/0"],
            "10.0.0.1:80 100 10.0.0.1 10.0.0.1:80
             10.0.0.2:8000 50 10.0.0.2:8000 10.0.0.2:8000
             10.0.0.3:443 0 10.0.0.3:443 10.0.0.3",
        ),
        (
            json!({"host_header": "api.example"}),
            vec!["10.0.0.1:8080", "10.0.0.2:80"],
            "10.0.0.1:8080 100 api.example:8080 api.example:8080
             10.0.0.2:80 100 api.example api.example:80",
        ),
        (
            json!({}),
            vec!["[::1]:8000"],
            "[::1]:8000 100 [::1]:8000 [::1]:8000",
        ),
        // Names have no address until they resolve.
        (json!({}), vec!["localhost:8000"], ""),
    ];
    for (fields, targets, expect) in cases {
        check(fields, &targets, expect);
    }
}

#[tokio::test]
async fn names_resolve_in_the_background() {
    let upstream: Upstream = serde_json::from_value(json!({
        "id": "u1", "name": "backend", "algorithm": "round-robin", "slots": 10000,
        "host_header": null,
    }))
    .expect("upstream");
    let target: Target = serde_json::from_value(json!({
        "id": "t1", "upstream": {"id": "u1"}, "target": "localhost:8123", "weight": 100,
    }))
    .expect("target");
    let balancer = UpstreamBalancer::new(&upstream, Spec::new(&upstream, &[&target]), None);
    balancer.start(
        &Dns::from_system(),
        Some(&tokio::runtime::Handle::current()),
    );
    let input = HashInput {
        client_ip: b"127.0.0.1",
        headers: &http::HeaderMap::new(),
        path: "/",
        query: None,
        path_regex: None,
    };
    // The first request waits for the first answer.
    let peer = balancer.pick(&input, false).await.expect("a peer");
    assert_eq!(peer.authority.as_str(), "127.0.0.1:8123");
    assert_eq!(peer.host_header, "localhost:8123");
}
