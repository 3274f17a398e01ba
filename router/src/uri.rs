//! Kong's request path normalization and upstream path escaping
//! (`kong/tools/uri.lua`), on bytes: decoding a percent-escape can produce
//! bytes that are not UTF-8, as it does in Kong.

use std::borrow::Cow;

/// Kong's `normalize(path, true)`, which its router applies to the request
/// path before matching (`kong/router/utils.lua`, `strip_uri_args`):
/// percent-escapes of characters outside RFC 3986's reserved set are
/// decoded, the others upper-cased; dot segments are removed and repeated
/// slashes merged. Borrows when nothing changes.
pub fn normalize_path(raw: &str) -> Cow<'_, [u8]> {
    let bytes = raw.as_bytes();
    if bytes.is_empty() || bytes == b"/" {
        return Cow::Borrowed(bytes);
    }
    let decoded: Cow<'_, [u8]> = if bytes.contains(&b'%') {
        Cow::Owned(decode_percent(bytes))
    } else {
        Cow::Borrowed(bytes)
    };
    if !needs_segment_pass(&decoded) {
        return decoded;
    }
    Cow::Owned(remove_dot_segments(&decoded))
}

/// Appends `bytes` to `out` as Kong's `escape` does before sending a path
/// upstream: every byte outside RFC 3986's reserved and unreserved sets
/// (and `%`) becomes an upper-case percent-escape.
pub fn push_escaped(out: &mut String, bytes: &[u8]) {
    let mut start = 0;
    for (idx, &byte) in bytes.iter().enumerate() {
        if is_kept(byte) {
            continue;
        }
        // Kept bytes are ASCII, so `start..idx` is on character boundaries.
        out.push_str(ascii(&bytes[start..idx]));
        out.push('%');
        out.push(char::from(HEX[usize::from(byte >> 4)]));
        out.push(char::from(HEX[usize::from(byte & 0xF)]));
        start = idx + 1;
    }
    out.push_str(ascii(&bytes[start..]));
}

const HEX: &[u8; 16] = b"0123456789ABCDEF";

/// RFC 3986 reserved characters: their escapes stay escaped.
const RESERVED: &[u8] = b"!*'();:@&=+$,/?%#[]";

/// Kong's `ESCAPE_PATTERN` complement: `[!#$&'()*+,/:;=?@[\]A-Za-z0-9\-_.~%]`.
fn is_kept(byte: u8) -> bool {
    byte.is_ascii_alphanumeric() || b"!#$&'()*+,/:;=?@[]-_.~%".contains(&byte)
}

fn ascii(bytes: &[u8]) -> &str {
    // Only called on runs of kept bytes, which are ASCII.
    std::str::from_utf8(bytes).unwrap_or_default()
}

/// `ngx.re.gsub(uri, "%([\\dA-F]{2})", normalize_decode, "joi")`.
fn decode_percent(bytes: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut idx = 0;
    while idx < bytes.len() {
        if bytes[idx] == b'%' && idx + 2 < bytes.len() {
            if let (Some(high), Some(low)) = (hex_value(bytes[idx + 1]), hex_value(bytes[idx + 2]))
            {
                let byte = high << 4 | low;
                if RESERVED.contains(&byte) {
                    out.push(b'%');
                    out.push(bytes[idx + 1].to_ascii_uppercase());
                    out.push(bytes[idx + 2].to_ascii_uppercase());
                } else {
                    out.push(byte);
                }
                idx += 3;
                continue;
            }
        }
        out.push(bytes[idx]);
        idx += 1;
    }
    out
}

fn hex_value(byte: u8) -> Option<u8> {
    match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        b'A'..=b'F' => Some(byte - b'A' + 10),
        _ => None,
    }
}

/// Whether Kong's segment loop could change `path`: Kong skips it when the
/// path has no dot and no `//`; a path without a `/.`, a `//` or a leading
/// dot comes out of the loop unchanged as well.
fn needs_segment_pass(path: &[u8]) -> bool {
    path.first() == Some(&b'.')
        || path
            .windows(2)
            .any(|pair| pair[0] == b'/' && (pair[1] == b'.' || pair[1] == b'/'))
}

/// The loop of Kong's `normalize` with `merge_slashes`: RFC 3986 §5.2.4
/// dot-segment removal as Kong writes it, plus `//` → `/`.
fn remove_dot_segments(path: &[u8]) -> Vec<u8> {
    // Output segments as ranges of `path`; each starts with its slash
    // except, possibly, the first.
    let mut segments: Vec<(usize, usize)> = Vec::new();
    let mut pos = 0;
    let len = path.len();
    while pos < len {
        let rest = &path[pos..];
        if rest == b"/." {
            // Kong: uri = "/", then kept as a segment.
            segments.push((pos, pos + 1));
            break;
        } else if rest == b"/.." {
            segments.pop();
            segments.push((pos, pos + 1));
            break;
        } else if rest == b"." || rest == b".." {
            break;
        } else if rest.starts_with(b"../") {
            pos += 3;
        } else if rest.starts_with(b"./") || rest.starts_with(b"/./") {
            pos += 2;
        } else if rest.starts_with(b"/../") {
            pos += 3;
            segments.pop();
        } else if rest.starts_with(b"//") {
            pos += 1;
        } else {
            let end = rest[1..]
                .iter()
                .position(|&byte| byte == b'/')
                .map_or(len, |offset| pos + 1 + offset);
            segments.push((pos, end));
            pos = end;
        }
    }
    let mut out = Vec::with_capacity(len);
    for (start, end) in segments {
        out.extend_from_slice(&path[start..end]);
    }
    out
}

#[cfg(test)]
mod tests;
