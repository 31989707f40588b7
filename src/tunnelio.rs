//! One tunnel stream whichever transport carries it: a QUIC stream, or an HTTP/2 stream on the
//! TCP transport ([`crate::h2io`]). Both ends write the stream header and HTTP/1.1 bytes into
//! the sending half and read the other side's from the receiving half, the same on either.

use crate::h2io::{H2Read, H2Write};
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Which transport carries a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// QUIC over UDP.
    Quic,
    /// TLS 1.3 over TCP with HTTP/2 framing.
    Tcp,
}

impl Transport {
    /// `quic` or `tcp`, as status, metrics and the CM spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The sending half of a tunnel stream.
pub enum SendHalf {
    /// On QUIC.
    Quic(quinn::SendStream),
    /// On the TCP transport.
    Tcp(H2Write),
}

/// The receiving half of a tunnel stream.
pub enum RecvHalf {
    /// On QUIC.
    Quic(quinn::RecvStream),
    /// On the TCP transport.
    Tcp(H2Read),
}

impl SendHalf {
    /// The stream's id on its connection (for log lines).
    pub fn id(&self) -> u64 {
        match self {
            SendHalf::Quic(s) => s.id().index(),
            SendHalf::Tcp(s) => s.id(),
        }
    }
}

impl AsyncWrite for SendHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            SendHalf::Quic(s) => AsyncWrite::poll_write(Pin::new(s), cx, buf),
            SendHalf::Tcp(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    /// hyper queues a message's head and body chunks and hands them over together instead of
    /// first copying the body into its own buffer (quinn and h2 copy each slice into their
    /// send buffers either way). Slices are written in order until one is taken only in part
    /// or the stream has no room; what was taken so far is reported.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut written = 0;
        for buf in bufs.iter().filter(|b| !b.is_empty()) {
            match self.as_mut().poll_write(cx, buf) {
                Poll::Ready(Ok(n)) => {
                    written += n;
                    if n < buf.len() {
                        break;
                    }
                }
                // An error or no room after some bytes were taken: report those bytes; the
                // next call meets the error (or the room) again.
                Poll::Ready(Err(e)) if written == 0 => return Poll::Ready(Err(e)),
                Poll::Pending if written == 0 => return Poll::Pending,
                _ => break,
            }
        }
        Poll::Ready(Ok(written))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendHalf::Quic(s) => AsyncWrite::poll_flush(Pin::new(s), cx),
            SendHalf::Tcp(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            SendHalf::Quic(s) => AsyncWrite::poll_shutdown(Pin::new(s), cx),
            SendHalf::Tcp(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for RecvHalf {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            RecvHalf::Quic(s) => AsyncRead::poll_read(Pin::new(s), cx, buf),
            RecvHalf::Tcp(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

/// Byte counts of a TCP transport connection (below TLS), for the agent's metrics.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes written to the socket.
    pub sent: std::sync::atomic::AtomicU64,
    /// Bytes read from it.
    pub received: std::sync::atomic::AtomicU64,
}

/// A byte stream that counts what passes through it.
pub struct Counted<T> {
    inner: T,
    counters: std::sync::Arc<Counters>,
}

impl<T> Counted<T> {
    /// Counts `inner`'s bytes into `counters`.
    pub fn new(inner: T, counters: std::sync::Arc<Counters>) -> Counted<T> {
        Counted { inner, counters }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Counted<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let n = buf.filled().len() - before;
        self.counters
            .received
            .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Counted<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = r {
            self.counters
                .sent
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        if let Poll::Ready(Ok(n)) = r {
            self.counters
                .sent
                .fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
        }
        r
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// Sends an h2 PING at once and then every `every` and returns why the connection looks dead once one is not
/// answered within `limit`; each answer's round trip is stored in `rtt_ms`.
pub async fn keepalive(
    mut ping: h2::PingPong,
    every: std::time::Duration,
    limit: std::time::Duration,
    rtt_ms: &std::sync::atomic::AtomicU64,
) -> String {
    loop {
        let sent = tokio::time::Instant::now();
        match tokio::time::timeout(limit, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => rtt_ms.store(
                sent.elapsed().as_millis() as u64,
                std::sync::atomic::Ordering::Relaxed,
            ),
            Ok(Err(e)) => return format!("the connection failed: {e}"),
            Err(_) => return format!("no answer from the peer for {limit:?}"),
        }
        tokio::time::sleep(every).await;
    }
}
