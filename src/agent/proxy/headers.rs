//! Header rules at the portal boundary: hop-by-hop and identity-spoofing headers stripped on the
//! way in, the portal's own origin restored in `Host`/`Origin`/`Referer`, and the visitor's
//! restored in `Location`, `Set-Cookie` and friends on the way out.

use super::*;

/// Bytes of a request head as sent: request line plus `name: value\r\n` per header.
pub(super) fn head_size<B>(req: &Request<B>) -> usize {
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

pub(super) fn is_safe(m: &Method) -> bool {
    matches!(*m, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Removes hop-by-hop headers (and those `Connection` names), identity and forwarding headers
/// a visitor could forge (`Authorization` too: the remote session is the visitor's
/// authentication, and the portal's identity comes from the agent), and the agent's and
/// front's cookies. A validated WebSocket keeps its
/// upgrade headers.
pub fn strip_inbound(h: &mut HeaderMap, websocket: bool) {
    crate::web::strip_hop_by_hop(h);
    let forged: Vec<HeaderName> = h
        .keys()
        .filter(|k| {
            let k = k.as_str();
            k.starts_with("x-pbx-remote-")
                || k.starts_with("x-forwarded-")
                || matches!(
                    k,
                    "forwarded"
                        | "x-real-ip"
                        | "x-remote-user"
                        | "remote-user"
                        | "authorization"
                        | "proxy-authorization"
                )
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
pub(super) fn forwarded_headers(sh: &StreamHeader) -> [(HeaderName, Option<HeaderValue>); 3] {
    let visitor_host = sh.origin.split_once("://").map(|(_, a)| a).unwrap_or("");
    let value = |v: &str| HeaderValue::from_str(v).ok();
    [
        (X_FORWARDED_FOR, value(&sh.client_addr)),
        (X_FORWARDED_HOST, value(visitor_host)),
        (X_FORWARDED_PROTO, value(sh.scheme.as_str())),
    ]
}

pub(super) const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

pub(super) const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

pub(super) const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");

/// `url` with a leading `from` origin replaced by `to`; `None` if it is from elsewhere.
pub(super) fn replace_origin_prefix(url: &str, from: &str, to: &str) -> Option<String> {
    let head = url.get(..from.len())?;
    let rest = &url[from.len()..];
    if head.eq_ignore_ascii_case(from) && (rest.is_empty() || rest.starts_with(['/', '?', '#'])) {
        Some(format!("{to}{rest}"))
    } else {
        None
    }
}

/// What became of a response's `Location`.
#[derive(Debug, PartialEq, Eq)]
pub enum Redirect {
    /// None, relative, or turned toward the visitor's origin.
    Kept,
    /// To a host that is neither the portal nor this machine: never followed (the host named).
    ThirdParty(String),
}

/// Response side: hop-by-hop headers go (except on a 101); `Location` to the portal's own host
/// (any port or scheme) or to a loopback name becomes the visitor's origin with the same path,
/// and one to any other host is refused ([`Redirect::ThirdParty`]); portal cookies lose
/// `Domain=`, gain `Secure` when the visitor is on https, and reserved cookie names are dropped.
pub fn rewrite_outbound(
    h: &mut HeaderMap,
    portal: &str,
    visitor: &str,
    switching: bool,
) -> Redirect {
    if !switching {
        crate::web::strip_hop_by_hop(h);
    }
    let mut verdict = Redirect::Kept;
    if let Some(loc) = h.get(header::LOCATION).and_then(|v| v.to_str().ok()) {
        match redirect_target(loc, portal, visitor) {
            Ok(Some(r)) => {
                if let Ok(v) = HeaderValue::from_str(&r) {
                    h.insert(header::LOCATION, v);
                }
            }
            Ok(None) => {}
            Err(host) => {
                h.remove(header::LOCATION);
                verdict = Redirect::ThirdParty(host);
            }
        }
    }
    let secure = visitor.starts_with("https://");
    let cookies: Vec<HeaderValue> = h
        .get_all(header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .filter(|c| !RESERVED_COOKIES.contains(&crate::web::cookie_pair_name(c)))
        .filter_map(|c| {
            let mut c = strip_cookie_domain(c);
            if secure && !has_cookie_attr(&c, "secure") {
                c.push_str("; Secure");
            }
            HeaderValue::from_str(&c).ok()
        })
        .collect();
    h.remove(header::SET_COOKIE);
    for c in cookies {
        h.append(header::SET_COOKIE, c);
    }
    verdict
}

/// Where a `Location` should point: `Ok(None)` to leave it (relative), `Ok(Some(url))` for the
/// visitor's origin with the same path (the portal's host, the visitor's, or a loopback name),
/// `Err(host)` for any other host.
fn redirect_target(loc: &str, portal: &str, visitor: &str) -> Result<Option<String>, String> {
    // Read it as a browser will (WHATWG URL): surrounding spaces and controls dropped, tabs and
    // newlines inside removed, `\\` taken as `/`, so `/\\evil.example` or `/\t/evil.example`
    // cannot pass for a path.
    let norm: String = loc
        .trim_matches(|c: char| c <= ' ')
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .map(|c| if c == '\\' { '/' } else { c })
        .collect();
    let rest = if let Some(r) = norm.strip_prefix("//") {
        r
    } else if let Some(r) = after_scheme(&norm) {
        // `https:evil.example` names a host as surely as `https://evil.example`.
        r.trim_start_matches('/')
    } else {
        // A path (or a relative reference): it stays on the visitor's origin by itself.
        return Ok(None);
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let authority = authority.rsplit('@').next().unwrap_or(authority);
    let host = host_of(authority);
    let portal_host = host_of(portal.split_once("://").map_or(portal, |(_, a)| a));
    let visitor_host = host_of(visitor.split_once("://").map_or(visitor, |(_, a)| a));
    if host.eq_ignore_ascii_case(portal_host)
        || host.eq_ignore_ascii_case(visitor_host)
        || is_loopback_name(host)
    {
        let tail = if tail.is_empty() { "/" } else { tail };
        return Ok(Some(format!("{visitor}{tail}")));
    }
    Err(host.to_string())
}

/// What follows `scheme:` when `url` starts with a scheme (RFC 3986: a letter, then letters,
/// digits, `+`, `-`, `.`).
fn after_scheme(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once(':')?;
    let mut chars = scheme.chars();
    let first = chars.next()?;
    (first.is_ascii_alphabetic() && chars.all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c)))
        .then_some(rest)
}

/// The host of `host[:port]` or `[v6]:port`.
fn host_of(authority: &str) -> &str {
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split(']').next().unwrap_or(v6);
    }
    authority.split(':').next().unwrap_or(authority)
}

fn is_loopback_name(host: &str) -> bool {
    host.eq_ignore_ascii_case("localhost")
        || host.to_ascii_lowercase().ends_with(".localhost")
        || host
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback() || ip.is_unspecified())
}

fn has_cookie_attr(cookie: &str, name: &str) -> bool {
    cookie.split(';').skip(1).any(|a| {
        a.trim()
            .split('=')
            .next()
            .unwrap_or("")
            .trim()
            .eq_ignore_ascii_case(name)
    })
}

pub(super) fn strip_cookie_domain(c: &str) -> String {
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
