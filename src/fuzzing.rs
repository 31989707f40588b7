//! The fuzz targets' bodies, one function per target (`fuzz/fuzz_targets/*.rs` call them), so a
//! normal `cargo test` on stable replays every saved corpus input and past crash through the
//! same entry points (`tests/it/fuzz_corpus.rs`); `fuzz/run.sh` runs them for long on nightly.
//! Each panics when an invariant breaks. Public for the fuzz crate and the replay test only.

use crate::protocol::{read_frame, write_frame, ActivateRequest, ActivateResponse, Control};
use std::path::Path;

/// Runs `f` on a one-thread runtime (the frame readers are async).
fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("a current-thread runtime builds")
        .block_on(f)
}

/// Activation request and response JSON: whatever decodes re-encodes and decodes again.
pub fn activation(data: &[u8]) {
    if let Ok(req) = serde_json::from_slice::<ActivateRequest>(data) {
        let again = serde_json::to_vec(&req).expect("a decoded request encodes");
        serde_json::from_slice::<ActivateRequest>(&again).expect("and decodes again");
    }
    let _ = serde_json::from_slice::<ActivateResponse>(data);
    let _ = serde_json::from_slice::<crate::protocol::ErrorBody>(data);
}

/// The agent's config file: a refusal always names the file.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Err(e) = crate::config::AgentConfig::parse(Path::new("/fuzz/agent.toml"), text) {
        assert!(e.0.contains("/fuzz/agent.toml"), "{}", e.0);
    }
}

/// A portal page read for its login form (the portal login broker): never a panic, and a form
/// found holds the field it was found by, and hidden fields with names.
pub fn login_form(data: &[u8]) {
    let html = String::from_utf8_lossy(data);
    for field in ["password", "pass", "p"] {
        if let Some(form) = crate::agent::broker::form::login_form(&html, field) {
            assert!(form.inputs.iter().any(|i| i == field), "{form:?}");
            assert!(form.hidden.iter().all(|(n, _)| !n.is_empty() && n != field));
        }
    }
}

/// Control-stream frames and the TCP transport's goodbye from a hostile peer: decoding never
/// panics, and whatever decodes re-encodes and decodes again.
pub fn control_frame(data: &[u8]) {
    block_on(async {
        let mut input = data;
        while let Ok(Some(frame)) = read_frame::<_, Control>(&mut input).await {
            let mut buf = Vec::new();
            write_frame(&mut buf, &frame)
                .await
                .expect("a frame encodes");
            let again: Control = read_frame(&mut &buf[..])
                .await
                .expect("and decodes")
                .expect("to a frame");
            assert_eq!(format!("{frame:?}"), format!("{again:?}"));
        }
        let mut input = data;
        while let Ok(Some(goodbye)) = read_frame::<_, crate::protocol::Goodbye>(&mut input).await {
            let mut buf = Vec::new();
            write_frame(&mut buf, &goodbye)
                .await
                .expect("a goodbye encodes");
            let again: crate::protocol::Goodbye = read_frame(&mut &buf[..])
                .await
                .expect("and decodes")
                .expect("to a goodbye");
            assert_eq!(format!("{goodbye:?}"), format!("{again:?}"));
        }
    });
}

/// Passwordless tokens: nothing verifies under a key no input can have signed for.
pub fn passwordless_token(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let key = [7u8; 32];
    assert!(crate::token::verify(&key, &text).is_err());
    let _ = crate::token::verify(&data[..data.len().min(32)], &text);
}

/// An HTTP CONNECT proxy's answer: never more than 8 KiB taken, and reading stops right after
/// the first blank line.
pub fn proxy_answer(data: &[u8]) {
    block_on(async {
        let mut input = data;
        if let Ok(line) = crate::agent::read_proxy_answer(&mut input).await {
            let taken = data.len() - input.len();
            assert!(taken <= 8 * 1024);
            assert!(data[..taken].ends_with(b"\r\n\r\n"));
            let first = data
                .windows(4)
                .position(|w| w == b"\r\n\r\n")
                .expect("a head ends in a blank line");
            assert_eq!(first + 4, taken);
            assert!(line.chars().count() <= 200);
        }
    });
}

/// Headers from `data`: lines of `name: value`.
fn headers(data: &[u8]) -> http::HeaderMap {
    let mut h = http::HeaderMap::new();
    for line in data.split(|b| *b == b'\n') {
        let Some(colon) = line.iter().position(|b| *b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let value = value.strip_prefix(b" ").unwrap_or(value);
        if let (Ok(n), Ok(v)) = (
            http::HeaderName::from_bytes(name),
            http::HeaderValue::from_bytes(value),
        ) {
            h.append(n, v);
        }
    }
    h
}

fn cookie_names(h: &http::HeaderMap) -> Vec<String> {
    h.get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';').map(str::to_string).collect::<Vec<_>>())
        .map(|c| c.split('=').next().unwrap_or("").trim().to_string())
        .collect()
}

/// Request and response header sanitising: whatever a visitor or portal sends, nothing forged,
/// hop-by-hop or reserved survives, and a redirect never leaves the PBX.
pub fn sanitize(data: &[u8]) {
    use crate::agent::proxy::{rewrite_inbound_origin, rewrite_outbound, strip_inbound, Redirect};
    use crate::web::RESERVED_COOKIES;
    let (visitor, portal) = ("https://dev.cm.example", "http://127.0.0.1:8080");
    let mut h = headers(data);
    let _ = crate::web::same_origin(&h, visitor);
    strip_inbound(&mut h, data.first() == Some(&b'w'));
    rewrite_inbound_origin(&mut h, visitor, portal);
    for k in h.keys() {
        let k = k.as_str();
        assert!(
            !(k.starts_with("x-forwarded-")
                || k == "forwarded"
                || k == "x-real-ip"
                || k.starts_with("x-pbx-remote-")
                || k == "te"
                || k == "trailer"
                || k == "proxy-authorization"
                || k == "keep-alive"),
            "{k} survived"
        );
    }
    for name in cookie_names(&h) {
        assert!(
            !RESERVED_COOKIES.contains(&name.as_str()),
            "cookie {name} survived"
        );
    }
    let mut r = headers(data);
    let verdict = rewrite_outbound(&mut r, portal, visitor, false);
    for c in r
        .get_all(http::header::SET_COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
    {
        let name = c.split('=').next().unwrap_or("").trim();
        assert!(
            !RESERVED_COOKIES.contains(&name),
            "set-cookie {name} survived"
        );
        let attrs = || {
            c.split(';')
                .map(|a| a.trim().split('=').next().unwrap_or("").trim())
        };
        assert!(
            !attrs().any(|a| a.eq_ignore_ascii_case("domain")),
            "Domain survived: {c}"
        );
        assert!(
            attrs().any(|a| a.eq_ignore_ascii_case("secure")),
            "no Secure on https: {c}"
        );
    }
    match (verdict, r.get(http::header::LOCATION)) {
        (Redirect::ThirdParty(_), Some(l)) => panic!("a refused redirect kept {l:?}"),
        (Redirect::Kept, Some(l)) => {
            // As a browser reads it: spaces, tabs and newlines gone, `\` as `/`.
            let l: String = l
                .to_str()
                .unwrap_or("")
                .trim_matches(|c: char| c <= ' ')
                .chars()
                .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
                .map(|c| if c == '\\' { '/' } else { c })
                .collect();
            let scheme = l.split_once(':').is_some_and(|(s, _)| {
                s.starts_with(|c: char| c.is_ascii_alphabetic())
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c))
            });
            let elsewhere = l.starts_with("//") || scheme;
            assert!(
                !elsewhere || l.starts_with(visitor),
                "a redirect left the visitor's origin: {l}"
            );
        }
        _ => {}
    }
}

/// The per-request stream header from a hostile peer: never panics.
pub fn stream_header(data: &[u8]) {
    block_on(async {
        let mut input = data;
        let _ = read_frame::<_, crate::protocol::StreamHeader>(&mut input).await;
    });
}

/// WebSocket frame boundaries: the same data-frame count however the bytes are split.
pub fn wsframe(data: &[u8]) {
    use crate::agent::wsframe::FrameWatch;
    let Some((&split, rest)) = data.split_first() else {
        return;
    };
    let mut whole = FrameWatch::default();
    let a = whole.feed(rest);
    let mut pieces = FrameWatch::default();
    let step = usize::from(split).max(1);
    let b: usize = rest.chunks(step).map(|c| pieces.feed(c)).sum();
    assert_eq!(a, b);
}

/// A fuzz target's body.
pub type Body = fn(&[u8]);

/// Every target by its name under `fuzz/fuzz_targets/` (and its corpus directory).
pub const TARGETS: [(&str, Body); 9] = [
    ("activation", activation),
    ("config", config),
    ("control_frame", control_frame),
    ("login_form", login_form),
    ("passwordless_token", passwordless_token),
    ("proxy_answer", proxy_answer),
    ("sanitize", sanitize),
    ("stream_header", stream_header),
    ("wsframe", wsframe),
];
