//! The agent's clocks: a monotonic clock that tests can move forward (session timeouts,
//! lockouts), and the server's wall clock as learned on the control stream (token expiry).

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// 2026-01-01T00:00:00Z: no correct clock reads earlier than this release.
pub const MIN_PLAUSIBLE_UNIX: u64 = 1_767_225_600;

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
    wall_skew_s: AtomicI64,
    server_offset_ms: AtomicI64,
    server_known: std::sync::atomic::AtomicBool,
    /// Wakes [`Clock::sleep`]ers when a test moves the clock.
    moved: tokio::sync::Notify,
}

impl Clock {
    /// Now, monotonic.
    pub fn now(&self) -> Instant {
        Instant::now() + Duration::from_nanos(self.inner.advanced_ns.load(Ordering::Relaxed))
    }

    /// Wall-clock seconds since the epoch, moved by the same test offset (persistent deadlines).
    pub fn unix_now(&self) -> u64 {
        let t = crate::protocol::now_ms() / 1000
            + self.inner.advanced_ns.load(Ordering::Relaxed) / 1_000_000_000;
        t.saturating_add_signed(self.inner.wall_skew_s.load(Ordering::Relaxed))
    }

    /// Sets the wall clock wrong by `secs` (tests of a PBX without NTP).
    pub fn skew_wall_clock(&self, secs: i64) {
        self.inner.wall_skew_s.store(secs, Ordering::Relaxed);
    }

    /// `Err(message)` when the wall clock reads earlier than this agent could have been built:
    /// the PBX has no time yet (no NTP), and certificates and tokens cannot be judged.
    pub fn check_plausible(&self) -> Result<(), String> {
        let now = self.unix_now();
        if now < MIN_PLAUSIBLE_UNIX {
            return Err(format!(
                "the system clock reads {}, before this agent was released; set the time or enable NTP on the PBX",
                crate::status::rfc3339(std::time::UNIX_EPOCH + Duration::from_secs(now))
            ));
        }
        Ok(())
    }

    /// Moves this clock forward (tests).
    pub fn advance(&self, by: Duration) {
        self.inner
            .advanced_ns
            .fetch_add(by.as_nanos() as u64, Ordering::Relaxed);
        self.inner.moved.notify_waiters();
    }

    /// Waits `d` by this clock: in real time, or sooner when a test moves the clock past the
    /// deadline (retry backoffs, so a test can show what happens at the next attempt without
    /// waiting for it).
    pub async fn sleep(&self, d: Duration) {
        self.sleep_until(self.now() + d).await
    }

    /// Waits until this clock reads `deadline` (see [`Clock::sleep`]).
    pub async fn sleep_until(&self, deadline: Instant) {
        loop {
            let moved = self.inner.moved.notified();
            tokio::pin!(moved);
            // Registered before reading the clock, so an advance in between is not missed.
            moved.as_mut().enable();
            let left = deadline.saturating_duration_since(self.now());
            if left.is_zero() {
                return;
            }
            tokio::select! {
                _ = tokio::time::sleep(left) => {}
                _ = moved => {}
            }
        }
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

    #[tokio::test]
    async fn a_moved_clock_ends_a_sleep_at_once() {
        let c = Clock::default();
        let sleeper = tokio::spawn({
            let c = c.clone();
            async move { c.sleep(Duration::from_secs(3600)).await }
        });
        // Lets the sleeper start (current-thread runtime) and fix its deadline.
        tokio::task::yield_now().await;
        // Moving the clock short of the deadline does not end it.
        c.advance(Duration::from_secs(1800));
        tokio::task::yield_now().await;
        assert!(!sleeper.is_finished());
        c.advance(Duration::from_secs(1800));
        tokio::time::timeout(Duration::from_secs(5), sleeper)
            .await
            .expect("the sleep ends when the clock passes its deadline")
            .unwrap();
    }

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
