//! Benchmarks, kept out of the crates they measure so that `cargo test`
//! stays fast and criterion is only built for `cargo bench`. This library
//! holds the generated inputs the benches share: route sets shaped like
//! large Kong configurations and requests that hit or miss them.

/// Owned routes, borrowed as `RouteSpec`s by the router.
pub struct Routes {
    pub ids: Vec<String>,
    pub methods: Vec<Vec<String>>,
    pub hosts: Vec<Vec<String>>,
    pub paths: Vec<Vec<String>>,
}

impl Routes {
    /// `n_routes` routes: every route has one path (`/svc<i>/v<i%3>/items`,
    /// or, when `regex_every` is set, a regex `~/svc<i>/items/\d+$` for one
    /// route in `regex_every`); one route in four also has a method, one in
    /// eight a host.
    pub fn generate(n_routes: usize, regex_every: Option<usize>) -> Routes {
        let mut routes = Routes {
            ids: Vec::with_capacity(n_routes),
            methods: Vec::with_capacity(n_routes),
            hosts: Vec::with_capacity(n_routes),
            paths: Vec::with_capacity(n_routes),
        };
        for route_idx in 0..n_routes {
            routes
                .ids
                .push(format!("00000000-0000-4000-8000-{route_idx:012}"));
            routes.methods.push(if route_idx % 4 == 1 {
                vec!["GET".to_owned()]
            } else {
                Vec::new()
            });
            routes.hosts.push(if route_idx % 8 == 3 {
                vec![format!("svc{}.example.com", route_idx % 1000)]
            } else {
                Vec::new()
            });
            let path = match regex_every {
                Some(every) if route_idx % every == every - 1 => {
                    format!("~/svc{route_idx}/items/\\d+$")
                }
                _ => format!("/svc{route_idx}/v{}/items", route_idx % 3),
            };
            routes.paths.push(vec![path]);
        }
        routes
    }

    pub fn specs(&self) -> Vec<gatehouse_router::RouteSpec<'_>> {
        (0..self.ids.len())
            .map(|route_idx| gatehouse_router::RouteSpec {
                id: &self.ids[route_idx],
                methods: &self.methods[route_idx],
                hosts: &self.hosts[route_idx],
                paths: &self.paths[route_idx],
                ..gatehouse_router::RouteSpec::default()
            })
            .collect()
    }

    /// A request path that the route `route_idx` matches.
    pub fn hit_path(&self, route_idx: usize) -> String {
        let path = &self.paths[route_idx][0];
        match path.strip_prefix('~') {
            Some(_) => format!("/svc{route_idx}/items/42"),
            None => format!("{path}/42"),
        }
    }
}
