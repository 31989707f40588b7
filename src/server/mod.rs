//! The reference self-hosted CM server: registry (SQLite), activation API (HTTPS), tunnel hub
//! (QUIC) on the same address, and the public front that turns visits into tunnel streams.

pub mod admin;
pub mod api;
pub mod console;
pub mod datapath;
pub mod db;
pub mod demo;
pub(crate) mod demo_portal;
pub(crate) mod front;
pub mod health;
pub mod hub;
pub mod keys;
pub mod mail;
pub mod passwords;
pub(crate) mod refusal;
pub mod transport;

use anyhow::{Context, Result};
use ipnet::IpNet;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::protocol::Scheme;

/// Options of `pbx-remote-server run`.
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Data directory.
    pub data_dir: PathBuf,
    /// Visitor-facing base URL of the front, e.g. `http://localhost:8080`.
    pub public_url: Url,
    /// Certificate and key for HTTPS on the front.
    pub public_tls: Option<(PathBuf, PathBuf)>,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
    /// TLS identity for API and tunnel.
    pub tls: keys::TlsSource,
    /// The provider console, when it is served.
    pub console: Option<console::ConsoleOptions>,
    /// Outgoing mail (Send to Email), when configured.
    pub smtp: Option<mail::SmtpOptions>,
    /// Threads of the data path (tunnel and front, [`datapath`]); 1 runs it on one thread.
    pub data_threads: usize,
}

impl ServerOptions {
    /// The browser's address for a request that came from `peer`: the peer itself, unless it is
    /// a trusted proxy, then the nearest `X-Forwarded-For` hop that is not one (the front's and
    /// the console's lockouts, audit and stream header all count this address). A header from an
    /// untrusted peer is ignored, so nobody picks their own address.
    pub fn client_of(&self, peer: IpAddr, headers: &http::HeaderMap) -> IpAddr {
        let trusted = |a: &IpAddr| self.trusted_proxies.iter().any(|c| c.contains(a));
        if !trusted(&peer) {
            return peer;
        }
        let hops = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|h| h.trim().parse::<IpAddr>().ok());
        let mut addr = peer;
        for hop in hops.rev() {
            addr = hop;
            if !trusted(&hop) {
                break;
            }
        }
        addr
    }
}

/// The source a request counts against in the lockouts and the password line: its address; an
/// IPv4 client that a dual-stack listener shows as IPv4-mapped IPv6, as that IPv4 address; an
/// IPv6 client, as its /64 (one host is often given a whole /64).
pub fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut o = v6.octets();
                o[8..].fill(0);
                IpAddr::V6(o.into())
            }
        },
        v4 => v4,
    }
}

/// Sockets `run` serves on; the caller binds them (tests use port 0).
pub struct Listeners {
    /// UDP for QUIC.
    pub udp: std::net::UdpSocket,
    /// TCP for the HTTPS activation API (same port as `udp`).
    pub api: TcpListener,
    /// TCP for the public front.
    pub public: TcpListener,
    /// TCP for the console (with [`ServerOptions::console`]).
    pub console: Option<TcpListener>,
}

/// Parses a `--trusted-proxy` value: an IP prefix (`10.1.0.0/16`, `2001:db8::/33`) or a single
/// address, which means just that host.
pub fn parse_trusted_proxy(s: &str) -> Result<IpNet, String> {
    if s.contains('/') {
        s.parse::<IpNet>()
            .map_err(|_| format!("{s:?} is not an IP prefix (address/length, length ≤ 32 or 128)"))
    } else {
        s.parse::<IpAddr>()
            .map(IpNet::from)
            .map_err(|_| format!("{s:?} is not an IP address or prefix"))
    }
}

/// What the server's tasks share.
pub struct ServerState {
    /// Registry.
    pub db: db::Db,
    /// Keys.
    pub keys: keys::ServerKeys,
    /// Connected devices.
    pub hub: hub::Hub,
    /// Options.
    pub opts: ServerOptions,
    /// Outgoing mail, with `--smtp-url`.
    pub mailer: Option<mail::Mailer>,
    /// The bound on password checks and hashes (console sign-in, activation by account).
    pub passwords: passwords::Passwords,
}

/// Binds UDP and TCP on the same `addr` (port 0 picks one free for both).
pub fn bind_pair(addr: SocketAddr) -> Result<(std::net::UdpSocket, std::net::TcpListener)> {
    for _ in 0..50 {
        let udp =
            std::net::UdpSocket::bind(addr).with_context(|| format!("cannot bind UDP {addr}"))?;
        let port = udp.local_addr()?.port();
        match std::net::TcpListener::bind(SocketAddr::new(addr.ip(), port)) {
            Ok(tcp) => {
                tcp.set_nonblocking(true)?;
                return Ok((udp, tcp));
            }
            Err(e) if addr.port() != 0 => {
                return Err(e).with_context(|| format!("cannot bind TCP {addr}"))
            }
            Err(_) => continue,
        }
    }
    anyhow::bail!("no port free for both UDP and TCP on {}", addr.ip())
}

impl ServerState {
    /// Opens the data dir: keys (generated on first start) and the registry.
    pub fn open(opts: ServerOptions) -> Result<Arc<ServerState>> {
        if Scheme::parse(opts.public_url.scheme()).is_none() || opts.public_url.host_str().is_none()
        {
            anyhow::bail!(
                "--public-url {}: expected http:// or https:// and a host name",
                opts.public_url
            );
        }
        if let Some(c) = &opts.console {
            console::check_console_url(&c.url, &opts.public_url)?;
        }
        let mailer = opts.smtp.as_ref().map(mail::Mailer::new).transpose()?;
        let keys = keys::ServerKeys::load_or_create(&opts.data_dir, &opts.tls)?;
        let db = db::Db::open(&opts.data_dir)?;
        db.all_offline()?;
        db.set_setting("public_url", opts.public_url.as_str())?;
        db.set_setting("pin_sha256", &keys.pin_hex())?;
        Ok(Arc::new(ServerState {
            db,
            keys,
            hub: hub::Hub::default(),
            opts,
            mailer,
            passwords: passwords::Passwords::default(),
        }))
    }
}

/// The setting that keeps the address agents are given (`[server] address`).
pub const AGENT_ADDRESS: &str = "agent_address";

/// The `host:port` a PBX's `[server] address` takes: the first `--tls-name` (what the
/// certificate names) with the tunnel's port, else the listening address itself.
pub fn agent_address(listen: SocketAddr, names: &[String]) -> String {
    match names.first() {
        Some(n) if n.contains(':') && n.parse::<std::net::Ipv6Addr>().is_ok() => {
            format!("[{n}]:{}", listen.port())
        }
        Some(n) => format!("{n}:{}", listen.port()),
        None => listen.to_string(),
    }
}

/// Runs the server until `shutdown`.
pub async fn run(
    opts: ServerOptions,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<()> {
    serve(ServerState::open(opts)?, listeners, shutdown).await
}

/// Serves an opened state on `listeners` until `shutdown`.
pub async fn serve(
    state: Arc<ServerState>,
    listeners: Listeners,
    shutdown: CancellationToken,
) -> Result<()> {
    let address = agent_address(listeners.udp.local_addr()?, &state.opts.tls.names);
    state.db.set_setting(AGENT_ADDRESS, &address)?;
    let data = datapath::DataRuntime::start(state.opts.data_threads)?;
    // The tunnel's and the front's sockets belong to the data path's reactor (the endpoint's
    // driver is spawned there too); the console's stays with the caller's runtime.
    let (endpoint, api_listener, public_listener) = {
        let _data = data.handle().enter();
        (
            hub::endpoint(&state.keys, listeners.udp)?,
            TcpListener::from_std(listeners.api.into_std()?)?,
            TcpListener::from_std(listeners.public.into_std()?)?,
        )
    };
    let api_tls = api::tls_acceptor(&state.keys)?;
    let public_tls = match &state.opts.public_tls {
        Some((cert, key)) => Some(front::tls_acceptor(
            cert,
            key,
            "--public-cert/--public-key",
        )?),
        None => None,
    };
    tracing::info!(
        tunnel = %endpoint.local_addr()?,
        public = %public_listener.local_addr()?,
        pin_sha256 = %state.keys.pin_hex(),
        "server listening"
    );
    let tasks = tokio_util::task::TaskTracker::new();
    // Links (registry work, control streams) and activations run here, beside the console:
    // see hub::serve and api::serve.
    let links = tokio::runtime::Handle::current();
    tasks.spawn_on(
        hub::serve(
            state.clone(),
            endpoint.clone(),
            links.clone(),
            shutdown.clone(),
        ),
        data.handle(),
    );
    tasks.spawn(hub::watch_registry(state.clone(), shutdown.clone()));
    // The API's port also takes the TCP transport (ALPN pbxra-tcp/1).
    let api_or_tunnel = transport::ApiOrTunnel {
        api: api_tls.config().clone(),
        tunnel: transport::tcp_tls(&state.keys)?,
        state: state.clone(),
        shutdown: shutdown.clone(),
        links: links.clone(),
    };
    tasks.spawn_on(
        api::serve(
            state.clone(),
            api_listener,
            api_or_tunnel,
            links,
            shutdown.clone(),
        ),
        data.handle(),
    );
    tasks.spawn_on(
        front::serve(state.clone(), public_listener, public_tls, shutdown.clone()),
        data.handle(),
    );
    match (&state.opts.console, listeners.console) {
        (Some(opts), Some(listener)) => {
            tracing::info!(console = %opts.url, listen = %listener.local_addr()?, "console listening");
            let (state, opts, stop) = (state.clone(), opts.clone(), shutdown.clone());
            tasks.spawn(async move {
                if let Err(e) = console::serve(state, opts, listener, stop).await {
                    tracing::error!(error = %format!("{e:#}"), "console stopped");
                }
            });
        }
        (None, None) => {}
        _ => anyhow::bail!("the console needs both its options and a listener"),
    }
    tasks.close();
    shutdown.cancelled().await;
    endpoint.close(crate::protocol::CLOSE_NORMAL.into(), b"server stopping");
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), tasks.wait()).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), endpoint.wait_idle()).await;
    data.end().await;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trusted_proxy_prefixes() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let c = parse_trusted_proxy("10.1.0.0/16").unwrap();
        assert!(c.contains(&ip("10.1.200.3")));
        assert!(!c.contains(&ip("10.2.0.1")));
        assert!(!c.contains(&ip("::ffff:10.1.0.1")));
        let c = parse_trusted_proxy("2001:db8::/33").unwrap();
        assert!(c.contains(&ip("2001:db8:7fff::1")));
        assert!(!c.contains(&ip("2001:db8:8000::1")));
        let one = parse_trusted_proxy("127.0.0.1").unwrap();
        assert!(one.contains(&ip("127.0.0.1")));
        assert!(!one.contains(&ip("127.0.0.2")));
        assert!(parse_trusted_proxy("10.0.0.0/33").is_err());
        assert!(parse_trusted_proxy("proxy.example.com").is_err());
    }

    #[test]
    fn a_source_is_the_ipv4_address_or_the_ipv6_64() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(source_of(ip("198.51.100.7")), ip("198.51.100.7"));
        // As a dual-stack listener shows an IPv4 client: not all of them in one ::ffff:0:0/64.
        assert_eq!(source_of(ip("::ffff:198.51.100.7")), ip("198.51.100.7"));
        assert_eq!(source_of(ip("2001:db8:1:2:3:4:5:6")), ip("2001:db8:1:2::"));
    }

    #[test]
    fn the_client_is_the_nearest_hop_that_is_not_a_trusted_proxy() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let opts = ServerOptions {
            data_dir: PathBuf::new(),
            public_url: Url::parse("http://localhost").unwrap(),
            public_tls: None,
            trusted_proxies: vec![parse_trusted_proxy("10.0.0.0/8").unwrap()],
            tls: keys::TlsSource::default(),
            console: None,
            smtp: None,
            data_threads: 1,
        };
        let forwarded = |values: &[&str]| {
            let mut h = http::HeaderMap::new();
            for v in values {
                h.append("x-forwarded-for", v.parse().unwrap());
            }
            h
        };
        // A browser's own claims (the leftmost hops) count only past the last trusted proxy.
        let h = forwarded(&["6.6.6.6, 1.2.3.4", "10.0.0.9"]);
        assert_eq!(opts.client_of(ip("10.0.0.1"), &h), ip("1.2.3.4"));
        assert_eq!(opts.client_of(ip("192.0.2.1"), &h), ip("192.0.2.1"));
        let h = forwarded(&["bogus, 10.0.0.7"]);
        assert_eq!(opts.client_of(ip("10.0.0.1"), &h), ip("10.0.0.7"));
        assert_eq!(
            opts.client_of(ip("10.0.0.1"), &forwarded(&[])),
            ip("10.0.0.1")
        );
    }
}
