//! The agent's TOML config: serde `Raw*` structs that reject unknown keys, lifted by
//! `validate` into an [`AgentConfig`] whose fields cannot be wrong. Every error names the file,
//! the key and what is expected.

use crate::secret::Secret;
use serde::Deserialize;
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

/// Largest PHC memory cost accepted for the remote account's hash, in KiB (64 MiB).
pub const MAX_ARGON2_MEMORY_KIB: u32 = 64 * 1024;

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

/// PBX edition; decides the firmware minimum.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Edition {
    /// Software edition (minimum 83.19.0.110).
    Software,
    /// Appliance edition (minimum 37.19.0.110).
    Appliance,
}

impl Edition {
    /// The lowest firmware that supports Remote Management.
    pub fn min_firmware(self) -> &'static str {
        match self {
            Edition::Software => "83.19.0.110",
            Edition::Appliance => "37.19.0.110",
        }
    }

    /// Config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Edition::Software => "software",
            Edition::Appliance => "appliance",
        }
    }

    /// Parses the config spelling.
    pub fn parse(s: &str) -> Option<Edition> {
        match s {
            "software" => Some(Edition::Software),
            "appliance" => Some(Edition::Appliance),
            _ => None,
        }
    }
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

/// Hot Standby role of this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HaRole {
    /// Primary node.
    Primary,
    /// Secondary node.
    Secondary,
}

impl HaRole {
    /// Config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            HaRole::Primary => "primary",
            HaRole::Secondary => "secondary",
        }
    }
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    server: RawServer,
    activation: RawActivation,
    pbx: RawPbx,
    #[serde(default)]
    remote_access: RawRemoteAccess,
    ha: Option<RawHa>,
    provisioning: Option<RawProvisioning>,
    #[serde(default)]
    tunnel: RawTunnel,
    #[serde(default)]
    metrics: RawMetrics,
    #[serde(default)]
    log: RawLog,
    #[serde(default)]
    paths: RawPaths,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawServer {
    enabled: bool,
    #[serde(rename = "type", default = "default_server_type")]
    kind: String,
    address: String,
    ca_file: Option<PathBuf>,
    pin_sha256: Option<String>,
}

fn default_server_type() -> String {
    "custom".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawActivation {
    method: String,
    auth_code: Option<Secret>,
    email: Option<String>,
    password: Option<Secret>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPbx {
    edition: String,
    firmware: String,
    model: String,
    serial: String,
    mac_interface: Option<String>,
    mac: Option<String>,
    portal_url: String,
    portal_ca_file: Option<PathBuf>,
    portal_source_addr: Option<String>,
    #[serde(default = "default_super_admin")]
    super_admin: String,
    extension_emails_file: Option<PathBuf>,
}

fn default_super_admin() -> String {
    "admin".into()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRemoteAccess {
    #[serde(default = "default_auto_logout")]
    auto_logout_minutes: i64,
    account: Option<RawAccount>,
    passwordless: Option<RawPasswordless>,
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
struct RawAccount {
    enabled: bool,
    username: Option<String>,
    password_hash: Option<Secret>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPasswordless {
    enabled: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHa {
    role: String,
    state_file: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProvisioning {
    drop_dir: PathBuf,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTunnel {
    #[serde(default = "default_heartbeat")]
    heartbeat_secs: u64,
    #[serde(default = "default_drain")]
    drain_secs: u64,
    #[serde(default = "default_portal_timeout")]
    portal_timeout_secs: u64,
}

impl Default for RawTunnel {
    fn default() -> Self {
        RawTunnel {
            heartbeat_secs: default_heartbeat(),
            drain_secs: default_drain(),
            portal_timeout_secs: default_portal_timeout(),
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
struct RawMetrics {
    listen: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLog {
    format: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPaths {
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "default_status_file")]
    status_file: PathBuf,
    #[serde(default = "default_assertion_pubkey")]
    assertion_pubkey: PathBuf,
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
        let raw: RawConfig = toml::from_str(text)
            .map_err(|e| ConfigError(format!("{}: {}", path.display(), e.to_string().trim())))?;
        let v = Validator { file: path };
        v.validate(raw)
    }

    /// Where status is read and written.
    pub fn status_file(&self) -> &Path {
        &self.paths.status_file
    }
}

struct Validator<'a> {
    file: &'a Path,
}

impl Validator<'_> {
    fn err(&self, key: &str, expected: impl fmt::Display) -> ConfigError {
        ConfigError(format!("{}: {key}: {expected}", self.file.display()))
    }

    fn validate(&self, raw: RawConfig) -> Result<AgentConfig, ConfigError> {
        let server = self.server(raw.server)?;
        let activation = self.activation(raw.activation)?;
        let pbx = self.pbx(raw.pbx)?;
        let remote_access = self.remote_access(raw.remote_access, &pbx)?;
        let ha = raw
            .ha
            .map(|h| {
                let role = match h.role.as_str() {
                    "primary" => HaRole::Primary,
                    "secondary" => HaRole::Secondary,
                    other => {
                        return Err(self.err(
                            "ha.role",
                            format!("expected \"primary\" or \"secondary\", got {other:?}"),
                        ))
                    }
                };
                Ok(Ha {
                    role,
                    state_file: self.absolute("ha.state_file", h.state_file)?,
                })
            })
            .transpose()?;
        let provisioning = raw
            .provisioning
            .map(|p| {
                Ok::<_, ConfigError>(Provisioning {
                    drop_dir: self.absolute("provisioning.drop_dir", p.drop_dir)?,
                })
            })
            .transpose()?;
        let t = raw.tunnel;
        let secs = |key: &str, v: u64, lo: u64, hi: u64| {
            if (lo..=hi).contains(&v) {
                Ok(Duration::from_secs(v))
            } else {
                Err(self.err(key, format!("expected {lo}..={hi} seconds, got {v}")))
            }
        };
        let tunnel = Tunnel {
            heartbeat: secs("tunnel.heartbeat_secs", t.heartbeat_secs, 1, 300)?,
            drain: secs("tunnel.drain_secs", t.drain_secs, 0, 300)?,
            portal_timeout: secs("tunnel.portal_timeout_secs", t.portal_timeout_secs, 1, 600)?,
        };
        let metrics_listen = raw
            .metrics
            .listen
            .map(|l| {
                l.parse::<SocketAddr>().map_err(|_| {
                    self.err(
                        "metrics.listen",
                        format!("expected an IP:port such as \"127.0.0.1:9750\", got {l:?}"),
                    )
                })
            })
            .transpose()?;
        let log_format = match raw.log.format.as_deref() {
            None | Some("text") => LogFormat::Text,
            Some("json") => LogFormat::Json,
            Some(other) => {
                return Err(self.err(
                    "log.format",
                    format!("expected \"text\" or \"json\", got {other:?}"),
                ))
            }
        };
        let paths = Paths {
            state_dir: self.absolute("paths.state_dir", raw.paths.state_dir)?,
            status_file: self.absolute("paths.status_file", raw.paths.status_file)?,
            assertion_pubkey: self
                .absolute("paths.assertion_pubkey", raw.paths.assertion_pubkey)?,
        };
        Ok(AgentConfig {
            source: self.file.to_path_buf(),
            server,
            activation,
            pbx,
            remote_access,
            ha,
            provisioning,
            tunnel,
            metrics_listen,
            log_format,
            paths,
        })
    }

    fn absolute(&self, key: &str, p: PathBuf) -> Result<PathBuf, ConfigError> {
        if p.is_absolute() {
            Ok(p)
        } else {
            Err(self.err(
                key,
                format!("expected an absolute path, got {:?}", p.display()),
            ))
        }
    }

    fn server(&self, s: RawServer) -> Result<Server, ConfigError> {
        match s.kind.as_str() {
            "custom" => {}
            "default" => {
                return Err(self.err(
                    "server.type",
                    "\"default\" (the vendor's cloud) is not supported by this agent; expected \"custom\" with the address of your own server",
                ))
            }
            other => {
                return Err(self.err(
                    "server.type",
                    format!("expected \"custom\", got {other:?}"),
                ))
            }
        }
        let address = parse_server_addr(&s.address).map_err(|why| {
            self.err(
                "server.address",
                format!(
                    "expected an IP or domain with an optional port, such as \"cm.example.com:8443\"; {why}"
                ),
            )
        })?;
        let pin_sha256 = s
            .pin_sha256
            .map(|p| {
                parse_pin(&p).ok_or_else(|| {
                    self.err(
                        "server.pin_sha256",
                        "expected 64 hex digits (SHA-256 of the server key), colons optional",
                    )
                })
            })
            .transpose()?;
        let ca_file = s
            .ca_file
            .map(|p| self.absolute("server.ca_file", p))
            .transpose()?;
        Ok(Server {
            enabled: s.enabled,
            address,
            ca_file,
            pin_sha256,
        })
    }

    fn activation(&self, a: RawActivation) -> Result<Activation, ConfigError> {
        match a.method.as_str() {
            "auth_code" => {
                if a.email.is_some() || a.password.is_some() {
                    return Err(self.err(
                        "activation.email",
                        "only used with method = \"email\"; remove it or change activation.method",
                    ));
                }
                let code = a.auth_code.filter(|c| !c.expose().trim().is_empty()).ok_or_else(|| {
                    self.err(
                        "activation.auth_code",
                        "required with method = \"auth_code\": the authentication code from the CM (XXXX-XXXX-XXXX-XXXX)",
                    )
                })?;
                Ok(Activation::AuthCode(Secret::new(code.expose().trim())))
            }
            "email" => {
                if a.auth_code.is_some() {
                    return Err(self.err(
                        "activation.auth_code",
                        "only used with method = \"auth_code\"; remove it or change activation.method",
                    ));
                }
                let email = a.email.filter(|e| valid_email(e)).ok_or_else(|| {
                    self.err(
                        "activation.email",
                        "required with method = \"email\": the provider's CM account email",
                    )
                })?;
                Ok(Activation::Email {
                    email,
                    password: a.password.filter(|p| !p.is_empty()),
                })
            }
            other => Err(self.err(
                "activation.method",
                format!("expected \"auth_code\" or \"email\", got {other:?}"),
            )),
        }
    }

    fn pbx(&self, p: RawPbx) -> Result<Pbx, ConfigError> {
        let edition = Edition::parse(&p.edition).ok_or_else(|| {
            self.err(
                "pbx.edition",
                format!(
                    "expected \"software\" or \"appliance\", got {:?}",
                    p.edition
                ),
            )
        })?;
        let firmware = parse_version(&p.firmware).ok_or_else(|| {
            self.err(
                "pbx.firmware",
                format!(
                    "expected a dotted version such as \"83.19.0.110\", got {:?}",
                    p.firmware
                ),
            )
        })?;
        if !firmware_supported(edition, &firmware) {
            return Err(self.err(
                "pbx.firmware",
                format!(
                    "{} is below the minimum {} for the {} edition; upgrade the PBX firmware",
                    p.firmware,
                    edition.min_firmware(),
                    edition.as_str()
                ),
            ));
        }
        let nonempty = |key: &str, v: String| {
            if v.trim().is_empty() {
                Err(self.err(key, "must not be empty"))
            } else {
                Ok(v.trim().to_string())
            }
        };
        let model = nonempty("pbx.model", p.model)?;
        let serial = nonempty("pbx.serial", p.serial)?;
        let mac = match (p.mac_interface, p.mac) {
            (Some(_), Some(_)) => {
                return Err(self.err(
                    "pbx.mac",
                    "set either pbx.mac_interface or pbx.mac, not both",
                ))
            }
            (Some(ifname), None) => {
                if ifname.is_empty() || ifname.contains('/') || ifname.starts_with('.') {
                    return Err(self.err(
                        "pbx.mac_interface",
                        format!(
                            "expected a network interface name such as \"eth0\", got {ifname:?}"
                        ),
                    ));
                }
                MacSource::Interface(ifname)
            }
            (None, Some(mac)) => MacSource::Fixed(normalize_mac(&mac).ok_or_else(|| {
                self.err(
                    "pbx.mac",
                    format!(
                        "expected a MAC such as \"00:11:22:33:44:55\" (not all zero), got {mac:?}"
                    ),
                )
            })?),
            (None, None) => {
                return Err(self.err(
                    "pbx.mac_interface",
                    "required: the interface whose MAC identifies this PBX (or set pbx.mac)",
                ))
            }
        };
        let portal_url = Url::parse(&p.portal_url)
            .ok()
            .filter(|u| {
                matches!(u.scheme(), "http" | "https")
                    && u.host().is_some()
                    && u.username().is_empty()
                    && u.password().is_none()
                    && u.query().is_none()
                    && u.fragment().is_none()
                    && u.path() == "/"
            })
            .ok_or_else(|| {
                self.err(
                    "pbx.portal_url",
                    format!(
                        "expected an http or https origin such as \"https://127.0.0.1:8088\" (no path, user or query), got {:?}",
                        p.portal_url
                    ),
                )
            })?;
        let portal_ca_file = p
            .portal_ca_file
            .map(|f| self.absolute("pbx.portal_ca_file", f))
            .transpose()?;
        let portal_source_addr = p
            .portal_source_addr
            .map(|a| {
                a.parse::<IpAddr>().map_err(|_| {
                    self.err(
                        "pbx.portal_source_addr",
                        format!("expected an IP address such as \"127.0.0.2\", got {a:?}"),
                    )
                })
            })
            .transpose()?;
        let super_admin = nonempty("pbx.super_admin", p.super_admin)?;
        let extension_emails_file = p
            .extension_emails_file
            .map(|f| self.absolute("pbx.extension_emails_file", f))
            .transpose()?;
        Ok(Pbx {
            edition,
            firmware: p.firmware,
            model,
            serial,
            mac,
            portal_url,
            portal_ca_file,
            portal_source_addr,
            super_admin,
            extension_emails_file,
        })
    }

    fn remote_access(&self, r: RawRemoteAccess, pbx: &Pbx) -> Result<RemoteAccess, ConfigError> {
        if !(5..=120).contains(&r.auto_logout_minutes) {
            return Err(self.err(
                "remote_access.auto_logout_minutes",
                format!("expected 5..=120 minutes, got {}", r.auto_logout_minutes),
            ));
        }
        let account = match r.account {
            Some(a) if a.enabled => {
                let username = a
                    .username
                    .map(|u| u.trim().to_string())
                    .filter(|u| !u.is_empty() && u.len() <= 64 && !u.chars().any(char::is_control))
                    .ok_or_else(|| {
                        self.err(
                            "remote_access.account.username",
                            "required when the account is enabled (1 to 64 printable characters)",
                        )
                    })?;
                self.check_reserved(&username, pbx)?;
                let hash = a.password_hash.ok_or_else(|| {
                    self.err(
                        "remote_access.account.password_hash",
                        "required when the account is enabled: run `pbx-remote-agent hash-password`",
                    )
                })?;
                check_password_hash(hash.expose())
                    .map_err(|why| self.err("remote_access.account.password_hash", why))?;
                Some(Account {
                    username,
                    password_hash: hash,
                })
            }
            _ => None,
        };
        Ok(RemoteAccess {
            auto_logout: Duration::from_secs(r.auto_logout_minutes as u64 * 60),
            account,
            passwordless: r.passwordless.map(|p| p.enabled).unwrap_or(false),
        })
    }

    fn check_reserved(&self, username: &str, pbx: &Pbx) -> Result<(), ConfigError> {
        let key = "remote_access.account.username";
        if username.eq_ignore_ascii_case(&pbx.super_admin) {
            return Err(self.err(
                key,
                format!(
                    "{username:?} is the PBX super admin (pbx.super_admin); choose another name"
                ),
            ));
        }
        if let Some(file) = &pbx.extension_emails_file {
            let taken = is_extension_email(file, username).map_err(|e| {
                self.err(
                    "pbx.extension_emails_file",
                    format!("cannot read {}: {e}", file.display()),
                )
            })?;
            if taken {
                return Err(self.err(
                    key,
                    format!(
                        "{username:?} is an extension's email (listed in {}); choose another name",
                        file.display()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Whether `username` is listed (one email per line, any case) in the extension-email file.
/// The agent asks again while it runs: an extension can take the remote account's name as its
/// email after the config was checked.
pub fn is_extension_email(file: &Path, username: &str) -> std::io::Result<bool> {
    Ok(std::fs::read_to_string(file)?
        .lines()
        .any(|l| l.trim().eq_ignore_ascii_case(username)))
}

/// Checks a PHC string is argon2id with a memory cost the PBX can afford.
pub fn check_password_hash(phc: &str) -> Result<(), String> {
    let hash = argon2::PasswordHash::new(phc).map_err(|_| {
        "expected an argon2id PHC string from `pbx-remote-agent hash-password`".to_string()
    })?;
    if hash.algorithm.as_str() != "argon2id" {
        return Err(format!(
            "expected an argon2id hash, got {}",
            hash.algorithm.as_str()
        ));
    }
    let params =
        argon2::Params::try_from(&hash).map_err(|e| format!("invalid argon2 parameters: {e}"))?;
    if params.m_cost() > MAX_ARGON2_MEMORY_KIB {
        return Err(format!(
            "memory cost m={} KiB is above the limit of {MAX_ARGON2_MEMORY_KIB} KiB (64 MiB)",
            params.m_cost()
        ));
    }
    Ok(())
}

/// Parses `host[:port]`, `[v6]:port` or a bare IP; the port defaults to 443.
pub fn parse_server_addr(s: &str) -> Result<ServerAddr, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("got an empty string".into());
    }
    if s.contains("://") || s.contains('/') {
        return Err(format!(
            "got {s:?}: give host and port only, no scheme or path"
        ));
    }
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, after) = rest
            .split_once(']')
            .ok_or_else(|| format!("got {s:?}: unclosed '['"))?;
        let port = match after {
            "" => None,
            p => Some(
                p.strip_prefix(':')
                    .ok_or_else(|| format!("got {s:?}: expected ':' after ']'"))?,
            ),
        };
        if h.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("got {s:?}: {h:?} is not an IPv6 address"));
        }
        (h.to_string(), port)
    } else if s.matches(':').count() > 1 {
        if s.parse::<std::net::Ipv6Addr>().is_err() {
            return Err(format!("got {s:?}: not an IPv6 address (use [addr]:port)"));
        }
        (s.to_string(), None)
    } else if let Some((h, p)) = s.split_once(':') {
        (h.to_string(), Some(p))
    } else {
        (s.to_string(), None)
    };
    let port = match port {
        None => 443,
        Some(p) => match p.parse::<u16>() {
            Ok(n) if n > 0 => n,
            _ => return Err(format!("got {s:?}: port {p:?} is not 1..=65535")),
        },
    };
    if host.parse::<IpAddr>().is_err() && !valid_domain(&host) {
        return Err(format!(
            "got {s:?}: {host:?} is neither an IP address nor a domain name"
        ));
    }
    Ok(ServerAddr {
        host: host.to_ascii_lowercase(),
        port,
    })
}

fn valid_domain(h: &str) -> bool {
    h.len() <= 253
        && h.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

fn valid_email(e: &str) -> bool {
    let e = e.trim();
    matches!(e.split_once('@'), Some((u, d)) if !u.is_empty() && d.contains('.') && !e.chars().any(char::is_whitespace))
}

/// Parses a SHA-256 pin: 64 hex digits, any case, colons optional.
pub fn parse_pin(s: &str) -> Option<[u8; 32]> {
    let clean: String = s.chars().filter(|c| *c != ':').collect();
    let bytes = hex::decode(clean).ok()?;
    bytes.try_into().ok()
}

/// Parses a dotted numeric version.
pub fn parse_version(s: &str) -> Option<Vec<u32>> {
    let parts: Option<Vec<u32>> = s.trim().split('.').map(|p| p.parse().ok()).collect();
    parts.filter(|p| !p.is_empty())
}

/// True when `firmware` is at or above the edition minimum (numeric comparison).
pub fn firmware_supported(edition: Edition, firmware: &[u32]) -> bool {
    // Invariant: the minimums are literal dotted versions, so they parse.
    let min = parse_version(edition.min_firmware()).unwrap_or_default();
    firmware >= min.as_slice()
}

/// Lowercase colon form of a MAC; `None` if malformed or all zero.
pub fn normalize_mac(s: &str) -> Option<String> {
    let hexdigits: String = s
        .trim()
        .chars()
        .filter(|c| !matches!(c, ':' | '-'))
        .collect();
    let bytes = hex::decode(&hexdigits).ok()?;
    if bytes.len() != 6 || bytes.iter().all(|b| *b == 0) {
        return None;
    }
    Some(
        bytes
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) const GOOD: &str = r#"
[server]
enabled = true
address = "cm.example.com:8443"

[activation]
method = "auth_code"
auth_code = "ABCD-EFGH-JKMN-PQRS"

[pbx]
edition = "software"
firmware = "83.19.0.110"
model = "P-Series Software Edition"
serial = "3631A1234567"
mac = "00:11:22:33:44:55"
portal_url = "https://127.0.0.1:8088"
"#;

    fn parse(text: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::parse(Path::new("/etc/x/agent.toml"), text)
    }

    fn expect_err(text: &str, needles: &[&str]) {
        let err = parse(text).expect_err("config should be refused").0;
        assert!(err.starts_with("/etc/x/agent.toml"), "{err}");
        for n in needles {
            assert!(err.contains(n), "{err:?} should contain {n:?}");
        }
    }

    #[test]
    fn minimal_config_takes_defaults_for_optional_sections() {
        let c = parse(GOOD).unwrap();
        assert_eq!(c.server.address.port, 8443);
        assert_eq!(c.remote_access.auto_logout, Duration::from_secs(900));
        assert!(c.remote_access.account.is_none());
        assert!(!c.remote_access.passwordless);
        assert_eq!(c.tunnel.heartbeat, Duration::from_secs(30));
        assert_eq!(c.paths.status_file, PathBuf::from(DEFAULT_STATUS_FILE));
        assert!(c.ha.is_none() && c.provisioning.is_none() && c.metrics_listen.is_none());
    }

    #[test]
    fn unknown_keys_are_named() {
        expect_err(
            &format!("{GOOD}\n[tunnel]\nheartbeat = 3\n"),
            &["unknown field", "heartbeat"],
        );
    }

    #[test]
    fn bad_server_address() {
        expect_err(
            &GOOD.replace("cm.example.com:8443", "https://cm.example.com/x"),
            &["server.address", "no scheme"],
        );
        expect_err(
            &GOOD.replace("cm.example.com:8443", "cm.example.com:99999"),
            &["server.address", "port"],
        );
        expect_err(
            &GOOD.replace("cm.example.com:8443", "bad_host!:1"),
            &["server.address"],
        );
    }

    #[test]
    fn server_addresses_parse() {
        assert_eq!(parse_server_addr("10.0.0.1").unwrap().port, 443);
        let v6 = parse_server_addr("[::1]:9000").unwrap();
        assert_eq!((v6.host.as_str(), v6.port), ("::1", 9000));
        assert_eq!(v6.authority(), "[::1]:9000");
        assert_eq!(parse_server_addr("fe80::1").unwrap().port, 443);
        assert_eq!(
            parse_server_addr("CM.Example.com").unwrap().host,
            "cm.example.com"
        );
    }

    #[test]
    fn auth_code_method_needs_a_code() {
        expect_err(
            &GOOD.replace("auth_code = \"ABCD-EFGH-JKMN-PQRS\"", ""),
            &["activation.auth_code", "required"],
        );
    }

    #[test]
    fn firmware_below_minimum_names_key_and_minimum() {
        expect_err(
            &GOOD.replace("83.19.0.110", "83.18.9.999"),
            &["pbx.firmware", "83.19.0.110", "minimum"],
        );
        // Numeric, not lexical: 83.100 > 83.19.
        assert!(parse(&GOOD.replace("83.19.0.110", "83.100.0.1")).is_ok());
        let appliance = GOOD
            .replace("\"software\"", "\"appliance\"")
            .replace("83.19.0.110", "37.9.0.1");
        expect_err(&appliance, &["pbx.firmware", "37.19.0.110"]);
    }

    #[test]
    fn auto_logout_range() {
        for bad in ["4", "121", "0", "-1"] {
            expect_err(
                &format!("{GOOD}\n[remote_access]\nauto_logout_minutes = {bad}\n"),
                &["remote_access.auto_logout_minutes", "5..=120"],
            );
        }
        for ok in ["5", "120"] {
            assert!(parse(&format!(
                "{GOOD}\n[remote_access]\nauto_logout_minutes = {ok}\n"
            ))
            .is_ok());
        }
    }

    #[test]
    fn bad_portal_url() {
        for bad in [
            "ftp://127.0.0.1",
            "https://127.0.0.1:8088/admin",
            "not a url",
            "http://u:p@127.0.0.1",
        ] {
            expect_err(
                &GOOD.replace("https://127.0.0.1:8088", bad),
                &["pbx.portal_url"],
            );
        }
    }

    #[test]
    fn server_type_must_be_custom() {
        let t = GOOD.replace("enabled = true", "enabled = true\ntype = \"default\"");
        expect_err(&t, &["server.type", "custom"]);
        let t = GOOD.replace("enabled = true", "enabled = true\ntype = \"other\"");
        expect_err(&t, &["server.type", "custom"]);
    }

    #[test]
    fn pins_accept_case_and_colons() {
        let hex64 = "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08";
        let colons: String = hex64
            .as_bytes()
            .chunks(2)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect::<Vec<_>>()
            .join(":");
        assert_eq!(parse_pin(hex64), parse_pin(&colons.to_lowercase()));
        assert!(parse_pin(hex64).is_some());
        expect_err(
            &GOOD.replace("enabled = true", "enabled = true\npin_sha256 = \"abc\""),
            &["server.pin_sha256", "64 hex"],
        );
    }

    #[test]
    fn macs() {
        assert_eq!(
            normalize_mac("00-11-22-AA-BB-CC").unwrap(),
            "00:11:22:aa:bb:cc"
        );
        assert!(normalize_mac("00:00:00:00:00:00").is_none());
        assert!(normalize_mac("00:11:22").is_none());
        expect_err(
            &GOOD.replace("00:11:22:33:44:55", "00:00:00:00:00:00"),
            &["pbx.mac", "not all zero"],
        );
    }

    #[test]
    fn account_rules() {
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk";
        let with = |user: &str, h: &str| {
            format!("{GOOD}\n[remote_access.account]\nenabled = true\nusername = \"{user}\"\npassword_hash = \"{h}\"\n")
        };
        assert!(parse(&with("provider", hash)).is_ok());
        expect_err(
            &with("Admin", hash),
            &["remote_access.account.username", "super admin"],
        );
        expect_err(
            &with("provider", "plaintext"),
            &["password_hash", "argon2id"],
        );
        let big = hash.replace("m=19456", "m=131072");
        expect_err(&with("provider", &big), &["password_hash", "64 MiB"]);
        let disabled = format!("{GOOD}\n[remote_access.account]\nenabled = false\n");
        assert!(parse(&disabled).unwrap().remote_access.account.is_none());
    }

    #[test]
    fn extension_emails_are_reserved() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("emails");
        std::fs::write(&f, "alice@example.com\nBob@Example.com\n").unwrap();
        let hash = "$argon2id$v=19$m=19456,t=2,p=1$c2FsdHNhbHRzYWx0$QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo0NTY3ODk";
        let text = GOOD.replace(
            "portal_url",
            &format!("extension_emails_file = \"{}\"\nportal_url", f.display()),
        ) + &format!("\n[remote_access.account]\nenabled = true\nusername = \"bob@example.com\"\npassword_hash = \"{hash}\"\n");
        expect_err(&text, &["remote_access.account.username", "extension"]);
    }

    #[test]
    fn relative_paths_are_refused() {
        expect_err(
            &format!("{GOOD}\n[paths]\nstate_dir = \"state\"\n"),
            &["paths.state_dir", "absolute"],
        );
    }

    #[test]
    fn secrets_do_not_leak_through_debug() {
        let c = parse(GOOD).unwrap();
        assert!(!format!("{c:?}").contains("ABCD-EFGH"));
    }
}
