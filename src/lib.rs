//! pbx-remote-agent: the PBX side of Remote Management (the `agent` modules) and a reference
//! self-hosted central management server (the `server` modules). The two share only
//! [`protocol`] and the small utilities beside it.

#![forbid(unsafe_code)]

pub mod agent;
pub mod backoff;
pub mod cli;
pub mod config;
pub mod crypto;
pub mod fsutil;
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
