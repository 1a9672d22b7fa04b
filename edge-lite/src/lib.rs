//! `tether-edge`, the edge server of tether: devices (`tetherd`) dial its
//! agent port over TLS 1.3 and authenticate with a token; the public
//! connects to its tcp ports and its shared TLS port, and each public
//! connection is carried to the device as a stream of the device's session
//! (proto/PROTOCOL.md; the README documents the configuration, the CLI and
//! the machine-readable stdout lines).
//!
//! - [`config`]: the typed `edge.toml`, errors with file, line and field.
//! - [`store`]: the SQLite token store (salted hashes, never secrets).
//! - [`Server`] / [`run`]: the listeners, sessions, routing, revocation
//!   watcher and graceful shutdown.
//! - [`admin`]: what the `token` subcommands print.
//!
//! The multiplexer and its async driver are `tether-proto` and
//! `tether-driver`; this crate adds no second driver. Not here yet: IP
//! restrictions, client certificates, policies, rotation, the admin API and
//! events (DESIGN.md), which later issues add.

pub mod admin;
mod agent;
pub mod config;
mod public;
mod registry;
mod server;
pub mod store;
mod tls;

use std::future::Future;

pub use config::{Config, ConfigError};
pub use server::{RunError, Server, REVOCATION_POLL};

/// Runs the edge until `shutdown` resolves, then drains and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    Server::bind(config).await?.run(shutdown).await
}
