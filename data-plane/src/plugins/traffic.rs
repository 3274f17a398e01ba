//! Traffic plugins: who may pass and how often (`rate-limiting`,
//! `request-size-limiting`, `ip-restriction`, `bot-detection`, `cors`),
//! and `request-termination`.

use bytes::Bytes;
use http::{Response, StatusCode};
use serde::Deserialize;

use super::{exit_message, exit_raw, typed, BuildContext, Ctx, Flow, Plugin, PluginRequest};
use crate::proxy::ResponseBody;

/// Rate-limiting counters shared by runtimes (local policy).
#[derive(Default)]
pub(crate) struct Counters {}

#[derive(Deserialize)]
struct RequestTerminationConfig {
    status_code: u16,
    message: Option<String>,
    body: Option<String>,
    content_type: Option<String>,
    #[serde(default)]
    trigger: Option<String>,
    #[serde(default)]
    echo: bool,
}

/// `request-termination` (`kong/plugins/request-termination/handler.lua`).
pub(crate) struct RequestTermination {
    config: RequestTerminationConfig,
    status: StatusCode,
    trigger_header: Option<String>,
}

impl RequestTermination {
    pub(crate) fn new(config: &serde_json::Value, _cx: &BuildContext<'_>) -> Result<Self, String> {
        let config: RequestTerminationConfig = typed(config)?;
        let status = StatusCode::from_u16(config.status_code).map_err(|e| e.to_string())?;
        Ok(RequestTermination {
            trigger_header: config.trigger.as_deref().map(super::auth::header_key),
            config,
            status,
        })
    }

    fn default_message(status: StatusCode) -> Option<&'static str> {
        Some(match status.as_u16() {
            401 => "Unauthorized",
            404 => "Not found",
            405 => "Method not allowed",
            500 => "An unexpected error occurred",
            502 => "Bad Gateway",
            503 => "Service unavailable",
            _ => return None,
        })
    }

    fn echo(&self, req: &PluginRequest<'_>, ctx: &Ctx<'_>) -> Response<ResponseBody> {
        let mut headers = serde_json::Map::new();
        for (name, value) in &req.headers {
            let value = serde_json::Value::String(String::from_utf8_lossy(value.as_bytes()).into_owned());
            match headers.get_mut(name.as_str()) {
                Some(serde_json::Value::Array(list)) => list.push(value),
                Some(first) => {
                    let first = first.take();
                    headers.insert(name.as_str().to_owned(), serde_json::json!([first, value]));
                }
                None => {
                    headers.insert(name.as_str().to_owned(), value);
                }
            }
        }
        let query: serde_json::Map<String, serde_json::Value> = req
            .query_args()
            .into_iter()
            .map(|(k, v)| (k, serde_json::Value::String(v)))
            .collect();
        let body = serde_json::json!({
            "message": self.config.message.as_deref().or(Self::default_message(self.status)),
            "request": {
                "scheme": if req.https { "https" } else { "http" },
                "host": req.header("host"),
                "headers": headers,
                "query": query,
                "raw_body": req.body.as_ref().map(|b| String::from_utf8_lossy(b).into_owned()),
                "method": req.method.as_str(),
                "path": req.path,
            },
            "matched_route": { "id": ctx.route_id },
            "matched_service": ctx.service_id.map(|id| serde_json::json!({ "id": id })),
        });
        exit_raw(
            self.status,
            "application/json; charset=utf-8",
            Bytes::from(body.to_string()),
        )
    }
}

impl Plugin for RequestTermination {
    fn access(&self, req: &mut PluginRequest<'_>, ctx: &mut Ctx<'_>) -> Flow {
        if let (Some(trigger), Some(header)) = (&self.config.trigger, &self.trigger_header) {
            let in_header = req.headers.contains_key(header.as_str());
            if !in_header && !req.query_args().iter().any(|(k, _)| k == trigger) {
                return Flow::Continue;
            }
        }
        if self.config.echo {
            return Flow::Exit(self.echo(req, ctx));
        }
        if let Some(body) = &self.config.body {
            let content_type = self.config.content_type.as_deref().unwrap_or("application/json; charset=utf-8");
            return Flow::Exit(exit_raw(self.status, content_type, Bytes::from(body.clone())));
        }
        let message = self.config.message.as_deref().or(Self::default_message(self.status));
        Flow::Exit(match message {
            Some(message) => exit_message(self.status, message),
            None => exit_raw(self.status, "", Bytes::new()),
        })
    }
}
