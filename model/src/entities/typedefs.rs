//! Reusable field definitions (Kong's `kong/db/schema/typedefs.lua`) and
//! their custom validators.

use serde_json::{json, Value};

use crate::schema::Field;

/// Every protocol a service or route can speak, sorted as Kong lists them.
pub const PROTOCOLS: [&str; 8] = [
    "grpc",
    "grpcs",
    "http",
    "https",
    "tcp",
    "tls",
    "tls_passthrough",
    "udp",
];

/// Protocols of the http subsystem (default `protocols` of plugins).
pub const HTTP_PROTOCOLS: [&str; 4] = ["grpc", "grpcs", "http", "https"];

pub fn uuid() -> Field {
    Field::string()
        .uuid()
        .auto()
        .description("A string representing a UUID (universally unique identifier).")
}

pub fn auto_timestamp_s() -> Field {
    Field::integer()
        .timestamp()
        .auto()
        .description("An integer representing an automatic Unix timestamp in seconds.")
}

pub fn auto_timestamp_ms() -> Field {
    Field::number()
        .timestamp()
        .auto()
        .description("A number representing an automatic Unix timestamp in milliseconds.")
}

pub fn protocol() -> Field {
    Field::string().one_of(PROTOCOLS)
}

pub fn protocols() -> Field {
    Field::set(protocol())
        .required()
        .default(json!(HTTP_PROTOCOLS))
        .description("A set of strings representing protocols.")
}

pub fn protocols_http() -> Field {
    Field::set(Field::string().one_of(HTTP_PROTOCOLS))
        .required()
        .default(json!(HTTP_PROTOCOLS))
}

pub fn host() -> Field {
    Field::string().custom(validate_host)
}

pub fn host_with_optional_port() -> Field {
    Field::string().custom(validate_host_with_optional_port)
}

pub fn wildcard_host() -> Field {
    Field::string().custom(validate_wildcard_host)
}

pub fn sni() -> Field {
    Field::string().custom(validate_sni)
}

pub fn port() -> Field {
    Field::integer().between(0.0, 65535.0)
}

pub fn path() -> Field {
    Field::string()
        .starts_with("/")
        .match_none("//", "//", "must not have empty segments")
        .custom(validate_path)
}

pub fn timeout() -> Field {
    Field::integer().between(0.0, 2147483646.0)
}

pub fn name() -> Field {
    Field::string().unique().custom(validate_name)
}

pub fn utf8_name() -> Field {
    Field::string()
        .unique()
        .custom(validate_utf8_name)
        .description("A unique string representing a UTF-8 encoded name.")
}

pub fn tags() -> Field {
    Field::set(Field::string().required().custom(validate_tag))
        .description("A set of strings representing tags.")
}

pub fn header_name() -> Field {
    Field::string().custom(validate_header_name)
}

pub fn cookie_name() -> Field {
    Field::string().custom(validate_http_token)
}

pub fn headers() -> Field {
    Field::map(header_name(), Field::array(Field::string()))
}

/// Kong's `typedefs.hosts`: host names with at most one wildcard, at the
/// leftmost or rightmost label, and an optional port.
pub fn hosts() -> Field {
    Field::array(
        Field::string()
            .match_all(
                "^[^*]*%*?[^*]*$",
                r"^[^*]*\*?[^*]*$",
                "invalid wildcard: must have at most one wildcard",
            )
            .match_any(
                &[
                    ("^%*%.", r"^\*\."),
                    ("%.%*$", r"\.\*$"),
                    ("^[^*]*$", r"^[^*]*$"),
                ],
                "invalid wildcard: must be placed at leftmost or rightmost label",
            )
            .custom(validate_host_with_wildcards),
    )
}

fn validate_host_with_wildcards(v: &Value) -> Result<(), String> {
    let host = str_of(v).replace('*', "abc");
    validate_host_with_optional_port(&Value::String(host))
}

pub fn http_method() -> Field {
    Field::string().matches("^%u+$", "^[A-Z]+$")
}

pub fn certificate() -> Field {
    Field::string().custom(validate_certificate)
}

pub fn key() -> Field {
    Field::string().custom(validate_key)
}

pub fn ip_or_cidr() -> Field {
    Field::string().custom(validate_ip_or_cidr)
}

pub fn redis_host() -> Field {
    host()
}

/// A host or address split as Kong's `normalize_ip` does.
#[derive(Debug, PartialEq, Eq)]
pub struct HostPort<'a> {
    pub host: &'a str,
    pub kind: HostKind,
    pub port: Option<u16>,
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum HostKind {
    Ipv4,
    Ipv6,
    Name,
}

#[derive(Debug, PartialEq, Eq)]
pub enum HostError {
    Invalid,
    InvalidPort,
}

pub fn normalize_ip(s: &str) -> Result<HostPort<'_>, HostError> {
    let parse_port = |p: &str| -> Result<Option<u16>, HostError> {
        if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err(HostError::InvalidPort);
        }
        p.parse::<u16>()
            .map(Some)
            .map_err(|_| HostError::InvalidPort)
    };
    if let Some(rest) = s.strip_prefix('[') {
        let (addr, after) = rest.split_once(']').ok_or(HostError::Invalid)?;
        addr.parse::<std::net::Ipv6Addr>()
            .map_err(|_| HostError::Invalid)?;
        let port = match after {
            "" => None,
            p => parse_port(p.strip_prefix(':').ok_or(HostError::Invalid)?)?,
        };
        return Ok(HostPort {
            host: addr,
            kind: HostKind::Ipv6,
            port,
        });
    }
    if s.matches(':').count() > 1 {
        s.parse::<std::net::Ipv6Addr>()
            .map_err(|_| HostError::Invalid)?;
        return Ok(HostPort {
            host: s,
            kind: HostKind::Ipv6,
            port: None,
        });
    }
    let (host, port) = match s.split_once(':') {
        Some((h, p)) => (h, parse_port(p)?),
        None => (s, None),
    };
    if host.is_empty() {
        return Err(HostError::Invalid);
    }
    let looks_ipv4 = host.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if looks_ipv4 {
        if host.parse::<std::net::Ipv4Addr>().is_ok() {
            return Ok(HostPort {
                host,
                kind: HostKind::Ipv4,
                port,
            });
        }
        return Err(HostError::Invalid);
    }
    let valid_name = host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if !valid_name {
        return Err(HostError::Invalid);
    }
    Ok(HostPort {
        host,
        kind: HostKind::Name,
        port,
    })
}

fn str_of(v: &Value) -> &str {
    v.as_str().unwrap_or("")
}

pub fn validate_host(v: &Value) -> Result<(), String> {
    let host = str_of(v);
    match normalize_ip(host) {
        Err(HostError::Invalid) => Err(format!("invalid value: {host}")),
        Err(HostError::InvalidPort) => Err("must not have a port".into()),
        Ok(h) if h.port.is_some() => Err("must not have a port".into()),
        Ok(_) => Ok(()),
    }
}

pub fn validate_host_with_optional_port(v: &Value) -> Result<(), String> {
    let host = str_of(v);
    match normalize_ip(host) {
        Ok(_) => Ok(()),
        Err(HostError::InvalidPort) => Err("invalid port number".into()),
        Err(HostError::Invalid) => Err(format!("invalid value: {host}")),
    }
}

pub fn validate_sni(v: &Value) -> Result<(), String> {
    let host = str_of(v);
    match normalize_ip(host) {
        Err(HostError::Invalid) => Err(format!("invalid value: {host}")),
        Err(HostError::InvalidPort) => Err("must not have a port".into()),
        Ok(h) if h.kind != HostKind::Name => Err("must not be an IP".into()),
        Ok(h) if h.port.is_some() => Err("must not have a port".into()),
        Ok(_) => Ok(()),
    }
}

pub fn validate_wildcard_host(v: &Value) -> Result<(), String> {
    let host = str_of(v);
    let mut mock = host.to_owned();
    if let Some(idx) = host.find('*') {
        if idx != 0 && idx != host.len() - 1 {
            return Err("wildcard must be leftmost or rightmost character".into());
        }
        if host.matches('*').count() > 1 {
            return Err("only one wildcard must be specified".into());
        }
        mock = host.replace('*', "wildcard");
    }
    match normalize_ip(&mock) {
        Err(HostError::Invalid) => Err(format!("invalid value: {mock}")),
        Err(HostError::InvalidPort) => Err("must not have a port".into()),
        Ok(h) if h.kind != HostKind::Name => Err("must not be an IP".into()),
        Ok(h) if h.port.is_some() => Err("must not have a port".into()),
        Ok(_) => Ok(()),
    }
}

pub fn validate_path(v: &Value) -> Result<(), String> {
    let path = str_of(v);
    let allowed = |c: char| c.is_ascii_alphanumeric() || ".-_~/%:@!$&'()*+,;=".contains(c);
    if !path.starts_with('/') || !path.chars().all(allowed) {
        return Err(format!(
            "invalid path: '{path}' (characters outside of the reserved list of RFC 3986 found)"
        ));
    }
    check_percent_encoding(path)
}

/// Every `%` must start a two-hex-digit escape.
pub fn check_percent_encoding(path: &str) -> Result<(), String> {
    let bytes = path.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let ok = bytes.get(i + 1).is_some_and(u8::is_ascii_hexdigit)
                && bytes.get(i + 2).is_some_and(u8::is_ascii_hexdigit);
            if !ok {
                let end = (i + 3).min(bytes.len());
                let frag = String::from_utf8_lossy(&bytes[i..end]);
                return Err(format!("invalid url-encoded value: '{frag}'"));
            }
            i += 3;
        } else {
            i += 1;
        }
    }
    Ok(())
}

pub fn validate_name(v: &Value) -> Result<(), String> {
    let name = str_of(v);
    if name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'~'))
    {
        Ok(())
    } else {
        Err(format!(
            "invalid value '{name}': it must only contain alphanumeric and '., -, _, ~' characters"
        ))
    }
}

pub fn validate_utf8_name(v: &Value) -> Result<(), String> {
    let name = str_of(v);
    if name
        .chars()
        .all(|c| !c.is_ascii() || c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | '~'))
    {
        Ok(())
    } else {
        Err(format!(
            "invalid value '{name}': the only accepted ascii characters are alphanumerics or ., -, _, and ~"
        ))
    }
}

pub fn validate_tag(v: &Value) -> Result<(), String> {
    let tag = str_of(v);
    if tag
        .chars()
        .all(|c| !c.is_ascii() || (c == ' ' || c.is_ascii_graphic()) && c != ',' && c != '/')
    {
        Ok(())
    } else {
        Err(format!(
            "invalid tag '{tag}': expected printable ascii (except `,` and `/`) or valid utf-8 sequences"
        ))
    }
}

pub fn validate_header_name(v: &Value) -> Result<(), String> {
    let name = str_of(v);
    if name.is_empty() {
        return Err("no header name provided".into());
    }
    if name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        Ok(())
    } else {
        Err(format!(
            "bad header name '{name}', allowed characters are A-Z, a-z, 0-9, '_', and '-'"
        ))
    }
}

/// An RFC 7230 token (cookie names).
pub fn validate_http_token(v: &Value) -> Result<(), String> {
    let name = str_of(v);
    let token = |b: u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b);
    if !name.is_empty() && name.bytes().all(token) {
        Ok(())
    } else {
        Err("contains one or more invalid characters. ASCII control characters (0-31;127), space, tab and the characters ()<>@,;:\\\"/?={}[] are not allowed.".into())
    }
}

pub fn validate_ip_or_cidr(v: &Value) -> Result<(), String> {
    let s = str_of(v);
    let ok = match s.split_once('/') {
        None => s.parse::<std::net::IpAddr>().is_ok(),
        Some((ip, bits)) => match (ip.parse::<std::net::IpAddr>(), bits.parse::<u8>()) {
            (Ok(std::net::IpAddr::V4(_)), Ok(b)) => b <= 32,
            (Ok(std::net::IpAddr::V6(_)), Ok(b)) => b <= 128,
            _ => false,
        },
    };
    if ok {
        Ok(())
    } else {
        Err(format!("invalid ip or cidr range: '{s}'"))
    }
}

pub fn validate_certificate(v: &Value) -> Result<(), String> {
    crate::pem::parse_certificate(str_of(v))
        .map(|_| ())
        .map_err(|e| format!("invalid certificate: {e}"))
}

pub fn validate_key(v: &Value) -> Result<(), String> {
    crate::pem::parse_private_key(str_of(v))
        .map(|_| ())
        .map_err(|e| format!("invalid key: {e}"))
}
