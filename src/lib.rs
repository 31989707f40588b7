//! pbx-remote-agent: the PBX side of Remote Management (the `agent` modules) and a reference
//! self-hosted central management server (the `server` modules).
//!
//! A visitor's request, in the order it meets the code on the PBX:
//!
//! - [`config`]: the agent's TOML, validated into an [`config::AgentConfig`];
//! - [`agent::activation`]: a one-time code or the provider's account → the device credential;
//! - [`agent::tunnel`]: the outbound QUIC connection to the server ([`quic`] tunes it);
//! - [`agent::gate`]: whether the request may reach the portal, and as whom;
//! - [`agent::proxy`]: the tunnel stream served as HTTP/1.1 to the portal, headers rewritten;
//! - [`agent::portal`]: the one upstream the agent reaches.
//!
//! On the server: [`server::api`] (activation), [`server::hub`] (tunnels), [`server::front`]
//! (visit links → tunnel streams) and [`server::db`] (the registry).
//!
//! The two sides share only [`protocol`] (the wire contract) and leaf modules: [`crypto`],
//! [`tls`], [`web`], [`fsutil`], [`secret`], [`password`], [`token`], [`backoff`].
//!
//! **Public surface.** The library exists for its two binaries; what is `pub` is what they, the
//! integration tests (`tests/it/`) and the fuzz targets (`fuzz/`) reach, and everything else is
//! `pub(crate)`. Items public only for tests or fuzzing say so in their docs. Nothing here is a
//! stable API for other crates: the contract is the CLI, the config, the status file and the
//! wire protocol (DESIGN.md).

#![forbid(unsafe_code)]
#![warn(missing_docs)]

/// The PBX side (what `pbx-remote-agent run` runs).
pub mod agent;
pub(crate) mod backoff;
pub mod cli;
pub mod config;
pub mod crypto;
pub(crate) mod fsutil;
#[doc(hidden)]
pub mod fuzzing;
pub mod h2io;
pub(crate) mod httpserve;
pub mod logging;
pub mod password;
pub mod protocol;
pub mod quic;
pub mod secret;
/// The reference CM server (what `pbx-remote-server` runs).
pub mod server;
pub mod signals;
pub mod status;
pub mod systemd;
pub mod tls;
pub mod token;
pub mod tunnelio;
pub mod web;
