//! The indexed router agrees with a reference matcher: a linear scan, in
//! Kong's order (priority, then greatest id), over every route path group,
//! each evaluated as Kong's expression for it reads, straight from the
//! route's strings.

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use proptest::prelude::*;
use regex::Regex;

use super::{path_groups, priority, regex_pattern, PathRule, RequestView, RouteSpec, Router};
use super::{PathMatch, RouteMatch, SPLIT_ROUTE_NAMESPACE};
use crate::uri::normalize_path;

/// A route as owned strings.
#[derive(Clone, Debug)]
struct Route {
    id: String,
    methods: Vec<String>,
    hosts: Vec<String>,
    paths: Vec<String>,
    headers: Vec<(String, Vec<String>)>,
    regex_priority: i64,
}

impl Route {
    fn spec(&self) -> RouteSpec<'_> {
        RouteSpec {
            id: &self.id,
            methods: &self.methods,
            hosts: &self.hosts,
            paths: &self.paths,
            headers: self
                .headers
                .iter()
                .map(|(name, values)| (name.as_str(), values.as_slice()))
                .collect(),
            snis: &[],
            regex_priority: self.regex_priority,
        }
    }
}

#[derive(Clone, Debug)]
struct Request {
    method: Method,
    host: Option<String>,
    path: String,
    headers: Vec<(&'static str, &'static str)>,
}

const HOSTS: &[&str] = &[
    "a.test",
    "b.test",
    "*.test",
    "a.*",
    "*.a.test",
    "a.test:8000",
    "a.test:9000",
    "*est",
    "A.test",
];
const PATHS: &[&str] = &[
    "/",
    "/a",
    "/a/b",
    "/ab",
    "/b",
    "/a/b/c",
    "~/a/\\d+",
    "~/a",
    "~/(a|b)/x",
    "~/b.*",
    "~/a/b|/c",
    "~(?i)/A",
];
const HEADER_NAMES: &[&str] = &["x-a", "X_B"];
const HEADER_VALUES: &[&str] = &["1", "2", "V", "~*^v\\d$"];
const REQUEST_HOSTS: &[&str] = &[
    "a.test",
    "b.test",
    "x.test",
    "a.test:8000",
    "a.test:9000",
    "a.org",
    "A.test",
    "x.a.test",
    "best",
];
const REQUEST_PATHS: &[&str] = &[
    "/", "/a", "/a/b", "/a/1", "/ab", "/b/x", "/a/b/c", "/c", "/A", "/a//b", "/%61/b",
];
const REQUEST_HEADERS: &[(&str, &str)] = &[
    ("x-a", "1"),
    ("x-a", "V"),
    ("x-b", "2"),
    ("x-b", "v7"),
    ("x-a", "v1"),
];

fn pick<T: Clone + std::fmt::Debug + 'static>(items: &'static [T]) -> impl Strategy<Value = T> {
    proptest::sample::select(items)
}

fn route() -> impl Strategy<Value = Route> {
    (
        any::<u128>(),
        proptest::sample::subsequence(vec!["GET", "POST"], 0..=2),
        proptest::collection::vec(pick(HOSTS), 0..=2),
        proptest::collection::vec(pick(PATHS), 0..=3),
        proptest::collection::vec(
            (
                pick(HEADER_NAMES),
                proptest::collection::vec(pick(HEADER_VALUES), 1..=2),
            ),
            0..=2,
        ),
        0i64..3,
    )
        .prop_map(|(id, methods, hosts, paths, headers, regex_priority)| {
            let mut header_list: Vec<(String, Vec<String>)> = Vec::new();
            for (name, values) in headers {
                if !header_list.iter().any(|(n, _)| n == name) {
                    header_list.push((
                        name.to_owned(),
                        values.into_iter().map(str::to_owned).collect(),
                    ));
                }
            }
            Route {
                id: uuid::Uuid::from_u128(id).hyphenated().to_string(),
                methods: methods.into_iter().map(str::to_owned).collect(),
                hosts: hosts.into_iter().map(str::to_owned).collect(),
                paths: paths.into_iter().map(str::to_owned).collect(),
                headers: header_list,
                regex_priority,
            }
        })
}

fn request() -> impl Strategy<Value = Request> {
    (
        pick(&["GET", "POST", "PUT"][..]),
        proptest::option::of(pick(REQUEST_HOSTS)),
        pick(REQUEST_PATHS),
        proptest::collection::vec(pick(REQUEST_HEADERS), 0..=3),
    )
        .prop_map(|(method, host, path, headers)| Request {
            method: Method::from_bytes(method.as_bytes()).expect("valid method"),
            host: host.map(str::to_owned),
            path: path.to_owned(),
            headers,
        })
}

/// Kong's `split_host_port`, written out again.
fn split(raw: &str) -> (&str, Option<u32>) {
    match raw.split_once(':') {
        Some((host, port)) if !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) => {
            (host, port.parse().ok())
        }
        _ => (raw, None),
    }
}

/// `http.host` and `net.dst.port` against one route host.
fn host_matches(route_host: &str, host: Option<&str>, dst_port: u32) -> bool {
    let Some(host) = host else {
        return false;
    };
    let (route_host, port) = split(route_host);
    let host_ok = if let Some(suffix) = route_host.strip_prefix('*') {
        host.ends_with(suffix)
    } else if let Some(prefix) = route_host.strip_suffix('*') {
        host.starts_with(prefix)
    } else {
        host == route_host
    };
    host_ok && port.is_none_or(|port| port == dst_port)
}

fn header_matches(name: &str, values: &[String], headers: &HeaderMap) -> bool {
    let name = name.to_ascii_lowercase().replace('_', "-");
    headers.get_all(name.as_str()).iter().any(|value| {
        let value = value
            .to_str()
            .expect("test header values are ASCII")
            .to_lowercase();
        values
            .iter()
            .any(|expected| match expected.strip_prefix("~*") {
                Some(pattern) => Regex::new(&pattern.to_ascii_lowercase())
                    .expect("test regexes compile")
                    .is_match(&value),
                None => value == expected.to_ascii_lowercase(),
            })
    })
}

fn path_matches(rule: &PathRule, path: &str) -> Option<Option<PathMatch>> {
    match rule {
        PathRule::Any => Some(None),
        PathRule::Prefixes(prefixes) => prefixes
            .iter()
            .find(|(_, prefix)| path.starts_with(&**prefix))
            .map(|(path_idx, prefix)| {
                Some(PathMatch {
                    len: prefix.len(),
                    path_idx: *path_idx,
                    regex: false,
                })
            }),
        PathRule::Regexes(regexes) => regexes.iter().find_map(|(path_idx, regex)| {
            let regex = Regex::new(regex.as_str()).expect("compiled once already");
            regex.find(path).map(|found| {
                Some(PathMatch {
                    len: found.len(),
                    path_idx: *path_idx,
                    regex: true,
                })
            })
        }),
    }
}

fn reference(routes: &[Route], request: &Request) -> Option<RouteMatch> {
    let mut entries = Vec::new();
    for (route_idx, route) in routes.iter().enumerate() {
        let spec = route.spec();
        let groups = path_groups(&spec);
        let n_groups = groups.len();
        for (group_idx, group) in groups.into_iter().enumerate() {
            let group = group.expect("test regexes compile");
            let tie = if n_groups > 1 {
                uuid::Uuid::new_v5(
                    &SPLIT_ROUTE_NAMESPACE,
                    format!("{}#{}", route.id, group_idx + 1).as_bytes(),
                )
            } else {
                uuid::Uuid::parse_str(&route.id).expect("test ids are UUIDs")
            };
            entries.push((priority(&spec, &group), tie, route_idx, group));
        }
    }
    entries.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| b.1.cmp(&a.1)));

    let path_bytes = normalize_path(&request.path);
    let path = std::str::from_utf8(&path_bytes).expect("test paths decode to UTF-8");
    let (host, host_port) = match request.host.as_deref() {
        Some(raw) => {
            let (host, port) = split(raw);
            (Some(host), port)
        }
        None => (None, None),
    };
    let dst_port = host_port.unwrap_or(8000);
    let headers = header_map(request);
    for (_, _, route_idx, group) in entries {
        let route = &routes[route_idx];
        let accepted = (route.methods.is_empty()
            || route.methods.iter().any(|m| m == request.method.as_str()))
            && (route.hosts.is_empty()
                || route.hosts.iter().any(|h| host_matches(h, host, dst_port)))
            && route
                .headers
                .iter()
                .all(|(name, values)| header_matches(name, values, &headers));
        if !accepted {
            continue;
        }
        if let Some(path) = path_matches(&group.rule, path) {
            return Some(RouteMatch { route_idx, path });
        }
    }
    None
}

fn header_map(request: &Request) -> HeaderMap {
    let mut headers = HeaderMap::new();
    for (name, value) in &request.headers {
        headers.append(
            HeaderName::from_static(name),
            HeaderValue::from_static(value),
        );
    }
    headers
}

fn indexed(router: &Router, request: &Request) -> Option<RouteMatch> {
    let path = normalize_path(&request.path);
    let headers = header_map(request);
    router.find(&RequestView {
        method: &request.method,
        host: request.host.as_deref().map(str::as_bytes),
        port: 8000,
        path: &path,
        headers: &headers,
        https: false,
        sni: None,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn indexed_router_agrees_with_the_reference(
        routes in proptest::collection::vec(route(), 0..24),
        requests in proptest::collection::vec(request(), 1..16),
    ) {
        let router = Router::build(routes.iter().map(Route::spec).enumerate());
        for request in &requests {
            prop_assert_eq!(
                indexed(&router, request),
                reference(&routes, request),
                "request {:?}", request
            );
        }
    }

    #[test]
    fn regex_literal_prefixes_are_prefixes_of_every_match(
        pattern in pick(PATHS).prop_filter("regex paths", |p| p.starts_with('~')),
        path in pick(REQUEST_PATHS),
    ) {
        let pattern = regex_pattern(pattern);
        let literal = super::literal_prefix(&pattern);
        if Regex::new(&pattern).expect("compiles").is_match(path) {
            prop_assert!(path.as_bytes().starts_with(&literal));
        }
    }
}
