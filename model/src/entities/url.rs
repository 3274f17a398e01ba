//! URL splitting with LuaSocket's `socket.url.parse` semantics, which Kong
//! uses for the service `url` shorthand: nothing is rejected, missing parts
//! stay missing so that validation reports them.

#[derive(Debug, Default, PartialEq, Eq)]
pub struct ParsedUrl {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<String>,
    pub path: Option<String>,
}

pub fn parse_url(input: &str) -> ParsedUrl {
    let mut out = ParsedUrl::default();
    let mut rest = input;
    if let Some((before, _fragment)) = rest.split_once('#') {
        rest = before;
    }
    if let Some(colon) = rest.find(':') {
        let scheme = &rest[..colon];
        let mut chars = scheme.chars();
        let valid = chars.next().is_some_and(|c| c.is_ascii_alphanumeric())
            && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'));
        if valid {
            out.scheme = Some(scheme.to_ascii_lowercase());
            rest = &rest[colon + 1..];
        }
    }
    if let Some(after) = rest.strip_prefix("//") {
        let end = after.find('/').unwrap_or(after.len());
        let mut authority = &after[..end];
        rest = &after[end..];
        if let Some(q) = authority.find('?') {
            authority = &authority[..q];
        }
        if let Some((_, host)) = authority.rsplit_once('@') {
            authority = host;
        }
        let (host, port) = split_host_port(authority);
        if !host.is_empty() {
            out.host = Some(host.to_owned());
        }
        out.port = port.map(str::to_owned);
    }
    if let Some((before, _query)) = rest.split_once('?') {
        rest = before;
    }
    if let Some((before, _params)) = rest.split_once(';') {
        rest = before;
    }
    if !rest.is_empty() {
        out.path = Some(rest.to_owned());
    }
    out
}

fn split_host_port(authority: &str) -> (&str, Option<&str>) {
    if let Some(inner) = authority.strip_prefix('[') {
        if let Some((host, after)) = inner.split_once(']') {
            return (host, after.strip_prefix(':').filter(|p| !p.is_empty()));
        }
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if p.bytes().all(|b| b.is_ascii_digit()) => {
            (h, if p.is_empty() { None } else { Some(p) })
        }
        _ => (authority, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(
        input: &str,
        scheme: Option<&str>,
        host: Option<&str>,
        port: Option<&str>,
        path: Option<&str>,
    ) {
        let p = parse_url(input);
        assert_eq!(p.scheme.as_deref(), scheme, "{input}");
        assert_eq!(p.host.as_deref(), host, "{input}");
        assert_eq!(p.port.as_deref(), port, "{input}");
        assert_eq!(p.path.as_deref(), path, "{input}");
    }

    #[test]
    fn splits_like_luasocket() {
        check(
            "https://service.test/",
            Some("https"),
            Some("service.test"),
            None,
            Some("/"),
        );
        check(
            "http://a.test:8080/x/y?q=1",
            Some("http"),
            Some("a.test"),
            Some("8080"),
            Some("/x/y"),
        );
        check("invalid url", None, None, None, Some("invalid url"));
        check(
            "http://[::1]:81",
            Some("http"),
            Some("::1"),
            Some("81"),
            None,
        );
        check(
            "grpc://user@h.test",
            Some("grpc"),
            Some("h.test"),
            None,
            None,
        );
    }
}
