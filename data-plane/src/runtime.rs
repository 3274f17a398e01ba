//! The runtime: everything a request needs from one config version, built
//! once from a snapshot and never mutated. Services are resolved into
//! upstream addresses, header values and timeouts here, so that the request
//! path only looks things up.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use gatehouse_model::snapshot::{ConfigSnapshot, Route, Service, SnapshotError};
use gatehouse_router::{Rewrite, RouteSpec, Router};
use http::uri::Authority;
use http::{HeaderValue, StatusCode};
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use regex::Regex;

use crate::balancer::{BalancerLookup, Balancers, Peers};

/// Why a snapshot could not become a runtime. The runtime in use stays.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("snapshot holds an invalid entity")]
    Entity(#[from] SnapshotError),
    #[error("route {route_id} references service {service_id}, which the snapshot does not hold")]
    UnknownService {
        route_id: String,
        service_id: String,
    },
    #[error("service {service_id} has an invalid upstream address {address:?}")]
    InvalidUpstream { service_id: String, address: String },
}

pub(crate) type RequestBody = Limited<Incoming>;
pub(crate) type UpstreamClient = Client<HttpConnector, RequestBody>;

pub(crate) struct Runtime {
    pub(crate) version: u64,
    pub(crate) router: Router,
    /// Indexed by the router's `route_idx`.
    pub(crate) routes: Vec<RouteTarget>,
}

/// A route as the proxy uses it.
pub(crate) struct RouteTarget {
    pub(crate) id: Box<str>,
    pub(crate) strip_path: bool,
    pub(crate) preserve_host: bool,
    /// Set for routes whose protocols include `https` but not `http`: the
    /// status a plaintext request gets (426, or a redirect code).
    pub(crate) https_only: Option<StatusCode>,
    /// `None` when the route has no service (Kong answers 503).
    pub(crate) service: Option<Arc<ServiceTarget>>,
    /// `X-Forwarded-Prefix` per entry of the route's `paths`, for plain
    /// prefixes (a regex's prefix depends on the request).
    pub(crate) forwarded_prefixes: Box<[Option<HeaderValue>]>,
    /// Regex per entry of `paths`, kept only when the service's upstream
    /// hashes on a URI capture; empty otherwise.
    pub(crate) path_regexes: Box<[Option<Regex>]>,
}

impl RouteTarget {
    pub(crate) fn rewrite<'a>(&self, service: &'a ServiceTarget) -> Rewrite<'a> {
        Rewrite {
            strip_path: self.strip_path,
            service_path: &service.path,
        }
    }
}

/// A service as the proxy uses it.
pub(crate) struct ServiceTarget {
    pub(crate) id: Box<str>,
    /// `/` when the service has no path.
    pub(crate) path: Box<str>,
    /// Time from sending the request to receiving the response head.
    pub(crate) read_timeout: Duration,
    pub(crate) upstream: Upstream,
}

pub(crate) enum Upstream {
    Http(Box<HttpUpstream>),
    /// TODO(dp): https, grpc and grpcs upstreams (TLS); requests get 502.
    Unsupported {
        protocol: Box<str>,
    },
}

pub(crate) struct HttpUpstream {
    /// The service's `host:port`, for the logs.
    pub(crate) authority: Authority,
    /// Pooled client whose connector has the service's connect timeout.
    pub(crate) client: UpstreamClient,
    /// Where requests go: a fixed address, a DNS name or a balancer.
    pub(crate) peers: Peers,
}

impl Runtime {
    pub(crate) fn empty() -> Runtime {
        Runtime {
            version: 0,
            router: Router::empty(),
            routes: Vec::new(),
        }
    }

    pub(crate) fn build(
        snapshot: &ConfigSnapshot,
        clients: &ClientCache,
        balancers: &Balancers,
    ) -> Result<Runtime, BuildError> {
        let services: Vec<Service> = snapshot.typed("services")?;
        let routes: Vec<Route> = snapshot.typed("routes")?;

        let mut client_lookup = ClientLookup::new(clients);
        let mut balancer_lookup = BalancerLookup::new(balancers, snapshot)?;
        // `None` for disabled services: Kong leaves their routes out.
        let mut services_by_id: HashMap<&str, Option<Arc<ServiceTarget>>> =
            HashMap::with_capacity(services.len());
        for service in &services {
            let target = if service.enabled {
                Some(Arc::new(build_service(
                    service,
                    &mut client_lookup,
                    &mut balancer_lookup,
                )?))
            } else {
                None
            };
            services_by_id.insert(&service.id, target);
        }

        let mut targets = Vec::with_capacity(routes.len());
        let mut routable = Vec::with_capacity(routes.len());
        for route in &routes {
            let service = match &route.service {
                None => None,
                Some(reference) => match services_by_id.get(reference.id.as_str()) {
                    Some(Some(service)) => Some(Arc::clone(service)),
                    Some(None) => continue,
                    None => {
                        return Err(BuildError::UnknownService {
                            route_id: route.id.clone(),
                            service_id: reference.id.clone(),
                        })
                    }
                },
            };
            // TODO(dp): grpc(s)-only routes (Kong answers 415/426 on
            // mismatches) and stream routes; left out of the router for now.
            if !route.protocols.iter().any(|p| p == "http" || p == "https") {
                continue;
            }
            routable.push((targets.len(), route));
            targets.push(build_route(route, service));
        }
        let router = Router::build(
            routable
                .into_iter()
                .map(|(route_idx, route)| (route_idx, route_spec(route))),
        );
        client_lookup.publish();
        balancer_lookup.publish();
        Ok(Runtime {
            version: snapshot.version,
            router,
            routes: targets,
        })
    }
}

/// The fields the router matches on, borrowed from the route.
fn route_spec(route: &Route) -> RouteSpec<'_> {
    RouteSpec {
        id: &route.id,
        methods: route.methods.as_deref().unwrap_or(&[]),
        hosts: route.hosts.as_deref().unwrap_or(&[]),
        paths: route.paths.as_deref().unwrap_or(&[]),
        headers: route
            .headers
            .iter()
            .flatten()
            .map(|(name, values)| (name.as_str(), values.as_slice()))
            .collect(),
        snis: route.snis.as_deref().unwrap_or(&[]),
        regex_priority: route.regex_priority,
    }
}

fn build_route(route: &Route, service: Option<Arc<ServiceTarget>>) -> RouteTarget {
    let https_only = (route.protocols.iter().any(|p| p == "https")
        && !route.protocols.iter().any(|p| p == "http"))
    .then(|| match route.https_redirect_status_code {
        code @ (301 | 302 | 307 | 308) => {
            StatusCode::from_u16(code).unwrap_or(StatusCode::UPGRADE_REQUIRED)
        }
        _ => StatusCode::UPGRADE_REQUIRED,
    });
    let forwarded_prefixes = route
        .paths
        .iter()
        .flatten()
        .map(|path| {
            if path.starts_with('~') {
                None
            } else {
                HeaderValue::from_str(path).ok()
            }
        })
        .collect();
    let uses_captures = service
        .as_deref()
        .is_some_and(|service| match &service.upstream {
            Upstream::Http(http) => http.peers.uses_uri_captures(),
            Upstream::Unsupported { .. } => false,
        });
    let path_regexes = if uses_captures {
        // As the router compiles them: `~regex` matches at the start.
        route
            .paths
            .iter()
            .flatten()
            .map(|path| {
                path.strip_prefix('~')
                    .and_then(|regex| Regex::new(&format!("^{regex}")).ok())
            })
            .collect()
    } else {
        Box::default()
    };
    RouteTarget {
        id: route.id.as_str().into(),
        strip_path: route.strip_path,
        preserve_host: route.preserve_host,
        https_only,
        service,
        forwarded_prefixes,
        path_regexes,
    }
}

fn build_service(
    service: &Service,
    clients: &mut ClientLookup<'_>,
    balancers: &mut BalancerLookup<'_>,
) -> Result<ServiceTarget, BuildError> {
    let path = match service.path.as_deref() {
        None | Some("") => "/",
        Some(path) => path,
    };
    let upstream = if service.protocol == "http" {
        let host = if service.host.contains(':') && !service.host.starts_with('[') {
            format!("[{}]", service.host)
        } else {
            service.host.clone()
        };
        let address = format!("{host}:{}", service.port);
        let invalid = || BuildError::InvalidUpstream {
            service_id: service.id.clone(),
            address: address.clone(),
        };
        let authority = Authority::try_from(address.as_str()).map_err(|_| invalid())?;
        let host_header = if service.port == 80 {
            HeaderValue::from_str(&host)
        } else {
            HeaderValue::from_str(&address)
        }
        .map_err(|_| invalid())?;
        // Host header unless the route preserves the client's (or the
        // service's upstream sets its own): the service host, with the
        // port when it is not the scheme's default.
        let peers = balancers.peers(service, &authority, host_header);
        Upstream::Http(Box::new(HttpUpstream {
            authority,
            client: clients.get(Duration::from_millis(service.connect_timeout)),
            peers,
        }))
    } else {
        tracing::warn!(service_id = %service.id, protocol = %service.protocol, "Upstream protocol not supported yet; its routes will answer 502.");
        Upstream::Unsupported {
            protocol: service.protocol.as_str().into(),
        }
    };
    Ok(ServiceTarget {
        id: service.id.as_str().into(),
        path: path.into(),
        read_timeout: Duration::from_millis(service.read_timeout),
        upstream,
    })
}

/// Upstream clients by connect timeout. A client owns a keep-alive pool, so
/// clients outlive runtimes: a new config version keeps warm connections.
/// The connector fixes the connect timeout, hence one client per distinct
/// timeout (usually one: Kong's default of 60 s).
pub(crate) struct ClientCache {
    by_connect_timeout: ArcSwap<Vec<(Duration, UpstreamClient)>>,
}

impl Default for ClientCache {
    fn default() -> Self {
        ClientCache {
            by_connect_timeout: ArcSwap::from_pointee(Vec::new()),
        }
    }
}

/// The clients one build uses: reused from the cache or created. Publishing
/// keeps only those, so pools of timeouts no service uses any more go away
/// once the runtimes holding them are dropped.
struct ClientLookup<'c> {
    cache: &'c ClientCache,
    previous: Arc<Vec<(Duration, UpstreamClient)>>,
    used: Vec<(Duration, UpstreamClient)>,
}

impl<'c> ClientLookup<'c> {
    fn new(cache: &'c ClientCache) -> Self {
        ClientLookup {
            cache,
            previous: cache.by_connect_timeout.load_full(),
            used: Vec::new(),
        }
    }

    fn get(&mut self, connect_timeout: Duration) -> UpstreamClient {
        if let Some((_, client)) = self
            .used
            .iter()
            .find(|(timeout, _)| *timeout == connect_timeout)
        {
            return client.clone();
        }
        let client = match self
            .previous
            .iter()
            .find(|(timeout, _)| *timeout == connect_timeout)
        {
            Some((_, client)) => client.clone(),
            None => new_client(connect_timeout),
        };
        self.used.push((connect_timeout, client.clone()));
        client
    }

    fn publish(self) {
        self.cache.by_connect_timeout.store(Arc::new(self.used));
    }
}

fn new_client(connect_timeout: Duration) -> UpstreamClient {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(connect_timeout));
    connector.set_nodelay(true);
    Client::builder(TokioExecutor::new())
        .pool_timer(TokioTimer::new())
        // Kong's `upstream_keepalive_idle_timeout` and `_pool_size`.
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(512)
        // The proxy always sets Host itself.
        .set_host(false)
        .build(connector)
}
