//! The runtime: everything a request needs from one config version, built
//! once from a snapshot and never mutated. Services are resolved into
//! upstream addresses, header values, timeouts and TLS client configs here,
//! and certificates into the SNI index, so that the request path and TLS
//! handshakes only look things up.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use gatehouse_model::snapshot::{
    parse_doc, ConfigSnapshot, EntityDoc, Route, Service, SnapshotError,
};
use gatehouse_router::{Rewrite, RouteSpec, Router};
use http::uri::{Authority, Scheme};
use http::{HeaderValue, StatusCode};
use http_body_util::Limited;
use hyper::body::Incoming;
use hyper_rustls::{FixedServerNameResolver, HttpsConnector};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use regex::Regex;
use rustls_pki_types::ServerName;

use crate::balancer::{BalancerLookup, Balancers, Peers};
use crate::plugins::{Chain, Plugins, RouteInfo, Shared};
use crate::tls::{
    client_config, CaCertificateEntity, CertificateEntity, CertificateIndex, ServedCertificate,
    ServiceTlsFields, SniEntity, TlsError, UpstreamTls,
};

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
    #[error(transparent)]
    Plugin(#[from] crate::plugins::PluginError),
}

/// A client's body as it arrives, or a whole one: empty when a bodiless
/// request is sent again to another peer, or as a plugin rewrote it.
pub(crate) type RequestBody =
    http_body_util::Either<Limited<Incoming>, http_body_util::Full<bytes::Bytes>>;
pub(crate) type UpstreamClient = Client<HttpsConnector<HttpConnector>, RequestBody>;

pub(crate) struct Runtime {
    pub(crate) version: u64,
    pub(crate) router: Router,
    /// Indexed by the router's `route_idx`; shared with the next runtime
    /// when neither the route nor its service changed.
    pub(crate) routes: Vec<Arc<RouteTarget>>,
    /// Certificates by server name, read by TLS handshakes.
    pub(crate) certificates: CertificateIndex,
    /// Whether routing or a balancer reads request headers (header rules,
    /// gRPC routes, hashing on a header or cookie). When none does, the
    /// HTTP/1.1 engine skips building a header map.
    pub(crate) reads_headers: bool,
    /// `None` when no enabled plugin is configured.
    pub(crate) plugins: Option<Plugins>,
}

impl Runtime {
    /// The plugin chain of the route at the router's `route_idx`.
    pub(crate) fn chain(&self, route_idx: usize) -> Option<(&Plugins, &Chain)> {
        let plugins = self.plugins.as_ref()?;
        Some((plugins, plugins.chain(route_idx)?))
    }
}

/// A route as the proxy uses it.
pub(crate) struct RouteTarget {
    pub(crate) id: Box<str>,
    pub(crate) strip_path: bool,
    pub(crate) preserve_host: bool,
    /// Set for routes whose protocols include `https` but not `http`: the
    /// status a plaintext request gets (426, or a redirect code).
    pub(crate) https_only: Option<StatusCode>,
    /// Set for routes whose protocols include `grpc` or `grpcs`: only gRPC
    /// requests over HTTP/2 pass.
    pub(crate) grpc: Option<GrpcRoute>,
    /// `None` when the route has no service (Kong answers 503).
    pub(crate) service: Option<Arc<ServiceTarget>>,
    /// `X-Forwarded-Prefix` per entry of the route's `paths`, for plain
    /// prefixes (a regex's prefix depends on the request).
    pub(crate) forwarded_prefixes: Box<[Option<HeaderValue>]>,
    /// Regex per entry of `paths`, kept only when the service's upstream
    /// hashes on a URI capture; empty otherwise.
    pub(crate) path_regexes: Box<[Option<Regex>]>,
}

/// What a gRPC route accepts.
#[derive(Clone, Copy, Debug)]
pub(crate) struct GrpcRoute {
    /// The route lists `grpc`: plaintext (h2c) requests are served, not
    /// only TLS ones.
    pub(crate) plaintext: bool,
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
    /// Kong's `connect_timeout`.
    pub(crate) connect_timeout: Duration,
    /// Kong's `read_timeout`: between two reads from the upstream (the
    /// HTTP/1.1 engine); the hyper client bounds the time to the response
    /// head with it.
    pub(crate) read_timeout: Duration,
    /// Kong's `write_timeout`: between two writes to the upstream.
    pub(crate) write_timeout: Duration,
    /// Kong's `retries`: further attempts, on other peers, after a failure
    /// to connect or a timeout.
    pub(crate) retries: u32,
    pub(crate) upstream: Upstream,
}

pub(crate) enum Upstream {
    /// `http` and `https` services.
    Http(Box<HttpUpstream>),
    /// Stream services (`tcp`, `tls`, `udp`), which HTTP routes cannot
    /// reach; requests get 502.
    Unsupported { protocol: Box<str> },
    /// An https service whose TLS settings do not load (a CA certificate
    /// that does not exist, an unusable client key); requests get 500.
    TlsUnavailable { error: Arc<TlsError> },
}

pub(crate) struct HttpUpstream {
    /// `http` or `https`; `grpc` and `grpcs` map to them.
    pub(crate) scheme: Scheme,
    /// `grpc` and `grpcs` services: requests go upstream over HTTP/2 (with
    /// prior knowledge on plaintext, by ALPN over TLS), as Kong's
    /// `grpc_pass` does; everything else over HTTP/1.1.
    pub(crate) h2: bool,
    /// The service's `host:port`, for the logs.
    pub(crate) authority: Authority,
    /// Pooled client whose connector has the service's connect timeout and
    /// TLS settings.
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
            certificates: CertificateIndex::default(),
            reads_headers: false,
            plugins: None,
        }
    }

    pub(crate) fn build(
        snapshot: &ConfigSnapshot,
        clients: &ClientCache,
        balancers: &Balancers,
        parsed: &mut ParseCache,
        shared: &Arc<Shared>,
    ) -> Result<Runtime, BuildError> {
        let services = parsed.services.typed(snapshot, "services")?;
        let routes = parsed.routes.typed(snapshot, "routes")?;
        let certificates: Vec<CertificateEntity> = snapshot.typed("certificates")?;
        let snis: Vec<SniEntity> = snapshot.typed("snis")?;
        let ca_certificates: Vec<CaCertificateEntity> = snapshot.typed("ca_certificates")?;
        let service_tls = parsed.service_tls.typed(snapshot, "services")?;
        let tls_sources = TlsSources {
            certificates: certificates.iter().map(|c| (c.id.as_str(), c)).collect(),
            ca_certificates: ca_certificates.iter().map(|c| (c.id.as_str(), c)).collect(),
            services: service_tls.iter().map(|s| (s.id.as_str(), &**s)).collect(),
        };

        let mut client_lookup = ClientLookup::new(clients);
        let mut balancer_lookup = BalancerLookup::new(balancers, snapshot)?;
        // A service's target depends on its document and on these; when
        // none changed, the targets built last time are reused.
        let context: Vec<usize> = ["upstreams", "targets", "certificates", "ca_certificates"]
            .into_iter()
            .flat_map(|entity| snapshot.docs(entity))
            .map(|doc| doc.as_ptr() as usize)
            .collect();
        let mut built = std::mem::take(&mut parsed.built);
        if built.context != context {
            built = Built::default();
        }
        let mut next = Built {
            context,
            services: HashMap::with_capacity(services.len()),
            routes: HashMap::with_capacity(routes.len()),
        };
        // `None` for disabled services: Kong leaves their routes out.
        let mut services_by_id: HashMap<&str, Option<Arc<ServiceTarget>>> =
            HashMap::with_capacity(services.len());
        for (doc, service) in snapshot.docs("services").iter().zip(&services) {
            let target = if service.enabled {
                let key = doc.as_ptr() as usize;
                let reused = built
                    .services
                    .remove(&key)
                    .filter(|previous| previous.keep(&mut client_lookup, &mut balancer_lookup));
                let entry = match reused {
                    Some(previous) => previous,
                    None => {
                        let (target, client) = build_service(
                            service,
                            &tls_sources,
                            &mut client_lookup,
                            &mut balancer_lookup,
                        )?;
                        BuiltService {
                            _doc: Arc::clone(doc),
                            target: Arc::new(target),
                            client,
                        }
                    }
                };
                let target = Arc::clone(&entry.target);
                next.services.insert(key, entry);
                Some(target)
            } else {
                None
            };
            services_by_id.insert(&service.id, target);
        }

        let mut targets = Vec::with_capacity(routes.len());
        let mut route_docs: Vec<&str> = Vec::with_capacity(routes.len());
        let mut routable = Vec::with_capacity(routes.len());
        for (doc, route) in snapshot.docs("routes").iter().zip(&routes) {
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
            // TODO(dp): stream routes (tcp, tls, udp) need stream
            // listeners; HTTP listeners never match them.
            if !route
                .protocols
                .iter()
                .any(|p| matches!(p.as_str(), "http" | "https" | "grpc" | "grpcs"))
            {
                continue;
            }
            // A route's target depends on its document and its service's.
            let key = doc.as_ptr() as usize;
            let target = match built.routes.remove(&key) {
                Some((_, previous))
                    if match (&previous.service, &service) {
                        (None, None) => true,
                        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                        _ => false,
                    } =>
                {
                    previous
                }
                _ => Arc::new(build_route(route, service)),
            };
            next.routes
                .insert(key, (Arc::clone(doc), Arc::clone(&target)));
            routable.push((targets.len(), &**route));
            route_docs.push(&**doc);
            targets.push(target);
        }
        parsed.built = next;
        let router = Router::build(
            routable
                .into_iter()
                .map(|(route_idx, route)| (route_idx, route_spec(route))),
        );
        client_lookup.publish();
        balancer_lookup.publish();
        let reads_headers = router.reads_headers()
            || targets.iter().any(|route| {
                route.grpc.is_some()
                    || route.service.as_deref().is_some_and(|service| {
                        matches!(&service.upstream, Upstream::Http(http) if http.peers.reads_headers())
                    })
            });
        let service_docs: HashMap<&str, &str> = snapshot
            .docs("services")
            .iter()
            .zip(&services)
            .map(|(doc, service)| (service.id.as_str(), &**doc))
            .collect();
        let route_infos: Vec<RouteInfo<'_>> = targets
            .iter()
            .zip(&route_docs)
            .map(|(route, doc)| {
                let service_id = route.service.as_deref().map(|service| &*service.id);
                RouteInfo {
                    id: &route.id,
                    service_id,
                    doc,
                    service_doc: service_id.and_then(|id| service_docs.get(id).copied()),
                }
            })
            .collect();
        let plugins = crate::plugins::build(snapshot, &route_infos, shared)?;
        Ok(Runtime {
            version: snapshot.version,
            router,
            reads_headers,
            plugins,
            routes: targets,
            certificates: build_certificates(&snis, &tls_sources),
        })
    }
}
/// Typed entities of the last build by document. Consecutive snapshots
/// share the allocations of unchanged documents, so a one-entity delta
/// parses one document here instead of every service and route.
#[derive(Default)]
pub(crate) struct ParseCache {
    services: Parsed<Service>,
    service_tls: Parsed<ServiceTlsFields>,
    routes: Parsed<Route>,
    built: Built,
}

/// Service and route targets of the last build by document address, with
/// the `context` (addresses of the upstream, target and certificate
/// documents) they were built in.
#[derive(Default)]
struct Built {
    context: Vec<usize>,
    services: HashMap<usize, BuiltService>,
    routes: HashMap<usize, (EntityDoc, Arc<RouteTarget>)>,
}

struct BuiltService {
    /// Holds the address the entry is keyed by.
    _doc: EntityDoc,
    target: Arc<ServiceTarget>,
    /// The key of the upstream client, for `http`-family services.
    client: Option<ClientKey>,
}

impl BuiltService {
    /// Marks what the target uses as in use by the new runtime; false
    /// when something is gone and the service must be built anew.
    fn keep(&self, clients: &mut ClientLookup<'_>, balancers: &mut BalancerLookup<'_>) -> bool {
        if let Some(key) = &self.client {
            if clients.get(key.clone()).is_err() {
                return false;
            }
        }
        match &self.target.upstream {
            Upstream::Http(http) => balancers.keep(&http.peers),
            Upstream::Unsupported { .. } | Upstream::TlsUnavailable { .. } => true,
        }
    }
}

/// Keyed by the document's address; the entry holds the document, so the
/// address cannot be reused by another one while it is cached.
struct Parsed<T> {
    by_doc: HashMap<usize, (EntityDoc, Arc<T>)>,
}

impl<T> Default for Parsed<T> {
    fn default() -> Self {
        Parsed {
            by_doc: HashMap::new(),
        }
    }
}

impl<T: serde::de::DeserializeOwned> Parsed<T> {
    /// The entities of kind `entity`, parsing only documents the last
    /// call did not see; entries for documents gone from the snapshot are
    /// dropped. On error the cache keeps its previous content.
    fn typed(
        &mut self,
        snapshot: &ConfigSnapshot,
        entity: &str,
    ) -> Result<Vec<Arc<T>>, SnapshotError> {
        let docs = snapshot.docs(entity);
        let mut next = HashMap::with_capacity(docs.len());
        let mut out = Vec::with_capacity(docs.len());
        for doc in docs {
            let key = doc.as_ptr() as usize;
            let typed = match self.by_doc.get(&key) {
                Some((_, typed)) => Arc::clone(typed),
                None => Arc::new(parse_doc(entity, doc)?),
            };
            next.insert(key, (Arc::clone(doc), Arc::clone(&typed)));
            out.push(typed);
        }
        self.by_doc = next;
        Ok(out)
    }
}

/// The TLS entities of a snapshot by id.
struct TlsSources<'s> {
    certificates: HashMap<&'s str, &'s CertificateEntity>,
    ca_certificates: HashMap<&'s str, &'s CaCertificateEntity>,
    services: HashMap<&'s str, &'s ServiceTlsFields>,
}

/// Loads the certificates `snis` name. One that does not load is logged
/// and left out: its names get the default certificate, and the rest of
/// the configuration still applies.
fn build_certificates(snis: &[SniEntity], sources: &TlsSources<'_>) -> CertificateIndex {
    let mut served: HashMap<&str, Arc<ServedCertificate>> = HashMap::new();
    for sni in snis {
        let id = sni.certificate.id.as_str();
        if served.contains_key(id) {
            continue;
        }
        let Some(entity) = sources.certificates.get(id) else {
            tracing::warn!(certificate_id = id, sni = %sni.name, "SNI names a certificate the snapshot does not hold; serving the default certificate.");
            continue;
        };
        match ServedCertificate::from_entity(entity) {
            Ok(certificate) => {
                served.insert(id, Arc::new(certificate));
            }
            Err(error) => {
                tracing::warn!(certificate_id = id, error = %crate::proxy::ErrorChain(&error), "Certificate does not load; its SNIs get the default certificate.");
            }
        }
    }
    CertificateIndex::from_snis(snis, &served)
}

/// A service's upstream TLS settings, certificates resolved to their PEM.
fn upstream_tls(service: &Service, sources: &TlsSources<'_>) -> Result<UpstreamTls, TlsError> {
    let fields = sources.services.get(service.id.as_str());
    let mut trusted = Vec::new();
    for ca_id in fields
        .and_then(|f| f.ca_certificates.as_ref())
        .into_iter()
        .flatten()
    {
        let ca = sources.ca_certificates.get(ca_id.as_str()).ok_or_else(|| {
            TlsError::UnknownCaCertificate {
                ca_certificate_id: ca_id.as_str().into(),
            }
        })?;
        trusted.push(Arc::from(ca.cert.as_str()));
    }
    let client_certificate = match fields.and_then(|f| f.client_certificate.as_ref()) {
        None => None,
        Some(reference) => {
            let certificate = sources
                .certificates
                .get(reference.id.as_str())
                .ok_or_else(|| TlsError::UnknownCertificate {
                    certificate_id: reference.id.as_str().into(),
                })?;
            Some((
                Arc::from(certificate.cert.as_str()),
                Arc::from(certificate.key.as_str()),
            ))
        }
    };
    Ok(UpstreamTls {
        verify: service.tls_verify.unwrap_or(false),
        verify_depth: fields.and_then(|f| f.tls_verify_depth),
        trusted,
        client_certificate,
    })
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
    let has = |protocol: &str| route.protocols.iter().any(|p| p == protocol);
    let grpc = (has("grpc") || has("grpcs")).then(|| GrpcRoute {
        plaintext: has("grpc"),
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
            Upstream::Unsupported { .. } | Upstream::TlsUnavailable { .. } => false,
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
        grpc,
        service,
        forwarded_prefixes,
        path_regexes,
    }
}

/// The service's target, and the key of the upstream client it uses.
fn build_service(
    service: &Service,
    tls_sources: &TlsSources<'_>,
    clients: &mut ClientLookup<'_>,
    balancers: &mut BalancerLookup<'_>,
) -> Result<(ServiceTarget, Option<ClientKey>), BuildError> {
    let path = match service.path.as_deref() {
        None | Some("") => "/",
        Some(path) => path,
    };
    let scheme = match service.protocol.as_str() {
        "http" => Some((Scheme::HTTP, false)),
        "https" => Some((Scheme::HTTPS, false)),
        "grpc" => Some((Scheme::HTTP, true)),
        "grpcs" => Some((Scheme::HTTPS, true)),
        _ => None,
    };
    let mut client_key = None;
    let upstream = if let Some((scheme, h2)) = scheme {
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
        let default_port = if scheme == Scheme::HTTPS { 443 } else { 80 };
        let host_header = if service.port == default_port {
            HeaderValue::from_str(&host)
        } else {
            HeaderValue::from_str(&address)
        }
        .map_err(|_| invalid())?;
        // Host header unless the route preserves the client's (or the
        // service's upstream sets its own): the service host, with the
        // port when it is not the scheme's default.
        let tls = if scheme == Scheme::HTTPS {
            upstream_tls(service, tls_sources).map(Some)
        } else {
            Ok(None)
        };
        let client = tls.and_then(|tls| {
            let key = ClientKey {
                connect_timeout: Duration::from_millis(service.connect_timeout),
                h2,
                // Requests go to peer addresses; the server name stays the
                // service host, as Kong's `upstream_host`.
                tls: tls.map(|tls| (tls, Box::from(service.host.as_str()))),
            };
            clients.get(key.clone()).map(|client| (client, key))
        });
        match client {
            Ok((client, key)) => {
                client_key = Some(key);
                let peers = balancers.peers(service, &authority, host_header);
                Upstream::Http(Box::new(HttpUpstream {
                    scheme,
                    h2,
                    authority,
                    client,
                    peers,
                }))
            }
            Err(error) => {
                tracing::warn!(service_id = %service.id, error = %crate::proxy::ErrorChain(&error), "Upstream TLS settings do not load; the service's routes will answer 500.");
                Upstream::TlsUnavailable {
                    error: Arc::new(error),
                }
            }
        }
    } else {
        tracing::warn!(service_id = %service.id, protocol = %service.protocol, "Stream services are not proxied yet; routes reaching them answer 502.");
        Upstream::Unsupported {
            protocol: service.protocol.as_str().into(),
        }
    };
    let target = ServiceTarget {
        id: service.id.as_str().into(),
        path: path.into(),
        connect_timeout: Duration::from_millis(service.connect_timeout),
        read_timeout: Duration::from_millis(service.read_timeout),
        write_timeout: Duration::from_millis(service.write_timeout),
        retries: service.retries,
        upstream,
    };
    Ok((target, client_key))
}

/// What a pooled client is fixed to. The connector fixes the connect
/// timeout, the TLS settings and the server name, hence one client per
/// distinct key (one for all http services with Kong's default timeout).
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ClientKey {
    connect_timeout: Duration,
    /// HTTP/2 only (gRPC services): a separate pool of multiplexed
    /// connections.
    h2: bool,
    /// For `https` services: the TLS settings and the server name. Pools
    /// are keyed by peer address, so services that reach one address under
    /// different names get different clients.
    tls: Option<(UpstreamTls, Box<str>)>,
}

/// Upstream clients by [`ClientKey`]. A client owns a keep-alive pool, so
/// clients outlive runtimes: a new config version keeps warm connections.
pub(crate) struct ClientCache {
    by_key: ArcSwap<Vec<(ClientKey, UpstreamClient)>>,
}

impl Default for ClientCache {
    fn default() -> Self {
        ClientCache {
            by_key: ArcSwap::from_pointee(Vec::new()),
        }
    }
}

/// The clients one build uses: reused from the cache or created. Publishing
/// keeps only those, so pools no service uses any more go away once the
/// runtimes holding them are dropped.
struct ClientLookup<'c> {
    cache: &'c ClientCache,
    previous: Arc<Vec<(ClientKey, UpstreamClient)>>,
    used: Vec<(ClientKey, UpstreamClient)>,
}

impl<'c> ClientLookup<'c> {
    fn new(cache: &'c ClientCache) -> Self {
        ClientLookup {
            cache,
            previous: cache.by_key.load_full(),
            used: Vec::new(),
        }
    }

    fn get(&mut self, key: ClientKey) -> Result<UpstreamClient, TlsError> {
        if let Some((_, client)) = self.used.iter().find(|(used, _)| *used == key) {
            return Ok(client.clone());
        }
        let client = match self.previous.iter().find(|(previous, _)| *previous == key) {
            Some((_, client)) => client.clone(),
            None => new_client(&key)?,
        };
        self.used.push((key, client.clone()));
        Ok(client)
    }

    fn publish(self) {
        self.cache.by_key.store(Arc::new(self.used));
    }
}

fn new_client(key: &ClientKey) -> Result<UpstreamClient, TlsError> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(key.connect_timeout));
    connector.set_nodelay(true);
    connector.enforce_http(false);
    let connector = match &key.tls {
        Some((tls, server_name)) => {
            let server_name = ServerName::try_from(server_name.to_string()).map_err(|_| {
                TlsError::ServerName {
                    name: server_name.clone(),
                }
            })?;
            let builder = hyper_rustls::HttpsConnectorBuilder::new()
                .with_tls_config(client_config(tls)?)
                .https_or_http()
                .with_server_name_resolver(FixedServerNameResolver::new(server_name));
            // ALPN offers exactly the one protocol the pool speaks.
            if key.h2 {
                builder.enable_http2().wrap_connector(connector)
            } else {
                builder.enable_http1().wrap_connector(connector)
            }
        }
        // Plain http: the TLS config is never used.
        None => hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(client_config(&UpstreamTls::default())?)
            .https_or_http()
            .enable_http1()
            .wrap_connector(connector),
    };
    let mut builder = Client::builder(TokioExecutor::new());
    if key.h2 {
        builder.http2_only(true).timer(TokioTimer::new());
    }
    Ok(builder
        .pool_timer(TokioTimer::new())
        // Kong's `upstream_keepalive_idle_timeout` and `_pool_size`.
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(512)
        // The proxy always sets Host itself.
        .set_host(false)
        .build(connector))
}
