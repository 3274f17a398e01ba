//! The control plane: the only component that touches the database. It
//! stores entities with an ordered change log and a global config version,
//! serves Kong's Admin API over them, and hands each new configuration
//! version to whoever subscribes: the local data plane in standalone mode,
//! remote data planes over the sync stream (`cluster`) in `gatehouse cp`.

pub mod admin;
pub mod cluster;
pub mod dao;
pub mod store;

pub use dao::Dao;
