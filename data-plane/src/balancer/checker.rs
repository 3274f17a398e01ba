//! Active health checks: per upstream, one task probes its healthy
//! addresses every `healthy.interval` and one its unhealthy addresses every
//! `unhealthy.interval` (lua-resty-healthcheck's two timers), at most
//! `concurrency` probes at a time. A probe connects (a failure is a TCP
//! failure, running out of `timeout` a timeout); an `http` probe then sends
//! `GET http_path` with `Connection: close` and judges the status line, and
//! an `https` probe does the same after a TLS handshake. The
//! tasks read the ring the request path reads and never block it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, MissedTickBehavior};
use tracing::Instrument as _;

use super::health::{Active, ProbeKind, Report, State};
use super::ring::Address;
use super::{Shared, Tasks};

/// The checker tasks of an upstream, none when active checks are off.
pub(super) fn tasks(
    shared: &Arc<Shared>,
    owner: &Tasks,
    span: &tracing::Span,
) -> Vec<Pin<Box<dyn Future<Output = ()> + Send>>> {
    let Some(active) = &shared.checks.active else {
        return Vec::new();
    };
    let mut tasks: Vec<Pin<Box<dyn Future<Output = ()> + Send>>> = Vec::new();
    for (healthy, interval) in [
        (true, active.healthy_interval),
        (false, active.unhealthy_interval),
    ] {
        if let Some(interval) = interval {
            tasks.push(Box::pin(
                run(Arc::clone(shared), healthy, interval, owner.subscribe())
                    .instrument(span.clone()),
            ));
        }
    }
    tasks
}

/// Probes the addresses whose state matches `healthy` every `interval`
/// until `shutdown`. Cancel safe.
async fn run(
    shared: Arc<Shared>,
    healthy: bool,
    interval: Duration,
    mut shutdown: watch::Receiver<()>,
) {
    let Some(active) = shared.checks.active.as_ref() else {
        return;
    };
    let mut ticker = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
    ticker.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.changed() => return,
            _ = ticker.tick() => {}
        }
        let ring = shared.ring.load_full();
        let due: Vec<&Arc<Address>> = ring
            .addresses
            .iter()
            .filter(|address| {
                let state = address.health.state();
                address.weight > 0
                    && matches!(state, State::Healthy | State::MostlyHealthy) == healthy
            })
            .collect();
        for chunk in due.chunks(active.concurrency) {
            let probes = chunk
                .iter()
                .map(|address| probe(address.socket_addr(), active, &address.probe_host));
            let outcomes = tokio::select! {
                _ = shutdown.changed() => return,
                outcomes = futures_util::future::join_all(probes) => outcomes,
            };
            for (address, outcome) in chunk.iter().zip(outcomes) {
                let verdicts = &active.verdicts;
                let judged = match outcome {
                    Outcome::Connected => Some((Report::Success, verdicts.limit(Report::Success))),
                    Outcome::Status(status) => verdicts.for_status(status),
                    Outcome::Failed(report) => Some((report, verdicts.limit(report))),
                };
                if let Some((report, limit)) = judged {
                    shared.report(address, report, limit, "active");
                }
            }
        }
    }
}

/// What one probe saw.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Outcome {
    /// A TCP probe connected.
    Connected,
    /// An HTTP probe's status; 0 for an unparsable status line.
    Status(u16),
    Failed(Report),
}

pub(super) async fn probe(address: SocketAddr, active: &Active, host: &str) -> Outcome {
    let stream = match timeout(active.timeout, TcpStream::connect(address)).await {
        Err(_) => return Outcome::Failed(Report::Timeout),
        Ok(Err(_)) => return Outcome::Failed(Report::TcpFailure),
        Ok(Ok(stream)) => stream,
    };
    if active.kind == ProbeKind::Tcp {
        return Outcome::Connected;
    }
    let Some(tls) = &active.tls else {
        return http_probe(stream, active, host).await;
    };
    // lua-resty-healthcheck counts a failed handshake as a TCP failure.
    let Ok(tls) = tls else {
        return Outcome::Failed(Report::TcpFailure);
    };
    let name = tls.sni.as_deref().unwrap_or(host);
    let Ok(server_name) = rustls_pki_types::ServerName::try_from(name.to_owned()) else {
        return Outcome::Failed(Report::TcpFailure);
    };
    let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config));
    match timeout(active.timeout, connector.connect(server_name, stream)).await {
        Err(_) => Outcome::Failed(Report::Timeout),
        Ok(Err(_)) => Outcome::Failed(Report::TcpFailure),
        Ok(Ok(stream)) => http_probe(stream, active, host).await,
    }
}

/// `GET http_path` on a connected stream, judged by the status line.
async fn http_probe<S>(mut stream: S, active: &Active, host: &str) -> Outcome
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n{}\r\n",
        active.http_path, active.headers
    );
    match timeout(active.timeout, stream.write_all(request.as_bytes())).await {
        Err(_) => return Outcome::Failed(Report::Timeout),
        Ok(Err(_)) => return Outcome::Failed(Report::TcpFailure),
        Ok(Ok(())) => {}
    }
    let mut head = Vec::with_capacity(64);
    let mut buf = [0u8; 256];
    while !head.contains(&b'\n') && head.len() < 1024 {
        match timeout(active.timeout, stream.read(&mut buf)).await {
            Err(_) => return Outcome::Failed(Report::Timeout),
            Ok(Err(_)) => return Outcome::Failed(Report::TcpFailure),
            Ok(Ok(0)) if head.is_empty() => return Outcome::Failed(Report::TcpFailure),
            Ok(Ok(0)) => break,
            Ok(Ok(n)) => head.extend_from_slice(&buf[..n]),
        }
    }
    Outcome::Status(status_code(&head))
}

/// The status of `HTTP/x.y NNN …` (lua-resty-healthcheck's
/// `^HTTP/\d+\.\d+\s+(\d+)`); 0 when the line does not parse.
pub(super) fn status_code(head: &[u8]) -> u16 {
    let line = head.split(|byte| *byte == b'\n').next().unwrap_or(&[]);
    let Some(rest) = line
        .get(..5)
        .filter(|prefix| prefix.eq_ignore_ascii_case(b"HTTP/"))
        .map(|_| &line[5..])
    else {
        return 0;
    };
    let digits = |text: &[u8]| text.iter().take_while(|byte| byte.is_ascii_digit()).count();
    let major = digits(rest);
    if major == 0 || rest.get(major) != Some(&b'.') {
        return 0;
    }
    let rest = &rest[major + 1..];
    let minor = digits(rest);
    let rest = &rest[minor..];
    let spaces = rest
        .iter()
        .take_while(|byte| byte.is_ascii_whitespace())
        .count();
    if minor == 0 || spaces == 0 {
        return 0;
    }
    let rest = &rest[spaces..];
    let code = &rest[..digits(rest)];
    std::str::from_utf8(code)
        .ok()
        .and_then(|code| code.parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests;
