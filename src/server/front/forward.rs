//! Forwarding a granted request over a tunnel stream: the stream header, the request and its
//! answer, with the grant cookie kept from the agent and from the portal.

use super::*;
use hyper_util::rt::TokioIo;

pub(super) async fn forward(
    state: &Arc<ServerState>,
    public: &PublicUrl,
    device: &str,
    grant: Arc<Grant>,
    client: IpAddr,
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

    let room = &link.streams;
    let mut kept = reusable
        .then(|| room.take(link.generation, &grant, client))
        .flatten();
    let mut permit = None;
    // One deadline for all of this request's waiting, however often a stream handed to it
    // turns out closed.
    let mut until = None;
    loop {
        if let Some(mut k) = kept.take() {
            if k.sender.ready().await.is_ok() {
                match k.sender.try_send_request(req).await {
                    Ok(resp) => return response_from_tunnel(device, resp, None, Some(k)),
                    // The agent closed the kept stream before taking the request: use another.
                    Err(mut e) => match e.take_message() {
                        Some(r) => req = r,
                        None => return tunnel_failed(device, &e.into_error()),
                    },
                }
            }
        }
        if permit.is_some() {
            break;
        }
        permit = room.permits.clone().try_acquire_owned().ok();
        if permit.is_some() || !reusable {
            break;
        }
        // A full tunnel: wait a moment for a stream of this visit or a free one (another
        // visit's idle stream is closed for it), then refuse (StreamRoom).
        let until = *until.get_or_insert_with(|| tokio::time::Instant::now() + STREAM_WAIT);
        match room.wait(link.generation, &grant, client, until).await {
            Some(Next::Kept(k)) => kept = Some(k),
            Some(Next::Permit(p)) => permit = Some(p),
            None => break,
        }
    }

    let Some(grant_slot) = link.grant_slot(&grant.id) else {
        return web::page(
            StatusCode::TOO_MANY_REQUESTS,
            "Too many requests",
            "This session has too many requests in flight to the PBX; wait for some to finish.",
        );
    };
    // An upgrade or a redemption that finds the tunnel full waits a moment for a free stream.
    if permit.is_none() && !reusable {
        permit = tokio::time::timeout(STREAM_WAIT, room.permits.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok);
    }
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
        scheme: public.scheme,
        origin: public.device_origin(device),
        grant_expires_ms: expires_ms(&grant),
        passwordless_token: None,
    };
    if redeeming {
        let id = grant.id.clone();
        match writing(state, move |s| s.db.mark_grant_redeemed(&id)).await {
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
            let back = reusable.then(|| KeptStream::new(&link, header, client, sender));
            response_from_tunnel(device, resp, visitor_upgrade, back)
        }
        Err(e) => tunnel_failed(device, &e),
    }
}

/// When a grant ends, as the stream header says it (ms since the epoch).
pub(super) fn expires_ms(grant: &Grant) -> u64 {
    (grant.expires_at.max(0) as u64) * 1000
}

pub(super) fn tunnel_failed(device: &str, e: &hyper::Error) -> Response<Body> {
    // The visitor's own body broke off or lied about its framing (a chunk size past 2^64,
    // say): their request is at fault, not the tunnel.
    let visitor_body = e.is_user()
        && std::error::Error::source(e).is_some_and(|c| c.downcast_ref::<hyper::Error>().is_some());
    if visitor_body {
        tracing::info!(device, error = %e, "malformed request body refused");
        return bad_framing("The request's body does not match its framing.");
    }
    tracing::info!(device, error = %e, "request through the tunnel failed");
    web::page(
        StatusCode::BAD_GATEWAY,
        "The PBX did not answer",
        "The connection to this PBX was lost during the request; try again.",
    )
}

/// The agent's answer, made fit for the visitor. A reusable stream goes back to the link's
/// pool once the body has been read to its end.
pub(super) fn response_from_tunnel(
    device: &str,
    mut resp: Response<Incoming>,
    visitor_upgrade: Option<hyper::upgrade::OnUpgrade>,
    back: Option<KeptStream>,
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

pub(super) fn strip_grant_cookie(h: &mut http::HeaderMap) {
    web::drop_cookies(h, &[GRANT_COOKIE, GRANT_COOKIE_SECURE]);
}

/// `name=value…` names the front's grant cookie.
pub(super) fn is_grant_cookie(c: &str) -> bool {
    [GRANT_COOKIE, GRANT_COOKIE_SECURE].contains(&web::cookie_pair_name(c))
}

pub(super) fn drop_grant_set_cookie(h: &mut http::HeaderMap) {
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
