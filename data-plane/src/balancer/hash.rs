//! What consistent hashing hashes: Kong's `hash_on`/`hash_fallback` value
//! taken from the request, and xxHash32, the hash Kong's ring uses, so
//! that a client lands on the same target as it would behind Kong for the
//! same target set.

use std::borrow::Cow;

use gatehouse_model::snapshot::Upstream;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use regex::Regex;

/// The parts of a request a hash can be taken from.
pub(crate) struct HashInput<'r> {
    /// The client address as text (nginx's `remote_addr`).
    pub(crate) client_ip: &'r [u8],
    pub(crate) headers: &'r HeaderMap,
    /// The normalized request path (nginx's `uri`).
    pub(crate) path: &'r str,
    pub(crate) query: Option<&'r str>,
    /// The regex of the route path that matched, for `uri_capture`.
    pub(crate) path_regex: Option<&'r Regex>,
}

/// A request's point on the ring, and the cookie to set when the hash
/// cookie was missing.
pub(crate) struct Hashed {
    pub(crate) point: u32,
    pub(crate) set_cookie: Option<HeaderValue>,
}

/// An upstream's `hash_on` and `hash_fallback`.
#[derive(Debug, PartialEq)]
pub(crate) struct HashSpec {
    first: HashOn,
    fallback: HashOn,
}

#[derive(Debug, PartialEq)]
enum HashOn {
    None,
    /// No consumers yet: always falls back.
    Consumer,
    Ip,
    Header(HeaderName),
    Cookie {
        name: Box<str>,
        /// `; Path=…; Same-Site=Lax; HttpOnly`, as Kong writes it.
        attributes: Box<str>,
    },
    Path,
    QueryArg(Box<str>),
    UriCapture(Box<str>),
}

impl HashSpec {
    pub(crate) fn new(upstream: &Upstream) -> HashSpec {
        let cookie = || HashOn::Cookie {
            name: upstream.hash_on_cookie.as_deref().unwrap_or("").into(),
            attributes: format!(
                "; Path={}; Same-Site=Lax; HttpOnly",
                upstream.hash_on_cookie_path.as_deref().unwrap_or("/")
            )
            .into(),
        };
        let parse =
            |on: Option<&str>, header: Option<&str>, arg: Option<&str>, capture: Option<&str>| {
                match on.unwrap_or("none") {
                    "consumer" => HashOn::Consumer,
                    "ip" => HashOn::Ip,
                    "header" => match header.and_then(|name| HeaderName::try_from(name).ok()) {
                        Some(name) => HashOn::Header(name),
                        None => HashOn::None,
                    },
                    "cookie" => cookie(),
                    "path" => HashOn::Path,
                    "query_arg" => HashOn::QueryArg(arg.unwrap_or("").into()),
                    "uri_capture" => HashOn::UriCapture(capture.unwrap_or("").into()),
                    _ => HashOn::None,
                }
            };
        HashSpec {
            first: parse(
                upstream.hash_on.as_deref(),
                upstream.hash_on_header.as_deref(),
                upstream.hash_on_query_arg.as_deref(),
                upstream.hash_on_uri_capture.as_deref(),
            ),
            fallback: parse(
                upstream.hash_fallback.as_deref(),
                upstream.hash_fallback_header.as_deref(),
                upstream.hash_fallback_query_arg.as_deref(),
                upstream.hash_fallback_uri_capture.as_deref(),
            ),
        }
    }

    /// Whether a route needs its path regexes kept for this upstream.
    /// Whether a hash reads [`HashInput::headers`] (header or cookie).
    pub(crate) fn reads_headers(&self) -> bool {
        [&self.first, &self.fallback]
            .iter()
            .any(|on| matches!(on, HashOn::Header(_) | HashOn::Cookie { .. }))
    }

    pub(crate) fn uses_uri_captures(&self) -> bool {
        matches!(self.first, HashOn::UriCapture(_))
            || matches!(self.fallback, HashOn::UriCapture(_))
    }

    /// Kong's `get_value_to_hash`: the first value found, else the
    /// fallback's, else the empty string. A missing hash cookie is created.
    pub(crate) fn hash(&self, input: &HashInput<'_>) -> Hashed {
        let mut set_cookie = None;
        let value = match self.first.value(input, &mut set_cookie) {
            Some(value) => value,
            None if self.fallback == HashOn::None => Cow::Borrowed(&b""[..]),
            None => self
                .fallback
                .value(input, &mut set_cookie)
                .unwrap_or(Cow::Borrowed(&b""[..])),
        };
        Hashed {
            point: xxh32(&value),
            set_cookie,
        }
    }
}

impl HashOn {
    fn value<'r>(
        &self,
        input: &HashInput<'r>,
        set_cookie: &mut Option<HeaderValue>,
    ) -> Option<Cow<'r, [u8]>> {
        match self {
            HashOn::None | HashOn::Consumer => None,
            HashOn::Ip => Some(Cow::Borrowed(input.client_ip)),
            HashOn::Header(name) => header_value(input.headers, name),
            HashOn::Cookie { name, attributes } => {
                if let Some(value) = cookie(input.headers, name) {
                    return Some(Cow::Borrowed(value));
                }
                let value = uuid::Uuid::new_v4().to_string();
                *set_cookie = HeaderValue::try_from(format!("{name}={value}{attributes}")).ok();
                Some(Cow::Owned(value.into_bytes()))
            }
            HashOn::Path => Some(Cow::Borrowed(input.path.as_bytes())),
            HashOn::QueryArg(name) => {
                query_arg(input.query?, name).map(|value| Cow::Owned(value.into_bytes()))
            }
            HashOn::UriCapture(group) => {
                let captures = input.path_regex?.captures(input.path)?;
                let found = match group.parse::<usize>() {
                    Ok(index) => captures.get(index),
                    Err(_) => captures.name(group),
                }?;
                Some(Cow::Owned(found.as_str().as_bytes().to_vec()))
            }
        }
    }
}

/// nginx's `$http_name`: the header's values joined with `, `.
fn header_value<'r>(headers: &'r HeaderMap, name: &HeaderName) -> Option<Cow<'r, [u8]>> {
    let mut values = headers.get_all(name).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return Some(Cow::Borrowed(first.as_bytes()));
    };
    let mut joined = first.as_bytes().to_vec();
    for value in std::iter::once(second).chain(values) {
        joined.extend_from_slice(b", ");
        joined.extend_from_slice(value.as_bytes());
    }
    Some(Cow::Owned(joined))
}

/// nginx's `$cookie_name`: the first cookie of that name, undecoded.
fn cookie<'r>(headers: &'r HeaderMap, name: &str) -> Option<&'r [u8]> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .flat_map(|value| value.as_bytes().split(|byte| *byte == b';'))
        .find_map(|pair| {
            let pair = pair.trim_ascii_start();
            let rest = pair.strip_prefix(name.as_bytes())?;
            rest.strip_prefix(b"=")
        })
}

/// `ngx.req.get_uri_args()[name]` as Kong normalizes it: decoded, a bare
/// `name` is `true`, several values are sorted and joined with `,`.
fn query_arg(query: &str, name: &str) -> Option<String> {
    let mut values: Vec<String> = Vec::new();
    for pair in query.split('&').filter(|pair| !pair.is_empty()) {
        let (key, value) = match pair.split_once('=') {
            Some((key, value)) => (key, Some(value)),
            None => (pair, None),
        };
        if decode(key) != name {
            continue;
        }
        values.push(match value {
            Some(value) => decode(value),
            None => "true".to_owned(),
        });
    }
    match values.len() {
        0 => None,
        1 => values.pop(),
        _ => {
            values.sort();
            Some(values.join(","))
        }
    }
}

fn decode(text: &str) -> String {
    let plus_decoded = text.replace('+', " ");
    percent_encoding::percent_decode_str(&plus_decoded)
        .decode_utf8_lossy()
        .into_owned()
}

/// xxHash32 with seed 0 (the `luaxxhash` Kong's ring uses).
pub(crate) fn xxh32(input: &[u8]) -> u32 {
    const P1: u32 = 0x9E37_79B1;
    const P2: u32 = 0x85EB_CA77;
    const P3: u32 = 0xC2B2_AE3D;
    const P4: u32 = 0x27D4_EB2F;
    const P5: u32 = 0x1656_67B1;
    fn round(acc: u32, lane: u32) -> u32 {
        acc.wrapping_add(lane.wrapping_mul(P2))
            .rotate_left(13)
            .wrapping_mul(P1)
    }
    fn lane(bytes: &[u8]) -> u32 {
        u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
    }

    let mut rest = input;
    let mut hash = if input.len() >= 16 {
        let mut v1 = P1.wrapping_add(P2);
        let mut v2 = P2;
        let mut v3 = 0u32;
        let mut v4 = 0u32.wrapping_sub(P1);
        while rest.len() >= 16 {
            v1 = round(v1, lane(&rest[0..4]));
            v2 = round(v2, lane(&rest[4..8]));
            v3 = round(v3, lane(&rest[8..12]));
            v4 = round(v4, lane(&rest[12..16]));
            rest = &rest[16..];
        }
        v1.rotate_left(1)
            .wrapping_add(v2.rotate_left(7))
            .wrapping_add(v3.rotate_left(12))
            .wrapping_add(v4.rotate_left(18))
    } else {
        P5
    };
    // The length modulo 2^32, as the reference implementation adds it.
    hash = hash.wrapping_add(input.len() as u32);
    while rest.len() >= 4 {
        hash = hash
            .wrapping_add(lane(rest).wrapping_mul(P3))
            .rotate_left(17)
            .wrapping_mul(P4);
        rest = &rest[4..];
    }
    for &byte in rest {
        hash = hash
            .wrapping_add(u32::from(byte).wrapping_mul(P5))
            .rotate_left(11)
            .wrapping_mul(P1);
    }
    hash ^= hash >> 15;
    hash = hash.wrapping_mul(P2);
    hash ^= hash >> 13;
    hash = hash.wrapping_mul(P3);
    hash ^= hash >> 16;
    hash
}

#[cfg(test)]
mod tests;
