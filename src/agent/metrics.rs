//! Metrics and health for local monitoring: Prometheus text on `/metrics` and `/ready` (200
//! when the tunnel is connected, else 503), served only on `[metrics] listen`. The listener is
//! a separate local socket; the tunnel's request streams go to the portal proxy and can never
//! reach it.

use crate::httpserve::{self, Limits};
use crate::status::{State, StatusHandle};
use crate::tunnelio::Transport;
use crate::web::{full, Body};
use http::{Response, StatusCode};
use std::collections::BTreeMap;
use std::convert::Infallible;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// Counters shared by the tunnel, proxy and gate. Lives as long as the agent process, across
/// reloads that restart the tunnel, so counters only go up.
#[derive(Default)]
pub struct Metrics {
    connections: AtomicU64,
    switches: AtomicU64,
    streams: AtomicU64,
    login_failures: AtomicU64,
    activation_attempts: AtomicU64,
    requests: Mutex<BTreeMap<u16, u64>>,
    /// The live connection (for RTT and bytes) and the byte totals of finished ones.
    link: Mutex<Link>,
}

#[derive(Default)]
struct Link {
    current: Option<LinkStats>,
    sent_before: u64,
    received_before: u64,
}

impl Link {
    /// Moves the current connection's bytes to the totals.
    fn retire(&mut self) {
        if let Some(conn) = self.current.take() {
            let (sent, received) = conn.bytes();
            self.sent_before += sent;
            self.received_before += received;
        }
    }
}

/// Where a tunnel connection's round trip and byte counts are read, whichever transport.
#[derive(Clone)]
pub(crate) enum LinkStats {
    /// QUIC keeps its own.
    Quic(quinn::Connection),
    /// The TCP transport counts socket bytes and times its pings.
    Tcp {
        /// Bytes below TLS.
        counters: Arc<crate::tunnelio::Counters>,
        /// The last ping's round trip.
        rtt_ms: Arc<AtomicU64>,
    },
}

impl LinkStats {
    /// Which transport.
    pub fn transport(&self) -> Transport {
        match self {
            LinkStats::Quic(_) => Transport::Quic,
            LinkStats::Tcp { .. } => Transport::Tcp,
        }
    }

    /// Round-trip time to the server.
    pub fn rtt(&self) -> std::time::Duration {
        match self {
            LinkStats::Quic(c) => c.rtt(),
            LinkStats::Tcp { rtt_ms, .. } => {
                std::time::Duration::from_millis(rtt_ms.load(Ordering::Relaxed))
            }
        }
    }

    /// Bytes sent and received.
    pub fn bytes(&self) -> (u64, u64) {
        match self {
            LinkStats::Quic(c) => {
                let stats = c.stats();
                (stats.udp_tx.bytes, stats.udp_rx.bytes)
            }
            LinkStats::Tcp { counters, .. } => (
                counters.sent.load(Ordering::Relaxed),
                counters.received.load(Ordering::Relaxed),
            ),
        }
    }
}

impl Metrics {
    /// A tunnel connection came up.
    pub(crate) fn connected(&self, link: LinkStats) {
        self.connections.fetch_add(1, Ordering::Relaxed);
        let mut l = self.lock_link();
        l.retire();
        l.current = Some(link);
    }

    /// The tunnel moved to another connection (a QUIC re-probe succeeded): not a reconnect.
    pub(crate) fn switched(&self, link: LinkStats) {
        self.switches.fetch_add(1, Ordering::Relaxed);
        let mut l = self.lock_link();
        l.retire();
        l.current = Some(link);
    }

    /// The tunnel connection ended; its bytes move to the totals.
    pub fn disconnected(&self) {
        self.lock_link().retire();
    }

    /// An activation request is about to be sent.
    pub fn activation_attempt(&self) {
        self.activation_attempts.fetch_add(1, Ordering::Relaxed);
    }

    /// The server opened a request stream.
    pub fn stream_opened(&self) {
        self.streams.fetch_add(1, Ordering::Relaxed);
    }

    /// A proxied request was answered with `status`.
    pub fn request(&self, status: StatusCode) {
        let mut map = self.requests.lock().unwrap_or_else(|p| p.into_inner());
        *map.entry(status.as_u16()).or_default() += 1;
    }

    /// A remote-account login failed (wrong credentials or locked out).
    pub fn login_failed(&self) {
        self.login_failures.fetch_add(1, Ordering::Relaxed);
    }

    fn lock_link(&self) -> std::sync::MutexGuard<'_, Link> {
        // Invariant: nothing panics while the lock is held; the data stays valid regardless.
        self.link.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self, status: &StatusHandle) -> String {
        let s = status.get();
        let mut o = String::with_capacity(2048);
        help(&mut o, "pbxra_build_info", "gauge", "Agent version.");
        let _ = writeln!(
            o,
            "pbxra_build_info{{version=\"{}\"}} 1",
            env!("CARGO_PKG_VERSION")
        );
        help(
            &mut o,
            "pbxra_state",
            "gauge",
            "Agent state (1 for the current one), as in status.json.",
        );
        for state in State::ALL {
            let _ = writeln!(
                o,
                "pbxra_state{{state=\"{}\"}} {}",
                state.as_str(),
                u8::from(s.state == state)
            );
        }
        let connections = self.connections.load(Ordering::Relaxed);
        single(
            &mut o,
            "pbxra_connections_total",
            "counter",
            "Tunnel connections established.",
            connections,
        );
        single(
            &mut o,
            "pbxra_reconnects_total",
            "counter",
            "Tunnel connections established after the first.",
            connections.saturating_sub(1),
        );
        single(
            &mut o,
            "pbxra_tunnel_streams_total",
            "counter",
            "Request streams the server opened (a visit's next request reuses a finished one).",
            self.streams.load(Ordering::Relaxed),
        );
        let (rtt, transport, sent, received) = {
            let link = self.lock_link();
            match &link.current {
                Some(c) => {
                    let (sent, received) = c.bytes();
                    (
                        Some(c.rtt()),
                        Some(c.transport()),
                        link.sent_before + sent,
                        link.received_before + received,
                    )
                }
                None => (None, None, link.sent_before, link.received_before),
            }
        };
        let connected = s.state == State::Connected;
        if let Some(rtt) = rtt.filter(|_| connected) {
            single(
                &mut o,
                "pbxra_rtt_seconds",
                "gauge",
                "Round-trip time to the server (QUIC's estimate, or the TCP transport's last ping).",
                rtt.as_secs_f64(),
            );
        }
        help(
            &mut o,
            "pbxra_transport",
            "gauge",
            "The transport the tunnel uses (1 for the current one; 0 for both while not connected).",
        );
        for kind in [Transport::Quic, Transport::Tcp] {
            let on = connected && transport == Some(kind);
            let _ = writeln!(o, "pbxra_transport{{kind=\"{kind}\"}} {}", u8::from(on));
        }
        single(
            &mut o,
            "pbxra_transport_switches_total",
            "counter",
            "Times the tunnel moved from TCP back to QUIC without a reconnect.",
            self.switches.load(Ordering::Relaxed),
        );
        help(
            &mut o,
            "pbxra_tunnel_bytes_total",
            "counter",
            "Bytes of the tunnel: UDP payload on QUIC, TCP payload on the TCP transport.",
        );
        let _ = writeln!(o, "pbxra_tunnel_bytes_total{{direction=\"sent\"}} {sent}");
        let _ = writeln!(
            o,
            "pbxra_tunnel_bytes_total{{direction=\"received\"}} {received}"
        );
        help(
            &mut o,
            "pbxra_active_sessions",
            "gauge",
            "Remote sessions by role.",
        );
        for role in ["administrator", "super_admin"] {
            let n = s.active_sessions.iter().filter(|x| x.role == role).count();
            let _ = writeln!(o, "pbxra_active_sessions{{role=\"{role}\"}} {n}");
        }
        help(
            &mut o,
            "pbxra_requests_total",
            "counter",
            "Requests through the tunnel by response status.",
        );
        for (code, n) in self
            .requests
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
        {
            let _ = writeln!(o, "pbxra_requests_total{{code=\"{code}\"}} {n}");
        }
        single(
            &mut o,
            "pbxra_login_failures_total",
            "counter",
            "Failed remote-account logins.",
            self.login_failures.load(Ordering::Relaxed),
        );
        single(
            &mut o,
            "pbxra_activation_attempts_total",
            "counter",
            "Activation requests sent to the server (code or account).",
            self.activation_attempts.load(Ordering::Relaxed),
        );
        o
    }
}

fn help(o: &mut String, name: &str, kind: &str, text: &str) {
    let _ = writeln!(o, "# HELP {name} {text}\n# TYPE {name} {kind}");
}

/// A series without labels: its help, its type and its one sample.
fn single(o: &mut String, name: &str, kind: &str, text: &str, value: impl std::fmt::Display) {
    help(o, name, kind, text);
    let _ = writeln!(o, "{name} {value}");
}

/// Scrapers served at once (a scrape is one short request).
const MAX_CONNECTIONS: usize = 16;

/// Serves `/metrics` and `/ready` on `listener` until `stop`.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    status: StatusHandle,
    stop: CancellationToken,
) {
    let limits = Limits::new("metrics", MAX_CONNECTIONS);
    httpserve::serve(listener, httpserve::Plain, limits, stop, move |_peer| {
        let (metrics, status) = (metrics.clone(), status.clone());
        hyper::service::service_fn(move |req: http::Request<_>| {
            let answer = respond(req.method(), req.uri().path(), &metrics, &status);
            async move { Ok::<_, Infallible>(answer) }
        })
    })
    .await
}

fn respond(
    method: &http::Method,
    path: &str,
    metrics: &Metrics,
    status: &StatusHandle,
) -> Response<Body> {
    let text = |code: StatusCode, ctype: &str, body: String| {
        Response::builder()
            .status(code)
            .header(http::header::CONTENT_TYPE, ctype)
            .header(http::header::CACHE_CONTROL, "no-store")
            .body(full(body))
            .unwrap_or_default()
    };
    if method != http::Method::GET && method != http::Method::HEAD {
        return text(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".into(),
        );
    }
    match path {
        "/metrics" => text(
            StatusCode::OK,
            "text/plain; version=0.0.4; charset=utf-8",
            metrics.render(status),
        ),
        "/ready" => {
            let s = status.get();
            if s.state == State::Connected {
                text(StatusCode::OK, "text/plain", "connected\n".into())
            } else {
                text(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!("{}\n", s.state.as_str()),
                )
            }
        }
        _ => text(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics or /ready\n".into(),
        ),
    }
}

/// The metrics listener, restarted when `[metrics] listen` changes on reload.
pub struct Endpoint {
    listen: Option<SocketAddr>,
    stop: CancellationToken,
}

impl Endpoint {
    /// Starts serving on `listen` (if set). A bind failure is logged, not fatal: monitoring must
    /// not take remote management down.
    pub fn start(
        listen: Option<SocketAddr>,
        metrics: &Arc<Metrics>,
        status: &StatusHandle,
    ) -> Endpoint {
        let stop = CancellationToken::new();
        if let Some(addr) = listen {
            match std::net::TcpListener::bind(addr)
                .and_then(|l| l.set_nonblocking(true).map(|()| l))
                .and_then(TcpListener::from_std)
            {
                Ok(listener) => {
                    // The bound address: `listen` may name port 0.
                    let bound = listener.local_addr().unwrap_or(addr);
                    tracing::info!(addr = %bound, "metrics listening on /metrics and /ready");
                    status.update(|s| s.metrics_listen = Some(bound.to_string()));
                    tokio::spawn(serve(
                        listener,
                        metrics.clone(),
                        status.clone(),
                        stop.clone(),
                    ));
                }
                Err(e) => {
                    tracing::error!(%addr, error = %e, "metrics.listen: cannot listen; metrics are off");
                    status.update(|s| s.metrics_listen = None);
                }
            }
        }
        if listen.is_none() {
            status.update(|s| s.metrics_listen = None);
        }
        Endpoint { listen, stop }
    }

    /// Applies a reloaded `[metrics] listen`.
    pub fn reconfigure(
        self,
        listen: Option<SocketAddr>,
        metrics: &Arc<Metrics>,
        status: &StatusHandle,
    ) -> Endpoint {
        if listen == self.listen {
            return self;
        }
        self.stop.cancel();
        Endpoint::start(listen, metrics, status)
    }
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}
