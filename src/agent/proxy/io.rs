//! Writing to a tunnel stream: an `AsyncWrite` over the stream's sending half whose shutdown,
//! on QUIC, waits for the peer's acknowledgement, so a finished response is never cut by the
//! stream's end (on TCP the bytes are in order on the one connection, which closes after them).

use super::*;

/// The tunnel side of a request stream. Shutting it down finishes the stream and completes only
/// once the front has read everything, so a connection closed right after (graceful stop) loses
/// no response bytes still in flight.
pub(super) struct AckedSend {
    pub(super) inner: SendHalf,
    pub(super) acked: Option<Acked>,
}

/// Resolves when the peer has read the finished stream (or stopped it, or the connection died).
pub(super) type Acked = std::pin::Pin<
    Box<dyn Future<Output = Result<Option<quinn::VarInt>, quinn::StoppedError>> + Send + Sync>,
>;

impl AsyncWrite for AckedSend {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        AsyncWrite::poll_write(std::pin::Pin::new(&mut self.inner), cx, buf)
    }

    /// The head and body chunks hyper queued, handed over together (see [`SendHalf`]).
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        AsyncWrite::poll_write_vectored(std::pin::Pin::new(&mut self.inner), cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        AsyncWrite::poll_flush(std::pin::Pin::new(&mut self.inner), cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.acked.is_none() {
            std::task::ready!(AsyncWrite::poll_shutdown(
                std::pin::Pin::new(&mut self.inner),
                cx
            ))?;
            let SendHalf::Quic(quic) = &self.inner else {
                return std::task::Poll::Ready(Ok(()));
            };
            let acked = quic.stopped();
            self.acked = Some(Box::pin(acked));
        }
        match self.acked.as_mut() {
            // Acknowledged, stopped by the peer, or the connection is gone: done either way.
            Some(f) => f.as_mut().poll(cx).map(|_| Ok(())),
            None => std::task::Poll::Ready(Ok(())),
        }
    }
}
