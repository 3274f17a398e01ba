//! TLS termination with certificates chosen by SNI, the default
//! certificate under the prefix, and https upstreams with Kong's
//! `tls_verify`, `ca_certificates` and `client_certificate`.

use gatehouse_test_support::tls::{pem_der, self_signed, tls_request, TestCa, TlsEchoUpstream};
use gatehouse_test_support::{assert_eventually, raw_request, EchoUpstream, Gatehouse};
use serde_json::{json, Value};

use crate::{client, BIN};

async fn post(url: String, body: Value) -> Value {
    let response = client().post(url).json(&body).send().await.expect("post");
    let status = response.status();
    let body: Value = response.json().await.expect("json");
    assert!(status.is_success(), "{status}: {body}");
    body
}

async fn patch(url: String, body: Value) -> Value {
    let response = client().patch(url).json(&body).send().await.expect("patch");
    let status = response.status();
    let body: Value = response.json().await.expect("json");
    assert!(status.is_success(), "{status}: {body}");
    body
}

#[tokio::test]
async fn certificates_follow_sni_and_change_without_restart() {
    let up = EchoUpstream::start();
    let mut g = Gatehouse::start(BIN, &[]);
    let a = g.admin.clone();
    let one = self_signed(&["one.test"]);
    let two = self_signed(&["*.two.test"]);
    let first = post(
        format!("{a}/certificates"),
        json!({"cert": one.cert, "key": one.key, "snis": ["one.test"]}),
    )
    .await;
    post(
        format!("{a}/certificates"),
        json!({"cert": two.cert, "key": two.key, "snis": ["*.two.test"]}),
    )
    .await;
    post(
        format!("{a}/services"),
        json!({"name": "echo", "url": format!("http://{}", up.addr)}),
    )
    .await;
    // An https-only route: served over TLS, 426 in plaintext.
    post(
        format!("{a}/services/echo/routes"),
        json!({"paths": ["/echo"], "protocols": ["https"]}),
    )
    .await;

    // A route that only the SNI one.test reaches.
    post(
        format!("{a}/services/echo/routes"),
        json!({"paths": ["/sni-only"], "protocols": ["https"], "snis": ["one.test"]}),
    )
    .await;

    let tls = g.proxy_tls_addr;
    let default_cert = std::fs::read_to_string(g.prefix.join("ssl/gatehouse-default.crt"))
        .expect("the default certificate is generated under the prefix");
    let default_der = pem_der(&default_cert);
    assert_eventually!(
        tls_request(tls, Some("one.test"), "GET", "/echo/x", &[])
            .is_ok_and(|r| r.status == 200 && r.served == one.der()),
        "one.test never got its certificate:\n{}",
        g.log_text()
    );
    let reply = tls_request(tls, Some("one.test"), "GET", "/echo/x", &[]).expect("request");
    let seen: Value = serde_json::from_slice(&reply.body).expect("echo json");
    assert_eq!(seen["path"], "/x");
    assert_eq!(seen["headers"]["x-forwarded-proto"], "https");

    let reply = tls_request(tls, Some("one.test"), "GET", "/sni-only", &[]).expect("request");
    assert_eq!(reply.status, 200);
    let reply = tls_request(tls, Some("a.two.test"), "GET", "/sni-only", &[]).expect("request");
    assert_eq!(reply.status, 404);

    let reply = tls_request(tls, Some("a.two.test"), "GET", "/echo", &[]).expect("request");
    assert_eq!((reply.status, reply.served == two.der()), (200, true));
    let reply = tls_request(tls, Some("unknown.test"), "GET", "/echo", &[]).expect("request");
    assert_eq!((reply.status, reply.served == default_der), (200, true));
    let reply = tls_request(tls, None, "GET", "/echo", &[]).expect("request");
    assert_eq!((reply.status, reply.served == default_der), (200, true));
    let (status, _) = raw_request(g.proxy_addr, "GET", "/echo", &[], b"").expect("request");
    assert_eq!(status, 426);

    // A new certificate for the same name reaches the next handshake.
    let three = self_signed(&["one.test"]);
    patch(
        format!("{a}/certificates/{}", first["id"].as_str().expect("id")),
        json!({"cert": three.cert, "key": three.key}),
    )
    .await;
    assert_eventually!(
        tls_request(tls, Some("one.test"), "GET", "/echo", &[])
            .is_ok_and(|r| r.status == 200 && r.served == three.der()),
        "the changed certificate was never served"
    );

    // A restart keeps the generated default certificate.
    let prefix = g.prefix.clone();
    assert!(g.terminate().success());
    let g2 = Gatehouse::start_in(BIN, &prefix, &[]);
    let reply = tls_request(g2.proxy_tls_addr, None, "GET", "/nowhere", &[]).expect("request");
    assert_eq!((reply.status, reply.served == default_der), (404, true));
}

#[tokio::test]
async fn https_upstreams_honour_tls_verify_ca_certificates_and_client_certificate() {
    let ca = TestCa::new("Gatehouse test CA");
    let identity = ca.leaf(&["localhost", "127.0.0.1"]);
    let up = TlsEchoUpstream::start(&identity, None);
    let mtls_up = TlsEchoUpstream::start(&identity, Some(&ca.cert));
    let g = Gatehouse::start(BIN, &[]);
    let a = g.admin.clone();
    let proxy = g.proxy_addr;

    for (name, addr, verify) in [
        ("unverified", up.addr, false),
        ("verified", up.addr, true),
        ("mtls", mtls_up.addr, false),
    ] {
        post(
            format!("{a}/services"),
            json!({"name": name, "url": format!("https://{addr}"), "tls_verify": verify}),
        )
        .await;
        post(
            format!("{a}/services/{name}/routes"),
            json!({"paths": [format!("/{name}")]}),
        )
        .await;
    }

    // tls_verify off (Kong's default): any certificate will do.
    assert_eventually!(
        matches!(
            raw_request(proxy, "GET", "/unverified", &[], b""),
            Ok((200, _))
        ),
        "https upstream without verification never answered:\n{}",
        g.log_text()
    );
    // On, with a CA nobody trusts: 502.
    let (status, body) = raw_request(proxy, "GET", "/verified", &[], b"").expect("request");
    assert_eq!(status, 502, "{}", String::from_utf8_lossy(&body));
    // On, trusting the CA through a ca_certificates entity.
    let ca_entity = post(format!("{a}/ca_certificates"), json!({"cert": ca.cert})).await;
    patch(
        format!("{a}/services/verified"),
        json!({"ca_certificates": [ca_entity["id"]]}),
    )
    .await;
    assert_eventually!(
        matches!(
            raw_request(proxy, "GET", "/verified", &[], b""),
            Ok((200, _))
        ),
        "the trusted CA never took effect"
    );

    // An upstream that requires a client certificate.
    let (status, _) = raw_request(proxy, "GET", "/mtls", &[], b"").expect("request");
    assert_eq!(status, 502);
    let client_identity = ca.leaf(&["gateway.test"]);
    let certificate = post(
        format!("{a}/certificates"),
        json!({"cert": client_identity.cert, "key": client_identity.key}),
    )
    .await;
    patch(
        format!("{a}/services/mtls"),
        json!({"client_certificate": {"id": certificate["id"]}}),
    )
    .await;
    assert_eventually!(
        matches!(raw_request(proxy, "GET", "/mtls", &[], b""), Ok((200, _))),
        "the client certificate never took effect:\n{}",
        g.log_text()
    );
}
