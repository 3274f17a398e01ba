//! Entity validation through the whole insert path, checked against the
//! messages Kong produces for the same input.

use serde_json::{json, Map, Value};

use crate::entities::entity;
use crate::error::schema_violation_message;
use crate::schema::Context;

/// Insert `input` into `entity`: `Ok` with the processed entity or `Err`
/// with Kong's message and fields.
fn insert(name: &str, input: Value) -> Result<Map<String, Value>, (String, Value)> {
    let schema = entity(name).expect("entity exists");
    let Value::Object(map) = input else {
        panic!("input must be an object")
    };
    let sub = schema.subschema_for(&map);
    let processed = schema
        .record
        .process_auto_fields_with(map, Context::Insert, sub.as_deref(), 1_700_000_000.0)
        .map_err(|e| (schema_violation_message(&e), Value::Object(e)))?;
    schema
        .record
        .validate(&processed, true, sub.as_deref())
        .map_err(|e| (schema_violation_message(&e), Value::Object(e)))?;
    Ok(processed)
}

fn check_err(name: &str, input: Value, message: &str) {
    match insert(name, input.clone()) {
        Ok(e) => panic!("{name} {input} was accepted: {e:?}"),
        Err((m, fields)) => assert_eq!(m, message, "{name} {input}: fields {fields}"),
    }
}

fn check_ok(name: &str, input: Value, expect_subset: Value) {
    let got = match insert(name, input.clone()) {
        Ok(e) => Value::Object(e),
        Err((m, _)) => panic!("{name} {input} was refused: {m}"),
    };
    for (k, v) in expect_subset.as_object().expect("object") {
        assert_eq!(got.get(k), Some(v), "{name} {input}: field {k} in {got}");
    }
}

#[test]
fn services() {
    check_ok(
        "services",
        json!({"url": "https://service.test/"}),
        json!({"protocol": "https", "host": "service.test", "port": 443, "path": "/",
               "retries": 5, "connect_timeout": 60000, "enabled": true, "tls_verify_depth": null}),
    );
    check_ok(
        "services",
        json!({"url": "http://a.test:8080/x"}),
        json!({"protocol": "http", "port": 8080, "path": "/x", "created_at": 1_700_000_000}),
    );
    check_err(
        "services",
        json!({"url": "invalid url"}),
        "2 schema violations (host: required field missing; path: should start with: /)",
    );
    check_err(
        "services",
        json!({"host": "a.test", "foo": "bar"}),
        "schema violation (foo: unknown field)",
    );
    check_err(
        "services",
        json!({"host": "a.test:80"}),
        "schema violation (host: must not have a port)",
    );
    check_err(
        "services",
        json!({"host": "a.test", "path": "/a//b"}),
        "schema violation (path: must not have empty segments)",
    );
    check_err(
        "services",
        json!({"host": "a.test", "protocol": "tcp", "path": "/x"}),
        "2 schema violations (failed conditional validation given value of field 'protocol'; path: value must be null)",
    );
    check_err(
        "services",
        json!({"host": "a.test", "connect_timeout": 0}),
        "schema violation (connect_timeout: value should be between 1 and 2147483646)",
    );
}

#[test]
fn routes() {
    check_ok(
        "routes",
        json!({"paths": ["/a"]}),
        json!({"protocols": ["http", "https"], "strip_path": true, "preserve_host": false,
               "regex_priority": 0, "path_handling": "v0", "https_redirect_status_code": 426,
               "methods": null, "service": null}),
    );
    check_err(
        "routes",
        json!({"protocols": ["http"]}),
        "schema violation (must set one of 'methods', 'hosts', 'headers', 'paths' when 'protocols' is 'http')",
    );
    check_err(
        "routes",
        json!({"methods": ["GET"], "protocols": ["foo", "http"]}),
        "schema violation (protocols.1: expected one of: grpc, grpcs, http, https, tcp, tls, tls_passthrough, udp)",
    );
    check_err(
        "routes",
        json!({"paths": ["/a/../b"]}),
        "schema violation (paths.1: non-normalized path, consider use '/b' instead)",
    );
    check_err(
        "routes",
        json!({"paths": ["~/(unclosed"]}),
        "schema violation (paths.1: invalid regex: '/(unclosed' (PCRE returned: unclosed group))",
    );
    check_err(
        "routes",
        json!({"hosts": ["*.a.*"]}),
        "schema violation (hosts.1: invalid wildcard: must have at most one wildcard)",
    );
    check_err(
        "routes",
        json!({"paths": ["/a"], "protocols": ["http"], "snis": ["a.test"]}),
        "2 schema violations ('snis' can only be set when 'protocols' is 'grpcs', 'https', 'tls' or 'tls_passthrough'; snis: length must be 0)",
    );
    check_err(
        "routes",
        json!({"protocols": ["grpc"], "paths": ["/a"], "strip_path": true}),
        "schema violation (strip_path: cannot set 'strip_path' when 'protocols' is 'grpc' or 'grpcs')",
    );
    check_err(
        "routes",
        json!({"protocols": ["http", "tcp"], "paths": ["/a"]}),
        "schema violation (protocols: these sets are mutually exclusive: ('http', 'https'), ('tcp', 'tls', 'udp'))",
    );
    check_ok(
        "routes",
        json!({"methods": ["GET", "GET", "POST"]}),
        json!({"methods": ["GET", "POST"]}),
    );
}

#[test]
fn consumers_and_credentials() {
    check_err(
        "consumers",
        json!({}),
        "schema violation (at least one of these fields must be non-empty: 'custom_id', 'username')",
    );
    check_ok(
        "consumers",
        json!({"username": "a"}),
        json!({"custom_id": null, "tags": null}),
    );
    let consumer = json!({"id": "5e0c3c8a-8a5b-4c39-9a53-1d7d3c2f0a01"});
    let key = insert("keyauth_credentials", json!({"consumer": consumer})).expect("key-auth");
    assert_eq!(
        key["key"].as_str().map(str::len),
        Some(32),
        "generated key: {key:?}"
    );
    check_err(
        "basicauth_credentials",
        json!({"consumer": consumer, "username": "u"}),
        "schema violation (password: required field missing)",
    );
    check_err(
        "jwt_secrets",
        json!({"consumer": consumer, "algorithm": "RS256"}),
        "2 schema violations (failed conditional validation given value of field 'algorithm'; rsa_public_key: required field missing)",
    );
}

#[test]
fn upstreams_and_targets() {
    check_ok(
        "upstreams",
        json!({"name": "u.test"}),
        json!({"algorithm": "round-robin", "hash_on": "none", "slots": 10000}),
    );
    check_ok(
        "upstreams",
        json!({"name": "u.test", "hash_on": "ip"}),
        json!({"algorithm": "consistent-hashing"}),
    );
    check_err(
        "upstreams",
        json!({"name": "u.test", "hash_on": "header"}),
        "2 schema violations (failed conditional validation given value of field 'hash_on'; hash_on_header: required field missing)",
    );
    check_err(
        "upstreams",
        json!({"name": "10.0.0.1"}),
        "schema violation (name: Invalid name ('10.0.0.1'); no ip addresses allowed)",
    );
    let up = json!({"id": "5e0c3c8a-8a5b-4c39-9a53-1d7d3c2f0a01"});
    check_ok(
        "targets",
        json!({"upstream": up, "target": "a.test:80"}),
        json!({"weight": 100}),
    );
    assert_eq!(
        crate::entities::format_target("a.test").as_deref(),
        Some("a.test:8000")
    );
    assert_eq!(
        crate::entities::format_target("::1").as_deref(),
        Some("[::1]:8000")
    );
    assert_eq!(
        crate::entities::format_target("[::1]:81").as_deref(),
        Some("[::1]:81")
    );
    assert_eq!(
        crate::entities::format_target("1.2.3.4:80").as_deref(),
        Some("1.2.3.4:80")
    );
    check_err(
        "targets",
        json!({"upstream": up, "target": "a b"}),
        "schema violation (target: Invalid target ('a b'); not a valid hostname or ip address)",
    );
}

#[test]
fn certificates() {
    let cert = include_str!("../../../tests/e2e/fixtures/cert.pem");
    let key = include_str!("../../../tests/e2e/fixtures/key.pem");
    let other_key = include_str!("../../../tests/e2e/fixtures/other-key.pem");
    check_ok(
        "certificates",
        json!({"cert": cert, "key": key}),
        json!({"cert_alt": null}),
    );
    check_err(
        "certificates",
        json!({"cert": cert, "key": other_key}),
        "schema violation (certificate does not match key)",
    );
    check_err(
        "certificates",
        json!({"cert": "nope", "key": key}),
        "schema violation (cert: invalid certificate: PEM_read_bio_X509_AUX() failed)",
    );
    let ca = include_str!("../../../tests/e2e/fixtures/other-cert.pem");
    let ca_entity = insert("ca_certificates", json!({ "cert": ca })).expect("a CA is accepted");
    assert!(ca_entity["cert"].is_string());
    check_err(
        "ca_certificates",
        json!({"cert": cert}),
        "schema violation (certificate does not appear to be a CA because it is missing the \"CA\" basic constraint)",
    );
}

#[test]
fn nested_healthcheck_records_get_their_defaults() {
    let up = insert(
        "upstreams",
        json!({"name": "u.test", "healthchecks": {"active": {"timeout": 2}}}),
    )
    .expect("valid upstream");
    let hc = &up["healthchecks"];
    assert_eq!(hc["active"]["timeout"], 2);
    assert_eq!(hc["active"]["healthy"]["http_statuses"], json!([200, 302]));
    assert_eq!(
        hc["passive"]["unhealthy"]["http_statuses"],
        json!([429, 500, 503])
    );
    assert_eq!(hc["threshold"], 0);
}
