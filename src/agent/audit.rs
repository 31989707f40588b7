//! The audit trail of remote sessions: one JSON line per event in `state_dir/audit.log` (0600,
//! rotated by size), mirrored under tracing target `audit`, and queued in the outbox for the
//! server's Operation Log.

use serde::Serialize;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Mutex;

/// Size at which `audit.log` is rotated to `audit.log.1`.
pub const ROTATE_BYTES: u64 = 1024 * 1024;

/// One audit event.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Event<'a> {
    /// What happened: login_ok, login_failed, lockout, passwordless_ok, passwordless_rejected,
    /// logout, idle_expiry, absolute_expiry, revoked, grant_mismatch.
    pub event: &'a str,
    /// CM user behind the visit.
    pub cm_user: &'a str,
    /// Visitor address.
    pub client_addr: &'a str,
    /// PBX-side user (username or super admin), when known.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<&'a str>,
    /// Role, when a session is involved.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub role: Option<&'a str>,
    /// Hash of the session id (never the id).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub session: Option<&'a str>,
    /// Why (refusals, revocations).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<&'a str>,
}

/// Appends events to the audit log.
pub struct AuditLog {
    pub(super) path: PathBuf,
    lock: Mutex<()>,
    /// The same events, waiting for the server.
    pub(crate) outbox: crate::agent::outbox::Outbox,
}

impl AuditLog {
    /// Audit log at `path`, queueing for the server in `outbox`.
    pub fn new(path: PathBuf, outbox: crate::agent::outbox::Outbox) -> AuditLog {
        AuditLog {
            path,
            lock: Mutex::new(()),
            outbox,
        }
    }

    /// Records an event; a write failure is logged, never fatal.
    pub fn record(&self, e: Event<'_>) {
        let time = crate::status::rfc3339(std::time::SystemTime::now());
        let mut line = serde_json::json!({ "time": time });
        if let (Some(obj), Ok(serde_json::Value::Object(fields))) =
            (line.as_object_mut(), serde_json::to_value(&e))
        {
            obj.extend(fields);
        }
        tracing::info!(target: "audit", event = e.event, cm_user = e.cm_user, client = e.client_addr,
            user = e.user, role = e.role, session = e.session, reason = e.reason, "audit");
        let detail: Vec<String> = [("user", e.user), ("role", e.role), ("reason", e.reason)]
            .into_iter()
            .filter_map(|(k, v)| v.map(|v| format!("{k}: {v}")))
            .collect();
        self.outbox.push(
            e.event,
            e.cm_user,
            e.client_addr,
            (!detail.is_empty()).then(|| detail.join("; ")),
        );
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(err) = self.append(&line.to_string()) {
            tracing::warn!(error = %err, file = %self.path.display(), "cannot write the audit log");
        }
    }

    fn append(&self, line: &str) -> std::io::Result<()> {
        if std::fs::metadata(&self.path)
            .map(|m| m.len() >= ROTATE_BYTES)
            .unwrap_or(false)
        {
            let mut rotated = self.path.clone().into_os_string();
            rotated.push(".1");
            std::fs::rename(&self.path, rotated)?;
        }
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&self.path)?;
        f.write_all(format!("{line}\n").as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn writes_private_json_lines_and_rotates() {
        let dir = tempfile::tempdir().unwrap();
        let log = AuditLog::new(
            dir.path().join("audit.log"),
            crate::agent::outbox::Outbox::open(dir.path().join("audit-outbox")),
        );
        log.record(Event {
            event: "login_ok",
            cm_user: "alice",
            client_addr: "1.2.3.4",
            user: Some("provider"),
            ..Default::default()
        });
        let text = std::fs::read_to_string(&log.path).unwrap();
        let v: serde_json::Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
        assert_eq!(v["event"], "login_ok");
        assert_eq!(v["cm_user"], "alice");
        assert!(v["time"].as_str().is_some());
        let queued = log.outbox.pending();
        assert_eq!(
            (queued[0].kind.as_str(), queued[0].user.as_str()),
            ("login_ok", "alice")
        );
        assert_eq!(queued[0].detail.as_deref(), Some("user: provider"));
        assert_eq!(
            std::fs::metadata(&log.path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        std::fs::write(&log.path, vec![b'x'; ROTATE_BYTES as usize]).unwrap();
        log.record(Event {
            event: "logout",
            ..Default::default()
        });
        assert!(dir.path().join("audit.log.1").exists());
        assert_eq!(
            std::fs::read_to_string(&log.path).unwrap().lines().count(),
            1
        );
    }
}
