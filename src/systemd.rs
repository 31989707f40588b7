//! systemd integration, all in one place: READY once the config is loaded, STATUS mirroring
//! the agent's state, STOPPING on the way out, and WATCHDOG pings fed by the runtime's own
//! health (a task round trip through the scheduler), never by connectivity.

use crate::status::StatusHandle;
use sd_notify::NotifyState;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// Tells systemd the service is up (after the config loaded).
pub fn ready() {
    let _ = sd_notify::notify(false, &[NotifyState::Ready]);
}

/// Mirrors status into `STATUS=` and feeds the watchdog (if `WatchdogSec=` is set) until
/// `shutdown`, then says `STOPPING=1` (at the start of the drain, as systemd expects).
pub fn spawn(status: StatusHandle, shutdown: CancellationToken) {
    let mut rx = status.subscribe();
    let stop = shutdown.clone();
    tokio::spawn(async move {
        loop {
            let line = {
                let s = rx.borrow_and_update();
                match (&s.reason, &s.config_error) {
                    (Some(r), _) => format!("{} ({r})", s.state.as_str()),
                    (None, Some(_)) => format!("{} (reloaded config refused)", s.state.as_str()),
                    (None, None) => s.state.as_str().to_string(),
                }
            };
            let _ = sd_notify::notify(false, &[NotifyState::Status(&line)]);
            tokio::select! {
                _ = stop.cancelled() => {
                    let _ = sd_notify::notify(false, &[NotifyState::Stopping]);
                    return;
                }
                r = rx.changed() => if r.is_err() { return },
            }
        }
    });
    let mut usec = 0u64;
    if !sd_notify::watchdog_enabled(false, &mut usec) || usec == 0 {
        return;
    }
    let every = Duration::from_micros(usec) / 2;
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(every);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // A wedged runtime cannot run this probe; then systemd restarts us.
            let probe = tokio::time::timeout(every, tokio::spawn(async {})).await;
            if matches!(probe, Ok(Ok(()))) {
                let _ = sd_notify::notify(false, &[NotifyState::Watchdog]);
            } else {
                tracing::error!("runtime health probe failed; not feeding the watchdog");
            }
        }
    });
}
