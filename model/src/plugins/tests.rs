//! Plugin schemas through the full plugin entity path: subschema selection,
//! defaults and auto fields, then validation.

use serde_json::{json, Map, Value};

use crate::error::schema_violation_message;
use crate::schema::{Context, Errors};

/// What a plugin insert should produce.
enum Expect {
    /// Success, and `config` is exactly this.
    Config(Value),
    /// Success, and every key given here (recursively through objects)
    /// has this value in the stored entity.
    Has(Value),
    /// Failure with exactly this error map.
    Errors(Value),
    /// Failure with this Admin API message.
    Message(&'static str),
}

fn insert(input: &Value) -> Result<Map<String, Value>, Errors> {
    let schema = crate::entities::entity("plugins").expect("plugins entity");
    let map = input.as_object().expect("input is an object").clone();
    let sub = schema.subschema_for(&map);
    let processed = schema.record.process_auto_fields_with(
        map,
        Context::Insert,
        sub.as_deref(),
        1_700_000_000.0,
    )?;
    schema.record.validate(&processed, true, sub.as_deref())?;
    Ok(processed)
}

/// `expected` is contained in `actual`: objects key by key, the rest equal.
fn contains(actual: &Value, expected: &Value) -> bool {
    match (actual, expected) {
        (Value::Object(a), Value::Object(e)) => e
            .iter()
            .all(|(k, ev)| a.get(k).is_some_and(|av| contains(av, ev))),
        (a, e) => a == e,
    }
}

fn check(input: Value, expect: Expect) {
    let result = insert(&input);
    match (expect, result) {
        (Expect::Config(want), Ok(got)) => {
            assert_eq!(got["config"], want, "config of {input}");
        }
        (Expect::Has(want), Ok(got)) => {
            let got = Value::Object(got);
            assert!(
                contains(&got, &want),
                "{input}\n got: {got:#}\nwant: {want:#}"
            );
        }
        (Expect::Errors(want), Err(got)) => {
            assert_eq!(Value::Object(got), want, "errors of {input}");
        }
        (Expect::Message(want), Err(got)) => {
            assert_eq!(schema_violation_message(&got), want, "message of {input}");
        }
        (_, Ok(got)) => panic!("{input} was accepted: {:#}", Value::Object(got)),
        (_, Err(got)) => panic!("{input} was rejected: {:#}", Value::Object(got)),
    }
}

fn plugin(name: &str, config: Value) -> Value {
    json!({ "name": name, "config": config })
}

#[test]
fn registry_lists_every_plugin_sorted_with_priorities() {
    let names = super::names();
    assert_eq!(names.len(), 34);
    let mut sorted = names.clone();
    sorted.sort_unstable();
    assert_eq!(names, sorted);
    for (name, priority) in [
        ("key-auth", 1250),
        ("basic-auth", 1100),
        ("jwt", 1450),
        ("acl", 950),
        ("rate-limiting", 910),
        ("cors", 2000),
        ("correlation-id", 100001),
        ("pre-function", 1000000),
        ("post-function", -1000),
        ("zipkin", 100000),
        ("request-termination", 2),
    ] {
        assert_eq!(super::priority(name), Some(priority), "{name}");
    }
    assert_eq!(super::priority("no-such-plugin"), None);
    assert!(super::subschema("no-such-plugin").is_none());
    for name in names {
        let sub = super::subschema(name).expect("listed plugins have a subschema");
        let config = sub.get("config").expect("config field");
        assert!(config.required, "{name}: config is required");
        assert!(config.as_record().is_some(), "{name}: config is a record");
    }
}

#[test]
fn every_plugin_accepts_a_minimal_config() {
    let minimal = [
        ("acme", json!({"account_email": "ops@example.test"})),
        ("acl", json!({"allow": ["admins"]})),
        ("basic-auth", json!({})),
        ("bot-detection", json!({})),
        ("correlation-id", json!({})),
        ("cors", json!({})),
        ("datadog", json!({})),
        ("file-log", json!({"path": "/tmp/file.log"})),
        ("grpc-gateway", json!({})),
        ("grpc-web", json!({})),
        ("hmac-auth", json!({})),
        (
            "http-log",
            json!({"http_endpoint": "http://logs.test:9000/in"}),
        ),
        ("ip-restriction", json!({"deny": ["10.0.0.0/8"]})),
        ("jwt", json!({})),
        ("key-auth", json!({})),
        ("oauth2", json!({"enable_client_credentials": true})),
        (
            "opentelemetry",
            json!({"traces_endpoint": "http://otel.test:4318/v1/traces"}),
        ),
        ("post-function", json!({"log": ["return"]})),
        ("pre-function", json!({"access": ["kong.log('hi')"]})),
        ("prometheus", json!({})),
        ("proxy-cache", json!({"strategy": "memory"})),
        ("rate-limiting", json!({"minute": 30})),
        ("redirect", json!({"location": "https://example.test/new"})),
        ("request-size-limiting", json!({})),
        ("request-termination", json!({})),
        ("request-transformer", json!({})),
        (
            "response-ratelimiting",
            json!({"limits": {"video": {"minute": 10}}}),
        ),
        ("response-transformer", json!({})),
        ("session", json!({})),
        ("statsd", json!({})),
        ("syslog", json!({})),
        ("tcp-log", json!({"host": "127.0.0.1", "port": 9999})),
        ("udp-log", json!({"host": "logs.test", "port": 514})),
        ("zipkin", json!({})),
    ];
    assert_eq!(minimal.len(), super::names().len());
    for (name, config) in minimal {
        let expected = json!({"name": name, "config": config, "enabled": true});
        check(plugin(name, config), Expect::Has(expected));
    }
}

#[test]
fn plugins_without_config_get_every_default() {
    check(
        json!({"name": "key-auth"}),
        Expect::Config(json!({
            "key_names": ["apikey"],
            "hide_credentials": false,
            "anonymous": null,
            "key_in_header": true,
            "key_in_query": true,
            "key_in_body": false,
            "run_on_preflight": true,
            "realm": null,
        })),
    );
    check(
        json!({"name": "basic-auth"}),
        Expect::Config(json!({"anonymous": null, "hide_credentials": false, "realm": "service"})),
    );
    check(
        json!({"name": "key-auth"}),
        Expect::Has(json!({
            "protocols": ["grpc", "grpcs", "http", "https"],
            "consumer": null,
            "route": null,
            "service": null,
            "enabled": true,
        })),
    );
}

#[test]
fn rate_limiting() {
    check(
        plugin("rate-limiting", json!({})),
        Expect::Errors(json!({"@entity": [
            "at least one of these fields must be non-empty: 'config.second', 'config.minute', \
             'config.hour', 'config.day', 'config.month', 'config.year'"
        ]})),
    );
    check(
        json!({"name": "rate-limiting"}),
        Expect::Message(
            "schema violation (at least one of these fields must be non-empty: 'config.second', \
             'config.minute', 'config.hour', 'config.day', 'config.month', 'config.year')",
        ),
    );
    check(
        plugin("rate-limiting", json!({"minute": 30})),
        Expect::Config(json!({
            "second": null,
            "minute": 30,
            "hour": null,
            "day": null,
            "month": null,
            "year": null,
            "limit_by": "consumer",
            "header_name": null,
            "path": null,
            "policy": "local",
            "fault_tolerant": true,
            "redis": {
                "host": null,
                "port": 6379,
                "timeout": 2000,
                "username": null,
                "password": null,
                "database": 0,
                "ssl": false,
                "ssl_verify": false,
                "server_name": null,
            },
            "hide_client_headers": false,
            "error_code": 429,
            "error_message": "API rate limit exceeded",
            "sync_rate": -1,
        })),
    );
    check(
        plugin("rate-limiting", json!({"minute": 20, "hour": 10})),
        Expect::Errors(json!({
            "config": "The limit for hour(10.0) cannot be lower than the limit for minute(20.0)"
        })),
    );
    check(
        plugin("rate-limiting", json!({"second": 0})),
        Expect::Errors(json!({"config": {"second": "value must be greater than 0"}})),
    );
    check(
        plugin("rate-limiting", json!({"minute": "ten"})),
        Expect::Errors(json!({"config": {"minute": "expected a number"}})),
    );
    check(
        plugin("rate-limiting", json!({"minute": 5, "policy": "memcached"})),
        Expect::Errors(json!({"config": {"policy": "expected one of: local, cluster, redis"}})),
    );
    check(
        plugin("rate-limiting", json!({"minute": 5, "sync_rate": 1})),
        Expect::Errors(json!({"config": "sync_rate can only be used with the redis policy"})),
    );
    check(
        plugin("rate-limiting", json!({"minute": 5, "policy": "redis"})),
        Expect::Errors(json!({
            "config": {"redis": {"host": "required field missing"}},
            "@entity": ["failed conditional validation given value of field 'config.policy'"],
        })),
    );
    check(
        plugin(
            "rate-limiting",
            json!({"minute": 5, "policy": "redis", "redis": {"host": "redis.test"}}),
        ),
        Expect::Has(json!({"config": {"redis": {"host": "redis.test", "port": 6379}}})),
    );
    // The deprecated flat names land in the `redis` record.
    check(
        plugin(
            "rate-limiting",
            json!({"minute": 5, "policy": "redis", "redis_host": "r.test", "redis_port": 7000}),
        ),
        Expect::Has(
            json!({"config": {"redis": {"host": "r.test", "port": 7000, "timeout": 2000}}}),
        ),
    );
    check(
        plugin("rate-limiting", json!({"minute": 5, "limit_by": "header"})),
        Expect::Errors(json!({
            "config": {"header_name": "required field missing"},
            "@entity": ["failed conditional validation given value of field 'config.limit_by'"],
        })),
    );
    check(
        plugin("rate-limiting", json!({"minute": 5, "unknown": 1})),
        Expect::Errors(json!({"config": {"unknown": "unknown field"}})),
    );
    check(
        plugin("rate-limiting", json!({"minute": 5})).tap(|p| p["protocols"] = json!(["tcp"])),
        Expect::Errors(json!({"protocols": ["expected one of: grpc, grpcs, http, https"]})),
    );
}

#[test]
fn response_ratelimiting() {
    check(
        plugin("response-ratelimiting", json!({})),
        Expect::Errors(json!({"config": {"limits": "required field missing"}})),
    );
    check(
        plugin("response-ratelimiting", json!({"limits": {}})),
        Expect::Errors(json!({"config": {"limits": "length must be at least 1"}})),
    );
    check(
        plugin("response-ratelimiting", json!({"limits": {"video": {}}})),
        Expect::Errors(json!({"config": {"limits": {"@entity": [
            "at least one of these fields must be non-empty: 'second', 'minute', 'hour', 'day', \
             'month', 'year'"
        ]}}})),
    );
    check(
        plugin(
            "response-ratelimiting",
            json!({"limits": {"video": {"second": 10, "minute": 5}}}),
        ),
        Expect::Errors(json!({"config": {
            "limits": "the limit for minute(5.0) cannot be lower than the limit for second(10.0)"
        }})),
    );
    check(
        plugin(
            "response-ratelimiting",
            json!({"limits": {"video": {"minute": 10}}}),
        ),
        Expect::Has(json!({"config": {
            "header_name": "x-kong-limit",
            "limit_by": "consumer",
            "policy": "local",
            "block_on_first_violation": false,
            "redis": {"port": 6379, "database": 0},
        }})),
    );
}

#[test]
fn cors_defaults_and_origins() {
    check(
        plugin("cors", json!({})),
        Expect::Config(json!({
            "origins": null,
            "headers": null,
            "exposed_headers": null,
            "methods": ["GET", "HEAD", "PUT", "PATCH", "POST", "DELETE", "OPTIONS", "TRACE", "CONNECT"],
            "max_age": null,
            "credentials": false,
            "private_network": false,
            "preflight_continue": false,
            "allow_origin_absent": true,
        })),
    );
    check(
        plugin(
            "cors",
            json!({"origins": ["*", "https://.*\\.example\\.test", "(?!x)y"]}),
        ),
        Expect::Has(json!({"config": {"origins": ["*", "https://.*\\.example\\.test", "(?!x)y"]}})),
    );
    check(
        plugin("cors", json!({"origins": ["good", "[bad"]})),
        Expect::Errors(json!({"config": {"origins": [null, "'[bad' is not a valid regex"]}})),
    );
    check(
        plugin("cors", json!({"methods": ["GET", "FETCH"]})),
        Expect::Errors(json!({"config": {"methods": [null,
            "expected one of: GET, HEAD, PUT, PATCH, POST, DELETE, OPTIONS, TRACE, CONNECT"]}})),
    );
    check(
        plugin("cors", json!({"credentials": "yes"})),
        Expect::Errors(json!({"config": {"credentials": "expected a boolean"}})),
    );
    let consumer = json!({"id": "6c1f6a3e-4b1e-4d6a-9a0e-2f7b8f0d1c2a"});
    check(
        plugin("cors", json!({})).tap(|p| p["consumer"] = consumer.clone()),
        Expect::Errors(json!({"consumer": "value must be null"})),
    );
}

#[test]
fn request_termination() {
    check(
        plugin("request-termination", json!({})),
        Expect::Config(json!({
            "status_code": 503,
            "message": null,
            "content_type": null,
            "body": null,
            "echo": false,
            "trigger": null,
        })),
    );
    for code in [100, 418, 599] {
        check(
            plugin("request-termination", json!({"status_code": code})),
            Expect::Has(json!({"config": {"status_code": code}})),
        );
    }
    for code in [99, 600] {
        check(
            plugin("request-termination", json!({"status_code": code})),
            Expect::Errors(
                json!({"config": {"status_code": "value should be between 100 and 599"}}),
            ),
        );
    }
    check(
        plugin("request-termination", json!({"status_code": 200.5})),
        Expect::Errors(json!({"config": {"status_code": "expected an integer"}})),
    );
    check(
        plugin(
            "request-termination",
            json!({"message": "hi", "body": "<p>hi</p>"}),
        ),
        Expect::Errors(json!({"config": "message cannot be used with content_type or body"})),
    );
    check(
        plugin("request-termination", json!({"content_type": "text/html"})),
        Expect::Errors(json!({"config": "content_type requires a body"})),
    );
    check(
        plugin("request-termination", json!({"echo": true, "body": "x"})),
        Expect::Errors(json!({"config": "echo cannot be used with content_type and body"})),
    );
    check(
        plugin("request-termination", json!({"trigger": "X Trigger"})),
        Expect::Errors(json!({"config": {"trigger":
            "bad header name 'X Trigger', allowed characters are A-Z, a-z, 0-9, '_', and '-'"}})),
    );
}

#[test]
fn ip_restriction() {
    check(
        plugin("ip-restriction", json!({})),
        Expect::Errors(json!({"@entity": [
            "at least one of these fields must be non-empty: 'config.allow', 'config.deny'"
        ]})),
    );
    check(
        plugin("ip-restriction", json!({"allow": []})),
        Expect::Errors(json!({"@entity": [
            "at least one of these fields must be non-empty: 'config.allow', 'config.deny'"
        ]})),
    );
    check(
        plugin(
            "ip-restriction",
            json!({"allow": ["127.0.0.1", "10.0.0.0/8", "::1"], "deny": ["192.168.1.1"]}),
        ),
        Expect::Has(json!({
            "config": {"allow": ["127.0.0.1", "10.0.0.0/8", "::1"], "deny": ["192.168.1.1"],
                       "status": null, "message": null},
            "protocols": ["http", "https", "tcp", "tls", "grpc", "grpcs"],
        })),
    );
    check(
        plugin(
            "ip-restriction",
            json!({"allow": ["127.0.0.1", "not-an-ip", "10.0.0.0/33"]}),
        ),
        Expect::Errors(json!({"config": {"allow": [
            null,
            "invalid ip or cidr range: 'not-an-ip'",
            "invalid ip or cidr range: '10.0.0.0/33'",
        ]}})),
    );
    check(
        plugin("ip-restriction", json!({"deny": "1.2.3.4"})),
        Expect::Errors(json!({"config": {"deny": "expected an array"}})),
    );
}

#[test]
fn acl_needs_exactly_one_list() {
    check(
        plugin("acl", json!({})),
        Expect::Errors(json!({"@entity": [
            "exactly one of these fields must be non-empty: 'config.allow', 'config.deny'",
            "at least one of these fields must be non-empty: 'config.allow', 'config.deny'",
        ]})),
    );
    check(
        plugin("acl", json!({"allow": ["a"], "deny": ["b"]})),
        Expect::Errors(json!({"@entity": [
            "exactly one of these fields must be non-empty: 'config.allow', 'config.deny'",
        ]})),
    );
    check(
        plugin("acl", json!({"deny": ["b"]})),
        Expect::Config(json!({
            "allow": null,
            "deny": ["b"],
            "hide_groups_header": false,
            "always_use_authenticated_groups": false,
        })),
    );
}

#[test]
fn jwt() {
    let anonymous = "6c1f6a3e-4b1e-4d6a-9a0e-2f7b8f0d1c2a";
    check(
        plugin("jwt", json!({"anonymous": anonymous})),
        Expect::Config(json!({
            "uri_param_names": ["jwt"],
            "cookie_names": [],
            "key_claim_name": "iss",
            "secret_is_base64": false,
            "claims_to_verify": null,
            "anonymous": anonymous,
            "run_on_preflight": true,
            "maximum_expiration": 0,
            "header_names": ["authorization"],
            "realm": null,
        })),
    );
    check(
        plugin(
            "jwt",
            json!({"maximum_expiration": 60, "claims_to_verify": ["nbf"]}),
        ),
        Expect::Errors(json!({
            "config": {"claims_to_verify": "expected to contain: exp"},
            "@entity": ["failed conditional validation given value of field 'config.maximum_expiration'"],
        })),
    );
    check(
        plugin(
            "jwt",
            json!({"maximum_expiration": 60, "claims_to_verify": ["exp"]}),
        ),
        Expect::Has(json!({"config": {"maximum_expiration": 60}})),
    );
    check(
        plugin("jwt", json!({"maximum_expiration": 31_536_001})),
        Expect::Errors(
            json!({"config": {"maximum_expiration": "value should be between 0 and 31536000"}}),
        ),
    );
    check(
        plugin("jwt", json!({"claims_to_verify": ["iat"]})),
        Expect::Errors(json!({"config": {"claims_to_verify": ["expected one of: exp, nbf"]}})),
    );
    // Sets drop duplicates.
    check(
        plugin("jwt", json!({"uri_param_names": ["t", "t", "u"]})),
        Expect::Has(json!({"config": {"uri_param_names": ["t", "u"]}})),
    );
}

#[test]
fn auth_plugins() {
    check(
        plugin("key-auth", json!({"key_names": ["api key"]})),
        Expect::Errors(json!({"config": {"key_names": [
            "bad header name 'api key', allowed characters are A-Z, a-z, 0-9, '_', and '-'"
        ]}})),
    );
    check(
        plugin("key-auth", json!({"hide_credentials": "no"})),
        Expect::Errors(json!({"config": {"hide_credentials": "expected a boolean"}})),
    );
    check(
        plugin("hmac-auth", json!({})),
        Expect::Config(json!({
            "hide_credentials": false,
            "clock_skew": 300,
            "anonymous": null,
            "validate_request_body": false,
            "enforce_headers": [],
            "algorithms": ["hmac-sha1", "hmac-sha256", "hmac-sha384", "hmac-sha512"],
            "realm": null,
        })),
    );
    check(
        plugin(
            "hmac-auth",
            json!({"clock_skew": 0, "algorithms": ["hmac-md5"]}),
        ),
        Expect::Errors(json!({"config": {
            "clock_skew": "value must be greater than 0",
            "algorithms": ["expected one of: hmac-sha1, hmac-sha256, hmac-sha384, hmac-sha512"],
        }})),
    );
    check(
        plugin("oauth2", json!({})),
        Expect::Errors(json!({"config":
            "at least one of these fields must be true: enable_authorization_code, \
             enable_implicit_grant, enable_client_credentials, enable_password_grant"})),
    );
    check(
        plugin(
            "oauth2",
            json!({"enable_password_grant": true, "mandatory_scope": true}),
        ),
        Expect::Errors(json!({"config": {
            "scopes": "required field missing",
            "@entity": ["failed conditional validation given value of field 'mandatory_scope'"],
        }})),
    );
    let ok = insert(&plugin("oauth2", json!({"enable_implicit_grant": true}))).expect("valid");
    let key = ok["config"]["provision_key"]
        .as_str()
        .expect("generated provision_key");
    assert_eq!(key.len(), 32);
    assert_eq!(ok["config"]["refresh_token_ttl"], json!(1_209_600));
    assert_eq!(ok["config"]["pkce"], json!("lax"));
}

#[test]
fn session() {
    let a = insert(&plugin("session", json!({}))).expect("valid");
    let b = insert(&plugin("session", json!({}))).expect("valid");
    let secret = a["config"]["secret"].as_str().expect("secret");
    assert_eq!(secret.len(), 44);
    assert!(
        secret.bytes().all(|c| c.is_ascii_alphanumeric()),
        "{secret}"
    );
    // Kong draws the default once per node.
    assert_eq!(a["config"]["secret"], b["config"]["secret"]);
    check(
        plugin("session", json!({})),
        Expect::Has(json!({"config": {
            "storage": "cookie",
            "idling_timeout": 900,
            "rolling_timeout": 3600,
            "cookie_same_site": "Strict",
            "logout_methods": ["POST", "DELETE"],
            "response_headers": null,
        }})),
    );
    check(
        plugin(
            "session",
            json!({"cookie_lifetime": 60, "cookie_samesite": "off"}),
        ),
        Expect::Has(json!({"config": {"rolling_timeout": 60, "cookie_same_site": "Lax"}})),
    );
    check(
        plugin("session", json!({"cookie_same_site": "Sometimes"})),
        Expect::Errors(
            json!({"config": {"cookie_same_site": "expected one of: Strict, Lax, None, Default"}}),
        ),
    );
}

#[test]
fn transformers() {
    let empty = json!({"body": [], "headers": [], "querystring": []});
    let mut replace = empty.clone();
    replace["uri"] = Value::Null;
    check(
        plugin("request-transformer", json!({})),
        Expect::Config(json!({
            "http_method": null,
            "remove": empty,
            "rename": empty,
            "replace": replace,
            "add": empty,
            "append": empty,
        })),
    );
    check(
        plugin(
            "request-transformer",
            json!({"add": {"headers": ["x-a:1", "no-colon"], "querystring": ["q"]}}),
        ),
        Expect::Errors(json!({"config": {"add": {
            "headers": [null, "invalid value: no-colon"],
            "querystring": ["key 'q' has no value"],
        }}})),
    );
    check(
        plugin(
            "request-transformer",
            json!({"rename": {"headers": ["x-a:bad name"]}}),
        ),
        Expect::Errors(
            json!({"config": {"rename": {"headers": ["'bad name' is not a valid header"]}}}),
        ),
    );
    check(
        plugin("request-transformer", json!({"http_method": "get"})),
        Expect::Errors(json!({"config": {"http_method": "invalid value: get"}})),
    );
    let strings = json!({"json": [], "headers": []});
    let typed = json!({"json": [], "json_types": [], "headers": []});
    check(
        plugin("response-transformer", json!({})),
        Expect::Config(json!({
            "remove": strings,
            "rename": strings,
            "replace": typed,
            "add": typed,
            "append": typed,
        })),
    );
    check(
        plugin(
            "response-transformer",
            json!({"add": {"json_types": ["object"]}}),
        ),
        Expect::Errors(
            json!({"config": {"add": {"json_types": ["expected one of: boolean, number, string"]}}}),
        ),
    );
}

#[test]
fn small_plugins() {
    check(
        plugin("correlation-id", json!({})),
        Expect::Config(json!({
            "header_name": "Kong-Request-ID",
            "generator": "uuid#counter",
            "echo_downstream": false,
        })),
    );
    check(
        plugin("request-size-limiting", json!({"size_unit": "gigabytes"})),
        Expect::Errors(
            json!({"config": {"size_unit": "expected one of: megabytes, kilobytes, bytes"}}),
        ),
    );
    check(
        plugin("bot-detection", json!({"allow": ["curl/.*", "(unclosed"]})),
        Expect::Errors(json!({"config": {"allow": [null, "not a valid regex: (unclosed"]}})),
    );
    check(
        plugin("redirect", json!({"location": "/relative"})),
        Expect::Errors(json!({"config": {"location": "missing host in url"}})),
    );
    check(
        plugin("redirect", json!({"location": "https://example.test"})),
        Expect::Config(json!({
            "status_code": 301,
            "location": "https://example.test",
            "keep_incoming_path": false,
        })),
    );
    check(
        plugin("grpc-web", json!({})),
        Expect::Config(
            json!({"proto": null, "pass_stripped_path": null, "allow_origin_header": "*"}),
        ),
    );
    check(
        plugin("pre-function", json!({})),
        Expect::Errors(json!({"@entity": [
            "at least one of these fields must be non-empty: 'config.certificate', \
             'config.rewrite', 'config.access', 'config.header_filter', 'config.body_filter', \
             'config.log'"
        ]})),
    );
    check(
        plugin("prometheus", json!({"per_consumer": true})),
        Expect::Has(json!({"config": {"per_consumer": true, "latency_metrics": false}})),
    );
}

#[test]
fn proxy_cache() {
    check(
        plugin("proxy-cache", json!({})),
        Expect::Errors(json!({"config": {"strategy": "required field missing"}})),
    );
    check(
        plugin("proxy-cache", json!({"strategy": "memory"})),
        Expect::Config(json!({
            "response_code": [200, 301, 404],
            "request_method": ["GET", "HEAD"],
            "content_type": ["text/plain", "application/json"],
            "cache_ttl": 300,
            "strategy": "memory",
            "cache_control": false,
            "ignore_uri_case": false,
            "storage_ttl": null,
            "memory": {"dictionary_name": "kong_db_cache"},
            "vary_query_params": null,
            "vary_headers": null,
            "response_headers": {"age": true, "X-Cache-Status": true, "X-Cache-Key": true},
        })),
    );
    check(
        plugin(
            "proxy-cache",
            json!({"strategy": "memory", "memory": {"dictionary_name": "nope"}}),
        ),
        Expect::Errors(json!({"@entity": ["missing shared dict 'nope'"]})),
    );
    check(
        plugin(
            "proxy-cache",
            json!({"strategy": "memory", "response_code": [99]}),
        ),
        Expect::Errors(
            json!({"config": {"response_code": ["value should be between 100 and 900"]}}),
        ),
    );
}

#[test]
fn log_plugins() {
    check(
        plugin("file-log", json!({"path": "/tmp/with space*.log"})),
        Expect::Errors(json!({"config": {"path": "not a valid filename"}})),
    );
    check(
        plugin("file-log", json!({})),
        Expect::Errors(json!({"config": {"path": "required field missing"}})),
    );
    check(
        plugin("http-log", json!({"http_endpoint": "http://logs.test"})),
        Expect::Has(json!({"config": {
            "method": "POST",
            "content_type": "application/json",
            "timeout": 10000,
            "keepalive": 60000,
            "retry_count": null,
            "headers": null,
            "queue": {
                "max_batch_size": 1,
                "max_coalescing_delay": 1,
                "max_entries": 10000,
                "max_bytes": null,
                "max_retry_time": 60,
                "initial_retry_delay": 0.01,
                "max_retry_delay": 60,
                "concurrency_limit": 1,
            },
        }})),
    );
    check(
        plugin("http-log", json!({"http_endpoint": "logs.test"})),
        Expect::Errors(json!({"config": {"http_endpoint": "missing host in url"}})),
    );
    check(
        plugin(
            "http-log",
            json!({"http_endpoint": "http://u:p@logs.test", "headers": {"Authorization": "x"}}),
        ),
        Expect::Errors(json!({"config":
            "specifying both an 'Authorization' header and user info in 'http_endpoint' is not allowed"})),
    );
    check(
        plugin(
            "http-log",
            json!({"http_endpoint": "http://logs.test", "headers": {"Host": "x"}}),
        ),
        Expect::Errors(json!({"config": {"headers": "cannot contain 'Host' header"}})),
    );
    check(
        plugin(
            "http-log",
            json!({"http_endpoint": "http://logs.test", "queue": {"concurrency_limit": 2}}),
        ),
        Expect::Errors(
            json!({"config": {"queue": {"concurrency_limit": "expected one of: -1, 1"}}}),
        ),
    );
    check(
        plugin("tcp-log", json!({"host": "logs.test"})),
        Expect::Errors(json!({"config": {"port": "required field missing"}})),
    );
    check(
        plugin("udp-log", json!({"host": "logs.test", "port": 70000})),
        Expect::Errors(json!({"config": {"port": "value should be between 0 and 65535"}})),
    );
    check(
        plugin("syslog", json!({"facility": "local9"})),
        Expect::Errors(json!({"config": {"facility":
            "expected one of: auth, authpriv, cron, daemon, ftp, kern, lpr, mail, news, syslog, \
             user, uucp, local0, local1, local2, local3, local4, local5, local6, local7"}})),
    );
    check(
        plugin("syslog", json!({})),
        Expect::Config(json!({
            "log_level": "info",
            "successful_severity": "info",
            "client_errors_severity": "info",
            "server_errors_severity": "info",
            "custom_fields_by_lua": null,
            "facility": "user",
        })),
    );
}

#[test]
fn metrics_and_tracing() {
    let statsd = insert(&plugin("statsd", json!({}))).expect("valid");
    assert_eq!(
        statsd["config"]["metrics"].as_array().map(Vec::len),
        Some(13)
    );
    assert_eq!(statsd["config"]["host"], json!("localhost"));
    check(
        plugin(
            "statsd",
            json!({"metrics": [{"name": "latency", "stat_type": "counter"}]}),
        ),
        Expect::Errors(json!({"config": {"metrics": [{
            "sample_rate": "required field missing",
            "@entity": ["failed conditional validation given value of field 'stat_type'"],
        }]}})),
    );
    check(
        plugin("statsd", json!({"allow_status_codes": ["200-299", "5xx"]})),
        Expect::Errors(json!({"config": {"allow_status_codes": [null, "invalid value: 5xx"]}})),
    );
    let datadog = insert(&plugin("datadog", json!({}))).expect("valid");
    assert_eq!(
        datadog["config"]["metrics"][0],
        json!({"name": "request_count", "stat_type": "counter", "sample_rate": 1,
               "tags": ["app:kong"], "consumer_identifier": "custom_id"})
    );
    check(
        plugin(
            "datadog",
            json!({"metrics": [{"name": "latency", "stat_type": "timer", "tags": ["a:"]}]}),
        ),
        Expect::Errors(json!({"config": {"metrics": [{"tags": ["invalid value: a:"]}]}})),
    );
    check(
        plugin("zipkin", json!({})),
        Expect::Has(json!({"config": {
            "local_service_name": "kong",
            "sample_ratio": 0.001,
            "traceid_byte_count": 16,
            "header_type": "preserve",
            "connect_timeout": 2000,
            "propagation": {"extract": null, "clear": null, "inject": null, "default_format": "b3"},
            "queue": {"max_batch_size": 1},
        }})),
    );
    check(
        plugin(
            "zipkin",
            json!({"static_tags": [{"name": "a", "value": "1"}, {"name": "a", "value": "2"}]}),
        ),
        Expect::Errors(json!({"config": {"static_tags": "repeated tags are not allowed: a"}})),
    );
    check(
        plugin(
            "zipkin",
            json!({"static_tags": [{"name": "lc", "value": "1"}]}),
        ),
        Expect::Errors(json!({"config": {"static_tags": [{"name":
            "must not be one of: error, http.method, http.path, http.status_code, \
             kong.balancer.state, kong.balancer.try, kong.consumer, kong.credential, kong.node.id, \
             kong.route, kong.service, lc, peer.hostname"}]}})),
    );
    check(
        plugin("opentelemetry", json!({})),
        Expect::Errors(json!({"config": {"@entity": [
            "at least one of these fields must be non-empty: 'traces_endpoint', 'logs_endpoint'"
        ]}})),
    );
    check(
        plugin(
            "opentelemetry",
            json!({"endpoint": "http://otel.test:4318/v1/traces"}),
        ),
        Expect::Has(json!({"config": {
            "traces_endpoint": "http://otel.test:4318/v1/traces",
            "queue": {"max_batch_size": 200, "max_coalescing_delay": 1},
            "propagation": {"default_format": "w3c"},
            "header_type": "preserve",
        }})),
    );
    check(
        plugin(
            "opentelemetry",
            json!({"traces_endpoint": "http://o.test", "propagation": {"inject": ["b4"]}}),
        ),
        Expect::Errors(json!({"config": {"propagation": {
            "inject": ["expected one of: preserve, w3c, b3, b3-single, jaeger, ot, datadog, aws, gcp, instana"],
            // The record default only applies when the whole record is absent.
            "default_format": "required field missing",
        }}})),
    );
}

#[test]
fn acme() {
    check(
        plugin("acme", json!({})),
        Expect::Errors(json!({"config": {"account_email": "required field missing"}})),
    );
    check(
        plugin("acme", json!({"account_email": "no-at-sign"})),
        Expect::Errors(json!({"config": {"account_email": "invalid value: no-at-sign"}})),
    );
    check(
        plugin("acme", json!({"account_email": "a@b.test"})),
        Expect::Has(json!({"config": {
            "account_key": null,
            "api_uri": "https://acme-v02.api.letsencrypt.org/directory",
            "storage": "shm",
            "storage_config": {
                "shm": {"shm_name": "kong"},
                "kong": {},
                "redis": {"port": 6379, "extra_options": {"namespace": "", "scan_count": 10}},
                "vault": {"https": false, "tls_verify": true, "auth_method": "token"},
                "consul": {"https": false, "host": null},
            },
        }})),
    );
    check(
        plugin(
            "acme",
            json!({"account_email": "a@b.test", "api_uri": "https://acme-v02.api.letsencrypt.org"}),
        ),
        Expect::Errors(json!({
            "config": {"tos_accepted": "value must be true"},
            "@entity": ["terms of service must be accepted, see https://letsencrypt.org/repository/"],
        })),
    );
    check(
        plugin(
            "acme",
            json!({"account_email": "a@b.test",
                   "storage_config": {"redis": {"namespace": "kong_acme:cert_key:x"}}}),
        ),
        Expect::Errors(
            json!({"config": {"storage_config": {"redis": {"extra_options": {
                "namespace": "namespace can't be prefixed with reserved word: kong_acme:cert_key:"
            }}}}}),
        ),
    );
    check(
        plugin(
            "acme",
            json!({"account_email": "a@b.test", "domains": ["*.a.test", "a.*.test"]}),
        ),
        Expect::Errors(json!({"config": {"domains": [
            null,
            "invalid wildcard: must be placed at leftmost or rightmost label",
        ]}})),
    );
    let route = json!({"id": "6c1f6a3e-4b1e-4d6a-9a0e-2f7b8f0d1c2a"});
    check(
        plugin("acme", json!({"account_email": "a@b.test"})).tap(|p| p["route"] = route.clone()),
        Expect::Errors(json!({"route": "value must be null"})),
    );
}

#[test]
fn plugin_entity_level_errors() {
    check(
        json!({"name": "key-auth", "config": null}),
        Expect::Errors(json!({"config": "required field missing"})),
    );
    check(
        json!({"name": "key-auth", "config": "x"}),
        Expect::Errors(json!({"config": "expected a record"})),
    );
}

/// Edit a JSON value in place within an expression.
trait Tap {
    fn tap(self, f: impl FnOnce(&mut Self)) -> Self;
}

impl Tap for Value {
    fn tap(mut self, f: impl FnOnce(&mut Self)) -> Self {
        f(&mut self);
        self
    }
}

#[test]
fn schemas_document_lists_overrides_then_config() {
    let doc = super::subschema("key-auth").expect("key-auth").to_json();
    let names: Vec<&str> = doc["fields"]
        .as_array()
        .expect("fields")
        .iter()
        .filter_map(|f| f.as_object()?.keys().next().map(String::as_str))
        .collect();
    assert_eq!(names, ["consumer", "protocols", "config"]);
    assert_eq!(doc["fields"][0]["consumer"]["eq"], Value::Null);
    assert_eq!(
        doc["fields"][0]["consumer"]["reference"],
        json!("consumers")
    );
    let config = &doc["fields"][2]["config"];
    assert_eq!(config["required"], json!(true));
    assert_eq!(
        config["fields"][0]["key_names"]["default"],
        json!(["apikey"])
    );

    let doc = super::subschema("rate-limiting")
        .expect("rate-limiting")
        .to_json();
    assert_eq!(
        doc["entity_checks"][1],
        json!({"conditional": {
            "if_field": "config.policy", "if_match": {"eq": "redis"},
            "then_field": "config.redis.host", "then_match": {"required": true},
        }})
    );
    let fields = doc["fields"][1]["config"]["fields"]
        .as_array()
        .expect("config fields");
    let policy = fields
        .iter()
        .find_map(|f| f.get("policy"))
        .expect("policy field");
    assert_eq!(policy["one_of"], json!(["local", "cluster", "redis"]));
    assert_eq!(policy["len_min"], json!(0));
}
