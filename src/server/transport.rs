//! A tunnel connection whichever transport carries it (DESIGN §10): QUIC, or TLS 1.3 over TCP
//! with HTTP/2 framing on the activation API's port. On TCP the agent dialled, but it is the h2
//! server: the hub opens the control stream and one stream per proxied request, as on QUIC, and
//! says why it closes on a stream of its own (QUIC says it in the close frame).

use crate::h2io::{self, H2Read, H2Write, CONTROL_PATH, GOODBYE_PATH, STREAM_PATH};
use crate::protocol::{Goodbye, Reason, ALPN_TCP, CLOSE_NORMAL, IDLE_TIMEOUT, KEEPALIVE};
use crate::server::ServerState;
use crate::tunnelio::{RecvHalf, SendHalf, Transport};
use anyhow::{Context, Result};
use bytes::Bytes;
use rustls::pki_types::CertificateDer;
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

/// How long a closing TCP tunnel waits for the agent to read the goodbye and hang up.
const GOODBYE_GRACE: Duration = Duration::from_secs(2);

/// A device's tunnel connection.
#[derive(Clone)]
pub enum Conn {
    /// QUIC.
    Quic(quinn::Connection),
    /// TLS over TCP with HTTP/2 framing.
    Tcp(TcpConn),
}

/// The hub's side of a TCP transport connection (cheap to clone).
#[derive(Clone)]
pub struct TcpConn {
    inner: Arc<TcpInner>,
}

struct TcpInner {
    requests: h2::client::SendRequest<Bytes>,
    peer: SocketAddr,
    /// Cancelled when the connection is over.
    ended: CancellationToken,
    /// Cancelled to drop the connection at once.
    kill: CancellationToken,
    /// Why it ended.
    why: Mutex<Option<String>>,
    /// Set once a goodbye is on its way (the first reason stands).
    closing: std::sync::atomic::AtomicBool,
}

impl Conn {
    /// Which transport.
    pub fn transport(&self) -> Transport {
        match self {
            Conn::Quic(_) => Transport::Quic,
            Conn::Tcp(_) => Transport::Tcp,
        }
    }

    /// The agent's address as this server sees it.
    pub fn remote_address(&self) -> SocketAddr {
        match self {
            Conn::Quic(c) => c.remote_address(),
            Conn::Tcp(t) => t.inner.peer,
        }
    }

    /// Opens a stream to the agent.
    pub async fn open_bi(&self) -> Result<(SendHalf, RecvHalf)> {
        match self {
            Conn::Quic(c) => {
                let (send, recv) = c.open_bi().await?;
                Ok((SendHalf::Quic(send), RecvHalf::Quic(recv)))
            }
            Conn::Tcp(t) => t.open(STREAM_PATH).await,
        }
    }

    /// Closes the connection telling the agent why (`None`: no fault, e.g. the server stops).
    pub fn close(&self, reason: Option<Reason>, message: &str) {
        match self {
            Conn::Quic(c) => {
                let code = reason.map_or(CLOSE_NORMAL, Reason::close_code);
                c.close(code.into(), message.as_bytes());
            }
            Conn::Tcp(t) => t.close(reason, message),
        }
    }

    /// Resolves when the connection is over, with why.
    pub async fn closed(&self) -> String {
        match self {
            Conn::Quic(c) => c.closed().await.to_string(),
            Conn::Tcp(t) => {
                t.inner.ended.cancelled().await;
                lock(&t.inner.why)
                    .clone()
                    .unwrap_or_else(|| "connection closed".into())
            }
        }
    }

    /// The control stream: QUIC's first stream is the agent's; on TCP the hub opens it.
    pub(crate) async fn control_stream(&self) -> Result<(SendHalf, RecvHalf)> {
        match self {
            Conn::Quic(c) => {
                let (send, recv) = c.accept_bi().await?;
                Ok((SendHalf::Quic(send), RecvHalf::Quic(recv)))
            }
            Conn::Tcp(t) => t.open(CONTROL_PATH).await,
        }
    }
}

impl TcpConn {
    async fn open(&self, path: &str) -> Result<(SendHalf, RecvHalf)> {
        let mut requests = self.inner.requests.clone().ready().await?;
        let req = http::Request::post(format!("https://tunnel{path}"))
            .body(())
            .context("stream request")?;
        let (answer, send) = requests.send_request(req, false)?;
        Ok((
            SendHalf::Tcp(H2Write::new(send)),
            RecvHalf::Tcp(H2Read::answer(answer)),
        ))
    }

    fn close(&self, reason: Option<Reason>, message: &str) {
        use std::sync::atomic::Ordering;
        if self.inner.closing.swap(true, Ordering::SeqCst) || self.inner.ended.is_cancelled() {
            return;
        }
        let goodbye = Goodbye {
            reason,
            message: message.to_string(),
        };
        *lock(&self.inner.why) = Some(format!("closed by the server: {message}"));
        let inner = self.inner.clone();
        tokio::spawn(async move {
            let say = async {
                // The same framing as every control frame.
                let mut frame = Vec::new();
                crate::protocol::write_frame(&mut frame, &goodbye).await?;
                let mut requests = inner.requests.clone().ready().await?;
                let req = http::Request::post(format!("https://tunnel{GOODBYE_PATH}")).body(())?;
                let (answer, mut send) = requests.send_request(req, false)?;
                send.send_data(Bytes::from(frame), true)?;
                // Both halves stay held until the agent hangs up: dropping them would reset the
                // stream, and a reset can overtake the goodbye's bytes at the agent.
                let _ = answer.await;
                inner.ended.cancelled().await;
                drop(send);
                anyhow::Ok(())
            };
            // The agent hangs up once it has read it; if it does not, the server does.
            let _ = tokio::time::timeout(GOODBYE_GRACE, say).await;
            inner.kill.cancel();
        });
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Invariant: nothing panics while these short-lived locks are held.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// TLS for the TCP transport: TLS 1.3 only, the device key as client certificate (required),
/// ALPN `pbxra-tcp/1`.
pub fn tcp_tls(keys: &crate::server::keys::ServerKeys) -> Result<Arc<rustls::ServerConfig>> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(crate::tls::DeviceKeyVerifier::new()))
        .with_single_cert(keys.certs.clone(), keys.key.clone_key())
        .context("server TLS certificate")?;
    cfg.alpn_protocols = vec![ALPN_TCP.to_vec()];
    Ok(Arc::new(cfg))
}

/// True when a ClientHello asks for the TCP transport.
pub fn wants_tunnel(hello: &rustls::server::ClientHello<'_>) -> bool {
    hello.alpn().is_some_and(|mut a| a.any(|p| p == ALPN_TCP))
}

/// The agent's key hash from a finished TLS handshake.
pub fn peer_key_hash_tls(conn: &rustls::ServerConnection) -> Result<[u8; 32]> {
    key_hash_of(conn.peer_certificates().context("no client certificate")?)
}

/// The hash of the key in the first certificate of a peer's chain (how the registry knows a
/// node, over either transport).
pub(crate) fn key_hash_of(certs: &[CertificateDer<'static>]) -> Result<[u8; 32]> {
    let first = certs.first().context("empty client certificate chain")?;
    crate::tls::spki_sha256(first)
}

/// Runs h2 over an accepted TLS connection and returns the hub's handle on it; the connection
/// is driven by a task of its own until it ends, `shutdown` comes, or the handle closes it.
pub async fn start_tcp(
    tls: tokio_rustls::server::TlsStream<TcpStream>,
    peer: SocketAddr,
    shutdown: CancellationToken,
) -> Result<Conn> {
    let (requests, mut connection) = h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(h2io::settings::STREAM)
        .initial_connection_window_size(h2io::settings::CONNECTION)
        .max_frame_size(h2io::settings::FRAME)
        .max_send_buffer_size(h2io::settings::SEND_BUFFER)
        .handshake::<_, Bytes>(tls)
        .await
        .context("HTTP/2 handshake")?;
    let ping = connection.ping_pong().context("h2 ping")?;
    let inner = Arc::new(TcpInner {
        requests,
        peer,
        ended: CancellationToken::new(),
        kill: CancellationToken::new(),
        why: Mutex::new(None),
        closing: Default::default(),
    });
    let conn = TcpConn {
        inner: inner.clone(),
    };
    let closer = conn.clone();
    tokio::spawn(async move {
        let rtt = AtomicU64::new(0);
        let why = tokio::select! {
            r = &mut connection => match r {
                Ok(()) => "the agent closed the connection".to_string(),
                Err(e) => format!("connection failed: {e}"),
            },
            why = crate::tunnelio::keepalive(ping, KEEPALIVE, IDLE_TIMEOUT, &rtt) => why,
            _ = inner.kill.cancelled() => "closed".to_string(),
            _ = shutdown.cancelled() => {
                closer.close(None, "server stopping");
                tokio::select! {
                    _ = &mut connection => {}
                    _ = inner.kill.cancelled() => {}
                }
                "server stopping".to_string()
            }
        };
        lock(&inner.why).get_or_insert(why);
        inner.ended.cancel();
    });
    Ok(Conn::Tcp(conn))
}

/// Serves the API's TLS listener: a ClientHello asking for `pbxra-tcp/1` becomes a tunnel
/// connection handed to the hub; anything else gets the API.
#[derive(Clone)]
pub struct ApiOrTunnel {
    /// The API's TLS (ALPN http/1.1).
    pub api: Arc<rustls::ServerConfig>,
    /// The TCP transport's TLS.
    pub tunnel: Arc<rustls::ServerConfig>,
    /// Where tunnel connections go.
    pub state: Arc<ServerState>,
    /// Ends tunnel connections when the server stops.
    pub shutdown: CancellationToken,
    /// Where the links run ([`crate::server::hub::serve`]).
    pub links: tokio::runtime::Handle,
}

impl crate::httpserve::Handshake for ApiOrTunnel {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    fn is_tls(&self) -> bool {
        true
    }
    async fn handshake(&self, tcp: TcpStream) -> std::io::Result<Option<Self::Io>> {
        let peer = tcp.peer_addr()?;
        let start =
            tokio_rustls::LazyConfigAcceptor::new(rustls::server::Acceptor::default(), tcp).await?;
        if !wants_tunnel(&start.client_hello()) {
            return start.into_stream(self.api.clone()).await.map(Some);
        }
        let tls = start.into_stream(self.tunnel.clone()).await?;
        let _ = tls.get_ref().0.set_nodelay(true);
        let (state, shutdown, links) = (
            self.state.clone(),
            self.shutdown.clone(),
            self.links.clone(),
        );
        tokio::spawn(async move {
            if let Err(e) = crate::server::hub::handle_tcp(state, tls, peer, &links, shutdown).await
            {
                tracing::info!(%peer, error = %format!("{e:#}"), "tunnel connection ended");
            }
        });
        Ok(None)
    }
}
