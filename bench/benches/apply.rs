//! What a data plane spends on one configuration version at the size of
//! `bench/sync`'s default (30,000 entities: services, routes, a plugin per
//! route, consumers with key-auth credentials): applying a one-route delta
//! to the held snapshot (with its content hash), building and swapping the
//! runtime from the result, and a first build with nothing to reuse.
//! Inputs are made outside the timed closures.

use std::collections::BTreeMap;
use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion};
use gatehouse_data_plane::{DataPlane, ProxyConfig};
use gatehouse_model::snapshot::{ConfigSnapshot, SnapshotDelta};
use serde_json::{json, Value};

const ENTITIES: usize = 30_000;

fn id(kind: u32, i: usize) -> String {
    format!("{kind:08x}-0000-4000-8000-{i:012}")
}

fn service(i: usize) -> Value {
    json!({
        "id": id(1, i), "name": format!("s{i:06}"), "protocol": "http", "host": "127.0.0.1",
        "port": 9000, "path": null, "retries": 5, "connect_timeout": 60000,
        "read_timeout": 60000, "write_timeout": 60000, "enabled": true, "tags": null,
        "client_certificate": null, "tls_verify": null, "tls_verify_depth": null,
        "ca_certificates": null, "created_at": 1, "updated_at": 1,
    })
}

fn route(i: usize, path: &str) -> Value {
    json!({
        "id": id(2, i), "name": null, "protocols": ["http", "https"], "methods": null,
        "hosts": null, "paths": [path], "headers": null, "snis": null, "sources": null,
        "destinations": null, "https_redirect_status_code": 426, "regex_priority": 0,
        "strip_path": true, "preserve_host": false, "path_handling": "v0",
        "request_buffering": true, "response_buffering": true, "tags": null,
        "service": {"id": id(1, i % (ENTITIES / 6))}, "created_at": 1, "updated_at": 1,
    })
}

fn snapshot() -> ConfigSnapshot {
    let services = ENTITIES / 6;
    let consumers = ENTITIES / 4;
    let mut entities: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    entities.insert("services".into(), (0..services).map(service).collect());
    entities.insert(
        "routes".into(),
        (0..services)
            .map(|i| route(i, &format!("/r{i:06}")))
            .collect(),
    );
    entities.insert(
        "plugins".into(),
        (0..services)
            .map(|i| {
                json!({"id": id(3, i), "name": "correlation-id", "enabled": true,
                       "route": {"id": id(2, i)}, "service": null, "consumer": null,
                       "protocols": ["grpc", "grpcs", "http", "https"],
                       "config": {"header_name": "Kong-Request-ID", "generator": "uuid#counter",
                                  "echo_downstream": false}})
            })
            .collect(),
    );
    entities.insert(
        "consumers".into(),
        (0..consumers)
            .map(|i| json!({"id": id(4, i), "username": format!("c{i:06}"), "custom_id": null}))
            .collect(),
    );
    entities.insert(
        "keyauth_credentials".into(),
        (0..consumers)
            .map(|i| json!({"id": id(5, i), "key": format!("key-{i:06}"), "consumer": {"id": id(4, i)}}))
            .collect(),
    );
    ConfigSnapshot::from_values(1, entities)
}

fn apply(c: &mut Criterion) {
    let base = snapshot();
    base.hash();
    let mut delta = SnapshotDelta::default();
    delta.upserted.insert(
        "routes".into(),
        vec![route(ENTITIES, "/probe").to_string().into()],
    );
    let next = base.apply_delta(2, &delta);

    let mut group = c.benchmark_group("dp_apply_30k");
    group.sample_size(20);
    group.bench_function("delta_and_hash", |b| {
        b.iter(|| black_box(base.apply_delta(2, black_box(&delta)).hash()))
    });
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    let _guard = runtime.enter();
    let dp = DataPlane::new(ProxyConfig::default());
    dp.apply(&base).expect("applies");
    let mut flip = false;
    group.bench_function("runtime_build_and_swap", |b| {
        b.iter(|| {
            flip = !flip;
            dp.apply(if flip { &next } else { &base }).expect("applies")
        })
    });
    // A data plane's first build (or one after a snapshot): nothing to
    // reuse.
    group.bench_function("runtime_build_cold", |b| {
        b.iter_batched(
            || DataPlane::new(ProxyConfig::default()),
            |fresh| {
                fresh.apply(&next).expect("applies");
                // Dropped after the timing.
                fresh
            },
            criterion::BatchSize::LargeInput,
        )
    });
    group.finish();
}

criterion_group!(benches, apply);
criterion_main!(benches);
