//! The config file as serde reads it: `Raw*` structs that reject unknown keys, and the defaults
//! of optional keys. [`super::validate`] lifts them into the typed config.

use super::DEFAULT_STATUS_FILE;
use crate::secret::Secret;
use serde::Deserialize;
use std::path::PathBuf;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    pub(super) server: RawServer,
    pub(super) activation: RawActivation,
    pub(super) pbx: RawPbx,
    #[serde(default)]
    pub(super) remote_access: RawRemoteAccess,
    pub(super) ha: Option<RawHa>,
    pub(super) provisioning: Option<RawProvisioning>,
    pub(super) portal_login: Option<super::portal_login::RawPortalLogin>,
    #[serde(default)]
    pub(super) tunnel: RawTunnel,
    #[serde(default)]
    pub(super) metrics: RawMetrics,
    #[serde(default)]
    pub(super) log: RawLog,
    #[serde(default)]
    pub(super) paths: RawPaths,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawServer {
    pub(super) enabled: bool,
    #[serde(rename = "type", default = "default_server_type")]
    pub(super) kind: String,
    pub(super) address: String,
    pub(super) ca_file: Option<PathBuf>,
    pub(super) pin_sha256: Option<String>,
}

fn default_server_type() -> String {
    "custom".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawActivation {
    pub(super) method: String,
    pub(super) auth_code: Option<Secret>,
    pub(super) email: Option<String>,
    pub(super) password: Option<Secret>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPbx {
    pub(super) edition: String,
    pub(super) firmware: String,
    pub(super) model: String,
    pub(super) serial: String,
    pub(super) mac_interface: Option<String>,
    pub(super) mac: Option<String>,
    pub(super) portal_url: String,
    pub(super) portal_ca_file: Option<PathBuf>,
    pub(super) portal_source_addr: Option<String>,
    #[serde(default = "default_super_admin")]
    pub(super) super_admin: String,
    pub(super) extension_emails_file: Option<PathBuf>,
}

fn default_super_admin() -> String {
    "admin".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawRemoteAccess {
    #[serde(default = "default_auto_logout")]
    pub(super) auto_logout_minutes: i64,
    pub(super) account: Option<RawAccount>,
    pub(super) passwordless: Option<RawPasswordless>,
}

impl Default for RawRemoteAccess {
    fn default() -> Self {
        RawRemoteAccess {
            auto_logout_minutes: default_auto_logout(),
            account: None,
            passwordless: None,
        }
    }
}

fn default_auto_logout() -> i64 {
    15
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawAccount {
    pub(super) enabled: bool,
    pub(super) username: Option<String>,
    pub(super) password_hash: Option<Secret>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPasswordless {
    pub(super) enabled: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawHa {
    pub(super) role: String,
    pub(super) state_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawProvisioning {
    pub(super) drop_dir: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawTunnel {
    #[serde(default = "default_heartbeat")]
    pub(super) heartbeat_secs: u64,
    #[serde(default = "default_drain")]
    pub(super) drain_secs: u64,
    #[serde(default = "default_portal_timeout")]
    pub(super) portal_timeout_secs: u64,
    pub(super) proxy: Option<String>,
    pub(super) transport: Option<String>,
}

impl Default for RawTunnel {
    fn default() -> Self {
        RawTunnel {
            heartbeat_secs: default_heartbeat(),
            drain_secs: default_drain(),
            portal_timeout_secs: default_portal_timeout(),
            proxy: None,
            transport: None,
        }
    }
}

fn default_heartbeat() -> u64 {
    30
}
fn default_drain() -> u64 {
    10
}
fn default_portal_timeout() -> u64 {
    30
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawMetrics {
    pub(super) listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawLog {
    pub(super) format: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RawPaths {
    #[serde(default = "default_state_dir")]
    pub(super) state_dir: PathBuf,
    #[serde(default = "default_status_file")]
    pub(super) status_file: PathBuf,
    #[serde(default = "default_assertion_pubkey")]
    pub(super) assertion_pubkey: PathBuf,
}

impl Default for RawPaths {
    fn default() -> Self {
        RawPaths {
            state_dir: default_state_dir(),
            status_file: default_status_file(),
            assertion_pubkey: default_assertion_pubkey(),
        }
    }
}

fn default_state_dir() -> PathBuf {
    "/var/lib/pbx-remote-agent".into()
}
fn default_status_file() -> PathBuf {
    DEFAULT_STATUS_FILE.into()
}
fn default_assertion_pubkey() -> PathBuf {
    "/run/pbx-remote-agent/assertion.pub".into()
}
