//! Forwarding for a session the agent logs in to the portal for: its portal cookies added, one
//! new portal login when the portal answers as logged out (a 401, a redirect to the login page,
//! or for a form login the login page itself), and the request sent again when its body was
//! small enough to keep.

use super::*;
use crate::agent::broker::{error_page, MAX_PAGE, MAX_REPLAY};
use crate::agent::portal::UpBody;
use hyper::body::Body as _;

/// The portal's answer, and the start of its body when the agent read it to see whether it is
/// the login page (sent to the visitor before the rest).
pub(super) type Answer = (Response<Incoming>, Option<Bytes>);

/// What a portal answer says about the portal session.
enum Check {
    /// Still logged in: the answer, as [`Answer`].
    Fine(Response<Incoming>, Option<Bytes>),
    /// The portal session is gone.
    LoggedOut,
}

/// Sends `parts`/`body` with the session's portal cookies (logging in first if needed); the
/// portal's answer, or the page the visitor gets instead.
pub(super) async fn send(
    ctx: &ProxyCtx,
    broker: &Arc<Broker>,
    portal: &Arc<Portal>,
    session: &Arc<Session>,
    mut parts: http::request::Parts,
    body: Incoming,
) -> Result<Answer, Response<Body>> {
    let generation = broker.ensure(portal, &ctx.gate, session).await?;
    // A body is kept when its length is known and small (none counts), so it can be sent
    // again; hyper reads the length from the request's framing.
    let replayable = body
        .size_hint()
        .upper()
        .is_some_and(|n| n <= MAX_REPLAY as u64);
    if !replayable {
        // A large or chunked body streams; it cannot be sent a second time.
        broker.add_cookies(session, &mut parts.headers);
        let resp = portal
            .send(Request::from_parts(parts, UpBody::Stream(body)))
            .await
            .map_err(portal_error_page)?;
        if !broker.looks_logged_out(resp.status(), resp.headers()) {
            return Ok((resp, None));
        }
        broker.renew(portal, &ctx.gate, session, generation).await?;
        return Err(page(
            StatusCode::CONFLICT,
            "Please send that again",
            "The PBX web portal had ended its session, so the agent signed in to it again. Your last submission was too large to resend for you: go back and send it again.",
        ));
    }
    let kept = http_body_util::Limited::new(body, MAX_REPLAY)
        .collect()
        .await
        .map_err(|_| {
            page(
                StatusCode::BAD_REQUEST,
                "Bad request",
                "The request body could not be read.",
            )
        })?
        .to_bytes();
    let (method, uri, headers) = (parts.method, parts.uri, parts.headers);
    let build = || {
        let mut req = Request::new(UpBody::Full(Some(kept.clone()).filter(|b| !b.is_empty())));
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri.clone();
        *req.headers_mut() = headers.clone();
        broker.add_cookies(session, req.headers_mut());
        req
    };
    let first = portal.send(build()).await.map_err(portal_error_page)?;
    if let Check::Fine(resp, head) = check(broker, &method, first).await? {
        return Ok((resp, head));
    }
    broker.renew(portal, &ctx.gate, session, generation).await?;
    let second = portal.send(build()).await.map_err(portal_error_page)?;
    match check(broker, &method, second).await? {
        Check::Fine(resp, head) => Ok((resp, head)),
        Check::LoggedOut => {
            let why = "the portal still answered as logged out right after a new login";
            ctx.gate
                .audit_session(session, "portal_login_failed", Some(why));
            Err(error_page(why))
        }
    }
}

/// Whether `resp` says the portal session is gone. For a form login, an HTML page answering a
/// GET is read (up to [`MAX_PAGE`]) to see whether it is the login page; a longer one is not.
async fn check(
    broker: &Broker,
    method: &Method,
    mut resp: Response<Incoming>,
) -> Result<Check, Response<Body>> {
    if broker.looks_logged_out(resp.status(), resp.headers()) {
        return Ok(Check::LoggedOut);
    }
    let html = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.trim_start().starts_with("text/html"));
    if !(broker.detects_login_pages()
        && *method == Method::GET
        && resp.status() == StatusCode::OK
        && html)
    {
        return Ok(Check::Fine(resp, None));
    }
    let mut head = bytes::BytesMut::new();
    let whole = loop {
        match resp.body_mut().frame().await {
            None => break true,
            Some(Ok(frame)) => {
                if let Ok(data) = frame.into_data() {
                    head.extend_from_slice(&data);
                    if head.len() > MAX_PAGE {
                        break false;
                    }
                }
            }
            Some(Err(e)) => {
                tracing::warn!(error = %e, "portal answer broke off");
                return Err(page(
                    StatusCode::BAD_GATEWAY,
                    "The PBX web portal's answer broke off",
                    &e.to_string(),
                ));
            }
        }
    };
    if whole && broker.is_login_page(&head) {
        return Ok(Check::LoggedOut);
    }
    Ok(Check::Fine(resp, Some(head.freeze())))
}
