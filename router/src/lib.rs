//! The router: which route a request belongs to, and which path it is sent
//! upstream with. It is its own crate because it is the one piece of the
//! data plane whose semantics are subtle (Kong's `traditional_compatible`
//! priorities, host, path and header rules, path normalization and
//! rewriting) and whose speed matters on every request: it is pure (no I/O,
//! no async runtime, no proxy stack, only `http` types at the edge), so it
//! can be tested against a reference matcher, fuzzed and benched on its own.
//!
//! A [`Router`] is compiled once per config version from [`RouteSpec`]s and
//! is immutable afterwards; [`Router::find`] takes a [`RequestView`] and
//! returns the winning route's index and the part of the path it matched,
//! which [`push_upstream_path`] turns into the upstream path.

mod index;
mod upstream_uri;
mod uri;

pub use index::{
    request_host, split_host_port, PathMatch, RequestView, RouteMatch, RouteSpec, Router,
};
pub use upstream_uri::{push_upstream_path, Rewrite};
pub use uri::{normalize_path, push_escaped};

#[cfg(test)]
mod test_routes;
