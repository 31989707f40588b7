//! What a device says about itself: edition, firmware, MAC, Hot Standby role and state, and the
//! health sample it sends with every heartbeat. Parsed here once, for the agent's config check
//! and the server's enrolment alike.

use serde::{Deserialize, Serialize};

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
    /// Hot Standby role when configured.
    #[serde(default)]
    pub ha_role: Option<HaRole>,
}

impl DeviceFacts {
    /// The node this device is, as the server keys its tunnels and rows.
    pub fn node_role(&self) -> NodeRole {
        NodeRole::from(self.ha_role)
    }
}

/// Hot Standby role of a node in a pair (`[ha] role`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HaRole {
    /// Primary node.
    Primary,
    /// Secondary node.
    Secondary,
}

impl HaRole {
    /// Config and wire spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            HaRole::Primary => "primary",
            HaRole::Secondary => "secondary",
        }
    }

    /// Parses the config spelling.
    pub fn parse(s: &str) -> Option<HaRole> {
        match s {
            "primary" => Some(HaRole::Primary),
            "secondary" => Some(HaRole::Secondary),
            _ => None,
        }
    }

    /// The other node of the pair.
    pub fn partner(self) -> HaRole {
        match self {
            HaRole::Primary => HaRole::Secondary,
            HaRole::Secondary => HaRole::Primary,
        }
    }
}

/// One node of a device: a lone PBX, or either half of a Hot Standby pair. The server keeps one
/// tunnel and one row per node; visits fall back through the nodes in this order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeRole {
    /// A PBX without Hot Standby.
    Single,
    /// The primary node of a pair.
    Primary,
    /// The secondary node of a pair.
    Secondary,
}

impl NodeRole {
    /// Every role, in fallback order.
    pub const ALL: [NodeRole; 3] = [NodeRole::Single, NodeRole::Primary, NodeRole::Secondary];

    /// Stored and displayed spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            NodeRole::Single => "single",
            NodeRole::Primary => "primary",
            NodeRole::Secondary => "secondary",
        }
    }

    /// Parses the stored spelling.
    pub fn parse(s: &str) -> Option<NodeRole> {
        NodeRole::ALL.into_iter().find(|r| r.as_str() == s)
    }

    /// The pair role, `None` for a lone PBX.
    pub fn ha(self) -> Option<HaRole> {
        match self {
            NodeRole::Single => None,
            NodeRole::Primary => Some(HaRole::Primary),
            NodeRole::Secondary => Some(HaRole::Secondary),
        }
    }
}

impl From<Option<HaRole>> for NodeRole {
    fn from(ha: Option<HaRole>) -> NodeRole {
        match ha {
            None => NodeRole::Single,
            Some(HaRole::Primary) => NodeRole::Primary,
            Some(HaRole::Secondary) => NodeRole::Secondary,
        }
    }
}

impl std::fmt::Display for NodeRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Hot Standby state of a node, read from `[ha] state_file`. Anything the file holds other
/// than `active` or `standby` (and any spelling a newer agent sends) is `unknown`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum HaState {
    /// This node serves calls; visits go to it.
    Active,
    /// This node waits to take over.
    Standby,
    /// The state file is missing or says something else.
    #[serde(other)]
    Unknown,
}

impl HaState {
    /// Stored and displayed spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            HaState::Active => "active",
            HaState::Standby => "standby",
            HaState::Unknown => "unknown",
        }
    }

    /// Reads a state file's text: case and surrounding space do not matter.
    pub fn parse(s: &str) -> HaState {
        match s.trim().to_ascii_lowercase().as_str() {
            "active" => HaState::Active,
            "standby" => HaState::Standby,
            _ => HaState::Unknown,
        }
    }
}

impl std::fmt::Display for HaState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
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
    pub ha_state: Option<HaState>,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_and_states_keep_their_wire_spelling() {
        for r in NodeRole::ALL {
            assert_eq!(NodeRole::parse(r.as_str()), Some(r));
            assert_eq!(serde_json::to_string(&r).unwrap(), format!("\"{r}\""));
            assert_eq!(NodeRole::from(r.ha()), r);
        }
        let facts: DeviceFacts = serde_json::from_str(
            r#"{"edition":"software","firmware":"83.19.0.110","model":"m","serial":"s","mac":"m","ha_role":"secondary"}"#,
        )
        .unwrap();
        assert_eq!(facts.node_role(), NodeRole::Secondary);
        assert_eq!(HaState::parse(" Active\n"), HaState::Active);
        assert_eq!(HaState::parse("takeover"), HaState::Unknown);
        let from_newer: HaState = serde_json::from_str("\"syncing\"").unwrap();
        assert_eq!(from_newer, HaState::Unknown);
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
}
