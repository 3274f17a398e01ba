//! Kong's health endpoints: `GET /upstreams/{u}/health` and
//! `PUT|POST /upstreams/{u}/targets/{t}[/{address}]/healthy|unhealthy`.
//! Health lives in the data plane that balances the traffic; the Admin API
//! reads and sets it through a [`HealthView`], which the process that runs
//! both (standalone) provides. The control plane never links the data
//! plane.

use std::net::SocketAddr;

use gatehouse_model::entities::{self, format_target};
use http::StatusCode;
use serde_json::{json, Map, Value};

pub use gatehouse_model::health::{AddressHealth, TargetHealth, UpstreamHealth, Weight};

use super::{message, not_found, ok, resolve_parent, AdminState, Reply};

/// This node's balancer health, as Kong's DAO reads it from
/// `kong.runloop.balancer`.
pub trait HealthView: Send + Sync {
    /// Health of the targets of upstream `upstream_id`; `None` when this
    /// node has no balancer for it (the configuration is not applied yet).
    fn upstream_health(&self, upstream_id: &str) -> Option<UpstreamHealth>;

    /// Forces the health of target `target` (`host:port`) of an upstream,
    /// all its addresses or only `address`. `Err` holds Kong's message
    /// (no balancer, no health checker).
    fn set_target_health(
        &self,
        upstream_id: &str,
        upstream_name: &str,
        target: &str,
        address: Option<SocketAddr>,
        healthy: bool,
    ) -> Result<(), String>;
}

/// Kong's `getTargetStatus`, with `health` strings per address (the
/// `/health` listing) or `healthy` booleans (`balancer_health=1`).
fn target_status(target: &TargetHealth, health_strings: Option<bool>) -> Value {
    let addresses: Vec<Value> = target
        .addresses
        .iter()
        .map(|address| {
            let mut entry =
                json!({"ip": address.ip, "port": address.port, "weight": address.weight});
            match health_strings {
                Some(checked) => {
                    entry["health"] = json!(match (checked, address.healthy) {
                        (false, _) => "HEALTHCHECKS_OFF",
                        (true, true) => "HEALTHY",
                        (true, false) => "UNHEALTHY",
                    });
                }
                None => entry["healthy"] = json!(address.healthy),
            }
            entry
        })
        .collect();
    json!({
        "host": target.host,
        "port": target.port,
        "dns": target.dns,
        "nodeWeight": target.node_weight,
        "weight": weight_json(target.weight),
        "addresses": addresses,
    })
}

/// `GET /upstreams/{u}/health[?balancer_health=1]`.
pub(super) fn upstream_health(st: &AdminState, key: &str, query: &[(String, String)]) -> Reply {
    let Some(up_schema) = entities::entity("upstreams") else {
        return not_found();
    };
    let Some(up) = st.dao.select(up_schema, key, None) else {
        return not_found();
    };
    let up_id = up
        .get("id")
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_owned();
    let balancer = st
        .health
        .as_ref()
        .and_then(|view| view.upstream_health(&up_id));

    if query
        .iter()
        .any(|(k, v)| k == "balancer_health" && v == "1")
    {
        let data = match &balancer {
            Some(balancer) => {
                let balancer_health = if balancer.healthy {
                    "HEALTHY"
                } else {
                    "UNHEALTHY"
                };
                let hosts: Vec<Value> = balancer
                    .targets
                    .iter()
                    .map(|target| target_status(target, None))
                    .collect();
                json!({
                    "health": if balancer.healthchecks { balancer_health } else { "HEALTHCHECKS_OFF" },
                    "balancer_health": balancer_health,
                    "id": up_id,
                    "details": {
                        "healthy": balancer.healthy,
                        "weight": weight_json(balancer.weight),
                        "hosts": hosts,
                    },
                })
            }
            None => Value::Null,
        };
        return ok(json!({ "data": data, "next": null, "node_id": st.node.node_id }));
    }

    let data: Vec<Value> = st.dao.read(|s| {
        s.iter("targets")
            .filter(|t| {
                t.get("upstream")
                    .and_then(|u| u.get("id"))
                    .and_then(Value::as_str)
                    == Some(up_id.as_str())
            })
            .map(|t| {
                let mut v = t.clone();
                add_health(&mut v, st.health.is_some(), balancer.as_ref());
                Value::Object(v)
            })
            .collect()
    });
    ok(json!({ "node_id": st.node.node_id, "data": data, "next": null }))
}

/// Kong's `page_for_upstream_with_health` for one target entity.
fn add_health(target: &mut Map<String, Value>, has_view: bool, balancer: Option<&UpstreamHealth>) {
    if !has_view {
        // No data plane in this process (a control plane): nothing checks
        // health here.
        target.insert("health".into(), json!("HEALTHCHECKS_OFF"));
        target.insert("data".into(), json!({"addresses": []}));
        return;
    }
    // Without a balancer (the configuration is not applied yet) Kong
    // leaves the targets as they are.
    let Some(balancer) = balancer else {
        return;
    };
    let name = target.get("target").and_then(Value::as_str).unwrap_or("");
    let Some(found) = balancer.targets.iter().find(|found| found.target == name) else {
        // Not in the balancer: Kong calls this a DNS error.
        target.insert("health".into(), json!("DNS_ERROR"));
        return;
    };
    let checked = balancer.healthchecks && found.node_weight > 0;
    let health = if found.addresses.is_empty() {
        "DNS_ERROR"
    } else if !checked {
        "HEALTHCHECKS_OFF"
    } else if found.addresses.iter().any(|address| address.healthy) {
        "HEALTHY"
    } else {
        "UNHEALTHY"
    };
    target.insert("health".into(), json!(health));
    target.insert("data".into(), target_status(found, Some(checked)));
}

/// `PUT|POST /upstreams/{u}/targets/{t}[/{address}]/healthy|unhealthy`.
pub(super) fn set_target_health(
    st: &AdminState,
    upstream: &str,
    target: &str,
    address: Option<&str>,
    healthy: bool,
) -> Reply {
    // Kong registers these endpoints only on nodes that balance traffic.
    let Some(view) = &st.health else {
        return not_found();
    };
    let Some((up, parent)) = resolve_parent(st, "upstreams", upstream, "upstream") else {
        return not_found();
    };
    let Some(schema) = entities::entity("targets") else {
        return not_found();
    };
    let Some(entity) = st.dao.select(schema, target, Some(&parent)) else {
        return not_found();
    };
    let up_id = up.get("id").and_then(Value::as_str).unwrap_or("");
    let up_name = up.get("name").and_then(Value::as_str).unwrap_or("");
    let target = entity.get("target").and_then(Value::as_str).unwrap_or("");
    // An address with an IP names one address of the target (port 8000
    // when absent, as Kong); a host name means all of them.
    let address = address
        .and_then(format_target)
        .and_then(|formatted| formatted.parse::<SocketAddr>().ok());
    match view.set_target_health(up_id, up_name, target, address, healthy) {
        Ok(()) => Reply {
            status: StatusCode::NO_CONTENT,
            body: None,
            allow: None,
            etag: None,
        },
        Err(error) => message(StatusCode::BAD_REQUEST, &error),
    }
}

fn weight_json(w: Weight) -> Value {
    json!({
        "total": w.total,
        "unavailable": w.unavailable,
        "available": w.available,
    })
}
