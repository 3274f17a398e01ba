//! Kong's path handling cases (`spec/fixtures/router_path_handling_tests.lua`
//! and the table in Kong's route documentation), run through the router so
//! that the matched length comes from a real match. Rows written for
//! `path_handling = "v1"` are the `traditional` router's; Kong's
//! `traditional_compatible` spec skips them (`spec/01-unit/08-router_spec.lua`,
//! "#slash handling": `flavor == "traditional" or test.path_handling ==
//! "v0"`), and so does `check`.

use http::{HeaderMap, Method};

use super::{push_upstream_path, Rewrite};
use crate::index::{RequestView, RouteSpec, Router};
use crate::uri::normalize_path;

const BOTH: &[bool] = &[false, true];
const STRIP: &[bool] = &[true];
const KEEP: &[bool] = &[false];
/// The `path_handling` a table row was written for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PathHandling {
    V0,
    V1,
}

const V0: &[PathHandling] = &[PathHandling::V0];
const V1: &[PathHandling] = &[PathHandling::V1];
const V0_V1: &[PathHandling] = &[PathHandling::V0, PathHandling::V1];

/// service path, route path (`None`: the route matches by host), strip_path
/// values, path_handling values, request path, upstream path.
type Case = (
    &'static str,
    Option<&'static str>,
    &'static [bool],
    &'static [PathHandling],
    &'static str,
    &'static str,
);

fn check(cases: &[Case]) {
    for &(service_path, route_path, strips, handlings, request_path, expected) in cases {
        for &strip_path in strips {
            for &handling in handlings {
                if handling == PathHandling::V1 {
                    continue;
                }
                let actual = upstream_path(service_path, route_path, strip_path, request_path);
                assert_eq!(
                    actual, expected,
                    "service {service_path}, route {route_path:?}, strip_path {strip_path}, {handling:?}, request {request_path}"
                );
            }
        }
    }
}

fn upstream_path(
    service_path: &str,
    route_path: Option<&str>,
    strip_path: bool,
    request_path: &str,
) -> String {
    let hosts = match route_path {
        None => vec!["localbin".to_owned()],
        Some(_) => Vec::new(),
    };
    let paths: Vec<String> = route_path.map(str::to_owned).into_iter().collect();
    let route = RouteSpec {
        id: "00000000-0000-4000-8000-000000000001",
        hosts: &hosts,
        paths: &paths,
        ..RouteSpec::default()
    };
    let router = Router::build([(0, route)]);
    let path = normalize_path(request_path);
    let headers = HeaderMap::new();
    let found = router
        .find(&RequestView {
            method: &Method::GET,
            host: Some(b"localbin"),
            port: 8000,
            path: &path,
            headers: &headers,
            https: false,
            sni: None,
        })
        .expect("the route matches");
    let mut out = String::new();
    let rewrite = Rewrite {
        strip_path,
        service_path,
    };
    push_upstream_path(
        &mut out,
        rewrite,
        &path,
        found.path.map(|matched| matched.len),
    );
    out
}

#[test]
fn kong_documentation_table() {
    check(&[
        ("/s", Some("/fv0"), KEEP, V0, "/fv0req", "/s/fv0req"),
        ("/s", Some("/fv1"), KEEP, V1, "/fv1req", "/sfv1req"),
        ("/s", Some("/tv0"), STRIP, V0, "/tv0req", "/s/req"),
        ("/s", Some("/tv1"), STRIP, V1, "/tv1req", "/sreq"),
        ("/s", Some("/fv0/"), KEEP, V0, "/fv0/req", "/s/fv0/req"),
        ("/s", Some("/fv1/"), KEEP, V1, "/fv1/req", "/sfv1/req"),
        ("/s", Some("/tv0/"), STRIP, V0, "/tv0/req", "/s/req"),
        ("/s", Some("/tv1/"), STRIP, V1, "/tv1/req", "/sreq"),
    ]);
}

#[test]
fn root_service_path() {
    check(&[
        ("/", Some("/"), BOTH, V0_V1, "/", "/"),
        ("/", Some("/"), BOTH, V0_V1, "/route", "/route"),
        ("/", Some("/"), BOTH, V0_V1, "/route/", "/route/"),
        ("/", Some("/"), BOTH, V0_V1, "/routereq", "/routereq"),
        ("/", Some("/"), BOTH, V0_V1, "/route/req", "/route/req"),
        ("/", Some("/route"), KEEP, V0_V1, "/route", "/route"),
        ("/", Some("/route"), KEEP, V0_V1, "/route/", "/route/"),
        ("/", Some("/route"), KEEP, V0_V1, "/routereq", "/routereq"),
        ("/", Some("/route"), STRIP, V0_V1, "/route", "/"),
        ("/", Some("/route"), STRIP, V0_V1, "/route/", "/"),
        ("/", Some("/route"), STRIP, V0_V1, "/routereq", "/req"),
        ("/", Some("/route/"), KEEP, V0_V1, "/route/", "/route/"),
        (
            "/",
            Some("/route/"),
            KEEP,
            V0_V1,
            "/route/req",
            "/route/req",
        ),
        ("/", Some("/route/"), STRIP, V0_V1, "/route/", "/"),
        ("/", Some("/route/"), STRIP, V0_V1, "/route/req", "/req"),
    ]);
}

#[test]
fn short_paths() {
    check(&[
        ("/srv", Some("/rou"), KEEP, V0, "/roureq", "/srv/roureq"),
        ("/srv", Some("/rou"), KEEP, V1, "/roureq", "/srvroureq"),
        ("/srv", Some("/rou"), STRIP, V0, "/roureq", "/srv/req"),
        ("/srv", Some("/rou"), STRIP, V1, "/roureq", "/srvreq"),
        ("/srv/", Some("/rou"), KEEP, V0_V1, "/rou", "/srv/rou"),
        ("/srv/", Some("/rou"), STRIP, V0, "/rou", "/srv"),
        ("/srv/", Some("/rou"), STRIP, V1, "/rou", "/srv/"),
    ]);
}

#[test]
fn service_path_without_trailing_slash() {
    check(&[
        ("/service", Some("/"), BOTH, V0_V1, "/", "/service"),
        ("/service", Some("/"), BOTH, V0, "/route", "/service/route"),
        ("/service", Some("/"), BOTH, V1, "/route", "/serviceroute"),
        (
            "/service",
            Some("/"),
            BOTH,
            V0,
            "/route/",
            "/service/route/",
        ),
        ("/service", Some("/"), BOTH, V1, "/route/", "/serviceroute/"),
        (
            "/service",
            Some("/"),
            BOTH,
            V0,
            "/routereq",
            "/service/routereq",
        ),
        (
            "/service",
            Some("/"),
            BOTH,
            V1,
            "/routereq",
            "/serviceroutereq",
        ),
        (
            "/service",
            Some("/"),
            BOTH,
            V0,
            "/route/req",
            "/service/route/req",
        ),
        (
            "/service",
            Some("/"),
            BOTH,
            V1,
            "/route/req",
            "/serviceroute/req",
        ),
        (
            "/service",
            Some("/route"),
            KEEP,
            V0,
            "/route",
            "/service/route",
        ),
        (
            "/service",
            Some("/route"),
            KEEP,
            V1,
            "/route",
            "/serviceroute",
        ),
        (
            "/service",
            Some("/route"),
            KEEP,
            V0,
            "/route/",
            "/service/route/",
        ),
        (
            "/service",
            Some("/route"),
            KEEP,
            V1,
            "/route/",
            "/serviceroute/",
        ),
        (
            "/service",
            Some("/route"),
            KEEP,
            V0,
            "/routereq",
            "/service/routereq",
        ),
        (
            "/service",
            Some("/route"),
            KEEP,
            V1,
            "/routereq",
            "/serviceroutereq",
        ),
        (
            "/service",
            Some("/route"),
            STRIP,
            V0_V1,
            "/route",
            "/service",
        ),
        (
            "/service",
            Some("/route"),
            STRIP,
            V0_V1,
            "/route/",
            "/service/",
        ),
        (
            "/service",
            Some("/route"),
            STRIP,
            V0,
            "/routereq",
            "/service/req",
        ),
        (
            "/service",
            Some("/route"),
            STRIP,
            V1,
            "/routereq",
            "/servicereq",
        ),
        (
            "/service",
            Some("/route/"),
            KEEP,
            V0,
            "/route/",
            "/service/route/",
        ),
        (
            "/service",
            Some("/route/"),
            KEEP,
            V1,
            "/route/",
            "/serviceroute/",
        ),
        (
            "/service",
            Some("/route/"),
            KEEP,
            V0,
            "/route/req",
            "/service/route/req",
        ),
        (
            "/service",
            Some("/route/"),
            KEEP,
            V1,
            "/route/req",
            "/serviceroute/req",
        ),
        (
            "/service",
            Some("/route/"),
            STRIP,
            V0,
            "/route/",
            "/service/",
        ),
        (
            "/service",
            Some("/route/"),
            STRIP,
            V1,
            "/route/",
            "/service",
        ),
        (
            "/service",
            Some("/route/"),
            STRIP,
            V0,
            "/route/req",
            "/service/req",
        ),
        (
            "/service",
            Some("/route/"),
            STRIP,
            V1,
            "/route/req",
            "/servicereq",
        ),
    ]);
}

#[test]
fn service_path_with_trailing_slash() {
    check(&[
        (
            "/service/",
            Some("/"),
            BOTH,
            V0_V1,
            "/route/",
            "/service/route/",
        ),
        ("/service/", Some("/"), BOTH, V0_V1, "/", "/service/"),
        (
            "/service/",
            Some("/"),
            BOTH,
            V0_V1,
            "/route",
            "/service/route",
        ),
        (
            "/service/",
            Some("/"),
            BOTH,
            V0_V1,
            "/routereq",
            "/service/routereq",
        ),
        (
            "/service/",
            Some("/"),
            BOTH,
            V0_V1,
            "/route/req",
            "/service/route/req",
        ),
        (
            "/service/",
            Some("/route"),
            KEEP,
            V0_V1,
            "/route",
            "/service/route",
        ),
        (
            "/service/",
            Some("/route"),
            KEEP,
            V0_V1,
            "/route/",
            "/service/route/",
        ),
        (
            "/service/",
            Some("/route"),
            KEEP,
            V0_V1,
            "/routereq",
            "/service/routereq",
        ),
        ("/service/", Some("/route"), STRIP, V0, "/route", "/service"),
        (
            "/service/",
            Some("/route"),
            STRIP,
            V1,
            "/route",
            "/service/",
        ),
        (
            "/service/",
            Some("/route"),
            STRIP,
            V0_V1,
            "/route/",
            "/service/",
        ),
        (
            "/service/",
            Some("/route"),
            STRIP,
            V0_V1,
            "/routereq",
            "/service/req",
        ),
        (
            "/service/",
            Some("/route/"),
            KEEP,
            V0_V1,
            "/route/",
            "/service/route/",
        ),
        (
            "/service/",
            Some("/route/"),
            KEEP,
            V0_V1,
            "/route/req",
            "/service/route/req",
        ),
        (
            "/service/",
            Some("/route/"),
            STRIP,
            V0_V1,
            "/route/",
            "/service/",
        ),
        (
            "/service/",
            Some("/route/"),
            STRIP,
            V0_V1,
            "/route/req",
            "/service/req",
        ),
    ]);
}

#[test]
fn routes_matching_by_host() {
    check(&[
        ("/", None, BOTH, V0_V1, "/", "/"),
        ("/", None, BOTH, V0_V1, "/route", "/route"),
        ("/", None, BOTH, V0_V1, "/route/", "/route/"),
        ("/service", None, BOTH, V0_V1, "/", "/service"),
        ("/service", None, BOTH, V0, "/route", "/service/route"),
        ("/service", None, BOTH, V1, "/route", "/serviceroute"),
        ("/service", None, BOTH, V0, "/route/", "/service/route/"),
        ("/service", None, BOTH, V1, "/route/", "/serviceroute/"),
        ("/service/", None, BOTH, V0_V1, "/", "/service/"),
        ("/service/", None, BOTH, V0_V1, "/route", "/service/route"),
        ("/service/", None, BOTH, V0_V1, "/route/", "/service/route/"),
    ]);
}

#[test]
fn dot_segments_left_by_stripping() {
    for request in [
        "/route./req",
        "/route%2E/req",
        "/route%2e/req",
        "/route../req",
        "/route%2E%2E/req",
        "/route%2e%2E/req",
    ] {
        check(&[
            (
                "/service",
                Some("/route"),
                STRIP,
                V0,
                request,
                "/service/req",
            ),
            (
                "/service",
                Some("/route"),
                STRIP,
                V1,
                request,
                "/servicereq",
            ),
            (
                "/service/",
                Some("/route"),
                STRIP,
                V0_V1,
                request,
                "/service/req",
            ),
        ]);
    }
    for (request, kept) in [
        ("/route./req", "route./req"),
        ("/route%2E/req", "route./req"),
        ("/route%2e/req", "route./req"),
        ("/route../req", "route../req"),
        ("/route%2E%2E/req", "route../req"),
        ("/route%2e%2E/req", "route../req"),
    ] {
        let v0 = format!("/service/{kept}");
        let v1 = format!("/service{kept}");
        for (service_path, handling, expected) in [
            ("/service", PathHandling::V0, &v0),
            ("/service", PathHandling::V1, &v1),
            ("/service/", PathHandling::V0, &v0),
            ("/service/", PathHandling::V1, &v0),
        ] {
            if handling == PathHandling::V1 {
                continue;
            }
            assert_eq!(
                upstream_path(service_path, Some("/route"), false, request),
                *expected,
                "service {service_path}, {handling:?}, request {request}"
            );
        }
    }
}

#[test]
fn regex_paths_strip_the_matched_part() {
    let paths = vec!["~/users/\\d+".to_owned()];
    let route = RouteSpec {
        id: "00000000-0000-4000-8000-000000000002",
        paths: &paths,
        ..RouteSpec::default()
    };
    let router = Router::build([(0, route)]);
    let headers = HeaderMap::new();
    let found = router
        .find(&RequestView {
            method: &Method::GET,
            host: None,
            port: 8000,
            path: b"/users/42/orders",
            headers: &headers,
            https: false,
            sni: None,
        })
        .expect("the regex matches");
    let mut out = String::new();
    let rewrite = Rewrite {
        strip_path: true,
        service_path: "/api",
    };
    push_upstream_path(
        &mut out,
        rewrite,
        b"/users/42/orders",
        found.path.map(|matched| matched.len),
    );
    assert_eq!(out, "/api/orders");
}
