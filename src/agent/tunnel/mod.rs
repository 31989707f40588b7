//! The tunnel: connect with the device key over QUIC or TCP (`[tunnel] transport`, DESIGN
//! §10), say hello on the control stream, keep the heartbeat, serve request streams opened by
//! the server, move back to QUIC when a re-probe succeeds, and say why the connection ended.

mod control;
mod leave;
mod quic;
pub mod race;
mod tcp;

use crate::agent::metrics::LinkStats;
use crate::agent::proxy::{self, ProxyCtx};
use crate::agent::state::Credential;
use crate::config::{AgentConfig, TransportMode};
use crate::protocol::{
    read_frame, write_frame, Control, DeviceFacts, Reason, ALPN, ALPN_TCP, CLOSE_NORMAL,
    CONNECT_TIMEOUT, HANDOVER_GRACE, PROTOCOL_VERSION, STREAM_CREDIT,
};
use crate::status::{rfc3339, State, StatusHandle};
use crate::tls::{self, KeyIdentity, ServerTrust};
use crate::tunnelio::{RecvHalf, SendHalf, Transport};
use anyhow::{Context, Result};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

pub use leave::{deactivate, Deactivation};
pub use quic::classify;

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
    /// (heartbeat, drain); server, activation, transport and device facts stay as the run began.
    live: watch::Receiver<Arc<AgentConfig>>,
    /// The credential from activation.
    pub credential: Credential,
    /// Client config for QUIC (device key, server trust, ALPN).
    client: quinn::ClientConfig,
    /// TLS for the TCP transport (the same key and trust, ALPN `pbxra-tcp/1`).
    tcp_tls: Arc<rustls::ClientConfig>,
    /// Facts sent in hello.
    facts: DeviceFacts,
    /// Stream handler context.
    pub proxy: Arc<ProxyCtx>,
    /// Status.
    pub status: StatusHandle,
    /// What `auto` remembers of QUIC.
    memory: Mutex<race::Memory>,
}

/// A connection past its transport handshake, before hello.
enum Conn {
    Quic(quic::Dialed),
    Tcp(tcp::TcpLink),
}

/// A dialled connection, its control stream when the server opened it (TCP), and why this
/// transport (for the status).
struct Dialed {
    conn: Conn,
    control: Option<tcp::Halves>,
    note: Option<String>,
}

/// A connection attempt in progress (a re-probe beside the connection in use).
type Attempt<'a> = Pin<Box<dyn Future<Output = Result<Established, ConnectFailure>> + Send + 'a>>;

/// A connection past hello.
struct Established {
    conn: Conn,
    control: tcp::Halves,
    audit: bool,
    note: Option<String>,
}

/// How far a QUIC attempt got.
#[derive(Debug, Clone, Default)]
struct Progress {
    /// The address dialled.
    addr: Option<SocketAddr>,
    /// The server's first handshake packets arrived.
    heard_from_server: bool,
}

struct ConnectFailure {
    reason: Reason,
    message: String,
}

impl From<crate::agent::dial::DialError> for ConnectFailure {
    fn from(e: crate::agent::dial::DialError) -> Self {
        ConnectFailure {
            reason: e.reason,
            message: e.message,
        }
    }
}

impl Conn {
    fn stats(&self) -> LinkStats {
        match self {
            Conn::Quic(q) => LinkStats::Quic(q.conn.clone()),
            Conn::Tcp(t) => LinkStats::Tcp {
                counters: t.counters.clone(),
                rtt_ms: t.rtt_ms.clone(),
            },
        }
    }

    fn transport(&self) -> Transport {
        match self {
            Conn::Quic(_) => Transport::Quic,
            Conn::Tcp(_) => Transport::Tcp,
        }
    }

    /// The next stream the server opens, or why the connection ended.
    async fn accept(&mut self) -> Result<tcp::Halves, (Reason, String)> {
        match self {
            Conn::Quic(q) => match q.conn.accept_bi().await {
                Ok((send, recv)) => Ok((SendHalf::Quic(send), RecvHalf::Quic(recv))),
                Err(e) => Err(classify(&e)),
            },
            Conn::Tcp(t) => t.accept().await,
        }
    }

    /// Why the server refused hello (it closes with a reason); waits a moment for it.
    async fn refusal(&self, server: &str) -> (Reason, String) {
        let silent = || {
            (
                Reason::ProtocolMismatch,
                format!("{server} did not answer hello as expected"),
            )
        };
        match self {
            Conn::Quic(q) => {
                match tokio::time::timeout(Duration::from_secs(2), q.conn.closed()).await {
                    Ok(e) => classify(&e),
                    Err(_) => silent(),
                }
            }
            Conn::Tcp(t) => match tokio::time::timeout(Duration::from_secs(2), t.ended()).await {
                Ok(()) => t.end_reason(),
                Err(_) => silent(),
            },
        }
    }

    /// The control stream: the one the server opened (TCP), or a new one (QUIC).
    async fn control(&mut self, opened: Option<tcp::Halves>) -> Result<tcp::Halves> {
        match (opened, self) {
            (Some(c), _) => Ok(c),
            (None, Conn::Quic(q)) => {
                let (s, r) = q.conn.open_bi().await?;
                Ok((SendHalf::Quic(s), RecvHalf::Quic(r)))
            }
            (None, Conn::Tcp(_)) => anyhow::bail!("no control stream"),
        }
    }

    /// Closes on purpose, so the server sees it at once.
    async fn close(self) {
        match self {
            Conn::Quic(q) => {
                q.conn.close(CLOSE_NORMAL.into(), b"agent stopping");
                let _ = tokio::time::timeout(Duration::from_secs(1), q.endpoint.wait_idle()).await;
            }
            Conn::Tcp(t) => {
                t.finish();
                let _ = tokio::time::timeout(Duration::from_secs(1), t.ended()).await;
            }
        }
    }
}

impl Tunnel {
    /// Prepares the QUIC and TCP client configs from the device key; `live` holds the run's
    /// config.
    pub fn new(
        live: watch::Receiver<Arc<AgentConfig>>,
        credential: Credential,
        key: &KeyIdentity,
        trust: &ServerTrust,
        facts: DeviceFacts,
        proxy: Arc<ProxyCtx>,
        status: StatusHandle,
    ) -> Result<Tunnel> {
        let (client, tcp_tls) = client_configs(trust, key)?;
        Ok(Tunnel {
            live,
            credential,
            client,
            tcp_tls,
            facts,
            proxy,
            status,
            memory: Mutex::new(race::Memory::default()),
        })
    }

    /// The config in force.
    pub fn config(&self) -> Arc<AgentConfig> {
        self.live.borrow().clone()
    }

    fn memory(&self) -> std::sync::MutexGuard<'_, race::Memory> {
        // Invariant: nothing panics while the lock is held.
        self.memory.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn now(&self) -> std::time::Instant {
        self.proxy.gate.clock().now()
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
        let established = tokio::select! {
            _ = shutdown.cancelled() => return End::Shutdown,
            r = self.establish(false) => r,
        };
        let established = match established {
            Ok(e) => e,
            Err(ConnectFailure { reason, message }) => return lost(reason, message, false),
        };
        // Metrics first, so a scrape that sees `connected` also sees this connection.
        self.proxy.metrics.connected(established.conn.stats());
        let mut live = self.go_live(established, shutdown, true);
        tracing::info!(device = %self.credential.device_id, server = %self.config().server.address, transport = %live.transport, "tunnel connected");

        let auto = self.config().tunnel.transport == TransportMode::Auto;
        let mut probe: Option<Attempt<'_>> = None;
        let mut address_check = tokio::time::interval(race::ADDRESS_CHECK);
        let clock = self.proxy.gate.clock().clone();
        let end = loop {
            let probe_at = match (auto, live.transport, &probe) {
                (true, Transport::Tcp, None) => self.memory().next_probe(),
                _ => None,
            };
            tokio::select! {
                _ = shutdown.cancelled() => break None,
                accepted = live.conn.accept() => match accepted {
                    Ok(halves) => live.serve(&self.proxy, halves),
                    Err(e) => break Some(e),
                },
                _ = clock.sleep_until(probe_at.unwrap_or_else(|| clock.now())), if probe_at.is_some() => {
                    tracing::debug!("re-probing QUIC");
                    probe = Some(Box::pin(self.establish(true)));
                }
                probed = async { match probe.as_mut() { Some(p) => p.await, None => std::future::pending().await } }, if probe.is_some() => {
                    probe = None;
                    match probed {
                        Ok(next) => {
                            self.proxy.metrics.switched(next.conn.stats());
                            let old = std::mem::replace(&mut live, self.go_live(next, shutdown, false));
                            tracing::info!("QUIC works again; the tunnel moved to it and the TCP connection drains");
                            tokio::spawn(old.drain(self.proxy.clone(), HANDOVER_GRACE, true).in_current_span());
                        }
                        Err(f) => {
                            tracing::info!(message = %f.message, "QUIC re-probe failed; staying on TCP");
                            let now = self.now();
                            self.memory().quic_failed(now);
                            let note = self.transport_note(live.transport, live.note.clone());
                            self.status.update(|s| s.transport_note = note);
                        }
                    }
                }
                _ = address_check.tick(), if auto && live.transport == Transport::Tcp => {
                    let now = self.now();
                    if self.memory().check_address(now) {
                        tracing::info!("the local address changed; QUIC is probed now");
                    }
                }
            }
        };
        drop(probe);
        // Drops the connection from the metrics at whatever point we leave (bytes of a
        // draining connection are counted up to here).
        let _metrics_link = DisconnectOnDrop(&self.proxy.metrics);
        match end {
            None => {
                // Drain in-flight requests, then close on purpose so the server sees it at once.
                let drain = self.config().tunnel.drain;
                live.drain(self.proxy.clone(), drain, false).await;
                End::Shutdown
            }
            Some((reason, message)) => {
                live.stop();
                tracing::warn!(%reason, %message, "tunnel lost");
                lost(reason, message, true)
            }
        }
    }

    /// Starts serving an established connection (`first`: of this attempt; else it takes over
    /// from the one in use): status in one write, control loop.
    fn go_live(&self, e: Established, shutdown: &CancellationToken, first: bool) -> Live {
        let stats = e.conn.stats();
        let transport = e.conn.transport();
        if transport == Transport::Quic {
            self.memory().quic_ok(stats.rtt());
        }
        let note = self.transport_note(transport, e.note.clone());
        let now = rfc3339(SystemTime::now());
        let ha_state = crate::agent::activation::ha_state(&self.config());
        self.status.update(|s| {
            if first {
                s.state = State::Connected;
                s.reason = None;
                s.message = None;
                s.next_retry_at = None;
                s.since = Some(now.clone());
                s.last_connected = Some(now.clone());
                s.device_id = Some(self.credential.device_id.clone());
                s.ha_state = ha_state;
            }
            s.rtt_ms = Some(stats.rtt().as_millis() as u64);
            s.transport = Some(transport.as_str().to_string());
            s.transport_note = note;
        });
        let control_stop = CancellationToken::new();
        let control = tokio::spawn(
            control::control_loop(
                self.proxy.clone(),
                stats,
                e.control,
                e.audit,
                self.live.clone(),
                self.status.clone(),
                control_stop.clone(),
            )
            .in_current_span(),
        );
        Live {
            conn: e.conn,
            transport,
            note: e.note,
            streams: TaskTracker::new(),
            stopping: shutdown.child_token(),
            control,
            control_stop,
        }
    }

    /// Why this transport, with the next QUIC probe while on TCP by choice.
    fn transport_note(&self, transport: Transport, note: Option<String>) -> Option<String> {
        let probe = self
            .memory()
            .next_probe()
            .filter(|_| transport == Transport::Tcp);
        match (note, probe) {
            (Some(n), Some(at)) => {
                let wall = SystemTime::now() + at.saturating_duration_since(self.now());
                Some(format!("{n}; QUIC is tried again at {}", rfc3339(wall)))
            }
            (note, _) => note,
        }
    }

    /// Dials as the config says and says hello; `handover` for a re-probe that is to take over
    /// from the connection in use.
    async fn establish(&self, handover: bool) -> Result<Established, ConnectFailure> {
        let config = self.config();
        let dialed = match (config.tunnel.transport, handover) {
            (_, true) => self.dial_quic(false).await.map(|conn| Dialed {
                conn,
                control: None,
                note: None,
            })?,
            (TransportMode::Quic, false) => Dialed {
                conn: self.dial_quic(true).await?,
                control: None,
                note: Some("forced by config".into()),
            },
            (TransportMode::Tcp, false) => self.dial_tcp(Some("forced by config")).await?,
            (TransportMode::Auto, false) => self.race().await?,
        };
        self.hello(dialed, handover).await
    }

    /// Hello on the control stream, welcome back.
    async fn hello(&self, dialed: Dialed, handover: bool) -> Result<Established, ConnectFailure> {
        let config = self.config();
        let Dialed {
            mut conn,
            control,
            note,
        } = dialed;
        let conn_transport = conn.transport();
        let exchange = async {
            let (mut send, mut recv) = conn.control(control).await?;
            write_frame(
                &mut send,
                &Control::Hello {
                    protocol_version: PROTOCOL_VERSION,
                    agent_version: env!("CARGO_PKG_VERSION").to_string(),
                    facts: self.facts.clone(),
                    ha_state: crate::agent::activation::ha_state(&config),
                    switches: Some(self.proxy.gate.local_switches()),
                    handover,
                },
            )
            .await?;
            let welcome: Option<Control> = read_frame(&mut recv).await?;
            anyhow::Ok((send, recv, welcome))
        };
        let answer = tokio::time::timeout(CONNECT_TIMEOUT, exchange).await;
        match answer {
            Ok(Ok((
                send,
                recv,
                Some(Control::Welcome {
                    device_id,
                    settings,
                    server_time_ms,
                    audit,
                }),
            ))) => {
                if device_id != self.credential.device_id {
                    tracing::warn!(expected = %self.credential.device_id, got = %device_id, "server knows this device under another id");
                }
                self.proxy.gate.clock().learn_server_time(server_time_ms);
                self.proxy
                    .gate
                    .set_cm_passwordless(settings.allow_passwordless);
                Ok(Established {
                    conn,
                    control: (send, recv),
                    audit,
                    note,
                })
            }
            Err(_) => {
                conn.close().await;
                Err(ConnectFailure {
                    reason: Reason::ServerUnreachable,
                    message: format!(
                        "the {} handshake with {} began but did not finish within \
                         {CONNECT_TIMEOUT:?} (heavy packet loss on the path?)",
                        match conn_transport {
                            Transport::Quic => "QUIC",
                            Transport::Tcp => "TCP",
                        },
                        config.server.address
                    ),
                })
            }
            Ok(_) => {
                // The server closes with a reason when it refuses; prefer that over the I/O error.
                let (reason, message) = conn.refusal(&config.server.address.to_string()).await;
                conn.close().await;
                Err(ConnectFailure { reason, message })
            }
        }
    }
}

/// The QUIC and TCP client configs: the device key as client certificate, the server trust.
fn client_configs(
    trust: &ServerTrust,
    key: &KeyIdentity,
) -> Result<(quinn::ClientConfig, Arc<rustls::ClientConfig>)> {
    let tls = tls::client_config(trust, &[ALPN], Some(key))?;
    let quic = quinn::crypto::rustls::QuicClientConfig::try_from(tls).context("QUIC TLS config")?;
    let mut client = quinn::ClientConfig::new(Arc::new(quic));
    // The server opens up to MAX_REQUEST_STREAMS request streams; see STREAM_CREDIT.
    client.transport_config(Arc::new(crate::quic::transport_config(STREAM_CREDIT)));
    let tcp_tls = Arc::new(tls::client_config(trust, &[ALPN_TCP], Some(key))?);
    Ok((client, tcp_tls))
}

/// The connection in use (or draining after a switch): its streams and control loop.
struct Live {
    conn: Conn,
    transport: Transport,
    note: Option<String>,
    streams: TaskTracker,
    /// Cancelled to drain: a request in progress finishes, an idle stream ends.
    stopping: CancellationToken,
    control: tokio::task::JoinHandle<()>,
    control_stop: CancellationToken,
}

impl Live {
    /// Serves one request stream.
    fn serve(&self, ctx: &Arc<ProxyCtx>, (send, recv): tcp::Halves) {
        ctx.metrics.stream_opened();
        let span = tracing::info_span!("stream", id = %send.id(), visitor = tracing::field::Empty);
        self.streams.spawn(
            proxy::serve_stream(ctx.clone(), send, recv, self.stopping.clone()).instrument(span),
        );
    }

    /// The connection is lost: its streams fail on their own.
    fn stop(&self) {
        self.control_stop.cancel();
        self.streams.close();
    }

    /// Lets requests in flight finish (within `deadline`), then closes on purpose.
    ///
    /// After a switch (`handover`) the old connection is not hurried: the server opens no more
    /// streams on it (GOAWAY on TCP), streams it opened before it moved are still accepted and
    /// served, and requests run to their end; idle streams end when the front lets them go.
    /// On shutdown, a request in progress finishes and an idle stream ends at once.
    async fn drain(mut self, ctx: Arc<ProxyCtx>, deadline: Duration, handover: bool) {
        self.control_stop.cancel();
        let _ = (&mut self.control).await;
        let until = tokio::time::Instant::now() + deadline;
        if handover {
            if let Conn::Tcp(t) = &self.conn {
                t.finish();
            }
            while let Ok(Ok(halves)) = tokio::time::timeout_at(until, self.conn.accept()).await {
                self.serve(&ctx, halves);
            }
        } else {
            self.stopping.cancel();
        }
        self.streams.close();
        if tokio::time::timeout_at(until, self.streams.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                in_flight = self.streams.len(),
                "drain deadline reached; closing with requests in flight"
            );
        }
        self.conn.close().await;
    }
}

struct DisconnectOnDrop<'a>(&'a crate::agent::metrics::Metrics);

impl Drop for DisconnectOnDrop<'_> {
    fn drop(&mut self) {
        self.0.disconnected();
    }
}

#[cfg(test)]
mod tests;
