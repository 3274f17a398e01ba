use std::time::{Duration, Instant};

use super::*;

/// Resolves `name` with the system resolver and compares the answer as
/// `KIND ip…`, or `error` for a name that does not resolve. Only names the
/// hosts file or the resolver itself answers, so no network is needed.
async fn check(name: &str, expect: &str) {
    let dns = Dns::from_system();
    let got = match dns.resolve(name).await {
        Ok(answer) => {
            let mut text = answer.kind.as_str().to_owned();
            for record in &answer.records {
                text.push(' ');
                text.push_str(&record.ip.to_string());
            }
            text
        }
        Err(_) => "error".to_owned(),
    };
    assert_eq!(got, expect, "{name}");
}

#[tokio::test]
async fn resolves_without_network() {
    for (name, expect) in [
        ("localhost", "A 127.0.0.1"),
        ("127.0.0.1", "A 127.0.0.1"),
        ("::1", "AAAA ::1"),
        ("nothing.invalid", "error"),
    ] {
        check(name, expect).await;
    }
}

#[test]
fn refresh_waits_for_the_ttl_but_at_least_a_second() {
    let now = Instant::now();
    assert_eq!(
        next_refresh(now + Duration::from_secs(60), now),
        now + Duration::from_secs(60)
    );
    assert_eq!(next_refresh(now, now), now + MIN_REFRESH);
}
