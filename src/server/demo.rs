//! `pbx-remote-server demo`: the whole system on loopback in one process — server, a demo
//! portal and an in-process agent — printing visit links once the agent is connected.

use crate::server::db::{AddedDevice, Db, NewDevice, NewUser, Role, Scope};
use crate::server::{self, keys, Listeners, ServerOptions};
use crate::status::{State, StatusHandle};
use anyhow::{Context, Result};
use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// The demo's remote account name.
pub const DEMO_USER: &str = "provider";
/// The demo console admin's email.
pub const DEMO_ADMIN: &str = "admin@demo.example";

/// Runs the demo until `shutdown`; links go to `out` (stdout in the binary).
pub async fn run(shutdown: CancellationToken, out: &mut (dyn Write + Send)) -> Result<()> {
    let dir = std::env::temp_dir().join(format!(
        "pbx-remote-demo-{}-{}",
        std::process::id(),
        hex::encode(crate::crypto::random_bytes::<4>())
    ));
    let result = run_in(&dir, shutdown, out).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(
    dir: &std::path::Path,
    shutdown: CancellationToken,
    out: &mut (dyn Write + Send),
) -> Result<()> {
    let data_dir = dir.join("server");
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let (udp, api) = server::bind_pair(loopback)?;
    let server_port = udp.local_addr()?.port();
    let public = TcpListener::bind(loopback).await?;
    let public_port = public.local_addr()?.port();
    let console = TcpListener::bind(loopback).await?;
    let console_url = url::Url::parse(&format!(
        "http://127.0.0.1:{}",
        console.local_addr()?.port()
    ))?;
    let portal = TcpListener::bind(loopback).await?;
    let portal_port = portal.local_addr()?.port();

    let keys = keys::ServerKeys::load_or_create(&data_dir, &keys::TlsSource::default())?;
    let pin = keys.pin_hex();
    drop(keys);
    let db = Db::open(&data_dir)?;
    let admin_password = format!("Demo-{}7", crate::crypto::random_token::<9>());
    db.add_user(&NewUser {
        email: DEMO_ADMIN.into(),
        password_hash: crate::password::hash(&admin_password)?,
        role: Role::Admin,
        scope: Scope::All,
    })?;
    let AddedDevice { id: device, code } = db.add_device(&NewDevice {
        name: "Demo PBX".into(),
        comment: Some("created by `pbx-remote-server demo`".into()),
        allow_passwordless: true,
        ..Default::default()
    })?;

    let opts = ServerOptions {
        data_dir: data_dir.clone(),
        public_url: url::Url::parse(&format!("http://localhost:{public_port}"))?,
        public_tls: None,
        trusted_proxies: vec![],
        tls: keys::TlsSource::default(),
        console: Some(server::console::ConsoleOptions {
            url: console_url.clone(),
            tls: None,
        }),
        smtp: None,
        data_threads: 1,
    };
    let listeners = Listeners {
        udp,
        api: TcpListener::from_std(api)?,
        public,
        console: Some(console),
    };
    let tasks = tokio_util::task::TaskTracker::new();
    let stop = shutdown.child_token();
    tasks.spawn({
        let stop = stop.clone();
        async move {
            if let Err(e) = server::run(opts, listeners, stop).await {
                tracing::error!(error = %format!("{e:#}"), "demo server failed");
            }
        }
    });
    tasks.spawn(crate::server::demo_portal::serve(portal, stop.clone()));

    let password = format!("Demo-{}7", crate::crypto::random_token::<9>());
    let hash = crate::password::hash(&password)?;
    let agent_dir = dir.join("agent");
    std::fs::create_dir_all(&agent_dir)?;
    let config_path = agent_dir.join("agent.toml");
    std::fs::write(
        &config_path,
        agent_config(server_port, &pin, &code, portal_port, &hash, &agent_dir),
    )?;
    let config = crate::config::AgentConfig::load(&config_path)
        .map_err(|e| anyhow::anyhow!("demo agent config: {e}"))?;
    let status = StatusHandle::new(
        config.paths.status_file.clone(),
        crate::agent::initial_status(&config),
    );
    let mut watch = status.subscribe();
    tasks.spawn({
        let stop = stop.clone();
        async move {
            if let Err(e) = crate::agent::run(config, status, stop).await {
                tracing::error!(error = %format!("{e:#}"), "demo agent failed");
            }
        }
    });
    tasks.close();

    let connected = tokio::time::timeout(
        Duration::from_secs(60),
        watch.wait_for(|s| s.state == State::Connected),
    )
    .await
    .map(|r| r.is_ok())
    .unwrap_or(false);
    match connected {
        true => {}
        false => {
            let s = watch.borrow().clone();
            stop.cancel();
            tasks.wait().await;
            anyhow::bail!(
                "the demo agent did not connect: {:?} {:?} {}",
                s.state,
                s.reason,
                s.message.unwrap_or_default()
            );
        }
    }
    let passwordless = server::admin::visit(&data_dir, &device, "demo", true, true)?;
    let account = server::admin::visit(&data_dir, &device, "demo", false, true)?;
    let url_of = |j: &str| -> Result<String> {
        let v: serde_json::Value = serde_json::from_str(j)?;
        v["url"].as_str().map(str::to_string).context("visit url")
    };
    writeln!(out, "pbx-remote demo is running (device {device}); links are one-time and valid for 10 minutes.")?;
    writeln!(out)?;
    writeln!(out, "Passwordless login (super admin):")?;
    writeln!(out, "  {}", url_of(&passwordless)?)?;
    writeln!(out)?;
    writeln!(out, "Account login (administrator):")?;
    writeln!(out, "  {}", url_of(&account)?)?;
    writeln!(out, "  username: {DEMO_USER}")?;
    writeln!(out, "  password: {password}")?;
    writeln!(out)?;
    writeln!(out, "Provider console (CM):")?;
    writeln!(out, "  {console_url}")?;
    writeln!(out, "  email:    {DEMO_ADMIN}")?;
    writeln!(out, "  password: {admin_password}")?;
    writeln!(
        out,
        "  (an admin without two-factor sign-in: set it up under Account)"
    )?;
    writeln!(out)?;
    writeln!(
        out,
        "More links: pbx-remote-server visit {device} --as you [--passwordless] --data-dir {}",
        data_dir.display()
    )?;
    writeln!(out, "Press Ctrl-C to stop.")?;
    out.flush()?;
    shutdown.cancelled().await;
    stop.cancel();
    tasks.wait().await;
    Ok(())
}

fn agent_config(
    server_port: u16,
    pin: &str,
    code: &str,
    portal_port: u16,
    hash: &str,
    dir: &std::path::Path,
) -> String {
    let p = |name: &str| -> PathBuf { dir.join(name) };
    format!(
        r#"# Written by `pbx-remote-server demo`.
[server]
enabled = true
type = "custom"
address = "127.0.0.1:{server_port}"
pin_sha256 = "{pin}"

[activation]
method = "auth_code"
auth_code = "{code}"

[pbx]
edition = "software"
firmware = "83.19.0.110"
model = "Demo PBX"
serial = "DEMO0001"
mac = "02:00:00:00:00:01"
portal_url = "http://127.0.0.1:{portal_port}"
super_admin = "admin"

[remote_access]
auto_logout_minutes = 15

[remote_access.account]
enabled = true
username = "{DEMO_USER}"
password_hash = "{hash}"

[remote_access.passwordless]
enabled = true

[tunnel]
heartbeat_secs = 10
drain_secs = 2

[paths]
state_dir = "{state}"
status_file = "{status}"
assertion_pubkey = "{assertion}"
"#,
        state = p("state").display(),
        status = p("status.json").display(),
        assertion = p("assertion.pub").display(),
    )
}
