//! Serves one tunnel stream: reads the front's stream header, runs hyper's HTTP/1.1 server on
//! the rest, and forwards each request to the portal with hop-by-hop and identity-spoofing
//! headers removed and the portal's own origin restored. WebSockets keep their stream.

use crate::agent::broker::Broker;
use crate::agent::gate::{Gate, Session, Verdict};
use crate::agent::portal::{Portal, PortalError};
use crate::agent::wsframe::FrameWatch;
use crate::protocol::{read_frame, StreamHeader, HEADER_TIMEOUT};
use crate::tunnelio::{RecvHalf, SendHalf};
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
use tracing::Instrument;

mod brokered;
mod headers;
mod io;
#[cfg(test)]
mod tests;
mod websocket;

use headers::*;
pub use headers::{rewrite_inbound_origin, rewrite_outbound, strip_inbound, Redirect};
use io::*;
pub use websocket::is_websocket;
use websocket::*;

/// Largest request head (line + headers) the agent reads from the tunnel.
pub(crate) const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Time allowed to send a whole request head.
pub(crate) const HEAD_READ_TIMEOUT: Duration = Duration::from_secs(10);

pub use crate::web::Body;

/// Cookie names the agent and front reserve; portal cookies with these names are dropped.
pub(crate) const RESERVED_COOKIES: [&str; 4] = [
    "__pbxra_sid",
    "__Host-__pbxra_sid",
    "__cm_visit",
    "__Host-__cm_visit",
];

/// What every stream handler shares.
pub(crate) struct ProxyCtx {
    /// The upstream; a reload that changes the portal settings swaps it in place.
    portal: std::sync::RwLock<Arc<Portal>>,
    /// The portal login broker (`[portal_login]`), swapped like the portal on reload.
    broker: std::sync::RwLock<Option<Arc<Broker>>>,
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
            broker: std::sync::RwLock::new(None),
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

    /// The portal login broker in force, if any.
    pub fn broker(&self) -> Option<Arc<Broker>> {
        self.broker
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts a portal login config in force (or none) for the next sessions' logins.
    pub fn set_broker(&self, config: Option<crate::config::PortalLogin>) {
        *self.broker.write().unwrap_or_else(|p| p.into_inner()) =
            config.map(|c| Arc::new(Broker::new(c)));
    }

    /// Puts a new portal in force for the next requests (requests in flight finish on the old).
    pub fn set_portal(&self, portal: Portal) {
        *self.portal.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(portal);
    }
}

/// Serves one request stream until the request (or WebSocket) ends.
pub(crate) async fn serve_stream(
    ctx: Arc<ProxyCtx>,
    send: SendHalf,
    mut recv: RecvHalf,
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
    tracing::Span::current().record("visitor", header.cm_user.as_str());
    let visit = Arc::new(Visit {
        forwarded: forwarded_headers(&header),
        header,
    });
    // Resolves when the front stops reading this stream, or the tunnel connection is lost: the
    // visitor went away (or cannot be reached), and with them any use for the answer.
    let abandoned = match &send {
        SendHalf::Quic(s) => {
            let stopped = s.stopped();
            tokio_util::either::Either::Left(async move {
                // Stopped by the front, or the connection is lost (the answer can go nowhere):
                // abandoned. Finished and acknowledged (`Ok(None)`) is the normal end.
                if matches!(stopped.await, Ok(None)) {
                    std::future::pending::<()>().await;
                }
            })
        }
        SendHalf::Tcp(w) => tokio_util::either::Either::Right(w.abandoned()),
    };
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
        () = abandoned => {
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

/// A stream's header and the forwarding headers every request on it carries to the portal,
/// worked out once per stream rather than per request.
struct Visit {
    header: StreamHeader,
    forwarded: [(HeaderName, Option<HeaderValue>); 3],
}

async fn handle(ctx: &ProxyCtx, visit: &Visit, req: Request<Incoming>) -> Response<Reply> {
    match forward(ctx, visit, req).await {
        Ok(r) => r.map(|body| Reply::Portal { body }),
        Err(p) => p.map(|body| Reply::Page { body }),
    }
}

/// Answers one request: the portal's answer (`Ok`), or the agent's own page (`Err`).
async fn forward(
    ctx: &ProxyCtx,
    visit: &Visit,
    mut req: Request<Incoming>,
) -> Result<Response<EndsWithSession>, Response<Body>> {
    let h = &visit.header;
    if req.method() == Method::CONNECT {
        return Err(page(
            StatusCode::METHOD_NOT_ALLOWED,
            "Method not allowed",
            "CONNECT is not forwarded.",
        ));
    }
    let Some(path) = req
        .uri()
        .path_and_query()
        .filter(|p| p.as_str().starts_with('/'))
        .cloned()
    else {
        return Err(page(
            StatusCode::BAD_REQUEST,
            "Bad request",
            "Only origin paths are forwarded.",
        ));
    };
    // hyper's buffer limit only bites while a head is incomplete; a head that arrived in one
    // read can exceed it, so the bound is enforced on the parsed head as well.
    if head_size(&req) > MAX_HEAD_BYTES {
        return Err(page(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "Request headers too large",
            "The request's headers exceed 64 KiB.",
        ));
    }
    // Only the path is used from here on: an absolute-form target names no destination.
    if req.uri().path().starts_with(REMOTE_PREFIX) {
        return Err(ctx.gate.handle_remote(h, req).await);
    }
    let session = match ctx.gate.admit(h, &req) {
        Verdict::Respond(r) => return Err(r),
        Verdict::Forward(s) => s,
    };
    // The agent logs in to the portal for this session (`[portal_login]`): the portal's logout
    // ends the remote session, which logs the portal session out.
    let broker = ctx.broker().filter(|b| b.account(session.role).is_some());
    if broker.as_ref().is_some_and(|b| b.is_logout(path.as_str())) {
        return Err(ctx.gate.logged_out(h, Some(&session)));
    }
    let websocket = is_websocket(&req);
    if (websocket || !is_safe(req.method())) && !crate::web::same_origin(req.headers(), &h.origin) {
        return Err(page(
            StatusCode::FORBIDDEN,
            "Cross-site request refused",
            "This request did not come from the PBX page itself.",
        ));
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
    let sent = match &broker {
        Some(b) => brokered::send(ctx, b, &portal, &session, parts, body).await,
        None => {
            let upstream = Request::from_parts(parts, crate::agent::portal::UpBody::Stream(body));
            portal
                .send(upstream)
                .await
                .map(|r| (r, None))
                .map_err(portal_error_page)
        }
    };
    let (mut resp, head) = match sent {
        Ok(r) => r,
        Err(page) => return Err(page),
    };
    if let Some(b) = &broker {
        // The portal's cookies go to the session's jar, never to the visitor's browser.
        b.keep_cookies(&session, resp.headers_mut());
    }
    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
        let Some(client_upgrade) = client_upgrade else {
            return Err(page(
                StatusCode::BAD_GATEWAY,
                "Bad gateway",
                "The portal switched protocols unasked.",
            ));
        };
        let portal_upgrade = hyper::upgrade::on(&mut resp);
        let gate = ctx.gate.clone();
        tokio::spawn(
            async move {
                match tokio::try_join!(client_upgrade, portal_upgrade) {
                    Ok((client, portal)) => {
                        bridge_websocket(
                            TokioIo::new(client),
                            TokioIo::new(portal),
                            &session,
                            &gate,
                        )
                        .await
                    }
                    Err(e) => tracing::debug!(error = %e, "websocket upgrade failed"),
                }
            }
            .in_current_span(),
        );
        let (mut parts, _) = resp.into_parts();
        let _ = rewrite_outbound(&mut parts.headers, portal.origin(), &h.origin, true);
        return Err(Response::from_parts(parts, crate::web::full(Bytes::new())));
    }
    let (mut parts, body) = resp.into_parts();
    if let Redirect::ThirdParty(host) =
        rewrite_outbound(&mut parts.headers, portal.origin(), &h.origin, false)
    {
        tracing::warn!(%host, "the portal redirected to another host; not followed");
        return Err(page(
            StatusCode::BAD_GATEWAY,
            "Redirect to another site refused",
            &format!(
                "The PBX web portal sent this page on to {host}, which is outside the PBX; a remote session only follows redirects within the PBX portal."
            ),
        ));
    }
    // Authenticated pages never land in a shared or browser cache.
    parts
        .headers
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let body = EndsWithSession {
        head,
        inner: body,
        ended: session.ended.clone().cancelled_owned(),
    };
    Ok(Response::from_parts(parts, body))
}

/// The page for a portal request that failed: 504 on a timeout, 502 otherwise.
fn portal_error_page(e: PortalError) -> Response<Body> {
    match e {
        PortalError::Timeout(_) => {
            tracing::warn!(error = %e, "portal timeout");
            page(
                StatusCode::GATEWAY_TIMEOUT,
                "The PBX web portal is not answering",
                &e.to_string(),
            )
        }
        PortalError::Unreachable(_) => {
            tracing::warn!(error = %e, "portal unreachable");
            page(
                StatusCode::BAD_GATEWAY,
                "The PBX web portal is unreachable",
                &e.to_string(),
            )
        }
    }
}

/// The agent's own pages; nothing under it reaches the portal.
pub(crate) const REMOTE_PREFIX: &str = "/__remote/";

/// A plain page (shared helper).
pub(crate) fn page(status: StatusCode, title: &str, detail: &str) -> Response<Body> {
    crate::web::page(status, title, detail)
}
