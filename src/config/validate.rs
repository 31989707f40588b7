//! From `Raw*` to typed config: every key checked before any side effect, every error naming the
//! file, the key and what is expected.

use super::raw::*;
use super::*;
use crate::protocol::{firmware_supported, normalize_mac, parse_version};

pub(super) struct Validator<'a> {
    pub(super) file: &'a Path,
}

impl Validator<'_> {
    pub(super) fn err(&self, key: &str, expected: impl fmt::Display) -> ConfigError {
        ConfigError(format!("{}: {key}: {expected}", self.file.display()))
    }

    pub(super) fn validate(&self, raw: RawConfig) -> Result<AgentConfig, ConfigError> {
        let server = self.server(raw.server)?;
        let activation = self.activation(raw.activation)?;
        let pbx = self.pbx(raw.pbx)?;
        let remote_access = self.remote_access(raw.remote_access, &pbx)?;
        let ha = raw
            .ha
            .map(|h| {
                let role = HaRole::parse(&h.role).ok_or_else(|| {
                    self.err(
                        "ha.role",
                        format!("expected \"primary\" or \"secondary\", got {:?}", h.role),
                    )
                })?;
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
        let portal_login = raw.portal_login.map(|p| self.portal_login(p)).transpose()?;
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
            proxy: t
                .proxy
                .as_deref()
                .map(|p| super::proxy::ProxyUrl::parse(p).map_err(|e| self.err("tunnel.proxy", e)))
                .transpose()?,
            transport: match t.transport.as_deref() {
                None | Some("auto") => super::TransportMode::Auto,
                Some("quic") => super::TransportMode::Quic,
                Some("tcp") => super::TransportMode::Tcp,
                Some(other) => {
                    return Err(self.err(
                        "tunnel.transport",
                        format!("expected \"auto\", \"quic\" or \"tcp\", got {other:?}"),
                    ))
                }
            },
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
            portal_login,
            tunnel,
            metrics_listen,
            log_format,
            paths,
        })
    }

    pub(super) fn absolute(&self, key: &str, p: PathBuf) -> Result<PathBuf, ConfigError> {
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
                crate::password::check_password_hash(hash.expose())
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
