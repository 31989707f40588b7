//! Streaming with backpressure: the agent (a separate process, so its memory is its own) moves
//! 1 GiB down and 256 MiB up byte-exact while its peak RSS stays under 32 MiB.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;
use support::*;

const AGENT: &str = env!("CARGO_BIN_EXE_pbx-remote-agent");
const RSS_LIMIT_KIB: u64 = 32 * 1024;

#[tokio::test(flavor = "multi_thread")]
async fn gigabyte_download_and_large_upload_in_bounded_memory() {
    let server = TestServer::start().await;
    let portal = PortalFixture::start().await;
    let (device, code) = server.add_device(false);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("agent.toml");
    std::fs::write(
        &cfg,
        agent_toml(
            server.tunnel,
            &server.pin,
            &code,
            &portal.url(),
            tmp.path(),
            "",
        ),
    )
    .unwrap();
    let mut child = Command::new(AGENT)
        .args(["run", "-c"])
        .arg(&cfg)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id();
    let status_file = tmp.path().join("status.json");
    let mut connected = false;
    for _ in 0..400 {
        if pbx_remote::status::read(&status_file)
            .map(|s| s.state.as_str() == "connected")
            .unwrap_or(false)
        {
            connected = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(connected, "agent process did not connect");

    let url = server.visit(&device, "alice", false);
    let mut v = Visitor::new(server.public, &device);
    v.open_visit(&url).await;
    assert_eq!(v.login(USER, PASSWORD).await.status(), 303);

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
    let after_download = proc_mem_kib(pid, "VmHWM:");

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
    let peak = proc_mem_kib(pid, "VmHWM:");
    eprintln!("agent peak RSS: {after_download} KiB after 1 GiB down, {peak} KiB after 256 MiB up");
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(pid.to_string())
        .status();
    let _ = child.wait();
    assert!(
        peak < RSS_LIMIT_KIB,
        "agent peak RSS {peak} KiB ≥ {RSS_LIMIT_KIB} KiB"
    );
}
