//! Status reasons: one vocabulary for the agent's status file, activation errors and the
//! reasons a tunnel is closed with.

use serde::{Deserialize, Serialize};
use std::fmt;

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
    /// The HTTP proxy refused the CONNECT or its credentials (the message names the proxy and
    /// its status line).
    ProxyError,
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
            Reason::ProxyError => "proxy_error",
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

const ALL_REASONS: [Reason; 15] = [
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
    Reason::ProxyError,
];

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
