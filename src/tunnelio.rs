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

/// Bytes of small slices a vectored write gathers into one write (see
/// [`SendHalf::poll_write_vectored`]): a portal page's head and a small answer fit.
const GATHER: usize = 4096;

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
    /// first copying the body into its own buffer. Small slices (a head, a chunk-size line, a
    /// small body) are gathered into one write of up to [`GATHER`] bytes: quinn and h2 copy
    /// each write into a buffer of their own, take the connection's lock and wake its driver,
    /// and on the TCP transport each write is a DATA frame the peer reads on its own. Larger
    /// slices are written in order until one is taken only in part or the stream has no room;
    /// what was taken so far is reported.
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let mut gathered = [0u8; GATHER];
        let mut len = 0;
        let mut slices = 0;
        for buf in bufs.iter().filter(|b| !b.is_empty()) {
            if len + buf.len() > GATHER {
                break;
            }
            gathered[len..len + buf.len()].copy_from_slice(buf);
            len += buf.len();
            slices += 1;
        }
        if slices > 1 {
            // The gathered bytes are a prefix of `bufs`, so taking part of them is a short write.
            return self.poll_write(cx, &gathered[..len]);
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use std::time::Duration;
    use tokio::io::AsyncWriteExt;

    /// An h2 stream from a client to a server over an in-memory pipe: its sending half, and
    /// the DATA frames' payloads as the server receives them.
    async fn h2_stream() -> (SendHalf, tokio::sync::mpsc::UnboundedReceiver<Bytes>) {
        let (near, far) = tokio::io::duplex(1 << 20);
        let (frames_tx, frames) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut conn = h2::server::handshake(far).await.expect("server handshake");
            let Some(Ok((req, _respond))) = conn.accept().await else {
                return;
            };
            let mut body = req.into_body();
            tokio::spawn(async move { while conn.accept().await.is_some() {} });
            while let Some(Ok(data)) = body.data().await {
                let _ = body.flow_control().release_capacity(data.len());
                let _ = frames_tx.send(data);
            }
        });
        let (client, conn) = h2::client::handshake(near).await.expect("client handshake");
        tokio::spawn(conn);
        let mut client = client.ready().await.expect("client ready");
        let req = http::Request::post("http://tunnel/stream")
            .body(())
            .expect("request");
        let (_answer, send) = client.send_request(req, false).expect("stream");
        (SendHalf::Tcp(H2Write::new(send)), frames)
    }

    /// Writes every slice, as hyper does: vectored writes until all are taken.
    async fn write_all_vectored(half: &mut SendHalf, slices: &[&[u8]]) {
        let mut slices: Vec<&[u8]> = slices.to_vec();
        while !slices.is_empty() {
            let io: Vec<io::IoSlice<'_>> = slices.iter().map(|s| io::IoSlice::new(s)).collect();
            let mut n = half.write_vectored(&io).await.expect("write");
            assert!(n > 0, "a write took nothing");
            while n > 0 {
                let take = n.min(slices[0].len());
                slices[0] = &slices[0][take..];
                n -= take;
                if slices[0].is_empty() {
                    slices.remove(0);
                }
            }
        }
    }

    async fn received(
        frames: &mut tokio::sync::mpsc::UnboundedReceiver<Bytes>,
        len: usize,
    ) -> Vec<Bytes> {
        let mut got = Vec::new();
        let mut total = 0;
        while total < len {
            let frame = tokio::time::timeout(Duration::from_secs(5), frames.recv())
                .await
                .expect("the peer received the bytes in time")
                .expect("the stream is open");
            total += frame.len();
            got.push(frame);
        }
        got
    }

    #[tokio::test]
    async fn a_small_answer_goes_out_as_one_write() {
        let (mut half, mut frames) = h2_stream().await;
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 1387\r\n\r\n".as_slice();
        let body = vec![b'x'; 1387];
        write_all_vectored(&mut half, &[head, b"", &body]).await;
        let got = received(&mut frames, head.len() + body.len()).await;
        assert_eq!(
            got.len(),
            1,
            "head and body arrived as {} DATA frames",
            got.len()
        );
        assert_eq!(&got[0][..head.len()], head);
        assert_eq!(&got[0][head.len()..], &body[..]);
    }

    #[tokio::test]
    async fn slices_too_large_to_gather_arrive_whole_and_in_order() {
        let (mut half, mut frames) = h2_stream().await;
        let head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n".to_vec();
        let chunk: Vec<u8> = (0..GATHER * 3).map(|i| (i % 251) as u8).collect();
        let slices: [&[u8]; 5] = [&head, b"3000\r\n", &chunk, b"\r\n", b"0\r\n\r\n"];
        write_all_vectored(&mut half, &slices).await;
        let want = slices.concat();
        let got = received(&mut frames, want.len()).await.concat();
        assert_eq!(got, want);
    }
}
