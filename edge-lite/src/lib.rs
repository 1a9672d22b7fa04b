//! `tether-edge`, the edge server of tether: devices (`tetherd`) dial its
//! agent port over TLS 1.3 and authenticate with a token; the public
//! connects to its tcp ports and its shared TLS port, and each public
//! connection is carried to the device as a stream of the device's session
//! (proto/PROTOCOL.md; the README documents the configuration, the CLI and
//! the machine-readable stdout lines).
//!
//! The modules, each with one owner, in a one-way chain (a module imports
//! only modules listed after it):
//!
//! - `server` ([`Server`] / [`run`]): binds the listeners, accepts, watches
//!   the store (revocations, scopes, endpoint owners), prunes events, shuts
//!   down gracefully.
//! - `api`: the admin API (its listener, limits, routes and JSON; the
//!   document is `openapi.json` beside `src/`), on hyper 1 and the edge's
//!   executor; it changes the store, the watcher applies the changes.
//! - `agent`: one agent connection, from admission to unbinding at its end.
//! - `rotation`: offering a successor token to a session, draining it once
//!   the device stored it, retiring the old token at the successor's `Hello`.
//! - `handshake`: TLS, the first frame, `Hello` and the token check, before
//!   any session memory exists.
//! - `bind`: deciding a `Bind` (ACL, limits, ownership, tcp ports).
//! - `public`: the public listeners, the policy checks at accept and after
//!   the ClientHello, the handshake, and the copy into streams.
//! - `state`: what every task shares, the one `timeout`, store calls.
//! - `registry`: who holds which endpoint (with its effective policy);
//!   `admission`: pending handshakes per source; [`ratelimit`]: failed
//!   authentications per source and token id; [`metrics`]: the counters
//!   and the policy denials; [`lines`]: the stdout lines.
//! - [`config`]: the typed `edge.toml`; [`store`]: the store interface and
//!   its SQLite implementation (tokens as salted hashes, never secrets, with
//!   their scopes; endpoint owners; versioned schema migrations); `tls`: rustls
//!   (server configs per endpoint policy, the CLI's client config, the
//!   client-certificate verifier, the identity of a verified leaf); [`policy`]: the traffic-policy model,
//!   pure (no I/O, no clock): parsing, `restrict-ips`, and the conjunction of
//!   the edge's, the endpoint's and the agent's layers; [`scope`]: the
//!   other half of the policy model, pure too: a token's bind rules
//!   (`name`, `*.suffix`, `*`) and source CIDRs; [`events`]: the event
//!   type and its kinds, pure; [`wire`]: the API's JSON, which the API
//!   writes and the CLI reads (or makes offline); [`listing`]: the CLI's
//!   tables of it; [`client`]: the CLI's client of the API.
//!
//! The multiplexer and its async driver are `tether-proto` and
//! `tether-driver`; this crate adds no second driver.

mod admission;
mod agent;
mod api;
mod bind;
pub mod client;
pub mod config;
pub mod events;
mod handshake;
pub mod lines;
pub mod listing;
pub mod metrics;
pub mod policy;
mod public;
pub mod ratelimit;
mod registry;
mod rotation;
pub mod scope;
mod server;
mod state;
pub mod store;
mod tls;
pub mod wire;

use std::future::Future;

pub use config::{Config, ConfigError};
pub use server::{RunError, Server, REVOCATION_POLL, SUMMARY_EVERY};

/// Runs the edge until `shutdown` resolves, then drains and returns.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), RunError> {
    Server::bind(config).await?.run(shutdown).await
}
