//! The path sent upstream: the service path joined with the request path,
//! minus the matched route path when `strip_path` is set. Kong's
//! `traditional_compatible` router joins them with `get_upstream_uri_v0`
//! (`kong/router/utils.lua`) whatever the route's `path_handling` says:
//! `kong/router/atc.lua` `set_upstream_uri` never looks at it, so `v1` (the
//! `traditional` router's rule) behaves as `v0`. Kong's table of cases lives
//! in `upstream_uri/tests.rs`.

use crate::uri::push_escaped;

/// How a route rewrites paths, resolved at build time.
#[derive(Clone, Copy, Debug)]
pub struct Rewrite<'a> {
    pub strip_path: bool,
    /// The service path; `/` when the service has none.
    pub service_path: &'a str,
}

/// Appends the upstream path (no query) to `out`, escaped as Kong escapes
/// it (`kong.tools.uri.escape`, applied in `kong/runloop/handler.lua`).
/// `request_path` is the normalized request path; `matched_len` the length
/// of its part that the route's path matched, if the route matched by path.
pub fn push_upstream_path(
    out: &mut String,
    rewrite: Rewrite<'_>,
    request_path: &[u8],
    matched_len: Option<usize>,
) {
    let base: &[u8] = if rewrite.service_path.is_empty() {
        b"/"
    } else {
        rewrite.service_path.as_bytes()
    };
    // Kong: the prefix is the matched path when stripping, otherwise "/".
    let prefix_len = match (rewrite.strip_path, matched_len) {
        (true, Some(len)) => len,
        _ => 1,
    };
    let postfix = sanitize_postfix(request_path.get(prefix_len..).unwrap_or(b""));
    // The request path without its leading slash.
    let request_tail = request_path.get(1..).unwrap_or(b"");
    let base_ends_with_slash = base.ends_with(b"/");
    let base_without_slash = base.strip_suffix(b"/").unwrap_or(base);
    let mut push = |bytes: &[u8]| push_escaped(out, bytes);

    if base_ends_with_slash {
        if !rewrite.strip_path {
            push(base);
            push(request_tail);
        } else if postfix.is_empty() {
            if base == b"/" {
                push(b"/");
            } else if request_path.ends_with(b"/") {
                push(base);
            } else {
                push(base_without_slash);
            }
        } else if postfix.starts_with(b"/") {
            push(base_without_slash);
            push(postfix);
        } else {
            push(base);
            push(postfix);
        }
    } else {
        push(base);
        if !rewrite.strip_path {
            if request_path != b"/" {
                push(request_path);
            }
        } else if postfix.is_empty() {
            if request_path.len() > 1 && request_path.ends_with(b"/") {
                push(b"/");
            }
        } else {
            if !postfix.starts_with(b"/") {
                push(b"/");
            }
            push(postfix);
        }
    }
}

/// Kong's `sanitize_uri_postfix`: a postfix that starts with a dot segment
/// left behind by the stripped prefix (`/route./x`) loses it.
fn sanitize_postfix(postfix: &[u8]) -> &[u8] {
    if postfix == b"." || postfix == b".." {
        b""
    } else if let Some(rest) = postfix.strip_prefix(b"./") {
        rest
    } else if let Some(rest) = postfix.strip_prefix(b"../") {
        rest
    } else {
        postfix
    }
}

#[cfg(test)]
mod tests;
