use gatehouse_model::snapshot::Upstream;
use http::{HeaderMap, HeaderValue};
use regex::Regex;
use serde_json::{json, Value};

use super::*;

#[test]
fn xxh32_matches_the_reference() {
    // Values from the reference implementation (libxxhash `XXH32`, seed 0).
    let cases: [(&str, u32); 7] = [
        ("", 0x02cc_5d05),
        ("a", 0x550d_7456),
        ("abc", 0x32d1_53ff),
        ("127.0.0.1::8001 1", 0x1fe6_81a7),
        ("Nobody inspects the spammish repetition", 0xe229_3b2f),
        ("0123456789abcdef", 0xc2c4_5b69),
        ("0123456789abcdef0123", 0x6350_964e),
    ];
    for (input, expect) in cases {
        assert_eq!(xxh32(input.as_bytes()), expect, "{input:?}");
    }
}

/// Hashes a request to `path_and_query` with `headers` from 10.0.0.1 for an
/// upstream with `fields`, and compares with the hash of `expect`; `None`
/// expects a new cookie, whose value must be what was hashed.
fn check(fields: Value, path_and_query: &str, headers: &[(&str, &str)], expect: Option<&str>) {
    let mut upstream = json!({
        "id": "u", "name": "u", "algorithm": "consistent-hashing", "slots": 10000,
        "host_header": null, "hash_on_cookie_path": "/",
    });
    if let (Value::Object(upstream), Value::Object(fields)) = (&mut upstream, fields.clone()) {
        upstream.extend(fields);
    }
    let upstream: Upstream = serde_json::from_value(upstream).expect("upstream");
    let spec = HashSpec::new(&upstream);
    let mut map = HeaderMap::new();
    for (name, value) in headers {
        map.append(
            HeaderName::try_from(*name).expect("name"),
            HeaderValue::try_from(*value).expect("value"),
        );
    }
    let (path, query) = match path_and_query.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (path_and_query, None),
    };
    let regex = Regex::new(r"^/users/(?<user>[^/]+)/(\w+)").expect("regex");
    let hashed = spec.hash(&HashInput {
        client_ip: b"10.0.0.1",
        headers: &map,
        path,
        query,
        path_regex: Some(&regex),
    });
    match expect {
        Some(expect) => {
            assert_eq!(
                hashed.point,
                xxh32(expect.as_bytes()),
                "{fields} {path_and_query} {headers:?}: expected {expect:?}"
            );
            assert!(hashed.set_cookie.is_none(), "{fields}");
        }
        None => {
            let cookie = hashed.set_cookie.expect("a new cookie");
            let cookie = cookie.to_str().expect("ascii");
            let value = cookie
                .split(';')
                .next()
                .and_then(|pair| pair.split_once('='))
                .map(|(_, value)| value)
                .expect("name=value");
            assert_eq!(hashed.point, xxh32(value.as_bytes()));
            assert!(
                cookie.ends_with("; Path=/app; Same-Site=Lax; HttpOnly"),
                "{cookie}"
            );
        }
    }
}

/// Upstream fields, path and query, request headers, expected value.
type Case = (
    Value,
    &'static str,
    Vec<(&'static str, &'static str)>,
    Option<&'static str>,
);

#[test]
fn hash_values_follow_kong() {
    let cases: Vec<Case> = vec![
        (json!({"hash_on": "none"}), "/", vec![], Some("")),
        (json!({"hash_on": "ip"}), "/", vec![], Some("10.0.0.1")),
        (json!({"hash_on": "path"}), "/a/b?x=1", vec![], Some("/a/b")),
        (
            json!({"hash_on": "header", "hash_on_header": "X-User"}),
            "/",
            vec![("x-user", "alice")],
            Some("alice"),
        ),
        // Repeated headers are joined as nginx joins them.
        (
            json!({"hash_on": "header", "hash_on_header": "x-user"}),
            "/",
            vec![("x-user", "a"), ("x-user", "b")],
            Some("a, b"),
        ),
        // A missing header falls back; an empty one does not.
        (
            json!({"hash_on": "header", "hash_on_header": "x-user", "hash_fallback": "ip"}),
            "/",
            vec![],
            Some("10.0.0.1"),
        ),
        (
            json!({"hash_on": "header", "hash_on_header": "x-user", "hash_fallback": "ip"}),
            "/",
            vec![("x-user", "")],
            Some(""),
        ),
        (
            json!({"hash_on": "header", "hash_on_header": "x-user", "hash_fallback": "header", "hash_fallback_header": "x-team"}),
            "/",
            vec![("x-team", "blue")],
            Some("blue"),
        ),
        // No consumers yet: consumer always falls back.
        (
            json!({"hash_on": "consumer", "hash_fallback": "path"}),
            "/p",
            vec![],
            Some("/p"),
        ),
        (json!({"hash_on": "consumer"}), "/p", vec![], Some("")),
        (
            json!({"hash_on": "cookie", "hash_on_cookie": "sticky", "hash_on_cookie_path": "/app"}),
            "/",
            vec![("cookie", "a=1; sticky=abc; b=2")],
            Some("abc"),
        ),
        (
            json!({"hash_on": "cookie", "hash_on_cookie": "sticky", "hash_on_cookie_path": "/app"}),
            "/",
            vec![("cookie", "a=1"), ("cookie", "sticky=second")],
            Some("second"),
        ),
        (
            json!({"hash_on": "cookie", "hash_on_cookie": "sticky", "hash_on_cookie_path": "/app"}),
            "/",
            vec![("cookie", "stickyx=1")],
            None,
        ),
        (
            json!({"hash_on": "query_arg", "hash_on_query_arg": "user id"}),
            "/?a=1&user+id=b%20c",
            vec![],
            Some("b c"),
        ),
        (
            json!({"hash_on": "query_arg", "hash_on_query_arg": "u"}),
            "/?u=b&x=1&u=a",
            vec![],
            Some("a,b"),
        ),
        (
            json!({"hash_on": "query_arg", "hash_on_query_arg": "u"}),
            "/?u",
            vec![],
            Some("true"),
        ),
        (
            json!({"hash_on": "query_arg", "hash_on_query_arg": "u"}),
            "/?u=",
            vec![],
            Some(""),
        ),
        (
            json!({"hash_on": "query_arg", "hash_on_query_arg": "u", "hash_fallback": "path"}),
            "/x?v=1",
            vec![],
            Some("/x"),
        ),
        (
            json!({"hash_on": "uri_capture", "hash_on_uri_capture": "user"}),
            "/users/bob/items",
            vec![],
            Some("bob"),
        ),
        (
            json!({"hash_on": "uri_capture", "hash_on_uri_capture": "2"}),
            "/users/bob/items",
            vec![],
            Some("items"),
        ),
        (
            json!({"hash_on": "uri_capture", "hash_on_uri_capture": "user", "hash_fallback": "ip"}),
            "/other",
            vec![],
            Some("10.0.0.1"),
        ),
    ];
    for (fields, path, headers, expect) in cases {
        check(fields, path, &headers, expect);
    }
}
