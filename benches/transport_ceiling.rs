//! The transport's ceiling on this machine: what the tunnel could reach if the HTTP layers on
//! both ends cost nothing. One process, two tokio runtimes on their own threads (the answering
//! side stands for the agent, the load side for the front), the same work over three
//! transports, interleaved round by round so all see the same noise:
//!
//! - `tcp`: plain loopback TCP (the baseline; what direct nginx rides on);
//! - `tls`: TLS 1.3 over TCP with the project's rustls provider (what rathole-tls rides on);
//! - `quic`: quinn with the tunnel's own settings — [`transport_config`], [`tune_udp`], the same
//!   provider, quinn's default MTU ceiling (1452) — the load side opening streams on the
//!   answering side, as the front opens request streams on the agent.
//!
//! Work: `bulk`, one stream carrying 256 MiB in 64 KiB writes (MiB/s); `small`, 32 kept
//! streams each looping a 300-byte request and a 1 400-byte answer (requests/s and p99).
//!
//! `cargo bench --bench transport_ceiling` (env `CEILING_ROUNDS`, default 3;
//! `CEILING_SECS`, seconds per small run, default 5; `CEILING_VARIANTS`, comma-separated quinn
//! settings to try as extra rows beside the tunnel's: `bbr`, `win16` (16/64 MiB windows),
//! `noackfreq`, `nofair`, `nogso`, `iw` (a 1 MiB initial window)).

use anyhow::{Context, Result};
use pbx_remote::protocol::STREAM_CREDIT;
use pbx_remote::quic::{transport_config, tune_udp};
use pbx_remote::tls::provider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::runtime::Runtime;

const BULK: usize = 256 << 20;
const CHUNK: usize = 64 << 10;
const CONNS: usize = 32;
const REQUEST: usize = 300;
const ANSWER: usize = 1400;
const ALPN: &[u8] = b"ceiling";

trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}
type Stream = Box<dyn Duplex>;

#[derive(Clone, PartialEq)]
enum Kind {
    Tcp,
    Tls,
    /// The tunnel's settings with a variant applied ("" for none).
    Quic(String),
}

impl Kind {
    fn name(&self) -> String {
        match self {
            Kind::Tcp => "tcp".into(),
            Kind::Tls => "tls".into(),
            Kind::Quic(v) if v.is_empty() => "quic".into(),
            Kind::Quic(v) => format!("quic+{v}"),
        }
    }
}

/// The tunnel's transport settings with `variant` applied.
fn transport(max_bidi: u32, variant: &str) -> Result<quinn::TransportConfig> {
    let mut t = transport_config(max_bidi);
    match variant {
        "" => {}
        "bbr" => {
            t.congestion_controller_factory(Arc::new(quinn::congestion::BbrConfig::default()));
        }
        "win16" => {
            t.stream_receive_window((16u32 << 20).into());
            t.receive_window((64u32 << 20).into());
            t.send_window(64 << 20);
        }
        "noackfreq" => {
            t.ack_frequency_config(None);
        }
        "nofair" => {
            t.send_fairness(false);
        }
        "nogso" => {
            t.enable_segmentation_offload(false);
        }
        "iw" => {
            let mut cubic = quinn::congestion::CubicConfig::default();
            cubic.initial_window(1 << 20);
            t.congestion_controller_factory(Arc::new(cubic));
        }
        other => anyhow::bail!("unknown CEILING_VARIANTS entry {other:?}"),
    }
    Ok(t)
}

/// The answering side of one stream: `B` → the bulk body then end; `S` → an answer per request
/// until the peer ends.
async fn answer(mut s: Stream) -> std::io::Result<()> {
    let mut kind = [0u8; 1];
    s.read_exact(&mut kind).await?;
    if kind[0] == b'B' {
        let chunk = vec![0x5a; CHUNK];
        for _ in 0..BULK / CHUNK {
            s.write_all(&chunk).await?;
        }
        return s.shutdown().await;
    }
    let mut request = [0u8; REQUEST];
    let reply = vec![0x5a; ANSWER];
    loop {
        match s.read_exact(&mut request).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        s.write_all(&reply).await?;
        s.flush().await?;
    }
}

struct Certs {
    cert: CertificateDer<'static>,
    key: PrivatePkcs8KeyDer<'static>,
}

fn server_tls(c: &Certs) -> Result<rustls::ServerConfig> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(
            vec![c.cert.clone()],
            PrivateKeyDer::Pkcs8(c.key.clone_key()),
        )?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

fn client_tls(c: &Certs) -> Result<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(c.cert.clone())?;
    let mut cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_no_client_auth();
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

/// The load side's handle on one transport: opens streams to the answering side.
enum Opener {
    Tcp(SocketAddr),
    Tls(SocketAddr, tokio_rustls::TlsConnector),
    Quic(quinn::Connection),
}

impl Opener {
    async fn open(&self, kind: u8) -> Result<Stream> {
        let mut s: Stream = match self {
            Opener::Tcp(addr) => {
                let s = tokio::net::TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                Box::new(s)
            }
            Opener::Tls(addr, connector) => {
                let s = tokio::net::TcpStream::connect(addr).await?;
                s.set_nodelay(true)?;
                let name = rustls::pki_types::ServerName::try_from("localhost")?;
                Box::new(connector.connect(name, s).await?)
            }
            Opener::Quic(conn) => {
                let (send, recv) = conn.open_bi().await?;
                Box::new(tokio::io::join(recv, send))
            }
        };
        s.write_all(&[kind]).await?;
        Ok(s)
    }
}

/// Starts the answering side of `kind` on `answering` and returns the load side's opener.
/// For QUIC the answering side connects (it is the agent) and the load side listens.
fn setup(kind: &Kind, certs: &Certs, answering: &Runtime, load: &Runtime) -> Result<Opener> {
    match kind {
        Kind::Tcp | Kind::Tls => {
            let tls = *kind == Kind::Tls;
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_tls(certs)?));
            let listener = answering.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
            let addr = listener.local_addr()?;
            answering.spawn(async move {
                while let Ok((s, _)) = listener.accept().await {
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        let _ = s.set_nodelay(true);
                        let stream: Stream = if tls {
                            match acceptor.accept(s).await {
                                Ok(s) => Box::new(s),
                                Err(_) => return,
                            }
                        } else {
                            Box::new(s)
                        };
                        let _ = answer(stream).await;
                    });
                }
            });
            Ok(if tls {
                let connector = tokio_rustls::TlsConnector::from(Arc::new(client_tls(certs)?));
                Opener::Tls(addr, connector)
            } else {
                Opener::Tcp(addr)
            })
        }
        Kind::Quic(variant) => {
            let mut server = quinn::ServerConfig::with_crypto(Arc::new(
                quinn::crypto::rustls::QuicServerConfig::try_from(server_tls(certs)?)?,
            ));
            // As the server's hub: the agent opens only its control stream.
            server.transport_config(Arc::new(transport(4, variant)?));
            let load_ep = endpoint(load, Some(server))?;
            let addr = load_ep.local_addr()?;
            let mut client = quinn::ClientConfig::new(Arc::new(
                quinn::crypto::rustls::QuicClientConfig::try_from(client_tls(certs)?)?,
            ));
            // As the agent: the stream credit it gives the server.
            client.transport_config(Arc::new(transport(STREAM_CREDIT, variant)?));
            let answer_ep = endpoint(answering, None)?;
            // quinn spawns the connection's driver on the runtime it is called from.
            let connecting = {
                let _runtime = answering.enter();
                answer_ep.connect_with(client, addr, "localhost")?
            };
            answering.spawn(async move {
                let Ok(conn) = connecting.await else { return };
                // Keeps the endpoint alive as long as the connection serves.
                let _endpoint = answer_ep;
                while let Ok((send, recv)) = conn.accept_bi().await {
                    tokio::spawn(answer(Box::new(tokio::io::join(recv, send))));
                }
            });
            let conn = load.block_on(async {
                let incoming = load_ep.accept().await.context("no QUIC connection")?;
                anyhow::Ok(incoming.await?)
            })?;
            Ok(Opener::Quic(conn))
        }
    }
}

/// A UDP socket set up as the tunnel's (buffers, non-blocking) and a quinn endpoint on it,
/// driven by `rt`.
fn endpoint(rt: &Runtime, server: Option<quinn::ServerConfig>) -> Result<quinn::Endpoint> {
    let sock = std::net::UdpSocket::bind("127.0.0.1:0")?;
    tune_udp(&sock);
    sock.set_nonblocking(true)?;
    let _guard = rt.enter();
    Ok(quinn::Endpoint::new(
        quinn::EndpointConfig::default(),
        server,
        sock,
        Arc::new(quinn::TokioRuntime),
    )?)
}

/// One bulk transfer → MiB/s.
async fn bulk(opener: &Opener) -> Result<f64> {
    let started = Instant::now();
    let mut s = opener.open(b'B').await?;
    let mut buf = vec![0u8; CHUNK];
    let mut got = 0;
    loop {
        let n = s.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        got += n;
    }
    anyhow::ensure!(got == BULK, "bulk carried {got} of {BULK} bytes");
    Ok(got as f64 / 1048576.0 / started.elapsed().as_secs_f64())
}

/// `CONNS` request loops for `secs` → (requests/s, p99 ms).
async fn small(opener: &Opener, secs: u64) -> Result<(f64, f64)> {
    let mut streams = Vec::with_capacity(CONNS);
    for _ in 0..CONNS {
        streams.push(opener.open(b'S').await?);
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(secs);
    let mut tasks = tokio::task::JoinSet::new();
    for mut s in streams {
        tasks.spawn(async move {
            let request = [0x41u8; REQUEST];
            let mut reply = vec![0u8; ANSWER];
            let mut micros = Vec::new();
            while Instant::now() < deadline {
                let t = Instant::now();
                s.write_all(&request).await?;
                s.flush().await?;
                s.read_exact(&mut reply).await?;
                micros.push(t.elapsed().as_micros() as u64);
            }
            s.shutdown().await?;
            anyhow::Ok(micros)
        });
    }
    let mut all = Vec::new();
    while let Some(r) = tasks.join_next().await {
        all.extend(r??);
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let p99 = all
        .get(all.len().saturating_sub(1) * 99 / 100)
        .copied()
        .unwrap_or(0);
    Ok((all.len() as f64 / elapsed, p99 as f64 / 1000.0))
}

fn runtime(name: &str) -> Result<Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .thread_name(name)
        .enable_all()
        .build()?)
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    match n {
        0 => 0.0,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> Result<()> {
    let rounds = env_or("CEILING_ROUNDS", 3);
    let secs = env_or("CEILING_SECS", 5);
    let rc = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let certs = Certs {
        cert: rc.cert.der().clone(),
        key: PrivatePkcs8KeyDer::from(rc.key_pair.serialize_der()),
    };
    let answering = runtime("answering")?;
    let load = runtime("load")?;
    let mut kinds = vec![Kind::Tcp, Kind::Tls, Kind::Quic(String::new())];
    let variants = std::env::var("CEILING_VARIANTS").unwrap_or_default();
    kinds.extend(
        variants
            .split(',')
            .filter(|v| !v.is_empty())
            .map(|v| Kind::Quic(v.to_string())),
    );
    let mut openers = Vec::new();
    for kind in &kinds {
        openers.push(setup(kind, &certs, &answering, &load).with_context(|| kind.name())?);
    }
    // [kind] → per-round figures
    let mut mbs = vec![Vec::new(); kinds.len()];
    let mut rps = vec![Vec::new(); kinds.len()];
    let mut p99 = vec![Vec::new(); kinds.len()];
    for round in 1..=rounds {
        let mut line = format!("round {round}:");
        for (i, opener) in openers.iter().enumerate() {
            let b = load.block_on(bulk(opener))?;
            let (r, p) = load.block_on(small(opener, secs))?;
            mbs[i].push(b);
            rps[i].push(r);
            p99[i].push(p);
            line += &format!(
                " {}[{b:.0} MiB/s {r:.0} req/s p99 {p:.2} ms]",
                kinds[i].name()
            );
        }
        eprintln!("{line}");
    }
    let base_mbs = median(&mut mbs[0].clone());
    let base_rps = median(&mut rps[0].clone());
    println!();
    println!(
        "transport ceiling: {rounds} interleaved rounds, {} MiB bulk, {CONNS} streams × {secs}s small, loopback, {} build",
        BULK >> 20,
        if cfg!(debug_assertions) { "debug" } else { "release" }
    );
    println!(
        "{:<14} {:>10} {:>7} {:>10} {:>7} {:>9}",
        "", "bulk MiB/s", "ratio", "small r/s", "ratio", "p99 ms"
    );
    for (i, kind) in kinds.iter().enumerate() {
        let b = median(&mut mbs[i]);
        let r = median(&mut rps[i]);
        let p = median(&mut p99[i]);
        println!(
            "{:<14} {b:>10.0} {:>6.2}× {r:>10.0} {:>6.2}× {p:>9.2}",
            kind.name(),
            b / base_mbs,
            r / base_rps
        );
    }
    Ok(())
}
