//! Request and response header sanitising: whatever a visitor or portal sends, nothing forged,
//! hop-by-hop or reserved survives.
#![no_main]
use http::header::{HeaderMap, HeaderName, HeaderValue, COOKIE, SET_COOKIE};
use libfuzzer_sys::fuzz_target;
use pbx_remote::agent::proxy::{rewrite_inbound_origin, rewrite_outbound, strip_inbound};
use pbx_remote::web::{same_origin, RESERVED_COOKIES};

/// Headers from `data`: lines of `name: value`.
fn headers(data: &[u8]) -> HeaderMap {
    let mut h = HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(n), Ok(v)) = (HeaderName::from_bytes(name), HeaderValue::from_bytes(value)) {
            h.append(n, v);
        }
    }
    h
}

fn cookie_names(h: &HeaderMap, name: &HeaderName, split: char) -> Vec<String> {
    h.get_all(name)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(split).map(str::to_string).collect::<Vec<_>>())
        .map(|c| c.split('=').next().unwrap_or("").trim().to_string())
        .collect()
}

fuzz_target!(|data: &[u8]| {
    let (visitor, portal) = ("https://dev.cm.example", "http://127.0.0.1:8080");
    let mut h = headers(data);
    let _ = same_origin(&h, visitor);
    strip_inbound(&mut h, data.first() == Some(&b'w'));
    rewrite_inbound_origin(&mut h, visitor, portal);
    for k in h.keys() {
        let k = k.as_str();
        assert!(
            !(k.starts_with("x-forwarded-") || k == "forwarded" || k == "x-real-ip"
                || k.starts_with("x-pbx-remote-") || k == "te" || k == "trailer"
                || k == "proxy-authorization" || k == "keep-alive"),
            "{k} survived"
        );
    }
    for name in cookie_names(&h, &COOKIE, ';') {
        assert!(!RESERVED_COOKIES.contains(&name.as_str()), "cookie {name} survived");
    }

    let mut r = headers(data);
    rewrite_outbound(&mut r, portal, visitor, false);
    for c in r.get_all(SET_COOKIE).iter().filter_map(|v| v.to_str().ok()) {
        let name = c.split('=').next().unwrap_or("").trim();
        assert!(!RESERVED_COOKIES.contains(&name), "set-cookie {name} survived");
        assert!(
            !c.split(';').any(|a| a.trim().split('=').next().unwrap_or("").trim().eq_ignore_ascii_case("domain")),
            "Domain survived: {c}"
        );
    }
});
