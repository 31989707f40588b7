//! One way to serve HTTP/1.1 on a TCP listener, used by the server's front and activation API,
//! the agent's metrics endpoint and the demo portal: a bounded number of connections (one over
//! the bound is answered `503` and closed, and logged, never dropped in silence), an optional
//! TLS handshake under its own timeout, named header-read and idle timeouts, and a graceful
//! drain on shutdown (in-flight requests finish, idle connections close, stragglers are cut
//! after [`Limits::drain`]).

use hyper::body::{Body, Incoming};
use hyper::service::Service;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// Time a client has to send a request's headers. hyper also starts this timer when a
/// keep-alive connection goes idle after a response, so it is the idle timeout too.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Time a client has to complete the TLS handshake.
pub const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long shutdown waits for requests in flight before closing their connections.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);

/// How often a full listener logs that it refuses connections (at most).
const REFUSAL_LOG_EVERY: Duration = Duration::from_secs(10);

/// Answer to a connection over the bound (plain HTTP only; a TLS client just sees the close).
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: text/plain\r\n\
content-length: 20\r\nretry-after: 1\r\nconnection: close\r\n\r\ntoo many connections";

/// How a connection starts: plain TCP ([`Plain`]) or a TLS handshake first (a
/// `tokio_rustls::TlsAcceptor`; `Option` of one decides at run time). A type rather than an
/// `Option` argument, so a binary that serves only plain HTTP (the agent's metrics endpoint)
/// carries no TLS server code: that `Option` cost the stripped agent 97 KB of rustls.
pub trait Handshake: Clone + Send + Sync + 'static {
    /// The stream HTTP runs on.
    type Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    /// Whether the handshake is TLS (a plain connection over the bound gets a 503 text).
    fn is_tls(&self) -> bool;
    /// Turns the accepted socket into the stream HTTP runs on; `None` when the handshake
    /// handed the connection to something else (the API's port also takes TCP tunnels).
    fn handshake(
        &self,
        tcp: TcpStream,
    ) -> impl std::future::Future<Output = std::io::Result<Option<Self::Io>>> + Send;
}

/// Plain HTTP: the socket as it is.
#[derive(Debug, Clone, Copy)]
pub struct Plain;

impl Handshake for Plain {
    type Io = TcpStream;
    fn is_tls(&self) -> bool {
        false
    }
    fn handshake(
        &self,
        tcp: TcpStream,
    ) -> impl std::future::Future<Output = std::io::Result<Option<TcpStream>>> + Send {
        std::future::ready(Ok(Some(tcp)))
    }
}

impl Handshake for tokio_rustls::TlsAcceptor {
    type Io = tokio_rustls::server::TlsStream<TcpStream>;
    fn is_tls(&self) -> bool {
        true
    }
    fn handshake(
        &self,
        tcp: TcpStream,
    ) -> impl std::future::Future<Output = std::io::Result<Option<Self::Io>>> + Send {
        let accept = self.accept(tcp);
        async move { accept.await.map(Some) }
    }
}

impl<H: Handshake> Handshake for Option<H> {
    type Io = tokio_util::either::Either<TcpStream, H::Io>;
    fn is_tls(&self) -> bool {
        self.as_ref().is_some_and(H::is_tls)
    }
    fn handshake(
        &self,
        tcp: TcpStream,
    ) -> impl std::future::Future<Output = std::io::Result<Option<Self::Io>>> + Send {
        let h = self.clone();
        async move {
            match h {
                None => Ok(Some(tokio_util::either::Either::Left(tcp))),
                Some(h) => Ok(h
                    .handshake(tcp)
                    .await?
                    .map(tokio_util::either::Either::Right)),
            }
        }
    }
}

/// What one listener allows.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Name in log lines, e.g. "front".
    pub name: &'static str,
    /// Connections served at once.
    pub max_connections: usize,
    /// See [`HEADER_READ_TIMEOUT`].
    pub header_read: Duration,
    /// See [`TLS_HANDSHAKE_TIMEOUT`].
    pub tls_handshake: Duration,
    /// See [`DRAIN_TIMEOUT`].
    pub drain: Duration,
    /// Largest buffered request head (hyper's `max_buf_size`); `None` keeps hyper's default.
    pub max_buf_size: Option<usize>,
    /// Disable Nagle on accepted sockets (request/response traffic).
    pub nodelay: bool,
}

impl Limits {
    /// The default timeouts for a listener called `name` with room for `max_connections`.
    pub fn new(name: &'static str, max_connections: usize) -> Limits {
        Limits {
            name,
            max_connections,
            header_read: HEADER_READ_TIMEOUT,
            tls_handshake: TLS_HANDSHAKE_TIMEOUT,
            drain: DRAIN_TIMEOUT,
            max_buf_size: None,
            nodelay: false,
        }
    }
}

/// Serves `listener` until `shutdown`, then drains. `service` makes the per-connection hyper
/// service from the peer's address. Returns when every connection has ended.
pub async fn serve<H, F, S, B>(
    listener: TcpListener,
    tls: H,
    limits: Limits,
    shutdown: CancellationToken,
    service: F,
) where
    H: Handshake,
    F: Fn(SocketAddr) -> S,
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let limits = Arc::new(limits);
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let conns = TaskTracker::new();
    let mut refusals = Refusals::default();
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => break,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // EMFILE and the like: back off instead of spinning.
                    tracing::warn!(listener = limits.name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            if !tls.is_tls() {
                // Best effort and without waiting: the socket's send buffer is empty.
                let _ = tcp.try_write(BUSY);
            }
            refusals.note(&limits, peer);
            continue;
        };
        if limits.nodelay {
            let _ = tcp.set_nodelay(true);
        }
        let svc = service(peer);
        let (tls, limits, shutdown) = (tls.clone(), limits.clone(), shutdown.clone());
        conns.spawn(async move {
            let _permit = permit;
            if let Err(e) = connection(tcp, tls, &limits, svc, &shutdown).await {
                tracing::debug!(listener = limits.name, %peer, error = %e, "connection ended with an error");
            }
        });
    }
    // New connections are refused by the kernel from here on, not left waiting in the backlog.
    drop(listener);
    conns.close();
    if tokio::time::timeout(limits.drain, conns.wait())
        .await
        .is_err()
    {
        tracing::info!(
            listener = limits.name,
            open = conns.len(),
            "drain time is over; closing the remaining connections"
        );
    }
}

/// Counts refused connections and logs them at most every [`REFUSAL_LOG_EVERY`].
#[derive(Default)]
struct Refusals {
    since_log: u64,
    last_log: Option<Instant>,
}

impl Refusals {
    fn note(&mut self, limits: &Limits, peer: SocketAddr) {
        self.since_log += 1;
        if self
            .last_log
            .is_none_or(|t| t.elapsed() >= REFUSAL_LOG_EVERY)
        {
            tracing::warn!(
                listener = limits.name,
                %peer,
                refused = self.since_log,
                max_connections = limits.max_connections,
                "connection limit reached; refusing connections"
            );
            self.since_log = 0;
            self.last_log = Some(Instant::now());
        }
    }
}

async fn connection<H, S, B>(
    tcp: TcpStream,
    tls: H,
    limits: &Limits,
    svc: S,
    shutdown: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    H: Handshake,
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read);
    if let Some(max) = limits.max_buf_size {
        builder.max_buf_size(max);
    }
    let what = if tls.is_tls() {
        "TLS handshake"
    } else {
        "handshake"
    };
    let stream = tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        r = tokio::time::timeout(limits.tls_handshake, tls.handshake(tcp)) => match r {
            Ok(Ok(Some(s))) => s,
            // Handed over: not ours to serve.
            Ok(Ok(None)) => return Ok(()),
            Ok(Err(e)) => return Err(format!("{what}: {e}").into()),
            Err(_) => return Err(format!("{what} timed out").into()),
        },
    };
    drive(
        builder.serve_connection(TokioIo::new(stream), svc),
        limits,
        shutdown,
    )
    .await
}

/// Runs one connection (upgrades allowed); on shutdown asks it to finish what is in flight.
async fn drive<I, S, B>(
    conn: hyper::server::conn::http1::Connection<I, S>,
    limits: &Limits,
    shutdown: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    S: Service<http::Request<Incoming>, Response = http::Response<B>> + Send + 'static,
    S::Future: Send + 'static,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let conn = conn.with_upgrades();
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => return r.map_err(Into::into),
        _ = shutdown.cancelled() => {}
    }
    conn.as_mut().graceful_shutdown();
    match tokio::time::timeout(limits.drain, conn).await {
        Ok(r) => r.map_err(Into::into),
        Err(_) => Err("still busy when the drain time ran out".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::Full;
    use std::convert::Infallible;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::sync::{mpsc, Notify};

    type Resp = http::Response<Full<bytes::Bytes>>;

    struct Fixture {
        addr: SocketAddr,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        /// One message per request that reached the handler.
        entered: mpsc::UnboundedReceiver<()>,
        /// Lets one waiting handler answer.
        release: Arc<Notify>,
    }

    /// A server whose handler says it has a request, then waits for `release` to answer.
    async fn start(max: usize) -> Fixture {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = CancellationToken::new();
        let mut limits = Limits::new("test", max);
        limits.drain = Duration::from_secs(3);
        let release = Arc::new(Notify::new());
        let (tx, entered) = mpsc::unbounded_channel();
        let r = release.clone();
        let task = tokio::spawn(serve(listener, Plain, limits, stop.clone(), move |_| {
            let (release, tx) = (r.clone(), tx.clone());
            hyper::service::service_fn(move |_req| {
                let (release, tx) = (release.clone(), tx.clone());
                async move {
                    let _ = tx.send(());
                    release.notified().await;
                    Ok::<Resp, Infallible>(http::Response::new(Full::from("done")))
                }
            })
        }));
        Fixture {
            addr,
            stop,
            task,
            entered,
            release,
        }
    }

    async fn read_all(s: &mut TcpStream) -> String {
        let mut out = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
            .await
            .expect("the server must close the connection")
            .unwrap();
        String::from_utf8_lossy(&out).into_owned()
    }

    async fn request(f: &mut Fixture) -> TcpStream {
        let mut s = TcpStream::connect(f.addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(5), f.entered.recv())
            .await
            .expect("the request reaches the handler");
        s
    }

    #[tokio::test]
    async fn a_connection_over_the_bound_is_answered_503_and_closed() {
        let mut f = start(1).await;
        let mut first = request(&mut f).await;
        let mut second = TcpStream::connect(f.addr).await.unwrap();
        let refused = read_all(&mut second).await;
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused:?}");
        assert!(refused.contains("connection: close"), "{refused:?}");
        f.release.notify_one();
        f.stop.cancel();
        assert!(read_all(&mut first).await.ends_with("done"));
        f.task.await.unwrap();
    }

    #[tokio::test]
    async fn shutdown_lets_the_request_in_flight_finish_then_returns() {
        let mut f = start(4).await;
        // A keep-alive connection that has had its answer and now waits for the next request.
        let mut idle = request(&mut f).await;
        f.release.notify_one();
        let mut first = Vec::new();
        while !first.ends_with(b"done") {
            let mut buf = [0; 256];
            let n = tokio::time::timeout(Duration::from_secs(5), idle.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed before the first answer");
            first.extend_from_slice(&buf[..n]);
        }
        let mut busy = request(&mut f).await;
        f.stop.cancel();
        // The idle connection is closed without an answer; the busy one is answered first.
        assert_eq!(read_all(&mut idle).await, "");
        f.release.notify_one();
        let answer = read_all(&mut busy).await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
        assert!(answer.ends_with("done"), "{answer:?}");
        tokio::time::timeout(Duration::from_secs(5), f.task)
            .await
            .expect("serve returns after the drain")
            .unwrap();
    }
}
