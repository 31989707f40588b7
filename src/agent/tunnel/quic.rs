//! The QUIC transport: dial the server over UDP with the device key, and say in words why an
//! attempt got nowhere.

use super::{ConnectFailure, Progress};
use crate::config::ServerAddr;
use crate::protocol::{Reason, CONNECT_TIMEOUT, IDLE_TIMEOUT, PROTOCOL_VERSION};
use quinn::{ConnectionError, TransportErrorCode};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// TLS alert "no_application_protocol" (RFC 7301): the server speaks another protocol version.
const ALERT_NO_APPLICATION_PROTOCOL: u8 = 120;

/// How long the TCP probe after a silent QUIC attempt may take.
const TCP_PROBE_TIMEOUT: Duration = Duration::from_secs(3);

/// A QUIC connection with its own endpoint (socket).
pub(super) struct Dialed {
    pub endpoint: quinn::Endpoint,
    pub conn: quinn::Connection,
}

/// Resolves `server`, opens a UDP socket and completes the QUIC handshake (no hello yet).
pub(super) async fn dial(
    server: &ServerAddr,
    client: &quinn::ClientConfig,
    progress: &Mutex<Progress>,
) -> Result<Dialed, ConnectFailure> {
    let unreachable = |m: String| ConnectFailure {
        reason: Reason::ServerUnreachable,
        message: m,
    };
    let addr: SocketAddr = tokio::net::lookup_host((server.host.as_str(), server.port))
        .await
        .map_err(|e| unreachable(format!("cannot resolve {}: {e}", server.host)))?
        .next()
        .ok_or_else(|| unreachable(format!("{} resolved to no address", server.host)))?;
    if let Ok(mut p) = progress.lock() {
        p.addr = Some(addr);
    }
    let endpoint = std::net::UdpSocket::bind(any_port_beside(addr))
        .and_then(|sock| {
            crate::quic::tune_udp(&sock);
            sock.set_nonblocking(true)?;
            quinn::Endpoint::new(
                quinn::EndpointConfig::default(),
                None,
                sock,
                Arc::new(quinn::TokioRuntime),
            )
        })
        .map_err(|e| unreachable(format!("cannot open a UDP socket: {e}")))?;
    let mut connecting = endpoint
        .connect_with(client.clone(), addr, &server.host)
        .map_err(|e| ConnectFailure {
            reason: Reason::TlsError,
            message: format!("cannot start QUIC to {}: {e}", server.authority()),
        })?;
    // Resolves once the server's first handshake flight is in: UDP gets through.
    if connecting.handshake_data().await.is_ok() {
        if let Ok(mut p) = progress.lock() {
            p.heard_from_server = true;
        }
    }
    let conn = connecting.await.map_err(|e| {
        let (reason, message) = classify(&e);
        ConnectFailure { reason, message }
    })?;
    Ok(Dialed { endpoint, conn })
}

/// The unspecified address of `peer`'s family, any port: where a socket toward it binds.
pub(super) fn any_port_beside(peer: SocketAddr) -> SocketAddr {
    if peer.is_ipv4() {
        SocketAddr::from(([0, 0, 0, 0], 0))
    } else {
        SocketAddr::from(([0u16; 8], 0))
    }
}

/// `server`, with the address dialled beside a name (not beside itself).
fn named(server: &str, addr: SocketAddr) -> String {
    if server == addr.to_string() {
        server.to_string()
    } else {
        format!("{server} ({addr})")
    }
}

/// Why a QUIC attempt that timed out got nowhere, without asking TCP (the `auto` transport is
/// dialling TCP anyway).
pub(super) fn silence(server: &str, progress: &Progress) -> String {
    match progress.addr {
        None => format!("{server} was not resolved within {CONNECT_TIMEOUT:?}"),
        Some(addr) if progress.heard_from_server => format!(
            "the QUIC handshake with {} began but did not finish within {CONNECT_TIMEOUT:?} \
             (heavy packet loss on the path?)",
            named(server, addr)
        ),
        Some(addr) => format!("UDP to {} gets no answer", named(server, addr)),
    }
}

/// Why an attempt that timed out got nowhere. When not a single QUIC packet came back, a TCP
/// connect to the same address and port tells a firewall that drops UDP (the server answers on
/// TCP, where activation goes) from a server or network that is down.
pub(super) async fn silence_message(server: &str, progress: Progress) -> String {
    let Some(addr) = progress.addr.filter(|_| !progress.heard_from_server) else {
        return silence(server, &progress);
    };
    let server = named(server, addr);
    match tokio::time::timeout(TCP_PROBE_TIMEOUT, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => format!(
            "UDP to {server} looks blocked: TCP to that port answers, but no QUIC \
             packet came back within {CONNECT_TIMEOUT:?}; allow outbound UDP to port {}, \
             or set [tunnel] transport = \"auto\"",
            addr.port()
        ),
        Ok(Err(e)) => format!(
            "no answer from {server} on UDP within {CONNECT_TIMEOUT:?}, and TCP to \
             that port failed too ({e}): the server is down or unreachable from here"
        ),
        Err(_) => format!(
            "no answer from {server} on UDP within {CONNECT_TIMEOUT:?} or on TCP \
             within {TCP_PROBE_TIMEOUT:?}: the server is down or unreachable from here"
        ),
    }
}

/// Maps a QUIC connection error to a status reason and a message.
pub fn classify(e: &ConnectionError) -> (Reason, String) {
    match e {
        ConnectionError::ApplicationClosed(c) => {
            let text = String::from_utf8_lossy(&c.reason).to_string();
            match Reason::from_close_code(c.error_code.into_inner()) {
                Some(r) => (r, text),
                None => (
                    Reason::ServerUnreachable,
                    format!("the server closed the connection: {text}"),
                ),
            }
        }
        ConnectionError::ConnectionClosed(c) => {
            if c.error_code == TransportErrorCode::crypto(ALERT_NO_APPLICATION_PROTOCOL) {
                (
                    Reason::ProtocolMismatch,
                    format!(
                        "the server does not speak tunnel protocol {PROTOCOL_VERSION}; upgrade the agent or the server"
                    ),
                )
            } else if is_crypto(c.error_code) {
                (
                    Reason::TlsError,
                    format!("the server refused the TLS handshake: {c}"),
                )
            } else {
                (
                    Reason::ServerUnreachable,
                    format!("the server closed the connection: {c}"),
                )
            }
        }
        ConnectionError::TransportError(t) if is_crypto(t.code) => (
            Reason::TlsError,
            format!("TLS with the server failed: {t} (check server.pin_sha256 / server.ca_file)"),
        ),
        ConnectionError::TransportError(t) => (Reason::ServerUnreachable, t.to_string()),
        ConnectionError::VersionMismatch => (
            Reason::ProtocolMismatch,
            "the server does not support this QUIC version".to_string(),
        ),
        ConnectionError::Reset => (
            Reason::ServerUnreachable,
            "the server restarted and reset the connection".to_string(),
        ),
        ConnectionError::TimedOut => (
            Reason::ServerUnreachable,
            format!("no packets from the server for {IDLE_TIMEOUT:?}"),
        ),
        ConnectionError::LocallyClosed => (Reason::ServerUnreachable, "closed locally".to_string()),
        ConnectionError::CidsExhausted => (Reason::ServerUnreachable, e.to_string()),
    }
}

fn is_crypto(code: TransportErrorCode) -> bool {
    (0x100..0x200).contains(&u64::from(code))
}
