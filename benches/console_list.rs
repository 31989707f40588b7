//! My Devices with a fleet: the console's list page and its API with 10,000 devices (each with
//! a node, half online, a tenth Abnormal) against the same requests with 50 devices, in one
//! run, through the real server (router, guard, session lookup, store, rendering) over
//! loopback HTTP. Beside them, the floor any implementation pays: one SQLite pass over the same
//! 10,000 devices and nodes, without building or rendering anything.
//!
//! `cargo bench --bench console_list` (env `LIST_DEVICES`, default 10000; `LIST_REQUESTS`,
//! requests per measure, default 30). Prints p50/p95 per request and met/MISSED for:
//! - the page (first page, a search, a status filter) p95 ≤ 250 ms at 10,000 devices: a
//!   provider's click feels immediate, and the self-refresh (every 3 s per open list) costs
//!   under a tenth of a core;
//! - the API list p95 ≤ 250 ms at 10,000 devices (what the page polls).

use anyhow::{Context, Result};
use pbx_remote::server::db::{Db, NewUser, Role, Scope};
use pbx_remote::server::{self, console::ConsoleOptions, keys, Listeners, ServerOptions};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

const PASSWORD: &str = "Bench-Passw0rd!";
const TARGET: Duration = Duration::from_millis(250);

struct Fleet {
    _dir: tempfile::TempDir,
    console: SocketAddr,
    stop: CancellationToken,
    data: std::path::PathBuf,
}

/// A server whose store holds `n` devices, each with a node (half online, a tenth of those
/// over the CPU threshold).
async fn fleet(n: usize) -> Result<Fleet> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    let db = Db::open(&data)?;
    db.add_group("east")?;
    db.add_group("west")?;
    db.add_user(&NewUser {
        email: "admin@example.com".into(),
        password_hash: pbx_remote::password::hash(PASSWORD)?,
        role: Role::Admin,
        scope: Scope::All,
    })?;
    drop(db);
    {
        let mut c = rusqlite::Connection::open(data.join("server.db"))?;
        let tx = c.transaction()?;
        let now = pbx_remote::protocol::now_ms() as i64 / 1000;
        let sample = |cpu: f32| {
            serde_json::json!({
                "cpu_percent": cpu, "memory_used_bytes": 1u64 << 30, "memory_total_bytes": 4u64 << 30,
                "disk_used_bytes": 10u64 << 30, "disk_total_bytes": 100u64 << 30, "uptime_secs": 86400,
                "load": [0.1, 0.2, 0.3], "firmware": "83.19.0.110", "agent_version": "0.1.0",
                "portal_reachable": true, "portal_latency_ms": 3.0
            })
            .to_string()
        };
        for i in 0..n {
            let id = format!("branch-{i:05}");
            tx.execute(
                "INSERT INTO devices (id, name, group_name, comment, created_at, activated_at) VALUES (?1, ?2, ?3, ?4, ?5, ?5)",
                rusqlite::params![id, format!("Branch {i:05}"), if i % 2 == 0 { "east" } else { "west" }, format!("site {i}"), now],
            )?;
            let online = i % 2 == 0;
            let cpu = if i % 20 == 0 { 97.0 } else { 12.0 };
            tx.execute(
                "INSERT INTO nodes (device_id, role, key_hash, serial, mac, firmware, model, agent_version, telemetry, online, connected_at, last_seen, account_login, passwordless)
                 VALUES (?1, 'single', ?2, ?3, '02:00:00:00:00:01', '83.19.0.110', 'P560', '0.1.0', ?4, ?5, ?6, ?6, 1, 1)",
                rusqlite::params![id, format!("key-{i}").into_bytes(), format!("SN{i:08}"), sample(cpu), online, now],
            )?;
        }
        tx.commit()?;
    }
    let loopback: SocketAddr = "127.0.0.1:0".parse()?;
    let (udp, api) = server::bind_pair(loopback)?;
    let public = TcpListener::bind(loopback).await?;
    let console = TcpListener::bind(loopback).await?;
    let console_addr = console.local_addr()?;
    let opts = ServerOptions {
        data_dir: data.clone(),
        public_url: url::Url::parse(&format!("http://localhost:{}", public.local_addr()?.port()))?,
        public_tls: None,
        trusted_proxies: vec![],
        tls: keys::TlsSource::default(),
        console: Some(ConsoleOptions {
            url: url::Url::parse(&format!("http://{console_addr}"))?,
            tls: None,
        }),
        smtp: None,
        data_threads: 1,
    };
    let state = server::ServerState::open(opts)?;
    let stop = CancellationToken::new();
    let listeners = Listeners {
        udp,
        api: TcpListener::from_std(api)?,
        public,
        console: Some(console),
    };
    tokio::spawn(server::serve(state, listeners, stop.clone()));
    Ok(Fleet {
        _dir: dir,
        console: console_addr,
        stop,
        data,
    })
}

async fn sign_in(client: &reqwest::Client, base: &str) -> Result<String> {
    let r = client
        .post(format!("{base}/login"))
        .header("origin", base)
        .form(&[("email", "admin@example.com"), ("password", PASSWORD)])
        .send()
        .await?;
    let cookie = r
        .headers()
        .get("set-cookie")
        .context("no session cookie")?
        .to_str()?;
    Ok(cookie.split(';').next().unwrap_or_default().to_string())
}

/// p50 and p95 of `requests` GETs of `path`.
async fn measure(
    client: &reqwest::Client,
    base: &str,
    cookie: &str,
    path: &str,
    requests: usize,
) -> Result<(Duration, Duration)> {
    let mut times = Vec::with_capacity(requests);
    for _ in 0..requests {
        let t = Instant::now();
        let r = client
            .get(format!("{base}{path}"))
            .header("cookie", cookie)
            .send()
            .await?;
        anyhow::ensure!(r.status() == 200, "{path}: {}", r.status());
        r.bytes().await?;
        times.push(t.elapsed());
    }
    times.sort();
    Ok((
        times[requests / 2],
        times[(requests * 95 / 100).min(requests - 1)],
    ))
}

/// One pass over devices and nodes with nothing built: the floor.
fn floor(data: &std::path::Path, requests: usize) -> Result<(Duration, Duration)> {
    let c = rusqlite::Connection::open(data.join("server.db"))?;
    let mut times = Vec::with_capacity(requests);
    for _ in 0..requests {
        let t = Instant::now();
        let mut s = c.prepare_cached("SELECT d.id, d.name, n.telemetry FROM devices d LEFT JOIN nodes n ON n.device_id = d.id")?;
        let mut rows = s.query([])?;
        let mut bytes = 0usize;
        while let Some(r) = rows.next()? {
            bytes += r.get_ref(2)?.as_str_or_null()?.map_or(0, str::len);
        }
        std::hint::black_box(bytes);
        times.push(t.elapsed());
    }
    times.sort();
    Ok((
        times[requests / 2],
        times[(requests * 95 / 100).min(requests - 1)],
    ))
}

fn ms(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1000.0)
}

fn main() -> Result<()> {
    pbx_remote::tls::install_default_provider();
    let n: usize = std::env::var("LIST_DEVICES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    let requests: usize = std::env::var("LIST_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let t = Instant::now();
        let small = fleet(50).await?;
        let large = fleet(n).await?;
        println!(
            "console list: {n} devices vs 50 (stores built in {:.1} s), {requests} requests each",
            t.elapsed().as_secs_f64()
        );
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let paths = [
            ("page 1", "/devices".to_string()),
            ("search", format!("/devices?q=branch-{:05}", n - 1)),
            ("status filter", "/devices?status=abnormal".to_string()),
            (
                "sorted by last seen",
                "/devices?sort=last_seen&dir=desc".to_string(),
            ),
            ("API list", "/api/v1/devices".to_string()),
        ];
        println!(
            "{:<22} {:>14} {:>14} {:>16}",
            "request",
            "50 p50/p95 ms",
            format!("{n} p50/p95 ms"),
            "large/small p50"
        );
        let mut worst = Duration::ZERO;
        let mut worst_api = Duration::ZERO;
        let small_base = format!("http://{}", small.console);
        let large_base = format!("http://{}", large.console);
        let small_cookie = sign_in(&client, &small_base).await?;
        let large_cookie = sign_in(&client, &large_base).await?;
        for (label, path) in &paths {
            // Interleaved, so both see the same noise.
            let (s50, s95) = measure(&client, &small_base, &small_cookie, path, requests).await?;
            let (l50, l95) = measure(&client, &large_base, &large_cookie, path, requests).await?;
            println!(
                "{label:<22} {:>14} {:>14} {:>15.1}x",
                format!("{}/{}", ms(s50), ms(s95)),
                format!("{}/{}", ms(l50), ms(l95)),
                l50.as_secs_f64() / s50.as_secs_f64().max(1e-9)
            );
            if *label == "API list" {
                worst_api = l95;
            } else {
                worst = worst.max(l95);
            }
        }
        let (f50, f95) = floor(&large.data, requests)?;
        println!(
            "{:<22} {:>14} {:>14}",
            "floor (one SQL pass)",
            "",
            format!("{}/{}", ms(f50), ms(f95))
        );
        for (what, got) in [("page p95", worst), ("API list p95", worst_api)] {
            let met = got <= TARGET;
            println!(
                "target: {what} at {n} devices <= {} ms: {} ms  {}",
                TARGET.as_millis(),
                ms(got),
                if met { "met" } else { "MISSED" }
            );
        }
        small.stop.cancel();
        large.stop.cancel();
        anyhow::Ok(())
    })
}
