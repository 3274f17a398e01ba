//! `prometheus` (`kong/plugins/prometheus/exporter.lua`): Kong's metric
//! names and labels, kept in one registry per data plane so that counts
//! survive configuration changes. The plugin only records in its log
//! phase; scrapes read the registry (`/metrics` on the status listener
//! and, in standalone mode, on the Admin API).

use std::sync::Arc;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder,
};
use serde::Deserialize;
use serde_json::Value;

use super::{typed, BuildContext, Ctx, Flow, Needs, Plugin, PluginRequest};

const KONG_LATENCY_BUCKETS: [f64; 17] = [
    1.0, 2.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0, 75.0, 100.0, 200.0, 500.0, 750.0, 1000.0,
    3000.0, 6000.0,
];
const UPSTREAM_LATENCY_BUCKETS: [f64; 13] = [
    25.0, 50.0, 80.0, 100.0, 250.0, 400.0, 700.0, 1000.0, 2000.0, 5000.0, 10000.0, 30000.0, 60000.0,
];

/// The data plane's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    requests: IntCounterVec,
    kong_latency: HistogramVec,
    upstream_latency: HistogramVec,
    request_latency: HistogramVec,
    bandwidth: IntCounterVec,
    config_version: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new().unwrap_or_else(|error| panic!("static metric definitions: {error}"))
    }
}

impl Metrics {
    fn new() -> prometheus::Result<Metrics> {
        let registry = Registry::new_custom(Some("kong".into()), None)?;
        let requests = IntCounterVec::new(
            Opts::new(
                "http_requests_total",
                "HTTP status codes per consumer/service/route in Kong",
            ),
            &[
                "service",
                "route",
                "code",
                "source",
                "workspace",
                "consumer",
            ],
        )?;
        let latency = |name: &str, help: &str, buckets: &[f64]| {
            HistogramVec::new(
                HistogramOpts::new(name, help).buckets(buckets.to_vec()),
                &["service", "route", "workspace"],
            )
        };
        let kong_latency = latency(
            "kong_latency_ms",
            "Latency added by Kong and enabled plugins for each service/route in Kong",
            &KONG_LATENCY_BUCKETS,
        )?;
        let upstream_latency = latency(
            "upstream_latency_ms",
            "Latency added by upstream response for each service/route in Kong",
            &UPSTREAM_LATENCY_BUCKETS,
        )?;
        let request_latency = latency(
            "request_latency_ms",
            "Total latency incurred during requests for each service/route in Kong",
            &UPSTREAM_LATENCY_BUCKETS,
        )?;
        let bandwidth = IntCounterVec::new(
            Opts::new(
                "bandwidth_bytes",
                "Total bandwidth (ingress/egress) throughput in bytes",
            ),
            &["service", "route", "direction", "workspace", "consumer"],
        )?;
        let config_version = IntGaugeVec::new(
            Opts::new(
                "data_plane_config_version",
                "Version of the configuration this node serves",
            ),
            &[],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(kong_latency.clone()))?;
        registry.register(Box::new(upstream_latency.clone()))?;
        registry.register(Box::new(request_latency.clone()))?;
        registry.register(Box::new(bandwidth.clone()))?;
        registry.register(Box::new(config_version.clone()))?;
        Ok(Metrics {
            registry,
            requests,
            kong_latency,
            upstream_latency,
            request_latency,
            bandwidth,
            config_version,
        })
    }

    /// Prometheus' text format (0.0.4), as Kong serves it.
    pub(crate) fn render(&self, version: u64) -> String {
        self.config_version
            .with_label_values::<&str>(&[])
            .set(i64::try_from(version).unwrap_or(i64::MAX));
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

#[derive(Deserialize)]
struct PrometheusConfig {
    #[serde(default)]
    per_consumer: bool,
    #[serde(default)]
    status_code_metrics: bool,
    #[serde(default)]
    latency_metrics: bool,
    #[serde(default)]
    bandwidth_metrics: bool,
}

/// `prometheus` (`kong/plugins/prometheus/handler.lua`).
pub(crate) struct Prometheus {
    config: PrometheusConfig,
    metrics: Arc<super::Shared>,
}

impl Prometheus {
    pub(crate) fn new(config: &Value, cx: &BuildContext<'_>) -> Result<Self, String> {
        Ok(Prometheus {
            config: typed(config)?,
            metrics: Arc::clone(cx.shared),
        })
    }
}

fn text(value: &Value) -> Option<&str> {
    value.as_str()
}

impl Plugin for Prometheus {
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

    fn log(&self, entry: &Value) {
        let metrics = &self.metrics.metrics;
        // Kong names a service by name, else host; a route by name, else id.
        let service = text(&entry["service"]["name"])
            .or_else(|| text(&entry["service"]["host"]))
            .unwrap_or("");
        let Some(route) = text(&entry["route"]["name"]).or_else(|| text(&entry["route"]["id"]))
        else {
            return;
        };
        let workspace = text(&entry["workspace_name"]).unwrap_or("");
        let consumer = if self.config.per_consumer {
            text(&entry["consumer"]["username"]).unwrap_or("")
        } else {
            ""
        };
        if self.config.status_code_metrics {
            let code = entry["response"]["status"]
                .as_u64()
                .unwrap_or(0)
                .to_string();
            let source = if entry["source"] == "upstream" {
                "service"
            } else {
                "kong"
            };
            metrics
                .requests
                .with_label_values(&[service, route, &code, source, workspace, consumer])
                .inc();
        }
        if self.config.bandwidth_metrics {
            for (direction, size) in [
                ("ingress", &entry["request"]["size"]),
                ("egress", &entry["response"]["size"]),
            ] {
                if let Some(size) = size.as_u64().filter(|s| *s > 0) {
                    metrics
                        .bandwidth
                        .with_label_values(&[service, route, direction, workspace, consumer])
                        .inc_by(size);
                }
            }
        }
        if self.config.latency_metrics {
            let labels = [service, route, workspace];
            let latencies = &entry["latencies"];
            if let Some(v) = latencies["request"].as_f64().filter(|v| *v >= 0.0) {
                metrics
                    .request_latency
                    .with_label_values(&labels)
                    .observe(v);
            }
            if let Some(v) = latencies["proxy"].as_f64().filter(|v| *v >= 0.0) {
                metrics
                    .upstream_latency
                    .with_label_values(&labels)
                    .observe(v);
            }
            if let Some(v) = latencies["kong"].as_f64().filter(|v| *v >= 0.0) {
                metrics.kong_latency.with_label_values(&labels).observe(v);
            }
        }
    }
}
