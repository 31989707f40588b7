//! The health policy: when a node counts as Abnormal, from its last telemetry sample.

use crate::protocol::Telemetry;
use serde::Serialize;
use std::fmt;

/// CPU threshold above which a node is flagged Abnormal, percent.
pub const ABNORMAL_CPU: f64 = 85.0;
/// Memory threshold, percent.
pub const ABNORMAL_MEMORY: f64 = 85.0;
/// Disk threshold, percent.
pub const ABNORMAL_DISK: f64 = 95.0;

/// A node's health as the provider sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// Online and every figure under its threshold.
    Normal,
    /// Online with a figure over its threshold, or the web portal unreachable.
    Abnormal,
    /// Offline, or no sample yet.
    Unknown,
}

impl Health {
    /// The spelling in `device show` and its JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Normal => "normal",
            Health::Abnormal => "abnormal",
            Health::Unknown => "unknown",
        }
    }
}

impl fmt::Display for Health {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Health of a node from its last sample, with what is abnormal (e.g. "cpu 91.0% > 85%"; empty
/// unless [`Health::Abnormal`]).
pub fn health(online: bool, t: Option<&Telemetry>) -> (Health, Vec<String>) {
    let Some(t) = t.filter(|_| online) else {
        return (Health::Unknown, vec![]);
    };
    let mut why = vec![];
    for (what, value, limit) in [
        ("cpu", f64::from(t.cpu_percent), ABNORMAL_CPU),
        ("memory", t.memory_percent(), ABNORMAL_MEMORY),
        ("disk", t.disk_percent(), ABNORMAL_DISK),
    ] {
        if value > limit {
            why.push(format!("{what} {value:.1}% > {limit}%"));
        }
    }
    if !t.portal_reachable {
        why.push(format!(
            "web portal unreachable: {}",
            t.portal_error.as_deref().unwrap_or("no connection")
        ));
    }
    let state = if why.is_empty() {
        Health::Normal
    } else {
        Health::Abnormal
    };
    (state, why)
}
