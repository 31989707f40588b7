//! `transport = "auto"` (DESIGN §10): QUIC first, TCP a moment later unless QUIC has answered,
//! the first handshake wins; a QUIC failure is remembered and QUIC is re-probed in the
//! background on a doubling schedule, reset when the local address changes.

use super::{quic, tcp, Conn, ConnectFailure, Dialed, Progress, Tunnel};
use crate::protocol::{Reason, CONNECT_TIMEOUT};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How long QUIC runs alone before TCP starts (at least; 1.5 × the last QUIC RTT when longer).
pub const TCP_HEAD_START: Duration = Duration::from_millis(300);
/// First re-probe after a QUIC failure.
pub const FIRST_PROBE: Duration = Duration::from_secs(5 * 60);
/// Longest wait between re-probes.
pub const MAX_PROBE: Duration = Duration::from_secs(60 * 60);
/// How often the local address toward the server is checked while on TCP.
pub const ADDRESS_CHECK: Duration = Duration::from_secs(30);

/// What the agent remembers of QUIC across connections of one run (times by the agent's clock,
/// which tests move).
#[derive(Debug, Default)]
pub struct Memory {
    /// QUIC lost a race or a probe: connections go to TCP until `next_probe`.
    failed: bool,
    /// Wait before the probe after next.
    delay: Duration,
    /// When QUIC is tried again.
    next_probe: Option<Instant>,
    /// The last QUIC connection's RTT.
    last_quic_rtt: Option<Duration>,
    /// The server's address as last resolved, and the local address that reached it.
    server: Option<SocketAddr>,
    local: Option<IpAddr>,
}

impl Memory {
    /// Whether a connection attempt should dial QUIC now.
    pub fn quic_due(&self, now: Instant) -> bool {
        !self.failed || self.next_probe.is_none_or(|t| now >= t)
    }

    /// How long TCP waits for QUIC.
    pub fn tcp_delay(&self) -> Duration {
        self.last_quic_rtt
            .map_or(TCP_HEAD_START, |rtt| (rtt * 3 / 2).max(TCP_HEAD_START))
    }

    /// When the next probe is due, while QUIC is remembered as failing.
    pub fn next_probe(&self) -> Option<Instant> {
        self.next_probe.filter(|_| self.failed)
    }

    /// QUIC lost (a race or a probe): the next probe is scheduled, and the one after waits
    /// twice as long (at most [`MAX_PROBE`]).
    pub fn quic_failed(&mut self, now: Instant) {
        if !self.failed {
            self.failed = true;
            self.delay = FIRST_PROBE;
        }
        self.next_probe = Some(now + self.delay);
        self.delay = (self.delay * 2).min(MAX_PROBE);
    }

    /// QUIC connected: forget the failures.
    pub fn quic_ok(&mut self, rtt: Duration) {
        self.failed = false;
        self.delay = FIRST_PROBE;
        self.next_probe = None;
        self.last_quic_rtt = Some(rtt);
    }

    /// Records where the server is (its address as resolved for QUIC).
    pub fn server_at(&mut self, addr: SocketAddr) {
        self.server = Some(addr);
    }

    /// Checks the local address toward the server; when it changed (a new network), a QUIC
    /// failure is forgotten for the schedule: the next probe is now, the one after in
    /// [`FIRST_PROBE`]. Returns true when it changed.
    pub fn check_address(&mut self, now: Instant) -> bool {
        let Some(local) = self.server.and_then(local_address_toward) else {
            return false;
        };
        let changed = self.local.is_some_and(|before| before != local);
        self.local = Some(local);
        if changed && self.failed {
            self.delay = FIRST_PROBE;
            self.next_probe = Some(now);
        }
        changed
    }
}

/// The local address the kernel would use to reach `server` (a connected UDP socket sends
/// nothing).
pub fn local_address_toward(server: SocketAddr) -> Option<IpAddr> {
    let sock = std::net::UdpSocket::bind(super::quic::any_port_beside(server)).ok()?;
    sock.connect(server).ok()?;
    sock.local_addr().ok().map(|a| a.ip())
}

/// QUIC to `server` within [`CONNECT_TIMEOUT`], and how far the attempt got; `explain` asks
/// TCP, when nothing came back, whether UDP looks blocked (for `transport = "quic"`).
pub(super) async fn dial_quic_bounded(
    server: &crate::config::ServerAddr,
    client: &quinn::ClientConfig,
    explain: bool,
) -> (Result<quic::Dialed, ConnectFailure>, Progress) {
    let progress = Mutex::new(Progress::default());
    let attempt =
        tokio::time::timeout(CONNECT_TIMEOUT, quic::dial(server, client, &progress)).await;
    let progress = progress.lock().map(|p| p.clone()).unwrap_or_default();
    let result = match attempt {
        Ok(r) => r,
        Err(_) => {
            let name = server.to_string();
            let message = if explain {
                quic::silence_message(&name, progress.clone()).await
            } else {
                quic::silence(&name, &progress)
            };
            Err(ConnectFailure {
                reason: Reason::ServerUnreachable,
                message,
            })
        }
    };
    (result, progress)
}

/// The TCP transport to `server`, through the proxy that applies (config, then environment);
/// the proxy it went through.
pub(super) async fn dial_tcp_proxied(
    config: &crate::config::AgentConfig,
    tls: Arc<rustls::ClientConfig>,
) -> Result<
    (
        tcp::TcpLink,
        tcp::Halves,
        Option<crate::config::proxy::ProxyUrl>,
    ),
    ConnectFailure,
> {
    let server = &config.server.address;
    let proxy = crate::agent::dial::proxy_of(server, config.tunnel.proxy.as_ref())?.map(|(p, _)| p);
    let (link, control) = tcp::dial(server, proxy.as_ref(), tls).await?;
    Ok((link, control, proxy))
}

impl Tunnel {
    /// QUIC within [`CONNECT_TIMEOUT`]; `explain` as for [`dial_quic_bounded`].
    pub(super) async fn dial_quic(&self, explain: bool) -> Result<Conn, ConnectFailure> {
        let config = self.config();
        let (result, progress) =
            dial_quic_bounded(&config.server.address, &self.client, explain).await;
        if let Some(addr) = progress.addr {
            self.memory().server_at(addr);
        }
        result.map(Conn::Quic)
    }

    /// The TCP transport, through the proxy that applies; `why` says why TCP (for the status).
    pub(super) async fn dial_tcp(&self, why: Option<&str>) -> Result<Dialed, ConnectFailure> {
        let (link, control, proxy) = dial_tcp_proxied(&self.config(), self.tcp_tls.clone()).await?;
        let via = proxy.map(|p| format!("via proxy {}", p.authority()));
        let note = match (why, via) {
            (Some(w), Some(v)) => Some(format!("{w}; {v}")),
            (Some(w), None) => Some(w.to_string()),
            (None, v) => v,
        };
        Ok(Dialed {
            conn: Conn::Tcp(link),
            control: Some(control),
            note,
        })
    }

    /// `auto`: QUIC first (unless it is remembered as failing and no probe is due), TCP after
    /// [`race::Memory::tcp_delay`] or as soon as QUIC fails; the first handshake wins and the
    /// other attempt is dropped (closed) before it says hello, so the server registers one.
    pub(super) async fn race(&self) -> Result<Dialed, ConnectFailure> {
        let now = self.now();
        let (quic_due, delay) = {
            let mut m = self.memory();
            m.check_address(now);
            (m.quic_due(now), m.tcp_delay())
        };
        let server = self.config().server.address.to_string();
        let quic = self.dial_quic(false);
        let tcp_note = std::sync::OnceLock::new();
        let tcp = async {
            let why = tcp_note.get().map(String::as_str);
            self.dial_tcp(why).await
        };
        tokio::pin!(quic, tcp);
        let head_start = tokio::time::sleep(if quic_due { delay } else { Duration::ZERO });
        tokio::pin!(head_start);
        let mut quic_error: Option<ConnectFailure> = None;
        let mut tcp_error: Option<ConnectFailure> = None;
        let mut tcp_started = !quic_due;
        if !quic_due {
            let _ = tcp_note.set(format!("QUIC to {server} failed earlier; using TCP"));
        }
        loop {
            tokio::select! {
                r = &mut quic, if quic_due && quic_error.is_none() => match r {
                    Ok(conn) => return Ok(Dialed { conn, control: None, note: None }),
                    Err(e) => {
                        tracing::debug!(message = %e.message, "QUIC attempt failed");
                        if !tcp_started {
                            let _ = tcp_note.set(format!("{}; using TCP", e.message));
                        }
                        quic_error = Some(e);
                        tcp_started = true;
                    }
                },
                _ = &mut head_start, if !tcp_started => {
                    let _ = tcp_note.set(format!(
                        "UDP to {server} gets no answer within {delay:?}; using TCP"
                    ));
                    tcp_started = true;
                }
                r = &mut tcp, if tcp_started && tcp_error.is_none() => match r {
                    Ok(dialed) => {
                        // QUIC lost: remember it, and probe it again later.
                        if quic_due {
                            self.memory().quic_failed(self.now());
                        }
                        return Ok(dialed);
                    }
                    Err(e) => tcp_error = Some(e),
                },
            }
            match (&quic_error, &tcp_error) {
                (Some(_), Some(_)) => break,
                (None, Some(_)) if !quic_due => break,
                _ => {}
            }
        }
        let tcp = tcp_error.map(|e| (e.reason, e.message));
        let quic = quic_error.map(|e| (e.reason, e.message));
        Err(match (quic, tcp) {
            (Some((Reason::ServerUnreachable, qm)), Some((Reason::ServerUnreachable, tm))) => {
                ConnectFailure {
                    reason: Reason::ServerUnreachable,
                    message: format!(
                        "{qm}, and over TCP: {tm}: the server is down or unreachable from here"
                    ),
                }
            }
            (Some((qr, qm)), Some((tr, tm))) => {
                // The specific reason wins over "unreachable".
                let reason = if tr == Reason::ServerUnreachable {
                    qr
                } else {
                    tr
                };
                ConnectFailure {
                    reason,
                    message: format!("{qm}; over TCP: {tm}"),
                }
            }
            (None, Some((reason, message))) | (Some((reason, message)), None) => {
                ConnectFailure { reason, message }
            }
            (None, None) => ConnectFailure {
                reason: Reason::ServerUnreachable,
                message: format!("no connection to {server}"),
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_double_to_an_hour_and_a_success_resets_them() {
        let t0 = Instant::now();
        let mut m = Memory::default();
        assert!(m.quic_due(t0), "QUIC is tried first at start");
        assert_eq!(m.tcp_delay(), TCP_HEAD_START);
        m.quic_failed(t0);
        assert!(!m.quic_due(t0 + Duration::from_secs(299)));
        assert!(m.quic_due(t0 + FIRST_PROBE));
        let mut waits = vec![];
        let mut now = t0;
        for _ in 0..7 {
            let next = m.next_probe().unwrap();
            waits.push((next - now).as_secs() / 60);
            now = next;
            m.quic_failed(now);
        }
        assert_eq!(waits, [5, 10, 20, 40, 60, 60, 60]);
        m.quic_ok(Duration::from_millis(400));
        assert!(m.quic_due(now) && m.next_probe().is_none());
        assert_eq!(
            m.tcp_delay(),
            Duration::from_millis(600),
            "1.5 × the last QUIC RTT"
        );
        m.quic_failed(now);
        assert_eq!(
            m.next_probe(),
            Some(now + FIRST_PROBE),
            "the schedule starts over"
        );
    }

    #[test]
    fn a_new_local_address_brings_the_probe_forward() {
        let t0 = Instant::now();
        let mut m = Memory::default();
        m.server_at("127.0.0.1:9".parse().unwrap());
        assert!(!m.check_address(t0), "the first look records the address");
        m.quic_failed(t0);
        m.quic_failed(t0);
        assert!(!m.check_address(t0), "same address");
        assert_eq!(m.next_probe(), Some(t0 + FIRST_PROBE * 2));
        // Another network: simulated by a different recorded address.
        m.local = Some("192.0.2.1".parse().unwrap());
        assert!(m.check_address(t0));
        assert_eq!(m.next_probe(), Some(t0), "probe now");
        m.quic_failed(t0);
        assert_eq!(
            m.next_probe(),
            Some(t0 + FIRST_PROBE),
            "then from the start"
        );
    }
}
