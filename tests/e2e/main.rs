//! End-to-end tests: real `gatehouse` processes, real sockets, real
//! PostgreSQL. One binary with modules, so processes and the database
//! cluster are shared setup rather than per-file copies.

mod abuse;
mod admin;
mod balancer;
mod cluster;
mod declarative;
mod grpc;
mod otel;
mod plugins;
mod plugins_auth;
mod plugins_transform;
mod postgres;
mod process;
mod proxy;
mod tls;

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_gatehouse");

pub(crate) fn client() -> reqwest::Client {
    // reqwest's TLS names no crypto provider: the process-wide default is
    // ring, as everywhere in Gatehouse. A second install is refused, which
    // is fine.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .timeout(std::time::Duration::from_secs(20))
        .build()
        .expect("http client")
}

/// `GET url` as JSON, whatever the status.
pub(crate) async fn get_json(url: String) -> serde_json::Value {
    client()
        .get(url)
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json")
}

/// The status of `GET url`; 0 when nothing answers.
pub(crate) async fn status_of(url: &str) -> u16 {
    match client().get(url).send().await {
        Ok(response) => response.status().as_u16(),
        Err(_) => 0,
    }
}
