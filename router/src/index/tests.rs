use http::{HeaderMap, HeaderName, HeaderValue, Method};
use serde_json::{json, Value};

use super::{RequestView, Router};
use crate::test_routes::routes;
use crate::uri::normalize_path;

/// `request` is `METHOD host[:port]/path [header=value ...]`: `host[:port]`
/// is the Host header (none when empty); requests arrive on port 8000.
fn check(routes_json: Value, request: &str, expected_route_name: Option<&str>) {
    let routes = routes(routes_json);
    let router = Router::build(routes.iter().map(|route| route.spec()).enumerate());

    let mut words = request.split_whitespace();
    let method =
        Method::from_bytes(words.next().expect("method").as_bytes()).expect("valid method");
    let target = words.next().expect("host/path");
    let (authority, path) = target.split_at(target.find('/').expect("path starts with /"));
    let mut headers = HeaderMap::new();
    for header in words {
        let (name, value) = header.split_once('=').expect("header=value");
        headers.append(
            HeaderName::from_bytes(name.as_bytes()).expect("header name"),
            HeaderValue::from_str(value).expect("header value"),
        );
    }
    let path = normalize_path(path);
    let view = RequestView {
        method: &method,
        host: (!authority.is_empty()).then_some(authority.as_bytes()),
        port: 8000,
        path: &path,
        headers: &headers,
        https: false,
        sni: None,
    };
    let found = router.find(&view).map(|found| {
        routes[found.route_idx]
            .name
            .as_deref()
            .expect("test routes have names")
    });
    assert_eq!(found, expected_route_name, "request: {request}");
}

#[test]
fn no_routes_match_nothing() {
    check(json!([]), "GET example.com/", None);
}

#[test]
fn exact_hosts() {
    let routes = json!([
        {"name": "a", "hosts": ["example.com"]},
        {"name": "b", "hosts": ["other.com", "third.com"]},
    ]);
    check(routes.clone(), "GET example.com/", Some("a"));
    // Kong compares hosts case-sensitively (`http.host == "..."`).
    check(routes.clone(), "GET EXAMPLE.Com/x", None);
    check(routes.clone(), "GET example.com:8443/", Some("a"));
    check(routes.clone(), "GET third.com/", Some("b"));
    check(routes.clone(), "GET www.example.com/", None);
    check(routes, "GET /", None);
}

#[test]
fn wildcard_hosts() {
    let routes = json!([
        {"name": "suffix", "hosts": ["*.example.com"]},
        {"name": "prefix", "hosts": ["example.*"]},
        {"name": "exact", "hosts": ["api.example.com"]},
    ]);
    // A route with only plain hosts outranks wildcards.
    check(routes.clone(), "GET api.example.com/", Some("exact"));
    check(routes.clone(), "GET www.example.com/", Some("suffix"));
    check(routes.clone(), "GET a.b.example.com/", Some("suffix"));
    check(routes.clone(), "GET example.org/", Some("prefix"));
    check(routes.clone(), "GET example.com/", Some("prefix"));
    check(routes.clone(), "GET notexample.com/", None);
    check(routes, "GET example/", None);
}

#[test]
fn hosts_with_ports_compare_the_host_header_port() {
    // Kong's `net.dst.port` is the Host header's port when it has one,
    // else the port the request arrived on (`kong/router/fields.lua`).
    // Both example.com routes have one field and plain hosts: the greater
    // id is tried first.
    let routes = json!([
        {"name": "without-port", "hosts": ["example.com"]},
        {"name": "with-port", "hosts": ["example.com:9000"]},
        {"name": "arrival-port", "hosts": ["example.org:8000"]},
    ]);
    check(routes.clone(), "GET example.com:9000/", Some("with-port"));
    check(
        routes.clone(),
        "GET example.com:8000/",
        Some("without-port"),
    );
    check(routes.clone(), "GET example.com/", Some("without-port"));
    check(routes.clone(), "GET example.org/", Some("arrival-port"));
    check(
        routes.clone(),
        "GET example.org:8000/",
        Some("arrival-port"),
    );
    check(routes, "GET example.org:9000/", None);
}

#[test]
fn wildcards_are_plain_prefixes_and_suffixes() {
    // Kong validates `*foo.com` and turns it into `http.host =^ "foo.com"`.
    let routes = json!([
        {"name": "suffix", "hosts": ["*foo.com"]},
        {"name": "prefix", "hosts": ["api*"]},
        {"name": "middle", "hosts": ["a*b"]},
    ]);
    check(routes.clone(), "GET barfoo.com/", Some("suffix"));
    check(routes.clone(), "GET apix.org/", Some("prefix"));
    check(routes.clone(), "GET a*b/", Some("middle"));
    check(routes, "GET axb/", None);
}

#[test]
fn methods() {
    let routes = json!([
        {"name": "any", "paths": ["/m"]},
        {"name": "get", "methods": ["GET", "HEAD"], "paths": ["/m"]},
        {"name": "post", "methods": ["POST"], "paths": ["/m"]},
    ]);
    check(routes.clone(), "GET x/m", Some("get"));
    check(routes.clone(), "HEAD x/m", Some("get"));
    check(routes.clone(), "POST x/m", Some("post"));
    check(routes.clone(), "PUT x/m", Some("any"));
    check(routes, "PUT x/n", None);
}

#[test]
fn longest_prefix_wins() {
    let routes = json!([
        {"name": "root", "paths": ["/"]},
        {"name": "short", "paths": ["/echo"]},
        {"name": "long", "paths": ["/echo/deep"]},
    ]);
    check(routes.clone(), "GET x/echo", Some("short"));
    check(routes.clone(), "GET x/echo/x", Some("short"));
    check(routes.clone(), "GET x/echoes", Some("short"));
    check(routes.clone(), "GET x/echo/deep", Some("long"));
    check(routes.clone(), "GET x/echo/deeper/x", Some("long"));
    check(routes.clone(), "GET x/ech", Some("root"));
    // The router sees the normalized path.
    check(routes.clone(), "GET x/%65cho", Some("short"));
    check(routes.clone(), "GET x/echo/../echo/deep", Some("long"));
    // Kong's router merges slashes.
    check(routes.clone(), "GET x/echo//deep", Some("long"));
    check(routes, "GET x/echo/./deep", Some("long"));
}

#[test]
fn paths_of_one_route_rank_by_their_own_length() {
    let routes = json!([
        {"name": "multi", "paths": ["/a", "/abc/def"]},
        {"name": "mid", "paths": ["/abc"]},
    ]);
    check(routes.clone(), "GET x/abc/def/x", Some("multi"));
    check(routes.clone(), "GET x/abc/x", Some("mid"));
    check(routes, "GET x/a", Some("multi"));
}

#[test]
fn catch_all_routes() {
    let routes = json!([
        {"name": "everything", "methods": ["GET", "POST"]},
        {"name": "path", "paths": ["/a"]},
    ]);
    // Same field count: the route with a path outranks by prefix length.
    check(routes.clone(), "GET x/a", Some("path"));
    check(routes.clone(), "GET x/b", Some("everything"));
    check(routes, "DELETE x/b", None);

    check(
        json!([{"name": "no-conditions"}]),
        "OPTIONS any.host/any/path",
        Some("no-conditions"),
    );
}

#[test]
fn more_fields_outrank_longer_paths() {
    let routes = json!([
        {"name": "long", "paths": ["/very/long/path"]},
        {"name": "host-and-root", "hosts": ["a.com"], "paths": ["/"]},
        {"name": "wildcard-and-root", "hosts": ["*.b.com"], "paths": ["/"]},
    ]);
    check(
        routes.clone(),
        "GET a.com/very/long/path",
        Some("host-and-root"),
    );
    check(
        routes.clone(),
        "GET x.b.com/very/long/path",
        Some("wildcard-and-root"),
    );
    check(routes, "GET c.com/very/long/path", Some("long"));
}

#[test]
fn headers() {
    let routes = json!([
        {"name": "none", "paths": ["/h"]},
        {"name": "v1", "headers": {"x-version": ["v1"]}, "paths": ["/h"]},
        {"name": "v2", "headers": {"x-version": ["v2", "V3"]}, "paths": ["/h"]},
        {"name": "two", "headers": {"x-version": ["v1"], "x-beta": ["yes"]}, "paths": ["/h"]},
        {"name": "tenant", "headers": {"x-tenant": ["~*^acme-\\d+$"]}},
    ]);
    check(routes.clone(), "GET x/h x-version=V1", Some("v1"));
    check(routes.clone(), "GET x/h x-version=v3", Some("v2"));
    check(routes.clone(), "GET x/h x-version=v4", Some("none"));
    check(
        routes.clone(),
        "GET x/h x-version=v4 x-version=v2",
        Some("v2"),
    );
    check(
        routes.clone(),
        "GET x/h x-version=v1 x-beta=yes",
        Some("two"),
    );
    check(routes.clone(), "GET x/h", Some("none"));
    // More headers outrank a path.
    check(routes.clone(), "GET x/h x-tenant=ACME-12", Some("tenant"));
    check(
        routes.clone(),
        "GET x/other x-tenant=acme-1",
        Some("tenant"),
    );
    check(routes, "GET x/other x-tenant=acme-x", None);
}

#[test]
fn regex_paths() {
    let routes = json!([
        {"name": "prefix", "paths": ["/users"]},
        {"name": "regex", "paths": ["~/users/\\d+$"]},
        {"name": "unsupported", "paths": ["~/(?=lookahead)"]},
    ]);
    check(routes.clone(), "GET x/users/12", Some("regex"));
    check(routes.clone(), "GET x/users/abc", Some("prefix"));
    // Regexes are anchored at the start only.
    check(routes.clone(), "GET x/api/users/12", None);
    check(routes, "GET x/lookahead", None);

    let routes = json!([
        {"name": "low", "paths": ["~/r/.*"], "regex_priority": 1},
        {"name": "high", "paths": ["~/r/a"], "regex_priority": 5},
    ]);
    check(routes.clone(), "GET x/r/a", Some("high"));
    check(routes, "GET x/r/b", Some("low"));
}

#[test]
fn ties_go_to_the_greatest_id() {
    // atc-router tries matchers by descending (priority, UUID).
    let routes = json!([
        {"name": "smaller-id", "id": "00000000-0000-4000-8000-00000000000a", "paths": ["/t"]},
        {"name": "greater-id", "id": "00000000-0000-4000-8000-00000000000b", "paths": ["/t"]},
    ]);
    check(routes, "GET x/t", Some("greater-id"));

    // Split routes tie with the UUID Kong derives for each group:
    // uuid_v5(7f145bf9-..., "<id>#<group>"), here 4c0...(#1) and fd3...(#2)
    // for route a, below route b's id for /t and above it for /u/v.
    let routes = json!([
        {"name": "a", "id": "10000000-0000-4000-8000-000000000000", "paths": ["/t", "/u/v"]},
        {"name": "b", "id": "80000000-0000-4000-8000-000000000000", "paths": ["/t", "/u/v"]},
    ]);
    check(
        routes.clone(),
        "GET x/t",
        Some(split_winner(
            "10000000-0000-4000-8000-000000000000",
            "80000000-0000-4000-8000-000000000000",
            1,
        )),
    );
    check(
        routes,
        "GET x/u/v",
        Some(split_winner(
            "10000000-0000-4000-8000-000000000000",
            "80000000-0000-4000-8000-000000000000",
            2,
        )),
    );
}

/// Of routes `a` and `b`, both split in two groups, the one whose group
/// `group` has the greater derived id.
fn split_winner(a: &str, b: &str, group: usize) -> &'static str {
    let namespace = uuid::uuid!("7f145bf9-0dce-4f91-98eb-debbce4b9f6b");
    let derived = |id: &str| uuid::Uuid::new_v5(&namespace, format!("{id}#{group}").as_bytes());
    if derived(a) > derived(b) {
        "a"
    } else {
        "b"
    }
}

#[test]
fn split_route_ids_are_kongs() {
    // Kong: uuid.factory_v5("7f145bf9-0dce-4f91-98eb-debbce4b9f6b")(id .. "#1").
    let namespace = uuid::uuid!("7f145bf9-0dce-4f91-98eb-debbce4b9f6b");
    let derived = uuid::Uuid::new_v5(&namespace, b"e8fb37f1-102d-461e-9c51-6608a6bb8101#1");
    assert_eq!(derived.get_version_num(), 5);
}

#[test]
fn header_names_with_underscores_match_dashes() {
    // Kong reads `http.headers.x_version` through ngx.req.get_headers(),
    // which finds it under `x-version`.
    let routes = json!([{"name": "h", "headers": {"X_Version": ["v1"]}}]);
    check(routes.clone(), "GET x/ x-version=v1", Some("h"));
    check(routes, "GET x/ x-version=v2", None);
}

#[test]
fn invalid_conditions_disable_only_their_route() {
    let routes = json!([
        {"name": "bad-method", "methods": ["GE T"], "paths": ["/x"]},
        {"name": "bad-header", "headers": {"bad header": ["v"]}, "paths": ["/x"]},
        {"name": "good", "paths": ["/"]},
    ]);
    check(routes.clone(), "GET x/x bad=v", Some("good"));
    check(routes, "GE x/x", Some("good"));
}
