//! Path normalisation as Kong's `kong.tools.uri.normalize`: percent-decode
//! unreserved characters, upper-case the remaining escapes, and remove dot
//! segments (RFC 3986 §5.2.4). The router and route validation share it.

pub fn normalize(path: &str) -> String {
    let decoded = decode_unreserved(path);
    remove_dot_segments(&decoded)
}

fn decode_unreserved(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && i + 2 < bytes.len()
            && bytes[i + 1].is_ascii_hexdigit()
            && bytes[i + 2].is_ascii_hexdigit()
        {
            let hex = &path[i + 1..i + 3];
            if let Ok(b) = u8::from_str_radix(hex, 16) {
                if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
                    out.push(b as char);
                } else {
                    out.push('%');
                    out.push_str(&hex.to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
        }
        let ch = path[i..].chars().next().unwrap_or('\u{fffd}');
        out.push(ch);
        i += ch.len_utf8();
    }
    out
}

fn remove_dot_segments(path: &str) -> String {
    let mut output: Vec<&str> = Vec::new();
    let segments: Vec<&str> = path.split('/').collect();
    let n = segments.len();
    for (idx, seg) in segments.iter().enumerate() {
        let last = idx + 1 == n;
        match *seg {
            "." => {
                if last {
                    output.push("");
                }
            }
            ".." => {
                if output.len() > 1 {
                    output.pop();
                }
                if last {
                    output.push("");
                }
            }
            s => output.push(s),
        }
    }
    let joined = output.join("/");
    if path.starts_with('/') && !joined.starts_with('/') {
        format!("/{joined}")
    } else {
        joined
    }
}

#[cfg(test)]
mod tests {
    use super::normalize;

    fn check(input: &str, expect: &str) {
        assert_eq!(normalize(input), expect, "{input}");
    }

    #[test]
    fn normalizes() {
        check("/a/b", "/a/b");
        check("/a/./b", "/a/b");
        check("/a/../b", "/b");
        check("/a/b/..", "/a/");
        check("/%61%62", "/ab");
        check("/%2f", "/%2F");
        check("/../a", "/a");
        check("/", "/");
    }
}
