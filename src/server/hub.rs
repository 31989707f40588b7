//! The tunnel hub: accepts QUIC connections (and TCP transport ones from the API's port,
//! [`crate::server::transport`]), identifies the device by its key against the
//! registry at every handshake, keeps the newest connection per device (the older one is closed
//! with `replaced`), serves the control stream, and pushes registry changes within seconds.

use crate::protocol::{
    read_frame, write_frame, Control, DeviceSettings, HaState, NodeRole, Reason, TaskState, ALPN,
    CONNECT_TIMEOUT, HANDOVER_GRACE, MAX_REQUEST_STREAMS, PROTOCOL_VERSION,
};
use crate::server::db::{DeviceFlags, NodeHello, NodeKey, PendingTask};
use crate::server::keys::ServerKeys;
use crate::server::transport::{self, Conn};
use crate::server::ServerState;
use crate::tunnelio::{RecvHalf, SendHalf};
use anyhow::{Context, Result};
use rustls::pki_types::CertificateDer;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

/// How often the registry is checked for changes made by admin commands.
pub const REGISTRY_POLL: Duration = Duration::from_secs(1);

/// One connected device.
pub struct Link {
    /// Device id.
    pub device_id: String,
    /// Which node of the device.
    pub role: NodeRole,
    /// The tunnel connection (QUIC or TCP).
    pub conn: Conn,
    /// Which registration this is.
    pub generation: u64,
    /// Request streams: their permits, and the kept streams and waiting requests by visit.
    pub(crate) streams: Arc<crate::server::front::StreamRoom>,
    /// Streams in use per visit grant, so one session cannot take the whole tunnel.
    per_grant: Mutex<HashMap<String, usize>>,
    key_hash: [u8; 32],
    ha_state: Mutex<Option<HaState>>,
    flags: Mutex<DeviceFlags>,
    settings_tx: mpsc::UnboundedSender<DeviceSettings>,
}

/// Connected nodes by device id, one per role: the newest connection wins per node, and the
/// two nodes of a Hot Standby pair do not displace each other. Looked up by `&str` at every
/// visitor request, so the lookup allocates nothing.
#[derive(Default)]
pub struct Hub {
    links: Mutex<HashMap<String, Vec<Arc<Link>>>>,
    generation: AtomicU64,
    /// Rung by this server's own writes to devices (the console's): `PRAGMA data_version`
    /// only moves for other connections' commits.
    registry: tokio::sync::Notify,
}

impl Hub {
    /// Tells the registry watcher that this process changed devices (removed one, switched a
    /// flag), so connected agents hear of it now rather than at the next outside commit.
    pub fn registry_changed(&self) {
        self.registry.notify_one();
    }

    /// The node of `device` that visits go to: the one reporting "active", else a lone node,
    /// else the primary, else any.
    pub fn get(&self, device: &str) -> Option<Arc<Link>> {
        let links = self.lock();
        // NodeRole's order is the fallback order: single, primary, secondary.
        let nodes = links.get(device)?.iter();
        let active = nodes
            .clone()
            .filter(|l| *lock(&l.ha_state) == Some(HaState::Active))
            .min_by_key(|l| l.role);
        active.or_else(|| nodes.min_by_key(|l| l.role)).cloned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<Arc<Link>>>> {
        // Invariant: no panics inside the short critical sections below.
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(&self, link: Arc<Link>) -> Option<Arc<Link>> {
        let mut links = self.lock();
        let nodes = links.entry(link.device_id.clone()).or_default();
        match nodes.iter_mut().find(|l| l.role == link.role) {
            Some(node) => Some(std::mem::replace(node, link)),
            None => {
                nodes.push(link);
                None
            }
        }
    }

    /// Removes the link if it is still the current one; true if it was.
    fn deregister(&self, device: &str, role: NodeRole, generation: u64) -> bool {
        let mut links = self.lock();
        let Some(nodes) = links.get_mut(device) else {
            return false;
        };
        let before = nodes.len();
        nodes.retain(|l| !(l.role == role && l.generation == generation));
        let removed = nodes.len() < before;
        if nodes.is_empty() {
            links.remove(device);
        }
        removed
    }

    fn all(&self) -> Vec<Arc<Link>> {
        self.lock().values().flatten().cloned().collect()
    }
}

/// The QUIC endpoint with the persisted reset and token keys.
pub fn endpoint(keys: &ServerKeys, udp: std::net::UdpSocket) -> Result<quinn::Endpoint> {
    let mut crypto = rustls::ServerConfig::builder_with_provider(crate::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(Arc::new(crate::tls::DeviceKeyVerifier::new()))
        .with_single_cert(keys.certs.clone(), keys.key.clone_key())
        .context("server TLS certificate")?;
    crypto.alpn_protocols = vec![ALPN.to_vec()];
    let quic = quinn::crypto::rustls::QuicServerConfig::try_from(crypto).context("QUIC TLS")?;
    let token_key = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"pbx-remote token key")
        .extract(&keys.token_key);
    let mut server = quinn::ServerConfig::new(Arc::new(quic), Arc::new(token_key));
    // The agent opens only its control stream; request streams are opened by us.
    let t = crate::quic::transport_config(4);
    server.transport_config(Arc::new(t));
    let reset_key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &keys.reset_key);
    let mut config = quinn::EndpointConfig::new(Arc::new(reset_key));
    let cid_key = keys.cid_key;
    config.cid_generator(move || {
        Box::new(quinn_proto::HashedConnectionIdGenerator::from_key(cid_key))
    });
    crate::quic::tune_udp(&udp);
    udp.set_nonblocking(true)?;
    quinn::Endpoint::new(config, Some(server), udp, Arc::new(quinn::TokioRuntime))
        .context("QUIC endpoint")
}

/// Accepts tunnel connections until `shutdown`. Runs on the data path's runtime, so each
/// connection's driver is spawned there; the link itself (the registry's checks and writes at
/// connect, the control stream, telemetry) runs on `links`, the server's other runtime, so a
/// registry that is slow to answer (a write lock held elsewhere, up to the busy timeout) never
/// holds up the thread every visit runs on ([`crate::server::datapath`]).
pub async fn serve(
    state: Arc<ServerState>,
    endpoint: quinn::Endpoint,
    links: tokio::runtime::Handle,
    shutdown: CancellationToken,
) {
    loop {
        let incoming = tokio::select! {
            _ = shutdown.cancelled() => return,
            i = endpoint.accept() => match i {
                Some(i) => i,
                None => return,
            }
        };
        let peer = incoming.remote_address();
        // Spawns the connection's driver on this runtime.
        let connecting = match incoming.accept() {
            Ok(c) => c,
            Err(e) => {
                tracing::info!(%peer, error = %e, "tunnel connection not accepted");
                continue;
            }
        };
        spawn_link(
            &links,
            peer,
            handle_connection(state.clone(), connecting, peer),
        );
    }
}

/// Runs a connection's link on `links`, logging how it ended.
fn spawn_link(
    links: &tokio::runtime::Handle,
    peer: SocketAddr,
    link: impl std::future::Future<Output = Result<()>> + Send + 'static,
) {
    links.spawn(async move {
        if let Err(e) = link.await {
            tracing::info!(%peer, error = %format!("{e:#}"), "tunnel connection ended");
        }
    });
}

async fn handle_connection(
    state: Arc<ServerState>,
    connecting: quinn::Connecting,
    peer: SocketAddr,
) -> Result<()> {
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .context("handshake timeout")??;
    let key_hash = peer_key_hash(&conn)?;
    identify(state, Conn::Quic(conn), key_hash, peer).await
}

/// A TCP transport connection from the API's port, TLS done: h2 over it (its connection task
/// stays on this runtime, the data path's), then the link on `links` as for QUIC.
pub(crate) async fn handle_tcp(
    state: Arc<ServerState>,
    tls: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: SocketAddr,
    links: &tokio::runtime::Handle,
    shutdown: CancellationToken,
) -> Result<()> {
    let key_hash = transport::peer_key_hash_tls(tls.get_ref().1)?;
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, transport::start_tcp(tls, peer, shutdown))
        .await
        .context("HTTP/2 handshake timeout")??;
    spawn_link(links, peer, identify(state, conn, key_hash, peer));
    Ok(())
}

/// Looks the device key up and serves the tunnel, or refuses an unknown key.
async fn identify(
    state: Arc<ServerState>,
    conn: Conn,
    key_hash: [u8; 32],
    peer: SocketAddr,
) -> Result<()> {
    let Some(NodeKey { device, role }) = state.db.node_by_key(&key_hash)? else {
        tracing::warn!(%peer, transport = %conn.transport(), "unknown device key refused");
        refuse(&conn, Reason::DeviceRemoved, "this device is not registered on the server (removed or re-enrolled); activate it again with a new code");
        return Ok(());
    };
    let span = tracing::info_span!("tunnel", device = %device, role = %role, transport = %conn.transport());
    serve_tunnel(state, conn, key_hash, device, role)
        .instrument(span)
        .await
}

/// One registered tunnel from hello to close, inside the tunnel's span.
async fn serve_tunnel(
    state: Arc<ServerState>,
    conn: Conn,
    key_hash: [u8; 32],
    device: String,
    role: NodeRole,
) -> Result<()> {
    let peer = conn.remote_address();
    let (mut send, mut recv): (SendHalf, RecvHalf) =
        tokio::time::timeout(CONNECT_TIMEOUT, conn.control_stream())
            .await
            .context("no control stream")??;
    let hello = tokio::time::timeout(CONNECT_TIMEOUT, read_frame::<_, Control>(&mut recv))
        .await
        .context("no hello")??;
    if let Some(Control::Deactivate { agent_version }) = &hello {
        return deactivate(&state, &conn, send, &key_hash, agent_version).await;
    }
    let Some(Control::Hello {
        protocol_version,
        agent_version,
        facts,
        ha_state,
        switches,
        handover,
    }) = hello
    else {
        refuse(&conn, Reason::ProtocolMismatch, "expected hello");
        return Ok(());
    };
    if protocol_version != PROTOCOL_VERSION {
        refuse(
            &conn,
            Reason::ProtocolMismatch,
            &format!("server speaks protocol {PROTOCOL_VERSION}, agent {protocol_version}"),
        );
        return Ok(());
    }
    if let Some(r) = state.db.check_identity(&device, &facts)? {
        tracing::warn!(%peer, message = %r.message, "device identity mismatch refused");
        refuse(&conn, r.reason, &r.message);
        return Ok(());
    }
    let Some(flags) = state.db.flags(&device)? else {
        refuse(
            &conn,
            Reason::DeviceRemoved,
            "this device was removed from the CM",
        );
        return Ok(());
    };
    state.db.node_connected(
        &device,
        role,
        &NodeHello {
            facts: &facts,
            agent_version: &agent_version,
            ha_state,
            switches,
            transport: conn.transport(),
        },
    )?;
    let (settings_tx, mut settings_rx) = mpsc::unbounded_channel();
    let link = Arc::new(Link {
        device_id: device.clone(),
        role,
        conn: conn.clone(),
        generation: state.hub.generation.fetch_add(1, Ordering::Relaxed),
        streams: Arc::new(crate::server::front::StreamRoom::new(
            MAX_REQUEST_STREAMS as usize,
        )),
        per_grant: Mutex::new(HashMap::new()),
        key_hash,
        ha_state: Mutex::new(ha_state),
        flags: Mutex::new(flags.clone()),
        settings_tx,
    });
    if let Some(old) = state.hub.register(link.clone()) {
        if handover {
            tracing::info!(old_transport = %old.conn.transport(), "the agent moved its tunnel here; the older connection finishes its requests");
            tokio::spawn(async move {
                if tokio::time::timeout(HANDOVER_GRACE, old.conn.closed())
                    .await
                    .is_err()
                {
                    refuse(
                        &old.conn,
                        Reason::Replaced,
                        "the tunnel moved to a newer connection",
                    );
                }
            });
        } else {
            tracing::warn!(old_peer = %old.conn.remote_address(), new_peer = %peer, "device credential connected again; the older connection is replaced");
            // On the device's page: a clone, or a PBX restored from a backup elsewhere.
            let (old_peer, new_peer) = (old.conn.remote_address().to_string(), peer.to_string());
            let detail = format!(
                "{} from {old_peer} replaced by one from {new_peer}",
                role.as_str()
            );
            let op = crate::server::db::Op {
                actor: "hub",
                source: crate::server::db::Source::Hub,
                action: "tunnel.replaced",
                target: Some(&device),
                device: Some(&device),
                client: Some(&new_peer),
                result: "ok",
                detail: Some(&detail),
            };
            if let Err(e) = state.db.log_op(&op) {
                tracing::warn!(error = %format!("{e:#}"), "operation log write failed");
            }
            refuse(
                &old.conn,
                Reason::Replaced,
                "another machine connected with this device credential; this connection was replaced",
            );
        }
    }
    tracing::info!(%peer, version = %agent_version, "device connected");
    write_frame(
        &mut send,
        &Control::Welcome {
            device_id: device.clone(),
            server_time_ms: crate::protocol::now_ms(),
            settings: DeviceSettings {
                allow_passwordless: flags.allow_passwordless,
            },
            audit: true,
        },
    )
    .await?;
    if let Some(PendingTask { name, template }) = state.db.pending_task(&device)? {
        tracing::info!(task = %name, "sending provisioning template");
        write_frame(
            &mut send,
            &Control::Provision {
                task: name.clone(),
                template,
            },
        )
        .await?;
        state.db.set_task_state(
            &device,
            &name,
            TaskState::Executing,
            "delivered to the agent",
        )?;
    }
    let reason = loop {
        tokio::select! {
            e = conn.closed() => break e.to_string(),
            frame = read_frame::<_, Control>(&mut recv) => match frame {
                Ok(Some(Control::Heartbeat { ha_state, telemetry, switches })) => {
                    let changed = {
                        let mut current = lock(&link.ha_state);
                        std::mem::replace(&mut *current, ha_state) != ha_state
                    };
                    if changed {
                        tracing::warn!(ha_state = ?ha_state, "hot standby state changed; visits follow the active node");
                    }
                    if let Err(e) = state.db.node_seen(&device, role, ha_state, telemetry.as_ref(), switches) {
                        tracing::warn!(error = %format!("{e:#}"), "cannot record heartbeat");
                    }
                    write_frame(&mut send, &Control::HeartbeatAck { server_time_ms: crate::protocol::now_ms() }).await?;
                }
                Ok(Some(Control::AuditEvents { events })) => {
                    let events = &events[..events.len().min(crate::protocol::AUDIT_BATCH)];
                    let upto = events.iter().map(|e| e.seq).max();
                    match state.db.record_agent_events(&device, role.as_str(), events) {
                        Ok(new) => {
                            tracing::debug!(new, "audit events recorded");
                            if let Some(upto) = upto {
                                write_frame(&mut send, &Control::AuditAck { upto }).await?;
                            }
                        }
                        // Not acknowledged: the agent keeps them and sends them again.
                        Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot record audit events"),
                    }
                }
                Ok(Some(Control::ProvisionResult { task, state: TaskState::Pending, .. })) => {
                    tracing::debug!(%task, "provisioning result without progress ignored");
                }
                Ok(Some(Control::ProvisionResult { task, state: task_state, output })) => {
                    tracing::info!(%task, state = %task_state, "provisioning result");
                    let output: String = output.chars().rev().take(4096).collect::<Vec<_>>().into_iter().rev().collect();
                    state.db.set_task_state(&device, &task, task_state, &output)?;
                }
                Ok(Some(other)) => tracing::debug!(?other, "unexpected control frame"),
                Ok(None) => break "control stream closed".to_string(),
                Err(e) => break format!("{e:#}"),
            },
            Some(settings) = settings_rx.recv() => {
                write_frame(&mut send, &Control::Settings { settings }).await?;
            }
        }
    };
    if state.hub.deregister(&device, role, link.generation) {
        state.db.node_disconnected(&device, role)?;
        tracing::info!(%reason, "device disconnected");
    }
    Ok(())
}

/// In-flight request streams one visit grant (one visitor's session) may hold on a link: a
/// quarter of the link's streams, far above what a browser opens, so a runaway tab or a flood
/// from one session leaves room for everyone else.
pub const MAX_STREAMS_PER_GRANT: usize = MAX_REQUEST_STREAMS as usize / 4;

/// One of a grant's stream slots; released on drop.
pub struct GrantSlot {
    link: Arc<Link>,
    grant: String,
}

impl Link {
    /// Takes a stream slot for `grant`, or `None` if it holds [`MAX_STREAMS_PER_GRANT`].
    pub fn grant_slot(self: &Arc<Self>, grant: &str) -> Option<GrantSlot> {
        let mut map = lock(&self.per_grant);
        let n = map.entry(grant.to_string()).or_insert(0);
        if *n >= MAX_STREAMS_PER_GRANT {
            return None;
        }
        *n += 1;
        Some(GrantSlot {
            link: self.clone(),
            grant: grant.to_string(),
        })
    }
}

impl Drop for GrantSlot {
    fn drop(&mut self) {
        let mut map = lock(&self.link.per_grant);
        if let Some(n) = map.get_mut(&self.grant) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.grant);
            }
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Invariant: no panics while these short-lived locks are held.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// A node's agent is being uninstalled: its key is revoked (the device stays for the provider),
/// its live tunnel, if any, is closed as removed, and the agent is told.
async fn deactivate(
    state: &ServerState,
    conn: &Conn,
    mut send: SendHalf,
    key_hash: &[u8; 32],
    agent_version: &str,
) -> Result<()> {
    let peer = conn.remote_address().to_string();
    let Some((NodeKey { device, role }, nodes_left)) = state.db.remove_node(key_hash)? else {
        refuse(
            conn,
            Reason::DeviceRemoved,
            "this device is not registered on the server",
        );
        return Ok(());
    };
    tracing::info!(%peer, nodes_left, "the node's agent is being uninstalled; its key is revoked");
    let detail = format!(
        "{} node uninstalled (agent {agent_version}); its key is revoked, a new code enrols it again",
        role.as_str()
    );
    let op = crate::server::db::Op {
        actor: "agent",
        source: crate::server::db::Source::Agent,
        action: "node.deactivated",
        target: Some(&device),
        device: Some(&device),
        client: Some(&peer),
        result: "ok",
        detail: Some(&detail),
    };
    if let Err(e) = state.db.log_op(&op) {
        tracing::warn!(error = %format!("{e:#}"), "operation log write failed");
    }
    state.hub.registry_changed();
    let answer = Control::Deactivated {
        device_id: device,
        nodes_left,
    };
    write_frame(&mut send, &answer).await?;
    // The agent hangs up once it has read the answer.
    let _ = tokio::time::timeout(CONNECT_TIMEOUT, conn.closed()).await;
    refuse(conn, Reason::DeviceRemoved, "this node was deactivated");
    Ok(())
}

fn refuse(conn: &Conn, reason: Reason, message: &str) {
    conn.close(Some(reason), message);
}

fn peer_key_hash(conn: &quinn::Connection) -> Result<[u8; 32]> {
    let identity = conn.peer_identity().context("no client certificate")?;
    let certs = identity
        .downcast::<Vec<CertificateDer<'static>>>()
        .map_err(|_| anyhow::anyhow!("unexpected peer identity"))?;
    transport::key_hash_of(&certs)
}

/// Polls the registry for admin changes and applies them to connected devices: removal closes
/// with `device_removed`, flag changes are pushed as settings.
pub async fn watch_registry(state: Arc<ServerState>, shutdown: CancellationToken) {
    let mut last = state.db.data_version().unwrap_or(0);
    let mut tick = tokio::time::interval(REGISTRY_POLL);
    loop {
        let ours = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => false,
            _ = state.hub.registry.notified() => true,
        };
        let version = match state.db.data_version() {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "registry poll failed");
                continue;
            }
        };
        if version == last && !ours {
            continue;
        }
        last = version;
        for link in state.hub.all() {
            if let Err(e) = apply_registry(&state, &link) {
                tracing::warn!(device = %link.device_id, error = %format!("{e:#}"), "cannot apply registry change");
            }
        }
    }
}

fn apply_registry(state: &ServerState, link: &Link) -> Result<()> {
    let still = state.db.node_by_key(&link.key_hash)?;
    let flags = state.db.flags(&link.device_id)?;
    let flags = match (flags, still) {
        (Some(flags), Some(_)) => flags,
        (Some(_), None) => {
            tracing::warn!(device = %link.device_id, "node key revoked; closing its tunnel");
            let message = "this node's key was revoked on the CM (deactivated)";
            refuse(&link.conn, Reason::DeviceRemoved, message);
            return Ok(());
        }
        (None, _) => {
            tracing::warn!(device = %link.device_id, "device removed; closing its tunnel");
            let message = "this device was removed from the CM";
            refuse(&link.conn, Reason::DeviceRemoved, message);
            return Ok(());
        }
    };
    let mut current = link.flags.lock().unwrap_or_else(|p| p.into_inner());
    if *current != flags {
        *current = flags.clone();
        let _ = link.settings_tx.send(DeviceSettings {
            allow_passwordless: flags.allow_passwordless,
        });
        tracing::info!(device = %link.device_id, allow_passwordless = flags.allow_passwordless, "settings pushed");
    }
    Ok(())
}
