//! `POST /config` and `GET /config` on `gatehouse standalone`: a decK-style
//! file replaces the configuration in one version, loading it again
//! changes nothing, an invalid file is refused with Kong's errors and
//! loses nothing, and `If-Match` keeps two writers from overwriting each
//! other.

use std::time::{Duration, Instant};

use gatehouse_test_support::{EchoUpstream, Gatehouse};
use serde_json::Value;

use crate::{client, get_json, status_of, BIN};

/// Waits up to 10 s for `url` to answer `status` through the proxy.
async fn until_status(url: &str, status: u16) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while status_of(url).await != status {
        assert!(Instant::now() < deadline, "{url} never answered {status}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn post_config(
    admin: &str,
    query: &str,
    content_type: &str,
    body: String,
    if_match: Option<&str>,
) -> (u16, Value) {
    let mut request = client()
        .post(format!("{admin}/config{query}"))
        .header("content-type", content_type)
        .body(body);
    if let Some(tag) = if_match {
        request = request.header("if-match", tag);
    }
    let response = request.send().await.expect("post /config");
    let status = response.status().as_u16();
    let text = response.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

async fn etag(admin: &str) -> (String, Value) {
    let response = client()
        .get(format!("{admin}/config"))
        .send()
        .await
        .expect("get /config");
    assert_eq!(response.status(), 200);
    let tag = response
        .headers()
        .get("etag")
        .and_then(|v| v.to_str().ok())
        .expect("an ETag")
        .to_owned();
    (tag, response.json().await.expect("json"))
}

fn file(upstream: &str, with_route: bool) -> String {
    let routes = if with_route {
        "  routes:\n  - name: decl-route\n    paths: [/decl]\n"
    } else {
        ""
    };
    format!(
        "_format_version: \"3.0\"\nservices:\n- name: decl-service\n  url: http://{upstream}\n{routes}\
         consumers:\n- username: alice\n  keyauth_credentials:\n  - key: alice-key\n\
         \x20 basicauth_credentials:\n  - username: alice-basic\n    password: secret\n\
         upstreams:\n- name: decl-upstream\n  targets:\n  - target: 127.0.0.1:9\n"
    )
}

#[tokio::test]
async fn a_declarative_file_replaces_the_configuration_atomically() {
    let up = EchoUpstream::start();
    let gh = Gatehouse::start(BIN, &[]);
    let upstream = up.addr.to_string();
    let (before, _) = etag(&gh.admin).await;

    // The raw YAML file, as decK's users write it.
    let (status, body) = post_config(&gh.admin, "", "text/yaml", file(&upstream, true), None).await;
    assert_eq!(status, 201, "{body}");
    let services = body["services"].as_object().expect("services by id");
    assert_eq!(services.len(), 1);
    let (service_id, service) = services.iter().next().expect("one service");
    assert_eq!(service["name"], "decl-service");
    assert_eq!(service["host"], "127.0.0.1");
    let route = body["routes"]
        .as_object()
        .expect("routes")
        .values()
        .next()
        .cloned();
    assert_eq!(
        route.expect("a route")["service"]["id"],
        service_id.as_str()
    );
    assert_eq!(body["targets"].as_object().map(|t| t.len()), Some(1));
    let basic = body["basicauth_credentials"]
        .as_object()
        .and_then(|m| m.values().next())
        .expect("a basic-auth credential");
    assert_ne!(basic["password"], "secret", "hashed on load");
    until_status(&format!("{}/decl", gh.proxy), 200).await;

    // Exported as a 3.0 file; loading the same file again (here wrapped in
    // JSON, as Kong's clients send it) changes nothing.
    let (loaded, exported) = etag(&gh.admin).await;
    assert_ne!(loaded, before);
    let text = exported["config"].as_str().expect("config text");
    assert!(
        text.contains("_format_version: '3.0'") || text.contains("_format_version: \"3.0\""),
        "{text}"
    );
    assert!(text.contains("decl-service"), "{text}");
    let wrapped = serde_json::json!({ "config": file(&upstream, true) }).to_string();
    let (status, _) = post_config(
        &gh.admin,
        "?check_hash=1",
        "application/json",
        wrapped,
        None,
    )
    .await;
    assert_eq!(status, 304, "no change, nothing loaded");
    // Its own export loads back unchanged (passwords stay hashed:
    // `_transform: false`).
    let exported = serde_json::json!({ "config": text }).to_string();
    let (status, body) = post_config(
        &gh.admin,
        "?check_hash=1",
        "application/json",
        exported,
        None,
    )
    .await;
    assert_eq!(status, 304, "the export is the configuration: {body}");
    // The ids are Kong's deterministic ones: a second load keeps them.
    let (status, again) =
        post_config(&gh.admin, "", "text/yaml", file(&upstream, true), None).await;
    assert_eq!(status, 201);
    assert!(again["services"].get(service_id).is_some(), "{again}");
    assert_eq!(
        etag(&gh.admin).await.0,
        loaded,
        "the configuration did not change"
    );

    // An invalid file is refused with the entity and field named, and the
    // configuration in use stays.
    let broken = file(&upstream, true).replace("paths: [/decl]", "paths: [decl-without-slash]");
    let (status, error) =
        post_config(&gh.admin, "?flatten_errors=1", "text/yaml", broken, None).await;
    assert_eq!(status, 400, "{error}");
    assert_eq!(error["code"], 14);
    assert_eq!(error["name"], "invalid declarative configuration");
    let flattened = &error["flattened_errors"][0];
    assert_eq!(flattened["entity_type"], "route", "{error}");
    assert_eq!(flattened["entity_name"], "decl-route");
    assert_eq!(
        flattened["errors"],
        serde_json::json!([{
            "type": "field",
            "field": "paths.1",
            "message": "should start with: / (fixed path) or ~/ (regex path)",
        }]),
        "{error}"
    );
    assert_eq!(
        error["fields"]["services"][0]["routes"][0]["paths"],
        serde_json::json!(["should start with: / (fixed path) or ~/ (regex path)"]),
        "{error}"
    );
    let (status, error) =
        post_config(&gh.admin, "", "text/yaml", "services: []".into(), None).await;
    assert_eq!(status, 400);
    assert_eq!(error["fields"]["_format_version"], "required field missing");
    assert_eq!(status_of(&format!("{}/decl", gh.proxy)).await, 200);
    assert_eq!(etag(&gh.admin).await.0, loaded);

    // A writer holding an old ETag is refused; one holding the current one
    // applies, and the route it dropped stops being served.
    let (status, body) = post_config(
        &gh.admin,
        "",
        "text/yaml",
        file(&upstream, false),
        Some(&before),
    )
    .await;
    assert_eq!(status, 412, "{body}");
    let (status, body) = post_config(
        &gh.admin,
        "",
        "text/yaml",
        file(&upstream, false),
        Some(&loaded),
    )
    .await;
    assert_eq!(status, 201, "{body}");
    until_status(&format!("{}/decl", gh.proxy), 404).await;
    let routes: Value = get_json(format!("{}/routes", gh.admin)).await;
    assert_eq!(routes["data"].as_array().map(Vec::len), Some(0));
}

/// `gatehouse config …` against `admin`: (exit status, stdout, stderr).
fn cli(admin: &str, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(BIN)
        .arg("config")
        .args(args)
        .env("GATEHOUSE_ADMIN_URL", admin)
        .output()
        .expect("gatehouse config runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const CLI_FILE: &str = r#"_format_version: "3.0"
services:
- name: cli-service
  url: http://127.0.0.1:9
  routes:
  - name: cli-route
    paths: [/cli]
  plugins:
  - name: correlation-id
consumers:
- username: carol
  basicauth_credentials:
  - username: carol
    password: secret
upstreams:
- name: cli-upstream
  targets:
  - target: 127.0.0.1:9
"#;

#[tokio::test]
async fn the_cli_syncs_diffs_dumps_and_round_trips_on_sqlite_and_postgres() {
    let pg = gatehouse_test_support::Postgres::shared();
    let url = pg.fresh_database("gh_e2e_deck");
    for env in [vec![], vec![("GATEHOUSE_DATABASE_URL", url.as_str())]] {
        let gh = Gatehouse::start(BIN, &env);
        let dir = tempfile::tempdir().expect("temp dir");
        let file = dir.path().join("kong.yaml");
        std::fs::write(&file, CLI_FILE).expect("write file");
        let file = file.to_str().expect("utf-8 path");

        let (code, out, err) = cli(&gh.admin, &["validate", file]);
        assert_eq!(code, 0, "{out}{err}");
        let (code, out, _) = cli(&gh.admin, &["diff", file, "--non-zero-exit-code"]);
        assert_eq!(code, 2, "changes pending: {out}");
        assert!(out.contains("creating service cli-service"), "{out}");
        assert!(out.contains("creating plugin correlation-id"), "{out}");
        assert!(out.contains("traffic affected: cli-route"), "{out}");
        let (code, out, err) = cli(&gh.admin, &["sync", file]);
        assert_eq!(code, 0, "{out}{err}");
        assert!(out.contains("Created: 7"), "{out}");
        until_status(&format!("{}/cli", gh.proxy), 502).await;
        // The same file again: nothing to do.
        let (code, out, _) = cli(&gh.admin, &["sync", file]);
        assert_eq!(code, 0);
        assert!(
            out.contains("Created: 0") && out.contains("Updated: 0") && out.contains("Deleted: 0"),
            "{out}"
        );
        let (code, _, _) = cli(&gh.admin, &["diff", file, "--non-zero-exit-code"]);
        assert_eq!(code, 0);

        // A changed field is shown before it is applied.
        let changed = dir.path().join("changed.yaml");
        std::fs::write(&changed, CLI_FILE.replace("[/cli]", "[/cli2]")).expect("write");
        let (_, out, _) = cli(
            &gh.admin,
            &["sync", changed.to_str().expect("path"), "--dry-run"],
        );
        assert!(out.contains("updating route cli-route"), "{out}");
        assert!(out.contains(r#"paths: ["/cli"] -> ["/cli2"]"#), "{out}");
        assert_eq!(
            status_of(&format!("{}/cli", gh.proxy)).await,
            502,
            "dry run applies nothing"
        );

        // dump → reset → sync → dump gives the same file.
        let first = dir.path().join("dump1.yaml");
        let second = dir.path().join("dump2.yaml");
        let first_s = first.to_str().expect("path");
        assert_eq!(cli(&gh.admin, &["dump", "-o", first_s]).0, 0);
        assert_eq!(cli(&gh.admin, &["reset"]).0, 1, "reset needs --force");
        let (code, out, _) = cli(&gh.admin, &["reset", "--force"]);
        assert_eq!(code, 0);
        assert!(out.contains("Deleted: 7"), "{out}");
        until_status(&format!("{}/cli", gh.proxy), 404).await;
        assert_eq!(cli(&gh.admin, &["sync", first_s]).0, 0);
        assert_eq!(
            cli(&gh.admin, &["dump", "-o", second.to_str().expect("path")]).0,
            0
        );
        let (a, b) = (
            std::fs::read_to_string(&first).expect("dump 1"),
            std::fs::read_to_string(&second).expect("dump 2"),
        );
        assert_eq!(a, b);
        assert!(a.contains("cli-route") && a.contains("carol"), "{a}");
        assert!(!a.contains("secret"), "the password is dumped hashed: {a}");

        // An invalid file names the entity and the field, and exits 1.
        let bad = dir.path().join("bad.yaml");
        std::fs::write(&bad, CLI_FILE.replace("[/cli]", "[cli]")).expect("write");
        let (code, _, err) = cli(&gh.admin, &["sync", bad.to_str().expect("path")]);
        assert_eq!(code, 1);
        assert!(err.contains("route cli-route: paths.1"), "{err}");
    }
}

/// decK 1.4 (Debian's `deck`, installed by `scripts/test`) against
/// `gatehouse standalone`.
fn deck(admin: &str, args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new("deck")
        .args(args)
        .args(["--kong-addr", admin])
        .output()
        .expect("decK is installed (scripts/test installs Debian's deck)");
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.code().unwrap_or(-1), text)
}

/// A file in decK 1.4's format (`_format_version` "1.1") with the fields
/// Kong 3 returns: decK 1.4 reads no schema and fills only its own static
/// defaults, so fields it leaves out would show as updates against any
/// Kong 3 (see docs/declarative.md).
const DECK_FILE: &str = r#"_format_version: "1.1"
services:
- name: deck-service
  host: 127.0.0.1
  port: 9
  protocol: http
  retries: 5
  connect_timeout: 60000
  read_timeout: 60000
  write_timeout: 60000
  routes:
  - name: deck-route
    paths:
    - /deck
    path_handling: v0
    preserve_host: false
    protocols:
    - http
    - https
    regex_priority: 0
    strip_path: true
    https_redirect_status_code: 426
    request_buffering: true
    response_buffering: true
consumers:
- username: erin
  keyauth_credentials:
  - key: erin-key
"#;

#[tokio::test]
async fn deck_1_4_pings_syncs_diffs_and_dumps() {
    let gh = Gatehouse::start(BIN, &[]);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("deck.yaml");
    std::fs::write(&file, DECK_FILE).expect("write");
    let file = file.to_str().expect("path");

    let (code, out) = deck(&gh.admin, &["ping"]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Kong version:  3.9.0"), "{out}");

    let (code, out) = deck(&gh.admin, &["sync", "-s", file]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Created: 4"), "{out}");
    until_status(&format!("{}/deck", gh.proxy), 502).await;

    let (code, out) = deck(&gh.admin, &["diff", "-s", file]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("Created: 0") && out.contains("Updated: 0") && out.contains("Deleted: 0"),
        "no drift after a sync: {out}"
    );

    let dump = dir.path().join("dump.yaml");
    let (code, out) = deck(&gh.admin, &["dump", "-o", dump.to_str().expect("path")]);
    assert_eq!(code, 0, "{out}");
    let dumped = std::fs::read_to_string(&dump).expect("dump written");
    assert!(
        dumped.contains("deck-route") && dumped.contains("erin-key"),
        "{dumped}"
    );
    // Its own dump diffs clean too.
    let (code, out) = deck(&gh.admin, &["diff", "-s", dump.to_str().expect("path")]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Updated: 0"), "{out}");

    // A removal through decK reaches the proxy.
    let without = dir.path().join("without.yaml");
    let trimmed = DECK_FILE.split("consumers:").next().expect("services part");
    std::fs::write(&without, trimmed.replace("/deck\n", "/deck2\n")).expect("write");
    let (code, out) = deck(&gh.admin, &["sync", "-s", without.to_str().expect("path")]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("Deleted: 2") && out.contains("Updated: 1"),
        "{out}"
    );
    until_status(&format!("{}/deck", gh.proxy), 404).await;
    until_status(&format!("{}/deck2", gh.proxy), 502).await;
}

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/decl/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[tokio::test]
async fn kongs_and_decks_examples_load_and_invalid_files_name_the_problem() {
    let gh = Gatehouse::start(BIN, &[]);
    for (name, counts) in [
        (
            "kong-config-init.yaml",
            vec![
                ("services", 2),
                ("routes", 2),
                ("consumers", 1),
                ("keyauth_credentials", 1),
                ("plugins", 3),
            ],
        ),
        (
            "deck-documented.yaml",
            vec![
                ("services", 2),
                ("routes", 2),
                ("upstreams", 1),
                ("targets", 2),
                ("consumers", 1),
                ("keyauth_credentials", 1),
                ("basicauth_credentials", 1),
                ("acls", 1),
                ("jwt_secrets", 1),
                ("hmacauth_credentials", 1),
                ("plugins", 3),
                ("certificates", 1),
                ("snis", 1),
            ],
        ),
    ] {
        let (status, body) = post_config(&gh.admin, "", "text/yaml", fixture(name), None).await;
        assert_eq!(status, 201, "{name}: {body}");
        for (entity, count) in counts {
            assert_eq!(
                body[entity].as_object().map(|m| m.len()),
                Some(count),
                "{name}: {entity} in {body}"
            );
        }
        // Loaded again: nothing changes.
        let (status, _) =
            post_config(&gh.admin, "?check_hash=1", "text/yaml", fixture(name), None).await;
        assert_eq!(status, 304, "{name} loads the same way twice");
    }
    // The documented example's regex route is served as a regex (its
    // upstream's targets are down: 502, not 404).
    let through = |path: &'static str| {
        let url = format!("{}{path}", gh.proxy);
        async move {
            client()
                .get(url)
                .header("host", "api.example.com")
                .send()
                .await
                .expect("proxy answers")
                .status()
                .as_u16()
        }
    };
    // Applied off the request path: wait for the version to serve.
    let deadline = Instant::now() + Duration::from_secs(10);
    while through("/items/42").await == 404 {
        assert!(Instant::now() < deadline, "the regex route never served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(through("/items/abc").await, 404);

    for (name, entity_type, field, message) in [
        (
            "invalid-reference.yaml",
            "route",
            "service",
            "invalid reference 'service: no-such-service' (no such entry in 'services')",
        ),
        (
            "invalid-field.yaml",
            "service",
            "port",
            "value should be between 0 and 65535",
        ),
    ] {
        let (status, error) = post_config(
            &gh.admin,
            "?flatten_errors=1",
            "text/yaml",
            fixture(name),
            None,
        )
        .await;
        assert_eq!(status, 400, "{name}: {error}");
        let text = error.to_string();
        assert!(text.contains(message), "{name}: {text}");
        if let Some(flattened) = error["flattened_errors"]
            .as_array()
            .filter(|l| !l.is_empty())
        {
            assert_eq!(flattened[0]["entity_type"], entity_type, "{name}: {text}");
            assert_eq!(flattened[0]["errors"][0]["field"], field, "{name}: {text}");
        } else {
            assert!(
                error["fields"].to_string().contains(field),
                "{name}: {text}"
            );
        }
    }
}

#[tokio::test]
async fn select_tags_manage_only_their_entities() {
    let gh = Gatehouse::start(BIN, &[]);
    let outside = client()
        .post(format!("{}/services", gh.admin))
        .json(&serde_json::json!({"name": "outside", "url": "http://127.0.0.1:9"}))
        .send()
        .await
        .expect("create");
    assert_eq!(outside.status(), 201);
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("team.yaml");
    std::fs::write(&file, CLI_FILE).expect("write");
    let file = file.to_str().expect("path");
    let tagged = ["--select-tag", "team-a"];

    let (code, out, err) = cli(&gh.admin, &[&["sync", file][..], &tagged].concat());
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains("Created: 7") && out.contains("Deleted: 0"),
        "{out}"
    );
    let (_, out, _) = cli(&gh.admin, &[&["diff", file][..], &tagged].concat());
    assert!(
        out.contains("Created: 0") && out.contains("Updated: 0") && out.contains("Deleted: 0"),
        "{out}"
    );
    let service: Value = get_json(format!("{}/services/cli-service", gh.admin)).await;
    assert_eq!(service["tags"], serde_json::json!(["team-a"]));

    let dump = dir.path().join("team-dump.yaml");
    let dump_s = dump.to_str().expect("path");
    assert_eq!(
        cli(&gh.admin, &[&["dump", "-o", dump_s][..], &tagged].concat()).0,
        0
    );
    let dumped = std::fs::read_to_string(&dump).expect("dump");
    assert!(
        dumped.contains("select_tags") && dumped.contains("cli-service"),
        "{dumped}"
    );
    assert!(!dumped.contains("outside"), "{dumped}");

    let (code, out, _) = cli(&gh.admin, &[&["reset", "--force"][..], &tagged].concat());
    assert_eq!(code, 0);
    assert!(out.contains("Deleted: 7"), "{out}");
    let left: Value = get_json(format!("{}/services", gh.admin)).await;
    let names: Vec<&str> = left["data"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s["name"].as_str())
        .collect();
    assert_eq!(names, ["outside"]);
    // The dump carries its select tags: syncing it back leaves `outside`.
    let (code, out, _) = cli(&gh.admin, &["sync", dump_s]);
    assert_eq!(code, 0);
    assert!(
        out.contains("Created: 7") && out.contains("Deleted: 0"),
        "{out}"
    );
}

#[tokio::test]
async fn the_cli_reaches_an_admin_api_over_https() {
    // The Admin API behind the gateway's own TLS listener (Kong's
    // loopback pattern), whose default certificate is self-signed.
    let gh = Gatehouse::start(BIN, &[]);
    let admin_port = gh.admin.rsplit(':').next().expect("admin port").to_owned();
    for (path, body) in [
        (
            "/services",
            serde_json::json!({"name": "admin-api", "url": format!("http://127.0.0.1:{admin_port}")}),
        ),
        (
            "/services/admin-api/routes",
            serde_json::json!({"name": "admin-api", "paths": ["/adm"]}),
        ),
    ] {
        let created = client()
            .post(format!("{}{path}", gh.admin))
            .json(&body)
            .send()
            .await
            .expect("create");
        assert_eq!(created.status(), 201);
    }
    let https = format!("https://127.0.0.1:{}/adm", gh.proxy_tls_addr.port());
    let dump = |extra: &'static [&'static str]| {
        let https = https.clone();
        async move {
            let deadline = Instant::now() + Duration::from_secs(10);
            loop {
                let out = std::process::Command::new(BIN)
                    .args(["config", "dump", "-o", "-", "--admin-url", &https])
                    .args(extra)
                    .output()
                    .expect("gatehouse config runs");
                let text = String::from_utf8_lossy(&out.stdout).into_owned();
                let err = String::from_utf8_lossy(&out.stderr).into_owned();
                // Until the route serves, the proxy answers 404.
                if out.status.success() || !err.contains("404") || Instant::now() > deadline {
                    return (out.status.code(), text, err);
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };
    let (code, text, err) = dump(&["--tls-skip-verify"]).await;
    assert_eq!(code, Some(0), "{err}");
    assert!(
        text.contains("admin-api") && text.contains("/adm"),
        "{text}"
    );
    let (code, _, err) = dump(&[]).await;
    assert_eq!(code, Some(1), "a self-signed certificate is refused: {err}");
}
