//! Router match and build time at 1k, 10k and 100k routes, for plain
//! prefixes only and for a mix with one regex route in ten. Requests and
//! route sets are made outside the timed closures.

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use gatehouse_bench::Routes;
use gatehouse_router::{normalize_path, RequestView, Router};
use http::{HeaderMap, Method};
use std::hint::black_box;

const SIZES: [usize; 3] = [1_000, 10_000, 100_000];

/// `(name, one regex route in how many)`.
const MIXES: [(&str, Option<usize>); 2] = [("plain", None), ("regex10", Some(10))];

fn matching(c: &mut Criterion) {
    let mut group = c.benchmark_group("router_match");
    group.throughput(Throughput::Elements(1));
    let headers = HeaderMap::new();
    for (mix, regex_every) in MIXES {
        for n_routes in SIZES {
            let routes = Routes::generate(n_routes, regex_every);
            let router = Router::build(routes.specs().into_iter().enumerate());
            // A route in the middle, and a regex route for the mix.
            let hit_idx = match regex_every {
                Some(every) => n_routes / 2 / every * every + every - 1,
                None => n_routes / 2,
            };
            let hit_path = normalize_path(&routes.hit_path(hit_idx)).into_owned();
            let miss_path = normalize_path("/nowhere/to/be/found").into_owned();
            for (case, path) in [("hit", &hit_path), ("miss", &miss_path)] {
                let request = RequestView {
                    method: &Method::GET,
                    host: Some(b"api.example.com"),
                    port: 8000,
                    path,
                    headers: &headers,
                    https: false,
                    sni: None,
                };
                let expected = (case == "hit").then_some(hit_idx);
                assert_eq!(
                    router.find(&request).map(|found| found.route_idx),
                    expected,
                    "{mix} {case} at {n_routes} routes"
                );
                group.bench_with_input(
                    BenchmarkId::new(format!("{mix}/{case}"), n_routes),
                    &request,
                    |b, request| b.iter(|| router.find(black_box(request))),
                );
            }
        }
    }
    group.finish();
}

fn building(c: &mut Criterion) {
    let mut group = c.benchmark_group("router_build");
    group.sample_size(10);
    for (mix, regex_every) in MIXES {
        for n_routes in SIZES {
            let routes = Routes::generate(n_routes, regex_every);
            let specs = routes.specs();
            group.throughput(Throughput::Elements(n_routes as u64));
            group.bench_with_input(BenchmarkId::new(mix, n_routes), &specs, |b, specs| {
                b.iter(|| Router::build(specs.iter().cloned().enumerate()))
            });
        }
    }
    group.finish();
}

criterion_group!(benches, matching, building);
criterion_main!(benches);
