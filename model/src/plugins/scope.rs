//! Kong's plugin scoping: of the configurations of one plugin, which one
//! applies to a request, by the route, service and consumer it has
//! (`lookup_cfg` in `kong/runloop/plugins_iterator.lua`). The data plane
//! builds one [`Combos`] per plugin name when it builds a runtime, so a
//! request does at most seven hash lookups per plugin, and none for a
//! plugin no entity of its scope configures.

use std::collections::HashMap;

/// The entities a plugin configuration is attached to (`None`: any).
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
pub struct Scope {
    pub route: Option<Box<str>>,
    pub service: Option<Box<str>>,
    pub consumer: Option<Box<str>>,
}

type By<V> = HashMap<Box<str>, V>;

/// `map[a][b]`, when both are given.
fn two<'m, T>(map: &'m By<By<T>>, a: Option<&str>, b: Option<&str>) -> Option<&'m T> {
    map.get(a?)?.get(b?)
}

/// The configurations of one plugin name, by scope: one map per level of
/// Kong's order, looked up with borrowed ids (no allocation per request).
#[derive(Debug)]
pub struct Combos<T> {
    route_service_consumer: By<By<By<T>>>,
    route_consumer: By<By<T>>,
    service_consumer: By<By<T>>,
    route_service: By<By<T>>,
    consumer: By<T>,
    route: By<T>,
    service: By<T>,
    global: Option<T>,
    len: usize,
}

impl<T> Default for Combos<T> {
    fn default() -> Self {
        Combos {
            route_service_consumer: HashMap::new(),
            route_consumer: HashMap::new(),
            service_consumer: HashMap::new(),
            route_service: HashMap::new(),
            consumer: HashMap::new(),
            route: HashMap::new(),
            service: HashMap::new(),
            global: None,
            len: 0,
        }
    }
}

impl<T> Combos<T> {
    /// Adds the configuration for `scope`; Kong's schema keeps scopes
    /// unique per plugin name, so a second one for a scope replaces it.
    pub fn insert(&mut self, scope: Scope, config: T) {
        self.len += 1;
        let Scope {
            route,
            service,
            consumer,
        } = scope;
        match (route, service, consumer) {
            (Some(r), Some(s), Some(c)) => {
                self.route_service_consumer
                    .entry(r)
                    .or_default()
                    .entry(s)
                    .or_default()
                    .insert(c, config);
            }
            (Some(r), None, Some(c)) => {
                self.route_consumer.entry(r).or_default().insert(c, config);
            }
            (None, Some(s), Some(c)) => {
                self.service_consumer
                    .entry(s)
                    .or_default()
                    .insert(c, config);
            }
            (Some(r), Some(s), None) => {
                self.route_service.entry(r).or_default().insert(s, config);
            }
            (None, None, Some(c)) => {
                self.consumer.insert(c, config);
            }
            (Some(r), None, None) => {
                self.route.insert(r, config);
            }
            (None, Some(s), None) => {
                self.service.insert(s, config);
            }
            (None, None, None) => self.global = Some(config),
        }
    }

    /// Every configuration, in no particular order.
    pub fn for_each(&self, mut f: impl FnMut(&T)) {
        let values = self
            .route_service_consumer
            .values()
            .flat_map(|by| by.values())
            .flat_map(|by| by.values())
            .chain(
                [
                    &self.route_consumer,
                    &self.service_consumer,
                    &self.route_service,
                ]
                .into_iter()
                .flat_map(|map| map.values().flat_map(|by| by.values())),
            )
            .chain(
                [&self.consumer, &self.route, &self.service]
                    .into_iter()
                    .flat_map(|map| map.values()),
            )
            .chain(self.global.as_ref());
        for value in values {
            f(value);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether a configuration of this plugin names a consumer: its lookup
    /// waits until the consumer is known (after authentication).
    pub fn consumer_scoped(&self) -> bool {
        !(self.route_service_consumer.is_empty()
            && self.route_consumer.is_empty()
            && self.service_consumer.is_empty()
            && self.consumer.is_empty())
    }

    /// The configuration that applies, in Kong's order: route, service and
    /// consumer; route and consumer; service and consumer; route and
    /// service; consumer; route; service; global.
    pub fn lookup(
        &self,
        route: Option<&str>,
        service: Option<&str>,
        consumer: Option<&str>,
    ) -> Option<&T> {
        let with_consumer = || -> Option<&T> {
            let c = consumer?;
            (|| {
                self.route_service_consumer
                    .get(route?)?
                    .get(service?)?
                    .get(c)
            })()
            .or_else(|| two(&self.route_consumer, route, Some(c)))
            .or_else(|| two(&self.service_consumer, service, Some(c)))
        };
        with_consumer()
            .or_else(|| two(&self.route_service, route, service))
            .or_else(|| self.consumer.get(consumer?))
            .or_else(|| self.route.get(route?))
            .or_else(|| self.service.get(service?))
            .or(self.global.as_ref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(route: Option<&str>, service: Option<&str>, consumer: Option<&str>) -> Scope {
        Scope {
            route: route.map(Box::from),
            service: service.map(Box::from),
            consumer: consumer.map(Box::from),
        }
    }

    #[test]
    fn the_most_specific_scope_wins_in_kongs_order() {
        // Kong's eight levels, most specific first; each is removed in
        // turn and the next must win.
        let levels = [
            (
                scope(Some("r"), Some("s"), Some("c")),
                "route+service+consumer",
            ),
            (scope(Some("r"), None, Some("c")), "route+consumer"),
            (scope(None, Some("s"), Some("c")), "service+consumer"),
            (scope(Some("r"), Some("s"), None), "route+service"),
            (scope(None, None, Some("c")), "consumer"),
            (scope(Some("r"), None, None), "route"),
            (scope(None, Some("s"), None), "service"),
            (scope(None, None, None), "global"),
        ];
        for first in 0..levels.len() {
            let mut combos = Combos::default();
            for (scope, name) in &levels[first..] {
                combos.insert(scope.clone(), *name);
            }
            assert_eq!(
                combos.lookup(Some("r"), Some("s"), Some("c")),
                Some(&levels[first].1),
                "with levels from {}",
                levels[first].1
            );
        }
    }

    #[test]
    fn scopes_for_other_entities_do_not_apply() {
        let mut combos = Combos::default();
        combos.insert(scope(Some("other-route"), None, None), "other");
        combos.insert(scope(None, None, Some("other-consumer")), "theirs");
        assert!(combos.consumer_scoped());
        assert_eq!(combos.lookup(Some("r"), Some("s"), Some("c")), None);
        assert_eq!(combos.lookup(Some("r"), Some("s"), None), None);
        combos.insert(scope(None, None, None), "global");
        assert_eq!(combos.lookup(Some("r"), None, None), Some(&"global"));
        // Before the consumer is known, consumer-scoped ones cannot apply.
        combos.insert(scope(Some("r"), None, Some("c")), "mine");
        assert_eq!(combos.lookup(Some("r"), None, None), Some(&"global"));
        assert_eq!(combos.lookup(Some("r"), None, Some("c")), Some(&"mine"));
    }
}
