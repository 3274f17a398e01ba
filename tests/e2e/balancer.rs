//! Upstreams and health through the Admin API of a real standalone
//! process: `/upstreams/{u}/health` shows what the proxy acts on, and the
//! `healthy`/`unhealthy` endpoints change it.

use gatehouse_test_support::{assert_eventually, free_port, raw_request, EchoUpstream, Gatehouse};
use serde_json::{json, Value};

use crate::{client, BIN};

async fn call(method: reqwest::Method, url: String, body: Option<Value>) -> (u16, Value) {
    let mut request = client().request(method, url);
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.expect("admin answers");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn post(url: String, body: Value) -> Value {
    let (status, body) = call(reqwest::Method::POST, url, Some(body)).await;
    assert_eq!(status, 201, "{body}");
    body
}

/// `target → health` from `/upstreams/{u}/health`.
async fn health(admin: &str, upstream: &str) -> Vec<(String, String)> {
    let (status, body) = call(
        reqwest::Method::GET,
        format!("{admin}/upstreams/{upstream}/health"),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let mut out: Vec<(String, String)> = body["data"]
        .as_array()
        .expect("data")
        .iter()
        .map(|t| {
            (
                t["target"].as_str().unwrap_or("").to_owned(),
                t["health"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    out.sort();
    out
}

fn sorted(mut pairs: Vec<(String, String)>) -> Vec<(String, String)> {
    pairs.sort();
    pairs
}

/// Which target answered a proxied request (the echo shows its Host
/// header, the target's address), or the gateway's status.
fn answered_by(proxy: std::net::SocketAddr, path: &str) -> String {
    match raw_request(proxy, "GET", path, &[], b"") {
        Ok((200, body)) => {
            let seen: Value = serde_json::from_slice(&body).expect("echo json");
            seen["headers"]["host"].as_str().unwrap_or("").to_owned()
        }
        Ok((status, _)) => status.to_string(),
        Err(error) => format!("error: {error}"),
    }
}

#[tokio::test]
async fn active_checks_show_in_upstream_health() {
    let live = EchoUpstream::start();
    let dead = format!("127.0.0.1:{}", free_port());
    let g = Gatehouse::start(BIN, &[]);
    let a = &g.admin;
    post(
        format!("{a}/upstreams"),
        json!({"name": "backend", "healthchecks": {"active": {
            "healthy": {"interval": 0.1, "successes": 1},
            "unhealthy": {"interval": 0.1, "tcp_failures": 1, "http_failures": 1, "timeouts": 1},
        }}}),
    )
    .await;
    post(
        format!("{a}/upstreams/backend/targets"),
        json!({"target": live.addr.to_string()}),
    )
    .await;
    post(
        format!("{a}/upstreams/backend/targets"),
        json!({"target": dead}),
    )
    .await;
    post(
        format!("{a}/services"),
        json!({"name": "lb", "host": "backend"}),
    )
    .await;
    post(format!("{a}/services/lb/routes"), json!({"paths": ["/lb"]})).await;

    let live_target = live.addr.to_string();
    let want = sorted(vec![
        (live_target.clone(), "HEALTHY".to_owned()),
        (dead.clone(), "UNHEALTHY".to_owned()),
    ]);
    let mut seen = Vec::new();
    for _ in 0..200 {
        seen = health(a, "backend").await;
        if seen == want {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(seen, want, "{}", g.log_text());

    // Kong's shape, per address.
    let (_, body) = call(
        reqwest::Method::GET,
        format!("{a}/upstreams/backend/health"),
        None,
    )
    .await;
    let live_entry = body["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|t| t["target"] == live_target.as_str())
        .expect("live target")
        .clone();
    assert_eq!(
        live_entry["data"]["addresses"],
        json!([{"ip": "127.0.0.1", "port": live.addr.port(), "weight": 100, "health": "HEALTHY"}])
    );
    assert_eq!(live_entry["data"]["dns"], "A");
    assert_eq!(
        live_entry["data"]["weight"],
        json!({"total": 100, "unavailable": 0, "available": 100})
    );
    assert!(body["node_id"].is_string());

    // The dead target takes no traffic.
    for _ in 0..6 {
        assert_eq!(answered_by(g.proxy_addr, "/lb"), live_target);
    }

    let (_, body) = call(
        reqwest::Method::GET,
        format!("{a}/upstreams/backend/health?balancer_health=1"),
        None,
    )
    .await;
    assert_eq!(body["data"]["health"], "HEALTHY", "{body}");
    assert_eq!(body["data"]["details"]["weight"]["unavailable"], 100);
}

#[tokio::test]
async fn targets_can_be_set_healthy_and_unhealthy() {
    let one = EchoUpstream::start();
    let two = EchoUpstream::start();
    let g = Gatehouse::start(BIN, &[]);
    let a = &g.admin;
    post(
        format!("{a}/upstreams"),
        json!({"name": "manual", "healthchecks": {"passive": {"unhealthy": {"tcp_failures": 1}}}}),
    )
    .await;
    post(format!("{a}/upstreams"), json!({"name": "plain"})).await;
    let (one_t, two_t) = (one.addr.to_string(), two.addr.to_string());
    for target in [&one_t, &two_t] {
        post(
            format!("{a}/upstreams/manual/targets"),
            json!({"target": target}),
        )
        .await;
    }
    post(
        format!("{a}/upstreams/plain/targets"),
        json!({"target": one_t}),
    )
    .await;
    post(
        format!("{a}/services"),
        json!({"name": "svc", "host": "manual"}),
    )
    .await;
    post(format!("{a}/services/svc/routes"), json!({"paths": ["/m"]})).await;
    assert_eventually!(
        answered_by(g.proxy_addr, "/m") != "404",
        "route never became active:\n{}",
        g.log_text()
    );

    let set = |target: &str, what: &str| {
        let url = format!("{a}/upstreams/manual/targets/{target}/{what}");
        async move { call(reqwest::Method::PUT, url, None).await.0 }
    };
    assert_eq!(set(&one_t, "unhealthy").await, 204);
    assert_eq!(
        health(a, "manual").await,
        sorted(vec![
            (one_t.clone(), "UNHEALTHY".to_owned()),
            (two_t.clone(), "HEALTHY".to_owned())
        ])
    );
    for _ in 0..4 {
        assert_eq!(answered_by(g.proxy_addr, "/m"), two_t);
    }

    // With every target down the proxy answers Kong's 503.
    assert_eq!(set(&two_t, "unhealthy").await, 204);
    let (status, body) = raw_request(g.proxy_addr, "GET", "/m", &[], b"").expect("request");
    assert_eq!(status, 503);
    assert_eq!(
        serde_json::from_slice::<Value>(&body).expect("json")["message"],
        "failure to get a peer from the ring-balancer"
    );
    let (_, body) = call(
        reqwest::Method::GET,
        format!("{a}/upstreams/manual/health?balancer_health=1"),
        None,
    )
    .await;
    assert_eq!(body["data"]["health"], "UNHEALTHY");

    // Healthy again, by target and by address (POST works as PUT).
    assert_eq!(set(&one_t, "healthy").await, 204);
    let url = format!("{a}/upstreams/manual/targets/{two_t}/{two_t}/healthy");
    assert_eq!(call(reqwest::Method::POST, url, None).await.0, 204);
    assert_eq!(
        health(a, "manual").await,
        sorted(vec![
            (one_t.clone(), "HEALTHY".to_owned()),
            (two_t.clone(), "HEALTHY".to_owned())
        ])
    );
    let answered = answered_by(g.proxy_addr, "/m");
    assert!(answered == one_t || answered == two_t, "{answered}");

    // Unknown targets are 404; an upstream without checks refuses.
    assert_eq!(set("10.9.9.9:1", "healthy").await, 404);
    let (status, body) = call(
        reqwest::Method::PUT,
        format!("{a}/upstreams/plain/targets/{one_t}/healthy"),
        None,
    )
    .await;
    assert_eq!(status, 400);
    assert_eq!(body, json!({"message": "no healthchecker found for plain"}));
    assert_eq!(
        health(a, "plain").await,
        vec![(one_t.clone(), "HEALTHCHECKS_OFF".to_owned())]
    );
}
