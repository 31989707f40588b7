//! Login lockout: 3 failures for one (CM user, client /32 or /64, username) block that key for
//! 10 minutes; a per-username slowdown that never hard-locks; attempts are reserved before the
//! password check so parallel guesses get no extra tries. Locks persist in the state directory.

use crate::agent::clock::Clock;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

/// Failures that lock a key.
pub const MAX_FAILURES: u32 = 3;
/// How long a lock lasts (and the window failures are counted in).
pub const LOCK_FOR: Duration = Duration::from_secs(600);
/// Longest per-username slowdown.
pub const MAX_SLOWDOWN: Duration = Duration::from_secs(4);

/// Whether a login attempt may go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    /// Check the password after `delay`.
    Go {
        /// Per-username slowdown to apply first.
        delay: Duration,
    },
    /// Refused; `left` until the lock ends.
    Locked {
        /// Time left.
        left: Duration,
    },
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Entry {
    failures: u32,
    first_failure: u64,
    locked_until: u64,
}

#[derive(Default)]
struct State {
    keys: HashMap<String, Entry>,
    inflight: HashMap<String, u32>,
    per_user: HashMap<String, Vec<u64>>,
}

impl State {
    /// Drops what no longer counts at `now`: keys whose window and lock have ended, and
    /// usernames with no failure left in the window. Every wrong username makes a key and a
    /// username of its own, so without this the table (and the file rewritten on each failure)
    /// would grow with every name ever typed.
    fn forget_before(&mut self, now: u64) {
        let window = LOCK_FOR.as_secs();
        self.keys
            .retain(|_, e| e.locked_until > now || e.first_failure + window > now);
        self.per_user.retain(|_, times| {
            times.retain(|t| *t + window > now);
            !times.is_empty()
        });
    }
}

/// The lockout table.
pub struct Lockout {
    path: PathBuf,
    clock: Clock,
    state: Mutex<State>,
}

/// The lockout key: CM user, client network (/32 or /64) and lower-cased username.
pub fn key(cm_user: &str, client_addr: &str, username: &str) -> String {
    let net = match client_addr.parse::<IpAddr>() {
        Ok(IpAddr::V6(v6)) => {
            let s = v6.segments();
            format!("{:x}:{:x}:{:x}:{:x}::/64", s[0], s[1], s[2], s[3])
        }
        Ok(v4) => format!("{v4}/32"),
        Err(_) => client_addr.to_string(),
    };
    format!("{cm_user}\n{net}\n{}", username.to_lowercase())
}

impl Lockout {
    /// Loads persisted locks from `path` (missing or corrupt → empty, logged).
    pub fn load(path: PathBuf, clock: Clock) -> Lockout {
        let keys = match crate::fsutil::read_private(&path) {
            Ok(Some(bytes)) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                tracing::warn!(file = %path.display(), error = %e, "lockout file unreadable; starting empty");
                HashMap::new()
            }),
            Ok(None) => HashMap::new(),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "lockout file unreadable; starting empty");
                HashMap::new()
            }
        };
        let mut state = State {
            keys,
            ..State::default()
        };
        state.forget_before(clock.unix_now());
        Lockout {
            path,
            clock,
            state: Mutex::new(state),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // Invariant: no panics inside the critical sections below.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Reserves one attempt for `key`.
    pub fn reserve(&self, key: &str, username: &str) -> Admission {
        let now = self.clock.unix_now();
        let mut st = self.lock();
        let entry = st.keys.get(key).cloned().unwrap_or_default();
        if entry.locked_until > now {
            return Admission::Locked {
                left: Duration::from_secs(entry.locked_until - now),
            };
        }
        let failures = if entry.first_failure + LOCK_FOR.as_secs() <= now {
            st.keys.remove(key);
            0
        } else {
            entry.failures
        };
        let inflight = st.inflight.get(key).copied().unwrap_or(0);
        if failures + inflight >= MAX_FAILURES {
            // Parallel guesses beyond the allowance wait for the ones in flight.
            return Admission::Locked {
                left: Duration::from_secs(1),
            };
        }
        *st.inflight.entry(key.to_string()).or_default() += 1;
        let user = username.to_lowercase();
        let recent = st
            .per_user
            .get(&user)
            .map(|v| v.iter().filter(|t| **t + LOCK_FOR.as_secs() > now).count())
            .unwrap_or(0) as u32;
        let delay = if recent < MAX_FAILURES {
            Duration::ZERO
        } else {
            (Duration::from_millis(250) * 2u32.saturating_pow(recent - MAX_FAILURES))
                .min(MAX_SLOWDOWN)
        };
        Admission::Go { delay }
    }

    /// Records the outcome of a reserved attempt; true when this failure locked the key.
    pub fn finish(&self, key: &str, username: &str, ok: bool) -> bool {
        let now = self.clock.unix_now();
        let mut st = self.lock();
        if let Some(n) = st.inflight.get_mut(key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                st.inflight.remove(key);
            }
        }
        let locked = if ok {
            st.keys.remove(key).is_some()
        } else {
            st.forget_before(now);
            let user = username.to_lowercase();
            st.per_user.entry(user).or_default().push(now);
            let e = st.keys.entry(key.to_string()).or_default();
            if e.failures == 0 {
                e.first_failure = now;
            }
            e.failures += 1;
            if e.failures >= MAX_FAILURES {
                e.locked_until = now + LOCK_FOR.as_secs();
            }
            e.failures >= MAX_FAILURES
        };
        if ok && !locked {
            return false;
        }
        let snapshot = serde_json::to_vec(&st.keys).unwrap_or_default();
        drop(st);
        if let Err(e) = crate::fsutil::write_private(&self.path, &snapshot) {
            tracing::warn!(error = %format!("{e:#}"), "cannot persist the lockout table");
        }
        locked && !ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn three_failures_lock_for_ten_minutes_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Clock::default();
        let l = Lockout::load(dir.path().join("lockout.json"), clock.clone());
        let k = key("alice", "10.0.0.7", "Provider");
        for i in 0..3 {
            assert!(matches!(l.reserve(&k, "provider"), Admission::Go { .. }));
            assert_eq!(l.finish(&k, "provider", false), i == 2);
        }
        assert!(
            matches!(l.reserve(&k, "provider"), Admission::Locked { left } if left > Duration::from_secs(590))
        );
        // Another CM user from the same address is not locked.
        let other = key("bob", "10.0.0.7", "provider");
        assert!(matches!(
            l.reserve(&other, "provider"),
            Admission::Go { .. }
        ));
        l.finish(&other, "provider", true);

        let again = Lockout::load(dir.path().join("lockout.json"), clock.clone());
        assert!(matches!(
            again.reserve(&k, "provider"),
            Admission::Locked { .. }
        ));
        clock.advance(LOCK_FOR + Duration::from_secs(1));
        assert!(matches!(
            again.reserve(&k, "provider"),
            Admission::Go { .. }
        ));
    }

    #[test]
    fn parallel_attempts_are_reserved_up_front() {
        let dir = tempfile::tempdir().unwrap();
        let l = Lockout::load(dir.path().join("l.json"), Clock::default());
        let k = key("alice", "2001:db8:1:2:3:4:5:6", "u");
        assert_eq!(
            k,
            key("alice", "2001:db8:1:2:ffff::1", "U"),
            "/64 and case fold"
        );
        let admitted = (0..10)
            .filter(|_| matches!(l.reserve(&k, "u"), Admission::Go { .. }))
            .count();
        assert_eq!(admitted, 3);
    }

    #[test]
    fn per_user_slowdown_grows_but_never_locks() {
        let dir = tempfile::tempdir().unwrap();
        let l = Lockout::load(dir.path().join("l.json"), Clock::default());
        let mut delays = vec![];
        for i in 0..8 {
            let k = key(&format!("cm{i}"), "10.0.0.1", "provider");
            match l.reserve(&k, "provider") {
                Admission::Go { delay } => delays.push(delay),
                Admission::Locked { .. } => panic!("the account itself must never hard-lock"),
            }
            l.finish(&k, "provider", false);
        }
        assert_eq!(delays[0], Duration::ZERO);
        assert!(delays[4] > delays[3] && *delays.last().unwrap() <= MAX_SLOWDOWN);
    }

    #[test]
    fn names_typed_long_ago_are_forgotten_and_the_file_stays_small() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("lockout.json");
        let clock = Clock::default();
        let l = Lockout::load(file.clone(), clock.clone());
        let fail = |name: &str| {
            let k = key("alice", "10.0.0.7", name);
            assert!(matches!(l.reserve(&k, name), Admission::Go { .. }));
            l.finish(&k, name, false);
        };
        for i in 0..200 {
            fail(&format!("guess{i}"));
        }
        let full = std::fs::metadata(&file).unwrap().len();
        clock.advance(LOCK_FOR + Duration::from_secs(1));
        fail("one-more");
        {
            let st = l.lock();
            assert_eq!(st.keys.len(), 1, "only the key still in its window");
            assert_eq!(
                st.per_user.len(),
                1,
                "only the username still in its window"
            );
        }
        let now = std::fs::metadata(&file).unwrap().len();
        assert!(
            now * 50 < full,
            "the file shrank from {full} to {now} bytes"
        );
        // A lock still running is kept, and a table read from the file drops what has ended.
        let k = key("alice", "10.0.0.7", "provider");
        for _ in 0..MAX_FAILURES {
            assert!(matches!(l.reserve(&k, "provider"), Admission::Go { .. }));
            l.finish(&k, "provider", false);
        }
        clock.advance(LOCK_FOR / 2);
        let again = Lockout::load(file, clock.clone());
        assert!(matches!(
            again.reserve(&k, "provider"),
            Admission::Locked { .. }
        ));
        assert_eq!(again.lock().keys.len(), 2, "one-more and the locked key");
    }
}
