use std::collections::BTreeMap;
use std::time::Duration;

use super::*;

/// Builds a ring of `addresses` (`name:weight`, then optional `+n` for n
/// requests in flight, `@ms` for a recorded latency, `!` for unhealthy),
/// picks `picks` times and compares the counts per name with `expect`
/// (`name=count`, or `name~count` for ±15%). Least-connections picks hold
/// their connection, as concurrent requests do.
fn check(algorithm: Algorithm, addresses: &str, picks: u32, expect: &str) {
    let ring = ring(algorithm, addresses);
    let mut counts: BTreeMap<String, u32> = BTreeMap::new();
    for i in 0..picks {
        let point = xxh32(format!("client-{i}").as_bytes());
        if let Some(address) = ring.pick(point) {
            if algorithm == Algorithm::LeastConnections {
                address.health.in_flight.fetch_add(1, Ordering::Relaxed);
            }
            *counts.entry(name(address)).or_default() += 1;
        }
    }
    for part in expect.split_whitespace() {
        let (name, want, exact) = match part.split_once('=') {
            Some((name, want)) => (name, want, true),
            None => {
                let (name, want) = part.split_once('~').expect("name=n or name~n");
                (name, want, false)
            }
        };
        let want: u32 = want.parse().expect("count");
        let got = counts.get(name).copied().unwrap_or(0);
        if exact {
            assert_eq!(
                got, want,
                "{name} in {addresses} with {algorithm:?}: {counts:?}"
            );
        } else {
            let slack = want * 15 / 100;
            assert!(
                got.abs_diff(want) <= slack,
                "{name} got {got}, want {want}±{slack} in {addresses} with {algorithm:?}: {counts:?}"
            );
        }
    }
}

fn ring(algorithm: Algorithm, spec: &str) -> Ring {
    let mut addresses = Vec::new();
    let mut targets = Vec::new();
    for (idx, item) in spec.split_whitespace().enumerate() {
        let (name, rest) = item.split_once(':').expect("name:weight");
        let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
        let mut rest = &rest[digits.len()..];
        let health = Arc::new(AddressHealth::default());
        while let Some(first) = rest.chars().next() {
            let number: String = rest[1..].chars().take_while(char::is_ascii_digit).collect();
            match first {
                '+' => {
                    health
                        .in_flight
                        .store(number.parse().expect("n"), Ordering::Relaxed);
                }
                '@' => health.record_latency(
                    Duration::from_millis(number.parse().expect("ms")),
                    now_micros(),
                ),
                '!' => {
                    health.set(false);
                }
                other => panic!("unknown marker {other}"),
            }
            rest = &rest[1 + number.len()..];
        }
        // Addresses follow names, so the same names in another order make
        // the same address set.
        let n = name.as_bytes()[0] - b'a';
        let port = 8000 + u16::from(n);
        let ip = IpAddr::from([10, 0, 0, n + 1]);
        targets.push((name, port));
        addresses.push(Arc::new(Address {
            ip,
            port,
            weight: digits.parse().expect("weight"),
            target_idx: idx,
            authority: Authority::try_from(format!("{ip}:{port}")).expect("authority"),
            host_headers: [
                HeaderValue::try_from(name).expect("host"),
                HeaderValue::try_from(name).expect("host"),
            ],
            probe_host: name.into(),
            health,
        }));
    }
    Ring::build(algorithm, addresses, &targets)
}

fn name(address: &Address) -> String {
    address.host_headers[0].to_str().expect("ascii").to_owned()
}

const CH: Algorithm = Algorithm::ConsistentHashing { points: 10000 };

#[test]
fn distributions() {
    let cases: Vec<(Algorithm, &str, u32, &str)> = vec![
        // Round-robin: exact shares over whole cycles; weight 0 and
        // unhealthy addresses take nothing.
        (Algorithm::RoundRobin, "a:100 b:100", 10, "a=5 b=5"),
        (
            Algorithm::RoundRobin,
            "a:300 b:100 c:0",
            40,
            "a=30 b=10 c=0",
        ),
        (Algorithm::RoundRobin, "a:5 b:1 c:1", 70, "a=50 b=10 c=10"),
        (
            Algorithm::RoundRobin,
            "a:100 b:100! c:100",
            30,
            "a=15 b=0 c=15",
        ),
        (Algorithm::RoundRobin, "a:100! b:100!", 10, "a=0 b=0"),
        (Algorithm::RoundRobin, "a:0 b:0", 10, "a=0 b=0"),
        (
            Algorithm::RoundRobin,
            "a:65535 b:65534 c:1",
            131070,
            "a~65535 b~65534 c~1",
        ),
        // Consistent hashing spreads clients by weight.
        (CH, "a:100 b:100", 4000, "a~2000 b~2000"),
        (CH, "a:300 b:100", 4000, "a~3000 b~1000"),
        (CH, "a:100 b:100! c:100", 3000, "a~1500 b=0 c~1500"),
        (CH, "a:100 b:0", 100, "a=100 b=0"),
        (CH, "a:100!", 10, "a=0"),
        // Least-connections: shares follow weights as connections pile up,
        // and idle addresses are preferred.
        (Algorithm::LeastConnections, "a:100 b:100", 10, "a=5 b=5"),
        (Algorithm::LeastConnections, "a:200 b:100", 30, "a=20 b=10"),
        (Algorithm::LeastConnections, "a:100+5 b:100", 5, "a=0 b=5"),
        (
            Algorithm::LeastConnections,
            "a:100+5 b:100 c:100+2",
            2,
            "a=0 b=2 c=0",
        ),
        (Algorithm::LeastConnections, "a:100 b:100!", 5, "a=5 b=0"),
        // Latency: the fastest address wins while others stay slower.
        (
            Algorithm::Latency,
            "a:100@50 b:100@5 c:100@20",
            10,
            "a=0 b=10 c=0",
        ),
        // Weights divide the score: 20 ms at weight 100 beats 5 ms at 10.
        (Algorithm::Latency, "a:10@5 b:100@20", 10, "a=0 b=10"),
        (Algorithm::Latency, "a:100@50 b:100@5!", 10, "a=10 b=0"),
    ];
    for (algorithm, addresses, picks, expect) in cases {
        check(algorithm, addresses, picks, expect);
    }
}

#[test]
fn round_robin_interleaves() {
    let ring = ring(Algorithm::RoundRobin, "a:3 b:1");
    let sequence: String = (0..8)
        .map(|_| name(ring.pick(0).expect("a peer")))
        .collect();
    // Whatever the starting point, b comes once in every four picks and
    // never twice in a row.
    assert_eq!(sequence.matches('b').count(), 2, "{sequence}");
    assert!(!sequence.contains("bb"), "{sequence}");
    let ring = ring_of("a:1 b:1");
    let first = name(ring.pick(0).expect("a peer"));
    let second = name(ring.pick(0).expect("a peer"));
    assert_ne!(first, second);
}

fn ring_of(spec: &str) -> Ring {
    ring(Algorithm::RoundRobin, spec)
}

#[test]
fn consistent_hashing_is_sticky_and_stable() {
    let points: Vec<u32> = (0..500)
        .map(|i| xxh32(format!("user-{i}").as_bytes()))
        .collect();
    let picks = |ring: &Ring| -> Vec<String> {
        points
            .iter()
            .map(|point| ring.pick(*point).map(|a| name(a)).unwrap_or_default())
            .collect()
    };
    let first = ring(CH, "a:100 b:100 c:100");
    assert_eq!(picks(&first), picks(&first), "sticky");
    // The same target set builds the same ring, whatever the input order.
    assert_eq!(
        picks(&first),
        picks(&ring(CH, "c:100 a:100 b:100")),
        "stable"
    );

    // Taking b out moves only b's clients; bringing it back restores all.
    let before = picks(&first);
    first.addresses[1].health.set(false);
    let during = picks(&first);
    for (b, d) in before.iter().zip(&during) {
        if b != "b" {
            assert_eq!(b, d, "clients of healthy targets stay");
        } else {
            assert_ne!(d, "b");
        }
    }
    first.addresses[1].health.set(true);
    assert_eq!(before, picks(&first));
}

#[test]
fn continuum_size_follows_slots() {
    for (slots, expect) in [
        (10, 1000),
        (999, 1000),
        (1000, 1000),
        (10000, 10000),
        (65536, 65536),
    ] {
        assert_eq!(
            Algorithm::new("consistent-hashing", slots),
            Algorithm::ConsistentHashing { points: expect }
        );
    }
    assert_eq!(Algorithm::new("round-robin", 10), Algorithm::RoundRobin);
}
