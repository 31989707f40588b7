//! The agent daemon: activation, then the tunnel with reconnects, with the status file telling
//! the PBX page what is happening. `run` is what `pbx-remote-agent run` and the tests call.

pub mod activation;
pub mod assertion;
pub mod audit;
pub mod clock;
pub mod gate;
pub mod lockout;
pub mod metrics;
pub mod portal;
pub mod provision;
pub mod proxy;
pub mod state;
pub mod telemetry;
pub mod tunnel;
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
                r = &mut run => break 'outer r,
                Some(()) = reloads.recv() => {
                    let outcome = reload(&config, &status, &live);
                    if let Reload::Live(Some(new)) | Reload::Restart(new) = &outcome {
                        endpoint = endpoint
                            .take()
                            .map(|e| e.reconfigure(new.metrics_listen, &metrics, &status));
                    }
                    match outcome {
                        Reload::Refused | Reload::Live(None) => {}
                        Reload::Live(Some(new)) => config = new,
                        Reload::Restart(new) => {
                            tracing::info!("server, activation or device settings changed; starting a new connection");
                            // Reloads until the new run is up go into its config, not the old run.
                            *live.lock().unwrap_or_else(|p| p.into_inner()) = None;
                            session.cancel();
                            if let Err(e) = (&mut run).await {
                                tracing::warn!(error = %format!("{e:#}"), "previous run ended with an error");
                            }
                            config = new;
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

/// What a reload can change in a running tunnel without a new connection.
struct Running {
    gate: Arc<gate::Gate>,
    proxy: Arc<proxy::ProxyCtx>,
    config: watch::Sender<Arc<AgentConfig>>,
}

/// The running tunnel, once it has one (none while activating or after a restart began).
type LiveRun = Arc<std::sync::Mutex<Option<Running>>>;

enum Reload {
    /// Invalid file: the old config stays, `config_error` says why.
    Refused,
    /// Applied to the running tunnel, same connection (the new config, if anything changed).
    Live(Option<Arc<AgentConfig>>),
    /// Needs a new run: server, activation, paths, HA, provisioning or the device facts the
    /// server checks at each connection changed, or there is no running tunnel to update.
    Restart(Arc<AgentConfig>),
}

/// Whether `new` differs from `old` only in what a running tunnel takes live: access rules,
/// logging, metrics, tunnel timings and the portal's address and trust.
fn keeps_connection(old: &AgentConfig, new: &AgentConfig) -> bool {
    let mut same = new.clone();
    same.remote_access = old.remote_access.clone();
    same.log_format = old.log_format;
    same.metrics_listen = old.metrics_listen;
    same.tunnel = old.tunnel.clone();
    same.pbx.portal_url = old.pbx.portal_url.clone();
    same.pbx.portal_ca_file = old.pbx.portal_ca_file.clone();
    same.pbx.portal_source_addr = old.pbx.portal_source_addr;
    same.pbx.super_admin = old.pbx.super_admin.clone();
    same.pbx.extension_emails_file = old.pbx.extension_emails_file.clone();
    same == *old
}

/// Whether the portal upstream must be rebuilt for `new`.
fn portal_changed(old: &AgentConfig, new: &AgentConfig) -> bool {
    old.pbx.portal_url != new.pbx.portal_url
        || old.pbx.portal_ca_file != new.pbx.portal_ca_file
        || old.pbx.portal_source_addr != new.pbx.portal_source_addr
        || old.tunnel.portal_timeout != new.tunnel.portal_timeout
}

fn reload(current: &Arc<AgentConfig>, status: &StatusHandle, live: &LiveRun) -> Reload {
    let refuse = |message: String| {
        tracing::warn!(error = %message, "reloaded config refused; the previous one stays in force");
        status.update(|s| s.config_error = Some(message));
        Reload::Refused
    };
    let new = match AgentConfig::load(&current.source) {
        Ok(c) => c,
        Err(e) => return refuse(e.0),
    };
    if new == **current {
        status.update(|s| s.config_error = None);
        tracing::info!("config reloaded; nothing changed");
        return Reload::Live(None);
    }
    let running = live.lock().unwrap_or_else(|p| p.into_inner());
    let Some(run) = running.as_ref().filter(|_| keeps_connection(current, &new)) else {
        status.update(|s| s.config_error = None);
        return Reload::Restart(Arc::new(new));
    };
    // Build the new portal before changing anything, so a bad one refuses the whole reload.
    if portal_changed(current, &new) {
        match portal::Portal::new(&new, new.paths.state_dir.clone()) {
            Ok(p) => run.proxy.set_portal(p),
            Err(e) => {
                return refuse(format!(
                    "{}: pbx.portal_url: {e:#}",
                    current.source.display()
                ))
            }
        }
    }
    status.update(|s| s.config_error = None);
    if new.log_format != current.log_format {
        // The subscriber is installed once per process.
        tracing::warn!("log.format changes take effect when the agent next starts");
    }
    run.gate.apply_rules(gate::Rules::from_config(&new));
    let new = Arc::new(new);
    run.config.send_replace(new.clone());
    tracing::info!("config reloaded; applied to the running tunnel");
    Reload::Live(Some(new))
}

async fn run_inner(
    config: Arc<AgentConfig>,
    status: &StatusHandle,
    shutdown: &CancellationToken,
    clock: clock::Clock,
    live: LiveRun,
    metrics: Arc<metrics::Metrics>,
) -> Result<()> {
    if !config.server.enabled {
        status.set(
            State::Disabled,
            None,
            Some("Remote Management is off (server.enabled = false)".into()),
        );
        tracing::info!("remote management disabled; waiting for stop");
        shutdown.cancelled().await;
        return Ok(());
    }
    let state_dir = StateDir::open(&config.paths.state_dir)?;
    let trust = activation::server_trust(&config);
    let mut backoff = Backoff::new(BACKOFF_BASE, BACKOFF_CAP);
    // Failed attempts reach the log when they are news, not at every backoff step.
    let mut retry_log = RetryLog::default();

    let fingerprint = state::activation_fingerprint(&config);
    if let Some(device) = state_dir.removed(&fingerprint)? {
        let message = format!(
            "the CM removed device {device}; to enrol again, enter a new authentication code (or change the activation settings)"
        );
        tracing::error!(%message, "device removed earlier; not activating");
        status.set(State::Failed, Some(Reason::DeviceRemoved), Some(message));
        shutdown.cancelled().await;
        return Ok(());
    }
    let (credential, key) = loop {
        if let Err(message) = clock.check_plausible() {
            tracing::warn!(%message, "clock not set; waiting");
            if !sleep_retry(
                status,
                &mut backoff,
                State::Reconnecting,
                Reason::ClockUnsynced,
                message,
                shutdown,
            )
            .await
            {
                return Ok(());
            }
            continue;
        }
        if let Some(found) = state_dir.load(&fingerprint)? {
            tracing::info!(device = %found.0.device_id, "using the stored device credential");
            break found;
        }
        status.set(State::Activating, None, None);
        match activation::activate(&config, &state_dir).await {
            Ok(found) => {
                tracing::info!(device = %found.0.device_id, "activated");
                backoff.reset();
                retry_log.succeeded();
                break found;
            }
            Err(ActivationError::Rejected { reason, message }) => {
                tracing::error!(%reason, %message, "activation refused; waiting for a config change");
                status.set(State::Failed, Some(reason), Some(message));
                shutdown.cancelled().await;
                return Ok(());
            }
            Err(ActivationError::Retry { reason, message }) => {
                if let Some(line) =
                    retry_log.failed(&format!("{reason}: {message}"), std::time::Instant::now())
                {
                    tracing::warn!(message = %line, "activation failed; will retry");
                }
                if !sleep_retry(
                    status,
                    &mut backoff,
                    State::Reconnecting,
                    reason,
                    message,
                    shutdown,
                )
                .await
                {
                    return Ok(());
                }
            }
        }
    };
    status.update(|s| s.device_id = Some(credential.device_id.clone()));

    let facts = activation::device_facts(&config)?;
    let portal = portal::Portal::new(&config, config.paths.state_dir.clone())?;
    let gate = Arc::new(gate::Gate::new(
        &config,
        &credential.device_id,
        &credential.signing_key,
        clock,
        status.clone(),
        metrics.clone(),
    )?);
    let proxy = Arc::new(proxy::ProxyCtx::new(portal, gate.clone(), metrics));
    let (config_tx, config_rx) = watch::channel(config.clone());
    *live.lock().unwrap_or_else(|p| p.into_inner()) = Some(Running {
        gate: gate.clone(),
        proxy: proxy.clone(),
        config: config_tx,
    });
    let reserved_config = config_rx.clone();
    let tunnel = tunnel::Tunnel::new(
        config_rx,
        credential,
        &key,
        &trust,
        facts,
        proxy,
        status.clone(),
    )?;
    let tasks = tokio_util::task::TaskTracker::new();
    tasks.spawn(sweep_sessions(
        gate.clone(),
        reserved_config,
        status.clone(),
        shutdown.clone(),
    ));
    tasks.close();
    status.set(State::Connecting, None, None);
    loop {
        match tunnel.connect_and_serve(shutdown).await {
            tunnel::End::Shutdown => return Ok(()),
            tunnel::End::Lost {
                reason,
                message,
                established,
                uptime,
            } => {
                if reason == Reason::DeviceRemoved {
                    tracing::error!(%message, "device removed from the CM; stopping until reconfigured");
                    // The credential is worthless now; the marker keeps a restart from retrying
                    // the spent code.
                    if let Err(e) = state_dir.forget().and_then(|()| {
                        state_dir.mark_removed(&fingerprint, &tunnel.credential.device_id)
                    }) {
                        tracing::warn!(error = %format!("{e:#}"), "cannot clear the credential");
                    }
                    status.set(State::Failed, Some(reason), Some(message));
                    shutdown.cancelled().await;
                    return Ok(());
                }
                if established {
                    // Its loss is logged as "tunnel lost"; later failures are news again.
                    retry_log.succeeded();
                } else if let Some(line) =
                    retry_log.failed(&format!("{reason}: {message}"), std::time::Instant::now())
                {
                    tracing::warn!(message = %line, "tunnel not connected; will retry");
                }
                // A replaced connection keeps its backoff so two clones cannot flap faster.
                if established && uptime >= STABLE_AFTER && reason != Reason::Replaced {
                    backoff.reset();
                }
                if !sleep_retry(
                    status,
                    &mut backoff,
                    State::Reconnecting,
                    reason,
                    message,
                    shutdown,
                )
                .await
                {
                    return Ok(());
                }
            }
        }
    }
}

/// How often idle and over-age sessions are ended (WebSockets close within this).
pub const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// Ends idle and over-age sessions every [`SWEEP_EVERY`], and runs the extension-email check
/// ([`ReservedNames`]) every [`RESERVED_POLL`].
async fn sweep_sessions(
    gate: Arc<gate::Gate>,
    config: watch::Receiver<Arc<AgentConfig>>,
    status: StatusHandle,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    let every = (RESERVED_POLL.as_millis() / SWEEP_EVERY.as_millis()).max(1);
    let mut reserved = ReservedNames::default();
    for n in 0u128.. {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => gate.sweep(),
        }
        if n % every == 0 {
            let current = config.borrow().clone();
            reserved.check(&gate, &current, &status);
        }
    }
}

/// How often the agent reads `pbx.extension_emails_file` again for the remote account's name.
pub const RESERVED_POLL: Duration = Duration::from_secs(2);

/// Suspends Account Login while an extension's email equals the remote account's username, and
/// lifts the suspension when the clash goes. The config check refuses such a config, but the
/// PBX rewrites the list whenever extensions change, long after the check. `config_error` says
/// why while it lasts. A list that cannot be read (being replaced, say) keeps the last verdict.
#[derive(Default)]
struct ReservedNames {
    /// The clash last found (and shown in `config_error`).
    shown: Option<String>,
    /// Whether the last read failed (so the failure is logged once).
    unreadable: bool,
}

impl ReservedNames {
    fn check(&mut self, gate: &gate::Gate, c: &AgentConfig, status: &StatusHandle) {
        let clash = match (&c.remote_access.account, &c.pbx.extension_emails_file) {
            (Some(account), Some(file)) => {
                match crate::config::is_extension_email(file, &account.username) {
                    Ok(taken) => taken.then(|| {
                        format!(
                            "{}: remote_access.account.username: {:?} is now an extension's \
                             email (listed in {}); Account Login is suspended until one of \
                             them is renamed",
                            c.source.display(),
                            account.username,
                            file.display()
                        )
                    }),
                    Err(e) => {
                        if !std::mem::replace(&mut self.unreadable, true) {
                            tracing::warn!(file = %file.display(), error = %e, "cannot read pbx.extension_emails_file; keeping the last check");
                        }
                        return;
                    }
                }
            }
            _ => None,
        };
        self.unreadable = false;
        if clash.is_none() && self.shown.is_none() {
            // Nothing suspended and nothing to suspend: no status to look at.
            return;
        }
        if clash != self.shown {
            gate.suspend_account(clash.clone());
        }
        // Shown while it lasts (a reload that clears `config_error` does not hide it), without
        // hiding a refused reload's message.
        let current = status.get().config_error;
        match &clash {
            Some(m) if current.is_none() || (current == self.shown && current != clash) => {
                status.update(|s| s.config_error = Some(m.clone()))
            }
            None if self.shown.is_some() && current == self.shown => {
                status.update(|s| s.config_error = None)
            }
            _ => {}
        }
        self.shown = clash;
    }
}

/// Reports `state`/`reason`, sleeps one backoff step; false if shutdown came first.
async fn sleep_retry(
    status: &StatusHandle,
    backoff: &mut Backoff,
    state: State,
    reason: Reason,
    message: String,
    shutdown: &CancellationToken,
) -> bool {
    let delay = backoff.next_delay();
    let at = rfc3339(SystemTime::now() + delay);
    status.update(|s| {
        s.state = state;
        s.reason = Some(reason);
        s.message = Some(message);
        s.next_retry_at = Some(at);
        s.since = None;
        s.rtt_ms = None;
    });
    tokio::select! {
        _ = shutdown.cancelled() => false,
        _ = tokio::time::sleep(delay) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(edit: impl FnOnce(&str) -> String) -> AgentConfig {
        let text = include_str!("../../config/agent.toml");
        AgentConfig::parse(std::path::Path::new("/etc/agent.toml"), &edit(text)).unwrap()
    }

    #[test]
    fn reloads_keep_the_connection_only_for_what_a_running_tunnel_takes_live() {
        let base = config(|t| t.to_string());
        let keeps = [
            ("auto_logout_minutes = 15", "auto_logout_minutes = 30"),
            ("heartbeat_secs = 30", "heartbeat_secs = 60"),
            ("drain_secs = 10", "drain_secs = 20"),
            ("portal_timeout_secs = 30", "portal_timeout_secs = 5"),
            ("https://127.0.0.1:8088", "https://127.0.0.1:8089"),
            ("super_admin = \"admin\"", "super_admin = \"root\""),
            ("format = \"text\"", "format = \"json\""),
        ];
        for (from, to) in keeps {
            let new = config(|t| t.replacen(from, to, 1));
            assert_ne!(new, base, "{from} → {to} changed nothing");
            assert!(keeps_connection(&base, &new), "{from} → {to}");
        }
        assert!(portal_changed(
            &base,
            &config(|t| t.replacen("portal_timeout_secs = 30", "portal_timeout_secs = 5", 1))
        ));
        assert!(!portal_changed(
            &base,
            &config(|t| t.replacen("drain_secs = 10", "drain_secs = 20", 1))
        ));
        let restarts = [
            (
                "address = \"cm.example.com:8443\"",
                "address = \"cm.example.net:8443\"",
            ),
            (
                "auth_code = \"XXXX-XXXX-XXXX-XXXX\"",
                "auth_code = \"YYYY-YYYY-YYYY-YYYY\"",
            ),
            ("firmware = \"83.19.0.110\"", "firmware = \"83.19.0.120\""),
            ("serial = \"3631A1234567\"", "serial = \"3631A7654321\""),
            ("mac_interface = \"eth0\"", "mac_interface = \"eth1\""),
            (
                "/var/lib/pbx-remote-agent\"",
                "/var/lib/pbx-remote-agent2\"",
            ),
        ];
        for (from, to) in restarts {
            let new = config(|t| t.replacen(from, to, 1));
            assert_ne!(new, base, "{from} → {to} changed nothing");
            assert!(!keeps_connection(&base, &new), "{from} → {to}");
        }
    }
}
