//! One run of the agent: activation with retries, then the tunnel with reconnects under a capped,
//! jittered backoff, and the session sweep beside it.

use super::*;

pub(super) async fn run_inner(
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
    let mut retry = Retry::new(clock.clone());

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
            if !retry
                .wait(status, Reason::ClockUnsynced, message, shutdown)
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
        metrics.activation_attempt();
        match activation::activate(&config, &state_dir).await {
            Ok(found) => {
                tracing::info!(device = %found.0.device_id, "activated");
                retry.backoff.reset();
                retry.log.succeeded();
                break found;
            }
            Err(ActivationError::Rejected { reason, message }) => {
                tracing::error!(%reason, %message, "activation refused; waiting for a config change");
                // Refused for good: its key will never be sent again.
                if let Err(e) = state_dir.clear_pending() {
                    tracing::warn!(error = %format!("{e:#}"), "cannot drop the pending activation");
                }
                status.set(State::Failed, Some(reason), Some(message));
                shutdown.cancelled().await;
                return Ok(());
            }
            Err(ActivationError::Retry { reason, message }) => {
                retry.log_failure("activation failed; will retry", reason, &message);
                if !retry.wait(status, reason, message, shutdown).await {
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
    proxy.set_broker(config.portal_login.clone());
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
    // The run's sessions die with its gate; ending them says so in the audit log and lets the
    // portal login broker log their portal sessions out.
    let _sessions = EndSessions(gate.clone());
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
                    retry.log.succeeded();
                } else {
                    retry.log_failure("tunnel not connected; will retry", reason, &message);
                }
                // A replaced connection keeps its backoff so two clones cannot flap faster.
                if established && uptime >= STABLE_AFTER && reason != Reason::Replaced {
                    retry.backoff.reset();
                }
                if !retry.wait(status, reason, message, shutdown).await {
                    return Ok(());
                }
            }
        }
    }
}

/// Ends the run's live sessions when the run ends, however it ends.
struct EndSessions(Arc<gate::Gate>);

impl Drop for EndSessions {
    fn drop(&mut self) {
        self.0
            .end_all("the agent stopped, or restarted with new settings");
    }
}

/// How often idle and over-age sessions are ended (WebSockets close within this).
pub const SWEEP_EVERY: Duration = Duration::from_millis(250);

/// Ends idle and over-age sessions every [`SWEEP_EVERY`], and runs the extension-email check
/// ([`ReservedNames`]) every [`RESERVED_POLL`].
pub(super) async fn sweep_sessions(
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

/// What every failed attempt of a run (clock, activation, tunnel) goes through: one backoff, and
/// a log that hears of failures when they are news, not at every backoff step.
pub(super) struct Retry {
    pub(super) backoff: Backoff,
    log: RetryLog,
    /// Backoff steps are slept on the agent's clock, which tests move.
    clock: clock::Clock,
}

impl Retry {
    pub(super) fn new(clock: clock::Clock) -> Retry {
        Retry {
            backoff: Backoff::new(BACKOFF_BASE, BACKOFF_CAP),
            log: RetryLog::default(),
            clock,
        }
    }

    /// Logs a failed attempt as `what` when it is news.
    fn log_failure(&mut self, what: &'static str, reason: Reason, message: &str) {
        if let Some(line) = self
            .log
            .failed(&format!("{reason}: {message}"), std::time::Instant::now())
        {
            tracing::warn!(message = %line, "{what}");
        }
    }

    /// Reports `reconnecting` with `reason`, sleeps one backoff step; false if shutdown came
    /// first.
    async fn wait(
        &mut self,
        status: &StatusHandle,
        reason: Reason,
        message: String,
        shutdown: &CancellationToken,
    ) -> bool {
        let delay = if reason == Reason::Replaced {
            // Another machine holds this credential: take the node back no sooner than the
            // whole backoff step (no jitter toward zero), so two clones trade it at most once
            // per step each, at most every 4 s, never in a tight loop.
            let whole = self.backoff.ceiling();
            self.backoff.next_delay();
            whole
        } else {
            self.backoff.next_delay()
        };
        // Fixed before the status says when: a clock moved after that counts.
        let until = self.clock.now() + delay;
        let at = rfc3339(SystemTime::now() + delay);
        status.update(|s| {
            s.state = State::Reconnecting;
            s.reason = Some(reason);
            s.message = Some(message);
            s.next_retry_at = Some(at);
            s.since = None;
            s.rtt_ms = None;
        });
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = self.clock.sleep_until(until) => true,
        }
    }
}
