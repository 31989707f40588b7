//! The control stream once hello is done: heartbeats with telemetry and switches, settings and
//! provisioning from the CM, and the audit outbox delivered until acknowledged.

use crate::agent::metrics::LinkStats;
use crate::agent::proxy::ProxyCtx;
use crate::config::AgentConfig;
use crate::protocol::{self, read_frame, write_frame, Control};
use crate::status::StatusHandle;
use crate::tunnelio::{RecvHalf, SendHalf};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Runs the control stream until `stop` or the stream ends.
pub(super) async fn control_loop(
    ctx: Arc<ProxyCtx>,
    link: LinkStats,
    (mut send, mut recv): (SendHalf, RecvHalf),
    audit: bool,
    mut live: watch::Receiver<Arc<AgentConfig>>,
    status: StatusHandle,
    stop: CancellationToken,
) {
    // What a reload may change here is only the heartbeat; the rest stays as the run began.
    let config = live.borrow_and_update().clone();
    let gate = &ctx.gate;
    let provisioner = crate::agent::provision::Provisioner::new(&config);
    let mut sampler = crate::agent::telemetry::Sampler::new(&config);
    let heartbeats = |every: Duration| {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        tick
    };
    let mut heartbeat = config.tunnel.heartbeat;
    let mut tick = heartbeats(heartbeat);
    let outbox = gate.outbox();
    // Events queued while disconnected (or by an earlier run) go first, with their own times.
    if audit && deliver_audit(&mut send, outbox).await.is_err() {
        return;
    }
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = outbox.queued(), if audit => {
                if deliver_audit(&mut send, outbox).await.is_err() {
                    return;
                }
            }
            Ok(()) = live.changed() => {
                let every = live.borrow_and_update().tunnel.heartbeat;
                if every != heartbeat {
                    tracing::info!(heartbeat_secs = every.as_secs(), "heartbeat interval changed");
                    heartbeat = every;
                    tick = heartbeats(every);
                }
                // A reload may have turned a switch: the CM hears of it now, not a beat later.
                tick.reset_immediately();
            }
            _ = tick.tick() => {
                let ha_state = crate::agent::activation::ha_state(&config);
                let telemetry = sampler.sample(&ctx.portal(), ha_state).await;
                let hb = Control::Heartbeat {
                    ha_state,
                    telemetry: Some(telemetry),
                    switches: Some(gate.local_switches()),
                };
                if let Err(e) = write_frame(&mut send, &hb).await {
                    tracing::debug!(error = %e, "heartbeat not sent");
                    return;
                }
                // Unacknowledged events again (the server records each once).
                if audit && deliver_audit(&mut send, outbox).await.is_err() {
                    return;
                }
                for report in provisioner.poll() {
                    if write_frame(&mut send, &report).await.is_err() {
                        return;
                    }
                }
                let rtt = link.rtt().as_millis() as u64;
                status.update(|s| {
                    s.rtt_ms = Some(rtt);
                    s.ha_state = ha_state;
                });
            }
            frame = read_frame::<_, Control>(&mut recv) => match frame {
                Ok(Some(Control::Settings { settings: new })) => {
                    tracing::info!(allow_passwordless = new.allow_passwordless, "settings from the CM");
                    gate.set_cm_passwordless(new.allow_passwordless);
                }
                Ok(Some(Control::HeartbeatAck { server_time_ms })) => {
                    gate.clock().learn_server_time(server_time_ms);
                    let skew = server_time_ms as i64 - protocol::now_ms() as i64;
                    tracing::trace!(skew_ms = skew, "heartbeat acknowledged");
                }
                Ok(Some(Control::AuditAck { upto })) => {
                    outbox.ack(upto);
                    tracing::debug!(upto, left = outbox.len(), "audit events recorded by the server");
                    if !outbox.is_empty() && deliver_audit(&mut send, outbox).await.is_err() {
                        return;
                    }
                }
                Ok(Some(Control::Provision { task, template })) => {
                    let report = provisioner.receive(&task, &template);
                    if write_frame(&mut send, &report).await.is_err() {
                        return;
                    }
                }
                Ok(Some(other)) => tracing::debug!(frame = other.kind(), "unexpected control frame ignored"),
                Ok(None) | Err(_) => return,
            }
        }
    }
}

/// Sends the oldest unacknowledged audit events, if any.
async fn deliver_audit(
    send: &mut SendHalf,
    outbox: &crate::agent::outbox::Outbox,
) -> anyhow::Result<()> {
    let events = outbox.pending();
    if events.is_empty() {
        return Ok(());
    }
    write_frame(send, &Control::AuditEvents { events }).await
}
