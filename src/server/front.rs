//! The public front: serves each device at `DEVICE.PUBLIC_HOST`, turns visit links into grants
//! (`__cm_visit`), and forwards granted requests over QUIC streams to the device's agent, with
//! the stream header saying who is visiting. A visitor connection keeps its stream for its next
//! request to the same visit.

use crate::protocol::{write_frame, StreamHeader};
use crate::secret::Secret;
use crate::server::db::Grant;
use crate::server::ServerState;
use crate::web::{self, Body};
use anyhow::{Context, Result};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The front's grant cookie (plain-HTTP name).
pub const GRANT_COOKIE: &str = "__cm_visit";
/// The front's grant cookie on https.
pub const GRANT_COOKIE_SECURE: &str = "__Host-__cm_visit";
/// Where a passwordless visit lands to hand its token to the agent.
pub const PASSWORDLESS_PATH: &str = "/__remote/passwordless";
/// Time to open a stream to the agent.
const OPEN_STREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for a free tunnel stream before it gets 503 "busy".
const STREAM_WAIT: Duration = Duration::from_secs(1);
/// Concurrent visitor connections.
const MAX_CONNECTIONS: usize = 1024;

/// rustls acceptor for an https front.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<tokio_rustls::TlsAcceptor> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            crate::tls::load_certs(cert)?,
            crate::tls::load_private_key(key)?,
        )
        .context("--public-cert/--public-key")?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Serves the front until `shutdown`.
pub async fn serve(
    state: Arc<ServerState>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "front accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            continue;
        };
        let _ = tcp.set_nodelay(true);
        let (state, tls, shutdown) = (state.clone(), tls.clone(), shutdown.clone());
        tokio::spawn(async move {
            let _permit = permit;
            let svc = {
                let state = state.clone();
                let keeper = Keeper::default();
                let public = Arc::new(PublicUrl::of(&state));
                hyper::service::service_fn(move |req| {
                    let (state, keeper, public) = (state.clone(), keeper.clone(), public.clone());
                    async move {
                        let resp = handle(&state, &public, peer, &keeper, req).await;
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                })
            };
            let builder = {
                let mut b = hyper::server::conn::http1::Builder::new();
                b.timer(TokioTimer::new())
                    .header_read_timeout(Duration::from_secs(15))
                    .max_buf_size(64 * 1024);
                b
            };
            let result = match tls {
                None => {
                    let conn = builder
                        .serve_connection(TokioIo::new(tcp), svc)
                        .with_upgrades();
                    run_conn(conn, &shutdown).await
                }
                Some(tls) => {
                    match tokio::time::timeout(Duration::from_secs(10), tls.accept(tcp)).await {
                        Ok(Ok(stream)) => {
                            let conn = builder
                                .serve_connection(TokioIo::new(stream), svc)
                                .with_upgrades();
                            run_conn(conn, &shutdown).await
                        }
                        _ => Ok(()),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%peer, error = %e, "front connection error");
            }
        });
    }
}

async fn run_conn<C>(conn: C, shutdown: &CancellationToken) -> Result<(), hyper::Error>
where
    C: std::future::Future<Output = Result<(), hyper::Error>>,
{
    tokio::select! {
        r = conn => r,
        _ = shutdown.cancelled() => Ok(()),
    }
}

/// Visitor-facing view of the public URL.
struct PublicUrl {
    scheme: String,
    host: String,
    port_suffix: String,
}

impl PublicUrl {
    fn of(state: &ServerState) -> PublicUrl {
        let u = &state.opts.public_url;
        PublicUrl {
            scheme: u.scheme().to_string(),
            host: u.host_str().unwrap_or("localhost").to_ascii_lowercase(),
            port_suffix: u.port().map(|p| format!(":{p}")).unwrap_or_default(),
        }
    }

    fn device_origin(&self, device: &str) -> String {
        format!(
            "{}://{device}.{}{}",
            self.scheme, self.host, self.port_suffix
        )
    }

    fn secure(&self) -> bool {
        self.scheme == "https"
    }

    fn cookie_name(&self) -> &'static str {
        if self.secure() {
            GRANT_COOKIE_SECURE
        } else {
            GRANT_COOKIE
        }
    }

    /// The device label in `Host`, if it is one of ours.
    fn device_of(&self, host: &str) -> Option<String> {
        let name = match host.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) && !h.ends_with(']') => h,
            _ => host,
        };
        // `LABEL.` + our host, compared without case.
        let cut = name.len().checked_sub(self.host.len() + 1)?;
        let (label, suffix) = (name.get(..cut)?, name.get(cut..)?);
        let ours = suffix.starts_with('.') && suffix[1..].eq_ignore_ascii_case(&self.host);
        let valid = ours
            && !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        valid.then(|| label.to_ascii_lowercase())
    }
}

/// The link a visitor opens: `ORIGIN/__cm/visit/TOKEN?login=passwordless|account` (the query
/// only tells a human which kind of link it is; the token decides).
pub fn visit_url(public_url: &url::Url, device: &str, token: &str, passwordless: bool) -> String {
    let scheme = public_url.scheme();
    let host = public_url.host_str().unwrap_or("localhost");
    let port = public_url
        .port()
        .map(|p| format!(":{p}"))
        .unwrap_or_default();
    let login = if passwordless {
        "passwordless"
    } else {
        "account"
    };
    format!("{scheme}://{device}.{host}{port}/__cm/visit/{token}?login={login}")
}

fn client_addr(state: &ServerState, peer: SocketAddr, headers: &http::HeaderMap) -> IpAddr {
    let mut addr = peer.ip();
    if !state.opts.trusted_proxies.iter().any(|c| c.contains(addr)) {
        return addr;
    }
    let hops: Vec<IpAddr> = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|h| h.trim().parse().ok())
        .collect();
    for hop in hops.into_iter().rev() {
        addr = hop;
        if !state.opts.trusted_proxies.iter().any(|c| c.contains(hop)) {
            break;
        }
    }
    addr
}

async fn handle(
    state: &ServerState,
    public: &PublicUrl,
    peer: SocketAddr,
    keeper: &Keeper,
    req: Request<Incoming>,
) -> Response<Body> {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| req.uri().authority().map(|a| a.as_str()))
        .unwrap_or("");
    let Some(device) = public.device_of(host) else {
        return web::page(
            StatusCode::NOT_FOUND,
            "Unknown address",
            "This is the remote management front. Open a visit link from the management platform.",
        );
    };
    // Unknown devices get a clear 404; a valid grant implies the device (grants are deleted
    // with it), so the registry is asked only when there is no grant.
    let unknown_device = || match state.db.flags(&device) {
        Ok(Some(_)) => None,
        Ok(None) => Some(web::page(
            StatusCode::NOT_FOUND,
            "Unknown device",
            "No device is registered under this address.",
        )),
        Err(e) => Some(internal(e)),
    };
    if let Some(token) = req.uri().path().strip_prefix("/__cm/visit/") {
        let token = token.to_string();
        if let Some(page) = unknown_device() {
            return page;
        }
        return visit(state, public, &device, &token, req).await;
    }
    if req.uri().path().starts_with("/__cm/") {
        return web::page(StatusCode::NOT_FOUND, "Not found", "No such page.");
    }
    let grant = match web::cookie(req.headers(), public.cookie_name())
        .map(|c| keeper.grant(c, |c| Ok(state.db.grant_by_cookie(c)?.map(Arc::new))))
    {
        Some(Ok(Some(g))) if g.device_id == device => g,
        Some(Err(e)) => return internal(e),
        _ => {
            if let Some(page) = unknown_device() {
                return page;
            }
            return web::page(
                StatusCode::FORBIDDEN,
                "No active visit",
                "Open a visit link for this device from the management platform to reach its web portal.",
            );
        }
    };
    let client = client_addr(state, peer, req.headers());
    forward(state, public, &device, grant, client, keeper, req).await
}

fn internal(e: anyhow::Error) -> Response<Body> {
    tracing::error!(error = %format!("{e:#}"), "front error");
    web::page(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Server error",
        "The server could not handle this request.",
    )
}

async fn visit(
    state: &ServerState,
    public: &PublicUrl,
    device: &str,
    token: &str,
    req: Request<Incoming>,
) -> Response<Body> {
    let origin = public.device_origin(device);
    let gone = || {
        web::page(
            StatusCode::GONE,
            "Visit link not valid",
            "This visit link is unknown, expired (links last 10 minutes) or already used. Ask for a new one.",
        )
    };
    match *req.method() {
        Method::GET | Method::HEAD => {
            let Ok(Some((d, cm_user, passwordless))) = state.db.peek_visit(token) else {
                return gone();
            };
            if d != device {
                return gone();
            }
            let how = if passwordless {
                "You will be logged in to the PBX web portal as its super administrator."
            } else {
                "You will be asked for the PBX's remote account."
            };
            let action = format!("{origin}/__cm/visit/{token}");
            let body = format!(
                "<p>Open the web portal of <strong>{dev}</strong> as CM user <strong>{user}</strong>?</p>\
                 <p>{how}</p><form method=\"post\" action=\"{action}\"><button type=\"submit\">Open the PBX portal</button></form>",
                dev = web::escape(device),
                user = web::escape(&cm_user),
                how = how,
                action = web::escape(&action),
            );
            let mut resp = web::html(StatusCode::OK, "Remote visit", &body);
            // The token is in this page's URL: no other origin may see it. The form posts to
            // that same URL; under `no-referrer` browsers would send it with `Origin: null`,
            // which only browsers with `Sec-Fetch-Site` let the same-origin check tell apart
            // from another site's post. The redirect the post answers with is `no-referrer`,
            // so the token goes no further than this front.
            resp.headers_mut()
                .insert("referrer-policy", HeaderValue::from_static("same-origin"));
            resp
        }
        Method::POST => {
            if !web::same_origin(req.headers(), &origin) {
                return web::page(
                    StatusCode::FORBIDDEN,
                    "Cross-site request refused",
                    "Confirm the visit from its own page.",
                );
            }
            let (grant, cookie) = match state.db.redeem_visit(token, device) {
                Ok(Some(x)) => x,
                Ok(None) => return gone(),
                Err(e) => return internal(e),
            };
            tracing::info!(device, cm_user = %grant.cm_user, passwordless = grant.passwordless, "visit started");
            let secure = if public.secure() { "; Secure" } else { "" };
            let set = format!(
                "{}={cookie}; Path=/; HttpOnly; SameSite=Lax{secure}",
                public.cookie_name()
            );
            let target = if grant.passwordless {
                PASSWORDLESS_PATH
            } else {
                "/"
            };
            Response::builder()
                .status(StatusCode::SEE_OTHER)
                .header(header::LOCATION, target)
                .header(header::SET_COOKIE, set)
                .header(header::CACHE_CONTROL, "no-store")
                .header("referrer-policy", "no-referrer")
                .body(web::full(Bytes::new()))
                .unwrap_or_else(|_| web::page(StatusCode::INTERNAL_SERVER_ERROR, "Error", ""))
        }
        _ => web::page(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "Use the visit page.",
        ),
    }
}

async fn forward(
    state: &ServerState,
    public: &PublicUrl,
    device: &str,
    grant: Arc<Grant>,
    client: IpAddr,
    keeper: &Keeper,
    mut req: Request<Incoming>,
) -> Response<Body> {
    let Some(link) = state.hub.get(device) else {
        return web::page(
            StatusCode::BAD_GATEWAY,
            "The PBX is offline",
            "This PBX is not connected to the management platform right now. Check its network and its Remote Management status.",
        );
    };
    let redeeming = grant.passwordless && req.uri().path() == PASSWORDLESS_PATH;
    let visitor_upgrade = req
        .headers()
        .contains_key(header::UPGRADE)
        .then(|| hyper::upgrade::on(&mut req));
    // Upgrades and passwordless redemptions get a stream of their own that is never reused.
    let reusable = !redeeming && visitor_upgrade.is_none();
    strip_grant_cookie(req.headers_mut());

    if let Some(mut kept) = reusable
        .then(|| keeper.take(link.generation, &grant, client))
        .flatten()
    {
        if kept.sender.ready().await.is_ok() {
            match kept.sender.try_send_request(req).await {
                Ok(resp) => {
                    let back = (keeper.clone(), kept);
                    return response_from_tunnel(device, resp, None, Some(back));
                }
                // The agent closed the kept stream before taking the request: use a new one.
                Err(mut e) => match e.take_message() {
                    Some(r) => req = r,
                    None => return tunnel_failed(device, &e.into_error()),
                },
            }
        }
    }

    let Some(grant_slot) = link.grant_slot(&grant.id) else {
        return web::page(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many requests",
            "This session has too many requests in flight to the PBX; wait for some to finish.",
        );
    };
    // A full tunnel: a burst waits a moment for a stream to free up before it is refused.
    let permit = match link.streams.clone().try_acquire_owned() {
        Ok(p) => Some(p),
        Err(_) => tokio::time::timeout(STREAM_WAIT, link.streams.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok),
    };
    let Some(permit) = permit else {
        return web::page(
            StatusCode::SERVICE_UNAVAILABLE,
            "The PBX is busy",
            "Too many requests are in flight to this PBX; try again in a moment.",
        );
    };
    // Built only for a new stream: a kept one already carries it.
    let mut header = StreamHeader {
        cm_user: grant.cm_user.clone(),
        grant_id: grant.id.clone(),
        client_addr: client.to_string(),
        scheme: public.scheme.clone(),
        origin: public.device_origin(device),
        grant_expires_ms: expires_ms(&grant),
        passwordless_token: None,
    };
    if redeeming {
        match state.db.mark_grant_redeemed(&grant.id) {
            Ok(true) => match mint_token(state, device, &grant) {
                Ok(t) => header.passwordless_token = Some(Secret::new(t)),
                Err(e) => return internal(e),
            },
            Ok(false) => {}
            Err(e) => return internal(e),
        }
    }
    let opened = tokio::time::timeout(OPEN_STREAM_TIMEOUT, link.conn.open_bi()).await;
    let Ok(Ok((mut send, recv))) = opened else {
        return web::page(
            StatusCode::BAD_GATEWAY,
            "The PBX is unreachable",
            "The tunnel to this PBX did not accept a new request.",
        );
    };
    if write_frame(&mut send, &header).await.is_err() {
        return web::page(
            StatusCode::BAD_GATEWAY,
            "The PBX is unreachable",
            "The tunnel to this PBX broke.",
        );
    }
    let Ok((mut sender, conn)) = hyper::client::conn::http1::Builder::new()
        .handshake::<_, Incoming>(TokioIo::new(tokio::io::join(recv, send)))
        .await
    else {
        return web::page(
            StatusCode::BAD_GATEWAY,
            "The PBX is unreachable",
            "The tunnel to this PBX broke.",
        );
    };
    tokio::spawn(async move {
        let _slots = (permit, grant_slot);
        let _ = conn.with_upgrades().await;
    });
    match sender.send_request(req).await {
        Ok(resp) => {
            let back = reusable.then(|| {
                (
                    keeper.clone(),
                    KeptStream::new(&link, header, client, sender),
                )
            });
            response_from_tunnel(device, resp, visitor_upgrade, back)
        }
        Err(e) => tunnel_failed(device, &e),
    }
}

/// When a grant ends, as the stream header says it (ms since the epoch).
fn expires_ms(grant: &Grant) -> u64 {
    (grant.expires_at.max(0) as u64) * 1000
}

fn tunnel_failed(device: &str, e: &hyper::Error) -> Response<Body> {
    tracing::info!(device, error = %e, "request through the tunnel failed");
    web::page(
        StatusCode::BAD_GATEWAY,
        "The PBX did not answer",
        "The connection to this PBX was lost during the request; try again.",
    )
}

/// The agent's answer, made fit for the visitor. A reusable stream goes back to the visitor
/// connection's keeper once the body has been read to its end.
fn response_from_tunnel(
    device: &str,
    mut resp: Response<Incoming>,
    visitor_upgrade: Option<hyper::upgrade::OnUpgrade>,
    back: Option<(Keeper, KeptStream)>,
) -> Response<Body> {
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(visitor) = visitor_upgrade {
            let tunnel = hyper::upgrade::on(&mut resp);
            let device = device.to_string();
            tokio::spawn(async move {
                match tokio::try_join!(visitor, tunnel) {
                    Ok((v, t)) => {
                        let _ = tokio::io::copy_bidirectional(
                            &mut TokioIo::new(v),
                            &mut TokioIo::new(t),
                        )
                        .await;
                    }
                    Err(e) => tracing::debug!(device, error = %e, "upgrade failed"),
                }
            });
        }
    }
    let (mut parts, body) = resp.into_parts();
    let body = if parts.status == StatusCode::SWITCHING_PROTOCOLS {
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        body.boxed()
    } else {
        // Keep-alive on the tunnel stream is the tunnel's business, not the visitor's.
        web::strip_hop_by_hop(&mut parts.headers);
        match back {
            Some(back) => KeepOnEnd::new(body, back).boxed(),
            None => body.boxed(),
        }
    };
    drop_grant_set_cookie(&mut parts.headers);
    Response::from_parts(parts, body)
}

/// How long a kept stream may sit idle before it is dropped rather than reused: well inside the
/// agent's head-read timeout, so the agent never closes a stream the front is about to use.
const KEEP_IDLE: Duration = Duration::from_secs(5);

/// Free streams a link must have left for a finished stream to be kept.
const KEEP_HEADROOM: usize = crate::protocol::MAX_REQUEST_STREAMS as usize / 8;

/// A tunnel stream kept for the next request of the same visitor connection, so a page with
/// many resources costs one stream (and one HTTP handshake at each end) per browser
/// connection instead of one per request. The agent still judges every request on its own.
pub(crate) struct KeptStream {
    generation: u64,
    /// The link's stream permits: a stream is kept only while others remain free.
    streams: Arc<tokio::sync::Semaphore>,
    header: StreamHeader,
    /// The visitor address `header` names, for comparing without formatting.
    client: IpAddr,
    sender: hyper::client::conn::http1::SendRequest<Incoming>,
    idle_since: std::time::Instant,
}

impl KeptStream {
    fn new(
        link: &crate::server::hub::Link,
        header: StreamHeader,
        client: IpAddr,
        sender: hyper::client::conn::http1::SendRequest<Incoming>,
    ) -> KeptStream {
        KeptStream {
            generation: link.generation,
            streams: link.streams.clone(),
            header,
            client,
            sender,
            idle_since: std::time::Instant::now(),
        }
    }

    /// Whether this stream speaks for exactly this visit: same link, grant (and with it the
    /// device, hence scheme and origin), user, expiry and address, and no passwordless token.
    /// Compared field by field, so a request on a kept stream builds no header.
    fn serves(&self, generation: u64, grant: &Grant, client: IpAddr) -> bool {
        let k = &self.header;
        self.generation == generation
            && k.grant_id == grant.id
            && k.cm_user == grant.cm_user
            && k.grant_expires_ms == expires_ms(grant)
            && self.client == client
            && k.passwordless_token.is_none()
    }
}

/// How long a visitor connection trusts the grant it looked up for a cookie before asking the
/// database again: the registry stays off the per-request path, and an ended or expired visit
/// still stops within a second.
const GRANT_RECHECK: Duration = Duration::from_secs(1);

/// What one visitor connection remembers between its requests (HTTP/1 requests on a
/// connection come one at a time): its kept stream and its last grant lookup.
#[derive(Clone, Default)]
pub(crate) struct Keeper(Arc<std::sync::Mutex<Kept>>);

#[derive(Default)]
pub(crate) struct Kept {
    stream: Option<KeptStream>,
    /// (cookie hash, grant, when looked up).
    grant: Option<([u8; 32], Arc<Grant>, std::time::Instant)>,
}

impl Keeper {
    /// Takes the kept stream if it still serves this visit; anything else is dropped (closed).
    fn take(&self, generation: u64, grant: &Grant, client: IpAddr) -> Option<KeptStream> {
        let kept = self.lock().stream.take()?;
        (kept.serves(generation, grant, client)
            && kept.idle_since.elapsed() < KEEP_IDLE
            && !kept.sender.is_closed())
        .then_some(kept)
    }

    /// Keeps the stream for the next request, unless the tunnel is nearly full: then it is
    /// closed, so busy connections do not hold streams between requests while new ones get 503.
    fn put(&self, mut kept: KeptStream) {
        if kept.streams.available_permits() < KEEP_HEADROOM {
            return;
        }
        kept.idle_since = std::time::Instant::now();
        self.lock().stream = Some(kept);
    }

    /// The grant for `cookie`: the one looked up on this connection less than
    /// [`GRANT_RECHECK`] ago, else `lookup`'s answer (remembered when there is one).
    fn grant(
        &self,
        cookie: &str,
        lookup: impl FnOnce(&str) -> Result<Option<Arc<Grant>>>,
    ) -> Result<Option<Arc<Grant>>> {
        let hash = crate::tls::sha256(cookie.as_bytes());
        if let Some((h, g, at)) = &self.lock().grant {
            if *h == hash && at.elapsed() < GRANT_RECHECK {
                return Ok(Some(g.clone()));
            }
        }
        let found = lookup(cookie)?;
        self.lock().grant = found.clone().map(|g| (hash, g, std::time::Instant::now()));
        Ok(found)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Kept> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A response body that hands its stream back to the keeper when read to the end. A body
/// dropped early (visitor gone) drops the stream with it.
struct KeepOnEnd {
    body: Incoming,
    back: Option<(Keeper, KeptStream)>,
}

impl KeepOnEnd {
    fn new(body: Incoming, back: (Keeper, KeptStream)) -> KeepOnEnd {
        let mut b = KeepOnEnd {
            body,
            back: Some(back),
        };
        if hyper::body::Body::is_end_stream(&b.body) {
            b.give_back();
        }
        b
    }

    fn give_back(&mut self) {
        if let Some((keeper, kept)) = self.back.take() {
            keeper.put(kept);
        }
    }
}

impl hyper::body::Body for KeepOnEnd {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(None) => this.give_back(),
            std::task::Poll::Ready(Some(Ok(_))) if this.body.is_end_stream() => this.give_back(),
            // An error mid-body: the stream is not fit for another request.
            std::task::Poll::Ready(Some(Err(_))) => this.back = None,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}

fn mint_token(state: &ServerState, device: &str, grant: &Grant) -> Result<String> {
    let now = crate::protocol::now_ms();
    crate::token::sign(
        &state.keys.signing,
        &crate::token::Claims {
            dev: device.to_string(),
            grant: grant.id.clone(),
            cm_user: grant.cm_user.clone(),
            iat_ms: now,
            exp_ms: now + crate::token::MAX_TOKEN_LIFETIME_MS,
            nonce: crate::tls::random_token::<16>(),
        },
    )
}

fn strip_grant_cookie(h: &mut http::HeaderMap) {
    web::drop_cookies(h, &[GRANT_COOKIE, GRANT_COOKIE_SECURE]);
}

/// `name=value…` names the front's grant cookie.
fn is_grant_cookie(c: &str) -> bool {
    [GRANT_COOKIE, GRANT_COOKIE_SECURE].contains(&web::cookie_pair_name(c))
}

fn drop_grant_set_cookie(h: &mut http::HeaderMap) {
    if !h
        .get_all(header::SET_COOKIE)
        .iter()
        .any(|v| is_grant_cookie(v.to_str().unwrap_or("")))
    {
        return;
    }
    let kept: Vec<HeaderValue> = h
        .get_all(header::SET_COOKIE)
        .iter()
        .filter(|v| !is_grant_cookie(v.to_str().unwrap_or("")))
        .cloned()
        .collect();
    h.remove(header::SET_COOKIE);
    for v in kept {
        h.append(header::SET_COOKIE, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT: IpAddr = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 1));

    fn grant(id: &str) -> Grant {
        Grant {
            id: id.into(),
            device_id: "dev".into(),
            cm_user: "alice".into(),
            passwordless: false,
            redeemed: false,
            expires_at: 0,
        }
    }

    fn header(grant: &str) -> StreamHeader {
        StreamHeader {
            cm_user: "alice".into(),
            grant_id: grant.into(),
            client_addr: "10.0.0.1".into(),
            scheme: "https".into(),
            origin: "https://dev.cm.example".into(),
            grant_expires_ms: 0,
            passwordless_token: None,
        }
    }

    /// A kept stream over an in-memory pipe, on a link with `free` stream permits.
    async fn kept(free: usize, grant: &str) -> (KeptStream, tokio::io::DuplexStream) {
        let (ours, theirs) = tokio::io::duplex(1024);
        let (sender, conn) =
            hyper::client::conn::http1::handshake::<_, Incoming>(TokioIo::new(ours))
                .await
                .unwrap();
        tokio::spawn(conn);
        let k = KeptStream {
            generation: 7,
            streams: Arc::new(tokio::sync::Semaphore::new(free)),
            header: header(grant),
            client: CLIENT,
            sender,
            idle_since: std::time::Instant::now(),
        };
        (k, theirs)
    }

    #[test]
    fn a_connection_rechecks_its_grant_every_second() {
        let keeper = Keeper::default();
        let grant = Grant {
            id: "g1".into(),
            device_id: "d".into(),
            cm_user: "alice".into(),
            passwordless: false,
            redeemed: false,
            expires_at: 1,
        };
        let lookups = std::cell::Cell::new(0);
        let db = |c: &str| {
            lookups.set(lookups.get() + 1);
            Ok((c == "good").then(|| Arc::new(grant.clone())))
        };
        assert!(keeper.grant("good", db).unwrap().is_some());
        assert!(keeper.grant("good", db).unwrap().is_some());
        assert_eq!(lookups.get(), 1, "remembered");
        assert!(keeper.grant("other", db).unwrap().is_none());
        assert!(keeper.grant("other", db).unwrap().is_none());
        assert_eq!(
            lookups.get(),
            3,
            "another cookie, and no grant, are asked every time"
        );
        assert!(keeper.grant("good", db).unwrap().is_some());
        if let Some((_, _, at)) = keeper.lock().grant.as_mut() {
            *at -= GRANT_RECHECK;
        }
        assert!(keeper.grant("good", db).unwrap().is_some());
        assert_eq!(lookups.get(), 5, "asked again after GRANT_RECHECK");
    }

    #[tokio::test]
    async fn a_stream_is_kept_only_for_the_same_visit_and_while_the_tunnel_has_room() {
        let keeper = Keeper::default();
        let (k, _pipe) = kept(KEEP_HEADROOM, "g1").await;
        keeper.put(k);
        assert!(
            keeper.take(7, &grant("g2"), CLIENT).is_none(),
            "another visit"
        );
        for (other, what) in [
            (
                Grant {
                    cm_user: "bob".into(),
                    ..grant("g1")
                },
                "another CM user",
            ),
            (
                Grant {
                    expires_at: 5,
                    ..grant("g1")
                },
                "another expiry",
            ),
        ] {
            let (k, _pipe) = kept(KEEP_HEADROOM, "g1").await;
            keeper.put(k);
            assert!(keeper.take(7, &other, CLIENT).is_none(), "{what}");
        }
        let (k, _pipe) = kept(KEEP_HEADROOM, "g1").await;
        keeper.put(k);
        let elsewhere = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 2));
        assert!(
            keeper.take(7, &grant("g1"), elsewhere).is_none(),
            "another visitor address"
        );
        let (k, _pipe) = kept(KEEP_HEADROOM, "g1").await;
        keeper.put(k);
        assert!(
            keeper.take(8, &grant("g1"), CLIENT).is_none(),
            "another tunnel connection"
        );
        let (mut k, _pipe) = kept(KEEP_HEADROOM, "g1").await;
        k.header.passwordless_token = Some(Secret::new("t"));
        keeper.put(k);
        assert!(
            keeper.take(7, &grant("g1"), CLIENT).is_none(),
            "a stream that carried a passwordless token"
        );
        let (k, _pipe) = kept(KEEP_HEADROOM, "g1").await;
        keeper.put(k);
        assert!(
            keeper.take(7, &grant("g1"), CLIENT).is_some(),
            "the same visit"
        );
        assert!(keeper.take(7, &grant("g1"), CLIENT).is_none(), "taken once");
        // A nearly full tunnel: the stream is closed instead of kept.
        let (k, _pipe) = kept(KEEP_HEADROOM - 1, "g1").await;
        keeper.put(k);
        assert!(
            keeper.take(7, &grant("g1"), CLIENT).is_none(),
            "no headroom"
        );
    }

    #[test]
    fn device_labels_from_host() {
        let p = PublicUrl {
            scheme: "http".into(),
            host: "localhost".into(),
            port_suffix: ":8080".into(),
        };
        assert_eq!(
            p.device_of("Acme-1.localhost:8080").as_deref(),
            Some("acme-1")
        );
        assert_eq!(p.device_of("acme-1.localhost").as_deref(), Some("acme-1"));
        assert_eq!(p.device_of("localhost:8080"), None);
        assert_eq!(p.device_of("a.b.localhost"), None);
        assert_eq!(p.device_of("acme.localhost.evil.com"), None);
        assert_eq!(
            p.device_of("ACME-1.LocalHost:8080").as_deref(),
            Some("acme-1")
        );
        assert_eq!(p.device_of(".localhost"), None);
        assert_eq!(p.device_of("acmelocalhost"), None);
        assert_eq!(p.device_of("acmé.localhost"), None);
        assert_eq!(p.device_of("é.localhost"), None);
        assert_eq!(p.device_of(&format!("{}.localhost", "a".repeat(64))), None);
        assert_eq!(p.device_origin("acme-1"), "http://acme-1.localhost:8080");
    }

    #[test]
    fn grant_cookie_never_reaches_the_agent() {
        let mut h = http::HeaderMap::new();
        h.append("cookie", "a=1; __cm_visit=x.y".parse().unwrap());
        h.append("cookie", "__Host-__cm_visit=z".parse().unwrap());
        strip_grant_cookie(&mut h);
        assert_eq!(h["cookie"], "a=1");
        let mut h = http::HeaderMap::new();
        h.append("set-cookie", "__cm_visit=evil; Path=/".parse().unwrap());
        h.append("set-cookie", "ok=1".parse().unwrap());
        drop_grant_set_cookie(&mut h);
        assert_eq!(h.get_all("set-cookie").iter().count(), 1);
    }
}
