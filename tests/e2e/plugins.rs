//! Plugins through a real proxy and a real upstream: Kong's statuses,
//! headers and bodies, and Kong's scoping precedence.

use gatehouse_test_support::{EchoUpstream, Gatehouse};
use reqwest::header::HeaderMap;
use serde_json::{json, Value};

use crate::{client, BIN};

/// A standalone gateway in front of an echo upstream, with an Admin API
/// helper that insists on success.
pub(crate) struct Setup {
    pub(crate) g: Gatehouse,
    pub(crate) up: EchoUpstream,
    pub(crate) c: reqwest::Client,
    sentinels: usize,
}

/// What the proxy answered.
pub(crate) struct Answer {
    pub(crate) status: u16,
    pub(crate) headers: HeaderMap,
    pub(crate) body: String,
}

impl Answer {
    pub(crate) fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("{e}: {}", self.body))
    }

    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// A body made by Kong's `kong.response.error`: exactly its JSON
    /// template, with a request id as nginx makes them. The document,
    /// without the id.
    pub(crate) fn kong_error(&self) -> Value {
        let mut doc = self.json();
        let id = doc
            .as_object_mut()
            .and_then(|fields| fields.remove("request_id"))
            .unwrap_or_else(|| panic!("no request_id: {}", self.body));
        let id = id.as_str().expect("a request_id string");
        assert!(
            id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
            "{}",
            self.body
        );
        let message = doc["message"].as_str().expect("a message");
        assert_eq!(
            self.body,
            format!("{{\n  \"message\":\"{message}\",\n  \"request_id\":\"{id}\"\n}}")
        );
        assert_eq!(
            self.header("content-type"),
            Some("application/json; charset=utf-8")
        );
        doc
    }

    /// A request header as the echo upstream saw it.
    pub(crate) fn upstream_header(&self, name: &str) -> Option<String> {
        self.json()["headers"][name].as_str().map(str::to_owned)
    }
}

impl Setup {
    pub(crate) fn start() -> Setup {
        Setup::start_with(&[])
    }

    pub(crate) fn start_with(env: &[(&str, &str)]) -> Setup {
        Setup {
            up: EchoUpstream::start(),
            g: Gatehouse::start(BIN, env),
            c: client(),
            sentinels: 0,
        }
    }

    pub(crate) async fn admin(&self, method: &str, path: &str, body: Value) -> Value {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let r = self
            .c
            .request(method, format!("{}{path}", self.g.admin))
            .json(&body)
            .send()
            .await
            .expect("admin request");
        let status = r.status();
        let text = r.text().await.expect("admin body");
        assert!(status.is_success(), "{path}: {status} {text}");
        serde_json::from_str(&text).unwrap_or(Value::Null)
    }

    pub(crate) async fn post(&self, path: &str, body: Value) -> Value {
        self.admin("POST", path, body).await
    }

    /// A service pointing at the echo upstream, with one route on `paths`.
    pub(crate) async fn service_route(&self, name: &str, paths: &[&str]) -> (String, String) {
        let s = self
            .post(
                "/services",
                json!({"name": name, "url": format!("http://{}", self.up.addr)}),
            )
            .await;
        let r = self
            .post(
                &format!("/services/{name}/routes"),
                json!({"name": name, "paths": paths}),
            )
            .await;
        (
            s["id"].as_str().expect("id").to_owned(),
            r["id"].as_str().expect("id").to_owned(),
        )
    }

    /// Waits until everything configured so far is in the proxy: a new
    /// route created last answers.
    pub(crate) async fn synced(&mut self) {
        self.sentinels += 1;
        let path = format!("/sentinel-{}", self.sentinels);
        let name = format!("sentinel-{}", self.sentinels);
        self.service_route(&name, &[&path]).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        loop {
            let r = self.get(&path, &[]).await;
            if r.status != 404 {
                return;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "configuration never reached the proxy:\n{}",
                self.g.log_text()
            );
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
    }

    pub(crate) async fn send(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<(&str, &str)>,
    ) -> Answer {
        let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
        let mut request = self.c.request(method, format!("{}{path}", self.g.proxy));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        if let Some((content_type, body)) = body {
            request = request
                .header("content-type", content_type)
                .body(body.to_owned());
        }
        let r = request.send().await.expect("proxy request");
        Answer {
            status: r.status().as_u16(),
            headers: r.headers().clone(),
            body: r.text().await.expect("proxy body"),
        }
    }

    pub(crate) async fn get(&self, path: &str, headers: &[(&str, &str)]) -> Answer {
        self.send("GET", path, headers, None).await
    }
}

#[tokio::test]
async fn key_auth_reads_header_query_and_body_hides_keys_and_falls_back_to_anonymous() {
    let mut s = Setup::start();
    s.service_route("ka", &["/ka"]).await;
    s.service_route("hidden", &["/hidden"]).await;
    s.service_route("anon", &["/anon"]).await;
    let alice = s
        .post(
            "/consumers",
            json!({"username": "alice", "custom_id": "a-1"}),
        )
        .await;
    let cred = s
        .post("/consumers/alice/key-auth", json!({"key": "alice-key"}))
        .await;
    s.post("/consumers", json!({"username": "nobody"})).await;
    s.post(
        "/routes/ka/plugins",
        json!({"name": "key-auth", "config": {"key_names": ["apikey", "x_api_key"]}}),
    )
    .await;
    s.post(
        "/routes/hidden/plugins",
        json!({"name": "key-auth", "config": {"hide_credentials": true, "key_in_body": true}}),
    )
    .await;
    s.post(
        "/routes/anon/plugins",
        json!({"name": "key-auth", "config": {"anonymous": "nobody"}}),
    )
    .await;
    s.synced().await;

    let missing = s.get("/ka", &[]).await;
    assert_eq!(missing.status, 401);
    assert_eq!(
        missing.kong_error(),
        json!({"message": "No API key found in request"})
    );
    assert_eq!(missing.header("www-authenticate"), Some("Key"));

    let wrong = s.get("/ka", &[("apikey", "nope")]).await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.kong_error(), json!({"message": "Unauthorized"}));

    // In a header; `_` in a key name matches `-` in the header, as nginx reads it.
    for headers in [[("apikey", "alice-key")], [("x-api-key", "alice-key")]] {
        let ok = s.get("/ka", &headers).await;
        assert_eq!(ok.status, 200, "{}", ok.body);
        assert_eq!(
            ok.upstream_header("x-consumer-username").as_deref(),
            Some("alice")
        );
        assert_eq!(
            ok.upstream_header("x-consumer-id").as_deref(),
            alice["id"].as_str()
        );
        assert_eq!(
            ok.upstream_header("x-consumer-custom-id").as_deref(),
            Some("a-1")
        );
        assert_eq!(
            ok.upstream_header("x-credential-identifier").as_deref(),
            cred["id"].as_str()
        );
        assert_eq!(ok.upstream_header("x-anonymous-consumer"), None);
        assert_eq!(
            ok.upstream_header("apikey").is_some(),
            headers[0].0 == "apikey",
            "not hidden"
        );
    }
    // In the query.
    let ok = s.get("/ka?apikey=alice-key&x=1", &[]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.json()["path"], "/?apikey=alice-key&x=1");
    // Two keys are refused.
    let dup = s.get("/ka?apikey=alice-key&apikey=alice-key", &[]).await;
    assert_eq!(dup.status, 401);
    assert_eq!(
        dup.kong_error(),
        json!({"message": "Duplicate API key found"})
    );

    // hide_credentials: gone from the query (the other arguments keep their
    // order and encoding), from the header and from the body.
    let ok = s.get("/hidden?b=2&apikey=alice-key&a=%2F", &[]).await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json()["path"], "/?b=2&a=%2F");
    let ok = s.get("/hidden", &[("apikey", "alice-key")]).await;
    assert_eq!(ok.upstream_header("apikey"), None);
    let ok = s
        .send(
            "POST",
            "/hidden",
            &[],
            Some((
                "application/x-www-form-urlencoded",
                "apikey=alice-key&keep=1",
            )),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json()["body"], "keep=1");
    assert_eq!(ok.upstream_header("content-length").as_deref(), Some("6"));
    let ok = s
        .send(
            "POST",
            "/hidden",
            &[],
            Some(("application/json", r#"{"apikey":"alice-key","n":1}"#)),
        )
        .await;
    assert_eq!(ok.status, 200, "{}", ok.body);
    assert_eq!(ok.json()["body"], r#"{"n":1}"#);

    // anonymous: failures become the anonymous consumer; a key still wins.
    let anon = s.get("/anon", &[]).await;
    assert_eq!(anon.status, 200);
    assert_eq!(
        anon.upstream_header("x-consumer-username").as_deref(),
        Some("nobody")
    );
    assert_eq!(
        anon.upstream_header("x-anonymous-consumer").as_deref(),
        Some("true")
    );
    let known = s
        .get(
            "/anon",
            &[("apikey", "alice-key"), ("x-anonymous-consumer", "true")],
        )
        .await;
    assert_eq!(
        known.upstream_header("x-consumer-username").as_deref(),
        Some("alice")
    );
    assert_eq!(
        known.upstream_header("x-anonymous-consumer"),
        None,
        "client's header cleared"
    );
}

/// An Admin API call's status and JSON body, whatever the status.
async fn admin_raw(s: &Setup, method: &str, path: &str, body: Value) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).expect("method");
    let r =
        s.c.request(method, format!("{}{path}", s.g.admin))
            .json(&body)
            .send()
            .await
            .expect("admin request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
}

#[tokio::test]
async fn key_auth_credentials_expire_with_their_ttl() {
    let mut s = Setup::start();
    s.service_route("ttl", &["/ttl"]).await;
    s.post("/routes/ttl/plugins", json!({"name": "key-auth"}))
        .await;
    s.post("/consumers", json!({"username": "tess"})).await;
    let forever = s
        .post("/consumers/tess/key-auth", json!({"key": "forever"}))
        .await;
    assert_eq!(forever["ttl"], Value::Null, "{forever}");
    s.synced().await;

    // Kong's option checks: an integer from 0 to 1e8, and only on
    // entities that have a ttl (elsewhere it is an unknown field).
    for bad in [json!(-1), json!(1.5), json!("soon"), json!(100_000_001)] {
        let (status, body) = admin_raw(
            &s,
            "POST",
            "/consumers/tess/key-auth",
            json!({"key": "bad", "ttl": bad}),
        )
        .await;
        assert_eq!(status, 400, "{bad}: {body}");
        assert_eq!(
            body,
            json!({"code": 11, "name": "invalid options",
                   "message": "invalid option (ttl: must be an integer between 0 and 100000000)",
                   "options": {"ttl": "must be an integer between 0 and 100000000"}}),
            "{bad}"
        );
    }
    let (status, body) =
        admin_raw(&s, "POST", "/consumers", json!({"username": "x", "ttl": 5})).await;
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["fields"], json!({"ttl": "unknown field"}));

    let created = unix_now();
    let short = s
        .post(
            "/consumers/tess/key-auth",
            json!({"key": "short-lived", "ttl": 6}),
        )
        .await;
    let left = short["ttl"].as_u64().expect("ttl left");
    assert!((4..=6).contains(&left), "{short}");
    let short_id = short["id"].as_str().expect("id").to_owned();
    let listed = s.admin("GET", "/consumers/tess/key-auth", json!({})).await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(2), "{listed}");

    // Served while it lives: seen at least once before its ttl ran out.
    let mut served = false;
    while unix_now() < created + 5 && !served {
        served = s.get("/ttl", &[("apikey", "short-lived")]).await.status == 200;
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(served, "the key never worked:\n{}", s.g.log_text());

    // A PATCH without ttl keeps the expiry; ttl 0 removes it.
    let patched = s
        .admin(
            "PATCH",
            &format!("/key-auths/{}", forever["id"].as_str().unwrap()),
            json!({"ttl": 100}),
        )
        .await;
    assert!(
        (98..=100).contains(&patched["ttl"].as_u64().unwrap_or(0)),
        "{patched}"
    );
    let patched = s
        .admin("PATCH", "/key-auths/forever", json!({"tags": ["kept"]}))
        .await;
    assert!(patched["ttl"].as_u64().is_some_and(|t| t > 90), "{patched}");
    let patched = s
        .admin("PATCH", "/key-auths/forever", json!({"ttl": 0}))
        .await;
    assert_eq!(patched["ttl"], Value::Null, "{patched}");

    // Once expired: refused by the proxy, gone from the Admin API.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    loop {
        let r = s.get("/ttl", &[("apikey", "short-lived")]).await;
        if r.status == 401 {
            assert!(unix_now() >= created + 5, "refused too early");
            assert_eq!(r.kong_error(), json!({"message": "Unauthorized"}));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the key never expired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (status, _) = admin_raw(
        &s,
        "GET",
        &format!("/consumers/tess/key-auth/{short_id}"),
        Value::Null,
    )
    .await;
    assert_eq!(status, 404);
    let (status, _) = admin_raw(&s, "GET", "/key-auths/short-lived", Value::Null).await;
    assert_eq!(status, 404);
    let listed = s.admin("GET", "/consumers/tess/key-auth", json!({})).await;
    assert_eq!(listed["data"].as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(s.get("/ttl", &[("apikey", "forever")]).await.status, 200);
    // Its key is free again.
    s.post("/consumers/tess/key-auth", json!({"key": "short-lived"}))
        .await;
    s.synced().await;
    assert_eq!(
        s.get("/ttl", &[("apikey", "short-lived")]).await.status,
        200
    );

    // A declarative file holds ttl as when the entity expires, as Kong
    // exports it.
    let now = unix_now();
    let file = json!({
        "_format_version": "3.0",
        "consumers": [{"username": "dec", "keyauth_credentials": [
            {"key": "later", "ttl": now + 100},
            {"key": "past", "ttl": now - 10},
        ]}],
    });
    let (status, body) = admin_raw(&s, "POST", "/config", file).await;
    assert_eq!(status, 201, "{body}");
    let listed = s.admin("GET", "/consumers/dec/key-auth", json!({})).await;
    let data = listed["data"].as_array().expect("data");
    assert_eq!(data.len(), 1, "{listed}");
    assert_eq!(data[0]["key"], "later");
    assert!(
        (98..=100).contains(&data[0]["ttl"].as_u64().unwrap_or(0)),
        "{listed}"
    );
}

#[tokio::test]
async fn scoping_follows_kongs_precedence() {
    let mut s = Setup::start();
    let (svc_a, route_a1) = s.service_route("a", &["/a1"]).await;
    s.post(
        "/services/a/routes",
        json!({"name": "a2", "paths": ["/a2"]}),
    )
    .await;
    s.service_route("b", &["/b"]).await;
    let bob = s.post("/consumers", json!({"username": "bob"})).await;
    s.post("/consumers/bob/key-auth", json!({"key": "bob-key"}))
        .await;
    s.post("/consumers", json!({"username": "carol"})).await;
    s.post("/consumers/carol/key-auth", json!({"key": "carol-key"}))
        .await;
    // Identify consumers everywhere; anonymous requests pass.
    s.post("/consumers", json!({"username": "anon"})).await;
    s.post(
        "/plugins",
        json!({"name": "key-auth", "config": {"anonymous": "anon"}}),
    )
    .await;

    let terminate = |message: &str| json!({"name": "request-termination", "config": {"status_code": 418, "message": message}});
    let with = |mut v: Value, scope: Value| {
        for (k, x) in scope.as_object().expect("scope") {
            v[k] = x.clone();
        }
        v
    };
    s.post("/plugins", terminate("global")).await;
    s.post(
        "/plugins",
        with(terminate("service"), json!({"service": {"id": svc_a}})),
    )
    .await;
    s.post(
        "/plugins",
        with(terminate("route"), json!({"route": {"id": route_a1}})),
    )
    .await;
    s.post(
        "/plugins",
        with(
            terminate("consumer"),
            json!({"consumer": {"id": bob["id"]}}),
        ),
    )
    .await;
    s.post(
        "/plugins",
        with(
            terminate("consumer+route"),
            json!({"consumer": {"id": bob["id"]}, "route": {"id": route_a1}}),
        ),
    )
    .await;
    s.post(
        "/plugins",
        with(
            terminate("consumer+service"),
            json!({"consumer": {"username": "carol"}, "service": {"id": svc_a}}),
        ),
    )
    .await;
    s.synced().await;

    let message = |a: Answer| {
        assert_eq!(a.status, 418, "{}", a.body);
        a.json()["message"].as_str().expect("message").to_owned()
    };
    assert_eq!(message(s.get("/a1", &[]).await), "route");
    assert_eq!(message(s.get("/a2", &[]).await), "service");
    assert_eq!(message(s.get("/b", &[]).await), "global");
    // Consumer-scoped configurations, looked up after key-auth ran.
    assert_eq!(
        message(s.get("/a1", &[("apikey", "bob-key")]).await),
        "consumer+route"
    );
    assert_eq!(
        message(s.get("/a2", &[("apikey", "bob-key")]).await),
        "consumer",
        "consumer beats service"
    );
    assert_eq!(
        message(s.get("/b", &[("apikey", "bob-key")]).await),
        "consumer",
        "consumer beats global"
    );
    assert_eq!(
        message(s.get("/a2", &[("apikey", "carol-key")]).await),
        "consumer+service"
    );
    assert_eq!(
        message(s.get("/a1", &[("apikey", "carol-key")]).await),
        "consumer+service",
        "consumer+service beats route"
    );
    assert_eq!(
        message(s.get("/b", &[("apikey", "carol-key")]).await),
        "global"
    );

    // Disabling the route's configuration falls back to the service's.
    let plugins = s
        .admin("GET", &format!("/routes/{route_a1}/plugins"), Value::Null)
        .await;
    let route_only = plugins["data"]
        .as_array()
        .expect("data")
        .iter()
        .find(|p| p["config"]["message"] == "route" && p["consumer"].is_null())
        .expect("route plugin")["id"]
        .as_str()
        .expect("id")
        .to_owned();
    s.admin(
        "PATCH",
        &format!("/plugins/{route_only}"),
        json!({"enabled": false}),
    )
    .await;
    s.synced().await;
    assert_eq!(message(s.get("/a1", &[]).await), "service");
}

#[tokio::test]
async fn rate_limiting_counts_per_client_and_answers_429_with_kongs_headers() {
    let mut s = Setup::start();
    s.service_route("rl", &["/rl"]).await;
    s.service_route("by-header", &["/rlh"]).await;
    s.post(
        "/routes/rl/plugins",
        json!({"name": "rate-limiting", "config": {"hour": 3, "day": 10}}),
    )
    .await;
    s.post(
        "/routes/by-header/plugins",
        json!({"name": "rate-limiting", "config": {"hour": 1, "limit_by": "header",
               "header_name": "x-tenant", "hide_client_headers": true}}),
    )
    .await;
    s.synced().await;

    for remaining in [2, 1, 0] {
        let ok = s.get("/rl", &[]).await;
        assert_eq!(ok.status, 200, "{}", ok.body);
        assert_eq!(ok.header("x-ratelimit-limit-hour"), Some("3"));
        assert_eq!(
            ok.header("x-ratelimit-remaining-hour"),
            Some(&*remaining.to_string())
        );
        assert_eq!(ok.header("x-ratelimit-limit-day"), Some("10"));
        assert_eq!(ok.header("ratelimit-limit"), Some("3"));
        assert_eq!(
            ok.header("ratelimit-remaining"),
            Some(&*remaining.to_string())
        );
        let reset: u64 = ok
            .header("ratelimit-reset")
            .expect("reset")
            .parse()
            .expect("number");
        assert!((1..=3600).contains(&reset), "{reset}");
    }
    let limited = s.get("/rl", &[]).await;
    assert_eq!(limited.status, 429);
    assert_eq!(
        limited.kong_error(),
        json!({"message": "API rate limit exceeded"})
    );
    assert_eq!(limited.header("x-ratelimit-remaining-hour"), Some("0"));
    assert!(limited.header("retry-after").is_some());
    assert!(limited.upstream_header_absent(), "{}", limited.body);

    // By header: each tenant has its own count; the headers are hidden.
    for tenant in ["t1", "t2"] {
        let ok = s.get("/rlh", &[("x-tenant", tenant)]).await;
        assert_eq!(ok.status, 200);
        assert_eq!(ok.header("x-ratelimit-limit-hour"), None);
    }
    assert_eq!(s.get("/rlh", &[("x-tenant", "t1")]).await.status, 429);

    // A configuration change elsewhere keeps the counts.
    s.synced().await;
    assert_eq!(s.get("/rl", &[]).await.status, 429);
}

impl Answer {
    /// The answer came from the gateway, not the echo upstream.
    fn upstream_header_absent(&self) -> bool {
        serde_json::from_str::<Value>(&self.body).map_or(true, |v| v.get("headers").is_none())
    }
}

#[tokio::test]
async fn traffic_plugins_answer_as_kong_does() {
    let mut s = Setup::start();
    for name in ["deny", "allow", "size", "bots", "cors", "term", "redir"] {
        s.service_route(name, &[&format!("/{name}")]).await;
    }
    s.post(
        "/routes/deny/plugins",
        json!({"name": "ip-restriction", "config": {"deny": ["127.0.0.0/8"]}}),
    )
    .await;
    s.post(
        "/routes/allow/plugins",
        json!({"name": "ip-restriction", "config": {"allow": ["10.0.0.0/8", "127.0.0.1"],
               "deny": ["10.1.0.0/16"]}}),
    )
    .await;
    s.post(
        "/routes/size/plugins",
        json!({"name": "request-size-limiting", "config": {"allowed_payload_size": 1, "size_unit": "kilobytes"}}),
    )
    .await;
    s.post(
        "/routes/bots/plugins",
        json!({"name": "bot-detection", "config": {"allow": ["Googlebot/2\\.1 \\(ok\\)"]}}),
    )
    .await;
    s.post(
        "/routes/cors/plugins",
        json!({"name": "cors", "config": {"origins": ["https://a.example", "https://.*\\.b\\.example"],
               "credentials": true, "max_age": 600, "exposed_headers": ["X-Total"]}}),
    )
    .await;
    s.post(
        "/routes/term/plugins",
        json!({"name": "request-termination", "config": {"status_code": 200, "body": "<p>bye</p>",
               "content_type": "text/html"}}),
    )
    .await;
    // Templates read the captures of the route's regex path, and a Host
    // set by a plugin goes upstream.
    s.post(
        "/services",
        json!({"name": "cap", "url": format!("http://{}", s.up.addr)}),
    )
    .await;
    s.post(
        "/services/cap/routes",
        json!({"name": "cap", "paths": [r"~/users/(?<id>\d+)/(\w+)$"]}),
    )
    .await;
    s.post(
        "/routes/cap/plugins",
        json!({"name": "request-transformer", "config": {
            "add": {"headers": ["x-user:$(uri_captures.id)", "x-part:$(uri_captures[2])"]},
            "replace": {"headers": ["host:upstream.example"]}}}),
    )
    .await;
    // A plugin this data plane does not run yet, and that changes what a
    // request does: refused rather than served without it.
    s.post(
        "/routes/redir/plugins",
        json!({"name": "redirect", "config": {"location": "https://example.com"}}),
    )
    .await;
    s.synced().await;

    let captured = s.get("/users/42/orders", &[]).await;
    assert_eq!(captured.status, 200, "{}", captured.body);
    assert_eq!(captured.upstream_header("x-user").as_deref(), Some("42"));
    assert_eq!(
        captured.upstream_header("x-part").as_deref(),
        Some("orders")
    );
    assert_eq!(
        captured.upstream_header("host").as_deref(),
        Some("upstream.example")
    );

    let redir = s.get("/redir", &[]).await;
    assert_eq!(redir.status, 500);
    assert_eq!(
        redir.kong_error(),
        json!({"message": "An unexpected error occurred"})
    );

    let denied = s.get("/deny", &[]).await;
    assert_eq!(denied.status, 403);
    assert_eq!(
        denied.kong_error(),
        json!({"message": "IP address not allowed: 127.0.0.1"})
    );
    assert_eq!(s.get("/allow", &[]).await.status, 200);

    let big = "x".repeat(1025);
    let small = "x".repeat(1024);
    let r = s
        .send("POST", "/size", &[], Some(("text/plain", &big)))
        .await;
    assert_eq!(r.status, 413);
    assert_eq!(
        r.kong_error(),
        json!({"message": "Request size limit exceeded"})
    );
    assert_eq!(
        s.send("POST", "/size", &[], Some(("text/plain", &small)))
            .await
            .status,
        200
    );

    let bot = s
        .get(
            "/bots",
            &[(
                "user-agent",
                "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)",
            )],
        )
        .await;
    assert_eq!(bot.status, 403);
    assert_eq!(bot.kong_error(), json!({"message": "Forbidden"}));
    assert_eq!(
        s.get("/bots", &[("user-agent", "Googlebot/2.1 (ok)")])
            .await
            .status,
        200,
        "allow wins"
    );
    assert_eq!(
        s.get(
            "/bots",
            &[(
                "user-agent",
                "Mozilla/5.0 (X11; Linux x86_64) Firefox/120.0"
            )]
        )
        .await
        .status,
        200
    );
    assert_eq!(
        s.get("/bots", &[("user-agent", "curl/8.5.0")]).await.status,
        200
    );

    // CORS preflight: answered by the gateway.
    let pre = s
        .send(
            "OPTIONS",
            "/cors",
            &[
                ("origin", "https://x.b.example"),
                ("access-control-request-method", "PUT"),
                ("access-control-request-headers", "X-One"),
            ],
            None,
        )
        .await;
    assert_eq!(pre.status, 200);
    assert!(pre.body.is_empty());
    assert_eq!(
        pre.header("access-control-allow-origin"),
        Some("https://x.b.example")
    );
    assert_eq!(pre.header("access-control-allow-credentials"), Some("true"));
    assert_eq!(pre.header("access-control-allow-headers"), Some("X-One"));
    assert_eq!(
        pre.header("access-control-allow-methods"),
        Some("GET,HEAD,PUT,PATCH,POST,DELETE,OPTIONS,TRACE,CONNECT")
    );
    assert_eq!(pre.header("access-control-max-age"), Some("600"));
    assert_eq!(pre.header("vary"), Some("Origin"));
    // An actual request from a listed origin, and from another one.
    let ok = s.get("/cors", &[("origin", "https://a.example")]).await;
    assert_eq!(ok.status, 200);
    assert_eq!(
        ok.header("access-control-allow-origin"),
        Some("https://a.example")
    );
    assert_eq!(ok.header("access-control-expose-headers"), Some("X-Total"));
    let other = s.get("/cors", &[("origin", "https://evil.example")]).await;
    assert_eq!(other.header("access-control-allow-origin"), None);

    let term = s.get("/term", &[]).await;
    assert_eq!(term.status, 200);
    assert_eq!(term.body, "<p>bye</p>");
    assert_eq!(term.header("content-type"), Some("text/html"));
}

/// A loopback HTTP server that keeps the bodies it is sent.
fn body_collector() -> (std::net::SocketAddr, std::sync::mpsc::Receiver<String>) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(stream);
                loop {
                    let mut length = 0usize;
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    loop {
                        let mut header = String::new();
                        if reader.read_line(&mut header).unwrap_or(0) == 0 {
                            return;
                        }
                        let header = header.trim_end().to_ascii_lowercase();
                        if header.is_empty() {
                            break;
                        }
                        if let Some(v) = header.strip_prefix("content-length:") {
                            length = v.trim().parse().unwrap_or(0);
                        }
                    }
                    let mut body = vec![0; length];
                    if reader.read_exact(&mut body).is_err() {
                        return;
                    }
                    let _ = tx.send(format!(
                        "{} {}",
                        line.trim_end(),
                        String::from_utf8_lossy(&body)
                    ));
                    let _ = reader
                        .get_mut()
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n");
                }
            });
        }
    });
    (addr, rx)
}

/// A loopback TCP server that passes on the lines it reads.
fn line_collector() -> (std::net::SocketAddr, std::sync::mpsc::Receiver<String>) {
    use std::io::BufRead;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(stream).lines() {
                    let Ok(line) = line else { return };
                    let _ = tx.send(line);
                }
            });
        }
    });
    (addr, rx)
}

fn next_json(rx: &std::sync::mpsc::Receiver<String>) -> Value {
    let text = rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("a log entry arrives");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test]
async fn log_plugins_send_kongs_serialized_entries() {
    let mut s = Setup::start();
    let (http_addr, http_rx) = body_collector();
    let (tcp_addr, tcp_rx) = line_collector();
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("access.json");
    let (service_id, route_id) = s.service_route("logged", &["/logged"]).await;
    s.service_route("batched", &["/batched"]).await;
    s.post("/consumers", json!({"username": "dora"})).await;
    s.post("/consumers/dora/key-auth", json!({"key": "dora-key"}))
        .await;
    s.post("/routes/logged/plugins", json!({"name": "key-auth"}))
        .await;
    s.post(
        "/routes/logged/plugins",
        json!({"name": "http-log", "config": {"http_endpoint": format!("http://user:pw@{http_addr}/logs"),
               "headers": {"x-token": "t"}}}),
    )
    .await;
    s.post(
        "/routes/logged/plugins",
        json!({"name": "tcp-log", "config": {"host": "127.0.0.1", "port": tcp_addr.port()}}),
    )
    .await;
    s.post(
        "/routes/logged/plugins",
        json!({"name": "file-log", "config": {"path": file.to_str().expect("utf-8 path")}}),
    )
    .await;
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp");
    udp.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .expect("timeout");
    s.post(
        "/routes/logged/plugins",
        json!({"name": "udp-log", "config": {"host": "127.0.0.1", "port": udp.local_addr().expect("addr").port()}}),
    )
    .await;
    s.post(
        "/routes/batched/plugins",
        json!({"name": "http-log", "config": {"http_endpoint": format!("http://{http_addr}/batch"),
               "method": "PUT", "queue": {"max_batch_size": 3, "max_coalescing_delay": 2}}}),
    )
    .await;
    s.synced().await;

    let ok = s
        .get(
            "/logged/x?a=1",
            &[("apikey", "dora-key"), ("authorization", "Bearer secret")],
        )
        .await;
    assert_eq!(ok.status, 200);
    let denied = s.get("/logged/y", &[]).await;
    assert_eq!(denied.status, 401);

    // http-log: one entry per request.
    let first = http_rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("http-log entry");
    let parts: Vec<&str> = first.splitn(4, ' ').collect();
    assert_eq!(parts[..2], ["POST", "/logs"], "{first}");
    let entry: Value = serde_json::from_str(parts[3]).expect("entry json");
    assert_eq!(entry["request"]["method"], "GET");
    assert_eq!(entry["request"]["uri"], "/logged/x?a=1");
    assert_eq!(entry["request"]["querystring"], json!({"a": "1"}));
    assert_eq!(entry["request"]["headers"]["authorization"], "REDACTED");
    assert_eq!(entry["response"]["status"], 200);
    assert_eq!(entry["upstream_uri"], "/x?a=1");
    assert_eq!(entry["route"]["id"], route_id);
    assert_eq!(entry["route"]["name"], "logged");
    assert_eq!(entry["service"]["id"], service_id);
    assert_eq!(entry["consumer"]["username"], "dora");
    assert_eq!(entry["source"], "upstream");
    assert!(entry["latencies"]["request"].as_u64().is_some());
    assert!(entry["started_at"].as_u64().expect("started_at") > 1_700_000_000_000);
    assert_eq!(entry["client_ip"], "127.0.0.1");
    let second = http_rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("second entry");
    let second: Value =
        serde_json::from_str(second.splitn(4, ' ').nth(3).expect("body")).expect("json");
    assert_eq!(second["response"]["status"], 401);
    assert_eq!(second["source"], "kong");
    assert!(second["consumer"].is_null());

    // tcp-log and file-log: the same document, one per line.
    let tcp = next_json(&tcp_rx);
    assert_eq!(tcp["request"]["uri"], "/logged/x?a=1");
    assert_eq!(next_json(&tcp_rx)["response"]["status"], 401);
    let mut lines = Vec::new();
    for _ in 0..200 {
        lines = std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect();
        if lines.len() >= 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(lines.len(), 2, "{lines:?}");
    let logged: Value = serde_json::from_str(&lines[0]).expect("json line");
    assert_eq!(logged["route"]["name"], "logged");

    // udp-log: one datagram per entry.
    let mut datagram = [0u8; 65536];
    let n = udp.recv(&mut datagram).expect("a datagram");
    let entry: Value = serde_json::from_slice(&datagram[..n]).expect("json datagram");
    assert_eq!(entry["request"]["uri"], "/logged/x?a=1");

    // A batch of three goes as one JSON array.
    for _ in 0..3 {
        assert_eq!(s.get("/batched", &[]).await.status, 200);
    }
    let batch = http_rx
        .recv_timeout(std::time::Duration::from_secs(10))
        .expect("batch");
    assert!(batch.starts_with("PUT /batch "), "{batch}");
    let array: Value =
        serde_json::from_str(batch.splitn(4, ' ').nth(3).expect("body")).expect("json");
    assert_eq!(array.as_array().map(Vec::len), Some(3), "{array}");
}

/// Lines of a file-log file, once there are `n` of them.
async fn log_lines(file: &std::path::Path, n: usize) -> Vec<Value> {
    let mut lines = Vec::new();
    for _ in 0..200 {
        lines = std::fs::read_to_string(file)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str(line).expect("json line"))
            .collect();
        if lines.len() >= n {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    lines
}

#[tokio::test]
async fn upstream_failures_reach_the_plugins_header_filter_and_log_phases() {
    let mut s = Setup::start();
    let logs = tempfile::tempdir().expect("temp dir");
    // Nothing listens here: every connection is refused (502).
    let closed = gatehouse_test_support::free_port();
    // This one accepts and never answers (504 after read_timeout).
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_addr = silent.local_addr().expect("addr");
    let targets = [
        ("refused", format!("http://127.0.0.1:{closed}"), 502),
        ("silent", format!("http://{silent_addr}"), 504),
    ];
    for (name, url, _) in &targets {
        s.post(
            "/services",
            json!({"name": name, "url": url, "retries": 0, "read_timeout": 300}),
        )
        .await;
        // The HTTP/1.1 engine runs head-only chains; a chain that reads
        // response bodies moves the request to the hyper engine.
        for (route, body_plugin) in [
            (format!("{name}-h1"), false),
            (format!("{name}-hyper"), true),
        ] {
            s.post(
                &format!("/services/{name}/routes"),
                json!({"name": route, "paths": [format!("/{route}")]}),
            )
            .await;
            let file = logs.path().join(format!("{route}.log"));
            s.post(
                &format!("/routes/{route}/plugins"),
                json!({"name": "file-log", "config": {"path": file.to_str().expect("utf-8")}}),
            )
            .await;
            s.post(
                &format!("/routes/{route}/plugins"),
                json!({"name": "rate-limiting", "config": {"minute": 50}}),
            )
            .await;
            if body_plugin {
                s.post(
                    &format!("/routes/{route}/plugins"),
                    json!({"name": "response-transformer", "config": {"add": {"json": ["a:1"]}}}),
                )
                .await;
            }
        }
    }
    s.synced().await;

    for (name, _, status) in &targets {
        for engine in ["h1", "hyper"] {
            let route = format!("{name}-{engine}");
            let r = s.get(&format!("/{route}/x"), &[]).await;
            assert_eq!(r.status, *status, "{route}: {}", r.body);
            // header_filter ran: rate-limiting's headers are on the error.
            assert_eq!(
                r.header("x-ratelimit-limit-minute"),
                Some("50"),
                "{route}: {:?}",
                r.headers
            );
            assert_eq!(
                r.header("x-ratelimit-remaining-minute"),
                Some("49"),
                "{route}"
            );
            // log ran: the entry has the gateway's answer and the
            // upstream's status as nginx records it.
            let lines = log_lines(&logs.path().join(format!("{route}.log")), 1).await;
            assert_eq!(lines.len(), 1, "{route}: {lines:?}");
            let entry = &lines[0];
            assert_eq!(entry["response"]["status"], *status, "{route}: {entry}");
            assert_eq!(
                entry["upstream_status"],
                status.to_string(),
                "{route}: {entry}"
            );
            assert_eq!(entry["route"]["name"], route.as_str());
            assert_eq!(
                entry["response"]["headers"]["x-ratelimit-limit-minute"], "50",
                "{route}: {entry}"
            );
        }
    }
    drop(silent);
}

#[tokio::test]
async fn plugins_run_on_requests_no_service_takes() {
    let mut s = Setup::start();
    let logs = tempfile::tempdir().expect("temp dir");
    let file = logs.path().join("global.log");
    // Global: cors and file-log.
    s.post("/plugins", json!({"name": "cors"})).await;
    s.post(
        "/plugins",
        json!({"name": "file-log", "config": {"path": file.to_str().expect("utf-8")}}),
    )
    .await;
    // Routes without a service.
    for (name, plugin) in [
        (
            "closed",
            json!({"name": "request-termination", "config": {"status_code": 403, "message": "closed"}}),
        ),
        ("keyed", json!({"name": "key-auth"})),
    ] {
        s.post(
            "/routes",
            json!({"name": name, "paths": [format!("/{name}")]}),
        )
        .await;
        s.post(&format!("/routes/{name}/plugins"), plugin).await;
    }
    s.post("/consumers", json!({"username": "kim"})).await;
    s.post("/consumers/kim/key-auth", json!({"key": "kim-key"}))
        .await;
    s.synced().await;

    // No route: the global plugins' header_filter and log run on the 404.
    let lost = s.get("/nowhere", &[("origin", "http://a.test")]).await;
    assert_eq!(lost.status, 404, "{}", lost.body);
    assert_eq!(lost.json()["message"], "no Route matched with those values");
    assert_eq!(lost.header("access-control-allow-origin"), Some("*"));
    // A serviceless route runs its access phase: the plugin answers...
    let closed = s.get("/closed", &[]).await;
    assert_eq!(closed.status, 403, "{}", closed.body);
    assert_eq!(closed.json(), json!({"message": "closed"}));
    assert_eq!(closed.header("access-control-allow-origin"), Some("*"));
    let keyless = s.get("/keyed", &[]).await;
    assert_eq!(keyless.status, 401, "{}", keyless.body);
    assert_eq!(
        keyless.kong_error(),
        json!({"message": "No API key found in request"})
    );
    // ...and only when none does, Kong's 503.
    let keyed = s.get("/keyed", &[("apikey", "kim-key")]).await;
    assert_eq!(keyed.status, 503, "{}", keyed.body);
    assert_eq!(
        keyed.json()["message"],
        "no Service found with those values"
    );

    // The sentinel requests that waited for the configuration are logged
    // too (the plugin is global): only ours are looked at.
    let mut lines = Vec::new();
    for _ in 0..200 {
        lines = std::fs::read_to_string(&file)
            .unwrap_or_default()
            .lines()
            .map(|line| serde_json::from_str::<Value>(line).expect("json line"))
            .filter(|entry| {
                let uri = entry["request"]["uri"].as_str().unwrap_or("");
                ["/nowhere", "/closed", "/keyed"].contains(&uri)
            })
            .collect();
        if lines.len() >= 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let statuses: Vec<&Value> = lines.iter().map(|l| &l["response"]["status"]).collect();
    assert_eq!(statuses, [404, 403, 401, 503], "{lines:?}");
    assert!(lines[0]["route"].is_null(), "{}", lines[0]);
    assert_eq!(lines[1]["route"]["name"], "closed");
    assert_eq!(lines[3]["consumer"]["username"], "kim");
}

#[tokio::test]
async fn a_streamed_response_is_logged_once_its_body_has_gone() {
    use std::io::{BufRead, Write};
    let mut s = Setup::start();
    // An upstream that sends half its chunked body, waits, then the rest.
    let upstream = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = upstream.local_addr().expect("addr");
    std::thread::spawn(move || {
        for stream in upstream.incoming().take(4) {
            let Ok(mut stream) = stream else { return };
            let mut reader = std::io::BufReader::new(stream.try_clone().expect("clone"));
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let _ = stream.write_all(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n",
            );
            let _ = stream.flush();
            std::thread::sleep(std::time::Duration::from_millis(400));
            let _ = stream.write_all(b"6\r\n world\r\n0\r\n\r\n");
        }
    });
    let logs = tempfile::tempdir().expect("temp dir");
    let file = logs.path().join("streamed.log");
    s.post(
        "/services",
        json!({"name": "streamed", "url": format!("http://{addr}")}),
    )
    .await;
    s.post(
        "/services/streamed/routes",
        json!({"name": "streamed", "paths": ["/streamed"]}),
    )
    .await;
    // key_in_body puts the route on the hyper path, where the body streams
    // to the client after the head.
    s.post(
        "/routes/streamed/plugins",
        json!({"name": "key-auth", "config": {"key_in_body": true}}),
    )
    .await;
    s.post(
        "/routes/streamed/plugins",
        json!({"name": "file-log", "config": {"path": file.to_str().expect("utf-8")}}),
    )
    .await;
    s.post("/consumers", json!({"username": "sam"})).await;
    s.post("/consumers/sam/key-auth", json!({"key": "sam-key"}))
        .await;
    s.synced().await;

    let r = s.get("/streamed", &[("apikey", "sam-key")]).await;
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body, "hello world");
    let lines = log_lines(&file, 1).await;
    assert_eq!(lines.len(), 1, "{lines:?}");
    let entry = &lines[0];
    // Logged after the body: all of it, and the time it took.
    assert_eq!(entry["response"]["size"], 11, "{entry}");
    let total = entry["latencies"]["request"].as_u64().expect("latency");
    assert!(total >= 400, "{entry}");
    assert_eq!(entry["response"]["status"], 200);
}

#[tokio::test]
async fn prometheus_counts_with_kongs_metric_names_on_the_status_and_admin_apis() {
    let status_port = gatehouse_test_support::free_port();
    let listen = format!("127.0.0.1:{status_port}");
    let mut s = Setup::start_with(&[("GATEHOUSE_STATUS_LISTEN", &listen)]);
    s.service_route("metered", &["/metered"]).await;
    s.post("/consumers", json!({"username": "fay"})).await;
    s.post("/consumers/fay/key-auth", json!({"key": "fay-key"}))
        .await;
    s.post("/routes/metered/plugins", json!({"name": "key-auth"}))
        .await;
    s.post(
        "/plugins",
        json!({"name": "prometheus", "config": {"per_consumer": true, "status_code_metrics": true,
               "latency_metrics": true, "bandwidth_metrics": true}}),
    )
    .await;
    s.synced().await;
    let ready =
        s.c.get(format!("http://{listen}/status/ready"))
            .send()
            .await
            .expect("ready");
    assert_eq!(ready.status(), 200);

    for _ in 0..3 {
        assert_eq!(
            s.get("/metered/a", &[("apikey", "fay-key")]).await.status,
            200
        );
    }
    assert_eq!(s.get("/metered/a", &[]).await.status, 401);

    let scrape = |url: String| {
        let c = s.c.clone();
        async move {
            let r = c.get(url).send().await.expect("scrape");
            assert_eq!(r.status(), 200);
            assert!(r
                .headers()
                .get("content-type")
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| v.starts_with("text/plain")));
            r.text().await.expect("text")
        }
    };
    let text = scrape(format!("http://{listen}/metrics")).await;
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.starts_with(needle))
            .unwrap_or_else(|| panic!("no {needle} in:\n{text}"))
            .to_owned()
    };
    assert!(line(r#"kong_http_requests_total{code="200",consumer="fay",route="metered",service="metered",source="service",workspace="default"}"#).ends_with(" 3"));
    assert!(line(r#"kong_http_requests_total{code="401",consumer="",route="metered",service="metered",source="kong",workspace="default"}"#).ends_with(" 1"));
    assert!(line(
        r#"kong_request_latency_ms_count{route="metered",service="metered",workspace="default"}"#
    )
    .ends_with(" 4"));
    assert!(line(
        r#"kong_upstream_latency_ms_count{route="metered",service="metered",workspace="default"}"#
    )
    .ends_with(" 3"));
    assert!(line(r#"kong_kong_latency_ms_bucket{route="metered",service="metered",workspace="default",le="+Inf"}"#).ends_with(" 4"));
    assert!(text.contains(r#"kong_bandwidth_bytes{consumer="fay",direction="egress",route="metered",service="metered",workspace="default"}"#));
    // The standalone Admin API serves the same registry.
    let admin = scrape(format!("{}/metrics", s.g.admin)).await;
    assert!(admin.contains("kong_http_requests_total"), "{admin}");
}

/// Kong's balancer runs after `access`, so an upstream that hashes on a
/// header sees the value a plugin set, not the one the client sent.
#[tokio::test]
async fn a_header_hash_balancer_sees_the_consumer_key_auth_set() {
    let mut s = Setup::start();
    let second = EchoUpstream::start();
    s.post(
        "/upstreams",
        json!({"name": "pool", "hash_on": "header", "hash_on_header": "X-Consumer-ID"}),
    )
    .await;
    for addr in [s.up.addr, second.addr] {
        s.post(
            "/upstreams/pool/targets",
            json!({"target": addr.to_string()}),
        )
        .await;
    }
    s.post("/services", json!({"name": "hashed", "url": "http://pool"}))
        .await;
    s.post(
        "/services/hashed/routes",
        json!({"name": "hashed", "paths": ["/hashed"]}),
    )
    .await;
    s.post("/routes/hashed/plugins", json!({"name": "key-auth"}))
        .await;
    let mut consumers = Vec::new();
    for i in 0..16 {
        let consumer = s
            .post("/consumers", json!({"username": format!("user-{i}")}))
            .await;
        let key = format!("key-{i}");
        s.post(
            &format!("/consumers/user-{i}/key-auth"),
            json!({"key": key}),
        )
        .await;
        consumers.push((consumer["id"].as_str().expect("id").to_owned(), key));
    }
    s.synced().await;

    let mut targets_used = std::collections::BTreeSet::new();
    for (id, key) in &consumers {
        let mut seen = std::collections::BTreeSet::new();
        for attempt in 0..6 {
            // A different spoofed id each time: hashing on it would spread
            // one consumer's requests over both targets.
            let spoofed = format!("spoofed-{id}-{attempt}");
            let r = s
                .get(
                    "/hashed",
                    &[
                        ("apikey", key.as_str()),
                        ("x-consumer-id", spoofed.as_str()),
                    ],
                )
                .await;
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(
                r.upstream_header("x-consumer-id").as_deref(),
                Some(id.as_str())
            );
            seen.insert(r.upstream_header("host").expect("host"));
        }
        assert_eq!(seen.len(), 1, "consumer {id} reached {seen:?}");
        targets_used.extend(seen);
    }
    // Sixteen consumers all on one of two targets would mean the hash
    // ignores the header (a chance of 1 in 32,768 otherwise).
    assert_eq!(targets_used.len(), 2, "{targets_used:?}");
}
