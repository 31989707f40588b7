//! The agent daemon: activation, then the tunnel with reconnects, with the status file telling
//! the PBX page what is happening. `run` is what `pbx-remote-agent run` and the tests call.

pub(crate) mod activation;
/// Public for portals that verify the identity assertion, and for the tests that do.
pub mod assertion;
pub(crate) mod audit;
pub(crate) mod broker;
/// Public so the binary and tests can hand the agent a clock (tests move it).
pub mod clock;
pub(crate) mod dial;
pub(crate) mod gate;
pub(crate) mod lockout;
pub(crate) mod metrics;
pub(crate) mod outbox;
pub(crate) mod portal;
pub(crate) mod provision;
/// Public for the header-rewriting fuzz target (`fuzz/fuzz_targets/sanitize.rs`).
pub mod proxy;
pub(crate) mod state;
pub(crate) mod telemetry;
pub(crate) mod tunnel;
/// `pbx-remote-agent deactivate` (public for the binary and its tests).
pub mod uninstall;
/// Public for the WebSocket-frame fuzz target (`fuzz/fuzz_targets/wsframe.rs`).
pub mod wsframe;

use crate::backoff::{Backoff, RetryLog};
use crate::config::AgentConfig;
use crate::protocol::Reason;
use crate::status::{rfc3339, State, Status, StatusHandle};
use activation::ActivationError;
use anyhow::Result;
use state::StateDir;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

mod reload;
mod reserved;
mod supervise;
#[cfg(test)]
mod tests;

use reload::*;
pub use reserved::RESERVED_POLL;
use reserved::*;
pub use supervise::SWEEP_EVERY;
use supervise::*;

/// The HTTP CONNECT proxy answer reader (public for the fuzz target).
pub use dial::read_proxy_answer;

/// A test hook for the crash tests (catalogue A4, A5): at the named step the process aborts, as
/// under `kill -9`, when `PBXRA_CRASH_AT` names it, or panics when `PBXRA_PANIC_AT` does (its
/// panic output is checked for secrets). Steps: `activation_key_saved`, `activation_accepted`,
/// `credential_half_written`.
pub(crate) fn crash_point(step: &str) {
    if std::env::var_os("PBXRA_CRASH_AT").is_some_and(|v| v == step) {
        std::process::abort();
    }
    if std::env::var_os("PBXRA_PANIC_AT").is_some_and(|v| v == step) {
        panic!("test panic at {step} (PBXRA_PANIC_AT)");
    }
}

/// A test hook for the watchdog test (catalogue B9): `PBXRA_FREEZE_AFTER_SECS=N` wedges the
/// runtime N seconds after start (every worker thread blocked, as a deadlock would), so the
/// watchdog stops being fed and systemd restarts the service.
fn freeze_hook() {
    let Some(secs) = std::env::var("PBXRA_FREEZE_AFTER_SECS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return;
    };
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    tracing::warn!(
        secs,
        "PBXRA_FREEZE_AFTER_SECS: the runtime will be wedged on purpose"
    );
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(secs)).await;
        for _ in 1..workers {
            tokio::spawn(async {
                loop {
                    std::thread::sleep(Duration::from_secs(3600));
                }
            });
        }
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    });
}

/// When QUIC is re-probed after it lost to TCP, and the longest wait between probes (public
/// for tests, which move the agent's clock past them).
pub use tunnel::race::{FIRST_PROBE, MAX_PROBE};

/// First reconnect delay ceiling.
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Largest reconnect delay. With full jitter and the 5 s connect timeout, a path that returns
/// mid-attempt is retried within ~9 s at worst, inside the 10 s reconnect promise; a fleet still
/// spreads its reconnects over the whole window.
pub const BACKOFF_CAP: Duration = Duration::from_secs(4);
/// A connection up this long resets the backoff.
pub const STABLE_AFTER: Duration = Duration::from_secs(10);

/// The status a freshly started agent reports for `config`.
pub fn initial_status(config: &AgentConfig) -> Status {
    Status {
        state: if config.server.enabled {
            State::NotActivated
        } else {
            State::Disabled
        },
        server: Some(config.server.address.authority()),
        ha_role: config.ha.as_ref().map(|h| h.role.as_str().to_string()),
        ..Status::default()
    }
}

/// Runs the agent until `shutdown`; writes `stopped` on the way out.
pub async fn run(
    config: AgentConfig,
    status: StatusHandle,
    shutdown: CancellationToken,
) -> Result<()> {
    let (_no_reloads, reloads) = tokio::sync::mpsc::unbounded_channel();
    run_with(config, status, shutdown, clock::Clock::default(), reloads).await
}

/// [`run`] with reloads (one message per SIGHUP) and a clock the caller can move (tests of
/// idle logout, lockouts, token expiry).
pub async fn run_with(
    config: AgentConfig,
    status: StatusHandle,
    shutdown: CancellationToken,
    clock: clock::Clock,
    mut reloads: tokio::sync::mpsc::UnboundedReceiver<()>,
) -> Result<()> {
    freeze_hook();
    tracing::debug!(
        enabled = config.server.enabled,
        server = %config.server.address,
        portal = %config.pbx.portal_url,
        "config loaded"
    );
    let mut config = Arc::new(config);
    let live: LiveRun = Arc::new(std::sync::Mutex::new(None));
    let metrics = Arc::new(metrics::Metrics::default());
    let mut endpoint = Some(metrics::Endpoint::start(
        config.metrics_listen,
        &metrics,
        &status,
    ));
    let result = 'outer: loop {
        let session = shutdown.child_token();
        let run = run_inner(
            config.clone(),
            &status,
            &session,
            clock.clone(),
            live.clone(),
            metrics.clone(),
        );
        tokio::pin!(run);
        loop {
            tokio::select! {
                // The run is polled before a reload is handled, so whatever the run had due
                // (a retry whose backoff ended) has started by the time the reload is
                // acknowledged in `config_generation`.
                biased;
                r = &mut run => break 'outer r,
                Some(()) = reloads.recv() => {
                    let outcome = reload(&config, &status, &live);
                    if let Reload::Live(Some(new)) | Reload::Restart(new) = &outcome {
                        endpoint = endpoint
                            .take()
                            .map(|e| e.reconfigure(new.metrics_listen, &metrics, &status));
                    }
                    // Acknowledges the reload once its effects are in place (for a restart,
                    // when the previous run has ended and the new config is the one in force).
                    let handled = || status.update(|s| s.config_generation += 1);
                    match outcome {
                        Reload::Refused | Reload::Live(None) => handled(),
                        Reload::Live(Some(new)) => {
                            config = new;
                            handled();
                        }
                        Reload::Restart(new) => {
                            tracing::info!("server, activation or device settings changed; starting a new connection");
                            // Reloads until the new run is up go into its config, not the old run.
                            *live.lock().unwrap_or_else(|p| p.into_inner()) = None;
                            session.cancel();
                            if let Err(e) = (&mut run).await {
                                tracing::warn!(error = %format!("{e:#}"), "previous run ended with an error");
                            }
                            config = new;
                            handled();
                            continue 'outer;
                        }
                    }
                }
            }
        }
    };
    let message = match &result {
        Ok(()) => "the agent stopped".to_string(),
        Err(e) => format!("the agent stopped on an error: {e:#}"),
    };
    status.update(|s| {
        s.state = State::Stopped;
        s.reason = None;
        s.message = Some(message);
        s.since = None;
        s.next_retry_at = None;
        s.rtt_ms = None;
        s.active_sessions.clear();
    });
    result
}
