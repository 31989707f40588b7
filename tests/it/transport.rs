//! The TCP transport (DESIGN §10): TLS over TCP with HTTP/2 framing when UDP is blocked or the
//! config says so, the `auto` race, the QUIC re-probe on the agent's clock, and HTTP CONNECT
//! proxies on the way.

use crate::support::console::{add_user, Cm, CM_PASSWORD};
use crate::support::proxy::ConnectProxy;
use crate::support::relay::Impair;
use crate::support::*;
use pbx_remote::agent::FIRST_PROBE;
use pbx_remote::protocol::Reason;
use pbx_remote::server::db::Role;
use pbx_remote::status::State;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, Instant};

/// `edit`, then `[tunnel] proxy = url` too.
fn with_proxy(url: String, edit: impl FnOnce(String) -> String) -> impl FnOnce(String) -> String {
    move |t| edit(t).replacen("[tunnel]\n", &format!("[tunnel]\nproxy = \"{url}\"\n"), 1)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tcp_tunnel_serves_account_and_passwordless_visits() {
    let w = World::start_with_toml(true, transport("tcp")).await;
    let s = w.agent.status.get();
    assert_eq!(s.transport.as_deref(), Some("tcp"));
    assert_eq!(s.transport_note.as_deref(), Some("forced by config"));
    assert!(s.rtt_ms.is_some());
    let device = w.server.db().device(&w.device).unwrap().unwrap();
    assert_eq!(device.nodes[0].transport.as_deref(), Some("tcp"));
    // The CM says so: `device show` and the console's device page and list.
    let shown =
        pbx_remote::server::admin::device_show(&w.server.data_dir(), &w.device, false).unwrap();
    assert!(shown.contains("online over tcp"), "{shown}");
    add_user(&w.server, "ann@example.com", Role::Admin, &[]);
    let mut cm = Cm::new(&w.server);
    cm.sign_in("ann@example.com", CM_PASSWORD).await;
    let (_, _, page) = cm.get(&format!("/devices/{}", w.device)).await;
    assert!(page.contains("<td>TCP</td>"), "{page}");
    let (_, _, list) = cm.get("/devices").await;
    assert!(list.contains("over TCP"), "{list}");

    let mut v = w.visitor("alice", false).await;
    let r = v.get("/").await;
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("PBX portal home"));
    let mut p = w.visitor("bob", true).await;
    let r = p.get("/headers").await;
    assert_eq!(r.status(), 200);
    let h: serde_json::Value = r.json().await.unwrap();
    assert_eq!(h["x-pbx-remote-role"][0], "super_admin", "{h}");
    assert_eq!(w.agent.status.get().state, State::Connected);
}

#[tokio::test(flavor = "multi_thread")]
async fn over_tcp_64_mib_down_an_upload_and_a_websocket_are_byte_exact() {
    let w = World::start_with_toml(false, transport("tcp")).await;
    assert_eq!(w.agent.status.get().transport.as_deref(), Some("tcp"));
    crate::tunnel::download_upload_and_websocket(w).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn over_tcp_device_removal_reaches_the_agent_within_5s() {
    let w = World::start_with_toml(false, transport("tcp")).await;
    crate::tunnel::device_removal_reaches_the_agent(w).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn over_tcp_a_copied_credential_replaces_the_older_connection() {
    let w = World::start_with_toml(false, transport("tcp")).await;
    crate::tunnel::a_copied_credential_replaces(w).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn over_tcp_a_stop_drains_the_request_in_flight() {
    let w = World::start_with_toml(false, transport("tcp")).await;
    crate::operations::shutdown_drains_in_flight_requests(w).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn with_every_udp_datagram_dropped_an_auto_agent_is_on_tcp_within_2s() {
    let t0 = Instant::now();
    let net = Net::start(Impair::loss(100.0), METRICS_ON_ANY_PORT).await;
    let s = net
        .agent
        .wait(Duration::from_secs(2), |s| s.state == State::Connected)
        .await;
    eprintln!("connected over TCP {:?} after start", t0.elapsed());
    assert_eq!(s.transport.as_deref(), Some("tcp"));
    let note = s.transport_note.unwrap();
    assert!(
        note.contains(&format!("UDP to {}", net.relay.addr))
            && note.contains("using TCP")
            && note.contains("QUIC is tried again at"),
        "{note}"
    );
    assert!(net.relay.stats.dropped.load(Relaxed) > 0, "QUIC was tried");
    let port = net.agent.metrics_port().await;
    assert_eq!(
        metric(port, "pbxra_transport{kind=\"tcp\"}").await,
        Some(1.0)
    );
    assert_eq!(
        metric(port, "pbxra_transport{kind=\"quic\"}").await,
        Some(0.0)
    );
    let mut v = net.visitor().await;
    assert_eq!(v.get("/").await.status(), 200);
    let text = pbx_remote::status::render(&net.agent.status.get());
    assert!(text.contains("transport:   TCP"), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn udp_restored_moves_the_tunnel_back_to_quic_at_the_next_probe_while_a_tcp_download_completes(
) {
    let net = Net::start(Impair::loss(100.0), METRICS_ON_ANY_PORT).await;
    let s = net.agent.connected().await;
    assert_eq!(s.transport.as_deref(), Some("tcp"));
    let since = s.since.clone();
    let mut v = net.visitor().await;
    let n: u64 = 64 << 20;
    let mut resp = v.get(&format!("/bytes/{n}")).await;
    assert_eq!(resp.status(), 200);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut got = 0u64;
    // Part of it over TCP, then the path mends and the probe comes due.
    while got < (1 << 20) {
        let chunk = resp.chunk().await.unwrap().unwrap();
        got += chunk.len() as u64;
        ctx.update(&chunk);
    }
    net.relay.set_both(Impair::default());
    // Not before its time: a minute short of the probe, nothing moves.
    net.agent
        .clock
        .advance(FIRST_PROBE - Duration::from_secs(60));
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(net.agent.status.get().transport.as_deref(), Some("tcp"));
    net.agent.clock.advance(Duration::from_secs(61));
    let s = net
        .agent
        .wait(Duration::from_secs(10), |s| {
            s.transport.as_deref() == Some("quic")
        })
        .await;
    assert_eq!(s.since, since, "a switch, not a reconnect");
    assert_eq!(s.state, State::Connected);
    assert_eq!(s.transport_note, None);
    // The download in flight on TCP completes, byte-exact.
    while let Some(chunk) = resp.chunk().await.unwrap() {
        got += chunk.len() as u64;
        ctx.update(&chunk);
    }
    assert_eq!(got, n);
    assert_eq!(hex::encode(ctx.finish().as_ref()), pattern_sha256(n));
    // New requests go to QUIC.
    assert_eq!(v.get("/").await.status(), 200);
    let port = net.agent.metrics_port().await;
    assert_eq!(
        metric(port, "pbxra_transport_switches_total").await,
        Some(1.0)
    );
    assert_eq!(
        metric(port, "pbxra_transport{kind=\"quic\"}").await,
        Some(1.0)
    );
    assert_eq!(metric(port, "pbxra_reconnects_total").await, Some(0.0));
    let device = net.server.db().device(&net.device).unwrap().unwrap();
    assert_eq!(device.nodes[0].transport.as_deref(), Some("quic"));
    assert!(device.online);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_probe_keeps_tcp_and_waits_twice_as_long() {
    let started = std::time::SystemTime::now();
    let net = Net::start(Impair::loss(100.0), "").await;
    let s = net.agent.connected().await;
    assert_eq!(s.transport.as_deref(), Some("tcp"));
    let first = s.transport_note.unwrap();
    net.agent
        .clock
        .advance(FIRST_PROBE + Duration::from_secs(1));
    // The probe runs (its datagrams are dropped), fails, and the next is announced later.
    let s = net
        .agent
        .wait(Duration::from_secs(15), |s| {
            s.transport_note.as_deref().is_some_and(|n| n != first)
        })
        .await;
    assert_eq!(s.transport.as_deref(), Some("tcp"));
    assert_eq!(s.state, State::Connected);
    let at = |note: &str| {
        let t = note.rsplit("tried again at ").next().unwrap();
        humantime::parse_rfc3339(t).unwrap()
    };
    // The note gives wall-clock times (the test's clock moves only the agent's timers): the
    // first probe was 5 min out, the next is 10 min from when the first gave up.
    let first_wait = at(&first).duration_since(started).unwrap();
    let next_wait = at(&s.transport_note.unwrap())
        .duration_since(std::time::SystemTime::now())
        .unwrap();
    assert!(
        first_wait > Duration::from_secs(4 * 60)
            && first_wait <= FIRST_PROBE + Duration::from_secs(30),
        "{first_wait:?}"
    );
    assert!(
        next_wait > Duration::from_secs(9 * 60)
            && next_wait <= FIRST_PROBE * 2 + Duration::from_secs(30),
        "{next_wait:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn transport_quic_never_dials_tcp() {
    // UDP blocked and QUIC forced: the agent keeps trying QUIC and says why; the only TCP
    // connection that carried bytes is the activation's.
    let net = Net::start_edited(Impair::loss(100.0), "", transport("quic")).await;
    let s = net
        .agent
        .wait(Duration::from_secs(20), |s| {
            s.message
                .as_deref()
                .is_some_and(|m| m.contains("looks blocked"))
        })
        .await;
    assert_eq!(s.state, State::Reconnecting);
    net.agent.move_past_backoff().await;
    net.agent
        .wait(Duration::from_secs(20), |s| s.state == State::Reconnecting)
        .await;
    assert_eq!(net.relay.stats.tcp_with_data.load(Relaxed), 1);
    assert_eq!(net.agent.status.get().transport, None);
}

#[tokio::test(flavor = "multi_thread")]
async fn through_a_connect_proxy_with_basic_auth_the_tunnel_runs_over_tcp() {
    let proxy = ConnectProxy::start(Some("pbx:pr0xy-s3cret")).await;
    let url = proxy.url(Some("pbx:pr0xy-s3cret"));
    // UDP blocked: only the proxy's way gets through (direct QUIC is tried beside it).
    let net = Net::start_edited(Impair::loss(100.0), "", with_proxy(url, |t| t)).await;
    let s = net
        .agent
        .wait(Duration::from_secs(20), |s| s.state == State::Connected)
        .await;
    assert_eq!(s.transport.as_deref(), Some("tcp"));
    let note = s.transport_note.unwrap();
    assert!(
        note.contains(&format!("via proxy {}", proxy.addr)) && !note.contains("s3cret"),
        "{note}"
    );
    assert!(
        net.relay.stats.dropped.load(Relaxed) > 0,
        "direct QUIC was tried"
    );
    // Activation and the tunnel both went through it.
    assert_eq!(proxy.tunnelled(), 2);
    let mut v = net.visitor().await;
    assert_eq!(v.get("/").await.status(), 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_proxy_password_for_the_tunnel_reads_proxy_error() {
    // Activated directly, then the tunnel's only way is a proxy that refuses the password.
    let proxy = ConnectProxy::start(Some("pbx:pr0xy-s3cret")).await;
    let net = Net::start(Impair::loss(100.0), "").await;
    net.agent.connected().await;
    let toml = std::fs::read_to_string(net.agent.dir.join("agent.toml")).unwrap();
    let edit = with_proxy(proxy.url(Some("pbx:wr0ng-guess")), transport("tcp"));
    std::fs::write(net.agent.dir.join("agent.toml"), edit(toml)).unwrap();
    net.agent.reload_and_wait().await;
    let s = net
        .agent
        .wait(Duration::from_secs(20), |s| {
            s.reason == Some(Reason::ProxyError)
        })
        .await;
    let m = s.message.unwrap();
    assert!(
        m.contains(&proxy.addr.to_string()) && m.contains("407") && !m.contains("wr0ng"),
        "{m}"
    );
    assert_eq!(proxy.tunnelled(), 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn no_proxy_sends_the_tcp_tunnel_direct() {
    let proxy = ConnectProxy::start(None).await;
    let server = TestServer::start().await;
    let portal = PortalFixture::start().await;
    for (no_proxy, through) in [(None, 2), (Some("localhost,127.0.0.0/8"), 0)] {
        let (_, code) = server.add_device(false);
        let tmp = tempfile::tempdir().unwrap();
        let before = proxy.tunnelled();
        let toml = transport("tcp")(
            server
                .agent_toml(tmp.path())
                .code(&code)
                .portal(&portal.url())
                .build(),
        );
        let url = proxy.url(None);
        let agent = AgentProcess::spawn(tmp.path(), &toml, |c| {
            c.env("HTTPS_PROXY", &url)
                .env_remove("NO_PROXY")
                .env_remove("no_proxy");
            if let Some(n) = no_proxy {
                c.env("NO_PROXY", n);
            }
        });
        let s = agent.connected().await;
        assert_eq!(s.transport.as_deref(), Some("tcp"));
        assert_eq!(
            proxy.tunnelled() - before,
            through,
            "activation and tunnel; NO_PROXY={no_proxy:?}"
        );
    }
}
