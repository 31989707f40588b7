//! Appliance operations: reload (SIGHUP) and graceful shutdown.

use crate::support::*;
use pbx_remote::server::health::Health;
use pbx_remote::status::State;
use std::time::{Duration, Instant};

fn rewrite(agent: &TestAgent, f: impl FnOnce(String) -> String) {
    let path = agent.dir.join("agent.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let new = f(text.clone());
    assert_ne!(new, text, "the edit changed nothing");
    std::fs::write(&path, new).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn access_rule_changes_apply_live_without_dropping_the_tunnel() {
    let w = World::start(true, "").await;
    let since = w.agent.status.get().since;
    let mut admin = w.visitor("alice", false).await;
    let mut super_admin = w.visitor("bob", true).await;

    rewrite(&w.agent, |t| {
        t.replace("auto_logout_minutes = 15", "auto_logout_minutes = 30")
    });
    let s = w.agent.reload_and_wait().await;
    assert_eq!(s.config_error, None);
    assert_eq!(
        admin.get("/").await.status(),
        200,
        "unrelated rule change keeps sessions"
    );
    assert_eq!(w.agent.status.get().since, since, "same QUIC connection");

    let new_hash = pbx_remote::password::hash("Changed-Passw0rd-2").unwrap();
    rewrite(&w.agent, |t| t.replace(password_hash(), &new_hash));
    let t0 = Instant::now();
    w.agent.reload.send(()).unwrap();
    w.agent
        .wait(Duration::from_secs(5), |s| s.active_sessions.len() == 1)
        .await;
    assert!(t0.elapsed() < Duration::from_secs(5));
    assert_eq!(
        admin.get("/").await.status(),
        303,
        "password change ends account sessions"
    );
    assert_eq!(
        super_admin.get("/").await.status(),
        200,
        "passwordless sessions stay"
    );
    assert_eq!(
        admin.login(USER, "Changed-Passw0rd-2").await.status(),
        303,
        "the new password works"
    );

    rewrite(&w.agent, |t| {
        t.replace(
            "[remote_access.passwordless]\nenabled = true",
            "[remote_access.passwordless]\nenabled = false",
        )
    });
    w.agent.reload.send(()).unwrap();
    w.agent
        .wait(Duration::from_secs(5), |s| {
            s.active_sessions.iter().all(|x| x.role != "super_admin")
        })
        .await;
    assert_eq!(super_admin.get("/").await.status(), 303);
    assert_eq!(admin.get("/").await.status(), 200);

    rewrite(&w.agent, |t| {
        t.replace(
            "[remote_access.account]\nenabled = true",
            "[remote_access.account]\nenabled = false",
        )
    });
    w.agent.reload.send(()).unwrap();
    w.agent
        .wait(Duration::from_secs(5), |s| s.active_sessions.is_empty())
        .await;
    assert_eq!(
        w.agent.status.get().since,
        since,
        "still the same connection after all of it"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_reload_is_refused_and_the_old_config_stays() {
    let w = World::start(false, "").await;
    let since = w.agent.status.get().since;
    let mut v = w.visitor("alice", false).await;
    let good = std::fs::read_to_string(w.agent.dir.join("agent.toml")).unwrap();
    rewrite(&w.agent, |t| {
        t.replace("auto_logout_minutes = 15", "auto_logout_minutes = 500")
    });
    w.agent.reload.send(()).unwrap();
    let s = w
        .agent
        .wait(Duration::from_secs(5), |s| s.config_error.is_some())
        .await;
    let err = s.config_error.unwrap();
    assert!(
        err.contains("agent.toml") && err.contains("remote_access.auto_logout_minutes"),
        "{err}"
    );
    assert_eq!(s.state, State::Connected);
    assert_eq!(s.since, since);
    assert_eq!(v.get("/").await.status(), 200, "old rules still in force");
    // The file follows the in-memory status a moment later.
    eventually(
        Duration::from_secs(5),
        "config_error in status.json",
        || {
            let text = std::fs::read_to_string(w.agent.dir.join("status.json")).ok()?;
            let raw: serde_json::Value = serde_json::from_str(&text).ok()?;
            raw["config_error"].is_string().then_some(())
        },
    )
    .await;

    std::fs::write(w.agent.dir.join("agent.toml"), good).unwrap();
    w.agent.reload.send(()).unwrap();
    w.agent
        .wait(Duration::from_secs(5), |s| s.config_error.is_none())
        .await;
}

#[tokio::test(flavor = "multi_thread")]
async fn unrelated_changes_take_effect_on_the_same_connection() {
    let w = World::start(false, "").await;
    let since = w.agent.status.get().since;
    let mut v = w.visitor("alice", false).await;
    assert_eq!(v.get("/").await.status(), 200);
    let before = w.portal.hits();
    assert!(before > 0);

    // The portal moves, the heartbeat and drain change: no new connection, sessions stay, and
    // the next requests reach the new portal.
    let moved = PortalFixture::start().await;
    rewrite(&w.agent, |t| {
        t.replace(&w.portal.url(), &moved.url())
            .replace("heartbeat_secs = 1", "heartbeat_secs = 2")
            .replace("drain_secs = 2", "drain_secs = 3")
    });
    w.agent.reload.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while moved.hits() == 0 {
        assert!(
            Instant::now() < deadline,
            "requests never reached the new portal"
        );
        assert_eq!(v.get("/").await.status(), 200, "the session survives");
    }
    let old_hits = w.portal.hits();
    assert_eq!(v.get("/").await.status(), 200);
    assert_eq!(
        w.portal.hits(),
        old_hits,
        "the old portal gets nothing more"
    );
    let s = w.agent.status.get();
    assert_eq!(s.since, since, "same QUIC connection");
    assert_eq!(s.config_error, None);

    // A portal the agent cannot build (its CA file is missing) refuses the whole reload.
    rewrite(&w.agent, |t| {
        t.replace(
            &format!("portal_url = \"{}\"", moved.url()),
            "portal_url = \"https://127.0.0.1:9/\"\nportal_ca_file = \"/no/such/portal-ca.pem\"",
        )
        .replace("drain_secs = 3", "drain_secs = 4")
    });
    w.agent.reload.send(()).unwrap();
    let s = w
        .agent
        .wait(Duration::from_secs(5), |s| s.config_error.is_some())
        .await;
    let error = s.config_error.clone().unwrap();
    assert!(error.contains("portal-ca.pem"), "{error}");
    assert_eq!(s.since, since);
    let served = moved.hits();
    assert_eq!(v.get("/").await.status(), 200, "the previous portal stays");
    assert_eq!(moved.hits(), served + 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn activation_changes_reactivate_and_other_changes_keep_the_credential() {
    let w = World::start(false, "").await;
    let first = w.agent.status.get();
    // The firmware is a fact the server checks at each connection: a new connection, the same
    // credential.
    rewrite(&w.agent, |t| t.replace("83.19.0.110", "83.19.0.120"));
    w.agent.reload.send(()).unwrap();
    let s = w
        .agent
        .wait(Duration::from_secs(10), |s| {
            s.state == State::Connected && s.since != first.since
        })
        .await;
    assert_eq!(
        s.device_id, first.device_id,
        "same credential, no re-activation"
    );
    assert_eq!(
        w.server
            .db()
            .device(&w.device)
            .unwrap()
            .unwrap()
            .nodes
            .len(),
        1
    );

    let (other, code) = w.server.add_device(false);
    let old_code = std::fs::read_to_string(w.agent.dir.join("agent.toml"))
        .unwrap()
        .split("auth_code = \"")
        .nth(1)
        .unwrap()
        .split('"')
        .next()
        .unwrap()
        .to_string();
    rewrite(&w.agent, |t| t.replace(&old_code, &code));
    w.agent.reload.send(()).unwrap();
    let s = w
        .agent
        .wait(Duration::from_secs(10), |s| {
            s.state == State::Connected && s.device_id.as_deref() == Some(other.as_str())
        })
        .await;
    assert_ne!(s.device_id, first.device_id, "a new code activates again");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_agent_recovers_when_the_config_is_fixed() {
    let server = TestServer::start().await;
    let (_, code) = server.add_device(false);
    let tmp = tempfile::tempdir().unwrap();
    let bad = server
        .agent_toml(tmp.path())
        .code("ZZZZ-ZZZZ-ZZZZ-ZZZZ")
        .build();
    let agent = TestAgent::start(tmp.path(), &bad);
    agent
        .wait(Duration::from_secs(10), |s| s.state == State::Failed)
        .await;
    rewrite(&agent, |t| t.replace("ZZZZ-ZZZZ-ZZZZ-ZZZZ", &code));
    agent.reload.send(()).unwrap();
    agent.connected().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_drains_in_flight_requests_then_stops() {
    shutdown_drains_in_flight_requests(World::start(false, "").await).await;
}

/// A stop lets the request in flight finish, ends within the drain, and the server sees the
/// node offline at once (`transport::` runs it over TCP).
pub async fn shutdown_drains_in_flight_requests(w: World) {
    let v = w.visitor("alice", false).await;
    let in_flight = v.request(reqwest::Method::GET, "/delay/1200");
    let req = tokio::spawn(async move { in_flight.send().await.unwrap().text().await });
    // Let the request reach the portal before stopping.
    for _ in 0..100 {
        if w.portal.hits() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t0 = Instant::now();
    w.agent.stop.cancel();
    assert_eq!(
        req.await.unwrap().unwrap(),
        "delayed",
        "the in-flight request finished"
    );
    tokio::time::timeout(Duration::from_secs(10), w.agent.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        t0.elapsed() < Duration::from_secs(4),
        "drain_secs = 2 bounds the stop"
    );
    let s = pbx_remote::status::read(&w.agent.dir.join("status.json")).unwrap();
    assert_eq!(s.state, State::Stopped);
    // Closed on purpose: the server sees the node offline at once, not after an idle timeout.
    let mut offline = false;
    for _ in 0..50 {
        if !w.server.db().device(&w.device).unwrap().unwrap().online {
            offline = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(offline);
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_kept_between_requests_do_not_hold_the_drain() {
    // A long drain allowance: only the idle kept stream could make the stop wait for it.
    let w = World::start_with_toml(false, |t| t.replace("drain_secs = 2", "drain_secs = 60")).await;
    let mut v = w.visitor("alice", false).await;
    let r = v.get("/").await;
    assert_eq!(r.status(), 200);
    r.bytes().await.unwrap();
    // The visitor connection (and its tunnel stream) stays open and idle.
    let t0 = Instant::now();
    w.agent.shutdown().await;
    // An idle stream would otherwise hold the drain until its 10 s head-read timeout.
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "stopped after {:?}",
        t0.elapsed()
    );
    drop(v);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_drain_deadline_bounds_a_stuck_request() {
    let w = World::start(false, "").await;
    let v = w.visitor("alice", false).await;
    let stuck = v.request(reqwest::Method::GET, "/slow");
    let req = tokio::spawn(async move { stuck.send().await.map(|r| r.status().as_u16()) });
    for _ in 0..100 {
        if w.portal.hits() > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let t0 = Instant::now();
    w.agent.stop.cancel();
    tokio::time::timeout(Duration::from_secs(10), w.agent.task)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(5),
        "{took:?}"
    );
    let answer = tokio::time::timeout(Duration::from_secs(10), req)
        .await
        .unwrap()
        .unwrap();
    assert!(
        answer.map(|s| s >= 500).unwrap_or(true),
        "a clear error, not a hang"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn heartbeats_carry_telemetry_and_the_server_flags_health() {
    let w = World::start(false, "").await;
    let db = w.server.db();
    let device = w.device.clone();
    let node =
        |db: &pbx_remote::server::db::Db| db.device(&device).unwrap().unwrap().nodes[0].clone();

    let n = eventually(Duration::from_secs(10), "a telemetry sample", || {
        Some(node(&db)).filter(|n| n.telemetry.is_some())
    })
    .await;
    let t = n.telemetry.clone().unwrap();
    // The stored health is the policy's verdict on the sample (this machine's real load can
    // make it abnormal while other tests run; the thresholds have their own test).
    assert_eq!(
        (n.health, n.abnormal.clone()),
        pbx_remote::server::health::health(true, Some(&t))
    );
    assert!(t.memory_total_bytes > 0 && t.memory_used_bytes <= t.memory_total_bytes);
    assert!(t.disk_total_bytes > 0 && t.disk_used_bytes <= t.disk_total_bytes);
    assert!(t.uptime_secs > 0);
    assert!((0.0..=100.0).contains(&t.cpu_percent));
    assert_eq!(t.agent_version, env!("CARGO_PKG_VERSION"));
    assert!(!t.firmware.is_empty());
    assert!(t.portal_reachable && t.portal_latency_ms.is_some(), "{t:?}");

    let json =
        pbx_remote::server::admin::device_show(&w.server.data_dir(), &w.device, true).unwrap();
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let shown: pbx_remote::protocol::Telemetry =
        serde_json::from_value(v["nodes"][0]["telemetry"].clone()).unwrap();
    assert_eq!(
        v["nodes"][0]["health"],
        pbx_remote::server::health::health(true, Some(&shown))
            .0
            .as_str(),
        "{json}"
    );
    assert!(
        v["nodes"][0]["telemetry"]["cpu_percent"].is_number(),
        "{json}"
    );
    assert!(v["nodes"][0]["telemetry"]["load"].is_array(), "{json}");

    // The portal going away shows within a heartbeat or two, and the tunnel stays up.
    w.portal.stop();
    let n = eventually(Duration::from_secs(10), "portal down flagged", || {
        Some(node(&db)).filter(|n| {
            n.abnormal
                .iter()
                .any(|a| a.contains("web portal unreachable"))
        })
    })
    .await;
    assert_eq!(n.health, Health::Abnormal, "{:?}", n.abnormal);
    assert_eq!(w.agent.status.get().state, State::Connected);

    // Offline: health unknown, the last sample kept for the record.
    let World {
        agent,
        server,
        device,
        ..
    } = w;
    agent.shutdown().await;
    let db = server.db();
    let n = eventually(Duration::from_secs(10), "offline node", || {
        let n = db.device(&device).unwrap().unwrap().nodes[0].clone();
        Some(n).filter(|n| !n.online)
    })
    .await;
    assert_eq!(n.health, Health::Unknown);
    assert!(n.telemetry.is_some());
}

#[test]
fn health_thresholds_follow_the_design() {
    use pbx_remote::protocol::Telemetry;
    use pbx_remote::server::health::health;
    let ok = Telemetry {
        cpu_percent: 85.0,
        memory_used_bytes: 85,
        memory_total_bytes: 100,
        disk_used_bytes: 95,
        disk_total_bytes: 100,
        portal_reachable: true,
        ..Telemetry::default()
    };
    assert_eq!(health(true, Some(&ok)), (Health::Normal, vec![]));
    assert_eq!(health(false, Some(&ok)).0, Health::Unknown);
    assert_eq!(health(true, None).0, Health::Unknown);
    for (t, what) in [
        (
            Telemetry {
                cpu_percent: 85.5,
                ..ok.clone()
            },
            "cpu",
        ),
        (
            Telemetry {
                memory_used_bytes: 86,
                ..ok.clone()
            },
            "memory",
        ),
        (
            Telemetry {
                disk_used_bytes: 96,
                ..ok.clone()
            },
            "disk",
        ),
        (
            Telemetry {
                portal_reachable: false,
                ..ok.clone()
            },
            "portal",
        ),
    ] {
        let (state, why) = health(true, Some(&t));
        assert_eq!(state, Health::Abnormal);
        assert!(why.len() == 1 && why[0].contains(what), "{why:?}");
    }
}

async fn scrape(port: u16, path: &str) -> Result<(u16, String), reqwest::Error> {
    pbx_remote::tls::install_default_provider();
    let r = reqwest::Client::builder()
        .no_proxy()
        .build()
        .unwrap()
        .get(format!("http://127.0.0.1:{port}{path}"))
        .send()
        .await?;
    let code = r.status().as_u16();
    Ok((code, r.text().await?))
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_and_ready_are_served_locally_and_never_through_the_tunnel() {
    let (w, port) = World::with_metrics().await;

    let (code, body) = scrape(port, "/ready").await.unwrap();
    assert_eq!((code, body.trim()), (200, "connected"));
    let (code, m) = scrape(port, "/metrics").await.unwrap();
    assert_eq!(code, 200);
    assert_eq!(
        sample(&m, "pbxra_state{state=\"connected\"}"),
        Some(1.0),
        "{m}"
    );
    assert_eq!(sample(&m, "pbxra_state{state=\"reconnecting\"}"), Some(0.0));
    assert_eq!(sample(&m, "pbxra_connections_total"), Some(1.0));
    assert_eq!(sample(&m, "pbxra_reconnects_total"), Some(0.0));
    assert!(sample(&m, "pbxra_rtt_seconds").is_some(), "{m}");
    assert!(sample(&m, "pbxra_tunnel_bytes_total{direction=\"sent\"}").unwrap() > 0.0);
    assert_eq!(sample(&m, "pbxra_login_failures_total"), Some(0.0));
    assert_eq!(scrape(port, "/other").await.unwrap().0, 404);

    let mut v = w.granted("alice", false).await;
    assert_eq!(v.login(USER, "wrong-password-1").await.status(), 401);
    let mut v = w.visitor("bob", false).await;
    assert_eq!(v.get("/").await.status(), 200);
    // Through the tunnel, /metrics and /ready are the portal's paths, not ours.
    let r = v.get("/metrics").await;
    assert!(!r.text().await.unwrap().contains("pbxra_"));
    let r = v.get("/ready").await;
    assert!(!r.text().await.unwrap().contains("connected"));

    let (_, m) = scrape(port, "/metrics").await.unwrap();
    assert_eq!(sample(&m, "pbxra_login_failures_total"), Some(1.0), "{m}");
    assert_eq!(
        sample(&m, "pbxra_active_sessions{role=\"administrator\"}"),
        Some(1.0)
    );
    assert!(
        sample(&m, "pbxra_requests_total{code=\"200\"}").unwrap() >= 1.0,
        "{m}"
    );

    // A reload that needs a new connection (a device fact changed): a reconnect, counters kept.
    rewrite(&w.agent, |t| t.replace("83.19.0.110", "83.19.0.120"));
    w.agent.reload.send(()).unwrap();
    let m = eventually_async(port, |m| sample(m, "pbxra_connections_total") == Some(2.0)).await;
    assert_eq!(sample(&m, "pbxra_reconnects_total"), Some(1.0));
    assert_eq!(sample(&m, "pbxra_login_failures_total"), Some(1.0));

    // Not connected → 503 with the state.
    let World { agent, server, .. } = w;
    server.shutdown().await;
    agent
        .wait(Duration::from_secs(30), |s| s.state != State::Connected)
        .await;
    let (code, body) = scrape(port, "/ready").await.unwrap();
    assert_eq!(code, 503, "{body}");

    // Turning metrics off on reload closes the listener.
    rewrite(&agent, |t| t.replace(METRICS_ON_ANY_PORT, ""));
    agent.reload.send(()).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while scrape(port, "/ready").await.is_ok() {
        assert!(
            Instant::now() < deadline,
            "metrics still served after being turned off"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    agent.shutdown().await;
}

async fn eventually_async(port: u16, f: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (_, m) = scrape(port, "/metrics").await.unwrap();
        if f(&m) {
            return m;
        }
        assert!(Instant::now() < deadline, "metrics never matched:\n{m}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The agent process's sockets from `/proc`: ports it listens on over TCP, and its UDP sockets.
fn sockets_of(pid: u32) -> (Vec<u16>, usize) {
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy().to_string();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    let rows = |table: &str| -> Vec<Vec<String>> {
        std::fs::read_to_string(format!("/proc/{pid}/net/{table}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .filter(|f: &Vec<String>| f.len() > 9 && inodes.contains(&f[9]))
            .collect()
    };
    let mut listening = vec![];
    for table in ["tcp", "tcp6"] {
        for f in rows(table) {
            // State 0A is LISTEN; the local address ends in :PORT (hex).
            if f[3] == "0A" {
                let port = f[1].rsplit(':').next().unwrap();
                listening.push(u16::from_str_radix(port, 16).unwrap());
            }
        }
    }
    let udp = rows("udp").len() + rows("udp6").len();
    (listening, udp)
}

/// C9: the agent listens on nothing (its tunnel is outbound): no TCP listener without
/// `[metrics]`, only its metrics port with it, and one UDP socket, the QUIC endpoint's.
#[tokio::test(flavor = "multi_thread")]
async fn the_agent_listens_on_nothing_but_the_metrics_port_it_is_given() {
    let server = TestServer::start().await;
    let portal = PortalFixture::start().await;
    let tmp = tempfile::tempdir().unwrap();
    for metrics in [false, true] {
        let (_, code) = server.add_device(false);
        let dir = tmp.path().join(format!("agent-{metrics}"));
        let mut toml = server.agent_toml(&dir).code(&code).portal(&portal.url());
        if metrics {
            toml = toml.extra(METRICS_ON_ANY_PORT);
        }
        let agent = AgentProcess::spawn(&dir, &toml.build(), |_| {});
        let s = agent.connected().await;
        let (listening, udp) = sockets_of(agent.pid());
        match s.metrics_listen {
            Some(m) if metrics => {
                let port: std::net::SocketAddr = m.parse().unwrap();
                assert_eq!(listening, [port.port()], "only the metrics port");
            }
            _ => assert!(listening.is_empty(), "listening on {listening:?}"),
        }
        assert_eq!(udp, 1, "one UDP socket: the QUIC endpoint");
    }
}
