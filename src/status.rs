//! The status file the PBX page reads: one JSON object rewritten atomically when the state
//! changes, and the lenient reader behind `pbx-remote-agent status`.

use crate::protocol::Reason;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;
use tokio::sync::watch;

/// Agent states (DESIGN §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum State {
    /// Remote Management is off in the config.
    Disabled,
    /// No credential yet.
    #[default]
    NotActivated,
    /// Activation request in flight.
    Activating,
    /// First connection attempt after start or activation.
    Connecting,
    /// Tunnel up.
    Connected,
    /// Tunnel lost; retrying.
    Reconnecting,
    /// Stopped trying until the config changes.
    Failed,
    /// The daemon exited.
    Stopped,
}

impl State {
    /// Every state, in lifecycle order.
    pub const ALL: [State; 8] = [
        State::Disabled,
        State::NotActivated,
        State::Activating,
        State::Connecting,
        State::Connected,
        State::Reconnecting,
        State::Failed,
        State::Stopped,
    ];

    /// snake_case name.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Disabled => "disabled",
            State::NotActivated => "not_activated",
            State::Activating => "activating",
            State::Connecting => "connecting",
            State::Connected => "connected",
            State::Reconnecting => "reconnecting",
            State::Failed => "failed",
            State::Stopped => "stopped",
        }
    }
}

/// One active remote session, as listed in status.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    /// Who (username or super admin) and for which CM user.
    pub who: String,
    /// `administrator` or `super_admin`.
    pub role: String,
    /// Login time, RFC 3339.
    pub since: String,
    /// Whether the agent holds a portal session for it (`[portal_login]`); absent when the
    /// agent does not log in to the portal for this kind of session.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub portal_session: Option<bool>,
}

/// The status document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(default)]
pub struct Status {
    /// Current state.
    pub state: State,
    /// Why (with `failed` and `reconnecting`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// What to do about it, in words.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Server address from the config.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server: Option<String>,
    /// Device id once activated.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_id: Option<String>,
    /// When the current connection was established.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
    /// When the last connection was established.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_connected: Option<String>,
    /// When the next attempt happens.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_retry_at: Option<String>,
    /// Round-trip time to the server, refreshed at heartbeat cadence.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rtt_ms: Option<u64>,
    /// `quic` or `tcp`, while a tunnel is up.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport: Option<String>,
    /// Why that transport ("UDP to HOST:PORT gets no answer; using TCP", "via proxy …",
    /// "forced by config"); none on QUIC by choice.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub transport_note: Option<String>,
    /// Remote sessions now open.
    pub active_sessions: Vec<SessionInfo>,
    /// Hot Standby role.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ha_role: Option<String>,
    /// Hot Standby state.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ha_state: Option<crate::protocol::HaState>,
    /// Present only while a reloaded config was refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    /// Reloads handled since the agent started (applied or refused): a reload is done, its
    /// `config_error` set or cleared, once this has moved on.
    pub config_generation: u64,
    /// Where `/metrics` and `/ready` are served (the bound address: `[metrics] listen` may name
    /// port 0), while they are.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metrics_listen: Option<String>,
    /// Agent process id.
    pub pid: u32,
    /// When this file was written.
    pub updated_at: String,
}

/// RFC 3339 time, millisecond precision.
pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

/// Holds the latest status, writes the file when it changes and lets tasks watch it.
#[derive(Clone)]
pub struct StatusHandle {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    tx: watch::Sender<Status>,
    /// Serialises file writes: each reads the latest status while holding it, so the file
    /// always ends at the newest state even when tasks update at once. It also holds which
    /// write failures were logged, so a full disk is not warned about at every change.
    writing: std::sync::Mutex<crate::backoff::RetryLog>,
}

impl StatusHandle {
    /// Starts from `initial` and writes it.
    pub fn new(path: PathBuf, initial: Status) -> StatusHandle {
        let (tx, _) = watch::channel(initial);
        let h = StatusHandle {
            inner: Arc::new(Inner {
                path,
                tx,
                writing: std::sync::Mutex::new(crate::backoff::RetryLog::default()),
            }),
        };
        h.write();
        h
    }

    /// Changes the status with `f`; writes the file only if something changed.
    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        let changed = self.inner.tx.send_if_modified(|s| {
            let before = s.clone();
            f(s);
            *s != before
        });
        if changed {
            self.write();
        }
    }

    /// Sets state, reason and message together, clearing retry time when not retrying.
    pub fn set(&self, state: State, reason: Option<Reason>, message: Option<String>) {
        self.update(|s| {
            s.state = state;
            s.reason = reason;
            s.message = message;
            if state != State::Reconnecting {
                s.next_retry_at = None;
            }
            if state != State::Connected {
                s.since = None;
                s.rtt_ms = None;
                s.transport = None;
                s.transport_note = None;
            }
        });
    }

    /// The current status.
    pub fn get(&self) -> Status {
        self.inner.tx.borrow().clone()
    }

    /// A receiver that sees every change.
    pub fn subscribe(&self) -> watch::Receiver<Status> {
        self.inner.tx.subscribe()
    }

    fn write(&self) {
        // Invariant: nothing panics while the lock is held; a poisoned lock guards no data.
        let mut failures = self.inner.writing.lock().unwrap_or_else(|p| p.into_inner());
        self.inner.tx.send_modify(|s| {
            s.pid = std::process::id();
            s.updated_at = rfc3339(SystemTime::now());
        });
        let status = self.get();
        let result = serde_json::to_vec_pretty(&status)
            .map_err(anyhow::Error::from)
            .and_then(|json| {
                if let Some(dir) = self.inner.path.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                crate::fsutil::write_atomic(&self.inner.path, &json, 0o644)
            });
        match result {
            // A full disk must not stop the tunnel; the in-memory status stays right.
            Err(e) => {
                if let Some(line) = failures.failed(&format!("{e:#}"), std::time::Instant::now()) {
                    tracing::warn!(error = %line, file = %self.inner.path.display(), "cannot write status file");
                }
            }
            Ok(()) => {
                if let Some(unlogged) = failures.succeeded() {
                    tracing::info!(file = %self.inner.path.display(), unlogged_failures = unlogged, "status file written again");
                }
            }
        }
    }
}

/// Reads a status file leniently; reports `stopped` when the recorded pid is gone.
pub fn read(path: &Path) -> anyhow::Result<Status> {
    use anyhow::Context;
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read status file {}", path.display()))?;
    let mut status: Status = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a status document", path.display()))?;
    if status.state != State::Stopped && !pid_alive(status.pid) {
        status.state = State::Stopped;
        status.message = Some(format!(
            "the agent (pid {}) is not running; last state was recorded at {}",
            status.pid, status.updated_at
        ));
    }
    Ok(status)
}

fn pid_alive(pid: u32) -> bool {
    pid != 0 && Path::new(&format!("/proc/{pid}")).exists()
}

/// Human-readable rendering for `status` without `--json`.
pub fn render(s: &Status) -> String {
    let mut out = format!("state:       {}\n", s.state.as_str());
    let mut line = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            out.push_str(&format!("{k:<13}{v}\n"));
        }
    };
    line("reason:", s.reason.map(|r| r.as_str().to_string()));
    line("message:", s.message.clone());
    line("server:", s.server.clone());
    line("device id:", s.device_id.clone());
    line("connected:", s.since.clone());
    line("last conn.:", s.last_connected.clone());
    line("next retry:", s.next_retry_at.clone());
    line("rtt:", s.rtt_ms.map(|r| format!("{r} ms")));
    line(
        "transport:",
        s.transport.as_deref().map(|t| {
            let name = match t {
                "quic" => "QUIC (UDP)",
                "tcp" => "TCP (TLS, HTTP/2 framing)",
                other => other,
            };
            match &s.transport_note {
                Some(note) => format!("{name}: {note}"),
                None => name.to_string(),
            }
        }),
    );
    line(
        "ha:",
        s.ha_role.clone().map(|r| {
            format!(
                "{r} ({})",
                s.ha_state.map(|h| h.as_str()).unwrap_or_default()
            )
        }),
    );
    line("config error:", s.config_error.clone());
    line("sessions:", Some(s.active_sessions.len().to_string()));
    for sess in &s.active_sessions {
        let portal = match sess.portal_session {
            Some(true) => ", portal session held",
            Some(false) => ", no portal session",
            None => "",
        };
        out.push_str(&format!(
            "  - {} ({}) since {}{portal}\n",
            sess.who, sess.role, sess.since
        ));
    }
    out.push_str(&format!(
        "pid:         {}\nupdated:     {}\n",
        s.pid, s.updated_at
    ));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_on_change_and_reports_dead_pids_as_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("run/status.json");
        let h = StatusHandle::new(path.clone(), Status::default());
        h.set(
            State::Reconnecting,
            Some(Reason::ServerUnreachable),
            Some("x".into()),
        );
        let s = read(&path).unwrap();
        assert_eq!(s.state, State::Reconnecting);
        assert_eq!(s.reason, Some(Reason::ServerUnreachable));
        assert_eq!(s.pid, std::process::id());
        let raw: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(raw["state"], "reconnecting");
        assert_eq!(raw["reason"], "server_unreachable");

        let mut dead = s.clone();
        dead.pid = u32::MAX - 1;
        std::fs::write(&path, serde_json::to_vec(&dead).unwrap()).unwrap();
        assert_eq!(read(&path).unwrap().state, State::Stopped);
    }

    #[test]
    fn unchanged_updates_do_not_rewrite() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("status.json");
        let h = StatusHandle::new(path.clone(), Status::default());
        h.set(State::Connecting, None, None);
        let before = std::fs::metadata(&path).unwrap().modified().unwrap();
        let first = std::fs::read_to_string(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        h.set(State::Connecting, None, None);
        assert!(!path.exists(), "no rewrite without a change");
        let _ = (before, first);
    }
}
