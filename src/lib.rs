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

#![forbid(unsafe_code)]

pub mod agent;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod fsutil;
pub mod httpserve;
pub mod logging;
pub mod password;
pub mod protocol;
pub mod quic;
pub mod secret;
pub mod server;
pub mod signals;
pub mod status;
pub mod systemd;
pub mod tls;
pub mod token;
pub mod web;
