//! The PostgreSQL backend against a real throwaway cluster: entities,
//! change log and version move together in one transaction.

use gatehouse_test_support::{Gatehouse, Postgres};
use serde_json::json;

use crate::{client, BIN};

#[tokio::test]
async fn writes_entities_change_log_and_version_atomically() {
    let pg = Postgres::shared();
    let url = pg.fresh_database("gh_e2e_atomic");
    let mut g = Gatehouse::start(BIN, &[("GATEHOUSE_DATABASE_URL", &url)]);
    let a = &g.admin.clone();
    let c = client();

    let r = c
        .post(format!("{a}/services"))
        .json(&json!({"name": "pg-svc", "url": "http://127.0.0.1:9/x"}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 201);
    let r = c
        .post(format!("{a}/services/pg-svc/routes"))
        .json(&json!({"paths": ["/pg"]}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 201);
    // A unique violation must not bump the version or log anything.
    let r = c
        .post(format!("{a}/services"))
        .json(&json!({"name": "pg-svc", "host": "other.test"}))
        .send()
        .await
        .expect("post");
    assert_eq!(r.status(), 409);

    let db = "gh_e2e_atomic";
    assert_eq!(pg.psql(db, "SELECT count(*) FROM entities"), "2");
    assert_eq!(pg.psql(db, "SELECT version FROM config_version"), "2");
    assert_eq!(
        pg.psql(
            db,
            "SELECT string_agg(entity || ':' || op, ',' ORDER BY version) FROM change_log"
        ),
        "services:upsert,routes:upsert"
    );
    assert_eq!(
        pg.psql(
            db,
            "SELECT body->>'path' FROM entities WHERE entity = 'services'"
        ),
        "/x"
    );

    // Cascading deletes are one version too.
    let r = c
        .delete(format!(
            "{a}/routes/{}",
            pg.psql(db, "SELECT id FROM entities WHERE entity='routes'")
        ))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), 204);
    assert_eq!(pg.psql(db, "SELECT version FROM config_version"), "3");

    // A restarted process sees the same configuration.
    let prefix = g.prefix.clone();
    assert!(g.terminate().success());
    let g2 = Gatehouse::start_in(BIN, &prefix, &[("GATEHOUSE_DATABASE_URL", &url)]);
    let v: serde_json::Value = c
        .get(format!("{}/services/pg-svc", g2.admin))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(v["host"], "127.0.0.1");
    assert_eq!(v["port"], 9);
}
