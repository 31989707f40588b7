//! HTTP/2 streams as byte streams, for the tunnel's TCP transport (DESIGN §10): each h2 stream
//! carries exactly what a QUIC stream carries (a frame, then HTTP/1.1 bytes), so both ends read
//! and write it through `AsyncRead`/`AsyncWrite` as they do a QUIC stream. Writes respect the
//! peer's flow-control window (h2 would otherwise buffer without bound); reads return the
//! window as the bytes are consumed.

use bytes::{Buf, Bytes};
use std::future::Future as _;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{ready, Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Largest DATA payload handed to h2 per write (its frames are cut to the peer's frame size).
const MAX_CHUNK: usize = 64 * 1024;

/// The path of the control stream (the first stream the server opens).
pub const CONTROL_PATH: &str = "/control";
/// The path of a request stream.
pub const STREAM_PATH: &str = "/stream";
/// The path of the stream that carries the server's reason for closing (its body is one
/// [`crate::protocol::Control`]-style frame, a [`crate::protocol::ErrorBody`]).
pub const GOODBYE_PATH: &str = "/goodbye";

/// The sending half of an h2 stream. Shared with [`Abandoned`] (both are polled from the task
/// that serves the stream: h2 keeps one waker per stream for both).
pub struct H2Write {
    inner: Arc<Mutex<h2::SendStream<Bytes>>>,
    ended: bool,
}

impl H2Write {
    /// Wraps `send`.
    pub fn new(send: h2::SendStream<Bytes>) -> H2Write {
        H2Write {
            inner: Arc::new(Mutex::new(send)),
            ended: false,
        }
    }

    /// A future that resolves when the peer resets the stream (it stopped reading).
    pub fn abandoned(&self) -> Abandoned {
        Abandoned(self.inner.clone())
    }

    /// The stream's id on its connection.
    pub fn id(&self) -> u64 {
        u64::from(u32::from(self.lock().stream_id()))
    }

    /// Resets the stream (refused, or abandoned).
    pub fn reset(&self, reason: h2::Reason) {
        self.lock().send_reset(reason);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, h2::SendStream<Bytes>> {
        // Invariant: nothing panics while the lock is held.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn broken(e: h2::Error) -> io::Error {
    if e.is_io() {
        return e
            .into_io()
            .unwrap_or_else(|| io::ErrorKind::BrokenPipe.into());
    }
    io::Error::new(io::ErrorKind::BrokenPipe, e)
}

impl AsyncWrite for H2Write {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let mut send = self.lock();
        send.reserve_capacity(buf.len().min(MAX_CHUNK));
        let mut room = send.capacity();
        while room == 0 {
            room = match ready!(send.poll_capacity(cx)) {
                Some(Ok(n)) => n,
                Some(Err(e)) => return Poll::Ready(Err(broken(e))),
                None => return Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
            };
        }
        let n = room.min(buf.len()).min(MAX_CHUNK);
        send.send_data(Bytes::copy_from_slice(&buf[..n]), false)
            .map_err(broken)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The connection's task writes queued frames out.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.ended {
            self.ended = true;
            self.lock().send_data(Bytes::new(), true).map_err(broken)?;
        }
        Poll::Ready(Ok(()))
    }
}

/// Resolves when the peer resets the stream; see [`H2Write::abandoned`].
pub struct Abandoned(Arc<Mutex<h2::SendStream<Bytes>>>);

impl std::future::Future for Abandoned {
    type Output = ();
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut send = self.0.lock().unwrap_or_else(|p| p.into_inner());
        send.poll_reset(cx).map(|_| ())
    }
}

/// The receiving half of an h2 stream: first, on the side that opened it, the answer's head.
pub struct H2Read {
    state: ReadState,
    buf: Bytes,
}

enum ReadState {
    Head(h2::client::ResponseFuture),
    Body(h2::RecvStream),
    Done,
}

impl H2Read {
    /// Reads a request body (the side that accepted the stream).
    pub fn body(recv: h2::RecvStream) -> H2Read {
        H2Read {
            state: ReadState::Body(recv),
            buf: Bytes::new(),
        }
    }

    /// Reads the body of the answer to a request this side sent.
    pub fn answer(head: h2::client::ResponseFuture) -> H2Read {
        H2Read {
            state: ReadState::Head(head),
            buf: Bytes::new(),
        }
    }
}

impl AsyncRead for H2Read {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        while self.buf.is_empty() {
            match &mut self.state {
                ReadState::Head(head) => {
                    let resp = ready!(Pin::new(head).poll(cx)).map_err(broken)?;
                    if !resp.status().is_success() {
                        self.state = ReadState::Done;
                        return Poll::Ready(Err(io::Error::other(format!(
                            "the peer refused the stream: {}",
                            resp.status()
                        ))));
                    }
                    self.state = ReadState::Body(resp.into_body());
                }
                ReadState::Body(recv) => match ready!(recv.poll_data(cx)) {
                    Some(Ok(data)) => {
                        let _ = recv.flow_control().release_capacity(data.len());
                        self.buf = data;
                    }
                    Some(Err(e)) => {
                        self.state = ReadState::Done;
                        // A stream the peer cancelled after finishing its side reads as ended.
                        return Poll::Ready(match e.reason() {
                            Some(h2::Reason::NO_ERROR) => Ok(()),
                            _ => Err(broken(e)),
                        });
                    }
                    None => {
                        self.state = ReadState::Done;
                        return Poll::Ready(Ok(()));
                    }
                },
                ReadState::Done => return Poll::Ready(Ok(())),
            }
        }
        let n = self.buf.len().min(out.remaining());
        out.put_slice(&self.buf[..n]);
        self.buf.advance(n);
        Poll::Ready(Ok(()))
    }
}

/// Settings both ends give h2: windows sized like the QUIC transport's (1 MiB per stream, 4 MiB
/// per connection, where h2's default is 64 KiB each: a bulk download would stall every 64 KiB
/// for a round trip), 64 KiB frames, and room for a few hundred streams.
pub mod settings {
    use crate::protocol::{CONN_WINDOW, STREAM_WINDOW};

    /// Per-stream receive window.
    pub const STREAM: u32 = STREAM_WINDOW;
    /// Connection receive window.
    pub const CONNECTION: u32 = CONN_WINDOW;
    /// Largest frame either end accepts.
    pub const FRAME: u32 = 64 * 1024;
    /// Bytes queued per stream before a writer waits (h2's default is 400 KiB).
    pub const SEND_BUFFER: usize = 256 * 1024;
}
