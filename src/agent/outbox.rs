//! The audit outbox: remote-session events waiting for the server, in `state_dir/audit-outbox`
//! (JSON lines, 0600), so an outage or a restart loses none of them and they reach the
//! server's Operation Log with their original times. Bounded: when it is full the oldest
//! events give way to one `overflow` record saying how many went, which is delivered like the
//! rest. Each event has a sequence number that only grows (also across restarts), so the
//! server records a redelivered batch once.

use crate::protocol::{AuditEvent, AUDIT_BATCH};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Mutex;

/// Events the outbox keeps before the oldest give way.
pub const MAX_EVENTS: usize = 2000;
/// Longest text of one field (the user, the detail) an event carries.
const MAX_FIELD: usize = 256;

/// The queue of events not yet acknowledged by the server.
pub struct Outbox {
    path: PathBuf,
    state: Mutex<State>,
    /// Rung by each new event, so a connected agent delivers it now.
    queued: tokio::sync::Notify,
}

struct State {
    /// Events in the file, oldest first (kept in memory too: at most [`MAX_EVENTS`]).
    events: Vec<AuditEvent>,
    next_seq: u64,
}

fn cut(s: &str) -> String {
    let mut end = s.len().min(MAX_FIELD);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s[..end].to_string()
}

impl Outbox {
    /// The outbox at `path`, with what an earlier run left in it.
    pub fn open(path: PathBuf) -> Outbox {
        let events: Vec<AuditEvent> = std::fs::read_to_string(&path)
            .map(|text| {
                text.lines()
                    .filter_map(|l| serde_json::from_str(l).ok())
                    .collect()
            })
            .unwrap_or_default();
        // The next number continues the file's; an empty file starts from the clock, so a
        // wiped outbox never reuses numbers the server has seen.
        let next_seq = events
            .last()
            .map(|e| e.seq + 1)
            .unwrap_or_else(crate::protocol::now_ms);
        Outbox {
            path,
            state: Mutex::new(State { events, next_seq }),
            queued: tokio::sync::Notify::new(),
        }
    }

    /// Queues an event that happened now.
    pub fn push(&self, kind: &str, user: &str, client: &str, detail: Option<String>) {
        let mut st = self.lock();
        let seq = st.next_seq;
        st.next_seq += 1;
        let at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0);
        let ev = AuditEvent {
            seq,
            at,
            kind: cut(kind),
            user: cut(user),
            client: (!client.is_empty()).then(|| cut(client)),
            detail: detail.map(|d| cut(&d)),
        };
        st.events.push(ev.clone());
        let result = if st.events.len() > MAX_EVENTS {
            overflow(&mut st.events);
            self.rewrite(&st.events)
        } else {
            self.append(&ev)
        };
        if let Err(e) = result {
            tracing::warn!(error = %e, file = %self.path.display(), "cannot write the audit outbox");
        }
        drop(st);
        self.queued.notify_one();
    }

    /// Resolves when an event has been queued since the last call.
    pub async fn queued(&self) {
        self.queued.notified().await
    }

    /// The oldest events not yet acknowledged, at most one batch.
    pub fn pending(&self) -> Vec<AuditEvent> {
        self.lock()
            .events
            .iter()
            .take(AUDIT_BATCH)
            .cloned()
            .collect()
    }

    /// Drops every event up to `upto` (the server has recorded them).
    pub fn ack(&self, upto: u64) {
        let mut st = self.lock();
        let before = st.events.len();
        st.events.retain(|e| e.seq > upto);
        if st.events.len() != before {
            if let Err(e) = self.rewrite(&st.events) {
                tracing::warn!(error = %e, file = %self.path.display(), "cannot write the audit outbox");
            }
        }
    }

    /// Events waiting.
    pub fn len(&self) -> usize {
        self.lock().events.len()
    }

    /// Nothing waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Invariant: nothing panics while holding it; the state stays usable if it did.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn append(&self, ev: &AuditEvent) -> std::io::Result<()> {
        let mut line = serde_json::to_string(ev)?;
        line.push('\n');
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
            .open(&self.path)?
            .write_all(line.as_bytes())
    }

    fn rewrite(&self, events: &[AuditEvent]) -> std::io::Result<()> {
        let mut text = String::new();
        for e in events {
            text.push_str(&serde_json::to_string(e)?);
            text.push('\n');
        }
        let tmp = self.path.with_extension("tmp");
        {
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .truncate(true)
                .mode(0o600)
                .custom_flags(rustix::fs::OFlags::NOFOLLOW.bits() as i32)
                .open(&tmp)?;
            f.write_all(text.as_bytes())?;
        }
        std::fs::rename(&tmp, &self.path)
    }
}

/// Makes room: the oldest tenth of the events (and an earlier overflow record, whose count it
/// adds) become one `overflow` record that takes the last dropped event's number and time.
fn overflow(events: &mut Vec<AuditEvent>) {
    let drop = (MAX_EVENTS / 10).max(1);
    let gone: Vec<AuditEvent> = events.drain(..drop.min(events.len())).collect();
    let mut count = 0u64;
    for e in &gone {
        count += if e.kind == "overflow" {
            e.detail
                .as_deref()
                .and_then(|d| d.split_whitespace().next())
                .and_then(|n| n.parse().ok())
                .unwrap_or(1)
        } else {
            1
        };
    }
    let Some(last) = gone.last() else { return };
    events.insert(
        0,
        AuditEvent {
            seq: last.seq,
            at: last.at,
            kind: "overflow".into(),
            user: String::new(),
            client: None,
            detail: Some(format!(
                "{count} older remote-session events were dropped while the server was unreachable (the PBX's audit.log keeps them)"
            )),
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn events_wait_in_a_private_file_until_acknowledged_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit-outbox");
        let out = Outbox::open(path.clone());
        out.push(
            "login_ok",
            "ann@example.com",
            "198.51.100.7",
            Some("user=provider".into()),
        );
        out.push("logout", "ann@example.com", "198.51.100.7", None);
        assert_eq!(
            std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let p = out.pending();
        assert_eq!(p.len(), 2);
        assert!(p[0].seq < p[1].seq);
        assert_eq!(p[0].client.as_deref(), Some("198.51.100.7"));

        // A restart keeps them and continues the numbers.
        let again = Outbox::open(path.clone());
        assert_eq!(again.pending(), p);
        again.ack(p[0].seq);
        assert_eq!(again.pending().len(), 1);
        again.push("login_ok", "bob@example.com", "", None);
        let q = again.pending();
        assert!(q[1].seq > p[1].seq);
        again.ack(q[1].seq);
        assert!(again.is_empty());
        assert!(
            Outbox::open(path).is_empty(),
            "acknowledged events are gone from the file"
        );
    }

    #[test]
    fn a_full_outbox_drops_the_oldest_into_one_overflow_record() {
        let dir = tempfile::tempdir().unwrap();
        let out = Outbox::open(dir.path().join("audit-outbox"));
        let first = {
            out.push("login_failed", "x", "", None);
            out.pending()[0].seq
        };
        for _ in 0..(MAX_EVENTS * 2) {
            out.push("login_failed", "x", "", None);
        }
        assert!(out.len() <= MAX_EVENTS);
        let p = out.pending();
        assert_eq!(p[0].kind, "overflow");
        let dropped: u64 = p[0]
            .detail
            .as_deref()
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        let kept = out.len() as u64 - 1;
        assert_eq!(
            dropped + kept,
            MAX_EVENTS as u64 * 2 + 1,
            "every event is counted, kept or dropped"
        );
        assert!(
            p[0].seq > first && p[0].seq < p[1].seq,
            "numbers stay in order"
        );
    }

    #[test]
    fn long_fields_are_cut_on_a_character_boundary() {
        let dir = tempfile::tempdir().unwrap();
        let out = Outbox::open(dir.path().join("audit-outbox"));
        let long = "é".repeat(500);
        out.push("login_failed", &long, "", Some(long.clone()));
        let e = &out.pending()[0];
        assert!(e.user.len() <= MAX_FIELD && e.user.chars().all(|c| c == 'é'));
        assert_eq!(e.client, None);
    }
}
