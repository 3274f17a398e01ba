//! The router: Kong's `traditional_compatible` route matching, compiled once
//! per config version into an index.
//!
//! Kong turns each route into an atc-router expression and a priority
//! (`kong/router/transform.lua`), splitting a route whose paths mix regexes
//! and prefixes of different lengths into one entry per group
//! (`split_routes_and_services_by_path`), and atc-router tries entries by
//! descending priority, then descending id, until one matches. Here each
//! entry is a *matcher*; its position in that order is its *rank*, and the
//! answer is the accepting matcher of lowest rank.
//!
//! The index avoids trying every matcher. Matchers are filed in *buckets* by
//! the hosts they accept (exact hosts in a hash map, `*.example.com` and
//! `example.*` wildcards in maps keyed by suffix and prefix, routes without
//! hosts in one bucket). Within a bucket, plain prefixes and the literal
//! prefixes regexes start with are keys of a sorted prefix table in which
//! every key links to the longest other key it starts with: one binary
//! search finds the longest key the request path starts with, and its links
//! give every shorter one, so the candidates are exactly the matchers whose
//! prefix matches (and whose regex may). Routes without paths form one list
//! per bucket. Each of these candidate lists is sorted by rank; a request
//! merges the lists it selects and checks candidates (port, method,
//! headers, SNI, regex) in rank order until one accepts.

use std::collections::HashMap;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use regex::{Regex, RegexSet};

/// What the router needs from a route: its matching fields, borrowed from
/// the caller's entities. Empty slices stand for unset fields.
#[derive(Clone, Debug, Default)]
pub struct RouteSpec<'a> {
    /// A UUID in Kong; ties between equal priorities go to the greater id.
    pub id: &'a str,
    pub methods: &'a [String],
    pub hosts: &'a [String],
    pub paths: &'a [String],
    /// Header name and the values it accepts.
    pub headers: Vec<(&'a str, &'a [String])>,
    pub snis: &'a [String],
    pub regex_priority: i64,
}

/// Compiled routes of one config version. Immutable.
pub struct Router {
    /// Sorted by priority: a matcher's index is its rank.
    matchers: Vec<Matcher>,
    buckets: Vec<Bucket>,
    /// The prefix tables of all buckets; each bucket owns a range.
    nodes: Vec<Node>,
    /// Node keys, concatenated.
    key_bytes: Vec<u8>,
    /// Candidate lists of all nodes and buckets, concatenated.
    candidates: Vec<Candidate>,
    regex_sets: Vec<RegexSet>,
    exact_hosts: HashMap<Box<[u8]>, u32>,
    /// `*.example.com`, keyed by `.example.com`.
    suffix_hosts: HashMap<Box<[u8]>, u32>,
    /// Distinct key lengths of `suffix_hosts`.
    suffix_lens: Box<[usize]>,
    /// `example.*`, keyed by `example.`.
    prefix_hosts: HashMap<Box<[u8]>, u32>,
    prefix_lens: Box<[usize]>,
    /// The bucket of routes without hosts.
    any_host: u32,
    /// Fields some route reads. atc-router refuses to route a request when
    /// one of them is not UTF-8, so Kong answers 404 then.
    uses_paths: bool,
    uses_hosts: bool,
    header_fields: Box<[HeaderName]>,
}

/// What the router looks at in a request.
#[derive(Clone, Copy, Debug)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// The Host header (or HTTP/2 authority) as received, port included:
    /// Kong compares hosts case-sensitively and takes the port a route
    /// host's `host:port` is compared with from here.
    pub host: Option<&'a [u8]>,
    /// The port the request arrived on (Kong's `net.dst.port` when the Host
    /// header has no port).
    pub port: u16,
    /// Normalized path without query (see [`crate::normalize_path`]).
    pub path: &'a [u8],
    pub headers: &'a HeaderMap,
    /// Whether the request came over TLS: only then do routes' `snis`
    /// restrict matching, against `sni`.
    pub https: bool,
    pub sni: Option<&'a str>,
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

    /// Compiles `routes`, each given with the index a match reports. A route
    /// Kong could not turn into a matcher (a header name or a regex the
    /// regex engine rejects) is logged and left out, as Kong leaves it out
    /// of its router; the rest of the configuration still routes.
    pub fn build<'a>(routes: impl IntoIterator<Item = (usize, RouteSpec<'a>)>) -> Router {
        let mut pending = Vec::new();
        for (route_idx, route) in routes {
            compile_route(route_idx, &route, &mut pending);
        }
        pending.sort_by(|a, b| {
            b.priority
                .cmp(&a.priority)
                .then_with(|| b.tie.cmp(&a.tie))
                .then_with(|| a.group_idx.cmp(&b.group_idx))
        });
        if pending.len() > MAX_MATCHERS {
            tracing::warn!(
                n_matchers = pending.len(),
                "Too many route paths; ignoring the lowest priorities."
            );
            pending.truncate(MAX_MATCHERS);
        }
        Builder::default().build(pending)
    }

    /// Whether some route matches on headers: only then does
    /// [`RequestView::headers`] need the request's headers.
    pub fn reads_headers(&self) -> bool {
        !self.header_fields.is_empty()
    }

    /// The highest-priority route accepting `request`.
    pub fn find(&self, request: &RequestView<'_>) -> Option<RouteMatch> {
        let path = std::str::from_utf8(request.path).ok();
        if path.is_none() && self.uses_paths {
            return None;
        }
        if self.uses_hosts
            && request
                .host
                .is_some_and(|host| std::str::from_utf8(host).is_err())
        {
            return None;
        }
        for name in &*self.header_fields {
            for value in request.headers.get_all(name) {
                if std::str::from_utf8(value.as_bytes()).is_err() {
                    return None;
                }
            }
        }
        let (host, host_port) = match request.host {
            Some(raw) => {
                let (host, port) = split_host_port(raw);
                (Some(host), port)
            }
            None => (None, None),
        };
        let context = MatchContext {
            request,
            path,
            dst_port: host_port.unwrap_or(u32::from(request.port)),
        };

        let mut lists = CandidateLists::default();
        if let Some(host) = host {
            if let Some(&bucket) = self.exact_hosts.get(host) {
                self.collect(bucket, request.path, &mut lists);
            }
            for &len in &*self.suffix_lens {
                if let Some(suffix) = host.len().checked_sub(len).map(|start| &host[start..]) {
                    if let Some(&bucket) = self.suffix_hosts.get(suffix) {
                        self.collect(bucket, request.path, &mut lists);
                    }
                }
            }
            for &len in &*self.prefix_lens {
                if let Some(prefix) = host.get(..len) {
                    if let Some(&bucket) = self.prefix_hosts.get(prefix) {
                        self.collect(bucket, request.path, &mut lists);
                    }
                }
            }
        }
        self.collect(self.any_host, request.path, &mut lists);
        lists.first_match(|candidate, kind| self.accept(candidate, kind, &context))
    }

    /// Adds the candidate lists of `bucket` that `path` selects.
    fn collect<'r>(&'r self, bucket: u32, path: &[u8], lists: &mut CandidateLists<'r>) {
        let bucket = &self.buckets[bucket as usize];
        lists.push(self.list(bucket.no_path), ListKind::NoPath);
        let nodes = &self.nodes[bucket.nodes.0 as usize..bucket.nodes.1 as usize];
        // The last key <= path; every key `path` starts with is it or one
        // of its ancestors (a key between a prefix of `path` and `path`
        // starts with that prefix).
        let after = nodes.partition_point(|node| self.key(node) <= path);
        let Some(last) = after.checked_sub(1) else {
            return;
        };
        let last_key = self.key(&nodes[last]);
        let common = last_key
            .iter()
            .zip(path)
            .take_while(|(a, b)| a == b)
            .count();
        let mut node_idx = Some(last);
        while let Some(idx) = node_idx {
            let node = &nodes[idx];
            if node.key.1 as usize <= common {
                let plain = self.list(node.plain);
                lists.push(plain, ListKind::Plain);
                let regex = self.list(node.regex);
                let rejected = node.regex_set.is_some_and(|set| {
                    std::str::from_utf8(path)
                        .map_or(true, |path| !self.regex_sets[set as usize].is_match(path))
                });
                if !rejected {
                    lists.push(regex, ListKind::Regex);
                }
            }
            node_idx = node.parent.map(|parent| parent as usize);
        }
    }

    fn key(&self, node: &Node) -> &[u8] {
        &self.key_bytes[node.key.0 as usize..(node.key.0 + node.key.1) as usize]
    }

    fn list(&self, range: (u32, u32)) -> &[Candidate] {
        &self.candidates[range.0 as usize..range.1 as usize]
    }

    fn accept(
        &self,
        candidate: Candidate,
        kind: ListKind,
        context: &MatchContext<'_>,
    ) -> Option<RouteMatch> {
        if candidate.port != NO_PORT && candidate.port != context.dst_port {
            return None;
        }
        let matcher = &self.matchers[candidate.rank as usize];
        let path = match kind {
            ListKind::NoPath => None,
            ListKind::Plain => Some(PathMatch {
                len: matcher.paths.prefix_len(),
                path_idx: candidate.path_idx as usize,
                regex: false,
            }),
            ListKind::Regex => Some(matcher.paths.find_regex(context.path?)?),
        };
        matcher
            .accepts_conditions(context.request)
            .then_some(RouteMatch {
                route_idx: matcher.route_idx,
                path,
            })
    }
}

/// Kong's `split_host_port` (`kong/router/transform.lua`): the part after
/// the first `:` is a port when it is a number; otherwise the whole string
/// is the host (so `[::1]:8000` is a host without port, as in Kong).
pub fn split_host_port(raw: &[u8]) -> (&[u8], Option<u32>) {
    let Some(colon) = raw.iter().position(|&byte| byte == b':') else {
        return (raw, None);
    };
    let digits = &raw[colon + 1..];
    if digits.is_empty() || !digits.iter().all(u8::is_ascii_digit) {
        return (raw, None);
    }
    // A number too large for a port compares unequal to every port.
    let port = std::str::from_utf8(digits)
        .ok()
        .and_then(|digits| digits.parse::<u32>().ok())
        .unwrap_or(u32::MAX - 1)
        .min(u32::MAX - 1);
    (&raw[..colon], Some(port))
}

/// nginx's `$host`: the Host header without port, lower-cased, which Kong
/// sends as `X-Forwarded-Host` and redirects to. Allocates only for
/// upper-case hosts.
pub fn request_host(raw: &str) -> std::borrow::Cow<'_, str> {
    let host = if raw.starts_with('[') {
        raw.find(']').map_or(raw, |end| &raw[..=end])
    } else {
        raw.split_once(':').map_or(raw, |(host, _)| host)
    };
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(host.to_ascii_lowercase())
    } else {
        std::borrow::Cow::Borrowed(host)
    }
}

/// A rank is a `u32`.
const MAX_MATCHERS: usize = u32::MAX as usize;
/// `Candidate::port` of a host without port.
const NO_PORT: u32 = u32::MAX;
/// Nodes with at least this many regex candidates get a `RegexSet` that
/// rejects them all at once.
const REGEX_SET_MIN: usize = 8;

struct MatchContext<'a> {
    request: &'a RequestView<'a>,
    /// `None` when the path is not UTF-8.
    path: Option<&'a str>,
    /// Kong's `net.dst.port`: the Host header's port, else the arrival port.
    dst_port: u32,
}

#[derive(Clone, Copy, Debug)]
struct Candidate {
    rank: u32,
    /// The port of a route host written `host:port`, or `NO_PORT`.
    port: u32,
    /// For plain prefixes: the index of the prefix in the route's paths.
    path_idx: u32,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
enum ListKind {
    #[default]
    NoPath,
    Plain,
    Regex,
}

struct Bucket {
    /// Range of `Router::nodes`, sorted by key.
    nodes: (u32, u32),
    /// Range of `Router::candidates`: matchers without paths.
    no_path: (u32, u32),
}

struct Node {
    /// `(start, len)` in `Router::key_bytes`.
    key: (u32, u32),
    /// The longest other key of the bucket that this key starts with, as an
    /// index relative to the bucket's first node.
    parent: Option<u32>,
    /// Ranges of `Router::candidates`, each sorted by rank: matchers with a
    /// plain prefix equal to the key, and matchers whose regexes all start
    /// with the key.
    plain: (u32, u32),
    regex: (u32, u32),
    regex_set: Option<u32>,
}

pub(crate) struct Matcher {
    pub(crate) route_idx: usize,
    methods: Box<[Method]>,
    headers: Box<[HeaderRule]>,
    snis: Box<[SniRule]>,
    pub(crate) paths: PathRule,
}

impl Matcher {
    /// Methods, headers and SNI: everything but host and path.
    pub(crate) fn accepts_conditions(&self, request: &RequestView<'_>) -> bool {
        (self.methods.is_empty() || self.methods.contains(request.method))
            && self
                .headers
                .iter()
                .all(|rule| rule.matches(request.headers))
            && (self.snis.is_empty()
                || !request.https
                || request
                    .sni
                    .is_some_and(|sni| self.snis.iter().any(|rule| rule.matches(sni))))
    }
}

pub(crate) enum PathRule {
    /// The route has no paths.
    Any,
    /// `(index in route.paths, prefix)`, all of one length.
    Prefixes(Box<[(usize, Box<str>)]>),
    /// `(index in route.paths, regex anchored at the start)`.
    Regexes(Box<[(usize, Regex)]>),
}

impl PathRule {
    fn prefix_len(&self) -> usize {
        match self {
            PathRule::Prefixes(prefixes) => prefixes.first().map_or(0, |(_, p)| p.len()),
            _ => 0,
        }
    }

    /// Kong: `(http.path ~ r1 || http.path ~ r2 ...)`, the first regex that
    /// matches giving the matched path.
    pub(crate) fn find_regex(&self, path: &str) -> Option<PathMatch> {
        let PathRule::Regexes(regexes) = self else {
            return None;
        };
        regexes.iter().find_map(|(path_idx, regex)| {
            regex.find(path).map(|found| PathMatch {
                len: found.len(),
                path_idx: *path_idx,
                regex: true,
            })
        })
    }
}

/// A route host, split as Kong's `get_expression` does.
#[derive(Clone, Debug)]
pub(crate) struct HostRule {
    pub(crate) kind: HostKind,
    /// The host without its wildcard.
    pub(crate) value: Box<[u8]>,
    pub(crate) port: Option<u32>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HostKind {
    Exact,
    /// `*.example.com`: the host ends with `.example.com`.
    Suffix,
    /// `example.*`: the host starts with `example.`.
    Prefix,
}

impl HostRule {
    fn parse(raw: &str) -> HostRule {
        let (host, port) = split_host_port(raw.as_bytes());
        let (kind, value) = if let Some(suffix) = host.strip_prefix(b"*") {
            (HostKind::Suffix, suffix)
        } else if let Some(prefix) = host.strip_suffix(b"*") {
            (HostKind::Prefix, prefix)
        } else {
            (HostKind::Exact, host)
        };
        HostRule {
            kind,
            value: value.into(),
            port,
        }
    }
}

/// A route SNI (`sni_op_transform`, `sni_val_transform`).
struct SniRule {
    kind: HostKind,
    value: Box<str>,
}

impl SniRule {
    fn parse(raw: &str) -> SniRule {
        if let Some(prefix) = raw.strip_suffix('*').filter(|_| !raw.starts_with('*')) {
            return SniRule {
                kind: HostKind::Prefix,
                value: prefix.into(),
            };
        }
        // The last dot of an FQDN is not used for routing.
        let raw = if raw.len() > 1 {
            raw.strip_suffix('.').unwrap_or(raw)
        } else {
            raw
        };
        match raw.strip_prefix('*') {
            Some(suffix) => SniRule {
                kind: HostKind::Suffix,
                value: suffix.into(),
            },
            None => SniRule {
                kind: HostKind::Exact,
                value: raw.into(),
            },
        }
    }

    fn matches(&self, sni: &str) -> bool {
        match self.kind {
            HostKind::Exact => sni == &*self.value,
            HostKind::Suffix => sni.ends_with(&*self.value),
            HostKind::Prefix => sni.starts_with(&*self.value),
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
    /// ASCII-lower-cased, as Kong's `value:lower()`.
    Exact(Box<str>),
    /// `~*regex`, compiled ASCII-lower-cased and matched against the
    /// lower-cased value, as Kong does.
    Regex(Regex),
}

impl HeaderRule {
    /// Kong: `any(lower(http.headers.name)) == value || ...`: any value of
    /// the header matches any of the rule's values.
    fn matches(&self, headers: &HeaderMap) -> bool {
        headers
            .get_all(&self.name)
            .iter()
            .any(|value| self.values.iter().any(|rule| rule.matches(value)))
    }
}

impl HeaderValueRule {
    fn matches(&self, value: &HeaderValue) -> bool {
        let Ok(value) = std::str::from_utf8(value.as_bytes()) else {
            return false;
        };
        // atc-router's `lower` is Rust's `to_lowercase`.
        match self {
            HeaderValueRule::Exact(expected) if value.is_ascii() => {
                value.eq_ignore_ascii_case(expected)
            }
            HeaderValueRule::Exact(expected) => value.to_lowercase() == **expected,
            HeaderValueRule::Regex(regex) => {
                if value.bytes().any(|b| b.is_ascii_uppercase()) || !value.is_ascii() {
                    regex.is_match(&value.to_lowercase())
                } else {
                    regex.is_match(value)
                }
            }
        }
    }
}

/// A matcher before sorting.
struct Pending {
    priority: u64,
    /// atc-router orders equal priorities by descending UUID.
    tie: (u128, Box<str>),
    group_idx: usize,
    matcher: Matcher,
    hosts: Box<[HostRule]>,
}

/// The namespace Kong's `split_routes_and_services_by_path` derives the ids
/// of split routes from (`uuid.factory_v5`).
pub(crate) const SPLIT_ROUTE_NAMESPACE: uuid::Uuid =
    uuid::uuid!("7f145bf9-0dce-4f91-98eb-debbce4b9f6b");

fn compile_route(route_idx: usize, route: &RouteSpec<'_>, pending: &mut Vec<Pending>) {
    let Some(conditions) = compile_conditions(route) else {
        return;
    };
    let groups = path_groups(route);
    let n_groups = groups.len();
    for (group_idx, group) in groups.into_iter().enumerate() {
        let Some(group) = group else {
            continue;
        };
        // A route split into several entries gets one id per group,
        // `uuid_v5(namespace, id .. "#" .. group number)`.
        let tie_id = if n_groups > 1 {
            let name = format!("{}#{}", route.id, group_idx + 1);
            uuid::Uuid::new_v5(&SPLIT_ROUTE_NAMESPACE, name.as_bytes())
                .hyphenated()
                .to_string()
        } else {
            route.id.to_owned()
        };
        let tie_uuid = uuid::Uuid::try_parse(&tie_id).map_or(0, |id| id.as_u128());
        pending.push(Pending {
            priority: priority(route, &group),
            tie: (tie_uuid, tie_id.into()),
            group_idx,
            matcher: Matcher {
                route_idx,
                methods: conditions.methods.clone(),
                headers: conditions.headers.clone(),
                snis: route.snis.iter().map(|sni| SniRule::parse(sni)).collect(),
                paths: group.rule,
            },
            hosts: route
                .hosts
                .iter()
                .map(|host| HostRule::parse(host))
                .collect(),
        });
    }
}

pub(crate) struct PathGroup {
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
                // No request can have this method.
                tracing::warn!(route_id = %route.id, method, "Ignoring route with an invalid method.");
                return None;
            }
        }
    }
    let mut headers = Vec::new();
    for &(name, values) in &route.headers {
        // Kong reads `http.headers.<name with dashes as underscores>` from
        // ngx.req.get_headers(), which finds `a_b` under `a-b`.
        let field = name.to_ascii_lowercase().replace('_', "-");
        let Ok(header_name) = HeaderName::from_bytes(field.as_bytes()) else {
            tracing::warn!(route_id = %route.id, header = %name, "Ignoring route with an invalid header name.");
            return None;
        };
        let mut rules = Vec::with_capacity(values.len());
        for value in values {
            if let Some(pattern) = value.strip_prefix("~*") {
                match Regex::new(&pattern.to_ascii_lowercase()) {
                    Ok(regex) => rules.push(HeaderValueRule::Regex(regex)),
                    Err(error) => {
                        // The whole expression fails to compile in Kong.
                        tracing::warn!(route_id = %route.id, header = %name, %error, "Ignoring route with a header regex the regex engine does not support.");
                        return None;
                    }
                }
            } else {
                rules.push(HeaderValueRule::Exact(value.to_ascii_lowercase().into()));
            }
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
/// A group Kong could not compile (a regex the engine rejects) is `None`.
pub(crate) fn path_groups(route: &RouteSpec<'_>) -> Vec<Option<PathGroup>> {
    let paths = route.paths;
    if paths.is_empty() {
        return vec![Some(PathGroup {
            rule: PathRule::Any,
            has_paths: false,
            regex: false,
            uri_length: 0,
        })];
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
        .map(|(key, members)| match key {
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
                let regexes = members
                    .into_iter()
                    .map(|(path_idx, path)| {
                        compile_path_regex(route, path).map(|regex| (path_idx, regex))
                    })
                    .collect::<Option<Box<[(usize, Regex)]>>>()?;
                Some(PathGroup {
                    rule: PathRule::Regexes(regexes),
                    has_paths: true,
                    regex: true,
                    uri_length: 0,
                })
            }
        })
        .collect()
}

/// `~regex` → `^regex` with `?<` written `?P<`, as Kong's
/// `path_val_transform` does (it also targets the Rust `regex` crate).
/// PCRE-only syntax fails here, as in Kong.
fn compile_path_regex(route: &RouteSpec<'_>, path: &str) -> Option<Regex> {
    let pattern = regex_pattern(path);
    match Regex::new(&pattern) {
        Ok(regex) => Some(regex),
        Err(error) => {
            tracing::warn!(route_id = %route.id, path, %error, "Ignoring route paths the regex engine does not support.");
            None
        }
    }
}

pub(crate) fn regex_pattern(path: &str) -> String {
    format!("^{}", path[1..].replace("?<", "?P<"))
}

/// The literal bytes every match of `pattern` starts with at the start of
/// the path: empty when it has none, or when a top-level alternation lets
/// it match elsewhere (`^a|b`).
pub(crate) fn literal_prefix(pattern: &str) -> Vec<u8> {
    use regex_syntax::hir::{HirKind, Look};
    let Ok(hir) = regex_syntax::Parser::new().parse(pattern) else {
        return Vec::new();
    };
    let HirKind::Concat(items) = hir.kind() else {
        return Vec::new();
    };
    let mut items = items.iter();
    if !matches!(
        items.next().map(|item| item.kind()),
        Some(HirKind::Look(Look::Start))
    ) {
        return Vec::new();
    }
    let mut prefix = Vec::new();
    for item in items {
        match item.kind() {
            HirKind::Literal(literal) => prefix.extend_from_slice(&literal.0),
            _ => break,
        }
    }
    prefix
}

/// Kong's `get_priority` for HTTP routes (`kong/router/transform.lua`):
/// bits 61-63 the number of fields set, 60 "hosts are all plain", 52-59 the
/// header count, 51 "regex paths", 19-50 `regex_priority`, 0-18 the prefix
/// length.
pub(crate) fn priority(route: &RouteSpec<'_>, group: &PathGroup) -> u64 {
    let headers_count = route.headers.len().min(255) as u64;
    let mut match_weight: u64 = 0;
    match_weight += u64::from(!route.methods.is_empty());
    match_weight += u64::from(!route.hosts.is_empty());
    match_weight += u64::from(headers_count > 0);
    match_weight += u64::from(!route.snis.is_empty());
    match_weight += u64::from(group.has_paths);
    let plain_host_only =
        !route.hosts.is_empty() && route.hosts.iter().all(|host| !host.contains('*'));
    // A negative `regex_priority` would flood the higher fields; clamping
    // keeps them intact.
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

/// One filing of a matcher in a bucket.
struct Entry {
    bucket: u32,
    kind: ListKind,
    /// `(start, len)` in `Builder::keys`.
    key: (u32, u32),
    candidate: Candidate,
}

#[derive(Default)]
struct Builder {
    exact_hosts: HashMap<Box<[u8]>, u32>,
    suffix_hosts: HashMap<Box<[u8]>, u32>,
    prefix_hosts: HashMap<Box<[u8]>, u32>,
    n_buckets: u32,
    keys: Vec<u8>,
    entries: Vec<Entry>,
}

impl Builder {
    fn bucket(&mut self, host: Option<&HostRule>) -> u32 {
        let map = match host.map(|host| host.kind) {
            None => return 0,
            Some(HostKind::Exact) => &mut self.exact_hosts,
            Some(HostKind::Suffix) => &mut self.suffix_hosts,
            Some(HostKind::Prefix) => &mut self.prefix_hosts,
        };
        let value = host.map_or(&[][..], |host| &host.value);
        if let Some(&bucket) = map.get(value) {
            return bucket;
        }
        self.n_buckets += 1;
        map.insert(value.into(), self.n_buckets);
        self.n_buckets
    }

    fn key(&mut self, bytes: &[u8]) -> (u32, u32) {
        let start = self.keys.len() as u32;
        self.keys.extend_from_slice(bytes);
        (start, bytes.len() as u32)
    }

    fn build(mut self, pending: Vec<Pending>) -> Router {
        // Bucket 0 holds routes without hosts.
        self.n_buckets = 0;
        let mut matchers = Vec::with_capacity(pending.len());
        let mut uses_hosts = false;
        let mut header_fields: Vec<HeaderName> = Vec::new();
        for (rank, entry) in pending.into_iter().enumerate() {
            let Pending { matcher, hosts, .. } = entry;
            let rank = rank as u32;
            uses_hosts |= !hosts.is_empty();
            for rule in &*matcher.headers {
                if !header_fields.contains(&rule.name) {
                    header_fields.push(rule.name.clone());
                }
            }
            let host_rules: Vec<Option<&HostRule>> = if hosts.is_empty() {
                vec![None]
            } else {
                hosts.iter().map(Some).collect()
            };
            for host in host_rules {
                let bucket = self.bucket(host);
                let port = host.and_then(|host| host.port).unwrap_or(NO_PORT);
                let candidate = |path_idx: usize| Candidate {
                    rank,
                    port,
                    path_idx: path_idx as u32,
                };
                match &matcher.paths {
                    PathRule::Any => {
                        let key = self.key(b"");
                        self.entries.push(Entry {
                            bucket,
                            kind: ListKind::NoPath,
                            key,
                            candidate: candidate(0),
                        });
                    }
                    PathRule::Prefixes(prefixes) => {
                        for (path_idx, prefix) in &**prefixes {
                            let key = self.key(prefix.as_bytes());
                            self.entries.push(Entry {
                                bucket,
                                kind: ListKind::Plain,
                                key,
                                candidate: candidate(*path_idx),
                            });
                        }
                    }
                    PathRule::Regexes(regexes) => {
                        let mut common: Option<Vec<u8>> = None;
                        for (_, regex) in &**regexes {
                            let literal = literal_prefix(regex.as_str());
                            common = Some(match common {
                                None => literal,
                                Some(mut common) => {
                                    let n = common
                                        .iter()
                                        .zip(&literal)
                                        .take_while(|(a, b)| a == b)
                                        .count();
                                    common.truncate(n);
                                    common
                                }
                            });
                        }
                        let key = self.key(&common.unwrap_or_default());
                        self.entries.push(Entry {
                            bucket,
                            kind: ListKind::Regex,
                            key,
                            candidate: candidate(0),
                        });
                    }
                }
            }
            matchers.push(matcher);
        }
        self.finish(matchers, uses_hosts, header_fields)
    }

    fn finish(
        self,
        matchers: Vec<Matcher>,
        uses_hosts: bool,
        header_fields: Vec<HeaderName>,
    ) -> Router {
        let Builder {
            exact_hosts,
            suffix_hosts,
            prefix_hosts,
            n_buckets,
            keys,
            mut entries,
        } = self;
        let key_of =
            |entry: &Entry| &keys[entry.key.0 as usize..(entry.key.0 + entry.key.1) as usize];
        entries.sort_unstable_by(|a, b| {
            a.bucket
                .cmp(&b.bucket)
                .then_with(|| (a.kind != ListKind::NoPath).cmp(&(b.kind != ListKind::NoPath)))
                .then_with(|| key_of(a).cmp(key_of(b)))
                .then_with(|| (a.kind == ListKind::Regex).cmp(&(b.kind == ListKind::Regex)))
                .then_with(|| a.candidate.rank.cmp(&b.candidate.rank))
                .then_with(|| a.candidate.port.cmp(&b.candidate.port))
                .then_with(|| a.candidate.path_idx.cmp(&b.candidate.path_idx))
        });

        let mut router = Router {
            matchers,
            buckets: Vec::with_capacity(n_buckets as usize + 1),
            nodes: Vec::new(),
            key_bytes: Vec::new(),
            candidates: Vec::with_capacity(entries.len()),
            regex_sets: Vec::new(),
            exact_hosts,
            suffix_lens: distinct_lens(&suffix_hosts),
            suffix_hosts,
            prefix_lens: distinct_lens(&prefix_hosts),
            prefix_hosts,
            any_host: 0,
            uses_paths: false,
            uses_hosts,
            header_fields: header_fields.into(),
        };
        let mut idx = 0;
        for bucket in 0..=n_buckets {
            let no_path_start = router.candidates.len() as u32;
            while idx < entries.len()
                && entries[idx].bucket == bucket
                && entries[idx].kind == ListKind::NoPath
            {
                push_candidate(
                    &mut router.candidates,
                    no_path_start,
                    entries[idx].candidate,
                );
                idx += 1;
            }
            let no_path = (no_path_start, router.candidates.len() as u32);
            let first_node = router.nodes.len() as u32;
            // Keys that are prefixes of the current key, longest last.
            let mut ancestors: Vec<u32> = Vec::new();
            while idx < entries.len() && entries[idx].bucket == bucket {
                router.uses_paths = true;
                let key = key_of(&entries[idx]);
                let key_start = router.key_bytes.len() as u32;
                router.key_bytes.extend_from_slice(key);
                let plain_start = router.candidates.len() as u32;
                let mut plain_end = plain_start;
                while idx < entries.len()
                    && entries[idx].bucket == bucket
                    && key_of(&entries[idx]) == key
                {
                    if entries[idx].kind == ListKind::Plain {
                        push_candidate(&mut router.candidates, plain_start, entries[idx].candidate);
                        plain_end = router.candidates.len() as u32;
                    } else {
                        push_candidate(&mut router.candidates, plain_end, entries[idx].candidate);
                    }
                    idx += 1;
                }
                let regex = (plain_end, router.candidates.len() as u32);
                let regex_set = (regex.1 - regex.0 >= REGEX_SET_MIN as u32)
                    .then(|| {
                        let patterns = router.candidates[regex.0 as usize..regex.1 as usize]
                            .iter()
                            .flat_map(|candidate| {
                                match &router.matchers[candidate.rank as usize].paths {
                                    PathRule::Regexes(regexes) => regexes
                                        .iter()
                                        .map(|(_, regex)| regex.as_str().to_owned())
                                        .collect(),
                                    _ => Vec::new(),
                                }
                            })
                            .collect::<Vec<_>>();
                        RegexSet::new(patterns).ok()
                    })
                    .flatten()
                    .map(|set| {
                        router.regex_sets.push(set);
                        router.regex_sets.len() as u32 - 1
                    });
                let node_idx = router.nodes.len() as u32 - first_node;
                while let Some(&top) = ancestors.last() {
                    let top_node: &Node = &router.nodes[(first_node + top) as usize];
                    let top_key = &router.key_bytes
                        [top_node.key.0 as usize..(top_node.key.0 + top_node.key.1) as usize];
                    if key.starts_with(top_key) {
                        break;
                    }
                    ancestors.pop();
                }
                router.nodes.push(Node {
                    key: (key_start, key.len() as u32),
                    parent: ancestors.last().copied(),
                    plain: (plain_start, plain_end),
                    regex,
                    regex_set,
                });
                ancestors.push(node_idx);
            }
            router.buckets.push(Bucket {
                nodes: (first_node, router.nodes.len() as u32),
                no_path,
            });
        }
        router
    }
}

/// Appends `candidate` to the list that starts at `list_start` unless the
/// list already ends with the same matcher and port (a route listing one
/// path twice).
fn push_candidate(candidates: &mut Vec<Candidate>, list_start: u32, candidate: Candidate) {
    if candidates.len() > list_start as usize
        && candidates
            .last()
            .is_some_and(|last| last.rank == candidate.rank && last.port == candidate.port)
    {
        return;
    }
    candidates.push(candidate);
}

fn distinct_lens(map: &HashMap<Box<[u8]>, u32>) -> Box<[usize]> {
    let mut lens: Vec<usize> = map.keys().map(|key| key.len()).collect();
    lens.sort_unstable();
    lens.dedup();
    lens.into()
}

/// The candidate lists a request selects, merged by rank without
/// allocating unless it selects more than sixteen lists.
#[derive(Default)]
struct CandidateLists<'r> {
    inline: [(&'r [Candidate], ListKind); 16],
    n_inline: usize,
    spilled: Vec<(&'r [Candidate], ListKind)>,
}

impl<'r> CandidateLists<'r> {
    fn push(&mut self, list: &'r [Candidate], kind: ListKind) {
        if list.is_empty() {
            return;
        }
        if self.n_inline < self.inline.len() {
            self.inline[self.n_inline] = (list, kind);
            self.n_inline += 1;
        } else {
            self.spilled.push((list, kind));
        }
    }

    /// Visits candidates in rank order until `accept` returns a value. A
    /// matcher filed under two hosts may be visited twice, with each host's
    /// port.
    fn first_match<T>(
        mut self,
        mut accept: impl FnMut(Candidate, ListKind) -> Option<T>,
    ) -> Option<T> {
        loop {
            let (next, kind) = self.inline[..self.n_inline]
                .iter_mut()
                .chain(self.spilled.iter_mut())
                .filter(|(list, _)| !list.is_empty())
                .min_by_key(|(list, _)| list[0].rank)
                .map(|(list, kind)| (list, *kind))?;
            let candidate = next[0];
            *next = &next[1..];
            if let Some(found) = accept(candidate, kind) {
                return Some(found);
            }
        }
    }
}

#[cfg(test)]
mod proptests;
#[cfg(test)]
mod tests;
