//! The public front: serves each device at `DEVICE.PUBLIC_HOST`, turns visit links into grants
//! (`__cm_visit`), and forwards granted requests over QUIC streams to the device's agent, with
//! the stream header saying who is visiting. A finished stream is kept for the next request of
//! the same visit (`reuse`).

use crate::httpserve::{self, Limits};
use crate::protocol::{write_frame, Scheme, StreamHeader};
use crate::secret::Secret;
use crate::server::db::{Grant, Redeemed, VisitLink};
use crate::server::ServerState;
use crate::web::{
    self, Body, CM_PREFIX, GRANT_COOKIE, GRANT_COOKIE_SECURE, PASSWORDLESS_PATH, VISIT_PREFIX,
};
use anyhow::{Context, Result};
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

mod forward;
mod reuse;
mod route;
mod strict;
#[cfg(test)]
mod tests;
mod visit;

use forward::*;
pub(crate) use reuse::StreamRoom;
use reuse::*;
pub use route::visit_url;
use route::*;
use strict::*;
use visit::*;

/// Time to open a stream to the agent.
const OPEN_STREAM_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request waits for a free tunnel stream before it gets 503 "busy".
const STREAM_WAIT: Duration = Duration::from_secs(1);
/// Concurrent visitor connections.
const MAX_CONNECTIONS: usize = 1024;
/// Time a visitor has to send a request's headers, and to send the next one on a kept-alive
/// connection. Longer than the default: browsers keep idle connections for reuse.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(15);
/// Largest request head a visitor may send.
const MAX_REQUEST_HEAD: usize = 64 * 1024;

/// rustls acceptor for an https front (or console); `flags` name the files in errors.
pub fn tls_acceptor(cert: &Path, key: &Path, flags: &str) -> Result<tokio_rustls::TlsAcceptor> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(
            crate::tls::load_certs(cert)?,
            crate::tls::load_private_key(key)?,
        )
        .with_context(|| flags.to_string())?;
    cfg.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// Serves the front until `shutdown`, then drains it.
pub async fn serve(
    state: Arc<ServerState>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: CancellationToken,
) {
    let mut limits = Limits::new("front", MAX_CONNECTIONS);
    limits.header_read = HEADER_READ_TIMEOUT;
    limits.max_buf_size = Some(MAX_REQUEST_HEAD);
    limits.nodelay = true;
    let public = Arc::new(PublicUrl::of(&state));
    httpserve::serve(listener, Strict(tls), limits, shutdown, move |peer| {
        let (state, public) = (state.clone(), public.clone());
        // One keeper per visitor connection: it remembers the connection's grant lookup.
        let keeper = Keeper::default();
        hyper::service::service_fn(move |req| {
            let (state, keeper, public) = (state.clone(), keeper.clone(), public.clone());
            async move {
                let resp = handle(&state, &public, peer, &keeper, req).await;
                Ok::<_, std::convert::Infallible>(resp)
            }
        })
    })
    .await
}

async fn handle(
    state: &Arc<ServerState>,
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
    if let Some(token) = req.uri().path().strip_prefix(VISIT_PREFIX) {
        let token = token.to_string();
        if let Some(page) = unknown_device() {
            return page;
        }
        let client = state.opts.client_of(peer.ip(), req.headers());
        return visit(state, public, &device, &token, client, req).await;
    }
    if req.uri().path().starts_with(CM_PREFIX) {
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
    let client = state.opts.client_of(peer.ip(), req.headers());
    forward(state, public, &device, grant, client, req).await
}

/// Runs registry work that writes on the runtime's blocking threads. The front runs on the data
/// path's thread, which carries every visit to every PBX, and a write can wait out SQLite's busy
/// timeout (5 s) while an admin command or another process holds the lock. The visit path's
/// reads stay inline: they have a connection of their own that a writer does not hold up.
async fn writing<T: Send + 'static>(
    state: &Arc<ServerState>,
    work: impl FnOnce(&ServerState) -> Result<T> + Send + 'static,
) -> Result<T> {
    let (state, span) = (state.clone(), tracing::Span::current());
    tokio::task::spawn_blocking(move || span.in_scope(|| work(&state)))
        .await
        .context("registry write task")?
}

fn internal(e: anyhow::Error) -> Response<Body> {
    tracing::error!(error = %format!("{e:#}"), "front error");
    web::page(
        StatusCode::INTERNAL_SERVER_ERROR,
        "Server error",
        "The server could not handle this request.",
    )
}
