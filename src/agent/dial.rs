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
    let status_line = read_proxy_answer(&mut io)
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

/// Reads an HTTP CONNECT proxy's answer head byte by byte (nothing of the tunnel after it is
/// taken) and returns its status line (at most 200 characters). A head longer than 8 KiB, or a
/// stream that ends before the blank line, is an error. Public for the fuzz target.
pub async fn read_proxy_answer<R: AsyncRead + Unpin>(io: &mut R) -> std::io::Result<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    /// Hands out its bytes in chunks of random sizes.
    struct Chunked {
        data: Vec<u8>,
        at: usize,
        rng: u64,
    }

    impl Chunked {
        fn next(&mut self) -> u64 {
            // SplitMix64.
            self.rng = self.rng.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = self.rng;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        }
    }

    impl AsyncRead for Chunked {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
            buf: &mut tokio::io::ReadBuf<'_>,
        ) -> Poll<std::io::Result<()>> {
            let left = self.data.len() - self.at;
            let n = (1 + self.next() as usize % 64)
                .min(left)
                .min(buf.remaining());
            let at = self.at;
            buf.put_slice(&self.data[at..at + n]);
            self.at += n;
            Poll::Ready(Ok(()))
        }
    }

    fn text(rng: &mut Chunked, len: usize) -> String {
        (0..len)
            .map(|_| char::from(b' ' + (rng.next() % 95) as u8))
            .collect()
    }

    #[tokio::test]
    async fn a_proxy_answer_is_read_to_its_blank_line_and_not_a_byte_further() {
        for seed in 0..2000u64 {
            let mut g = Chunked {
                data: vec![],
                at: 0,
                rng: seed,
            };
            let (minor, code, reason_len) = (g.next() % 2, 100 + g.next() % 500, g.next() % 300);
            let status = format!(
                "HTTP/1.{minor} {code} {}",
                text(&mut g, reason_len as usize)
            );
            let mut head = format!("{status}\r\n");
            for _ in 0..g.next() % 8 {
                let (name, value) = (
                    text(&mut g, 8).replace([':', '\r', '\n'], "x"),
                    text(&mut g, 40),
                );
                head.push_str(&format!("{name}: {value}\r\n"));
            }
            head.push_str("\r\n");
            let tunnel: Vec<u8> = (0..g.next() % 100).map(|_| g.next() as u8).collect();
            let mut data = head.into_bytes();
            data.extend_from_slice(&tunnel);
            let mut r = Chunked {
                data,
                at: 0,
                rng: seed ^ 0xA5A5,
            };
            let line = read_proxy_answer(&mut r).await.expect("a well-formed head");
            let want: String = status.trim().chars().take(200).collect();
            assert_eq!(line, want, "seed {seed}");
            assert_eq!(
                &r.data[r.at..],
                &tunnel[..],
                "seed {seed}: the tunnel's bytes stay"
            );
        }
    }

    #[tokio::test]
    async fn any_bytes_end_in_a_line_or_an_error_within_the_bound() {
        for seed in 0..2000u64 {
            let mut g = Chunked {
                data: vec![],
                at: 0,
                rng: seed,
            };
            let len = g.next() as usize % (MAX_PROXY_HEAD + 200);
            // Mostly CR, LF and a few letters, so blank lines turn up at random.
            let data: Vec<u8> = (0..len)
                .map(|_| [b'\r', b'\n', b'H', b' ', 0xff][g.next() as usize % 5])
                .collect();
            let mut r = Chunked {
                data: data.clone(),
                at: 0,
                rng: seed,
            };
            match read_proxy_answer(&mut r).await {
                Ok(line) => {
                    assert!(data[..r.at].ends_with(b"\r\n\r\n"), "seed {seed}");
                    assert!(r.at <= MAX_PROXY_HEAD && line.chars().count() <= 200);
                    let first = data[..r.at].windows(4).position(|w| w == b"\r\n\r\n");
                    assert_eq!(
                        first.map(|p| p + 4),
                        Some(r.at),
                        "seed {seed}: stops at the first"
                    );
                }
                Err(_) => assert!(
                    r.at == data.len() || r.at >= MAX_PROXY_HEAD,
                    "seed {seed}: an error only at the end or the bound"
                ),
            }
        }
    }
}
