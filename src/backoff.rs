//! Capped exponential backoff with full jitter (AWS "Exponential Backoff and Jitter"): each
//! delay is uniform in [0, min(cap, base·2ⁿ)], so a fleet that lost its server together does not
//! come back together.

use std::time::Duration;

/// Backoff state for one reconnect loop.
#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
}

impl Backoff {
    /// Starts at `base`, never above `cap`.
    pub fn new(base: Duration, cap: Duration) -> Backoff {
        Backoff {
            base,
            cap,
            attempt: 0,
        }
    }

    /// The ceiling of the next delay (before jitter).
    pub fn ceiling(&self) -> Duration {
        let factor = 1u32.checked_shl(self.attempt.min(20)).unwrap_or(u32::MAX);
        self.base.saturating_mul(factor).min(self.cap)
    }

    /// The next delay: uniform in [0, ceiling], then the ceiling grows.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self.ceiling();
        self.attempt = self.attempt.saturating_add(1);
        let r = u64::from_le_bytes(crate::crypto::random_bytes::<8>());
        let nanos = ceiling.as_nanos() as u64;
        Duration::from_nanos(if nanos == 0 { 0 } else { r % (nanos + 1) })
    }

    /// Back to the first step, after a stable connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// How often a failure that keeps repeating unchanged is logged again.
pub const REPEAT_LOG_EVERY: Duration = Duration::from_secs(300);

/// Decides which failed attempts of a retry loop reach the log, so an outage of hours leaves a
/// handful of lines rather than one per backoff step: the first failure, every change of reason
/// or message, and while one failure repeats, a line every [`REPEAT_LOG_EVERY`] with the count.
#[derive(Debug, Default)]
pub struct RetryLog {
    /// The failure last logged, and when.
    last: Option<(String, std::time::Instant)>,
    /// Failures like it since it was logged.
    repeats: u32,
}

impl RetryLog {
    /// A failed attempt described by `what` at `now`: the line to log, if any.
    pub fn failed(&mut self, what: &str, now: std::time::Instant) -> Option<String> {
        match &self.last {
            Some((last, at)) if last == what => {
                self.repeats += 1;
                if now.duration_since(*at) < REPEAT_LOG_EVERY {
                    return None;
                }
                let line = format!(
                    "{what} (failed {} more times in the last {} s)",
                    self.repeats,
                    now.duration_since(*at).as_secs()
                );
                self.last = Some((what.to_string(), now));
                self.repeats = 0;
                Some(line)
            }
            _ => {
                self.last = Some((what.to_string(), now));
                self.repeats = 0;
                Some(what.to_string())
            }
        }
    }

    /// The loop succeeded: the next failure is news again. `None` if nothing had failed;
    /// otherwise how many failures went unlogged since the last line.
    pub fn succeeded(&mut self) -> Option<u32> {
        self.last.take()?;
        Some(std::mem::take(&mut self.repeats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_inside_the_ceiling() {
        let mut b = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
        let mut ceilings = vec![];
        for _ in 0..8 {
            let c = b.ceiling();
            let d = b.next_delay();
            assert!(d <= c);
            ceilings.push(c.as_millis());
        }
        assert_eq!(ceilings, [500, 1000, 2000, 4000, 8000, 10000, 10000, 10000]);
        b.reset();
        assert_eq!(b.ceiling(), Duration::from_millis(500));
    }

    #[test]
    fn jitter_spreads_delays() {
        let mut b = Backoff::new(Duration::from_secs(10), Duration::from_secs(10));
        let delays: std::collections::HashSet<_> = (0..20).map(|_| b.next_delay()).collect();
        assert!(delays.len() > 10);
    }

    #[test]
    fn a_repeating_failure_is_logged_first_then_every_five_minutes_with_its_count() {
        let t0 = std::time::Instant::now();
        let mut log = RetryLog::default();
        assert_eq!(log.failed("down", t0).as_deref(), Some("down"));
        for i in 1..=10 {
            assert_eq!(log.failed("down", t0 + Duration::from_secs(9 * i)), None);
        }
        let again = log
            .failed("down", t0 + REPEAT_LOG_EVERY + Duration::from_secs(1))
            .unwrap();
        assert_eq!(again, "down (failed 11 more times in the last 301 s)");
        assert_eq!(
            log.failed("down", t0 + REPEAT_LOG_EVERY + Duration::from_secs(5)),
            None
        );
    }

    #[test]
    fn a_new_failure_is_logged_at_once_and_success_makes_the_next_one_news() {
        let t0 = std::time::Instant::now();
        let mut log = RetryLog::default();
        assert!(log.failed("udp blocked", t0).is_some());
        assert_eq!(log.failed("udp blocked", t0), None);
        assert_eq!(
            log.failed("server down", t0).as_deref(),
            Some("server down")
        );
        assert_eq!(log.failed("server down", t0), None);
        assert_eq!(log.succeeded(), Some(1));
        assert_eq!(log.succeeded(), None);
        assert_eq!(
            log.failed("server down", t0).as_deref(),
            Some("server down")
        );
    }
}
