//! TCP connections to the CM server, directly or through an HTTP CONNECT proxy (`[tunnel]
//! proxy`, else the environment as curl reads it). Activation dials here; so will the TCP
//! transport. A proxy that refuses, or wants other credentials, reads `proxy_error` naming the
//! proxy and its status line; a proxy that cannot be reached reads `server_unreachable` naming
//! the proxy. The credentials never appear in a message.

use crate::config::proxy::{proxy_for, ProxySource, ProxyUrl};
use crate::config::ServerAddr;
use crate::protocol::Reason;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

/// A byte stream to the server (a TCP socket, or a tunnel through a proxy).
pub(crate) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Longest proxy answer head read.
const MAX_PROXY_HEAD: usize = 8 * 1024;

/// Why no connection was made.
#[derive(Debug)]
pub(crate) struct DialError {
    /// `server_unreachable` or `proxy_error`.
    pub reason: Reason,
    /// What happened, naming the server or the proxy.
    pub message: String,
}

/// The proxy for `server`, from the config and this process's environment.
pub(crate) fn proxy_of(
    server: &ServerAddr,
    configured: Option<&ProxyUrl>,
) -> Result<Option<(ProxyUrl, ProxySource)>, DialError> {
    proxy_for(&server.host, configured, &|k| std::env::var(k).ok()).map_err(|message| DialError {
        reason: Reason::ProxyError,
        message,
    })
}

/// The TLS server name for `host` (an IP literal or a DNS name).
pub(crate) fn server_name(host: &str) -> Result<rustls::pki_types::ServerName<'static>, String> {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(rustls::pki_types::ServerName::IpAddress(ip.into())),
        Err(_) => rustls::pki_types::ServerName::try_from(host.to_string())
            .map_err(|_| format!("{host:?} is not a TLS server name")),
    }
}

/// Connects to `server`, through `proxy` when given, within `limit`.
pub(crate) async fn connect(
    server: &ServerAddr,
    proxy: Option<&ProxyUrl>,
    limit: Duration,
) -> Result<Box<dyn Io>, DialError> {
    let attempt = async {
        match proxy {
            None => {
                let tcp = TcpStream::connect((server.host.as_str(), server.port))
                    .await
                    .map_err(|e| DialError {
                        reason: Reason::ServerUnreachable,
                        message: format!("cannot reach {}: {e}", server.authority()),
                    })?;
                let _ = tcp.set_nodelay(true);
                Ok(Box::new(tcp) as Box<dyn Io>)
            }
            Some(p) => through(server, p).await,
        }
    };
    tokio::time::timeout(limit, attempt)
        .await
        .unwrap_or_else(|_| {
            Err(DialError {
                reason: Reason::ServerUnreachable,
                message: match proxy {
                    None => format!(
                        "cannot reach {}: no TCP connection within {limit:?}",
                        server.authority()
                    ),
                    Some(p) => format!(
                        "no connection to {} through the proxy {p} within {limit:?}",
                        server.authority()
                    ),
                },
            })
        })
}

/// A CONNECT tunnel to `server` through `proxy`.
async fn through(server: &ServerAddr, proxy: &ProxyUrl) -> Result<Box<dyn Io>, DialError> {
    let unreachable = |what: String| DialError {
        reason: Reason::ServerUnreachable,
        message: format!("cannot reach the proxy {proxy}: {what}"),
    };
    let tcp = TcpStream::connect((proxy.host.as_str(), proxy.port))
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let _ = tcp.set_nodelay(true);
    let mut io: Box<dyn Io> = if proxy.tls {
        let config = crate::tls::client_config(&crate::tls::ServerTrust::System, &[], None)
            .map_err(|e| unreachable(format!("{e:#}")))?;
        let name = server_name(&proxy.host).map_err(unreachable)?;
        let tls = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config))
            .connect(name, tcp)
            .await
            .map_err(|e| DialError {
                reason: Reason::ProxyError,
                message: format!("TLS with the proxy {proxy} failed: {e}"),
            })?;
        Box::new(tls)
    } else {
        Box::new(tcp)
    };
    let target = server.authority();
    let mut head = format!("CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n");
    if let Some(c) = &proxy.credentials {
        use base64::Engine;
        head.push_str("Proxy-Authorization: Basic ");
        head.push_str(&base64::engine::general_purpose::STANDARD.encode(c.expose()));
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    io.write_all(head.as_bytes())
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let status_line = read_head(&mut io)
        .await
        .map_err(|e| unreachable(format!("no answer to CONNECT: {e}")))?;
    let ok = status_line
        .split_whitespace()
        .nth(1)
        .is_some_and(|code| code.len() == 3 && code.starts_with('2'));
    if !ok {
        return Err(DialError {
            reason: Reason::ProxyError,
            message: format!("the proxy {proxy} refused CONNECT {target}: {status_line}"),
        });
    }
    Ok(io)
}

/// Reads the proxy's answer head byte by byte (nothing of the tunnel after it is taken) and
/// returns its status line.
async fn read_head(io: &mut Box<dyn Io>) -> std::io::Result<String> {
    let mut head = Vec::with_capacity(128);
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if head.len() >= MAX_PROXY_HEAD {
            return Err(std::io::Error::other("the answer head is too long"));
        }
        if io.read(&mut byte).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        head.push(byte[0]);
    }
    let text = String::from_utf8_lossy(&head);
    Ok(text
        .lines()
        .next()
        .unwrap_or_default()
        .trim()
        .chars()
        .take(200)
        .collect())
}
