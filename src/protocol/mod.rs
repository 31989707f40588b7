//! The wire contract between agent and server: ALPN and version, activation messages, control
//! frames, the per-request stream header, status reasons, limits and timeouts. Agent and server
//! share this module and nothing else from each other.

use crate::secret::Secret;
use serde::{Deserialize, Serialize};
use std::fmt;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

mod facts;
mod reason;

pub use facts::{
    firmware_supported, normalize_mac, parse_version, DeviceFacts, Edition, HaRole, HaState,
    NodeRole, Telemetry,
};
pub use reason::Reason;

/// Version of the tunnel protocol; carried in the ALPN so a mismatch fails the handshake with a
/// `no_application_protocol` alert that the agent reports as `protocol_mismatch`.
pub const PROTOCOL_VERSION: u32 = 1;

/// ALPN of the QUIC tunnel for [`PROTOCOL_VERSION`].
pub const ALPN: &[u8] = b"pbxra/1";

/// ALPN of the TCP transport (TLS 1.3 over TCP, HTTP/2 framing; DESIGN §10), offered on the
/// activation API's address beside its `http/1.1`.
pub const ALPN_TCP: &[u8] = b"pbxra-tcp/1";

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

/// How long a connection an agent handed over from may stay open to finish its requests.
pub const HANDOVER_GRACE: Duration = Duration::from_secs(60);

/// Time the agent waits for the stream header on a new stream.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Concurrent request streams the server may open on one tunnel.
pub const MAX_STREAMS: u32 = 256;

/// Requests the front runs at once on one tunnel (the rest get 503). Kept below
/// [`MAX_STREAMS`] because the agent returns a closed stream's credit a round trip later;
/// without the headroom a burst would wait inside `open_bi` instead of getting a clear answer.
pub const MAX_REQUEST_STREAMS: u32 = MAX_STREAMS - 16;

/// Request streams the agent's QUIC side lets the server open: an eighth above
/// [`MAX_STREAMS`]. quinn tells the peer about closed streams' credit only once more than an
/// eighth of the advertised limit has come back, so up to an eighth can sit unannounced; with
/// exactly [`MAX_STREAMS`] the server could wait in `open_bi` from 224 streams in flight, below
/// its own [`MAX_REQUEST_STREAMS`], for as long as the open ones stay open. With an eighth more
/// it can always open [`MAX_REQUEST_STREAMS`] plus 12 still being closed. The server never
/// opens more than its permits allow, so the extra credit is never used as streams.
pub const STREAM_CREDIT: u32 = MAX_STREAMS + MAX_STREAMS / 8;

/// Per-stream QUIC receive window (bytes). Sized so 256 streams cannot pin much memory: the
/// connection window below caps the sum.
pub const STREAM_WINDOW: u32 = 1024 * 1024;

/// Connection-wide QUIC receive window (bytes).
pub const CONN_WINDOW: u32 = 4 * 1024 * 1024;

/// Server → agent on the TCP transport's goodbye stream: why the server closes the connection
/// (QUIC carries the same in its close frame: [`Reason::close_code`] and the message).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Goodbye {
    /// The reason; `None` for a close with no fault (the server is stopping).
    pub reason: Option<Reason>,
    /// What happened, in words.
    pub message: String,
}

/// QUIC application close code for a deliberate close with no fault (shutdown).
pub const CLOSE_NORMAL: u32 = 0;

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

/// What the PBX side allows, as its own config says (the CM shows which side is off when a
/// Passwordless Login is not offered).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalSwitches {
    /// Account Login is on (enabled, and not suspended by an extension's email).
    pub account_login: bool,
    /// The agent's passwordless switch is on.
    pub passwordless: bool,
}

/// One remote-session audit event as the agent delivers it to the server (its own copy stays
/// in the PBX's `audit.log`). `seq` is per node and only grows, so a redelivered batch is
/// recorded once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Sequence number on this node.
    pub seq: u64,
    /// When it happened on the PBX (Unix seconds).
    pub at: i64,
    /// `login_ok`, `login_failed`, `lockout`, `passwordless_ok`, `logout`, `idle_expiry`,
    /// …, or `overflow` (the queue was full and older events were dropped).
    pub kind: String,
    /// The CM user behind the visit.
    pub user: String,
    /// Visitor address.
    #[serde(default)]
    pub client: Option<String>,
    /// The PBX-side user, role and reason, in a few words.
    #[serde(default)]
    pub detail: Option<String>,
}

/// Most audit events in one [`Control::AuditEvents`] frame (each is bounded, so a batch stays
/// well under [`MAX_FRAME`]).
pub const AUDIT_BATCH: usize = 50;

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
        /// Hot Standby state of this node, when it is one.
        #[serde(default)]
        ha_state: Option<HaState>,
        /// The local switches at connect; `None` from agents that do not report them.
        #[serde(default)]
        switches: Option<LocalSwitches>,
        /// This agent is moving its tunnel to this connection (a QUIC re-probe succeeded):
        /// the older connection of the node is left to finish its requests and close itself
        /// (within [`HANDOVER_GRACE`]) instead of being closed as `replaced`.
        #[serde(default)]
        handover: bool,
    },
    /// Agent → server, first frame instead of hello: this node is being uninstalled
    /// (`pbx-remote-agent deactivate`); the server revokes its key. The connection's client
    /// certificate says which node.
    Deactivate {
        /// Agent version string.
        agent_version: String,
    },
    /// Server → agent, answer to deactivate: the node's key is revoked.
    Deactivated {
        /// The device id as the server knows it.
        device_id: String,
        /// Nodes of the device still registered (a Hot Standby peer).
        nodes_left: u32,
    },
    /// Server → agent, answer to hello.
    Welcome {
        /// The device id as the server knows it.
        device_id: String,
        /// Server clock, ms since the Unix epoch.
        server_time_ms: u64,
        /// Current settings.
        settings: DeviceSettings,
        /// The server records audit events ([`Control::AuditEvents`]); an older server does
        /// not, and is sent none.
        #[serde(default)]
        audit: bool,
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
        ha_state: Option<HaState>,
        /// This node's health sample; `None` from agents that do not send one.
        #[serde(default)]
        telemetry: Option<Telemetry>,
        /// The local switches now (a reload sends a heartbeat at once).
        #[serde(default)]
        switches: Option<LocalSwitches>,
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
    /// Agent → server: remote-session audit events not yet acknowledged, oldest first.
    AuditEvents {
        /// At most [`AUDIT_BATCH`].
        events: Vec<AuditEvent>,
    },
    /// Server → agent: every event up to this sequence number is recorded.
    AuditAck {
        /// Highest sequence number recorded.
        upto: u64,
    },
    /// Agent → server: what became of a provisioning task.
    ProvisionResult {
        /// Task name.
        task: String,
        /// Where the task stands now (never `pending`: the agent has it).
        state: TaskState,
        /// Tail of the apply output, or why.
        output: String,
    },
}

impl Control {
    /// The frame's type as the wire spells it, for logs (a frame's `Debug` would drag every
    /// field type's formatting code into the agent for one debug line).
    pub fn kind(&self) -> &'static str {
        match self {
            Control::Hello { .. } => "hello",
            Control::Deactivate { .. } => "deactivate",
            Control::Deactivated { .. } => "deactivated",
            Control::Welcome { .. } => "welcome",
            Control::Settings { .. } => "settings",
            Control::Heartbeat { .. } => "heartbeat",
            Control::HeartbeatAck { .. } => "heartbeat_ack",
            Control::Provision { .. } => "provision",
            Control::ProvisionResult { .. } => "provision_result",
            Control::AuditEvents { .. } => "audit_events",
            Control::AuditAck { .. } => "audit_ack",
        }
    }
}

/// Where a provisioning task stands: pending until delivered, then executing, then finished or
/// failed; unsupported when the PBX has no `[provisioning]`. Finished and failed are final.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Waiting for the device to connect.
    Pending,
    /// Delivered; the PBX's apply unit has it.
    Executing,
    /// Applied.
    Finished,
    /// The apply unit (or writing the template) failed.
    Failed,
    /// The PBX does not accept provisioning.
    Unsupported,
}

impl TaskState {
    /// Every state.
    pub const ALL: [TaskState; 5] = [
        TaskState::Pending,
        TaskState::Executing,
        TaskState::Finished,
        TaskState::Failed,
        TaskState::Unsupported,
    ];

    /// Stored and displayed spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Executing => "executing",
            TaskState::Finished => "finished",
            TaskState::Failed => "failed",
            TaskState::Unsupported => "unsupported",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<TaskState> {
        TaskState::ALL.into_iter().find(|t| t.as_str() == s)
    }

    /// Finished and failed never change again.
    pub fn is_final(self) -> bool {
        matches!(self, TaskState::Finished | TaskState::Failed)
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The scheme the visitor's browser uses to reach the front.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    /// Plain HTTP (demo and tests only; DESIGN §7).
    Http,
    /// HTTPS.
    Https,
}

impl Scheme {
    /// URL spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    /// Parses a URL scheme; anything other than http/https is `None`.
    pub fn parse(s: &str) -> Option<Scheme> {
        match s {
            "http" => Some(Scheme::Http),
            "https" => Some(Scheme::Https),
            _ => None,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
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
    /// Visitor-facing scheme.
    pub scheme: Scheme,
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
            switches: Some(LocalSwitches {
                account_login: true,
                passwordless: false,
            }),
        };
        write_frame(&mut a, &hello).await.unwrap();
        drop(a);
        let got: Control = read_frame(&mut b).await.unwrap().unwrap();
        match got {
            Control::Heartbeat {
                telemetry,
                switches,
                ..
            } => {
                assert_eq!(telemetry.map(|t| t.cpu_percent), Some(1.5));
                assert_eq!(
                    switches.map(|s| (s.account_login, s.passwordless)),
                    Some((true, false))
                );
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(read_frame::<_, Control>(&mut b).await.unwrap().is_none());
    }

    #[test]
    fn kind_names_the_frame_as_the_wire_does() {
        for frame in [
            Control::AuditAck { upto: 1 },
            Control::AuditEvents { events: vec![] },
            Control::HeartbeatAck { server_time_ms: 1 },
        ] {
            let v = serde_json::to_value(&frame).unwrap();
            assert_eq!(v["type"], frame.kind());
        }
    }

    #[test]
    fn a_heartbeat_from_an_agent_without_switches_still_reads() {
        let old = r#"{"type":"heartbeat","ha_state":null}"#;
        match serde_json::from_str::<Control>(old).unwrap() {
            Control::Heartbeat { switches, .. } => assert_eq!(switches, None),
            other => panic!("unexpected {other:?}"),
        }
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
}
