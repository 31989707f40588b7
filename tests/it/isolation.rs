//! The door's walls (catalogue C1, C3, C5, C7): the agent reaches only the portal, and from the
//! address it is told to; malformed or ambiguous requests stop at the front; cross-site
//! WebSockets stop at the agent. Canary listeners and paths prove that nothing got through.

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A listener that counts every connection it accepts (and every byte it is sent).
struct Canary {
    addr: SocketAddr,
    hits: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Canary {
    async fn start(ip: &str) -> Option<Canary> {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.ok()?;
        let addr = listener.local_addr().ok()?;
        let hits = Arc::new(AtomicUsize::new(0));
        let h = hits.clone();
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                h.fetch_add(1, Ordering::SeqCst);
                let mut buf = [0u8; 1024];
                let _ = s.read(&mut buf).await;
            }
        });
        Some(Canary { addr, hits, task })
    }
}

impl Drop for Canary {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends raw bytes to `to` from a socket bound to `from`, and returns the answer until the
/// peer closes (or 5 s), and whether it closed.
async fn raw(from: Option<&str>, to: SocketAddr, bytes: &[u8]) -> (String, bool) {
    let sock = if to.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .unwrap();
    if let Some(ip) = from {
        sock.bind(SocketAddr::new(ip.parse().unwrap(), 0)).unwrap();
    }
    let mut s = sock.connect(to).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

fn status_of(answer: &str) -> u16 {
    answer
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

/// C3: a portal that trusts loopback callers gives a remote session no more than the same
/// account gets from the LAN, when `pbx.portal_source_addr` names an address it does not trust;
/// and nothing reaches it before a remote login.
#[tokio::test(flavor = "multi_thread")]
async fn c3_a_loopback_trusting_portal_sees_the_configured_source_and_grants_no_more() {
    let w = World::start_with_toml(false, |t| {
        t.replacen("[pbx]\n", "[pbx]\nportal_source_addr = \"127.0.0.2\"\n", 1)
    })
    .await;
    let get = b"GET /loopback-admin HTTP/1.1\r\nHost: pbx\r\nConnection: close\r\n\r\n";
    // The fixture does trust loopback: 127.0.0.1 gets the page, a LAN caller (127.0.0.3 here)
    // does not.
    let (a, _) = raw(Some("127.0.0.1"), w.portal.addr, get).await;
    assert_eq!(status_of(&a), 200, "{a}");
    let (a, _) = raw(Some("127.0.0.3"), w.portal.addr, get).await;
    assert_eq!(status_of(&a), 403, "{a}");
    let direct = w.portal.hits();

    // (a) Before a remote login: nothing is forwarded.
    let mut g = w.granted("alice", false).await;
    let r = g.get("/loopback-admin").await;
    assert_ne!(r.status(), 200);
    assert_eq!(w.portal.hits(), direct, "nothing reached the portal");

    // (b) Logged in as the remote Administrator: the LAN answer, not the loopback one.
    let mut v = w.visitor("alice", false).await;
    let r = v.get("/loopback-admin").await;
    assert_eq!(r.status(), 403);
    assert_eq!(r.text().await.unwrap(), "log in first");
    assert_eq!(v.get("/").await.status(), 200);

    // Every connection the agent opened came from the configured address.
    let peers = w.portal.log.peers.lock().unwrap().clone();
    let from_agent = &peers[2..];
    let want: IpAddr = "127.0.0.2".parse().unwrap();
    assert!(
        !from_agent.is_empty() && from_agent.iter().all(|p| *p == want),
        "{peers:?}"
    );
}

/// C5: ambiguous and malformed requests stop at the front with 400 and a closed connection;
/// the portal never sees the request hidden in them.
#[tokio::test(flavor = "multi_thread")]
async fn c5_smuggling_forms_get_400_and_a_closed_connection_at_the_front() {
    let w = World::start(false, "").await;
    let v = w.visitor("alice", false).await;
    let host = format!("{}:{}", v.host, w.server.public.port());
    let cookie = v.cookie_header();
    let canary =
        format!("GET /canary-smuggled HTTP/1.1\r\nHost: {host}\r\nCookie: {cookie}\r\n\r\n");
    let head =
        |line: &str, extra: &str| format!("{line}\r\nHost: {host}\r\nCookie: {cookie}\r\n{extra}");
    let forms: Vec<(&str, String)> = vec![
        (
            "CL.CL",
            head(
                "POST /upload HTTP/1.1",
                "Content-Length: 5\r\nContent-Length: 44\r\n\r\nhello",
            ) + &canary,
        ),
        (
            "CL.TE",
            head(
                "POST /upload HTTP/1.1",
                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
            ) + &canary,
        ),
        (
            "TE.CL",
            head(
                "POST /upload HTTP/1.1",
                "Transfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
            ) + &canary,
        ),
        (
            "TE.TE, a second encoding",
            head(
                "POST /upload HTTP/1.1",
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: identity\r\n\r\n0\r\n\r\n",
            ) + &canary,
        ),
        (
            "TE.TE, space before the colon",
            head(
                "POST /upload HTTP/1.1",
                "Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
            ) + &canary,
        ),
        (
            "TE.TE, an unknown coding",
            head(
                "POST /upload HTTP/1.1",
                "Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
            ) + &canary,
        ),
        (
            "TE.TE, a vertical tab",
            head(
                "POST /upload HTTP/1.1",
                "Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
            ) + &canary,
        ),
        (
            "bare LF",
            format!("GET / HTTP/1.1\nHost: {host}\nCookie: {cookie}\n\n")
                + &canary.replace("\r\n", "\n"),
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            head(
                "POST /upload HTTP/1.0",
                "Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n0\r\n\r\n",
            ) + &canary,
        ),
        (
            "a header with NUL",
            head("GET / HTTP/1.1", "X-Note: a\0b\r\n\r\n") + &canary,
        ),
        (
            "obs-fold",
            head("GET / HTTP/1.1", "X-Note: a\r\n b\r\n\r\n") + &canary,
        ),
        (
            "a chunk size past 2^64",
            head(
                "POST /upload HTTP/1.1",
                "Transfer-Encoding: chunked\r\n\r\n1FFFFFFFFFFFFFFFF\r\nx\r\n0\r\n\r\n",
            ) + &canary,
        ),
    ];
    let mut failures = vec![];
    for (name, bytes) in &forms {
        let (answer, closed) = raw(None, w.server.public, bytes.as_bytes()).await;
        let status = status_of(&answer);
        let responses = answer.matches("HTTP/1.1 ").count();
        if status != 400 || !closed || responses != 1 {
            failures.push(format!(
                "{name}: status {status}, closed {closed}, {responses} responses: {}",
                answer.lines().next().unwrap_or("")
            ));
        }
    }
    let paths = w.portal.log.paths.lock().unwrap().clone();
    assert!(
        !paths.iter().any(|p| p.contains("canary")),
        "the hidden request reached the portal: {paths:?}; {failures:#?}"
    );
    assert!(failures.is_empty(), "{failures:#?}");
}

/// C1: whatever a request names (Host, an absolute-form target, CONNECT, `[::1]`, a WebSocket
/// upgrade, X-Forwarded-Host), the agent talks to the portal and nothing else: canary listeners
/// on other loopback ports never get a connection.
#[tokio::test(flavor = "multi_thread")]
async fn c1_no_request_reaches_another_local_port() {
    let w = World::start(false, "").await;
    let v = w.visitor("alice", false).await;
    let v4 = Canary::start("127.0.0.1").await.unwrap();
    let v6 = Canary::start("::1").await;
    let sid = v.cookie("__pbxra_sid").unwrap();
    let h = crate::gate::header_for(&v, "alice");
    let mut targets = vec![v4.addr.to_string()];
    if let Some(c) = &v6 {
        targets.push(c.addr.to_string());
    }
    for t in &targets {
        let requests = [
            format!("GET / HTTP/1.1\r\nHost: {t}\r\nCookie: __pbxra_sid={sid}\r\n\r\n"),
            format!("GET http://{t}/ HTTP/1.1\r\nHost: {t}\r\nCookie: __pbxra_sid={sid}\r\n\r\n"),
            format!("CONNECT {t} HTTP/1.1\r\nHost: {t}\r\nCookie: __pbxra_sid={sid}\r\n\r\n"),
            format!(
                "GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-Host: {t}\r\nCookie: __pbxra_sid={sid}\r\n\r\n"
            ),
            format!(
                "GET /ws HTTP/1.1\r\nHost: {t}\r\nOrigin: {origin}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\
                 Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
                 Cookie: __pbxra_sid={sid}\r\n\r\n",
                origin = h.origin
            ),
        ];
        for r in &requests {
            let answer = w.server.inject(&w.device, &h, r.as_bytes()).await;
            assert!(answer.starts_with("HTTP/1.1 "), "{r}: {answer}");
        }
    }
    // Through the front too: absolute-form targets naming the canaries.
    let host = format!("{}:{}", v.host, w.server.public.port());
    for t in &targets {
        let bytes = format!(
            "GET http://{t}/ HTTP/1.1\r\nHost: {host}\r\nCookie: {}\r\nConnection: close\r\n\r\n",
            v.cookie_header()
        );
        let _ = raw(None, w.server.public, bytes.as_bytes()).await;
    }
    assert_eq!(v4.hits.load(Ordering::SeqCst), 0, "127.0.0.1 canary");
    if let Some(c) = &v6 {
        assert_eq!(c.hits.load(Ordering::SeqCst), 0, "[::1] canary");
    }
    // The portal did get the ones it should, and a canary does count a connection (the test
    // can tell).
    assert!(w.portal.hits() > 0);
    let _ = tokio::net::TcpStream::connect(v4.addr).await.unwrap();
    for _ in 0..100 {
        if v4.hits.load(Ordering::SeqCst) == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(v4.hits.load(Ordering::SeqCst), 1);
}

/// C7: a cross-site WebSocket is refused by the agent (the portal sees no request, so its own
/// Origin check is not what stopped it); a same-site one carries pings, pongs and close codes.
#[tokio::test(flavor = "multi_thread")]
async fn c7_cross_site_websockets_stop_at_the_agent_and_control_frames_pass() {
    use tokio_tungstenite::tungstenite::protocol::{frame::coding::CloseCode, CloseFrame};
    use tokio_tungstenite::tungstenite::Message;
    let w = World::start(false, "").await;
    let v = w.visitor("alice", false).await;
    let before = w.portal.hits();
    match v.websocket("http://evil.example").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status(), 403);
            let body = String::from_utf8_lossy(resp.body().as_deref().unwrap_or_default());
            assert!(body.contains("Cross-site request refused"), "{body}");
        }
        other => panic!("expected 403, got {other:?}"),
    }
    assert_eq!(w.portal.hits(), before, "the portal saw nothing");

    let (mut ws, _) = v.websocket(&v.origin).await.unwrap();
    ws.send(Message::Ping(b"are you there".to_vec()))
        .await
        .unwrap();
    let pong = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(pong, Message::Pong(b"are you there".to_vec()));
    ws.send(Message::Close(Some(CloseFrame {
        code: CloseCode::Library(4001),
        reason: "bye".into(),
    })))
    .await
    .unwrap();
    let close = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    match close {
        Message::Close(Some(f)) => assert_eq!(f.code, CloseCode::Library(4001)),
        other => panic!("expected the close echoed, got {other:?}"),
    }
}

/// C8: a portal redirect to its own host on another port (or any loopback name) comes back on
/// the visitor's origin; one to any other host is refused and never reaches the browser;
/// authenticated pages are not cached.
#[tokio::test(flavor = "multi_thread")]
async fn c8_redirects_never_leave_the_pbx_and_pages_are_not_cached() {
    let w = World::start(false, "").await;
    let mut v = w.visitor("alice", false).await;
    let r = v.get("/redirect-to/http://127.0.0.1:1/admin").await;
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], format!("{}/admin", v.origin));
    for away in [
        "https://evil.example/phish",
        "//evil.example/phish",
        "http://192.168.1.10:8088/",
    ] {
        let r = v.get(&format!("/redirect-to/{away}")).await;
        assert_eq!(r.status(), 502, "{away}");
        assert!(r.headers().get("location").is_none(), "{away}");
        let page = r.text().await.unwrap();
        assert!(page.contains("Redirect to another site refused"), "{page}");
    }
    let r = v.get("/").await;
    assert_eq!(r.headers()["cache-control"], "no-store");
}
