//! Plugins that change requests and responses on the way
//! (`request-transformer`, `response-transformer`, `correlation-id`) and
//! `proxy-cache`.

/// proxy-cache's in-memory store, shared by runtimes.
#[derive(Default)]
pub(crate) struct Store {}

/// proxy-cache's per-request state.
pub(crate) struct CacheState {}
