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
    // The template follows Accept, on the HTTP/1.1 engine and on hyper's
    // (a chunked request goes there).
    let (status, body) =
        raw_request(proxy, "GET", "/nowhere", &[("Accept", "text/plain")], b"").expect("request");
    assert_eq!(status, 404);
    let text = String::from_utf8(body).expect("utf-8");
    let id = text
        .strip_prefix("no Route matched with those values\nrequest_id: ")
        .and_then(|rest| rest.strip_suffix('\n'))
        .unwrap_or_else(|| panic!("not Kong's text template: {text:?}"));
    assert_eq!(id.len(), 32, "{text:?}");
    let chunked = {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(proxy).expect("connect");
        s.write_all(
            b"POST /nowhere HTTP/1.1\r\nHost: x\r\nAccept: text/html;q=0.9, application/xml\r\n\
              Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n0\r\n\r\n",
        )
        .expect("write");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("read");
        answer
    };
    assert!(chunked.starts_with("HTTP/1.1 404"), "{chunked}");
    assert!(
        chunked
            .to_ascii_lowercase()
            .contains("content-type: application/xml; charset=utf-8"),
        "{chunked}"
    );
    assert!(
        chunked.contains("<message>no Route matched with those values</message>"),
        "{chunked}"
    );

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
