//! Log plugins (`http-log`, `file-log`, `tcp-log`, `udp-log`): each configured
//! instance owns a background task fed through a bounded queue, so a slow
//! or unreachable log sink never holds a request. The queue is dropped
//! with the instance when a new configuration replaces it; the task then
//! sends what it still holds and ends.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;

use super::{typed, BuildContext, Ctx, Flow, Needs, Plugin, PluginRequest};

/// The sending side of a log task.
struct Queue {
    sender: mpsc::Sender<Bytes>,
    what: &'static str,
}

impl Queue {
    /// Starts `task` on the current runtime with a queue of `capacity`
    /// entries.
    fn start<F, Fut>(what: &'static str, capacity: usize, task: F) -> Result<Queue, String>
    where
        F: FnOnce(mpsc::Receiver<Bytes>) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|_| format!("{what} needs the proxy's runtime"))?;
        let (sender, receiver) = mpsc::channel(capacity.max(1));
        handle.spawn(task(receiver));
        Ok(Queue { sender, what })
    }

    fn push(&self, entry: &serde_json::Value) {
        let mut line = serde_json::to_vec(entry).unwrap_or_default();
        line.push(b'\n');
        if self.sender.try_send(Bytes::from(line)).is_err() {
            tracing::warn!(
                plugin = self.what,
                "Log queue is full; an entry was dropped."
            );
        }
    }
}

/// A log plugin as the chain sees it: it only hands entries to its queue.
/// The plugin types below build one each.
pub(crate) struct LogPlugin {
    queue: Queue,
}

impl Plugin for LogPlugin {
    fn filters_response(&self) -> bool {
        false
    }

    fn needs(&self) -> Needs {
        Needs {
            log: true,
            ..Needs::default()
        }
    }

    fn access(&self, _req: &mut PluginRequest<'_>, _ctx: &mut Ctx<'_>) -> Flow {
        Flow::Continue
    }

    fn log(&self, entry: &serde_json::Value) {
        self.queue.push(entry);
    }
}

// ---------------------------------------------------------------------------
// http-log

#[derive(Deserialize)]
struct QueueConfig {
    max_batch_size: usize,
    max_coalescing_delay: f64,
    max_entries: usize,
}

#[derive(Deserialize)]
struct HttpLogConfig {
    http_endpoint: String,
    method: String,
    content_type: String,
    timeout: f64,
    #[serde(default)]
    headers: Option<std::collections::BTreeMap<String, String>>,
    queue: QueueConfig,
}

/// `http-log` (`kong/plugins/http-log/handler.lua`): entries are sent
/// alone when `queue.max_batch_size` is 1, else as JSON arrays of up to
/// that many, after at most `max_coalescing_delay` seconds.
pub(crate) struct HttpLog;

struct HttpSink {
    uri: Uri,
    method: Method,
    headers: Vec<(HeaderName, HeaderValue)>,
    timeout: Duration,
    batch: usize,
    delay: Duration,
}

impl HttpLog {
    pub(crate) fn plugin(
        config: &serde_json::Value,
        _cx: &BuildContext<'_>,
    ) -> Result<LogPlugin, String> {
        let config: HttpLogConfig = typed(config)?;
        let mut endpoint: Uri = config
            .http_endpoint
            .parse()
            .map_err(|e| format!("invalid http_endpoint: {e}"))?;
        let mut headers = vec![(
            http::header::CONTENT_TYPE,
            HeaderValue::from_str(&config.content_type).map_err(|e| e.to_string())?,
        )];
        // User info in the endpoint becomes Basic credentials.
        if let Some(authority) = endpoint.authority().cloned() {
            if let Some((userinfo, host)) = authority.as_str().rsplit_once('@') {
                use base64::Engine as _;
                let token = base64::engine::general_purpose::STANDARD
                    .encode(percent_encoding::percent_decode_str(userinfo).collect::<Vec<u8>>());
                headers.push((
                    http::header::AUTHORIZATION,
                    HeaderValue::from_str(&format!("Basic {token}")).map_err(|e| e.to_string())?,
                ));
                let mut parts = endpoint.into_parts();
                parts.authority = Some(host.parse().map_err(|e| format!("invalid host: {e}"))?);
                endpoint = Uri::from_parts(parts).map_err(|e| e.to_string())?;
            }
        }
        for (name, value) in config.headers.iter().flatten() {
            let name = HeaderName::from_bytes(name.as_bytes()).map_err(|e| e.to_string())?;
            if !headers.iter().any(|(n, _)| *n == name) {
                headers.push((
                    name,
                    HeaderValue::from_str(value).map_err(|e| e.to_string())?,
                ));
            }
        }
        let sink = HttpSink {
            uri: endpoint,
            method: Method::from_bytes(config.method.as_bytes()).map_err(|e| e.to_string())?,
            headers,
            timeout: Duration::from_millis(config.timeout.max(1.0) as u64),
            batch: config.queue.max_batch_size.max(1),
            delay: Duration::from_secs_f64(config.queue.max_coalescing_delay.max(0.0)),
        };
        let queue = Queue::start("http-log", config.queue.max_entries, move |receiver| {
            sink.run(receiver)
        })?;
        Ok(LogPlugin { queue })
    }
}

impl HttpSink {
    async fn run(self, mut receiver: mpsc::Receiver<Bytes>) {
        let tls = match crate::https_client_config(true) {
            Ok(tls) => tls,
            Err(error) => {
                tracing::error!(%error, "http-log cannot build its TLS client; entries are dropped.");
                return;
            }
        };
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
        while let Some(first) = receiver.recv().await {
            let mut entries = vec![first];
            if self.batch > 1 {
                let deadline = tokio::time::Instant::now() + self.delay;
                while entries.len() < self.batch {
                    match tokio::time::timeout_at(deadline, receiver.recv()).await {
                        Ok(Some(entry)) => entries.push(entry),
                        _ => break,
                    }
                }
            }
            let body = self.body(&entries);
            let mut request = Request::new(Full::new(body));
            *request.method_mut() = self.method.clone();
            *request.uri_mut() = self.uri.clone();
            for (name, value) in &self.headers {
                request.headers_mut().insert(name.clone(), value.clone());
            }
            match tokio::time::timeout(self.timeout, client.request(request)).await {
                Ok(Ok(response)) => {
                    let status = response.status();
                    let _ = response.into_body().collect().await;
                    if !status.is_success() {
                        tracing::warn!(%status, endpoint = %self.uri, "http-log endpoint refused entries.");
                    }
                }
                Ok(Err(error)) => {
                    tracing::warn!(%error, endpoint = %self.uri, "http-log could not send entries.");
                }
                Err(_) => tracing::warn!(endpoint = %self.uri, "http-log endpoint timed out."),
            }
        }
    }

    /// One entry alone, or a JSON array of them.
    fn body(&self, entries: &[Bytes]) -> Bytes {
        let trim = |entry: &Bytes| entry.slice(..entry.len().saturating_sub(1));
        if self.batch == 1 {
            return trim(&entries[0]);
        }
        let mut out = Vec::with_capacity(entries.iter().map(Bytes::len).sum::<usize>() + 2);
        out.push(b'[');
        for (i, entry) in entries.iter().enumerate() {
            if i > 0 {
                out.push(b',');
            }
            out.extend_from_slice(&trim(entry));
        }
        out.push(b']');
        out.into()
    }
}

// ---------------------------------------------------------------------------
// file-log

#[derive(Deserialize)]
struct FileLogConfig {
    path: String,
    reopen: bool,
}

/// `file-log` (`kong/plugins/file-log/handler.lua`): one JSON document per
/// line, appended.
pub(crate) struct FileLog;

impl FileLog {
    pub(crate) fn plugin(
        config: &serde_json::Value,
        _cx: &BuildContext<'_>,
    ) -> Result<LogPlugin, String> {
        let config: FileLogConfig = typed(config)?;
        let queue = Queue::start(
            "file-log",
            10_000,
            move |mut receiver: mpsc::Receiver<Bytes>| async move {
                let open = || {
                    let path = config.path.clone();
                    async move {
                        tokio::fs::OpenOptions::new()
                            .create(true)
                            .append(true)
                            .open(path)
                            .await
                    }
                };
                let mut file = None;
                while let Some(line) = receiver.recv().await {
                    if file.is_none() || config.reopen {
                        match open().await {
                            Ok(f) => file = Some(f),
                            Err(error) => {
                                tracing::error!(%error, path = %config.path, "file-log cannot open its file.");
                                continue;
                            }
                        }
                    }
                    if let Some(f) = file.as_mut() {
                        if let Err(error) = f.write_all(&line).await {
                            tracing::error!(%error, path = %config.path, "file-log cannot write.");
                            file = None;
                        }
                    }
                }
            },
        )?;
        Ok(LogPlugin { queue })
    }
}

// ---------------------------------------------------------------------------
// tcp-log

#[derive(Deserialize)]
struct TcpLogConfig {
    host: String,
    port: u16,
    timeout: f64,
    tls: bool,
    tls_sni: Option<String>,
}

/// `tcp-log` (`kong/plugins/tcp-log/handler.lua`): each entry as a JSON
/// line on a kept-alive connection, over TLS when `tls` is set.
pub(crate) struct TcpLog;

type LogStream = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;

impl TcpLog {
    pub(crate) fn plugin(
        config: &serde_json::Value,
        _cx: &BuildContext<'_>,
    ) -> Result<LogPlugin, String> {
        let config: TcpLogConfig = typed(config)?;
        let timeout = Duration::from_millis(config.timeout.max(1.0) as u64);
        let queue = Queue::start(
            "tcp-log",
            10_000,
            move |mut receiver: mpsc::Receiver<Bytes>| async move {
                let mut stream: Option<LogStream> = None;
                while let Some(line) = receiver.recv().await {
                    // A failed write gets one new connection.
                    for _ in 0..2 {
                        if stream.is_none() {
                            match tokio::time::timeout(timeout, connect(&config)).await {
                                Ok(Ok(s)) => stream = Some(s),
                                Ok(Err(error)) => {
                                    tracing::warn!(%error, host = %config.host, port = config.port, "tcp-log cannot connect.");
                                    break;
                                }
                                Err(_) => {
                                    tracing::warn!(host = %config.host, port = config.port, "tcp-log connect timed out.");
                                    break;
                                }
                            }
                        }
                        let Some(s) = stream.as_mut() else { break };
                        match tokio::time::timeout(timeout, async {
                            s.write_all(&line).await?;
                            s.flush().await
                        })
                        .await
                        {
                            Ok(Ok(())) => break,
                            _ => stream = None,
                        }
                    }
                }
            },
        )?;
        Ok(LogPlugin { queue })
    }
}

async fn connect(config: &TcpLogConfig) -> std::io::Result<LogStream> {
    let tcp = tokio::net::TcpStream::connect((config.host.as_str(), config.port)).await?;
    tcp.set_nodelay(true)?;
    if !config.tls {
        return Ok(Box::new(tcp));
    }
    // Kong's tcp-log does not verify the collector's certificate.
    let tls = crate::https_client_config(false).map_err(std::io::Error::other)?;
    let name = config
        .tls_sni
        .clone()
        .unwrap_or_else(|| config.host.clone());
    let name = rustls_pki_types::ServerName::try_from(name).map_err(std::io::Error::other)?;
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(name, tcp)
        .await?;
    Ok(Box::new(stream))
}

// ---------------------------------------------------------------------------
// udp-log

#[derive(Deserialize)]
struct UdpLogConfig {
    host: String,
    port: u16,
}

/// `udp-log` (`kong/plugins/udp-log/handler.lua`): each entry as one
/// datagram of JSON.
pub(crate) struct UdpLog;

impl UdpLog {
    pub(crate) fn plugin(
        config: &serde_json::Value,
        _cx: &BuildContext<'_>,
    ) -> Result<LogPlugin, String> {
        let config: UdpLogConfig = typed(config)?;
        let queue = Queue::start(
            "udp-log",
            10_000,
            move |mut receiver: mpsc::Receiver<Bytes>| async move {
                let socket = match tokio::net::UdpSocket::bind(("0.0.0.0", 0)).await {
                    Ok(socket) => socket,
                    Err(error) => {
                        tracing::error!(%error, "udp-log cannot open a socket; entries are dropped.");
                        return;
                    }
                };
                while let Some(line) = receiver.recv().await {
                    // Kong sends the JSON document alone, without a newline.
                    let datagram = line.slice(..line.len().saturating_sub(1));
                    if let Err(error) = socket
                        .send_to(&datagram, (config.host.as_str(), config.port))
                        .await
                    {
                        tracing::warn!(%error, host = %config.host, port = config.port, "udp-log could not send.");
                    }
                }
            },
        )?;
        Ok(LogPlugin { queue })
    }
}
