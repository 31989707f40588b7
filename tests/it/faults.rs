//! The tunnel under a bad network (the impairment relay between agent and server), a broken
//! portal, and hostile visitors. Every test is bounded in time; the relay prints its seed when
//! one fails.

use crate::support::relay::{Impair, Relay};
use crate::support::*;
use pbx_remote::status::State;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Downloads `path`, returning (bytes, sha256 hex).
async fn download(v: &mut Visitor, path: &str) -> (u64, String) {
    let resp = v.get(path).await;
    assert_eq!(resp.status(), 200);
    body_sha256(resp).await
}

#[tokio::test(flavor = "multi_thread")]
async fn handshakes_complete_at_30_percent_loss_each_way() {
    let net = Net::start(Impair::loss(30.0), "").await;
    let t0 = Instant::now();
    net.agent
        .wait(Duration::from_secs(90), |s| s.state == State::Connected)
        .await;
    eprintln!("connected at 30% loss in {:?}", t0.elapsed());
    let mut v = net.visitor().await;
    let r = tokio::time::timeout(Duration::from_secs(60), v.get("/")).await;
    assert_eq!(r.expect("page within 60 s at 30% loss").status(), 200);
    assert!(
        net.relay
            .stats
            .dropped
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_1_mib_download_is_byte_exact_at_10_percent_loss() {
    let net = Net::start(Impair::default(), "").await;
    net.agent.connected().await;
    let mut v = net.visitor().await;
    net.relay.set_both(Impair {
        drop_pct: 10.0,
        burst_max: 3,
        reorder_pct: 2.0,
        dup_pct: 1.0,
        jitter: Duration::from_millis(2),
        ..Impair::default()
    });
    let n = 1 << 20;
    let (got, sha) = tokio::time::timeout(
        Duration::from_secs(60),
        download(&mut v, &format!("/bytes/{n}")),
    )
    .await
    .expect("1 MiB within 60 s at 10% loss");
    assert_eq!((got, sha), (n, pattern_sha256(n)));
}

#[tokio::test(flavor = "multi_thread")]
async fn source_port_rebinding_mid_download_keeps_the_connection() {
    rebinding_mid_download_keeps_the_connection(None).await;
}

/// The agent's uplink changes address mid-download (catalogue B4's second run): QUIC's path
/// validation follows it, no reconnect.
#[tokio::test(flavor = "multi_thread")]
async fn source_address_change_mid_download_keeps_the_connection() {
    rebinding_mid_download_keeps_the_connection(Some("127.0.0.2".parse().unwrap())).await;
}

async fn rebinding_mid_download_keeps_the_connection(to: Option<std::net::IpAddr>) {
    let net = Net::start(Impair::default(), "").await;
    let since = net.agent.connected().await.since;
    let mut v = net.visitor().await;
    let before = net
        .server
        .state
        .hub
        .get(&net.device)
        .unwrap()
        .conn
        .remote_address();
    let n: u64 = 32 << 20;
    let mut resp = v.get(&format!("/bytes/{n}")).await;
    assert_eq!(resp.status(), 200);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut got = 0u64;
    let mut rebound = false;
    let deadline = Instant::now() + Duration::from_secs(60);
    while let Some(chunk) = resp.chunk().await.unwrap() {
        got += chunk.len() as u64;
        ctx.update(&chunk);
        if !rebound && got >= 2 << 20 {
            match to {
                Some(ip) => net.relay.rebind_to(ip),
                None => net.relay.rebind(),
            }
            rebound = true;
        }
        assert!(Instant::now() < deadline, "download stalled at {got} bytes");
    }
    assert!(rebound && got == n, "got {got}");
    assert_eq!(hex::encode(ctx.finish().as_ref()), pattern_sha256(n));
    let link = net.server.state.hub.get(&net.device).unwrap();
    let now = link.conn.remote_address();
    assert_ne!(now, before, "the server saw the new address");
    if let Some(ip) = to {
        assert_eq!(now.ip(), ip);
    }
    assert_eq!(net.agent.status.get().since, since, "no reconnect");
    assert_eq!(net.agent.status.get().state, State::Connected);
}

#[tokio::test(flavor = "multi_thread")]
async fn pages_uploads_and_a_websocket_stay_exact_under_loss_delay_reordering_and_duplication() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let net = Net::start(Impair::default(), "").await;
    let since = net.agent.connected().await.since;
    let mut v = net.visitor().await;
    assert_eq!(v.get("/").await.status(), 200);
    net.relay.set_both(Impair {
        drop_pct: 5.0,
        burst_max: 3,
        delay: Duration::from_millis(5),
        jitter: Duration::from_millis(5),
        reorder_pct: 10.0,
        dup_pct: 2.0,
    });
    let hits = net.portal.hits();
    let limit = Duration::from_secs(60);
    let (mut ws, _) = tokio::time::timeout(limit, v.websocket(&v.origin))
        .await
        .expect("WebSocket opened within 60 s")
        .expect("WebSocket opened");
    // Bursts of messages in flight at once, so the path can reorder them.
    for burst in 0..4 {
        let sent: Vec<String> = (0..50).map(|i| format!("{burst}:{i}")).collect();
        for m in &sent {
            ws.send(Message::text(m.clone())).await.unwrap();
        }
        for m in &sent {
            let got = tokio::time::timeout(limit, ws.next())
                .await
                .expect("echo within 60 s")
                .expect("socket open")
                .unwrap();
            assert_eq!(
                got.to_text().unwrap(),
                m,
                "messages in order, none lost or repeated"
            );
        }
    }
    let body = pattern_bytes(0, 256 << 10);
    let want = pattern_sha256(body.len() as u64);
    for _ in 0..5 {
        let r = tokio::time::timeout(
            limit,
            v.request(reqwest::Method::POST, "/upload")
                .body(body.clone())
                .send(),
        )
        .await
        .expect("upload answered within 60 s")
        .unwrap();
        assert_eq!(r.status(), 200);
        let echo: serde_json::Value = r.json().await.unwrap();
        assert_eq!(echo["len"], body.len());
        assert_eq!(echo["sha256"], want.as_str());
        let page = tokio::time::timeout(limit, v.get("/"))
            .await
            .expect("page within 60 s");
        assert_eq!(page.status(), 200);
    }
    // One upgrade, five uploads, five pages: each reached the portal exactly once.
    assert_eq!(
        net.portal.hits() - hits,
        11,
        "no request sent to the portal twice"
    );
    ws.close(None).await.unwrap();
    let stats = &net.relay.stats;
    use std::sync::atomic::Ordering::Relaxed;
    assert!(stats.dropped.load(Relaxed) > 0 && stats.duplicated.load(Relaxed) > 0);
    assert_eq!(net.agent.status.get().since, since, "no reconnect");
}

/// The shipped heartbeat (30 s) instead of the tests' 1 s, so only keep-alives keep a NAT
/// mapping alive.
fn quiet_heartbeat(toml: String) -> String {
    let t = toml.replace("heartbeat_secs = 1\n", "heartbeat_secs = 30\n");
    assert_ne!(t, toml);
    t
}

/// Bytes through the relay both ways so far.
fn relay_bytes(relay: &Relay) -> u64 {
    use std::sync::atomic::Ordering::Relaxed;
    relay.stats.bytes_up.load(Relaxed) + relay.stats.bytes_down.load(Relaxed)
}

/// A connected tunnel left idle for `idle` behind a NAT that forgets a mapping after `nat`
/// without a packet from the agent, then used: it must answer on the same connection, the
/// mapping never having lapsed. Prints the traffic of the idle period.
async fn idle_behind_a_nat(nat: Duration, idle: Duration) {
    use std::sync::atomic::Ordering::Relaxed;
    let net = Net::start_edited(Impair::default(), "", quiet_heartbeat).await;
    let since = net.agent.connected().await.since;
    let mut v = net.visitor().await;
    assert_eq!(v.get("/").await.status(), 200);
    net.relay.nat_timeout(Some(nat));
    let before = relay_bytes(&net.relay);
    // No traffic on purpose: the silence is what this test is about.
    tokio::time::sleep(idle).await;
    let per_min = (relay_bytes(&net.relay) - before) as f64 * 60.0 / idle.as_secs_f64();
    eprintln!("{idle:?} idle behind a NAT forgetting after {nat:?}: {per_min:.0} B/min both ways");
    // What keeping a mapping alive costs: a keep-alive every 4 s is a few hundred bytes a
    // minute; a chatty tunnel (or a keep-alive storm) would be far above this.
    assert!(
        per_min < 8192.0,
        "{per_min:.0} B/min to keep an idle tunnel"
    );
    assert_eq!(
        net.relay.stats.nat_expiries.load(Relaxed),
        0,
        "the agent stayed silent longer than the NAT's {nat:?}"
    );
    let r = tokio::time::timeout(Duration::from_secs(5), v.get("/"))
        .await
        .expect("answered after the idle period");
    assert_eq!(r.status(), 200);
    assert_eq!(net.agent.status.get().since, since, "no reconnect");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_tunnel_outlives_a_nat_that_forgets_mappings_after_8s() {
    // Twice the keep-alive interval; the idle period outlasts the idle timeout, so a tunnel
    // without keep-alives would be closed and one with too rare keep-alives would lose its
    // mapping.
    let nat = 2 * pbx_remote::protocol::KEEPALIVE;
    idle_behind_a_nat(
        nat,
        pbx_remote::protocol::IDLE_TIMEOUT + Duration::from_secs(5),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_nat_that_forgets_between_keep_alives_costs_a_delay_not_the_tunnel() {
    use std::sync::atomic::Ordering::Relaxed;
    let net = Net::start_edited(Impair::default(), "", quiet_heartbeat).await;
    let since = net.agent.connected().await.since;
    let mut v = net.visitor().await;
    assert_eq!(v.get("/").await.status(), 200);
    // Shorter than the keep-alive: the server's next packets go to a mapping that is gone
    // until the agent's next packet opens a new one, and the server follows it there.
    net.relay
        .nat_timeout(Some(pbx_remote::protocol::KEEPALIVE / 4));
    for round in 0..3 {
        // Ask while the mapping is gone: the request and its retransmissions are dropped at
        // the NAT until the agent's next keep-alive opens a new mapping.
        let deadline = Instant::now() + 2 * pbx_remote::protocol::KEEPALIVE;
        while !net.relay.mapping_expired() {
            assert!(
                Instant::now() < deadline,
                "round {round}: the mapping never timed out"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let (dropped, expiries) = (
            net.relay.stats.nat_dropped.load(Relaxed),
            net.relay.stats.nat_expiries.load(Relaxed),
        );
        let t0 = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), v.get("/"))
            .await
            .expect("answered once the agent's next packet opened a new mapping");
        assert_eq!(r.status(), 200);
        eprintln!("round {round}: answered after {:?}", t0.elapsed());
        assert!(
            net.relay.stats.nat_dropped.load(Relaxed) > dropped,
            "round {round}: the server's packets met the timed-out mapping"
        );
        assert!(net.relay.stats.nat_expiries.load(Relaxed) > expiries);
    }
    assert_eq!(net.agent.status.get().since, since, "no reconnect");
    assert_eq!(net.agent.status.get().state, State::Connected);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blackhole_gives_502_is_detected_and_the_agent_returns_within_10s() {
    let net = Net::start(Impair::default(), "").await;
    net.agent.connected().await;
    let mut v = net.visitor().await;
    assert_eq!(v.get("/").await.status(), 200);

    net.relay.blackhole(true);
    let t0 = Instant::now();
    let r = tokio::time::timeout(Duration::from_secs(30), v.get("/delay/100"))
        .await
        .expect("in-flight request ends, not hangs");
    assert_eq!(r.status(), 502);
    eprintln!("in-flight request → 502 after {:?}", t0.elapsed());
    let idle = pbx_remote::protocol::IDLE_TIMEOUT;
    net.agent
        .wait(idle + Duration::from_secs(5), |s| {
            s.state != State::Connected
        })
        .await;
    let detected = t0.elapsed();
    eprintln!("blackhole detected after {detected:?} (idle timeout {idle:?})");
    assert!(detected <= idle + Duration::from_secs(5));

    // Leave it dark long enough for the backoff to grow, then restore the path.
    tokio::time::sleep(Duration::from_secs(3)).await;
    net.relay.blackhole(false);
    let back = Instant::now();
    net.agent
        .wait(Duration::from_secs(10), |s| s.state == State::Connected)
        .await;
    eprintln!("reconnected {:?} after the path returned", back.elapsed());
    assert_eq!(v.get("/").await.status(), 200);
}

/// The agent's status once its message says `words` (within 30 s).
async fn status_saying(agent: &TestAgent, words: &str) -> pbx_remote::status::Status {
    agent
        .wait(Duration::from_secs(30), |s| {
            s.message.as_deref().is_some_and(|m| m.contains(words))
        })
        .await
}

#[tokio::test(flavor = "multi_thread")]
async fn blocked_udp_is_named_in_the_status_while_tcp_answers() {
    use std::sync::atomic::Ordering::Relaxed;
    // The relay passes TCP (activation) and drops every UDP datagram: a firewall that blocks
    // UDP. The agent activates, then every QUIC attempt gets silence (QUIC only: `auto` would
    // take TCP, `transport::` tests that).
    let net = Net::start_edited(Impair::loss(100.0), "", transport("quic")).await;
    let t0 = Instant::now();
    let s = status_saying(&net.agent, "looks blocked").await;
    eprintln!("status after {:?}: {:?}", t0.elapsed(), s.message);
    assert_eq!(s.state, State::Reconnecting);
    assert_eq!(
        s.reason,
        Some(pbx_remote::protocol::Reason::ServerUnreachable)
    );
    let m = s.message.unwrap();
    assert!(
        m.contains("UDP") && m.contains(&net.relay.addr.port().to_string()),
        "{m}"
    );
    // Retries are paced: QUIC's own retransmissions and the backoff, not a busy loop.
    let sent = net.relay.stats.dropped.load(Relaxed);
    let elapsed = t0.elapsed().as_secs_f64();
    eprintln!("{sent} datagrams dropped in {elapsed:.1} s");
    assert!(
        (sent as f64) < 10.0 * elapsed.max(1.0),
        "{sent} datagrams in {elapsed:.1} s"
    );
    net.relay.set_both(Impair::default());
    net.agent
        .wait(Duration::from_secs(15), |s| s.state == State::Connected)
        .await;
}

/// The server's first handshake packet gets through, then nothing more from it: UDP is not
/// blocked, so the status says the handshake began and did not finish, not that UDP looks
/// blocked. When the path mends, the agent connects.
#[tokio::test(flavor = "multi_thread")]
async fn a_handshake_cut_after_the_servers_first_packet_is_named_as_such() {
    let net = Net::start_edited(Impair::default(), "", transport("quic")).await;
    net.relay.pass_down(Some(1));
    let s = status_saying(&net.agent, "began but did not finish").await;
    assert_eq!(
        s.reason,
        Some(pbx_remote::protocol::Reason::ServerUnreachable)
    );
    assert!(!s.message.unwrap().contains("blocked"));
    net.relay.pass_down(None);
    net.agent
        .wait(Duration::from_secs(15), |s| s.state == State::Connected)
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_server_down_on_udp_and_tcp_is_told_apart_from_blocked_udp() {
    let World {
        server,
        agent,
        portal: _portal,
        tmp: _tmp,
        ..
    } = World::start(false, "").await;
    let address = server.tunnel;
    server.shutdown().await;
    let s = status_saying(&agent, "down or unreachable").await;
    let m = s.message.unwrap();
    eprintln!("{m}");
    assert!(
        m.contains(&address.to_string()) && !m.contains("blocked"),
        "{m}"
    );
}

/// A tmpfs mounted for one test, lazily unmounted when dropped.
struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    /// `None` where mounting is refused.
    fn mount(dir: &std::path::Path, size: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(dir).unwrap();
        std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
            .then(|| Tmpfs(dir.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_stops_neither_the_tunnel_nor_logins() {
    use std::io::Write;
    let tmp = tempfile::tempdir().unwrap();
    let disk = tmp.path().join("disk");
    if !root_or_skip("mounting a 1 MiB tmpfs") {
        return;
    }
    let _mounted = Tmpfs::mount(&disk, "1m").expect("as root, a tmpfs mounts");
    let server = TestServer::start().await;
    let portal = PortalFixture::start().await;
    let (device, code) = server.add_device(false);
    // State directory, status file and audit log all on the small disk.
    let dir = disk.join("agent");
    let toml = server
        .agent_toml(&dir)
        .code(&code)
        .portal(&portal.url())
        .build();
    let agent = TestAgent::start(&dir, &toml);
    let since = agent.connected().await.since;
    let audit = dir.join("state/audit.log");

    let mut filler = std::fs::File::create(disk.join("filler")).unwrap();
    let chunk = vec![0u8; 64 << 10];
    let mut full = false;
    for _ in 0..64 {
        if filler.write_all(&chunk).is_err() {
            full = true;
            break;
        }
    }
    assert!(full, "1 MiB tmpfs filled");
    let audit_before = std::fs::read_to_string(&audit).unwrap_or_default();

    let url = server.visit(&device, "alice", false);
    let mut v = Visitor::new(server.public, &device);
    v.open_visit(&url).await;
    assert_eq!(v.login(USER, PASSWORD).await.status(), 303);
    for _ in 0..3 {
        assert_eq!(v.get("/").await.status(), 200);
    }
    assert_eq!(agent.status.get().active_sessions.len(), 1);
    assert_eq!(
        std::fs::read_to_string(&audit).unwrap_or_default(),
        audit_before,
        "the disk really was full: the login could not be audited"
    );
    assert_eq!(agent.status.get().since, since, "no reconnect");
    assert!(!agent.task.is_finished(), "the agent never exits");

    // Space again: the next event and status change are written.
    drop(filler);
    std::fs::remove_file(disk.join("filler")).unwrap();
    assert_eq!(v.logout().await.status(), 200);
    eventually(
        Duration::from_secs(10),
        "logout audited and status written",
        || {
            let logged = std::fs::read_to_string(&audit)
                .unwrap_or_default()
                .contains("\"logout\"");
            let written = pbx_remote::status::read(&dir.join("status.json"))
                .is_ok_and(|s| s.state == State::Connected && s.active_sessions.is_empty());
            (logged && written).then_some(())
        },
    )
    .await;
    agent.shutdown().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_portal_gives_504_within_the_portal_timeout_while_the_tunnel_stays() {
    let w = World::start_with_toml(false, |t| {
        t.replace("drain_secs = 2", "drain_secs = 2\nportal_timeout_secs = 2")
    })
    .await;
    let since = w.agent.status.get().since;
    let mut v = w.visitor("alice", false).await;
    for _ in 0..3 {
        let t0 = Instant::now();
        let r = tokio::time::timeout(Duration::from_secs(10), v.get("/slow"))
            .await
            .expect("answered");
        assert_eq!(r.status(), 504);
        // The portal timeout is 2 s; allow scheduling slack but not a second timeout.
        assert!(
            t0.elapsed() < Duration::from_secs(4),
            "504 after {:?}",
            t0.elapsed()
        );
    }
    assert_eq!(v.get("/").await.status(), 200);
    assert_eq!(w.agent.status.get().since, since, "tunnel stayed up");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_resetting_portal_gives_502_while_the_tunnel_stays() {
    let resetting = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let reset_addr = resetting.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = resetting.accept().await {
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            // Zero linger: the close sends a RST at once (no blocking, despite the deprecation).
            #[allow(deprecated)]
            let _ = s.set_linger(Some(Duration::ZERO));
            drop(s);
        }
    });
    let server = TestServer::start().await;
    let (device, code) = server.add_device(false);
    let tmp = tempfile::tempdir().unwrap();
    let toml = server
        .agent_toml(&tmp.path().join("agent"))
        .code(&code)
        .portal(&format!("http://{reset_addr}"))
        .build();
    let agent = TestAgent::start(&tmp.path().join("agent"), &toml);
    let since = agent.connected().await.since;
    let url = server.visit(&device, "alice", false);
    let mut v = Visitor::new(server.public, &device);
    v.open_visit(&url).await;
    assert_eq!(v.login(USER, PASSWORD).await.status(), 303);
    for _ in 0..5 {
        let r = tokio::time::timeout(Duration::from_secs(10), v.get("/"))
            .await
            .expect("answered");
        assert_eq!(r.status(), 502);
    }
    assert_eq!(agent.status.get().since, since, "tunnel stayed up");
    assert_eq!(agent.status.get().state, State::Connected);
}

/// Writes `head` on a fresh connection to the front and returns the connection unread.
async fn send_head(v: &Visitor, head: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(v.public).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// Sends raw bytes to the front as `v`'s browser would (reading while it writes) and returns
/// the status line and whether the front ended the connection within 20 s (a closed or reset
/// connection ends it; a timeout does not).
async fn raw_front(v: &Visitor, head: &[u8]) -> (String, bool) {
    let s = tokio::net::TcpStream::connect(v.public).await.unwrap();
    let (mut rx, mut tx) = s.into_split();
    let head = head.to_vec();
    let writer = tokio::spawn(async move {
        let _ = tx.write_all(&head).await;
        tx
    });
    let mut out = Vec::new();
    let ended = tokio::time::timeout(Duration::from_secs(20), rx.read_to_end(&mut out))
        .await
        .is_ok();
    writer.abort();
    let line = String::from_utf8_lossy(&out)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    (line, ended)
}

/// C6 through the front, with the agent in a process of its own so its memory is its own: a
/// 1 MiB header and 10 000 headers get 431 (or a closed connection: a reset may overtake the
/// answer) and never hang; 100 slowloris connections are closed by the header timeout; 1 000
/// concurrent requests from one session hit its limit; other sessions keep working, the agent
/// never exits and its peak RSS stays far below the unit's `MemoryMax=128M`.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_heads_and_floods_get_limits_and_others_keep_working() {
    let server = TestServer::start().await;
    let portal = PortalFixture::start().await;
    let (device, code) = server.add_device(false);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("agent");
    let agent = AgentProcess::spawn(
        &dir,
        &server
            .agent_toml(&dir)
            .code(&code)
            .portal(&portal.url())
            .build(),
        |_| {},
    );
    let since = agent.connected().await.since;
    let mut other = logged_in(server.public, &server.visit(&device, "bob", false), &device).await;
    let v = logged_in(
        server.public,
        &server.visit(&device, "mallory", false),
        &device,
    )
    .await;
    let base = format!(
        "GET / HTTP/1.1\r\nHost: {}\r\nCookie: {}\r\n",
        v.host,
        v.cookie_header()
    );

    // A 1 MiB header and 10 000 headers: refused with 431, never left hanging.
    let big = format!("{base}X-Big: {}\r\n\r\n", "a".repeat(1 << 20));
    let many: String = (0..10_000).map(|i| format!("X-H{i}: v\r\n")).collect();
    for (what, head) in [
        ("1 MiB header", big),
        ("10 000 headers", format!("{base}{many}\r\n")),
    ] {
        let (line, ended) = raw_front(&v, head.as_bytes()).await;
        assert!(ended, "{what}: the front left the connection hanging");
        assert!(line.contains(" 431 ") || line.is_empty(), "{what}: {line}");
    }

    // Slowloris: 100 connections trickling a head; the others are served meanwhile.
    let t_lorises = Instant::now();
    let mut lorises = vec![];
    for _ in 0..100 {
        lorises.push(send_head(&v, "GET / HTTP/1.1\r\nHost: x\r\n").await);
    }
    assert_eq!(other.get("/").await.status(), 200);

    // 1 000 concurrent requests from one session: it hits its limit, others keep working.
    let mut flood = tokio::task::JoinSet::new();
    for _ in 0..1000 {
        let req = v.request(reqwest::Method::GET, "/slow");
        flood.spawn(async move { req.send().await.map(|r| r.status().as_u16()) });
    }
    let t0 = Instant::now();
    let mut limited = 0;
    while limited < 1000 - pbx_remote::server::hub::MAX_STREAMS_PER_GRANT {
        let code = tokio::time::timeout(Duration::from_secs(30), flood.join_next())
            .await
            .expect("flood answers")
            .unwrap()
            .unwrap();
        if let Ok(c) = code {
            assert!(c == 429 || c == 503, "{c}");
            limited += 1;
        }
    }
    eprintln!("{limited} flood requests refused in {:?}", t0.elapsed());
    for _ in 0..5 {
        assert_eq!(
            other.get("/").await.status(),
            200,
            "other sessions keep working"
        );
    }
    flood.abort_all();

    // The slowloris connections are closed by the front's header timeout (15 s), not left open.
    let closes = lorises.into_iter().map(|mut s| async move {
        let mut sink = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut sink))
            .await
            .is_ok()
    });
    let closed = futures_util::future::join_all(closes).await;
    assert!(
        closed.iter().all(|c| *c),
        "every slowloris connection closed"
    );
    eprintln!(
        "slowloris connections closed within {:?}",
        t_lorises.elapsed()
    );

    let s = pbx_remote::status::read(&agent.status_file).unwrap();
    assert_eq!(s.state, State::Connected);
    assert_eq!(s.since, since, "no reconnect");
    let pid = agent.pid();
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the agent never exits"
    );
    let peak = proc_mem_kib(pid, "VmHWM");
    eprintln!("agent peak RSS {peak} KiB");
    assert!(
        peak < 64 * 1024,
        "agent peak RSS {peak} KiB (MemoryMax is 128 MiB)"
    );
}

/// C6 open/cancel flood: requests abandoned by the thousand (closed tabs, or one session opening
/// and dropping requests as fast as it can) leave nothing behind. The portal requests they started
/// are cancelled — long before the portal timeout — the session gets its stream slots back, and
/// the tunnel and other sessions carry on.
#[tokio::test(flavor = "multi_thread")]
async fn abandoned_requests_are_cancelled_at_the_portal_and_give_their_slots_back() {
    use pbx_remote::server::hub::MAX_STREAMS_PER_GRANT;
    let w = World::start_with_toml(false, |t| {
        t.replace(
            "drain_secs = 2",
            "drain_secs = 2\nportal_timeout_secs = 600",
        )
    })
    .await;
    let since = w.agent.status.get().since;
    let mut other = w.visitor("bob", false).await;
    let v = w.visitor("mallory", false).await;
    let head = format!(
        "GET /slow HTTP/1.1\r\nHost: {}\r\nCookie: {}\r\n\r\n",
        v.host,
        v.cookie_header()
    );
    // The session's slots, less a few: a stream kept idle for one of the visitor's own
    // connections holds a slot until the agent's head-read timeout closes it.
    let slots = MAX_STREAMS_PER_GRANT - 8;
    let mut abandoned = 0;
    for round in 0..5 {
        // The session's slots all held at the portal...
        let mut held = vec![];
        for _ in 0..slots {
            held.push(send_head(&v, &head).await);
        }
        eventually(Duration::from_secs(20), "the portal holds them all", || {
            (w.portal.held() == slots).then_some(())
        })
        .await;
        // ...then 200 more opened and dropped at once, racing the full session, and all let go.
        for _ in 0..200 {
            drop(send_head(&v, &head).await);
        }
        abandoned += held.len() + 200;
        drop(held);
        let t0 = Instant::now();
        eventually(
            Duration::from_secs(20),
            "abandoned requests cancelled at the portal",
            || (w.portal.held() == 0 && w.portal.open() <= 1).then_some(()),
        )
        .await;
        eprintln!(
            "round {round}: {abandoned} abandoned so far; portal let go within {:?}",
            t0.elapsed()
        );
        assert_eq!(other.get("/").await.status(), 200, "others keep working");
    }

    // The slots came back: the session can again fill them at once.
    let mut full = tokio::task::JoinSet::new();
    for _ in 0..slots {
        let req = v.request(reqwest::Method::GET, "/delay/200");
        full.spawn(async move { req.send().await.map(|r| r.status().as_u16()) });
    }
    while let Some(code) = full.join_next().await {
        assert_eq!(code.unwrap().unwrap(), 200);
    }
    assert_eq!(w.agent.status.get().state, State::Connected);
    assert_eq!(w.agent.status.get().since, since, "no reconnect");
}

/// A request on a bad path may take a while, but must end.
async fn bounded(what: &str, f: impl std::future::Future<Output = reqwest::Response>) -> u16 {
    tokio::time::timeout(Duration::from_secs(60), f)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within 60 s"))
        .status()
        .as_u16()
}

/// Catalogue F2, as a seeded walk: 60 steps picked at random from network faults (loss with
/// bursts, delay, reordering, duplication, rebinding, short blackholes, healing), server
/// restarts, pauses, the agent's clock jumping past the idle logout, and visitor actions (log in, load
/// a page, log out, send a request with no session or a dead one). After every step:
/// - nothing sent without a live session reaches the portal (`/canary/…` paths);
/// - no request reaches the portal twice (each page carries a unique `?n=`);
/// - a logged-in visitor gets the page or a clear 502/503/504 — never a hang or a login page;
/// - the agent never exits.
///
/// At the end the network heals: the agent is connected within the idle timeout + 10 s, and a
/// fresh login loads pages. The steps replay from the relay's seed (`RELAY_SEED`); timing is
/// real, so this is a seeded walk rather than a deterministic simulation.
#[tokio::test(flavor = "multi_thread")]
async fn a_seeded_walk_through_faults_restarts_and_sessions_keeps_the_invariants() {
    let mut net = Net::start(Impair::default(), "").await;
    net.agent.connected().await;
    let mut rng = crate::support::relay::SplitMix(net.relay.seed);
    let mut v = net.visitor().await;
    let mut logged_in = true;
    let mut stranger = Visitor::new(net.server.public, &net.device);
    let mut trace = vec![];
    let (mut pages, mut canaries) = (0, 0);
    for step in 0..60 {
        let pick = rng.next() % 11;
        match pick {
            0 => {
                let i = Impair {
                    drop_pct: (rng.next() % 16) as f64,
                    burst_max: 3,
                    delay: rng.upto(Duration::from_millis(10)),
                    jitter: rng.upto(Duration::from_millis(5)),
                    reorder_pct: (rng.next() % 11) as f64,
                    dup_pct: (rng.next() % 4) as f64,
                };
                trace.push(format!("impair {i:?}"));
                net.relay.set_both(i);
            }
            1 => {
                trace.push("heal".into());
                net.relay.set_both(Impair::default());
            }
            2 => {
                trace.push("rebind".into());
                net.relay.rebind();
            }
            3 => {
                let dark = Duration::from_millis(200) + rng.upto(Duration::from_millis(1300));
                trace.push(format!("blackhole {dark:?}"));
                net.relay.blackhole(true);
                tokio::time::sleep(dark).await;
                net.relay.blackhole(false);
            }
            4 => {
                trace.push("server restart".into());
                net.server = net.server.restart().await;
            }
            10 => {
                // Time for a reconnect or a retransmission to happen between the quick steps.
                let pause = Duration::from_millis(500) + rng.upto(Duration::from_millis(2500));
                trace.push(format!("pause {pause:?}"));
                tokio::time::sleep(pause).await;
            }
            5 => {
                trace.push("clock +16 min (idle logout)".into());
                net.agent.clock.advance(Duration::from_secs(16 * 60));
                logged_in = false;
            }
            6 if logged_in => {
                let code = bounded("logout", v.logout()).await;
                trace.push(format!("logout → {code}"));
                logged_in = code != 200;
            }
            6 | 7 if !logged_in => {
                let code = bounded("login", async { v.login(USER, PASSWORD).await }).await;
                trace.push(format!("login → {code}"));
                assert!([303, 502, 503, 504].contains(&code), "login → {code}");
                logged_in = code == 303;
            }
            8 => {
                // No session here: a stranger with no visit, or the visitor after logout/expiry.
                canaries += 1;
                let path = format!("/canary/{step}");
                let (who, code) = if logged_in || rng.chance(50.0) {
                    ("stranger", bounded("canary", stranger.get(&path)).await)
                } else {
                    ("dead session", bounded("canary", v.get(&path)).await)
                };
                trace.push(format!("{who} {path} → {code}"));
                assert_ne!(code, 200, "{who} got a portal page");
            }
            _ => {
                pages += 1;
                let path = format!("/delay/0?n={step}");
                let code = bounded("page", v.get(&path)).await;
                trace.push(format!("page {path} → {code} (logged in: {logged_in})"));
                if logged_in {
                    assert!([200, 502, 503, 504].contains(&code), "{trace:#?}");
                } else {
                    assert_ne!(code, 200, "{trace:#?}");
                }
            }
        }
        let seen = net.portal.log.paths.lock().unwrap().clone();
        assert!(
            !seen.iter().any(|p| p.starts_with("/canary")),
            "a request without a session reached the portal: {trace:#?}"
        );
        let mut unique = std::collections::HashSet::new();
        for p in seen.iter().filter(|p| p.contains("?n=")) {
            assert!(unique.insert(p), "{p} reached the portal twice: {trace:#?}");
        }
        assert!(
            !net.agent.task.is_finished(),
            "the agent exited: {trace:#?}"
        );
    }
    eprintln!(
        "seed {}: {pages} pages, {canaries} requests without a session: {trace:#?}",
        net.relay.seed
    );

    // Healed: a new visitor gets in. The agent may still sit on a connection the server lost
    // in a restart whose close was dropped, until the server's stateless reset (or the idle
    // timeout) ends it.
    net.relay.set_both(Impair::default());
    net.relay.blackhole(false);
    let healed = Instant::now();
    let limit = pbx_remote::protocol::IDLE_TIMEOUT + Duration::from_secs(10);
    loop {
        let url = net.server.visit(&net.device, "carol", false);
        let mut fresh = Visitor::new(net.server.public, &net.device);
        fresh.open_visit(&url).await;
        if bounded("login", fresh.login(USER, PASSWORD)).await == 303
            && bounded("page", fresh.get("/")).await == 200
        {
            break;
        }
        assert!(
            healed.elapsed() < limit,
            "no way in {limit:?} after healing"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    eprintln!("a new visitor got in {:?} after healing", healed.elapsed());
    assert_eq!(net.agent.status.get().state, State::Connected);
}

// Longer variants: `tests/run-long.sh` runs them (not CI).

#[tokio::test(flavor = "multi_thread")]
#[ignore = "long: run by tests/run-long.sh"]
async fn long_10_minutes_idle_behind_a_nat_with_a_30s_udp_timeout() {
    idle_behind_a_nat(Duration::from_secs(30), Duration::from_secs(600)).await;
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "long: run by tests/run-long.sh"]
async fn long_a_60s_blackhole_then_the_agent_returns_within_10s() {
    let net = Net::start(Impair::default(), "").await;
    net.agent.connected().await;
    let mut v = net.visitor().await;
    net.relay.blackhole(true);
    net.agent
        .wait(Duration::from_secs(25), |s| s.state != State::Connected)
        .await;
    // Long enough for the backoff to reach its cap several times.
    tokio::time::sleep(Duration::from_secs(60)).await;
    net.relay.blackhole(false);
    let back = Instant::now();
    net.agent
        .wait(Duration::from_secs(10), |s| s.state == State::Connected)
        .await;
    eprintln!("reconnected {:?} after a 60 s blackhole", back.elapsed());
    assert_eq!(v.get("/").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "long: run by tests/run-long.sh"]
async fn long_ten_handshakes_at_30_percent_loss_with_bursts() {
    let mut times = vec![];
    for _ in 0..10 {
        let net = Net::start(
            Impair {
                drop_pct: 30.0,
                burst_max: 3,
                jitter: Duration::from_millis(5),
                ..Impair::default()
            },
            "",
        )
        .await;
        let t0 = Instant::now();
        net.agent
            .wait(Duration::from_secs(120), |s| s.state == State::Connected)
            .await;
        times.push(t0.elapsed());
    }
    times.sort();
    eprintln!(
        "connect at 30% loss with bursts: median {:?}, max {:?}",
        times[5], times[9]
    );
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "long: run by tests/run-long.sh"]
async fn long_16_mib_at_10_percent_loss_with_delay_reordering_and_rebinding() {
    let net = Net::start(Impair::default(), "").await;
    let since = net.agent.connected().await.since;
    let mut v = net.visitor().await;
    net.relay.set_both(Impair {
        drop_pct: 10.0,
        burst_max: 4,
        delay: Duration::from_millis(10),
        jitter: Duration::from_millis(5),
        reorder_pct: 5.0,
        dup_pct: 2.0,
    });
    let n: u64 = 16 << 20;
    let mut resp = v.get(&format!("/bytes/{n}")).await;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let (mut got, mut next_rebind) = (0u64, 4u64 << 20);
    let t0 = Instant::now();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        got += chunk.len() as u64;
        ctx.update(&chunk);
        if got >= next_rebind {
            net.relay.rebind();
            next_rebind += 4 << 20;
        }
    }
    eprintln!(
        "16 MiB at 10% loss, 10±5 ms, rebinding every 4 MiB: {:?}",
        t0.elapsed()
    );
    assert_eq!(got, n);
    assert_eq!(hex::encode(ctx.finish().as_ref()), pattern_sha256(n));
    assert_eq!(net.agent.status.get().since, since, "no reconnect");
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "long: run by tests/run-long.sh"]
async fn long_download_rates_under_loss_and_reordering_over_a_20ms_path() {
    let net = Net::start(Impair::default(), "").await;
    let since = net.agent.connected().await.since;
    let mut v = net.visitor().await;
    let n: u64 = 8 << 20;
    // (loss %, reordered %): a reordered packet arrives 15 ms after its successors.
    for (loss, reorder) in [(0.0, 0.0), (1.0, 0.0), (5.0, 0.0), (0.0, 1.0), (0.0, 5.0)] {
        net.relay.set_both(Impair {
            drop_pct: loss,
            reorder_pct: reorder,
            delay: Duration::from_millis(10),
            ..Impair::default()
        });
        let t0 = Instant::now();
        let (got, sha) = download(&mut v, &format!("/bytes/{n}")).await;
        let secs = t0.elapsed().as_secs_f64();
        eprintln!(
            "8 MiB at {loss}% loss and {reorder}% reordered each way, 10 ms each way: {secs:.1} s, {:.0} KiB/s",
            got as f64 / 1024.0 / secs
        );
        assert_eq!(got, n);
        assert_eq!(sha, pattern_sha256(n));
    }
    assert_eq!(net.agent.status.get().since, since, "no reconnect");
}
