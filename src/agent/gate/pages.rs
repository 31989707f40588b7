//! The gate's own responses: cookies, redirects, the login-required answer, JSON and the
//! helpers that keep `next` on the device.

use super::*;

pub(super) fn json(status: StatusCode, v: serde_json::Value) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/json")
        .body(web::full(v.to_string()))
        .unwrap_or_else(|_| web::page(StatusCode::INTERNAL_SERVER_ERROR, "Error", ""))
}

/// The session cookie's name for this visitor-facing scheme.
pub fn cookie_name(h: &StreamHeader) -> &'static str {
    if h.scheme == Scheme::Https {
        SESSION_COOKIE_SECURE
    } else {
        SESSION_COOKIE
    }
}

pub(super) fn session_cookie(h: &StreamHeader, id: &str) -> String {
    let secure = if h.scheme == Scheme::Https {
        "; Secure"
    } else {
        ""
    };
    format!(
        "{}={id}; Path=/; HttpOnly; SameSite=Lax{secure}",
        cookie_name(h)
    )
}

pub(super) fn clear_cookie(h: &StreamHeader) -> String {
    let secure = if h.scheme == Scheme::Https {
        "; Secure"
    } else {
        ""
    };
    format!(
        "{}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax{secure}",
        cookie_name(h)
    )
}

pub(super) fn redirect_with_cookie(location: &str, cookie: &str) -> Response<Body> {
    Response::builder()
        .status(StatusCode::SEE_OTHER)
        .header(header::LOCATION, location)
        .header(header::SET_COOKIE, cookie)
        .header(header::CACHE_CONTROL, "no-store")
        .header("referrer-policy", "no-referrer")
        .body(web::full(Bytes::new()))
        .unwrap_or_else(|_| web::page(StatusCode::INTERNAL_SERVER_ERROR, "Error", ""))
}

/// Without a session: HTML navigations go to the login page, everything else gets 401.
pub(super) fn login_required<B>(req: &Request<B>) -> Response<Body> {
    let html = matches!(*req.method(), Method::GET | Method::HEAD)
        && req
            .headers()
            .get(header::ACCEPT)
            .and_then(|a| a.to_str().ok())
            .is_some_and(|a| a.contains("text/html"));
    if html {
        let next = req
            .uri()
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/");
        let target = format!(
            "/__remote/login?next={}",
            url::form_urlencoded::byte_serialize(next.as_bytes()).collect::<String>()
        );
        return Response::builder()
            .status(StatusCode::SEE_OTHER)
            .header(header::LOCATION, target)
            .header(header::CACHE_CONTROL, "no-store")
            .body(web::full(Bytes::new()))
            .unwrap_or_else(|_| web::page(StatusCode::UNAUTHORIZED, "Login required", ""));
    }
    let mut r = web::page(
        StatusCode::UNAUTHORIZED,
        "Login required",
        "Log in through /__remote/login first.",
    );
    r.headers_mut()
        .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Cookie"));
    r
}

/// A same-site path to go to after login (never another host, never the agent's own pages).
pub fn safe_next(next: &str) -> String {
    let ok = next.starts_with('/')
        && !next.starts_with("//")
        && !next.starts_with("/\\")
        && !next.starts_with(REMOTE_PREFIX)
        && !next.chars().any(|c| c.is_control());
    if ok {
        next.to_string()
    } else {
        "/".to_string()
    }
}

pub(super) fn query_param(query: Option<&str>, name: &str) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

pub(super) fn human_duration(d: Duration) -> String {
    let secs = d.as_secs().max(1);
    if secs >= 60 {
        let m = secs.div_ceil(60);
        format!("{m} minute{}", if m == 1 { "" } else { "s" })
    } else {
        format!("{secs} second{}", if secs == 1 { "" } else { "s" })
    }
}
