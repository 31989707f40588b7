//! The agent's TOML config: serde `Raw*` structs that reject unknown keys ([`raw`]), lifted by
//! [`validate`] into an [`AgentConfig`] whose fields cannot be wrong. Every error names the file,
//! the key and what is expected.

mod portal_login;
pub mod proxy;
mod raw;
mod validate;

pub use portal_login::{LoginMethod, PortalAccount, PortalLogin};
pub use validate::{is_extension_email, parse_pin, parse_server_addr};

pub use crate::protocol::{Edition, HaRole};
use crate::secret::Secret;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;
use url::Url;

/// Default config path.
pub const DEFAULT_PATH: &str = "/etc/pbx-remote-agent/agent.toml";

/// Environment variable overriding the default config path.
pub const ENV_PATH: &str = "PBX_REMOTE_AGENT_CONFIG";

/// Default status file (also used by `status` when the config is unreadable).
pub const DEFAULT_STATUS_FILE: &str = "/run/pbx-remote-agent/status.json";

/// A config that failed to load or validate; the agent exits 64 on it.
#[derive(Debug)]
pub struct ConfigError(pub String);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// The validated agent config.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// File it was read from.
    pub source: PathBuf,
    /// `[server]`.
    pub server: Server,
    /// `[activation]`.
    pub activation: Activation,
    /// `[pbx]`.
    pub pbx: Pbx,
    /// `[remote_access]`.
    pub remote_access: RemoteAccess,
    /// `[ha]`, when this PBX is one node of a Hot Standby pair.
    pub ha: Option<Ha>,
    /// `[provisioning]`, when templates may be dropped.
    pub provisioning: Option<Provisioning>,
    /// `[portal_login]`: the agent logs in to a portal that does not read the identity
    /// headers (DESIGN §12).
    pub portal_login: Option<PortalLogin>,
    /// `[tunnel]`.
    pub tunnel: Tunnel,
    /// `[metrics] listen`, off unless set.
    pub metrics_listen: Option<SocketAddr>,
    /// `[log] format`.
    pub log_format: LogFormat,
    /// `[paths]`.
    pub paths: Paths,
}

/// `[server]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Server {
    /// Remote Management on/off.
    pub enabled: bool,
    /// Host (IP or domain) and port of the CM.
    pub address: ServerAddr,
    /// Private CA for a self-hosted server.
    pub ca_file: Option<PathBuf>,
    /// SHA-256 of the server key's SubjectPublicKeyInfo.
    pub pin_sha256: Option<[u8; 32]>,
}

/// Host and port of the CM; HTTPS over TCP and QUIC over UDP share it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddr {
    /// Domain or IP literal (no brackets).
    pub host: String,
    /// Port (default 443).
    pub port: u16,
}

impl ServerAddr {
    /// `host:port` with brackets around IPv6 literals, as used in URLs.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

impl fmt::Display for ServerAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.authority())
    }
}

/// `[activation]`.
#[derive(Debug, Clone, PartialEq)]
pub enum Activation {
    /// One-time authentication code.
    AuthCode(Secret),
    /// Provider's CM account; the password may be removed after activation.
    Email {
        /// Account email.
        email: String,
        /// Password, used once.
        password: Option<Secret>,
    },
}

/// Where the MAC address comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MacSource {
    /// Read `/sys/class/net/IF/address`.
    Interface(String),
    /// Given in the config (lowercase, colon form).
    Fixed(String),
}

/// `[pbx]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Pbx {
    /// Edition.
    pub edition: Edition,
    /// Firmware version (at or above the edition minimum).
    pub firmware: String,
    /// Model name.
    pub model: String,
    /// Serial number.
    pub serial: String,
    /// MAC source.
    pub mac: MacSource,
    /// The only upstream the agent ever reaches.
    pub portal_url: Url,
    /// Trust for an https portal.
    pub portal_ca_file: Option<PathBuf>,
    /// Source address for portal connections.
    pub portal_source_addr: Option<IpAddr>,
    /// The super admin's username (reserved).
    pub super_admin: String,
    /// Extension emails (reserved usernames), one per line.
    pub extension_emails_file: Option<PathBuf>,
}

/// `[remote_access]`.
#[derive(Debug, Clone, PartialEq)]
pub struct RemoteAccess {
    /// Idle logout for every remote session.
    pub auto_logout: Duration,
    /// The remote account, when enabled.
    pub account: Option<Account>,
    /// Local passwordless switch.
    pub passwordless: bool,
}

/// `[remote_access.account]` when enabled.
#[derive(Debug, Clone, PartialEq)]
pub struct Account {
    /// Username (not the super admin, not an extension email).
    pub username: String,
    /// argon2id PHC string.
    pub password_hash: Secret,
}

/// `[ha]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Ha {
    /// This node's role.
    pub role: HaRole,
    /// File holding "active" or "standby".
    pub state_file: PathBuf,
}

/// `[provisioning]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Provisioning {
    /// Where received templates are written (0600).
    pub drop_dir: PathBuf,
}

/// `[tunnel]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Tunnel {
    /// Heartbeat/telemetry period.
    pub heartbeat: Duration,
    /// Graceful stop deadline.
    pub drain: Duration,
    /// Portal response-header timeout (→ 504).
    pub portal_timeout: Duration,
    /// `[tunnel] proxy`: the HTTP CONNECT proxy for TCP connections (activation now); unset,
    /// the environment's `HTTPS_PROXY` / `ALL_PROXY` / `NO_PROXY` decide.
    pub proxy: Option<proxy::ProxyUrl>,
    /// `[tunnel] transport`: QUIC, else TCP (`auto`, the default), or one of them only.
    pub transport: TransportMode,
}

/// `[tunnel] transport` (DESIGN §10).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportMode {
    /// QUIC first; TCP 300 ms later (1.5 × the last QUIC RTT when known) unless QUIC has
    /// completed its handshake; QUIC re-probed in the background while on TCP.
    #[default]
    Auto,
    /// QUIC only (TCP is never dialled).
    Quic,
    /// TCP only.
    Tcp,
}

/// `[log] format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line.
    Json,
}

/// `[paths]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Paths {
    /// State directory (0700).
    pub state_dir: PathBuf,
    /// Status file the PBX page reads.
    pub status_file: PathBuf,
    /// Public key the portal verifies assertions with.
    pub assertion_pubkey: PathBuf,
}

/// The config path from `-c`, else `PBX_REMOTE_AGENT_CONFIG`, else the default.
pub fn resolve_path(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| std::env::var_os(ENV_PATH).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_PATH))
}

impl AgentConfig {
    /// Reads and validates the file at `path`.
    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            ConfigError(format!("{}: cannot read config file: {e}", path.display()))
        })?;
        Self::parse(path, &text)
    }

    /// Validates `text` as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<AgentConfig, ConfigError> {
        let raw: raw::RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError(format!("{}: {}", path.display(), e.to_string().trim())))?;
        let v = validate::Validator { file: path };
        v.validate(raw)
    }

    /// Where status is read and written.
    pub fn status_file(&self) -> &Path {
        &self.paths.status_file
    }
}

#[cfg(test)]
mod tests;
