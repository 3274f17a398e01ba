//! Admin API behaviour on bad input: Kong's error bodies and status codes,
//! and no half-written state left behind.

use gatehouse_test_support::Gatehouse;
use serde_json::{json, Value};

use crate::{client, BIN};

async fn send(
    method: &str,
    url: &str,
    ct: Option<&str>,
    body: impl Into<reqwest::Body>,
) -> (u16, Value) {
    let m = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let mut req = client().request(m, url).body(body);
    if let Some(ct) = ct {
        req = req.header("content-type", ct);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn post(url: &str, body: Value) -> (u16, Value) {
    send("POST", url, Some("application/json"), body.to_string()).await
}

async fn count(admin: &str, coll: &str) -> usize {
    let (s, v) = send("GET", &format!("{admin}/{coll}"), None, "").await;
    assert_eq!(s, 200, "{v}");
    v["data"].as_array().map_or(0, Vec::len)
}

#[tokio::test]
async fn bad_input_gets_kong_errors_and_writes_nothing() {
    let mut g = Gatehouse::start(BIN, &[]);
    let a = &g.admin.clone();

    let (s, v) = send(
        "POST",
        &format!("{a}/services"),
        Some("application/json"),
        "{\"host\": ",
    )
    .await;
    assert_eq!(
        (s, v.clone()),
        (400, json!({"message": "Cannot parse JSON body"}))
    );

    let (s, v) = post(
        &format!("{a}/services"),
        json!({"host": "a.test", "port": "eighty"}),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(v["code"], 2);
    assert_eq!(v["fields"]["port"], "expected an integer");
    assert_eq!(v["message"], "schema violation (port: expected an integer)");

    let (s, v) = post(
        &format!("{a}/services"),
        json!({"host": "a.test", "nope": 1, "retries": -1}),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(
        v["message"],
        "2 schema violations (nope: unknown field; retries: value should be between 0 and 32767)"
    );

    let (s, v) = post(&format!("{a}/widgets"), json!({})).await;
    assert_eq!((s, v), (404, json!({"message": "Not found"})));

    let (s, v) = post(
        &format!("{a}/services"),
        json!({"id": "not-a-uuid", "host": "a.test"}),
    )
    .await;
    assert_eq!(s, 400);
    assert_eq!(v["fields"]["id"], "expected a valid UUID");

    let (s, _) = send(
        "GET",
        &format!("{a}/services/00000000-0000-4000-8000-000000000000"),
        None,
        "",
    )
    .await;
    assert_eq!(s, 404);

    // Over Kong's 10 MB Admin API limit.
    let big = format!(
        "{{\"host\":\"a.test\",\"tags\":[\"{}\"]}}",
        "x".repeat(11 * 1024 * 1024)
    );
    let (s, v) = send(
        "POST",
        &format!("{a}/services"),
        Some("application/json"),
        big,
    )
    .await;
    assert_eq!(
        (s, v),
        (413, json!({"message": "Request size limit exceeded"}))
    );

    let (s, _) = send(
        "POST",
        &format!("{a}/services"),
        Some("text/plain"),
        "host=a",
    )
    .await;
    assert_eq!(s, 415);

    assert_eq!(
        count(a, "services").await,
        0,
        "no failed write may leave a service behind"
    );

    // A certificate whose SNI belongs to another certificate is refused as
    // a whole: neither the certificate nor any of its SNIs is stored.
    let cert = include_str!("fixtures/cert.pem");
    let key = include_str!("fixtures/key.pem");
    let (s, v) = post(
        &format!("{a}/certificates"),
        json!({"cert": cert, "key": key, "snis": ["one.test"]}),
    )
    .await;
    assert_eq!(s, 201, "{v}");
    let (s, v) = post(
        &format!("{a}/certificates"),
        json!({"cert": cert, "key": key, "snis": ["two.test", "one.test"]}),
    )
    .await;
    assert_eq!(s, 400, "{v}");
    assert!(
        v["fields"]["snis"]
            .as_str()
            .unwrap_or("")
            .contains("already associated"),
        "{v}"
    );
    assert_eq!(count(a, "certificates").await, 1);
    assert_eq!(count(a, "snis").await, 1);

    // Deleting a service that routes still use is refused and changes nothing.
    let (_, svc) = post(
        &format!("{a}/services"),
        json!({"name": "s1", "host": "s1.test"}),
    )
    .await;
    let (s, _) = post(
        &format!("{a}/services/s1/routes"),
        json!({"paths": ["/s1"]}),
    )
    .await;
    assert_eq!(s, 201);
    let (s, v) = send("DELETE", &format!("{a}/services/s1"), None, "").await;
    assert_eq!(s, 400, "{v}");
    assert_eq!(v["name"], "foreign key violation");
    assert_eq!(count(a, "services").await, 1);
    assert_eq!(count(a, "routes").await, 1);

    // What was stored survives a restart unchanged.
    let prefix = g.prefix.clone();
    let status = g.terminate();
    assert!(status.success(), "graceful exit, got {status}");
    let g2 = Gatehouse::start_in(BIN, &prefix, &[]);
    let (s, v) = send("GET", &format!("{}/services/s1", g2.admin), None, "").await;
    assert_eq!(s, 200);
    assert_eq!(v["id"], svc["id"]);
    assert_eq!(count(&g2.admin, "routes").await, 1);
    assert_eq!(count(&g2.admin, "snis").await, 1);
}

#[tokio::test]
async fn pagination_walks_every_entity_once() {
    let g = Gatehouse::start(BIN, &[]);
    let a = &g.admin;
    for i in 0..25 {
        let (s, _) = post(
            &format!("{a}/consumers"),
            json!({"username": format!("u{i}"), "tags": ["t"]}),
        )
        .await;
        assert_eq!(s, 201);
    }
    let mut seen = Vec::new();
    let mut url = format!("{a}/consumers?size=10&tags=t");
    loop {
        let (s, v) = send("GET", &url, None, "").await;
        assert_eq!(s, 200, "{v}");
        for c in v["data"].as_array().expect("data") {
            seen.push(c["username"].as_str().expect("username").to_owned());
        }
        match v["next"].as_str() {
            Some(next) => url = format!("{a}{next}"),
            None => break,
        }
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), 25);
    let (s, v) = send("GET", &format!("{a}/consumers?offset=!!!"), None, "").await;
    assert_eq!(s, 400);
    assert_eq!(v["name"], "invalid offset");
    let (s, v) = send("GET", &format!("{a}/consumers?size=0"), None, "").await;
    assert_eq!(s, 400);
    assert_eq!(v["name"], "invalid size");
}

#[tokio::test]
async fn kong_lookups_and_normal_forms() {
    let g = Gatehouse::start(BIN, &[]);
    let a = &g.admin;

    let (s, _) = post(
        &format!("{a}/consumers"),
        json!({"username": "c1", "custom_id": "ext-1"}),
    )
    .await;
    assert_eq!(s, 201);
    let (_, v) = send("GET", &format!("{a}/consumers?custom_id=ext-1"), None, "").await;
    assert_eq!(v["data"][0]["username"], "c1");
    let (_, v) = send("GET", &format!("{a}/consumers?custom_id=nobody"), None, "").await;
    assert_eq!(v, json!({"data": [], "next": null}));

    // Targets get Kong's default port, and the normal form is what
    // uniqueness and lookups use.
    let (s, _) = post(&format!("{a}/upstreams"), json!({"name": "up"})).await;
    assert_eq!(s, 201);
    let (s, v) = post(
        &format!("{a}/upstreams/up/targets"),
        json!({"target": "10.0.0.1"}),
    )
    .await;
    assert_eq!((s, v["target"].clone()), (201, json!("10.0.0.1:8000")));
    let (s, v) = post(
        &format!("{a}/upstreams/up/targets"),
        json!({"target": "10.0.0.1:8000"}),
    )
    .await;
    assert_eq!(s, 409, "{v}");
    let (s, _) = send(
        "GET",
        &format!("{a}/upstreams/up/targets/10.0.0.1:8000"),
        None,
        "",
    )
    .await;
    assert_eq!(s, 200);

    // Form bodies with Kong's nested keys.
    let (s, v) = send(
        "POST",
        &format!("{a}/plugins"),
        Some("application/x-www-form-urlencoded"),
        "name=key-auth&config.key_names[]=k1&config.key_names[]=k2&config.hide_credentials=true",
    )
    .await;
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["config"]["key_names"], json!(["k1", "k2"]));
    assert_eq!(v["config"]["hide_credentials"], json!(true));

    let (s, v) = send("OPTIONS", &format!("{a}/consumers/c1"), None, "").await;
    assert_eq!((s, v), (204, Value::Null));
}
