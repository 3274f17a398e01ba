use gatehouse_model::snapshot::Healthchecks;

use super::*;

/// Runs `ops` on a fresh (healthy) address and compares the state after
/// each one. An op is a report letter and its limit (`s` success, `h` HTTP
/// failure, `t` TCP failure, `o` timeout), or `+`/`-` to force healthy or
/// unhealthy.
fn check(ops: &str, expect: &str) {
    let health = AddressHealth::default();
    let mut states = Vec::new();
    for op in ops.split_whitespace() {
        match op {
            "+" => {
                health.set(true);
            }
            "-" => {
                health.set(false);
            }
            _ => {
                let (kind, limit) = op.split_at(1);
                let report = match kind {
                    "s" => Report::Success,
                    "h" => Report::HttpFailure,
                    "t" => Report::TcpFailure,
                    "o" => Report::Timeout,
                    other => panic!("unknown op {other}"),
                };
                let before = health.state();
                let changed = health.report(report, limit.parse().expect("limit"));
                assert_eq!(
                    changed.is_some(),
                    health.state() != before,
                    "report returns the change in {ops:?}"
                );
            }
        }
        states.push(health.state().as_str());
    }
    assert_eq!(states.join(" "), expect, "ops: {ops:?}");
}

#[test]
fn counters_move_between_states() {
    let cases = [
        // Limit 0 disables a counter.
        ("h0 t0 o0", "healthy healthy healthy"),
        ("h3 h3 h3", "mostly_healthy mostly_healthy unhealthy"),
        ("t1", "unhealthy"),
        ("o2 o2", "mostly_healthy unhealthy"),
        // Each failure kind has its own counter.
        ("h2 t2 o2", "mostly_healthy mostly_healthy mostly_healthy"),
        // A success clears the failure counters: the second HTTP failure
        // starts counting again.
        (
            "h2 s2 h2 s2 s2",
            "mostly_healthy mostly_healthy mostly_healthy mostly_healthy healthy",
        ),
        ("h2 s1 h2", "mostly_healthy healthy mostly_healthy"),
        // Successes on a healthy address are not counted; failures on an
        // unhealthy one neither.
        (
            "s1 s1 t1 t1 s2 s2",
            "healthy healthy unhealthy unhealthy mostly_unhealthy healthy",
        ),
        // A failure clears the success counter.
        (
            "t1 s3 s3 t9 s3",
            "unhealthy mostly_unhealthy mostly_unhealthy mostly_unhealthy mostly_unhealthy",
        ),
        // Forcing clears the counters.
        (
            "h2 - s2 +",
            "mostly_healthy unhealthy mostly_unhealthy healthy",
        ),
        ("h2 + h2", "mostly_healthy healthy mostly_healthy"),
    ];
    for (ops, expect) in cases {
        check(ops, expect);
    }
}

#[test]
fn availability_follows_kong_events() {
    for (state, available) in [
        (State::Healthy, true),
        (State::MostlyHealthy, true),
        (State::MostlyUnhealthy, false),
        (State::Unhealthy, false),
    ] {
        assert_eq!(state.is_available(), available, "{state:?}");
    }
}

#[test]
fn checks_from_kong_defaults() {
    let checks = Checks::new(&Healthchecks::default());
    assert!(!checks.enabled, "Kong's defaults run no checks");
    assert!(checks.active.is_none());
    assert_eq!(
        checks.passive.for_status(500),
        Some((Report::HttpFailure, 0))
    );
    assert_eq!(checks.passive.for_status(200), Some((Report::Success, 0)));
    assert_eq!(checks.passive.for_status(404), None);
    assert_eq!(checks.passive.for_status(0), Some((Report::HttpFailure, 0)));

    let mut config = Healthchecks::default();
    config.passive.unhealthy.tcp_failures = 1;
    assert!(Checks::new(&config).enabled);
    config.active.unhealthy.interval = 0.5;
    config.active.headers =
        Some([("x-probe".to_owned(), vec!["a".to_owned(), "b".to_owned()])].into());
    let checks = Checks::new(&config);
    let active = checks.active.expect("active checks");
    assert_eq!(active.unhealthy_interval, Some(Duration::from_millis(500)));
    assert_eq!(active.healthy_interval, None);
    assert_eq!(&*active.headers, "x-probe: a\r\nx-probe: b\r\n");
    assert_eq!(active.verdicts.for_status(302), Some((Report::Success, 0)));
    assert_eq!(
        active.verdicts.for_status(404),
        Some((Report::HttpFailure, 0))
    );
}

#[test]
fn latency_decays_towards_idle() {
    let health = AddressHealth::default();
    assert!(!health.has_latency());
    health.record_latency(Duration::from_millis(100), 1);
    // The first sample after a long idle period counts fully.
    assert!((health.latency_score(1) - 100.0).abs() < 1e-6);
    // Ten seconds later the score has decayed by 1/e.
    let later = health.latency_score(10_000_001);
    assert!(
        (later - 100.0 / std::f64::consts::E).abs() < 1e-3,
        "{later}"
    );
}
