//! Serves one tunnel stream: reads the front's stream header, runs hyper's HTTP/1.1 server on
//! the rest, and forwards each request to the portal with hop-by-hop and identity-spoofing
//! headers removed and the portal's own origin restored. WebSockets keep their stream.

use crate::agent::gate::{Gate, Session, Verdict};
use crate::agent::portal::{Portal, PortalError};
use crate::agent::wsframe::FrameWatch;
use crate::protocol::{read_frame, StreamHeader, HEADER_TIMEOUT};
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

/// Largest request head (line + headers) the agent reads from the tunnel.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Time allowed to send a whole request head.
pub const HEAD_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub use crate::web::Body;

/// Cookie names the agent and front reserve; portal cookies with these names are dropped.
pub const RESERVED_COOKIES: [&str; 4] = [
    "__pbxra_sid",
    "__Host-__pbxra_sid",
    "__cm_visit",
    "__Host-__cm_visit",
];

/// What every stream handler shares.
pub struct ProxyCtx {
    /// The upstream; a reload that changes the portal settings swaps it in place.
    portal: std::sync::RwLock<Arc<Portal>>,
    /// Who may reach it.
    pub gate: Arc<Gate>,
    /// Request counters.
    pub metrics: Arc<crate::agent::metrics::Metrics>,
}

impl ProxyCtx {
    /// The context for one tunnel run.
    pub fn new(
        portal: Portal,
        gate: Arc<Gate>,
        metrics: Arc<crate::agent::metrics::Metrics>,
    ) -> ProxyCtx {
        ProxyCtx {
            portal: std::sync::RwLock::new(Arc::new(portal)),
            gate,
            metrics,
        }
    }

    /// The portal in force; a request keeps the one it started with.
    pub fn portal(&self) -> Arc<Portal> {
        self.portal
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts a new portal in force for the next requests (requests in flight finish on the old).
    pub fn set_portal(&self, portal: Portal) {
        *self.portal.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(portal);
    }
}

/// Serves one request stream until the request (or WebSocket) ends.
pub async fn serve_stream(
    ctx: Arc<ProxyCtx>,
    send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    stopping: CancellationToken,
) {
    let header: StreamHeader =
        match tokio::time::timeout(HEADER_TIMEOUT, read_frame(&mut recv)).await {
            Ok(Ok(Some(h))) => h,
            Ok(Ok(None)) => return,
            Ok(Err(e)) => {
                tracing::warn!(error = %format!("{e:#}"), "bad stream header; stream dropped");
                return;
            }
            Err(_) => {
                tracing::warn!("no stream header within {HEADER_TIMEOUT:?}; stream dropped");
                return;
            }
        };
    let visit = Arc::new(Visit {
        forwarded: forwarded_headers(&header),
        header,
    });
    // Resolves with a code when the front stops reading this stream: the visitor went away, and
    // with them any use for the answer.
    let abandoned = send.stopped();
    let send = AckedSend {
        inner: send,
        acked: None,
    };
    let io = TokioIo::new(tokio::io::join(recv, send));
    let svc = hyper::service::service_fn(move |req| {
        let ctx = ctx.clone();
        let visit = visit.clone();
        async move {
            let resp = handle(&ctx, &visit, req).await;
            ctx.metrics.request(resp.status());
            Ok::<_, Infallible>(resp)
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(HEAD_READ_TIMEOUT)
        .max_buf_size(MAX_HEAD_BYTES)
        // The front reuses a stream for the next request of the same visitor connection and
        // drops it after 5 idle seconds; the head-read timeout ends streams it forgot.
        .keep_alive(true)
        // A peer that finishes its side after the request still gets the answer.
        .half_close(true)
        .serve_connection(io, svc)
        .with_upgrades();
    let mut conn = std::pin::pin!(conn);
    let result = tokio::select! {
        r = conn.as_mut() => r,
        // Dropping the connection cancels the portal request it waits on (hyper closes that
        // portal connection), instead of holding it and a tunnel stream until the portal answers
        // or times out: abandoned long requests must not pile up at the portal.
        Ok(Some(_)) = abandoned => {
            tracing::debug!("the front stopped reading; request abandoned");
            return;
        }
        // Draining: a request in progress finishes; a stream idle between requests ends now
        // instead of holding the drain until its head-read timeout.
        _ = stopping.cancelled() => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, "tunnel stream ended with an error");
    }
}

/// The tunnel side of a request stream. Shutting it down finishes the stream and completes only
/// once the front has read everything, so a connection closed right after (graceful stop) loses
/// no response bytes still in flight.
struct AckedSend {
    inner: quinn::SendStream,
    acked: Option<Acked>,
}

/// Resolves when the peer has read the finished stream (or stopped it, or the connection died).
type Acked = std::pin::Pin<
    Box<dyn Future<Output = Result<Option<quinn::VarInt>, quinn::StoppedError>> + Send + Sync>,
>;

impl AsyncWrite for AckedSend {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        AsyncWrite::poll_write(std::pin::Pin::new(&mut self.inner), cx, buf)
    }

    /// hyper queues a response's head and body chunks and hands them over together instead of
    /// first copying the body into its own buffer (quinn copies each slice into its send
    /// buffer either way). Slices are written in order until one is taken only in part or the
    /// stream has no room; what was taken so far is reported.
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let mut written = 0;
        for buf in bufs.iter().filter(|b| !b.is_empty()) {
            match AsyncWrite::poll_write(std::pin::Pin::new(&mut self.inner), cx, buf) {
                std::task::Poll::Ready(Ok(n)) => {
                    written += n;
                    if n < buf.len() {
                        break;
                    }
                }
                // An error or no room after some bytes were taken: report those bytes; the
                // next call meets the error (or the room) again.
                std::task::Poll::Ready(Err(e)) if written == 0 => {
                    return std::task::Poll::Ready(Err(e))
                }
                std::task::Poll::Pending if written == 0 => return std::task::Poll::Pending,
                _ => break,
            }
        }
        std::task::Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        AsyncWrite::poll_flush(std::pin::Pin::new(&mut self.inner), cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.acked.is_none() {
            std::task::ready!(AsyncWrite::poll_shutdown(
                std::pin::Pin::new(&mut self.inner),
                cx
            ))?;
            let acked = self.inner.stopped();
            self.acked = Some(Box::pin(acked));
        }
        match self.acked.as_mut() {
            // Acknowledged, stopped by the peer, or the connection is gone: done either way.
            Some(f) => f.as_mut().poll(cx).map(|_| Ok(())),
            None => std::task::Poll::Ready(Ok(())),
        }
    }
}

/// A stream's header and the forwarding headers every request on it carries to the portal,
/// worked out once per stream rather than per request.
struct Visit {
    header: StreamHeader,
    forwarded: [(HeaderName, Option<HeaderValue>); 3],
}

async fn handle(ctx: &ProxyCtx, visit: &Visit, mut req: Request<Incoming>) -> Response<Body> {
    let h = &visit.header;
    if req.method() == Method::CONNECT {
        return page(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "CONNECT is not forwarded.",
        );
    }
    let Some(path) = req
        .uri()
        .path_and_query()
        .filter(|p| p.as_str().starts_with('/'))
        .cloned()
    else {
        return page(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "Only origin paths are forwarded.",
        );
    };
    // hyper's buffer limit only bites while a head is incomplete; a head that arrived in one
    // read can exceed it, so the bound is enforced on the parsed head as well.
    if head_size(&req) > MAX_HEAD_BYTES {
        return page(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "Request headers too large",
            "The request's headers exceed 64 KiB.",
        );
    }
    // Only the path is used from here on: an absolute-form target names no destination.
    if req.uri().path().starts_with(REMOTE_PREFIX) {
        return ctx.gate.handle_remote(h, req).await;
    }
    let session = match ctx.gate.admit(h, &req) {
        Verdict::Respond(r) => return r,
        Verdict::Forward(s) => s,
    };
    let websocket = is_websocket(&req);
    if (websocket || !is_safe(req.method())) && !crate::web::same_origin(req.headers(), &h.origin) {
        return page(
            StatusCode::FORBIDDEN,
            "Cross-site request refused",
            "This request did not come from the PBX page itself.",
        );
    }
    let client_upgrade = websocket.then(|| hyper::upgrade::on(&mut req));
    let portal = ctx.portal();
    let (mut parts, body) = req.into_parts();
    strip_inbound(&mut parts.headers, websocket);
    rewrite_inbound_origin(&mut parts.headers, &h.origin, portal.origin());
    for (name, value) in &visit.forwarded {
        if let Some(v) = value {
            parts.headers.insert(name, v.clone());
        }
    }
    ctx.gate.identity_headers(&session, &mut parts.headers);
    parts
        .headers
        .insert(header::HOST, portal.host_header().clone());
    parts.uri = http::Uri::from(path);
    parts.version = http::Version::HTTP_11;
    let upstream = Request::from_parts(parts, body);
    let mut resp = match portal.send(upstream).await {
        Ok(r) => r,
        Err(e @ PortalError::Timeout(_)) => {
            tracing::warn!(error = %e, "portal timeout");
            return page(
                StatusCode::GATEWAY_TIMEOUT,
                "The PBX web portal is not answering",
                &e.to_string(),
            );
        }
        Err(e) => {
            tracing::warn!(error = %e, "portal unreachable");
            return page(
                StatusCode::BAD_GATEWAY,
                "The PBX web portal is unreachable",
                &e.to_string(),
            );
        }
    };
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return page(
                StatusCode::BAD_GATEWAY,
                "Bad gateway",
                "The portal switched protocols unasked.",
            );
        };
        let portal_upgrade = hyper::upgrade::on(&mut resp);
        let gate = ctx.gate.clone();
        tokio::spawn(async move {
            match tokio::try_join!(client_upgrade, portal_upgrade) {
                Ok((client, portal)) => {
                    bridge_websocket(TokioIo::new(client), TokioIo::new(portal), &session, &gate)
                        .await
                }
                Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
            }
        });
        let (mut parts, _) = resp.into_parts();
        rewrite_outbound(&mut parts.headers, portal.origin(), &h.origin, true);
        return Response::from_parts(parts, crate::web::full(Bytes::new()));
    }
    let (mut parts, body) = resp.into_parts();
    rewrite_outbound(&mut parts.headers, portal.origin(), &h.origin, false);
    // Authenticated pages never land in a shared or browser cache.
    parts
        .headers
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let body = EndsWithSession {
        inner: body,
        ended: Box::pin(session.ended.clone().cancelled_owned()),
    };
    Response::from_parts(parts, body.boxed())
}

/// A response body that stops when its session ends (logout, expiry, revocation), so a
/// revoked visitor's download is cut rather than left running.
struct EndsWithSession {
    inner: Incoming,
    ended: std::pin::Pin<Box<tokio_util::sync::WaitForCancellationFutureOwned>>,
}

impl hyper::body::Body for EndsWithSession {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, hyper::Error>>> {
        if self.ended.as_mut().poll(cx).is_ready() {
            // Ending early breaks the message framing, which aborts the visitor's connection.
            return std::task::Poll::Ready(None);
        }
        std::pin::Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Copies a WebSocket both ways until either side closes or the session ends. Client data
/// frames (not pings) count as session activity.
async fn bridge_websocket<C, P>(client: C, portal: P, session: &Session, gate: &Gate)
where
    C: AsyncRead + AsyncWrite + Unpin,
    P: AsyncRead + AsyncWrite + Unpin,
{
    let (mut client_rx, mut client_tx) = tokio::io::split(client);
    let (mut portal_rx, mut portal_tx) = tokio::io::split(portal);
    let upstream = async {
        let mut watch = FrameWatch::default();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = client_rx.read(&mut buf).await?;
            if n == 0 {
                return portal_tx.shutdown().await;
            }
            if watch.feed(&buf[..n]) > 0 {
                gate.touch(session);
            }
            portal_tx.write_all(&buf[..n]).await?;
        }
    };
    let downstream = async {
        tokio::io::copy(&mut portal_rx, &mut client_tx).await?;
        client_tx.shutdown().await
    };
    tokio::select! {
        _ = session.ended.cancelled() => tracing::debug!("session ended; websocket closed"),
        r = async { tokio::try_join!(upstream, downstream) } => {
            if let Err(e) = r {
                tracing::debug!(error = %e, "websocket ended");
            }
        }
    }
}

/// The agent's own pages; nothing under it reaches the portal.
pub const REMOTE_PREFIX: &str = "/__remote/";

/// Bytes of a request head as sent: request line plus `name: value\r\n` per header.
fn head_size<B>(req: &Request<B>) -> usize {
    /// Counts what is written instead of keeping it.
    struct Len(usize);
    impl std::fmt::Write for Len {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut target = Len(0);
    let _ = std::fmt::Write::write_fmt(&mut target, format_args!("{}", req.uri()));
    let line = req.method().as_str().len() + target.0 + 12;
    let headers: usize = req
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    line + headers + 2
}

/// A plain page (shared helper).
pub fn page(status: StatusCode, title: &str, detail: &str) -> Response<Body> {
    crate::web::page(status, title, detail)
}

fn is_safe(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// A GET with `Upgrade: websocket` and `Connection: upgrade`.
pub fn is_websocket<B>(req: &Request<B>) -> bool {
    req.method() == Method::GET
        && header_has_token(req.headers(), &header::UPGRADE, "websocket")
        && header_has_token(req.headers(), &header::CONNECTION, "upgrade")
}

fn header_has_token(h: &HeaderMap, name: &HeaderName, token: &str) -> bool {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

/// Removes hop-by-hop headers (and those `Connection` names), identity and forwarding headers
/// a visitor could forge, and the agent's and front's cookies. A validated WebSocket keeps its
/// upgrade headers.
pub fn strip_inbound(h: &mut HeaderMap, websocket: bool) {
    crate::web::strip_hop_by_hop(h);
    let forged: Vec<HeaderName> = h
        .keys()
        .filter(|k| {
            let k = k.as_str();
            k.starts_with("x-pbx-remote-")
                || k.starts_with("x-forwarded-")
                || k == "forwarded"
                || k == "x-real-ip"
        })
        .cloned()
        .collect();
    for k in forged {
        h.remove(k);
    }
    crate::web::drop_cookies(h, &RESERVED_COOKIES);
    if websocket {
        h.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    }
}

/// `Origin` and `Referer` from the visitor's origin are rewritten to the portal's, so a portal
/// that checks Origin against Host keeps working.
pub fn rewrite_inbound_origin(h: &mut HeaderMap, visitor: &str, portal: &str) {
    if let Some(o) = h.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        if o.eq_ignore_ascii_case(visitor) {
            if let Ok(v) = HeaderValue::from_str(portal) {
                h.insert(header::ORIGIN, v);
            }
        }
    }
    if let Some(r) = h.get(header::REFERER).and_then(|v| v.to_str().ok()) {
        let rewritten = replace_origin_prefix(r, visitor, portal);
        match rewritten.and_then(|r| HeaderValue::from_str(&r).ok()) {
            Some(v) => {
                h.insert(header::REFERER, v);
            }
            None => {
                h.remove(header::REFERER);
            }
        }
    }
}

/// `X-Forwarded-For`/`-Host`/`-Proto`: the visitor's address, host and scheme. A value that
/// cannot be a header value (the front never sends one) is left out.
fn forwarded_headers(sh: &StreamHeader) -> [(HeaderName, Option<HeaderValue>); 3] {
    let visitor_host = sh.origin.split_once("://").map(|(_, a)| a).unwrap_or("");
    let value = |v: &str| HeaderValue::from_str(v).ok();
    [
        (X_FORWARDED_FOR, value(&sh.client_addr)),
        (X_FORWARDED_HOST, value(visitor_host)),
        (X_FORWARDED_PROTO, value(&sh.scheme)),
    ]
}

const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// `url` with a leading `from` origin replaced by `to`; `None` if it is from elsewhere.
fn replace_origin_prefix(url: &str, from: &str, to: &str) -> Option<String> {
    let head = url.get(..from.len())?;
    let rest = &url[from.len()..];
    if head.eq_ignore_ascii_case(from) && (rest.is_empty() || rest.starts_with(['/', '?', '#'])) {
        Some(format!("{to}{rest}"))
    } else {
        None
    }
}

/// Response side: hop-by-hop headers go (except on a 101), `Location` to the portal's origin
/// becomes the visitor's, portal cookies lose `Domain=` and reserved cookie names are dropped.
pub fn rewrite_outbound(h: &mut HeaderMap, portal: &str, visitor: &str, switching: bool) {
    if !switching {
        crate::web::strip_hop_by_hop(h);
    }
    if let Some(loc) = h.get(header::LOCATION).and_then(|v| v.to_str().ok()) {
        let portal_authority = portal.split_once("://").map(|(_, a)| a).unwrap_or(portal);
        let rewritten = replace_origin_prefix(loc, portal, visitor).or_else(|| {
            loc.strip_prefix("//")
                .and_then(|_| {
                    replace_origin_prefix(
                        &loc[2..],
                        portal_authority,
                        visitor.split_once("://").map(|(_, a)| a).unwrap_or(visitor),
                    )
                })
                .map(|r| format!("//{r}"))
        });
        if let Some(v) = rewritten.and_then(|r| HeaderValue::from_str(&r).ok()) {
            h.insert(header::LOCATION, v);
        }
    }
    let cookies: Vec<HeaderValue> = h
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|c| !RESERVED_COOKIES.contains(&crate::web::cookie_pair_name(c)))
        .filter_map(|c| HeaderValue::from_str(&strip_cookie_domain(c)).ok())
        .collect();
    h.remove(header::SET_COOKIE);
    for c in cookies {
        h.append(header::SET_COOKIE, c);
    }
}

fn strip_cookie_domain(c: &str) -> String {
    c.split(';')
        .filter(|attr| {
            !attr
                .trim()
                .split('=')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case("domain")
        })
        .collect::<Vec<_>>()
        .join(";")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn inbound_strips_hop_by_hop_connection_listed_and_forged_identity() {
        let mut h = map(&[
            ("connection", "Keep-Alive, x-secret"),
            ("connection", " X-Other ,, not a name"),
            ("x-secret", "1"),
            ("x-other", "1"),
            ("keep-alive", "5"),
            ("te", "trailers"),
            ("x-pbx-remote-user", "root"),
            ("X-PBX-Remote-Role", "super_admin"),
            ("forwarded", "for=1.2.3.4"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-real-ip", "1.2.3.4"),
            ("cookie", "a=1; __pbxra_sid=s; __cm_visit=v; b=2"),
            ("accept", "text/html"),
        ]);
        strip_inbound(&mut h, false);
        let mut names: Vec<_> = h.keys().map(|k| k.as_str().to_string()).collect();
        names.sort();
        assert_eq!(names, ["accept", "cookie"]);
        assert_eq!(h["cookie"], "a=1; b=2");
    }

    #[test]
    fn websocket_keeps_upgrade_headers() {
        let mut h = map(&[
            ("connection", "Upgrade"),
            ("upgrade", "websocket"),
            ("sec-websocket-key", "k"),
        ]);
        strip_inbound(&mut h, true);
        assert_eq!(h["upgrade"], "websocket");
        assert_eq!(h["connection"], "upgrade");
        assert_eq!(h["sec-websocket-key"], "k");
    }

    #[test]
    fn portal_sees_its_own_origin() {
        let mut h = map(&[
            ("origin", "http://dev1.localhost:9000"),
            ("referer", "http://dev1.localhost:9000/a?b"),
        ]);
        rewrite_inbound_origin(
            &mut h,
            "http://dev1.localhost:9000",
            "https://127.0.0.1:8088",
        );
        assert_eq!(h["origin"], "https://127.0.0.1:8088");
        assert_eq!(h["referer"], "https://127.0.0.1:8088/a?b");
        let mut h = map(&[("referer", "http://dev1.localhost:90001/x")]);
        rewrite_inbound_origin(
            &mut h,
            "http://dev1.localhost:9000",
            "https://127.0.0.1:8088",
        );
        assert!(
            h.get("referer").is_none(),
            "a look-alike prefix is not the visitor's origin"
        );
    }

    #[test]
    fn outbound_rewrites_location_and_cookies() {
        let mut h = map(&[
            ("location", "https://127.0.0.1:8088/login?x=1"),
            ("set-cookie", "sid=1; Domain=127.0.0.1; Path=/; HttpOnly"),
            ("set-cookie", "__pbxra_sid=evil; Path=/"),
            ("set-cookie", "__Host-__cm_visit=evil; Path=/"),
            ("connection", "close"),
        ]);
        rewrite_outbound(
            &mut h,
            "https://127.0.0.1:8088",
            "https://dev1.cm.example",
            false,
        );
        assert_eq!(h["location"], "https://dev1.cm.example/login?x=1");
        let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["sid=1; Path=/; HttpOnly"]);
        assert!(h.get("connection").is_none());
        let mut h = map(&[("location", "https://other.example/")]);
        rewrite_outbound(
            &mut h,
            "https://127.0.0.1:8088",
            "https://dev1.cm.example",
            false,
        );
        assert_eq!(h["location"], "https://other.example/");
    }
}
