//! Requests whose framing two parsers could read differently stop at the front with 400 and a
//! closed connection (catalogue C5): `Content-Length` beside `Transfer-Encoding` or a bare LF
//! in the head ([`FirstHead`]), a body that is not what its framing says ([`bad_framing`] from
//! the forwarder). hyper refuses the rest itself (two lengths, unknown codings, obs-fold, NUL,
//! whitespace before a colon, `Transfer-Encoding` on HTTP/1.0).

use super::*;
use std::pin::Pin;
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// 400 with `Connection: close`: the connection's framing cannot be trusted any more.
pub(super) fn bad_framing(detail: &str) -> Response<Body> {
    let mut r = web::page(StatusCode::BAD_REQUEST, "Bad request", detail);
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// The front's handshake, with [`FirstHead`] around the stream it yields.
#[derive(Clone)]
pub(super) struct Strict<H>(pub H);

impl<H: httpserve::Handshake> httpserve::Handshake for Strict<H> {
    type Io = FirstHead<H::Io>;
    fn is_tls(&self) -> bool {
        self.0.is_tls()
    }
    async fn handshake(&self, tcp: tokio::net::TcpStream) -> std::io::Result<Option<Self::Io>> {
        Ok(self.0.handshake(tcp).await?.map(FirstHead::new))
    }
}

/// Watches a connection's first request head for what hyper would accept but another parser
/// might read differently: a line ended by a bare LF (RFC 9112 §2.2 lets a recipient take it
/// as a line end), or both `Content-Length` and `Transfer-Encoding` (hyper drops the length and
/// closes after the request; the front's service never sees both). The offending LF, or the
/// head's last LF, becomes a NUL, so hyper refuses the head with its own 400 and closes.
///
/// Later heads on a kept connection are not watched: they are parsed by the same hyper, a
/// request with both lengths ends its connection, and the front re-serialises every request it
/// forwards, so no second parser ever reads the visitor's bytes.
pub(super) struct FirstHead<T> {
    inner: T,
    /// Still in the first head.
    scanning: bool,
    /// The previous byte was CR.
    after_cr: bool,
    /// Bytes on the current line.
    line: usize,
    /// The current line's first bytes, lower-cased (enough for a header name).
    name: [u8; 18],
    /// `Content-Length` and `Transfer-Encoding` seen.
    length: bool,
    chunked: bool,
}

impl<T> FirstHead<T> {
    fn new(inner: T) -> FirstHead<T> {
        FirstHead {
            inner,
            scanning: true,
            after_cr: false,
            line: 0,
            name: [0; 18],
            length: false,
            chunked: false,
        }
    }

    /// Scans `bytes` (just read) and spoils a bare LF, or the head's end, in place.
    fn scan(&mut self, bytes: &mut [u8]) {
        for b in bytes.iter_mut() {
            if !self.scanning {
                return;
            }
            match *b {
                b'\n' if !self.after_cr => {
                    *b = 0;
                    self.scanning = false;
                }
                b'\n' if self.line == 0 => {
                    if self.length && self.chunked {
                        *b = 0;
                    }
                    self.scanning = false;
                }
                b'\n' => {
                    let name = &self.name[..self.line.min(self.name.len())];
                    self.length |= name.starts_with(b"content-length:");
                    self.chunked |= name.starts_with(b"transfer-encoding:");
                    self.line = 0;
                }
                b'\r' => {
                    self.after_cr = true;
                    continue;
                }
                c => {
                    if let Some(slot) = self.name.get_mut(self.line) {
                        *slot = c.to_ascii_lowercase();
                    }
                    self.line += 1;
                }
            }
            self.after_cr = false;
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for FirstHead<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        if self.scanning {
            let fresh = &mut buf.filled_mut()[before..];
            self.scan(fresh);
        }
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for FirstHead<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scanned(chunks: &[&[u8]]) -> Vec<u8> {
        let mut f = FirstHead::new(());
        let mut out = vec![];
        for c in chunks {
            let mut c = c.to_vec();
            f.scan(&mut c);
            out.extend(c);
        }
        out
    }

    #[test]
    fn a_bare_lf_in_the_first_head_is_spoiled_and_nothing_after_it() {
        let crlf = b"GET / HTTP/1.1\r\nHost: a\r\n\r\nbody\nwith\nlf";
        for split in 1..crlf.len() {
            let (a, b) = crlf.split_at(split);
            assert_eq!(scanned(&[a, b]), crlf.to_vec(), "split {split}");
        }
        let bare = b"GET / HTTP/1.1\r\nHost: a\n\r\n";
        for split in 1..bare.len() {
            let (a, b) = bare.split_at(split);
            assert_eq!(
                scanned(&[a, b]),
                b"GET / HTTP/1.1\r\nHost: a\0\r\n".to_vec(),
                "split {split}"
            );
        }
        assert_eq!(
            scanned(&[b"GET / HTTP/1.1\n"]),
            b"GET / HTTP/1.1\0".to_vec()
        );
    }

    #[test]
    fn both_lengths_in_the_first_head_spoil_its_end() {
        let both: &[u8] =
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\ntransfer-ENCODING: chunked\r\n\r\n0\r\n\r\n";
        let mut want = both.to_vec();
        let end = both.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 3;
        want[end] = 0;
        for split in 1..both.len() {
            let (a, b) = both.split_at(split);
            assert_eq!(scanned(&[a, b]), want, "split {split}");
        }
        let one: &[u8] =
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nX-Transfer-Encoding: chunked\r\n\r\nhello";
        assert_eq!(scanned(&[one]), one.to_vec());
    }
}
