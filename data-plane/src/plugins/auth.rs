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
use http::{HeaderName, HeaderValue, Method, Response, StatusCode};
use jsonwebtoken::DecodingKey;
use serde::Deserialize;
use serde_json::Value;
use sha2::Digest as _;

use super::{
    error_message, exit_message, set_consumer, typed, BuildContext, Consumer, Consumers,
    Credential, Ctx, Flow, Needs, Plugin, PluginRequest, RequestHeaders,
};
use crate::proxy::ResponseBody;

/// A failed authentication: Kong's status, message and `WWW-Authenticate`.
pub(crate) struct Denied {
    pub(crate) status: StatusCode,
    pub(crate) message: Cow<'static, str>,
    pub(crate) www_authenticate: Option<HeaderValue>,
    /// A body other than `{"message": …}` (jwt answers its claim errors
    /// as an object of its own).
    pub(crate) body: Option<Box<serde_json::Value>>,
    /// Answered with `kong.response.exit(status, {message = …})` (jwt),
    /// not `kong.response.error`, so without Kong's error template.
    pub(crate) plain: bool,
}

impl Denied {
    pub(crate) fn unauthorized(
        message: impl Into<Cow<'static, str>>,
        www: Option<HeaderValue>,
    ) -> Denied {
        Denied {
            status: StatusCode::UNAUTHORIZED,
            message: message.into(),
            www_authenticate: www,
            body: None,
            plain: false,
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
            plain: false,
        }
    }

    fn response(self) -> Response<ResponseBody> {
        let mut response = match self.body {
            Some(body) => super::exit_raw(
                self.status,
                "application/json; charset=utf-8",
                bytes::Bytes::from(body.to_string()),
            ),
            None if self.plain => exit_message(self.status, &self.message),
            None => error_message(self.status, &self.message),
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
                        return Flow::Exit(error_message(
                            StatusCode::INTERNAL_SERVER_ERROR,
                            &message,
                        ));
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

/// The names a lookup of `name` tries, in order: Kong's nginx accepts
/// underscores in header names (`underscores_in_headers on`), and the
/// table `kong.request.get_headers()` returns finds a name as sent before
/// trying it with `_` read as `-`.
pub(crate) fn header_lookups(name: &str) -> (String, Option<String>) {
    let literal = name.to_ascii_lowercase();
    let dashed = literal.contains('_').then(|| literal.replace('_', "-"));
    (literal, dashed)
}

/// Every value of the first of `names` the request carries.
fn header_values<'a>(
    headers: &'a super::RequestHeaders<'_>,
    names: &'a (String, Option<String>),
) -> impl Iterator<Item = &'a [u8]> + 'a {
    let (literal, dashed) = names;
    let name = match dashed {
        Some(dashed) if !headers.contains(literal.as_str()) => dashed.as_str(),
        _ => literal.as_str(),
    };
    headers.get_all(name)
}

/// The query without the arguments named `name`, as Kong 3.9's
/// `clear_query_arg` (lua-resty-ada's `search.remove`) leaves it: the
/// other arguments in their order, decoded and written back the way
/// WHATWG's `URLSearchParams` writes them (`c=valu%651` goes as
/// `c=value1`, `a` as `a=`). `None` when nothing is left.
pub(crate) fn without_query_arg(query: &str, name: &str) -> Option<String> {
    let mut kept = form_urlencoded::Serializer::new(String::new());
    let mut any = false;
    for (key, value) in form_urlencoded::parse(query.as_bytes()) {
        if key != name {
            kept.append_pair(&key, &value);
            any = true;
        }
    }
    any.then(|| kept.finish())
}

/// A request body as Kong's `kong.request.get_body()` reads it: JSON or
/// form-urlencoded, by content type (multipart is not read).
pub(crate) fn body_args(
    req: &PluginRequest<'_>,
) -> Option<serde_json::Map<String, serde_json::Value>> {
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
    header_names: Vec<(String, Option<String>)>,
    www_authenticate: HeaderValue,
}

impl KeyAuth {
    pub(crate) fn new(
        config: &serde_json::Value,
        _cx: &BuildContext<'_>,
    ) -> Result<KeyAuth, String> {
        let config: KeyAuthConfig = typed(config)?;
        let www = match &config.realm {
            Some(realm) => format!("Key realm=\"{realm}\""),
            None => "Key".to_owned(),
        };
        Ok(KeyAuth {
            header_names: config.key_names.iter().map(|n| header_lookups(n)).collect(),
            www_authenticate: HeaderValue::from_str(&www).map_err(|e| e.to_string())?,
            config,
        })
    }

    fn find_key(&self, req: &mut PluginRequest<'_>) -> Result<String, Denied> {
        let denied = |message: &'static str| {
            Denied::unauthorized(message, Some(self.www_authenticate.clone()))
        };
        let config = &self.config;
        let mut query: Option<Vec<(String, String)>> = None;
        let mut body: Option<Option<serde_json::Map<String, serde_json::Value>>> = None;
        for (name, header_name) in config.key_names.iter().zip(&self.header_names) {
            let mut found: Option<Vec<String>> = None;
            if config.key_in_header {
                let values: Vec<String> = header_values(&req.headers, header_name)
                    .filter_map(|v| std::str::from_utf8(v).ok().map(str::to_owned))
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
                req.headers.remove(header_name.0.as_str());
                if let Some(dashed) = &header_name.1 {
                    req.headers.remove(dashed.as_str());
                }
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
pub(crate) fn set_body_args(
    req: &mut PluginRequest<'_>,
    map: &serde_json::Map<String, serde_json::Value>,
) {
    let json = req
        .content_type()
        .to_ascii_lowercase()
        .starts_with("application/json");
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
    fn filters_response(&self) -> bool {
        false
    }

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
            // The common case, without copying: one key in the first
            // header Kong looks at, nothing to hide.
            let first_header = (self.config.key_in_header && !self.config.hide_credentials)
                .then(|| self.header_names.first())
                .flatten()
                .and_then(|names| {
                    let mut values = header_values(&req.headers, names);
                    match (values.next(), values.next()) {
                        (Some(value), None) => {
                            std::str::from_utf8(value).ok().filter(|v| !v.is_empty())
                        }
                        _ => None,
                    }
                });
            let owned_key;
            let key = match first_header {
                Some(key) => key,
                None => {
                    owned_key = self.find_key(req)?;
                    owned_key.as_str()
                }
            };
            // Kong's data planes drop a key whose ttl has run out
            // without waiting for the control plane's purge.
            let live = |expires: Option<u64>| {
                expires.is_none_or(|at| {
                    std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .is_ok_and(|now| now.as_secs() < at)
                })
            };
            match ctx
                .consumers
                .keys
                .get(key)
                .filter(|owned| live(owned.secret))
            {
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

// Helpers shared by basic-auth, jwt and hmac-auth. Kong reads credentials
// with PCRE patterns and nginx's decoders; these reproduce what those
// accept, byte for byte, without a regex engine on the request path.

/// nginx's base64 decoding (`ngx.decode_base64`, `decode_base64url`): the
/// text ends at the first `=`, a byte outside the alphabet fails, and the
/// spare low bits of the last character are ignored rather than rejected.
fn nginx_base64(input: &[u8], url: bool) -> Option<Vec<u8>> {
    const LENIENT: GeneralPurposeConfig = GeneralPurposeConfig::new()
        .with_decode_allow_trailing_bits(true)
        .with_decode_padding_mode(DecodePaddingMode::RequireNone);
    const STANDARD_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::STANDARD, LENIENT);
    const URL_LENIENT: GeneralPurpose = GeneralPurpose::new(&alphabet::URL_SAFE, LENIENT);
    let end = memchr::memchr(b'=', input).unwrap_or(input.len());
    let engine = if url { &URL_LENIENT } else { &STANDARD_LENIENT };
    engine.decode(&input[..end]).ok()
}

/// PCRE's `\s` without Unicode.
fn is_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | 0x0b | 0x0c | b'\r')
}

/// The `(.+)` of Kong's unanchored `\s*[Bb]asic\s*(.+)` and
/// `\s*[Bb]earer\s+(.+)` (`scheme` in lower case, `min_spaces` 0 or 1):
/// what follows the leftmost scheme that matches and its spaces, or, when
/// only spaces follow, the last of them (the greedy `\s` gives one back).
fn scheme_argument<'v>(value: &'v [u8], scheme: &[u8], min_spaces: usize) -> Option<&'v [u8]> {
    let (first, rest) = scheme.split_first()?;
    for start in 0..value.len() {
        let after = start + scheme.len();
        if !value[start].eq_ignore_ascii_case(first) || value.get(start + 1..after) != Some(rest) {
            continue;
        }
        let tail = &value[after..];
        let spaces = tail.iter().take_while(|&&b| is_space(b)).count();
        if spaces < min_spaces {
            continue;
        }
        if spaces < tail.len() {
            return Some(&tail[spaces..]);
        }
        if spaces > min_spaces {
            return Some(&tail[spaces - 1..]);
        }
    }
    None
}

/// Request header `name` (Kong's normalisation) as raw bytes, first value.
fn first_header<'h>(headers: &'h RequestHeaders<'_>, name: &[u8]) -> Option<&'h [u8]> {
    let name = std::str::from_utf8(name).ok()?;
    if !name.contains('_') {
        return headers.get(name);
    }
    headers.get(name.replace('_', "-"))
}

/// An identifier for `X-Credential-Identifier`; the credential's id when
/// the text cannot be a header value.
fn identifier(text: &[u8], fallback: &HeaderValue) -> HeaderValue {
    HeaderValue::from_bytes(text).unwrap_or_else(|_| fallback.clone())
}

fn header_value(text: &str) -> Result<HeaderValue, String> {
    HeaderValue::from_str(text).map_err(|_| format!("{text:?} cannot be sent in a header"))
}

/// `ngx.time()`.
fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX))
}

/// Equality that takes as long whatever the first difference, for
/// comparing password hashes.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The hash functions Kong's HMAC signatures use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum MacDigest {
    Sha1,
    Sha256,
    Sha384,
    Sha512,
}

impl MacDigest {
    /// Whether `tag` is the HMAC of `message` under `key`, compared in
    /// constant time.
    fn verify(self, key: &[u8], message: &[u8], tag: &[u8]) -> bool {
        fn check<M: Mac + KeyInit>(key: &[u8], message: &[u8], tag: &[u8]) -> bool {
            match <M as KeyInit>::new_from_slice(key) {
                Ok(mut mac) => {
                    mac.update(message);
                    mac.verify_slice(tag).is_ok()
                }
                Err(_) => false,
            }
        }
        match self {
            MacDigest::Sha1 => check::<Hmac<sha1::Sha1>>(key, message, tag),
            MacDigest::Sha256 => check::<Hmac<sha2::Sha256>>(key, message, tag),
            MacDigest::Sha384 => check::<Hmac<sha2::Sha384>>(key, message, tag),
            MacDigest::Sha512 => check::<Hmac<sha2::Sha512>>(key, message, tag),
        }
    }
}

// basic-auth

#[derive(Deserialize)]
struct BasicAuthConfig {
    #[serde(default)]
    anonymous: Option<String>,
    #[serde(default)]
    hide_credentials: bool,
    #[serde(default)]
    realm: Option<String>,
}

/// `basic-auth` (`kong/plugins/basic-auth/access.lua`).
pub(crate) struct BasicAuth {
    anonymous: Option<String>,
    hide_credentials: bool,
    www_authenticate: HeaderValue,
}

/// A user and password decoded from a `Basic` header.
struct UserPassword {
    decoded: Vec<u8>,
    user: std::ops::Range<usize>,
    password: std::ops::Range<usize>,
}

impl UserPassword {
    /// Kong's unanchored `([^:]+):(.*)`: the user is the first run of
    /// non-colons a colon follows; `.` stops the password at a newline.
    fn split(decoded: Vec<u8>) -> Option<UserPassword> {
        let start = decoded.iter().position(|&b| b != b':')?;
        let colon = start + memchr::memchr(b':', &decoded[start..])?;
        let end =
            memchr::memchr(b'\n', &decoded[colon + 1..]).map_or(decoded.len(), |n| colon + 1 + n);
        Some(UserPassword {
            user: start..colon,
            password: colon + 1..end,
            decoded,
        })
    }

    fn user(&self) -> &[u8] {
        &self.decoded[self.user.clone()]
    }

    fn password(&self) -> &[u8] {
        &self.decoded[self.password.clone()]
    }
}

impl BasicAuth {
    pub(crate) fn new(
        config: &serde_json::Value,
        _cx: &BuildContext<'_>,
    ) -> Result<BasicAuth, String> {
        let config: BasicAuthConfig = typed(config)?;
        let realm = config.realm.as_deref().unwrap_or("service");
        Ok(BasicAuth {
            www_authenticate: header_value(&format!("Basic realm=\"{realm}\""))?,
            anonymous: config.anonymous,
            hide_credentials: config.hide_credentials,
        })
    }

    fn denied(&self) -> Denied {
        Denied::unauthorized("Unauthorized", Some(self.www_authenticate.clone()))
    }

    /// Kong's `retrieve_credentials` for one header. With
    /// `hide_credentials` the header is removed whatever it held, except
    /// when it decoded to text without a colon: Kong returns before
    /// hiding then.
    fn credentials_in(
        &self,
        req: &mut PluginRequest<'_>,
        name: HeaderName,
    ) -> Option<UserPassword> {
        // Decoded into an owned value, so the header can go afterwards.
        let decoded = req
            .headers
            .get(&name)
            .and_then(|v| scheme_argument(v, b"basic", 0))
            .and_then(|arg| nginx_base64(arg, false));
        let found = match decoded {
            Some(decoded) => Some(UserPassword::split(decoded)?),
            None => None,
        };
        if self.hide_credentials {
            req.headers.remove(name);
        }
        found
    }

    fn attempt(
        &self,
        req: &mut PluginRequest<'_>,
        consumers: &Consumers,
    ) -> Result<Authenticated, Denied> {
        if !req.headers.contains(AUTHORIZATION) && !req.headers.contains(PROXY_AUTHORIZATION) {
            return Err(self.denied());
        }
        let lookup = |given: UserPassword| {
            let owned = std::str::from_utf8(given.user())
                .ok()
                .and_then(|user| consumers.basic.get(user));
            owned.map(|owned| (owned, given))
        };
        // Proxy-Authorization first; a user it names that does not exist
        // sends Kong on to Authorization, a wrong password does not.
        let mut found = self
            .credentials_in(req, PROXY_AUTHORIZATION)
            .and_then(lookup);
        if found.is_none() {
            let given = self
                .credentials_in(req, AUTHORIZATION)
                .ok_or_else(|| self.denied())?;
            found = lookup(given);
        }
        let (owned, given) = found.ok_or_else(|| self.denied())?;
        let password = std::str::from_utf8(given.password()).map_err(|_| self.denied())?;
        let digest = gatehouse_model::entities::basic_auth_hash(&owned.consumer.id, password);
        if !constant_time_eq(digest.as_bytes(), owned.secret.as_bytes()) {
            return Err(self.denied());
        }
        Ok((
            Arc::clone(&owned.consumer),
            Credential {
                id: identifier(given.user(), &owned.id),
            },
        ))
    }
}

impl Plugin for BasicAuth {
    fn filters_response(&self) -> bool {
        false
    }

    fn access(&self, req: &mut PluginRequest<'_>, ctx: &mut Ctx<'_>) -> Flow {
        authenticate(req, ctx, self.anonymous.as_deref(), |req, ctx| {
            self.attempt(req, ctx.consumers)
        })
    }
}

// acl

#[derive(Deserialize)]
struct AclConfig {
    #[serde(default)]
    allow: Option<Vec<String>>,
    #[serde(default)]
    deny: Option<Vec<String>>,
    #[serde(default)]
    hide_groups_header: bool,
}

/// `acl` (`kong/plugins/acl/handler.lua`). Nothing here sets Kong's
/// `authenticated_groups`, so the consumer's own groups always decide and
/// `always_use_authenticated_groups` changes nothing.
pub(crate) struct Acl {
    /// A non-empty `deny` makes the list a deny list (Kong's test).
    deny: bool,
    /// `None`: an allow list that was never given (`deny: []`), which Kong
    /// fails on as soon as it compares groups.
    groups: Option<Vec<Box<str>>>,
    hide_groups_header: bool,
}

/// What acl decides for one request.
#[derive(Debug, PartialEq, Eq)]
enum AclVerdict {
    Forbidden,
    Unauthorized,
    Unexpected,
    /// Allowed; the upstream gets these groups (none: the header is
    /// removed, as nginx does when Kong sets it to an empty string).
    Allowed(Option<HeaderValue>),
}

impl Acl {
    pub(crate) fn new(config: &serde_json::Value, _cx: &BuildContext<'_>) -> Result<Acl, String> {
        Acl::build(typed(config)?)
    }

    fn build(config: AclConfig) -> Result<Acl, String> {
        let deny = config.deny.as_ref().is_some_and(|d| !d.is_empty());
        let groups = if deny { config.deny } else { config.allow };
        Ok(Acl {
            deny,
            groups: groups.map(|g| g.into_iter().map(Into::into).collect()),
            hide_groups_header: config.hide_groups_header,
        })
    }

    fn verdict(&self, consumer: Option<&Consumer>, has_credential: bool) -> AclVerdict {
        let unidentified = if has_credential {
            AclVerdict::Forbidden
        } else {
            AclVerdict::Unauthorized
        };
        let Some(consumer) = consumer else {
            return unidentified;
        };
        if consumer.groups.is_empty() && !self.deny {
            return unidentified;
        }
        let Some(listed) = &self.groups else {
            return AclVerdict::Unexpected;
        };
        let member = listed
            .iter()
            .any(|g| consumer.groups.binary_search(g).is_ok());
        if member == self.deny {
            AclVerdict::Forbidden
        } else {
            AclVerdict::Allowed(consumer.groups_value.clone())
        }
    }
}

impl Plugin for Acl {
    fn filters_response(&self) -> bool {
        false
    }

    fn access(&self, req: &mut PluginRequest<'_>, ctx: &mut Ctx<'_>) -> Flow {
        const CONSUMER_GROUPS: HeaderName = HeaderName::from_static("x-consumer-groups");
        match self.verdict(ctx.consumer.as_deref(), ctx.credential.is_some()) {
            AclVerdict::Forbidden => Flow::Exit(error_message(
                StatusCode::FORBIDDEN,
                "You cannot consume this service",
            )),
            AclVerdict::Unauthorized => {
                Flow::Exit(error_message(StatusCode::UNAUTHORIZED, "Unauthorized"))
            }
            AclVerdict::Unexpected => {
                tracing::error!("acl has neither an allow nor a non-empty deny list");
                Flow::Exit(Denied::unexpected().response())
            }
            AclVerdict::Allowed(groups) => {
                if !self.hide_groups_header {
                    match groups {
                        Some(groups) => {
                            req.headers.insert(CONSUMER_GROUPS, groups);
                        }
                        // A consumer without groups, let through a deny
                        // list: Kong sets the header to "" (its groups
                        // joined), it does not clear it.
                        None => {
                            req.headers
                                .insert(CONSUMER_GROUPS, HeaderValue::from_static(""));
                        }
                    }
                }
                Flow::Continue
            }
        }
    }
}

// jwt

#[derive(Deserialize)]
struct JwtConfig {
    #[serde(default)]
    uri_param_names: Option<Vec<String>>,
    #[serde(default)]
    cookie_names: Option<Vec<String>>,
    #[serde(default)]
    key_claim_name: Option<String>,
    #[serde(default)]
    secret_is_base64: bool,
    #[serde(default)]
    claims_to_verify: Option<Vec<String>>,
    #[serde(default)]
    anonymous: Option<String>,
    #[serde(default = "enabled")]
    run_on_preflight: bool,
    #[serde(default)]
    maximum_expiration: Option<f64>,
    #[serde(default)]
    header_names: Option<Vec<String>>,
    #[serde(default)]
    realm: Option<String>,
}

fn enabled() -> bool {
    true
}

/// The `alg`s Kong's jwt parser knows (`alg_verify` in `jwt_parser.lua`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum JwtAlg {
    Hs256,
    Hs384,
    Hs512,
    Rs256,
    Rs384,
    Rs512,
    Es256,
    Es384,
    Es512,
    Ps256,
    Ps384,
    Ps512,
    EdDsa,
}

impl JwtAlg {
    const ALL: [JwtAlg; 13] = [
        JwtAlg::Hs256,
        JwtAlg::Hs384,
        JwtAlg::Hs512,
        JwtAlg::Rs256,
        JwtAlg::Rs384,
        JwtAlg::Rs512,
        JwtAlg::Es256,
        JwtAlg::Es384,
        JwtAlg::Es512,
        JwtAlg::Ps256,
        JwtAlg::Ps384,
        JwtAlg::Ps512,
        JwtAlg::EdDsa,
    ];

    fn name(self) -> &'static str {
        match self {
            JwtAlg::Hs256 => "HS256",
            JwtAlg::Hs384 => "HS384",
            JwtAlg::Hs512 => "HS512",
            JwtAlg::Rs256 => "RS256",
            JwtAlg::Rs384 => "RS384",
            JwtAlg::Rs512 => "RS512",
            JwtAlg::Es256 => "ES256",
            JwtAlg::Es384 => "ES384",
            JwtAlg::Es512 => "ES512",
            JwtAlg::Ps256 => "PS256",
            JwtAlg::Ps384 => "PS384",
            JwtAlg::Ps512 => "PS512",
            JwtAlg::EdDsa => "EdDSA",
        }
    }

    fn parse(name: &str) -> Option<JwtAlg> {
        JwtAlg::ALL.into_iter().find(|alg| alg.name() == name)
    }

    fn mac(self) -> Option<MacDigest> {
        match self {
            JwtAlg::Hs256 => Some(MacDigest::Sha256),
            JwtAlg::Hs384 => Some(MacDigest::Sha384),
            JwtAlg::Hs512 => Some(MacDigest::Sha512),
            _ => None,
        }
    }

    /// The signature length Kong asserts (a Lua error, so a 500) before
    /// verifying.
    fn asserted_len(self) -> Option<usize> {
        match self {
            JwtAlg::Es256 => Some(64),
            JwtAlg::Es384 => Some(96),
            JwtAlg::Es512 => Some(132),
            JwtAlg::Ps256 | JwtAlg::Ps384 | JwtAlg::Ps512 => Some(256),
            _ => None,
        }
    }

    /// The public key of a credential for this algorithm, parsed once.
    fn public_key(self, pem: &str) -> Result<(DecodingKey, jsonwebtoken::Algorithm), String> {
        use jsonwebtoken::Algorithm as A;
        let (algorithm, key) = match self {
            JwtAlg::Rs256 => (A::RS256, DecodingKey::from_rsa_pem(pem.as_bytes())),
            JwtAlg::Rs384 => (A::RS384, DecodingKey::from_rsa_pem(pem.as_bytes())),
            JwtAlg::Rs512 => (A::RS512, DecodingKey::from_rsa_pem(pem.as_bytes())),
            JwtAlg::Ps256 => (A::PS256, DecodingKey::from_rsa_pem(pem.as_bytes())),
            JwtAlg::Ps384 => (A::PS384, DecodingKey::from_rsa_pem(pem.as_bytes())),
            JwtAlg::Ps512 => (A::PS512, DecodingKey::from_rsa_pem(pem.as_bytes())),
            JwtAlg::Es256 => (A::ES256, DecodingKey::from_ec_pem(pem.as_bytes())),
            JwtAlg::Es384 => (A::ES384, DecodingKey::from_ec_pem(pem.as_bytes())),
            JwtAlg::EdDsa => (A::EdDSA, DecodingKey::from_ed_pem(pem.as_bytes())),
            JwtAlg::Es512 => return Err("ES512 keys are prepared by p521_key".into()),
            JwtAlg::Hs256 | JwtAlg::Hs384 | JwtAlg::Hs512 => {
                return Err("an HMAC algorithm has no public key".into())
            }
        };
        key.map(|key| (key, algorithm)).map_err(|e| e.to_string())
    }
}

/// A P-521 public key from its PEM (SubjectPublicKeyInfo, as Kong's
/// `openssl_pkey.new` reads it).
fn p521_key(pem: &str) -> Result<p521::ecdsa::VerifyingKey, String> {
    use p521::pkcs8::DecodePublicKey;
    let public = p521::PublicKey::from_public_key_pem(pem.trim()).map_err(|e| e.to_string())?;
    p521::ecdsa::VerifyingKey::from_affine(*public.as_affine()).map_err(|e| e.to_string())
}

/// What a jwt credential verifies with, prepared when the plugin is built.
enum JwtKey {
    /// `secret_is_base64`: the decoded secret.
    Secret(Vec<u8>),
    Public(DecodingKey, jsonwebtoken::Algorithm),
    /// ES512: P-521 keys, which `jsonwebtoken` (ring) does not verify.
    P521(Box<p521::ecdsa::VerifyingKey>),
    /// Kong's "Invalid key/secret": no secret, no public key, or a base64
    /// secret that does not decode.
    Missing,
    /// A public key Kong's `openssl_pkey.new` would fail on: a 500.
    Unusable(Box<str>),
}

/// A registered claim `claims_to_verify` may name.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum RegisteredClaim {
    Exp,
    Nbf,
}

impl RegisteredClaim {
    fn name(self) -> &'static str {
        match self {
            RegisteredClaim::Exp => "exp",
            RegisteredClaim::Nbf => "nbf",
        }
    }

    /// Kong's check of a numeric claim against `now`.
    fn check(self, value: f64, now: i64) -> Option<&'static str> {
        let now = now as f64;
        match self {
            RegisteredClaim::Exp => (value <= now).then_some("token expired"),
            RegisteredClaim::Nbf => (value > now).then_some("token not valid yet"),
        }
    }
}

/// Why a jwt request is not authenticated.
#[derive(Debug, PartialEq)]
enum JwtFailure {
    /// No token: the 401 without `error="invalid_token"`.
    NoToken,
    Invalid(Cow<'static, str>),
    /// Claim errors, which Kong sends as the body itself.
    Claims(serde_json::Map<String, Value>),
    /// A Lua error in Kong: 500 whatever the flow.
    Unexpected,
}

/// A token Kong found: a text, or `true` for a query argument without `=`
/// (what `kong.request.get_query` gives for `?jwt`).
#[derive(Debug, PartialEq)]
enum Token<'r> {
    Text(Cow<'r, [u8]>),
    Flag,
}

/// A token split and decoded as Kong's `jwt_parser.lua` does.
#[derive(Debug)]
struct DecodedJwt<'t> {
    /// `header.claims` as the token carries them: what is signed.
    signing_input: &'t [u8],
    header: Value,
    claims: Value,
    alg: JwtAlg,
    signature: Vec<u8>,
}

impl DecodedJwt<'_> {
    fn decode(token: &[u8]) -> Result<DecodedJwt<'_>, JwtFailure> {
        let bad = |why: &'static str| JwtFailure::Invalid(Cow::Owned(format!("Bad token; {why}")));
        let mut parts = token.splitn(3, |&b| b == b'.');
        let header_64 = parts.next().unwrap_or_default();
        // A token with fewer than three parts fails inside Kong's pcall,
        // which reports every failure there as invalid JSON.
        let (Some(claims_64), Some(signature_64)) = (parts.next(), parts.next()) else {
            return Err(bad("invalid JSON"));
        };
        let json = |part: &[u8]| {
            nginx_base64(part, true).and_then(|raw| serde_json::from_slice::<Value>(&raw).ok())
        };
        let (Some(header), Some(claims)) = (json(header_64), json(claims_64)) else {
            return Err(bad("invalid JSON"));
        };
        let alg = lua_field(&header, "alg")?
            .and_then(Value::as_str)
            .and_then(JwtAlg::parse)
            .ok_or_else(|| bad("invalid alg"))?;
        if claims == Value::Bool(false) {
            return Err(bad("invalid claims"));
        }
        let signature = nginx_base64(signature_64, true).ok_or_else(|| bad("invalid signature"))?;
        Ok(DecodedJwt {
            signing_input: &token[..header_64.len() + 1 + claims_64.len()],
            header,
            claims,
            alg,
            signature,
        })
    }

    /// Kong's `verify_registered_claims` and `check_maximum_expiration`.
    fn check_claims(
        &self,
        claims: &[RegisteredClaim],
        maximum_expiration: f64,
        now: i64,
    ) -> Result<(), JwtFailure> {
        let mut errors = serde_json::Map::new();
        for &claim in claims {
            let problem = match lua_field(&self.claims, claim.name())? {
                Some(Value::Number(n)) => claim.check(n.as_f64().unwrap_or(f64::NAN), now),
                _ => Some("must be a number"),
            };
            if let Some(problem) = problem {
                errors.insert(claim.name().to_owned(), problem.into());
            }
        }
        if errors.is_empty() && maximum_expiration > 0.0 {
            let within = match lua_field(&self.claims, "exp")? {
                Some(Value::Number(exp)) => exp
                    .as_f64()
                    .is_some_and(|exp| exp - now as f64 <= maximum_expiration),
                _ => false,
            };
            if !within {
                errors.insert("exp".into(), "exceeds maximum allowed expiration".into());
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(JwtFailure::Claims(errors))
        }
    }
}

/// `value[key]` as Lua evaluates it on what cjson decoded: objects answer,
/// arrays and strings have no such field, and indexing a number, a boolean
/// or `null` raises an error.
fn lua_field<'v>(value: &'v Value, key: &str) -> Result<Option<&'v Value>, JwtFailure> {
    match value {
        Value::Object(map) => Ok(map.get(key)),
        Value::Array(_) | Value::String(_) => Ok(None),
        Value::Number(_) | Value::Bool(_) | Value::Null => Err(JwtFailure::Unexpected),
    }
}

/// Lua truthiness: only a missing value and `false` are false (`null`
/// decodes to a userdata, which is true).
fn lua_truthy(value: Option<&Value>) -> Option<&Value> {
    value.filter(|v| **v != Value::Bool(false))
}

/// Verifies `signature` over `input` with a prepared public key, after
/// Kong's length assertions.
fn verify_public(
    alg: JwtAlg,
    key: &JwtKey,
    input: &[u8],
    signature: &[u8],
) -> Result<bool, JwtFailure> {
    match key {
        JwtKey::Public(key, algorithm) => {
            if alg.asserted_len().is_some_and(|len| len != signature.len()) {
                return Err(JwtFailure::Unexpected);
            }
            let encoded = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(signature);
            Ok(jsonwebtoken::crypto::verify(&encoded, input, key, *algorithm).unwrap_or(false))
        }
        JwtKey::P521(key) => {
            use p521::ecdsa::signature::Verifier;
            if alg.asserted_len().is_some_and(|len| len != signature.len()) {
                return Err(JwtFailure::Unexpected);
            }
            // JOSE's r || s, each 66 bytes; ECDSA over SHA-512.
            Ok(p521::ecdsa::Signature::from_slice(signature)
                .is_ok_and(|signature| key.verify(input, &signature).is_ok()))
        }
        JwtKey::Unusable(why) => {
            tracing::error!("jwt credential key is unusable: {why}");
            Err(JwtFailure::Unexpected)
        }
        JwtKey::Secret(_) | JwtKey::Missing => {
            Err(JwtFailure::Invalid("Invalid key/secret".into()))
        }
    }
}

/// nginx's `$cookie_NAME` (`ngx_http_parse_multi_header_lines`): the first
/// `NAME=value` among the `Cookie` headers' `;`/`,`-separated parts, the
/// name compared without case, the value up to the next `;`.
fn cookie<'h>(headers: impl Iterator<Item = &'h [u8]>, name: &[u8]) -> Option<&'h [u8]> {
    for v in headers {
        let mut p = 0;
        while p < v.len() {
            if v[p..].len() >= name.len() && v[p..p + name.len()].eq_ignore_ascii_case(name) {
                p += name.len();
                while p < v.len() && v[p] == b' ' {
                    p += 1;
                }
                if p < v.len() {
                    p += 1;
                    if v[p - 1] == b'=' {
                        while p < v.len() && v[p] == b' ' {
                            p += 1;
                        }
                        let end = memchr::memchr(b';', &v[p..]).map_or(v.len(), |n| p + n);
                        return Some(&v[p..end]);
                    }
                }
            }
            while p < v.len() {
                p += 1;
                if matches!(v[p - 1], b';' | b',') {
                    break;
                }
            }
            while p < v.len() && v[p] == b' ' {
                p += 1;
            }
        }
    }
    None
}

/// `jwt` (`kong/plugins/jwt/handler.lua`, `jwt_parser.lua`).
pub(crate) struct Jwt {
    uri_param_names: Vec<String>,
    cookie_names: Vec<String>,
    header_names: Vec<(String, Option<String>)>,
    key_claim_name: String,
    secret_is_base64: bool,
    claims_to_verify: Vec<RegisteredClaim>,
    maximum_expiration: f64,
    anonymous: Option<String>,
    run_on_preflight: bool,
    www_authenticate: HeaderValue,
    www_authenticate_error: HeaderValue,
    no_key_claim: Cow<'static, str>,
    empty_key_claim: Cow<'static, str>,
    no_credential: Cow<'static, str>,
    /// By credential key: the keys that need preparing (public keys, and
    /// base64 secrets when `secret_is_base64`); other secrets are used as
    /// the consumer index holds them.
    keys: HashMap<Box<str>, JwtKey>,
}

impl Jwt {
    pub(crate) fn new(config: &serde_json::Value, cx: &BuildContext<'_>) -> Result<Jwt, String> {
        Jwt::build(typed(config)?, cx.consumers)
    }

    fn build(config: JwtConfig, consumers: &Consumers) -> Result<Jwt, String> {
        let claims_to_verify = config
            .claims_to_verify
            .unwrap_or_default()
            .iter()
            .map(|c| match c.as_str() {
                "exp" => Ok(RegisteredClaim::Exp),
                "nbf" => Ok(RegisteredClaim::Nbf),
                other => Err(format!("unknown claim to verify: {other}")),
            })
            .collect::<Result<Vec<_>, _>>()?;
        let (www, www_error) = match &config.realm {
            // Kong 3.9 separates the realm and the error with a space only.
            Some(realm) => (
                format!("Bearer realm=\"{realm}\""),
                format!("Bearer realm=\"{realm}\" error=\"invalid_token\""),
            ),
            None => (
                "Bearer".to_owned(),
                "Bearer error=\"invalid_token\"".to_owned(),
            ),
        };
        let mut keys = HashMap::new();
        for (key, owned) in &consumers.jwt {
            let Some(alg) = JwtAlg::parse(&owned.secret.algorithm) else {
                continue;
            };
            let prepared = if alg.mac().is_some() {
                if !config.secret_is_base64 {
                    continue;
                }
                owned
                    .secret
                    .secret
                    .as_deref()
                    .and_then(|s| nginx_base64(s.as_bytes(), true))
                    .map_or(JwtKey::Missing, JwtKey::Secret)
            } else {
                match owned.secret.rsa_public_key.as_deref() {
                    None => JwtKey::Missing,
                    Some(pem) if alg == JwtAlg::Es512 => match p521_key(pem) {
                        Ok(key) => JwtKey::P521(Box::new(key)),
                        Err(why) => JwtKey::Unusable(why.into()),
                    },
                    Some(pem) => match alg.public_key(pem) {
                        Ok((key, algorithm)) => JwtKey::Public(key, algorithm),
                        Err(why) => JwtKey::Unusable(why.into()),
                    },
                }
            };
            keys.insert(key.clone(), prepared);
        }
        let claim = config.key_claim_name.unwrap_or_else(|| "iss".to_owned());
        Ok(Jwt {
            uri_param_names: config.uri_param_names.unwrap_or_default(),
            cookie_names: config.cookie_names.unwrap_or_default(),
            header_names: config
                .header_names
                .unwrap_or_default()
                .iter()
                .map(|n| header_lookups(n))
                .collect(),
            secret_is_base64: config.secret_is_base64,
            claims_to_verify,
            maximum_expiration: config.maximum_expiration.unwrap_or(0.0),
            anonymous: config.anonymous,
            run_on_preflight: config.run_on_preflight,
            www_authenticate: header_value(&www)?,
            www_authenticate_error: header_value(&www_error)?,
            no_key_claim: format!("No mandatory '{claim}' in claims").into(),
            empty_key_claim: format!("Invalid '{claim}' in claims").into(),
            no_credential: format!("No credentials found for given '{claim}'").into(),
            key_claim_name: claim,
            keys,
        })
    }

    /// Kong's `retrieve_tokens`: every distinct token in the query, the
    /// cookies and the `Bearer` headers.
    fn tokens<'r>(&self, req: &'r PluginRequest<'_>) -> Vec<Token<'r>> {
        let mut tokens: Vec<Token<'r>> = Vec::new();
        let mut add = |token: Token<'r>| {
            if !tokens.contains(&token) {
                tokens.push(token);
            }
        };
        if let Some(query) = req.query.as_deref() {
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let Some((name, value)) = form_urlencoded::parse(pair.as_bytes()).next() else {
                    continue;
                };
                if name.is_empty() || !self.uri_param_names.iter().any(|n| *n == name) {
                    continue;
                }
                if !pair.contains('=') {
                    add(Token::Flag);
                } else if !value.is_empty() {
                    add(Token::Text(Cow::Owned(value.into_owned().into_bytes())));
                }
            }
        }
        for name in &self.cookie_names {
            if let Some(value) =
                cookie(req.headers.get_all(COOKIE), name.as_bytes()).filter(|v| !v.is_empty())
            {
                add(Token::Text(Cow::Borrowed(value)));
            }
        }
        for (literal, dashed) in &self.header_names {
            let token = req
                .headers
                .get(literal.as_str())
                .or_else(|| dashed.as_deref().and_then(|name| req.headers.get(name)))
                .and_then(|v| scheme_argument(v, b"bearer", 1));
            if let Some(token) = token {
                add(Token::Text(Cow::Borrowed(token)));
            }
        }
        tokens
    }

    fn attempt(
        &self,
        req: &PluginRequest<'_>,
        consumers: &Consumers,
        now: i64,
    ) -> Result<Authenticated, JwtFailure> {
        let tokens = self.tokens(req);
        let token = match tokens.as_slice() {
            [] => return Err(JwtFailure::NoToken),
            [Token::Text(token)] => token,
            [Token::Flag] => return Err(JwtFailure::Invalid("Unrecognizable token".into())),
            _ => return Err(JwtFailure::Invalid("Multiple tokens provided".into())),
        };
        let jwt = DecodedJwt::decode(token)?;
        let claim = match lua_truthy(lua_field(&jwt.claims, &self.key_claim_name)?) {
            Some(value) => Some(value),
            None => lua_truthy(lua_field(&jwt.header, &self.key_claim_name)?),
        };
        let key = match claim {
            None => return Err(JwtFailure::Invalid(self.no_key_claim.clone())),
            Some(Value::String(key)) if key.is_empty() => {
                return Err(JwtFailure::Invalid(self.empty_key_claim.clone()))
            }
            Some(Value::String(key)) => key.as_str(),
            // Kong's lookup by a key that is not a string fails.
            Some(_) => return Err(JwtFailure::Unexpected),
        };
        let owned = consumers
            .jwt
            .get(key)
            .ok_or_else(|| JwtFailure::Invalid(self.no_credential.clone()))?;
        if *owned.secret.algorithm != *jwt.alg.name() {
            return Err(JwtFailure::Invalid("Invalid algorithm".into()));
        }
        let verified = match jwt.alg.mac() {
            Some(digest) => {
                let secret = if self.secret_is_base64 {
                    match self.keys.get(key) {
                        Some(JwtKey::Secret(secret)) => Some(secret.as_slice()),
                        _ => None,
                    }
                } else {
                    owned.secret.secret.as_deref().map(str::as_bytes)
                };
                let secret =
                    secret.ok_or_else(|| JwtFailure::Invalid("Invalid key/secret".into()))?;
                digest.verify(secret, jwt.signing_input, &jwt.signature)
            }
            None => {
                let prepared = self.keys.get(key).unwrap_or(&JwtKey::Missing);
                verify_public(jwt.alg, prepared, jwt.signing_input, &jwt.signature)?
            }
        };
        if !verified {
            return Err(JwtFailure::Invalid("Invalid signature".into()));
        }
        jwt.check_claims(&self.claims_to_verify, self.maximum_expiration, now)?;
        Ok((
            Arc::clone(&owned.consumer),
            Credential {
                id: identifier(key.as_bytes(), &owned.id),
            },
        ))
    }

    fn denied(&self, failure: JwtFailure) -> Denied {
        let with_error = Some(self.www_authenticate_error.clone());
        // jwt answers with kong.response.exit (`handler.lua`), but a Lua
        // error is Kong's error page.
        let plain = |denied: Denied| Denied {
            plain: true,
            ..denied
        };
        match failure {
            JwtFailure::NoToken => plain(Denied::unauthorized(
                "Unauthorized",
                Some(self.www_authenticate.clone()),
            )),
            JwtFailure::Invalid(message) => plain(Denied::unauthorized(message, with_error)),
            JwtFailure::Claims(errors) => Denied {
                body: Some(Box::new(Value::Object(errors))),
                ..Denied::unauthorized("", with_error)
            },
            JwtFailure::Unexpected => Denied::unexpected(),
        }
    }
}

impl Plugin for Jwt {
    fn filters_response(&self) -> bool {
        false
    }

    fn access(&self, req: &mut PluginRequest<'_>, ctx: &mut Ctx<'_>) -> Flow {
        if !self.run_on_preflight && req.method == Method::OPTIONS {
            return Flow::Continue;
        }
        authenticate(req, ctx, self.anonymous.as_deref(), |req, ctx| {
            self.attempt(req, ctx.consumers, now())
                .map_err(|f| self.denied(f))
        })
    }
}

// hmac-auth

const HMAC_NOT_VALID: &str = "HMAC signature cannot be verified";
const HMAC_NOT_SAME: &str = "HMAC signature does not match";
const HMAC_NO_DATE: &str =
    "HMAC signature cannot be verified, a valid date or x-date header is required for HMAC Authentication";

#[derive(Deserialize)]
struct HmacAuthConfig {
    #[serde(default)]
    hide_credentials: bool,
    clock_skew: f64,
    #[serde(default)]
    anonymous: Option<String>,
    #[serde(default)]
    validate_request_body: bool,
    #[serde(default)]
    enforce_headers: Option<Vec<String>>,
    algorithms: Vec<String>,
    #[serde(default)]
    realm: Option<String>,
}

/// `hmac-auth` (`kong/plugins/hmac-auth/access.lua`).
pub(crate) struct HmacAuth {
    hide_credentials: bool,
    clock_skew: f64,
    anonymous: Option<String>,
    validate_request_body: bool,
    enforce_headers: Vec<String>,
    /// The allowed `algorithm` values with their digest.
    algorithms: Vec<(Box<str>, MacDigest)>,
    www_authenticate: HeaderValue,
}

/// The fields of an `hmac` authorization header.
#[derive(Debug, PartialEq, Eq)]
struct HmacParams<'h> {
    username: &'h [u8],
    algorithm: &'h [u8],
    headers: &'h [u8],
    signature: &'h [u8],
}

impl<'h> HmacParams<'h> {
    /// Kong's unanchored
    /// `\s*[Hh]mac\s*username="(.+)",\s*algorithm="(.+)",\s*headers="(.+)",\s*signature="(.+)"`.
    /// Each greedy `(.+)` ends at the last place from which the rest of the
    /// pattern still matches; that place does not depend on where the
    /// field began, so the ends are found once each, from the last field
    /// back, in linear time.
    fn parse(value: &'h [u8]) -> Option<HmacParams<'h>> {
        const SEPARATORS: [&[u8]; 3] = [b"algorithm=\"", b"headers=\"", b"signature=\""];
        // Where the field after `",\s*word` begins, when that is at `at`.
        let after_separator = |at: usize, word: &[u8]| -> Option<usize> {
            let rest = value.get(at..)?.strip_prefix(b"\",")?;
            let spaces = rest.iter().take_while(|&&b| is_space(b)).count();
            rest[spaces..]
                .starts_with(word)
                .then(|| at + 2 + spaces + word.len())
        };
        let mut ends = [0usize; 4];
        ends[3] = memchr::memrchr(b'"', value)?;
        for field in (0..3).rev() {
            let next_end = ends[field + 1];
            ends[field] = (0..value.len()).rev().find(|&at| {
                after_separator(at, SEPARATORS[field]).is_some_and(|start| start < next_end)
            })?;
        }
        let username_start = (0..value.len()).find_map(|at| {
            if !value[at].eq_ignore_ascii_case(&b'h') || value.get(at + 1..at + 4) != Some(b"mac") {
                return None;
            }
            let rest = &value[at + 4..];
            let spaces = rest.iter().take_while(|&&b| is_space(b)).count();
            let start = at + 4 + spaces + "username=\"".len();
            (rest[spaces..].starts_with(b"username=\"") && start < ends[0]).then_some(start)
        })?;
        let mut starts = [username_start, 0, 0, 0];
        for field in 0..3 {
            starts[field + 1] = after_separator(ends[field], SEPARATORS[field])?;
        }
        Some(HmacParams {
            username: &value[starts[0]..ends[0]],
            algorithm: &value[starts[1]..ends[1]],
            headers: &value[starts[2]..ends[2]],
            signature: &value[starts[3]..ends[3]],
        })
    }

    /// The signed header names: Penlight's `split(list, " ")`, which is a
    /// plain split except that a lone space gives one empty name.
    fn header_names(&self) -> Vec<&'h [u8]> {
        if self.headers == b" " {
            return vec![b""];
        }
        self.headers.split(|&b| b == b' ').collect()
    }
}

/// The text Kong signs: each listed header as `name: value`, `name:` when
/// absent, `@request-target` and `request-line` built from the request.
fn hmac_signing_string(req: &PluginRequest<'_>, names: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::with_capacity(128);
    // Kong signs `$request_uri`: the target as sent, whatever plugins that
    // ran before did to the query.
    let request_uri = |out: &mut Vec<u8>| out.extend_from_slice(req.target.as_bytes());
    for (i, &name) in names.iter().enumerate() {
        if i > 0 {
            out.push(b'\n');
        }
        match first_header(&req.headers, name) {
            Some(value) => {
                out.extend_from_slice(name);
                out.extend_from_slice(b": ");
                out.extend_from_slice(value);
            }
            None if name == b"@request-target" => {
                out.extend_from_slice(name);
                out.extend_from_slice(b": ");
                out.extend(req.method.as_str().bytes().map(|b| b.to_ascii_lowercase()));
                out.push(b' ');
                request_uri(&mut out);
            }
            None if name == b"request-line" => {
                out.extend_from_slice(req.method.as_str().as_bytes());
                out.push(b' ');
                request_uri(&mut out);
                // Kong formats the version as `HTTP/%.01f`.
                out.extend_from_slice(match req.version {
                    http::Version::HTTP_09 => b" HTTP/0.9",
                    http::Version::HTTP_10 => b" HTTP/1.0",
                    http::Version::HTTP_2 => b" HTTP/2.0",
                    http::Version::HTTP_3 => b" HTTP/3.0",
                    _ => b" HTTP/1.1",
                });
            }
            None => {
                out.extend_from_slice(name);
                out.push(b':');
            }
        }
    }
    out
}

/// nginx's `ngx_parse_http_time` (`ngx.parse_http_time`): RFC 1123, RFC
/// 850 and asctime dates. Like nginx, it checks neither the weekday nor
/// what follows the time, and accepts a day 0.
fn parse_http_time(value: &[u8]) -> Option<i64> {
    #[derive(PartialEq)]
    enum Form {
        Rfc1123,
        Rfc850,
        Asctime,
    }
    const MDAY: [i64; 12] = [31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31];
    let len = value.len();
    let at = |i: usize| value.get(i).copied().unwrap_or(0);
    let digit = |i: usize| at(i).is_ascii_digit().then(|| i64::from(at(i) - b'0'));
    let two = |i: usize| Some(digit(i)? * 10 + digit(i + 1)?);

    let mut p = value
        .iter()
        .position(|&b| b == b',' || b == b' ')
        .unwrap_or(len);
    let mut form = if at(p) == b' ' {
        Form::Asctime
    } else {
        Form::Rfc1123
    };
    p += 1;
    while p < len && value[p] == b' ' {
        p += 1;
    }
    if len.saturating_sub(p) < 18 {
        return None;
    }
    let mut day = 0;
    if form != Form::Asctime {
        day = two(p)?;
        p += 2;
        match at(p) {
            b' ' if len - p >= 18 => form = Form::Rfc1123,
            b'-' => form = Form::Rfc850,
            _ => return None,
        }
        p += 1;
    }
    let month = match at(p) {
        b'J' if at(p + 1) == b'a' => 0,
        b'J' if at(p + 2) == b'n' => 5,
        b'J' => 6,
        b'F' => 1,
        b'M' if at(p + 2) == b'r' => 2,
        b'M' => 4,
        b'A' if at(p + 1) == b'p' => 3,
        b'A' => 7,
        b'S' => 8,
        b'O' => 9,
        b'N' => 10,
        b'D' => 11,
        _ => return None,
    };
    p += 3;
    if (form == Form::Rfc1123 && at(p) != b' ') || (form == Form::Rfc850 && at(p) != b'-') {
        return None;
    }
    p += 1;
    let mut year = 0;
    match form {
        Form::Rfc1123 => {
            year = two(p)? * 100 + two(p + 2)?;
            p += 4;
        }
        Form::Rfc850 => {
            year = two(p)?;
            year += if year < 70 { 2000 } else { 1900 };
            p += 2;
        }
        Form::Asctime => {
            if at(p) == b' ' {
                p += 1;
            }
            day = digit(p)?;
            p += 1;
            if at(p) != b' ' {
                day = day * 10 + digit(p)?;
                p += 1;
            }
            if len.saturating_sub(p) < 14 {
                return None;
            }
        }
    }
    // " HH:MM:SS" from p.
    if at(p) != b' ' || at(p + 3) != b':' || at(p + 6) != b':' {
        return None;
    }
    let (hour, minute, second) = (two(p + 1)?, two(p + 4)?, two(p + 7)?);
    if form == Form::Asctime {
        if at(p + 9) != b' ' {
            return None;
        }
        year = two(p + 10)? * 100 + two(p + 12)?;
    }
    if hour > 23 || minute > 59 || second > 59 {
        return None;
    }
    if day == 29 && month == 1 {
        if year % 4 != 0 || (year % 100 == 0 && year % 400 != 0) {
            return None;
        }
    } else if day > MDAY[month] {
        return None;
    }
    Some(days_from_civil(year, month as i64 + 1, day) * 86_400 + hour * 3600 + minute * 60 + second)
}

/// Days since 1970-01-01 of a proleptic Gregorian date; linear in `day`,
/// so day 0 is the last day of the month before.
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let year = if month <= 2 { year - 1 } else { year };
    let era = year.div_euclid(400);
    let year_of_era = year - era * 400;
    let month_from_march = (month + 9) % 12;
    let day_of_year = (153 * month_from_march + 2) / 5 + day - 1;
    let day_of_era = year_of_era * 365 + year_of_era / 4 - year_of_era / 100 + day_of_year;
    era * 146_097 + day_of_era - 719_468
}

impl HmacAuth {
    pub(crate) fn new(
        config: &serde_json::Value,
        _cx: &BuildContext<'_>,
    ) -> Result<HmacAuth, String> {
        HmacAuth::build(typed(config)?)
    }

    fn build(config: HmacAuthConfig) -> Result<HmacAuth, String> {
        let algorithms = config
            .algorithms
            .iter()
            .map(|name| {
                let digest = match name.as_str() {
                    "hmac-sha1" => MacDigest::Sha1,
                    "hmac-sha256" => MacDigest::Sha256,
                    "hmac-sha384" => MacDigest::Sha384,
                    "hmac-sha512" => MacDigest::Sha512,
                    other => return Err(format!("unknown algorithm {other}")),
                };
                Ok((name.as_str().into(), digest))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let www = match &config.realm {
            Some(realm) => format!("hmac realm=\"{realm}\""),
            None => "hmac".to_owned(),
        };
        Ok(HmacAuth {
            hide_credentials: config.hide_credentials,
            clock_skew: config.clock_skew,
            anonymous: config.anonymous,
            validate_request_body: config.validate_request_body,
            enforce_headers: config.enforce_headers.unwrap_or_default(),
            algorithms,
            www_authenticate: header_value(&www)?,
        })
    }

    fn denied(&self, message: &'static str) -> Denied {
        Denied::unauthorized(message, Some(self.www_authenticate.clone()))
    }

    fn date_within_skew(&self, headers: &RequestHeaders<'_>, name: &[u8], now: i64) -> bool {
        first_header(headers, name)
            .and_then(parse_http_time)
            .is_some_and(|time| (now.saturating_sub(time)).unsigned_abs() as f64 <= self.clock_skew)
    }

    /// Kong's `validate_body`: the `Digest` must be the body's SHA-256, and
    /// without one the body must be empty.
    fn body_matches(req: &PluginRequest<'_>) -> bool {
        let body = req.body.as_deref().unwrap_or_default();
        match req.headers.get("digest") {
            None => body.is_empty(),
            Some(received) => {
                let expected = format!("SHA-256={}", STANDARD.encode(sha2::Sha256::digest(body)));
                received == expected.as_bytes()
            }
        }
    }

    fn attempt(
        &self,
        req: &mut PluginRequest<'_>,
        consumers: &Consumers,
        now: i64,
    ) -> Result<Authenticated, Denied> {
        let authorization = req.headers.get(AUTHORIZATION).map(<[u8]>::to_vec);
        let proxy_authorization = req.headers.get(PROXY_AUTHORIZATION).map(<[u8]>::to_vec);
        if authorization.is_none() && proxy_authorization.is_none() {
            return Err(self.denied("Unauthorized"));
        }
        if !(self.date_within_skew(&req.headers, b"x-date", now)
            || self.date_within_skew(&req.headers, DATE.as_str().as_bytes(), now))
        {
            return Err(self.denied(HMAC_NO_DATE));
        }
        let params = match proxy_authorization.as_deref().and_then(HmacParams::parse) {
            Some(params) => {
                if self.hide_credentials {
                    req.headers.remove(PROXY_AUTHORIZATION);
                }
                Some(params)
            }
            None => {
                if self.hide_credentials {
                    req.headers.remove(AUTHORIZATION);
                }
                authorization.as_deref().and_then(HmacParams::parse)
            }
        };
        let params = params.ok_or_else(|| self.denied(HMAC_NOT_VALID))?;
        let names = params.header_names();
        if self
            .enforce_headers
            .iter()
            .any(|h| !names.contains(&h.as_bytes()))
        {
            return Err(self.denied(HMAC_NOT_VALID));
        }
        let digest = self
            .algorithms
            .iter()
            .find(|(name, _)| name.as_bytes() == params.algorithm)
            .map(|&(_, digest)| digest)
            .ok_or_else(|| self.denied(HMAC_NOT_VALID))?;
        let owned = std::str::from_utf8(params.username)
            .ok()
            .and_then(|username| consumers.hmac.get(username))
            .ok_or_else(|| self.denied(HMAC_NOT_VALID))?;
        let signing_string = hmac_signing_string(req, &names);
        let signature_ok = nginx_base64(params.signature, false).is_some_and(|signature| {
            digest.verify(owned.secret.as_bytes(), &signing_string, &signature)
        });
        if !signature_ok || (self.validate_request_body && !HmacAuth::body_matches(req)) {
            return Err(self.denied(HMAC_NOT_SAME));
        }
        Ok((
            Arc::clone(&owned.consumer),
            Credential {
                id: identifier(params.username, &owned.id),
            },
        ))
    }
}

impl Plugin for HmacAuth {
    fn filters_response(&self) -> bool {
        false
    }

    fn needs(&self) -> Needs {
        Needs {
            request_body: self.validate_request_body,
            ..Needs::default()
        }
    }

    fn access(&self, req: &mut PluginRequest<'_>, ctx: &mut Ctx<'_>) -> Flow {
        authenticate(req, ctx, self.anonymous.as_deref(), |req, ctx| {
            self.attempt(req, ctx.consumers, now())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plugins::consumers::{JwtSecret, Owned};
    use http::HeaderMap;

    fn request<'a>(method: Method, target: &'a str, headers: &[(&str, &str)]) -> PluginRequest<'a> {
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path, Some(Cow::Borrowed(query))),
            None => (target, None),
        };
        let mut map = HeaderMap::new();
        for (name, value) in headers {
            map.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_str(value).unwrap(),
            );
        }
        PluginRequest {
            method,
            version: http::Version::HTTP_11,
            path,
            query,
            headers: RequestHeaders::from_map(map),
            body: None,
            client_ip: std::net::IpAddr::from([127, 0, 0, 1]),
            client_addr: "127.0.0.1",
            connection: (std::net::IpAddr::from([127, 0, 0, 1]), 1, 1),
            https: false,
            target,
            local_port: 8000,
            upstream_path: None,
        }
    }

    fn consumer(username: &str, groups: &[&str]) -> Arc<Consumer> {
        let mut groups: Vec<Box<str>> = groups.iter().map(|g| (*g).into()).collect();
        groups.sort();
        let groups_value =
            (!groups.is_empty()).then(|| HeaderValue::from_str(&groups.join(", ")).unwrap());
        Arc::new(Consumer {
            id: "c-1".into(),
            username: Some(username.into()),
            custom_id: None,
            id_value: HeaderValue::from_static("c-1"),
            username_value: Some(HeaderValue::from_str(username).unwrap()),
            custom_id_value: None,
            groups,
            groups_value,
        })
    }

    #[test]
    fn nginx_base64_stops_at_padding_and_ignores_spare_bits() {
        assert_eq!(nginx_base64(b"Zm9v", false).unwrap(), b"foo");
        assert_eq!(nginx_base64(b"Zm9vYg", false).unwrap(), b"foob");
        assert_eq!(
            nginx_base64(b"Zm9vYg==trailing junk", false).unwrap(),
            b"foob"
        );
        // "Yh" leaves non-zero spare bits, which nginx drops.
        assert_eq!(nginx_base64(b"Zm9vYh", false).unwrap(), b"foob");
        assert_eq!(
            nginx_base64(b"Zm9vY", false),
            None,
            "one char over a quantum"
        );
        assert_eq!(nginx_base64(b"Zm9 v", false), None);
        assert_eq!(nginx_base64(b"-_8", true).unwrap(), [0xfb, 0xff]);
        assert_eq!(nginx_base64(b"-_8", false), None);
        assert_eq!(nginx_base64(b"+/8", false).unwrap(), [0xfb, 0xff]);
    }

    #[test]
    fn scheme_argument_follows_kongs_unanchored_patterns() {
        assert_eq!(
            scheme_argument(b"Basic Ym9i", b"basic", 0),
            Some(&b"Ym9i"[..])
        );
        assert_eq!(
            scheme_argument(b"basicYm9i", b"basic", 0),
            Some(&b"Ym9i"[..])
        );
        assert_eq!(
            scheme_argument(b"xx Basic  Ym9i ", b"basic", 0),
            Some(&b"Ym9i "[..])
        );
        // `(.+)` takes back one space when nothing else follows.
        assert_eq!(scheme_argument(b"Basic   ", b"basic", 0), Some(&b" "[..]));
        assert_eq!(scheme_argument(b"Basic", b"basic", 0), None);
        assert_eq!(scheme_argument(b"BASIC Ym9i", b"basic", 0), None);
        assert_eq!(
            scheme_argument(b"Bearer tok", b"bearer", 1),
            Some(&b"tok"[..])
        );
        assert_eq!(scheme_argument(b"Bearertok", b"bearer", 1), None);
        assert_eq!(
            scheme_argument(b"Bearerx bearer tok", b"bearer", 1),
            Some(&b"tok"[..])
        );
        assert_eq!(scheme_argument(b"Bearer ", b"bearer", 1), None);
        assert_eq!(scheme_argument(b"Bearer  ", b"bearer", 1), Some(&b" "[..]));
    }

    #[test]
    fn basic_user_password_split() {
        let split = |s: &[u8]| {
            UserPassword::split(Vec::from(s)).map(|u| (u.user().to_vec(), u.password().to_vec()))
        };
        assert_eq!(split(b"bob:s:3"), Some((b"bob".to_vec(), b"s:3".to_vec())));
        assert_eq!(split(b"bob:"), Some((b"bob".to_vec(), Vec::new())));
        // Leading colons are skipped by the unanchored search.
        assert_eq!(split(b"::bob:pw"), Some((b"bob".to_vec(), b"pw".to_vec())));
        assert_eq!(
            split(b"bob:pw\nrest"),
            Some((b"bob".to_vec(), b"pw".to_vec()))
        );
        assert_eq!(split(b":pw"), None);
        assert_eq!(split(b"bob"), None);
    }

    #[test]
    fn basic_auth_checks_the_stored_hash() {
        let mut consumers = Consumers::default();
        let bob = consumer("bob", &[]);
        consumers.basic.insert(
            "bob".into(),
            Owned {
                id: HeaderValue::from_static("cred-1"),
                consumer: Arc::clone(&bob),
                secret: gatehouse_model::entities::basic_auth_hash(&bob.id, "s:3").into(),
            },
        );
        let plugin = BasicAuth {
            anonymous: None,
            hide_credentials: true,
            www_authenticate: HeaderValue::from_static("Basic realm=\"service\""),
        };
        let mut req = request(Method::GET, "/", &[("authorization", "Basic Ym9iOnM6Mw==")]);
        let (who, credential) = plugin.attempt(&mut req, &consumers).ok().unwrap();
        assert_eq!(&*who.id, "c-1");
        assert_eq!(credential.id, "bob");
        assert!(req.headers.get(AUTHORIZATION).is_none(), "hidden");

        // bob:wrong
        let mut req = request(Method::GET, "/", &[("authorization", "Basic Ym9iOndyb25n")]);
        let denied = plugin.attempt(&mut req, &consumers).err().unwrap();
        assert_eq!(
            (denied.status, &*denied.message),
            (StatusCode::UNAUTHORIZED, "Unauthorized")
        );
        assert_eq!(denied.www_authenticate.unwrap(), "Basic realm=\"service\"");

        // A proxy header naming an unknown user falls back to Authorization.
        let mut req = request(
            Method::GET,
            "/",
            &[
                ("proxy-authorization", "Basic bm9ib2R5Onh4"),
                ("authorization", "Basic Ym9iOnM6Mw=="),
            ],
        );
        assert!(plugin.attempt(&mut req, &consumers).is_ok());
    }

    #[test]
    fn hmac_params_parse_like_kongs_greedy_pattern() {
        let parsed = HmacParams::parse(
            br#"hmac username="bob", algorithm="hmac-sha256", headers="date @request-target", signature="c2ln""#,
        )
        .unwrap();
        assert_eq!(
            parsed,
            HmacParams {
                username: b"bob",
                algorithm: b"hmac-sha256",
                headers: b"date @request-target",
                signature: b"c2ln",
            }
        );
        let tight =
            HmacParams::parse(br#"Hmac username="u",algorithm="a",headers="h",signature="s""#)
                .unwrap();
        assert_eq!((tight.username, tight.signature), (&b"u"[..], &b"s"[..]));
        // Greedy fields reach the last place the rest still matches.
        let greedy = HmacParams::parse(
            br#"hmac username="a", algorithm="b", headers="c", signature="d", extra="e""#,
        )
        .unwrap();
        assert_eq!(greedy.signature, br#"d", extra="e"#);
        let nested = HmacParams::parse(
            br#"hmac username="x", algorithm="y", headers="z", signature="s"", algorithm="b", headers="c", signature="d""#,
        )
        .unwrap();
        assert_eq!(
            nested.username,
            br#"x", algorithm="y", headers="z", signature="s""#
        );
        assert_eq!(nested.signature, b"d");
        assert_eq!(
            HmacParams::parse(br#"hmac username="u", headers="h", signature="s""#),
            None
        );
        assert_eq!(
            HmacParams::parse(br#"HMAC username="u",algorithm="a",headers="h",signature="s""#),
            None
        );
        assert_eq!(
            HmacParams::parse(br#"hmac username="", algorithm="a", headers="h", signature="s""#),
            None
        );

        let names = |headers: &'static [u8]| {
            HmacParams {
                username: b"",
                algorithm: b"",
                headers,
                signature: b"",
            }
            .header_names()
        };
        assert_eq!(names(b"date  digest"), vec![&b"date"[..], b"", b"digest"]);
        assert_eq!(names(b" "), vec![&b""[..]]);
    }

    #[test]
    fn hmac_signing_string_and_signature() {
        let req = request(
            Method::GET,
            "/x?a=1",
            &[
                ("date", "Thu, 01 Jan 2026 00:00:00 GMT"),
                ("content-md5", "md5"),
            ],
        );
        let names: [&[u8]; 3] = [b"date", b"@request-target", b"x-missing"];
        let signing = hmac_signing_string(&req, &names);
        assert_eq!(
            signing,
            b"date: Thu, 01 Jan 2026 00:00:00 GMT\n@request-target: get /x?a=1\nx-missing:"
        );
        // Reference values computed independently (Python's hmac module).
        let sha256 = nginx_base64(b"TlEVXkYdbfELuoSYCeVYlX7BII6U/kHUIaPvqXbYihk=", false).unwrap();
        let sha1 = nginx_base64(b"VB252ykR3YBTG9dy0lScegWudzQ=", false).unwrap();
        assert!(MacDigest::Sha256.verify(b"secret", &signing, &sha256));
        assert!(MacDigest::Sha1.verify(b"secret", &signing, &sha1));
        assert!(!MacDigest::Sha256.verify(b"secreT", &signing, &sha256));
        assert!(!MacDigest::Sha384.verify(b"secret", &signing, &sha256));

        let names: [&[u8]; 2] = [b"Content_MD5", b"request-line"];
        assert_eq!(
            hmac_signing_string(&req, &names),
            b"Content_MD5: md5\nGET /x?a=1 HTTP/1.1"
        );
        let mut h2 = req;
        h2.version = http::Version::HTTP_2;
        assert_eq!(
            hmac_signing_string(&h2, &names[1..]),
            b"GET /x?a=1 HTTP/2.0"
        );
    }

    #[test]
    fn hmac_auth_checks_date_algorithm_and_body() {
        let mut consumers = Consumers::default();
        consumers.hmac.insert(
            "bob".into(),
            Owned {
                id: HeaderValue::from_static("cred-1"),
                consumer: consumer("bob", &[]),
                secret: "secret".into(),
            },
        );
        let config = serde_json::json!({
            "hide_credentials": false, "clock_skew": 300, "validate_request_body": true,
            "enforce_headers": ["date"], "algorithms": ["hmac-sha256"],
        });
        let plugin = HmacAuth::build(typed(&config).unwrap()).unwrap();
        let now = parse_http_time(b"Thu, 01 Jan 2026 00:00:00 GMT").unwrap();
        let auth = r#"hmac username="bob", algorithm="hmac-sha256", headers="date @request-target x-missing", signature="TlEVXkYdbfELuoSYCeVYlX7BII6U/kHUIaPvqXbYihk=""#;
        let headers = [
            ("date", "Thu, 01 Jan 2026 00:00:00 GMT"),
            ("authorization", auth),
        ];
        let message = |req: &mut PluginRequest<'_>, now| {
            plugin
                .attempt(req, &consumers, now)
                .err()
                .map(|d| d.message)
        };

        assert_eq!(
            message(&mut request(Method::GET, "/x?a=1", &headers), now),
            None
        );
        assert_eq!(
            message(&mut request(Method::GET, "/x?a=1", &headers), now + 301).as_deref(),
            Some(HMAC_NO_DATE)
        );
        assert_eq!(
            message(&mut request(Method::GET, "/x?a=2", &headers), now).as_deref(),
            Some(HMAC_NOT_SAME)
        );
        let mut with_body = request(Method::GET, "/x?a=1", &headers);
        with_body.body = Some(bytes::Bytes::from_static(b"hello"));
        assert_eq!(
            message(&mut with_body, now).as_deref(),
            Some(HMAC_NOT_SAME),
            "a body needs a digest"
        );
        with_body.headers.insert(
            HeaderName::from_static("digest"),
            HeaderValue::from_static("SHA-256=LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ="),
        );
        assert_eq!(message(&mut with_body, now), None);

        let sha1 = auth.replace("hmac-sha256", "hmac-sha1");
        let headers = [
            ("date", "Thu, 01 Jan 2026 00:00:00 GMT"),
            ("authorization", sha1.as_str()),
        ];
        assert_eq!(
            message(&mut request(Method::GET, "/x?a=1", &headers), now).as_deref(),
            Some(HMAC_NOT_VALID),
            "algorithm not allowed"
        );
    }

    #[test]
    fn http_dates_parse_as_nginx_does() {
        let expected = Some(784_111_777);
        assert_eq!(parse_http_time(b"Sun, 06 Nov 1994 08:49:37 GMT"), expected);
        assert_eq!(parse_http_time(b"Sunday, 06-Nov-94 08:49:37 GMT"), expected);
        assert_eq!(parse_http_time(b"Sun Nov  6 08:49:37 1994"), expected);
        // nginx checks neither the weekday nor the zone.
        assert_eq!(parse_http_time(b"Mon, 06 Nov 1994 08:49:37 XYZ"), expected);
        assert_eq!(
            parse_http_time(b"Thu, 29 Feb 1996 00:00:00 GMT"),
            Some(825_552_000)
        );
        assert_eq!(
            parse_http_time(b"Thu, 01 Mar 1996 00:00:00 GMT"),
            Some(825_552_000 + 86_400)
        );
        assert_eq!(
            parse_http_time(b"Thu, 00 Mar 1996 00:00:00 GMT"),
            Some(825_552_000),
            "day 0"
        );
        assert_eq!(parse_http_time(b"Thu, 01 Jan 1970 00:00:00 GMT"), Some(0));
        assert_eq!(parse_http_time(b"Thu, 29 Feb 1900 00:00:00 GMT"), None);
        assert!(parse_http_time(b"Thu, 30 Apr 1996 00:00:00 GMT").is_some());
        assert_eq!(parse_http_time(b"Thu, 31 Apr 1996 00:00:00 GMT"), None);
        assert_eq!(parse_http_time(b"Thu, 01 Jan 2026 24:00:00 GMT"), None);
        assert_eq!(parse_http_time(b"Thu, 01 Xyz 2026 00:00:00 GMT"), None);
        assert_eq!(parse_http_time(b"01 Jan 2026 00:00:00 GMT"), None);
        assert_eq!(parse_http_time(b"2026-01-01T00:00:00Z"), None);
        assert_eq!(parse_http_time(b""), None);
    }

    fn values(headers: &HeaderMap) -> impl Iterator<Item = &[u8]> {
        headers.get_all(COOKIE).iter().map(HeaderValue::as_bytes)
    }

    #[test]
    fn cookies_are_found_as_nginx_finds_them() {
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, HeaderValue::from_static("a=1; JWT = tok ;b=2"));
        headers.append(COOKIE, HeaderValue::from_static("c=3"));
        assert_eq!(cookie(values(&headers), b"jwt"), Some(&b"tok "[..]));
        assert_eq!(cookie(values(&headers), b"c"), Some(&b"3"[..]));
        assert_eq!(cookie(values(&headers), b"b"), Some(&b"2"[..]));
        assert_eq!(cookie(values(&headers), b"d"), None);
        let mut headers = HeaderMap::new();
        headers.append(COOKIE, HeaderValue::from_static("jwtx=1, jwt=2"));
        assert_eq!(cookie(values(&headers), b"jwt"), Some(&b"2"[..]));
    }

    fn jwt_consumers(key: &str, secret: &str) -> Consumers {
        let mut consumers = Consumers::default();
        consumers.jwt.insert(
            key.into(),
            Owned {
                id: HeaderValue::from_static("cred-1"),
                consumer: consumer("bob", &[]),
                secret: JwtSecret {
                    algorithm: "HS256".into(),
                    secret: Some(secret.into()),
                    rsa_public_key: None,
                },
            },
        );
        consumers
    }

    fn jwt_plugin(config: serde_json::Value, consumers: &Consumers) -> Jwt {
        let mut full = serde_json::json!({
            "uri_param_names": ["jwt"], "cookie_names": [], "header_names": ["authorization"],
            "key_claim_name": "iss", "secret_is_base64": false, "run_on_preflight": true,
            "maximum_expiration": 0,
        });
        full.as_object_mut()
            .unwrap()
            .extend(config.as_object().unwrap().clone());
        Jwt::build(typed(&full).unwrap(), consumers).unwrap()
    }

    /// HS256 with "jwt-shared-secret-1": `{"iss":"jwt-key-1","sub":"bob"}`.
    const VALID: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqd3Qta2V5LTEiLCJzdWIiOiJib2IifQ.FkJS2yqwxIkgu_73gaqE-YeMvQDljNfPtQnnaAteA60";
    /// Same secret: `{"iss":"jwt-key-1","exp":1000000000}`.
    const EXPIRED: &str = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiJ9.eyJpc3MiOiJqd3Qta2V5LTEiLCJleHAiOjEwMDAwMDAwMDB9.Ym5zjFh63kwlOA5CSZLUc9BV-XO5ObpSAM8M5EUjq_Q";

    #[test]
    fn jwt_tokens_are_gathered_from_query_cookies_and_headers() {
        let consumers = Consumers::default();
        let plugin = jwt_plugin(serde_json::json!({"cookie_names": ["tok"]}), &consumers);
        let req = request(
            Method::GET,
            "/?jwt=a&jwt=&other=b",
            &[("cookie", "tok=a"), ("authorization", "Bearer c")],
        );
        assert_eq!(
            plugin.tokens(&req),
            vec![
                Token::Text(Cow::Borrowed(b"a")),
                Token::Text(Cow::Borrowed(b"c"))
            ]
        );
        let req = request(Method::GET, "/?jwt", &[]);
        assert_eq!(plugin.tokens(&req), vec![Token::Flag]);
    }

    #[test]
    fn jwt_verifies_signature_key_and_claims() {
        let consumers = jwt_consumers("jwt-key-1", "jwt-shared-secret-1");
        let plugin = jwt_plugin(serde_json::json!({"claims_to_verify": ["exp"]}), &consumers);
        let run = |plugin: &Jwt, target: &str, now: i64| {
            plugin
                .attempt(&request(Method::GET, target, &[]), &consumers, now)
                .map(|(_, credential)| credential.id)
        };
        let now = 1_700_000_000;
        let expired = format!("/?jwt={EXPIRED}");
        let mut errors = serde_json::Map::new();
        errors.insert("exp".into(), "token expired".into());
        assert_eq!(run(&plugin, &expired, now), Err(JwtFailure::Claims(errors)));
        assert_eq!(
            run(&plugin, &expired, 999_999_999),
            Ok(HeaderValue::from_static("jwt-key-1"))
        );

        let valid = format!("/?jwt={VALID}");
        let mut errors = serde_json::Map::new();
        errors.insert("exp".into(), "must be a number".into());
        assert_eq!(run(&plugin, &valid, now), Err(JwtFailure::Claims(errors)));
        let lenient = jwt_plugin(serde_json::json!({}), &consumers);
        assert_eq!(
            run(&lenient, &valid, now),
            Ok(HeaderValue::from_static("jwt-key-1"))
        );

        let tampered = format!("/?jwt={}", VALID.replace("FkJS", "FkJT"));
        assert_eq!(
            run(&lenient, &tampered, now),
            Err(JwtFailure::Invalid("Invalid signature".into()))
        );
        let other_secret = jwt_consumers("jwt-key-1", "another");
        assert_eq!(
            lenient
                .attempt(&request(Method::GET, &valid, &[]), &other_secret, now)
                .err(),
            Some(JwtFailure::Invalid("Invalid signature".into()))
        );
        let unknown = jwt_consumers("jwt-key-2", "jwt-shared-secret-1");
        assert_eq!(
            lenient
                .attempt(&request(Method::GET, &valid, &[]), &unknown, now)
                .err(),
            Some(JwtFailure::Invalid(
                "No credentials found for given 'iss'".into()
            ))
        );
        let by_sub = jwt_plugin(serde_json::json!({"key_claim_name": "kid"}), &consumers);
        assert_eq!(
            run(&by_sub, &valid, now),
            Err(JwtFailure::Invalid("No mandatory 'kid' in claims".into()))
        );
    }

    #[test]
    fn jwt_maximum_expiration_and_base64_secrets() {
        // "jwt-shared-secret-1" in base64url.
        let consumers = jwt_consumers("jwt-key-1", "and0LXNoYXJlZC1zZWNyZXQtMQ");
        let plugin = jwt_plugin(
            serde_json::json!({"secret_is_base64": true, "claims_to_verify": ["exp"], "maximum_expiration": 60}),
            &consumers,
        );
        let expired = format!("/?jwt={EXPIRED}");
        let req = request(Method::GET, &expired, &[]);
        assert!(plugin.attempt(&req, &consumers, 999_999_990).is_ok());
        let mut errors = serde_json::Map::new();
        errors.insert("exp".into(), "exceeds maximum allowed expiration".into());
        assert_eq!(
            plugin.attempt(&req, &consumers, 999_999_000).err(),
            Some(JwtFailure::Claims(errors))
        );
        let not_base64 = jwt_consumers("jwt-key-1", "not base64!");
        let plugin = jwt_plugin(serde_json::json!({"secret_is_base64": true}), &not_base64);
        assert_eq!(
            plugin.attempt(&req, &not_base64, 0).err(),
            Some(JwtFailure::Invalid("Invalid key/secret".into()))
        );
    }

    #[test]
    fn jwt_decoding_reports_kongs_errors() {
        let bad = |why: &str| Err(JwtFailure::Invalid(format!("Bad token; {why}").into()));
        let decode = |token: &str| DecodedJwt::decode(token.as_bytes()).map(|jwt| jwt.alg);
        let header = |json: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(json);
        let claims = header(r#"{"iss":"k"}"#);
        assert_eq!(decode("abc"), bad("invalid JSON"));
        assert_eq!(
            decode(&format!("{}.{claims}", header(r#"{"alg":"HS256"}"#))),
            bad("invalid JSON")
        );
        assert_eq!(
            decode(&format!("{}.{claims}.", header(r#"{"alg":"HS256"}"#))),
            Ok(JwtAlg::Hs256)
        );
        assert_eq!(
            decode(&format!("{}.{claims}.sig", header(r#"{"alg":"none"}"#))),
            bad("invalid alg")
        );
        assert_eq!(
            decode(&format!("{}.{claims}.sig", header("[1]"))),
            bad("invalid alg")
        );
        assert_eq!(
            decode(&format!("{}.{claims}.sig", header("7"))),
            Err(JwtFailure::Unexpected)
        );
        assert_eq!(
            decode(&format!(
                "{}.{}.sig",
                header(r#"{"alg":"ES256"}"#),
                header("false")
            )),
            bad("invalid claims")
        );
        assert_eq!(
            decode(&format!("{}.{claims}.s.g", header(r#"{"alg":"EdDSA"}"#))),
            bad("invalid signature")
        );
    }

    #[test]
    fn jwt_public_keys_are_parsed_once_and_checked() {
        let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let (key, algorithm) = JwtAlg::Es256
            .public_key(&key_pair.public_key_pem())
            .unwrap();
        assert_eq!(algorithm, jsonwebtoken::Algorithm::ES256);
        let signing =
            jsonwebtoken::EncodingKey::from_ec_pem(key_pair.serialize_pem().as_bytes()).unwrap();
        let signature = jsonwebtoken::crypto::sign(b"h.c", &signing, algorithm).unwrap();
        let signature = nginx_base64(signature.as_bytes(), true).unwrap();
        let public = JwtKey::Public(key, algorithm);
        assert_eq!(
            verify_public(JwtAlg::Es256, &public, b"h.c", &signature),
            Ok(true)
        );
        assert_eq!(
            verify_public(JwtAlg::Es256, &public, b"h.d", &signature),
            Ok(false)
        );
        assert_eq!(
            verify_public(JwtAlg::Es256, &public, b"h.c", &signature[1..]),
            Err(JwtFailure::Unexpected),
            "Kong asserts a 64-byte ES256 signature"
        );
        assert!(JwtAlg::Rs256.public_key("not a key").is_err());
        assert_eq!(
            verify_public(JwtAlg::Rs256, &JwtKey::Missing, b"", b""),
            Err(JwtFailure::Invalid("Invalid key/secret".into()))
        );
    }

    #[test]
    fn acl_decides_from_the_consumers_groups() {
        let acl = |config: serde_json::Value| Acl::build(typed(&config).unwrap()).unwrap();
        let allow = acl(serde_json::json!({"allow": ["gold", "silver"]}));
        let deny = acl(serde_json::json!({"deny": ["blocked"]}));
        let gold = consumer("bob", &["gold", "admin"]);
        let blocked = consumer("eve", &["blocked"]);
        let none = consumer("ann", &[]);
        assert_eq!(
            allow.verdict(Some(&gold), true),
            AclVerdict::Allowed(Some(HeaderValue::from_static("admin, gold")))
        );
        assert_eq!(allow.verdict(Some(&blocked), true), AclVerdict::Forbidden);
        assert_eq!(allow.verdict(Some(&none), true), AclVerdict::Forbidden);
        assert_eq!(allow.verdict(Some(&none), false), AclVerdict::Unauthorized);
        assert_eq!(allow.verdict(None, false), AclVerdict::Unauthorized);
        assert_eq!(deny.verdict(Some(&blocked), true), AclVerdict::Forbidden);
        assert_eq!(deny.verdict(Some(&none), true), AclVerdict::Allowed(None));
        assert_eq!(deny.verdict(None, true), AclVerdict::Forbidden);
        let empty_deny = acl(serde_json::json!({"deny": []}));
        assert_eq!(
            empty_deny.verdict(Some(&gold), true),
            AclVerdict::Unexpected
        );
    }

    #[test]
    fn es512_verifies_with_p521_keys() {
        use p521::ecdsa::signature::Signer;
        use p521::pkcs8::{EncodePublicKey, LineEnding};
        let mut scalar = [0u8; 66];
        scalar[65] = 7;
        let signing = p521::ecdsa::SigningKey::from_slice(&scalar).expect("a scalar");
        let verifying = p521::ecdsa::VerifyingKey::from(&signing);
        let pem = p521::PublicKey::from_affine(*verifying.as_affine())
            .expect("a point")
            .to_public_key_pem(LineEnding::LF)
            .expect("pem");
        let key = JwtKey::P521(Box::new(p521_key(&pem).expect("a P-521 key")));
        let signature: p521::ecdsa::Signature = signing.sign(b"h.c");
        let signature = signature.to_bytes();
        assert_eq!(signature.len(), 132);
        assert_eq!(
            verify_public(JwtAlg::Es512, &key, b"h.c", &signature),
            Ok(true)
        );
        assert_eq!(
            verify_public(JwtAlg::Es512, &key, b"h.d", &signature),
            Ok(false)
        );
        assert_eq!(
            verify_public(JwtAlg::Es512, &key, b"h.c", &signature[1..]),
            Err(JwtFailure::Unexpected),
            "Kong asserts a 132-byte ES512 signature"
        );
        assert!(p521_key("not a key").is_err());
    }
}
