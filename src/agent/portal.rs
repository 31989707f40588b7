//! The client side towards the PBX web portal: the one upstream (`pbx.portal_url`), reached over
//! http or https (trusted by `portal_ca_file`, the system roots, or — for a loopback portal — a
//! key pinned on first use), with a small pool of keep-alive connections.

use crate::config::AgentConfig;
use crate::crypto::ct_eq;
use crate::tls::{self, spki_sha256};
use anyhow::{Context, Result};
use bytes::Bytes;
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpSocket, TcpStream};

/// Connect timeout towards the portal.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Keep-alive connections kept per agent. A smaller pool costs small-request rate and burst
/// latency; a larger one costs memory under a burst (past the RSS target at 256) for little
/// more rate. 128 takes most of the gain and holds half the idle portal connections of 256
/// (figures: `bench/README.md`). Idle ones live until the portal closes them.
const POOL_SIZE: usize = 128;

/// How long a request that finds every pooled connection busy waits for one of them before it
/// opens a connection of its own (dropped afterwards). Without the wait, every request past the
/// pool's size connected: in the benchmark's burst one request in eight, each a TCP handshake
/// (and for an https portal a TLS one) on the PBX's CPU. The portal answers a busy moment's
/// requests in turn either way, so the wait costs no rate; a connection held by a long
/// download costs its waiter this much before it connects.
const FREE_WAIT: Duration = Duration::from_millis(25);

/// A request body toward the portal: the visitor's, streamed, or one the agent holds (its own
/// login form, or a small body kept to send again after a new portal login). One type, so the
/// portal client exists once in the binary.
pub enum UpBody {
    /// The visitor's body as it arrives.
    Stream(Incoming),
    /// Bytes in hand (taken when sent).
    Full(Option<Bytes>),
}

impl hyper::body::Body for UpBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        match self.get_mut() {
            UpBody::Stream(b) => std::pin::Pin::new(b).poll_frame(cx),
            UpBody::Full(b) => {
                std::task::Poll::Ready(b.take().map(|d| Ok(hyper::body::Frame::data(d))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpBody::Stream(b) => b.is_end_stream(),
            UpBody::Full(b) => b.is_none(),
        }
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match self {
            UpBody::Stream(b) => b.size_hint(),
            UpBody::Full(b) => {
                hyper::body::SizeHint::with_exact(b.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}

/// Why a portal request failed; decides 502 or 504.
#[derive(Debug, thiserror::Error)]
pub enum PortalError {
    /// No connection or a broken one.
    #[error("the PBX web portal is unreachable: {0}")]
    Unreachable(String),
    /// No response headers within `portal_timeout_secs`.
    #[error("the PBX web portal did not answer within {0:?}")]
    Timeout(Duration),
}

/// The portal upstream.
pub struct Portal {
    host: String,
    port: u16,
    authority: String,
    /// `authority` as the `Host` value every request carries.
    host_header: hyper::header::HeaderValue,
    origin: String,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    source: Option<IpAddr>,
    timeout: Duration,
    pool: Mutex<Pool>,
    pool_size: usize,
}

/// The kept connections (busy ones too: a sender goes back as soon as its request is
/// dispatched) and how many of them requests have taken out to wait for.
#[derive(Default)]
struct Pool {
    senders: Vec<SendRequest<UpBody>>,
    waiting: usize,
}

impl Pool {
    /// Keeps a connection that is open, if the pool has room.
    fn keep(&mut self, sender: SendRequest<UpBody>, size: usize) {
        if !sender.is_closed() && self.senders.len() + self.waiting < size {
            self.senders.push(sender);
        }
    }
}

/// What a request gets from the pool.
enum Taken<'a> {
    /// An idle connection.
    Ready(SendRequest<UpBody>),
    /// Every kept connection is busy: wait for this one.
    Busy(Waiting<'a>),
    /// Room for one more: connect.
    Connect,
}

/// A busy kept connection a request waits for. It counts against the pool until dropped, and
/// goes back to the pool when dropped still holding it (the wait gave up, or the request was
/// cancelled while waiting).
struct Waiting<'a> {
    portal: &'a Portal,
    sender: Option<SendRequest<UpBody>>,
}

impl Waiting<'_> {
    /// The connection, once it is free before `until`; `None` if it is not, or it closed (the
    /// wait ends either way, and an open connection goes back to the pool).
    async fn until_free(mut self, until: tokio::time::Instant) -> Option<SendRequest<UpBody>> {
        let sender = self.sender.as_mut()?;
        let freed = tokio::time::timeout_at(until, sender.ready()).await;
        matches!(freed, Ok(Ok(())))
            .then(|| self.sender.take())
            .flatten()
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut pool = self.portal.lock();
        pool.waiting -= 1;
        if let Some(s) = self.sender.take() {
            pool.keep(s, self.portal.pool_size);
        }
    }
}

impl Portal {
    /// Builds the upstream from the config; `state_dir` holds a first-use pin if one is needed.
    pub fn new(config: &AgentConfig, state_dir: PathBuf) -> Result<Portal> {
        let url = &config.pbx.portal_url;
        let host = url
            .host_str()
            .context("pbx.portal_url has no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let https = url.scheme() == "https";
        let port = url
            .port_or_known_default()
            .unwrap_or(if https { 443 } else { 80 });
        let authority = url[url::Position::BeforeHost..url::Position::AfterPort].to_string();
        let origin = format!("{}://{}", url.scheme(), authority);
        let tls = if https {
            let name = ServerName::try_from(host.clone())
                .context("pbx.portal_url host is not a valid TLS name")?;
            let provider = tls::provider();
            let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .context("TLS versions")?;
            let builder = if let Some(ca) = &config.pbx.portal_ca_file {
                builder.with_root_certificates(tls::load_roots(ca)?)
            } else if host
                .parse::<IpAddr>()
                .map(|ip| ip.is_loopback())
                .unwrap_or(host == "localhost")
            {
                builder
                    .dangerous()
                    .with_custom_certificate_verifier(Arc::new(FirstUsePin {
                        file: state_dir.join("portal.pin"),
                        provider,
                    }))
            } else {
                let mut roots = rustls::RootCertStore::empty();
                for c in rustls_native_certs::load_native_certs().certs {
                    let _ = roots.add(c);
                }
                builder.with_root_certificates(roots)
            };
            let mut cfg = builder.with_no_client_auth();
            cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some((tokio_rustls::TlsConnector::from(Arc::new(cfg)), name))
        } else {
            None
        };
        let host_header = hyper::header::HeaderValue::from_str(&authority)
            .context("pbx.portal_url's host and port cannot be a Host header")?;
        Ok(Portal {
            host,
            port,
            host_header,
            authority,
            origin,
            tls,
            source: config.pbx.portal_source_addr,
            timeout: config.tunnel.portal_timeout,
            pool: Mutex::new(Pool::default()),
            pool_size: POOL_SIZE,
        })
    }

    /// `host[:port]` as the portal expects it in `Host`.
    pub fn host_header(&self) -> &hyper::header::HeaderValue {
        &self.host_header
    }

    /// `scheme://authority` of the portal.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Sends a request (origin-form URI, headers already sanitised) and waits for the response
    /// headers up to the portal timeout. Upgrades always get a fresh connection; a request that
    /// a stale pooled connection did not take is retried once on a fresh one.
    pub async fn send(&self, req: Request<UpBody>) -> Result<Response<Incoming>, PortalError> {
        let upgrade = req.headers().contains_key(hyper::header::UPGRADE);
        let deadline = tokio::time::Instant::now() + self.timeout;
        let mut req = req;
        for attempt in 0..2 {
            let pooled = if upgrade || attempt > 0 {
                None
            } else {
                match self.take() {
                    Taken::Ready(s) => Some(s),
                    Taken::Connect => None,
                    Taken::Busy(w) => {
                        w.until_free(deadline.min(tokio::time::Instant::now() + FREE_WAIT))
                            .await
                    }
                }
            };
            let mut sender = match pooled {
                Some(s) => s,
                None => self.connect(upgrade).await?,
            };
            let fut = sender.try_send_request(req);
            if !upgrade {
                self.put_back(sender);
            }
            match tokio::time::timeout_at(deadline, fut).await {
                Err(_) => return Err(PortalError::Timeout(self.timeout)),
                Ok(Ok(resp)) => return Ok(resp),
                Ok(Err(mut e)) => match e.take_message() {
                    Some(back) if attempt == 0 => req = back,
                    _ => return Err(PortalError::Unreachable(e.into_error().to_string())),
                },
            }
        }
        Err(PortalError::Unreachable("connection closed".into()))
    }

    /// Opens (and drops) a fresh connection: TCP, and TLS for an https portal. Returns how long
    /// that took. Telemetry uses it; no HTTP request reaches the portal's logs. Bounded by 5 s
    /// (or the portal timeout if shorter) so a stuck portal cannot hold up the heartbeat.
    pub async fn probe(&self) -> Result<Duration, PortalError> {
        let limit = self.timeout.min(Duration::from_secs(5));
        let started = tokio::time::Instant::now();
        let sender = tokio::time::timeout(limit, self.connect(true))
            .await
            .map_err(|_| PortalError::Timeout(limit))??;
        drop(sender);
        Ok(started.elapsed())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Pool> {
        // Invariant: the lock is never held across an await; poisoning would need a panic in
        // the few lines it guards, and the pool content stays valid even then.
        self.pool.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn take(&self) -> Taken<'_> {
        let mut pool = self.lock();
        pool.senders.retain(|s| !s.is_closed());
        if let Some(idx) = pool.senders.iter().position(|s| s.is_ready()) {
            return Taken::Ready(pool.senders.swap_remove(idx));
        }
        if pool.senders.len() + pool.waiting < self.pool_size || pool.senders.is_empty() {
            return Taken::Connect;
        }
        pool.waiting += 1;
        Taken::Busy(Waiting {
            portal: self,
            sender: Some(pool.senders.swap_remove(0)),
        })
    }

    fn put_back(&self, sender: SendRequest<UpBody>) {
        self.lock().keep(sender, self.pool_size);
    }

    /// How many portal connections are kept (for tests).
    #[cfg(test)]
    fn kept(&self) -> usize {
        self.lock().senders.len()
    }

    #[cfg(test)]
    fn with_pool_size(mut self, n: usize) -> Portal {
        self.pool_size = n;
        self
    }

    async fn connect(&self, upgrade: bool) -> Result<SendRequest<UpBody>, PortalError> {
        let unreachable = |e: String| PortalError::Unreachable(e);
        let tcp = tokio::time::timeout(CONNECT_TIMEOUT, self.connect_tcp())
            .await
            .map_err(|_| unreachable(format!("connect to {} timed out", self.authority)))?
            .map_err(|e| unreachable(format!("{e:#}")))?;
        let _ = tcp.set_nodelay(true);
        let io: Box<dyn Io> = match &self.tls {
            None => Box::new(tcp),
            Some((connector, name)) => Box::new(
                tokio::time::timeout(CONNECT_TIMEOUT, connector.connect(name.clone(), tcp))
                    .await
                    .map_err(|_| unreachable("TLS handshake with the portal timed out".into()))?
                    .map_err(|e| unreachable(format!("TLS with the portal failed: {e}")))?,
            ),
        };
        let (mut sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake(TokioIo::new(io))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        tokio::spawn(async move {
            // Errors here surface on the request future; nothing to log twice.
            let _ = if upgrade {
                conn.with_upgrades().await
            } else {
                conn.await
            };
        });
        sender
            .ready()
            .await
            .map_err(|e| unreachable(e.to_string()))?;
        Ok(sender)
    }

    async fn connect_tcp(&self) -> Result<TcpStream> {
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((self.host.as_str(), self.port))
            .await
            .with_context(|| format!("cannot resolve {}", self.host))?
            .collect();
        let mut last = None;
        for addr in addrs {
            let result = match self.source {
                None => TcpStream::connect(addr).await.map_err(anyhow::Error::from),
                Some(src) => {
                    async {
                        let sock = if addr.is_ipv4() {
                            TcpSocket::new_v4()?
                        } else {
                            TcpSocket::new_v6()?
                        };
                        sock.bind(SocketAddr::new(src, 0))
                            .with_context(|| format!("cannot bind pbx.portal_source_addr {src}"))?;
                        Ok(sock.connect(addr).await?)
                    }
                    .await
                }
            };
            match result {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e.context(format!("connect to {addr}"))),
            }
        }
        Err(last.unwrap_or_else(|| anyhow::anyhow!("{} resolved to no address", self.host)))
    }
}

trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

/// Trust for a loopback https portal without a CA: the first key seen is pinned in the state
/// directory and required from then on. Handshake signatures are always verified.
#[derive(Debug)]
struct FirstUsePin {
    file: PathBuf,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for FirstUsePin {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let bad = |_| rustls::Error::InvalidCertificate(rustls::CertificateError::BadEncoding);
        let got = spki_sha256(end_entity).map_err(bad)?;
        match crate::fsutil::read_private(&self.file) {
            Ok(Some(pinned)) => {
                let pinned =
                    hex::decode(String::from_utf8_lossy(&pinned).trim()).unwrap_or_default();
                if ct_eq(&pinned, &got) {
                    Ok(ServerCertVerified::assertion())
                } else {
                    tracing::error!(pin_file = %self.file.display(), "portal key differs from the key pinned on first use; delete the pin file if the portal certificate was replaced on purpose");
                    Err(rustls::Error::InvalidCertificate(
                        rustls::CertificateError::ApplicationVerificationFailure,
                    ))
                }
            }
            Ok(None) => {
                crate::fsutil::write_private(&self.file, hex::encode(got).as_bytes()).map_err(
                    |e| rustls::Error::General(format!("cannot store portal pin: {e:#}")),
                )?;
                tracing::info!(pin_file = %self.file.display(), "pinned the portal key on first use");
                Ok(ServerCertVerified::assertion())
            }
            Err(e) => Err(rustls::Error::General(format!("portal pin: {e:#}"))),
        }
    }

    tls::verify_handshake_signatures!();
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A portal that answers each request after `delay`; counts the connections it accepts.
    async fn slow_portal(delay: Duration) -> (u16, Arc<AtomicUsize>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let service = hyper::service::service_fn(move |_req| async move {
                    tokio::time::sleep(delay).await;
                    Ok::<_, std::convert::Infallible>(Response::new(http_body_util::Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                });
                tokio::spawn(
                    hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service),
                );
            }
        });
        (port, accepted)
    }

    fn portal(port: u16, pool: usize) -> Portal {
        let text = include_str!("../../config/agent.toml").replacen(
            "https://127.0.0.1:8088",
            &format!("http://127.0.0.1:{port}"),
            1,
        );
        let config = AgentConfig::parse(std::path::Path::new("/etc/agent.toml"), &text).unwrap();
        Portal::new(&config, PathBuf::from("/nonexistent"))
            .unwrap()
            .with_pool_size(pool)
    }

    async fn get(portal: &Portal) -> Vec<u8> {
        let req = Request::get("/")
            .header(hyper::header::HOST, portal.host_header())
            .body(UpBody::Full(None))
            .unwrap();
        let resp = portal.send(req).await.unwrap();
        resp.into_body()
            .collect()
            .await
            .unwrap()
            .to_bytes()
            .to_vec()
    }

    #[tokio::test]
    async fn past_the_pool_a_request_waits_for_a_kept_connection_instead_of_connecting() {
        let (port, accepted) = slow_portal(Duration::from_millis(5)).await;
        let portal = portal(port, 2);
        // Two kept connections, then twice as many requests at once as the pool holds.
        futures_util::future::join_all((0..2).map(|_| get(&portal))).await;
        assert_eq!((accepted.load(Ordering::SeqCst), portal.kept()), (2, 2));
        for round in 0..3 {
            let bodies = futures_util::future::join_all((0..4).map(|_| get(&portal))).await;
            assert!(bodies.iter().all(|b| b == b"ok"));
            assert_eq!(accepted.load(Ordering::SeqCst), 2, "round {round}");
        }
        assert_eq!(portal.kept(), 2);
        assert_eq!(portal.lock().waiting, 0);
    }

    #[tokio::test]
    async fn a_connection_held_longer_than_the_wait_gets_the_waiter_its_own() {
        let (port, accepted) = slow_portal(FREE_WAIT * 4).await;
        let portal = portal(port, 1);
        get(&portal).await;
        let started = tokio::time::Instant::now();
        futures_util::future::join_all((0..2).map(|_| get(&portal))).await;
        // The second request waited FREE_WAIT for the busy one, then connected: both answered
        // in about one portal delay, not two.
        assert!(
            started.elapsed() < FREE_WAIT * 4 * 2,
            "{:?}",
            started.elapsed()
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
        assert_eq!((portal.kept(), portal.lock().waiting), (1, 0));
    }
}
