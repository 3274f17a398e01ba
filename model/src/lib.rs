//! Gatehouse's shared model: Kong 3.x entities and their schemas, the one
//! validator that produces Kong's error bodies, plugin configuration
//! schemas, and the configuration snapshot that the control plane builds and
//! the data plane runs. It does no I/O, so that the Admin API, the
//! declarative loader and the data plane agree on what is valid.

pub mod declarative;
pub mod entities;
pub mod error;
pub mod health;
pub mod pem;
pub mod plugins;
pub mod schema;
pub mod snapshot;
pub mod uri;

pub use error::DbError;
