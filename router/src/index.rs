//! The router: Kong's `traditional_compatible` route matching, compiled once
//! per config version into an index.
//!
//! Each route becomes one *matcher* per group of its paths (all regex paths
//! together, plain prefixes grouped by length), as Kong's
//! `split_routes_and_services_by_path` does, so that every matcher has one
//! priority. Matchers are sorted by Kong's priority (`transform.lua`,
//! `get_priority`): the number of fields set, then "plain hosts only", the
//! number of headers, regex paths, `regex_priority`, the prefix length; ties
//! go to the older route (`created_at`), then the smaller id. The first
//! matcher in that order that accepts the request wins.
//!
//! The index groups matchers by the hosts they accept: exact hosts in a hash
//! map, `*.example.com` and `example.*` wildcards in maps keyed by suffix and
//! prefix, and routes without hosts in one list. A request only visits the
//! lists its host selects and merges them by rank.
//!
//! TODO(router): index paths (a prefix trie per host list) so that many
//! path-only routes are not scanned one by one.

use std::borrow::Cow;
use std::collections::HashMap;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::Regex;

/// What the router needs from a route: its matching fields, borrowed from
/// the caller's entities. Empty slices stand for unset fields.
#[derive(Clone, Debug, Default)]
pub struct RouteSpec<'a> {
    pub id: &'a str,
    pub methods: &'a [String],
    pub hosts: &'a [String],
    pub paths: &'a [String],
    /// Header name and the values it accepts.
    pub headers: Vec<(&'a str, &'a [String])>,
    pub snis: &'a [String],
    pub regex_priority: i64,
    pub created_at: Option<i64>,
}

/// Compiled routes of one config version. Immutable.
pub struct Router {
    /// Sorted by priority: a matcher's index is its rank.
    matchers: Vec<Matcher>,
    exact_hosts: HashMap<Box<str>, Vec<Candidate>>,
    /// `*.example.com`, keyed by `.example.com`.
    suffix_hosts: HashMap<Box<str>, Vec<Candidate>>,
    /// `example.*`, keyed by `example.`.
    prefix_hosts: HashMap<Box<str>, Vec<Candidate>>,
    /// Routes without hosts.
    any_host: Vec<Candidate>,
    /// Whether some route has paths: Kong then fails to route a request
    /// whose normalized path is not UTF-8 (atc-router's `http.path` is a
    /// string).
    uses_paths: bool,
}

/// What the router looks at in a request.
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// Lower-case host without port (see [`request_host`]).
    pub host: &'a str,
    /// The port the request arrived on (Kong's `net.dst.port`), which route
    /// hosts written as `host:port` compare with.
    pub port: u16,
    /// Normalized path without query (see [`crate::normalize_path`]).
    pub path: &'a [u8],
    pub headers: &'a HeaderMap,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RouteMatch {
    /// The index the caller gave the route in [`Router::build`].
    pub route_idx: usize,
    /// The path that matched; `None` for routes without paths.
    pub path: Option<PathMatch>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PathMatch {
    /// Length of the matched part of the request path (Kong's
    /// `matched_path`), which `strip_path` removes.
    pub len: usize,
    /// Index of the matching path in the route's `paths`.
    pub path_idx: usize,
    pub regex: bool,
}

impl Router {
    pub fn empty() -> Router {
        Router::build(std::iter::empty())
    }

    /// Compiles `routes`, each given with the index a match reports. Paths,
    /// methods and headers that cannot be compiled are logged and dropped, so
    /// that one bad route does not refuse a whole configuration.
    pub fn build<'a>(routes: impl IntoIterator<Item = (usize, RouteSpec<'a>)>) -> Router {
        let routes: Vec<(usize, RouteSpec<'a>)> = routes.into_iter().collect();
        let mut pending: Vec<Pending<'_>> = Vec::new();
        for (route_idx, route) in &routes {
            let route_idx = *route_idx;
            let Some(conditions) = compile_conditions(route) else {
                continue;
            };
            for (group_idx, group) in path_groups(route).into_iter().enumerate() {
                pending.push(Pending {
                    priority: priority(route, &group),
                    route,
                    group_idx,
                    matcher: Matcher {
                        route_idx,
                        methods: conditions.methods.clone(),
                        headers: conditions.headers.clone(),
                        paths: group.rule,
                    },
                });
            }
        }
        pending.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| {
                    let a_created = a.route.created_at.unwrap_or(i64::MAX);
                    a_created.cmp(&b.route.created_at.unwrap_or(i64::MAX))
                })
                .then_with(|| a.route.id.cmp(b.route.id))
                .then_with(|| a.group_idx.cmp(&b.group_idx))
        });

        let mut router = Router {
            matchers: Vec::with_capacity(pending.len()),
            exact_hosts: HashMap::new(),
            suffix_hosts: HashMap::new(),
            prefix_hosts: HashMap::new(),
            any_host: Vec::new(),
            uses_paths: false,
        };
        for (rank, entry) in pending.into_iter().enumerate() {
            let Ok(rank) = u32::try_from(rank) else {
                tracing::warn!(route_id = %entry.route.id, "Too many routes; ignoring the rest.");
                break;
            };
            let hosts = entry.route.hosts;
            if hosts.is_empty() {
                router.any_host.push(Candidate { rank, port: None });
            }
            for host in hosts {
                let (host, port) = split_host_port(host);
                let host = host.to_ascii_lowercase();
                let candidate = Candidate { rank, port };
                let (map, key) = if let Some(suffix) = host.strip_prefix('*') {
                    (&mut router.suffix_hosts, suffix)
                } else if let Some(prefix) = host.strip_suffix('*') {
                    (&mut router.prefix_hosts, prefix)
                } else {
                    (&mut router.exact_hosts, host.as_str())
                };
                map.entry(key.into()).or_default().push(candidate);
            }
            router.uses_paths |= !matches!(entry.matcher.paths, PathRule::Any);
            router.matchers.push(entry.matcher);
        }
        router
    }

    /// The highest-priority route accepting `request`.
    pub fn find(&self, request: &RequestView<'_>) -> Option<RouteMatch> {
        let path = std::str::from_utf8(request.path).ok();
        if path.is_none() && self.uses_paths {
            return None;
        }
        let host = request.host;
        let mut lists = CandidateLists::default();
        if let Some(list) = self.exact_hosts.get(host) {
            lists.push(list);
        }
        if !self.suffix_hosts.is_empty() {
            for (dot_idx, _) in host.match_indices('.') {
                if let Some(list) = self.suffix_hosts.get(&host[dot_idx..]) {
                    lists.push(list);
                }
            }
        }
        if !self.prefix_hosts.is_empty() {
            for (dot_idx, _) in host.match_indices('.') {
                if let Some(list) = self.prefix_hosts.get(&host[..=dot_idx]) {
                    lists.push(list);
                }
            }
        }
        lists.push(&self.any_host);
        lists.first_match(|candidate| self.try_candidate(candidate, request, path))
    }

    fn try_candidate(
        &self,
        candidate: Candidate,
        request: &RequestView<'_>,
        path: Option<&str>,
    ) -> Option<RouteMatch> {
        if candidate.port.is_some_and(|port| port != request.port) {
            return None;
        }
        let matcher = &self.matchers[candidate.rank as usize];
        let path = matcher.paths.find(path)?;
        if !matcher.methods.is_empty() && !matcher.methods.contains(request.method) {
            return None;
        }
        if !matcher
            .headers
            .iter()
            .all(|rule| rule.matches(request.headers))
        {
            return None;
        }
        Some(RouteMatch {
            route_idx: matcher.route_idx,
            path,
        })
    }
}

/// The host a request is routed by: the Host header (or the HTTP/2
/// authority) without port, lower-cased. Allocates only for upper-case hosts.
pub fn request_host(raw: &str) -> Cow<'_, str> {
    let (host, _) = split_host_port(raw);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

/// Splits `host[:port]` and `[v6]:port`. An unparsable port is dropped.
pub fn split_host_port(raw: &str) -> (&str, Option<u16>) {
    if raw.starts_with('[') {
        return match raw.find(']') {
            Some(end) => {
                let port = raw[end + 1..]
                    .strip_prefix(':')
                    .and_then(|p| p.parse().ok());
                (&raw[..=end], port)
            }
            None => (raw, None),
        };
    }
    match raw.split_once(':') {
        Some((host, port)) => (host, port.parse().ok()),
        None => (raw, None),
    }
}

#[derive(Clone, Copy, Debug)]
struct Candidate {
    rank: u32,
    /// Set for route hosts written `host:port`.
    port: Option<u16>,
}

struct Matcher {
    route_idx: usize,
    methods: Box<[Method]>,
    headers: Box<[HeaderRule]>,
    paths: PathRule,
}

enum PathRule {
    /// The route has no paths.
    Any,
    /// `(index in route.paths, prefix)`, all of one length.
    Prefixes(Box<[(usize, Box<str>)]>),
    /// `(index in route.paths, regex anchored at the start)`.
    Regexes(Box<[(usize, Regex)]>),
}

impl PathRule {
    /// `None` when the path does not match; `Some(None)` for routes without
    /// paths.
    fn find(&self, path: Option<&str>) -> Option<Option<PathMatch>> {
        match self {
            PathRule::Any => Some(None),
            _ if path.is_none() => None,
            PathRule::Prefixes(prefixes) => prefixes
                .iter()
                .find(|(_, prefix)| path.is_some_and(|path| path.starts_with(&**prefix)))
                .map(|(path_idx, prefix)| {
                    Some(PathMatch {
                        len: prefix.len(),
                        path_idx: *path_idx,
                        regex: false,
                    })
                }),
            PathRule::Regexes(regexes) => regexes.iter().find_map(|(path_idx, regex)| {
                regex.find(path?).map(|found| {
                    Some(PathMatch {
                        len: found.len(),
                        path_idx: *path_idx,
                        regex: true,
                    })
                })
            }),
        }
    }
}

#[derive(Clone)]
struct HeaderRule {
    name: HeaderName,
    values: Box<[HeaderValueRule]>,
}

#[derive(Clone)]
enum HeaderValueRule {
    /// Lower-cased; compared case-insensitively.
    Exact(Box<[u8]>),
    /// `~*regex`, compiled lower-cased and matched against the lower-cased
    /// value, as Kong does.
    Regex(Regex),
}

impl HeaderRule {
    /// Any value of the header matches any of the rule's values.
    fn matches(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(&self.name)
            .iter()
            .any(|value| self.values.iter().any(|rule| rule.matches(value)))
    }
}

impl HeaderValueRule {
    fn matches(&self, value: &HeaderValue) -> bool {
        match self {
            HeaderValueRule::Exact(expected) => value.as_bytes().eq_ignore_ascii_case(expected),
            HeaderValueRule::Regex(regex) => {
                let Ok(value) = value.to_str() else {
                    return false;
                };
                if value.bytes().any(|b| b.is_ascii_uppercase()) {
                    regex.is_match(&value.to_ascii_lowercase())
                } else {
                    regex.is_match(value)
                }
            }
        }
    }
}

/// A matcher before sorting.
struct Pending<'a> {
    priority: u64,
    route: &'a RouteSpec<'a>,
    group_idx: usize,
    matcher: Matcher,
}

struct PathGroup {
    rule: PathRule,
    has_paths: bool,
    regex: bool,
    /// Byte length of the group's plain prefixes.
    uri_length: usize,
}

/// A route's method and header conditions, shared by its matchers.
struct Conditions {
    methods: Box<[Method]>,
    headers: Box<[HeaderRule]>,
}

fn compile_conditions(route: &RouteSpec<'_>) -> Option<Conditions> {
    let mut methods = Vec::new();
    for method in route.methods {
        match Method::from_bytes(method.as_bytes()) {
            Ok(method) => methods.push(method),
            Err(_) => {
                tracing::warn!(route_id = %route.id, method, "Ignoring route with an invalid method.");
                return None;
            }
        }
    }
    let mut headers = Vec::new();
    for &(name, values) in &route.headers {
        let Ok(header_name) = HeaderName::from_bytes(name.as_bytes()) else {
            tracing::warn!(route_id = %route.id, header = %name, "Ignoring route with an invalid header name.");
            return None;
        };
        let mut rules = Vec::with_capacity(values.len());
        for value in values {
            if let Some(pattern) = value.strip_prefix("~*") {
                match Regex::new(&pattern.to_lowercase()) {
                    Ok(regex) => rules.push(HeaderValueRule::Regex(regex)),
                    Err(error) => {
                        tracing::warn!(route_id = %route.id, header = %name, %error, "Ignoring a header regex the regex engine does not support.");
                    }
                }
            } else {
                rules.push(HeaderValueRule::Exact(
                    value.to_ascii_lowercase().into_bytes().into(),
                ));
            }
        }
        if rules.is_empty() {
            // Every value was dropped: the header can match nothing, and
            // neither can the route.
            return None;
        }
        headers.push(HeaderRule {
            name: header_name,
            values: rules.into(),
        });
    }
    Some(Conditions {
        methods: methods.into(),
        headers: headers.into(),
    })
}

/// Groups a route's paths as Kong's `group_by_regex_or_length` does: one
/// group for all regexes, one per prefix length, in order of appearance.
fn path_groups(route: &RouteSpec<'_>) -> Vec<PathGroup> {
    let paths = route.paths;
    if paths.is_empty() {
        return vec![PathGroup {
            rule: PathRule::Any,
            has_paths: false,
            regex: false,
            uri_length: 0,
        }];
    }
    // Key: `None` for regexes, `Some(len)` for prefixes; members are
    // `(index in route.paths, path)`.
    type Members<'p> = Vec<(usize, &'p str)>;
    let mut groups: Vec<(Option<usize>, Members<'_>)> = Vec::new();
    for (path_idx, path) in paths.iter().enumerate() {
        let key = if path.starts_with('~') {
            None
        } else {
            Some(path.len())
        };
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push((path_idx, path)),
            None => groups.push((key, vec![(path_idx, path)])),
        }
    }
    groups
        .into_iter()
        .filter_map(|(key, members)| match key {
            Some(uri_length) => Some(PathGroup {
                rule: PathRule::Prefixes(
                    members
                        .into_iter()
                        .map(|(path_idx, path)| (path_idx, Box::from(path)))
                        .collect(),
                ),
                has_paths: true,
                regex: false,
                uri_length,
            }),
            None => {
                let regexes: Box<[(usize, Regex)]> = members
                    .into_iter()
                    .filter_map(|(path_idx, path)| {
                        compile_path_regex(route, path).map(|regex| (path_idx, regex))
                    })
                    .collect();
                (!regexes.is_empty()).then_some(PathGroup {
                    rule: PathRule::Regexes(regexes),
                    has_paths: true,
                    regex: true,
                    uri_length: 0,
                })
            }
        })
        .collect()
}

/// `~regex` → `^regex`, as Kong's `path_val_transform` (which also targets
/// the Rust `regex` crate). PCRE-only syntax fails here and drops the path.
fn compile_path_regex(route: &RouteSpec<'_>, path: &str) -> Option<Regex> {
    let pattern = format!("^{}", &path[1..]);
    match Regex::new(&pattern) {
        Ok(regex) => Some(regex),
        Err(error) => {
            tracing::warn!(route_id = %route.id, path, %error, "Ignoring a path regex the regex engine does not support.");
            None
        }
    }
}

/// Kong's `get_priority` for HTTP routes (`kong/router/transform.lua`).
fn priority(route: &RouteSpec<'_>, group: &PathGroup) -> u64 {
    fn is_set(field: &[String]) -> bool {
        !field.is_empty()
    }
    let headers_count = route.headers.len().min(255) as u64;
    let mut match_weight: u64 = 0;
    match_weight += u64::from(is_set(route.methods));
    match_weight += u64::from(is_set(route.hosts));
    match_weight += u64::from(headers_count > 0);
    match_weight += u64::from(is_set(route.snis));
    match_weight += u64::from(group.has_paths);
    let plain_host_only = is_set(route.hosts) && route.hosts.iter().all(|host| !host.contains('*'));
    // Kong shifts a negative `regex_priority` as a uint64, which floods the
    // higher bits; clamping keeps the other fields intact.
    let regex_priority = if group.regex {
        route.regex_priority.clamp(0, i64::from(u32::MAX)) as u64
    } else {
        0
    };
    (match_weight << 61)
        | (u64::from(plain_host_only) << 60)
        | (headers_count << 52)
        | (u64::from(group.regex) << 51)
        | (regex_priority << 19)
        | (group.uri_length as u64 & 0x7FFFF)
}

/// The candidate lists a request selects, merged by rank without
/// allocating unless a host selects more than eight lists.
#[derive(Default)]
struct CandidateLists<'r> {
    inline: [&'r [Candidate]; 8],
    n_inline: usize,
    spilled: Vec<&'r [Candidate]>,
}

impl<'r> CandidateLists<'r> {
    fn push(&mut self, list: &'r [Candidate]) {
        if list.is_empty() {
            return;
        }
        if self.n_inline < self.inline.len() {
            self.inline[self.n_inline] = list;
            self.n_inline += 1;
        } else {
            self.spilled.push(list);
        }
    }

    /// Visits candidates in rank order until `accept` returns a value. A
    /// candidate listed under two hosts may be visited twice, which only
    /// repeats a check that failed.
    fn first_match<T>(mut self, mut accept: impl FnMut(Candidate) -> Option<T>) -> Option<T> {
        loop {
            let next = self.inline[..self.n_inline]
                .iter_mut()
                .chain(self.spilled.iter_mut())
                .filter(|list| !list.is_empty())
                .min_by_key(|list| list[0].rank)?;
            let candidate = next[0];
            *next = &next[1..];
            if let Some(found) = accept(candidate) {
                return Some(found);
            }
        }
    }
}

#[cfg(test)]
mod tests;
