//! Test support: a portal fixture, the server and agent started in-process on port 0, and a
//! visitor that talks to the front like a browser would (Host header, cookies by hand).
#![allow(dead_code)]

pub mod browser;
pub mod console;
pub mod login_portal;
pub mod proxy;
pub mod relay;
pub mod smtp;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http::{Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::TokioIo;
use pbx_remote::config::AgentConfig;
use pbx_remote::server::{self, db::Db, db::NewDevice, keys, Listeners, ServerOptions};
use pbx_remote::status::{State, Status, StatusHandle};
use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

pub type Body = BoxBody<Bytes, Infallible>;

/// The byte at offset `i` of every fixture download (period 251).
pub fn pattern(i: u64) -> u8 {
    ((i.wrapping_mul(31) + 7) % 251) as u8
}

/// `len` pattern bytes starting at `off`, copied from one precomputed period.
pub fn pattern_bytes(off: u64, len: usize) -> Vec<u8> {
    static PERIOD: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let period = PERIOD.get_or_init(|| (0..251 * 2).map(pattern).collect());
    let mut out = Vec::with_capacity(len);
    let mut pos = (off % 251) as usize;
    while out.len() < len {
        let take = (len - out.len()).min(251);
        out.extend_from_slice(&period[pos..pos + take]);
        pos = (pos + take) % 251;
    }
    out
}

/// SHA-256 of the first `n` pattern bytes.
pub fn pattern_sha256(n: u64) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut off = 0u64;
    while off < n {
        let len = (n - off).min(1 << 20) as usize;
        ctx.update(&pattern_bytes(off, len));
        off += len as u64;
    }
    hex::encode(ctx.finish().as_ref())
}

/// What the portal fixture saw.
#[derive(Default)]
pub struct PortalLog {
    pub requests: AtomicUsize,
    pub last_headers: Mutex<Vec<(String, String)>>,
    pub paths: Mutex<Vec<String>>,
    /// Connections open now.
    pub open: AtomicUsize,
    /// `/slow` requests being held now (a cancelled one stops counting).
    pub held: AtomicUsize,
    /// The address each connection came from, in order.
    pub peers: Mutex<Vec<std::net::IpAddr>>,
}

/// Counts one in `n` while alive.
struct Gauge<'a>(&'a AtomicUsize);

impl<'a> Gauge<'a> {
    fn up(n: &'a AtomicUsize) -> Gauge<'a> {
        n.fetch_add(1, Ordering::SeqCst);
        Gauge(n)
    }
}

impl Drop for Gauge<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The portal fixture: `/` page, `/bytes/N`, `/upload`, `/headers`, `/ws` echo, `/redirect`,
/// `/slow` (never answers), `/loopback-admin` (200 to 127.0.0.1 only, as a portal that trusts
/// loopback callers).
pub struct PortalFixture {
    pub addr: SocketAddr,
    pub log: Arc<PortalLog>,
    stop: CancellationToken,
}

impl PortalFixture {
    pub async fn start() -> PortalFixture {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        Self::start_on(listener).await
    }

    pub async fn start_on(listener: TcpListener) -> PortalFixture {
        let addr = listener.local_addr().unwrap();
        let log = Arc::new(PortalLog::default());
        let stop = CancellationToken::new();
        let (l, s) = (log.clone(), stop.clone());
        tokio::spawn(async move {
            loop {
                let (tcp, peer) = tokio::select! {
                    _ = s.cancelled() => return,
                    r = listener.accept() => r.unwrap(),
                };
                l.peers.lock().unwrap().push(peer.ip());
                let (l, s) = (l.clone(), s.clone());
                tokio::spawn(async move {
                    let _open = Gauge::up(&l.open);
                    let l = l.clone();
                    let svc = hyper::service::service_fn(move |req| {
                        let l = l.clone();
                        async move { Ok::<_, Infallible>(portal_route(addr, peer, &l, req).await) }
                    });
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), svc)
                        .with_upgrades();
                    // A stopped portal also drops its kept-alive connections, as a
                    // crashed web server would; otherwise pooled connections keep
                    // answering after `stop`.
                    tokio::select! {
                        _ = s.cancelled() => {}
                        _ = conn => {}
                    }
                });
            }
        });
        PortalFixture { addr, log, stop }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn stop(&self) {
        self.stop.cancel();
    }

    /// Requests the portal has answered so far.
    pub fn hits(&self) -> usize {
        self.log.requests.load(Ordering::SeqCst)
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.log.open.load(Ordering::SeqCst)
    }

    /// `/slow` requests held now.
    pub fn held(&self) -> usize {
        self.log.held.load(Ordering::SeqCst)
    }
}

fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).boxed()
}

async fn portal_route(
    addr: SocketAddr,
    peer: SocketAddr,
    log: &PortalLog,
    mut req: Request<Incoming>,
) -> Response<Body> {
    log.requests.fetch_add(1, Ordering::SeqCst);
    *log.last_headers.lock().unwrap() = req
        .headers()
        .iter()
        .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap_or("").to_string()))
        .collect();
    log.paths.lock().unwrap().push(req.uri().to_string());
    let path = req.uri().path().to_string();
    if path == "/" {
        return Response::builder()
            .header("content-type", "text/html")
            .header(
                "set-cookie",
                "portal_sid=abc; Domain=127.0.0.1; Path=/; HttpOnly",
            )
            .body(full("<html><body>PBX portal home</body></html>"))
            .unwrap();
    }
    // What a portal that trusts loopback callers hands out (catalogue C3): a diagnostics page
    // without a login for 127.0.0.1 only.
    if path == "/loopback-admin" {
        return if peer.ip() == std::net::IpAddr::from([127, 0, 0, 1]) {
            Response::new(full("loopback admin: no login needed"))
        } else {
            Response::builder()
                .status(StatusCode::FORBIDDEN)
                .body(full("log in first"))
                .unwrap()
        };
    }
    if path == "/form" {
        // A portal page under the strictest referrer policy: browsers then send `Origin: null`
        // with its form posts and fetches.
        return Response::builder()
            .header("content-type", "text/html")
            .header("referrer-policy", "no-referrer")
            .body(full(
                "<html><head><title>Portal form</title></head><body>\
                 <form method=\"post\" action=\"/upload\"><input name=\"field\" value=\"portal-form\">\
                 <button type=\"submit\">Save</button></form></body></html>",
            ))
            .unwrap();
    }
    if let Some(n) = path.strip_prefix("/bytes/") {
        let n: u64 = n.parse().unwrap();
        let chunk = 64 * 1024u64;
        let stream = futures_util::stream::unfold(0u64, move |off| async move {
            if off >= n {
                return None;
            }
            let len = (n - off).min(chunk);
            let data = pattern_bytes(off, len as usize);
            Some((
                Ok::<_, Infallible>(Frame::data(Bytes::from(data))),
                off + len,
            ))
        });
        return Response::builder()
            .header("content-length", n.to_string())
            .body(BodyExt::boxed(StreamBody::new(stream)))
            .unwrap();
    }
    if path == "/upload" {
        let mut body = req.into_body();
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut len = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame.unwrap().into_data() {
                len += data.len() as u64;
                ctx.update(&data);
            }
        }
        let out = serde_json::json!({"len": len, "sha256": hex::encode(ctx.finish().as_ref())});
        return Response::new(full(out.to_string()));
    }
    if path == "/headers" {
        let mut map = serde_json::Map::new();
        for (k, v) in req.headers() {
            let e = map
                .entry(k.as_str())
                .or_insert_with(|| serde_json::json!([]));
            e.as_array_mut()
                .unwrap()
                .push(v.to_str().unwrap_or("").into());
        }
        return Response::new(full(serde_json::Value::Object(map).to_string()));
    }
    // `/redirect-to/URL`: a redirect to URL, wherever it points (catalogue C8).
    if let Some(to) = path.strip_prefix("/redirect-to/") {
        return Response::builder()
            .status(StatusCode::FOUND)
            .header("location", to)
            .body(full(""))
            .unwrap();
    }
    if path == "/redirect" {
        return Response::builder()
            .status(StatusCode::FOUND)
            .header("location", format!("http://{addr}/target"))
            .body(full(""))
            .unwrap();
    }
    if let Some(ms) = path.strip_prefix("/delay/") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        return Response::new(full("delayed"));
    }
    if path == "/slow" {
        let _held = Gauge::up(&log.held);
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if path == "/ws" {
        // Like a real portal: the Origin must be the portal's own (the agent rewrites it).
        let origin = req.headers().get("origin").and_then(|o| o.to_str().ok());
        if origin != Some(format!("http://{addr}").as_str()) {
            return Response::builder()
                .status(403)
                .body(full("foreign origin"))
                .unwrap();
        }
        let key = req.headers().get("sec-websocket-key").cloned();
        let Some(key) = key else {
            return Response::builder()
                .status(400)
                .body(full("not ws"))
                .unwrap();
        };
        let on_upgrade = hyper::upgrade::on(&mut req);
        tokio::spawn(async move {
            let upgraded = on_upgrade.await.unwrap();
            let mut ws = tokio_tungstenite::WebSocketStream::from_raw_socket(
                TokioIo::new(upgraded),
                tokio_tungstenite::tungstenite::protocol::Role::Server,
                Some(unlimited_ws()),
            )
            .await;
            // Echoes data frames; tungstenite answers pings and echoes a close itself, and
            // the stream ends once the closing handshake is done.
            while let Some(Ok(msg)) = ws.next().await {
                if (msg.is_text() || msg.is_binary()) && ws.send(msg).await.is_err() {
                    break;
                }
            }
        });
        let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
        return Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header("connection", "upgrade")
            .header("upgrade", "websocket")
            .header("sec-websocket-accept", accept)
            .body(full(""))
            .unwrap();
    }
    Response::builder()
        .status(404)
        .body(full("no such page"))
        .unwrap()
}

/// WebSocket limits for the test's own ends (client and portal echo): none, so the frame sizes
/// tried are the agent's and front's business alone.
fn unlimited_ws() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
        max_message_size: None,
        max_frame_size: None,
        ..Default::default()
    }
}

/// The reference server in-process.
pub struct TestServer {
    pub state: Arc<pbx_remote::server::ServerState>,
    pub dir: tempfile::TempDir,
    pub tunnel: SocketAddr,
    pub public: SocketAddr,
    /// The provider console (http on loopback; its host 127.0.0.1 is not the front's).
    pub console: SocketAddr,
    pub pin: String,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<()>,
}

impl TestServer {
    /// An agent config for this server, living under `dir`.
    pub fn agent_toml(&self, dir: &Path) -> AgentToml {
        AgentToml::new(self.tunnel, &self.pin, dir)
    }

    pub async fn start() -> TestServer {
        Self::start_with(|_| {}).await
    }

    pub async fn start_with(f: impl FnOnce(&mut ServerOptions)) -> TestServer {
        let dir = tempfile::tempdir().unwrap();
        // Ports below the kernel's ephemeral range: a restart binds them again, and no socket
        // bound to port 0 elsewhere in the run can take one while the server is down (that
        // made the seeded walk fail once in a while with "Address already in use").
        let tunnel = quiet_addr(|a| server::bind_pair(a).is_ok());
        let tcp = || quiet_addr(|a| std::net::TcpListener::bind(a).is_ok());
        Self::start_on(dir, tunnel, tcp(), tcp(), f).await
    }

    /// Stops the server and starts it again on the same ports and data dir (a restart).
    pub async fn restart(self) -> TestServer {
        let (tunnel, public, console) = (self.tunnel, self.public, self.console);
        self.stop.cancel();
        let _ = self.task.await;
        let state = self.state;
        drop(state);
        Self::start_on(self.dir, tunnel, public, console, |_| {}).await
    }

    async fn start_on(
        dir: tempfile::TempDir,
        tunnel: SocketAddr,
        public: SocketAddr,
        console: SocketAddr,
        f: impl FnOnce(&mut ServerOptions),
    ) -> TestServer {
        // On a restart the old endpoint lets go of its port once its connections have drained
        // (3 PTO after the close; longer on an impaired path).
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let (udp, api) = loop {
            match server::bind_pair(tunnel) {
                Ok(pair) => break pair,
                Err(e) if std::time::Instant::now() > deadline => panic!("{e:#}"),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        };
        let public = TcpListener::bind(public).await.unwrap();
        let console = TcpListener::bind(console).await.unwrap();
        let console_addr = console.local_addr().unwrap();
        let public_addr = public.local_addr().unwrap();
        let tunnel = udp.local_addr().unwrap();
        let mut opts = ServerOptions {
            data_dir: dir.path().join("data"),
            public_url: url::Url::parse(&format!("http://localhost:{}", public_addr.port()))
                .unwrap(),
            public_tls: None,
            trusted_proxies: vec![],
            tls: keys::TlsSource::default(),
            console: Some(pbx_remote::server::console::ConsoleOptions {
                url: url::Url::parse(&format!("http://{console_addr}")).unwrap(),
                tls: None,
            }),
            smtp: None,
            data_threads: 1,
        };
        f(&mut opts);
        let opts_console = opts.console.is_some();
        let state = pbx_remote::server::ServerState::open(opts).unwrap();
        let pin = state.keys.pin_hex();
        let stop = CancellationToken::new();
        let listeners = Listeners {
            udp,
            api: TcpListener::from_std(api).unwrap(),
            public,
            console: opts_console.then_some(console),
        };
        let (s, st) = (stop.clone(), state.clone());
        let task = tokio::spawn(async move {
            server::serve(st, listeners, s).await.unwrap();
        });
        TestServer {
            state,
            dir,
            tunnel,
            public: public_addr,
            console: console_addr,
            pin,
            stop,
            task,
        }
    }

    /// Opens a stream to `device`'s agent as the front would, writes `header` and `raw` HTTP
    /// bytes, and returns everything the agent answers until it closes the stream.
    pub async fn inject(
        &self,
        device: &str,
        header: &pbx_remote::protocol::StreamHeader,
        raw: &[u8],
    ) -> String {
        let link = self.state.hub.get(device).expect("device connected");
        let (mut send, mut recv) = link.conn.open_bi().await.unwrap();
        pbx_remote::protocol::write_frame(&mut send, header)
            .await
            .unwrap();
        tokio::io::AsyncWriteExt::write_all(&mut send, raw)
            .await
            .unwrap();
        // Streams are kept alive for the next request: finishing ours ends it after the answer.
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut send).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(
            Duration::from_secs(15),
            tokio::io::AsyncReadExt::read_to_end(&mut recv, &mut out),
        )
        .await;
        String::from_utf8_lossy(&out).into_owned()
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn db(&self) -> Db {
        Db::open(&self.data_dir()).unwrap()
    }

    /// Adds a device; returns (id, code).
    pub fn add_device(&self, passwordless: bool) -> (String, String) {
        let added = self
            .db()
            .add_device(&NewDevice {
                name: "Test PBX".into(),
                allow_passwordless: passwordless,
                ..Default::default()
            })
            .unwrap();
        (added.id, added.code)
    }

    /// A visit link for `device`.
    pub fn visit(&self, device: &str, cm_user: &str, passwordless: bool) -> String {
        let out =
            pbx_remote::server::admin::visit(&self.data_dir(), device, cm_user, passwordless, true)
                .unwrap();
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v["url"].as_str().unwrap().to_string()
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        let _ = self.task.await;
    }
}

/// The test remote account.
pub const USER: &str = "provider";
/// Its password.
pub const PASSWORD: &str = "Test-Passw0rd-1";

/// argon2id hash of [`PASSWORD`], computed once.
pub fn password_hash() -> &'static str {
    static H: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    H.get_or_init(|| pbx_remote::password::hash(PASSWORD).unwrap())
}

/// An agent config: account [`USER`] and passwordless on, state and status under `dir`, built
/// up from the parts a test changes ([`TestServer::agent_toml`] starts one for that server).
#[derive(Clone, Debug)]
pub struct AgentToml {
    tunnel: SocketAddr,
    pin: String,
    dir: PathBuf,
    code: String,
    portal: String,
    extra: String,
}

impl AgentToml {
    /// A config for the server at `tunnel` with certificate pin `pin`, living under `dir`; the
    /// code is `UNUSED` and the portal a port where nothing answers until set.
    pub fn new(tunnel: SocketAddr, pin: &str, dir: &Path) -> AgentToml {
        AgentToml {
            tunnel,
            pin: pin.to_string(),
            dir: dir.to_path_buf(),
            code: "UNUSED".into(),
            portal: "http://127.0.0.1:9".into(),
            extra: String::new(),
        }
    }

    /// `[activation] auth_code`.
    pub fn code(mut self, code: &str) -> AgentToml {
        self.code = code.to_string();
        self
    }

    /// `[pbx] portal_url`.
    pub fn portal(mut self, url: &str) -> AgentToml {
        self.portal = url.to_string();
        self
    }

    /// TOML appended at the end (more tables); calls add up.
    pub fn extra(mut self, toml: &str) -> AgentToml {
        self.extra.push_str(toml);
        self
    }

    /// The config text.
    pub fn build(&self) -> String {
        let AgentToml {
            tunnel,
            pin,
            dir,
            code,
            portal,
            extra,
        } = self;
        format!(
            r#"
[server]
enabled = true
address = "{tunnel}"
pin_sha256 = "{pin}"

[activation]
method = "auth_code"
auth_code = "{code}"

[pbx]
edition = "software"
firmware = "83.19.0.110"
model = "Test"
serial = "SN0001"
mac = "02:00:00:00:00:01"
portal_url = "{portal}"

[remote_access]
auto_logout_minutes = 15

[remote_access.account]
enabled = true
username = "{USER}"
password_hash = "{hash}"

[remote_access.passwordless]
enabled = true

[tunnel]
heartbeat_secs = 1
drain_secs = 2

[paths]
state_dir = "{state}"
status_file = "{status}"
assertion_pubkey = "{pubkey}"
{extra}
"#,
            hash = password_hash(),
            state = dir.join("state").display(),
            status = dir.join("status.json").display(),
            pubkey = dir.join("assertion.pub").display(),
        )
    }
}

/// Runs `task` to the end on a runtime of its own on another thread, as another machine would:
/// whatever the test's own runtime does, or fails to do, does not hold it up.
pub fn on_another_thread<F>(task: F) -> std::thread::JoinHandle<F::Output>
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    std::thread::spawn(move || {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap()
            .block_on(task)
    })
}

/// An agent running in-process.
pub struct TestAgent {
    pub dir: PathBuf,
    /// Sends a reload, as SIGHUP does.
    pub reload: tokio::sync::mpsc::UnboundedSender<()>,
    pub clock: pbx_remote::agent::clock::Clock,
    pub status: StatusHandle,
    pub stop: CancellationToken,
    pub task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestAgent {
    /// Starts an agent with the config text written to `dir/agent.toml`.
    pub fn start(dir: &Path, toml: &str) -> TestAgent {
        Self::start_with_clock(dir, toml, pbx_remote::agent::clock::Clock::default())
    }

    /// Like `start`, with a clock the test controls.
    pub fn start_with_clock(
        dir: &Path,
        toml: &str,
        clock: pbx_remote::agent::clock::Clock,
    ) -> TestAgent {
        std::fs::create_dir_all(dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(&path, toml).unwrap();
        let config = AgentConfig::load(&path).unwrap();
        let status = StatusHandle::new(
            config.paths.status_file.clone(),
            pbx_remote::agent::initial_status(&config),
        );
        let stop = CancellationToken::new();
        let (reload, reloads) = tokio::sync::mpsc::unbounded_channel();
        let task = tokio::spawn(pbx_remote::agent::run_with(
            config,
            status.clone(),
            stop.clone(),
            clock.clone(),
            reloads,
        ));
        TestAgent {
            dir: dir.to_path_buf(),
            clock,
            reload,
            status,
            stop,
            task,
        }
    }

    /// Waits until the status satisfies `f`, up to `limit`; panics with the last status.
    pub async fn wait(&self, limit: Duration, f: impl Fn(&Status) -> bool) -> Status {
        let mut rx = self.status.subscribe();
        let r = tokio::time::timeout(limit, rx.wait_for(|s| f(s))).await;
        match r {
            Ok(Ok(s)) => s.clone(),
            _ => panic!(
                "status condition not met within {limit:?}; last: {:?}",
                self.status.get()
            ),
        }
    }

    /// Sends a reload and waits until the agent has handled it (`config_generation` moved on).
    pub async fn reload_and_wait(&self) -> Status {
        let before = self.status.get().config_generation;
        self.reload.send(()).unwrap();
        self.wait(Duration::from_secs(10), |s| s.config_generation > before)
            .await
    }

    /// Moves the clock past the longest retry backoff, then has a reload acknowledged: the
    /// agent polls its run before it handles a reload, so any attempt the move made due has
    /// been counted by the time this returns. Twice: a move that lands before the agent has
    /// started its backoff wait is lost, and the first acknowledgement shows that it has.
    pub async fn move_past_backoff(&self) {
        for _ in 0..2 {
            self.clock.advance(pbx_remote::agent::BACKOFF_CAP * 2);
            self.reload_and_wait().await;
        }
    }

    /// Activation requests the agent has sent (`pbxra_activation_attempts_total`; its config
    /// has `[metrics] listen`).
    pub async fn activation_attempts(&self) -> u64 {
        let port = self.metrics_port().await;
        metric(port, "pbxra_activation_attempts_total")
            .await
            .expect("the counter is exported") as u64
    }

    /// Where the agent serves `/metrics` (its config has `[metrics] listen`).
    pub async fn metrics_port(&self) -> u16 {
        let s = self
            .wait(Duration::from_secs(10), |s| s.metrics_listen.is_some())
            .await;
        s.metrics_listen
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .expect("metrics_listen is an address")
            .port()
    }

    pub async fn connected(&self) -> Status {
        self.wait(Duration::from_secs(20), |s| s.state == State::Connected)
            .await
    }

    pub async fn shutdown(self) {
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
    }
}

/// `[metrics]` on a port the agent's own bind picks (`status.metrics_listen` says which).
pub const METRICS_ON_ANY_PORT: &str = "[metrics]\nlisten = \"127.0.0.1:0\"\n";

/// Everything for one device: server, portal, agent, connected.
pub struct World {
    pub server: TestServer,
    pub portal: PortalFixture,
    pub agent: TestAgent,
    pub device: String,
    pub tmp: tempfile::TempDir,
}

impl World {
    pub async fn start(passwordless: bool, extra: &str) -> World {
        let extra = extra.to_string();
        Self::start_with_toml(passwordless, move |t| format!("{t}{extra}")).await
    }

    /// An account-login world whose agent serves `/metrics` on the returned port.
    pub async fn with_metrics() -> (World, u16) {
        let w = Self::start(false, METRICS_ON_ANY_PORT).await;
        let port = w.agent.metrics_port().await;
        (w, port)
    }

    /// Like `start`, with the agent's TOML passed through `edit` first.
    pub async fn start_with_toml(passwordless: bool, edit: impl FnOnce(String) -> String) -> World {
        Self::start_on(TestServer::start().await, passwordless, edit).await
    }

    /// Like `start_with_toml`, with a server started by the caller.
    pub async fn start_on(
        server: TestServer,
        passwordless: bool,
        edit: impl FnOnce(String) -> String,
    ) -> World {
        let portal = PortalFixture::start().await;
        let (device, code) = server.add_device(passwordless);
        let tmp = tempfile::tempdir().unwrap();
        let toml = edit(
            server
                .agent_toml(&tmp.path().join("agent"))
                .code(&code)
                .portal(&portal.url())
                .build(),
        );
        let agent = TestAgent::start(&tmp.path().join("agent"), &toml);
        agent.connected().await;
        World {
            server,
            portal,
            agent,
            device,
            tmp,
        }
    }

    /// A visitor that has confirmed a visit link but has no agent session yet.
    pub async fn granted(&self, cm_user: &str, passwordless: bool) -> Visitor {
        let url = self.server.visit(&self.device, cm_user, passwordless);
        let mut v = Visitor::new(self.server.public, &self.device);
        v.open_visit(&url).await;
        v
    }

    /// A visitor with a session: account login, or the passwordless exchange.
    pub async fn visitor(&self, cm_user: &str, passwordless: bool) -> Visitor {
        let mut v = self.granted(cm_user, passwordless).await;
        if passwordless {
            let r = v.get("/__remote/passwordless").await;
            assert_eq!(
                r.status(),
                303,
                "passwordless exchange: {:?}",
                r.text().await
            );
        } else {
            let r = v.login(USER, PASSWORD).await;
            assert_eq!(r.status(), 303, "login: {:?}", r.text().await);
        }
        v
    }
}

/// A browser stand-in for one device host: sends `Host`, keeps cookies by hand.
pub struct Visitor {
    pub client: reqwest::Client,
    pub origin: String,
    pub cookies: Vec<(String, String)>,
    pub public: SocketAddr,
    pub host: String,
}

impl Visitor {
    pub fn new(public: SocketAddr, device: &str) -> Visitor {
        Self::from_address(public, device, None)
    }

    /// A visitor whose connections leave from `local` (another loopback address is another
    /// network to the front: 127.1.0.1 is not in 127.0.0.1's /24).
    pub fn from_address(public: SocketAddr, device: &str, local: Option<IpAddr>) -> Visitor {
        pbx_remote::tls::install_default_provider();
        let host = format!("{device}.localhost");
        let client = reqwest::Client::builder()
            .local_address(local)
            .resolve(&host, public)
            .redirect(reqwest::redirect::Policy::none())
            .no_proxy()
            .build()
            .unwrap();
        Visitor {
            client,
            origin: format!("http://{host}:{}", public.port()),
            cookies: vec![],
            public,
            host,
        }
    }

    pub fn cookie_header(&self) -> String {
        self.cookies
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("; ")
    }

    fn take_cookies(&mut self, resp: &reqwest::Response) {
        for c in resp.headers().get_all("set-cookie") {
            let c = c.to_str().unwrap();
            let (name, rest) = c.split_once('=').unwrap();
            let value = rest.split(';').next().unwrap().to_string();
            self.cookies.retain(|(k, _)| k != name);
            if !value.is_empty() {
                self.cookies.push((name.to_string(), value));
            }
        }
    }

    /// GET a path (or absolute URL) with the visitor's cookies.
    pub async fn get(&mut self, path: &str) -> reqwest::Response {
        let url = if path.starts_with("http") {
            path.to_string()
        } else {
            format!("{}{path}", self.origin)
        };
        let mut rb = self.client.get(url).header("accept", "text/html");
        if !self.cookies.is_empty() {
            rb = rb.header("cookie", self.cookie_header());
        }
        let resp = rb.send().await.unwrap();
        self.take_cookies(&resp);
        resp
    }

    /// A request builder with cookies and Origin set.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        let mut rb = self
            .client
            .request(method, format!("{}{path}", self.origin))
            .header("origin", &self.origin);
        if !self.cookies.is_empty() {
            rb = rb.header("cookie", self.cookie_header());
        }
        rb
    }

    /// Opens a visit link: GET the confirm page, POST the form; returns the POST response.
    pub async fn open_visit(&mut self, url: &str) -> reqwest::Response {
        let page = self.get(url).await;
        assert_eq!(page.status(), 200, "confirm page");
        let html = page.text().await.unwrap();
        assert!(html.contains("<form method=\"post\""), "{html}");
        self.post_visit(url).await
    }

    /// Posts the login form.
    pub async fn login(&mut self, user: &str, password: &str) -> reqwest::Response {
        let resp = self
            .request(reqwest::Method::POST, "/__remote/login")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!(
                "username={}&password={}&next=%2F",
                url::form_urlencoded::byte_serialize(user.as_bytes()).collect::<String>(),
                url::form_urlencoded::byte_serialize(password.as_bytes()).collect::<String>()
            ))
            .send()
            .await
            .unwrap();
        self.take_cookies(&resp);
        resp
    }

    /// Logs out as the browser does: a same-origin POST.
    pub async fn logout(&mut self) -> reqwest::Response {
        let resp = self
            .request(reqwest::Method::POST, "/__remote/logout")
            .send()
            .await
            .unwrap();
        self.take_cookies(&resp);
        resp
    }

    /// The cookie named `name`, if held.
    pub fn cookie(&self, name: &str) -> Option<&str> {
        self.cookies
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Opens `/ws` through the front with this visitor's cookies and the given `Origin`.
    pub async fn websocket(
        &self,
        origin: &str,
    ) -> Result<
        (
            tokio_tungstenite::WebSocketStream<tokio::net::TcpStream>,
            tokio_tungstenite::tungstenite::handshake::client::Response,
        ),
        tokio_tungstenite::tungstenite::Error,
    > {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = format!("ws://{}:{}/ws", self.host, self.public.port())
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("cookie", self.cookie_header().parse().unwrap());
        req.headers_mut().insert("origin", origin.parse().unwrap());
        let tcp = tokio::net::TcpStream::connect(self.public).await.unwrap();
        tokio_tungstenite::client_async_with_config(req, tcp, Some(unlimited_ws())).await
    }

    pub async fn post_visit(&mut self, url: &str) -> reqwest::Response {
        let resp = self
            .client
            .post(url)
            .header("origin", &self.origin)
            .send()
            .await
            .unwrap();
        self.take_cookies(&resp);
        resp
    }
}

/// Reads `VmRSS`/`VmHWM` (KiB) of a process.
pub fn proc_mem_kib(pid: u32, field: &str) -> u64 {
    let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    s.lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Polls `f` every 50 ms until it returns `Some`, panicking with `what` after `limit`.
pub async fn eventually<T>(limit: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not within {limit:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A child process killed when dropped, so a failing test leaves no orphan behind (an orphan
/// holding the test's stdout keeps a `| grep` waiting forever).
pub struct ChildGuard(pub std::process::Child);

/// The agent binary in a process of its own (so its memory and fds are its own), reading the
/// config written to `dir/agent.toml`; `cmd` adds environment and output. Killed on drop.
pub struct AgentProcess {
    pub child: ChildGuard,
    pub config: PathBuf,
    pub status_file: PathBuf,
}

impl AgentProcess {
    /// Writes `toml` (whose state and status live under `dir`, as [`agent_toml`] puts them) and
    /// starts `pbx-remote-agent run` on it.
    pub fn spawn(
        dir: &Path,
        toml: &str,
        cmd: impl FnOnce(&mut std::process::Command),
    ) -> AgentProcess {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("agent.toml");
        std::fs::write(&config, toml).unwrap();
        let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_pbx-remote-agent"));
        c.args(["run", "-c"])
            .arg(&config)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        cmd(&mut c);
        AgentProcess {
            child: ChildGuard(c.spawn().unwrap()),
            config,
            status_file: dir.join("status.json"),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.0.id()
    }

    /// Polls the status file until `f` holds (30 s at most; panics naming `what`).
    pub async fn wait_status(&self, what: &str, f: impl Fn(&Status) -> bool) -> Status {
        eventually(Duration::from_secs(30), what, || {
            pbx_remote::status::read(&self.status_file)
                .ok()
                .filter(|s| f(s))
        })
        .await
    }

    pub async fn connected(&self) -> Status {
        self.wait_status("agent connected", |s| s.state == State::Connected)
            .await
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A loopback port free right now, for listeners that cannot report a port-0 bind back.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Open file descriptors of process `pid` (0 if it is gone).
pub fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// Reads a response body to the end: (bytes, SHA-256 hex).
pub async fn body_sha256(mut resp: reqwest::Response) -> (u64, String) {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut got = 0u64;
    while let Some(chunk) = resp.chunk().await.unwrap() {
        got += chunk.len() as u64;
        ctx.update(&chunk);
    }
    (got, hex::encode(ctx.finish().as_ref()))
}

/// One unlabelled sample from an agent's `/metrics` on `port`.
pub async fn metric(port: u16, name: &str) -> Option<f64> {
    pbx_remote::tls::install_default_provider();
    let text = reqwest::Client::builder()
        .no_proxy()
        .build()
        .ok()?
        .get(format!("http://127.0.0.1:{port}/metrics"))
        .send()
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    sample(&text, name)
}

/// The value of `series` (name with its labels, as exposed) in Prometheus text.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// An agent TOML edit that sets `[tunnel] transport` (`"auto"`, `"quic"` or `"tcp"`).
pub fn transport(kind: &str) -> impl FnOnce(String) -> String {
    let line = format!("[tunnel]\ntransport = \"{kind}\"\n");
    move |t: String| t.replacen("[tunnel]\n", &line, 1)
}

/// Server, portal, relay and an agent that dials the server through the relay.
pub struct Net {
    pub server: TestServer,
    pub portal: PortalFixture,
    pub relay: relay::Relay,
    pub agent: TestAgent,
    pub device: String,
    pub _tmp: tempfile::TempDir,
}

impl Net {
    /// Everything started; `before` impairs the path before the agent's first packet.
    pub async fn start(before: relay::Impair, extra: &str) -> Net {
        Net::start_edited(before, extra, |t| t).await
    }

    /// As [`Net::start`], with the agent's config text edited first.
    pub async fn start_edited(
        before: relay::Impair,
        extra: &str,
        edit: impl FnOnce(String) -> String,
    ) -> Net {
        let server = TestServer::start().await;
        let portal = PortalFixture::start().await;
        let relay = relay::Relay::start(server.tunnel).await;
        relay.set_both(before);
        let (device, code) = server.add_device(false);
        let tmp = tempfile::tempdir().unwrap();
        let toml = edit(
            AgentToml::new(relay.addr, &server.pin, &tmp.path().join("agent"))
                .code(&code)
                .portal(&portal.url())
                .extra(extra)
                .build(),
        );
        let agent = TestAgent::start(&tmp.path().join("agent"), &toml);
        Net {
            server,
            portal,
            relay,
            agent,
            device,
            _tmp: tmp,
        }
    }

    pub async fn visitor(&self) -> Visitor {
        let url = self.server.visit(&self.device, "alice", false);
        let mut v = Visitor::new(self.server.public, &self.device);
        v.open_visit(&url).await;
        assert_eq!(v.login(USER, PASSWORD).await.status(), 303);
        v
    }
}

/// Whether this process runs as root (effective uid 0).
pub fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .map(|s| {
            s.lines()
                .any(|l| l.starts_with("Uid:") && l.split_whitespace().nth(2) == Some("0"))
        })
        .unwrap_or(false)
}

/// Whether a test that needs root may go on: as root, yes, and what it needs must then work
/// (the caller asserts it). As another user it says SKIPPED and returns false, unless
/// `PBXRA_REQUIRE_ROOT` is set, where running without root is a failure.
pub fn root_or_skip(what: &str) -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var_os("PBXRA_REQUIRE_ROOT").is_none(),
        "PBXRA_REQUIRE_ROOT is set but this test runs without root: {what}"
    );
    eprintln!("SKIPPED (not root): {what}");
    false
}

/// A visitor of `device` through the front at `public` who confirmed `visit_url` and logged in
/// with the remote account.
pub async fn logged_in(public: SocketAddr, visit_url: &str, device: &str) -> Visitor {
    let mut v = Visitor::new(public, device);
    v.open_visit(visit_url).await;
    assert_eq!(v.login(USER, PASSWORD).await.status(), 303);
    v
}

/// How many operation-log entries of `device` have this `action` (read as an admin).
pub fn oplog_actions(server: &TestServer, device: &str, action: &str) -> usize {
    use pbx_remote::server::db::{NewUser, OpFilter, Role, Scope};
    let db = server.db();
    let reader = match db.user("log-reader@example.com").unwrap() {
        Some(u) => u,
        None => db
            .add_user(&NewUser {
                email: "log-reader@example.com".into(),
                password_hash: "unused".into(),
                role: Role::Admin,
                scope: Scope::All,
            })
            .unwrap(),
    };
    let f = OpFilter {
        device: Some(device.to_string()),
        limit: 100,
        ..Default::default()
    };
    db.oplog(&reader, &f)
        .unwrap()
        .into_iter()
        .filter(|o| o.action == action)
        .count()
}

/// A free loopback address whose port lies below the kernel's ephemeral range
/// (`ip_local_port_range`), picked at random until `free` says it could be bound (the probe's
/// sockets are closed again before this returns).
fn quiet_addr(free: impl Fn(SocketAddr) -> bool) -> SocketAddr {
    static DRAWS: AtomicUsize = AtomicUsize::new(0);
    let low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    let from = low.saturating_sub(12_000).max(1024);
    let span = u64::from(low - from).max(1);
    for _ in 0..200 {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos() as u64;
        let draw = DRAWS.fetch_add(1, Ordering::SeqCst) as u64;
        let mut x =
            nanos ^ (draw.wrapping_mul(0x9e37_79b9_7f4a_7c15)) ^ u64::from(std::process::id());
        x ^= x >> 31;
        x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
        x ^= x >> 29;
        let addr = SocketAddr::from(([127, 0, 0, 1], from + (x % span) as u16));
        if free(addr) {
            return addr;
        }
    }
    panic!("no free port below the ephemeral range after 200 draws");
}
