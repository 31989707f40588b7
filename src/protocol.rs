//! The wire contract between agent and server: ALPN and version, activation messages, control
//! frames, the per-request stream header, status reasons, limits and timeouts. Agent and server
//! share this module and nothing else from each other.

use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Version of the tunnel protocol; carried in the ALPN so a mismatch fails the handshake with a
/// `no_application_protocol` alert that the agent reports as `protocol_mismatch`.
pub const PROTOCOL_VERSION: u32 = 1;

/// ALPN of the QUIC tunnel for [`PROTOCOL_VERSION`].
pub const ALPN: &[u8] = b"pbxra/1";

/// HTTP path of the activation API (HTTPS on the same address as the tunnel).
pub const ACTIVATE_PATH: &str = "/api/v1/activate";

/// Largest control frame or stream header, in bytes.
pub const MAX_FRAME: usize = 64 * 1024;

/// Largest activation request or response body, in bytes.
pub const MAX_ACTIVATION_BODY: usize = 16 * 1024;

/// Per connect attempt (QUIC handshake plus hello/welcome).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// QUIC keep-alive interval: below every common NAT UDP timeout (RFC 9308 §3.2 says 30 s).
pub const KEEPALIVE: Duration = Duration::from_secs(4);

/// QUIC idle timeout: a dead path is noticed within this.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(15);

/// Time the agent waits for the stream header on a new stream.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Concurrent request streams the server may open on one tunnel.
pub const MAX_STREAMS: u32 = 256;

/// Requests the front runs at once on one tunnel (the rest get 503). Kept below
/// [`MAX_STREAMS`] because quinn returns a closed stream's credit a round trip later; without the
/// headroom a burst would wait inside `open_bi` instead of getting a clear answer.
pub const MAX_REQUEST_STREAMS: u32 = MAX_STREAMS - 16;

/// Per-stream QUIC receive window (bytes). Sized so 256 streams cannot pin much memory: the
/// connection window below caps the sum.
pub const STREAM_WINDOW: u32 = 1024 * 1024;

/// Connection-wide QUIC receive window (bytes).
pub const CONN_WINDOW: u32 = 4 * 1024 * 1024;

/// Status reasons shared by the agent's status file, activation errors and handshake closes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The authentication code is unknown.
    InvalidCode,
    /// The authentication code is past its lifetime.
    CodeExpired,
    /// The authentication code was already used.
    CodeUsed,
    /// Email/password activation was refused.
    BadCredentials,
    /// Serial or MAC differ from what the CM has on record.
    DeviceMismatch,
    /// The CM has no free slot for another device.
    CapacityExceeded,
    /// The PBX firmware is below the edition minimum.
    FirmwareUnsupported,
    /// The CM removed this device.
    DeviceRemoved,
    /// Another machine connected with this credential.
    Replaced,
    /// The server could not be reached.
    ServerUnreachable,
    /// TLS failed (certificate, pin, handshake).
    TlsError,
    /// Agent and server speak different protocol versions.
    ProtocolMismatch,
    /// The local clock is not set (no NTP yet).
    ClockUnsynced,
    /// Too many attempts; try later.
    RateLimited,
}

impl Reason {
    /// The snake_case name used in status and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Reason::InvalidCode => "invalid_code",
            Reason::CodeExpired => "code_expired",
            Reason::CodeUsed => "code_used",
            Reason::BadCredentials => "bad_credentials",
            Reason::DeviceMismatch => "device_mismatch",
            Reason::CapacityExceeded => "capacity_exceeded",
            Reason::FirmwareUnsupported => "firmware_unsupported",
            Reason::DeviceRemoved => "device_removed",
            Reason::Replaced => "replaced",
            Reason::ServerUnreachable => "server_unreachable",
            Reason::TlsError => "tls_error",
            Reason::ProtocolMismatch => "protocol_mismatch",
            Reason::ClockUnsynced => "clock_unsynced",
            Reason::RateLimited => "rate_limited",
        }
    }

    /// QUIC application close code carrying this reason.
    pub fn close_code(self) -> u32 {
        0x100 + self as u32
    }

    /// The reason for a QUIC application close code, if it is one of ours.
    pub fn from_close_code(code: u64) -> Option<Reason> {
        ALL_REASONS
            .iter()
            .copied()
            .find(|r| u64::from(r.close_code()) == code)
    }
}

const ALL_REASONS: [Reason; 14] = [
    Reason::InvalidCode,
    Reason::CodeExpired,
    Reason::CodeUsed,
    Reason::BadCredentials,
    Reason::DeviceMismatch,
    Reason::CapacityExceeded,
    Reason::FirmwareUnsupported,
    Reason::DeviceRemoved,
    Reason::Replaced,
    Reason::ServerUnreachable,
    Reason::TlsError,
    Reason::ProtocolMismatch,
    Reason::ClockUnsynced,
    Reason::RateLimited,
];

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// QUIC application close code for a deliberate close with no fault (shutdown).
pub const CLOSE_NORMAL: u32 = 0;

/// Facts a device reports about itself at activation and in every hello.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceFacts {
    /// "software" or "appliance".
    pub edition: String,
    /// Firmware version, e.g. "83.19.0.110".
    pub firmware: String,
    /// Model name.
    pub model: String,
    /// Serial number.
    pub serial: String,
    /// MAC address, lowercase colon form.
    pub mac: String,
    /// Hot Standby role ("primary"/"secondary") when configured.
    #[serde(default)]
    pub ha_role: Option<String>,
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

/// How the device proves it may enrol.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "method", rename_all = "snake_case")]
pub enum ActivationProof {
    /// One-time authentication code from `device add` / `device code`.
    AuthCode {
        /// The code.
        code: Secret,
    },
    /// The provider's CM account.
    Email {
        /// Account email.
        email: String,
        /// Account password (used once, never stored).
        password: Secret,
    },
}

/// `POST /api/v1/activate` body.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActivateRequest {
    /// [`PROTOCOL_VERSION`] of the agent.
    pub protocol_version: u32,
    /// Agent version string.
    pub agent_version: String,
    /// Code or account.
    pub proof: ActivationProof,
    /// SubjectPublicKeyInfo (DER, base64) of the key generated on the device.
    pub device_public_key: String,
    /// Device facts.
    pub facts: DeviceFacts,
}

/// Successful activation.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ActivateResponse {
    /// The device id (a DNS label).
    pub device_id: String,
    /// Server's Ed25519 public key (base64, 32 bytes) that signs passwordless tokens.
    pub signing_key: String,
    /// Server time, milliseconds since the Unix epoch.
    pub server_time_ms: u64,
}

/// Refused activation or handshake.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Machine-readable reason.
    pub code: Reason,
    /// What the IT staff should do, in words.
    pub message: String,
}

/// Per-device settings the server pushes; changes arrive live.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSettings {
    /// CM-side passwordless switch.
    pub allow_passwordless: bool,
}

/// One health sample of a node, sent with every heartbeat. Every field has a default so either
/// side may be newer than the other.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Telemetry {
    /// CPU use over the last heartbeat period, 0–100.
    pub cpu_percent: f32,
    /// Memory in use (total minus available), bytes.
    pub memory_used_bytes: u64,
    /// Memory installed, bytes.
    pub memory_total_bytes: u64,
    /// Space used on the filesystem of the agent's state directory, bytes.
    pub disk_used_bytes: u64,
    /// Size of that filesystem, bytes.
    pub disk_total_bytes: u64,
    /// Seconds since the PBX booted.
    pub uptime_secs: u64,
    /// Load averages over 1, 5 and 15 minutes.
    pub load: [f64; 3],
    /// PBX firmware (from the config).
    pub firmware: String,
    /// Agent version.
    pub agent_version: String,
    /// The local web portal accepted a connection (TCP, and TLS for an https portal).
    pub portal_reachable: bool,
    /// How long that took, ms.
    pub portal_latency_ms: Option<f64>,
    /// Why the portal was not reachable.
    pub portal_error: Option<String>,
    /// Hot Standby state, if in a pair.
    pub ha_state: Option<String>,
}

impl Telemetry {
    /// Memory in use, percent of installed.
    pub fn memory_percent(&self) -> f64 {
        percent(self.memory_used_bytes, self.memory_total_bytes)
    }

    /// Disk in use, percent of the filesystem.
    pub fn disk_percent(&self) -> f64 {
        percent(self.disk_used_bytes, self.disk_total_bytes)
    }
}

fn percent(used: u64, total: u64) -> f64 {
    if total == 0 {
        0.0
    } else {
        used as f64 * 100.0 / total as f64
    }
}

/// Frames on the control stream (the first bi-stream, opened by the agent).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Control {
    /// Agent → server, first frame: who is connecting.
    Hello {
        /// [`PROTOCOL_VERSION`].
        protocol_version: u32,
        /// Agent version string.
        agent_version: String,
        /// Device facts.
        facts: DeviceFacts,
        /// Hot Standby state ("active"/"standby") of this node, when it is one.
        #[serde(default)]
        ha_state: Option<String>,
    },
    /// Server → agent, answer to hello.
    Welcome {
        /// The device id as the server knows it.
        device_id: String,
        /// Server clock, ms since the Unix epoch.
        server_time_ms: u64,
        /// Current settings.
        settings: DeviceSettings,
    },
    /// Server → agent: settings changed.
    Settings {
        /// New settings.
        settings: DeviceSettings,
    },
    /// Agent → server, every heartbeat: liveness and telemetry.
    Heartbeat {
        /// Hot Standby state, re-read every heartbeat so a failover shows within one.
        #[serde(default)]
        ha_state: Option<String>,
        /// This node's health sample; `None` from agents that do not send one.
        #[serde(default)]
        telemetry: Option<Telemetry>,
    },
    /// Server → agent, answer to heartbeat.
    HeartbeatAck {
        /// Server clock, ms since the Unix epoch.
        server_time_ms: u64,
    },
    /// Server → agent: a provisioning template to hand to the PBX's apply unit.
    Provision {
        /// Task name, `Provision-{device name}-{serial}`.
        task: String,
        /// Template text (at most [`MAX_TEMPLATE`] bytes).
        template: String,
    },
    /// Agent → server: what became of a provisioning task.
    ProvisionResult {
        /// Task name.
        task: String,
        /// `executing`, `finished`, `failed` or `unsupported`.
        state: String,
        /// Tail of the apply output, or why.
        output: String,
    },
}

/// Largest provisioning template (it travels in one control frame).
pub const MAX_TEMPLATE: usize = 48 * 1024;

/// Written by the front at the start of every request stream, before the HTTP bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StreamHeader {
    /// CM user (label) behind the visit.
    pub cm_user: String,
    /// Grant id of the visit.
    pub grant_id: String,
    /// Browser address (TCP peer unless a trusted proxy says otherwise).
    pub client_addr: String,
    /// Visitor-facing scheme: "http" or "https".
    pub scheme: String,
    /// Visitor-facing origin, e.g. "https://dev1.cm.example.com".
    pub origin: String,
    /// When the grant ends (ms since the epoch, server clock); sessions end with it. 0: unknown.
    #[serde(default)]
    pub grant_expires_ms: u64,
    /// Signed passwordless token; present only when redeeming a passwordless visit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub passwordless_token: Option<Secret>,
}

/// Writes one length-prefixed JSON frame.
pub async fn write_frame<W, T>(w: &mut W, msg: &T) -> anyhow::Result<()>
where
    W: AsyncWrite + Unpin,
    T: Serialize,
{
    let body = serde_json::to_vec(msg)?;
    anyhow::ensure!(
        body.len() <= MAX_FRAME,
        "frame of {} bytes too large",
        body.len()
    );
    let len = u32::try_from(body.len())?;
    let mut buf = Vec::with_capacity(4 + body.len());
    buf.extend_from_slice(&len.to_be_bytes());
    buf.extend_from_slice(&body);
    w.write_all(&buf).await?;
    Ok(())
}

/// Reads one length-prefixed JSON frame; `Ok(None)` on a clean end of stream.
pub async fn read_frame<R, T>(r: &mut R) -> anyhow::Result<Option<T>>
where
    R: AsyncRead + Unpin,
    T: serde::de::DeserializeOwned,
{
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e.into()),
    }
    let len = u32::from_be_bytes(len) as usize;
    anyhow::ensure!(len <= MAX_FRAME, "frame of {len} bytes exceeds {MAX_FRAME}");
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).await?;
    Ok(Some(serde_json::from_slice(&body)?))
}

/// Milliseconds since the Unix epoch by the local clock.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn frames_round_trip_over_a_duplex() {
        let (mut a, mut b) = tokio::io::duplex(1024);
        let hello = Control::Heartbeat {
            ha_state: None,
            telemetry: Some(Telemetry {
                cpu_percent: 1.5,
                ..Telemetry::default()
            }),
        };
        write_frame(&mut a, &hello).await.unwrap();
        drop(a);
        let got: Control = read_frame(&mut b).await.unwrap().unwrap();
        match got {
            Control::Heartbeat { telemetry, .. } => {
                assert_eq!(telemetry.map(|t| t.cpu_percent), Some(1.5))
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(read_frame::<_, Control>(&mut b).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn oversized_frames_are_refused_before_reading() {
        let (mut a, mut b) = tokio::io::duplex(64);
        a.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        let err = read_frame::<_, Control>(&mut b).await.unwrap_err();
        assert!(err.to_string().contains("exceeds"), "{err}");
    }

    #[test]
    fn macs_normalise_to_lowercase_colon_form() {
        assert_eq!(
            normalize_mac("00-11-22-AA-BB-CC").unwrap(),
            "00:11:22:aa:bb:cc"
        );
        assert!(normalize_mac("00:00:00:00:00:00").is_none());
        assert!(normalize_mac("00:11:22").is_none());
    }

    #[test]
    fn firmware_minimums_compare_numerically() {
        let v = |s| parse_version(s).unwrap();
        assert!(firmware_supported(Edition::Software, &v("83.19.0.110")));
        assert!(firmware_supported(Edition::Software, &v("83.20.0.1")));
        assert!(!firmware_supported(Edition::Software, &v("83.19.0.99")));
        assert!(firmware_supported(Edition::Appliance, &v("37.19.0.110")));
        assert!(parse_version("83.x").is_none());
    }

    #[test]
    fn close_codes_map_back_to_reasons() {
        for r in ALL_REASONS {
            assert_eq!(Reason::from_close_code(r.close_code().into()), Some(r));
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
        assert_eq!(Reason::from_close_code(0), None);
    }
}
