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

/// Transport settings both ends share: keep-alive under NAT timeouts, a short idle timeout,
/// stream and window limits sized for the memory target, and `max_bidi` streams the peer may
/// open.
///
/// Acknowledgements: each end asks the other to acknowledge every 8th packet (or after its
/// max_ack_delay) instead of every 2nd, so a bulk download costs fewer ACK packets to send,
/// receive and process (bench: bulk through the tunnel 170/186 → 198/207 MB/s in two
/// interleaved pairs). Reordering still triggers an immediate ACK, so loss recovery keeps its
/// pace (the fault tests run with it).
///
/// Loss detection tolerates reordering: a packet counts as lost once 16 later ones are
/// acknowledged (RFC 9002: 3) or 2 RTTs after it was sent (RFC 9002: 9/8). With the RFC's
/// values a packet overtaken on the path is declared lost and the congestion window halved, and
/// quinn never takes that back; Linux TCP's RACK adapts instead. Paired seeds over a 20 ms
/// path (`long_download_rates_…`, 8 MiB, KiB/s, RFC values → these): 1 % reordered 745/734 →
/// 1150/1138, 5 % reordered 318/326 → 707/619, 1 % loss 950/1243 → 1041/1474, 5 % loss
/// 266/269 → 311/308. The price: a packet lost with fewer than 16 after it is retransmitted
/// about 0.9 RTT later than with the RFC's values (tail losses are PTO's, unchanged).
pub fn transport_config(max_bidi: u32) -> quinn::TransportConfig {
    let mut t = quinn::TransportConfig::default();
    t.keep_alive_interval(Some(KEEPALIVE));
    // Invariant: IDLE_TIMEOUT is a small constant well inside QUIC's varint range.
    t.max_idle_timeout(IDLE_TIMEOUT.try_into().ok());
    t.max_concurrent_bidi_streams(max_bidi.into());
    t.max_concurrent_uni_streams(0u32.into());
    t.stream_receive_window(STREAM_WINDOW.into());
    t.receive_window(CONN_WINDOW.into());
    t.send_window(u64::from(CONN_WINDOW));
    let mut acks = quinn::AckFrequencyConfig::default();
    acks.ack_eliciting_threshold(ACK_ELICITING_THRESHOLD.into());
    t.ack_frequency_config(Some(acks));
    t.packet_threshold(LOSS_PACKET_THRESHOLD);
    t.time_threshold(LOSS_TIME_THRESHOLD);
    t
}

/// Later packets acknowledged before an unacknowledged one counts as lost (see
/// [`transport_config`]).
pub const LOSS_PACKET_THRESHOLD: u32 = 16;

/// RTTs after which an unacknowledged packet counts as lost (see [`transport_config`]).
pub const LOSS_TIME_THRESHOLD: f32 = 2.0;

/// Kernel buffer asked for on a tunnel UDP socket, each way. Linux's default (208 KiB) overflows
/// under a bulk download (the bench counted hundreds of `RcvbufErrors` per run), and QUIC takes
/// every dropped datagram as congestion. The kernel caps it at `net.core.rmem_max`/`wmem_max`.
pub const UDP_BUFFER: usize = 4 << 20;

/// Enlarges a tunnel socket's kernel buffers, best effort. The kernel grants what its limits
/// allow; less than asked is logged at info once per process, naming the sysctls to raise (the
/// agent's packages ship them in `/usr/lib/sysctl.d/30-pbx-remote-agent.conf`).
pub fn tune_udp(sock: &std::net::UdpSocket) {
    use rustix::net::sockopt;
    if let Err(e) = sockopt::set_socket_recv_buffer_size(sock, UDP_BUFFER) {
        tracing::debug!(error = %e, "SO_RCVBUF not set");
    }
    if let Err(e) = sockopt::set_socket_send_buffer_size(sock, UDP_BUFFER) {
        tracing::debug!(error = %e, "SO_SNDBUF not set");
    }
    // Linux reports twice what it grants (the other half is its bookkeeping).
    let recv = sockopt::socket_recv_buffer_size(sock).unwrap_or(0) / 2;
    let send = sockopt::socket_send_buffer_size(sock).unwrap_or(0) / 2;
    static CAPPED: std::sync::Once = std::sync::Once::new();
    if recv < UDP_BUFFER || send < UDP_BUFFER {
        CAPPED.call_once(|| {
            tracing::info!(
                recv,
                send,
                asked = UDP_BUFFER,
                "tunnel UDP buffers capped by the kernel; raise net.core.rmem_max and \
                 net.core.wmem_max to {UDP_BUFFER} so bulk transfers are not read as congestion"
            )
        });
    }
}

/// Ack-eliciting packets a receiver may hold before it must acknowledge (see
/// [`transport_config`]).
pub const ACK_ELICITING_THRESHOLD: u32 = 7;

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

    #[test]
    fn tunnel_sockets_get_the_buffers_the_kernel_allows() {
        use rustix::net::sockopt;
        let limit = |name: &str| -> usize {
            std::fs::read_to_string(format!("/proc/sys/net/core/{name}"))
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let sock = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let before = sockopt::socket_recv_buffer_size(&sock).unwrap();
        tune_udp(&sock);
        let recv = sockopt::socket_recv_buffer_size(&sock).unwrap() / 2;
        let send = sockopt::socket_send_buffer_size(&sock).unwrap() / 2;
        assert_eq!(recv, UDP_BUFFER.min(limit("rmem_max")), "before: {before}");
        assert_eq!(send, UDP_BUFFER.min(limit("wmem_max")));
    }

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
    fn close_codes_map_back_to_reasons() {
        for r in ALL_REASONS {
            assert_eq!(Reason::from_close_code(r.close_code().into()), Some(r));
            let json = serde_json::to_string(&r).unwrap();
            assert_eq!(json, format!("\"{}\"", r.as_str()));
        }
        assert_eq!(Reason::from_close_code(0), None);
    }
}
