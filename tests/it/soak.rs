//! Soak (not CI; `tests/soak.sh` runs it): visits, WebSockets and downloads for SOAK_MINUTES
//! (default 30) through the impairment relay at 1 % loss, with a server restart every 5 minutes
//! and a source-port rebinding every 2. The agent is the release binary in its own process, so
//! its RSS and fd count are its own. Reports RSS drift, fds, reconnects, successes and every
//! error; fails if a visit fails outside the seconds right after a restart.

use crate::support::relay::{Impair, Relay};
use crate::support::*;
use futures_util::{SinkExt, StreamExt};
use std::time::{Duration, Instant};

/// One round of use: log in with a fresh visit, a page, a 1 MiB download, a WebSocket echo.
async fn round(server: &TestServer, device: &str, n: u32) -> Result<(), String> {
    let url = server.visit(device, &format!("soak{n}"), false);
    let mut v = Visitor::new(server.public, device);
    let r = v.open_visit(&url).await;
    if !r.status().is_redirection() {
        return Err(format!("visit link: {}", r.status()));
    }
    let r = v.login(USER, PASSWORD).await;
    if r.status() != 303 {
        return Err(format!("login: {}", r.status()));
    }
    let r = v.get("/").await;
    if r.status() != 200 {
        return Err(format!("page: {}", r.status()));
    }
    let len: u64 = 1 << 20;
    let mut r = v.get(&format!("/bytes/{len}")).await;
    if r.status() != 200 {
        return Err(format!("download: {}", r.status()));
    }
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut got = 0u64;
    loop {
        match r.chunk().await {
            Ok(Some(c)) => {
                got += c.len() as u64;
                ctx.update(&c);
            }
            Ok(None) => break,
            Err(e) => return Err(format!("download broke at {got}: {e}")),
        }
    }
    if got != len || hex::encode(ctx.finish().as_ref()) != pattern_sha256(len) {
        return Err(format!("download not byte-exact ({got} bytes)"));
    }
    let (mut ws, _) = v
        .websocket(&v.origin)
        .await
        .map_err(|e| format!("websocket: {e}"))?;
    for i in 0..10 {
        let msg = format!("soak {n} {i}");
        ws.send(tokio_tungstenite::tungstenite::Message::text(msg.clone()))
            .await
            .map_err(|e| format!("ws send: {e}"))?;
        match ws.next().await {
            Some(Ok(m)) if m.to_text().ok() == Some(msg.as_str()) => {}
            other => return Err(format!("ws echo: {other:?}")),
        }
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
#[ignore = "soak: run by tests/soak.sh"]
async fn soak() {
    let minutes: u64 = std::env::var("SOAK_MINUTES")
        .ok()
        .and_then(|m| m.parse().ok())
        .unwrap_or(30);
    let total = Duration::from_secs(minutes * 60);
    let restart_every = Duration::from_secs(300).min(total / 3);
    let rebind_every = Duration::from_secs(120).min(total / 5);

    let mut server = TestServer::start().await;
    let portal = PortalFixture::start().await;
    let relay = Relay::start(server.tunnel).await;
    relay.set_both(Impair::loss(1.0));
    let (device, code) = server.add_device(false);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("agent");
    let agent = AgentProcess::spawn(
        &dir,
        &AgentToml::new(relay.addr, &server.pin, &dir)
            .code(&code)
            .portal(&portal.url())
            .extra(METRICS_ON_ANY_PORT)
            .build(),
        |_| {},
    );
    let pid = agent.pid();
    let metrics_port: u16 = agent
        .connected()
        .await
        .metrics_listen
        .and_then(|a| a.parse::<std::net::SocketAddr>().ok())
        .expect("metrics are served")
        .port();

    let start = Instant::now();
    let (mut next_restart, mut next_rebind) = (restart_every, rebind_every);
    let mut last_restart: Option<Instant> = None;
    // Restart → first successful visit afterwards.
    let (mut awaiting_recovery, mut recoveries): (Option<Instant>, Vec<Duration>) = (None, vec![]);
    let (mut ok, mut expected_failures, mut restarts, mut rebinds) = (0u32, 0u32, 0u32, 0u32);
    let mut errors: Vec<String> = vec![];
    let mut samples: Vec<(u64, u64, usize)> = vec![]; // (elapsed s, RSS KiB, fds)
    let mut next_sample = Duration::ZERO;
    let mut n = 0u32;
    while start.elapsed() < total {
        let t = start.elapsed();
        if t >= next_sample {
            samples.push((t.as_secs(), proc_mem_kib(pid, "VmRSS"), fd_count(pid)));
            next_sample += Duration::from_secs(60);
        }
        if t >= next_restart {
            server = server.restart().await;
            last_restart = Some(Instant::now());
            awaiting_recovery = last_restart;
            restarts += 1;
            next_restart += restart_every;
        }
        if t >= next_rebind {
            relay.rebind();
            rebinds += 1;
            next_rebind += rebind_every;
        }
        n += 1;
        let result = tokio::time::timeout(Duration::from_secs(60), round(&server, &device, n))
            .await
            .unwrap_or_else(|_| Err("round timed out after 60 s".into()));
        match result {
            Ok(()) => {
                ok += 1;
                if let Some(r) = awaiting_recovery.take() {
                    recoveries.push(r.elapsed());
                }
            }
            // Right after a restart the agent is still reconnecting: "offline" is the truth.
            Err(e) if last_restart.is_some_and(|r| r.elapsed() < Duration::from_secs(15)) => {
                expected_failures += 1;
                eprintln!("[{:>5}s] during restart: {e}", t.as_secs());
                // "Offline" comes back at once; a visitor would not retry in a tight loop.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => {
                eprintln!("[{:>5}s] ERROR: {e}", t.as_secs());
                errors.push(format!("{}s: {e}", t.as_secs()));
            }
        }
    }
    samples.push((
        start.elapsed().as_secs(),
        proc_mem_kib(pid, "VmRSS"),
        fd_count(pid),
    ));
    let reconnects = metric(metrics_port, "pbxra_reconnects_total").await;

    eprintln!("\n== soak: {minutes} min, 1% loss, restart every {restart_every:?}, rebind every {rebind_every:?}");
    eprintln!(
        "rounds: {ok} ok, {expected_failures} failed while the server restarted, {} errors",
        errors.len()
    );
    eprintln!("server restarts {restarts}, rebindings {rebinds}, agent reconnects (metrics) {reconnects:?}");
    eprintln!("restart → first good visit: {recoveries:?}");
    eprintln!("agent RSS KiB / fds by minute:");
    for (s, rss, fd) in &samples {
        eprintln!("  {s:>5}s  {rss:>7}  {fd:>4}");
    }
    let first = samples[1.min(samples.len() - 1)];
    let last = samples[samples.len() - 1];
    eprintln!(
        "RSS drift after the first minute: {} KiB; fds {} → {}",
        last.1 as i64 - first.1 as i64,
        first.2,
        last.2
    );
    for e in &errors {
        eprintln!("error: {e}");
    }
    assert!(errors.is_empty(), "{} errors", errors.len());
    assert!(last.2 <= first.2 + 8, "fd count grew");
    // The same agent process all along: alive, never restarted.
    assert!(
        std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "the agent process is gone"
    );
    assert!(
        std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
            .unwrap_or_default()
            .contains("pbx-remote-agent"),
        "pid {pid} is still the agent"
    );
    // Memory drift after warm-up (the first minute): under 10 %.
    let drift = last.1 as f64 / first.1.max(1) as f64 - 1.0;
    assert!(
        drift < 0.10,
        "RSS drifted {:.1} % ({} → {} KiB)",
        drift * 100.0,
        first.1,
        last.1
    );
    assert!(
        restarts > 0 && recoveries.len() as u32 >= restarts,
        "every restart recovered: {recoveries:?}"
    );
}
