//! The server as a real process: killed with SIGKILL and restarted, and `demo`; the agent as a
//! real process against a server that refuses it (what reaches its log).

use crate::support::*;
use pbx_remote::status::State;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVER: &str = env!("CARGO_BIN_EXE_pbx-remote-server");

struct ServerProcess {
    child: Child,
    tunnel: SocketAddr,
    public: SocketAddr,
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn_server(data: &std::path::Path, listen: &str, public: &str) -> ServerProcess {
    let mut child = Command::new(SERVER)
        .args([
            "run",
            "--listen",
            listen,
            "--public-listen",
            public,
            "--data-dir",
        ])
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    // "listening tunnel=ADDR public=ADDR public_url=URL"
    let field = |name: &str| -> SocketAddr {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(name))
            .unwrap_or_else(|| panic!("no {name} in {line:?}"))
            .parse()
            .unwrap()
    };
    ServerProcess {
        tunnel: field("tunnel="),
        public: field("public="),
        child,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn killed_server_comes_back_and_agents_reconnect_within_10s() {
    killed_server_comes_back(transport("quic")).await;
}

/// The same over the TCP transport: a killed server's TCP connections die with it (the kernel
/// answers the agent's next segment with a reset, or the keep-alive ping goes unanswered).
#[tokio::test(flavor = "multi_thread")]
async fn killed_server_comes_back_and_tcp_agents_reconnect_within_10s() {
    killed_server_comes_back(transport("tcp")).await;
}

async fn killed_server_comes_back(edit: impl FnOnce(String) -> String) {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = spawn_server(&data, "127.0.0.1:0", "127.0.0.1:0");
    let (tunnel, public) = (server.tunnel, server.public);
    let db = pbx_remote::server::db::Db::open(&data).unwrap();
    let pbx_remote::server::db::AddedDevice { id: device, code } = db
        .add_device(&pbx_remote::server::db::NewDevice {
            name: "P".into(),
            ..Default::default()
        })
        .unwrap();
    let pin = pbx_remote::server::admin::fingerprint(&data)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_string();
    let portal = PortalFixture::start().await;
    // A process of its own, so its descriptors and memory are not the other tests'.
    let agent = AgentProcess::spawn(
        &tmp.path().join("agent"),
        &edit(
            AgentToml::new(tunnel, &pin, &tmp.path().join("agent"))
                .code(&code)
                .portal(&portal.url())
                .build(),
        ),
        |_| {},
    );
    let mut before = agent.connected().await.since;

    let pid = agent.pid();
    let (fd_before, rss_before) = (fd_count(pid), proc_mem_kib(pid, "VmRSS"));

    // A visitor mid-request (the portal holds it) and with a WebSocket open when the server dies:
    // both end at once with an error, not a hang, and the agent lets go of the portal request.
    let visitor = {
        let out = pbx_remote::server::admin::visit(&data, &device, "alice", false, true).unwrap();
        let url = serde_json::from_str::<serde_json::Value>(&out).unwrap()["url"]
            .as_str()
            .unwrap()
            .to_string();
        logged_in(public, &url, &device).await
    };
    let (mut ws, _) = visitor.websocket(&visitor.origin).await.unwrap();
    let held = visitor.request(reqwest::Method::GET, "/slow");
    let mut in_flight = Some(tokio::spawn(async move {
        held.send().await.map(|r| r.status())
    }));
    eventually(
        Duration::from_secs(5),
        "the portal holds the request",
        || (portal.held() == 1).then_some(()),
    )
    .await;

    let mut reconnects = vec![];
    // Down for a growing moment, one of them 5 s: the agent's packets meanwhile go nowhere,
    // and the restarted server resets the old connection at its first packet.
    for (round, down_ms) in [0u64, 300, 1200, 5000, 600].into_iter().enumerate() {
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        if let Some(req) = in_flight.take() {
            let ended = tokio::time::timeout(Duration::from_secs(2), req)
                .await
                .expect("the request in flight ends at once, no hang");
            assert!(!matches!(ended, Ok(Ok(s)) if s.is_success()), "{ended:?}");
            let next = tokio::time::timeout(
                Duration::from_secs(2),
                futures_util::StreamExt::next(&mut ws),
            )
            .await
            .expect("the WebSocket ends at once, no hang");
            let open = matches!(&next, Some(Ok(m)) if !m.is_close());
            assert!(!open, "{next:?}");
        }
        tokio::time::sleep(Duration::from_millis(down_ms)).await;
        let t0 = Instant::now();
        server = spawn_server(&data, &tunnel.to_string(), &public.to_string());
        let s = eventually(Duration::from_secs(10), "a new connection", || {
            pbx_remote::status::read(&agent.status_file)
                .ok()
                .filter(|s| s.state == State::Connected && s.since != before)
        })
        .await;
        reconnects.push(t0.elapsed());
        assert!(s.last_connected.is_some(), "round {round}");
        before = s.since;
        if round == 0 {
            eventually(Duration::from_secs(10), "the portal request let go", || {
                (portal.held() == 0).then_some(())
            })
            .await;
        }
    }
    let (fd_after, rss_after) = (fd_count(pid), proc_mem_kib(pid, "VmRSS"));
    let mut sorted = reconnects.clone();
    sorted.sort();
    eprintln!(
        "reconnect after restart: median {:?}, all {reconnects:?}; fds {fd_before} → {fd_after}; RSS {rss_before} → {rss_after} KiB",
        sorted[sorted.len() / 2]
    );
    assert!(fd_after <= fd_before + 8, "fds {fd_before} → {fd_after}");
    assert!(
        rss_after <= rss_before + 16 * 1024,
        "RSS {rss_before} → {rss_after} KiB"
    );
    // The persisted reset key lets the new server reset old connections at once: the agent
    // reports a reset, not an idle timeout.
    let url = {
        let out = pbx_remote::server::admin::visit(&data, &device, "alice", false, true).unwrap();
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["url"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut v = Visitor::new(public, &device);
    v.open_visit(&url).await;
    assert_eq!(v.login(USER, PASSWORD).await.status(), 303);
    assert_eq!(v.get("/").await.status(), 200, "visits work after restarts");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_server_resets_the_old_connection_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let mut server = spawn_server(&data, "127.0.0.1:0", "127.0.0.1:0");
    let tunnel = server.tunnel;
    let code = pbx_remote::server::db::Db::open(&data)
        .unwrap()
        .add_device(&pbx_remote::server::db::NewDevice {
            name: "P".into(),
            ..Default::default()
        })
        .unwrap()
        .code;
    let pin = pbx_remote::server::admin::fingerprint(&data)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_string();
    let agent = TestAgent::start(
        &tmp.path().join("agent"),
        &AgentToml::new(tunnel, &pin, &tmp.path().join("agent"))
            .code(&code)
            .build(),
    );
    let before = agent.connected().await.since;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let t0 = Instant::now();
    let _server = spawn_server(&data, &tunnel.to_string(), "127.0.0.1:0");
    // Without a stateless reset the agent could only notice through its idle timeout; a new
    // connection well inside that proves the restarted server reset the old one at once.
    let limit = pbx_remote::protocol::IDLE_TIMEOUT - Duration::from_secs(5);
    agent
        .wait(limit, |s| s.state == State::Connected && s.since != before)
        .await;
    assert!(t0.elapsed() < limit);
}

#[test]
fn demo_prints_links_that_answer() {
    let mut child = Command::new(SERVER)
        .arg("demo")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut links = vec![];
    let mut password = None;
    for _ in 0..40 {
        let Some(Ok(line)) = lines.next() else { break };
        let t = line.trim();
        if t.starts_with("http://") {
            links.push(t.to_string());
        }
        if let Some(p) = t.strip_prefix("password: ") {
            password = Some(p.to_string());
            break;
        }
    }
    assert_eq!(links.len(), 2, "{links:?}");
    assert!(
        links[0].contains("passwordless"),
        "passwordless link first: {links:?}"
    );
    assert!(!links[1].contains("passwordless"));
    assert!(password.is_some());

    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let url = url::Url::parse(&links[0]).unwrap();
        let device = url
            .host_str()
            .unwrap()
            .split('.')
            .next()
            .unwrap()
            .to_string();
        let public: SocketAddr = format!("127.0.0.1:{}", url.port().unwrap())
            .parse()
            .unwrap();
        let mut v = Visitor::new(public, &device);
        let r = v.open_visit(&links[0]).await;
        assert_eq!(r.status(), 303);
        let landing = r.headers()["location"].to_str().unwrap().to_string();
        let r = v.get(&landing).await;
        assert_eq!(r.status(), 303);
        let r = v.get("/").await;
        assert_eq!(r.status(), 200);
        assert!(r.text().await.unwrap().contains("Demo PBX portal"));
        let mut v2 = Visitor::new(public, &device);
        assert_eq!(
            v2.get(&links[1]).await.status(),
            200,
            "account link shows its confirm page"
        );
    });
    Command::new("kill")
        .arg("-INT")
        .arg(child.id().to_string())
        .status()
        .unwrap();
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0));
}

/// An agent whose server refuses every connection retries at each backoff step but says so in
/// its log once, not once per attempt.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_server_is_logged_once_not_at_every_retry() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("agent");
    std::fs::create_dir_all(&dir).unwrap();
    let closed: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.join("agent.toml");
    let pin = "ab".repeat(32);
    std::fs::write(
        &config,
        AgentToml::new(closed, &pin, &dir).code("123456").build(),
    )
    .unwrap();
    let stderr = tmp.path().join("stderr");
    let mut agent = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_pbx-remote-agent"))
            .args(["run", "-c"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    // Each attempt sets a new next_retry_at; wait for five of them.
    let status_file = dir.join("status.json");
    let mut retries = std::collections::BTreeSet::new();
    eventually(Duration::from_secs(60), "five activation attempts", || {
        if let Ok(s) = pbx_remote::status::read(&status_file) {
            if let Some(at) = s.next_retry_at {
                retries.insert(at);
            }
        }
        (retries.len() >= 5).then_some(())
    })
    .await;
    let _ = agent.0.kill();
    let _ = agent.0.wait();
    let log = std::fs::read_to_string(&stderr).unwrap();
    let lines = log
        .lines()
        .filter(|l| l.contains("activation failed"))
        .count();
    assert_eq!(lines, 1, "{} attempts, log:\n{log}", retries.len());
    assert!(
        log.contains(&closed.to_string()),
        "the log names the server:\n{log}"
    );
}

/// A log line written while serving a request carries the tunnel's span (device, server) and
/// the stream's (id, visitor), so a provider can tell whose request failed on which tunnel.
#[tokio::test(flavor = "multi_thread")]
async fn a_request_logs_under_its_tunnel_and_stream_spans() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    let server = spawn_server(&data, "127.0.0.1:0", "127.0.0.1:0");
    let db = pbx_remote::server::db::Db::open(&data).unwrap();
    let pbx_remote::server::db::AddedDevice { id: device, code } = db
        .add_device(&pbx_remote::server::db::NewDevice {
            name: "P".into(),
            ..Default::default()
        })
        .unwrap();
    let pin = pbx_remote::server::admin::fingerprint(&data)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .to_string();
    let dir = tmp.path().join("agent");
    std::fs::create_dir_all(&dir).unwrap();
    // Nothing listens on the portal's port, so the proxied request logs "portal unreachable".
    let portal = format!("http://127.0.0.1:{}", free_port());
    let config = dir.join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "{}[log]\nformat = \"json\"\n",
            AgentToml::new(server.tunnel, &pin, &dir)
                .code(&code)
                .portal(&portal)
                .build()
        ),
    )
    .unwrap();
    let stderr = tmp.path().join("stderr");
    let _agent = ChildGuard(
        Command::new(env!("CARGO_BIN_EXE_pbx-remote-agent"))
            .args(["run", "-c"])
            .arg(&config)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .unwrap(),
    );
    let status_file = dir.join("status.json");
    eventually(Duration::from_secs(30), "the agent connects", || {
        pbx_remote::status::read(&status_file)
            .ok()
            .filter(|s| s.state == State::Connected)
    })
    .await;
    let url = {
        let out = pbx_remote::server::admin::visit(&data, &device, "alice", false, true).unwrap();
        serde_json::from_str::<serde_json::Value>(&out).unwrap()["url"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut v = Visitor::new(server.public, &device);
    v.open_visit(&url).await;
    assert_eq!(v.login(USER, PASSWORD).await.status(), 303);
    assert_eq!(v.get("/").await.status(), 502);
    let line = eventually(
        Duration::from_secs(10),
        "the portal error is logged",
        || {
            let log = std::fs::read_to_string(&stderr).ok()?;
            log.lines()
                .find(|l| l.contains("portal unreachable"))
                .map(str::to_string)
        },
    )
    .await;
    let entry: serde_json::Value = serde_json::from_str(&line).unwrap();
    let spans = entry["spans"].as_array().expect("a span list");
    let span = |name: &str| {
        spans
            .iter()
            .find(|s| s["name"] == name)
            .unwrap_or_else(|| panic!("no {name} span in {line}"))
    };
    assert_eq!(span("tunnel")["device"], device.as_str(), "{line}");
    assert_eq!(
        span("tunnel")["server"],
        server.tunnel.to_string().as_str(),
        "{line}"
    );
    assert_eq!(span("stream")["visitor"], "cli:alice", "{line}");
    assert!(span("stream")["id"].is_string(), "{line}");
}
