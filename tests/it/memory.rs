//! Streaming with backpressure: the agent (a separate process, so its memory is its own) moves
//! 1 GiB down, 256 MiB up and a 100 MiB WebSocket frame each way byte-exact while its RSS grows
//! by less than 12 MiB over each.

use crate::support::*;
use std::process::Command;
use std::time::Duration;

/// Whole-process peak, login included: a password check holds argon2id's 19 MiB while it runs
/// (this test binary's agent is a debug build, ~13 MiB before that).
const RSS_LIMIT_KIB: u64 = 40 * 1024;
/// Growth over a stream: the tunnel's send window (4 MiB) and buffers, not the body.
const STREAMING_LIMIT_KIB: u64 = 12 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn gigabyte_download_large_upload_and_100_mib_websocket_frame_in_bounded_memory() {
    let server = TestServer::start().await;
    let portal = PortalFixture::start().await;
    let (device, code) = server.add_device(false);
    let tmp = tempfile::tempdir().unwrap();
    let mut agent = AgentProcess::spawn(
        tmp.path(),
        &server
            .agent_toml(tmp.path())
            .code(&code)
            .portal(&portal.url())
            .build(),
        // As the shipped unit runs it (one malloc arena).
        |c| {
            c.env("MALLOC_ARENA_MAX", "1");
        },
    );
    let pid = agent.pid();
    agent.connected().await;

    let url = server.visit(&device, "alice", false);
    let mut v = Visitor::new(server.public, &device);
    v.open_visit(&url).await;
    assert_eq!(v.login(USER, PASSWORD).await.status(), 303);

    // The login's password check (argon2id, 19 MiB) sets the high-water mark by itself; each
    // phase below is measured from a reset mark, so streaming cannot hide under it.
    let after_login = proc_mem_kib(pid, "VmHWM:");
    let idle = reset_peak(pid);

    let n: u64 = 1 << 30;
    let mut resp = v.get(&format!("/bytes/{n}")).await;
    assert_eq!(resp.status(), 200);
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut got = 0u64;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        got += chunk.len() as u64;
        ctx.update(&chunk);
    }
    assert_eq!(got, n);
    assert_eq!(hex::encode(ctx.finish().as_ref()), pattern_sha256(n));
    let download = proc_mem_kib(pid, "VmHWM:");
    reset_peak(pid);

    let up: u64 = 256 << 20;
    let stream = futures_util::stream::iter(
        (0..up)
            .step_by(1 << 20)
            .map(|off| Ok::<_, std::io::Error>(bytes::Bytes::from(pattern_bytes(off, 1 << 20)))),
    );
    let resp = v
        .request(reqwest::Method::POST, "/upload")
        .header("content-length", up.to_string())
        .body(reqwest::Body::wrap_stream(stream))
        .send()
        .await
        .unwrap();
    let j: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(j["len"], up);
    assert_eq!(j["sha256"], pattern_sha256(up));
    let upload = proc_mem_kib(pid, "VmHWM:");
    reset_peak(pid);

    // One 100 MiB binary frame to the portal's echo and back (catalogue C6): the agent relays
    // it as a byte stream, never as a whole frame.
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let frame = pattern_bytes(0, 100 << 20);
    let (mut ws, _) = v.websocket(&v.origin).await.unwrap();
    ws.send(Message::binary(frame.clone())).await.unwrap();
    let echo = tokio::time::timeout(Duration::from_secs(120), ws.next())
        .await
        .expect("echo within 120 s")
        .unwrap()
        .unwrap();
    assert!(echo.is_binary());
    assert!(echo.into_data() == frame, "100 MiB frame echoed byte-exact");
    let _ = ws.close(None).await;
    let websocket = proc_mem_kib(pid, "VmHWM:");
    eprintln!(
        "agent RSS: {idle} KiB after the login (which peaked at {after_login} KiB); peak \
         {download} KiB over 1 GiB down, {upload} KiB over 256 MiB up, {websocket} KiB over a \
         100 MiB WebSocket frame each way"
    );
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let _ = agent.child.0.wait();
    for (what, peak) in [
        ("1 GiB down", download),
        ("256 MiB up", upload),
        ("a 100 MiB WebSocket frame", websocket),
    ] {
        assert!(
            peak < idle + STREAMING_LIMIT_KIB,
            "agent RSS peaked at {peak} KiB over {what}, {} KiB above the {idle} KiB it started at",
            peak - idle
        );
    }
    assert!(
        after_login < RSS_LIMIT_KIB,
        "agent peak RSS {after_login} KiB"
    );
}

/// Resets a process's peak RSS (`VmHWM`) to its current RSS (`clear_refs` 5) and returns that.
fn reset_peak(pid: u32) -> u64 {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").unwrap();
    proc_mem_kib(pid, "VmHWM:")
}
