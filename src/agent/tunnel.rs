//! The QUIC tunnel: connect with the device key, say hello on the control stream, keep the
//! heartbeat, serve request streams opened by the server, and say why the connection ended.

use crate::agent::proxy::{self, ProxyCtx};
use crate::agent::state::Credential;
use crate::config::AgentConfig;
use crate::protocol::{
    self, read_frame, write_frame, Control, DeviceFacts, Reason, ALPN, CLOSE_NORMAL,
    CONNECT_TIMEOUT, IDLE_TIMEOUT, MAX_STREAMS, PROTOCOL_VERSION,
};
use crate::status::{rfc3339, State, StatusHandle};
use crate::tls::{self, KeyIdentity, ServerTrust};
use anyhow::{Context, Result};
use quinn::{ConnectionError, TransportErrorCode};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

/// TLS alert "no_application_protocol" (RFC 7301): the server speaks another protocol version.
const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;

/// How one connection ended.
#[derive(Debug)]
pub enum End {
    /// We were asked to stop.
    Shutdown,
    /// Lost or refused; retry after a backoff.
    Lost {
        /// Status reason.
        reason: Reason,
        /// Details.
        message: String,
        /// True if the connection had been established (welcome received).
        established: bool,
        /// How long it was up.
        uptime: Duration,
    },
}

/// What the tunnel shares with the rest of the agent.
pub struct Tunnel {
    /// The config in force. Reloads replace it only with changes a connection takes live
    /// (heartbeat, drain); server, activation and device facts stay as the run began.
    live: watch::Receiver<Arc<AgentConfig>>,
    /// The credential from activation.
    pub credential: Credential,
    /// Client config for QUIC (device key, server trust, ALPN).
    client: quinn::ClientConfig,
    /// Facts sent in hello.
    facts: DeviceFacts,
    /// Stream handler context.
    pub proxy: Arc<ProxyCtx>,
    /// Status.
    pub status: StatusHandle,
}

impl Tunnel {
    /// Prepares the QUIC client config from the device key; `live` holds the run's config.
    pub fn new(
        live: watch::Receiver<Arc<AgentConfig>>,
        credential: Credential,
        key: &KeyIdentity,
        trust: &ServerTrust,
        facts: DeviceFacts,
        proxy: Arc<ProxyCtx>,
        status: StatusHandle,
    ) -> Result<Tunnel> {
        let tls = tls::client_config(trust, &[ALPN], Some(key))?;
        let quic =
            quinn::crypto::rustls::QuicClientConfig::try_from(tls).context("QUIC TLS config")?;
        let mut client = quinn::ClientConfig::new(Arc::new(quic));
        // The server may open MAX_STREAMS request streams.
        client.transport_config(Arc::new(crate::quic::transport_config(MAX_STREAMS)));
        Ok(Tunnel {
            live,
            credential,
            client,
            facts,
            proxy,
            status,
        })
    }

    /// The config in force.
    pub fn config(&self) -> Arc<AgentConfig> {
        self.live.borrow().clone()
    }

    /// One connection: connect, serve until it ends or `shutdown`, report how it ended. Its
    /// log lines (and those of its control loop and streams) carry a `tunnel` span.
    pub async fn connect_and_serve(&self, shutdown: &CancellationToken) -> End {
        let span = tracing::info_span!(
            "tunnel",
            device = %self.credential.device_id,
            server = %self.config().server.address,
        );
        self.connection(shutdown).instrument(span).await
    }

    async fn connection(&self, shutdown: &CancellationToken) -> End {
        let started = tokio::time::Instant::now();
        let lost = |reason, message: String, established| End::Lost {
            reason,
            message,
            established,
            uptime: started.elapsed(),
        };
        // What the attempt got to, for the message if it times out.
        let progress = std::sync::Mutex::new(Progress::default());
        let attempt = tokio::select! {
            _ = shutdown.cancelled() => return End::Shutdown,
            r = tokio::time::timeout(CONNECT_TIMEOUT, self.connect(&progress)) => r,
        };
        let Established {
            endpoint,
            conn,
            send,
            recv,
            audit,
        } = match attempt {
            Err(_) => {
                let progress = progress.lock().map(|p| p.clone()).unwrap_or_default();
                let server = self.config().server.address.to_string();
                let message = tokio::select! {
                    _ = shutdown.cancelled() => return End::Shutdown,
                    m = silence_message(&server, progress) => m,
                };
                return lost(Reason::ServerUnreachable, message, false);
            }
            Ok(Err(ConnectFailure { reason, message })) => return lost(reason, message, false),
            Ok(Ok(parts)) => parts,
        };
        // Metrics first, so a scrape that sees `connected` also sees this connection.
        self.proxy.metrics.connected(&conn);
        let now = rfc3339(SystemTime::now());
        self.status.update(|s| {
            s.state = State::Connected;
            s.reason = None;
            s.message = None;
            s.next_retry_at = None;
            s.since = Some(now.clone());
            s.last_connected = Some(now.clone());
            s.device_id = Some(self.credential.device_id.clone());
            s.ha_state = crate::agent::activation::ha_state(&self.config());
            s.rtt_ms = Some(conn.rtt().as_millis() as u64);
        });
        tracing::info!(device = %self.credential.device_id, server = %self.config().server.address, "tunnel connected");

        let streams = TaskTracker::new();
        let control_stop = CancellationToken::new();
        let control = tokio::spawn(
            control_loop(
                self.proxy.clone(),
                conn.clone(),
                (send, recv),
                audit,
                self.live.clone(),
                self.status.clone(),
                control_stop.clone(),
            )
            .in_current_span(),
        );
        let end = loop {
            tokio::select! {
                _ = shutdown.cancelled() => break None,
                accepted = conn.accept_bi() => match accepted {
                    Ok((send, recv)) => {
                        let ctx = self.proxy.clone();
                        ctx.metrics.stream_opened();
                        let span = tracing::info_span!(
                            "stream",
                            id = %send.id(),
                            visitor = tracing::field::Empty,
                        );
                        streams.spawn(
                            proxy::serve_stream(ctx, send, recv, shutdown.clone()).instrument(span),
                        );
                    }
                    Err(e) => break Some(e),
                }
            }
        };
        control_stop.cancel();
        let _ = control.await;
        streams.close();
        // Drops the connection from the metrics at whatever point we leave (bytes of a
        // draining connection are counted up to here).
        let _metrics_link = DisconnectOnDrop(&self.proxy.metrics);
        match end {
            None => {
                // Drain in-flight requests, then close on purpose so the server sees it at once.
                let drain = self.live.borrow().tunnel.drain;
                if tokio::time::timeout(drain, streams.wait()).await.is_err() {
                    tracing::warn!(
                        in_flight = streams.len(),
                        "drain deadline reached; closing with requests in flight"
                    );
                }
                conn.close(CLOSE_NORMAL.into(), b"agent stopping");
                let _ = tokio::time::timeout(Duration::from_secs(1), endpoint.wait_idle()).await;
                End::Shutdown
            }
            Some(e) => {
                let (reason, message) = classify(&e);
                tracing::warn!(%reason, %message, "tunnel lost");
                lost(reason, message, true)
            }
        }
    }

    async fn connect(
        &self,
        progress: &std::sync::Mutex<Progress>,
    ) -> Result<Established, ConnectFailure> {
        let config = self.config();
        let server = &config.server.address;
        let unreachable = |m: String| ConnectFailure {
            reason: Reason::ServerUnreachable,
            message: m,
        };
        let addr: SocketAddr = tokio::net::lookup_host((server.host.as_str(), server.port))
            .await
            .map_err(|e| unreachable(format!("cannot resolve {}: {e}", server.host)))?
            .next()
            .ok_or_else(|| unreachable(format!("{} resolved to no address", server.host)))?;
        if let Ok(mut p) = progress.lock() {
            p.addr = Some(addr);
        }
        let bind: SocketAddr = if addr.is_ipv4() {
            "0.0.0.0:0"
                .parse()
                .map_err(|_| unreachable("bind".into()))?
        } else {
            "[::]:0".parse().map_err(|_| unreachable("bind".into()))?
        };
        let endpoint = std::net::UdpSocket::bind(bind)
            .and_then(|sock| {
                crate::quic::tune_udp(&sock);
                sock.set_nonblocking(true)?;
                quinn::Endpoint::new(
                    quinn::EndpointConfig::default(),
                    None,
                    sock,
                    Arc::new(quinn::TokioRuntime),
                )
            })
            .map_err(|e| unreachable(format!("cannot open a UDP socket: {e}")))?;
        let mut connecting = endpoint
            .connect_with(self.client.clone(), addr, &server.host)
            .map_err(|e| ConnectFailure {
                reason: Reason::TlsError,
                message: format!("cannot start QUIC to {server}: {e}"),
            })?;
        // Resolves once the server's first handshake flight is in: UDP gets through.
        if connecting.handshake_data().await.is_ok() {
            if let Ok(mut p) = progress.lock() {
                p.heard_from_server = true;
            }
        }
        let conn = connecting.await.map_err(|e| {
            let (reason, message) = classify(&e);
            ConnectFailure { reason, message }
        })?;
        let hello = async {
            let (mut send, mut recv) = conn.open_bi().await?;
            write_frame(
                &mut send,
                &Control::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    agent_version: env!("CARGO_PKG_VERSION").to_string(),
                    facts: self.facts.clone(),
                    ha_state: crate::agent::activation::ha_state(&config),
                    switches: Some(self.proxy.gate.local_switches()),
                },
            )
            .await?;
            let welcome: Option<Control> = read_frame(&mut recv).await?;
            anyhow::Ok((send, recv, welcome))
        };
        match hello.await {
            Ok((
                send,
                recv,
                Some(Control::Welcome {
                    device_id,
                    settings,
                    server_time_ms,
                    audit,
                }),
            )) => {
                if device_id != self.credential.device_id {
                    tracing::warn!(expected = %self.credential.device_id, got = %device_id, "server knows this device under another id");
                }
                self.proxy.gate.clock().learn_server_time(server_time_ms);
                self.proxy
                    .gate
                    .set_cm_passwordless(settings.allow_passwordless);
                Ok(Established {
                    endpoint,
                    conn,
                    send,
                    recv,
                    audit,
                })
            }
            Ok(_) | Err(_) => {
                // The server closes with a reason when it refuses; prefer that over the I/O error.
                let reason = match tokio::time::timeout(Duration::from_secs(2), conn.closed()).await
                {
                    Ok(e) => classify(&e),
                    Err(_) => (
                        Reason::ProtocolMismatch,
                        format!("{server} did not answer hello as expected"),
                    ),
                };
                conn.close(CLOSE_NORMAL.into(), b"");
                Err(ConnectFailure {
                    reason: reason.0,
                    message: reason.1,
                })
            }
        }
    }
}

/// A connection past hello: its endpoint, connection and control stream, and whether the
/// server records audit events.
struct Established {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    send: quinn::SendStream,
    recv: quinn::RecvStream,
    audit: bool,
}

/// How far a connection attempt got.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// The address dialled.
    addr: Option<SocketAddr>,
    /// The server's first handshake packets arrived.
    heard_from_server: bool,
}

/// How long the TCP probe after a silent QUIC attempt may take.
const TCP_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// Why an attempt that timed out got nowhere. When not a single QUIC packet came back, a TCP
/// connect to the same address and port tells a firewall that drops UDP (the server answers on
/// TCP, where activation goes) from a server or network that is down.
async fn silence_message(server: &str, progress: Progress) -> String {
    let Some(addr) = progress.addr else {
        return format!("{server} was not resolved within {CONNECT_TIMEOUT:?}");
    };
    // The address beside a name, not beside itself.
    let server = if server == addr.to_string() {
        server.to_string()
    } else {
        format!("{server} ({addr})")
    };
    if progress.heard_from_server {
        return format!(
            "the QUIC handshake with {server} began but did not finish within \
             {CONNECT_TIMEOUT:?} (heavy packet loss on the path?)"
        );
    }
    match tokio::time::timeout(TCP_PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => format!(
            "UDP to {server} looks blocked: TCP to that port answers, but no QUIC \
             packet came back within {CONNECT_TIMEOUT:?}; allow outbound UDP to port {}",
            addr.port()
        ),
        Ok(Err(e)) => format!(
            "no answer from {server} on UDP within {CONNECT_TIMEOUT:?}, and TCP to \
             that port failed too ({e}): the server is down or unreachable from here"
        ),
        Err(_) => format!(
            "no answer from {server} on UDP within {CONNECT_TIMEOUT:?} or on TCP \
             within {TCP_PROBE_TIMEOUT:?}: the server is down or unreachable from here"
        ),
    }
}

struct ConnectFailure {
    reason: Reason,
    message: String,
}

/// Maps a QUIC connection error to a status reason and a message.
pub fn classify(e: &ConnectionError) -> (Reason, String) {
    match e {
        ConnectionError::ApplicationClosed(c) => {
            let text = String::from_utf8_lossy(&c.reason).to_string();
            match Reason::from_close_code(c.error_code.into_inner()) {
                Some(r) => (r, text),
                None => (
                    Reason::ServerUnreachable,
                    format!("the server closed the connection: {text}"),
                ),
            }
        }
        ConnectionError::ConnectionClosed(c) => {
            if c.error_code == TransportErrorCode::crypto(ALERT_NO_APPLICATION_PROTOCOL) {
                (
                    Reason::ProtocolMismatch,
                    format!(
                        "the server does not speak tunnel protocol {PROTOCOL_VERSION}; upgrade the agent or the server"
                    ),
                )
            } else if is_crypto(c.error_code) {
                (
                    Reason::TlsError,
                    format!("the server refused the TLS handshake: {c}"),
                )
            } else {
                (
                    Reason::ServerUnreachable,
                    format!("the server closed the connection: {c}"),
                )
            }
        }
        ConnectionError::TransportError(t) if is_crypto(t.code) => (
            Reason::TlsError,
            format!("TLS with the server failed: {t} (check server.pin_sha256 / server.ca_file)"),
        ),
        ConnectionError::TransportError(t) => (Reason::ServerUnreachable, t.to_string()),
        ConnectionError::VersionMismatch => (
            Reason::ProtocolMismatch,
            "the server does not support this QUIC version".to_string(),
        ),
        ConnectionError::Reset => (
            Reason::ServerUnreachable,
            "the server restarted and reset the connection".to_string(),
        ),
        ConnectionError::TimedOut => (
            Reason::ServerUnreachable,
            format!("no packets from the server for {IDLE_TIMEOUT:?}"),
        ),
        ConnectionError::LocallyClosed => (Reason::ServerUnreachable, "closed locally".to_string()),
        ConnectionError::CidsExhausted => (Reason::ServerUnreachable, e.to_string()),
    }
}

struct DisconnectOnDrop<'a>(&'a crate::agent::metrics::Metrics);

impl Drop for DisconnectOnDrop<'_> {
    fn drop(&mut self) {
        self.0.disconnected();
    }
}

fn is_crypto(code: TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}

async fn control_loop(
    ctx: Arc<ProxyCtx>,
    conn: quinn::Connection,
    (mut send, mut recv): (quinn::SendStream, quinn::RecvStream),
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
                let rtt = conn.rtt().as_millis() as u64;
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
    send: &mut quinn::SendStream,
    outbox: &crate::agent::outbox::Outbox,
) -> anyhow::Result<()> {
    let events = outbox.pending();
    if events.is_empty() {
        return Ok(());
    }
    write_frame(send, &Control::AuditEvents { events }).await
}
