//! The agent's clocks: a monotonic clock that tests can move forward (session timeouts,
//! lockouts), and the server's wall clock as learned on the control stream (token expiry).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Largest difference from the server's clock the agent accepts for token checks.
pub const MAX_SKEW_MS: i64 = 60_000;

/// Monotonic time with a test offset, plus the learned server-clock offset.
#[derive(Clone, Default)]
pub struct Clock {
    inner: Arc<Inner>,
}

#[derive(Default)]
struct Inner {
    advanced_ns: AtomicU64,
    server_offset_ms: AtomicI64,
    server_known: std::sync::atomic::AtomicBool,
}

impl Clock {
    /// Now, monotonic.
    pub fn now(&self) -> Instant {
        Instant::now() + Duration::from_nanos(self.inner.advanced_ns.load(Ordering::Relaxed))
    }

    /// Wall-clock seconds since the epoch, moved by the same test offset (persistent deadlines).
    pub fn unix_now(&self) -> u64 {
        crate::protocol::now_ms() / 1000
            + self.inner.advanced_ns.load(Ordering::Relaxed) / 1_000_000_000
    }

    /// Moves this clock forward (tests).
    pub fn advance(&self, by: Duration) {
        self.inner
            .advanced_ns
            .fetch_add(by.as_nanos() as u64, Ordering::Relaxed);
    }

    /// Records the server's time as just received.
    pub fn learn_server_time(&self, server_ms: u64) {
        let offset = server_ms as i64 - crate::protocol::now_ms() as i64;
        self.inner.server_offset_ms.store(offset, Ordering::Relaxed);
        self.inner.server_known.store(true, Ordering::Relaxed);
    }

    /// The server's clock now, if it has been learned and is within [`MAX_SKEW_MS`].
    pub fn server_now_ms(&self) -> Result<u64, String> {
        if !self.inner.server_known.load(Ordering::Relaxed) {
            return Err("the server's clock is not known yet".into());
        }
        let offset = self.inner.server_offset_ms.load(Ordering::Relaxed);
        if offset.abs() > MAX_SKEW_MS {
            return Err(format!(
                "this PBX's clock differs from the server's by {} s; set up NTP",
                offset / 1000
            ));
        }
        let advanced = self.inner.advanced_ns.load(Ordering::Relaxed) / 1_000_000;
        Ok((crate::protocol::now_ms() as i64 + offset) as u64 + advanced)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_time_needs_learning_and_bounded_skew() {
        let c = Clock::default();
        assert!(c.server_now_ms().is_err());
        c.learn_server_time(crate::protocol::now_ms() + 5_000);
        let s = c.server_now_ms().unwrap();
        assert!(s >= crate::protocol::now_ms() + 4_000);
        c.learn_server_time(crate::protocol::now_ms() + 120_000);
        assert!(c.server_now_ms().unwrap_err().contains("NTP"));
        let t0 = c.now();
        c.advance(Duration::from_secs(60));
        assert!(c.now() >= t0 + Duration::from_secs(60));
    }
}
