//! The session gate (DESIGN §6), over real HTTP through the front and the tunnel, and with bytes
//! injected straight into agent streams.

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use pbx_remote::protocol::StreamHeader;
use pbx_remote::status::State;
use std::time::Duration;
use tokio_tungstenite::tungstenite::Message;

pub fn audit_lines(w: &World) -> Vec<serde_json::Value> {
    let path = w.agent.dir.join("state/audit.log");
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn events(w: &World, name: &str) -> Vec<serde_json::Value> {
    audit_lines(w)
        .into_iter()
        .filter(|e| e["event"] == name)
        .collect()
}

fn grant_id(v: &Visitor) -> String {
    v.cookie("__cm_visit")
        .unwrap()
        .split('.')
        .next()
        .unwrap()
        .to_string()
}

/// The stream header the front sends for `v`'s grant; `label` is the `--as` of the CLI visit
/// that made it, which the server records as `cli:LABEL`.
pub fn header_for(v: &Visitor, label: &str) -> StreamHeader {
    StreamHeader {
        cm_user: format!("cli:{label}"),
        grant_id: grant_id(v),
        client_addr: "127.0.0.1".into(),
        scheme: pbx_remote::protocol::Scheme::Http,
        origin: v.origin.clone(),
        grant_expires_ms: 0,
        passwordless_token: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn no_session_no_portal() {
    let w = World::start(false, "").await;
    let mut v = w.granted("alice", false).await;
    let r = v.get("/admin?tab=1").await;
    assert_eq!(r.status(), 303);
    assert_eq!(
        r.headers()["location"],
        "/__remote/login?next=%2Fadmin%3Ftab%3D1"
    );
    let r = v
        .request(reqwest::Method::GET, "/api/x")
        .header("accept", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    let r = v
        .request(reqwest::Method::POST, "/upload")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert_eq!(w.portal.hits(), 0, "nothing reached the portal");

    let page = v
        .get("/__remote/login?next=%2Fadmin")
        .await
        .text()
        .await
        .unwrap();
    assert!(
        page.contains("name=\"username\"")
            && page.contains("name=\"password\"")
            && page.contains("value=\"/admin\"")
    );
    assert!(!page.to_lowercase().contains("<script"));
    for (user, pw) in [("", ""), (USER, "wrong-Passw0rd"), ("nobody", PASSWORD)] {
        let r = v.login(user, pw).await;
        assert_eq!(r.status(), 401, "{user:?}");
        let html = r.text().await.unwrap();
        assert!(
            html.contains("Wrong username or password.") && html.contains("name=\"password\""),
            "{html}"
        );
    }
    assert!(v.cookie("__pbxra_sid").is_none());
    assert_eq!(w.portal.hits(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn account_login_session_identity_and_logout() {
    let w = World::start(false, "").await;
    let mut v = w.granted("alice", false).await;
    let r = v.login(USER, PASSWORD).await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/");
    let set = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        set.starts_with("__pbxra_sid=")
            && set.contains("HttpOnly")
            && set.contains("SameSite=Lax")
            && set.contains("Path=/"),
        "{set}"
    );
    let first_sid = v.cookie("__pbxra_sid").unwrap().to_string();

    let s: serde_json::Value = v.get("/__remote/session").await.json().await.unwrap();
    assert_eq!(s["user"], USER);
    assert_eq!(s["role"], "administrator");
    assert_eq!(s["cm_user"], "cli:alice");
    assert_eq!(w.agent.status.get().active_sessions.len(), 1);
    assert_eq!(
        w.agent.status.get().active_sessions[0].role,
        "administrator"
    );

    let r = v
        .request(reqwest::Method::GET, "/headers")
        .header("x-pbx-remote-role", "super_admin")
        .header("x-pbx-remote-assertion", "forged")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["cache-control"], "no-store");
    let h: serde_json::Value = r.json().await.unwrap();
    assert_eq!(h["x-pbx-remote-user"], serde_json::json!([USER]));
    assert_eq!(h["x-pbx-remote-role"], serde_json::json!(["administrator"]));
    let jwts = h["x-pbx-remote-assertion"].as_array().unwrap();
    assert_eq!(jwts.len(), 1);
    let pem = std::fs::read_to_string(w.agent.dir.join("assertion.pub")).unwrap();
    let claims = pbx_remote::agent::assertion::verify(&pem, jwts[0].as_str().unwrap()).unwrap();
    assert_eq!(claims["aud"], w.device.as_str());
    assert_eq!(claims["role"], "administrator");
    assert_eq!(claims["cm_user"], "cli:alice");
    assert_eq!(
        claims["sid_hash"],
        hex::encode(pbx_remote::crypto::sha256(first_sid.as_bytes()))
    );
    assert!(!jwts[0].as_str().unwrap().contains(&first_sid));

    // Cached per session for up to 30 s, then renewed.
    let again: serde_json::Value = v.get("/headers").await.json().await.unwrap();
    assert_eq!(again["x-pbx-remote-assertion"], h["x-pbx-remote-assertion"]);
    w.agent.clock.advance(Duration::from_secs(31));
    let later: serde_json::Value = v.get("/headers").await.json().await.unwrap();
    assert_ne!(later["x-pbx-remote-assertion"], h["x-pbx-remote-assertion"]);

    // A new session id at every login.
    assert_eq!(v.login(USER, PASSWORD).await.status(), 303);
    assert_ne!(v.cookie("__pbxra_sid").unwrap(), first_sid);

    // Another site cannot end the session: a link or image (cross-site GET, which carries the
    // Lax cookies) gets a confirmation form, and a cross-site form post is refused.
    for (method, headers, code) in [
        (
            reqwest::Method::GET,
            vec![("sec-fetch-site", "cross-site")],
            200,
        ),
        (reqwest::Method::GET, vec![], 200),
        (
            reqwest::Method::POST,
            vec![("origin", "https://evil.example")],
            403,
        ),
        (reqwest::Method::POST, vec![("origin", "null")], 403),
        (reqwest::Method::DELETE, vec![], 405),
    ] {
        let mut rb = v
            .client
            .request(method.clone(), format!("{}/__remote/logout", v.origin))
            .header("cookie", v.cookie_header());
        for (k, val) in &headers {
            rb = rb.header(*k, *val);
        }
        let r = rb.send().await.unwrap();
        assert_eq!(r.status(), code, "{method} {headers:?}");
        assert!(
            r.headers().get("set-cookie").is_none(),
            "{method} {headers:?}"
        );
        let html = r.text().await.unwrap();
        if code == 200 {
            assert!(
                html.contains("<form method=\"post\" action=\"/__remote/logout\"")
                    && html.contains(USER),
                "{html}"
            );
        }
        assert_eq!(w.agent.status.get().active_sessions.len(), 1);
    }
    assert_eq!(v.get("/__remote/session").await.status(), 200);
    assert_eq!(events(&w, "logout").len(), 1);
    // Nor log the browser in (to an account it chose) from another site.
    let r = v
        .client
        .post(format!("{}/__remote/login", v.origin))
        .header("cookie", v.cookie_header())
        .header("origin", "https://evil.example")
        .header("content-type", "application/x-www-form-urlencoded")
        .body(format!("username={USER}&password={PASSWORD}&next=%2F"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    assert!(r.headers().get("set-cookie").is_none());
    assert_eq!(events(&w, "login_ok").len(), 2);

    let r = v.logout().await;
    assert_eq!(r.status(), 200);
    assert!(v.cookie("__pbxra_sid").is_none(), "cookie cleared");
    let html = v.get("/__remote/logout").await.text().await.unwrap();
    assert!(html.contains("no remote session"), "{html}");
    assert!(w.agent.status.get().active_sessions.is_empty());
    let logouts = events(&w, "logout");
    assert_eq!(logouts.len(), 2);
    assert_eq!(logouts[0]["reason"], "replaced by a new login");
    assert_eq!(events(&w, "login_ok").len(), 2);
    let mut stale = Visitor::new(w.server.public, &w.device);
    stale.cookies = v.cookies.clone();
    stale.cookies.push(("__pbxra_sid".into(), first_sid));
    assert_eq!(
        stale.get("/").await.status(),
        303,
        "an ended session opens nothing"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn passwordless_login_is_single_use() {
    let w = World::start(true, "").await;
    let mut v = w.visitor("alice", true).await;
    let s: serde_json::Value = v.get("/__remote/session").await.json().await.unwrap();
    assert_eq!(s["role"], "super_admin");
    assert_eq!(s["user"], "admin");
    let h: serde_json::Value = v.get("/headers").await.json().await.unwrap();
    assert_eq!(h["x-pbx-remote-role"], serde_json::json!(["super_admin"]));

    let r = v.get("/__remote/passwordless").await;
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("already used"));
    assert_eq!(events(&w, "passwordless_ok").len(), 1);
    assert_eq!(events(&w, "passwordless_rejected")[0]["reason"], "used");
}

#[tokio::test(flavor = "multi_thread")]
async fn passwordless_redirect_has_no_referrer() {
    let w = World::start(true, "").await;
    let mut v = w.granted("alice", true).await;
    let r = v.get("/__remote/passwordless").await;
    assert_eq!(r.status(), 303);
    assert_eq!(r.headers()["location"], "/");
    assert_eq!(r.headers()["referrer-policy"], "no-referrer");
    assert!(v.cookie("__pbxra_sid").is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn expired_passwordless_tokens_are_refused() {
    let w = World::start(true, "").await;
    let mut v = w.granted("alice", true).await;
    w.agent.clock.advance(Duration::from_secs(61));
    let r = v.get("/__remote/passwordless").await;
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("expired"));
    assert_eq!(events(&w, "passwordless_rejected")[0]["reason"], "expired");
}

#[tokio::test(flavor = "multi_thread")]
async fn passwordless_needs_the_local_switch() {
    let w = World::start_with_toml(true, |t| {
        t.replace(
            "[remote_access.passwordless]\nenabled = true",
            "[remote_access.passwordless]\nenabled = false",
        )
    })
    .await;
    let mut v = w.granted("alice", true).await;
    let r = v.get("/__remote/passwordless").await;
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("disabled on this PBX"));
    assert_eq!(
        events(&w, "passwordless_rejected")[0]["reason"],
        "disabled_locally"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cm_flag_is_live_and_ends_passwordless_sessions() {
    let w = World::start(true, "").await;
    let mut v = w.visitor("alice", true).await;
    let mut pending = w.granted("bob", true).await;
    assert_eq!(v.get("/").await.status(), 200);
    let t0 = std::time::Instant::now();
    pbx_remote::server::admin::device_set(
        &w.server.data_dir(),
        &w.device,
        &pbx_remote::server::db::DeviceChanges {
            allow_passwordless: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    w.agent
        .wait(Duration::from_secs(5), |s| s.active_sessions.is_empty())
        .await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(v.get("/").await.status(), 303, "session ended");
    assert_eq!(
        events(&w, "revoked")[0]["reason"],
        "passwordless disabled on the CM"
    );
    let r = pending.get("/__remote/passwordless").await;
    assert_eq!(r.status(), 403);
    assert!(r
        .text()
        .await
        .unwrap()
        .contains("not allowed for this device"));
}

#[tokio::test(flavor = "multi_thread")]
async fn racing_token_replays_get_one_session() {
    let w = World::start(true, "").await;
    let v = w.granted("alice", true).await;
    let now = pbx_remote::protocol::now_ms();
    let claims = pbx_remote::token::Claims {
        dev: w.device.clone(),
        grant: grant_id(&v),
        cm_user: "cli:alice".into(),
        iat_ms: now,
        exp_ms: now + 60_000,
        nonce: "race-nonce".into(),
    };
    let token = pbx_remote::token::sign(&w.server.state.keys.signing, &claims).unwrap();
    let mut h = header_for(&v, "alice");
    h.passwordless_token = Some(pbx_remote::secret::Secret::new(token));
    let raw = b"GET /__remote/passwordless HTTP/1.1\r\nHost: x\r\n\r\n";
    let (a, b) = tokio::join!(
        w.server.inject(&w.device, &h, raw),
        w.server.inject(&w.device, &h, raw)
    );
    let ok = [&a, &b]
        .iter()
        .filter(|r| r.starts_with("HTTP/1.1 303"))
        .count();
    let refused = [&a, &b]
        .iter()
        .filter(|r| r.starts_with("HTTP/1.1 403"))
        .count();
    assert_eq!((ok, refused), (1, 1), "{a}\n---\n{b}");

    // A token for another device, or one signed by another key, opens nothing.
    let mut other = claims.clone();
    other.dev = "someone-else".into();
    other.nonce = "n2".into();
    h.passwordless_token = Some(pbx_remote::secret::Secret::new(
        pbx_remote::token::sign(&w.server.state.keys.signing, &other).unwrap(),
    ));
    assert!(w
        .server
        .inject(&w.device, &h, raw)
        .await
        .starts_with("HTTP/1.1 403"));
    let rng = ring::rand::SystemRandom::new();
    let doc = ring::signature::Ed25519KeyPair::generate_pkcs8(&rng).unwrap();
    let foreign = ring::signature::Ed25519KeyPair::from_pkcs8(doc.as_ref()).unwrap();
    let mut c3 = claims.clone();
    c3.nonce = "n3".into();
    h.passwordless_token = Some(pbx_remote::secret::Secret::new(
        pbx_remote::token::sign(&foreign, &c3).unwrap(),
    ));
    assert!(w
        .server
        .inject(&w.device, &h, raw)
        .await
        .starts_with("HTTP/1.1 403"));
    let reasons: Vec<_> = events(&w, "passwordless_rejected")
        .iter()
        .map(|e| e["reason"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(reasons, ["used", "wrong_device", "invalid_signature"]);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copied_cookie_under_another_grant_is_refused_and_audited() {
    let w = World::start(false, "").await;
    let alice = w.visitor("alice", false).await;
    let mut bob = w.granted("bob", false).await;
    bob.cookies.push((
        "__pbxra_sid".into(),
        alice.cookie("__pbxra_sid").unwrap().to_string(),
    ));
    let before = w.portal.hits();
    let r = bob.get("/").await;
    assert_eq!(r.status(), 403);
    assert!(r.text().await.unwrap().contains("another visit"));
    assert_eq!(w.portal.hits(), before);
    let e = &events(&w, "grant_mismatch")[0];
    assert_eq!(e["cm_user"], "cli:bob");
    assert_eq!(e["user"], USER);
}

async fn echo(ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>, text: &str) {
    ws.send(Message::text(text.to_string())).await.unwrap();
    let back = tokio::time::timeout(Duration::from_secs(5), ws.next())
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert_eq!(back.into_text().unwrap(), text);
}

async fn closes_within(
    ws: &mut tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
    limit: Duration,
) {
    let end = tokio::time::timeout(limit, async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) => return,
                Some(Ok(m)) if m.is_close() => return,
                Some(Ok(_)) => continue,
            }
        }
    })
    .await;
    assert!(end.is_ok(), "websocket still open after {limit:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_logout_counts_websocket_data_not_pings_and_closes_sockets() {
    let w = World::start(false, "").await;
    let mut v = w.visitor("alice", false).await;
    let mut ws = v.websocket(&v.origin).await.unwrap().0;
    echo(&mut ws, "one").await;
    w.agent.clock.advance(Duration::from_secs(14 * 60));
    echo(&mut ws, "two").await; // a data frame: activity
    w.agent.clock.advance(Duration::from_secs(14 * 60));
    ws.send(Message::Ping(b"p".to_vec())).await.unwrap(); // not activity
    w.agent.clock.advance(Duration::from_secs(61));
    let t0 = std::time::Instant::now();
    closes_within(&mut ws, Duration::from_secs(1)).await;
    assert!(t0.elapsed() < Duration::from_secs(1));
    assert_eq!(events(&w, "idle_expiry").len(), 1);
    assert_eq!(v.get("/").await.status(), 303);
}

#[tokio::test(flavor = "multi_thread")]
async fn logout_closes_websockets_within_a_second() {
    let w = World::start(false, "").await;
    let mut v = w.visitor("alice", false).await;
    let mut ws = v.websocket(&v.origin).await.unwrap().0;
    echo(&mut ws, "hi").await;
    let mut other = Visitor::new(w.server.public, &w.device);
    other.cookies = v.cookies.clone();
    assert_eq!(other.logout().await.status(), 200);
    closes_within(&mut ws, Duration::from_secs(1)).await;
    assert_eq!(v.get("/").await.status(), 303);
}

#[tokio::test(flavor = "multi_thread")]
async fn sessions_end_after_12_hours_however_active() {
    let w = World::start_with_toml(false, |t| {
        t.replace("auto_logout_minutes = 15", "auto_logout_minutes = 120")
    })
    .await;
    let mut v = w.visitor("alice", false).await;
    let mut alive_hours = 0;
    for _ in 0..8 {
        if v.get("/").await.status() != 200 {
            break;
        }
        alive_hours += 110;
        w.agent.clock.advance(Duration::from_secs(110 * 60));
    }
    assert_eq!(alive_hours, 110 * 7, "alive until the 12 h cap, not beyond");
    assert_eq!(events(&w, "absolute_expiry").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn three_failures_lock_the_key_for_ten_minutes_even_across_restarts() {
    let w = World::start(false, "").await;
    // A wrong username and a wrong password read the same (another username is another key).
    let mut probe = w.granted("carol", false).await;
    let unknown = probe.login("no-such-user", "Wrong-passw0rd").await;
    assert_eq!(unknown.status(), 401);
    let unknown = unknown.text().await.unwrap();
    let mut v = w.granted("alice", false).await;
    for i in 0..3 {
        let r = v.login(USER, "Wrong-passw0rd").await;
        assert_eq!(r.status(), 401);
        if i == 0 {
            assert_eq!(r.text().await.unwrap(), unknown, "one generic error");
        }
    }
    let r = v.login(USER, PASSWORD).await;
    assert_eq!(r.status(), 429);
    assert!(r.text().await.unwrap().contains("Try again in 10 minutes"));
    // Each failure and the lock are audit events.
    // (The attempt while locked is recorded as a failure too.)
    let failed = events(&w, "login_failed");
    assert_eq!(
        failed
            .iter()
            .filter(|e| e["cm_user"] == "cli:alice")
            .count(),
        4
    );
    assert_eq!(events(&w, "lockout").len(), 1);
    // Another CM user is not locked out by alice's failures.
    let mut bob = w.granted("bob", false).await;
    assert_eq!(bob.login(USER, PASSWORD).await.status(), 303);

    let toml = std::fs::read_to_string(w.agent.dir.join("agent.toml")).unwrap();
    let dir = w.agent.dir.clone();
    w.agent.stop.cancel();
    let _ = w.agent.task.await;
    let again = TestAgent::start(&dir, &toml);
    again.connected().await;
    let mut v = Visitor {
        cookies: v.cookies.clone(),
        ..Visitor::new(w.server.public, &w.device)
    };
    assert_eq!(
        v.login(USER, PASSWORD).await.status(),
        429,
        "the lock survives a restart"
    );
    again.clock.advance(Duration::from_secs(601));
    assert_eq!(v.login(USER, PASSWORD).await.status(), 303);
}

#[tokio::test(flavor = "multi_thread")]
async fn parallel_guesses_get_no_extra_tries() {
    let w = World::start(false, "").await;
    let v = w.granted("alice", false).await;
    let mut tasks = vec![];
    for i in 0..8 {
        let rb = v
            .request(reqwest::Method::POST, "/__remote/login")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("username={USER}&password=Guess-{i}-Passw0rd"));
        tasks.push(tokio::spawn(async move {
            rb.send().await.unwrap().status().as_u16()
        }));
    }
    let mut codes = vec![];
    for t in tasks {
        codes.push(t.await.unwrap());
    }
    let checked = events(&w, "login_failed")
        .iter()
        .filter(|e| e["reason"] == "wrong username or password")
        .count();
    assert_eq!(checked, 3, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 429).count(), 5, "{codes:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn injected_requests_cannot_choose_the_destination_or_smuggle() {
    let w = World::start(false, "").await;
    let v = w.visitor("alice", false).await;
    let h = header_for(&v, "alice");
    let cookie = format!("Cookie: __pbxra_sid={}", v.cookie("__pbxra_sid").unwrap());

    let r = w.server.inject(&w.device, &h, format!("GET http://evil.example:81/headers HTTP/1.1\r\nHost: evil.example:81\r\n{cookie}\r\n\r\n").as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 200"), "{r}");
    assert!(
        r.contains(&format!("\"host\":[\"{}\"]", w.portal.addr)),
        "{r}"
    );
    assert!(w.portal.log.paths.lock().unwrap().last().unwrap() == "/headers");

    let before = w.portal.hits();
    let r = w
        .server
        .inject(
            &w.device,
            &h,
            format!("CONNECT 127.0.0.1:22 HTTP/1.1\r\nHost: 127.0.0.1:22\r\n{cookie}\r\n\r\n")
                .as_bytes(),
        )
        .await;
    assert!(r.starts_with("HTTP/1.1 405"), "{r}");
    assert_eq!(w.portal.hits(), before);

    let smuggles = [
        format!("POST /upload HTTP/1.1\r\nHost: x\r\n{cookie}\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /headers HTTP/1.1\r\nHost: x\r\n{cookie}\r\n\r\n"),
        format!("POST /upload HTTP/1.1\r\nHost: x\r\n{cookie}\r\nContent-Length: 4\r\nContent-Length: 40\r\n\r\nabcdGET /headers HTTP/1.1\r\nHost: x\r\n\r\n"),
        format!("GET /headers HTTP/1.1\r\nHost: x\r\n{cookie}\r\nX-Folded: a\r\n b\r\n\r\nGET /headers HTTP/1.1\r\nHost: x\r\n\r\n"),
    ];
    for raw in &smuggles {
        let before = w.portal.hits();
        let r = w.server.inject(&w.device, &h, raw.as_bytes()).await;
        assert!(
            w.portal.hits() - before <= 1,
            "at most one request reaches the portal: {r}"
        );
        assert!(
            r.matches("HTTP/1.1 ").count() <= 1,
            "one response, then the stream closes: {r}"
        );
    }

    let big = format!(
        "GET / HTTP/1.1\r\nHost: x\r\n{cookie}\r\nX-Big: {}\r\n\r\n",
        "a".repeat(100 * 1024)
    );
    let before = w.portal.hits();
    let r = w.server.inject(&w.device, &h, big.as_bytes()).await;
    assert!(r.starts_with("HTTP/1.1 431"), "{}", &r[..r.len().min(200)]);
    assert_eq!(w.portal.hits(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn audit_lines_are_private_json_and_status_shows_sessions() {
    use std::os::unix::fs::PermissionsExt;
    let w = World::start(false, "").await;
    let mut v = w.visitor("alice", false).await;
    v.logout().await;
    let path = w.agent.dir.join("state/audit.log");
    assert_eq!(
        std::fs::metadata(&path).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let lines = audit_lines(&w);
    let names: Vec<_> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
    assert_eq!(names, ["login_ok", "logout"]);
    for l in &lines {
        for field in ["time", "event", "cm_user", "client_addr", "role", "session"] {
            assert!(l.get(field).is_some(), "{field} in {l}");
        }
        assert_eq!(l["client_addr"], "127.0.0.1");
    }
    let sid = v
        .cookies
        .iter()
        .find(|(k, _)| k == "__pbxra_sid")
        .map(|(_, s)| s.clone());
    let text = std::fs::read_to_string(&path).unwrap();
    if let Some(sid) = sid {
        assert!(!text.contains(&sid));
    }
    assert!(!text.contains(PASSWORD));
    assert_eq!(w.agent.status.get().state, State::Connected);
}

#[tokio::test(flavor = "multi_thread")]
async fn paths_reach_the_portal_byte_for_byte_or_not_at_all() {
    let w = World::start(false, "").await;
    let v = w.visitor("alice", false).await;
    let h = header_for(&v, "alice");
    let cookie = format!("Cookie: __pbxra_sid={}", v.cookie("__pbxra_sid").unwrap());
    for path in [
        "/../admin",
        "/%2e%2e/admin",
        "/%252e%252e/admin",
        "/x\\..\\admin",
        "/about/../admin",
        "//admin",
        "/a%00b",
        "/page;jsessionid=abc",
        "/%5f_remote/login",
        "/x/../__remote/login",
    ] {
        let before = w.portal.hits();
        let r = w
            .server
            .inject(
                &w.device,
                &h,
                format!("GET {path} HTTP/1.1\r\nHost: x\r\n{cookie}\r\n\r\n").as_bytes(),
            )
            .await;
        if w.portal.hits() > before {
            assert_eq!(
                w.portal.log.paths.lock().unwrap().last().unwrap(),
                path,
                "forwarded byte-for-byte"
            );
        } else {
            assert!(
                r.starts_with("HTTP/1.1 400"),
                "{path}: not forwarded, so 400: {r}"
            );
        }
    }
    // The agent's own prefix never reaches the portal, whatever follows it.
    let before = w.portal.hits();
    let r = w
        .server
        .inject(
            &w.device,
            &h,
            format!("GET /__remote/../admin HTTP/1.1\r\nHost: x\r\n{cookie}\r\n\r\n").as_bytes(),
        )
        .await;
    assert!(r.starts_with("HTTP/1.1 404"), "{r}");
    assert_eq!(w.portal.hits(), before);
}

#[tokio::test(flavor = "multi_thread")]
async fn websocket_upgrades_without_a_session_get_401() {
    let w = World::start(false, "").await;
    let v = w.granted("alice", false).await;
    match v.websocket(&v.origin).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => assert_eq!(resp.status(), 401),
        other => panic!("expected 401, got {other:?}"),
    }
    assert_eq!(w.portal.hits(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn revocation_cuts_downloads_and_websockets_within_5s() {
    let w = World::start(true, "").await;
    let mut v = w.visitor("alice", true).await;
    let mut ws = v.websocket(&v.origin).await.unwrap().0;
    echo(&mut ws, "before").await;
    let mut download = v.get(&format!("/bytes/{}", 1u64 << 34)).await;
    assert_eq!(download.status(), 200);
    assert!(download.chunk().await.unwrap().is_some());
    let t0 = std::time::Instant::now();
    pbx_remote::server::admin::device_set(
        &w.server.data_dir(),
        &w.device,
        &pbx_remote::server::db::DeviceChanges {
            allow_passwordless: Some(false),
            ..Default::default()
        },
    )
    .unwrap();
    closes_within(&mut ws, Duration::from_secs(5)).await;
    let cut = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match download.chunk().await {
                Ok(Some(_)) => continue,
                Ok(None) | Err(_) => return,
            }
        }
    })
    .await;
    assert!(
        cut.is_ok(),
        "a 16 GiB download was still running 5 s after revocation"
    );
    assert!(t0.elapsed() < Duration::from_secs(6));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_extension_taking_the_accounts_name_suspends_account_login_until_it_goes() {
    let dir = tempfile::tempdir().unwrap();
    let emails = dir.path().join("extension-emails");
    std::fs::write(&emails, "ann@example.com\n").unwrap();
    let line = format!("[pbx]\nextension_emails_file = \"{}\"\n", emails.display());
    let w = World::start_with_toml(true, move |t| t.replacen("[pbx]\n", &line, 1)).await;
    let mut v = w.visitor("alice", false).await;
    let mut p = w.visitor("bob", true).await;
    assert_eq!(v.get("/").await.status(), 200);

    // The PBX rewrites the list: an extension now has the remote account's name as its email.
    let replaced = dir.path().join("extension-emails.new");
    std::fs::write(
        &replaced,
        format!("ann@example.com\n {}\n", USER.to_uppercase()),
    )
    .unwrap();
    std::fs::rename(&replaced, &emails).unwrap();
    let st = w
        .agent
        .wait(Duration::from_secs(10), |s| s.config_error.is_some())
        .await;
    let error = st.config_error.unwrap();
    assert!(
        error.contains("remote_access.account.username")
            && error.contains(&emails.display().to_string()),
        "{error}"
    );
    // The account's session ended, the passwordless one did not.
    assert_eq!(st.active_sessions.len(), 1, "{:?}", st.active_sessions);
    assert_eq!(st.active_sessions[0].role, "super_admin");
    let hits = w.portal.hits();
    assert_eq!(v.get("/").await.status(), 303);
    assert_eq!(w.portal.hits(), hits);
    assert_eq!(p.get("/").await.status(), 200);
    let revoked = events(&w, "revoked");
    assert_eq!(revoked.len(), 1);
    assert_eq!(revoked[0]["role"], "administrator");
    // No new account session while the clash lasts: the page says why, a right password fails.
    let page = v.get("/__remote/login").await;
    assert_eq!(page.status(), 403);
    assert!(page.text().await.unwrap().contains("suspended"));
    assert_eq!(v.login(USER, PASSWORD).await.status(), 403);
    assert_eq!(events(&w, "login_ok").len(), 1);

    // The extension's email changes again: account login is back.
    std::fs::write(&emails, "ann@example.com\n").unwrap();
    w.agent
        .wait(Duration::from_secs(10), |s| s.config_error.is_none())
        .await;
    assert_eq!(v.login(USER, PASSWORD).await.status(), 303);
    assert_eq!(v.get("/").await.status(), 200);
}
