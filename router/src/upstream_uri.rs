//! The path sent upstream: the service path joined with the request path,
//! minus the matched route path when `strip_path` is set. Kong has two
//! joining rules, selected per route by `path_handling`: `v0`
//! (`kong/router/utils.lua`, `get_upstream_uri_v0`, the only one Kong's
//! `traditional_compatible` router runs) and `v1` (Kong's `traditional`
//! router). Kong's table of cases lives in `upstream_uri/tests.rs`.

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathHandling {
    V0,
    V1,
}

/// How a route rewrites paths, resolved at build time.
#[derive(Clone, Copy, Debug)]
pub struct Rewrite<'a> {
    pub handling: PathHandling,
    pub strip_path: bool,
    /// The service path; `/` when the service has none.
    pub service_path: &'a str,
}

/// Appends the upstream path (no query) to `out`. `request_path` is the
/// normalized request path; `matched_len` the length of its part that the
/// route's path matched, if the route matched by path.
pub fn push_upstream_path(
    out: &mut String,
    rewrite: Rewrite<'_>,
    request_path: &str,
    matched_len: Option<usize>,
) {
    let base = if rewrite.service_path.is_empty() {
        "/"
    } else {
        rewrite.service_path
    };
    // Kong: the prefix is the matched path when stripping, otherwise "/".
    let prefix_len = match (rewrite.strip_path, matched_len) {
        (true, Some(len)) => len,
        _ => 1,
    };
    let postfix = sanitize_postfix(request_path.get(prefix_len..).unwrap_or(""));
    // The request path without its leading slash.
    let request_tail = request_path.get(1..).unwrap_or("");
    let base_ends_with_slash = base.ends_with('/');
    let base_without_slash = base.strip_suffix('/').unwrap_or(base);

    match rewrite.handling {
        PathHandling::V0 if base_ends_with_slash => {
            if !rewrite.strip_path {
                out.push_str(base);
                out.push_str(request_tail);
            } else if postfix.is_empty() {
                if base == "/" {
                    out.push('/');
                } else if request_path.ends_with('/') {
                    out.push_str(base);
                } else {
                    out.push_str(base_without_slash);
                }
            } else if postfix.starts_with('/') {
                out.push_str(base_without_slash);
                out.push_str(postfix);
            } else {
                out.push_str(base);
                out.push_str(postfix);
            }
        }
        PathHandling::V0 => {
            out.push_str(base);
            if !rewrite.strip_path {
                if request_path != "/" {
                    out.push_str(request_path);
                }
            } else if postfix.is_empty() {
                if request_path.len() > 1 && request_path.ends_with('/') {
                    out.push('/');
                }
            } else {
                if !postfix.starts_with('/') {
                    out.push('/');
                }
                out.push_str(postfix);
            }
        }
        PathHandling::V1 => {
            if !rewrite.strip_path {
                out.push_str(base);
                out.push_str(request_tail);
            } else if base_ends_with_slash && postfix.starts_with('/') {
                out.push_str(base_without_slash);
                out.push_str(postfix);
            } else {
                out.push_str(base);
                out.push_str(postfix);
            }
        }
    }
}

/// Kong's `sanitize_uri_postfix`: a postfix that starts with a dot segment
/// left behind by the stripped prefix (`/route./x`) loses it.
fn sanitize_postfix(postfix: &str) -> &str {
    if postfix == "." || postfix == ".." {
        ""
    } else if let Some(rest) = postfix.strip_prefix("./") {
        rest
    } else if let Some(rest) = postfix.strip_prefix("../") {
        rest
    } else {
        postfix
    }
}

#[cfg(test)]
mod tests;
