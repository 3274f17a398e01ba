//! The status listener (Kong's `status_listen`): read-only node state for
//! probes and scrapers, apart from the Admin API. `/status` and
//! `/status/ready` for health checks, `/metrics` for the prometheus
//! plugin's counters in Prometheus' text format.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use gatehouse_data_plane::DataPlane;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::{parse_listen, Config};
use crate::standalone::bind;

/// Binds the status listeners (TLS ones are skipped with a warning).
pub(crate) async fn bind_status(cfg: &Config) -> anyhow::Result<Vec<TcpListener>> {
    let mut listeners = Vec::new();
    for l in parse_listen("status_listen", &cfg.status_listen)? {
        if l.ssl {
            warn!(addr = %l.addr, "TLS on the status listener is not supported yet; skipping it.");
            continue;
        }
        listeners.push(bind(l.addr, "status_listen").await?);
    }
    Ok(listeners)
}

/// `GET /metrics` for a router: the data plane's metrics.
pub(crate) async fn metrics(State(dp): State<Arc<DataPlane>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        dp.metrics(),
    )
}

async fn status(State(dp): State<Arc<DataPlane>>) -> impl IntoResponse {
    Json(json!({ "server": { "config_version": dp.version() } }))
}

/// Kong's `/status/ready`: 200 once a configuration is served.
async fn ready(State(dp): State<Arc<DataPlane>>) -> impl IntoResponse {
    if dp.version() > 0 {
        (StatusCode::OK, Json(json!({ "message": "ready" })))
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "message": "no configuration available (empty configuration present)" })),
        )
    }
}

/// Serves the status API on `listeners` until `shutdown`.
pub(crate) fn spawn_status(
    tasks: &mut tokio::task::JoinSet<()>,
    listeners: Vec<TcpListener>,
    dp: &Arc<DataPlane>,
    shutdown: &watch::Receiver<()>,
) -> anyhow::Result<()> {
    for listener in listeners {
        info!(addr = %listener.local_addr()?, "Status API listening.");
        let app = Router::new()
            .route("/status", get(status))
            .route("/status/ready", get(ready))
            .route("/metrics", get(metrics))
            .with_state(Arc::clone(dp));
        crate::standalone::spawn_router(tasks, listener, app, shutdown, "Status API");
    }
    Ok(())
}
