//! `gatehouse cp` on a real PostgreSQL and `gatehouse dp` processes: the
//! data plane gets its configuration over the sync stream, serves it,
//! reports to `/clustering/data-planes`, keeps its node id and serves its
//! cached configuration when the control plane is down.

use std::time::{Duration, Instant};

use gatehouse_test_support::{free_port, EchoUpstream, Gatehouse, Postgres};
use serde_json::{json, Value};

use crate::{client, BIN};

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

async fn status_of(url: &str) -> u16 {
    match client().get(url).send().await {
        Ok(response) => response.status().as_u16(),
        Err(_) => 0,
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
    let dp_dir = tempfile::tempdir().expect("temp dir");
    let dp_prefix = dp_dir.path().join("dp");
    let dp_env = [
        ("GATEHOUSE_CLUSTER_CONTROL_PLANE", cluster_listen.as_str()),
        ("GATEHOUSE_CLUSTER_CERT", cert.as_str()),
        ("GATEHOUSE_CLUSTER_CERT_KEY", key.as_str()),
    ];
    let mut dp = Gatehouse::start_role(BIN, "dp", &dp_prefix, &dp_env);

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
    assert_eq!(status_of(&format!("{}/echo", dp.proxy)).await, 404);

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
    let proxied = format!("{}/echo/x", dp.proxy);
    eventually("the data plane serves the new route", || async {
        status_of(&proxied).await == 200
    })
    .await;

    // The control plane lists the data plane with the hash it serves.
    let planes: Value = client()
        .get(format!("{a}/clustering/data-planes"))
        .send()
        .await
        .expect("data planes")
        .json()
        .await
        .expect("json");
    let list = planes["data"].as_array().expect("data array");
    assert_eq!(list.len(), 1, "{planes}");
    let plane = &list[0];
    assert_eq!(plane["ip"], "127.0.0.1");
    assert_eq!(plane["sync_status"], "normal");
    assert_eq!(
        plane["config_hash"].as_str().map(str::len),
        Some(32),
        "{plane}"
    );
    let node_id = plane["id"].as_str().expect("id").to_owned();
    assert!(plane["last_propagation_ms"].is_number(), "{plane}");
    // The intruder got nothing, and is not listed.
    assert_eq!(status_of(&format!("{}/echo/x", intruder.proxy)).await, 404);
    assert!(intruder
        .log_text()
        .contains("Sync with the control plane failed"));

    // A change reaches the data plane without a restart.
    post(
        format!("{a}/services/echo/routes"),
        json!({"paths": ["/second"]}),
    )
    .await;
    let second = format!("{}/second", dp.proxy);
    eventually("the second route", || async {
        status_of(&second).await == 200
    })
    .await;

    // The control plane goes away: the data plane keeps serving, and a
    // restarted data plane serves from its cache, with the same node id.
    cp.terminate();
    assert_eq!(status_of(&second).await, 200);
    dp.terminate();
    let mut dp = Gatehouse::start_role(BIN, "dp", &dp_prefix, &dp_env);
    eventually("the cached configuration serves", || async {
        status_of(&format!("{}/second", dp.proxy)).await == 200
    })
    .await;

    // The control plane comes back on the same port: the data plane
    // reconnects by itself and reports the same node id.
    let cp = Gatehouse::start_role(BIN, "cp", &cp_dir.path().join("cp"), &cp_env);
    let listed = format!("{}/clustering/data-planes", cp.admin);
    eventually("the data plane reconnects", || async {
        let Ok(response) = client().get(&listed).send().await else {
            return false;
        };
        let body: Value = response.json().await.unwrap_or_default();
        body["data"][0]["id"] == node_id.as_str()
    })
    .await;
    // It already holds the control plane's configuration (same hash from
    // its cache): nothing is sent again.
    let body: Value = client()
        .get(&listed)
        .send()
        .await
        .expect("data planes")
        .json()
        .await
        .expect("json");
    assert_eq!(body["data"][0]["snapshots_sent"], 0, "{body}");
    assert_eq!(body["data"][0]["deltas_sent"], 0, "{body}");
    dp.terminate();
}
