//! `gatehouse cp` on a real PostgreSQL and `gatehouse dp` processes: the
//! data plane gets its configuration over the sync stream, serves it,
//! reports to `/clustering/data-planes`, keeps its node id and serves its
//! cached configuration when the control plane is down.

use std::time::{Duration, Instant};

use gatehouse_test_support::{free_port, EchoUpstream, Gatehouse, Postgres};
use serde_json::{json, Value};

use crate::{client, status_of, BIN};

async fn post(url: String, body: Value) -> Value {
    let response = client().post(url).json(&body).send().await.expect("post");
    let status = response.status();
    let body: Value = response.json().await.expect("json");
    assert!(status.is_success(), "{status}: {body}");
    body
}

/// Retries `check` for up to 20 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(20);
    while !check().await {
        assert!(Instant::now() < deadline, "never happened: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `gatehouse cluster gen-cert` into `dir`: (cert, key) paths.
fn gen_cert(dir: &std::path::Path, name: &str) -> (String, String) {
    let cert = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    let status = std::process::Command::new(BIN)
        .args(["cluster", "gen-cert", "--cert"])
        .arg(&cert)
        .arg("--key")
        .arg(&key)
        .status()
        .expect("gen-cert runs");
    assert!(status.success());
    (
        cert.to_string_lossy().into_owned(),
        key.to_string_lossy().into_owned(),
    )
}

async fn data_planes(admin: &str) -> Vec<Value> {
    let body: Value = client()
        .get(format!("{admin}/clustering/data-planes"))
        .send()
        .await
        .expect("data planes")
        .json()
        .await
        .expect("json");
    body["data"].as_array().expect("data array").clone()
}

fn plane<'a>(planes: &'a [Value], id: &str) -> &'a Value {
    planes
        .iter()
        .find(|plane| plane["id"] == id)
        .unwrap_or_else(|| panic!("no data plane {id} in {planes:?}"))
}

fn node_id(dp: &Gatehouse) -> String {
    std::fs::read_to_string(dp.prefix.join("node_id"))
        .expect("node id file")
        .trim()
        .to_owned()
}

#[tokio::test]
async fn data_planes_follow_the_control_plane_and_survive_its_absence() {
    let pg = Postgres::shared();
    let url = pg.fresh_database("gh_e2e_cluster");
    let cluster_port = free_port();
    let cluster_listen = format!("127.0.0.1:{cluster_port}");
    let certs = tempfile::tempdir().expect("temp dir");
    let (cert, key) = gen_cert(certs.path(), "cluster");
    let cp_env = [
        ("GATEHOUSE_DATABASE_URL", url.as_str()),
        ("GATEHOUSE_CLUSTER_LISTEN", cluster_listen.as_str()),
        ("GATEHOUSE_CLUSTER_CERT", cert.as_str()),
        ("GATEHOUSE_CLUSTER_CERT_KEY", key.as_str()),
    ];
    let cp_dir = tempfile::tempdir().expect("temp dir");
    let mut cp = Gatehouse::start_role(BIN, "cp", &cp_dir.path().join("cp"), &cp_env);
    let dp_env = [
        ("GATEHOUSE_CLUSTER_CONTROL_PLANE", cluster_listen.as_str()),
        ("GATEHOUSE_CLUSTER_CERT", cert.as_str()),
        ("GATEHOUSE_CLUSTER_CERT_KEY", key.as_str()),
    ];
    // Three data planes; the third runs only key-auth (Kong's `plugins`).
    let dp_dirs: Vec<_> = (0..3)
        .map(|_| tempfile::tempdir().expect("temp dir"))
        .collect();
    let prefixes: Vec<_> = dp_dirs.iter().map(|d| d.path().join("dp")).collect();
    let mut limited_env = dp_env.to_vec();
    limited_env.push(("GATEHOUSE_PLUGINS", "key-auth"));
    limited_env.push(("GATEHOUSE_CLUSTER_DP_LABELS", "region:eu-west,tier:edge"));
    let mut dps = vec![
        Gatehouse::start_role(BIN, "dp", &prefixes[0], &dp_env),
        Gatehouse::start_role(BIN, "dp", &prefixes[1], &dp_env),
        Gatehouse::start_role(BIN, "dp", &prefixes[2], &limited_env),
    ];

    // A data plane with another certificate is refused.
    let (other_cert, other_key) = gen_cert(certs.path(), "other");
    let intruder_dir = tempfile::tempdir().expect("temp dir");
    let intruder = Gatehouse::start_role(
        BIN,
        "dp",
        &intruder_dir.path().join("dp"),
        &[
            ("GATEHOUSE_CLUSTER_CONTROL_PLANE", cluster_listen.as_str()),
            ("GATEHOUSE_CLUSTER_CERT", other_cert.as_str()),
            ("GATEHOUSE_CLUSTER_CERT_KEY", other_key.as_str()),
        ],
    );

    // Before any configuration: 404 for everything.
    for dp in &dps {
        assert_eq!(status_of(&format!("{}/echo", dp.proxy)).await, 404);
    }

    // A route created on the control plane is served by every data plane.
    let up = EchoUpstream::start();
    let a = cp.admin.clone();
    post(
        format!("{a}/services"),
        json!({"name": "echo", "url": format!("http://{}", up.addr)}),
    )
    .await;
    post(
        format!("{a}/services/echo/routes"),
        json!({"paths": ["/echo"]}),
    )
    .await;
    let doomed = post(
        format!("{a}/services/echo/routes"),
        json!({"paths": ["/doomed"]}),
    )
    .await;
    for dp in &dps {
        let url = format!("{}/doomed", dp.proxy);
        eventually("every data plane serves the routes", || async {
            status_of(&url).await == 200
        })
        .await;
    }
    let planes = data_planes(&a).await;
    assert_eq!(planes.len(), 3, "only the three data planes: {planes:?}");
    for dp in &dps {
        let plane = plane(&planes, &node_id(dp));
        assert_eq!(plane["ip"], "127.0.0.1");
        assert_eq!(plane["sync_status"], "normal");
        assert_eq!(
            plane["config_hash"].as_str().map(str::len),
            Some(32),
            "{plane}"
        );
        assert!(plane["last_propagation_ms"].is_number(), "{plane}");
        assert_eq!(plane["snapshots_sent"], 1, "{plane}");
    }
    assert_eq!(
        plane(&planes, &node_id(&dps[2]))["labels"],
        json!({"region": "eu-west", "tier": "edge"})
    );
    // The intruder got nothing.
    assert_eq!(status_of(&format!("{}/echo/x", intruder.proxy)).await, 404);
    assert!(intruder
        .log_text()
        .contains("Sync with the control plane failed"));

    // A delete stops being served everywhere, carried by a delta.
    let deleted = client()
        .delete(format!("{a}/routes/{}", doomed["id"].as_str().expect("id")))
        .send()
        .await
        .expect("delete");
    assert_eq!(deleted.status(), 204);
    for dp in &dps {
        let url = format!("{}/doomed", dp.proxy);
        eventually("the deleted route is gone", || async {
            status_of(&url).await == 404
        })
        .await;
    }
    for dp in &dps {
        let planes = data_planes(&a).await;
        let plane = plane(&planes, &node_id(dp));
        assert!(plane["deltas_sent"].as_u64() >= Some(1), "{plane}");
    }

    // A plugin the third data plane does not run: it refuses the version,
    // says why, and keeps serving the last good one.
    let plugin = post(format!("{a}/plugins"), json!({"name": "correlation-id"})).await;
    let limited = node_id(&dps[2]);
    eventually("the refusal is reported", || async {
        let planes = data_planes(&a).await;
        plane(&planes, &limited)["last_nack_error"]
            .as_str()
            .is_some_and(|error| error.contains("correlation-id"))
    })
    .await;
    assert_eq!(status_of(&format!("{}/echo/x", dps[2].proxy)).await, 200);
    // Without the plugin it catches up.
    let removed = client()
        .delete(format!(
            "{a}/plugins/{}",
            plugin["id"].as_str().expect("id")
        ))
        .send()
        .await
        .expect("delete plugin");
    assert_eq!(removed.status(), 204);
    eventually("the limited data plane catches up", || async {
        let planes = data_planes(&a).await;
        let first = plane(&planes, &node_id(&dps[0]))["config_hash"].clone();
        let third = plane(&planes, &limited);
        third["config_hash"] == first && third["last_nack_error"].is_null()
    })
    .await;

    // A data plane that misses a change while the control plane stays up
    // catches up by delta when it comes back.
    dps[1].terminate();
    post(
        format!("{a}/services/echo/routes"),
        json!({"paths": ["/while-away"]}),
    )
    .await;
    let returning = node_id(&dps[1]);
    dps[1] = Gatehouse::start_role(BIN, "dp", &prefixes[1], &dp_env);
    let away = format!("{}/while-away", dps[1].proxy);
    eventually("the returning data plane catches up", || async {
        status_of(&away).await == 200
    })
    .await;
    let planes = data_planes(&a).await;
    let back = plane(&planes, &returning);
    assert_eq!(back["snapshots_sent"], 0, "{back}\n{}", dps[1].log_text());
    assert_eq!(back["deltas_sent"], 1, "{back}");

    // One that misses more versions than the control plane's window of
    // deltas holds (64) catches up with a snapshot.
    dps[1].terminate();
    for i in 0..65 {
        post(
            format!("{a}/services/echo/routes"),
            json!({"paths": [format!("/far/{i}/")]}),
        )
        .await;
        // Served before the next write: each write is its own version
        // (a burst of writes would be published as one). Paths are
        // prefixes, so no path here may begin with another: with `/far-1`
        // in place, `/far-10` would answer before its own route is
        // published, and two writes could then share a version.
        let url = format!("{}/far/{i}/", dps[0].proxy);
        eventually("a data plane serves the change", || async {
            status_of(&url).await == 200
        })
        .await;
    }
    dps[1] = Gatehouse::start_role(BIN, "dp", &prefixes[1], &dp_env);
    let far = format!("{}/far/64/", dps[1].proxy);
    eventually("the far-behind data plane catches up", || async {
        status_of(&far).await == 200
    })
    .await;
    assert_eq!(status_of(&format!("{}/far/0/", dps[1].proxy)).await, 200);
    let planes = data_planes(&a).await;
    let back = plane(&planes, &returning);
    assert_eq!(back["snapshots_sent"], 1, "{back}\n{}", dps[1].log_text());
    assert_eq!(back["deltas_sent"], 0, "{back}");

    // The control plane dies while traffic flows: not one request fails.
    let probe = format!("{}/echo/x", dps[0].proxy);
    let traffic = tokio::spawn({
        let probe = probe.clone();
        async move {
            let mut failures = 0;
            for _ in 0..100 {
                if status_of(&probe).await != 200 {
                    failures += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            failures
        }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    cp.terminate();
    assert_eq!(traffic.await.expect("traffic task"), 0);
    // The control plane saved the data planes' status (in batches, and
    // once more as it stopped).
    let saved = pg.psql(
        "gh_e2e_cluster",
        "SELECT count(*) FROM data_planes WHERE body->>'config_hash' <> ''",
    );
    assert_eq!(saved.trim(), "3", "{saved}");

    // A data plane restarted while the control plane is down serves its
    // cache, with the same node id.
    let first_id = node_id(&dps[0]);
    dps[0].terminate();
    dps[0] = Gatehouse::start_role(BIN, "dp", &prefixes[0], &dp_env);
    assert_eq!(node_id(&dps[0]), first_id);
    let cached = format!("{}/while-away", dps[0].proxy);
    eventually("the cached configuration serves", || async {
        status_of(&cached).await == 200
    })
    .await;

    // The control plane comes back on the same port: every data plane
    // reconnects by itself; holding the current hash, none is sent
    // anything.
    let cp = Gatehouse::start_role(BIN, "cp", &cp_dir.path().join("cp"), &cp_env);
    eventually("the data planes reconnect", || async {
        let planes = data_planes(&cp.admin).await;
        planes.len() == 3 && planes.iter().all(|plane| plane["connected"] == true)
    })
    .await;
    for plane in data_planes(&cp.admin).await {
        assert_eq!(plane["snapshots_sent"], 0, "{plane}");
        assert_eq!(plane["deltas_sent"], 0, "{plane}");
    }

    // One declarative load of 200 services reaches every data plane as
    // one version: one delta each.
    let services: Vec<Value> = (0..200)
        .map(|i| {
            json!({"name": format!("bulk-{i}"), "url": format!("http://{}", up.addr),
                   "routes": [{"name": format!("bulk-{i}"), "paths": [format!("/bulk-{i}")]}]})
        })
        .collect();
    let file = json!({"_format_version": "3.0", "services": services});
    let loaded = client()
        .post(format!("{}/config", cp.admin))
        .json(&file)
        .send()
        .await
        .expect("post /config");
    assert_eq!(loaded.status(), 201);
    for dp in &dps {
        let last = format!("{}/bulk-199", dp.proxy);
        eventually("every data plane serves the loaded file", || async {
            status_of(&last).await == 200
        })
        .await;
        assert_eq!(status_of(&format!("{}/echo/x", dp.proxy)).await, 404);
    }
    let planes = data_planes(&cp.admin).await;
    let versions: Vec<&Value> = planes.iter().map(|p| &p["config_version"]).collect();
    for plane in &planes {
        assert_eq!(plane["deltas_sent"], 1, "{plane}");
        assert_eq!(plane["snapshots_sent"], 0, "{plane}");
        assert_eq!(&plane["config_version"], versions[0], "{planes:?}");
    }
    // A file that keeps one of them removes the other 199 services and
    // their routes (written to PostgreSQL in batches), as one more delta.
    let file = json!({"_format_version": "3.0", "services": [file["services"][0].clone()]});
    let loaded = client()
        .post(format!("{}/config", cp.admin))
        .json(&file)
        .send()
        .await
        .expect("post /config");
    assert_eq!(loaded.status(), 201);
    for dp in &dps {
        let gone = format!("{}/bulk-199", dp.proxy);
        eventually("the removed routes are gone", || async {
            status_of(&gone).await == 404
        })
        .await;
        assert_eq!(status_of(&format!("{}/bulk-0", dp.proxy)).await, 200);
    }
    let count = pg.psql("gh_e2e_cluster", "SELECT count(*) FROM entities");
    assert_eq!(
        count.trim(),
        "2",
        "one service and its route remain: {count}"
    );
    for plane in data_planes(&cp.admin).await {
        assert_eq!(plane["deltas_sent"], 2, "{plane}");
    }
    for dp in &mut dps {
        dp.terminate();
    }
}

/// Plugins configured on the control plane act on every data plane, and
/// rate-limiting's redis policy counts across data planes.
#[tokio::test]
async fn plugins_reach_every_data_plane_and_redis_limits_count_across_them() {
    let pg = Postgres::shared();
    let redis = gatehouse_test_support::Redis::start();
    let url = pg.fresh_database("gh_e2e_cluster_plugins");
    let cluster_listen = format!("127.0.0.1:{}", free_port());
    let certs = tempfile::tempdir().expect("temp dir");
    let (cert, key) = gen_cert(certs.path(), "cluster");
    let cp_dir = tempfile::tempdir().expect("temp dir");
    let cp = Gatehouse::start_role(
        BIN,
        "cp",
        &cp_dir.path().join("cp"),
        &[
            ("GATEHOUSE_DATABASE_URL", url.as_str()),
            ("GATEHOUSE_CLUSTER_LISTEN", cluster_listen.as_str()),
            ("GATEHOUSE_CLUSTER_CERT", cert.as_str()),
            ("GATEHOUSE_CLUSTER_CERT_KEY", key.as_str()),
        ],
    );
    let dp_env = [
        ("GATEHOUSE_CLUSTER_CONTROL_PLANE", cluster_listen.as_str()),
        ("GATEHOUSE_CLUSTER_CERT", cert.as_str()),
        ("GATEHOUSE_CLUSTER_CERT_KEY", key.as_str()),
    ];
    let dp_dirs: Vec<_> = (0..2).map(|_| tempfile::tempdir().expect("dir")).collect();
    let dps: Vec<Gatehouse> = dp_dirs
        .iter()
        .map(|d| Gatehouse::start_role(BIN, "dp", &d.path().join("dp"), &dp_env))
        .collect();

    let up = EchoUpstream::start();
    let a = cp.admin.clone();
    post(
        format!("{a}/services"),
        json!({"name": "echo", "url": format!("http://{}", up.addr)}),
    )
    .await;
    post(
        format!("{a}/services/echo/routes"),
        json!({"name": "limited", "paths": ["/limited"]}),
    )
    .await;
    post(format!("{a}/consumers"), json!({"username": "erin"})).await;
    post(
        format!("{a}/consumers/erin/key-auth"),
        json!({"key": "erin-key"}),
    )
    .await;
    post(
        format!("{a}/services/echo/plugins"),
        json!({"name": "key-auth"}),
    )
    .await;
    post(
        format!("{a}/routes/limited/plugins"),
        json!({"name": "rate-limiting", "config": {"hour": 4, "limit_by": "consumer",
               "policy": "redis", "redis": {"host": "127.0.0.1", "port": redis.port}}}),
    )
    .await;

    let get = |proxy: String, key: Option<&'static str>| async move {
        let mut request = client().get(format!("{proxy}/limited"));
        if let Some(key) = key {
            request = request.header("apikey", key);
        }
        let r = request.send().await.expect("proxy");
        let remaining = r
            .headers()
            .get("x-ratelimit-remaining-hour")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        (r.status().as_u16(), remaining)
    };
    // A route created last tells when a data plane has everything.
    post(
        format!("{a}/services"),
        json!({"name": "ready", "url": format!("http://{}", up.addr)}),
    )
    .await;
    post(
        format!("{a}/services/ready/routes"),
        json!({"paths": ["/ready"]}),
    )
    .await;
    for dp in &dps {
        let ready = format!("{}/ready", dp.proxy);
        eventually("the configuration on the data plane", || {
            let ready = ready.clone();
            async move { status_of(&ready).await == 200 }
        })
        .await;
        // key-auth is enforced by both data planes.
        assert_eq!(get(dp.proxy.clone(), None).await.0, 401);
    }
    // Four requests for the hour, spread over two data planes, then 429 on both.
    let mut seen = Vec::new();
    for i in 0..4 {
        let (status, remaining) = get(dps[i % 2].proxy.clone(), Some("erin-key")).await;
        assert_eq!(status, 200, "request {i}");
        seen.push(remaining.expect("remaining header"));
    }
    assert_eq!(seen, ["3", "2", "1", "0"], "one count for both data planes");
    for dp in &dps {
        assert_eq!(get(dp.proxy.clone(), Some("erin-key")).await.0, 429);
    }
    // The counter lives in Redis under Kong's key layout.
    let keys = redis.command("KEYS ratelimit:*");
    assert!(keys.contains(":hour"), "{keys}");

    // A key with a ttl works on every data plane until it runs out, then
    // on none (Kong's key-auth hybrid-mode spec).
    post(
        format!("{a}/services/echo/routes"),
        json!({"name": "open", "paths": ["/open"]}),
    )
    .await;
    post(format!("{a}/consumers"), json!({"username": "fay"})).await;
    let created = Instant::now();
    post(
        format!("{a}/consumers/fay/key-auth"),
        json!({"key": "fay-key", "ttl": 5}),
    )
    .await;
    let with_key = |proxy: String| async move {
        client()
            .get(format!("{proxy}/open"))
            .header("apikey", "fay-key")
            .send()
            .await
            .expect("proxy")
            .status()
            .as_u16()
    };
    // Within its 5 s (a data plane that got it late would never answer 200).
    for dp in &dps {
        eventually("the key with a ttl works", || async {
            with_key(dp.proxy.clone()).await == 200
        })
        .await;
    }
    // Data planes refuse it by themselves, without the control plane's
    // purge.
    drop(cp);
    for dp in &dps {
        eventually("the expired key is refused", || async {
            with_key(dp.proxy.clone()).await == 401
        })
        .await;
    }
    assert!(
        created.elapsed() >= Duration::from_secs(4),
        "refused too early"
    );
}
