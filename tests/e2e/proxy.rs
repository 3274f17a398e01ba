//! The README walk-through: a service, a route, traffic reaching the
//! upstream through the proxy.

use gatehouse_test_support::{assert_eventually, raw_request, EchoUpstream, Gatehouse};
use serde_json::{json, Value};

use crate::{client, BIN};

#[tokio::test]
async fn readme_walkthrough_proxies_to_the_upstream() {
    let up = EchoUpstream::start();
    let g = Gatehouse::start(BIN, &[]);
    let c = client();
    let r = c
        .post(format!("{}/services", g.admin))
        .json(&json!({"name": "echo", "url": format!("http://{}", up.addr)}))
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

    let proxy = g.proxy_addr;
    assert_eventually!(
        matches!(
            raw_request(proxy, "GET", "/echo/hello?x=1", &[], b""),
            Ok((200, _))
        ),
        "route never became active:\n{}",
        g.log_text()
    );
    let (status, body) = raw_request(proxy, "GET", "/echo/hello?x=1", &[], b"").expect("request");
    assert_eq!(status, 200);
    let seen: Value = serde_json::from_slice(&body).expect("echo json");
    assert_eq!(
        seen["path"], "/hello?x=1",
        "strip_path removes the route prefix"
    );
    assert!(seen["headers"]["x-forwarded-for"].is_string(), "{seen}");

    let (status, body) = raw_request(proxy, "GET", "/nowhere", &[], b"").expect("request");
    assert_eq!(status, 404);
    let v: Value = serde_json::from_slice(&body).expect("json");
    // Kong's error template: the message and a request id.
    assert_eq!(v["message"], "no Route matched with those values");
    let id = v["request_id"].as_str().expect("request_id");
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{v}"
    );
    assert_eq!(v.as_object().map(|o| o.len()), Some(2), "{v}");

    // Deleting the route takes it out of the proxy.
    let rid: Value = c
        .get(format!("{}/services/echo/routes", g.admin))
        .send()
        .await
        .expect("list")
        .json()
        .await
        .expect("json");
    let rid = rid["data"][0]["id"].as_str().expect("route id").to_owned();
    let r = c
        .delete(format!("{}/routes/{rid}", g.admin))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    assert_eventually!(
        matches!(
            raw_request(proxy, "GET", "/echo/hello", &[], b""),
            Ok((404, _))
        ),
        "deleted route still served"
    );
}
