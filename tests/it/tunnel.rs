//! End to end through front, QUIC tunnel and agent to the portal fixture.

use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use pbx_remote::protocol::Reason;
use pbx_remote::status::State;
use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn activation_stores_a_private_credential_and_the_page_loads() {
    let w = World::start(false, "").await;
    let status = w.agent.status.get();
    assert_eq!(status.device_id.as_deref(), Some(w.device.as_str()));
    assert!(status.since.is_some() && status.rtt_ms.is_some());
    let state = w.agent.dir.join("state");
    assert_eq!(
        std::fs::metadata(&state).unwrap().permissions().mode() & 0o777,
        0o700
    );
    for f in ["credential.json", "device.key"] {
        let mode = std::fs::metadata(state.join(f))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600, "{f}");
    }
    let cred = std::fs::read_to_string(state.join("credential.json")).unwrap();
    assert!(
        !cred.contains(&w.server.pin),
        "no server secrets in the credential"
    );

    let mut v = w.visitor("alice", false).await;
    let resp = v.get("/").await;
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.headers().get("connection"),
        None,
        "tunnel framing must not leak"
    );
    let cookies: Vec<_> = resp
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|c| c.to_str().unwrap().to_string())
        .collect();
    assert_eq!(
        cookies,
        ["portal_sid=abc; Path=/; HttpOnly"],
        "Domain= stripped"
    );
    assert!(resp.text().await.unwrap().contains("PBX portal home"));

    // The device list shows it online with its agent version.
    let list = pbx_remote::server::admin::device_list(&w.server.data_dir(), None, false).unwrap();
    let line = list.lines().find(|l| l.starts_with(&w.device)).unwrap();
    assert!(
        line.contains("online") && line.contains(env!("CARGO_PKG_VERSION")),
        "{line}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn portal_sees_its_own_origin_and_no_forged_identity() {
    let w = World::start(false, "").await;
    let mut v = w.visitor("alice", false).await;
    let resp = v
        .request(reqwest::Method::GET, "/headers")
        .header("x-pbx-remote-user", "root")
        .header("x-forwarded-for", "6.6.6.6")
        .header("forwarded", "for=127.0.0.1")
        .header("x-real-ip", "127.0.0.1")
        .header("x-remote-user", "admin")
        .header("remote-user", "admin")
        .header("authorization", "Basic YWRtaW46YWRtaW4=")
        .header("proxy-authorization", "Basic YWRtaW46YWRtaW4=")
        // Naming the agent's own headers in Connection must not remove them.
        .header(
            "connection",
            "x-drop-me, x-forwarded-for, x-pbx-remote-user, x-pbx-remote-role",
        )
        .header("x-drop-me", "1")
        .send()
        .await
        .unwrap();
    let h: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(h["host"][0], w.portal.addr.to_string());
    assert_eq!(h["origin"][0], w.portal.url());
    assert_eq!(h["x-forwarded-for"][0], "127.0.0.1");
    assert_eq!(
        h["x-forwarded-host"][0],
        format!("{}.localhost:{}", w.device, w.server.public.port())
    );
    assert_eq!(h["x-forwarded-proto"][0], "http");
    assert!(h.get("x-drop-me").is_none());
    for forged in [
        "forwarded",
        "x-real-ip",
        "x-remote-user",
        "remote-user",
        "authorization",
        "proxy-authorization",
    ] {
        assert!(h.get(forged).is_none(), "{forged} reached the portal: {h}");
    }
    assert_eq!(h["x-pbx-remote-role"], serde_json::json!(["administrator"]));
    assert_eq!(
        h["x-pbx-remote-user"],
        serde_json::json!([USER]),
        "exactly the real identity"
    );
    let cookie = h["cookie"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| c.as_str().unwrap().to_string())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    assert!(
        cookie.iter().all(|c| !c.contains("__cm_visit")),
        "{cookie:?}"
    );

    let r = v.get("/redirect").await;
    assert_eq!(r.status(), 302);
    assert_eq!(r.headers()["location"], format!("{}/target", v.origin));

    let cross = v
        .client
        .post(format!("{}/upload", v.origin))
        .header("cookie", v.cookie_header())
        .header("origin", "http://evil.example")
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(cross.status(), 403);
}

#[tokio::test(flavor = "multi_thread")]
async fn download_64_mib_upload_and_websocket_are_byte_exact() {
    download_upload_and_websocket(World::start(false, "").await).await;
}

/// 64 MiB down, 16 MiB up and a WebSocket echo, byte-exact (`transport::` runs it over TCP).
pub async fn download_upload_and_websocket(w: World) {
    let mut v = w.visitor("alice", false).await;
    let n: u64 = 64 * 1024 * 1024;
    let resp = v.get(&format!("/bytes/{n}")).await;
    assert_eq!(resp.status(), 200);
    let (got, sha) = body_sha256(resp).await;
    assert_eq!(got, n);
    assert_eq!(sha, pattern_sha256(n));

    let up: u64 = 16 * 1024 * 1024;
    let data = pattern_bytes(0, up as usize);
    let resp = v
        .request(reqwest::Method::POST, "/upload")
        .body(data)
        .send()
        .await
        .unwrap();
    let j: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(j["len"], up);
    assert_eq!(j["sha256"], pattern_sha256(up));

    let (mut ws, resp) = v.websocket(&v.origin).await.unwrap();
    assert_eq!(resp.status(), 101);
    for i in 0..50 {
        let msg = format!("hello {i}");
        ws.send(tokio_tungstenite::tungstenite::Message::text(msg.clone()))
            .await
            .unwrap();
        let back = ws.next().await.unwrap().unwrap();
        assert_eq!(back.into_text().unwrap().as_str(), msg);
    }
    let big = vec![7u8; 300_000];
    ws.send(tokio_tungstenite::tungstenite::Message::binary(big.clone()))
        .await
        .unwrap();
    assert_eq!(ws.next().await.unwrap().unwrap().into_data(), big);
}

#[tokio::test(flavor = "multi_thread")]
async fn visit_links_are_single_use_and_grants_are_per_device() {
    let w = World::start(false, "").await;
    let url = w.server.visit(&w.device, "alice", false);
    let mut v = Visitor::new(w.server.public, &w.device);
    let first = v.open_visit(&url).await;
    assert_eq!(first.status(), 303);
    assert_eq!(first.headers()["location"], "/");
    let set = first.headers()["set-cookie"].to_str().unwrap();
    assert!(
        set.starts_with("__cm_visit=") && set.contains("HttpOnly") && set.contains("SameSite=Lax"),
        "{set}"
    );

    let mut other = Visitor::new(w.server.public, &w.device);
    assert_eq!(other.get(&url).await.status(), 410, "used link shows gone");
    assert_eq!(
        other.post_visit(&url).await.status(),
        410,
        "used link cannot be replayed"
    );
    assert_eq!(other.get("/").await.status(), 403, "no grant, no portal");

    // The grant cookie is bound to its device.
    let (dev2, _) = w.server.add_device(false);
    let mut wrong = Visitor::new(w.server.public, &dev2);
    wrong.cookies = v.cookies.clone();
    assert_eq!(wrong.get("/").await.status(), 403);
    assert_eq!(
        v.get("/").await.status(),
        303,
        "a grant alone does not open the portal"
    );
    assert_eq!(v.login(USER, PASSWORD).await.status(), 303);
    let before = w.portal.hits();
    assert_eq!(v.get("/").await.status(), 200);
    assert_eq!(w.portal.hits(), before + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn offline_unknown_and_busy_devices_get_clear_pages() {
    let w = World::start(false, "").await;
    let mut v = w.visitor("alice", false).await;
    let mut unknown = Visitor::new(w.server.public, "nosuchdevice");
    let r = unknown.get("/").await;
    assert_eq!(r.status(), 404);
    assert!(r.text().await.unwrap().contains("Unknown device"));

    w.portal.stop();
    // Portal down (once its connections are gone, so no request races the stop): the agent
    // answers 502 while the tunnel stays up.
    eventually(
        Duration::from_secs(5),
        "the portal's connections closed",
        || (w.portal.open() == 0).then_some(()),
    )
    .await;
    let r = v.get("/").await;
    assert_eq!(r.status(), 502);
    assert!(r.text().await.unwrap().contains("portal"));
    let since = w.agent.status.get().since;
    w.agent.stop.cancel();
    let _ = tokio::time::timeout(Duration::from_secs(10), w.agent.task).await;
    let r = v.get("/").await;
    assert_eq!(r.status(), 502);
    assert!(r.text().await.unwrap().contains("offline"));
    assert!(since.is_some());
}

#[tokio::test(flavor = "multi_thread")]
async fn portal_down_gives_502_and_the_tunnel_stays() {
    let server = TestServer::start().await;
    let (device, code) = server.add_device(false);
    let tmp = tempfile::tempdir().unwrap();
    // A port with nothing listening.
    let dead = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead_url = format!("http://{}", dead.local_addr().unwrap());
    drop(dead);
    let agent = TestAgent::start(
        &tmp.path().join("a"),
        &server
            .agent_toml(tmp.path())
            .code(&code)
            .portal(&dead_url)
            .build(),
    );
    let since = agent.connected().await.since;
    let url = server.visit(&device, "alice", false);
    let mut v = Visitor::new(server.public, &device);
    v.open_visit(&url).await;
    v.login(USER, PASSWORD).await;
    let r = v.get("/").await;
    assert_eq!(r.status(), 502);
    assert!(r.text().await.unwrap().contains("portal is unreachable"));
    assert_eq!(agent.status.get().since, since, "same connection");
    assert_eq!(agent.status.get().state, State::Connected);

    // The portal comes back on its address: served again, without an agent restart or a
    // reconnect (catalogue B8).
    let listener = tokio::net::TcpListener::bind(dead_url.trim_start_matches("http://"))
        .await
        .unwrap();
    let portal = PortalFixture::start_on(listener).await;
    let r = v.get("/").await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("PBX portal home"));
    assert_eq!(portal.hits(), 1);
    assert_eq!(agent.status.get().since, since, "same connection");
}

#[tokio::test(flavor = "multi_thread")]
async fn restarted_agent_reuses_its_credential() {
    // An upgrade in place (catalogue B10): the agent stops with a remote session open and a new
    // one starts on the same state directory.
    let w = World::start(false, "").await;
    let mut v = w.visitor("alice", false).await;
    assert_eq!(v.get("/").await.status(), 200);
    let devices = w.server.db().list_devices().unwrap().len();
    let toml = std::fs::read_to_string(w.agent.dir.join("agent.toml")).unwrap();
    let dir = w.agent.dir.clone();
    w.agent.shutdown().await;
    let stopped = pbx_remote::status::read(&dir.join("status.json")).unwrap();
    assert_eq!(stopped.state, State::Stopped);
    // The code is spent: connecting again proves the stored credential was used.
    let t0 = std::time::Instant::now();
    let again = TestAgent::start(&dir, &toml);
    let s = again.connected().await;
    assert!(t0.elapsed() < Duration::from_secs(10), "{:?}", t0.elapsed());
    assert_eq!(s.device_id.as_deref(), Some(w.device.as_str()));
    let d = w.server.db().device(&w.device).unwrap().unwrap();
    assert_eq!(d.nodes.len(), 1);
    assert_eq!(
        w.server.db().list_devices().unwrap().len(),
        devices,
        "no second device"
    );
    // Sessions live in the agent's memory: the visitor logs in again, same visit.
    let r = v.get("/").await;
    assert_ne!(r.status(), 200);
    assert_eq!(v.login(USER, PASSWORD).await.status(), 303);
    assert_eq!(v.get("/").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn spent_expired_and_invalid_codes_fail_without_retry_storm() {
    let server = TestServer::start().await;
    let portal = PortalFixture::start().await;
    let (device, code) = server.add_device(false);
    let tmp = tempfile::tempdir().unwrap();
    let a = TestAgent::start(
        &tmp.path().join("a"),
        &server
            .agent_toml(&tmp.path().join("a"))
            .code(&code)
            .portal(&portal.url())
            .build(),
    );
    a.connected().await;

    let b = TestAgent::start(
        &tmp.path().join("b"),
        &server
            .agent_toml(&tmp.path().join("b"))
            .code(&code)
            .portal(&portal.url())
            .build(),
    );
    let s = b
        .wait(Duration::from_secs(10), |s| s.state == State::Failed)
        .await;
    assert_eq!(s.reason, Some(Reason::CodeUsed));
    assert!(s.message.unwrap().contains("already used"));
    assert!(
        !tmp.path().join("b/state/credential.json").exists(),
        "nothing stored on failure"
    );

    let expired = server.db().new_code(&device, Duration::ZERO).unwrap();
    let c = TestAgent::start(
        &tmp.path().join("c"),
        &server
            .agent_toml(&tmp.path().join("c"))
            .code(&expired)
            .portal(&portal.url())
            .build(),
    );
    let s = c
        .wait(Duration::from_secs(10), |s| s.state == State::Failed)
        .await;
    assert_eq!(s.reason, Some(Reason::CodeExpired));

    let d = TestAgent::start(
        &tmp.path().join("d"),
        &server
            .agent_toml(&tmp.path().join("d"))
            .code("ZZZZ-ZZZZ-ZZZZ-ZZZZ")
            .portal(&portal.url())
            .extra(METRICS_ON_ANY_PORT)
            .build(),
    );
    let s = d
        .wait(Duration::from_secs(10), |s| s.state == State::Failed)
        .await;
    assert_eq!(s.reason, Some(Reason::InvalidCode));
    // Failed stays failed: the daemon is up and does not retry, however long it waits.
    assert_eq!(d.activation_attempts().await, 1);
    d.move_past_backoff().await;
    assert_eq!(d.activation_attempts().await, 1, "retried a refused code");
    assert_eq!(d.status.get().state, State::Failed);
    assert!(!d.task.is_finished());
}

#[tokio::test(flavor = "multi_thread")]
async fn device_removal_reaches_the_agent_within_5s() {
    device_removal_reaches_the_agent(World::start(false, "").await).await;
}

/// `device remove` ends the tunnel with `device_removed` within 5 s.
pub async fn device_removal_reaches_the_agent(w: World) {
    let t0 = std::time::Instant::now();
    pbx_remote::server::admin::device_remove(&w.server.data_dir(), &w.device).unwrap();
    let s = w
        .agent
        .wait(Duration::from_secs(5), |s| s.state == State::Failed)
        .await;
    assert_eq!(s.reason, Some(Reason::DeviceRemoved));
    assert!(t0.elapsed() < Duration::from_secs(5));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_copied_credential_replaces_the_older_connection() {
    a_copied_credential_replaces(World::start(false, "").await).await;
}

/// A second machine with the same credential takes the node; the first reads `replaced`.
pub async fn a_copied_credential_replaces(w: World) {
    let clone_dir = w.tmp.path().join("clone");
    std::fs::create_dir_all(clone_dir.join("state")).unwrap();
    for f in ["credential.json", "device.key"] {
        std::fs::copy(
            w.agent.dir.join("state").join(f),
            clone_dir.join("state").join(f),
        )
        .unwrap();
    }
    let toml = std::fs::read_to_string(w.agent.dir.join("agent.toml"))
        .unwrap()
        .replace(
            &w.agent.dir.display().to_string(),
            &clone_dir.display().to_string(),
        );
    let clone = TestAgent::start(&clone_dir, &toml);
    clone.connected().await;
    let s = w
        .agent
        .wait(Duration::from_secs(5), |s| {
            s.reason == Some(Reason::Replaced)
        })
        .await;
    assert_eq!(s.state, State::Reconnecting);
    assert!(s.message.unwrap().contains("replaced"));
    // Both keep their credential, so they take the node in turn: newest wins each time, but
    // no faster than the backoff (which a replaced connection does not reset) lets them.
    let t0 = std::time::Instant::now();
    tokio::time::sleep(Duration::from_secs(8)).await;
    let replaced = || oplog_actions(&w.server, &w.device, "tunnel.replaced");
    let n = replaced();
    eprintln!("{n} replacements in {:?}", t0.elapsed());
    assert!(n >= 1, "the server records the replacement on the device");
    // A replaced agent waits its whole backoff step (0.5, 1, 2, then 4 s): at most 4 turns
    // each in 8 s, plus the first replacement.
    assert!(n <= 9, "{n} replacements in 8 s: flapping");
    clone.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn many_sequential_requests_never_exhaust_stream_credit() {
    let w = World::start(false, "").await;
    let mut v = w.visitor("alice", false).await;
    for i in 0..(pbx_remote::protocol::MAX_STREAMS as usize * 2 + 50) {
        let r = v.get("/").await;
        assert_eq!(r.status(), 200, "request {i}");
        let _ = r.bytes().await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_visitor_connection_reuses_its_stream_and_every_request_is_still_judged() {
    let (w, port) = World::with_metrics().await;
    let streams = || metric(port, "pbxra_tunnel_streams_total");
    let mut v = w.visitor("alice", false).await;
    let before = streams().await.expect("metrics served");
    for _ in 0..20 {
        let r = v.get("/").await;
        assert_eq!(r.status(), 200);
        r.bytes().await.unwrap();
    }
    let used = streams().await.unwrap() - before;
    // One browser connection, one stream: the login's, or a new one if that one was closed.
    // The test client may race a new connection against the return of its idle one (hyper-util's
    // pool connects while it waits for a checkout), and seldom does under load: 2 at most, where
    // a stream per request would be 20.
    assert!(used <= 2.0, "20 requests took {used} streams");

    // Another visit's cookies on the same connection: a new stream speaks for that visit (the
    // gate refuses a session under another visit's stream, so a 200 proves it).
    let bob = w.visitor("bob", false).await;
    let alice_cookies = std::mem::replace(&mut v.cookies, bob.cookies.clone());
    let r = v.get("/").await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();

    // Logged out on the kept stream: the next request on it is judged again and stopped.
    v.cookies = alice_cookies;
    assert_eq!(v.logout().await.status(), 200);
    let hits = w.portal.hits();
    let r = v.get("/").await;
    assert_ne!(r.status(), 200);
    assert_eq!(w.portal.hits(), hits);
}

/// What a visit needs beyond the server, started on the calling runtime (the tests below run it
/// on a thread of their own): a portal, an agent activated with `code` in `dir` and connected,
/// and a visitor logged in to the remote account through the visit link `url`.
async fn logged_in_visit(
    server: (std::net::SocketAddr, &str, std::net::SocketAddr),
    dir: &std::path::Path,
    code: &str,
    device: &str,
    url: &str,
) -> (PortalFixture, TestAgent, Visitor) {
    let (tunnel, pin, public) = server;
    let portal = PortalFixture::start().await;
    let toml = AgentToml::new(tunnel, pin, dir)
        .code(code)
        .portal(&portal.url())
        .build();
    let agent = TestAgent::start(dir, &toml);
    agent.connected().await;
    let mut v = Visitor::new(public, device);
    v.open_visit(url).await;
    assert_eq!(v.login(USER, PASSWORD).await.status(), 303);
    (portal, agent, v)
}

/// The tunnel and the front run on the data path's own thread: a console page or registry
/// poll that holds the runtime the server was started from cannot hold visits up. Here that
/// runtime is stuck outright (its only thread waits on a channel) while a visitor, logged in
/// before, goes on loading pages, all driven from another thread.
#[tokio::test]
async fn visits_are_served_while_the_runtime_the_server_was_started_on_is_stuck() {
    let server = TestServer::start().await;
    let (device, code) = server.add_device(false);
    let url = server.visit(&device, "alice", false);
    let (tunnel, pin, public) = (server.tunnel, server.pin.clone(), server.public);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("agent");
    let (ready, logged_in) = tokio::sync::oneshot::channel();
    let (stuck, now_stuck) = std::sync::mpsc::channel::<()>();
    let (tx, rx) = std::sync::mpsc::channel();
    let elsewhere = on_another_thread(async move {
        let server = (tunnel, pin.as_str(), public);
        let (portal, agent, mut v) = logged_in_visit(server, &dir, &code, &device, &url).await;
        let _ = ready.send(());
        tokio::task::spawn_blocking(move || now_stuck.recv())
            .await
            .unwrap()
            .unwrap();
        let hits = portal.hits();
        let pages = async {
            let mut answers = Vec::new();
            for _ in 0..5 {
                answers.push(v.get("/").await.status().as_u16());
            }
            answers
        };
        let answer = tokio::time::timeout(Duration::from_secs(20), pages).await;
        let _ = tx.send(
            answer
                .map(|a| (a, portal.hits() - hits))
                .map_err(|_| "no pages within 20 s"),
        );
        drop(agent);
    });
    logged_in.await.expect("the visitor logged in");
    // No await from here on: this runtime, the one the server was started on, runs nothing
    // else until the pages are loaded.
    stuck.send(()).unwrap();
    let answer = rx.recv_timeout(Duration::from_secs(30));
    elsewhere.join().unwrap();
    let (pages, hits) = answer
        .expect("the visiting thread answers")
        .expect("the pages are served");
    assert_eq!(pages, [200; 5]);
    assert_eq!(hits, 5, "each page came from the portal");
    server.shutdown().await;
}

/// Holds the registry's write lock, as an admin command or another process would, for 2 s of
/// the server's 5 s busy timeout while `v` keeps loading pages: each must answer at once, since
/// what waits on the lock waits off the data path's thread. `held` is the work the lock holds
/// up: it must still be waiting when the lock goes, and finish after; its output is returned.
async fn served_while_locked<T>(
    registry: &std::path::Path,
    v: &mut Visitor,
    held: tokio::task::JoinHandle<T>,
) -> T {
    let writer = rusqlite::Connection::open(registry).unwrap();
    writer.execute_batch("BEGIN IMMEDIATE").unwrap();
    let window = std::time::Instant::now();
    let mut served = 0;
    while window.elapsed() < Duration::from_secs(2) {
        let t0 = std::time::Instant::now();
        assert_eq!(v.get("/").await.status(), 200);
        let took = t0.elapsed();
        assert!(
            took < Duration::from_millis(800),
            "request {served} of the visit under way took {took:?}"
        );
        served += 1;
    }
    assert!(served > 10, "{served} requests in the window");
    assert!(!held.is_finished(), "the lock held the registry write");
    writer.execute_batch("ROLLBACK").unwrap();
    tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("it goes on once the lock is gone")
        .unwrap()
}

/// Runs `test` on a runtime of its own, as agents, portal and visitors would run on other
/// machines: the server's links run on the test's runtime, and a registry wait blocks a thread.
async fn elsewhere(test: impl std::future::Future<Output = ()> + Send + 'static) {
    let thread = on_another_thread(test);
    let joined = tokio::task::spawn_blocking(move || thread.join())
        .await
        .unwrap();
    if let Err(panic) = joined {
        std::panic::resume_unwind(panic);
    }
}

/// Opening a visit writes to the registry (the link is spent, the Operation Log gets a line),
/// and so does a passwordless visit's first request (its token is spent). With the registry
/// held by a writer elsewhere those writes wait in the busy timeout, off the data path's thread:
/// the visits already under way keep being served, and each new one goes on once the lock is
/// gone.
#[tokio::test(flavor = "multi_thread")]
async fn visits_go_on_while_another_visit_opens_and_waits_for_the_registry() {
    let server = TestServer::start().await;
    let (device, code) = server.add_device(true);
    let first_url = server.visit(&device, "alice", false);
    let second_url = server.visit(&device, "bob", false);
    let third_url = server.visit(&device, "carol", true);
    let (tunnel, pin, public) = (server.tunnel, server.pin.clone(), server.public);
    let registry = server.data_dir().join("server.db");
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().to_path_buf();
    elsewhere(async move {
        let server = (tunnel, pin.as_str(), public);
        let (_portal, _agent, mut v) =
            logged_in_visit(server, &dir, &code, &device, &first_url).await;
        assert_eq!(v.get("/").await.status(), 200);
        let mut second = Visitor::new(public, &device);
        assert_eq!(second.get(&second_url).await.status(), 200, "confirm page");
        let mut third = Visitor::new(public, &device);
        assert_eq!(third.open_visit(&third_url).await.status(), 303);

        let opening = tokio::spawn(async move {
            let status = second.post_visit(&second_url).await.status();
            (status, second)
        });
        let (status, mut second) = served_while_locked(&registry, &mut v, opening).await;
        assert_eq!(status, 303, "the second visit opened");
        assert_eq!(second.login(USER, PASSWORD).await.status(), 303);
        assert_eq!(second.get("/").await.status(), 200);

        let redeeming = tokio::spawn(async move {
            let status = third.get("/__remote/passwordless").await.status();
            (status, third)
        });
        let (status, mut third) = served_while_locked(&registry, &mut v, redeeming).await;
        assert_eq!(status, 303, "the passwordless visit logged in");
        let session: serde_json::Value = third.get("/__remote/session").await.json().await.unwrap();
        assert_eq!(session["role"], "super_admin");
    })
    .await;
    server.shutdown().await;
}

/// A registry held by a writer elsewhere makes a connecting agent wait in the busy timeout, and
/// an activating one too. Those waits belong to the link and to the activation API's request,
/// which run on the server's other runtime, so the visits already under way on the data path
/// keep being served.
#[tokio::test(flavor = "multi_thread")]
async fn visits_go_on_while_agents_connect_or_activate_and_wait_for_the_registry() {
    let server = TestServer::start().await;
    let (device, code) = server.add_device(false);
    let (_, second_code) = server.add_device(false);
    let (_, third_code) = server.add_device(false);
    let url = server.visit(&device, "alice", false);
    let (tunnel, pin, public) = (server.tunnel, server.pin.clone(), server.public);
    let registry = server.data_dir().join("server.db");
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().to_path_buf();
    elsewhere(async move {
        let server = (tunnel, pin.as_str(), public);
        let (portal, _first, mut v) =
            logged_in_visit(server, &root.join("first"), &code, &device, &url).await;
        assert_eq!(v.get("/").await.status(), 200);
        let toml = |dir: &std::path::Path, code: &str| {
            AgentToml::new(tunnel, &pin, dir)
                .code(code)
                .portal(&portal.url())
                .build()
        };
        // A second PBX, activated and stopped: its next connect writes to the registry.
        let dir = root.join("second");
        let second_toml = toml(&dir, &second_code);
        let second = TestAgent::start(&dir, &second_toml);
        second.connected().await;
        second.shutdown().await;

        let second = TestAgent::start(&dir, &second_toml);
        let connecting = tokio::spawn(async move {
            second.connected().await;
            second
        });
        let second = served_while_locked(&registry, &mut v, connecting).await;
        assert_eq!(second.status.get().state, State::Connected);

        // A third PBX activates with its code: spending the code writes to the registry.
        let dir = root.join("third");
        let third = TestAgent::start(&dir, &toml(&dir, &third_code));
        let activating = tokio::spawn(async move {
            third.connected().await;
            third
        });
        let third = served_while_locked(&registry, &mut v, activating).await;
        assert!(third.status.get().device_id.is_some());
    })
    .await;
    server.shutdown().await;
}
