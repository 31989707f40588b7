//! Forwarding for a session the agent logs in to the portal for: its portal cookies added, one
//! new portal login when the portal answers as logged out, and the request sent again when its
//! body was small enough to keep.

use super::*;
use crate::agent::broker::{error_page, MAX_REPLAY};
use crate::agent::portal::UpBody;

/// Sends `parts`/`body` with the session's portal cookies (logging in first if needed); the
/// portal's answer, or the page the visitor gets instead.
pub(super) async fn send(
    ctx: &ProxyCtx,
    broker: &Arc<Broker>,
    portal: &Arc<Portal>,
    session: &Arc<Session>,
    mut parts: http::request::Parts,
    body: Incoming,
) -> Result<Response<Incoming>, Response<Body>> {
    let generation = broker.ensure(portal, &ctx.gate, session).await?;
    // A body is kept when it is small and its length known, so it can be sent again.
    let kept = match replayable(&parts.headers) {
        true => Some(
            http_body_util::Limited::new(body, MAX_REPLAY)
                .collect()
                .await
                .map_err(|_| {
                    page(
                        StatusCode::BAD_REQUEST,
                        "Bad request",
                        "The request body could not be read.",
                    )
                })?
                .to_bytes(),
        ),
        false => {
            broker.add_cookies(session, &mut parts.headers);
            let resp = portal
                .send(Request::from_parts(parts, UpBody::Stream(body)))
                .await
                .map_err(portal_error_page)?;
            if !broker.looks_logged_out(resp.status(), resp.headers()) {
                return Ok(resp);
            }
            broker.renew(portal, &ctx.gate, session, generation).await?;
            return Err(page(
                StatusCode::CONFLICT,
                "Please send that again",
                "The PBX web portal had ended its session, so the agent signed in to it again. Your last submission was too large to resend for you: go back and send it again.",
            ));
        }
    };
    let (method, uri, headers) = (parts.method, parts.uri, parts.headers);
    let build = |headers: &HeaderMap| {
        let mut req = Request::new(UpBody::Full(kept.clone().filter(|b| !b.is_empty())));
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri.clone();
        *req.headers_mut() = headers.clone();
        broker.add_cookies(session, req.headers_mut());
        req
    };
    let resp = portal
        .send(build(&headers))
        .await
        .map_err(portal_error_page)?;
    if !broker.looks_logged_out(resp.status(), resp.headers()) {
        return Ok(resp);
    }
    broker.renew(portal, &ctx.gate, session, generation).await?;
    let resp = portal
        .send(build(&headers))
        .await
        .map_err(portal_error_page)?;
    if broker.looks_logged_out(resp.status(), resp.headers()) {
        let why = "the portal still answered as logged out right after a new login";
        ctx.gate
            .audit_session(session, "portal_login_failed", Some(why));
        return Err(error_page(why));
    }
    Ok(resp)
}

/// A body that can be kept: none, or a `Content-Length` up to [`MAX_REPLAY`] (chunked ones
/// stream).
fn replayable(h: &HeaderMap) -> bool {
    if h.contains_key(header::TRANSFER_ENCODING) {
        return false;
    }
    match h.get(header::CONTENT_LENGTH) {
        None => true,
        Some(v) => v
            .to_str()
            .ok()
            .and_then(|v| v.parse::<usize>().ok())
            .is_some_and(|n| n <= MAX_REPLAY),
    }
}
