//! Small HTTP helpers both sides use for their own pages: a boxed body type and plain HTML pages
//! that work without JavaScript.

use bytes::Bytes;
use http::{header, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full};

/// Response body type of every proxying server here.
pub type Body = BoxBody<Bytes, hyper::Error>;

// Names both sides reserve on a device's origin: the front's grant cookie and `/__cm/` pages, the
// agent's session cookie and `/__remote/` pages. Portal cookies with these names are dropped and
// portal paths under these prefixes are never reached.

/// The agent's session cookie on plain-HTTP fronts.
pub const SESSION_COOKIE: &str = "__pbxra_sid";
/// The agent's session cookie when the visitor-facing scheme is https.
pub const SESSION_COOKIE_SECURE: &str = "__Host-__pbxra_sid";
/// The front's grant cookie (plain-HTTP name).
pub const GRANT_COOKIE: &str = "__cm_visit";
/// The front's grant cookie on https.
pub const GRANT_COOKIE_SECURE: &str = "__Host-__cm_visit";
/// Every cookie name the agent and front reserve.
pub const RESERVED_COOKIES: [&str; 4] = [
    SESSION_COOKIE,
    SESSION_COOKIE_SECURE,
    GRANT_COOKIE,
    GRANT_COOKIE_SECURE,
];

/// The agent's own pages; nothing under it reaches the portal.
pub const REMOTE_PREFIX: &str = "/__remote/";
/// The agent's login page (GET shows the form, POST logs in).
pub const LOGIN_PATH: &str = "/__remote/login";
/// The agent's logout page (GET shows the button, a same-origin POST logs out).
pub const LOGOUT_PATH: &str = "/__remote/logout";
/// The remote session as JSON.
pub const SESSION_PATH: &str = "/__remote/session";
/// Where a passwordless visit lands to hand its token to the agent.
pub const PASSWORDLESS_PATH: &str = "/__remote/passwordless";
/// The front's own pages on a device origin; never forwarded.
pub const CM_PREFIX: &str = "/__cm/";
/// A visit link's path: `VISIT_PREFIX` + token.
pub const VISIT_PREFIX: &str = "/__cm/visit/";

/// A body from bytes.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A plain HTML page (no JavaScript, never cached).
pub fn page(status: StatusCode, title: &str, detail: &str) -> Response<Body> {
    html(status, title, &format!("<p>{}</p>", escape(detail)))
}

/// An HTML page with a trusted `body_html` fragment.
pub fn html(status: StatusCode, title: &str, body_html: &str) -> Response<Body> {
    let doc = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\">\
         <title>{t}</title><style>body{{font-family:sans-serif;max-width:40em;margin:3em auto;padding:0 1em}}\
         button{{font-size:1.1em;padding:.4em 1.2em}}</style></head>\n<body><h1>{t}</h1>\n{body_html}\n</body></html>\n",
        t = escape(title)
    );
    Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "text/html; charset=utf-8")
        .header(header::CACHE_CONTROL, "no-store")
        .header("x-frame-options", "DENY")
        .body(full(doc))
        .unwrap_or_else(|_| Response::new(full(Bytes::new())))
}

/// Escapes text for HTML.
pub fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

/// Whether a browser says the request comes from a page of `origin` itself (a state-changing
/// request or a WebSocket must). `Sec-Fetch-Site`, which pages cannot forge and browsers send
/// whatever the referrer policy, must be `same-origin` (or `none`: typed or bookmarked);
/// `Origin`, when it names one, must be `origin`. A page under `Referrer-Policy: no-referrer`
/// makes browsers send `Origin: null` on its own form posts and fetches, so `null` passes only
/// with `Sec-Fetch-Site: same-origin`. A request with neither header (not a browser) passes.
pub fn same_origin(h: &http::HeaderMap, origin: &str) -> bool {
    let site = h.get("sec-fetch-site").map(|v| v.as_bytes());
    if let Some(site) = site {
        if site != b"same-origin" && site != b"none" {
            return false;
        }
    }
    match h.get(header::ORIGIN).map(|v| v.as_bytes()) {
        None => true,
        Some(b"null") => site == Some(b"same-origin".as_slice()),
        Some(o) => o.eq_ignore_ascii_case(origin.as_bytes()),
    }
}

/// Hop-by-hop headers (RFC 9110 §7.6.1) that never cross a proxy. Names, not strings: a
/// string is parsed (and a non-standard name copied) at every use, on every request.
pub const HOP_BY_HOP: [http::HeaderName; 9] = [
    header::CONNECTION,
    http::HeaderName::from_static("keep-alive"),
    http::HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers and every header named in `Connection`.
pub fn strip_hop_by_hop(h: &mut http::HeaderMap) {
    // Names `Connection` lists beyond the hop-by-hop ones (usually none: `keep-alive` and
    // `upgrade` are what it carries), so the common case allocates nothing.
    let mut listed: Vec<http::HeaderName> = Vec::new();
    for token in h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        let hop = HOP_BY_HOP
            .iter()
            .any(|n| n.as_str().eq_ignore_ascii_case(token));
        if !hop {
            // from_bytes lowercases; a token that is no header name names nothing to remove.
            if let Ok(n) = http::HeaderName::from_bytes(token.as_bytes()) {
                listed.push(n);
            }
        }
    }
    for name in listed {
        h.remove(name);
    }
    for name in &HOP_BY_HOP {
        h.remove(name);
    }
}

/// The name in a `name=value…` cookie pair (request or `Set-Cookie`).
pub fn cookie_pair_name(pair: &str) -> &str {
    pair.split('=').next().unwrap_or("").trim()
}

/// Removes the cookies named in `names` from a request's `Cookie` headers; the others stay, in
/// one header.
pub fn drop_cookies(h: &mut http::HeaderMap, names: &[&str]) {
    let mut kept = String::new();
    for c in h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|c| !c.is_empty() && !names.contains(&cookie_pair_name(c)))
    {
        if !kept.is_empty() {
            kept.push_str("; ");
        }
        kept.push_str(c);
    }
    h.remove(header::COOKIE);
    if !kept.is_empty() {
        // The string's buffer becomes the value (checked, not copied).
        if let Ok(v) = http::HeaderValue::from_maybe_shared(Bytes::from(kept)) {
            h.insert(header::COOKIE, v);
        }
    }
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie<'a>(headers: &'a http::HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

#[cfg(test)]
mod tests {
    #[test]
    fn escapes_and_finds_cookies() {
        assert_eq!(
            super::escape("<a href='x'>&"),
            "&lt;a href=&#39;x&#39;&gt;&amp;"
        );
        let mut h = http::HeaderMap::new();
        h.append("cookie", "a=1; b=2".parse().unwrap());
        h.append("cookie", "c=3".parse().unwrap());
        assert_eq!(super::cookie(&h, "b"), Some("2"));
        assert_eq!(super::cookie(&h, "c"), Some("3"));
        assert_eq!(super::cookie(&h, "d"), None);
    }

    #[test]
    fn origin_checks() {
        fn same(pairs: &[(&'static str, &str)]) -> bool {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.append(*k, v.parse().unwrap());
            }
            super::same_origin(&h, "https://dev1.cm.example")
        }
        let o = "https://dev1.cm.example";
        // Browsers.
        assert!(same(&[("origin", o), ("sec-fetch-site", "same-origin")]));
        assert!(same(&[("origin", "HTTPS://DEV1.CM.EXAMPLE")]));
        assert!(same(&[("sec-fetch-site", "same-origin")]));
        assert!(same(&[("sec-fetch-site", "none")]));
        // A page under `Referrer-Policy: no-referrer` posting to itself.
        assert!(same(&[
            ("origin", "null"),
            ("sec-fetch-site", "same-origin")
        ]));
        // Other sites, sibling devices (same site, not same origin), opaque origins.
        assert!(!same(&[("origin", "https://evil.example")]));
        assert!(!same(&[
            ("origin", "https://evil.example"),
            ("sec-fetch-site", "same-origin")
        ]));
        assert!(!same(&[("origin", o), ("sec-fetch-site", "cross-site")]));
        assert!(!same(&[
            ("origin", "https://dev2.cm.example"),
            ("sec-fetch-site", "same-site")
        ]));
        assert!(!same(&[("sec-fetch-site", "same-site")]));
        assert!(!same(&[("origin", "null")]));
        assert!(!same(&[
            ("origin", "null"),
            ("sec-fetch-site", "cross-site")
        ]));
        assert!(!same(&[("origin", "null"), ("sec-fetch-site", "none")]));
        // Not a browser.
        assert!(same(&[]));
    }
}
