//! Authentication plugins (`kong/plugins/*-auth`, `jwt`, `acl`): each
//! finds a credential in the request, looks it up in the consumer index
//! built with the configuration, and sets Kong's consumer headers.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::alphabet;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine as _;
use hmac::digest::KeyInit;
use hmac::{Hmac, Mac};
use http::header::{AUTHORIZATION, COOKIE, DATE, PROXY_AUTHORIZATION, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode};
use jsonwebtoken::DecodingKey;
use serde::Deserialize;
use serde_json::Value;
use sha2::Digest as _;

use super::{
    exit_message, set_consumer, typed, BuildContext, Consumer, Consumers, Credential, Ctx, Flow,
    Needs, Plugin, PluginRequest,
};
use crate::proxy::ResponseBody;

/// A failed authentication: Kong's status, message and `WWW-Authenticate`.
pub(crate) struct Denied {
    pub(crate) status: StatusCode,
    pub(crate) message: Cow<'static, str>,
    pub(crate) www_authenticate: Option<HeaderValue>,
    /// A body other than `{"message": …}` (jwt answers its claim errors
    /// as an object of its own).
    pub(crate) body: Option<serde_json::Value>,
}

impl Denied {
    pub(crate) fn unauthorized(message: impl Into<Cow<'static, str>>, www: Option<HeaderValue>) -> Denied {
        Denied {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            www_authenticate: www,
            body: None,
        }
    }

    /// What Kong answers when a plugin raises a Lua error: the request
    /// fails whatever the flow, `anonymous` included.
    pub(crate) fn unexpected() -> Denied {
        Denied {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: Cow::Borrowed("An unexpected error occurred"),
            www_authenticate: None,
            body: None,
        }
    }

    fn response(self) -> Response<ResponseBody> {
        let mut response = match self.body {
            Some(body) => super::exit_raw(
                self.status,
                "application/json; charset=utf-8",
                bytes::Bytes::from(body.to_string()),
            ),
            None => exit_message(self.status, &self.message),
        };
        if let Some(www) = self.www_authenticate {
            response.headers_mut().insert(WWW_AUTHENTICATE, www);
        }
        response
    }
}

/// An authenticated request: the consumer and the credential it used.
pub(crate) type Authenticated = (Arc<Consumer>, Credential);

/// Kong's two flows for auth plugins. With `anonymous` ("logical OR"), a
/// request another auth plugin already authenticated is left alone, and a
/// failure makes the request the anonymous consumer's. Without it
/// ("logical AND"), a failure is the answer.
pub(crate) fn authenticate(
    req: &mut PluginRequest<'_>,
    ctx: &mut Ctx<'_>,
    anonymous: Option<&str>,
    attempt: impl FnOnce(&mut PluginRequest<'_>, &mut Ctx<'_>) -> Result<Authenticated, Denied>,
) -> Flow {
    match anonymous {
        Some(anonymous) => {
            if ctx.credential.is_some() {
                return Flow::Continue;
            }
            match attempt(req, ctx) {
                Ok((consumer, credential)) => {
                    set_consumer(req, ctx, Some(consumer), Some(credential));
                }
                Err(denied) if denied.status.is_server_error() => {
                    return Flow::Exit(denied.response());
                }
                Err(_) => match ctx.consumers.by_id_or_username(anonymous) {
                    Some(consumer) => {
                        let consumer = Arc::clone(consumer);
                        set_consumer(req, ctx, Some(consumer), None);
                    }
                    None => {
                        let message = format!(
                            "anonymous consumer {anonymous} is configured but doesn't exist"
                        );
                        tracing::error!("{message}");
                        return Flow::Exit(exit_message(StatusCode::INTERNAL_SERVER_ERROR, &message));
                    }
                },
            }
            Flow::Continue
        }
        None => match attempt(req, ctx) {
            Ok((consumer, credential)) => {
                set_consumer(req, ctx, Some(consumer), Some(credential));
                Flow::Continue
            }
            Err(denied) => Flow::Exit(denied.response()),
        },
    }
}

/// Kong reads request headers through nginx, whose lookups ignore case and
/// treat `_` as `-`.
pub(crate) fn header_key(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

/// The query without the arguments named `name`, other arguments kept as
/// they were sent.
pub(crate) fn without_query_arg(query: &str, name: &str) -> Option<String> {
    let kept: Vec<&str> = query
        .split('&')
        .filter(|pair| {
            let key = pair.split_once('=').map_or(*pair, |(k, _)| k);
            let decoded = form_urlencoded::parse(key.as_bytes())
                .next()
                .map(|(k, _)| k.into_owned())
                .unwrap_or_default();
            !pair.is_empty() && decoded != name
        })
        .collect();
    (!kept.is_empty()).then(|| kept.join("&"))
}

/// A request body as Kong's `kong.request.get_body()` reads it: JSON or
/// form-urlencoded, by content type (multipart is not read).
pub(crate) fn body_args(req: &PluginRequest<'_>) -> Option<serde_json::Map<String, serde_json::Value>> {
    let body = req.body.as_ref()?;
    let content_type = req.content_type().to_ascii_lowercase();
    if content_type.starts_with("application/json") {
        match serde_json::from_slice(body) {
            Ok(serde_json::Value::Object(map)) => Some(map),
            _ => None,
        }
    } else if content_type.starts_with("application/x-www-form-urlencoded") {
        let mut map = serde_json::Map::new();
        for (k, v) in form_urlencoded::parse(body) {
            match map.get_mut(k.as_ref()) {
                Some(serde_json::Value::Array(list)) => list.push(v.into_owned().into()),
                Some(first) => {
                    let first = first.take();
                    map.insert(k.into_owned(), serde_json::json!([first, v]));
                }
                None => {
                    map.insert(k.into_owned(), v.into_owned().into());
                }
            }
        }
        Some(map)
    } else {
        None
    }
}

#[derive(Deserialize)]
struct KeyAuthConfig {
    key_names: Vec<String>,
    hide_credentials: bool,
    anonymous: Option<String>,
    key_in_header: bool,
    key_in_query: bool,
    key_in_body: bool,
    run_on_preflight: bool,
    #[serde(default)]
    realm: Option<String>,
}

/// `key-auth` (`kong/plugins/key-auth/handler.lua`).
pub(crate) struct KeyAuth {
    config: KeyAuthConfig,
    /// `key_names` as nginx looks header names up.
    header_names: Vec<String>,
    www_authenticate: HeaderValue,
}

impl KeyAuth {
    pub(crate) fn new(config: &serde_json::Value, _cx: &BuildContext<'_>) -> Result<KeyAuth, String> {
        let config: KeyAuthConfig = typed(config)?;
        let www = match &config.realm {
            Some(realm) => format!("Key realm=\"{realm}\""),
            None => "Key".to_owned(),
        };
        Ok(KeyAuth {
            header_names: config.key_names.iter().map(|n| header_key(n)).collect(),
            www_authenticate: HeaderValue::from_str(&www).map_err(|e| e.to_string())?,
            config,
        })
    }

    fn find_key(&self, req: &mut PluginRequest<'_>) -> Result<String, Denied> {
        let denied = |message: &'static str| Denied::unauthorized(message, Some(self.www_authenticate.clone()));
        let config = &self.config;
        let mut query: Option<Vec<(String, String)>> = None;
        let mut body: Option<Option<serde_json::Map<String, serde_json::Value>>> = None;
        for (name, header_name) in config.key_names.iter().zip(&self.header_names) {
            let mut found: Option<Vec<String>> = None;
            if config.key_in_header {
                let values: Vec<String> = req
                    .headers
                    .get_all(header_name.as_str())
                    .iter()
                    .filter_map(|v| v.to_str().ok().map(str::to_owned))
                    .collect();
                if !values.is_empty() {
                    found = Some(values);
                }
            }
            if found.is_none() && config.key_in_query {
                let args = query.get_or_insert_with(|| req.query_args());
                let values: Vec<String> = args
                    .iter()
                    .filter(|(k, _)| k == name)
                    .map(|(_, v)| v.clone())
                    .collect();
                if !values.is_empty() {
                    found = Some(values);
                }
            }
            if found.is_none() && config.key_in_body {
                let args = body.get_or_insert_with(|| body_args(req));
                match args.as_ref().and_then(|map| map.get(name)) {
                    Some(serde_json::Value::String(v)) => found = Some(vec![v.clone()]),
                    Some(serde_json::Value::Array(list)) => {
                        found = Some(list.iter().map(|v| v.to_string()).collect());
                    }
                    _ => {}
                }
            }
            let Some(values) = found else { continue };
            if values.len() > 1 {
                return Err(denied("Duplicate API key found"));
            }
            let key = values.into_iter().next().unwrap_or_default();
            if config.hide_credentials {
                if let Some(q) = req.query.as_deref() {
                    req.query = without_query_arg(q, name).map(Cow::Owned);
                }
                req.headers.remove(header_name.as_str());
                if config.key_in_body {
                    if let Some(Some(mut map)) = body.take() {
                        map.remove(name);
                        set_body_args(req, &map);
                    }
                }
            }
            if key.is_empty() {
                break;
            }
            return Ok(key);
        }
        Err(denied("No API key found in request"))
    }
}

/// Writes back a body read by [`body_args`], in its content type.
pub(crate) fn set_body_args(req: &mut PluginRequest<'_>, map: &serde_json::Map<String, serde_json::Value>) {
    let json = req.content_type().to_ascii_lowercase().starts_with("application/json");
    let bytes = if json {
        serde_json::to_vec(map).unwrap_or_default()
    } else {
        let mut out = form_urlencoded::Serializer::new(String::new());
        for (k, v) in map {
            match v {
                serde_json::Value::String(s) => {
                    out.append_pair(k, s);
                }
                serde_json::Value::Array(list) => {
                    for item in list {
                        out.append_pair(k, item.as_str().unwrap_or_default());
                    }
                }
                other => {
                    out.append_pair(k, &other.to_string());
                }
            }
        }
        out.finish().into_bytes()
    };
    req.body = Some(bytes.into());
}

impl Plugin for KeyAuth {
    fn needs(&self) -> Needs {
        Needs {
            request_body: self.config.key_in_body,
            ..Needs::default()
        }
    }

    fn access(&self, req: &mut PluginRequest<'_>, ctx: &mut Ctx<'_>) -> Flow {
        if !self.config.run_on_preflight && req.method == Method::OPTIONS {
            return Flow::Continue;
        }
        authenticate(req, ctx, self.config.anonymous.as_deref(), |req, ctx| {
            let key = self.find_key(req)?;
            match ctx.consumers.keys.get(key.as_str()) {
                Some(owned) => Ok((
                    Arc::clone(&owned.consumer),
                    Credential {
                        id: owned.id.clone(),
                    },
                )),
                None => Err(Denied::unauthorized(
                    "Unauthorized",
                    Some(self.www_authenticate.clone()),
                )),
            }
        })
    }
}
