//! The TCP transport (DESIGN §10): TLS 1.3 over TCP to the server's address and port (directly
//! or through an HTTP CONNECT proxy) with ALPN `pbxra-tcp/1`, and HTTP/2 framing with the agent
//! as the h2 server on the connection it dialled. The server opens the control stream first,
//! then one stream per proxied request, exactly as on QUIC; a `/goodbye` stream says why it
//! closes. A task of its own drives the connection, pings the server (a silent path is noticed
//! within [`IDLE_TIMEOUT`], as on QUIC) and hands streams over.

use super::ConnectFailure;
use crate::agent::dial;
use crate::config::proxy::ProxyUrl;
use crate::config::ServerAddr;
use crate::h2io::{self, H2Read, H2Write, CONTROL_PATH, GOODBYE_PATH, STREAM_PATH};
use crate::protocol::{
    read_frame, Goodbye, Reason, ALPN_TCP, CONNECT_TIMEOUT, IDLE_TIMEOUT, KEEPALIVE, MAX_STREAMS,
};
use crate::tunnelio::{Counted, Counters, RecvHalf, SendHalf};
use bytes::Bytes;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// A stream's two halves.
pub(super) type Halves = (SendHalf, RecvHalf);

/// The agent's side of a TCP transport connection.
pub(super) struct TcpLink {
    streams: mpsc::Receiver<Halves>,
    shared: Arc<Shared>,
    /// Bytes on the socket (below TLS).
    pub counters: Arc<Counters>,
    /// The last ping's round trip.
    pub rtt_ms: Arc<AtomicU64>,
}

#[derive(Default)]
struct Shared {
    /// What the server said on the goodbye stream.
    goodbye: Mutex<Option<Goodbye>>,
    /// Why the connection ended, when it did not say.
    why: Mutex<Option<String>>,
    /// Cancelled once the connection is over.
    ended: CancellationToken,
    /// Asks the driver to finish: GOAWAY, streams in flight complete, then close.
    finish: CancellationToken,
    /// Drops the connection at once (the server said goodbye).
    kill: CancellationToken,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Invariant: nothing panics while these short-lived locks are held.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl TcpLink {
    /// The next request stream, or why the connection ended.
    pub async fn accept(&mut self) -> Result<Halves, (Reason, String)> {
        match self.streams.recv().await {
            Some(s) => Ok(s),
            None => Err(self.end_reason()),
        }
    }

    /// Why the connection ended (or is ending): the server's goodbye, else what the driver saw.
    pub fn end_reason(&self) -> (Reason, String) {
        if let Some(g) = lock(&self.shared.goodbye).clone() {
            return match g.reason {
                Some(r) => (r, g.message),
                None => (
                    Reason::ServerUnreachable,
                    format!("the server closed the connection: {}", g.message),
                ),
            };
        }
        let why = lock(&self.shared.why)
            .clone()
            .unwrap_or_else(|| "the connection ended".into());
        (Reason::ServerUnreachable, why)
    }

    /// Resolves once the connection is over.
    pub async fn ended(&self) {
        self.shared.ended.cancelled().await
    }

    /// Asks the server to open no more streams; the connection closes when the open ones end.
    pub fn finish(&self) {
        self.shared.finish.cancel();
    }

    /// Closes now.
    pub fn kill(&self) {
        self.shared.kill.cancel();
    }
}

impl Drop for TcpLink {
    fn drop(&mut self) {
        self.shared.kill.cancel();
    }
}

/// Dials the server, completes TLS and the HTTP/2 handshake, and waits for the control stream.
pub(super) async fn dial(
    server: &ServerAddr,
    proxy: Option<&ProxyUrl>,
    tls: Arc<rustls::ClientConfig>,
) -> Result<(TcpLink, Halves), ConnectFailure> {
    let authority = server.authority();
    let unreachable = |m: String| ConnectFailure {
        reason: Reason::ServerUnreachable,
        message: m,
    };
    let io = dial::connect(server, proxy, CONNECT_TIMEOUT).await?;
    let counters = Arc::new(Counters::default());
    // Boxed again so TLS runs over the same stream type as activation's (one copy of it in
    // the binary).
    let io: Box<dyn dial::Io> = Box::new(Counted::new(io, counters.clone()));
    let name = dial::server_name(&server.host).map_err(|message| ConnectFailure {
        reason: Reason::TlsError,
        message,
    })?;
    let handshake = tokio_rustls::TlsConnector::from(tls).connect(name, io);
    let tls = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| {
            unreachable(format!(
                "no TLS answer from {authority} within {CONNECT_TIMEOUT:?}"
            ))
        })?
        .map_err(|e| tls_failure(&authority, e))?;
    if tls.get_ref().1.alpn_protocol() != Some(ALPN_TCP) {
        return Err(no_tcp_transport(&authority));
    }
    let handshake = h2::server::Builder::new()
        .initial_window_size(h2io::settings::STREAM)
        .initial_connection_window_size(h2io::settings::CONNECTION)
        .max_frame_size(h2io::settings::FRAME)
        .max_send_buffer_size(h2io::settings::SEND_BUFFER)
        // The control stream, a goodbye and the request streams.
        .max_concurrent_streams(MAX_STREAMS + 2)
        .handshake::<_, Bytes>(tls);
    let mut h2 = tokio::time::timeout(CONNECT_TIMEOUT, handshake)
        .await
        .map_err(|_| unreachable(format!("no HTTP/2 answer from {authority}")))?
        .map_err(|e| unreachable(format!("HTTP/2 with {authority} failed: {e}")))?;
    let ping = h2
        .ping_pong()
        .ok_or_else(|| unreachable("HTTP/2 ping unavailable".into()))?;
    let (control_tx, control_rx) = oneshot::channel();
    let (streams_tx, streams) = mpsc::channel(MAX_STREAMS as usize);
    let shared = Arc::new(Shared::default());
    let rtt_ms = Arc::new(AtomicU64::new(0));
    tokio::spawn(drive(
        h2,
        ping,
        control_tx,
        streams_tx,
        shared.clone(),
        rtt_ms.clone(),
    ));
    let link = TcpLink {
        streams,
        shared,
        counters,
        rtt_ms,
    };
    match tokio::time::timeout(CONNECT_TIMEOUT, control_rx).await {
        Ok(Ok(control)) => Ok((link, control)),
        Ok(Err(_)) => {
            // The driver ended first: a goodbye (an unknown key, say) or a broken connection.
            let (reason, message) = link.end_reason();
            Err(ConnectFailure { reason, message })
        }
        Err(_) => {
            link.kill();
            Err(unreachable(format!(
                "{authority} opened no control stream within {CONNECT_TIMEOUT:?}"
            )))
        }
    }
}

/// A failed TLS handshake: rustls's own errors (a certificate, an alert) come as InvalidData.
fn tls_failure(authority: &str, e: std::io::Error) -> ConnectFailure {
    let rustls_error = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>());
    match rustls_error {
        Some(rustls::Error::AlertReceived(rustls::AlertDescription::NoApplicationProtocol)) => {
            no_tcp_transport(authority)
        }
        _ if e.kind() == std::io::ErrorKind::InvalidData => ConnectFailure {
            reason: Reason::TlsError,
            message: format!(
                "TLS with {authority} failed: {e} (check server.pin_sha256 / server.ca_file)"
            ),
        },
        _ => ConnectFailure {
            reason: Reason::ServerUnreachable,
            message: format!("the TLS handshake with {authority} broke off: {e}"),
        },
    }
}

fn no_tcp_transport(authority: &str) -> ConnectFailure {
    ConnectFailure {
        reason: Reason::ProtocolMismatch,
        message: format!(
            "{authority} does not offer the tunnel over TCP (ALPN pbxra-tcp/1); upgrade the \
             server, or set [tunnel] transport = \"quic\""
        ),
    }
}

type Connection = h2::server::Connection<tokio_rustls::client::TlsStream<Box<dyn dial::Io>>, Bytes>;

/// Drives the connection until it ends: hands the control stream and request streams over,
/// reads a goodbye, pings.
async fn drive(
    mut h2: Connection,
    ping: h2::PingPong,
    control: oneshot::Sender<Halves>,
    streams: mpsc::Sender<Halves>,
    shared: Arc<Shared>,
    rtt_ms: Arc<AtomicU64>,
) {
    let mut control = Some(control);
    let keepalive = crate::tunnelio::keepalive(ping, KEEPALIVE, IDLE_TIMEOUT, &rtt_ms);
    tokio::pin!(keepalive);
    let mut finishing = false;
    let why = loop {
        tokio::select! {
            _ = shared.finish.cancelled(), if !finishing => {
                finishing = true;
                h2.graceful_shutdown();
            }
            _ = shared.kill.cancelled() => break "closed".to_string(),
            why = &mut keepalive => break why,
            next = h2.accept() => match next {
                None => break "the server closed the connection".to_string(),
                Some(Err(e)) => break format!("the connection failed: {e}"),
                Some(Ok((req, mut respond))) => {
                    let path = req.uri().path().to_string();
                    let recv = req.into_body();
                    let send = match respond.send_response(http::Response::new(()), false) {
                        Ok(s) => s,
                        Err(e) => {
                            tracing::debug!(error = %e, "stream gone before its answer");
                            continue;
                        }
                    };
                    let halves = (SendHalf::Tcp(H2Write::new(send)), RecvHalf::Tcp(H2Read::body(recv)));
                    match path.as_str() {
                        CONTROL_PATH if control.is_some() => {
                            if let Some(tx) = control.take() {
                                let _ = tx.send(halves);
                            }
                        }
                        STREAM_PATH => {
                            if let Err(e) = streams.try_send(halves) {
                                if let (SendHalf::Tcp(w), _) = e.into_inner() {
                                    w.reset(h2::Reason::REFUSED_STREAM);
                                }
                            }
                        }
                        GOODBYE_PATH => {
                            tokio::spawn(read_goodbye(halves.1, shared.clone()));
                        }
                        other => {
                            tracing::debug!(path = other, "unknown stream refused");
                            if let SendHalf::Tcp(w) = halves.0 {
                                w.reset(h2::Reason::REFUSED_STREAM);
                            }
                        }
                    }
                }
            }
        }
    };
    lock(&shared.why).get_or_insert(why);
    shared.ended.cancel();
}

/// Reads the server's reason for closing, then lets the connection go.
async fn read_goodbye(mut recv: RecvHalf, shared: Arc<Shared>) {
    let said =
        tokio::time::timeout(Duration::from_secs(2), read_frame::<_, Goodbye>(&mut recv)).await;
    if let Ok(Ok(Some(goodbye))) = said {
        tracing::debug!(reason = ?goodbye.reason, "the server closes the connection");
        *lock(&shared.goodbye) = Some(goodbye);
    }
    shared.kill.cancel();
}
