//! An in-process impairment relay between agent and server (the kernel here has no netem).
//!
//! The agent dials the relay's port: TCP (activation) is forwarded untouched, UDP (the QUIC
//! tunnel) goes through seeded impairments in each direction: drop % with bursts, delay with
//! jitter, reordering, duplication, a blackhole switch, source-port rebinding (the server
//! then sees the agent from a new address, as after a NAT rebinding), and a NAT mapping timeout
//! (after that long without a packet from the agent the mapping is gone: the server's packets
//! are dropped and the agent's next one leaves from a new port). The seed comes from
//! `RELAY_SEED` or the clock, and is printed if the test fails.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

/// Impairments of one direction. Delayed packets leave in the order they came, as through a
/// queue (jitter varies the queueing delay; a packet never overtakes an earlier one), except
/// the `reorder_pct` ones, which are held back on their own.
#[derive(Debug, Clone, Default)]
pub struct Impair {
    /// Chance that a packet starts a loss burst, percent.
    pub drop_pct: f64,
    /// Longest burst: a burst drops 1..=`burst_max` consecutive packets (0 or 1: single drops).
    pub burst_max: u32,
    /// Fixed one-way delay.
    pub delay: Duration,
    /// Extra delay, uniform in [0, jitter].
    pub jitter: Duration,
    /// Chance a packet is held back (delay + 2×jitter + 5 ms) so later ones overtake it, percent.
    pub reorder_pct: f64,
    /// Chance a packet is sent twice, percent.
    pub dup_pct: f64,
}

impl Impair {
    /// Only loss.
    pub fn loss(pct: f64) -> Impair {
        Impair {
            drop_pct: pct,
            ..Impair::default()
        }
    }
}

/// Counters, for assertions and for the failure report.
#[derive(Debug, Default)]
pub struct RelayStats {
    pub forwarded: AtomicU64,
    pub dropped: AtomicU64,
    pub duplicated: AtomicU64,
    pub blackholed: AtomicU64,
    /// Bytes forwarded agent → server and server → agent (copies included).
    pub bytes_up: AtomicU64,
    pub bytes_down: AtomicU64,
    /// NAT mappings that timed out (the agent's next packet got a new source port).
    pub nat_expiries: AtomicU64,
    /// Server packets dropped because the mapping had timed out.
    pub nat_dropped: AtomicU64,
    /// TCP connections that carried bytes from the agent.
    pub tcp_with_data: AtomicU64,
}

struct Control {
    up: Impair,
    down: Impair,
    blackhole: bool,
    rng: SplitMix,
    burst_up: u32,
    burst_down: u32,
    nat_timeout: Option<Duration>,
    /// When the agent last sent a packet (what keeps a NAT mapping alive).
    last_up: tokio::time::Instant,
    /// Server → agent packets still let through; `None`: no limit.
    down_budget: Option<u64>,
}

/// The relay. Dropping it stops it.
pub struct Relay {
    /// What the agent dials (`server.address`).
    pub addr: SocketAddr,
    pub seed: u64,
    pub stats: Arc<RelayStats>,
    ctl: Arc<Mutex<Control>>,
    rebind: tokio::sync::mpsc::UnboundedSender<Option<std::net::IpAddr>>,
    stop: CancellationToken,
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.stop.cancel();
        if std::thread::panicking() {
            eprintln!(
                "impairment relay: seed {} (rerun with RELAY_SEED={}); {:?}",
                self.seed, self.seed, self.stats
            );
        }
    }
}

impl Relay {
    /// A relay in front of `server_tunnel` (UDP and TCP on that port).
    pub async fn start(server_tunnel: SocketAddr) -> Relay {
        let seed = std::env::var("RELAY_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap()
                    .as_nanos() as u64
            });
        let (udp, tcp) = pbx_remote::server::bind_pair("127.0.0.1:0".parse().unwrap()).unwrap();
        let addr = udp.local_addr().unwrap();
        udp.set_nonblocking(true).unwrap();
        let front = Arc::new(UdpSocket::from_std(udp).unwrap());
        let tcp = TcpListener::from_std(tcp).unwrap();
        let stop = CancellationToken::new();
        let stats = Arc::new(RelayStats::default());
        let ctl = Arc::new(Mutex::new(Control {
            up: Impair::default(),
            down: Impair::default(),
            blackhole: false,
            rng: SplitMix(seed),
            burst_up: 0,
            burst_down: 0,
            nat_timeout: None,
            last_up: tokio::time::Instant::now(),
            down_budget: None,
        }));
        tokio::spawn(forward_tcp(tcp, server_tunnel, stop.clone(), stats.clone()));
        let (rebind, rebinds) = tokio::sync::mpsc::unbounded_channel::<Option<std::net::IpAddr>>();
        tokio::spawn(forward_udp(
            front,
            server_tunnel,
            ctl.clone(),
            stats.clone(),
            rebinds,
            stop.clone(),
        ));
        Relay {
            addr,
            seed,
            stats,
            ctl,
            rebind,
            stop,
        }
    }

    /// Sets the impairments agent → server (`up`) and server → agent (`down`).
    pub fn set(&self, up: Impair, down: Impair) {
        let mut c = self.ctl.lock().unwrap();
        c.up = up;
        c.down = down;
    }

    /// Both directions alike.
    pub fn set_both(&self, i: Impair) {
        self.set(i.clone(), i);
    }

    /// Drops everything in both directions while on.
    pub fn blackhole(&self, on: bool) {
        self.ctl.lock().unwrap().blackhole = on;
    }

    /// Models a NAT between agent and server that forgets a mapping after `timeout` without a
    /// packet from the agent (RFC 4787: outbound refresh only; RFC 9308 §3.2 puts common
    /// timeouts at 30 s and up). `None`: mappings never time out.
    pub fn nat_timeout(&self, timeout: Option<Duration>) {
        let mut c = self.ctl.lock().unwrap();
        c.nat_timeout = timeout;
        c.last_up = tokio::time::Instant::now();
    }

    /// Whether the NAT mapping has timed out (and the agent has not sent since).
    pub fn mapping_expired(&self) -> bool {
        self.ctl.lock().unwrap().mapping_expired()
    }

    /// Lets only the next `n` server → agent packets through, then drops that direction (a path
    /// that fails one way part-way through a handshake). `None` lifts the limit.
    pub fn pass_down(&self, n: Option<u64>) {
        self.ctl.lock().unwrap().down_budget = n;
    }

    /// From the next packet on, the server sees the agent from a new source port.
    pub fn rebind(&self) {
        let _ = self.rebind.send(None);
    }

    /// From the next packet on, the server sees the agent from `ip` (another address, as after
    /// a change of uplink), on a new port.
    pub fn rebind_to(&self, ip: std::net::IpAddr) {
        let _ = self.rebind.send(Some(ip));
    }
}

async fn forward_tcp(
    listener: TcpListener,
    server: SocketAddr,
    stop: CancellationToken,
    stats: Arc<RelayStats>,
) {
    loop {
        let (mut inbound, _) = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r { Ok(x) => x, Err(_) => continue },
        };
        let (stop, stats) = (stop.clone(), stats.clone());
        tokio::spawn(async move {
            // A connection that carries bytes (activation, the TCP transport), not a bare
            // connect (the agent's check whether TCP answers when UDP does not).
            let mut first = [0u8; 1];
            if matches!(inbound.peek(&mut first).await, Ok(n) if n > 0) {
                stats.tcp_with_data.fetch_add(1, Ordering::Relaxed);
            }
            if let Ok(mut outbound) = TcpStream::connect(server).await {
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                }
            }
        });
    }
}

/// What to do with one packet.
enum Fate {
    /// Lost: to the blackhole or to the loss rate.
    Drop { blackholed: bool },
    Send {
        after: Duration,
        copies: u8,
        /// Held back on its own (reordered) rather than queued in order.
        held: bool,
    },
}

/// One direction's delay line: packets leave in order, each no earlier than its due time.
type Line = tokio::sync::mpsc::UnboundedSender<(tokio::time::Instant, Vec<u8>, SocketAddr, u8)>;

/// Starts the delay line sending from `sock`; it ends when the returned sender is dropped.
fn delay_line(sock: Arc<UdpSocket>) -> Line {
    let (tx, mut rx) =
        tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>, SocketAddr, u8)>();
    tokio::spawn(async move {
        while let Some((due, packet, to, copies)) = rx.recv().await {
            tokio::time::sleep_until(due).await;
            for _ in 0..copies {
                let _ = sock.send_to(&packet, to).await;
            }
        }
    });
    tx
}

impl Control {
    /// Whether the NAT mapping has timed out by now.
    fn mapping_expired(&self) -> bool {
        self.nat_timeout.is_some_and(|t| self.last_up.elapsed() > t)
    }

    fn fate(&mut self, upstream: bool) -> Fate {
        if self.blackhole {
            return Fate::Drop { blackholed: true };
        }
        if !upstream {
            if let Some(left) = &mut self.down_budget {
                if *left == 0 {
                    return Fate::Drop { blackholed: true };
                }
                *left -= 1;
            }
        }
        let i = if upstream { &self.up } else { &self.down };
        let (drop_pct, burst_max, delay, jitter, reorder_pct, dup_pct) = (
            i.drop_pct,
            i.burst_max,
            i.delay,
            i.jitter,
            i.reorder_pct,
            i.dup_pct,
        );
        let burst = if upstream {
            &mut self.burst_up
        } else {
            &mut self.burst_down
        };
        if *burst > 0 {
            *burst -= 1;
            return Fate::Drop { blackholed: false };
        }
        if self.rng.chance(drop_pct) {
            let len = if burst_max > 1 {
                1 + (self.rng.next() % u64::from(burst_max)) as u32
            } else {
                1
            };
            let burst = if upstream {
                &mut self.burst_up
            } else {
                &mut self.burst_down
            };
            *burst = len - 1;
            return Fate::Drop { blackholed: false };
        }
        let mut after = delay + self.rng.upto(jitter);
        let held = self.rng.chance(reorder_pct);
        if held {
            after += delay + jitter * 2 + Duration::from_millis(5);
        }
        let copies = if self.rng.chance(dup_pct) { 2 } else { 1 };
        Fate::Send {
            after,
            copies,
            held,
        }
    }
}

async fn forward_udp(
    front: Arc<UdpSocket>,
    server: SocketAddr,
    ctl: Arc<Mutex<Control>>,
    stats: Arc<RelayStats>,
    mut rebinds: tokio::sync::mpsc::UnboundedReceiver<Option<std::net::IpAddr>>,
    stop: CancellationToken,
) {
    let agent: Arc<Mutex<Option<SocketAddr>>> = Arc::new(Mutex::new(None));
    let mut upstream_stop = CancellationToken::new();
    let mut source: std::net::IpAddr = [127, 0, 0, 1].into();
    let mut upstream =
        new_upstream(&front, &agent, &ctl, &stats, upstream_stop.clone(), source).await;
    let mut up_line = delay_line(upstream.clone());
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = tokio::select! {
            _ = stop.cancelled() => break,
            Some(to) = rebinds.recv() => {
                if let Some(ip) = to {
                    source = ip;
                }
                (0, None)
            }
            r = front.recv_from(&mut buf) => match r { Ok((n, from)) => (n, Some(from)), Err(_) => continue },
        };
        let expired = from.is_some() && {
            let mut c = ctl.lock().unwrap();
            let expired = c.mapping_expired();
            c.last_up = tokio::time::Instant::now();
            expired
        };
        if expired {
            stats.nat_expiries.fetch_add(1, Ordering::Relaxed);
        }
        if from.is_none() || expired {
            // A new source port. Packets still in flight to the old socket are lost, as at a
            // real NAT.
            upstream_stop.cancel();
            upstream_stop = CancellationToken::new();
            upstream =
                new_upstream(&front, &agent, &ctl, &stats, upstream_stop.clone(), source).await;
            up_line = delay_line(upstream.clone());
        }
        let Some(from) = from else { continue };
        *agent.lock().unwrap() = Some(from);
        let fate = ctl.lock().unwrap().fate(true);
        send(
            &upstream,
            &up_line,
            &buf[..n],
            server,
            fate,
            &stats,
            &stats.bytes_up,
        )
        .await;
    }
    upstream_stop.cancel();
}

/// A fresh upstream socket (a new source port) and its task relaying server → agent.
async fn new_upstream(
    front: &Arc<UdpSocket>,
    agent: &Arc<Mutex<Option<SocketAddr>>>,
    ctl: &Arc<Mutex<Control>>,
    stats: &Arc<RelayStats>,
    stop: CancellationToken,
    source: std::net::IpAddr,
) -> Arc<UdpSocket> {
    let sock = Arc::new(UdpSocket::bind((source, 0)).await.unwrap());
    let (s, front, agent, ctl, stats) = (
        sock.clone(),
        front.clone(),
        agent.clone(),
        ctl.clone(),
        stats.clone(),
    );
    tokio::spawn(async move {
        let mut buf = vec![0u8; 65536];
        let down_line = delay_line(front.clone());
        loop {
            let n = tokio::select! {
                _ = stop.cancelled() => return,
                r = s.recv_from(&mut buf) => match r { Ok((n, _)) => n, Err(_) => continue },
            };
            let Some(to) = *agent.lock().unwrap() else {
                continue;
            };
            let fate = {
                let mut c = ctl.lock().unwrap();
                if c.mapping_expired() {
                    stats.nat_dropped.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                c.fate(false)
            };
            send(
                &front,
                &down_line,
                &buf[..n],
                to,
                fate,
                &stats,
                &stats.bytes_down,
            )
            .await;
        }
    });
    sock
}

async fn send(
    sock: &Arc<UdpSocket>,
    line: &Line,
    packet: &[u8],
    to: SocketAddr,
    fate: Fate,
    stats: &RelayStats,
    // This direction's byte counter.
    bytes: &AtomicU64,
) {
    match fate {
        Fate::Drop { blackholed: true } => {
            stats.blackholed.fetch_add(1, Ordering::Relaxed);
        }
        Fate::Drop { blackholed: false } => {
            stats.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Fate::Send {
            after,
            copies,
            held,
        } => {
            stats.forwarded.fetch_add(1, Ordering::Relaxed);
            bytes.fetch_add(
                (packet.len() * usize::from(copies)) as u64,
                Ordering::Relaxed,
            );
            if copies > 1 {
                stats.duplicated.fetch_add(1, Ordering::Relaxed);
            }
            if after.is_zero() {
                for _ in 0..copies {
                    let _ = sock.send_to(packet, to).await;
                }
            } else if !held {
                let _ = line.send((
                    tokio::time::Instant::now() + after,
                    packet.to_vec(),
                    to,
                    copies,
                ));
            } else {
                let (sock, packet) = (sock.clone(), packet.to_vec());
                tokio::spawn(async move {
                    tokio::time::sleep(after).await;
                    for _ in 0..copies {
                        let _ = sock.send_to(&packet, to).await;
                    }
                });
            }
        }
    }
}

/// SplitMix64: small, seedable, good enough to pick packets (and a test's next step).
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    pub fn chance(&mut self, pct: f64) -> bool {
        pct > 0.0 && (self.next() as f64 / u64::MAX as f64) * 100.0 < pct
    }

    pub fn upto(&mut self, d: Duration) -> Duration {
        let n = d.as_nanos() as u64;
        if n == 0 {
            Duration::ZERO
        } else {
            Duration::from_nanos(self.next() % (n + 1))
        }
    }
}
