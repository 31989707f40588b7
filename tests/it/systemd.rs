//! The agent binary under a fake systemd: a NOTIFY_SOCKET we read, WATCHDOG_USEC set, and stop
//! signals sent the way systemd sends them.

use crate::support::*;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tokio::net::UnixDatagram;

const AGENT: &str = env!("CARGO_BIN_EXE_pbx-remote-agent");

/// The notify socket and everything received on it so far.
struct Notify {
    sock: UnixDatagram,
    seen: Vec<String>,
}

impl Notify {
    fn bind(dir: &Path) -> Notify {
        Notify {
            sock: UnixDatagram::bind(dir.join("notify.sock")).unwrap(),
            seen: vec![],
        }
    }

    /// Reads datagrams until one line equals `want` (counting from message `from`); returns the
    /// index of that message.
    async fn until(&mut self, from: usize, want: &str, limit: Duration) -> usize {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(i) =
                (from..self.seen.len()).find(|&i| self.seen[i].lines().any(|l| l == want))
            {
                return i;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let mut buf = [0u8; 4096];
            match tokio::time::timeout(left, self.sock.recv(&mut buf)).await {
                Ok(Ok(n)) => self
                    .seen
                    .push(String::from_utf8_lossy(&buf[..n]).into_owned()),
                Ok(Err(e)) => panic!("notify socket: {e}"),
                Err(_) => panic!("no {want:?} within {limit:?}; got {:?}", self.seen),
            }
        }
    }
}

impl Notify {
    /// Everything received within `d`, with when it arrived.
    async fn collect_for(&mut self, d: Duration) -> Vec<(Instant, String)> {
        let deadline = Instant::now() + d;
        let mut got = vec![];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mut buf = [0u8; 4096];
            match tokio::time::timeout(left, self.sock.recv(&mut buf)).await {
                Ok(Ok(n)) => got.push((
                    Instant::now(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                )),
                Ok(Err(e)) => panic!("notify socket: {e}"),
                Err(_) => return got,
            }
        }
    }
}

/// The agent as systemd starts it: NOTIFY_SOCKET, and WATCHDOG_USEC with WATCHDOG_PID naming
/// the agent itself (the shell execs the agent, so `$$` is its pid).
fn spawn_agent(dir: &Path, config: &Path, watchdog_usec: u64) -> ChildGuard {
    spawn_agent_with(dir, config, watchdog_usec, &[])
}

/// As [`spawn_agent`], with more environment.
fn spawn_agent_with(
    dir: &Path,
    config: &Path,
    watchdog_usec: u64,
    env: &[(&str, &str)],
) -> ChildGuard {
    let child = Command::new("sh")
        .envs(env.iter().copied())
        .arg("-c")
        .arg("WATCHDOG_PID=$$ exec \"$0\" run -c \"$1\"")
        .arg(AGENT)
        .arg(config)
        .env("NOTIFY_SOCKET", dir.join("notify.sock"))
        .env("WATCHDOG_USEC", watchdog_usec.to_string())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    ChildGuard(child)
}

/// A server, a portal and a device, with an agent config for the binary written to
/// `tmp/agent.toml` (state under `tmp/agent`), passed through `edit` first.
struct Setup {
    server: TestServer,
    portal: PortalFixture,
    device: String,
    tmp: tempfile::TempDir,
    config: std::path::PathBuf,
    agent_dir: std::path::PathBuf,
}

impl Setup {
    async fn new(edit: impl FnOnce(String) -> String) -> Setup {
        let server = TestServer::start().await;
        let portal = PortalFixture::start().await;
        let (device, code) = server.add_device(false);
        let tmp = tempfile::tempdir().unwrap();
        let config = tmp.path().join("agent.toml");
        let agent_dir = tmp.path().join("agent");
        std::fs::create_dir_all(&agent_dir).unwrap();
        let toml = server
            .agent_toml(&agent_dir)
            .code(&code)
            .portal(&portal.url())
            .build();
        std::fs::write(&config, edit(toml)).unwrap();
        Setup {
            server,
            portal,
            device,
            tmp,
            config,
            agent_dir,
        }
    }

    fn dir(&self) -> &Path {
        self.tmp.path()
    }
}

fn signal(child: &ChildGuard, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.0.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} failed");
}

/// Waits for the child to exit, up to `limit`.
async fn exit_code(child: &mut ChildGuard, limit: Duration) -> Option<i32> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(status) = child.0.try_wait().unwrap() {
            return status.code();
        }
        if Instant::now() > deadline {
            panic!("the agent did not exit within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn ready_status_watchdog_and_stopping_reach_systemd() {
    let Setup {
        server,
        portal: _portal,
        device: _,
        tmp,
        config,
        agent_dir,
    } = Setup::new(|t| t).await;
    let dir = tmp.path();
    let mut notify = Notify::bind(dir);
    let mut child = spawn_agent(dir, &config, 200_000);

    let ready = notify.until(0, "READY=1", Duration::from_secs(10)).await;
    let connected = notify
        .until(0, "STATUS=connected", Duration::from_secs(20))
        .await;
    notify.until(0, "WATCHDOG=1", Duration::from_secs(5)).await;
    assert!(
        ready <= connected,
        "READY comes once the config is loaded: {:?}",
        notify.seen
    );

    // The server going away must not starve the watchdog: connectivity is not health.
    server.shutdown().await;
    let lost = notify
        .until(
            connected,
            "STATUS=reconnecting (server_unreachable)",
            Duration::from_secs(30),
        )
        .await;
    let mut at = lost;
    for _ in 0..3 {
        at = notify
            .until(at + 1, "WATCHDOG=1", Duration::from_secs(5))
            .await;
    }

    signal(&child, "TERM");
    notify.until(at, "STOPPING=1", Duration::from_secs(5)).await;
    assert_eq!(
        exit_code(&mut child, Duration::from_secs(15)).await,
        Some(0)
    );
    let s = pbx_remote::status::read(&agent_dir.join("status.json")).unwrap();
    assert_eq!(s.state.as_str(), "stopped");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_invalid_config_exits_64_without_ready() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("agent.toml");
    std::fs::write(&config, "[server]\nenabled = maybe\n").unwrap();
    let mut notify = Notify::bind(tmp.path());
    let mut child = spawn_agent(tmp.path(), &config, 0);
    assert_eq!(
        exit_code(&mut child, Duration::from_secs(10)).await,
        Some(64)
    );
    let mut buf = [0u8; 512];
    let got = notify.sock.try_recv(&mut buf);
    assert!(
        got.is_err(),
        "nothing may be sent: {:?}",
        got.map(|n| String::from_utf8_lossy(&buf[..n]).into_owned())
    );
    notify.seen.clear();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_stop_signal_exits_at_once_during_the_drain() {
    let setup = Setup::new(|t| t.replace("drain_secs = 2", "drain_secs = 60")).await;
    let (w_server, portal, device) = (&setup.server, &setup.portal, &setup.device);
    let mut notify = Notify::bind(setup.dir());
    let mut child = spawn_agent(setup.dir(), &setup.config, 0);
    notify
        .until(0, "STATUS=connected", Duration::from_secs(20))
        .await;

    // A request the portal never answers keeps the drain busy.
    let url = w_server.visit(device, "alice", false);
    let mut v = Visitor::new(w_server.public, device);
    v.open_visit(&url).await;
    assert_eq!(v.login(USER, PASSWORD).await.status(), 303);
    let pending = tokio::spawn({
        let req = v.request(reqwest::Method::GET, "/slow");
        async move { req.send().await }
    });
    let served = Instant::now() + Duration::from_secs(10);
    while !portal
        .log
        .paths
        .lock()
        .unwrap()
        .iter()
        .any(|p| p == "/slow")
    {
        assert!(
            Instant::now() < served,
            "the slow request never reached the portal"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    signal(&child, "TERM");
    notify.until(0, "STOPPING=1", Duration::from_secs(5)).await;
    assert!(
        child.0.try_wait().unwrap().is_none(),
        "the first signal drains (60 s allowed)"
    );
    signal(&child, "INT");
    // Well inside the 60 s drain: the second signal did not wait for it.
    assert_eq!(
        exit_code(&mut child, Duration::from_secs(10)).await,
        Some(pbx_remote::signals::FORCED_EXIT)
    );
    pending.abort();
}

/// The `/proc` mount options the shipped unit gives the agent (`ProtectProc=`, `ProcSubset=`).
fn unit_proc_options() -> Vec<String> {
    let unit = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/systemd/pbx-remote-agent.service"
    ))
    .unwrap();
    let mut opts = vec![];
    for line in unit.lines() {
        match line.split_once('=') {
            Some(("ProtectProc", v)) if v != "default" => opts.push(format!("hidepid={v}")),
            Some(("ProcSubset", "pid")) => opts.push("subset=pid".to_string()),
            _ => {}
        }
    }
    opts
}

/// Telemetry reads /proc/stat, /proc/meminfo, /proc/uptime and /proc/loadavg. The agent runs
/// here in its own mount namespace with /proc mounted as the unit mounts it, and the heartbeat
/// must still carry real figures (`ProcSubset=pid` once hid them all: memory 0 of 0, uptime 0).
#[tokio::test(flavor = "multi_thread")]
async fn telemetry_is_complete_under_the_units_proc_sandbox() {
    let opts = unit_proc_options();
    assert!(
        opts.iter().any(|o| o.starts_with("hidepid=")),
        "the unit hides other processes ({opts:?})"
    );
    let setup = format!(
        "mount -t proc -o {} proc /proc || exit 97; ",
        opts.join(",")
    );
    // Mounting needs root (CAP_SYS_ADMIN); where it is refused the sandbox cannot be emulated.
    let can_mount = Command::new("unshare")
        .args(["--mount", "--propagation", "private", "sh", "-c"])
        .arg(format!("{setup}test -r /proc/self/status"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !root_or_skip("mounting a private /proc with unshare") {
        return;
    }
    assert!(
        can_mount,
        "as root, unshare mounts a private /proc with the unit's options"
    );
    let world = Setup::new(|t| t).await;
    let (server, device, config) = (&world.server, &world.device, &world.config);
    // `unshare` execs the shell in a private mount namespace; the shell mounts /proc there and
    // execs the agent, so the agent sees only that /proc.
    let mut child = ChildGuard(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "sh", "-c"])
            .arg(format!("{setup}exec \"$0\" run -c \"$1\""))
            .arg(AGENT)
            .arg(config)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let db = server.db();
    let deadline = Instant::now() + Duration::from_secs(20);
    let t = loop {
        let nodes = db.device(device).unwrap().unwrap().nodes;
        if let Some(t) = nodes.first().and_then(|n| n.telemetry.clone()) {
            break t;
        }
        if let Some(status) = child.0.try_wait().unwrap() {
            panic!("the sandboxed agent exited: {status}");
        }
        assert!(Instant::now() < deadline, "no telemetry within 20 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(t.memory_total_bytes > 0, "memory unreadable: {t:?}");
    assert!(t.uptime_secs > 0, "uptime unreadable: {t:?}");
    assert!(t.disk_total_bytes > 0, "{t:?}");
    assert!(t.portal_reachable, "{t:?}");
    signal(&child, "TERM");
    assert_eq!(
        exit_code(&mut child, Duration::from_secs(15)).await,
        Some(0)
    );
}

/// B9: a wedged runtime (the `PBXRA_FREEZE_AFTER_SECS` hook blocks it two seconds in, as a
/// deadlock would) stops feeding the watchdog although the process lives on, so systemd's
/// `WatchdogSec=` restarts it; until then the pings come every half period.
#[tokio::test(flavor = "multi_thread")]
async fn a_wedged_runtime_stops_feeding_the_watchdog() {
    let Setup {
        server: _server,
        portal: _portal,
        device: _,
        tmp,
        config,
        agent_dir: _,
    } = Setup::new(|t| t).await;
    let dir = tmp.path();
    let mut notify = Notify::bind(dir);
    let started = Instant::now();
    let child = spawn_agent_with(dir, &config, 200_000, &[("PBXRA_FREEZE_AFTER_SECS", "2")]);
    notify.until(0, "WATCHDOG=1", Duration::from_secs(5)).await;
    let got = notify.collect_for(Duration::from_secs(5)).await;
    let pings: Vec<Duration> = got
        .iter()
        .filter(|(_, m)| m.lines().any(|l| l == "WATCHDOG=1"))
        .map(|(at, _)| at.duration_since(started))
        .collect();
    assert!(
        pings.iter().any(|t| *t < Duration::from_millis(1800)),
        "pings before the freeze: {pings:?}"
    );
    let last = pings.last().copied().unwrap_or_default();
    assert!(
        last < Duration::from_millis(2500),
        "no ping after the runtime wedged (last at {last:?}): {pings:?}"
    );
    // Wedged, not dead: it is systemd's watchdog that ends it.
    let pid = child.0.id();
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
}
