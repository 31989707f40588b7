//! Visit links: the confirm page, spending the link for a grant cookie, and the passwordless
//! token minted for a grant.

use super::*;

pub(super) async fn visit(
    state: &Arc<ServerState>,
    public: &PublicUrl,
    device: &str,
    token: &str,
    client: IpAddr,
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
            let Ok(Some(VisitLink {
                device: d,
                cm_user,
                passwordless,
            })) = state.db.peek_visit(token)
            else {
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
            // The link is spent and the visit logged in the Operation Log, under whoever minted
            // the link, with the address of the browser that opened it.
            let (token, dev, client) = (token.to_string(), device.to_string(), client.to_string());
            let redeemed = writing(state, move |s| {
                let Some(redeemed) = s.db.redeem_visit(&token, &dev)? else {
                    return Ok(None);
                };
                let grant = &redeemed.grant;
                let op = crate::server::db::Op {
                    actor: &grant.cm_user,
                    source: crate::server::db::Source::Front,
                    action: "visit.open",
                    target: Some(&dev),
                    device: Some(&dev),
                    client: Some(&client),
                    result: "ok",
                    detail: Some(if grant.passwordless {
                        "passwordless"
                    } else {
                        "account login"
                    }),
                };
                if let Err(e) = s.db.log_op(&op) {
                    tracing::warn!(error = %format!("{e:#}"), "operation log write failed");
                }
                Ok(Some(redeemed))
            });
            let Redeemed { grant, cookie } = match redeemed.await {
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

pub(super) fn mint_token(state: &ServerState, device: &str, grant: &Grant) -> Result<String> {
    let now = crate::protocol::now_ms();
    crate::token::sign(
        &state.keys.signing,
        &crate::token::Claims {
            dev: device.to_string(),
            grant: grant.id.clone(),
            cm_user: grant.cm_user.clone(),
            iat_ms: now,
            exp_ms: now + crate::token::MAX_TOKEN_LIFETIME_MS,
            nonce: crate::crypto::random_token::<16>(),
        },
    )
}
